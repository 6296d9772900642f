//! Property test: arbitrary JSON bodies and arbitrary query strings thrown at the handler, with
//! the real PostgreSQL and Redis behind it. Whatever arrives, the answer is never a 5xx or a
//! panic, and the rows stored are exactly the events the answer says were accepted.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, Fixture};
use meterbridge::domain::usage::KNOWN_FIELDS;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

const FIELDS: &[&str] = KNOWN_FIELDS;
const METRICS: &[&str] = &[
    "api.requests",
    "sla.timers.started",
    "leads.routed",
    "no.such.metric",
    "",
];

/// Any JSON value, a few levels deep, with keys and strings that look like ours and strings
/// that look like nothing (control characters, NUL, astral planes, SQL).
fn any_json() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        "[a-z.]{0,12}",
        any::<String>(),
        Just("\u{0}".to_owned()),
        Just("'; DROP TABLE usage_events; --".to_owned()),
        Just("2026-11-24T23:59:60Z".to_owned()),
        Just("+262142-12-31T23:59:59Z".to_owned()),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        text.prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(FIELDS).prop_map(str::to_owned),
                        ".{0,8}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// An event that is mostly well-formed, with each field kept, dropped, or replaced by anything.
fn near_event(run: String) -> impl Strategy<Value = Value> {
    let now = meterbridge::testing::now();
    (
        0u32..40,
        prop::sample::select(METRICS),
        prop_oneof![
            Just(json!(1)),
            (1i64..=1_000_000_000_000).prop_map(|q| json!(q)),
            any::<i64>().prop_map(|q| json!(q)),
            Just(json!(1_000_000_000_001i64)),
        ],
        (-40i64 * 86_400..600)
            .prop_map(move |s| json!((now + chrono::Duration::seconds(s)).to_rfc3339())),
        prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..3),
        prop::collection::vec(prop::sample::select(FIELDS), 0..2),
    )
        .prop_map(move |(n, metric, quantity, at, replaced, dropped)| {
            let mut event = Map::new();
            event.insert("eventId".into(), json!(format!("{run}-{n}")));
            event.insert("metric".into(), json!(metric));
            event.insert("quantity".into(), quantity);
            event.insert("occurredAt".into(), at);
            event.insert("correlationId".into(), json!(format!("{run}-c{n}")));
            for (field, value) in replaced {
                event.insert(field.into(), value);
            }
            for field in dropped {
                event.remove(field);
            }
            Value::Object(event)
        })
}

fn body(run: String) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(prop_oneof![4 => near_event(run), 1 => any_json()], 1..12)
            .prop_map(|events| json!({ "events": events }).to_string()),
        2 => any_json().prop_map(|v| v.to_string()),
        1 => any::<String>(),
        1 => any_json().prop_map(|v| {
            // Valid JSON with a repeated key, which serde_json alone would accept.
            let text = v.to_string();
            format!("{{\"events\":[],\"events\":{text}}}")
        }),
    ]
}

fn query() -> impl Strategy<Value = (&'static str, Vec<(String, String)>)> {
    let name = prop_oneof![
        prop::sample::select(
            &[
                "metric",
                "classification",
                "from",
                "to",
                "limit",
                "cursor",
                "date"
            ][..]
        )
        .prop_map(str::to_owned),
        ".{0,6}",
    ];
    let value = prop_oneof![
        any::<String>(),
        "[0-9+-]{1,24}",
        Just("2026-11-24T23:59:60Z".to_owned()),
        Just("BILLABLE".to_owned()),
        Just("+262142-12-31".to_owned()),
    ];
    (
        prop::sample::select(&["/v1/usage/events", "/v1/usage/realtime"][..]),
        prop::collection::vec((name, value), 0..4),
    )
}

#[test]
fn arbitrary_input_never_breaks_the_handler() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let owner = rt.block_on(meterbridge::testing::fresh_database());
    let fx = rt.block_on(Fixture::new(&owner));
    let app = rt.block_on(fx.app(&[]));
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&(body(fx.run.clone()), query()), |(body, (path, query))| {
        rt.block_on(async {
            let before = fx.stored_events().await;
            let r = send(&app, fx.post_raw(&fx.internal.key, &body)).await;
            prop_assert!(r.status.as_u16() < 500, "POST {body}: {}", r.body);
            let accepted = r.body["accepted"].as_i64().unwrap_or(0);
            let after = fx.stored_events().await;
            prop_assert_eq!(after - before, accepted, "POST {}: {}", body, r.body);

            let pairs: Vec<(&str, &str)> = query
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = send(&app, fx.get(&fx.internal.key, path, &pairs)).await;
            prop_assert!(r.status.as_u16() < 500, "GET {path} {query:?}: {}", r.body);
            Ok::<(), TestCaseError>(())
        })
    });
    rt.block_on(meterbridge::testing::drop_database(owner));
    outcome.unwrap();
}
