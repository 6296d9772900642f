//! `GET /api/v1/meters/{slug}/query` through the real handler: the meter's events (its metric,
//! from CloudEvents of its type, voided ones left out) summed per window, subject and groupBy
//! value, in OpenMeter's shape; each tenant reads only its own meters; every parameter bounded.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Duration, DurationRound, SecondsFormat, Utc};
use common::{send, Fixture};
use meterbridge::domain::meter_query::WindowSize;
use meterbridge::domain::Trust;
use meterbridge::repo::meter_usage::{self, MeterUsage, MeterUsageQuery};
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::{json, Value};
use sqlx::PgPool;

const QUERY: &str = "/api/v1/meters/prompt_tokens/query";

fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn post(fx: &Fixture, body: &Value) -> lambda_http::Request {
    let mut event: Value = serde_json::from_str(&common::fixture_text("post-events.json")).unwrap();
    event["routeKey"] = json!("POST /api/v1/events");
    event["rawPath"] = json!("/api/v1/events");
    event["requestContext"]["http"]["path"] = json!("/api/v1/events");
    event["headers"]["authorization"] = json!(format!("Bearer {}", fx.internal.key));
    event["headers"]["content-type"] = json!("application/cloudevents-batch+json");
    event["body"] = json!(body.to_string());
    meterbridge::testing::request_from_json(&event.to_string())
}

/// Midnight UTC two days before the test's now: every event below lies in the past, inside
/// the ingestion window, on two UTC days.
fn base(fx: &Fixture) -> DateTime<Utc> {
    fx.now.duration_trunc(Duration::days(1)).unwrap() - Duration::days(2)
}

fn prompt(
    fx: &Fixture,
    id: &str,
    at: DateTime<Utc>,
    subject: &str,
    model: &str,
    tokens: i64,
) -> Value {
    json!({"specversion": "1.0", "id": format!("{}-{id}", fx.run), "source": "gateway",
           "type": "prompt", "subject": subject, "time": ts(at),
           "data": {"tokens": tokens, "model": model}})
}

/// The tenant's usage: six prompts on two days for two subjects and two models, one of them
/// voided, one CloudEvent of another meter's type, and a native event of the same metric.
async fn seed(fx: &Fixture, app: &ingest_usage::App) {
    fx.set_meter("prompt_tokens", "prompt", "api.requests", Some("$.tokens"))
        .await;
    fx.set_meter("searches", "search", "api.requests", None)
        .await;
    let b = base(fx);
    let h = Duration::hours;
    let batch = json!([
        prompt(fx, "1", b + h(1), "alice", "small", 10),
        prompt(fx, "2", b + h(1) + Duration::minutes(30), "alice", "big", 20),
        prompt(fx, "3", b + h(2), "bob", "small", 40),
        prompt(fx, "4", b + h(25), "alice", "small", 80),
        prompt(fx, "5", b + h(26), "bob", "big", 160),
        prompt(fx, "6", b + h(27), "bob", "big", 1000),
        {"specversion": "1.0", "id": format!("{}-s", fx.run), "source": "gateway",
         "type": "search", "subject": "alice", "time": ts(b + h(1)), "data": {}},
    ]);
    let r = send(app, post(fx, &batch)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    // A resend changes nothing.
    let r = send(app, post(fx, &batch)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    // A native event of the same metric is not the meter's.
    let mut native = fx.event(1, "api.requests", 5000);
    native["occurredAt"] = json!(ts(b + h(1)));
    native["actorId"] = json!("alice");
    let r = fx.submit(app, json!({"events": [native]})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Event 6 is voided.
    let voided = format!("ce:7:gateway{}-6", fx.run);
    let r = send(
        app,
        fx.void(&fx.internal.key, &voided, &json!({"reason": "test"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

async fn query(
    fx: &Fixture,
    app: &ingest_usage::App,
    key: &str,
    params: &[(&str, &str)],
) -> (u16, Value) {
    let r = send(app, fx.get(key, QUERY, params)).await;
    (r.status.as_u16(), r.body)
}

/// (windowStart, windowEnd, subject, groupBy, value) of each row.
fn rows(body: &Value) -> Vec<(String, String, Value, Value, i64)> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["windowStart"].as_str().unwrap().to_owned(),
                r["windowEnd"].as_str().unwrap().to_owned(),
                r["subject"].clone(),
                r["groupBy"].clone(),
                r["value"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A range holding only events that are not the meter's — native events of its metric, which
/// have no CloudEvents type, and one without an actor — answers no rows, whatever the filters.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_range_of_other_events_only_answers_no_rows(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.set_meter("prompt_tokens", "prompt", "api.requests", Some("$.tokens"))
        .await;
    let b = base(&fx);
    let mut with_actor = fx.event(1, "api.requests", 5);
    with_actor["occurredAt"] = json!(ts(b + Duration::hours(1)));
    with_actor["actorId"] = json!("alice");
    let mut without_actor = fx.event(2, "api.requests", 7);
    without_actor["occurredAt"] = json!(ts(b + Duration::hours(2)));
    let r = fx
        .submit(&app, json!({"events": [with_actor, without_actor]}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let (from, to) = (ts(b), ts(b + Duration::days(1)));
    let key = fx.internal.key.clone();
    for extra in [
        &[][..],
        &[("windowSize", "DAY")],
        &[("subject", "alice")],
        &[("groupBy", "model"), ("windowSize", "HOUR")],
    ] {
        let mut params = vec![("from", from.as_str()), ("to", to.as_str())];
        params.extend_from_slice(extra);
        let (status, body) = query(&fx, &app, &key, &params).await;
        assert_eq!(status, 200, "{extra:?}: {body}");
        assert_eq!(body["data"], json!([]), "{extra:?}");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_meter_reads_back_its_events_per_window_subject_and_group(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    seed(&fx, &app).await;
    let b = base(&fx);
    let (from, to) = (ts(b), ts(b + Duration::days(2)));
    let key = fx.internal.key.clone();

    // The whole range: one row, the meter's events only (no void, no native, no search).
    let (status, body) = query(&fx, &app, &key, &[("from", &from), ("to", &to)]).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body["from"], json!(from));
    assert_eq!(body["to"], json!(to));
    assert!(body.get("windowSize").is_none());
    assert_eq!(
        rows(&body),
        vec![(from.clone(), to.clone(), Value::Null, json!({}), 310)]
    );

    // Per day and model.
    let (status, body) = query(
        &fx,
        &app,
        &key,
        &[
            ("from", &from),
            ("to", &to),
            ("windowSize", "DAY"),
            ("groupBy", "model"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body["windowSize"], "DAY");
    let day2 = ts(b + Duration::days(1));
    assert_eq!(
        rows(&body),
        vec![
            (
                from.clone(),
                day2.clone(),
                Value::Null,
                json!({"model": "big"}),
                20
            ),
            (
                from.clone(),
                day2.clone(),
                Value::Null,
                json!({"model": "small"}),
                50
            ),
            (
                day2.clone(),
                to.clone(),
                Value::Null,
                json!({"model": "big"}),
                160
            ),
            (
                day2.clone(),
                to.clone(),
                Value::Null,
                json!({"model": "small"}),
                80
            ),
        ]
    );

    // Per hour, one subject (a subject filter names each row's subject).
    let (status, body) = query(
        &fx,
        &app,
        &key,
        &[
            ("from", &from),
            ("to", &day2),
            ("windowSize", "HOUR"),
            ("subject", "alice"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(
        rows(&body),
        vec![(
            ts(b + Duration::hours(1)),
            ts(b + Duration::hours(2)),
            json!("alice"),
            json!({}),
            30
        )]
    );

    // groupBy=subject with a groupBy filter; an hour-aligned `from` inside the first day.
    let (status, body) = query(
        &fx,
        &app,
        &key,
        &[
            ("from", &ts(b + Duration::hours(2))),
            ("to", &to),
            ("groupBy", "subject"),
            ("filterGroupBy[model]", "small"),
            ("windowTimeZone", "UTC"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    let got: Vec<(Value, i64)> = rows(&body).into_iter().map(|r| (r.2, r.4)).collect();
    assert_eq!(got, vec![(json!("alice"), 80), (json!("bob"), 40)]);

    // MONTH windows are cut to the range.
    let (status, body) = query(
        &fx,
        &app,
        &key,
        &[("from", &from), ("to", &to), ("windowSize", "MONTH")],
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    let total: i64 = rows(&body).iter().map(|r| r.4).sum();
    assert_eq!(total, 310);
    assert_eq!(rows(&body).first().unwrap().0, from);
    assert_eq!(rows(&body).last().unwrap().1, to);

    // A meter without a quantity counts its events; a range with none of them is empty.
    let r = send(
        &app,
        fx.get(
            &key,
            "/api/v1/meters/searches/query",
            &[("from", &from), ("to", &to), ("groupBy", "model")],
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Its event has no model: the key is there, null.
    assert_eq!(rows(&r.body)[0].3, json!({"model": null}));
    assert_eq!(rows(&r.body)[0].4, 1);
    let (status, body) = query(
        &fx,
        &app,
        &key,
        &[("from", &ts(b - Duration::days(5))), ("to", &from)],
    )
    .await;
    assert_eq!((status, body["data"].clone()), (200, json!([])));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn other_tenants_partner_keys_and_bad_parameters_read_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    seed(&fx, &app).await;
    let b = base(&fx);
    let (from, to) = (ts(b), ts(b + Duration::days(2)));
    let range = [("from", from.as_str()), ("to", to.as_str())];

    // Another tenant with a meter of the same slug and type reads only its own (none stored).
    let other = create_tenant(&owner, "other").await;
    let other_key = create_api_key(&owner, &other, "crm", Trust::Internal).await;
    let (status, body) = query(&fx, &app, &other_key.key, &range).await;
    assert_eq!(status, 404, "no meter of that slug: {body:?}");
    {
        let mut conn = owner.acquire().await.unwrap();
        let change = meterbridge::repo::usage_settings::Change {
            tenant: other.id,
            actor: "test",
            reason: "test",
        };
        let definition = meterbridge::domain::meter::MeterDefinition {
            slug: "prompt_tokens".into(),
            event_type: "prompt".into(),
            metric: "api.requests".into(),
            value_property: Some("$.tokens".into()),
            group_by: Default::default(),
        };
        meterbridge::repo::meters::set(&mut conn, &change, &definition)
            .await
            .unwrap();
    }
    let other_app = fx.app(&[]).await;
    let (status, body) = query(&fx, &other_app, &other_key.key, &range).await;
    assert_eq!((status, body["data"].clone()), (200, json!([])), "{body:?}");

    // A partner key, a revoked key, no key.
    let (status, body) = query(&fx, &app, &fx.external.key, &range).await;
    assert_eq!(status, 403, "{body:?}");
    let (status, _) = query(&fx, &app, &fx.revoked.key, &range).await;
    assert_eq!(status, 401);
    let (status, _) = query(&fx, &app, "mb_nonsense", &range).await;
    assert_eq!(status, 401);

    // Unknown meters, bad and extreme parameters: 4xx problems, never a 5xx.
    let r = send(
        &app,
        fx.get(&fx.internal.key, "/api/v1/meters/nope/query", &range),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let long = "x".repeat(5000);
    for bad in [
        vec![("windowSize", "MINUTE")],
        vec![("groupBy", "tokens")],
        vec![("groupBy", long.as_str())],
        vec![("subject", "")],
        vec![("subject", long.as_str())],
        vec![("filterGroupBy[nope]", "x")],
        vec![("from", "0001-01-01T00:00:00Z")],
        vec![("from", to.as_str()), ("to", from.as_str())],
        vec![("from", "2020-01-01T00:00:00Z"), ("to", to.as_str())],
        vec![("windowTimeZone", "America/New_York")],
        vec![("filterCustomerId", "c")],
    ] {
        let (status, body) = query(&fx, &app, &fx.internal.key, &bad).await;
        assert_eq!(status, 400, "{bad:?}: {body:?}");
        assert_eq!(body["code"], "malformed_request", "{bad:?}");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_query_reads_a_bounded_number_of_events_and_answers_bounded_rows(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    seed(&fx, &app).await;
    let b = base(&fx);
    let group_by = ["model".to_owned()];
    let no_filter = json!({});
    let q = |max_scanned: i64, max_rows: i64| MeterUsageQuery {
        event_type: "prompt",
        metric: "api.requests",
        from: b,
        to: b + Duration::days(2),
        window: Some(WindowSize::Day),
        subjects: None,
        by_subject: false,
        group_by: &group_by,
        group_filter: &no_filter,
        max_scanned,
        max_rows,
    };
    let mut tx = owner.begin().await.unwrap();
    let tenant = fx.tenant.id;
    // 8 events of the metric in the range (6 prompts, the search, the native one): a cap of 7
    // refuses the query, 8 reads it; its 4 rows fit a cap of 4, not of 3.
    assert_eq!(
        meter_usage::query(&mut tx, tenant, &q(7, 100))
            .await
            .unwrap(),
        MeterUsage::TooManyEvents
    );
    match meter_usage::query(&mut tx, tenant, &q(8, 100))
        .await
        .unwrap()
    {
        MeterUsage::Rows(rows) => assert_eq!(rows.len(), 4, "{rows:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        meter_usage::query(&mut tx, tenant, &q(8, 3)).await.unwrap(),
        MeterUsage::TooManyRows
    );
    assert!(matches!(
        meter_usage::query(&mut tx, tenant, &q(8, 4)).await.unwrap(),
        MeterUsage::Rows(_)
    ));
}
