//! The rate limiter against a real Redis, on a frozen clock: budgets charged atomically under
//! concurrency, all or nothing; a tenant's in-flight slots given back on every exit path; the
//! container's own budgets when Redis cannot be reached, and Redis's again once it can.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use meterbridge::clock::FrozenClock;
use meterbridge::config::RedisSource;
use meterbridge::domain::rate_limit::{Limits, Rate};
use meterbridge::domain::{TenantId, Trust};
use meterbridge::rate_limit::{in_flight_key, Ask, Budget, Decision, RateLimiter, Source};
use meterbridge::redis::Redis;
use meterbridge::testing::require_redis;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(60);

fn redis() -> Arc<Redis> {
    Arc::new(Redis::new(
        RedisSource::Url(require_redis()),
        None,
        Duration::from_millis(500),
    ))
}

fn limits(key_requests: Rate, max_in_flight: u32) -> Limits {
    Limits {
        key_requests,
        max_in_flight,
        ..Limits::defaults(Trust::Internal)
    }
}

fn ask(tenant: TenantId, key_id: Uuid, limits: Limits, events: u32) -> Ask {
    Ask {
        tenant,
        key_id,
        limits,
        events,
    }
}

fn at_2027() -> Arc<FrozenClock> {
    FrozenClock::at("2027-03-01T09:00:00Z".parse().unwrap())
}

async fn in_flight(redis: &Redis, tenant: TenantId) -> i64 {
    let mut conn = redis.connection().await.unwrap();
    redis::cmd("ZCARD")
        .arg(in_flight_key("usage", tenant))
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Whether the tenant's slots in flight come to `n` within a second (a slot is given back by a
/// task of its own).
async fn in_flight_comes_to(redis: &Redis, tenant: TenantId, n: i64) -> bool {
    for _ in 0..100 {
        if in_flight(redis, tenant).await == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn concurrent_requests_get_exactly_the_burst_and_others_are_unaffected() {
    let redis = redis();
    let clock = at_2027();
    let limiter = Arc::new(RateLimiter::new("usage", LEASE, clock.clone()));
    let (tenant, key, other_key) = (TenantId(Uuid::new_v4()), Uuid::new_v4(), Uuid::new_v4());
    let limits = limits(Rate::new(5, 10), 1_000);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (redis, limiter) = (Arc::clone(&redis), Arc::clone(&limiter));
        tasks.push(tokio::spawn(async move {
            match limiter
                .check(Some(&*redis), &ask(tenant, key, limits, 0))
                .await
            {
                Decision::Allowed { lease, source, .. } => {
                    assert_eq!(source, Source::Redis);
                    drop(lease);
                    None
                }
                Decision::Limited(l) => Some(l),
            }
        }));
    }
    let mut refused = Vec::new();
    for task in tasks {
        refused.extend(task.await.unwrap());
    }
    assert_eq!(refused.len(), 40, "exactly the burst of 10 passes");
    for l in &refused {
        assert_eq!(l.by, Some(Budget::KeyRequests));
        assert!(!l.never);
        assert_eq!(l.retry_after, Duration::from_millis(200));
        assert!(
            l.detail().contains("this API key's request budget"),
            "{}",
            l.detail()
        );
    }
    // Another key of the tenant, and another tenant, are not touched.
    let other = limiter
        .check(Some(&*redis), &ask(tenant, other_key, limits, 0))
        .await;
    assert!(matches!(other, Decision::Allowed { .. }));
    let stranger = limiter
        .check(
            Some(&*redis),
            &ask(TenantId(Uuid::new_v4()), key, limits, 0),
        )
        .await;
    assert!(matches!(stranger, Decision::Allowed { .. }));
    // Honouring Retry-After succeeds, once.
    clock.advance_wall(Duration::from_millis(200));
    let after = limiter
        .check(Some(&*redis), &ask(tenant, key, limits, 0))
        .await;
    assert!(matches!(after, Decision::Allowed { .. }));
    let again = limiter
        .check(Some(&*redis), &ask(tenant, key, limits, 0))
        .await;
    assert!(matches!(again, Decision::Limited(_)));
}

#[tokio::test]
async fn a_batch_costs_its_events_and_a_refusal_charges_nothing() {
    let redis = redis();
    let clock = at_2027();
    let limiter = RateLimiter::new("usage", LEASE, clock.clone());
    let (tenant, key) = (TenantId(Uuid::new_v4()), Uuid::new_v4());
    let limits = Limits {
        key_events: Rate::new(500, 1_000),
        ..limits(Rate::new(100, 100), 10)
    };
    let first = limiter
        .check(Some(&*redis), &ask(tenant, key, limits, 1_000))
        .await;
    let Decision::Allowed { budgets, lease, .. } = first else {
        panic!("a batch within the budget passes")
    };
    let events = budgets
        .iter()
        .find(|b| b.budget == Budget::KeyEvents)
        .unwrap();
    assert_eq!(events.charge.remaining, 0);
    lease.unwrap().release();
    let Decision::Limited(refused) = limiter
        .check(Some(&*redis), &ask(tenant, key, limits, 1_000))
        .await
    else {
        panic!("the same batch again is over the event budget")
    };
    assert_eq!(refused.by, Some(Budget::KeyEvents));
    assert_eq!(refused.retry_after, Duration::from_secs(2));
    // The refusal charged no budget: the request budget still has 99 of 100.
    let small = limiter
        .check(Some(&*redis), &ask(tenant, key, limits, 0))
        .await;
    let Decision::Allowed { budgets, .. } = small else {
        panic!("a request without events passes")
    };
    let requests = budgets
        .iter()
        .find(|b| b.budget == Budget::KeyRequests)
        .unwrap();
    assert_eq!(requests.charge.remaining, 98);
    // More than the burst can never pass: no wait is offered.
    let Decision::Limited(never) = limiter
        .check(Some(&*redis), &ask(tenant, key, limits, 1_001))
        .await
    else {
        panic!("more than the burst")
    };
    assert!(never.never);
    assert!(
        never.detail().contains("send smaller batches"),
        "{}",
        never.detail()
    );
    // Half a second refills 250 events.
    clock.advance_wall(Duration::from_millis(500));
    assert!(matches!(
        limiter
            .check(Some(&*redis), &ask(tenant, key, limits, 250))
            .await,
        Decision::Allowed { .. }
    ));
    assert!(matches!(
        limiter
            .check(Some(&*redis), &ask(tenant, key, limits, 1))
            .await,
        Decision::Limited(_)
    ));
}

#[tokio::test]
async fn in_flight_slots_come_back_on_every_exit_path() {
    let redis = redis();
    let clock = at_2027();
    let limiter = Arc::new(RateLimiter::new("usage", LEASE, clock.clone()));
    let tenant = TenantId(Uuid::new_v4());
    let limits = limits(Rate::new(1_000, 1_000), 2);
    let take = || async {
        match limiter
            .check(Some(&*redis), &ask(tenant, Uuid::new_v4(), limits, 0))
            .await
        {
            Decision::Allowed { lease, .. } => Some(lease.unwrap()),
            Decision::Limited(l) => {
                assert_eq!(l.by, None, "refused for the slots, not a budget");
                assert!(l.detail().contains("in flight"));
                None
            }
        }
    };
    // Released at the end of a request.
    let a = take().await.unwrap();
    let b = take().await.unwrap();
    assert!(take().await.is_none(), "two in flight is the limit");
    a.release();
    assert!(
        in_flight_comes_to(&redis, tenant, 1).await,
        "the released slot came back"
    );
    // Dropped by a panic (or a cancelled request): a task of its own gives it back.
    let c = take().await.unwrap();
    let panicked = tokio::spawn(async move {
        let _held = c;
        panic!("the handler panicked");
    })
    .await;
    assert!(panicked.is_err());
    drop(b);
    assert!(
        in_flight_comes_to(&redis, tenant, 0).await,
        "the dropped slots came back"
    );
    // Never given back (the container died, or the function timed out): it expires with the
    // lease, past the function's timeout.
    let lost = take().await.unwrap();
    std::mem::forget(lost);
    let _held = take().await.unwrap();
    assert!(take().await.is_none());
    clock.advance_wall(LEASE + Duration::from_secs(1));
    assert!(take().await.is_some(), "the dead container's slot expired");
}

#[tokio::test]
async fn without_redis_the_containers_budgets_apply_and_redis_takes_over_again() {
    let clock = at_2027();
    let limiter = RateLimiter::new("usage", LEASE, clock.clone());
    let (tenant, key) = (TenantId(Uuid::new_v4()), Uuid::new_v4());
    let limits = limits(Rate::new(1, 3), 10);
    let down = Redis::new(
        RedisSource::Url("redis://127.0.0.1:1".into()),
        None,
        Duration::from_millis(100),
    );
    for _ in 0..3 {
        let decision = limiter
            .check(Some(&down), &ask(tenant, key, limits, 0))
            .await;
        let Decision::Allowed { source, lease, .. } = decision else {
            panic!("Redis down never refuses a request by itself")
        };
        assert_eq!(source, Source::Container);
        assert!(lease.is_none());
    }
    assert!(matches!(
        limiter
            .check(Some(&down), &ask(tenant, key, limits, 0))
            .await,
        Decision::Limited(_)
    ));
    // Redis reachable: its budgets decide again (this key has spent none there).
    let up = redis();
    let decision = limiter
        .check(Some(&*up), &ask(tenant, key, limits, 0))
        .await;
    let Decision::Allowed { source, .. } = decision else {
        panic!("Redis's budget is whole")
    };
    assert_eq!(source, Source::Redis);
}

/// One request without events of `key`.
async fn request(
    limiter: &RateLimiter,
    redis: &Redis,
    tenant: TenantId,
    key: Uuid,
    limits: Limits,
) -> Decision {
    limiter
        .check(Some(redis), &ask(tenant, key, limits, 0))
        .await
}

/// Refused once by Redis, a caller retrying at once is refused by the container from what Redis
/// answered — no round trip (shown with Redis unreachable: had the check gone out, the
/// container's own fresh budget would have let it through) — until the budget could pass again,
/// when the request goes to Redis as any other. A key's refusal binds only that key; the
/// tenant's binds all its keys.
#[tokio::test]
async fn a_refused_caller_is_refused_here_until_its_budget_could_pass() {
    let up = redis();
    let down = Redis::new(
        RedisSource::Url("redis://127.0.0.1:1".into()),
        None,
        Duration::from_millis(100),
    );
    let clock = at_2027();
    let limiter = RateLimiter::new("usage", LEASE, clock.clone());
    let (tenant, key, other_key) = (TenantId(Uuid::new_v4()), Uuid::new_v4(), Uuid::new_v4());
    let limits = limits(Rate::new(5, 10), 0);
    for _ in 0..10 {
        assert!(matches!(
            request(&limiter, &up, tenant, key, limits).await,
            Decision::Allowed { .. }
        ));
    }
    let Decision::Limited(by_redis) = request(&limiter, &up, tenant, key, limits).await else {
        panic!("past the burst")
    };
    assert_eq!(by_redis.by, Some(Budget::KeyRequests));

    // Refused here, the same answer Redis gave; another key is not bound by it.
    let Decision::Limited(here) = request(&limiter, &down, tenant, key, limits).await else {
        panic!("refused without asking Redis")
    };
    assert_eq!(here.by, by_redis.by);
    assert_eq!(here.retry_after, by_redis.retry_after);
    assert_eq!(here.budgets, by_redis.budgets);
    let Decision::Allowed { source, .. } =
        request(&limiter, &down, tenant, other_key, limits).await
    else {
        panic!("another key of the tenant is not bound by this key's refusal")
    };
    assert_eq!(source, Source::Container);

    // Once the budget could pass, the request goes out: to Redis, which lets it through once.
    clock.advance_wall(Duration::from_millis(200));
    let Decision::Allowed { source, .. } = request(&limiter, &up, tenant, key, limits).await else {
        panic!("Retry-After honoured")
    };
    assert_eq!(source, Source::Redis);
    assert!(matches!(
        request(&limiter, &up, tenant, key, limits).await,
        Decision::Limited(_)
    ));

    // The tenant's budget refusing binds every key of the tenant.
    let tenant_limits = Limits {
        tenant_requests: Rate::new(1, 2),
        ..limits
    };
    let (tenant, key, other_key) = (TenantId(Uuid::new_v4()), Uuid::new_v4(), Uuid::new_v4());
    for expected_allowed in [true, true, false] {
        let decision = limiter
            .check(Some(&*up), &ask(tenant, key, tenant_limits, 0))
            .await;
        assert_eq!(
            matches!(decision, Decision::Allowed { .. }),
            expected_allowed
        );
    }
    let Decision::Limited(here) = limiter
        .check(Some(&down), &ask(tenant, other_key, tenant_limits, 0))
        .await
    else {
        panic!("the tenant's budget is spent for every key")
    };
    assert_eq!(here.by, Some(Budget::TenantRequests));
    assert_eq!(here.retry_after, Duration::from_secs(1));
}

/// The API roles read a key's limits only through the key itself: the table is closed to them,
/// and the definer function answers nothing for a key id without that key's hash.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn another_tenants_limits_are_unreadable(owner: sqlx::PgPool) {
    use meterbridge::domain::rate_limit::Overrides;
    use meterbridge::repo::rate_limits::{self, Change};
    use meterbridge::testing::{create_api_key, create_tenant, database_url_as, INGEST_ROLE};

    let victim = create_tenant(&owner, "victim").await;
    let key = create_api_key(&owner, &victim, "crm", Trust::Internal).await;
    let key_id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE prefix = $1")
        .bind(&key.prefix)
        .fetch_one(&owner)
        .await
        .unwrap();
    let mut tx = owner.begin().await.unwrap();
    let change = Change {
        tenant: victim.id,
        key: Some(key_id),
        actor: "test",
        reason: "test",
    };
    let overrides = Overrides {
        requests: Some(Rate::new(3, 6)),
        ..Overrides::default()
    };
    rate_limits::set(&mut tx, &change, &overrides)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let api = sqlx::PgPool::connect(&database_url_as(&owner, INGEST_ROLE))
        .await
        .unwrap();
    let denied = sqlx::query("SELECT * FROM rate_limit_overrides")
        .fetch_all(&api)
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let (_, wrong) = rate_limits::of_key(&api, key_id, &[0u8; 32]).await.unwrap();
    assert!(
        wrong.is_empty(),
        "a guessed key id without its hash reads nothing"
    );
    let (_, right) = rate_limits::of_key(&api, key_id, &key.hash).await.unwrap();
    assert_eq!(right, overrides, "the key's holder reads its own limits");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rate_limit_audit WHERE tenant_id = $1")
            .bind(victim.id)
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(audited, 1);
}
