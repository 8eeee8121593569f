//! How one connection went, told once: [`classify`] names its outcome from
//! the host's and the guest's view, and [`log_closed`] writes its `closed`
//! line, the one place that line is formatted, in text and JSON, whoever
//! writes it (the connection itself, the accept loop for a refused peer, or
//! the forking parent for a child that could not write its own).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::Trap;

use crate::conn::socket::Socket;
use crate::listener::Peer;
use crate::outcome::Outcome;
use crate::wasm::limits::InstanceLimiter;
use crate::wasm::one_line;

/// How a connection ended: its outcome, and the error text of the outcomes
/// that carry one (`handler-error`, `trap`, `memory-limit`, `host-error`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ending {
    pub(crate) outcome: Outcome,
    pub(crate) error: Option<String>,
}

impl Ending {
    fn new(outcome: Outcome) -> Ending {
        Ending {
            outcome,
            error: None,
        }
    }

    fn with_error(outcome: Outcome, error: String) -> Ending {
        Ending {
            outcome,
            error: Some(error),
        }
    }
}

impl fmt::Display for Ending {
    /// As the `closed` line ends: `trap error="..."`, or only the name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.outcome.name())?;
        match &self.error {
            Some(error) => write!(f, " error={error:?}"),
            None => Ok(()),
        }
    }
}

/// How a guest call went, before the socket's story is added.
pub(crate) enum CallResult {
    Returned(Result<(), String>),
    Trapped(wasmtime::Error),
    SetupFailed(String),
}

/// Names how the connection ended, from what the guest call returned and
/// what the socket and the memory limiter saw. The host's view wins over the
/// guest's: a handler that fails because its client vanished ended by
/// `client-reset`, not `handler-error`.
pub(crate) fn classify(
    result: CallResult,
    socket: &Socket,
    limiter: Option<&InstanceLimiter>,
) -> Ending {
    let traffic = &socket.traffic;
    let flag = |f: &AtomicBool| f.load(Ordering::Relaxed);
    let failed = !matches!(result, CallResult::Returned(Ok(())));
    if flag(&traffic.aborted) {
        return Ending::new(Outcome::Shutdown);
    }
    if let CallResult::Trapped(e) = &result {
        if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return Ending::new(Outcome::Timeout);
        }
    }
    if flag(&traffic.timed_out) {
        return Ending::new(Outcome::Timeout);
    }
    if failed && limiter.is_some_and(InstanceLimiter::refused) {
        let detail = match &result {
            CallResult::Trapped(e) => trap_message(e),
            CallResult::Returned(Err(text)) => text.clone(),
            _ => String::new(),
        };
        return Ending::with_error(Outcome::MemoryLimit, detail);
    }
    match result {
        CallResult::Trapped(e) => Ending::with_error(Outcome::Trap, trap_message(&e)),
        CallResult::SetupFailed(why) => Ending::with_error(Outcome::HostError, why),
        _ if flag(&traffic.idle_timed_out) => Ending::new(Outcome::IdleTimeout),
        _ if flag(&traffic.client_reset) => Ending::new(Outcome::ClientReset),
        CallResult::Returned(Ok(())) => Ending::new(Outcome::Ok),
        CallResult::Returned(Err(text)) => Ending::with_error(Outcome::HandlerError, text),
    }
}

/// A trap's message without its multi-line wasm backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => one_line(e),
    }
}

/// What a connection's traffic came to, as far as its writer knows it.
#[derive(Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// The instance's peak memory in bytes.
    pub(crate) memory: u64,
}

/// The level a `closed` line is logged at: `info` for a connection that
/// ended as connections end, `warn` for one whose process died under it,
/// `error` for one the host could not even start.
#[derive(Clone, Copy)]
pub(crate) enum Level {
    Info,
    Warn,
    Error,
}

/// What the one line a connection ends with says. A part its writer does not
/// know is left out: the forking parent knows neither the traffic nor the
/// memory of a child that died, nor, when the fork itself failed, a worker
/// or a duration.
pub(crate) struct Closed<'a> {
    pub(crate) id: u64,
    pub(crate) peer: &'a Peer,
    pub(crate) worker: Option<&'a str>,
    pub(crate) tenant: &'a str,
    pub(crate) usage: Option<Usage>,
    pub(crate) duration: Option<Duration>,
    pub(crate) outcome: Outcome,
    pub(crate) error: Option<&'a str>,
    pub(crate) level: Level,
}

impl fmt::Display for Closed<'_> {
    /// The line's text: `connection ID closed peer=... worker=... tenant=...
    /// in=... out=... memory=...KiB duration=...ms outcome=... error="..."`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {} closed peer={}", self.id, self.peer)?;
        if let Some(worker) = self.worker {
            write!(f, " worker={worker}")?;
        }
        write!(f, " tenant={}", self.tenant)?;
        if let Some(usage) = self.usage {
            write!(
                f,
                " in={} out={} memory={}KiB",
                usage.bytes_in,
                usage.bytes_out,
                usage.memory.div_ceil(1024)
            )?;
        }
        if let Some(duration) = self.duration {
            write!(f, " duration={:.3}ms", duration.as_secs_f64() * 1000.0)?;
        }
        write!(f, " outcome={}", self.outcome.name())?;
        if let Some(error) = self.error {
            write!(f, " error={error:?}")?;
        }
        Ok(())
    }
}

/// Logs a connection's `closed` line. In the JSON log its values are fields
/// too (those the line leaves out are left out there as well).
pub(crate) fn log_closed(c: &Closed<'_>) {
    macro_rules! closed {
        ($level:expr) => {
            if crate::logging::json() {
                tracing::event!(
                    $level,
                    connection = c.id,
                    peer = %c.peer,
                    worker = c.worker,
                    tenant = c.tenant,
                    bytes_in = c.usage.map(|u| u.bytes_in),
                    bytes_out = c.usage.map(|u| u.bytes_out),
                    memory_kib = c.usage.map(|u| u.memory.div_ceil(1024)),
                    duration_ms = c.duration.map(|d| d.as_secs_f64() * 1000.0),
                    outcome = c.outcome.name(),
                    error = c.error,
                    "{c}"
                )
            } else {
                tracing::event!($level, "{c}")
            }
        };
    }
    match c.level {
        Level::Info => closed!(tracing::Level::INFO),
        Level::Warn => closed!(tracing::Level::WARN),
        Level::Error => closed!(tracing::Level::ERROR),
    }
}
