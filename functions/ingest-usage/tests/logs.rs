//! No end user's data in the logs: requests that carry a marker actor id and marker metadata
//! values — accepted, refused as invalid, listed, filtered by that actor, voided — through the
//! real handler with every level on (`RUST_LOG=trace`, as an operator might set it to debug),
//! and the captured log lines searched for the markers.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, Fixture};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn no_actor_id_or_metadata_value_reaches_the_logs_at_trace(owner: PgPool) {
    let logs = meterbridge::testing::capture_logs("trace");
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let actor = "subject-7f3a9c-marker";
    let metadata = "metadata-value-51e2b8-marker";
    let with_subject = |n: usize| {
        let mut event = fx.event(n, "api.requests", 2);
        event["actorId"] = json!(actor);
        event["metadata"] = json!({"plan": metadata, "note": metadata});
        event
    };

    // Accepted, then resent (a duplicate), then one invalid beside a valid one (per-item
    // errors), then a batch refused whole.
    let accepted = fx
        .submit(&app, json!({"events": [with_subject(1), with_subject(2)]}))
        .await;
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    let resent = fx.submit(&app, json!({"events": [with_subject(1)]})).await;
    assert_eq!(resent.status, 200, "{}", resent.body);
    let mut invalid = with_subject(3);
    invalid["quantity"] = json!("many");
    let partial = fx
        .submit(&app, json!({"events": [invalid, with_subject(4)]}))
        .await;
    assert!(partial.status.is_success(), "{}", partial.body);
    let mut too_long = with_subject(5);
    too_long["actorId"] = json!(format!("{actor}{}", "x".repeat(300)));
    let refused = fx.submit(&app, json!({"events": [too_long]})).await;
    assert!(refused.status.is_client_error() || refused.status.is_success());

    // Listed, and filtered by the actor.
    for query in [vec![], vec![("actorId", actor)]] {
        let reply = send(&app, fx.get(&fx.internal.key, "/v1/usage/events", &query)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.to_string().contains(actor), "{}", reply.body);
    }
    let realtime = send(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(realtime.status, 200, "{}", realtime.body);

    let text = logs.text();
    // The capture works: the requests' own lines, with their tenant, are there.
    assert!(text.contains(&fx.tenant.id.0.to_string()), "{text}");
    assert!(text.lines().count() > 10, "{text}");
    assert!(
        text.contains(r#""level":"TRACE""#) && text.contains(r#""level":"DEBUG""#),
        "every level is captured: {text}"
    );
    for marker in [actor, metadata] {
        let leaked: Vec<&str> = text.lines().filter(|l| l.contains(marker)).collect();
        assert!(leaked.is_empty(), "{marker} logged: {leaked:#?}");
    }
}
