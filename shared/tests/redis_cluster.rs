//! The counters through the cluster client, against a private 3-master cluster (plain, and
//! TLS-only as ElastiCache Serverless is): add, read, observe and compare-and-set repair for
//! tenants spread over every master.

mod local_redis;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use local_redis::Servers;
use meterbridge::config::{RedisOptions, RedisSource};
use meterbridge::domain::TenantId;
use meterbridge::redis::{keys, Redis};
use meterbridge::usage_counters::{self, Fix};

const TIMEOUT: Duration = Duration::from_secs(2);
const METRICS: [&str; 2] = ["api.requests", "gb.out"];

fn cluster_client(servers: &Servers, port: u16, tls: bool) -> Redis {
    let scheme = if tls { "rediss" } else { "redis" };
    Redis::with_options(
        RedisSource::Url(format!("{scheme}://127.0.0.1:{port}")),
        None,
        TIMEOUT,
        RedisOptions {
            cluster: true,
            tls_ca_file: tls.then(|| servers.path("ca.pem").into()),
            // A TLS cluster is held to what Lambda demands.
            require_tls: tls,
        },
    )
}

/// Two tenants per master, by the slot of their counters (`redis-cli --cluster create` gives
/// the three masters 0-5460, 5461-10922 and 10923-16383).
async fn tenants_on_every_master(redis: &Redis, day: NaiveDate) -> Vec<Vec<TenantId>> {
    let mut conn = redis.connection().await.expect("the cluster connects");
    let mut by_master: Vec<Vec<TenantId>> = vec![Vec::new(); 3];
    while by_master.iter().any(|t| t.len() < 2) {
        let tenant = TenantId(uuid::Uuid::new_v4());
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(keys::usage_counter(tenant, day, "any"))
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT");
        let master = match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        by_master[master].push(tenant);
    }
    by_master
}

/// Every counter operation the app performs, for each tenant.
async fn exercise(redis: &Redis, tenants: &[TenantId], now: DateTime<Utc>) {
    let today = now.date_naive();
    let yesterday = today.pred_opt().expect("a day before");
    for (i, &tenant) in tenants.iter().enumerate() {
        let base = 100 * (i as i128 + 1);
        // One script over four keys of the tenant: one slot.
        let mut totals = BTreeMap::new();
        for day in [today, yesterday] {
            for (m, metric) in METRICS.into_iter().enumerate() {
                totals.insert((day, metric), base + m as i128);
            }
        }
        let changed = usage_counters::add_totals(redis, tenant, &totals, now, 7)
            .await
            .expect("add");
        let days = changed
            .iter()
            .filter(|c| c.cell.span == usage_counters::Span::Day)
            .count();
        assert_eq!(days, 4);
        // The month counters took both days (the same month, or two).
        let month_total: i128 = changed
            .iter()
            .filter(|c| c.cell.span == usage_counters::Span::Month)
            .map(|c| c.value)
            .sum();
        assert_eq!(month_total, totals.values().sum::<i128>());
        let void = BTreeMap::from([((today, "gb.out"), -1i128)]);
        usage_counters::add_totals(redis, tenant, &void, now, 7)
            .await
            .expect("subtract");
        let read = usage_counters::read_day(redis, tenant, today, METRICS.into_iter())
            .await
            .expect("read");
        assert_eq!(
            read,
            BTreeMap::from([("api.requests".into(), base), ("gb.out".into(), base)])
        );

        // Repair: a counter still as observed is set; one that moved since is left.
        let cells: Vec<usage_counters::Cell> = [today, yesterday]
            .into_iter()
            .map(|day| usage_counters::Cell::day(day, "api.requests"))
            .collect();
        let observed = usage_counters::observe(redis, tenant, &cells)
            .await
            .expect("observe");
        assert_eq!(observed[1].value, Some(base));
        let racing = BTreeMap::from([((yesterday, "api.requests"), 5i128)]);
        usage_counters::add_totals(redis, tenant, &racing, now, 7)
            .await
            .expect("a racing add");
        let fixes: Vec<Fix> = cells
            .into_iter()
            .zip(observed)
            .map(|(cell, observed)| Fix {
                cell,
                observed,
                value: 7,
            })
            .collect();
        let set = usage_counters::repair(redis, tenant, &fixes, 7)
            .await
            .expect("repair");
        assert_eq!(set, vec![true, false]);
        let after = |day| async move {
            usage_counters::read_day(redis, tenant, day, ["api.requests"].into_iter())
                .await
                .expect("read")
                .get("api.requests")
                .copied()
        };
        assert_eq!(after(today).await, Some(7));
        assert_eq!(after(yesterday).await, Some(base + 5));
    }
}

#[tokio::test]
async fn counters_work_across_a_cluster() {
    let mut servers = Servers::new();
    let ports = servers.start_cluster(false);
    let redis = cluster_client(&servers, ports[0], false);
    let now = meterbridge::testing::now();
    let by_master = tenants_on_every_master(&redis, now.date_naive()).await;
    let tenants: Vec<TenantId> = by_master.concat();
    exercise(&redis, &tenants, now).await;

    // The counters really are spread: every master holds some.
    for port in &ports {
        let node = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut node = node.get_multiplexed_async_connection().await.unwrap();
        let keys: i64 = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
        assert!(keys >= 8, "master {port} holds {keys} keys");
    }

    // And the cluster would refuse a script over two tenants' counters, were one ever sent.
    let mut conn = redis.connection().await.unwrap();
    let day = now.date_naive();
    let err = redis::Script::new("return #KEYS")
        .key(keys::usage_counter(by_master[0][0], day, "m"))
        .key(keys::usage_counter(by_master[1][0], day, "m"))
        .invoke_async::<i64>(&mut conn)
        .await
        .expect_err("keys of two slots");
    assert!(
        err.to_string().to_lowercase().contains("crossslot"),
        "{err}"
    );
}

#[tokio::test]
async fn counters_work_across_a_tls_only_cluster() {
    let mut servers = Servers::new();
    servers.make_certificates();
    let ports = servers.start_cluster(true);
    let redis = cluster_client(&servers, ports[1], true);
    let now = meterbridge::testing::now();
    let tenants: Vec<TenantId> = tenants_on_every_master(&redis, now.date_naive())
        .await
        .into_iter()
        .map(|t| t[0])
        .collect();
    exercise(&redis, &tenants, now).await;
}
