//! `threading`: every connection runs at once on a thread of its own, as
//! Python's `ThreadingMixIn` promises, up to `--max-connections` in flight;
//! beyond that the accept loop stops accepting. Threads are reused
//! ([`Pool`]): `--workers` of them are kept warm, the rest exit once idle.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::pool::Pool;
use super::slots::Slots;
use super::Strategy;
use crate::conn::service::{Accepted, Service};
use crate::shutdown::Wake;

pub(crate) struct Threading {
    service: Arc<Service>,
    pool: Pool,
    slots: Arc<Slots>,
    /// Put before `thread-N` in worker names (prefork: `pid-4711/`).
    name_prefix: Arc<str>,
    /// The reactor and timers of this process's guests (see `new`); dropped
    /// after the pool.
    _runtime: tokio::runtime::Runtime,
}

thread_local! {
    static WORKER_NAME: OnceCell<Arc<str>> = const { OnceCell::new() };
}

/// "thread-N" after `prefix`, N counting this process's threads from 1 in
/// the order they first serve a connection. Made once per thread; each
/// connection shares it.
fn worker_name(prefix: &str) -> Arc<str> {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    WORKER_NAME.with(|name| {
        name.get_or_init(|| {
            format!("{prefix}thread-{}", NEXT.fetch_add(1, Ordering::Relaxed)).into()
        })
        .clone()
    })
}

impl Threading {
    /// Keeps `warm` threads and serves at most `limit` connections at once.
    ///
    /// The process's tokio runtime (one thread: the reactor for pollables,
    /// the timers for sleeps) is made here, before anything is accepted,
    /// and every pool thread enters it. wasmtime-wasi would otherwise build
    /// its own lazily at the first connection, and a failure then (out of
    /// descriptors) would poison it for the life of the process; here a
    /// failure ends the worker, and its supervisor replaces it.
    pub(crate) fn new(
        service: Arc<Service>,
        warm: usize,
        limit: usize,
        wake: Wake,
        name_prefix: &str,
    ) -> Result<Threading> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("host-reactor")
            .enable_all()
            .build()
            .context("cannot start the worker's tokio runtime")?;
        let handle = runtime.handle().clone();
        let enter: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            // The guard stays for the life of the thread.
            std::mem::forget(handle.enter());
        });
        Ok(Threading {
            name_prefix: name_prefix.into(),
            service,
            pool: Pool::new(warm, "host-worker", Some(enter)),
            slots: Slots::new(limit, wake, false),
            _runtime: runtime,
        })
    }
}

impl Strategy for Threading {
    fn has_capacity(&self) -> bool {
        self.slots.has_capacity()
    }

    fn dispatch(&mut self, conn: Accepted) {
        let slot = self.slots.take(&self.service);
        let service = self.service.clone();
        let prefix = self.name_prefix.clone();
        self.pool.execute(move || {
            let _slot = slot;
            let id = conn.id;
            let worker = worker_name(&prefix);
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::conn::dispatch::serve(&service, conn, &worker);
            }));
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
        self.pool.join();
    }
}
