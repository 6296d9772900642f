//! PostgreSQL: a Lambda-sized pool whose credentials come from Secrets Manager (re-read once
//! when the server refuses them), the embedded migrations, and [`Database::tenant_tx`], the
//! transaction that sets the tenant row-level security reads.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::{Config, DatabaseSource, DbSslMode, DbTls};
use crate::domain::TenantId;
use crate::secrets::{DbCredentials, Secrets, SecretsError};

/// Every migration in `migrations/`, compiled into each binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

pub type Tx = Transaction<'static, Postgres>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database credentials: {0}")]
    Credentials(#[from] SecretsError),
    #[error("database configuration: {0}")]
    Config(String),
    /// The database could not be reached or refused the connection: worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A deadlock or serialization failure (retried a few times by [`retry_transient`]), a lock
    /// or statement timeout: the transaction was rolled back, nothing was written.
    #[error("database busy: {0}")]
    Busy(#[source] sqlx::Error),
    /// Concurrent writers kept invalidating this transaction's work (e.g. took its keys):
    /// nothing was written; worth retrying shortly.
    #[error("contended: {0}")]
    Contended(String),
    /// A row fell outside every partition of its table: the partitions ahead were not created
    /// (the storage maintenance has not run). Nothing was written; an operator must act, and
    /// the caller may retry.
    #[error("no partition for the row: {0}")]
    NoPartition(#[source] sqlx::Error),
    /// A value PostgreSQL refused as data (SQLSTATE class 22): out of range, malformed, NUL in
    /// text. The request's fault, never the service's.
    #[error("value refused by the database: {0}")]
    InvalidValue(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    /// A stored value that the domain types do not accept (a schema/code mismatch).
    #[error("unexpected stored value: {0}")]
    Decode(String),
}

impl From<crate::domain::InvalidValue> for DbError {
    fn from(e: crate::domain::InvalidValue) -> Self {
        DbError::Decode(e.to_string())
    }
}

/// Every PostgreSQL error class is sorted here, once; callers and the HTTP mapping only ever
/// look at the variant.
impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            return DbError::Unavailable(e);
        }
        let code = match &e {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        };
        match code.as_deref() {
            Some(
                SERIALIZATION_FAILURE | DEADLOCK_DETECTED | LOCK_NOT_AVAILABLE | QUERY_CANCELED,
            ) => DbError::Busy(e),
            Some(code) if code.starts_with("22") => DbError::InvalidValue(e),
            Some(CHECK_VIOLATION) if e.to_string().contains("no partition of relation") => {
                DbError::NoPartition(e)
            }
            _ => DbError::Query(e),
        }
    }
}

const SERIALIZATION_FAILURE: &str = "40001";
const CHECK_VIOLATION: &str = "23514";
const DEADLOCK_DETECTED: &str = "40P01";
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// Raised by `statement_timeout`.
const QUERY_CANCELED: &str = "57014";

impl DbError {
    /// The SQLSTATE of a database-reported error (e.g. `23505` for a unique violation).
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            DbError::Query(sqlx::Error::Database(db))
            | DbError::Busy(sqlx::Error::Database(db))
            | DbError::InvalidValue(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// A deadlock or serialization failure: running the whole transaction again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.sqlstate().as_deref(),
            Some(SERIALIZATION_FAILURE | DEADLOCK_DETECTED)
        )
    }
}

/// How many times [`retry_transient`] runs a transaction that keeps deadlocking.
pub const TRANSIENT_ATTEMPTS: u32 = 5;

/// Runs `transaction` (which must begin, and commit, its own transaction) again when it fails
/// with a deadlock or serialization failure, up to [`TRANSIENT_ATTEMPTS`] times in all, with a
/// short jittered pause between attempts. Any other outcome is returned as it is.
pub async fn retry_transient<T, F, Fut>(mut transaction: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Err(e) if e.is_retryable() && attempt < TRANSIENT_ATTEMPTS => {
                metrics::counter!("DbTransactionRetries").increment(1);
                tracing::warn!(sqlstate = ?e.sqlstate(), attempt, "transaction rolled back; retrying");
                let ceiling_ms = 5u64 << attempt.min(6);
                let pause = rand::Rng::gen_range(&mut rand::thread_rng(), 1..=ceiling_ms);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Sets `transaction_timeout` (milliseconds) on a new session where the server has it
/// (PostgreSQL 17 and later); an older server is left as it is (it would refuse the name). One
/// statement per connection, at its opening.
async fn bound_transactions(
    conn: &mut sqlx::PgConnection,
    millis: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('transaction_timeout', $1, false)
          WHERE current_setting('server_version_num')::int >= 170000",
    )
    .bind(millis)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Connection-level failures: the server is down, unreachable, overloaded or shutting down, or
/// the pool could not get a connection in time.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 28: invalid authorization, 53: insufficient resources,
            // 57P0x: admin/crash shutdown or cannot connect now, 25P03: the session was ended
            // for idling in a transaction.
            code.starts_with("08")
                || code.starts_with("28")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || code == "25P03"
        }),
        _ => false,
    }
}

fn is_auth_failure(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")))
}

/// `DB_SSL_MODE` and `DB_SSL_ROOT_CERT` on `options`. A `DATABASE_URL`'s own `sslmode` yields
/// only to a `DB_SSL_MODE` that was set, so a local URL keeps working as written.
fn with_tls(options: PgConnectOptions, tls: &DbTls, from_url: bool) -> PgConnectOptions {
    let options = if tls.mode_is_explicit || !from_url {
        options.ssl_mode(match tls.mode {
            DbSslMode::Disable => PgSslMode::Disable,
            DbSslMode::Allow => PgSslMode::Allow,
            DbSslMode::Prefer => PgSslMode::Prefer,
            DbSslMode::Require => PgSslMode::Require,
            DbSslMode::VerifyCa => PgSslMode::VerifyCa,
            DbSslMode::VerifyFull => PgSslMode::VerifyFull,
        })
    } else {
        options
    };
    match &tls.root_cert {
        Some(bundle) => options.ssl_root_cert(bundle),
        None => options,
    }
}

#[derive(Clone)]
enum Credentials {
    Url,
    Secret {
        secrets: Arc<Secrets>,
        secret_id: String,
        host: Option<String>,
        port: Option<u16>,
        dbname: Option<String>,
    },
}

/// The pool and where its credentials come from. One per container; clones share the pool.
#[derive(Clone)]
pub struct Database {
    pool: PgPool,
    credentials: Credentials,
    base: PgConnectOptions,
}

impl Database {
    /// Builds the pool without connecting: the first query connects. With a secret, the
    /// credentials are read now (cached by the secrets client).
    pub async fn connect(config: &Config, secrets: Option<Arc<Secrets>>) -> Result<Self, DbError> {
        // sqlx builds its `verify-ca` verifier on the process-wide rustls provider.
        crate::tls::install_crypto_provider();
        // Server-side limits for every session: no statement runs, no lock is waited for, and no
        // transaction sits idle (a frozen or killed container's) longer than these.
        let tune = |options: PgConnectOptions| {
            options.application_name(&config.service).options([
                (
                    "statement_timeout",
                    config.db_statement_timeout.as_millis().to_string(),
                ),
                (
                    "lock_timeout",
                    config.db_lock_timeout.as_millis().to_string(),
                ),
                (
                    "idle_in_transaction_session_timeout",
                    config
                        .db_idle_in_transaction_timeout
                        .as_millis()
                        .to_string(),
                ),
            ])
        };
        let base = with_tls(
            tune(PgConnectOptions::new_without_pgpass()),
            &config.db_tls,
            false,
        );
        let (credentials, options) = match &config.database {
            DatabaseSource::Url(url) => {
                let parsed = PgConnectOptions::from_str(url)
                    .map_err(|e| DbError::Config(format!("DATABASE_URL does not parse: {e}")))?;
                (
                    Credentials::Url,
                    with_tls(tune(parsed), &config.db_tls, true),
                )
            }
            DatabaseSource::Secret {
                secret_id,
                host,
                port,
                dbname,
            } => {
                let credentials = Credentials::Secret {
                    secrets: secrets.ok_or_else(|| {
                        DbError::Config(
                            "DB_SECRET_ID is set but no Secrets Manager client was built".into(),
                        )
                    })?,
                    secret_id: secret_id.clone(),
                    host: host.clone(),
                    port: *port,
                    dbname: dbname.clone(),
                };
                let options = Self::options_from_secret(&credentials, &base, false).await?;
                (credentials, options)
            }
        };
        let transaction_timeout = config.db_transaction_timeout.as_millis().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(config.db_max_connections)
            .min_connections(0)
            .acquire_timeout(config.db_acquire_timeout)
            .idle_timeout(Some(std::time::Duration::from_secs(300)))
            .after_connect(move |conn, _| {
                let timeout = transaction_timeout.clone();
                Box::pin(async move { bound_transactions(conn, &timeout).await })
            })
            .connect_lazy_with(options);
        Ok(Database {
            pool,
            credentials,
            base,
        })
    }

    /// Wraps an existing pool (tests, tools); no secret refresh.
    pub fn from_pool(pool: PgPool) -> Self {
        Database {
            pool,
            credentials: Credentials::Url,
            base: PgConnectOptions::new_without_pgpass(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn options_from_secret(
        credentials: &Credentials,
        base: &PgConnectOptions,
        refresh: bool,
    ) -> Result<PgConnectOptions, DbError> {
        let Credentials::Secret {
            secrets,
            secret_id,
            host,
            port,
            dbname,
        } = credentials
        else {
            return Err(DbError::Config("no secret to read credentials from".into()));
        };
        let creds: DbCredentials = secrets.get_json(secret_id, refresh).await?;
        let host = creds.host.or_else(|| host.clone()).ok_or_else(|| {
            DbError::Config(format!(
                "secret {secret_id} has no host and DB_HOST is unset"
            ))
        })?;
        let dbname = creds.dbname.or_else(|| dbname.clone()).ok_or_else(|| {
            DbError::Config(format!(
                "secret {secret_id} has no dbname and DB_NAME is unset"
            ))
        })?;
        Ok(base
            .clone()
            .host(&host)
            .port(creds.port.or(*port).unwrap_or(5432))
            .username(&creds.username)
            .password(&creds.password)
            .database(&dbname))
    }

    /// Re-reads the secret, bypassing the cache, and points new connections at it.
    async fn refresh_credentials(&self) -> Result<bool, DbError> {
        if matches!(self.credentials, Credentials::Url) {
            return Ok(false);
        }
        tracing::warn!("database refused the credentials; re-reading the secret");
        let options = Self::options_from_secret(&self.credentials, &self.base, true).await?;
        self.pool.set_connect_options(options);
        Ok(true)
    }

    /// Begins a transaction; on an authentication failure re-reads the secret once and retries.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        match self.pool.begin().await {
            Err(e) if is_auth_failure(&e) && self.refresh_credentials().await? => {
                Ok(self.pool.begin().await?)
            }
            other => Ok(other?),
        }
    }

    /// A pooled connection outside any transaction (for statements that need no tenant), with
    /// the same credential refresh as [`Database::begin`].
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, DbError> {
        match self.pool.acquire().await {
            Err(e) if is_auth_failure(&e) && self.refresh_credentials().await? => {
                Ok(self.pool.acquire().await?)
            }
            other => Ok(other?),
        }
    }

    /// A transaction acting for `tenant`: row-level security limits every statement in it to that
    /// tenant's rows. The setting is transaction-local, so a pooled connection never carries it
    /// into the next transaction. BEGIN and the setting travel in one round trip; the tenant is
    /// a UUID, rendered by `Uuid`'s own formatter, so nothing else can enter the statement.
    pub async fn tenant_tx(&self, tenant: TenantId) -> Result<Tx, DbError> {
        self.begin_with(format!(
            "BEGIN; SELECT set_config('meterbridge.tenant_id', '{}', true)",
            tenant.0.hyphenated()
        ))
        .await
    }

    /// A read-only [`Database::tenant_tx`] for listings and reads. Its statements are planned
    /// for their actual parameters (`plan_cache_mode = force_custom_plan`), so an optional filter
    /// that is absent drops out of the plan and one that is present can choose its index.
    pub async fn tenant_read_tx(&self, tenant: TenantId) -> Result<Tx, DbError> {
        self.begin_with(format!(
            "BEGIN READ ONLY; SELECT set_config('meterbridge.tenant_id', '{}', true), \
             set_config('plan_cache_mode', 'force_custom_plan', true)",
            tenant.0.hyphenated()
        ))
        .await
    }

    async fn begin_with(&self, statement: String) -> Result<Tx, DbError> {
        match self.pool.begin_with(statement.clone()).await {
            Err(e) if is_auth_failure(&e) && self.refresh_credentials().await? => {
                Ok(self.pool.begin_with(statement).await?)
            }
            other => Ok(other?),
        }
    }

    /// Applies the embedded migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }
}
