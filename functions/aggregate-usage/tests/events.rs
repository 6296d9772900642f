//! Every payload in events/aggregate-usage/ (the files `sam local invoke` takes) through the
//! handler, as the Lambda runs it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use meterbridge::domain::TenantSlug;
use serde_json::Value;
use sqlx::PgPool;

fn load(name: &str) -> Value {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/aggregate-usage");
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_fixture_runs_through_the_handler(owner: PgPool) {
    // The fixtures name the tenant "acme".
    let acme =
        meterbridge::repo::tenants::insert(&owner, &TenantSlug::parse("acme").unwrap(), "Acme")
            .await
            .unwrap();
    // The day backfill.json names (its partition is made for it, whatever the date today).
    let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 3).unwrap();
    let events: Vec<Ev> = [1, 2, 3]
        .iter()
        .map(|q| Ev {
            tenant: acme.id.0,
            metric: "api.requests",
            quantity: *q,
            at: day.and_hms_opt(10, 0, 0).unwrap().and_utc(),
            actor: None,
        })
        .collect();
    insert(&owner, &events).await;
    let app = app(&owner, &[]).await;

    let scheduled = aggregate_usage::handle(&app, load("scheduled.json"), later())
        .await
        .unwrap();
    assert!(["done", "skipped: locked"].contains(&scheduled["outcome"].as_str().unwrap()));
    assert!(scheduled["cellsExamined"].is_u64());
    assert!(scheduled["counters"].is_object());

    let backfill = aggregate_usage::handle(&app, load("backfill.json"), later())
        .await
        .unwrap();
    assert_eq!(backfill["outcome"], "done", "{backfill}");
    // The day's cell was queued again (daily only, as the payload asks).
    assert_eq!(backfill["backfillQueued"], 1, "{backfill}");

    let status = aggregate_usage::handle(&app, load("status.json"), later())
        .await
        .unwrap();
    assert_eq!(status["tenants"][0]["tenant"], "acme", "{status}");
    assert!(status["state"]["watermark"].is_i64());

    for bad in ["unknown-job.json", "backfill-reversed.json"] {
        let e = aggregate_usage::handle(&app, load(bad), later())
            .await
            .unwrap_err();
        let diagnostic = lambda_runtime::Diagnostic::from(e);
        assert_eq!(diagnostic.error_type, "BadPayload", "{bad}");
    }
}
