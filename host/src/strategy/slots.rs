//! The in-flight count of a strategy that serves connections inside this
//! process (threading, async): the accept loop takes a slot per connection,
//! and the slot is given back when the connection ends, even if serving it
//! panicked.
//!
//! When the last connection of a burst ends, the process gives the memory
//! its allocator kept from the burst back to the system, so memory follows
//! what is live, not what was live once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::conn::service::Service;
use crate::metrics::InFlight;
use crate::shutdown::Wake;

/// Connections in flight, shared with whatever serves them.
pub(crate) struct Slots {
    in_flight: AtomicUsize,
    limit: usize,
    /// Set once the accept loop has stopped: every release rings then.
    draining: AtomicBool,
    wake: Wake,
    /// The most connections in flight since the allocator was last trimmed.
    peak: AtomicUsize,
    /// Connections end on an async runtime's threads: trim on its blocking
    /// pool, not on a thread that runs guests.
    trim_off_thread: bool,
}

/// A burst this large leaves the allocator's free lists worth trimming once
/// it is over (a few MiB: each connection allocates tens of KiB).
const TRIM_AFTER: usize = 64;

impl Slots {
    /// `trim_off_thread`: connections end on an async runtime's threads.
    pub(crate) fn new(limit: usize, wake: Wake, trim_off_thread: bool) -> Arc<Slots> {
        Arc::new(Slots {
            in_flight: AtomicUsize::new(0),
            limit,
            draining: AtomicBool::new(false),
            wake,
            peak: AtomicUsize::new(0),
            trim_off_thread,
        })
    }

    pub(crate) fn has_capacity(&self) -> bool {
        self.in_flight() < self.limit
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// From now on every release rings the accept loop's doorbell.
    pub(crate) fn stop_accepting(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Takes a slot for a connection of `service`; it is given back when the
    /// returned value is dropped.
    pub(crate) fn take(self: &Arc<Slots>, service: &Arc<Service>) -> Slot {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Slot(self.clone(), service.in_flight())
    }
}

/// One connection's slot, freed on drop, and its place in the tenant's
/// in-flight gauge.
pub(crate) struct Slot(Arc<Slots>, Option<InFlight>);

impl Drop for Slot {
    fn drop(&mut self) {
        // Out of the gauge before the slot is given back, as it entered it
        // after the slot was taken.
        drop(self.1.take());
        let slots = &self.0;
        let was = slots.in_flight.fetch_sub(1, Ordering::SeqCst);
        // The accept loop may be waiting for this slot, or draining.
        if was == slots.limit || slots.draining.load(Ordering::SeqCst) {
            slots.wake.wake();
        }
        if was == 1 && slots.peak.load(Ordering::Relaxed) >= TRIM_AFTER {
            slots.peak.store(0, Ordering::Relaxed);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) if slots.trim_off_thread => {
                    runtime.spawn_blocking(crate::sys::resources::trim_allocator);
                }
                _ => crate::sys::resources::trim_allocator(),
            }
        }
    }
}
