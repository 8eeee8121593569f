//! One connection, start to end: a balancer's PROXY protocol header if the
//! tenant takes one, a fresh `Store` and instance, the socket
//! wired in as the handler's streams, the `handle` call, the final flush and
//! close, and the one log line that says how it went. This is *what* runs; the
//! strategies only decide *where*.

use std::collections::HashMap;
use std::io::Read;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store};

use crate::conn::phase::Phase;
use crate::conn::report::{classify, log_closed, CallResult, Closed, Ending, Level, Usage};
use crate::conn::socket::{Socket, Waits};
use crate::listener::{local_of, Peer};
use crate::metrics::{InFlight, TenantMetrics};
use crate::outcome::Outcome;
use crate::settings::{Access, Grants, Limits, Outbound, ProxyProtocol};
use crate::wasm::direct_streams::block_on;
use crate::wasm::engine::EpochClock;
use crate::wasm::handler::{ConnState, ConnectionInfo, Handler, HandlerInstance};

/// After `handle` returns, the host reads and drops what the client still
/// sends for at most this long (and at most [`LINGER_BYTES`]), so that closing
/// with unread input does not reset the connection and destroy the reply.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// A connection the accept loop has taken from the listener.
pub struct Accepted {
    pub(crate) stream: socket2::Socket,
    pub(crate) peer: Peer,
    /// Unique within one run of the host, increasing from 1.
    pub(crate) id: u64,
    /// The local address, when the listener knows it for every connection
    /// (`Listener::fixed_local`); otherwise it is asked of the socket.
    pub(crate) local: Option<Arc<str>>,
}

/// An instance made before its connection existed, never run, and the store
/// it lives in (`Service::make_spare`).
pub(crate) struct Spare {
    pub(super) store: Store<ConnState>,
    pub(super) instance: HandlerInstance,
}

/// What every connection of one listener runs: the handler, its limits and
/// grants.
pub struct Service {
    pub(super) handler: Handler,
    tenant: String,
    pub(super) limits: Limits,
    pub(super) grants: Grants,
    /// The tenant's outbound grants, shared by its connections.
    pub(super) outbound: Arc<Outbound>,
    /// The tenant's name, shared by its connections' outbound checks.
    pub(super) tenant_name: Arc<str>,
    pub(super) clock: EpochClock,
    /// Which peers are served at all.
    access: Access,
    /// The balancers whose connections start with a PROXY protocol header.
    proxy: Option<ProxyProtocol>,
    /// The tenant's counters, shared by every process serving it.
    pub(super) metrics: Option<TenantMetrics>,
    /// The sockets of the connections this process is serving, so a forced
    /// shutdown can end them.
    live: Mutex<HashMap<u64, Arc<Socket>>>,
    pub(super) aborting: AtomicBool,
    /// Drain and abort, as the HTTP connections of this process see them.
    http_phase: Phase,
    /// A forking worker's spare instance (`Service::make_spare`).
    /// Invariant: only a forking worker fills it, and only its children
    /// take it, each its own copy; elsewhere it stays empty.
    pub(super) spare: Mutex<Option<Spare>>,
}

impl Service {
    pub(crate) fn new(
        handler: Handler,
        tenant: String,
        limits: Limits,
        grants: Grants,
        clock: EpochClock,
    ) -> Service {
        Service {
            handler,
            outbound: Arc::new(grants.outbound.clone()),
            tenant_name: Arc::from(tenant.as_str()),
            tenant,
            limits,
            grants,
            clock,
            access: Access::default(),
            proxy: None,
            metrics: None,
            live: Mutex::new(HashMap::new()),
            aborting: AtomicBool::new(false),
            http_phase: Phase::default(),
            spare: Mutex::new(None),
        }
    }

    /// Serves only the peers `access` permits.
    pub(crate) fn with_access(mut self, access: Access) -> Service {
        self.access = access;
        self
    }

    /// Takes a PROXY protocol header from the balancers `proxy` names.
    pub(crate) fn with_proxy(mut self, proxy: Option<ProxyProtocol>) -> Service {
        self.proxy = proxy;
        self
    }

    /// Counts every connection in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: TenantMetrics) -> Service {
        self.metrics = Some(metrics);
        self
    }

    pub(crate) fn tenant(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn metrics(&self) -> Option<&TenantMetrics> {
        self.metrics.as_ref()
    }

    /// Counts a connection in the tenant's in-flight gauge until the
    /// returned guard is dropped. Taken when a strategy hands the connection
    /// to what serves it.
    pub(crate) fn in_flight(&self) -> Option<InFlight> {
        self.metrics.as_ref().map(TenantMetrics::in_flight)
    }

    /// The accept loop's check, before any instance exists: a peer the
    /// tenant's allow/deny lists refuse is closed unserved, logged and
    /// counted with outcome `denied`. A balancer's connection
    /// (`proxy-from`) is judged later, on the client its header names, by
    /// what serves it: the accept loop never waits for a header.
    pub(crate) fn admit(&self, conn: Accepted) -> Option<Accepted> {
        if self.balancer(&conn.peer).is_some() || self.access.permits(conn.peer.ip()) {
            return Some(conn);
        }
        let Accepted {
            stream, peer, id, ..
        } = conn;
        drop(stream);
        let unserved = Unserved {
            id,
            peer: &peer,
            via: None,
            worker: "acceptor",
            duration: Duration::ZERO,
        };
        self.unserved(unserved, Outcome::Denied, None);
        None
    }

    /// The allow/deny lists.
    pub(super) fn access(&self) -> &Access {
        &self.access
    }

    /// The PROXY protocol settings, if the tenant sits behind a balancer.
    pub(super) fn proxy_protocol(&self) -> Option<&ProxyProtocol> {
        self.proxy.as_ref()
    }

    /// The PROXY protocol settings, if `peer` is a balancer that must send
    /// a header.
    pub(super) fn balancer(&self, peer: &Peer) -> Option<&ProxyProtocol> {
        self.proxy.as_ref().filter(|proxy| proxy.trusts(peer.ip()))
    }

    /// Counts and logs a connection that ran no guest (already closed).
    pub(super) fn unserved(
        &self,
        c: Unserved<'_>,
        outcome: Outcome,
        error: Option<&str>,
    ) -> Ending {
        if let Some(metrics) = &self.metrics {
            metrics.record(outcome, 0, 0, c.duration, None);
        }
        log_closed(&Closed {
            id: c.id,
            peer: c.peer,
            via: c.via,
            worker: Some(c.worker),
            tenant: &self.tenant,
            usage: Some(Usage {
                bytes_in: 0,
                bytes_out: 0,
                memory: 0,
            }),
            duration: Some(c.duration),
            outcome,
            error,
            level: Level::Info,
        });
        Ending {
            outcome,
            error: error.map(str::to_string),
        }
    }

    pub(crate) fn handler(&self) -> &Handler {
        &self.handler
    }

    pub(crate) fn engine(&self) -> &Engine {
        self.handler.engine()
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves a raw-world `conn` to the end on the calling thread, logs its
    /// line and returns how it ended. `worker` names the thread or process.
    /// (`conn::dispatch` picks this or the HTTP path.)
    pub(crate) fn serve(&self, conn: Accepted, worker: &str) -> Ending {
        // Every wait of a blocking connection happens in poll(2) inside the
        // future: it is ready at its first poll.
        block_on(self.serve_with(conn, worker, Waits::Blocking))
    }

    /// Serves `conn` to the end as a task of an async runtime: the guest
    /// runs on a fiber that is suspended whenever it waits (for its client,
    /// a timer, or its turn after an epoch tick), never blocking the
    /// runtime's thread. Same store, limits, outcome, line and counters as
    /// [`Service::serve`].
    pub(crate) async fn serve_async(&self, conn: Accepted, worker: &str) -> Ending {
        self.serve_with(conn, worker, Waits::Async).await
    }

    async fn serve_with(&self, conn: Accepted, worker: &str, waits: Waits) -> Ending {
        let started = Instant::now();
        let Accepted {
            stream,
            peer,
            id,
            local,
        } = conn;
        // (`TCP_NODELAY` is the listener's, inherited: `prepare_for_accept`.)
        let local = local.map_or_else(|| local_of(&stream), |local| local.to_string());
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
        let (peer, via) = match self.proxied(&socket, peer).await {
            Ok(named) => named,
            Err(refused) => {
                drop(live);
                drop(socket);
                return self.refuse(refused, id, worker, started);
            }
        };
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
        let ending = classify(result, &socket, limiter.as_ref());
        close(&socket, ending.outcome).await;
        drop(live);

        let bytes_in = socket.traffic.bytes_in.load(Ordering::Relaxed);
        let bytes_out = socket.traffic.bytes_out.load(Ordering::Relaxed);
        // The last reference: the descriptor is closed before the line says
        // "closed".
        drop(socket);
        let memory = limiter.as_ref().map(|l| l.peak() as u64);
        let duration = started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.record(ending.outcome, bytes_in, bytes_out, duration, memory);
        }
        log_closed(&Closed {
            id,
            peer: &peer,
            via: via.as_ref(),
            worker: Some(worker),
            tenant: &self.tenant,
            usage: Some(Usage {
                bytes_in,
                bytes_out,
                memory: memory.unwrap_or(0),
            }),
            duration: Some(duration),
            outcome: ending.outcome,
            error: ending.error.as_deref(),
            level: Level::Info,
        });
        ending
    }

    /// Ends every connection this process is serving: guests running wasm
    /// trap at their next epoch check, guests waiting on their socket wake
    /// up to an error, and queued connections are closed unserved.
    pub(crate) fn abort_all(&self) {
        self.aborting.store(true, Ordering::SeqCst);
        self.http_phase.abort();
        for socket in self.lock_live().values() {
            socket.abort();
        }
        self.clock.expire_all(self.engine(), self.limits.timeout);
    }

    /// The accept loop has stopped: HTTP connections finish the request
    /// in flight and close; idle ones close now. (A raw connection is one
    /// call: it simply runs to its end.)
    pub(crate) fn drain(&self) {
        self.http_phase.drain();
    }

    pub(crate) fn http_phase(&self) -> &Phase {
        &self.http_phase
    }

    pub(crate) fn clock(&self) -> EpochClock {
        self.clock
    }

    /// Whether `peer` is a balancer whose connections start with a PROXY
    /// protocol header.
    pub(crate) fn takes_proxy_header(&self, peer: &Peer) -> bool {
        self.balancer(peer).is_some()
    }

    /// Counts and logs a connection the host could not start serving
    /// (outcome `host-error`).
    pub(crate) fn not_served(&self, conn: Accepted, worker: &str, why: &str) -> Ending {
        let Accepted {
            stream, peer, id, ..
        } = conn;
        drop(stream);
        self.unserved_error(id, &peer, worker, why)
    }

    /// [`Service::not_served`] once the socket is closed.
    pub(crate) fn unserved_error(&self, id: u64, peer: &Peer, worker: &str, why: &str) -> Ending {
        let unserved = Unserved {
            id,
            peer,
            via: None,
            worker,
            duration: Duration::ZERO,
        };
        self.unserved(unserved, Outcome::HostError, Some(why))
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Socket>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection that ends before any guest runs, as its line tells it.
pub(super) struct Unserved<'a> {
    pub(super) id: u64,
    pub(super) peer: &'a Peer,
    pub(super) via: Option<&'a Peer>,
    pub(super) worker: &'a str,
    pub(super) duration: Duration,
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

/// Ends the connection after the guest: the output was flushed when its
/// stream was dropped with the store. A normal end sends FIN; unless the
/// guest read the client's end of input, it then drains what the client
/// still sends (bounded) so the close does not turn into a reset.
/// An end that cut the reply short (a timeout, shutdown, trap or memory limit,
/// or output left unsent) resets the connection, so the client cannot take a
/// truncated reply for a whole one.
pub(super) async fn close(socket: &Socket, outcome: Outcome) {
    // A reply cut short must not look complete: reset instead of FIN.
    let cut_short = matches!(
        outcome,
        Outcome::Timeout | Outcome::Shutdown | Outcome::Trap | Outcome::MemoryLimit
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
    if outcome == Outcome::IdleTimeout {
        // The client has been silent (or not reading) for the idle
        // timeout already: close now, not after a linger on top of it.
        return;
    }
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    // On the heap: a buffer held across the `.await` below would be part of
    // every connection's future, this path taken or not (9 KiB instead of
    // under 2: moved per connection, and held per live async connection).
    let mut buf = vec![0u8; 8192];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `serve` returns, without making one.
    fn future_size<'a, F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'a Service, Accepted, &'a str, Waits) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// A connection's future holds only what lives across its awaits: it is
    /// moved once per blocking connection, and an async worker holds one per
    /// live connection. (A buffer kept across an await once made it 9 KiB.)
    #[test]
    fn a_connections_future_stays_small() {
        let size = future_size(Service::serve_with);
        assert!(size <= 4096, "the connection's future is {size} bytes");
    }
}
