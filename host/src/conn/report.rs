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
    /// The balancer whose PROXY protocol header named `peer`, if one did.
    pub(crate) via: Option<&'a Peer>,
    pub(crate) worker: Option<&'a str>,
    pub(crate) tenant: &'a str,
    pub(crate) usage: Option<Usage>,
    pub(crate) duration: Option<Duration>,
    pub(crate) outcome: Outcome,
    pub(crate) error: Option<&'a str>,
    pub(crate) level: Level,
}

impl fmt::Display for Closed<'_> {
    /// The line's text: `connection ID closed peer=... [via=...] worker=... tenant=...
    /// in=... out=... memory=...KiB duration=...ms outcome=... error="..."`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {} closed peer={}", self.id, self.peer)?;
        if let Some(via) = self.via {
            write!(f, " via={via}")?;
        }
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
            write!(f, " duration={}", Millis(duration))?;
        }
        write!(f, " outcome={}", self.outcome.name())?;
        if let Some(error) = self.error {
            write!(f, " error={error:?}")?;
        }
        Ok(())
    }
}

/// A duration as the text log's lines write it: milliseconds, rounded to
/// the microsecond (`1.235ms`). In integers: formatting a float cost more
/// than the rest of a line's numbers. (The JSON log's `duration_ms` is the
/// float, unrounded.)
pub(crate) struct Millis(pub(crate) Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = (self.0.as_secs().saturating_mul(1_000_000))
            .saturating_add(u64::from((self.0.subsec_nanos() + 500) / 1000));
        write!(f, "{}.{:03}ms", micros / 1000, micros % 1000)
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
                    via = c.via.map(tracing::field::display),
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use wasmtime::ResourceLimiter as _;

    use super::*;
    use crate::conn::socket::Waits;

    /// A connection's socket over one end of a Unix socket pair; the other
    /// end is returned too, so the socket stays connected.
    fn socket() -> (Arc<Socket>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let socket = Socket::new(
            ours.into(),
            Duration::from_secs(60),
            deadline,
            Waits::Blocking,
        );
        (socket, theirs)
    }

    fn set(flag: &AtomicBool) {
        flag.store(true, Ordering::Relaxed);
    }

    fn returned_err(text: &str) -> CallResult {
        CallResult::Returned(Err(text.to_string()))
    }

    fn trapped(trap: Trap) -> CallResult {
        CallResult::Trapped(wasmtime::Error::from(trap))
    }

    /// A limiter that has refused a growth, as after `--max-memory`.
    fn refused_limiter() -> InstanceLimiter {
        let mut limiter = InstanceLimiter::new(1 << 20);
        assert!(!limiter.memory_growing(0, 1 << 30, None).unwrap());
        assert!(limiter.refused());
        limiter
    }

    fn ending(outcome: Outcome, error: Option<&str>) -> Ending {
        Ending {
            outcome,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn what_the_guest_returned_when_the_host_saw_nothing() {
        let (socket, _peer) = socket();
        let ok = classify(CallResult::Returned(Ok(())), &socket, None);
        assert_eq!(ok, ending(Outcome::Ok, None));
        let err = classify(returned_err("bad request"), &socket, None);
        assert_eq!(err, ending(Outcome::HandlerError, Some("bad request")));
        let setup = classify(CallResult::SetupFailed("no dir".into()), &socket, None);
        assert_eq!(setup, ending(Outcome::HostError, Some("no dir")));
        let trap = classify(trapped(Trap::UnreachableCodeReached), &socket, None);
        assert_eq!(trap.outcome, Outcome::Trap);
        assert_eq!(
            trap.error.as_deref(),
            Some(Trap::UnreachableCodeReached.to_string().as_str())
        );
    }

    #[test]
    fn a_trap_that_is_not_a_wasm_trap_is_told_on_one_line() {
        let (socket, _peer) = socket();
        let error = wasmtime::Error::msg("inner\ncause").context("instantiation failed");
        let trap = classify(CallResult::Trapped(error), &socket, None);
        assert_eq!(
            trap,
            ending(Outcome::Trap, Some("instantiation failed: inner cause"))
        );
    }

    #[test]
    fn a_shutdown_wins_over_everything() {
        let (socket, _peer) = socket();
        set(&socket.traffic.aborted);
        set(&socket.traffic.timed_out);
        set(&socket.traffic.client_reset);
        for result in [
            CallResult::Returned(Ok(())),
            returned_err("x"),
            trapped(Trap::Interrupt),
            CallResult::SetupFailed("not started".into()),
        ] {
            let limiter = refused_limiter();
            let ended = classify(result, &socket, Some(&limiter));
            assert_eq!(ended, ending(Outcome::Shutdown, None));
        }
    }

    #[test]
    fn the_deadline_wins_over_what_the_guest_did() {
        let (socket, _peer) = socket();
        // The epoch interrupt is the deadline, even without the flag.
        let ended = classify(trapped(Trap::Interrupt), &socket, None);
        assert_eq!(ended, ending(Outcome::Timeout, None));
        set(&socket.traffic.timed_out);
        for result in [CallResult::Returned(Ok(())), returned_err("late")] {
            let limiter = refused_limiter();
            let ended = classify(result, &socket, Some(&limiter));
            assert_eq!(ended, ending(Outcome::Timeout, None));
        }
    }

    #[test]
    fn a_refused_growth_names_a_failure_memory_limit() {
        let (socket, _peer) = socket();
        let limiter = refused_limiter();
        let ended = classify(returned_err("out of memory"), &socket, Some(&limiter));
        assert_eq!(ended, ending(Outcome::MemoryLimit, Some("out of memory")));
        let ended = classify(
            trapped(Trap::UnreachableCodeReached),
            &socket,
            Some(&limiter),
        );
        assert_eq!(ended.outcome, Outcome::MemoryLimit);
        assert_eq!(
            ended.error.as_deref(),
            Some(Trap::UnreachableCodeReached.to_string().as_str())
        );
        // A guest that coped with the refusal ended well.
        let ended = classify(CallResult::Returned(Ok(())), &socket, Some(&limiter));
        assert_eq!(ended, ending(Outcome::Ok, None));
        // And without a refusal, a failure is the guest's own.
        let fine = InstanceLimiter::new(1 << 20);
        let ended = classify(returned_err("no"), &socket, Some(&fine));
        assert_eq!(ended, ending(Outcome::HandlerError, Some("no")));
    }

    #[test]
    fn the_client_explains_a_returned_failure_but_not_a_trap() {
        let (socket, _peer) = socket();
        set(&socket.traffic.client_reset);
        let ended = classify(returned_err("write failed"), &socket, None);
        assert_eq!(ended, ending(Outcome::ClientReset, None));
        let ended = classify(CallResult::Returned(Ok(())), &socket, None);
        assert_eq!(ended, ending(Outcome::ClientReset, None));
        // An idle client explains it first.
        set(&socket.traffic.idle_timed_out);
        let ended = classify(returned_err("idle timeout"), &socket, None);
        assert_eq!(ended, ending(Outcome::IdleTimeout, None));
        // A trap or a failed setup is told as it is.
        let ended = classify(trapped(Trap::UnreachableCodeReached), &socket, None);
        assert_eq!(ended.outcome, Outcome::Trap);
        let ended = classify(CallResult::SetupFailed("why".into()), &socket, None);
        assert_eq!(ended, ending(Outcome::HostError, Some("why")));
    }

    #[test]
    fn an_ending_shows_as_the_line_ends() {
        assert_eq!(ending(Outcome::Ok, None).to_string(), "ok");
        assert_eq!(
            ending(Outcome::HandlerError, Some("say \"hi\"\n")).to_string(),
            r#"handler-error error="say \"hi\"\n""#
        );
    }

    fn peer() -> Peer {
        Peer {
            inet: Some("127.0.0.1:4000".parse().unwrap()),
            text: "127.0.0.1:4000".to_string(),
        }
    }

    /// The four kinds of `closed` line, each byte for byte as it was written
    /// before they had one writer.
    #[test]
    fn every_closed_line_reads_as_before() {
        let peer = peer();
        let served = Closed {
            id: 7,
            peer: &peer,
            via: None,
            worker: Some("worker-3"),
            tenant: "default",
            usage: Some(Usage {
                bytes_in: 12,
                bytes_out: 34,
                memory: 1025,
            }),
            duration: Some(Duration::from_micros(1500)),
            outcome: Outcome::Trap,
            error: Some("wasm trap"),
            level: Level::Info,
        };
        assert_eq!(
            served.to_string(),
            r#"connection 7 closed peer=127.0.0.1:4000 worker=worker-3 tenant=default in=12 out=34 memory=2KiB duration=1.500ms outcome=trap error="wasm trap""#
        );
        let denied = Closed {
            worker: Some("acceptor"),
            usage: Some(Usage {
                bytes_in: 0,
                bytes_out: 0,
                memory: 0,
            }),
            duration: Some(Duration::ZERO),
            outcome: Outcome::Denied,
            error: None,
            ..served
        };
        assert_eq!(
            denied.to_string(),
            "connection 7 closed peer=127.0.0.1:4000 worker=acceptor tenant=default in=0 out=0 memory=0KiB duration=0.000ms outcome=denied"
        );
        let cause = "the worker process was killed by signal 9".to_string();
        let crashed = Closed {
            worker: Some("pid-42"),
            usage: None,
            duration: Some(Duration::from_millis(20)),
            outcome: Outcome::HostError,
            error: Some(&cause),
            level: Level::Warn,
            ..denied
        };
        assert_eq!(
            crashed.to_string(),
            r#"connection 7 closed peer=127.0.0.1:4000 worker=pid-42 tenant=default duration=20.000ms outcome=host-error error="the worker process was killed by signal 9""#
        );
        let err = std::io::Error::from_raw_os_error(libc::EAGAIN);
        let why = format!("fork failed: {err}");
        let unforked = Closed {
            worker: None,
            duration: None,
            error: Some(&why),
            level: Level::Error,
            ..crashed
        };
        assert_eq!(
            unforked.to_string(),
            format!(
                "connection 7 closed peer=127.0.0.1:4000 tenant=default outcome=host-error error=\"fork failed: {err}\""
            )
        );
    }

    /// A connection whose client a balancer's PROXY protocol header named
    /// says which balancer, right after the client.
    #[test]
    fn a_proxied_line_names_its_balancer() {
        let client = Peer {
            inet: Some("192.0.2.7:56324".parse().unwrap()),
            text: "192.0.2.7:56324".to_string(),
        };
        let balancer = peer();
        let line = Closed {
            id: 9,
            peer: &client,
            via: Some(&balancer),
            worker: Some("thread-1"),
            tenant: "edge",
            usage: None,
            duration: None,
            outcome: Outcome::BadProxyHeader,
            error: Some("not a PROXY protocol header"),
            level: Level::Info,
        };
        assert_eq!(
            line.to_string(),
            r#"connection 9 closed peer=192.0.2.7:56324 via=127.0.0.1:4000 worker=thread-1 tenant=edge outcome=bad-proxy-header error="not a PROXY protocol header""#
        );
    }

    /// A duration is written in milliseconds rounded to the microsecond.
    #[test]
    fn a_duration_is_rounded_to_the_microsecond() {
        let client = peer();
        let line = |nanos: u64| {
            let closed = Closed {
                id: 1,
                peer: &client,
                via: None,
                worker: None,
                tenant: "t",
                usage: None,
                duration: Some(Duration::from_nanos(nanos)),
                outcome: Outcome::Ok,
                error: None,
                level: Level::Info,
            };
            let text = closed.to_string();
            let at = text.find("duration=").unwrap();
            text[at..].split(' ').next().unwrap().to_string()
        };
        assert_eq!(line(0), "duration=0.000ms");
        assert_eq!(line(499), "duration=0.000ms");
        assert_eq!(line(500), "duration=0.001ms");
        assert_eq!(line(1_234_567), "duration=1.235ms");
        assert_eq!(line(999_999_499), "duration=999.999ms");
        assert_eq!(line(999_999_500), "duration=1000.000ms");
        assert_eq!(line(61_000_001_000), "duration=61000.001ms");
    }
}
