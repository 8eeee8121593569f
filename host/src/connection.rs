//! One connection, start to end: a fresh `Store` and instance, the socket
//! wired in as the handler's streams, the `handle` call, the final flush and
//! close, and the one log line that says how it went. This is *what* runs; the
//! strategies only decide *where*.

use std::fmt;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::Store;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};

use crate::guest_log::GuestOutput;
use crate::handler::{one_line, ConnState, ConnectionInfo, Handler};
use crate::net_stream::{poll_fd, Socket, SocketInput, SocketOutput};

/// After `handle` returns, the host reads and drops what the client still
/// sends for at most this long (and at most [`LINGER_BYTES`]), so that closing
/// with unread input does not reset the connection and destroy the reply.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// A connection the accept loop has taken from the listener.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
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
    /// The client sent nothing, or read nothing, for the idle timeout.
    IdleTimeout,
    /// The client reset the connection.
    ClientReset,
    /// The host could not set the connection up (e.g. instantiation failed).
    HostError(String),
}

impl Outcome {
    /// The stable name in log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HandlerError(_) => "handler-error",
            Outcome::Trap(_) => "trap",
            Outcome::IdleTimeout => "idle-timeout",
            Outcome::ClientReset => "client-reset",
            Outcome::HostError(_) => "host-error",
        }
    }

    fn detail(&self) -> Option<&str> {
        match self {
            Outcome::HandlerError(text) | Outcome::Trap(text) | Outcome::HostError(text) => {
                Some(text)
            }
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

/// What every connection of one listener runs: the handler and its settings.
pub struct Service {
    handler: Handler,
    tenant: String,
    idle_timeout: Duration,
}

impl Service {
    pub fn new(handler: Handler, tenant: String, idle_timeout: Duration) -> Service {
        Service {
            handler,
            tenant,
            idle_timeout,
        }
    }

    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    /// Serves `conn` to the end on the calling thread, logs its line and
    /// returns how it ended. `worker` names the thread or process.
    pub fn serve(&self, conn: Accepted, worker: &str) -> Outcome {
        let started = Instant::now();
        let Accepted { stream, peer, id } = conn;
        let local = stream
            .local_addr()
            .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
        // Replies are often one small write: do not hold them back (Nagle).
        let _ = stream.set_nodelay(true);
        let socket = Socket::new(stream, self.idle_timeout);
        let info = ConnectionInfo {
            peer_address: peer.to_string(),
            local_address: local,
            connection_id: id,
            worker: worker.to_string(),
            tenant: self.tenant.clone(),
        };

        let result = self.run_guest(&socket, &info);
        close(&socket);

        let traffic = &socket.traffic;
        let outcome = match result {
            Err(outcome @ (Outcome::Trap(_) | Outcome::HostError(_))) => outcome,
            _ if traffic.idle_timed_out.load(Ordering::Relaxed) => Outcome::IdleTimeout,
            _ if traffic.client_reset.load(Ordering::Relaxed) => Outcome::ClientReset,
            Ok(()) => Outcome::Ok,
            Err(outcome) => outcome,
        };
        tracing::info!(
            "connection {id} closed peer={peer} worker={worker} tenant={} in={} out={} duration={:.3}ms outcome={outcome}",
            self.tenant,
            traffic.bytes_in.load(Ordering::Relaxed),
            traffic.bytes_out.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64() * 1000.0,
        );
        outcome
    }

    /// Instantiates the handler in a fresh store and calls `handle`. The
    /// store, and with it every guest resource, is gone when this returns.
    fn run_guest(&self, socket: &Arc<Socket>, info: &ConnectionInfo) -> Result<(), Outcome> {
        let output_log = GuestOutput::new(info.connection_id);
        let wasi = WasiCtxBuilder::new()
            .stdout(output_log.stream("stdout"))
            .stderr(output_log.stream("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut store = Store::new(
            self.handler.engine(),
            ConnState {
                wasi,
                table: ResourceTable::new(),
            },
        );
        let table = &mut store.data_mut().table;
        let input: DynInputStream = Box::new(SocketInput::new(socket.clone()));
        let output: DynOutputStream = Box::new(SocketOutput::new(socket.clone()));
        let streams = table
            .push(input)
            .and_then(|input| Ok((input, table.push(output)?)));
        let (input, output) =
            streams.map_err(|e| Outcome::HostError(format!("cannot create the streams: {e}")))?;

        let instance =
            self.handler.pre().instantiate(&mut store).map_err(|e| {
                Outcome::HostError(format!("instantiation failed: {}", one_line(&e)))
            })?;
        match instance.call_handle(&mut store, info, input, output) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(text)) => Err(Outcome::HandlerError(text)),
            Err(e) => Err(Outcome::Trap(trap_message(&e))),
        }
    }
}

/// A trap's message without its multi-line wasm backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return format!("wasm trap: {trap}");
    }
    one_line(e)
}

/// Ends the connection after the guest: the output was flushed when its
/// stream was dropped with the store; now send FIN, then drain what the client
/// still sends (bounded) so the close does not turn into a reset.
fn close(socket: &Socket) {
    let stream = socket.stream();
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = [0u8; 8192];
    let mut reader = stream;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        match poll_fd(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::POLLIN,
            Some(left),
        ) {
            Ok(true) => {}
            _ => break,
        }
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
