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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The log lines (messages only) written while `run` runs.
    fn logged(run: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    fn write(log: &GuestLog, bytes: &[u8]) {
        let mut stream = log.clone();
        OutputStream::write(&mut stream, Bytes::copy_from_slice(bytes)).unwrap();
    }

    #[test]
    fn each_line_is_one_log_line_tagged_and_escaped() {
        let lines = logged(|| {
            let output = GuestOutput::new(7);
            let stdout = output.stream("stdout");
            let stderr = output.stream("stderr");
            write(&stdout, b"hello ");
            write(&stdout, b"world\r\nforged\x1b[31m line\n");
            write(&stderr, b"oops\n");
            write(&stdout, b"no newline at the end");
        });
        assert_eq!(
            lines,
            [
                "connection 7 stdout: hello world",
                "connection 7 stdout: forged\\u{1b}[31m line",
                "connection 7 stderr: oops",
                "connection 7 stdout: no newline at the end",
            ]
        );
    }

    #[test]
    fn a_long_line_is_logged_in_pieces() {
        let lines = logged(|| {
            let output = GuestOutput::new(1);
            write(&output.stream("stdout"), &vec![b'x'; 2 * MAX_LINE + 10]);
        });
        let lengths: Vec<usize> = lines
            .iter()
            .map(|l| l.strip_prefix("connection 1 stdout: ").unwrap().len())
            .collect();
        assert_eq!(lengths, [MAX_LINE, MAX_LINE, 10]);
    }

    /// 1000 lines of 100 bytes: each costs its text and [`LINE_COST`], so
    /// 399 fit whole, the 400th is cut to what is left, and the rest (with
    /// their newlines) are counted in the one line that says so.
    #[test]
    fn the_budget_bounds_what_one_connection_logs() {
        let lines = logged(|| {
            let output = GuestOutput::new(3);
            let stdout = output.stream("stdout");
            let stderr = output.stream("stderr");
            for i in 0..1000 {
                let stream = if i % 2 == 0 { &stdout } else { &stderr };
                write(stream, &[b'a'; 100]);
                write(stream, b"\n");
            }
        });
        let (guest, host): (Vec<_>, Vec<_>) = lines
            .iter()
            .partition(|l| l.starts_with("connection 3 std"));
        assert_eq!(guest.len(), 400);
        let text: usize = guest
            .iter()
            .map(|l| l.len() - "connection 3 stdout: ".len())
            .sum();
        assert_eq!(text, 399 * 100 + 36);
        assert!(text + 400 * LINE_COST <= LOG_BUDGET);
        assert_eq!(
            host,
            [&format!(
                "connection 3 output: {} more bytes of guest output not logged (limit {LOG_BUDGET} bytes per connection, {LINE_COST} per line)",
                64 + 600 * 101
            )]
        );
    }

    /// Empty lines cost the budget too: a flood of them stops being logged.
    #[test]
    fn a_flood_of_empty_lines_is_bounded() {
        let lines = logged(|| {
            let output = GuestOutput::new(4);
            write(&output.stream("stdout"), &[b'\n'; 2000]);
        });
        let logged_lines = LOG_BUDGET / LINE_COST - 1;
        assert_eq!(lines.len(), logged_lines + 1);
        assert!(lines[..logged_lines]
            .iter()
            .all(|l| l == "connection 4 stdout: "));
        assert!(lines[logged_lines].starts_with(&format!(
            "connection 4 output: {} more bytes",
            2000 - logged_lines
        )));
    }

    #[test]
    fn nothing_is_said_of_a_budget_not_exceeded() {
        let lines = logged(|| {
            let output = GuestOutput::new(5);
            write(&output.stream("stderr"), b"fine\n");
        });
        assert_eq!(lines, ["connection 5 stderr: fine"]);
    }
}
