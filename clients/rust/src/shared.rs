//! What `record`, `flush` and the background task share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Gate;
use crate::config::{Callback, Settings};
use crate::inflight::InFlight;
use crate::overflow::DropWarning;
use crate::queue::Queue;
use crate::stats::Counters;
use crate::transport::Transport;

pub(crate) struct Shared {
    pub settings: Settings,
    pub queue: Queue,
    pub in_flight: InFlight,
    pub counters: Counters,
    pub gate: Gate,
    pub transport: Transport,
    pub callback: Option<Callback>,
    pub drops: DropWarning,
    /// Every event numbered below this is to be sent now, lingering or not (a flush asked).
    flush_to: AtomicU64,
    /// Bumped by every flush: batches waiting out a backoff retry at once.
    pub flushes: watch::Sender<u64>,
    /// Set when the task stops: batches abandon what they still hold.
    pub stop: watch::Sender<bool>,
    /// While closing: the task stops once everything is settled, or at this instant.
    closing: Mutex<Option<Instant>>,
}

impl Shared {
    pub fn new(settings: Settings, transport: Transport, callback: Option<Callback>) -> Self {
        Shared {
            queue: Queue::new(settings.queue_capacity, settings.max_batch),
            in_flight: InFlight::new(),
            counters: Counters::default(),
            gate: Gate::default(),
            drops: DropWarning::new(settings.drop_warning_interval, settings.queue_capacity),
            flush_to: AtomicU64::new(0),
            flushes: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            closing: Mutex::new(None),
            settings,
            transport,
            callback,
        }
    }

    /// Asks for everything queued so far to be sent now; returns its extent (the sequence
    /// number after the last event queued).
    pub fn request_flush(&self) -> u64 {
        let target = self.queue.next_seq();
        self.flush_to.fetch_max(target, Ordering::SeqCst);
        self.flushes.send_modify(|n| *n = n.wrapping_add(1));
        self.queue.wake.notify_one();
        target
    }

    pub fn flush_to(&self) -> u64 {
        self.flush_to.load(Ordering::SeqCst)
    }

    /// Refuses new events and has the task send what it holds until `deadline`, then stop.
    /// An earlier deadline of an earlier close stands.
    pub fn close(&self, deadline: Instant) {
        self.queue.close();
        {
            let mut closing = self.closing.lock().unwrap_or_else(PoisonError::into_inner);
            if closing.is_none_or(|d| deadline < d) {
                *closing = Some(deadline);
            }
        }
        self.request_flush();
    }

    pub fn closing(&self) -> Option<Instant> {
        *self.closing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
