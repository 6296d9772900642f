//! The background task: takes batches from the queue when they are due and hands each to a
//! delivery task, at most `max_in_flight` at once; stops when the client closes.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::delivery;
use crate::queue::Readiness;
use crate::shared::Shared;

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs until the client closes and everything is settled (or its closing deadline passes);
/// returns how many events it abandoned when it stopped.
pub(crate) async fn run(shared: Arc<Shared>) -> u64 {
    let settings = shared.settings;
    let permits = Arc::new(Semaphore::new(settings.max_in_flight));
    let mut batches = JoinSet::new();
    let mut flushes = shared.flushes.subscribe();
    loop {
        while batches.try_join_next().is_some() {}
        shared.counters.publish(shared.queue.len());
        let closing = shared.closing();
        if let Some(deadline) = closing {
            let settled = shared.queue.len() == 0 && shared.in_flight.is_empty();
            if settled || Instant::now() >= deadline {
                break;
            }
        }
        let readiness = shared.queue.readiness(
            std::time::Instant::now(),
            settings.linger,
            shared.flush_to(),
        );
        match readiness {
            Readiness::Send => {
                let permit = tokio::select! {
                    permit = Arc::clone(&permits).acquire_owned() => permit,
                    // Closing, or a deadline: look again.
                    () = shared.queue.wake.notified() => continue,
                    () = until(closing) => continue,
                    // A batch settled: the task may be closing with nothing left.
                    Some(_) = batches.join_next(), if closing.is_some() => continue,
                };
                let Ok(permit) = permit else { break };
                if let Some(taken) = shared.queue.take(&shared.in_flight) {
                    batches.spawn(delivery::deliver(Arc::clone(&shared), taken, permit));
                }
            }
            Readiness::At(due) => {
                let due = Instant::from_std(due);
                tokio::select! {
                    () = sleep_until(due) => {}
                    () = shared.queue.wake.notified() => {}
                    _ = flushes.changed() => {}
                    () = until(closing) => {}
                }
            }
            Readiness::Idle => {
                tokio::select! {
                    () = shared.queue.wake.notified() => {}
                    _ = flushes.changed() => {}
                    () = until(closing) => {}
                    Some(_) = batches.join_next(), if closing.is_some() => {}
                }
            }
        }
    }
    // Stop: batches give up what they hold, then whatever is still queued is given up too.
    let before = shared.counters.snapshot(0, 0).abandoned;
    shared.stop.send_replace(true);
    while batches.join_next().await.is_some() {}
    if let Some(left) = shared.queue.take_all(&shared.in_flight) {
        delivery::abandon(&shared, left.lo, left.events, "shutdown");
    }
    shared.counters.publish(0);
    shared.counters.snapshot(0, 0).abandoned - before
}
