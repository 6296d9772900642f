//! The client handle: recording, flushing, shutting down, and the counters.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use crate::config::{BuildError, ClientBuilder, OverflowPolicy};
use crate::error::FlushError;
use crate::event::Event;
use crate::queue::Refused;
use crate::sender;
use crate::shared::Shared;
use crate::stats::Stats;
use crate::transport::Transport;

/// What [`Client::record`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Queued: it will be sent, and its outcome counted and passed to the callback.
    Queued,
    /// Dropped, and counted in [`Stats::dropped`]: it will never be sent.
    Dropped(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The queue was full (and stayed full for [`OverflowPolicy::Block`]'s deadline).
    QueueFull,
    /// The client was shut down (or its last handle dropped).
    ShutDown,
}

/// A meterbridge API client: records usage events in the background, and calls the usage
/// and payment APIs.
///
/// Cheap to clone (every clone is a handle on the same queue and background task); build it
/// once per process — in AWS Lambda, once per container, outside the handler. It must be built
/// inside a Tokio runtime (or given one with [`ClientBuilder::runtime`]).
///
/// See the [crate documentation](crate) for how recording works.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<u64>>>,
}

/// The last handle gone without `shutdown`: the task sends what is queued for the drop grace,
/// then stops.
impl Drop for Inner {
    fn drop(&mut self) {
        if !self.shared.queue.is_closed() {
            self.shared
                .close(Instant::now() + self.shared.settings.drop_grace);
        }
    }
}

/// Never prints the API key.
impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.inner.shared.transport)
            .field("settings", &self.inner.shared.settings)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Client {
    /// Starts building a client for the API at `base_url` (e.g. `https://api.example.com`,
    /// where `/v1/usage/events` is served) with an API key (`mbk_…`).
    pub fn builder(base_url: impl Into<String>, api_key: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(base_url, api_key)
    }

    pub(crate) fn from_builder(builder: ClientBuilder) -> Result<Client, BuildError> {
        let settings = builder.settings()?;
        let transport = Transport::new(&builder)?;
        let runtime = match builder.runtime.clone() {
            Some(runtime) => runtime,
            None => tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?,
        };
        let shared = Arc::new(Shared::new(settings, transport, builder.on_outcome.clone()));
        let task = runtime.spawn(sender::run(Arc::clone(&shared)));
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.shared.transport
    }

    /// Queues a usage event to be sent in the background, and returns at once.
    ///
    /// Never fails and never waits on the network. The event gets its id (a UUIDv7, unless it
    /// has one) and its time (unless it has one) now, so every retry sends it identically and
    /// the server stores it once. When the queue is full the event is dropped and counted
    /// ([`OverflowPolicy::Drop`], the default), or `record` waits for room up to a deadline
    /// ([`OverflowPolicy::Block`], which parks the calling thread). After
    /// [`shutdown`](Client::shutdown), events are dropped and counted.
    ///
    /// The returned [`Recorded`] says which; ignoring it is fine.
    pub fn record(&self, mut event: Event) -> Recorded {
        let shared = &self.inner.shared;
        shared.counters.recorded();
        event.stamp();
        let block = match shared.settings.overflow {
            OverflowPolicy::Drop => None,
            OverflowPolicy::Block { deadline } => Some(deadline),
        };
        match shared.queue.push(event, block) {
            Ok(()) => Recorded::Queued,
            Err(why) => {
                shared.counters.dropped();
                shared.drops.dropped(why);
                Recorded::Dropped(match why {
                    Refused::Full => DropReason::QueueFull,
                    Refused::Closed => DropReason::ShutDown,
                })
            }
        }
    }

    /// Sends everything recorded before this call — what is queued, and batches waiting to be
    /// retried (their backoff is cut short; a server's `Retry-After` still holds) — and waits
    /// until each of those events is settled (accepted, duplicate, conflict or rejected, its
    /// callback called), for at most `deadline`.
    ///
    /// On time: `Ok`. Otherwise [`FlushError::TimedOut`] with how many of those events are
    /// not settled; they stay queued or in flight and are sent later. Events recorded during
    /// the flush are not waited for.
    ///
    /// In AWS Lambda call it before the handler returns: a frozen container runs no
    /// background task between invocations.
    pub async fn flush(&self, deadline: Duration) -> Result<(), FlushError> {
        let shared = &self.inner.shared;
        let until = Instant::now() + deadline;
        let mut progress = shared.in_flight.subscribe();
        let target = shared.request_flush();
        loop {
            let unsent = shared.queue.unsettled_before(target, &shared.in_flight);
            if unsent == 0 {
                return Ok(());
            }
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() {
                        return Err(FlushError::TimedOut { unsent });
                    }
                }
                () = sleep_until(until) => {
                    let unsent = shared.queue.unsettled_before(target, &shared.in_flight);
                    return if unsent == 0 { Ok(()) } else { Err(FlushError::TimedOut { unsent }) };
                }
            }
        }
    }

    /// Flushes for at most `deadline`, then stops the background task: what is still unsent
    /// then is abandoned (counted in [`Stats::abandoned`], passed to the callback as
    /// [`Status::Abandoned`](crate::Status::Abandoned)) and reported as
    /// [`FlushError::TimedOut`]. Every later `record` is dropped and counted; the request
    /// methods keep working. Calling it again does nothing more.
    pub async fn shutdown(&self, deadline: Duration) -> Result<(), FlushError> {
        let shared = &self.inner.shared;
        shared.close(Instant::now() + deadline);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let abandoned = match task {
            Some(task) => task.await.unwrap_or(0),
            None => 0,
        };
        if abandoned == 0 {
            Ok(())
        } else {
            Err(FlushError::TimedOut { unsent: abandoned })
        }
    }

    /// The counters now (each read atomically; see [`Stats`]).
    pub fn stats(&self) -> Stats {
        let shared = &self.inner.shared;
        shared
            .counters
            .snapshot(shared.queue.len() as u64, shared.in_flight.len())
    }
}
