//! The personal-data inventory (docs/personal-data.md) against the schema: every text or JSON
//! column of every table, live or archived, is named there, and every column named exists. A
//! migration that adds such a column fails here until the inventory says what it holds and how
//! export and erasure treat it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use sqlx::PgPool;

/// `table.column` names in the inventory's tables: the backquoted names of each row's first
/// cell (a cell may name several, comma-separated).
fn inventoried() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/personal-data.md"
    ))
    .unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(first) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        for name in first.split(", ") {
            let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) else {
                continue;
            };
            if let Some((table, column)) = name.split_once('.') {
                let plain = |s: &str| s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
                if plain(table) && plain(column) {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names
}

/// Text (any string type, or an array of one) and JSON columns of the application's tables: the
/// public schema's (partitions as their parent) and the archive's (a detached day of
/// `usage_events` as `usage_events`).
async fn text_and_json_columns(pool: &PgPool) -> BTreeSet<String> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, a.attname::text
           FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
          WHERE n.nspname IN ('public', 'usage_archive')
            AND c.relkind IN ('r', 'p') AND NOT c.relispartition
            AND a.attnum > 0 AND NOT a.attisdropped
            AND (t.typcategory = 'S' OR t.typname IN ('json', 'jsonb')
                 OR e.typcategory = 'S' OR e.typname IN ('json', 'jsonb'))",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(schema, table, column)| {
            let archived_day = schema == "usage_archive"
                && table.len() == "usage_events_p20260101".len()
                && table.starts_with("usage_events_p")
                && table["usage_events_p".len()..]
                    .bytes()
                    .all(|b| b.is_ascii_digit());
            let table = if archived_day {
                "usage_events".to_owned()
            } else if schema == "public" {
                table
            } else {
                format!("{schema}_{table}")
            };
            format!("{table}.{column}")
        })
        .collect()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_text_or_json_column_is_in_the_personal_data_inventory(pool: PgPool) {
    // An archived day, as the storage maintenance leaves one: its columns count too.
    sqlx::query("SELECT usage_events_create_partition('2026-01-01')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE usage_events DETACH PARTITION usage_events_p20260101")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE usage_events_p20260101 SET SCHEMA usage_archive")
        .execute(&pool)
        .await
        .unwrap();
    let columns = text_and_json_columns(&pool).await;
    assert!(columns.contains("usage_events.actor_id"), "{columns:?}");
    assert!(columns.contains("usage_events.metadata"), "{columns:?}");
    let inventory = inventoried();

    let missing: Vec<&String> = columns.difference(&inventory).collect();
    assert!(
        missing.is_empty(),
        "text or JSON columns docs/personal-data.md does not name (say what each holds and how \
         export and erasure treat it): {missing:?}"
    );
    let stale: Vec<&String> = inventory.difference(&columns).collect();
    assert!(
        stale.is_empty(),
        "docs/personal-data.md names columns the schema does not have (or that are not text or \
         JSON): {stale:?}"
    );

    // A new column fails it.
    sqlx::query("ALTER TABLE payments ADD COLUMN payer_email text")
        .execute(&pool)
        .await
        .unwrap();
    let columns = text_and_json_columns(&pool).await;
    assert_eq!(
        columns.difference(&inventory).collect::<Vec<_>>(),
        ["payments.payer_email"]
    );
}
