//! The bounded in-memory queue between `record` and the background task.
//!
//! Events are numbered in the order they are queued (a sequence number is the queue's head
//! number plus the position), so a flush can ask for "everything queued before me" without any
//! per-event bookkeeping. They are kept in chunks of one batch each, so taking a batch moves a
//! pointer, not the events: recording never waits behind a long copy. Recording takes one
//! uncontended lock and, at most once per batch, wakes the background task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::event::Event;
use crate::inflight::InFlight;

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Full,
    Closed,
}

/// What the background task should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// A batch is due.
    Send,
    /// The oldest event's linger ends then.
    At(Instant),
    /// Nothing queued.
    Idle,
}

/// Events taken from the queue: sequence numbers `lo..lo + events.len()`.
pub(crate) struct Taken {
    pub lo: u64,
    pub events: Vec<Event>,
}

struct State {
    /// The queued events in order, in chunks of at most one batch.
    chunks: VecDeque<Vec<Event>>,
    /// Events in `chunks`.
    len: usize,
    /// The sequence number of the first queued event (of the next one, when empty).
    head: u64,
    /// When the events now queued started to linger: when the queue went from empty to not
    /// empty, or when the last batch was taken.
    oldest: Option<Instant>,
    closed: bool,
}

pub(crate) struct Queue {
    state: Mutex<State>,
    /// Signalled when events are taken (room for blocked `record` calls) or the queue closes.
    room: Condvar,
    /// `record` calls waiting for room (so taking events signals only when someone waits).
    blocked: AtomicUsize,
    /// Wakes the background task: the queue went from empty to not empty, a batch is full, a
    /// flush or a shutdown began.
    pub wake: Notify,
    capacity: usize,
    max_batch: usize,
}

impl Queue {
    pub fn new(capacity: usize, max_batch: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                len: 0,
                head: 0,
                oldest: None,
                closed: false,
            }),
            room: Condvar::new(),
            blocked: AtomicUsize::new(0),
            wake: Notify::new(),
            capacity,
            max_batch,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; if something did, the queue is still
        // consistent (each change is one push or one drain).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `event`; when full, waits up to `block` for room (`None`: not at all).
    /// A refused event is dropped here.
    pub fn push(&self, event: Event, block: Option<Duration>) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.len >= self.capacity {
            let Some(wait) = block else {
                return Err(Refused::Full);
            };
            let deadline = Instant::now() + wait;
            self.blocked.fetch_add(1, Ordering::SeqCst);
            let outcome = loop {
                let now = Instant::now();
                if now >= deadline {
                    break Err(Refused::Full);
                }
                state = self
                    .room
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                if state.closed {
                    break Err(Refused::Closed);
                }
                if state.len < self.capacity {
                    break Ok(());
                }
            };
            self.blocked.fetch_sub(1, Ordering::SeqCst);
            outcome?;
        }
        match state.chunks.back_mut() {
            Some(chunk) if chunk.len() < self.max_batch => chunk.push(event),
            _ => {
                let mut chunk = Vec::with_capacity(self.max_batch.min(self.capacity));
                chunk.push(event);
                state.chunks.push_back(chunk);
            }
        }
        state.len += 1;
        let len = state.len;
        if len == 1 {
            state.oldest = Some(Instant::now());
        }
        drop(state);
        if len == 1 || len == self.max_batch {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Whether a batch is due: a full one, the oldest event's linger over, or everything
    /// before `flush_to` (a sequence number) asked for, or the client closing.
    pub fn readiness(&self, now: Instant, linger: Duration, flush_to: u64) -> Readiness {
        let state = self.lock();
        let Some(oldest) = state.oldest else {
            return Readiness::Idle;
        };
        let due = oldest + linger;
        if state.len >= self.max_batch || state.closed || flush_to > state.head || now >= due {
            Readiness::Send
        } else {
            Readiness::At(due)
        }
    }

    /// Takes the next batch (at most `max_batch` events) and registers it in `in_flight`
    /// before the lock is let go, so a flush never sees it in neither place.
    pub fn take(&self, in_flight: &InFlight) -> Option<Taken> {
        let mut state = self.lock();
        let events = state.chunks.pop_front()?;
        Some(self.taken(state, events, in_flight))
    }

    /// Takes everything (the client is stopping), registered in `in_flight` as `take` does.
    pub fn take_all(&self, in_flight: &InFlight) -> Option<Taken> {
        let mut state = self.lock();
        let events: Vec<Event> = state.chunks.drain(..).flatten().collect();
        if events.is_empty() {
            return None;
        }
        Some(self.taken(state, events, in_flight))
    }

    fn taken(
        &self,
        mut state: MutexGuard<'_, State>,
        events: Vec<Event>,
        in_flight: &InFlight,
    ) -> Taken {
        let lo = state.head;
        let n = events.len();
        state.head += n as u64;
        state.len -= n;
        // What is left lingers from now: a full batch goes anyway, a partial one gets its
        // chance to fill.
        state.oldest = (state.len > 0).then(Instant::now);
        in_flight.add(lo, lo + n as u64);
        drop(state);
        if self.blocked.load(Ordering::SeqCst) > 0 {
            self.room.notify_all();
        }
        Taken { lo, events }
    }

    /// The sequence number the next queued event will get.
    pub fn next_seq(&self) -> u64 {
        let state = self.lock();
        state.head + state.len as u64
    }

    /// Events queued before `target` (a sequence number) that are not yet settled, in the
    /// queue or in flight.
    pub fn unsettled_before(&self, target: u64, in_flight: &InFlight) -> u64 {
        let state = self.lock();
        let queued = target.saturating_sub(state.head).min(state.len as u64);
        queued + in_flight.unsettled_before(target)
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuses every later event, releases blocked `record` calls and wakes the task.
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.notify_all();
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Event {
        Event::new("api.requests", n)
    }

    #[test]
    fn events_are_numbered_in_order_and_taken_in_batches() {
        let queue = Queue::new(10, 3);
        let in_flight = InFlight::new();
        for n in 1..=5 {
            queue.push(event(n), None).unwrap();
        }
        assert_eq!(queue.next_seq(), 5);
        let taken = queue.take(&in_flight).unwrap();
        assert_eq!(taken.lo, 0);
        assert_eq!(
            taken.events.iter().map(|e| e.quantity).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(queue.unsettled_before(5, &in_flight), 5);
        assert_eq!(queue.unsettled_before(2, &in_flight), 2);
        in_flight.settle(0);
        assert_eq!(queue.unsettled_before(3, &in_flight), 0);
        assert_eq!(queue.unsettled_before(5, &in_flight), 2);
        queue.push(event(6), None).unwrap();
        let rest = queue.take_all(&in_flight).unwrap();
        assert_eq!((rest.lo, rest.events.len()), (3, 3));
        assert_eq!(
            rest.events.iter().map(|e| e.quantity).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert!(queue.take(&in_flight).is_none());
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_full_queue_refuses_or_waits_until_its_deadline() {
        let queue = Queue::new(2, 10);
        queue.push(event(1), None).unwrap();
        queue.push(event(2), None).unwrap();
        assert!(matches!(queue.push(event(3), None), Err(Refused::Full)));
        let started = Instant::now();
        let waited = queue.push(event(3), Some(Duration::from_millis(50)));
        assert!(matches!(waited, Err(Refused::Full)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        queue.close();
        assert!(matches!(queue.push(event(4), None), Err(Refused::Closed)));
    }

    #[test]
    fn a_blocked_record_gets_the_room_a_batch_frees() {
        let queue = std::sync::Arc::new(Queue::new(1, 10));
        let in_flight = InFlight::new();
        queue.push(event(1), None).unwrap();
        let waiting = {
            let queue = std::sync::Arc::clone(&queue);
            std::thread::spawn(move || queue.push(event(2), Some(Duration::from_secs(10))).is_ok())
        };
        while queue.blocked.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        assert!(queue.take(&in_flight).is_some());
        assert!(waiting.join().unwrap());
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn linger_full_batches_and_flushes_make_a_batch_due() {
        let queue = Queue::new(10, 2);
        let linger = Duration::from_secs(60);
        let now = Instant::now();
        assert_eq!(queue.readiness(now, linger, 0), Readiness::Idle);
        queue.push(event(1), None).unwrap();
        assert!(matches!(
            queue.readiness(Instant::now(), linger, 0),
            Readiness::At(_)
        ));
        assert_eq!(
            queue.readiness(Instant::now() + linger, linger, 0),
            Readiness::Send
        );
        assert_eq!(queue.readiness(Instant::now(), linger, 1), Readiness::Send);
        queue.push(event(2), None).unwrap();
        assert_eq!(queue.readiness(Instant::now(), linger, 0), Readiness::Send);
    }
}
