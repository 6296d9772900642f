//! Noisy neighbours (`BENCH_WORKLOADS=neighbours`): tenant B sends steady traffic (batches of
//! 100 at `BENCH_NEIGHBOURS_B_BATCHES` a second, 20 by default) for `BENCH_NEIGHBOURS_SECONDS`
//! (15), alone and then while tenant A floods from 4 callers with no pause, far over its event
//! budget (its key overridden to `BENCH_NEIGHBOURS_A_LIMIT` events a second, 5,000 by default,
//! burst twice that). Printed: B's throughput and p50/p99 latency alone, beside A sending at
//! exactly its limit (A's legitimate load) and while A floods — each tenant's containers and
//! their PostgreSQL backends pinned to a core of their own, as Lambda gives each container its
//! own compute and a database server runs concurrent queries on cores of their own (see
//! [`pin_backends`]), then alone and flooded again on shared cores — A's accepted rate against
//! its limit, and the limiter's own cost — one caller
//! ingesting as fast as it can with limits on against limits off, `BENCH_NEIGHBOURS_COST_ROUNDS`
//! (3) rounds, the order alternating, in the same run. Every request goes through
//! `ingest_usage::handle` with Redis, each caller a container of its own: its App on a thread
//! and single-threaded runtime of its own (see [`container`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ingest_usage::App;
use meterbridge::domain::rate_limit::{Overrides, Rate};
use meterbridge::domain::{Tenant, Trust};
use meterbridge::testing::{api_key_id, create_api_key, create_tenant, set_limits};
use serde_json::{json, Value};
use sqlx::postgres::PgPool;

use crate::aggregate::env_usize;
use crate::ingest::build_apps_with;

const A_CALLERS: usize = 4;
const BATCH: usize = 100;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A request of `BATCH` fresh events for `key`.
fn request(template: &str, key: &str) -> lambda_http::Request {
    let now = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = (0..BATCH)
        .map(|_| {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            json!({"eventId": format!("nb-{n}"), "metric": "api.requests", "quantity": 1,
                   "occurredAt": now, "correlationId": format!("nb-op-{n}"),
                   "actorId": format!("user-{}", n % 100)})
        })
        .collect();
    let mut e: Value = serde_json::from_str(template).unwrap();
    e["headers"]["authorization"] = json!(format!("Bearer {key}"));
    e["body"] = json!(json!({ "events": events }).to_string());
    lambda_http::request::from_str(&e.to_string()).unwrap()
}

fn template() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/post-events.json"
    ))
    .unwrap()
}

struct Steady {
    events_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Steady traffic for `seconds`: one request every 1/`per_sec` s, each awaited; every one must
/// pass (tenant B).
async fn steady(app: &App, key: &str, per_sec: usize, seconds: u64) -> Steady {
    paced(app, key, per_sec as f64, seconds, true).await
}

async fn paced(app: &App, key: &str, per_sec: f64, seconds: u64, must_pass: bool) -> Steady {
    let template = template();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut accepted = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let request = request(&template, key);
        let sent = Instant::now();
        let response = ingest_usage::handle(app, request).await;
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        if response.status() == 200 {
            accepted += BATCH;
        } else {
            assert!(!must_pass, "tenant B was refused: {}", response.status());
        }
    }
    latencies.sort_by(f64::total_cmp);
    Steady {
        events_per_sec: accepted as f64 / started.elapsed().as_secs_f64(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

/// As fast as one caller can, for `seconds`: events a second.
async fn flat_out(app: &App, key: &str, seconds: u64) -> f64 {
    let template = template();
    let started = Instant::now();
    let mut accepted = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        let response = ingest_usage::handle(app, request(&template, key)).await;
        assert_eq!(response.status(), 200);
        accepted += BATCH;
    }
    accepted as f64 / started.elapsed().as_secs_f64()
}

async fn limit_key(owner: &PgPool, tenant: &Tenant, prefix: &str, events: Rate) {
    let overrides = Overrides {
        events: Some(events),
        requests: Some(Rate::new(100_000, 200_000)),
        ..Overrides::default()
    };
    let key = api_key_id(owner, prefix).await;
    set_limits(owner, tenant, Some(key), &overrides).await;
}

/// A caller as a container of its own: an OS thread with its own single-threaded runtime, its
/// App (connections, caches) built there and warmed with one request, then `work` once every
/// container of the phase is warm. Callers sharing one runtime would queue behind each other's
/// CPU work (a flood's request parsing) in a way separate Lambda containers never do; threads
/// share the machine's cores by the OS scheduler instead, or are pinned to `core`.
fn container<T, F>(
    api_url: &str,
    limits: bool,
    key: &str,
    (ready, core): (&Arc<Barrier>, Option<core_affinity::CoreId>),
    work: impl FnOnce(Arc<App>, String) -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: Future<Output = T>,
{
    let (api_url, key, ready) = (api_url.to_owned(), key.to_owned(), Arc::clone(ready));
    std::thread::spawn(move || {
        if let Some(core) = core {
            assert!(
                core_affinity::set_for_current(core),
                "pin to core {}",
                core.id
            );
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = build_apps_with(&api_url, 1, limits).await.remove(0);
            let _ = ingest_usage::handle(&app, request(&template(), &key)).await;
            if let Some(core) = core {
                pin_backends(&app, core).await;
            }
            ready.wait();
            work(app, key).await
        })
    })
}

/// Pins the PostgreSQL backends of `app`'s connections to `core`, beside the container's own
/// thread: a tenant's database work then runs on that tenant's core, as on a database server
/// with a core for each query it runs at once (RDS), and what tenants still share is the
/// server's memory, locks and WAL. Every connection of the pool is opened here and kept (the
/// pool's idle timeout is minutes, a phase seconds). Needs the right to change another user's
/// process (root, or CAP_SYS_NICE); without it the backends stay where they are, said once.
async fn pin_backends(app: &App, core: core_affinity::CoreId) {
    let pool = app.services.db.pool();
    let max = app.services.config.db_max_connections as usize;
    let mut held = Vec::with_capacity(max);
    for _ in 0..max {
        held.push(pool.acquire().await.expect("a connection to pin"));
    }
    for conn in &mut held {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut **conn)
            .await
            .expect("backend pid");
        let pinned = std::process::Command::new("taskset")
            .args(["-p", "-c", &core.id.to_string(), &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !pinned && !BACKENDS_UNPINNED.swap(true, Ordering::Relaxed) {
            eprintln!("neighbours: could not pin PostgreSQL backend {pid} to core {} (taskset needs root or CAP_SYS_NICE): the database's work runs on any core", core.id);
        }
    }
}

static BACKENDS_UNPINNED: AtomicBool = AtomicBool::new(false);

/// Waits for a container's thread, off the runtime.
async fn join<T: Send + 'static>(thread: std::thread::JoinHandle<T>) -> T {
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap()
}

/// Which cores the tenants' containers run on.
#[derive(Clone, Copy)]
struct Placement {
    b: Option<core_affinity::CoreId>,
    a: Option<core_affinity::CoreId>,
}

impl Placement {
    const SHARED: Placement = Placement { b: None, a: None };
}

/// What tenant A does while B is measured.
#[derive(Clone, Copy)]
enum Neighbour {
    None,
    /// Exactly its limit, paced over its callers: its legitimate load.
    Paced,
    /// No pause, far over its limit.
    Flood,
}

/// B's steady traffic for `seconds` beside `neighbour`, each container warmed first.
struct Phase {
    b: Steady,
    /// A's accepted events a second past its burst (a flood only).
    a_rate: f64,
    a_refused: u64,
}

async fn phase(
    api_url: &str,
    (b_key, b_rate): (&str, usize),
    (a_key, a_limit): (&str, u32),
    neighbour: Neighbour,
    placement: Placement,
    seconds: u64,
) -> Phase {
    let a_callers = match neighbour {
        Neighbour::None => 0,
        Neighbour::Paced | Neighbour::Flood => A_CALLERS,
    };
    let ready = Arc::new(Barrier::new(a_callers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let a_accepted = Arc::new(AtomicU64::new(0));
    let a_refused = Arc::new(AtomicU64::new(0));
    let started = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let a: Vec<_> = (0..a_callers)
        .map(|_| {
            let (stop, accepted, refused, started) = (
                Arc::clone(&stop),
                Arc::clone(&a_accepted),
                Arc::clone(&a_refused),
                Arc::clone(&started),
            );
            let per_caller = f64::from(a_limit) / BATCH as f64 / A_CALLERS as f64;
            let on = (&ready, placement.a);
            container(api_url, true, a_key, on, move |app, key| async move {
                if let Neighbour::Paced = neighbour {
                    paced(&app, &key, per_caller, seconds, false).await;
                    return;
                }
                started.lock().unwrap().get_or_insert_with(Instant::now);
                let template = template();
                while !stop.load(Ordering::Relaxed) {
                    let response = ingest_usage::handle(&app, request(&template, &key)).await;
                    match response.status().as_u16() {
                        200 => accepted.fetch_add(BATCH as u64, Ordering::Relaxed),
                        429 => refused.fetch_add(1, Ordering::Relaxed),
                        other => panic!("tenant A got {other}"),
                    };
                }
            })
        })
        .collect();
    let b = join(container(
        api_url,
        true,
        b_key,
        (&ready, placement.b),
        move |app, key| async move { steady(&app, &key, b_rate, seconds).await },
    ))
    .await;
    stop.store(true, Ordering::Relaxed);
    for caller in a {
        join(caller).await;
    }
    let flood_secs = started
        .lock()
        .unwrap()
        .map_or(1.0, |t| t.elapsed().as_secs_f64());
    // A's burst (2 s of its rate) passes at once; the rest is its rate.
    let a_rate = (a_accepted.load(Ordering::Relaxed) as f64 - f64::from(2 * a_limit)) / flood_secs;
    Phase {
        b,
        a_rate,
        a_refused: a_refused.load(Ordering::Relaxed),
    }
}

pub async fn run(owner: &PgPool, api_url: &str) {
    let seconds = env_usize("BENCH_NEIGHBOURS_SECONDS", 15) as u64;
    let b_rate = env_usize("BENCH_NEIGHBOURS_B_BATCHES", 20).max(1);
    let rounds = env_usize("BENCH_NEIGHBOURS_COST_ROUNDS", 3).max(1);
    let a_limit = env_usize("BENCH_NEIGHBOURS_A_LIMIT", 5_000).clamp(100, 1_000_000) as u32;
    let a = create_tenant(owner, "flood").await;
    let a_key = create_api_key(owner, &a, "crm", Trust::Internal).await;
    limit_key(owner, &a, &a_key.prefix, Rate::new(a_limit, 2 * a_limit)).await;
    let b = create_tenant(owner, "steady").await;
    let b_key = create_api_key(owner, &b, "crm", Trust::Internal).await;
    let c = create_tenant(owner, "solo").await;
    let c_key = create_api_key(owner, &c, "crm", Trust::Internal).await;
    limit_key(owner, &c, &c_key.prefix, Rate::new(1_000_000, 10_000_000)).await;
    // Tenant B's containers and their backends on the first core, tenant A's on the last (in
    // Lambda each container has compute of its own, and what tenants share is the database
    // server and Redis); then the same flood with every thread wherever the OS puts it.
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pinned = match (cores.first(), cores.last()) {
        (Some(b), Some(a)) if cores.len() >= 2 => Placement {
            b: Some(*b),
            a: Some(*a),
        },
        _ => Placement::SHARED,
    };
    let run = |neighbour, placement| {
        phase(
            api_url,
            (&b_key.key, b_rate),
            (&a_key.key, a_limit),
            neighbour,
            placement,
            seconds,
        )
    };
    let alone = run(Neighbour::None, pinned).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // A's warm-up batches refill
    let beside = run(Neighbour::Paced, pinned).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // A's budget refills
    let flooded = run(Neighbour::Flood, pinned).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alone_shared = run(Neighbour::None, Placement::SHARED).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let flooded_shared = run(Neighbour::Flood, Placement::SHARED).await;
    let a_rate = flooded.a_rate;

    // The limiter's cost: rounds of limits on and off, the order alternating, each phase a
    // container of its own.
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for limits in [round % 2 == 0, round % 2 == 1] {
            let ready = Arc::new(Barrier::new(1));
            let rate = join(container(
                api_url,
                limits,
                &c_key.key,
                (&ready, None),
                move |app, key| async move { flat_out(&app, &key, seconds).await },
            ))
            .await;
            if limits {
                on.push(rate)
            } else {
                off.push(rate)
            }
        }
    }
    let ratios: Vec<String> = on
        .iter()
        .zip(&off)
        .map(|(a, b)| format!("{:.1} %", a / b * 100.0))
        .collect();
    let (on, off) = (
        on.iter().sum::<f64>() / on.len() as f64,
        off.iter().sum::<f64>() / off.len() as f64,
    );

    let placed = |core: Option<core_affinity::CoreId>| {
        core.map_or("any core".to_owned(), |c| format!("core {}", c.id))
    };
    println!();
    println!("noisy neighbours — {seconds} s a phase; tenant B: batches of {BATCH} at {b_rate}/s, one caller; tenant A: {A_CALLERS} callers, key limit {a_limit} events/s (burst {}); ingest_usage::handle with Redis, each caller a container of its own (its App on its own thread and single-threaded runtime); pinned: B's container and its PostgreSQL backends on {}, A's on {} (Redis and PostgreSQL's own processes on any core)", 2 * a_limit, placed(pinned.b), placed(pinned.a));
    println!(
        "  {:<44} {:>10} {:>10} {:>10}",
        "tenant B", "events/s", "p50 ms", "p99 ms"
    );
    for (name, p) in [
        ("alone (pinned)", &alone),
        ("beside A at its limit, paced (pinned)", &beside),
        ("while A floods (pinned)", &flooded),
        ("alone (shared cores)", &alone_shared),
        ("while A floods (shared cores)", &flooded_shared),
    ] {
        println!(
            "  {:<44} {:>10.0} {:>10.2} {:>10.2}",
            name, p.b.events_per_sec, p.b.p50_ms, p.b.p99_ms
        );
    }
    println!(
        "  tenant A flooding: {:.0} events/s accepted past its burst (limit {a_limit}: {:+.1} %), {} requests refused (429); shared cores: {:.0} events/s, {} refused",
        a_rate,
        (a_rate / f64::from(a_limit) - 1.0) * 100.0,
        flooded.a_refused,
        flooded_shared.a_rate,
        flooded_shared.a_refused
    );
    println!("  limiter's cost, one caller flat out, {rounds} rounds of on and off: {on:.0} events/s with limits, {off:.0} without ({:.1} %; by round: {})", on / off * 100.0, ratios.join(", "));
    let goal = |met: bool| if met { "met" } else { "NOT met" };
    let (alone, beside, flooded) = (&alone.b, &beside.b, &flooded.b);
    println!("goals (pinned: each tenant's containers on compute of their own, as in Lambda):");
    println!(
        "  B's p99 while A floods <= 1.5x alone: {:.2}x: {}",
        flooded.p99_ms / alone.p99_ms,
        goal(flooded.p99_ms <= 1.5 * alone.p99_ms)
    );
    println!(
        "  (B's p99 while A floods against beside A at its limit: {:.2}x: the cost of A's excess alone; on shared cores, flood against alone: {:.2}x)",
        flooded.p99_ms / beside.p99_ms,
        flooded_shared.b.p99_ms / alone_shared.b.p99_ms
    );
    println!(
        "  B's throughput >= 95 % of alone: {:.1} %: {}",
        flooded.events_per_sec / alone.events_per_sec * 100.0,
        goal(flooded.events_per_sec >= 0.95 * alone.events_per_sec)
    );
    println!(
        "  A within 5 % of its limit: {:+.1} %: {}",
        (a_rate / f64::from(a_limit) - 1.0) * 100.0,
        goal((a_rate / f64::from(a_limit) - 1.0).abs() <= 0.05)
    );
    println!(
        "  limits on >= 95 % of limits off: {:.1} %: {}",
        on / off * 100.0,
        goal(on >= 0.95 * off)
    );
}
