//! `threading`: a bounded pool of worker threads in the host process, as
//! Python's `ThreadingMixIn` but with a limit. At most `limit` connections are
//! in flight (by default one running and one queued per worker); beyond that
//! the accept loop stops accepting.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use threadpool::ThreadPool;

use super::Strategy;
use crate::connection::{Accepted, Service};
use crate::server::Wake;

pub struct Threading {
    service: Arc<Service>,
    pool: ThreadPool,
    slots: Arc<Slots>,
    /// Put before `thread-N` in worker names (prefork: `pid-4711/`).
    name_prefix: Arc<str>,
}

/// The in-flight count, shared with the workers.
struct Slots {
    in_flight: AtomicUsize,
    limit: usize,
    /// Set once the accept loop has stopped: every release rings then.
    draining: AtomicBool,
    wake: Wake,
}

impl Threading {
    pub fn new(
        service: Arc<Service>,
        workers: usize,
        limit: usize,
        wake: Wake,
        name_prefix: &str,
    ) -> Threading {
        Threading {
            name_prefix: name_prefix.into(),
            service,
            pool: threadpool::Builder::new()
                .num_threads(workers)
                .thread_name("host-worker".to_string())
                .build(),
            slots: Arc::new(Slots {
                in_flight: AtomicUsize::new(0),
                limit,
                draining: AtomicBool::new(false),
                wake,
            }),
        }
    }
}

/// Frees the connection's slot even if serving it panicked.
struct Slot(Arc<Slots>, Arc<Service>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(metrics) = self.1.metrics() {
            metrics.connection_ended();
        }
        let slots = &self.0;
        let was = slots.in_flight.fetch_sub(1, Ordering::SeqCst);
        // The accept loop may be waiting for this slot, or draining.
        if was == slots.limit || slots.draining.load(Ordering::SeqCst) {
            slots.wake.wake();
        }
    }
}

thread_local! {
    static WORKER_NAME: OnceCell<String> = const { OnceCell::new() };
}

/// "thread-N" after `prefix`, N counting the pool's threads from 1 in the
/// order they first serve a connection.
fn worker_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    WORKER_NAME.with(|name| {
        name.get_or_init(|| format!("{prefix}thread-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            .clone()
    })
}

impl Strategy for Threading {
    fn has_capacity(&self) -> bool {
        self.slots.in_flight.load(Ordering::SeqCst) < self.slots.limit
    }

    fn dispatch(&mut self, conn: Accepted) {
        self.slots.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Some(metrics) = self.service.metrics() {
            metrics.connection_started();
        }
        let slot = Slot(self.slots.clone(), self.service.clone());
        let service = self.service.clone();
        let prefix = self.name_prefix.clone();
        self.pool.execute(move || {
            let _slot = slot;
            let id = conn.id;
            let worker = worker_name(&prefix);
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                service.serve(conn, &worker);
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
        self.slots.in_flight.load(Ordering::SeqCst)
    }

    fn stop_accepting(&mut self) {
        self.slots.draining.store(true, Ordering::SeqCst);
    }

    fn abort(&mut self) {
        self.service.abort_all();
    }

    fn finish(&mut self) {
        self.pool.join();
    }
}
