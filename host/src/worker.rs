//! A worker process: one tenant's accept loop over its listeners, with the
//! tenant's strategy. The host process forks it (`supervisor`) and hands it
//! exactly a [`Plan`]; it takes orders only from the host's signals
//! ([`DRAIN_SIGNAL`], [`END_NOW_SIGNAL`]) and ends when its loop returns.
//!
//! Invariant: a worker sees nothing of the host process but its plan: every
//! other descriptor was closed by the fork (`sys::process::fork`), and it
//! never touches the supervisor's state.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::conn::service::Service;
use crate::listener::Listener;
use crate::server::{self, ConnectionIds};
use crate::settings::{self, ServeConfig, StrategyKind};
use crate::shutdown::{Shutdown, DRAIN_SIGNAL, END_NOW_SIGNAL};
use crate::strategy::{Async, Forking, Strategy, Threading};
use crate::sys::{process, resources};
use crate::wasm::engine::EpochClock;

/// Everything that crosses the fork into a worker process.
pub(crate) struct Plan {
    pub config: ServeConfig,
    pub service: Arc<Service>,
    /// This tenant's listeners (the worker's own copies).
    pub listeners: Vec<Listener>,
    pub ids: ConnectionIds,
    /// The compiled handler's descriptors (its image file, the engine's),
    /// which the worker and its children keep.
    pub handler_fds: Vec<RawFd>,
}

impl Plan {
    /// The descriptors the fork must leave open for this plan.
    pub(crate) fn descriptors(&self) -> Vec<RawFd> {
        let mut fds = self.handler_fds.clone();
        fds.extend(self.listeners.iter().map(|l| l.as_raw_fd()));
        fds
    }
}

/// The worker process's whole life: serve `plan`, then exit without running
/// the host process's destructors.
pub(crate) fn run(plan: Plan) -> ! {
    let tenant = plan.config.tenant.clone();
    // A panic must not unwind out of here into the host process's code,
    // whose destructors (of descriptors this process no longer has, of the
    // shared mapping) are not this process's to run.
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(plan)));
    let code = match served {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::error!(
                "tenant {tenant}: worker process pid-{}: {e:#}",
                std::process::id()
            );
            1
        }
        Err(_) => {
            tracing::error!(
                "tenant {tenant}: worker process pid-{}: the host panicked",
                std::process::id()
            );
            101
        }
    };
    process::exit_now(code)
}

fn serve(plan: Plan) -> Result<()> {
    let Plan {
        config,
        service,
        listeners,
        ids,
        handler_fds,
    } = plan;
    if listeners.len() != config.listen.len() {
        bail!("a listener of the tenant is closed");
    }
    let shutdown = Shutdown::new()?;
    shutdown.stop_on_signal_directly(DRAIN_SIGNAL)?;
    shutdown.stop_on_signal_directly(END_NOW_SIGNAL)?;
    let mut strategy: Box<dyn Strategy> = match config.strategy {
        settings::Strategy::Forking { .. } => Box::new(Forking::new(
            service,
            config.max_in_flight(),
            &shutdown,
            handler_fds,
        )?),
        settings::Strategy::Threading { workers } | settings::Strategy::Prefork { workers, .. } => {
            EpochClock::start_ticker(service.engine())?;
            let (limit, prefix) = if config.strategy.kind() == StrategyKind::Prefork {
                (
                    config.per_process_in_flight(),
                    format!("pid-{}/", std::process::id()),
                )
            } else {
                (config.max_in_flight(), String::new())
            };
            let limit = fit_descriptors(&config, limit);
            Box::new(Threading::new(
                service,
                workers,
                limit,
                shutdown.waker(),
                &prefix,
            )?)
        }
        settings::Strategy::Async { workers } => {
            EpochClock::start_yield_ticker(service.engine())?;
            let limit = fit_descriptors(&config, config.max_in_flight());
            let limit = fit_map_count(&config, limit);
            Box::new(Async::new(service, workers, limit, shutdown.waker())?)
        }
    };
    server::run(
        listeners,
        strategy.as_mut(),
        &shutdown,
        &ids,
        config.drain_timeout,
    )
}

/// Descriptors a worker keeps for its own work (its runtime, its log, a
/// guest's files) beyond those its connections hold.
const RESERVED_DESCRIPTORS: usize = 32;

/// The connections in flight a worker process of `tenant` can hold within
/// its descriptor limit: each holds its socket and one descriptor per
/// granted directory, and [`RESERVED_DESCRIPTORS`] stay free for the host's
/// own work, so a flood of clients meets a full accept loop (and waits in
/// the backlog) rather than a worker out of descriptors. Logs when this is
/// fewer than `wanted`.
fn fit_descriptors(tenant: &ServeConfig, wanted: usize) -> usize {
    let Some(limit) = resources::descriptor_limit() else {
        return wanted;
    };
    let open = process::open_descriptors().map_or(0, |fds| fds.len());
    let per_connection = 1 + tenant.grants.dirs.len();
    let budget = (limit as usize).saturating_sub(open + RESERVED_DESCRIPTORS) / per_connection;
    let fits = wanted.min(budget).max(1);
    if fits < wanted {
        tracing::warn!(
            "tenant {}: the descriptor limit ({limit}) allows {fits} connections in flight per worker process, not {wanted}; raise it (ulimit -n) to serve more at once",
            tenant.tenant,
        );
    }
    fits
}

/// Memory mappings one live async connection costs: its instance's linear
/// memory (a guard, the copy-on-write image and the anonymous pages around
/// it, the rest of its reservation) and its fiber's stack and guard; 7 for
/// the Rust echo, with one to spare.
const MAPPINGS_PER_ASYNC_CONNECTION: usize = 8;

/// The async connections in flight that the kernel's limit on one process's
/// memory mappings (`vm.max_map_count`, 65,530 by default) leaves room for:
/// past it an instantiation fails with "Cannot allocate memory", so the
/// accept loop stops short of it instead, and the log says how to raise it.
fn fit_map_count(tenant: &ServeConfig, wanted: usize) -> usize {
    let Some(max) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok())
    else {
        return wanted;
    };
    let mapped = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
    // Room for the runtime's threads, the log and what grows with use.
    let spare = 1024;
    let budget = max.saturating_sub(mapped + spare) / MAPPINGS_PER_ASYNC_CONNECTION;
    let fits = wanted.min(budget).max(1);
    if fits < wanted {
        tracing::warn!(
            "tenant {}: the kernel's limit of {max} memory mappings per process (vm.max_map_count) allows {fits} live async connections, not {wanted}; raise it (sysctl vm.max_map_count={}) to serve more at once",
            tenant.tenant,
            (wanted * MAPPINGS_PER_ASYNC_CONNECTION + mapped + spare).next_power_of_two()
        );
    }
    fits
}
