//! The counters reach the `metrics` facade. A test binary of its own: the recorder is global
//! to the process, and no other client may count into it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Stack;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_counters_are_published_through_the_metrics_facade(owner: PgPool) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let stack = Stack::new(&owner).await;
    let client = stack
        .client()
        .queue_capacity(4)
        .linger(Duration::from_millis(10))
        .build()
        .unwrap();
    let event = stack.event(1, 3);
    client.record(event.clone());
    client.record(stack.anonymous("no.such.metric", 1));
    client.flush(Duration::from_secs(30)).await.unwrap();
    client.record(event);
    for n in 2..7 {
        client.record(stack.event(n, 1)); // the queue holds 4: two are dropped
    }
    client.shutdown(Duration::from_secs(30)).await.unwrap();

    let counters: HashMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) => Some((key.key().name().to_owned(), n)),
            _ => None,
        })
        .collect();
    let stats = client.stats();
    assert_eq!(
        (
            stats.recorded,
            stats.accepted,
            stats.duplicates,
            stats.rejected,
            stats.dropped
        ),
        (8, 4, 1, 1, 2),
        "{stats:?}"
    );
    assert_eq!(
        counters["meterbridge_client_events_recorded"], 8,
        "{counters:?}"
    );
    assert_eq!(counters["meterbridge_client_events_accepted"], 4);
    assert_eq!(counters["meterbridge_client_events_duplicates"], 1);
    assert_eq!(counters["meterbridge_client_events_rejected"], 1);
    assert_eq!(counters["meterbridge_client_events_dropped"], 2);
    assert_eq!(counters["meterbridge_client_requests"], stats.requests);
}
