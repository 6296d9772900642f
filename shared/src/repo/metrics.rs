use sqlx::PgExecutor;

use crate::db::DbError;
use crate::domain::MetricDefinition;

/// The whole metric catalog (a few dozen rows), by name.
pub async fn catalog(db: impl PgExecutor<'_>) -> Result<Vec<MetricDefinition>, DbError> {
    sqlx::query!("SELECT name, classification, unit FROM metrics ORDER BY name")
        .fetch_all(db)
        .await?
        .into_iter()
        .map(|r| {
            Ok(MetricDefinition {
                name: r.name,
                classification: r.classification.parse()?,
                unit: r.unit,
            })
        })
        .collect()
}
