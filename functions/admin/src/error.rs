use meterbridge::DbError;

/// What an admin action can fail with. The Lambda reports `error_type()` as its `errorType`;
/// the CLI prints the message and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Database(#[from] DbError),
    /// A service other than the database failed (S3, for an export): retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl AdminError {
    pub fn error_type(&self) -> &'static str {
        match self {
            AdminError::BadRequest(_) => "BadRequest",
            AdminError::NotFound(_) => "NotFound",
            AdminError::Conflict(_) => "Conflict",
            AdminError::Database(DbError::Unavailable(_)) => "DatabaseUnavailable",
            AdminError::Database(_) => "DatabaseError",
            AdminError::Unavailable(_) => "Unavailable",
            AdminError::Migration(_) => "MigrationFailed",
        }
    }
}

impl From<meterbridge::domain::InvalidValue> for AdminError {
    fn from(e: meterbridge::domain::InvalidValue) -> Self {
        AdminError::BadRequest(e.to_string())
    }
}

impl From<AdminError> for lambda_runtime::Diagnostic {
    fn from(e: AdminError) -> Self {
        lambda_runtime::Diagnostic {
            error_type: e.error_type().to_owned(),
            error_message: e.to_string(),
        }
    }
}
