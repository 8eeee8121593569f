//! The HTTP connection's byte stream as hyper sees it: the accepted TCP or
//! Unix socket on the current tokio runtime, counting the bytes each way
//! and enforcing `--idle-timeout` (a read that waits that long while no
//! request is in flight, or any write that waits that long, fails with
//! `TimedOut`); and `Logged`, a response body that counts what was sent and
//! says, when hyper drops it, whether it was sent whole.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::Sleep;

/// What a connection's traffic came to, shared by its stream, its
/// requests and its line.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) bytes_in: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    /// Requests whose response is not finished yet: while there is one, a
    /// silent client is the guest's business (bounded by `--timeout`).
    pub(super) busy: AtomicUsize,
    /// The connection's task, if a read found the connection busy: woken
    /// when the last response finishes, so the read arms its idle timer
    /// (nothing else would poll it again until the client spoke).
    pub(super) idle_waiter: Mutex<Option<Waker>>,
    /// A read or write waited the idle timeout.
    pub(super) idle_timed_out: AtomicBool,
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// One direction's idle timer: armed when a wait starts, disarmed when
/// bytes move; its `Sleep` is made once and reset after that (a keep-alive
/// connection arms it between every two requests).
#[derive(Default)]
struct IdleTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    /// Whether `idle` has passed since the wait started; arms the timer
    /// if this is the wait's first poll.
    fn expired(&mut self, idle: Duration, cx: &mut Context<'_>) -> bool {
        let deadline = tokio::time::Instant::now() + idle;
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if !self.armed {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        sleep.as_mut().poll(cx).is_ready()
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

/// The socket, counted and bounded by the idle timeout.
pub(super) struct Io {
    stream: Stream,
    counters: Arc<Counters>,
    idle: Duration,
    read_idle: IdleTimer,
    write_idle: IdleTimer,
}

impl Io {
    /// Registers `socket` with the current runtime (call inside it).
    pub(super) fn new(
        socket: socket2::Socket,
        tcp: bool,
        idle: Duration,
        counters: Arc<Counters>,
    ) -> io::Result<Io> {
        socket.set_nonblocking(true)?;
        let stream = if tcp {
            Stream::Tcp(tokio::net::TcpStream::from_std(socket.into())?)
        } else {
            let fd: std::os::fd::OwnedFd = socket.into();
            Stream::Unix(tokio::net::UnixStream::from_std(fd.into())?)
        };
        Ok(Io {
            stream,
            counters,
            idle,
            read_idle: IdleTimer::default(),
            write_idle: IdleTimer::default(),
        })
    }

    fn timed_out(&self) -> io::Error {
        self.counters.idle_timed_out.store(true, Ordering::Relaxed);
        io::Error::new(io::ErrorKind::TimedOut, "idle timeout")
    }
}

use std::future::Future as _;

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        match polled {
            Poll::Pending => {
                if this.counters.busy.load(Ordering::SeqCst) > 0 {
                    this.read_idle.disarm();
                    *this
                        .counters
                        .idle_waiter
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
                    // The last response may have finished just before the
                    // waker was left: then nobody will wake it; time now.
                    if this.counters.busy.load(Ordering::SeqCst) > 0 {
                        return Poll::Pending;
                    }
                }
                if this.read_idle.expired(this.idle, cx) {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Pending
            }
            Poll::Ready(result) => {
                this.read_idle.disarm();
                let n = buf.filled().len() - before;
                this.counters
                    .bytes_in
                    .fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(result)
            }
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.stream {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        };
        match polled {
            Poll::Pending => {
                if this.write_idle.expired(this.idle, cx) {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Pending
            }
            Poll::Ready(result) => {
                this.write_idle.disarm();
                if let Ok(n) = &result {
                    this.counters
                        .bytes_out
                        .fetch_add(*n as u64, Ordering::Relaxed);
                }
                Poll::Ready(result)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How a response body ended, as [`Logged`] reports it when dropped.
#[derive(Clone, Copy, Debug)]
pub(super) struct BodyEnd {
    /// Body bytes handed to hyper.
    pub(super) bytes: u64,
    /// The body reached its end.
    pub(super) complete: bool,
    /// The body itself failed (the guest dropped it unfinished, trapped, or
    /// ran out of time while writing it).
    pub(super) failed: bool,
}

/// The error a response body may end with.
pub(super) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body (the guest's, or one the host wrote) that counts its
/// bytes and sends how it ended once hyper is done with it.
pub(super) struct Logged {
    inner: http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>,
    end: BodyEnd,
    /// The body's length, when its head says it (`content-length`): hyper
    /// stops polling once it has sent that many bytes.
    length: Option<u64>,
    report: Option<oneshot::Sender<BodyEnd>>,
    counters: Arc<Counters>,
}

impl Logged {
    pub(super) fn new(
        inner: http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>,
        length: Option<u64>,
        report: oneshot::Sender<BodyEnd>,
        counters: Arc<Counters>,
    ) -> Logged {
        Logged {
            length: length.or(inner.size_hint().exact()),
            inner,
            end: BodyEnd {
                bytes: 0,
                complete: false,
                failed: false,
            },
            report: Some(report),
            counters,
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.end.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.end.failed = true,
            Poll::Ready(None) => this.end.complete = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if self.inner.is_end_stream() || self.length == Some(self.end.bytes) {
            self.end.complete = true;
        }
        if self.counters.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            let waiter = self
                .counters
                .idle_waiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(waker) = waiter {
                waker.wake();
            }
        }
        if let Some(report) = self.report.take() {
            let _ = report.send(self.end);
        }
    }
}
