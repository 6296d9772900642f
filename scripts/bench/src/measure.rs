//! Measuring: concurrent callers, per-batch latency, peak RSS, and the printed table.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// One measured workload configuration.
pub struct Row {
    pub workload: &'static str,
    pub batch: usize,
    pub callers: usize,
    pub events: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub peak_rss_kib: u64,
}

impl Row {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    pub fn percentile(&self, p: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[i].as_secs_f64() * 1000.0
    }
}

/// The run with the median rate.
pub fn median(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS.
pub fn peak_rss_reset() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Splits batches round-robin over callers and runs them concurrently, timing each batch.
pub async fn run_concurrently<T, F, Fut>(
    work: Vec<T>,
    callers: usize,
    f: F,
) -> (Duration, Vec<Duration>)
where
    T: Send + 'static,
    F: Fn(usize, T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut lanes: Vec<Vec<T>> = (0..callers).map(|_| Vec::new()).collect();
    for (i, item) in work.into_iter().enumerate() {
        lanes[i % callers].push(item);
    }
    let f = Arc::new(f);
    let started = Instant::now();
    let tasks = lanes.into_iter().enumerate().map(|(caller, lane)| {
        let f = Arc::clone(&f);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            for item in lane {
                let t = Instant::now();
                f(caller, item).await;
                latencies.push(t.elapsed());
            }
            latencies
        })
    });
    let latencies: Vec<Duration> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    (started.elapsed(), latencies)
}

/// Prints the table, then each ratio of the handler to a baseline at batch 500.
pub fn report(rows: &[Row]) {
    println!();
    println!(
        "{:<27} {:>5} {:>7} {:>8} {:>11} {:>9} {:>9} {:>10}",
        "workload", "batch", "callers", "events", "events/s", "p50 ms", "p99 ms", "peak RSS"
    );
    for r in rows {
        println!(
            "{:<27} {:>5} {:>7} {:>8} {:>11.0} {:>9.2} {:>9.2} {:>7.1} MB",
            r.workload,
            r.batch,
            r.callers,
            r.events,
            r.rate(),
            r.percentile(0.50),
            r.percentile(0.99),
            r.peak_rss_kib as f64 / 1024.0
        );
    }
    println!();
    for callers in [1, 4] {
        let find = |prefix: &str| {
            rows.iter()
                .find(|r| r.workload.starts_with(prefix) && r.batch == 500 && r.callers == callers)
        };
        if let (Some(h), Some(a), Some(b)) = (find("handler"), find("(a)"), find("(b)")) {
            let vs_copy = h.rate() / b.rate() * 100.0;
            let vs_row = h.rate() / a.rate();
            println!(
                "batch 500, {callers} caller(s): handler = {vs_copy:.0}% of COPY (target >= 70%: {}), {vs_row:.1}x per-row (target >= 20x: {})",
                if vs_copy >= 70.0 { "met" } else { "NOT met" },
                if vs_row >= 20.0 { "met" } else { "NOT met" }
            );
            if let Some(l) = find(crate::usage_limits::LIMITED) {
                let ratio = l.rate() / h.rate() * 100.0;
                println!(
                    "batch 500, {callers} caller(s): with 3 thresholds on every metric = {ratio:.1}% of the rate without limits (target >= 97%: {})",
                    if ratio >= 97.0 { "met" } else { "NOT met" }
                );
            }
            if let Some(c) = find("(c)") {
                println!(
                    "batch 500, {callers} caller(s): handler = {:.0}% of COPY of the same rows (events + their dedup keys)",
                    h.rate() / c.rate() * 100.0
                );
            }
        }
        let relay = |name: &str| rows.iter().find(|r| r.workload == name);
        if callers == 1 {
            if let (Some(limits), Some(realtime)) = (
                relay(crate::usage_limits::LIMITS_READ),
                relay(crate::usage_limits::REALTIME_READ),
            ) {
                println!(
                    "limits read, in-process with real Redis: p50 {:.2} ms, p99 {:.2} ms (target < 5 ms: {}); realtime read p50 {:.2} ms, p99 {:.2} ms",
                    limits.percentile(0.50),
                    limits.percentile(0.99),
                    if limits.percentile(0.99) < 5.0 { "met" } else { "NOT met" },
                    realtime.percentile(0.50),
                    realtime.percentile(0.99)
                );
            }
            if let (Some(relayed), Some(raw)) =
                (relay(crate::relay::RELAY), relay(crate::relay::RAW))
            {
                let ratio = relayed.rate() / raw.rate() * 100.0;
                println!(
                    "relay: {:.0} rows/s (target >= 5000: {}) = {ratio:.0}% of the claim+mark limit (target >= 50%: {})",
                    relayed.rate(),
                    if relayed.rate() >= 5000.0 { "met" } else { "NOT met" },
                    if ratio >= 50.0 { "met" } else { "NOT met" }
                );
            }
            if let Some(fast) = relay(crate::relay::FAST_PATH) {
                println!(
                    "fast path, verify request → PutEvents accepted (upper bound: the whole request): p50 {:.2} ms, p95 {:.2} ms (target < 100 ms: {}), p99 {:.2} ms",
                    fast.percentile(0.50),
                    fast.percentile(0.95),
                    if fast.percentile(0.95) < 100.0 { "met" } else { "NOT met" },
                    fast.percentile(0.99)
                );
            }
        }
        let verify = |name: &str| {
            rows.iter()
                .find(|r| r.workload == name && r.callers == callers)
        };
        if let (Some(h), Some(raw)) = (verify(crate::verify::HANDLER), verify(crate::verify::RAW)) {
            let ratio = h.rate() / raw.rate() * 100.0;
            println!(
                "verify, {callers} caller(s): handler = {ratio:.0}% of the raw transaction (target >= 60%: {}); handler p50 {:.2} ms, p99 {:.2} ms",
                if ratio >= 60.0 { "met" } else { "NOT met" },
                h.percentile(0.50),
                h.percentile(0.99)
            );
        }
    }
}
