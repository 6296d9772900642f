//! Redis lost in the middle of traffic and back, through the real handler: the function reaches
//! Redis through a TCP proxy the test cuts (every connection dropped, new ones closed at once)
//! and restores. While Redis is gone every request still passes, charged against the
//! container's own budgets (usage is never refused because the limiter failed), and the
//! `RateLimiterFallback` metric counts each; once Redis is back the shared budgets apply again
//! from where they stood.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{send, Fixture, Reply};
use ingest_usage::App;
use meterbridge::clock::FrozenClock;
use meterbridge::domain::rate_limit::{Overrides, Rate};
use meterbridge::testing::{api_key_id, set_limits};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to Redis that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Proxy {
    async fn to(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, watching) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut up = watching.clone();
                if !*up.borrow() {
                    continue; // cut: the connection is closed at once
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = up.wait_for(|up| !up) => {} // cut: both ends dropped
                    }
                });
            }
        });
        Proxy { addr, up }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// The Redis server the tests use, as `host:port`.
fn redis_address() -> String {
    let url = meterbridge::testing::require_redis();
    let rest = url.split("://").nth(1).unwrap_or(&url);
    let host = rest.rsplit('@').next().unwrap_or(rest);
    host.split('/').next().unwrap().to_owned()
}

fn fallbacks(snapshotter: &Snapshotter) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "RateLimiterFallback")
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// The requests left in the key's request budget, from the `RateLimit` header.
fn key_requests_left(reply: &Reply) -> u64 {
    let header = reply.headers["ratelimit"].to_str().unwrap();
    let budget = header
        .split(", ")
        .find(|b| b.starts_with("\"key-requests\""))
        .unwrap();
    let left = budget
        .split(';')
        .find_map(|p| p.strip_prefix("r="))
        .unwrap();
    left.parse().unwrap()
}

/// One request of one new event.
async fn post(fx: &Fixture, app: &App, n: &mut usize) -> Reply {
    *n += 1;
    let body = json!({"events": [fx.event(*n, "api.requests", 1)]});
    send(app, fx.post(&fx.internal.key, &body)).await
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn redis_lost_mid_run_falls_back_to_the_containers_budgets_and_comes_back(owner: PgPool) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let proxy = Proxy::to(redis_address()).await;
    let fx = Fixture::new(&owner).await;
    // 100 requests of burst on a frozen clock: the budget only goes down, one a request.
    let key = api_key_id(&owner, &fx.internal.prefix).await;
    let overrides = Overrides {
        requests: Some(Rate::new(1, 100)),
        ..Overrides::default()
    };
    set_limits(&owner, &fx.tenant, Some(key), &overrides).await;
    let clock = FrozenClock::at(meterbridge::testing::now());
    let App {
        services, config, ..
    } = common::app_with(&owner, &[("REDIS_URL", &proxy.url())]).await;
    let app = App::new(services.with_clock(clock), config);
    let mut n = 0;

    // Redis up: the shared budget (100) charged three times.
    for left in [99, 98, 97] {
        let reply = post(&fx, &app, &mut n).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(key_requests_left(&reply), left);
    }
    assert_eq!(fallbacks(&snapshotter), 0);

    // Redis gone: every request passes, charged against this container's own budget (a fresh
    // 100), each counted by the metric.
    proxy.set(false);
    for left in [99, 98, 97, 96, 95] {
        let reply = post(&fx, &app, &mut n).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(key_requests_left(&reply), left, "the container's budget");
    }
    assert_eq!(fallbacks(&snapshotter), 5);

    // Redis back: within the connection's reconnect backoff, the shared budget again, from
    // where it stood (96 left, where the container's would say 94 or less).
    proxy.set(true);
    let mut shared = None;
    for _ in 0..40 {
        let reply = post(&fx, &app, &mut n).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        if key_requests_left(&reply) == 96 {
            shared = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(shared.is_some(), "the shared budget applies again");
    let before = fallbacks(&snapshotter);
    let reply = post(&fx, &app, &mut n).await;
    assert_eq!(key_requests_left(&reply), 95);
    assert_eq!(
        fallbacks(&snapshotter),
        before,
        "no fallback once Redis is back"
    );
    // Nothing was lost: every request's event is stored.
    assert_eq!(fx.stored_events().await, i64::try_from(n).unwrap());
}
