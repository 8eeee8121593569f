//! The connection's socket (TCP or Unix-domain) as the guest's streams see
//! it: the `input-stream` and `output-stream` resources a handler receives
//! (`conn::streams`) are implemented directly over this [`Socket`], which
//! keeps how they wait, the connection's deadline and what happened on it.
//!
//! Every operation first tries the socket without blocking (`recv`/`send` with
//! `MSG_DONTWAIT`), so data that is already there costs one system call. How
//! a blocking call on one stream (`blocking-read`, `blocking-flush`, ...)
//! then waits depends on the strategy ([`Waits`]): on a worker thread it
//! waits in poll(2) on that thread; under `async` it awaits the socket's
//! readiness from the tokio reactor, so the guest's fiber is suspended and
//! the runtime thread serves other connections meanwhile. A pollable
//! (`subscribe`) always waits through the reactor, so a guest that polls a
//! stream together with other pollables (a timer, the other direction)
//! waits on all of them at once. No task is spawned per stream.
//!
//! Output the guest wrote but the socket could not take yet when the output
//! stream is dropped is handed to the [`Socket`], and the connection sends
//! it ([`Socket::finish_output`]) before it closes. A wait that sees no progress
//! for the idle timeout fails the stream with an `idle timeout` error, and no
//! wait outlasts the connection's deadline (`--timeout`): a guest blocked in
//! I/O is stopped by it as surely as one spinning in wasm code.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use wasmtime_wasi_io::bytes::{Bytes, BytesMut};
use wasmtime_wasi_io::streams::StreamError;

pub(crate) use crate::sys::socket::Interest;
use crate::sys::socket::{poll_one, recv_nonblocking, recv_uninit_nonblocking, send_nonblocking};
use crate::wasm::guest_clock::Deadline;

/// The most one read hands the guest, and the most the output stream buffers
/// before `check-write` asks the guest to wait.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The most a read takes into a buffer on the stack, to copy out only the
/// bytes that came (see [`Socket::recv_now`]).
const SMALL_READ: usize = 4096;

/// How a stream waits for its socket when the guest asks it to block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waits {
    /// In poll(2), blocking the calling thread (threading, prefork, forking).
    Blocking,
    /// On the tokio reactor, suspending the guest's fiber (async).
    Async,
}

/// The accepted socket, shared by the connection's two streams and the host.
pub(crate) struct Socket {
    /// Registered with the tokio reactor the first time a stream must wait.
    /// Declared before `stream`: it must be dropped (deregistered) before the
    /// descriptor closes.
    reactor: OnceLock<AsyncFd<RawFdRef>>,
    stream: socket2::Socket,
    idle_timeout: Duration,
    /// When the connection's `--timeout` runs out.
    deadline: Instant,
    /// Wakes guest waits that are not on the socket (sleeps) at an abort.
    abort_notify: tokio::sync::Notify,
    pub(super) waits: Waits,
    /// What the output stream still held when it was dropped.
    pub(super) leftover: std::sync::Mutex<BytesMut>,
    /// A read filled [`SMALL_READ`]: the client sends in bulk, and reads go
    /// straight into a buffer of the size the guest asks for.
    bulk: AtomicBool,
    pub(crate) traffic: Traffic,
}

/// What happened on a connection, read by the host once `handle` returns.
#[derive(Default)]
pub(crate) struct Traffic {
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// A wait saw no progress for the idle timeout.
    pub(crate) idle_timed_out: AtomicBool,
    /// A wait reached the connection's deadline.
    pub(crate) timed_out: AtomicBool,
    /// The host ended the connection early (shutdown).
    pub(crate) aborted: AtomicBool,
    /// Output the guest wrote was dropped unsent.
    pub(crate) output_lost: AtomicBool,
    /// The client reset the connection or stopped reading for good.
    pub(crate) client_reset: AtomicBool,
    /// The guest read the client's end of input (FIN): nothing the client
    /// sent is left unread.
    pub(crate) input_ended: AtomicBool,
}

/// Lets `AsyncFd` watch the socket's descriptor without owning it.
struct RawFdRef(RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Socket {
    pub(crate) fn new(
        stream: socket2::Socket,
        idle_timeout: Duration,
        deadline: Instant,
        waits: Waits,
    ) -> Arc<Socket> {
        Arc::new(Socket {
            stream,
            idle_timeout,
            deadline,
            abort_notify: tokio::sync::Notify::new(),
            reactor: OnceLock::new(),
            waits,
            leftover: std::sync::Mutex::new(BytesMut::new()),
            bulk: AtomicBool::new(false),
            traffic: Traffic::default(),
        })
    }

    /// Whether the connection was aborted (shutdown) or ran past its
    /// deadline: a guest running wasm must stop.
    pub(crate) fn must_stop(&self) -> bool {
        self.traffic.aborted.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }

    /// Sends what the dropped output stream still held, waiting as the
    /// connection's streams wait (bounded by the idle timeout and the
    /// deadline); what cannot be sent marks the output lost. A connection
    /// that already timed out (idle or not) or was aborted waits no more:
    /// the idle timeout bounds the whole stall, not each wait after it.
    /// Call once the guest is gone, before closing.
    pub(crate) async fn finish_output(&self) {
        let mut pending =
            std::mem::take(&mut *self.leftover.lock().unwrap_or_else(|e| e.into_inner()));
        while !pending.is_empty() && self.expiry().is_none() {
            match self.send_now(&pending) {
                Ok(0) => {
                    if !self.wait_here(Interest::Write).await {
                        break;
                    }
                }
                Ok(n) => {
                    let _ = pending.split_to(n);
                }
                Err(err) => {
                    let _ = self.failed(err);
                    break;
                }
            }
        }
        if !pending.is_empty() {
            // Bytes the guest wrote will never arrive: the close must say so.
            self.traffic.output_lost.store(true, Ordering::Relaxed);
        }
    }

    /// Waits for `direction` as this socket's strategy waits: false (and
    /// why recorded) when the idle timeout or the deadline passes first.
    pub(super) async fn wait_here(&self, direction: Interest) -> bool {
        match self.waits {
            Waits::Blocking => self.wait_blocking(direction, self.wait_deadline()),
            Waits::Async => self.wait(direction).await,
        }
    }

    /// Waits up to `limit` for the client to send something (or close):
    /// true if the socket became readable.
    pub(crate) async fn readable_within(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        if self.waits == Waits::Blocking {
            return poll_one(self.stream.as_fd(), Interest::Read, Some(limit)).unwrap_or(false);
        }
        loop {
            if self.ready_now(Interest::Read) {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.reactor() {
                Some(reactor) => {
                    let readable = async { reactor.readable().await.map(|mut g| g.clear_ready()) };
                    match tokio::time::timeout(left, readable).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) | Err(_) => return self.ready_now(Interest::Read),
                    }
                }
                // Never block a runtime thread (see `wait_without_reactor`).
                None => tokio::time::sleep(left.min(Duration::from_millis(5))).await,
            }
        }
    }

    /// The socket itself, once no stream shares it any more (an HTTP
    /// connection after its PROXY protocol header): its reactor
    /// registration, if any, is dropped first.
    pub(crate) fn into_stream(self: Arc<Self>) -> Option<socket2::Socket> {
        let socket = Arc::try_unwrap(self).ok()?;
        drop(socket.reactor);
        Some(socket.stream)
    }

    pub(crate) fn stream(&self) -> &socket2::Socket {
        &self.stream
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether the socket is ready for `direction` right now (or has an error
    /// or hang-up pending, which the next operation reports).
    fn ready_now(&self, direction: Interest) -> bool {
        poll_one(self.stream.as_fd(), direction, Some(Duration::ZERO)).unwrap_or(true)
    }

    /// Ends the connection from the host's side: both directions are shut
    /// down, so a guest waiting on the socket wakes up to an error.
    pub(crate) fn abort(&self) {
        self.traffic.aborted.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.abort_notify.notify_waiters();
    }

    /// Resolves once the connection is aborted.
    pub(crate) async fn aborted(&self) {
        let notified = self.abort_notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read, so no abort is missed.
        notified.as_mut().enable();
        if self.traffic.aborted.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }

    /// The end of a wait starting now: the idle timeout, or the connection's
    /// deadline if that comes first.
    fn wait_deadline(&self) -> Instant {
        (Instant::now() + self.idle_timeout).min(self.deadline)
    }

    /// Records that the connection ran into its `--timeout`.
    pub(crate) fn mark_timed_out(&self) {
        self.traffic.timed_out.store(true, Ordering::Relaxed);
    }

    /// Records why a wait ended without the socket becoming ready.
    fn expired(&self, deadline: Instant) {
        if deadline >= self.deadline {
            self.mark_timed_out();
        } else {
            self.traffic.idle_timed_out.store(true, Ordering::Relaxed);
        }
    }

    /// Waits until the socket is ready for `direction`, without blocking the
    /// executor: other pollables in the same `poll` keep being watched.
    /// Returns false (and records why) when the idle timeout or the
    /// connection's deadline passes first.
    pub(super) async fn wait(&self, direction: Interest) -> bool {
        let deadline = self.wait_deadline();
        loop {
            if self.ready_now(direction) {
                return true;
            }
            let Some(reactor) = self.reactor() else {
                return self.wait_without_reactor(direction, deadline).await;
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let readiness = async {
                match direction {
                    Interest::Read => reactor.readable().await.map(|mut g| g.clear_ready()),
                    Interest::Write => reactor.writable().await.map(|mut g| g.clear_ready()),
                }
            };
            match tokio::time::timeout(remaining, readiness).await {
                // Readiness is re-checked with poll(2) at the top of the loop;
                // clearing tokio's cached readiness first means no edge is lost.
                Ok(Ok(())) => {}
                Ok(Err(_)) => return self.wait_without_reactor(direction, deadline).await,
                Err(_elapsed) => {
                    self.expired(deadline);
                    return false;
                }
            }
        }
    }

    /// A wait when the socket cannot be registered with the reactor (the
    /// system is out of epoll watches or memory): a worker thread blocks in
    /// poll(2); under async, which must never block a runtime thread, the
    /// socket is looked at again every few milliseconds until `deadline`.
    async fn wait_without_reactor(&self, direction: Interest, deadline: Instant) -> bool {
        if self.waits == Waits::Blocking {
            return self.wait_blocking(direction, deadline);
        }
        loop {
            if self.ready_now(direction) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                self.expired(deadline);
                return false;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(5))).await;
        }
    }

    /// Blocks this thread in poll(2) until ready or `deadline`.
    fn wait_blocking(&self, direction: Interest, deadline: Instant) -> bool {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match poll_one(self.stream.as_fd(), direction, Some(remaining)) {
            Ok(true) | Err(_) => true,
            Ok(false) => {
                self.expired(deadline);
                false
            }
        }
    }

    fn reactor(&self) -> Option<&AsyncFd<RawFdRef>> {
        if let Some(reactor) = self.reactor.get() {
            return Some(reactor);
        }
        // Registration needs a tokio runtime in context; wasmtime-wasi enters
        // one around every pollable's wait (and every blocking stream call
        // of a store that is not `wasm::direct_streams`'s), which is where
        // the reactor waits happen. Without one the wait blocks in poll(2).
        tokio::runtime::Handle::try_current().ok()?;
        // SAFETY: the descriptor belongs to `self.stream`, which outlives the
        // registration (see the field order of `Socket`).
        let reactor = unsafe { AsyncFd::register(RawFdRef(self.fd())) }.ok()?;
        Some(self.reactor.get_or_init(|| reactor))
    }

    /// Why the streams may no longer wait, if they may not.
    pub(super) fn expiry(&self) -> Option<StreamError> {
        let traffic = &self.traffic;
        if Instant::now() >= self.deadline {
            // Nothing is read or written for the guest after its deadline.
            self.mark_timed_out();
        }
        if traffic.timed_out.load(Ordering::Relaxed) {
            Some(stream_failure("timeout"))
        } else if traffic.idle_timed_out.load(Ordering::Relaxed) {
            Some(stream_failure("idle timeout"))
        } else if traffic.aborted.load(Ordering::Relaxed) {
            Some(stream_failure("the host is shutting down"))
        } else {
            None
        }
    }

    /// Sends what it can without blocking; `Ok(0)` when the socket is full.
    pub(super) fn send_now(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let err = match send_nonblocking(self.stream.as_fd(), data) {
                Ok(n) => {
                    self.traffic
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(err) => err,
            };
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// Receives at most `size` bytes of what is there without blocking:
    /// `Ok(None)` when nothing is, `Ok(Some(empty))` at end of input.
    ///
    /// Until a read fills [`SMALL_READ`], reads go through a buffer on the
    /// stack and allocate only the bytes that came (nothing for "nothing
    /// yet" or the end of input), not the up to [`CHUNK`] the guest asks
    /// for (a short connection reads about three times). The first read
    /// that fills it returns those bytes (a read may return fewer than
    /// asked); from then on each read goes straight into a buffer of `size`
    /// bytes, handed on as it is (no copy).
    pub(super) fn recv_now(&self, size: usize) -> io::Result<Option<Bytes>> {
        debug_assert!(size <= CHUNK, "a read of {size} bytes");
        loop {
            let received = if size > SMALL_READ && self.bulk.load(Ordering::Relaxed) {
                self.recv_bulk(size)
            } else {
                self.recv_small(size.min(SMALL_READ))
            };
            match received {
                Ok(bytes) => {
                    let n = bytes.len() as u64;
                    self.traffic.bytes_in.fetch_add(n, Ordering::Relaxed);
                    return Ok(Some(bytes));
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) => return Err(err),
            }
        }
    }

    /// One read of at most `len` (<= [`SMALL_READ`]) bytes through a buffer
    /// on the stack, copied out. Not inlined: the buffer stays out of the
    /// bulk reads' frame.
    #[inline(never)]
    fn recv_small(&self, len: usize) -> io::Result<Bytes> {
        let mut small = [MaybeUninit::<u8>::uninit(); SMALL_READ];
        let bytes = recv_uninit_nonblocking(self.stream.as_fd(), &mut small[..len])?;
        if bytes.len() == SMALL_READ {
            self.bulk.store(true, Ordering::Relaxed);
        }
        Ok(Bytes::copy_from_slice(bytes))
    }

    /// One read of at most `size` bytes into a buffer of that size, which
    /// becomes the bytes handed on.
    fn recv_bulk(&self, size: usize) -> io::Result<Bytes> {
        let mut buf = Vec::new();
        recv_nonblocking(self.stream.as_fd(), &mut buf, size)?;
        Ok(Bytes::from(buf))
    }

    /// Records a failure of the socket and turns it into the guest's error.
    pub(super) fn failed(&self, err: io::Error) -> StreamError {
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ) {
            self.traffic.client_reset.store(true, Ordering::Relaxed);
        }
        StreamError::LastOperationFailed(wasmtime::Error::from(err))
    }
}

fn stream_failure(why: &'static str) -> StreamError {
    StreamError::LastOperationFailed(wasmtime::format_err!("{why}"))
}

/// What the guest's sleeps see of the connection (`wasm::guest_clock`).
impl Deadline for Socket {
    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn aborted(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(Socket::aborted(self))
    }

    fn mark_timed_out(&self) {
        Socket::mark_timed_out(self);
    }
}
