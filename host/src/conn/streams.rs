//! The guest's two streams over the connection's [`Socket`]: the
//! `input-stream` it reads the client's bytes from and the `output-stream` it
//! writes its reply to. Every operation tries the socket without blocking
//! first; a blocking one waits as the socket's strategy waits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wasmtime_wasi_io::bytes::{Bytes, BytesMut};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{InputStream, OutputStream, StreamError, StreamResult};

use crate::conn::socket::{block_on, Interest, Socket, Waits, CHUNK};

/// The `input-stream` a handler reads the client's bytes from.
pub(crate) struct SocketInput {
    socket: Arc<Socket>,
    at_end: bool,
}

impl SocketInput {
    pub(crate) fn new(socket: Arc<Socket>) -> Self {
        SocketInput {
            socket,
            at_end: false,
        }
    }
}

#[wasmtime_wasi_io::async_trait]
impl Pollable for SocketInput {
    async fn ready(&mut self) {
        if !self.at_end && self.socket.expiry().is_none() {
            self.socket.wait(Interest::Read).await;
        }
    }
}

#[wasmtime_wasi_io::async_trait]
impl InputStream for SocketInput {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        if self.at_end {
            return Err(StreamError::Closed);
        }
        if let Some(err) = self.socket.expiry() {
            return Err(err);
        }
        let size = size.min(CHUNK);
        if size == 0 {
            return Ok(Bytes::new());
        }
        match self.socket.recv_now(size) {
            Ok(None) => Ok(Bytes::new()),
            Ok(Some(bytes)) if bytes.is_empty() => {
                self.at_end = true;
                self.socket
                    .traffic
                    .input_ended
                    .store(true, Ordering::Relaxed);
                Err(StreamError::Closed)
            }
            Ok(Some(bytes)) => Ok(bytes),
            Err(err) => {
                self.at_end = true;
                Err(self.socket.failed(err))
            }
        }
    }

    async fn blocking_read(&mut self, size: usize) -> StreamResult<Bytes> {
        loop {
            let bytes = self.read(size)?;
            if !bytes.is_empty() || size == 0 {
                return Ok(bytes);
            }
            // A blocking call waits on this stream alone: on a worker
            // thread, in poll(2) rather than through the reactor (and its
            // cross-thread wake-up); under async, suspended on the reactor.
            // An abort shuts the socket down, which ends the wait too.
            if !self.socket.wait_here(Interest::Read).await {
                return Err(self.socket.expiry().unwrap_or(StreamError::Closed));
            }
        }
    }
}

/// The `output-stream` a handler writes the client's reply to. Bytes the
/// socket cannot take at once wait in a buffer of at most [`CHUNK`] bytes; a
/// dropped stream sends what is left before it goes (within the idle timeout).
pub(crate) struct SocketOutput {
    socket: Arc<Socket>,
    pending: BytesMut,
    /// A flush is under way: `check-write` answers 0 until `pending` is sent.
    flushing: bool,
    closed: bool,
}

impl SocketOutput {
    pub(crate) fn new(socket: Arc<Socket>) -> Self {
        SocketOutput {
            socket,
            pending: BytesMut::new(),
            flushing: false,
            closed: false,
        }
    }

    /// Sends as much of `pending` as the socket takes now.
    fn push_pending(&mut self) -> StreamResult<()> {
        while !self.pending.is_empty() {
            match self.socket.send_now(&self.pending) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = self.pending.split_to(n);
                }
                Err(err) => {
                    self.closed = true;
                    self.pending.clear();
                    return Err(self.socket.failed(err));
                }
            }
        }
        Ok(())
    }

    fn usable(&self) -> StreamResult<()> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        match self.socket.expiry() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

#[wasmtime_wasi_io::async_trait]
impl Pollable for SocketOutput {
    async fn ready(&mut self) {
        if !self.pending.is_empty() && !self.closed && self.socket.expiry().is_none() {
            self.socket.wait(Interest::Write).await;
        }
    }
}

#[wasmtime_wasi_io::async_trait]
impl OutputStream for SocketOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.usable()?;
        if bytes.len() > CHUNK - self.pending.len() {
            return Err(StreamError::trap(
                "write of more bytes than check-write permitted",
            ));
        }
        if self.pending.is_empty() {
            let sent = match self.socket.send_now(&bytes) {
                Ok(n) => n,
                Err(err) => {
                    self.closed = true;
                    return Err(self.socket.failed(err));
                }
            };
            self.pending.extend_from_slice(&bytes[sent..]);
        } else {
            self.pending.extend_from_slice(&bytes);
            self.push_pending()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.usable()?;
        self.push_pending()?;
        self.flushing = !self.pending.is_empty();
        Ok(())
    }

    /// Waits for room without wasmtime-wasi's attempt limit: a slow reader
    /// may free the buffer a little at a time. Bounded by the idle timeout
    /// and the deadline, like every wait.
    async fn write_ready(&mut self) -> StreamResult<usize> {
        loop {
            let room = self.check_write()?;
            if room > 0 {
                return Ok(room);
            }
            // Waits on this stream alone, as `blocking_read` does.
            if !self.socket.wait_here(Interest::Write).await {
                return Err(self.socket.expiry().unwrap_or(StreamError::Closed));
            }
        }
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.usable()?;
        self.push_pending()?;
        if self.flushing {
            if !self.pending.is_empty() {
                return Ok(0);
            }
            self.flushing = false;
        }
        Ok(CHUNK - self.pending.len())
    }
}

impl Drop for SocketOutput {
    /// What the socket takes now is sent, and the rest goes to the socket
    /// ([`Socket::finish_output`]). On a worker thread it is sent at once,
    /// waiting as the stream waits (the guest may wait for the client's
    /// answer to it next). Under async a drop must not block the runtime's
    /// thread: the rest is sent once `handle` returns, so an async guest
    /// flushes what it wants read before it waits for an answer. Nothing is
    /// sent after the connection's deadline, an abort or an idle timeout.
    fn drop(&mut self) {
        if self.closed || self.pending.is_empty() {
            return;
        }
        if self.socket.expiry().is_some() {
            self.socket
                .traffic
                .output_lost
                .store(true, Ordering::Relaxed);
            return;
        }
        if self.push_pending().is_err() || self.pending.is_empty() {
            return;
        }
        self.socket
            .leftover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&self.pending);
        if self.socket.waits == Waits::Blocking {
            block_on(self.socket.finish_output());
        }
    }
}
