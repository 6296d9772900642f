//! API keys: generation, the shape check every presented key passes before any lookup, and
//! hashing. A key is `mbk_<prefix>_<secret>`: the 12-hex-char prefix is a public lookup id
//! (it is shown in listings), the 64-hex-char secret carries 256 random bits. Only the SHA-256 of
//! the whole key is stored; with that much entropy a slow hash adds nothing.

use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;

use crate::clock::Clock;
use crate::db::{Database, DbError};
use crate::domain::rate_limit::Limits;
use crate::domain::{Scope, Scopes, SourceService, TenantId, TenantStatus, Trust};
use crate::repo::{api_keys, rate_limits};
use crate::ttl_cache::TtlCache;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const SCHEME: &str = "mbk";
const PREFIX_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// A freshly generated key. `key` is shown once, to whoever created it, and never stored.
pub struct NewApiKey {
    pub key: String,
    pub prefix: String,
    pub hash: [u8; 32],
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

pub fn generate_api_key() -> NewApiKey {
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut prefix);
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let prefix = hex::encode(prefix);
    let key = format!("{SCHEME}_{prefix}_{}", hex::encode(secret));
    let hash = hash_api_key(&key);
    NewApiKey { key, prefix, hash }
}

pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A presented key that has the right shape; only these reach the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedKey {
    pub prefix: String,
    pub hash: [u8; 32],
}

/// Checks the shape of a presented key. Anything else is rejected without a lookup.
pub fn parse_presented_key(raw: &str) -> Option<PresentedKey> {
    let rest = raw.strip_prefix(SCHEME)?.strip_prefix('_')?;
    let (prefix, secret) = rest.split_once('_')?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(prefix, PREFIX_BYTES * 2) || !lower_hex(secret, SECRET_BYTES * 2) {
        return None;
    }
    Some(PresentedKey {
        prefix: prefix.to_owned(),
        hash: hash_api_key(raw),
    })
}

/// Constant-time comparison of a presented key's hash with a stored one.
pub fn hashes_match(presented: &[u8; 32], stored: &[u8]) -> bool {
    stored.len() == presented.len() && bool::from(presented.ct_eq(stored))
}

/// Who is calling, as established by a valid API key. A request can never choose these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: uuid::Uuid,
    pub key_prefix: String,
    pub tenant_id: TenantId,
    pub tenant_slug: String,
    pub source: SourceService,
    pub trust: Trust,
    pub scopes: Scopes,
    /// The key's rate limits: its trust's defaults with its tenant's and its own overrides,
    /// read with the key and cached with it.
    pub limits: Limits,
}

impl Caller {
    /// The one authorization check every route makes: does this key hold `scope`?
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(AuthError::MissingScope(scope))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("the API key has been revoked")]
    Revoked,
    #[error("the tenant is disabled")]
    TenantDisabled,
    #[error("this API key lacks the {0} scope")]
    MissingScope(Scope),
    #[error(transparent)]
    Database(#[from] DbError),
}

/// What a lookup concluded about one presented key; cached, including the failures, so a
/// flood of bad keys costs one lookup each per TTL.
#[derive(Debug, Clone)]
enum Verdict {
    Valid(Caller),
    Invalid,
    Revoked,
    TenantDisabled,
}

/// Authenticates API keys, remembering each verdict for at most `ttl` (≤ 60 s) by the wall clock
/// as well as the monotonic one, so a revocation or a disabled tenant takes effect within that
/// time in every container, however long a container was frozen.
pub struct Authenticator {
    cache: TtlCache<[u8; 32], Verdict>,
}

impl Authenticator {
    pub const MAX_TTL: Duration = Duration::from_secs(60);

    pub fn new(ttl: Duration) -> Self {
        Self::with_clock(ttl, crate::clock::system())
    }

    pub fn with_clock(ttl: Duration, clock: Arc<dyn Clock>) -> Self {
        Authenticator {
            cache: TtlCache::new(ttl.min(Self::MAX_TTL), 10_000, clock),
        }
    }

    /// `raw` is the key as presented (already taken out of its header).
    pub async fn authenticate(
        &self,
        db: &Database,
        raw: Option<&str>,
    ) -> Result<Caller, AuthError> {
        let raw = raw
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        let presented = parse_presented_key(raw).ok_or(AuthError::Invalid)?;
        let verdict = match self.cache.get(&presented.hash) {
            Some(verdict) => verdict,
            None => {
                let verdict = self.look_up(db, &presented).await?;
                self.cache.insert(presented.hash, verdict.clone());
                verdict
            }
        };
        match verdict {
            Verdict::Valid(caller) => Ok(caller),
            Verdict::Invalid => Err(AuthError::Invalid),
            Verdict::Revoked => Err(AuthError::Revoked),
            Verdict::TenantDisabled => Err(AuthError::TenantDisabled),
        }
    }

    async fn look_up(&self, db: &Database, presented: &PresentedKey) -> Result<Verdict, AuthError> {
        let mut conn = db.acquire().await?;
        let Some(candidate) = api_keys::find_candidate(&mut *conn, &presented.prefix).await? else {
            return Ok(Verdict::Invalid);
        };
        if !hashes_match(&presented.hash, &candidate.key_hash) {
            return Ok(Verdict::Invalid);
        }
        if candidate.revoked {
            return Ok(Verdict::Revoked);
        }
        if candidate.tenant_status != TenantStatus::Active {
            return Ok(Verdict::TenantDisabled);
        }
        if let Err(e) = api_keys::touch(&mut *conn, candidate.key_id).await {
            tracing::warn!(error = %e, "could not record API key use");
        }
        let (tenant_limits, key_limits) =
            rate_limits::of_key(&mut *conn, candidate.key_id, &presented.hash).await?;
        Ok(Verdict::Valid(Caller {
            key_id: candidate.key_id,
            key_prefix: presented.prefix.clone(),
            tenant_id: candidate.tenant_id,
            tenant_slug: candidate.tenant_slug,
            source: candidate.source_service,
            trust: candidate.trust,
            scopes: candidate.scopes,
            limits: Limits::resolve(candidate.trust, &tenant_limits, &key_limits),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match() {
        let new = generate_api_key();
        let parsed = parse_presented_key(&new.key).expect("well-formed");
        assert_eq!(parsed.prefix, new.prefix);
        assert!(hashes_match(&parsed.hash, &new.hash));
        assert!(!format!("{new:?}").contains(&new.key));
        assert_ne!(generate_api_key().key, new.key);
    }

    #[test]
    fn malformed_keys_are_refused_before_lookup() {
        let good = generate_api_key().key;
        let upper = good.to_uppercase();
        let truncated = &good[..good.len() - 1];
        let long = format!("{good}0");
        for bad in [
            "",
            "mbk_",
            "Bearer x",
            upper.as_str(),
            truncated,
            long.as_str(),
            "mbk_0123456789ab_zz",
        ] {
            assert!(parse_presented_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_different_key_does_not_match() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert!(!hashes_match(&a.hash, &b.hash));
        assert!(!hashes_match(&a.hash, &b.hash[..31]));
    }
}
