//! Credentials from Secrets Manager (on moto): the pool and Redis are built from secrets, and a
//! credential the server refuses is re-read once, so a rotation heals without a redeploy.

use std::collections::HashMap;

use aws_sdk_secretsmanager::Client as SecretsClient;
use meterbridge::config::{Config, Env};
use meterbridge::testing::{database_name, moto_sdk_config, require_redis};
use meterbridge::{Services, StartupError};
use serde_json::json;
use sqlx::PgPool;

fn config(vars: &[(&str, String)]) -> Config {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Config::from(
        &Env::from_lookup(move |k| map.get(k).cloned()),
        "secrets-test",
    )
    .expect("config")
}

async fn put_secret(client: &SecretsClient, name: &str, value: serde_json::Value) {
    client
        .create_secret()
        .name(name)
        .secret_string(value.to_string())
        .send()
        .await
        .expect("create secret in moto");
}

fn unique(name: &str) -> String {
    format!("meterbridge/test/{}/{name}", uuid::Uuid::new_v4())
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn database_credentials_come_from_the_secret_and_heal_after_rotation(owner: PgPool) {
    let sdk = moto_sdk_config().await;
    let client = SecretsClient::new(&sdk);
    let secret_id = unique("db");
    // Host and port from the environment, the rest from the secret; the first user is wrong.
    put_secret(
        &client,
        &secret_id,
        json!({"username": "no_such_role_meterbridge", "password": "x", "engine": "postgres",
               "dbname": database_name(&owner)}),
    )
    .await;
    let services = Services::build_with_aws(
        config(&[
            ("DB_SECRET_ID", secret_id.clone()),
            ("DB_HOST", "127.0.0.1".into()),
            ("DB_PORT", "5432".into()),
        ]),
        Some(sdk),
    )
    .await
    .expect("services");

    // The secret is rotated after the function cached it.
    client
        .put_secret_value()
        .secret_id(&secret_id)
        .secret_string(
            json!({"username": "meterbridge_ingest", "password": "rotated", "dbname": database_name(&owner)}).to_string(),
        )
        .send()
        .await
        .unwrap();

    let mut tx = services
        .db
        .begin()
        .await
        .expect("re-reads the secret and connects");
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(user, "meterbridge_ingest");
}

#[tokio::test]
async fn redis_url_and_auth_come_from_the_secret() {
    let url = require_redis();
    let sdk = moto_sdk_config().await;
    let secret_id = unique("redis");
    put_secret(&SecretsClient::new(&sdk), &secret_id, json!({"url": url})).await;
    let services = Services::build_with_aws(
        config(&[
            (
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1/postgres".into(),
            ),
            ("REDIS_SECRET_ID", secret_id),
        ]),
        Some(sdk),
    )
    .await
    .expect("services");
    let mut conn = services
        .redis
        .as_ref()
        .unwrap()
        .connection()
        .await
        .expect("redis connection");
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn a_missing_secret_fails_the_cold_start_naming_it() {
    let sdk = moto_sdk_config().await;
    let secret_id = unique("absent");
    let err = Services::build_with_aws(config(&[("DB_SECRET_ID", secret_id.clone())]), Some(sdk))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, StartupError::Database(_)), "{err:?}");
    assert!(err.to_string().contains(&secret_id), "{err}");
}

#[tokio::test]
async fn a_secret_of_the_wrong_shape_is_named_without_echoing_it() {
    let sdk = moto_sdk_config().await;
    let secret_id = unique("bad-shape");
    put_secret(
        &SecretsClient::new(&sdk),
        &secret_id,
        json!({"user": "u", "pass": "hunter2"}),
    )
    .await;
    let err = Services::build_with_aws(config(&[("DB_SECRET_ID", secret_id.clone())]), Some(sdk))
        .await
        .err()
        .expect("must fail");
    let message = err.to_string();
    assert!(
        message.contains(&secret_id) && message.contains("username"),
        "{message}"
    );
    assert!(!message.contains("hunter2"));
}

#[tokio::test]
async fn a_numeric_password_is_named_not_echoed() {
    let sdk = moto_sdk_config().await;
    let secret_id = unique("numeric-password");
    put_secret(
        &SecretsClient::new(&sdk),
        &secret_id,
        json!({"username": "u", "password": 80417723}),
    )
    .await;
    let err = Services::build_with_aws(config(&[("DB_SECRET_ID", secret_id.clone())]), Some(sdk))
        .await
        .err()
        .expect("must fail");
    let message = err.to_string();
    assert!(message.contains("password"), "{message}");
    assert!(!message.contains("80417723"), "{message}");
}

/// The caching client's TTL runs on the monotonic clock, which a frozen Lambda container may not
/// advance; the wall clock re-reads the secret all the same.
#[tokio::test]
async fn a_secret_is_reread_once_its_ttl_passes_on_the_wall_clock() {
    let sdk = moto_sdk_config().await;
    let client = SecretsClient::new(&sdk);
    let secret_id = unique("wall-clock");
    put_secret(&client, &secret_id, json!({"url": "redis://old:6379"})).await;
    let clock = meterbridge::clock::FrozenClock::new();
    let secrets = meterbridge::secrets::Secrets::with_clock(
        &sdk,
        std::time::Duration::from_secs(300),
        clock.clone(),
    )
    .await
    .unwrap();
    let url = |v: meterbridge::secrets::RedisSecret| v.url;
    assert_eq!(
        url(secrets.get_json(&secret_id, false).await.unwrap()),
        "redis://old:6379"
    );
    put_secret_value(&client, &secret_id, json!({"url": "redis://new:6379"})).await;
    assert_eq!(
        url(secrets.get_json(&secret_id, false).await.unwrap()),
        "redis://old:6379",
        "within the TTL the cached value serves"
    );
    clock.advance_wall(std::time::Duration::from_secs(301));
    assert_eq!(
        url(secrets.get_json(&secret_id, false).await.unwrap()),
        "redis://new:6379",
        "past the TTL by the wall clock, the secret is read again"
    );
}

/// A private Redis that demands a password, on a free port; stopped when dropped.
struct PasswordRedis {
    child: std::process::Child,
    port: u16,
}

impl PasswordRedis {
    fn start(password: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--requirepass",
                password,
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        PasswordRedis { child, port }
    }
}

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_rotated_redis_auth_token_heals_without_a_restart() {
    let server = PasswordRedis::start("old-token");
    let sdk = moto_sdk_config().await;
    let client = SecretsClient::new(&sdk);
    let secret_id = unique("redis-auth");
    let url = format!("redis://127.0.0.1:{}", server.port);
    put_secret(
        &client,
        &secret_id,
        json!({"url": url, "authToken": "old-token"}),
    )
    .await;
    let services = Services::build_with_aws(
        config(&[
            (
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1/postgres".into(),
            ),
            ("REDIS_SECRET_ID", secret_id.clone()),
            ("REDIS_TIMEOUT_MS", "200".into()),
        ]),
        Some(sdk),
    )
    .await
    .expect("services");
    let redis = services.redis.as_ref().unwrap();
    let mut conn = redis
        .connection()
        .await
        .expect("connects with the current token");
    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();

    // Rotation: the server takes a new token, the secret follows, connections are cut.
    let mut admin = redis::Client::open(format!("redis://:old-token@127.0.0.1:{}", server.port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("new-token")
        .query_async(&mut admin)
        .await
        .unwrap();
    put_secret_value(
        &client,
        &secret_id,
        json!({"url": url, "authToken": "new-token"}),
    )
    .await;
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .unwrap_or(redis::Value::Nil);

    // The cached token is refused; the client drops the connection, re-reads the secret and heals.
    let mut healed = false;
    let mut refused = 0;
    for _ in 0..20 {
        match redis.connection().await {
            Ok(mut conn) => match redis::cmd("PING").query_async::<String>(&mut conn).await {
                Ok(_) => {
                    healed = true;
                    break;
                }
                Err(e) => {
                    refused += 1;
                    redis.forget_connection_on(&e).await;
                }
            },
            Err(_) => {
                refused += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        refused > 0,
        "the cut connection must fail first, or nothing was tested"
    );
    assert!(healed, "the new token is picked up from Secrets Manager");
}

async fn put_secret_value(client: &SecretsClient, name: &str, value: serde_json::Value) {
    client
        .put_secret_value()
        .secret_id(name)
        .secret_string(value.to_string())
        .send()
        .await
        .expect("update secret in moto");
}

/// Inside Lambda a Redis secret naming a plain-text `redis://` (or an unverified `rediss://`)
/// fails the cold start, as a database below verify-full would fail its first connection; a
/// verified `rediss://` is accepted (nothing connects yet).
#[tokio::test]
async fn inside_lambda_a_plain_text_redis_fails_the_cold_start() {
    let sdk = moto_sdk_config().await;
    let client = SecretsClient::new(&sdk);
    for (url, accepted) in [
        ("redis://cache.internal:6379", false),
        ("rediss://cache.internal:6379/#insecure", false),
        ("rediss://cache.internal:6379", true),
    ] {
        let secret_id = unique("redis-tls");
        put_secret(&client, &secret_id, json!({"url": url})).await;
        let db_secret = unique("db-unused");
        put_secret(
            &client,
            &db_secret,
            json!({"username": "nobody", "password": "x", "dbname": "none"}),
        )
        .await;
        let built = Services::build_with_aws(
            config(&[
                ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001".into()),
                ("DB_SECRET_ID", db_secret),
                ("DB_HOST", "127.0.0.1".into()),
                ("REDIS_SECRET_ID", secret_id),
            ]),
            Some(sdk.clone()),
        )
        .await;
        match (built, accepted) {
            (Err(StartupError::Redis(e)), false) => {
                assert!(e.to_string().contains("rediss://"), "{url}: {e}")
            }
            (Ok(_), true) => {}
            (Err(e), _) => panic!("{url}: {e}"),
            (Ok(_), false) => panic!("{url}: a plain-text Redis was accepted inside Lambda"),
        }
    }
}
