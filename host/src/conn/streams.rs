//! The guest's two streams over the connection's [`Socket`]: the
//! `input-stream` it reads the client's bytes from and the `output-stream` it
//! writes its reply to. Every operation tries the socket without blocking
//! first; a blocking one waits as the socket's strategy waits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wasmtime_wasi_io::bytes::{Bytes, BytesMut};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{InputStream, OutputStream, StreamError, StreamResult};

use crate::conn::socket::{Interest, Socket, Waits, CHUNK};
use crate::wasm::direct_streams::block_on;

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

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    fn socket_over(
        stream: impl Into<socket2::Socket>,
        idle: Duration,
        timeout: Duration,
    ) -> Arc<Socket> {
        Socket::new(
            stream.into(),
            idle,
            Instant::now() + timeout,
            Waits::Blocking,
        )
    }

    /// The host's socket and its client, over a Unix socket pair.
    fn pair(idle: Duration, timeout: Duration) -> (Arc<Socket>, UnixStream) {
        let (ours, client) = UnixStream::pair().unwrap();
        (socket_over(ours, idle, timeout), client)
    }

    fn flag(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.load(Ordering::Relaxed)
    }

    fn error_text(err: StreamError) -> String {
        match err {
            StreamError::LastOperationFailed(e) => e.to_string(),
            StreamError::Closed => "closed".to_string(),
            StreamError::Trap(e) => format!("trap: {e}"),
        }
    }

    #[test]
    fn reads_what_is_there_without_waiting_then_the_end_of_input() {
        let (socket, mut client) = pair(LONG, LONG);
        let mut input = SocketInput::new(socket.clone());
        // Nothing sent yet: an empty read, not a wait.
        assert!(input.read(16).unwrap().is_empty());
        assert!(input.read(0).unwrap().is_empty());
        client.write_all(b"hello, host").unwrap();
        assert_eq!(&input.read(5).unwrap()[..], b"hello");
        let rest = block_on(input.blocking_read(64)).unwrap();
        assert_eq!(&rest[..], b", host");
        drop(client);
        assert!(matches!(
            block_on(input.blocking_read(64)),
            Err(StreamError::Closed)
        ));
        // The end of input is remembered, and told to the host.
        assert!(matches!(input.read(1), Err(StreamError::Closed)));
        assert!(flag(&socket.traffic.input_ended));
        assert_eq!(socket.traffic.bytes_in.load(Ordering::Relaxed), 11);
    }

    #[test]
    fn a_read_hands_at_most_one_chunk() {
        let (socket, mut client) = pair(LONG, LONG);
        let mut input = SocketInput::new(socket);
        let sender = std::thread::spawn(move || {
            client.write_all(&vec![7u8; 3 * CHUNK]).unwrap();
            client
        });
        let mut got = 0;
        while got < 3 * CHUNK {
            let bytes = block_on(input.blocking_read(usize::MAX)).unwrap();
            assert!(!bytes.is_empty() && bytes.len() <= CHUNK);
            got += bytes.len();
        }
        drop(sender.join().unwrap());
    }

    /// Reads of every size hand exactly the bytes sent, in order: small
    /// ones (copied out of a buffer on the stack), the first that fills it,
    /// and those after it (straight into a buffer of the size asked for),
    /// including a read of fewer bytes than are waiting. Every piece is kept
    /// to the end, so a piece that shared memory with a later read would
    /// show.
    #[test]
    fn reads_of_every_size_hand_exactly_what_was_sent() {
        let (socket, mut client) = pair(LONG, LONG);
        let mut input = SocketInput::new(socket.clone());
        let mut sent = Vec::new();
        let mut pieces = Vec::new();
        for (i, (len, ask)) in [
            (3, CHUNK),
            (4095, CHUNK),
            (1, 1),
            (4096, CHUNK),
            (4097, CHUNK),
            (40_000, 3),
            (2, CHUNK),
            (CHUNK, CHUNK),
        ]
        .into_iter()
        .enumerate()
        {
            let bytes: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            client.write_all(&bytes).unwrap();
            sent.extend_from_slice(&bytes);
            let piece = block_on(input.blocking_read(ask)).unwrap();
            assert!(
                !piece.is_empty() && piece.len() <= ask.min(CHUNK),
                "read {i}"
            );
            pieces.push(piece);
            // Take the rest of what was sent before the next size.
            let mut got: usize = pieces.iter().map(|p| p.len()).sum();
            while got < sent.len() {
                let piece = block_on(input.blocking_read(CHUNK)).unwrap();
                got += piece.len();
                pieces.push(piece);
            }
        }
        assert_eq!(pieces.concat(), sent);
        assert_eq!(
            socket.traffic.bytes_in.load(Ordering::Relaxed),
            sent.len() as u64
        );
    }

    #[test]
    fn a_silent_client_ends_a_blocking_read_at_the_idle_timeout() {
        let (socket, _client) = pair(Duration::from_millis(50), LONG);
        let mut input = SocketInput::new(socket.clone());
        let started = Instant::now();
        let err = block_on(input.blocking_read(16)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(error_text(err), "idle timeout");
        assert!(flag(&socket.traffic.idle_timed_out));
        assert!(!flag(&socket.traffic.timed_out));
        // The stream refuses any more I/O.
        assert_eq!(error_text(input.read(1).unwrap_err()), "idle timeout");
    }

    #[test]
    fn no_wait_outlasts_the_deadline() {
        let (socket, mut client) = pair(LONG, Duration::from_millis(50));
        let mut input = SocketInput::new(socket.clone());
        let err = block_on(input.blocking_read(16)).unwrap_err();
        assert_eq!(error_text(err), "timeout");
        assert!(flag(&socket.traffic.timed_out));
        assert!(!flag(&socket.traffic.idle_timed_out));
        // After the deadline nothing is read or written for the guest, even
        // what is there.
        client.write_all(b"late").unwrap();
        assert_eq!(error_text(input.read(4).unwrap_err()), "timeout");
        let mut output = SocketOutput::new(socket.clone());
        assert_eq!(error_text(output.check_write().unwrap_err()), "timeout");
    }

    #[test]
    fn an_abort_ends_the_streams() {
        let (socket, _client) = pair(LONG, LONG);
        let mut input = SocketInput::new(socket.clone());
        socket.abort();
        assert!(socket.must_stop());
        let err = block_on(input.blocking_read(16)).unwrap_err();
        assert_eq!(error_text(err), "the host is shutting down");
    }

    /// Fills the socket while the client reads nothing: writes go partly
    /// to the socket and partly to the stream's buffer, `check-write` stops
    /// granting room, a flush is only done once the client reads, and the
    /// client gets every byte in order.
    #[test]
    fn partial_writes_are_buffered_and_all_arrive() {
        let (socket, client) = pair(LONG, LONG);
        let mut output = SocketOutput::new(socket.clone());
        let mut written = 0u64;
        let pattern = |i: u64| (i % 251) as u8;
        loop {
            let room = output.check_write().unwrap();
            if room == 0 {
                break;
            }
            let bytes: Vec<u8> = (written..written + room as u64).map(pattern).collect();
            output.write(Bytes::from(bytes)).unwrap();
            written += room as u64;
        }
        // More than check-write granted is the guest's error.
        let too_much = output.write(Bytes::from(vec![0u8; CHUNK + 1])).unwrap_err();
        assert!(matches!(too_much, StreamError::Trap(_)));
        output.flush().unwrap();
        assert_eq!(output.check_write().unwrap(), 0, "a flush is under way");
        let sent = socket.traffic.bytes_out.load(Ordering::Relaxed);
        assert!(
            sent < written,
            "the socket took everything: {sent} of {written}"
        );

        let reader = std::thread::spawn(move || {
            let mut client = client;
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        // Waits until the flush is done: the client reads meanwhile.
        let room = block_on(output.write_ready()).unwrap();
        assert_eq!(room, CHUNK);
        // The last bytes wait in the buffer when the stream is dropped; on a
        // worker thread the drop sends them.
        output.write(Bytes::from_static(b"end")).unwrap();
        drop(output);
        // The host's end of the connection: the client reads to its end.
        socket.stream().shutdown(std::net::Shutdown::Write).unwrap();
        let all = reader.join().unwrap();
        assert_eq!(all.len() as u64, written + 3);
        assert!(all[..written as usize]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i as u64)));
        assert_eq!(&all[written as usize..], b"end");
        assert_eq!(
            socket.traffic.bytes_out.load(Ordering::Relaxed),
            written + 3
        );
        assert!(!flag(&socket.traffic.output_lost));
    }

    #[test]
    fn a_client_gone_before_the_reply_is_a_reset() {
        let (socket, client) = pair(LONG, LONG);
        drop(client);
        let mut output = SocketOutput::new(socket.clone());
        let err = output.write(Bytes::from_static(b"reply")).unwrap_err();
        assert!(matches!(err, StreamError::LastOperationFailed(_)));
        assert!(flag(&socket.traffic.client_reset));
        // The stream is closed for good.
        assert!(matches!(output.check_write(), Err(StreamError::Closed)));
    }

    #[test]
    fn output_left_after_the_deadline_is_lost_not_sent() {
        let (socket, _client) = pair(LONG, Duration::from_millis(100));
        let mut output = SocketOutput::new(socket.clone());
        // Fill the socket, so something stays in the stream's buffer.
        while let Ok(room) = output.check_write() {
            if room == 0 {
                break;
            }
            output.write(Bytes::from(vec![1u8; room])).unwrap();
        }
        let deadline_passed = block_on(output.write_ready()).unwrap_err();
        assert_eq!(error_text(deadline_passed), "timeout");
        drop(output);
        assert!(flag(&socket.traffic.output_lost));
    }

    #[test]
    fn the_streams_work_over_tcp_too() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let socket = socket_over(ours, LONG, LONG);
        let mut input = SocketInput::new(socket.clone());
        let mut output = SocketOutput::new(socket.clone());
        client.write_all(b"ping").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(&block_on(input.blocking_read(16)).unwrap()[..], b"ping");
        assert!(matches!(
            block_on(input.blocking_read(16)),
            Err(StreamError::Closed)
        ));
        output.write(Bytes::from_static(b"pong")).unwrap();
        output.flush().unwrap();
        drop(output);
        drop(input);
        drop(socket);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"pong");
    }
}
