//! Per-tenant Prometheus metrics that stay exact across forked processes: the
//! counters live in one anonymous shared mapping, updated with atomics by
//! whichever process serves a connection, and are rendered (and served over
//! HTTP) by the metrics process.
//!
//! The mapping is created once, before any `fork()`, so every tenant process,
//! every forked per-connection child and the metrics process see the same
//! counters. Updates are single atomic read-modify-writes on 64-bit values
//! (lock-free, hence address-free, so they work between processes) and never
//! allocate, so they are safe in a child forked from a multi-threaded parent.
//!
//! The page is written by `prometheus-client` in the Prometheus text format
//! 0.0.4 ([`CONTENT_TYPE`]), the format `promtool check metrics` accepts: its
//! OpenMetrics text (`info` type, `# UNIT`, counters named without `_total`)
//! is rejected or warned about by promtool.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The outcomes a connection can end with, in label order.
pub const OUTCOMES: [&str; 10] = [
    "ok",
    "handler-error",
    "trap",
    "memory-limit",
    "timeout",
    "idle-timeout",
    "client-reset",
    "shutdown",
    "host-error",
    "denied",
];

/// Where an unknown outcome is counted.
const HOST_ERROR: usize = 8;
const _: () = assert!(matches!(OUTCOMES[HOST_ERROR].as_bytes(), b"host-error"));

/// The `Content-Type` of the page [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds of the connection duration buckets, in microseconds
/// (0.001 s to 60 s).
const DURATION_BOUNDS_US: [u64; 14] = [
    1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Upper bounds of the peak instance memory buckets, in bytes: powers of 4
/// from 64 KiB to 4 GiB.
const MEMORY_BOUNDS: [u64; 9] = [
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
struct Header {
    /// Reload attempts: `[ok, failed]`.
    reloads: [AtomicU64; 2],
}

/// One tenant's counters. Histogram buckets are per bucket (not cumulative),
/// the last one counting what is above every bound; a histogram's count is
/// the sum of its buckets, so `_count` always equals the `+Inf` bucket.
#[repr(C, align(64))]
struct Slot {
    outcomes: [AtomicU64; OUTCOMES.len()],
    in_flight: AtomicI64,
    received: AtomicU64,
    sent: AtomicU64,
    duration_buckets: [AtomicU64; DURATION_BOUNDS_US.len() + 1],
    duration_sum_us: AtomicU64,
    memory_buckets: [AtomicU64; MEMORY_BOUNDS.len() + 1],
    memory_sum: AtomicU64,
}

/// The shared mapping: a [`Header`] followed by `max_tenants` [`Slot`]s.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    max_tenants: usize,
}

// SAFETY: the mapping holds only atomics, and is only ever accessed through
// shared references to them; it is unmapped once, when the last Arc goes.
unsafe impl Send for Mapping {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(max_tenants: usize) -> Result<Mapping> {
        let len = max_tenants
            .checked_mul(std::mem::size_of::<Slot>())
            .and_then(|slots| slots.checked_add(std::mem::size_of::<Header>()))
            .context("too many tenant slots for the metrics mapping")?;
        // SAFETY: a fresh anonymous shared mapping; no existing memory is
        // touched. The kernel zero-fills it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("cannot map {len} bytes for the metrics"));
        }
        let base = NonNull::new(base.cast::<u8>()).context("mmap returned null")?;
        Ok(Mapping {
            base,
            len,
            max_tenants,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header: it is page-aligned (more
        // than Header's 64), at least `size_of::<Header>()` long, zero-filled
        // (all zeros is a valid AtomicU64) and lives as long as `self`.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn slot(&self, slot: usize) -> &Slot {
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
                .base
                .as_ptr()
                .add(std::mem::size_of::<Header>())
                .cast::<Slot>()
                .add(slot)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once; no reference into it
        // outlives `self` (they all borrow from it).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The metrics of the whole host, in shared memory. Create it before any
/// `fork()`; clones (and copies inherited by forked children) share the same
/// counters.
#[derive(Clone)]
pub struct Metrics {
    map: Arc<Mapping>,
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
pub struct TenantInfo {
    pub name: String,
    /// Its slot in [`Metrics`].
    pub slot: usize,
    /// The handler's SHA-256 in hex, or `builtin-echo`.
    pub digest: String,
    pub strategy: String,
}

/// The counters of one tenant slot.
#[derive(Clone)]
pub struct TenantMetrics {
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
    pub fn new(max_tenants: usize) -> Result<Metrics> {
        Ok(Metrics {
            map: Arc::new(Mapping::new(max_tenants)?),
        })
    }

    pub fn max_tenants(&self) -> usize {
        self.map.max_tenants
    }

    /// The counters of tenant slot `slot` (< max_tenants, else panic).
    pub fn tenant(&self, slot: usize) -> TenantMetrics {
        self.map.slot(slot);
        TenantMetrics {
            map: Arc::clone(&self.map),
            slot,
        }
    }

    /// Counts one reload attempt (host-wide), by result.
    pub fn reloaded(&self, ok: bool) {
        let index = if ok { 0 } else { 1 };
        self.map.header().reloads[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The whole page in the text format, for the given tenants (only these
    /// are shown; one whose slot is out of range is left out).
    pub fn render(&self, tenants: &[TenantInfo]) -> String {
        let header = self.map.header();
        let page = Page {
            reloads: [
                header.reloads[0].load(Ordering::Relaxed),
                header.reloads[1].load(Ordering::Relaxed),
            ],
            tenants: tenants
                .iter()
                .filter(|info| info.slot < self.map.max_tenants)
                .map(|info| (info.clone(), Snapshot::of(self.map.slot(info.slot))))
                .collect(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(page));
        let mut text = String::new();
        // Writing to a String cannot fail, and the collector only passes on
        // the writer's errors.
        if let Err(e) = prometheus_text::encode(&mut text, &registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        text
    }
}

impl TenantMetrics {
    fn slot(&self) -> &Slot {
        self.map.slot(self.slot)
    }

    /// A connection was accepted and handed to a worker (in-flight gauge +1).
    pub fn connection_started(&self) {
        self.slot().in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// That connection is over (in-flight gauge -1).
    pub fn connection_ended(&self) {
        self.slot().in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// How one connection ended. `outcome` is one of [`OUTCOMES`] (an unknown
    /// one counts as `host-error`). `peak_memory` is the instance's peak
    /// memory in bytes (None when no instance was created, e.g. denied).
    ///
    /// Does not allocate: safe in a child forked from a multi-threaded
    /// process.
    pub fn record(
        &self,
        outcome: &str,
        bytes_in: u64,
        bytes_out: u64,
        duration: Duration,
        peak_memory: Option<u64>,
    ) {
        let slot = self.slot();
        let outcome = OUTCOMES
            .iter()
            .position(|known| *known == outcome)
            .unwrap_or(HOST_ERROR);
        slot.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
        slot.received.fetch_add(bytes_in, Ordering::Relaxed);
        slot.sent.fetch_add(bytes_out, Ordering::Relaxed);

        // Buckets are `le` (inclusive); compare in nanoseconds so that
        // 1.0004 ms does not land in the 1 ms bucket.
        let nanos = duration.as_nanos();
        let bucket = DURATION_BOUNDS_US
            .iter()
            .position(|bound| nanos <= u128::from(*bound) * 1_000)
            .unwrap_or(DURATION_BOUNDS_US.len());
        slot.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
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
}

/// One tenant's counters, read at render time.
#[derive(Debug)]
struct Snapshot {
    outcomes: [u64; OUTCOMES.len()],
    in_flight: i64,
    received: u64,
    sent: u64,
    duration_buckets: [u64; DURATION_BOUNDS_US.len() + 1],
    duration_sum_us: u64,
    memory_buckets: [u64; MEMORY_BOUNDS.len() + 1],
    memory_sum: u64,
}

impl Snapshot {
    fn of(slot: &Slot) -> Snapshot {
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        Snapshot {
            outcomes: slot.outcomes.each_ref().map(load),
            in_flight: slot.in_flight.load(Ordering::Relaxed),
            received: load(&slot.received),
            sent: load(&slot.sent),
            duration_buckets: slot.duration_buckets.each_ref().map(load),
            duration_sum_us: load(&slot.duration_sum_us),
            memory_buckets: slot.memory_buckets.each_ref().map(load),
            memory_sum: load(&slot.memory_sum),
        }
    }
}

/// The values of one page, handed to `prometheus-client` as a collector.
#[derive(Debug)]
struct Page {
    reloads: [u64; 2],
    tenants: Vec<(TenantInfo, Snapshot)>,
}

/// A histogram's `(upper bound, count in that bucket)` pairs (not
/// cumulative: the encoder sums them), with the bounds scaled by `scale`.
fn buckets(bounds: &[u64], counts: &[u64], scale: f64) -> Vec<(f64, u64)> {
    bounds
        .iter()
        .zip(counts)
        .map(|(bound, count)| (*bound as f64 / scale, *count))
        .collect()
}

impl Page {
    /// One counter per tenant, from `value`.
    fn tenant_counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&Snapshot) -> u64,
    ) -> fmt::Result {
        let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (info, snapshot) in &self.tenants {
            let labels = [("tenant", info.name.as_str())];
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&value(snapshot), None)?;
        }
        Ok(())
    }
}

impl Collector for Page {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if !self.tenants.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "host_handler",
                "The handler each tenant serves with: its SHA-256 (or builtin-echo) and strategy.",
                None,
                MetricType::Info,
            )?;
            for (info, _) in &self.tenants {
                let labels = [
                    ("tenant", info.name.as_str()),
                    ("digest", info.digest.as_str()),
                    ("strategy", info.strategy.as_str()),
                ];
                metric.encode_info(&labels)?;
            }

            let mut metric = encoder.encode_descriptor(
                "host_connections",
                "Connections served, by how they ended.",
                None,
                MetricType::Counter,
            )?;
            for (info, snapshot) in &self.tenants {
                for (outcome, count) in OUTCOMES.iter().zip(snapshot.outcomes) {
                    let labels = [("tenant", info.name.as_str()), ("outcome", *outcome)];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }

            let mut metric = encoder.encode_descriptor(
                "host_connections_in_flight",
                "Connections accepted and not yet over.",
                None,
                MetricType::Gauge,
            )?;
            for (info, snapshot) in &self.tenants {
                let labels = [("tenant", info.name.as_str())];
                metric
                    .encode_family(&labels)?
                    .encode_gauge(&snapshot.in_flight)?;
            }

            self.tenant_counter(
                &mut encoder,
                "host_received",
                "Bytes received from clients.",
                Some(&Unit::Bytes),
                |snapshot| snapshot.received,
            )?;
            self.tenant_counter(
                &mut encoder,
                "host_sent",
                "Bytes sent to clients.",
                Some(&Unit::Bytes),
                |snapshot| snapshot.sent,
            )?;

            let mut metric = encoder.encode_descriptor(
                "host_connection_duration",
                "How long connections lasted, from accept to close.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (info, snapshot) in &self.tenants {
                let labels = [("tenant", info.name.as_str())];
                let counts = &snapshot.duration_buckets;
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        snapshot.duration_sum_us as f64 / 1e6,
                        counts.iter().sum(),
                        &buckets(&DURATION_BOUNDS_US, counts, 1e6),
                        None,
                    )?;
            }

            let mut metric = encoder.encode_descriptor(
                "host_instance_memory_peak",
                "Peak memory (all memories and tables) of each instance.",
                Some(&Unit::Bytes),
                MetricType::Histogram,
            )?;
            for (info, snapshot) in &self.tenants {
                let labels = [("tenant", info.name.as_str())];
                let counts = &snapshot.memory_buckets;
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        snapshot.memory_sum as f64,
                        counts.iter().sum(),
                        &buckets(&MEMORY_BOUNDS, counts, 1.0),
                        None,
                    )?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "host_reloads",
            "Configuration reload attempts, by result.",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in ["ok", "failed"].into_iter().zip(self.reloads) {
            metric
                .encode_family(&[("result", result)])?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
        Ok(())
    }
}

/// Metrics clients served at once, each on its own thread: far more than
/// scrapers need, so idle connections do not starve them. Beyond it, a new
/// client is answered `503 Service Unavailable` at once.
const MAX_CLIENTS: usize = 128;
/// The most a request's line and headers may take.
const MAX_HEAD: usize = 8 << 10;
/// How long a client has to send its request line and headers: a scraper
/// sends them at once, so an idle connection holds its slot only briefly.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client has to take the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the response: how long, and how much, unread input is drained so
/// the close is a FIN and not a reset that could destroy the response.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: usize = 64 << 10;

type Render = dyn Fn() -> String + Send + Sync;

/// Serves `GET /metrics` (and `GET /metrics?...`) on `listener` forever with
/// `render()`'s page; any other path 404, other methods 405. Each client gets
/// a thread (at most 128; beyond that a new client is answered 503 at once),
/// 8 KiB for its request line and headers, 2 s to send them and 5 s to
/// take the response. HTTP/1.0 and 1.1, one request per connection
/// (`Connection: close`). Returns only if the listener itself fails.
pub fn serve_http(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Result<()> {
    listener
        .set_nonblocking(false)
        .context("cannot make the metrics listener blocking")?;
    let render: Arc<Render> = Arc::new(render);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(e)?;
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse_busy(stream);
            continue;
        }
        let slot = ClientSlot(Arc::clone(&active));
        let render = Arc::clone(&render);
        // On failure the closure, and with it the stream and the slot, is
        // dropped: the client is closed and the slot freed.
        let spawned = std::thread::Builder::new()
            .name("metrics-http".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                serve_client(stream, &*render);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread for a metrics client: {e}");
        }
    }
}

/// Answers `503 Service Unavailable` to a client there is no slot for,
/// without waiting for it: a scraper learns to retry instead of seeing a
/// bare close or a reset. What it sent so far is read first, so the close
/// does not turn into a reset that destroys the answer.
fn refuse_busy(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut chunk = [0u8; 4096];
    while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
    let response = Response::new(
        503,
        "text/plain; charset=utf-8",
        "Retry-After: 1\r\n",
        b"Service Unavailable: too many metrics clients\n".to_vec(),
    );
    let mut whole = response.head;
    whole.extend_from_slice(&response.body);
    // Small enough for any socket buffer: one write, never a wait.
    let _ = stream.write(&whole);
    let _ = stream.shutdown(Shutdown::Write);
}

/// What to do after `accept` failed: go on (after a pause if the process is
/// out of something), or give up if the listener itself is unusable.
fn accept_failed(e: io::Error) -> Result<()> {
    match e.raw_os_error() {
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => {
            Err(e).context("cannot accept metrics clients")
        }
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!("cannot accept a metrics client: {e}");
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        }
        // EINTR, ECONNABORTED, and the pending connection's own network
        // errors, which accept(2) says to treat like EAGAIN.
        _ => {
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        }
    }
}

/// Frees a client slot when its thread ends, however it ends.
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why no request could be read.
enum HeadError {
    /// More than [`MAX_HEAD`] bytes without the end of the headers.
    TooLarge,
    /// The client closed, timed out or failed: nothing to answer.
    Gone,
}

fn serve_client(mut stream: TcpStream, render: &Render) {
    let response = match read_head(&mut stream, Instant::now() + HEAD_TIMEOUT) {
        Ok(head) => respond(&head, render),
        Err(HeadError::TooLarge) => Response::text(431, "Request Header Fields Too Large"),
        Err(HeadError::Gone) => return,
    };
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    if write_by(&mut stream, &response.head, deadline).is_ok() {
        let _ = write_by(&mut stream, &response.body, deadline);
    }
    let _ = stream.shutdown(Shutdown::Write);
    drain(&mut stream);
}

/// Reads the request line and headers, up to the empty line ending them.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // Empty lines before the request line are to be ignored (RFC 9112).
        let start = head
            .iter()
            .position(|byte| !matches!(byte, b'\r' | b'\n'))
            .unwrap_or(head.len());
        let request = &head[start..];
        if let Some(end) = find(request, b"\r\n\r\n").or_else(|| find(request, b"\n\n")) {
            return Ok(request[..end].to_vec());
        }
        if head.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(HeadError::Gone)?;
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|_| HeadError::Gone)?;
        let room = (MAX_HEAD - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(HeadError::Gone),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// An HTTP response: its status line and headers, and its body.
struct Response {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &str, extra: &str, body: Vec<u8>) -> Response {
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        );
        Response {
            head: head.into_bytes(),
            body,
        }
    }

    fn text(status: u16, message: &str) -> Response {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            "",
            format!("{message}\n").into_bytes(),
        )
    }
}

/// The response to a request whose head is `head`.
fn respond(head: &[u8], render: &Render) -> Response {
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text(400, "Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request");
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !token(method) || !token(target) || !token(version) {
        return Response::text(400, "Bad Request");
    }
    if !version.starts_with("HTTP/") {
        return Response::text(400, "Bad Request");
    }
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return Response::text(505, "HTTP Version Not Supported");
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path != "/metrics" {
        return Response::text(404, "Not Found");
    }
    if method != "GET" {
        return Response::new(
            405,
            "text/plain; charset=utf-8",
            "Allow: GET\r\n",
            b"Method Not Allowed\n".to_vec(),
        );
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(render)) {
        Ok(page) => Response::new(200, CONTENT_TYPE, "", page.into_bytes()),
        Err(_) => Response::text(500, "Internal Server Error"),
    }
}

/// Writes all of `bytes` unless `deadline` passes first.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(io::ErrorKind::TimedOut)?;
        stream.set_write_timeout(Some(remaining))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and drops what the client still sends (a bounded amount, for a
/// bounded time), so that closing does not reset the connection.
fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        let Some(remaining) = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
        else {
            return;
        };
        if stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    const MS: Duration = Duration::from_millis(1);

    fn info(name: &str, slot: usize) -> TenantInfo {
        TenantInfo {
            name: name.to_string(),
            slot,
            digest: "builtin-echo".to_string(),
            strategy: "threading".to_string(),
        }
    }

    /// The page's samples: `name{labels}` to value.
    fn samples(page: &str) -> BTreeMap<String, String> {
        page.lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a sample line");
                (series.to_string(), value.to_string())
            })
            .collect()
    }

    fn value(samples: &BTreeMap<String, String>, series: &str) -> String {
        samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
            .clone()
    }

    /// Forks a child that runs `work` and `_exit(0)`s; returns its pid.
    /// `work` must not allocate (the test process has other threads).
    fn fork_child(work: impl FnOnce()) -> libc::pid_t {
        // SAFETY: the child runs only `work` (atomics, no allocation or
        // locks) and then `_exit`s without unwinding or running destructors.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", io::Error::last_os_error()),
            0 => {
                work();
                // SAFETY: ends the child at once, as intended.
                unsafe { libc::_exit(0) }
            }
            pid => pid,
        }
    }

    fn wait_child(pid: libc::pid_t) {
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child with a valid status pointer.
            let got = unsafe { libc::waitpid(pid, &mut status, 0) };
            if got == pid {
                break;
            }
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "waitpid: {e}");
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
    }

    #[test]
    fn counts_from_forked_children_are_visible_and_exact() {
        let metrics = Metrics::new(3).unwrap();
        let tenant = metrics.tenant(2);
        let children: Vec<_> = (0..8)
            .map(|_| {
                let tenant = tenant.clone();
                fork_child(move || {
                    for _ in 0..1000 {
                        tenant.connection_started();
                        tenant.record("ok", 3, 5, 2 * MS, Some(100 << 10));
                        tenant.connection_ended();
                    }
                    tenant.connection_started();
                })
            })
            .collect();
        metrics.reloaded(true);
        for pid in children {
            wait_child(pid);
        }
        let page = metrics.render(&[info("forked", 2)]);
        let samples = samples(&page);
        let get = |series: &str| value(&samples, series);
        assert_eq!(
            get(r#"host_connections_total{tenant="forked",outcome="ok"}"#),
            "8000"
        );
        assert_eq!(get(r#"host_connections_in_flight{tenant="forked"}"#), "8");
        assert_eq!(
            get(r#"host_received_bytes_total{tenant="forked"}"#),
            "24000"
        );
        assert_eq!(get(r#"host_sent_bytes_total{tenant="forked"}"#), "40000");
        assert_eq!(
            get(r#"host_connection_duration_seconds_count{tenant="forked"}"#),
            "8000"
        );
        assert_eq!(
            get(r#"host_connection_duration_seconds_bucket{tenant="forked",le="0.005"}"#),
            "8000"
        );
        assert_eq!(
            get(r#"host_instance_memory_peak_bytes_bucket{tenant="forked",le="262144"}"#),
            "8000"
        );
        assert_eq!(get(r#"host_reloads_total{result="ok"}"#), "1");
    }

    #[test]
    fn exact_counts_per_tenant_and_outcome() {
        let metrics = Metrics::new(4).unwrap();
        assert_eq!(metrics.max_tenants(), 4);
        let a = metrics.tenant(0);
        let b = metrics.tenant(3);
        let hidden = metrics.tenant(1);
        for _ in 0..3 {
            a.record("ok", 10, 20, MS, Some(1 << 20));
        }
        a.record("trap", 1, 0, MS, Some(1 << 20));
        a.record("no-such-outcome", 0, 0, MS, Some(1 << 20));
        b.record("denied", 0, 0, Duration::ZERO, None);
        b.record("timeout", 7, 0, 5 * MS, Some(64 << 10));
        b.record("host-error", 0, 0, MS, None);
        hidden.record("ok", 1, 1, MS, None);
        a.connection_started();
        a.connection_started();
        a.connection_ended();
        metrics.reloaded(true);
        metrics.reloaded(false);
        metrics.reloaded(false);

        let page = metrics.render(&[info("a", 0), info("b", 3)]);
        let samples = samples(&page);
        let get = |series: &str| value(&samples, series);
        let expected_a = [3, 0, 1, 0, 0, 0, 0, 0, 1, 0];
        let expected_b = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1];
        for (tenant, expected) in [("a", expected_a), ("b", expected_b)] {
            for (outcome, count) in OUTCOMES.iter().zip(expected) {
                assert_eq!(
                    get(&format!(
                        r#"host_connections_total{{tenant="{tenant}",outcome="{outcome}"}}"#
                    )),
                    count.to_string(),
                    "{tenant} {outcome}"
                );
            }
        }
        assert_eq!(get(r#"host_connections_in_flight{tenant="a"}"#), "1");
        assert_eq!(get(r#"host_connections_in_flight{tenant="b"}"#), "0");
        assert_eq!(get(r#"host_received_bytes_total{tenant="a"}"#), "31");
        assert_eq!(get(r#"host_sent_bytes_total{tenant="a"}"#), "60");
        assert_eq!(get(r#"host_received_bytes_total{tenant="b"}"#), "7");
        assert_eq!(get(r#"host_reloads_total{result="ok"}"#), "1");
        assert_eq!(get(r#"host_reloads_total{result="failed"}"#), "2");
        assert_eq!(
            get(r#"host_handler_info{tenant="b",digest="builtin-echo",strategy="threading"}"#),
            "1"
        );
        // Memory is only counted when an instance was created.
        assert_eq!(
            get(r#"host_instance_memory_peak_bytes_count{tenant="b"}"#),
            "1"
        );
        assert_eq!(
            get(r#"host_connection_duration_seconds_count{tenant="b"}"#),
            "3"
        );
        // Only the tenants asked for are shown: 10 outcomes for each of two.
        assert!(!page.contains(r#"tenant="1""#) && !page.contains("hidden"));
        let connection_lines = samples
            .keys()
            .filter(|series| series.starts_with("host_connections_total{"))
            .count();
        assert_eq!(connection_lines, 20);
        // A slot out of range is left out rather than panicking.
        let page = metrics.render(&[info("gone", 99)]);
        assert!(!page.contains("gone"));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn tenant_slot_out_of_range_panics() {
        Metrics::new(2).unwrap().tenant(2);
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let metrics = Metrics::new(1).unwrap();
        let t = metrics.tenant(0);
        // Durations: on a bound (inclusive), just above it, in the middle,
        // and above every bound.
        t.record("ok", 0, 0, MS, Some(64 << 10));
        t.record(
            "ok",
            0,
            0,
            MS + Duration::from_nanos(1),
            Some((64 << 10) + 1),
        );
        t.record("ok", 0, 0, Duration::from_millis(300), Some(4 << 30));
        t.record("ok", 0, 0, Duration::from_secs(90), Some(5 << 30));
        t.record("denied", 0, 0, Duration::from_micros(500), None);

        let samples = samples(&metrics.render(&[info("h", 0)]));
        let get = |series: &str| value(&samples, series);
        let duration = |le: &str| {
            get(&format!(
                r#"host_connection_duration_seconds_bucket{{tenant="h",le="{le}"}}"#
            ))
        };
        assert_eq!(duration("0.001"), "2");
        assert_eq!(duration("0.005"), "3");
        assert_eq!(duration("0.25"), "3");
        assert_eq!(duration("0.5"), "4");
        assert_eq!(duration("60"), "4");
        assert_eq!(duration("+Inf"), "5");
        assert_eq!(
            get(r#"host_connection_duration_seconds_count{tenant="h"}"#),
            "5"
        );
        let sum: f64 = get(r#"host_connection_duration_seconds_sum{tenant="h"}"#)
            .parse()
            .unwrap();
        assert!((sum - 90.3025).abs() < 1e-9, "sum {sum}");

        let memory = |le: &str| {
            get(&format!(
                r#"host_instance_memory_peak_bytes_bucket{{tenant="h",le="{le}"}}"#
            ))
        };
        assert_eq!(memory("65536"), "1");
        assert_eq!(memory("262144"), "2");
        assert_eq!(memory("1.073741824e+09"), "2");
        assert_eq!(memory("4.294967296e+09"), "3");
        assert_eq!(memory("+Inf"), "4");
        assert_eq!(
            get(r#"host_instance_memory_peak_bytes_count{tenant="h"}"#),
            "4"
        );
        let sum: f64 = get(r#"host_instance_memory_peak_bytes_sum{tenant="h"}"#)
            .parse()
            .unwrap();
        let expected = (64 << 10) + (64 << 10) + 1 + (4u64 << 30) + (5u64 << 30);
        assert_eq!(sum, expected as f64);
        // Every bucket, in order, each at least the one before.
        let counts: Vec<u64> = samples
            .iter()
            .filter(|(series, _)| series.starts_with("host_connection_duration_seconds_bucket"))
            .map(|(_, v)| v.parse().unwrap())
            .collect();
        assert_eq!(counts.len(), DURATION_BOUNDS_US.len() + 1);
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new(1).unwrap();
        metrics.tenant(0).record("ok", 1, 1, MS, None);
        let page = metrics.render(&[info("we\"ird\\name\n", 0)]);
        assert!(page.contains(r#"tenant="we\"ird\\name\n""#), "{page}");
    }

    /// `promtool check metrics` on a page, if promtool is installed; in CI
    /// (`CI` set, as `.ci/run` runs), whose `handlers/install-toolchains.sh`
    /// installs it, a missing promtool fails the test.
    fn promtool(page: &str) -> Option<(bool, String)> {
        use std::process::{Command, Stdio};
        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "promtool not run ({e}); CI installs it: handlers/install-toolchains.sh promtool"
                );
                eprintln!("promtool not run ({e}); install the `prometheus` package");
                return None;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        Some((output.status.success(), text))
    }

    #[test]
    fn page_passes_promtool() {
        let metrics = Metrics::new(3).unwrap();
        metrics.tenant(0).record("ok", 5, 5, 3 * MS, Some(1 << 20));
        metrics.tenant(2).record("denied", 0, 0, MS, None);
        metrics.reloaded(false);
        let tenants = [
            info("a", 0),
            TenantInfo {
                name: "b \"quoted\"".to_string(),
                slot: 2,
                digest: "ab".repeat(32),
                strategy: "forking".to_string(),
            },
        ];
        for page in [metrics.render(&tenants), metrics.render(&[])] {
            if let Some((ok, output)) = promtool(&page) {
                assert!(ok && output.trim().is_empty(), "{output}\n{page}");
            }
        }
    }

    /// Starts `serve_http` on a fresh port with a fixed page.
    fn start_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_http(listener, || "page 1\n".to_string()));
        addr
    }

    /// Sends `request`, then reads until the server closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    fn get_metrics(addr: SocketAddr) -> String {
        exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap()
    }

    #[test]
    fn http_serves_the_page_and_refuses_the_rest() {
        let addr = start_server();
        let response = get_metrics(addr);
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nContent-Type: {CONTENT_TYPE}\r\n")));
        assert!(head.contains("\r\nContent-Length: 7\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert_eq!(body, "page 1\n");

        let response = exchange(addr, b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\npage 1\n"), "{response}");
        let response = exchange(addr, b"GET /metrics\n\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");

        let response = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        assert!(response.contains("Connection: close"));
        let response = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert!(
            response.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nAllow: GET\r\n"));
        let response = exchange(addr, b"GET /metrics HTTP/2.0\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 505 "), "{response}");
        let response = exchange(addr, b"\xff\xfe /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    }

    #[test]
    fn http_survives_oversized_and_abandoned_requests() {
        let addr = start_server();
        let garbage = vec![b'x'; 100 << 10];
        // The server answers 431 and closes, possibly while the client is
        // still writing: an error is as good as the 431.
        if let Ok(response) = exchange(addr, &garbage) {
            assert!(
                response.is_empty() || response.starts_with("HTTP/1.1 431 "),
                "{response}"
            );
        }
        // Headers that never end, and a client that leaves mid-request.
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b"X-Pad: yyyyyyyyyyyyyyy\r\n".as_slice(), 1000).flatten());
        let _ = exchange(addr, &long);
        drop(TcpStream::connect(addr).unwrap());
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /met").unwrap();
        drop(half);
        assert!(get_metrics(addr).ends_with("\r\n\r\npage 1\n"));
    }

    #[test]
    fn http_bounds_its_clients() {
        let addr = start_server();
        // Fill every client slot with a connection that sends nothing.
        let idle: Vec<TcpStream> = (0..MAX_CLIENTS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // One more is answered 503 at once, before the idle ones time out.
        let started = Instant::now();
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut response = Vec::new();
        extra
            .read_to_end(&mut response)
            .expect("a 503, not a reset");
        let response = String::from_utf8(response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
        assert!(started.elapsed() < HEAD_TIMEOUT);
        drop(idle);
        // Their threads see the close and free their slots.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n") {
                Ok(response) if response.ends_with("page 1\n") => break,
                _ if Instant::now() < deadline => std::thread::sleep(10 * MS),
                other => panic!("no slot freed: {other:?}"),
            }
        }
    }

    #[test]
    fn http_cuts_off_a_slow_client() {
        let addr = start_server();
        let mut reader = TcpStream::connect(addr).unwrap();
        let mut writer = reader.try_clone().unwrap();
        let started = Instant::now();
        // One byte every 200 ms would take half an hour to fill the head.
        std::thread::spawn(move || {
            while started.elapsed() < Duration::from_secs(20) && writer.write_all(b"X").is_ok() {
                std::thread::sleep(200 * MS);
            }
        });
        reader
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        match reader.read(&mut [0u8; 64]) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("not cut off: {other:?}"),
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= HEAD_TIMEOUT - 200 * MS, "{elapsed:?}");
        assert!(
            elapsed < HEAD_TIMEOUT + Duration::from_secs(3),
            "{elapsed:?}"
        );
    }
}
