//! `prefork`: a fixed set of worker processes, forked once the handler is
//! compiled, each accepting from the shared listener and serving connections
//! on its own pool of threads (the threading strategy). Process isolation
//! between groups of connections at thread speed, as Apache's prefork MPM.
//!
//! The parent only supervises: it replaces a worker that dies, and at
//! shutdown forwards the signal to every worker (each drains on its own),
//! kills what outlives the drain, and reaps them all.
//!
//! Invariant: the parent starts no thread (the engine compiles on the main
//! thread for this strategy, and each worker starts its own epoch ticker and
//! pool after the fork).

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::Threading;
use crate::config::ServeConfig;
use crate::connection::{Service, LINGER};
use crate::engine::EpochClock;
use crate::server::{self, ConnectionIds, Shutdown};

/// A worker that dies sooner than this after its start is replaced only
/// after [`RESPAWN_DELAY`], so a crashing worker cannot become a fork loop.
const QUICK_DEATH: Duration = Duration::from_secs(1);
const RESPAWN_DELAY: Duration = Duration::from_secs(1);

struct Supervisor<'a> {
    config: &'a ServeConfig,
    service: Arc<Service>,
    /// Kept open for replacements until shutdown.
    listener: Option<TcpListener>,
    ids: &'a ConnectionIds,
    /// The parent's descriptors a worker closes first (the doorbell).
    close_in_child: Vec<RawFd>,
    workers: HashMap<libc::pid_t, Instant>,
    /// Replacements waiting for their delay.
    pending: Vec<Instant>,
}

/// Runs the prefork parent until `shutdown`, then stops every worker.
pub fn run(
    config: &ServeConfig,
    service: Arc<Service>,
    listener: TcpListener,
    ids: &ConnectionIds,
    shutdown: &Shutdown,
) -> Result<()> {
    let sigchld = shutdown.ring_on_signal(libc::SIGCHLD)?;
    let result = supervise(config, service, listener, ids, shutdown);
    signal_hook::low_level::unregister(sigchld);
    result
}

fn supervise(
    config: &ServeConfig,
    service: Arc<Service>,
    listener: TcpListener,
    ids: &ConnectionIds,
    shutdown: &Shutdown,
) -> Result<()> {
    let mut supervisor = Supervisor {
        config,
        service,
        listener: Some(listener),
        ids,
        close_in_child: shutdown.descriptors().to_vec(),
        workers: HashMap::new(),
        pending: Vec::new(),
    };
    for _ in 0..config.processes {
        supervisor.spawn();
    }
    while !shutdown.is_triggered() {
        shutdown.wait_until(supervisor.pending.iter().min().copied())?;
        supervisor.reap(false, true);
        let now = Instant::now();
        let due = supervisor.pending.iter().filter(|t| **t <= now).count();
        supervisor.pending.retain(|t| *t > now);
        for _ in 0..due {
            supervisor.spawn();
        }
    }

    // Stop listening for every process at once: new clients are refused
    // even while a worker has not yet seen its signal.
    if let Some(listener) = supervisor.listener.take() {
        // SAFETY: shutting down a socket we own.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&listener), libc::SHUT_RDWR) };
    }
    let count = supervisor.workers.len();
    tracing::info!("shutting down: stopping {count} worker process(es)");
    supervisor.signal_all(server::DRAIN_SIGNAL);
    // Each worker drains for up to --drain-timeout; give it time to close.
    let deadline = Instant::now() + config.drain_timeout + LINGER + Duration::from_secs(2);
    let mut forwarded_second = false;
    loop {
        supervisor.reap(false, false);
        if supervisor.workers.is_empty() {
            break;
        }
        if shutdown.is_forced() && !forwarded_second {
            // The second signal: every worker ends what it has at once.
            supervisor.signal_all(server::END_NOW_SIGNAL);
            forwarded_second = true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "{} worker process(es) outlived the drain; killing them",
                supervisor.workers.len()
            );
            supervisor.signal_all(libc::SIGKILL);
            while !supervisor.workers.is_empty() {
                supervisor.reap(true, false);
            }
            break;
        }
        shutdown.wait_until(Some(deadline))?;
    }
    tracing::info!("stopped; every worker process reaped");
    Ok(())
}

impl Supervisor<'_> {
    fn spawn(&mut self) {
        let parent = std::process::id();
        // SAFETY: the parent is single-threaded (see the module invariant).
        match unsafe { libc::fork() } {
            -1 => {
                let err = io::Error::last_os_error();
                tracing::error!(
                    "cannot start a worker process: {err}; retrying in {RESPAWN_DELAY:?}"
                );
                self.pending.push(Instant::now() + RESPAWN_DELAY);
            }
            0 => self.run_worker(parent),
            pid => {
                self.workers.insert(pid, Instant::now());
            }
        }
    }

    /// The worker's side of `fork()`: its own doorbell, signal handling,
    /// epoch ticker and thread pool around the shared listener.
    fn run_worker(&mut self, parent: u32) -> ! {
        // Only the parent's DRAIN_SIGNAL and END_NOW_SIGNAL count from here.
        super::leave_parent(&self.close_in_child);
        // A worker must not outlive its parent (killed with SIGKILL, say):
        // the kernel sends it the drain signal then. If the parent is already
        // gone, there is nothing to serve for.
        // SAFETY: prctl and getppid on this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, server::DRAIN_SIGNAL);
            if libc::getppid() as u32 != parent {
                libc::_exit(0);
            }
        }
        let code = match self.serve_as_worker() {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("worker process pid-{}: {e:#}", std::process::id());
                1
            }
        };
        // SAFETY: ends this worker process without the parent's destructors.
        unsafe { libc::_exit(code) }
    }

    fn serve_as_worker(&mut self) -> Result<()> {
        let shutdown = Shutdown::new()?;
        shutdown.stop_on_signal_directly(server::DRAIN_SIGNAL)?;
        shutdown.stop_on_signal_directly(server::END_NOW_SIGNAL)?;
        EpochClock::start_ticker(self.service.engine())?;
        let prefix = format!("pid-{}/", std::process::id());
        let mut threading = Threading::new(
            self.service.clone(),
            self.config.workers,
            self.config.per_process_in_flight(),
            shutdown.waker(),
            &prefix,
        );
        // The worker's only copy: when its drain drops it, it is gone here.
        let listener = self
            .listener
            .take()
            .ok_or_else(|| anyhow::anyhow!("the listener is closed"))?;
        server::run(
            listener,
            &mut threading,
            &shutdown,
            self.ids,
            self.config.drain_timeout,
        )
    }

    /// Reaps exited workers; with `replace`, schedules a replacement for each.
    fn reap(&mut self, block: bool, replace: bool) {
        let mut flags = if block { 0 } else { libc::WNOHANG };
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if pid < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.workers.clear();
                return;
            }
            if pid == 0 {
                return;
            }
            flags = libc::WNOHANG;
            let Some(started) = self.workers.remove(&pid) else {
                continue;
            };
            if !replace {
                continue;
            }
            let how = if libc::WIFSIGNALED(status) {
                format!("was killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("exited with status {}", libc::WEXITSTATUS(status))
            };
            let quick = started.elapsed() < QUICK_DEATH;
            tracing::warn!(
                "worker process pid-{pid} {how}; starting a replacement{}",
                if quick {
                    format!(" in {RESPAWN_DELAY:?}")
                } else {
                    String::new()
                }
            );
            if quick {
                self.pending.push(Instant::now() + RESPAWN_DELAY);
            } else {
                self.spawn();
            }
        }
    }

    fn signal_all(&self, signal: libc::c_int) {
        for &pid in self.workers.keys() {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(pid, signal) };
        }
    }
}
