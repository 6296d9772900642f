//! meterbridge benchmark, each workload beside its baselines in the same run:
//! - `ingest`: usage ingestion through the real handler (in-process, real PostgreSQL and Redis)
//!   beside (a) the older per-row design — one INSERT per event, each its own transaction —,
//!   (b) the raw limit of the event rows — `COPY` of them — and (c) the raw limit of every row
//!   the handler writes — `COPY` of the events and of their dedup keys, in one transaction; and
//!   the same handler for a tenant with usage limits on every metric, then the limits read
//!   beside the realtime read (`usage_limits.rs`);
//! - `verify`: payment verifications through the real handler beside the raw limit — the same
//!   statements as a plain SQL transaction;
//! - `relay`: outbox rows relayed to a local PutEvents endpoint beside the raw limit — the same
//!   claim and mark statements without publishing — and the fast path's latency;
//! - `aggregate` (not in the default set): the aggregation of 1,000,000 events beside the same
//!   grouped SQL run directly, an incremental run, and the Redis counters' repair; see
//!   `aggregate.rs`;
//! - `growth` (not in the default set): ingestion at batch 500 on an empty table and after
//!   loading it to `BENCH_GROWTH_SIZES` rows (10 M, 30 M), for `BENCH_SCHEMA` `after` (this
//!   design) or `before` (migration 0005's); see `growth.rs`;
//! - `maintenance` (not in the default set): `BENCH_SIM_DAYS` (40) simulated days of ingestion
//!   through the handler with the scheduled jobs (storage maintenance and key compaction
//!   hourly, aggregation every 10 minutes) on the simulated clock, each job's run time per day,
//!   and the dedup keys' write amplification; in a database of its own; see `maintenance.rs`;
//! - `neighbours` (not in the default set): a tenant's steady traffic alone and while another
//!   floods far over its rate limit, and the limiter's own cost; see `neighbours.rs`.
//! - `erasure` (not in the default set): one data subject with 1 % of 10 M stored events
//!   erased while another tenant ingests; see `erasure.rs`.
//! - `meter-query` (not in the default set): the OpenMeter-compatible meter query over the
//!   1,000,000 events it reads at most, beside the plain SQL sum of the same rows; see
//!   `meter_query.rs`.
//!
//! `scripts/bench.sh` (or `cargo run --release -p meterbridge-bench`). `BENCH_MIGRATIONS=N`
//! measures the schema as of migration N (the before of a schema change). `BENCH_WORKLOADS`
//! (ingest,verify), `BENCH_EVENTS` (20000), `BENCH_VERIFICATIONS` (2000), `BENCH_REPEAT` (3),
//! `BENCH_BATCHES` (100,500,1000) and `BENCH_CALLERS` (1,4) size the run. Needs PostgreSQL as a
//! superuser at `BENCH_DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres) and
//! Redis at `REDIS_URL`; it creates and drops its own database.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program: fail loudly

mod aggregate;
mod erasure;
mod growth;
mod ingest;
mod maintenance;
mod measure;
mod meter_query;
mod neighbours;
mod relay;
mod usage_limits;
mod verify;

use meterbridge::domain::{MetricCatalog, Trust};
use meterbridge::repo::metrics;
use meterbridge::testing::{
    create_api_key, create_tenant, database_url_as, INGEST_ROLE, PAYMENTS_ROLE,
};
use sqlx::postgres::{PgPool, PgPoolOptions};

use ingest::{
    build_apps, make_batches, prepare, run_copy, run_copy_with_keys, run_handler, run_handler_as,
    run_per_row,
};

#[tokio::main]
async fn main() {
    let admin_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let total: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let per_row_total: usize = total / 4;
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let list = |name: &str, default: &[usize]| -> Vec<usize> {
        std::env::var(name)
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .filter(|v: &Vec<usize>| !v.is_empty())
            .unwrap_or_else(|| default.to_vec())
    };
    let batches = list("BENCH_BATCHES", &[100, 500, 1000]);
    let caller_counts = list("BENCH_CALLERS", &[1, 4]);
    let workloads =
        std::env::var("BENCH_WORKLOADS").unwrap_or_else(|_| "ingest,verify,relay".into());
    let relay_rows: usize = std::env::var("BENCH_RELAY_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let verifications: usize = std::env::var("BENCH_VERIFICATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);

    // The simulation runs in its own database (`meterbridge_sim`), before the others.
    if workloads.contains("maintenance") {
        maintenance::run(&admin_url).await;
        if workloads.split(',').all(|w| w.trim() == "maintenance") {
            return;
        }
    }

    // `BENCH_GROWTH_REUSE=1`: measure again on the database a growth run left (see growth.rs).
    let reuse = growth::reuse();
    let owner = if reuse {
        bench_database(&admin_url).await
    } else {
        fresh_database(&admin_url).await
    };
    let schema = growth::Schema::from_env();
    let mut migrations: Option<i64> = None;
    if workloads.contains("growth") && schema == growth::Schema::Before {
        migrations = Some(5);
        meterbridge::testing::migrate_up_to(&owner, 5).await;
    } else if let Some(version) = std::env::var("BENCH_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // The schema as of an earlier migration: the "before" of a change's ingestion cost.
        migrations = Some(version);
        meterbridge::testing::migrate_up_to(&owner, version).await;
    } else {
        meterbridge::db::MIGRATOR.run(&owner).await.unwrap();
    }
    let tenant = if reuse {
        growth::loaded_tenant(&owner).await
    } else {
        create_tenant(&owner, "bench").await
    };
    let key = create_api_key(&owner, &tenant, "crm", Trust::Internal).await;
    let catalog = MetricCatalog::new(metrics::catalog(&owner).await.unwrap());
    // Each API function's own role (migration 0013); a schema from before it has one for both.
    let own_roles = migrations.is_none_or(|version| version >= 13);
    let (ingest_role, payments_role) = if own_roles {
        (INGEST_ROLE, PAYMENTS_ROLE)
    } else {
        ("meterbridge_api", "meterbridge_api")
    };
    let api_url = database_url_as(&owner, ingest_role);
    let api_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&api_url)
        .await
        .unwrap();
    let payments_url = database_url_as(&owner, payments_role);
    let payments_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&payments_url)
        .await
        .unwrap();

    println!("meterbridge benchmark ({workloads}) — ingest: {total} events per handler/COPY run, {per_row_total} per per-row run; verify: {verifications} verifications per run; median of {repeat} runs");
    println!(
        "PostgreSQL {}, Redis {}",
        server_version(&owner).await,
        meterbridge::testing::redis_url()
    );
    // Each configuration runs BENCH_REPEAT times (workloads interleaved, each on an emptied,
    // checkpointed table); the run with the median rate is reported.
    let mut rows = Vec::new();
    let ingest_batches = if workloads.contains("ingest") {
        batches.clone()
    } else {
        Vec::new()
    };
    // The same workload for a tenant with usage limits on every metric.
    let limited_key = if ingest_batches.is_empty() {
        None
    } else {
        Some(usage_limits::limited_tenant(&owner, &catalog).await)
    };
    for &batch in &ingest_batches {
        for &callers in &caller_counts {
            let apps = build_apps(&api_url, callers).await;
            let (mut handler, mut per_row, mut copy, mut copy_keys, mut limited) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let keyed = has_key_table(&owner).await;
            for round in 0..repeat {
                let tag = format!("{batch}x{callers}r{round}");
                let work = make_batches(&format!("h{tag}"), total, batch);
                reset(&owner).await;
                handler.push(run_handler(&apps, &key.key, work, batch, callers).await);

                if let Some(limited_key) = &limited_key {
                    let work = make_batches(&format!("l{tag}"), total, batch);
                    reset(&owner).await;
                    limited.push(
                        run_handler_as(
                            usage_limits::LIMITED,
                            &apps,
                            &limited_key.key,
                            work,
                            batch,
                            callers,
                        )
                        .await,
                    );
                }

                let work = make_batches(&format!("r{tag}"), per_row_total, batch);
                let prepared = prepare(&work, &tenant, &catalog);
                reset(&owner).await;
                per_row.push(run_per_row(&api_pool, prepared, &tenant, batch, callers).await);

                let work = make_batches(&format!("c{tag}"), total, batch);
                let prepared = prepare(&work, &tenant, &catalog);
                reset(&owner).await;
                copy.push(run_copy(&owner, prepared, &tenant, batch, callers).await);

                if keyed {
                    let work = make_batches(&format!("k{tag}"), total, batch);
                    let prepared = prepare(&work, &tenant, &catalog);
                    reset(&owner).await;
                    copy_keys
                        .push(run_copy_with_keys(&owner, prepared, &tenant, batch, callers).await);
                }
            }
            rows.extend([handler, per_row, copy].into_iter().map(measure::median));
            if keyed {
                rows.push(measure::median(copy_keys));
            }
            if !limited.is_empty() {
                rows.push(measure::median(limited));
            }
        }
    }
    if let Some(limited_key) = &limited_key {
        // The limits read beside the realtime read: 2,000 requests each, one container.
        let app = build_apps(&api_url, 1).await.remove(0);
        let (mut limits, mut realtime) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            limits.push(
                usage_limits::reads(
                    &app,
                    &limited_key.key,
                    "/v1/usage/limits",
                    2000,
                    usage_limits::LIMITS_READ,
                )
                .await,
            );
            realtime.push(
                usage_limits::reads(
                    &app,
                    &limited_key.key,
                    "/v1/usage/realtime",
                    2000,
                    usage_limits::REALTIME_READ,
                )
                .await,
            );
        }
        rows.extend([limits, realtime].into_iter().map(measure::median));
    }
    if workloads.contains("verify") {
        for &callers in &caller_counts {
            let apps = verify::build_apps(&payments_url, callers).await;
            let (mut handler, mut raw) = (Vec::new(), Vec::new());
            for _ in 0..repeat {
                let payments = verify::seed(&owner, &tenant, verifications).await;
                handler.push(verify::run_handler(&apps, &key.key, payments, callers).await);
                let payments = verify::seed(&owner, &tenant, verifications).await;
                raw.push(verify::run_raw(&payments_pool, &tenant, payments, callers).await);
            }
            rows.extend([handler, raw].into_iter().map(measure::median));
        }
    }
    if workloads.contains("relay") {
        let endpoint = relay::local_eventbridge().await;
        let ops = PgPoolOptions::new()
            .max_connections(8)
            .connect(&database_url_as(&owner, meterbridge::testing::OPS_ROLE))
            .await
            .unwrap();
        let (mut relayed, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            relay::seed(&owner, &tenant, relay_rows).await;
            relayed.push(relay::run_relay(&ops, &endpoint, relay_rows).await);
            relay::seed(&owner, &tenant, relay_rows).await;
            raw.push(relay::run_raw(&ops, relay_rows).await);
        }
        rows.extend([relayed, raw].into_iter().map(measure::median));
        let payments = verify::seed(&owner, &tenant, verifications).await;
        rows.push(relay::run_fast_path(&payments_url, &endpoint, &key.key, payments).await);
    }
    if workloads.contains("meter-query") {
        let app = build_apps(&api_url, 1).await.remove(0);
        rows.extend(meter_query::run(&owner, &app, repeat).await);
    }
    measure::report(&rows);
    if workloads.contains("aggregate") {
        aggregate::run(&owner, repeat).await;
    }
    if workloads.contains("neighbours") {
        neighbours::run(&owner, &api_url).await;
    }
    if workloads.contains("erasure") {
        erasure::run(&owner, &api_url).await;
    }
    if workloads.contains("growth") {
        let sizes = list("BENCH_GROWTH_SIZES", &[10_000_000, 30_000_000]);
        let points = growth::run(
            &owner, &api_url, schema, &tenant, &key.key, &catalog, &sizes, total, repeat,
        )
        .await;
        growth::report(schema, &points);
    }
    owner.close().await;
}

/// The bench database, `meterbridge_bench`, on the server of `BENCH_DATABASE_URL`.
async fn bench_database(admin_url: &str) -> PgPool {
    let url = match admin_url.rfind('/') {
        Some(i) => format!("{}/meterbridge_bench", &admin_url[..i]),
        None => panic!("BENCH_DATABASE_URL must name a database"),
    };
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("the bench database")
}

async fn fresh_database(admin_url: &str) -> PgPool {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .expect("PostgreSQL");
    sqlx::query("DROP DATABASE IF EXISTS meterbridge_bench WITH (FORCE)")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE meterbridge_bench")
        .execute(&admin)
        .await
        .unwrap();
    bench_database(admin_url).await
}

/// Whether the schema remembers dedup keys (migration 0006 on).
async fn has_key_table(pool: &PgPool) -> bool {
    sqlx::query_scalar("SELECT to_regclass('public.usage_event_keys') IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn server_version(pool: &PgPool) -> String {
    sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// An empty, analysed table and a fresh checkpoint, so no run pays for the one before it.
async fn reset(owner: &PgPool) {
    for statement in [
        "TRUNCATE usage_events, usage_event_keys",
        "VACUUM ANALYZE usage_events",
        "VACUUM ANALYZE usage_event_keys",
        "CHECKPOINT",
    ] {
        sqlx::query(statement).execute(owner).await.unwrap();
    }
}
