//! `openapi.yaml` is the published contract of this function: it lists exactly the routes the
//! router serves, as does `template.yaml`, and its request examples are the fixtures in
//! `events/ingest-usage/`. Schemathesis checks the rest against the running stack
//! (scripts/schemathesis.sh).
#![allow(clippy::unwrap_used)]

mod common;

use ingest_usage::routes::{route, Route};
use meterbridge::testing::contract;

#[test]
fn the_spec_and_the_template_list_exactly_the_routes_of_the_router() {
    contract::check_router(&["usage"], "IngestUsageFunction", &Route::KEYS, |m, p| {
        route(m, p).map(|r| r.key())
    });
}

#[test]
fn request_examples_are_the_fixtures() {
    let spec = contract::openapi();
    let checked = contract::check_fixture_examples(&spec, "events/ingest-usage", &Route::KEYS);
    assert!(checked >= 3, "{checked} examples");
}

/// Schemathesis (seed 20261125) sent a void whose body is not UTF-8, with a correlation id full
/// of tabs and punctuation. `cargo lambda watch`'s own HTTP endpoint answered 500 before the
/// function saw it; API Gateway delivers such a body base64-encoded (as scripts/apigw.py now
/// does), and the function must answer 400 and void nothing.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_void_whose_body_is_not_utf8_is_a_400(owner: sqlx::PgPool) {
    use base64::Engine;
    let fx = common::Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let r = common::send(&app, fx.fixture("post-events.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let mut event: serde_json::Value = serde_json::from_str(&meterbridge::testing::render(
        &common::fixture_text("void-event.json"),
        &[("RUN", &fx.run), ("INTERNAL_KEY", &fx.internal.key)],
    ))
    .unwrap();
    let body = b")\x1a$\x1f\xefG\xb5\xcf\x1c\xa1\xe5\xa3.\xf0\x9f\xb9\xfd";
    event["body"] = base64::engine::general_purpose::STANDARD
        .encode(body)
        .into();
    event["isBase64Encoded"] = true.into();
    event["headers"]["x-correlation-id"] =
        "ZHCz~\")y#W.9Uf\t_5[`>E*gQ),n]R{E#\t)/wn$Pt!3NVD".into();
    let r = common::send(
        &app,
        meterbridge::testing::request_from_json(&event.to_string()),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["code"], "malformed_request");
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(
        r.headers["x-correlation-id"].len(),
        36,
        "a correlation id with tabs is replaced by a generated one"
    );
    let voided: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE voided_at IS NOT NULL")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(voided, 0);
}
