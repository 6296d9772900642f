//! `rediss://` against a private TLS-only redis-server with a certificate the test makes: the
//! app's counters work when the server chains to the configured CA, and nothing connects
//! otherwise.

mod local_redis;

use std::collections::BTreeMap;
use std::time::Duration;

use local_redis::{free_ports, Servers};
use meterbridge::config::{RedisOptions, RedisSource};
use meterbridge::domain::TenantId;
use meterbridge::redis::{Redis, RedisError};
use meterbridge::usage_counters;

const TIMEOUT: Duration = Duration::from_secs(1);

struct TlsRedis {
    servers: Servers,
    port: u16,
}

fn start() -> TlsRedis {
    let mut servers = Servers::new();
    servers.make_certificates();
    let port = free_ports(1)[0];
    servers.start(port, &Servers::tls_args(port));
    TlsRedis { servers, port }
}

impl TlsRedis {
    fn client(&self, scheme: &str, ca: Option<&str>) -> Redis {
        self.client_requiring(scheme, ca, false)
    }

    /// As Lambda builds it when `require_tls`: a verified `rediss://` connection or none.
    fn client_requiring(&self, scheme: &str, ca: Option<&str>, require_tls: bool) -> Redis {
        Redis::with_options(
            RedisSource::Url(format!("{scheme}://127.0.0.1:{}", self.port)),
            None,
            TIMEOUT,
            RedisOptions {
                cluster: false,
                tls_ca_file: ca.map(|name| self.servers.path(name).into()),
                require_tls,
            },
        )
    }
}

/// Adds to a counter through the app's code path; what it then reads back.
async fn add_and_read(redis: &Redis) -> Result<Option<i128>, RedisError> {
    let tenant = TenantId(uuid::Uuid::new_v4());
    let now = meterbridge::testing::now();
    let today = now.date_naive();
    let totals = BTreeMap::from([((today, "api.requests"), 41i128), ((today, "gb.out"), 2)]);
    usage_counters::add_totals(redis, tenant, &totals, now, 7).await?;
    let one = BTreeMap::from([((today, "api.requests"), 1i128)]);
    usage_counters::add_totals(redis, tenant, &one, now, 7).await?;
    let read =
        usage_counters::read_day(redis, tenant, today, ["api.requests", "gb.out"].into_iter())
            .await?;
    assert_eq!(read.get("gb.out"), Some(&2));
    Ok(read.get("api.requests").copied())
}

#[tokio::test]
async fn rediss_with_the_servers_ca_counts() {
    let server = start();
    let redis = server.client("rediss", Some("ca.pem"));
    assert_eq!(add_and_read(&redis).await.expect("TLS works"), Some(42));
}

#[tokio::test]
async fn a_server_that_does_not_chain_to_the_trusted_roots_is_refused() {
    let server = start();
    for redis in [
        server.client("rediss", Some("other-ca.pem")),
        // The built-in public roots do not know the test's CA either.
        server.client("rediss", None),
    ] {
        let err = add_and_read(&redis).await.expect_err("an unknown issuer");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}

#[tokio::test]
async fn plain_text_to_a_tls_port_fails() {
    let server = start();
    let err = add_and_read(&server.client("redis", None))
        .await
        .expect_err("the server speaks only TLS");
    assert!(!matches!(err, RedisError::Down), "{err}");
}

#[tokio::test]
async fn a_ca_file_demands_tls_and_must_exist() {
    let server = start();
    let err = add_and_read(&server.client("redis", Some("ca.pem")))
        .await
        .expect_err("a CA file with a plain URL is a mistake");
    assert!(matches!(err, RedisError::CaWithoutTls), "{err}");
    let err = add_and_read(&server.client("rediss", Some("absent.pem")))
        .await
        .expect_err("no CA file");
    assert!(err.to_string().contains("absent.pem"), "{err}");
}

/// Inside Lambda only a verified `rediss://` connection is made: a plain `redis://` URL, or a
/// `rediss://` one marked `#insecure`, is refused before any byte is sent (and the cold start
/// checks it: `Services` fails to build).
#[tokio::test]
async fn inside_lambda_only_verified_tls_is_used() {
    let server = start();
    let verified = server.client_requiring("rediss", Some("ca.pem"), true);
    verified.check().await.expect("rediss:// with a CA");
    assert_eq!(add_and_read(&verified).await.expect("TLS works"), Some(42));
    for url in [
        format!("redis://127.0.0.1:{}", server.port),
        format!("rediss://127.0.0.1:{}/#insecure", server.port),
    ] {
        let redis = Redis::with_options(
            RedisSource::Url(url.clone()),
            None,
            TIMEOUT,
            RedisOptions {
                require_tls: true,
                ..RedisOptions::default()
            },
        );
        let err = redis.check().await.expect_err(&url);
        assert!(matches!(err, RedisError::TlsRequired), "{url}: {err}");
        let err = add_and_read(&redis).await.expect_err(&url);
        assert!(matches!(err, RedisError::TlsRequired), "{url}: {err}");
    }
}
