//! The one process-wide TLS setting both clients need.

/// Installs rustls's aws-lc-rs crypto provider for the process. The dependency graph enables
/// both of rustls's providers (ring through sqlx, aws-lc-rs through the AWS SDK); with two and
/// none installed, rustls picks neither and the first TLS connection (Redis, or PostgreSQL in
/// `verify-ca`) panics. Idempotent: an error only means a provider is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
