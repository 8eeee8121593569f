//! The worker processes' lifecycle: starting a tenant's workers, reaping
//! them, replacing one that dies (after a delay if it died young), and
//! sending them the host's orders.

use std::time::{Duration, Instant};

use super::{listen_key, Host, Worker};
use crate::sys::process::{self, Exit, Forked, Reaped};
use crate::sys::signals::DRAIN_SIGNAL;
use crate::worker;

/// A worker that dies sooner than this after its start is replaced only
/// after [`RESPAWN_DELAY`], so a crashing worker cannot become a fork loop.
const QUICK_DEATH: Duration = Duration::from_secs(1);
const RESPAWN_DELAY: Duration = Duration::from_secs(1);

impl Host {
    /// Starts every worker process of tenant `name`.
    pub(super) fn spawn_tenant(&mut self, name: &str) {
        let Some(tenant) = self.tenants.get(name) else {
            return;
        };
        let count = tenant.config.strategy.processes();
        let generation = tenant.generation;
        for _ in 0..count {
            self.spawn_worker(name, generation);
        }
    }

    /// Forks one worker process of tenant `name` and hands it its plan; a
    /// failed start is retried after [`RESPAWN_DELAY`].
    fn spawn_worker(&mut self, name: &str, generation: u64) {
        let started = self.worker_plan(name).and_then(|plan| {
            let keep = plan.descriptors();
            // A worker must not outlive the host process (killed with
            // SIGKILL, say): the kernel sends it the drain signal then.
            let child = process::Child {
                keep: &keep,
                on_parent_death: DRAIN_SIGNAL,
            };
            match process::fork(&child)? {
                Forked::Child => worker::run(plan),
                // The plan's listeners were the worker's copies.
                Forked::Parent(pid) => Ok(pid),
            }
        });
        match started {
            Ok(pid) => {
                tracing::debug!("tenant {name}: worker process pid-{pid} started");
                self.workers.insert(
                    pid,
                    Worker {
                        tenant: name.to_string(),
                        generation,
                        started: Instant::now(),
                    },
                );
            }
            Err(err) => {
                tracing::error!(
                    "tenant {name}: cannot start a worker process: {err}; retrying in {RESPAWN_DELAY:?}"
                );
                self.pending
                    .push((Instant::now() + RESPAWN_DELAY, name.to_string(), generation));
            }
        }
    }

    /// What a worker of tenant `name` is handed: its settings, its compiled
    /// handler and copies of its listeners. A copy of every other tenant's
    /// listener stays out of it, so a removed tenant's address stops
    /// accepting when the host closes it.
    fn worker_plan(&self, name: &str) -> std::io::Result<worker::Plan> {
        let tenant = self
            .tenants
            .get(name)
            .ok_or_else(|| std::io::Error::other("the tenant is gone"))?;
        let mut listeners = Vec::new();
        for addr in &tenant.config.listen {
            if let Some(listener) = self.listeners.get(&listen_key(name, addr)) {
                listeners.push(listener.duplicate()?);
            }
        }
        let mut handler_fds = self.engine_fds.clone();
        handler_fds.extend_from_slice(&tenant.handler_fds);
        Ok(worker::Plan {
            config: tenant.config.clone(),
            service: tenant.service.clone(),
            listeners,
            ids: self.ids.clone(),
            handler_fds,
        })
    }

    /// Reaps exited workers, and replaces those still current.
    pub(super) fn reap(&mut self, mut block: bool) {
        loop {
            let (pid, exit) = match process::reap_one(block) {
                Reaped::Child(pid, exit) => (pid, exit),
                Reaped::Nothing => return,
                Reaped::NoChildren => {
                    self.workers.clear();
                    return;
                }
            };
            block = false;
            if Some(pid) == self.metrics_pid {
                self.metrics_pid = None;
                self.metrics_tx = None;
                if !self.shutting_down {
                    tracing::warn!("the metrics process exited; starting a new one");
                    self.spawn_metrics();
                }
                continue;
            }
            let Some(worker) = self.workers.remove(&pid) else {
                continue;
            };
            let current = self
                .tenants
                .get(&worker.tenant)
                .is_some_and(|t| t.generation == worker.generation);
            if !current {
                tracing::info!(
                    "tenant {}: worker process pid-{pid} of the previous configuration has drained",
                    worker.tenant
                );
                continue;
            }
            if self.shutting_down {
                continue;
            }
            let how = match exit {
                Exit::Signal(signal) => format!("was killed by signal {signal}"),
                Exit::Code(code) => format!("exited with status {code}"),
            };
            let quick = worker.started.elapsed() < QUICK_DEATH;
            tracing::warn!(
                "tenant {}: worker process pid-{pid} {how}; starting a replacement{}",
                worker.tenant,
                if quick {
                    format!(" in {RESPAWN_DELAY:?}")
                } else {
                    String::new()
                }
            );
            if quick {
                self.pending.push((
                    Instant::now() + RESPAWN_DELAY,
                    worker.tenant,
                    worker.generation,
                ));
            } else {
                self.spawn_worker(&worker.tenant, worker.generation);
            }
        }
    }

    pub(super) fn respawn_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.0 <= now);
        self.pending = later;
        for (_, name, generation) in due {
            let current = self
                .tenants
                .get(&name)
                .is_some_and(|t| t.generation == generation);
            if current {
                self.spawn_worker(&name, generation);
            }
        }
    }

    pub(super) fn signal_workers(&self, signal: libc::c_int, which: impl Fn(&Worker) -> bool) {
        for (&pid, worker) in &self.workers {
            if which(worker) {
                process::signal_child(pid, signal);
            }
        }
    }
}
