//! `threading`: a bounded pool of worker threads in the host process, as
//! Python's `ThreadingMixIn` but with a limit. At most two connections per
//! worker are in flight (one running, one queued); beyond that the accept
//! loop stops accepting.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use threadpool::ThreadPool;

use super::Strategy;
use crate::connection::{Accepted, Service};
use crate::server::Wake;

pub struct Threading {
    service: Arc<Service>,
    pool: ThreadPool,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    wake: Wake,
}

impl Threading {
    pub fn new(service: Arc<Service>, workers: usize, wake: Wake) -> Threading {
        Threading {
            service,
            pool: threadpool::Builder::new()
                .num_threads(workers)
                .thread_name("host-worker".to_string())
                .build(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            limit: workers * 2,
            wake,
        }
    }
}

/// Frees the connection's slot even if serving it panicked.
struct Slot {
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    wake: Wake,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == self.limit {
            // The accept loop may be waiting for this slot.
            self.wake.wake();
        }
    }
}

thread_local! {
    static WORKER_NAME: OnceCell<String> = const { OnceCell::new() };
}

/// "thread-N", N counting the pool's threads from 1 in the order they first
/// serve a connection.
fn worker_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    WORKER_NAME.with(|name| {
        name.get_or_init(|| format!("thread-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            .clone()
    })
}

impl Strategy for Threading {
    fn has_capacity(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) < self.limit
    }

    fn dispatch(&mut self, conn: Accepted) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let slot = Slot {
            in_flight: self.in_flight.clone(),
            limit: self.limit,
            wake: self.wake.clone(),
        };
        let service = self.service.clone();
        self.pool.execute(move || {
            let _slot = slot;
            let id = conn.id;
            let worker = worker_name();
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                service.serve(conn, &worker);
            }));
            if served.is_err() {
                tracing::error!("connection {id} worker={worker}: the host panicked serving it");
            }
        });
    }

    fn maintain(&mut self) {}

    fn finish(&mut self) {
        self.pool.join();
    }
}
