//! The host process of `host serve`: it compiles every tenant's handler,
//! binds every listener, forks each tenant's worker process(es) and then only
//! supervises them. It replaces a worker that dies, reloads the config on
//! SIGHUP (or `--watch`), and at SIGINT/SIGTERM stops every listener at once,
//! lets each worker drain, and reaps them all.
//!
//! Each worker process serves one tenant with that tenant's strategy
//! (`server::run` over its own listeners): threading is one process with a
//! pool of threads, forking one process that forks a child per connection,
//! prefork `processes` processes of threads. A tenant's flood, crash or
//! reload so never touches another tenant's process.
//!
//! Invariant: the host process starts no thread (it compiles on the main
//! thread; epoch tickers and pools start in the workers after the fork), so
//! everything it forks starts consistent.
//!
//! Invariant: listeners are keyed by their configured address and kept
//! open for as long as some tenant lists that address (see `reload`).
//!
//! The rooms: `load` (compiling a tenant), `workers` (the worker processes'
//! lifecycle), `reload` and `watch`, `metrics_process`, `readiness` (what
//! `/readyz` says), `notify` (telling systemd it is ready, reloading,
//! stopping). The worker process
//! itself is `crate::worker`, which gets only a `worker::Plan`.

mod load;
mod metrics_process;
mod notify;
mod readiness;
mod reload;
mod upgrade;
mod watch;
mod workers;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use wasmtime::Engine;

pub(crate) use load::open_cache;
use load::{log_serving, raise_descriptor_limit};
use notify::{Notifier, STATUS_INTERVAL};
use watch::{watch_list, FileStamp, WATCH_INTERVAL};

use crate::conn::service::{Service, LINGER};
use crate::handoff::{self, Handed, Predecessor, Successor, UpgradeSocket};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::server::ConnectionIds;
use crate::settings::{HostConfig, ListenAddr, ServeConfig, MAX_TENANTS};
use crate::shutdown::{Shutdown, DRAIN_SIGNAL, END_NOW_SIGNAL};
use crate::sys::process::{self, Pid, Reaped};
use crate::wasm::engine;

/// How long the host waits at shutdown for orphaned children of dead
/// workers (already being killed by the kernel) to exit.
const ORPHAN_WAIT: Duration = Duration::from_secs(5);

/// How the host process runs, beyond its config.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Reload when the config file or a handler file changes.
    pub watch: bool,
    /// How long to go on accepting, not ready, after a stop signal
    /// (`--shutdown-delay`; zero: none).
    pub shutdown_delay: Duration,
    /// Where to listen for a successor (`--upgrade-socket`).
    pub upgrade_socket: Option<PathBuf>,
    /// Take over from the host on `upgrade_socket` (`--take-over`).
    pub take_over: bool,
}

/// One tenant as currently served.
struct Tenant {
    config: ServeConfig,
    service: Arc<Service>,
    /// The descriptors its compiled handler holds (its image file).
    handler_fds: Vec<RawFd>,
    /// Bumped at every reload that changes the tenant; its workers carry it.
    generation: u64,
    /// Its slot in the shared metrics.
    slot: usize,
}

/// What identifies a listener across reloads: its configured address, and
/// for a TCP port 0 (any free port) also its tenant, since two tenants may
/// both ask for "any port".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ListenKey(ListenAddr, Option<String>);

fn listen_key(tenant: &str, addr: &ListenAddr) -> ListenKey {
    match addr {
        ListenAddr::Tcp(inet) if inet.port() == 0 => {
            ListenKey(addr.clone(), Some(tenant.to_string()))
        }
        _ => ListenKey(addr.clone(), None),
    }
}

/// A worker process.
struct Worker {
    tenant: String,
    generation: u64,
    started: Instant,
}

struct Host {
    engine: Engine,
    /// The async tenants' engine, made when the first one is loaded.
    async_engine: Option<Engine>,
    /// The descriptors the engines hold, which every worker keeps.
    engine_fds: Vec<RawFd>,
    /// The pool's slot count, or `None` for on-demand allocation.
    pool_slots: Option<usize>,
    config: HostConfig,
    tenants: BTreeMap<String, Tenant>,
    listeners: BTreeMap<ListenKey, Listener>,
    workers: HashMap<Pid, Worker>,
    /// Replacements waiting for their delay: (when, tenant, generation).
    pending: Vec<(Instant, String, u64)>,
    metrics: Metrics,
    slots: HashMap<String, usize>,
    metrics_listener: Option<TcpListener>,
    metrics_pid: Option<Pid>,
    /// The pipe that tells the metrics process the current tenants.
    metrics_tx: Option<std::fs::File>,
    ids: ConnectionIds,
    /// What `--watch` last saw of each watched file.
    watched: Vec<(PathBuf, Option<FileStamp>)>,
    shutting_down: bool,
    /// In `--shutdown-delay`: still serving, but `/readyz` says draining.
    delaying: bool,
    /// systemd's notify socket (`NOTIFY_SOCKET`), if any.
    notify: Notifier,
    /// When the next `STATUS=` refresh is due (with a notify socket).
    next_status: Instant,
    /// The upgrade socket (`--upgrade-socket`), while this host may be
    /// replaced.
    upgrade: Option<UpgradeSocket>,
    /// A successor that holds this host's sockets and is starting.
    successor: Option<Successor>,
    /// The successor is ready: this host drains and leaves the sockets to it.
    handed_over: bool,
    /// The host this one took over from, told to drain once this one is ready.
    predecessor: Option<Predecessor>,
    /// Until when the upgrade socket is not listened to (after an error).
    upgrade_paused: Option<Instant>,
    /// A reload asked for while a successor was starting: done once it is
    /// gone (the successor holds this host's listeners as they are).
    reload_postponed: bool,
}

/// `host serve`: everything in `config`, until `shutdown`.
pub fn run(config: HostConfig, shutdown: &Shutdown, options: &Options) -> Result<()> {
    // Before anything is printed: a SIGHUP sent as soon as `listening on`
    // appears must reload, not kill. One that comes during start-up waits
    // for the first turn of the loop.
    let sigchld = shutdown.ring_on_signal(libc::SIGCHLD)?;
    let sighup = shutdown.reload_on_signal(libc::SIGHUP)?;
    // A worker that dies leaves orphans: its connections' children, which
    // the kernel kills as it dies (see `strategy::Forking`). They become
    // the host's to reap, not init's, so the host knows when every process
    // it started is gone.
    if let Err(e) = process::become_subreaper() {
        tracing::warn!("cannot become the reaper of orphaned worker children: {e}");
    }
    let result = start(config, shutdown, options);
    signal_hook::low_level::unregister(sighup);
    signal_hook::low_level::unregister(sigchld);
    result
}

fn start(config: HostConfig, shutdown: &Shutdown, options: &Options) -> Result<()> {
    // Invariant: everything that can be refused is checked before binding,
    // so a bad handler leaves nothing listening.
    // The host process runs one thread: what opens meanwhile is the
    // engine's, and every worker keeps it.
    let notify = Notifier::from_env();
    let (engine, engine_fds) = process::descriptors_opened_by(|| {
        engine::for_host(&config.tenants, config.file.is_some())
    })?;
    let (engine, pool_slots) = engine?;
    let metrics = Metrics::new(MAX_TENANTS)?;
    let mut host = Host {
        engine,
        async_engine: None,
        engine_fds,
        pool_slots,
        config: config.clone(),
        tenants: BTreeMap::new(),
        listeners: BTreeMap::new(),
        workers: HashMap::new(),
        pending: Vec::new(),
        metrics,
        slots: HashMap::new(),
        metrics_listener: None,
        metrics_pid: None,
        metrics_tx: None,
        ids: ConnectionIds::new()?,
        // Taken before the handlers are read, so an edit made at any
        // moment after that (even before `listening on`) is seen.
        watched: watch_list(&config),
        shutting_down: false,
        delaying: false,
        notify,
        next_status: Instant::now() + STATUS_INTERVAL,
        upgrade: None,
        successor: None,
        handed_over: false,
        predecessor: None,
        upgrade_paused: None,
        reload_postponed: false,
    };
    let mut services = Vec::new();
    for tenant in &config.tenants {
        services.push(host.load_service(tenant)?);
    }
    raise_descriptor_limit();
    // Once every handler compiled: a successor that cannot start asks the
    // running host for nothing.
    let mut handed = match (&options.upgrade_socket, options.take_over) {
        (Some(path), true) => handoff::take_over(path)?,
        _ => Handed::nothing(),
    };
    if let Some(addr) = config.metrics_addr {
        host.metrics_listener = Some(upgrade::metrics_listener_for(&mut handed, addr)?);
    }
    for tenant in &config.tenants {
        for addr in &tenant.listen {
            let key = listen_key(&tenant.tenant, addr);
            if host.listeners.contains_key(&key) {
                bail!("tenant {}: {addr} is listed twice", tenant.tenant);
            }
            let listener = upgrade::listener_for(&mut handed, &key)?;
            host.listeners.insert(key, listener);
        }
    }
    if let Some(path) = &options.upgrade_socket {
        host.upgrade = Some(handed.upgrade_socket(path)?);
    }
    upgrade::log_leftovers(&mut handed);
    host.predecessor = handed.predecessor();
    for (tenant, (service, handler_fds)) in config.tenants.iter().zip(services) {
        log_serving(tenant, &service);
        let slot = host.slot_for(&tenant.tenant)?;
        let service = Arc::new(service.with_metrics(host.metrics.tenant(slot)));
        host.tenants.insert(
            tenant.tenant.clone(),
            Tenant {
                config: tenant.clone(),
                service,
                handler_fds,
                generation: 1,
                slot,
            },
        );
    }
    // The stable lines tests and scripts wait for: one per listener.
    for tenant in &config.tenants {
        for addr in &tenant.listen {
            crate::logging::announce(&format!(
                "listening on {} tenant={}",
                host.listeners[&listen_key(&tenant.tenant, addr)].local(),
                tenant.tenant
            ));
        }
    }
    if let Some(listener) = &host.metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            crate::logging::announce(&format!("metrics on http://{addr}/metrics"));
        }
    }

    host.supervise(shutdown, options)
}

impl Host {
    fn supervise(&mut self, shutdown: &Shutdown, options: &Options) -> Result<()> {
        let names: Vec<String> = self.tenants.keys().cloned().collect();
        for name in &names {
            self.spawn_tenant(name);
        }
        // Before the metrics process answers its first `/readyz`.
        self.update_readiness();
        self.spawn_metrics();
        // Every tenant listens (the `listening on` lines are out).
        self.notify.ready(&self.status_line());
        self.relieve_predecessor(shutdown.is_triggered());
        while !shutdown.is_triggered() && !self.handed_over {
            let mut wake = self.pending.iter().map(|p| p.0).min();
            if let Some(until) = self.upgrade_paused {
                wake = Some(wake.map_or(until, |w| w.min(until)));
            }
            if options.watch {
                let next = Instant::now() + WATCH_INTERVAL;
                wake = Some(wake.map_or(next, |w| w.min(next)));
            }
            if self.notify.enabled() {
                wake = Some(wake.map_or(self.next_status, |w| w.min(self.next_status)));
            }
            let [knocked, spoke] = shutdown.wait_for(wake, &self.upgrade_fds())?[..] else {
                unreachable!("one answer per descriptor");
            };
            if knocked {
                self.answer_successor();
            }
            if spoke && self.hear_successor() {
                break;
            }
            self.reap(false);
            self.respawn_due();
            if self.notify.enabled() && Instant::now() >= self.next_status {
                self.notify.status(&self.status_line());
                self.next_status = Instant::now() + STATUS_INTERVAL;
            }
            let mut reload = shutdown.take_reload();
            if options.watch && !reload {
                let now = watch_list(&self.config);
                if now != self.watched {
                    tracing::info!("a watched file changed; reloading");
                    reload = true;
                }
            }
            if reload && self.successor.is_some() {
                tracing::info!("reload postponed: a successor holds the listeners as they are");
                self.reload_postponed = true;
                reload = false;
            } else if self.reload_postponed && self.successor.is_none() && !self.handed_over {
                self.reload_postponed = false;
                reload = true;
            }
            if reload && !shutdown.is_triggered() {
                // Stamped before the files are read: an edit made while
                // the reload reads them differs from this and reloads again.
                let before = watch_list(&self.config);
                self.reload();
                self.watched = watch_list(&self.config)
                    .into_iter()
                    .map(
                        |(path, stamp)| match before.iter().find(|(p, _)| *p == path) {
                            Some((_, seen)) => (path, seen.clone()),
                            None => (path, stamp),
                        },
                    )
                    .collect();
            }
            self.update_readiness();
            self.relieve_predecessor(false);
        }
        // Stopped before it was ready: the predecessor serves on.
        self.relieve_predecessor(true);
        if self.successor.is_none() {
            self.delay_shutdown(shutdown, options.shutdown_delay)?;
        }
        self.stop(shutdown)
    }

    /// `--shutdown-delay`: `/readyz` answers 503 at once, but the host
    /// serves on (and replaces a worker that dies) until the delay has
    /// passed or a second signal comes, so a balancer's health check takes
    /// it out of rotation before its listeners close.
    fn delay_shutdown(&mut self, shutdown: &Shutdown, delay: Duration) -> Result<()> {
        if delay.is_zero() || shutdown.is_forced() {
            return Ok(());
        }
        // No successor waits on a host that is going away.
        self.upgrade = None;
        self.delaying = true;
        self.update_readiness();
        self.notify.stopping(&format!(
            "stopping: not ready, still accepting for {delay:?} before draining"
        ));
        tracing::info!(
            "shutting down: /readyz answers 503; still accepting for {delay:?} (--shutdown-delay), then draining"
        );
        let until = Instant::now() + delay;
        while Instant::now() < until && !shutdown.is_forced() {
            let wake = self.pending.iter().map(|p| p.0).min();
            shutdown.wait_until(Some(wake.map_or(until, |w| w.min(until))))?;
            self.reap(false);
            self.respawn_due();
        }
        Ok(())
    }

    /// Stops everything: `/readyz` says so first, then the listeners
    /// close, for every process at once, then each worker drains on its
    /// own. The metrics process answers through the drain and is stopped
    /// last.
    fn stop(&mut self, shutdown: &Shutdown) -> Result<()> {
        self.release_to_successor();
        self.shutting_down = true;
        self.update_readiness();
        self.notify.stopping(&format!(
            "stopping: draining {} worker process(es)",
            self.workers.len()
        ));
        for listener in self.listeners.values() {
            listener.shut_down();
        }
        // Closes the host's copies and removes Unix socket files.
        self.listeners.clear();
        let count = self.workers.len();
        tracing::info!("shutting down: stopping {count} worker process(es)");
        self.signal_workers(DRAIN_SIGNAL, |_| true);
        let drain = self
            .tenants
            .values()
            .map(|t| t.config.drain_timeout)
            .max()
            .unwrap_or_default();
        // Each worker drains for up to its --drain-timeout; give it time to
        // close.
        let deadline = Instant::now() + drain + LINGER + Duration::from_secs(2);
        let mut forwarded_second = false;
        loop {
            self.reap(false);
            if self.workers.is_empty() {
                break;
            }
            if shutdown.is_forced() && !forwarded_second {
                // The second signal: every worker ends what it has at once.
                self.signal_workers(END_NOW_SIGNAL, |_| true);
                forwarded_second = true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    "{} worker process(es) outlived the drain; killing them",
                    self.workers.len()
                );
                self.signal_workers(libc::SIGKILL, |_| true);
                while !self.workers.is_empty() {
                    self.reap(true);
                }
                break;
            }
            shutdown.wait_until(Some(deadline))?;
        }
        // Reaped with the orphans below.
        if let Some(pid) = self.metrics_pid.take() {
            process::signal_child(pid, libc::SIGKILL);
        }
        self.metrics_listener = None;
        self.metrics_tx = None;
        if self.reap_orphans(shutdown)? {
            tracing::info!("stopped; every worker process reaped");
        } else {
            tracing::warn!(
                "stopped; the worker processes are reaped, but a process one of them started still runs after {ORPHAN_WAIT:?}"
            );
        }
        Ok(())
    }

    /// The tenants and their connections, for systemd's `STATUS=`:
    /// `serving 2 tenant(s): a (1 in flight, 20 served), b (...)`.
    fn status_line(&self) -> String {
        let tenants: Vec<String> = self
            .tenants
            .iter()
            .map(|(name, tenant)| {
                let (in_flight, served) = self.metrics.tenant(tenant.slot).counts();
                format!("{name} ({in_flight} in flight, {served} served)")
            })
            .collect();
        format!(
            "serving {} tenant(s): {}",
            tenants.len(),
            tenants.join(", ")
        )
    }

    /// Once every worker is reaped, what may remain are the orphans of a
    /// worker that died (its connections' children, being killed by the
    /// kernel): reaps them all. Returns whether none is left, waiting at most
    /// [`ORPHAN_WAIT`].
    fn reap_orphans(&mut self, shutdown: &Shutdown) -> Result<bool> {
        let deadline = Instant::now() + ORPHAN_WAIT;
        loop {
            match process::reap_one(false) {
                Reaped::Child(..) => {}
                Reaped::NoChildren => return Ok(true),
                Reaped::Nothing => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(false);
                    }
                    // SIGCHLD rings the doorbell; the bound is a backstop.
                    shutdown.wait_until(Some(deadline.min(now + Duration::from_millis(50))))?;
                }
            }
        }
    }
}
