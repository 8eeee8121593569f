//! `async`: the tenant's worker process runs a tokio runtime; each
//! connection is a task and each guest runs on a fiber (wasmtime's async
//! support), so a guest waiting for its client, a timer or its turn costs a
//! suspended fiber, not a thread. This is how `wasmtime serve` runs
//! handlers; here it keeps the host's limits, tenants, reload and metrics,
//! since every connection still goes through [`Service::serve_async`].
//!
//! The accept loop stays the one of every strategy (`server::run`, on the
//! process's main thread) and hands each connection to the runtime.
//! Fairness: at every epoch tick a running guest yields its runtime thread
//! (see `EpochClock::Yield`), so a guest that spins delays the others by a
//! tick, not by its whole `--timeout`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::slots::Slots;
use super::Strategy;
use crate::conn::service::{Accepted, Service};
use crate::shutdown::Wake;

/// How long `finish` waits for the tasks that `abort` ended.
const FINISH_BOUND: Duration = Duration::from_secs(5);

pub(crate) struct Async {
    service: Arc<Service>,
    slots: Arc<Slots>,
    /// `connection-info.worker` of every connection: `pid-4711/async`.
    worker: Arc<str>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Async {
    /// A runtime of `threads` threads serving at most `limit` connections at
    /// once. Made before the accept loop starts: a worker that cannot have
    /// its runtime ends, and its supervisor replaces it.
    pub(crate) fn new(
        service: Arc<Service>,
        threads: usize,
        limit: usize,
        wake: Wake,
    ) -> Result<Async> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            // A guest that spins runs a whole epoch tick (0.5 ms) per poll:
            // look at new connections (the inject queue) and at the
            // sockets (the I/O driver) every few polls, not every 61, or a
            // new client waits behind 61 ticks of spinning guests.
            .global_queue_interval(4)
            .event_interval(4)
            .thread_name("host-async")
            // The blocking pool only trims the allocator after a burst.
            .thread_keep_alive(Duration::from_secs(2))
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        Ok(Async {
            service,
            slots: Slots::new(limit, wake, true),
            worker: format!("pid-{}/async", std::process::id()).into(),
            runtime: Some(runtime),
        })
    }
}

impl Strategy for Async {
    fn has_capacity(&self) -> bool {
        self.slots.has_capacity()
    }

    fn dispatch(&mut self, conn: Accepted) {
        let Some(runtime) = &self.runtime else {
            return;
        };
        let slot = self.slots.take(&self.service);
        let service = self.service.clone();
        let worker = self.worker.clone();
        runtime.spawn(async move {
            let _slot = slot;
            let id = conn.id;
            let served = CatchUnwind(Box::pin(crate::conn::dispatch::serve_async(
                &service, conn, &worker,
            )))
            .await;
            if served.is_err() {
                tracing::error!("connection {id} worker={worker}: the host panicked serving it");
            }
        });
    }

    fn service(&self) -> &Service {
        &self.service
    }

    fn maintain(&mut self) {}

    fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    fn stop_accepting(&mut self) {
        self.slots.stop_accepting();
    }

    fn abort(&mut self) {
        self.service.abort_all();
    }

    fn finish(&mut self) {
        // Every task ends soon after `abort`: guests trap at their next
        // tick and every wait ends with its socket. One stuck in a host call
        // that never returns (a guest's file read on a hung filesystem) is
        // not waited for beyond a bound: the runtime is shut down under it.
        let deadline = std::time::Instant::now() + FINISH_BOUND;
        while self.slots.in_flight() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.slots.in_flight() > 0 {
            tracing::warn!(
                "tenant {}: {} connection(s) still running {FINISH_BOUND:?} after the drain; stopping the runtime under them",
                self.service.tenant(),
                self.slots.in_flight()
            );
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Resolves to `Err` instead of unwinding if polling the future panics, so
/// a host bug while serving one connection is logged as such.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(_) => Poll::Ready(Err(())),
        }
    }
}
