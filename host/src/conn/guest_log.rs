//! The guest's stdout and stderr: each line becomes a host log line tagged
//! with the connection id (control characters escaped), up to a per-connection budget so a guest that
//! floods its output cannot fill the host's disk.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::bytes::Bytes;
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamResult};

/// Bytes of guest output logged per connection (stdout and stderr together);
/// the rest is counted and dropped.
pub(crate) const LOG_BUDGET: usize = 64 * 1024;
/// A longer line is logged in pieces of this size.
const MAX_LINE: usize = 4096;
/// What each logged line costs the budget beyond its text: the log line's
/// own prefix, so a flood of empty or tiny lines is bounded too.
const LINE_COST: usize = 64;

/// One connection's output budget, shared by its stdout and stderr.
pub(crate) struct GuestOutput {
    connection_id: u64,
    budget: Mutex<Budget>,
}

struct Budget {
    left: usize,
    dropped: u64,
}

impl GuestOutput {
    pub(crate) fn new(connection_id: u64) -> Arc<GuestOutput> {
        Arc::new(GuestOutput {
            connection_id,
            budget: Mutex::new(Budget {
                left: LOG_BUDGET,
                dropped: 0,
            }),
        })
    }

    /// The `StdoutStream` for the guest's stdout (`"stdout"`) or stderr.
    pub(crate) fn stream(self: &Arc<Self>, name: &'static str) -> GuestLog {
        GuestLog {
            shared: Arc::new(Mutex::new(LineBuffer {
                output: self.clone(),
                name,
                line: Vec::new(),
            })),
        }
    }

    fn emit(&self, name: &str, line: &[u8]) {
        let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        if budget.left <= LINE_COST {
            budget.left = 0;
            budget.dropped += line.len() as u64 + 1;
            return;
        }
        budget.left -= LINE_COST;
        let take = line.len().min(budget.left);
        budget.left -= take;
        budget.dropped += (line.len() - take) as u64;
        drop(budget);
        let text = String::from_utf8_lossy(&line[..take]);
        // The guest's text, with its control characters escaped: a line of
        // guest output is one line of the log, never a forged second one.
        tracing::info!(
            "connection {} {name}: {}",
            self.connection_id,
            crate::logging::escape(text.trim_end_matches('\r'))
        );
    }
}

impl Drop for GuestOutput {
    fn drop(&mut self) {
        let budget = self.budget.get_mut().unwrap_or_else(|e| e.into_inner());
        if budget.dropped > 0 {
            tracing::warn!(
                "connection {} output: {} more bytes of guest output not logged (limit {} bytes per connection, {} per line)",
                self.connection_id,
                budget.dropped,
                LOG_BUDGET,
                LINE_COST
            );
        }
    }
}

struct LineBuffer {
    output: Arc<GuestOutput>,
    name: &'static str,
    line: Vec<u8>,
}

impl LineBuffer {
    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    self.push(&data[..pos]);
                    self.flush_line();
                    data = &data[pos + 1..];
                }
                None => {
                    self.push(data);
                    data = &[];
                }
            }
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        while self.line.len() + data.len() > MAX_LINE {
            let room = MAX_LINE - self.line.len();
            self.line.extend_from_slice(&data[..room]);
            self.flush_line();
            data = &data[room..];
        }
        self.line.extend_from_slice(data);
    }

    fn flush_line(&mut self) {
        self.output.emit(self.name, &self.line);
        self.line.clear();
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.flush_line();
        }
    }
}

/// A guest's stdout or stderr, as given to `WasiCtxBuilder::stdout`.
#[derive(Clone)]
pub(crate) struct GuestLog {
    shared: Arc<Mutex<LineBuffer>>,
}

impl GuestLog {
    fn write(&self, data: &[u8]) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(data);
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi_io::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestLog {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestLog::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(crate::conn::socket::CHUNK)
    }
}

impl tokio::io::AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        GuestLog::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
