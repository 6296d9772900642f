//! The Redis client against a real server, and against none.

use std::time::{Duration, Instant};

use meterbridge::config::RedisSource;
use meterbridge::redis::{Redis, RedisError};
use meterbridge::testing::require_redis;

#[tokio::test]
async fn connects_lazily_and_shares_one_connection() {
    let redis = Redis::new(
        RedisSource::Url(require_redis()),
        None,
        Duration::from_millis(250),
    );
    let mut a = redis.connection().await.expect("connects on first use");
    let mut b = redis.connection().await.expect("reuses the connection");
    let key = format!("meterbridge:test:{}", uuid::Uuid::new_v4());
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .query_async(&mut a)
        .await
        .unwrap();
    let v: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut b)
        .await
        .unwrap();
    assert_eq!(v, 1);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut a)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_after_the_first_attempt() {
    let redis = Redis::new(
        RedisSource::Url("redis://127.0.0.1:1".into()),
        None,
        Duration::from_millis(250),
    );
    assert!(redis.connection().await.is_err());
    let started = Instant::now();
    let err = redis.connection().await.expect_err("still down");
    assert!(matches!(err, RedisError::Down), "{err}");
    assert!(started.elapsed() < Duration::from_millis(50));
}
