//! `record()` latency, beside baselines measured in the same run.
//!
//! 1,000,000 events are recorded one at a time from a plain thread into a client whose
//! server is a local endpoint (an in-process HTTP server that accepts every event, so the
//! client's background task really batches, serializes and sends while recording goes on).
//! Each call is timed on its own with `Instant::now()` around it; the event is built before the
//! clock starts. The same is done for the baselines, with the same events:
//!
//! - `Instant::now() pair`: the timer alone (nothing between the two reads);
//! - `mpsc try_send`: a bounded `tokio::sync::mpsc` channel with a task draining it;
//! - `Mutex<VecDeque> push`: a plain locked queue, never drained.
//!
//! Run: `cargo bench -p meterbridge-client --bench record` (release profile).

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meterbridge_client::{Client, Event, Recorded};
use serde_json::{json, Value};

const EVENTS: usize = 1_000_000;
const WARM_UP: usize = 20_000;

/// A local endpoint that accepts every event of every batch; returns its URL.
async fn local_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a local port");
    let url = format!("http://{}", listener.local_addr().expect("an address"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let events = serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| v["events"].as_array().map(Vec::len))
                            .unwrap_or(0);
                        let results: Vec<Value> = (0..events)
                            .map(|index| json!({"index": index, "status": "accepted"}))
                            .collect();
                        let answer = json!({"accepted": events, "duplicates": 0, "conflicts": 0,
                                            "rejected": 0, "results": results});
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                            answer.to_string(),
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

fn event(n: usize) -> Event {
    Event::new("api.requests", (n % 7 + 1) as u64).actor_id("user-42")
}

/// Times `op` on each of `count` fresh events (built before the clock starts, and dropped, if
/// `op` gives them back, after it stops); nanoseconds.
fn measure(count: usize, mut op: impl FnMut(Event) -> Option<Event>) -> Vec<u64> {
    let mut samples = Vec::with_capacity(count);
    for n in 0..count {
        let event = event(n);
        let started = Instant::now();
        let back = op(event);
        samples.push(started.elapsed().as_nanos() as u64);
        drop(back);
    }
    samples
}

struct Row {
    name: &'static str,
    samples: Vec<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(nanos: u64) -> String {
    format!("{:.2}", nanos as f64 / 1000.0)
}

fn print(rows: &mut [Row]) {
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "operation (µs)", "p50", "p99", "p99.9", "max", "mean"
    );
    for row in rows.iter_mut() {
        row.samples.sort_unstable();
        let s = &row.samples;
        let mean = s.iter().sum::<u64>() / s.len() as u64;
        println!(
            "{:<26} {:>10} {:>10} {:>10} {:>10} {:>10}",
            row.name,
            micros(percentile(s, 50.0)),
            micros(percentile(s, 99.0)),
            micros(percentile(s, 99.9)),
            micros(*s.last().unwrap_or(&0)),
            micros(mean),
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let url = runtime.block_on(local_endpoint());
    let client = Client::builder(url, "mbk_bench")
        .runtime(runtime.handle().clone())
        .queue_capacity(EVENTS + WARM_UP)
        .max_batch(1000)
        .build()
        .expect("a client");

    // Warm-up: allocator, queue, connections.
    for n in 0..WARM_UP {
        black_box(client.record(event(n)));
    }
    runtime
        .block_on(client.flush(Duration::from_secs(60)))
        .expect("the warm-up is sent");

    let timer = measure(EVENTS, |e| Some(black_box(e)));

    let started = Instant::now();
    let record = measure(EVENTS, |e| {
        let recorded = client.record(e);
        debug_assert_eq!(recorded, Recorded::Queued);
        black_box(recorded);
        None
    });
    let recording_took = started.elapsed();

    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Event>(EVENTS);
    let drain = runtime.spawn(async move {
        let mut n = 0usize;
        while let Some(event) = receiver.recv().await {
            n += black_box(event).quantity as usize;
        }
        n
    });
    let try_send = measure(EVENTS, |e| {
        let _ = black_box(sender.try_send(e));
        None
    });
    drop(sender);
    black_box(runtime.block_on(drain).expect("the drain"));

    let queue = Mutex::new(VecDeque::<Event>::with_capacity(EVENTS));
    let push = measure(EVENTS, |e| {
        if let Ok(mut q) = queue.lock() {
            q.push_back(e);
        }
        None
    });
    drop(queue);

    let flushed = Instant::now();
    runtime
        .block_on(client.flush(Duration::from_secs(120)))
        .expect("everything is sent");
    let stats = client.stats();
    runtime
        .block_on(client.shutdown(Duration::from_secs(5)))
        .expect("a clean shutdown");

    println!(
        "record(): {EVENTS} events in {recording_took:?} from one thread, the client sending \
         meanwhile ({} cores); flush after: {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        flushed.elapsed()
    );
    println!(
        "client: recorded {} (warm-up included), accepted {}, dropped {}, requests {}",
        stats.recorded, stats.accepted, stats.dropped, stats.requests
    );
    print(&mut [
        Row {
            name: "Instant::now() pair",
            samples: timer,
        },
        Row {
            name: "Client::record",
            samples: record,
        },
        Row {
            name: "mpsc try_send",
            samples: try_send,
        },
        Row {
            name: "Mutex<VecDeque> push",
            samples: push,
        },
    ]);
    runtime.shutdown_background();
}
