//! `forking`: a child process per connection, as Python's `ForkingMixIn`, at
//! most `limit` alive at once. The parent only accepts, forks and reaps; a
//! child serves one connection and exits, so a crash or kill of a child costs
//! that connection only. A child never outlives its parent: the kernel
//! kills it when the parent dies (`PR_SET_PDEATHSIG`).
//!
//! Invariant: the parent starts no thread before it forks (the engine is
//! built without parallel compilation for this strategy, no epoch ticker runs
//! in the parent, and the parent never runs guest code, so wasmtime-wasi's
//! tokio runtime is never started in it). Children inherit nothing
//! half-locked.
//!
//! Deadlines: threads do not survive `fork()`, so a child keeps its own
//! `--timeout` with a one-shot `SIGALRM` whose handler advances the engine's
//! epoch (a signal-safe atomic increment), trapping the guest. As a backstop
//! the parent kills a child that outlives its deadline plus the time its
//! close may take.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::Engine;

use super::{Reaped, Strategy};
use crate::conn::report::{log_closed, Closed, Level};
use crate::conn::service::{Accepted, Service, LINGER};
use crate::listener::Peer;
use crate::metrics::InFlight;
use crate::outcome::Outcome;
use crate::server::Shutdown;

pub struct Forking {
    service: Arc<Service>,
    limit: usize,
    children: HashMap<libc::pid_t, Child>,
    /// The parent's descriptors a child closes first (listener, doorbell).
    close_in_child: Vec<RawFd>,
    /// How long after its start the parent kills a child.
    backstop: Duration,
    /// After a failed fork, no accepting until then.
    paused_until: Option<Instant>,
}

struct Child {
    id: u64,
    peer: Peer,
    started: Instant,
    /// Why the parent killed it, if it did.
    killed: Option<Outcome>,
    /// Its connection's place in the in-flight gauge, left when it is reaped.
    _in_flight: Option<InFlight>,
}

/// How long accepting pauses after a failed fork.
const FORK_RETRY: Duration = Duration::from_millis(100);

/// The engine whose epoch the child's SIGALRM advances.
static ALARM_ENGINE: OnceLock<Engine> = OnceLock::new();

extern "C" fn on_alarm(_signal: libc::c_int) {
    if let Some(engine) = ALARM_ENGINE.get() {
        engine.increment_epoch();
    }
}

impl Forking {
    pub fn new(
        service: Arc<Service>,
        limit: usize,
        shutdown: &Shutdown,
        listeners: &[RawFd],
    ) -> Result<Forking> {
        // Every exiting child rings the doorbell, so it is reaped at once.
        // The worker process's own handler (see `ring_on_signal_directly`).
        shutdown.ring_on_signal_directly(libc::SIGCHLD)?;
        let mut close_in_child = shutdown.descriptors().to_vec();
        close_in_child.extend_from_slice(listeners);
        let limits = service.limits();
        // A child's guest stops at `timeout`; its output may then take an
        // idle timeout to flush and its close a linger.
        let backstop = limits.timeout + limits.idle_timeout + LINGER + Duration::from_secs(1);
        Ok(Forking {
            service,
            limit,
            children: HashMap::new(),
            close_in_child,
            backstop,
            paused_until: None,
        })
    }

    /// The child's side of `fork()`: serve, then exit without running the
    /// parent's destructors or exit handlers.
    fn run_child(&self, conn: Accepted, parent: libc::pid_t) -> ! {
        super::leave_parent(&self.close_in_child);
        // A connection must not outlive its worker process (SIGKILLed, say):
        // outside it, nothing bounds it by `max_children` or reaps it. The
        // kernel kills it when the worker dies (the worker is single-threaded,
        // so "the thread that forked it" is the worker); a worker that died
        // before this line was reached shows as a changed parent.
        // SAFETY: prctl and getppid on this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
        }
        arm_alarm(self.service.engine(), self.service.limits().timeout);
        let worker = format!("pid-{}", std::process::id());
        let id = conn.id;
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.service.serve(conn, &worker);
        }));
        let code = match served {
            Ok(()) => 0,
            Err(_) => {
                tracing::error!("connection {id} worker={worker}: the host panicked serving it");
                101
            }
        };
        // SAFETY: ends this child process immediately.
        unsafe { libc::_exit(code) }
    }

    /// Reaps every child that has exited; with `block`, waits for one first.
    fn reap(&mut self, mut block: bool) {
        loop {
            match super::reap_one(block) {
                Reaped::Child(pid, status) => {
                    block = false;
                    if let Some(child) = self.children.remove(&pid) {
                        let outcome = report_exit(pid, &child, status, self.service.tenant());
                        drop(child);
                        self.ended(outcome);
                    }
                }
                Reaped::Nothing => return,
                Reaped::NoChildren => {
                    // No children are left, whatever the table says.
                    for (pid, child) in std::mem::take(&mut self.children) {
                        tracing::warn!(
                            "connection {} worker=pid-{pid}: the worker process vanished",
                            child.id
                        );
                    }
                    return;
                }
            }
        }
    }

    /// A child is gone (and with it its place in the in-flight gauge): an
    /// outcome the child could not count itself is counted here.
    fn ended(&self, outcome: Option<Outcome>) {
        if let (Some(metrics), Some(outcome)) = (self.service.metrics(), outcome) {
            metrics.record(outcome, 0, 0, Duration::ZERO, None);
        }
    }

    fn kill_children(&mut self, why: Outcome, only_overdue: bool) {
        let now = Instant::now();
        for (&pid, child) in &mut self.children {
            if child.killed.is_some() || (only_overdue && now < child.started + self.backstop) {
                continue;
            }
            child.killed = Some(why);
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Arms the one-shot `--timeout` alarm in a child.
fn arm_alarm(engine: &Engine, timeout: Duration) {
    let _ = ALARM_ENGINE.set(engine.clone());
    // SAFETY: installs a handler that only performs an atomic increment, and
    // a one-shot real-time timer for this process.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_alarm as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut());
        let timer = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_usec: timeout.subsec_micros() as libc::suseconds_t,
            },
        };
        libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut());
    }
}

/// A child that did not exit normally never wrote its connection's line:
/// the parent writes it, and returns the outcome it logged.
fn report_exit(
    pid: libc::pid_t,
    child: &Child,
    status: libc::c_int,
    tenant: &str,
) -> Option<Outcome> {
    let (outcome, cause) = if let Some(why) = child.killed {
        (
            why,
            format!("the worker process was killed ({})", why.name()),
        )
    } else if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        (
            Outcome::HostError,
            format!("the worker process was killed by signal {signal}"),
        )
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
        let code = libc::WEXITSTATUS(status);
        (
            Outcome::HostError,
            format!("the worker process exited with status {code}"),
        )
    } else {
        return None;
    };
    log_closed(&Closed {
        id: child.id,
        peer: &child.peer,
        worker: Some(&format!("pid-{pid}")),
        tenant,
        usage: None,
        duration: Some(child.started.elapsed()),
        outcome,
        error: Some(&cause),
        level: Level::Warn,
    });
    Some(outcome)
}

impl Strategy for Forking {
    fn has_capacity(&self) -> bool {
        self.children.len() < self.limit && self.paused_until.is_none()
    }

    fn dispatch(&mut self, conn: Accepted) {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the parent is single-threaded (see the module invariant),
        // so the child starts with consistent memory.
        match unsafe { libc::fork() } {
            -1 => {
                // Out of processes or memory: this connection is lost, but
                // the rest wait in the backlog until a child exits or the
                // pause ends, instead of being accepted and dropped.
                let err = io::Error::last_os_error();
                log_closed(&Closed {
                    id: conn.id,
                    peer: &conn.peer,
                    worker: None,
                    tenant: self.service.tenant(),
                    usage: None,
                    duration: None,
                    outcome: Outcome::HostError,
                    error: Some(&format!("fork failed: {err}")),
                    level: Level::Error,
                });
                if let Some(metrics) = self.service.metrics() {
                    metrics.record(Outcome::HostError, 0, 0, Duration::ZERO, None);
                }
                self.paused_until = Some(Instant::now() + FORK_RETRY);
            }
            0 => self.run_child(conn, parent),
            pid => {
                self.children.insert(
                    pid,
                    Child {
                        id: conn.id,
                        peer: conn.peer.clone(),
                        started: Instant::now(),
                        killed: None,
                        _in_flight: self.service.in_flight(),
                    },
                );
                // The child has its own copy of the socket; this one closes.
                drop(conn);
            }
        }
    }

    fn service(&self) -> &Service {
        &self.service
    }

    fn maintain(&mut self) {
        let before = self.children.len();
        self.reap(false);
        if self.paused_until.is_some_and(|t| Instant::now() >= t) || self.children.len() < before {
            self.paused_until = None;
        }
        self.kill_children(Outcome::Timeout, true);
    }

    fn in_flight(&self) -> usize {
        self.children.len()
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let backstops = self
            .children
            .values()
            .filter(|c| c.killed.is_none())
            .map(|c| c.started + self.backstop);
        backstops.chain(self.paused_until).min()
    }

    fn stop_accepting(&mut self) {}

    fn abort(&mut self) {
        self.kill_children(Outcome::Shutdown, false);
    }

    fn finish(&mut self) {
        while !self.children.is_empty() {
            self.reap(true);
        }
    }
}
