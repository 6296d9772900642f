//! Faults between transactions: overlapping batches that would deadlock, and a container that
//! froze inside a transaction. Each event is stored and counted exactly once; nothing waits on
//! a frozen container for longer than the lock timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{send, Fixture};
use meterbridge::domain::dedup::DedupKeys;
use meterbridge::domain::usage::UsageEvent;
use meterbridge::domain::{Classification, SourceService, Trust};
use meterbridge::repo::usage_events;
use meterbridge::testing::{create_api_key, create_tenant};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::PgPool;

const METRICS: [&str; 3] = ["api.requests", "leads.routed", "scoring.requests"];

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn overlapping_batches_in_shuffled_orders_store_each_event_once(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    fx.allow_in_flight(36).await;
    let mut apps = Vec::new();
    for _ in 0..12 {
        apps.push(Arc::new(fx.app(&[("DB_MAX_CONNECTIONS", "1")]).await));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut expected: BTreeMap<String, i128> = BTreeMap::new();
    let mut covered = BTreeSet::new();
    for wave in 0..3 {
        let pool: Vec<Value> = (0..240)
            .map(|n| fx.event(wave * 1000 + n, METRICS[n % 3], 1 + (n % 5) as i64))
            .collect();
        // Twelve containers, three batches each, every batch 120 events of the pool in its own
        // order, all sent at once: the same events arrive in opposite orders in concurrent
        // transactions, which is what deadlocked.
        let mut requests = Vec::new();
        for app in &apps {
            for _ in 0..3 {
                let mut batch: Vec<Value> = pool.choose_multiple(&mut rng, 120).cloned().collect();
                batch.shuffle(&mut rng);
                if rng.gen_bool(0.5) {
                    batch.reverse();
                }
                for event in &batch {
                    if covered.insert(event["eventId"].as_str().unwrap().to_owned()) {
                        *expected
                            .entry(event["metric"].as_str().unwrap().to_owned())
                            .or_default() += i128::from(event["quantity"].as_i64().unwrap());
                    }
                }
                let request = fx.post(&fx.internal.key, &json!({ "events": batch }));
                let app = Arc::clone(app);
                requests.push(tokio::spawn(async move { send(&app, request).await }));
            }
        }
        let mut accepted = 0;
        for reply in futures::future::join_all(requests).await {
            let reply = reply.unwrap();
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.body["conflicts"], 0, "{}", reply.body);
            accepted += reply.body["accepted"].as_u64().unwrap();
        }
        assert_eq!(
            accepted as usize,
            pool.iter()
                .filter(|e| covered.contains(e["eventId"].as_str().unwrap()))
                .count(),
            "each event accepted once"
        );
    }
    assert_eq!(fx.stored_events().await as usize, covered.len());
    for (metric, total) in expected {
        assert_eq!(fx.counter(&metric).await, Some(total), "{metric}");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_frozen_transaction_blocks_nobody_for_long(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let frozen = fx
        .app(&[("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "1500")])
        .await;
    let app = fx.app(&[("DB_LOCK_TIMEOUT_MS", "300")]).await;
    let event = fx.event(1, "api.requests", 2);

    // A container froze while storing this event: its open transaction holds the event's keys.
    let mut tx = frozen.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    let generations = usage_events::hold_key_generation(&mut tx).await.unwrap();
    let stored = UsageEvent {
        event_id: event["eventId"].as_str().unwrap().to_owned(),
        metric: "api.requests".into(),
        quantity: 2,
        occurred_at: event["occurredAt"].as_str().unwrap().parse().unwrap(),
        actor_id: None,
        correlation_id: event["correlationId"].as_str().unwrap().to_owned(),
        idempotency_key: None,
        metadata: json!({}),
        classification: Classification::Billable,
        payload_hash: [0; 32],
    };
    let source = SourceService::parse("crm").unwrap();
    let keys = DedupKeys::of(fx.tenant.id, &source, &stored);
    let outcome = usage_events::insert(
        &mut tx,
        &generations,
        fx.tenant.id,
        &source,
        &[&stored],
        &[keys],
    )
    .await
    .unwrap();
    assert_eq!(outcome, usage_events::Insert::Stored);

    // Another container sending the same event waits at most the lock timeout: 503, nothing
    // stored, retry later.
    let started = Instant::now();
    let r = fx.submit(&app, json!({ "events": [event.clone()] })).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?} on a frozen transaction",
        started.elapsed()
    );
    // Everything else goes on meanwhile: other events, other tenants.
    let r = fx
        .submit(&app, json!({ "events": [fx.event(2, "api.requests", 3)] }))
        .await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let globex = create_tenant(&owner, "globex").await;
    let globex_key = create_api_key(&owner, &globex, "crm", Trust::Internal).await;
    let r = send(
        &app,
        fx.post(&globex_key.key, &json!({ "events": [event.clone()] })),
    )
    .await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);

    // The server ends the frozen session after the idle timeout, and with it its locks.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = fx.submit(&app, json!({ "events": [event] })).await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    assert!(tx.commit().await.is_err(), "the frozen session is gone");
    assert_eq!(fx.stored_events().await, 2);
    assert_eq!(fx.counter("api.requests").await, Some(5));
}
