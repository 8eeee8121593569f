//! A child's stderr as a log: a thread reads it line by line into memory, so
//! the child never blocks on a full pipe, and waiters are woken at each line
//! and at its end.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// The lines read so far, and the waiters' doorbell.
pub(crate) struct Log {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// The first lines of the log (as many as [`Log::follow`] was told to
    /// keep); later ones are read and dropped.
    lines: Vec<String>,
    /// The stream has ended: the child closed it, usually by exiting.
    ended: bool,
}

/// What a wait for log lines did not find.
#[derive(Debug)]
pub struct Missing {
    /// The log ended first (the process exited); otherwise time ran out.
    pub ended: bool,
    /// How many lines matched (for a count of lines).
    pub seen: usize,
    /// The log so far.
    pub lines: Vec<String>,
}

impl Missing {
    /// Why the wait ended, for a message: "the host exited" (`who` is the
    /// process's name) or "timed out".
    pub fn why(&self, who: &str) -> String {
        if self.ended {
            format!("{who} exited")
        } else {
            "timed out".to_string()
        }
    }
}

impl Log {
    /// Starts reading `stream` into a new log that keeps its first `keep`
    /// lines.
    pub(crate) fn follow(stream: impl Read + Send + 'static, keep: usize) -> Arc<Log> {
        let log = Arc::new(Log {
            state: Mutex::new(State {
                lines: Vec::new(),
                ended: false,
            }),
            changed: Condvar::new(),
        });
        let sink = log.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            let mut kept = 0;
            // Until the end or a read error; a line that is not UTF-8 is kept
            // with replacement characters rather than ending the log.
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                if line.ends_with(b"\n") {
                    line.pop();
                    if line.ends_with(b"\r") {
                        line.pop();
                    }
                }
                if kept < keep {
                    kept += 1;
                    let text = String::from_utf8_lossy(&line).into_owned();
                    sink.lock().lines.push(text);
                    sink.changed.notify_all();
                }
                line.clear();
            }
            sink.lock().ended = true;
            sink.changed.notify_all();
        });
        log
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A waiter that panicked left the lines as they were.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().lines.len()
    }

    /// Waits until a line after the first `since` satisfies `matches`, and
    /// returns it.
    pub(crate) fn wait_for_line(
        &self,
        since: usize,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String, Missing> {
        self.wait(within, |lines| {
            lines
                .iter()
                .skip(since)
                .find(|l| matches(l))
                .cloned()
                .ok_or(0)
        })
    }

    /// Waits until at least `count` lines satisfy `matches`.
    pub(crate) fn wait_for_count(
        &self,
        count: usize,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<(), Missing> {
        self.wait(within, |lines| {
            let seen = lines.iter().filter(|l| matches(l)).count();
            if seen >= count {
                Ok(())
            } else {
                Err(seen)
            }
        })
    }

    /// Waits until `found` accepts the lines (or says how many it saw), at
    /// each new line, until the log ends or `within` has passed.
    fn wait<T>(
        &self,
        within: Duration,
        found: impl Fn(&[String]) -> Result<T, usize>,
    ) -> Result<T, Missing> {
        let deadline = Instant::now() + within;
        let mut state = self.lock();
        loop {
            let seen = match found(&state.lines) {
                Ok(found) => return Ok(found),
                Err(seen) => seen,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.ended {
                return Err(Missing {
                    ended: state.ended,
                    seen,
                    lines: state.lines.clone(),
                });
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
