//! One connection, start to end: a fresh `Store` and instance, the socket
//! wired in as the handler's streams, the `handle` call, the final flush and
//! close, and the one log line that says how it went. This is *what* runs; the
//! strategies only decide *where*.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};

use crate::engine::EpochClock;
use crate::guest_clock::GuestClock;
use crate::guest_log::GuestOutput;
use crate::handler::{one_line, ConnState, ConnectionInfo, Handler};
use crate::limits::InstanceLimiter;
use crate::listener::{local_of, Peer};
use crate::metrics::TenantMetrics;
use crate::net_stream::{block_on, Socket, SocketInput, SocketOutput, Waits};
use crate::settings::{Access, Grants, Limits};

/// After `handle` returns, the host reads and drops what the client still
/// sends for at most this long (and at most [`LINGER_BYTES`]), so that closing
/// with unread input does not reset the connection and destroy the reply.
pub const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// A connection the accept loop has taken from the listener.
pub struct Accepted {
    pub stream: socket2::Socket,
    pub peer: Peer,
    /// Unique within one run of the host, increasing from 1.
    pub id: u64,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `handle` returned `ok`.
    Ok,
    /// `handle` returned `err(text)`.
    HandlerError(String),
    /// The guest trapped (or a host call it made failed fatally).
    Trap(String),
    /// The instance needed more than `--max-memory` and could not go on.
    MemoryLimit(String),
    /// `handle` ran past `--timeout`.
    Timeout,
    /// The client sent nothing, or read nothing, for the idle timeout.
    IdleTimeout,
    /// The client reset the connection.
    ClientReset,
    /// The host ended the connection while shutting down.
    Shutdown,
    /// The host could not set the connection up.
    HostError(String),
    /// The tenant's allow/deny lists refused the peer; nothing ran.
    Denied,
}

impl Outcome {
    /// The stable name in log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HandlerError(_) => "handler-error",
            Outcome::Trap(_) => "trap",
            Outcome::MemoryLimit(_) => "memory-limit",
            Outcome::Timeout => "timeout",
            Outcome::IdleTimeout => "idle-timeout",
            Outcome::ClientReset => "client-reset",
            Outcome::Shutdown => "shutdown",
            Outcome::HostError(_) => "host-error",
            Outcome::Denied => "denied",
        }
    }

    fn detail(&self) -> Option<&str> {
        match self {
            Outcome::HandlerError(text)
            | Outcome::Trap(text)
            | Outcome::MemoryLimit(text)
            | Outcome::HostError(text) => Some(text),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            Some(detail) => write!(f, "{} error={detail:?}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// What every connection of one listener runs: the handler, its limits and
/// grants.
pub struct Service {
    handler: Handler,
    tenant: String,
    limits: Limits,
    grants: Grants,
    clock: EpochClock,
    /// Which peers are served at all.
    access: Access,
    /// The tenant's counters, shared by every process serving it.
    metrics: Option<TenantMetrics>,
    /// The sockets of the connections this process is serving, so a forced
    /// shutdown can end them.
    live: Mutex<HashMap<u64, Arc<Socket>>>,
    aborting: AtomicBool,
}

/// How a guest call went, before the socket's story is added.
enum CallResult {
    Returned(Result<(), String>),
    Trapped(wasmtime::Error),
    SetupFailed(String),
}

impl Service {
    pub fn new(
        handler: Handler,
        tenant: String,
        limits: Limits,
        grants: Grants,
        clock: EpochClock,
    ) -> Service {
        Service {
            handler,
            tenant,
            limits,
            grants,
            clock,
            access: Access::default(),
            metrics: None,
            live: Mutex::new(HashMap::new()),
            aborting: AtomicBool::new(false),
        }
    }

    /// Serves only the peers `access` permits.
    pub fn with_access(mut self, access: Access) -> Service {
        self.access = access;
        self
    }

    /// Counts every connection in `metrics`.
    pub fn with_metrics(mut self, metrics: TenantMetrics) -> Service {
        self.metrics = Some(metrics);
        self
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn metrics(&self) -> Option<&TenantMetrics> {
        self.metrics.as_ref()
    }

    /// The accept loop's check, before any instance exists: a peer the
    /// tenant's allow/deny lists refuse is closed unserved, logged and
    /// counted with outcome `denied`.
    pub fn admit(&self, conn: Accepted) -> Option<Accepted> {
        if self.access.permits(conn.peer.ip()) {
            return Some(conn);
        }
        let Accepted { stream, peer, id } = conn;
        drop(stream);
        let outcome = Outcome::Denied;
        if let Some(metrics) = &self.metrics {
            metrics.record(outcome.name(), 0, 0, Duration::ZERO, None);
        }
        log_closed(&Closed {
            id,
            peer: &peer,
            worker: "acceptor",
            tenant: &self.tenant,
            bytes_in: 0,
            bytes_out: 0,
            memory: 0,
            duration: Duration::ZERO,
            outcome: &outcome,
        });
        None
    }

    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    pub fn engine(&self) -> &Engine {
        self.handler.engine()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves `conn` to the end on the calling thread, logs its line and
    /// returns how it ended. `worker` names the thread or process.
    pub fn serve(&self, conn: Accepted, worker: &str) -> Outcome {
        // Every wait of a blocking connection happens in poll(2) inside the
        // future: it is ready at its first poll.
        block_on(self.serve_with(conn, worker, Waits::Blocking))
    }

    /// Serves `conn` to the end as a task of an async runtime: the guest
    /// runs on a fiber that is suspended whenever it waits (for its client,
    /// a timer, or its turn after an epoch tick), never blocking the
    /// runtime's thread. Same store, limits, outcome, line and counters as
    /// [`Service::serve`].
    pub async fn serve_async(&self, conn: Accepted, worker: &str) -> Outcome {
        self.serve_with(conn, worker, Waits::Async).await
    }

    async fn serve_with(&self, conn: Accepted, worker: &str, waits: Waits) -> Outcome {
        let started = Instant::now();
        let Accepted { stream, peer, id } = conn;
        let local = local_of(&stream);
        // Replies are often one small write: do not hold them back (Nagle).
        if peer.inet.is_some() {
            let _ = stream.set_tcp_nodelay(true);
        }
        let socket = Socket::new(
            stream,
            self.limits.idle_timeout,
            started + self.limits.timeout,
            waits,
        );
        // Listed for `abort_all` until the guard drops, even if serving
        // panics: the socket is then closed, never leaked.
        let live = LiveEntry::new(self, id, &socket);
        if self.aborting.load(Ordering::SeqCst) {
            socket.abort();
        }
        let info = ConnectionInfo {
            peer_address: peer.text.clone(),
            local_address: local,
            connection_id: id,
            worker: worker.to_string(),
            tenant: self.tenant.clone(),
        };

        let (result, limiter) = if socket.traffic.aborted.load(Ordering::SeqCst) {
            (CallResult::SetupFailed("not started".into()), None)
        } else {
            match waits {
                Waits::Blocking => self.run_guest(&socket, &info),
                Waits::Async => self.run_guest_async(&socket, &info).await,
            }
        };
        socket.finish_output().await;
        let outcome = classify(result, &socket, limiter.as_ref());
        close(&socket, &outcome).await;
        drop(live);

        let bytes_in = socket.traffic.bytes_in.load(Ordering::Relaxed);
        let bytes_out = socket.traffic.bytes_out.load(Ordering::Relaxed);
        // The last reference: the descriptor is closed before the line says
        // "closed".
        drop(socket);
        let memory = limiter.as_ref().map(|l| l.peak() as u64);
        let duration = started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.record(outcome.name(), bytes_in, bytes_out, duration, memory);
        }
        log_closed(&Closed {
            id,
            peer: &peer,
            worker,
            tenant: &self.tenant,
            bytes_in,
            bytes_out,
            memory: memory.unwrap_or(0),
            duration,
            outcome: &outcome,
        });
        outcome
    }

    /// Ends every connection this process is serving: guests running wasm
    /// trap at their next epoch check, guests waiting on their socket wake
    /// up to an error, and queued connections are closed unserved.
    pub fn abort_all(&self) {
        self.aborting.store(true, Ordering::SeqCst);
        for socket in self.lock_live().values() {
            socket.abort();
        }
        self.clock.expire_all(self.engine(), self.limits.timeout);
    }

    /// `host check`'s instantiation figure: a fresh store, made as every
    /// connection's is ([`Service::new_store`]), over `stream`, and the time
    /// `instantiate` alone takes in it. The socket is not read or written,
    /// so one connection serves any number of these.
    pub(crate) fn time_instantiate(&self, stream: &socket2::Socket) -> anyhow::Result<Duration> {
        let socket = Socket::new(
            stream.try_clone()?,
            self.limits.idle_timeout,
            Instant::now() + self.limits.timeout,
            Waits::Blocking,
        );
        let mut store = self
            .new_store(0, &socket, Waits::Blocking)
            .map_err(anyhow::Error::msg)?;
        let started = Instant::now();
        self.handler
            .pre()
            .instantiate(&mut store)
            .map_err(|e| anyhow::anyhow!("instantiation failed: {}", one_line(&e)))?;
        Ok(started.elapsed())
    }

    /// `host check`'s instantiate + call figure: serves the accepted `stream`
    /// as [`Service::serve`] does, without its log line and counters, and
    /// returns how long [`Service::run_guest`] took (the fresh store, the
    /// streams, the instance, the whole `handle` call, and the store's drop,
    /// which sends what the output still buffers and frees the instance) and
    /// how the connection ended. The connection is closed, as `serve` closes
    /// it, before this returns.
    pub(crate) fn time_call(&self, stream: socket2::Socket, id: u64) -> (Duration, Outcome) {
        let _ = stream.set_tcp_nodelay(true);
        let peer = stream.peer_addr().ok().and_then(|a| a.as_socket());
        let info = ConnectionInfo {
            peer_address: peer.map_or_else(|| "unknown".into(), |a| a.to_string()),
            local_address: local_of(&stream),
            connection_id: id,
            worker: "check".to_string(),
            tenant: self.tenant.clone(),
        };
        let socket = Socket::new(
            stream,
            self.limits.idle_timeout,
            Instant::now() + self.limits.timeout,
            Waits::Blocking,
        );
        let started = Instant::now();
        let (result, limiter) = self.run_guest(&socket, &info);
        block_on(socket.finish_output());
        let took = started.elapsed();
        let outcome = classify(result, &socket, limiter.as_ref());
        block_on(close(&socket, &outcome));
        (took, outcome)
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Socket>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Instantiates the handler in a fresh store and calls `handle`. The
    /// store, and with it every guest resource, is gone when this returns.
    fn run_guest(
        &self,
        socket: &Arc<Socket>,
        info: &ConnectionInfo,
    ) -> (CallResult, Option<InstanceLimiter>) {
        let (mut store, input, output) = match self.prepare(socket, info, Waits::Blocking) {
            Ok(prepared) => prepared,
            Err(why) => return (CallResult::SetupFailed(why), None),
        };
        let result = match self.handler.pre().instantiate(&mut store) {
            // Instantiation runs guest code (start functions) and grows
            // memory: its failures are the guest's.
            Err(e) => CallResult::Trapped(e.context("instantiation failed")),
            Ok(instance) => returned(instance.call_handle(&mut store, info, input, output)),
        };
        (result, Some(dispose(store)))
    }

    /// [`Service::run_guest`] on a fiber: every wait suspends it.
    async fn run_guest_async(
        &self,
        socket: &Arc<Socket>,
        info: &ConnectionInfo,
    ) -> (CallResult, Option<InstanceLimiter>) {
        let (mut store, input, output) = match self.prepare(socket, info, Waits::Async) {
            Ok(prepared) => prepared,
            Err(why) => return (CallResult::SetupFailed(why), None),
        };
        let Some(pre) = self.handler.pre_async() else {
            let why = "the handler was not linked for the async strategy".to_string();
            return (CallResult::SetupFailed(why), Some(dispose(store)));
        };
        let result = match pre.instantiate_async(&mut store).await {
            Err(e) => CallResult::Trapped(e.context("instantiation failed")),
            Ok(instance) => returned(instance.call_handle(&mut store, info, input, output).await),
        };
        (result, Some(dispose(store)))
    }

    /// A fresh store with the connection's streams in its table.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        socket: &Arc<Socket>,
        info: &ConnectionInfo,
        waits: Waits,
    ) -> Result<
        (
            Store<ConnState>,
            Resource<DynInputStream>,
            Resource<DynOutputStream>,
        ),
        String,
    > {
        let mut store = self.new_store(info.connection_id, socket, waits)?;
        let table = &mut store.data_mut().table;
        let input: DynInputStream = Box::new(SocketInput::new(socket.clone()));
        let output: DynOutputStream = Box::new(SocketOutput::new(socket.clone()));
        let streams = table
            .push(input)
            .and_then(|input| Ok((input, table.push(output)?)));
        match streams {
            Ok((input, output)) => Ok((store, input, output)),
            Err(e) => Err(format!("cannot create the streams: {e}")),
        }
    }

    /// A store granting what `--env` and `--dir` grant and nothing else, with
    /// the memory limit and the deadline set.
    fn new_store(
        &self,
        id: u64,
        socket: &Arc<Socket>,
        waits: Waits,
    ) -> Result<Store<ConnState>, String> {
        let output_log = GuestOutput::new(id);
        let clock = GuestClock {
            base: Instant::now(),
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.monotonic_clock(clock)
            .stdout(output_log.stream("stdout"))
            .stderr(output_log.stream("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (key, value) in &self.grants.env {
            wasi.env(key, value);
        }
        for dir in &self.grants.dirs {
            wasi.preopened_dir(&dir.host, &dir.guest, FsPerms::ReadOnly)
                .map_err(|e| {
                    format!("cannot open --dir {}: {}", dir.host.display(), one_line(&e))
                })?;
        }
        let mut store = Store::new(
            self.engine(),
            ConnState {
                wasi: wasi.build(),
                table: ResourceTable::new(),
                limiter: InstanceLimiter::new(self.limits.max_memory),
                clock,
                socket: socket.clone(),
            },
        );
        store.limiter(|state| &mut state.limiter);
        if waits == Waits::Async {
            // At every epoch tick the guest gives the runtime's thread to
            // the other connections (fairness), unless its time is up or
            // the host is ending it: then it traps, as under `--timeout`.
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(|store| {
                if store.data().socket.must_stop() {
                    Ok(UpdateDeadline::Interrupt)
                } else {
                    Ok(UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(tokio::task::yield_now()),
                    ))
                }
            });
            return Ok(store);
        }
        store.set_epoch_deadline(self.clock.deadline_ticks(self.limits.timeout));
        store.epoch_deadline_trap();
        if self.aborting.load(Ordering::SeqCst) {
            // `abort_all` may have advanced the epoch before this store
            // existed: trap at the first check instead.
            store.set_epoch_deadline(0);
        }
        Ok(store)
    }
}

/// What the guest's `handle` call came to.
fn returned(call: wasmtime::Result<Result<(), String>>) -> CallResult {
    match call {
        Ok(returned) => CallResult::Returned(returned),
        // `wasi:cli/exit`: status 0 is a normal return.
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(wasmtime_wasi::I32Exit(0)) => CallResult::Returned(Ok(())),
            Some(wasmtime_wasi::I32Exit(code)) => {
                CallResult::Returned(Err(format!("exited with status {code}")))
            }
            None => CallResult::Trapped(e),
        },
    }
}

/// Drops the store (and with it the instance and every guest resource) and
/// keeps its memory limiter, for the log line.
fn dispose(mut store: Store<ConnState>) -> InstanceLimiter {
    let limiter = std::mem::replace(&mut store.data_mut().limiter, InstanceLimiter::new(0));
    drop(store);
    limiter
}

/// A connection listed in its service's live set, for as long as this
/// lives. Dropped at the end of `serve` or while a panic unwinds, so the
/// set never keeps a finished connection's socket open.
struct LiveEntry<'a> {
    service: &'a Service,
    id: u64,
}

impl<'a> LiveEntry<'a> {
    fn new(service: &'a Service, id: u64, socket: &Arc<Socket>) -> LiveEntry<'a> {
        service.lock_live().insert(id, socket.clone());
        LiveEntry { service, id }
    }
}

impl Drop for LiveEntry<'_> {
    fn drop(&mut self) {
        self.service.lock_live().remove(&self.id);
    }
}

/// What the one line a connection ends with says.
struct Closed<'a> {
    id: u64,
    peer: &'a Peer,
    worker: &'a str,
    tenant: &'a str,
    bytes_in: u64,
    bytes_out: u64,
    /// The instance's peak memory in bytes.
    memory: u64,
    duration: Duration,
    outcome: &'a Outcome,
}

/// Logs a connection's line. In the JSON log its values are fields too.
fn log_closed(c: &Closed<'_>) {
    let (id, peer, worker, tenant, outcome) = (c.id, c.peer, c.worker, c.tenant, c.outcome);
    let memory_kib = c.memory.div_ceil(1024);
    let duration_ms = c.duration.as_secs_f64() * 1000.0;
    let (bytes_in, bytes_out) = (c.bytes_in, c.bytes_out);
    if crate::logging::json() {
        tracing::info!(
            connection = id,
            peer = %peer,
            worker,
            tenant,
            bytes_in,
            bytes_out,
            memory_kib,
            duration_ms,
            outcome = outcome.name(),
            error = outcome.detail(),
            "connection {id} closed peer={peer} worker={worker} tenant={tenant} in={bytes_in} out={bytes_out} memory={memory_kib}KiB duration={duration_ms:.3}ms outcome={outcome}"
        );
    } else {
        tracing::info!(
            "connection {id} closed peer={peer} worker={worker} tenant={tenant} in={bytes_in} out={bytes_out} memory={memory_kib}KiB duration={duration_ms:.3}ms outcome={outcome}"
        );
    }
}

/// Names how the connection ended, from what the guest call returned and
/// what the socket and the memory limiter saw. The host's view wins over the
/// guest's: a handler that fails because its client vanished ended by
/// `client-reset`, not `handler-error`.
fn classify(result: CallResult, socket: &Socket, limiter: Option<&InstanceLimiter>) -> Outcome {
    let traffic = &socket.traffic;
    let flag = |f: &AtomicBool| f.load(Ordering::Relaxed);
    let failed = !matches!(result, CallResult::Returned(Ok(())));
    if flag(&traffic.aborted) {
        return Outcome::Shutdown;
    }
    if let CallResult::Trapped(e) = &result {
        if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return Outcome::Timeout;
        }
    }
    if flag(&traffic.timed_out) {
        return Outcome::Timeout;
    }
    if failed && limiter.is_some_and(InstanceLimiter::refused) {
        let detail = match &result {
            CallResult::Trapped(e) => trap_message(e),
            CallResult::Returned(Err(text)) => text.clone(),
            _ => String::new(),
        };
        return Outcome::MemoryLimit(detail);
    }
    match result {
        CallResult::Trapped(e) => Outcome::Trap(trap_message(&e)),
        CallResult::SetupFailed(why) => Outcome::HostError(why),
        _ if flag(&traffic.idle_timed_out) => Outcome::IdleTimeout,
        _ if flag(&traffic.client_reset) => Outcome::ClientReset,
        CallResult::Returned(Ok(())) => Outcome::Ok,
        CallResult::Returned(Err(text)) => Outcome::HandlerError(text),
    }
}

/// A trap's message without its multi-line wasm backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => one_line(e),
    }
}

/// Ends the connection after the guest: the output was flushed when its
/// stream was dropped with the store. A normal end sends FIN; unless the
/// guest read the client's end of input, it then drains what the client
/// still sends (bounded) so the close does not turn into a reset.
/// An end that cut the reply short (a timeout, shutdown, trap or memory limit,
/// or output left unsent) resets the connection, so the client cannot take a
/// truncated reply for a whole one.
async fn close(socket: &Socket, outcome: &Outcome) {
    // A reply cut short must not look complete: reset instead of FIN.
    let cut_short = matches!(
        outcome,
        Outcome::Timeout | Outcome::Shutdown | Outcome::Trap(_) | Outcome::MemoryLimit(_)
    ) || socket.traffic.output_lost.load(Ordering::Relaxed);
    let stream = socket.stream();
    if cut_short {
        // SO_LINGER {on, 0}: the final close sends RST.
        let _ = stream.set_linger(Some(Duration::ZERO));
        return;
    }
    if socket.traffic.input_ended.load(Ordering::Relaxed) {
        // Everything the client sent was read: the final close sends FIN
        // without waiting for the client (nothing unread can turn it into
        // a reset).
        return;
    }
    if *outcome == Outcome::IdleTimeout {
        // The client has been silent (or not reading) for the idle
        // timeout already: close now, not after a linger on top of it.
        return;
    }
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = [0u8; 8192];
    let mut reader = stream;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !socket.readable_within(left).await {
            break;
        }
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
