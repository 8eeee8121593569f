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
//! close may take. A child serving a `wasi:http/proxy` handler's
//! keep-alive connection has no such bound as a whole (each request has its
//! `--timeout`, each pause between requests the idle timeout): it starts its
//! own epoch ticker (`conn::http`) and gets no parent-side backstop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::Engine;

use super::Strategy;
use crate::conn::report::{log_closed, Closed, Level};
use crate::conn::service::{Accepted, Service, LINGER};
use crate::listener::Peer;
use crate::metrics::InFlight;
use crate::outcome::Outcome;
use crate::shutdown::Shutdown;
use crate::sys::huge_text::{self, NotMoved};
use crate::sys::process::{self, Exit, Forked, Pid, Reaped};
use crate::sys::signals;
use crate::wasm::http::World;

pub(crate) struct Forking {
    service: Arc<Service>,
    limit: usize,
    children: HashMap<Pid, Child>,
    /// The descriptors a child keeps besides its connection's socket: those
    /// of the compiled handler (its image file, the engine's).
    inherit: Vec<RawFd>,
    /// How long after its start the parent kills a child (`None`: an HTTP
    /// tenant's child, bounded per request in the child).
    backstop: Option<Duration>,
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
    pub(crate) fn new(
        service: Arc<Service>,
        limit: usize,
        shutdown: &Shutdown,
        inherit: Vec<RawFd>,
    ) -> Result<Forking> {
        // Every exiting child rings the doorbell, so it is reaped at once.
        // The worker process's own handler (see `ring_on_signal_directly`).
        shutdown.ring_on_signal_directly(libc::SIGCHLD)?;
        let limits = service.limits();
        // A child's guest stops at `timeout`; its output may then take an
        // idle timeout to flush and its close a linger.
        let backstop = (service.handler().world() == World::Handler)
            .then(|| limits.timeout + limits.idle_timeout + LINGER + Duration::from_secs(1));
        settle_before_forking(service.tenant());
        // Every child serves its connection in a copy of this instance
        // instead of instantiating the handler itself.
        if service.make_spare() {
            tracing::debug!("forking: children adopt a spare instance");
        }
        Ok(Forking {
            service,
            limit,
            children: HashMap::new(),
            inherit,
            backstop,
            paused_until: None,
        })
    }

    /// The child's side of `fork()`: serve, then exit without running the
    /// parent's destructors or exit handlers.
    fn run_child(&self, conn: Accepted) -> ! {
        arm_alarm(self.service.engine(), self.service.limits().timeout);
        if self.service.handler().world() == World::Http {
            drain_on_order(&self.service);
        }
        let worker = format!("pid-{}", std::process::id());
        let id = conn.id;
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::conn::dispatch::serve(&self.service, conn, &worker);
        }));
        let code = match served {
            Ok(()) => 0,
            Err(_) => {
                tracing::error!("connection {id} worker={worker}: the host panicked serving it");
                101
            }
        };
        process::exit_now(code)
    }

    /// Reaps every child that has exited; with `block`, waits for one first.
    fn reap(&mut self, mut block: bool) {
        loop {
            match process::reap_one(block) {
                Reaped::Child(pid, exit) => {
                    block = false;
                    if let Some(child) = self.children.remove(&pid) {
                        let outcome = report_exit(pid, &child, exit, self.service.tenant());
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
            let overdue = self.backstop.is_some_and(|b| now >= child.started + b);
            if child.killed.is_some() || (only_overdue && !overdue) {
                continue;
            }
            child.killed = Some(why);
            process::signal_child(pid, libc::SIGKILL);
        }
    }
}

/// Done once in the worker, before it forks, so that no child does it
/// again: nothing here is random state, only what a child would otherwise
/// work out for itself.
/// - A raw-world child's tokio runtime, should its guest need one (only its
///   pollables and sleeps, file streams and outbound sockets do; its
///   connection's streams wait without one: `wasm::direct_streams`), is
///   wasmtime-wasi's own, which has a worker thread per core and reads the
///   cgroup's CPU quota to count them, unless told how many: one is enough
///   for one connection. A child that needs none (an echo) makes none.
/// - Every child seeds the random generators of its WASI context from the
///   system (it must: a generator seeded here would be every child's).
///   Doing so finds libc's `getrandom` first (`dlsym`), and probes the CPU
///   for ChaCha's vector code (`cpuid`, an exit to the hypervisor in a VM);
///   both results are kept in statics, which the children inherit. The
///   ChaCha here has a fixed seed and is dropped: no thread's generator is
///   touched.
/// - Each child faulted the host's code in from the page cache again (`fork`
///   copies no page-table entries of file pages): it is moved onto huge
///   pages, which `fork` maps into the child whole (`sys::huge_text`).
fn settle_before_forking(tenant: &str) {
    use rand::{Rng as _, SeedableRng as _};
    // The worker runs one thread (the invariant above), so nothing reads
    // the environment while it changes.
    std::env::set_var("TOKIO_WORKER_THREADS", "1");
    // Only where getrandom(2) works: otherwise `getrandom` falls back to a
    // descriptor of /dev/urandom, kept in a static, which every child would
    // close (`process::fork` closes what it does not keep) and then read.
    if process::getrandom_works() {
        let _ = getrandom::fill(&mut [0u8; 1]);
    }
    let _ = rand::rngs::StdRng::seed_from_u64(0).next_u32();
    let worker = format!("tenant {tenant}: forking worker pid-{}", std::process::id());
    let stays = "the host's code stays on its file pages";
    match huge_text::move_text_to_huge_pages() {
        Ok(len) => tracing::info!(
            "{worker}: the host's code ({} MiB) moved onto huge pages, which its children share",
            len >> 20
        ),
        Err(NotMoved::Unavailable(why)) => tracing::info!("{worker}: {stays}: {why}"),
        Err(NotMoved::Failed(why)) => tracing::warn!("{worker}: {stays}: {why}"),
    }
}

/// In an HTTP child: a thread waits for the worker's drain order (blocked
/// since the fork, so one sent at once stays pending) and drains the
/// child's connection. Without that thread the child still ends at its
/// idle or drain timeout.
fn drain_on_order(service: &Arc<Service>) {
    let service = service.clone();
    let waiting = std::thread::Builder::new()
        .name("drain-order".into())
        .spawn(move || {
            signals::wait_for(signals::DRAIN_SIGNAL);
            service.drain();
        });
    if let Err(e) = waiting {
        tracing::warn!(
            "cannot wait for the drain order: {e}; the connection ends at its idle timeout"
        );
    }
}

/// Arms the one-shot `--timeout` alarm in a child.
fn arm_alarm(engine: &Engine, timeout: Duration) {
    let _ = ALARM_ENGINE.set(engine.clone());
    if let Err(e) = signals::alarm_after(timeout, on_alarm) {
        // The parent's backstop still ends the child.
        tracing::warn!("cannot arm the timeout alarm: {e}");
    }
}

/// A child that did not exit normally never wrote its connection's line:
/// the parent writes it, and returns the outcome it logged.
fn report_exit(pid: Pid, child: &Child, exit: Exit, tenant: &str) -> Option<Outcome> {
    let (outcome, cause) = if let Some(why) = child.killed {
        (
            why,
            format!("the worker process was killed ({})", why.name()),
        )
    } else {
        match exit {
            Exit::Signal(signal) => (
                Outcome::HostError,
                format!("the worker process was killed by signal {signal}"),
            ),
            Exit::Code(code) if code != 0 => (
                Outcome::HostError,
                format!("the worker process exited with status {code}"),
            ),
            Exit::Code(_) => return None,
        }
    };
    log_closed(&Closed {
        id: child.id,
        peer: &child.peer,
        via: None,
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
        let mut keep = self.inherit.clone();
        keep.push(conn.stream.as_raw_fd());
        // A connection must not outlive its worker process (SIGKILLed, say):
        // outside it, nothing bounds it by `max_children` or reaps it. The
        // kernel kills it when the worker dies (the worker is single-threaded,
        // so "the thread that forked it" is the worker).
        let child = process::Child {
            keep: &keep,
            on_parent_death: libc::SIGKILL,
        };
        match process::fork(&child) {
            Err(err) => {
                // Out of processes or memory: this connection is lost, but
                // the rest wait in the backlog until a child exits or the
                // pause ends, instead of being accepted and dropped.
                log_closed(&Closed {
                    id: conn.id,
                    peer: &conn.peer,
                    via: None,
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
            Ok(Forked::Child) => self.run_child(conn),
            Ok(Forked::Parent(pid)) => {
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
            .filter_map(|c| self.backstop.map(|b| c.started + b));
        backstops.chain(self.paused_until).min()
    }

    /// Passes the drain on to the children: one serving an HTTP
    /// keep-alive connection finishes its request in flight and closes,
    /// an idle one closes now. (A raw-world child leaves the order blocked
    /// and runs its one call to its end.)
    fn stop_accepting(&mut self) {
        for &pid in self.children.keys() {
            process::signal_child(pid, signals::DRAIN_SIGNAL);
        }
    }

    fn abort(&mut self) {
        self.kill_children(Outcome::Shutdown, false);
    }

    fn finish(&mut self) {
        while !self.children.is_empty() {
            self.reap(true);
        }
    }
}
