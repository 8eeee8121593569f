//! The shared counters: one anonymous shared mapping holding a [`Header`] of
//! host-wide counters and a [`Slot`] of counters per tenant, updated with
//! atomics by whichever process serves a connection. See the module above
//! for why this works across `fork()`.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::health::Readiness;
use crate::outcome::Outcome;
use crate::sys::shm::SharedMapping;

/// Upper bounds of the connection duration buckets, in microseconds
/// (0.001 s to 60 s).
pub(super) const DURATION_BOUNDS_US: [u64; 14] = [
    1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Upper bounds of the peak instance memory buckets, in bytes: powers of 4
/// from 64 KiB to 4 GiB.
pub(super) const MEMORY_BOUNDS: [u64; 9] = [
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
    4 << 30,
];

/// The host-wide counters at the start of the mapping. Aligned to a cache
/// line, so the tenant slots after it are too.
#[repr(C, align(64))]
pub(super) struct Header {
    /// Reload attempts: `[ok, failed]`.
    pub(super) reloads: [AtomicU64; 2],
    /// The host process's readiness (`Readiness::code`; zero: starting).
    pub(super) readiness: AtomicU64,
}

/// One tenant's counters. Histogram buckets are per bucket (not cumulative),
/// the last one counting what is above every bound; a histogram's count is
/// the sum of its buckets, so `_count` always equals the `+Inf` bucket.
#[repr(C, align(64))]
pub(super) struct Slot {
    pub(super) outcomes: [AtomicU64; Outcome::ALL.len()],
    pub(super) in_flight: AtomicI64,
    pub(super) received: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) duration_buckets: [AtomicU64; DURATION_BOUNDS_US.len() + 1],
    pub(super) duration_sum_us: AtomicU64,
    pub(super) memory_buckets: [AtomicU64; MEMORY_BOUNDS.len() + 1],
    pub(super) memory_sum: AtomicU64,
    /// Guests' outbound connects: `[opened, refused]`.
    pub(super) outbound: [AtomicU64; 2],
    /// HTTP requests (`wasi:http/proxy` handlers) by status class, 1xx to 5xx.
    pub(super) http_status: [AtomicU64; 5],
    pub(super) http_duration_buckets: [AtomicU64; DURATION_BOUNDS_US.len() + 1],
    pub(super) http_duration_sum_us: AtomicU64,
}

/// The shared mapping: a [`Header`] followed by `max_tenants` [`Slot`]s.
/// Both hold only atomics, so every access to them is thread- and
/// process-safe; the memory is unmapped once, when the last Arc goes.
pub(super) struct Mapping {
    memory: SharedMapping,
    pub(super) max_tenants: usize,
}

impl Mapping {
    fn new(max_tenants: usize) -> Result<Mapping> {
        let len = max_tenants
            .checked_mul(std::mem::size_of::<Slot>())
            .and_then(|slots| slots.checked_add(std::mem::size_of::<Header>()))
            .context("too many tenant slots for the metrics mapping")?;
        let memory = SharedMapping::new(len)
            .with_context(|| format!("cannot map {len} bytes for the metrics"))?;
        Ok(Mapping {
            memory,
            max_tenants,
        })
    }

    pub(super) fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header: it is page-aligned (more
        // than Header's 64), at least `size_of::<Header>()` long, zero-filled
        // (all zeros is a valid AtomicU64) and lives as long as `self`.
        unsafe { &*self.memory.base().as_ptr().cast::<Header>() }
    }

    pub(super) fn slot(&self, slot: usize) -> &Slot {
        assert!(
            slot < self.max_tenants,
            "tenant slot {slot} out of range (the metrics have {} slots)",
            self.max_tenants
        );
        // SAFETY: slot < max_tenants, so the Slot lies inside the mapping
        // (see `new`); it is 64-aligned because the mapping is page-aligned
        // and Header and Slot are multiples of 64 bytes; all zeros is a valid
        // value of every atomic in it; it lives as long as `self`.
        unsafe {
            &*self
                .memory
                .base()
                .as_ptr()
                .add(std::mem::size_of::<Header>())
                .cast::<Slot>()
                .add(slot)
        }
    }
}

/// The metrics of the whole host, in shared memory. Create it before any
/// `fork()`; clones (and copies inherited by forked children) share the same
/// counters.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub(super) map: Arc<Mapping>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("max_tenants", &self.max_tenants())
            .finish_non_exhaustive()
    }
}

/// A tenant as the page names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TenantInfo {
    pub(crate) name: String,
    /// Its slot in [`Metrics`].
    pub(crate) slot: usize,
    /// The handler's SHA-256 in hex, or `builtin-echo`.
    pub(crate) digest: String,
    pub(crate) strategy: String,
}

/// The duration bucket of `duration`. Buckets are `le` (inclusive);
/// compare in nanoseconds so that 1.0004 ms does not land in the 1 ms
/// bucket.
fn duration_bucket(duration: Duration) -> usize {
    let nanos = duration.as_nanos();
    DURATION_BOUNDS_US
        .iter()
        .position(|bound| nanos <= u128::from(*bound) * 1_000)
        .unwrap_or(DURATION_BOUNDS_US.len())
}

/// The counters of one tenant slot.
#[derive(Clone)]
pub(crate) struct TenantMetrics {
    map: Arc<Mapping>,
    slot: usize,
}

impl fmt::Debug for TenantMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantMetrics")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh zeroed mapping with room for `max_tenants` tenant slots.
    pub(crate) fn new(max_tenants: usize) -> Result<Metrics> {
        Ok(Metrics {
            map: Arc::new(Mapping::new(max_tenants)?),
        })
    }

    pub(crate) fn max_tenants(&self) -> usize {
        self.map.max_tenants
    }

    /// The counters of tenant slot `slot` (< max_tenants, else panic).
    pub(crate) fn tenant(&self, slot: usize) -> TenantMetrics {
        self.map.slot(slot);
        TenantMetrics {
            map: Arc::clone(&self.map),
            slot,
        }
    }

    /// Counts one reload attempt (host-wide), by result.
    pub(crate) fn reloaded(&self, ok: bool) {
        let index = if ok { 0 } else { 1 };
        self.map.header().reloads[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The host process says how ready it is (`GET /readyz`). SeqCst: once
    /// this returns, every later `/readyz` answer in any process says it.
    pub(crate) fn set_readiness(&self, readiness: Readiness) {
        self.map
            .header()
            .readiness
            .store(readiness.code(), Ordering::SeqCst);
    }

    /// What the host process last said of its readiness.
    pub(crate) fn readiness(&self) -> Readiness {
        Readiness::from_code(self.map.header().readiness.load(Ordering::SeqCst))
    }
}

impl TenantMetrics {
    fn slot(&self) -> &Slot {
        self.map.slot(self.slot)
    }

    /// A connection was accepted and handed to a worker: the in-flight
    /// gauge counts it until the returned guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.slot().in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The connections in flight now and those finished so far (every
    /// outcome), for a one-line status.
    pub(crate) fn counts(&self) -> (i64, u64) {
        let slot = self.slot();
        let finished = slot
            .outcomes
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .sum();
        (slot.in_flight.load(Ordering::Relaxed).max(0), finished)
    }

    /// How one connection ended. `peak_memory` is the instance's peak memory
    /// in bytes (None when no instance was created, e.g. denied).
    ///
    /// Does not allocate: safe in a child forked from a multi-threaded
    /// process.
    pub(crate) fn record(
        &self,
        outcome: Outcome,
        bytes_in: u64,
        bytes_out: u64,
        duration: Duration,
        peak_memory: Option<u64>,
    ) {
        let slot = self.slot();
        slot.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        slot.received.fetch_add(bytes_in, Ordering::Relaxed);
        slot.sent.fetch_add(bytes_out, Ordering::Relaxed);

        slot.duration_buckets[duration_bucket(duration)].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        slot.duration_sum_us.fetch_add(micros, Ordering::Relaxed);

        if let Some(peak) = peak_memory {
            let bucket = MEMORY_BOUNDS
                .iter()
                .position(|bound| peak <= *bound)
                .unwrap_or(MEMORY_BOUNDS.len());
            slot.memory_buckets[bucket].fetch_add(1, Ordering::Relaxed);
            slot.memory_sum.fetch_add(peak, Ordering::Relaxed);
        }
    }

    /// One HTTP request's status (counted by class; anything outside
    /// 100..=599 as 5xx) and its duration, from its head to its last byte.
    pub(crate) fn record_request(&self, status: u16, duration: Duration) {
        let slot = self.slot();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        slot.http_status[class].fetch_add(1, Ordering::Relaxed);
        slot.http_duration_buckets[duration_bucket(duration)].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        slot.http_duration_sum_us
            .fetch_add(micros, Ordering::Relaxed);
    }
}

impl TenantMetrics {
    /// A guest's outbound connect the grants allowed (`opened`) or refused.
    /// Does not allocate.
    pub(crate) fn outbound(&self, opened: bool) {
        let index = if opened { 0 } else { 1 };
        self.slot().outbound[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// One connection in its tenant's in-flight gauge: taken when the connection
/// is handed to whatever serves it, dropped when it is over (its thread or
/// task ends, or the forking parent reaps its child), however that happens.
pub(crate) struct InFlight(TenantMetrics);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.slot().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_as_starting_and_is_shared() {
        let metrics = Metrics::new(1).unwrap();
        assert_eq!(metrics.readiness(), Readiness::Starting);
        let copy = metrics.clone();
        for state in [Readiness::Ready, Readiness::NoWorker, Readiness::Draining] {
            metrics.set_readiness(state);
            assert_eq!(copy.readiness(), state);
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn tenant_slot_out_of_range_panics() {
        Metrics::new(2).unwrap().tenant(2);
    }

    #[test]
    fn http_requests_by_status_class_and_duration() {
        let metrics = Metrics::new(2).unwrap();
        let http = metrics.tenant(1);
        for (status, ms) in [
            (200, 1),
            (204, 3),
            (404, 2),
            (500, 40),
            (504, 1000),
            (99, 1),
        ] {
            http.record_request(status, Duration::from_millis(ms));
        }
        let info = |name: &str, slot| TenantInfo {
            name: name.to_string(),
            slot,
            digest: "builtin-echo".to_string(),
            strategy: "threading".to_string(),
        };
        let page = metrics.render(&[info("raw", 0), info("web", 1)]);
        let has = |line: &str| page.lines().any(|l| l == line);
        for (class, n) in [("1xx", 1), ("2xx", 2), ("3xx", 0), ("4xx", 1), ("5xx", 2)] {
            let line = format!("host_http_requests_total{{tenant=\"web\",class=\"{class}\"}} {n}");
            assert!(has(&line), "{line}\n{page}");
        }
        assert!(
            has(r#"host_http_request_duration_seconds_count{tenant="web"} 6"#),
            "{page}"
        );
        assert!(
            has(r#"host_http_request_duration_seconds_bucket{tenant="web",le="0.001"} 2"#),
            "{page}"
        );
        assert!(
            has(r#"host_http_request_duration_seconds_bucket{tenant="web",le="0.05"} 5"#),
            "{page}"
        );
        // A tenant with no HTTP request has no HTTP series.
        assert!(
            !page.contains(r#"host_http_requests_total{tenant="raw""#),
            "{page}"
        );
    }
}
