//! Recording against the real ingestion handler, PostgreSQL and Redis, through faults: an
//! outage, rate-limit storms and outages answered with `Retry-After`, a slow server, rejected
//! and duplicate events, a full queue, and flush and shutdown with the server down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Outcomes, Scripted, Stack};
use meterbridge_client::{
    DropReason, FlushError, OverflowPolicy, Recorded, RetryPolicy, Stats, Status,
};
use sqlx::PgPool;

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(500),
        max_attempts: None,
    }
}

/// Once everything is settled, every recorded event is accounted for exactly once.
fn assert_settled(stats: &Stats) {
    assert_eq!(stats.queued + stats.in_flight, 0, "{stats:?}");
    assert_eq!(
        stats.recorded,
        stats.dropped
            + stats.accepted
            + stats.duplicates
            + stats.conflicts
            + stats.rejected
            + stats.abandoned,
        "{stats:?}"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn ten_seconds_of_refused_connections_lose_nothing_and_store_each_event_once(owner: PgPool) {
    const EVENTS: usize = 50_000;
    let stack = Stack::new(&owner).await;
    stack.server.down().await;
    let outcomes = Outcomes::default();
    let client = stack
        .client()
        .queue_capacity(60_000)
        .max_batch(1000)
        .max_in_flight(4)
        .linger(Duration::from_millis(50))
        .retry(RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: None,
        })
        .request_timeout(Duration::from_secs(30))
        .on_outcome(outcomes.callback())
        .build()
        .unwrap();

    let down_since = Instant::now();
    let mut sum = 0;
    for n in 0..EVENTS {
        let quantity = (n % 7 + 1) as u64;
        sum += quantity as i64;
        assert_eq!(client.record(stack.event(n, quantity)), Recorded::Queued);
    }
    // Ten seconds of refused connections, the client trying all along.
    tokio::time::sleep_until((down_since + Duration::from_secs(10)).into()).await;
    let during = client.stats();
    assert!(during.retries > 0, "{during:?}");
    assert_eq!(during.sent, 0, "{during:?}");
    assert_eq!(
        during.queued + during.in_flight,
        EVENTS as u64,
        "{during:?}"
    );
    assert!(stack.server.log().is_empty());

    stack.server.up().await;
    client.flush(Duration::from_secs(180)).await.unwrap();

    assert_eq!(stack.stored().await, (EVENTS as i64, sum));
    let stats = client.stats();
    assert_settled(&stats);
    assert_eq!(
        stats.accepted + stats.duplicates,
        EVENTS as u64,
        "{stats:?}"
    );
    assert_eq!(
        stats.conflicts + stats.rejected + stats.dropped + stats.abandoned,
        0
    );
    let all = outcomes.all();
    assert_eq!(all.len(), EVENTS);
    let ids: HashSet<&str> = all.iter().map(|o| o.event_id.as_str()).collect();
    assert_eq!(ids.len(), EVENTS, "each event settled once");
    assert!(all.iter().all(|o| o.status.is_stored()));
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn rate_limit_storms_and_outages_are_retried_no_sooner_than_told(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    stack.server.script([
        Scripted::problem(429, "rate_limited", &[("retry-after", "1")]),
        Scripted::problem(429, "rate_limited", &[("retry-after", "1")]),
        Scripted::problem(503, "service_unavailable", &[("retry-after", "1")]),
        // An HTTP date 2 s ahead (made when answering).
        Scripted::problem(429, "rate_limited", &[("retry-after", "date+2")]),
        Scripted::problem(500, "internal_error", &[]),
        Scripted::problem(502, "bad_gateway", &[]),
    ]);
    // The first real answer says a budget is spent for 2 s: the next send waits for it.
    stack.server.decorate(&[(
        "ratelimit",
        "\"key-requests\";r=9;t=1, \"key-events\";r=0;t=2",
    )]);
    let outcomes = Outcomes::default();
    let client = stack
        .client()
        .max_batch(100)
        .max_in_flight(1)
        .linger(Duration::from_millis(10))
        .retry(quick_retries())
        .on_outcome(outcomes.callback())
        .build()
        .unwrap();
    let mut sum = 0;
    for n in 0..250 {
        sum += (n % 5 + 1) as i64;
        client.record(stack.event(n, (n % 5 + 1) as u64));
    }
    client.flush(Duration::from_secs(60)).await.unwrap();

    assert_eq!(stack.stored().await, (250, sum));
    let posts = stack.server.posts();
    // Three batches; the first one sent seven times.
    assert_eq!(posts.len(), 3 + 6, "{posts:#?}");
    assert_eq!(
        posts.iter().map(|p| p.status).collect::<Vec<_>>(),
        [429, 429, 503, 429, 500, 502, 200, 200, 200]
    );
    // Every retry of the batch resent the same request.
    let first = posts[0].correlation_id.clone();
    assert!(first.is_some());
    assert!(posts[..7].iter().all(|p| p.correlation_id == first));
    for pair in posts.windows(2) {
        let (told, next) = (&pair[0], &pair[1]);
        match told.retry_after.as_deref().map(|v| (v, v.parse::<u64>())) {
            None => {}
            Some((value, Ok(seconds))) => assert!(
                next.received >= told.answered + Duration::from_secs(seconds),
                "a retry came before the Retry-After ({value}) it was told"
            ),
            Some((value, Err(_))) => {
                let date = httpdate::parse_http_date(value).unwrap();
                assert!(
                    next.received_at >= date,
                    "a retry came before the Retry-After ({value}) it was told"
                );
                // The date was about 2 s ahead when it was told.
                assert!(next.received >= told.answered + Duration::from_secs(1));
            }
        }
    }
    // The spent budget paced the send after the first success.
    assert!(posts[7].received >= posts[6].answered + Duration::from_secs(2));

    let stats = client.stats();
    assert_eq!(stats.retries, 6, "{stats:?}");
    assert_eq!(stats.requests, 9, "{stats:?}");
    assert_eq!(stats.accepted, 250, "{stats:?}");
    assert_settled(&stats);
    assert_eq!(outcomes.count(Status::Accepted), 250);
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_batch_too_large_is_split_in_two_and_each_half_sent(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    // The first request is refused as too large; so is the first half of it.
    stack.server.script([
        Scripted::problem(413, "payload_too_large", &[]),
        Scripted::problem(413, "payload_too_large", &[]),
    ]);
    let client = stack
        .client()
        .max_batch(100)
        .linger(Duration::from_secs(60))
        .build()
        .unwrap();
    for n in 0..100 {
        client.record(stack.event(n, 1));
    }
    client.flush(Duration::from_secs(30)).await.unwrap();
    let posts = stack.server.posts();
    assert_eq!(
        posts
            .iter()
            .map(|p| (p.status, p.events))
            .collect::<Vec<_>>(),
        [(413, 100), (413, 50), (200, 25), (200, 25), (200, 50)]
    );
    assert_eq!(stack.stored().await, (100, 100));
    let stats = client.stats();
    assert_eq!(
        (stats.splits, stats.retries, stats.accepted),
        (2, 0, 100),
        "{stats:?}"
    );
    assert_settled(&stats);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_slow_server_never_slows_record(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    const SLOW: Duration = Duration::from_secs(2);
    stack.server.delay(SLOW);
    let outcomes = Outcomes::default();
    let client = stack
        .client()
        .max_batch(1000)
        .max_in_flight(1)
        .linger(Duration::from_millis(10))
        .on_outcome(outcomes.callback())
        .build()
        .unwrap();
    for n in 0..1000 {
        client.record(stack.event(n, 1));
    }
    // The first batch is at the server, which will take 2 s to answer.
    let first = loop {
        if let Some(first) = stack.server.arrivals().first() {
            break *first;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    // A burst from another thread, while the client's task runs on (taking batches as they
    // are due): every record returns before the first answer could have arrived.
    let burst = {
        let client = client.clone();
        let events: Vec<_> = (1000..21_000).map(|n| stack.event(n, 1)).collect();
        tokio::task::spawn_blocking(move || {
            let mut slowest = Duration::ZERO;
            for event in events {
                let started = Instant::now();
                assert_eq!(client.record(event), Recorded::Queued);
                slowest = slowest.max(started.elapsed());
            }
            (Instant::now(), slowest)
        })
    };
    let (done, slowest) = burst.await.unwrap();
    let answers_so_far = outcomes.len();
    assert!(
        done < first + SLOW,
        "the burst ended {:?} after the first answer could have come",
        done - (first + SLOW)
    );
    assert_eq!(answers_so_far, 0, "no answer had arrived yet");
    println!("slowest record() of the burst: {slowest:?}");

    stack.server.delay(Duration::ZERO);
    client.flush(Duration::from_secs(120)).await.unwrap();
    assert_eq!(stack.stored().await, (21_000, 21_000));
    assert_settled(&client.stats());
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn rejections_conflicts_and_duplicates_reach_the_callback_once_and_are_never_retried(
    owner: PgPool,
) {
    let stack = Stack::new(&owner).await;
    let outcomes = Outcomes::default();
    let client = stack
        .client()
        .max_in_flight(1)
        .linger(Duration::from_millis(10))
        .retry(quick_retries())
        .on_outcome(outcomes.callback())
        .build()
        .unwrap();
    let flush = || client.flush(Duration::from_secs(30));

    // A batch with a valid event and an unknown metric: 200, one result each.
    let valid = stack.event(1, 3);
    let unknown = stack.anonymous("no.such.metric", 1);
    client.record(valid.clone());
    client.record(unknown);
    flush().await.unwrap();
    assert_eq!(
        outcomes.of(&format!("{}-1", stack.run)).status,
        Status::Accepted
    );
    let rejected: Vec<_> = outcomes
        .all()
        .into_iter()
        .filter(|o| o.status == Status::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].code.as_deref(), Some("unknown_metric"));
    assert_eq!(rejected[0].field.as_deref(), Some("metric"));
    // The client assigned the id (a UUIDv7) when it was recorded.
    let assigned = uuid::Uuid::parse_str(&rejected[0].event_id).unwrap();
    assert_eq!(assigned.get_version_num(), 7);

    // A batch of nothing but rejects: 422, each event rejected by its entry in `errors`.
    let too_much = stack.event(2, 2_000_000_000_000);
    client.record(stack.anonymous("no.such.metric", 1));
    client.record(too_much);
    flush().await.unwrap();
    assert_eq!(stack.server.posts().last().unwrap().status, 422);
    let too_much = outcomes.of(&format!("{}-2", stack.run));
    assert_eq!(too_much.status, Status::Rejected);
    assert_eq!(too_much.code.as_deref(), Some("quantity_too_large"));
    assert_eq!(too_much.field.as_deref(), Some("quantity"));

    // The same event again: a duplicate. The same id with another payload: a conflict.
    client.record(valid.clone());
    flush().await.unwrap();
    client.record(valid.clone().correlation_id("other-operation"));
    let mut changed = valid.clone();
    changed.quantity = 4;
    client.record(changed);
    flush().await.unwrap();
    let of_valid: Vec<_> = outcomes
        .all()
        .into_iter()
        .filter(|o| o.event_id == format!("{}-1", stack.run))
        .map(|o| (o.status, o.code))
        .collect();
    assert_eq!(of_valid[0], (Status::Accepted, None));
    assert_eq!(of_valid[1], (Status::Duplicate, None));
    assert_eq!(of_valid[2].0, Status::Conflict);
    assert_eq!(of_valid[2].1.as_deref(), Some("event_id_conflict"));
    assert_eq!(of_valid[3].0, Status::Conflict);
    assert_eq!(stack.stored_with_id(&format!("{}-1", stack.run)).await, 1);
    assert_eq!(stack.stored().await, (1, 3));

    // Each batch was sent exactly once.
    let posts = stack.server.posts();
    assert_eq!(posts.len(), 4, "{posts:#?}");
    let stats = client.stats();
    assert_eq!(
        (
            stats.requests,
            stats.retries,
            stats.accepted,
            stats.duplicates,
            stats.conflicts,
            stats.rejected
        ),
        (4, 0, 1, 1, 2, 3),
        "{stats:?}"
    );
    assert_settled(&stats);
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_refused_request_rejects_its_events_once(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    let outcomes = Outcomes::default();
    let client = meterbridge_client::Client::builder(&stack.server.url, "mbk_not_a_real_key")
        .linger(Duration::from_millis(10))
        .on_outcome(outcomes.callback())
        .build()
        .unwrap();
    for n in 0..3 {
        client.record(stack.event(n, 1));
    }
    client.flush(Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcomes.count(Status::Rejected), 3);
    assert!(outcomes
        .all()
        .iter()
        .all(|o| o.code.as_deref() == Some("unauthorized")));
    assert_eq!(stack.server.posts().len(), 1);
    assert_eq!(stack.server.posts()[0].status, 401);
    assert_eq!(stack.stored().await, (0, 0));
}

/// Captures the log lines of the current thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn matching(&self, text: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect()
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_full_queue_drops_and_counts_or_blocks_up_to_its_deadline(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    stack.server.down().await;
    let lines = Lines::default();
    let writer = lines.clone();
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );

    // Drop (the default): the excess is dropped at once, counted, and warned about at most
    // once per interval, with the number dropped since the last warning.
    let client = stack
        .client()
        .queue_capacity(100)
        .linger(Duration::from_secs(60))
        .drop_warning_interval(Duration::from_millis(300))
        .build()
        .unwrap();
    let recorded: Vec<Recorded> = (0..150).map(|n| client.record(stack.event(n, 1))).collect();
    assert_eq!(
        recorded.iter().filter(|r| **r == Recorded::Queued).count(),
        100
    );
    assert!(recorded[100..]
        .iter()
        .all(|r| *r == Recorded::Dropped(DropReason::QueueFull)));
    let stats = client.stats();
    assert_eq!(
        (stats.recorded, stats.queued, stats.dropped),
        (150, 100, 50)
    );
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(
        client.record(stack.event(150, 1)),
        Recorded::Dropped(DropReason::QueueFull)
    );
    let warnings = lines.matching("queue is full");
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(warnings[0].contains("dropped=1"), "{}", warnings[0]);
    assert!(warnings[1].contains("dropped=50"), "{}", warnings[1]);

    // Block: waits up to its deadline for room, then drops.
    let blocking = stack
        .client()
        .queue_capacity(10)
        .linger(Duration::from_secs(60))
        .overflow(OverflowPolicy::Block {
            deadline: Duration::from_millis(300),
        })
        .build()
        .unwrap();
    for n in 0..10 {
        assert_eq!(blocking.record(stack.event(1000 + n, 1)), Recorded::Queued);
    }
    let started = Instant::now();
    assert_eq!(
        blocking.record(stack.event(1010, 1)),
        Recorded::Dropped(DropReason::QueueFull)
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(blocking.stats().dropped, 1);

    // Block gets the room a batch makes (the server up, the batch sent after its linger).
    stack.server.up().await;
    let roomy = stack
        .client()
        .queue_capacity(10)
        .linger(Duration::from_millis(200))
        .overflow(OverflowPolicy::Block {
            deadline: Duration::from_secs(10),
        })
        .build()
        .unwrap();
    for n in 0..10 {
        roomy.record(stack.event(2000 + n, 1));
    }
    let waiter = {
        let roomy = roomy.clone();
        let event = stack.event(2010, 1);
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            (roomy.record(event), started.elapsed())
        })
    };
    let (recorded, waited) = waiter.await.unwrap();
    assert_eq!(recorded, Recorded::Queued);
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    roomy.flush(Duration::from_secs(30)).await.unwrap();
    assert_eq!(roomy.stats().accepted, 11);

    let _ = client.shutdown(Duration::from_millis(100)).await;
    let _ = blocking.shutdown(Duration::from_millis(100)).await;
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn flush_with_the_server_down_reports_what_is_unsent_and_shutdown_drops_later_records(
    owner: PgPool,
) {
    let stack = Stack::new(&owner).await;
    stack.server.down().await;
    let outcomes = Outcomes::default();
    let client = stack
        .client()
        .linger(Duration::from_millis(10))
        .retry(quick_retries())
        .on_outcome(outcomes.callback())
        .build()
        .unwrap();
    for n in 0..20 {
        client.record(stack.event(n, 1));
    }
    let started = Instant::now();
    assert_eq!(
        client.flush(Duration::from_secs(1)).await,
        Err(FlushError::TimedOut { unsent: 20 })
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    let stats = client.stats();
    assert_eq!(stats.queued + stats.in_flight, 20, "{stats:?}");
    assert!(stats.retries > 0, "{stats:?}");

    // Still down: shutdown gives up what it could not send, and says how much.
    assert_eq!(
        client.shutdown(Duration::from_millis(500)).await,
        Err(FlushError::TimedOut { unsent: 20 })
    );
    assert_eq!(outcomes.count(Status::Abandoned), 20);
    assert!(outcomes
        .all()
        .iter()
        .all(|o| o.code.as_deref() == Some("shutdown")));
    assert_eq!(
        client.record(stack.event(20, 1)),
        Recorded::Dropped(DropReason::ShutDown)
    );
    let stats = client.stats();
    assert_eq!((stats.abandoned, stats.dropped), (20, 1), "{stats:?}");
    assert_settled(&stats);
    assert_eq!(client.flush(Duration::from_millis(10)).await, Ok(()));
    assert_eq!(client.shutdown(Duration::from_millis(10)).await, Ok(()));

    // With the server up, shutdown sends everything first.
    stack.server.up().await;
    let client = stack
        .client()
        .linger(Duration::from_secs(60))
        .build()
        .unwrap();
    for n in 100..110 {
        client.record(stack.event(n, 2));
    }
    client.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(client.stats().accepted, 10);
    assert_eq!(stack.stored().await, (10, 20));
}
