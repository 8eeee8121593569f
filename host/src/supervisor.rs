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
//! Invariant: a reload changes nothing until everything it needs is
//! compiled and bound; then, per changed tenant, new workers start on the
//! same listeners before the old ones are told to drain, so no client is
//! refused. Listeners are keyed by their configured address and kept open
//! for as long as some tenant lists that address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::Engine;

use crate::compile_cache::CompileCache;
use crate::connection::{Service, LINGER};
use crate::engine::{self, EpochClock};
use crate::handler::{Handler, HandlerSource, LoadOptions};
use crate::listener::Listener;
use crate::metrics::{Metrics, TenantInfo};
use crate::server::{self, ConnectionIds, Shutdown};
use crate::settings::{self, HostConfig, ListenAddr, ServeConfig, StrategyKind, MAX_TENANTS};
use crate::strategy::{self, Async, Forking, Strategy, Threading};

/// A worker that dies sooner than this after its start is replaced only
/// after [`RESPAWN_DELAY`], so a crashing worker cannot become a fork loop.
const QUICK_DEATH: Duration = Duration::from_secs(1);
const RESPAWN_DELAY: Duration = Duration::from_secs(1);
/// How long the host waits at shutdown for orphaned children of dead
/// workers (already being killed by the kernel) to exit.
const ORPHAN_WAIT: Duration = Duration::from_secs(5);
/// How often `--watch` looks at the config and handler files.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// How the host process runs, beyond its config.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Reload when the config file or a handler file changes.
    pub watch: bool,
}

/// One tenant as currently served.
struct Tenant {
    config: ServeConfig,
    service: Arc<Service>,
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
    /// The pool's slot count, or `None` for on-demand allocation.
    pool_slots: Option<usize>,
    config: HostConfig,
    tenants: BTreeMap<String, Tenant>,
    listeners: BTreeMap<ListenKey, Listener>,
    workers: HashMap<libc::pid_t, Worker>,
    /// Replacements waiting for their delay: (when, tenant, generation).
    pending: Vec<(Instant, String, u64)>,
    metrics: Metrics,
    slots: HashMap<String, usize>,
    metrics_listener: Option<TcpListener>,
    metrics_pid: Option<libc::pid_t>,
    /// The pipe that tells the metrics process the current tenants.
    metrics_tx: Option<std::fs::File>,
    ids: ConnectionIds,
    /// The doorbell's descriptors, which no worker keeps.
    doorbell: Vec<RawFd>,
    /// What `--watch` last saw of each watched file.
    watched: Vec<(PathBuf, Option<FileStamp>)>,
    shutting_down: bool,
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
    // SAFETY: prctl on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        tracing::warn!(
            "cannot become the reaper of orphaned worker children: {}",
            io::Error::last_os_error()
        );
    }
    let result = start(config, shutdown, options);
    signal_hook::low_level::unregister(sighup);
    signal_hook::low_level::unregister(sigchld);
    result
}

fn start(config: HostConfig, shutdown: &Shutdown, options: &Options) -> Result<()> {
    // Invariant: everything that can be refused is checked before binding,
    // so a bad handler leaves nothing listening.
    let (engine, pool_slots) = engine::for_host(&config.tenants, config.file.is_some())?;
    let metrics = Metrics::new(MAX_TENANTS)?;
    let mut host = Host {
        engine,
        async_engine: None,
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
        doorbell: shutdown.descriptors().to_vec(),
        // Taken before the handlers are read, so an edit made at any
        // moment after that (even before `listening on`) is seen.
        watched: watch_list(&config),
        shutting_down: false,
    };
    let mut services = Vec::new();
    for tenant in &config.tenants {
        services.push(host.load_service(tenant)?);
    }
    raise_descriptor_limit();
    if let Some(addr) = config.metrics_addr {
        let listener = crate::listener::bind_tcp(addr)
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        host.metrics_listener = Some(listener.into());
    }
    for tenant in &config.tenants {
        for addr in &tenant.listen {
            let key = listen_key(&tenant.tenant, addr);
            if host.listeners.contains_key(&key) {
                bail!("tenant {}: {addr} is listed twice", tenant.tenant);
            }
            host.listeners.insert(key, Listener::bind(addr)?);
        }
    }
    for (tenant, service) in config.tenants.iter().zip(services) {
        log_serving(tenant, &service);
        let slot = host.slot_for(&tenant.tenant)?;
        let service = Arc::new(service.with_metrics(host.metrics.tenant(slot)));
        host.tenants.insert(
            tenant.tenant.clone(),
            Tenant {
                config: tenant.clone(),
                service,
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
        self.spawn_metrics();
        while !shutdown.is_triggered() {
            let mut wake = self.pending.iter().map(|p| p.0).min();
            if options.watch {
                let next = Instant::now() + WATCH_INTERVAL;
                wake = Some(wake.map_or(next, |w| w.min(next)));
            }
            shutdown.wait_until(wake)?;
            self.reap(false);
            self.respawn_due();
            let mut reload = shutdown.take_reload();
            if options.watch && !reload {
                let now = watch_list(&self.config);
                if now != self.watched {
                    tracing::info!("a watched file changed; reloading");
                    reload = true;
                }
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
        }
        self.stop(shutdown)
    }

    /// Stops everything: listeners first, for every process at once, then
    /// each worker drains on its own.
    fn stop(&mut self, shutdown: &Shutdown) -> Result<()> {
        self.shutting_down = true;
        for listener in self.listeners.values() {
            listener.shut_down();
        }
        // Closes the host's copies and removes Unix socket files.
        self.listeners.clear();
        if let Some(pid) = self.metrics_pid.take() {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.metrics_listener = None;
        self.metrics_tx = None;
        let count = self.workers.len();
        tracing::info!("shutting down: stopping {count} worker process(es)");
        self.signal_workers(server::DRAIN_SIGNAL, |_| true);
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
                self.signal_workers(server::END_NOW_SIGNAL, |_| true);
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
        if self.reap_orphans(shutdown)? {
            tracing::info!("stopped; every worker process reaped");
        } else {
            tracing::warn!(
                "stopped; the worker processes are reaped, but a process one of them started still runs after {ORPHAN_WAIT:?}"
            );
        }
        Ok(())
    }

    /// Once every worker is reaped, what may remain are the orphans of a
    /// worker that died (its connections' children, being killed by the
    /// kernel): reaps them all. Returns whether none is left, waiting at most
    /// [`ORPHAN_WAIT`].
    fn reap_orphans(&mut self, shutdown: &Shutdown) -> Result<bool> {
        let deadline = Instant::now() + ORPHAN_WAIT;
        loop {
            match strategy::reap_one(false) {
                strategy::Reaped::Child(..) => {}
                strategy::Reaped::NoChildren => return Ok(true),
                strategy::Reaped::Nothing => {
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

    /// Compiles (or loads from the cache) a tenant's handler.
    fn load_service(&mut self, tenant: &ServeConfig) -> Result<Service> {
        let for_async = tenant.strategy.kind() == StrategyKind::Async;
        let options = LoadOptions {
            cache: open_cache(tenant.cache_dir.as_deref()),
            allow_precompiled: tenant.allow_precompiled,
            for_async,
        };
        let engine = if for_async {
            match &self.async_engine {
                Some(engine) => engine.clone(),
                None => self.async_engine.insert(engine::for_async()?).clone(),
            }
        } else {
            self.engine.clone()
        };
        let handler = Handler::load(&engine, &tenant.handler, &options);
        // From a config file, say which file and tenant; the flags have
        // only one.
        let handler = match &self.config.file {
            Some(file) => {
                handler.with_context(|| format!("{}: tenant {}", file.display(), tenant.tenant))?
            }
            None => handler?,
        };
        let clock = match tenant.strategy.kind() {
            StrategyKind::Forking => EpochClock::Alarm,
            StrategyKind::Threading | StrategyKind::Prefork => EpochClock::Ticker,
            StrategyKind::Async => EpochClock::Yield,
        };
        Ok(Service::new(
            handler,
            tenant.tenant.clone(),
            tenant.limits.clone(),
            tenant.grants.clone(),
            clock,
        )
        .with_access(tenant.access.clone()))
    }

    /// The metrics slot of a tenant name, kept for the whole run so a
    /// tenant's counters survive its reloads.
    fn slot_for(&mut self, name: &str) -> Result<usize> {
        if let Some(&slot) = self.slots.get(name) {
            return Ok(slot);
        }
        let slot = self.slots.len();
        if slot >= self.metrics.max_tenants() {
            bail!(
                "more than {} distinct tenant names in one run; restart the host",
                self.metrics.max_tenants()
            );
        }
        self.slots.insert(name.to_string(), slot);
        Ok(slot)
    }

    fn spawn_tenant(&mut self, name: &str) {
        let Some(tenant) = self.tenants.get(name) else {
            return;
        };
        let count = tenant.config.strategy.processes();
        let generation = tenant.generation;
        for _ in 0..count {
            self.spawn_worker(name, generation);
        }
    }

    fn spawn_worker(&mut self, name: &str, generation: u64) {
        let parent = std::process::id();
        // SAFETY: the host process is single-threaded (module invariant), so
        // the child starts with consistent memory.
        match unsafe { libc::fork() } {
            -1 => {
                let err = io::Error::last_os_error();
                tracing::error!(
                    "tenant {name}: cannot start a worker process: {err}; retrying in {RESPAWN_DELAY:?}"
                );
                self.pending
                    .push((Instant::now() + RESPAWN_DELAY, name.to_string(), generation));
            }
            0 => self.run_worker(name, parent),
            pid => {
                self.workers.insert(
                    pid,
                    Worker {
                        tenant: name.to_string(),
                        generation,
                        started: Instant::now(),
                    },
                );
            }
        }
    }

    /// The worker's side of `fork()`: it keeps only its tenant's listeners,
    /// takes orders only from the host process's signals, and serves.
    fn run_worker(&mut self, name: &str, parent: u32) -> ! {
        // Only the host's DRAIN_SIGNAL and END_NOW_SIGNAL count from here.
        let mut close = self.doorbell.clone();
        close.extend(self.metrics_listener.as_ref().map(|l| l.as_raw_fd()));
        close.extend(self.metrics_tx.as_ref().map(|f| f.as_raw_fd()));
        strategy::leave_parent(&close);
        // A worker must not outlive the host process (killed with SIGKILL,
        // say): the kernel sends it the drain signal then. If the host is
        // already gone, there is nothing to serve for.
        // SAFETY: prctl and getppid on this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, server::DRAIN_SIGNAL);
            if libc::getppid() as u32 != parent {
                libc::_exit(0);
            }
        }
        let code = match self.serve_as_worker(name) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(
                    "tenant {name}: worker process pid-{}: {e:#}",
                    std::process::id()
                );
                1
            }
        };
        // SAFETY: ends this worker process without the host's destructors.
        unsafe { libc::_exit(code) }
    }

    fn serve_as_worker(&mut self, name: &str) -> Result<()> {
        let tenant = self
            .tenants
            .get(name)
            .ok_or_else(|| anyhow!("the tenant is gone"))?;
        let config = tenant.config.clone();
        let service = tenant.service.clone();
        // Keep this tenant's listeners; close every other tenant's copy, so
        // a removed tenant's address stops accepting when the host closes
        // it (a forked process never removes a Unix socket file).
        let mut all = std::mem::take(&mut self.listeners);
        let listeners: Vec<Listener> = config
            .listen
            .iter()
            .filter_map(|addr| all.remove(&listen_key(name, addr)))
            .collect();
        drop(all);
        if listeners.len() != config.listen.len() {
            bail!("a listener of the tenant is closed");
        }
        let shutdown = Shutdown::new()?;
        shutdown.stop_on_signal_directly(server::DRAIN_SIGNAL)?;
        shutdown.stop_on_signal_directly(server::END_NOW_SIGNAL)?;
        let mut strategy: Box<dyn Strategy> = match config.strategy {
            settings::Strategy::Forking { .. } => {
                let fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
                Box::new(Forking::new(
                    service,
                    config.max_in_flight(),
                    &shutdown,
                    &fds,
                )?)
            }
            settings::Strategy::Threading { workers }
            | settings::Strategy::Prefork { workers, .. } => {
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
            &self.ids,
            config.drain_timeout,
        )
    }

    /// The tenants as the metrics page shows them.
    fn tenant_infos(&self) -> Vec<TenantInfo> {
        self.tenants
            .values()
            .map(|t| TenantInfo {
                name: t.config.tenant.clone(),
                slot: t.slot,
                digest: t.service.handler().digest().to_string(),
                strategy: t.config.strategy.name().to_string(),
            })
            .collect()
    }

    /// The metrics process: serves `/metrics` from the shared counters. It
    /// lives for the whole run (restarted only if it dies); a reload sends
    /// it the new tenant list through a pipe ([`Host::update_metrics`]), so
    /// no scrape is cut off by a reload.
    fn spawn_metrics(&mut self) {
        let Some(listener) = &self.metrics_listener else {
            return;
        };
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            tracing::error!(
                "cannot start the metrics process: {}",
                io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: both descriptors were just created and are owned here only.
        let (read, write) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let tenants = self.tenant_infos();
        let parent = std::process::id();
        // SAFETY: the host process is single-threaded (module invariant).
        match unsafe { libc::fork() } {
            -1 => tracing::error!(
                "cannot start the metrics process: {}",
                io::Error::last_os_error()
            ),
            0 => {
                let mut close = self.doorbell.clone();
                close.extend(self.listeners.values().map(|l| l.as_raw_fd()));
                close.push(write.as_raw_fd());
                close.extend(self.metrics_tx.as_ref().map(|f| f.as_raw_fd()));
                strategy::leave_parent(&close);
                // SAFETY: prctl and getppid on this process.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() as u32 != parent {
                        libc::_exit(0);
                    }
                }
                let served =
                    listener
                        .try_clone()
                        .map_err(anyhow::Error::from)
                        .and_then(|listener| {
                            serve_metrics(listener, self.metrics.clone(), tenants, read)
                        });
                if let Err(e) = served {
                    tracing::error!("the metrics server stopped: {e:#}");
                }
                // SAFETY: ends this process without the host's destructors.
                unsafe { libc::_exit(1) }
            }
            pid => {
                self.metrics_pid = Some(pid);
                self.metrics_tx = Some(write);
            }
        }
    }

    /// Tells the metrics process the tenants as they are now: one line per
    /// tenant (`slot name digest strategy`, tab-separated: tenant names
    /// hold no tabs), then an empty line.
    fn update_metrics(&mut self) {
        let infos = self.tenant_infos();
        let Some(tx) = &mut self.metrics_tx else {
            return;
        };
        let mut text = String::new();
        for t in infos {
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                t.slot, t.name, t.digest, t.strategy
            ));
        }
        text.push('\n');
        if let Err(e) = std::io::Write::write_all(tx, text.as_bytes()) {
            tracing::warn!("cannot update the metrics process: {e}");
        }
    }

    /// Reaps exited workers, and replaces those still current.
    fn reap(&mut self, mut block: bool) {
        loop {
            let (pid, status) = match strategy::reap_one(block) {
                strategy::Reaped::Child(pid, status) => (pid, status),
                strategy::Reaped::Nothing => return,
                strategy::Reaped::NoChildren => {
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
            let how = if libc::WIFSIGNALED(status) {
                format!("was killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("exited with status {}", libc::WEXITSTATUS(status))
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

    fn respawn_due(&mut self) {
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

    fn signal_workers(&self, signal: libc::c_int, which: impl Fn(&Worker) -> bool) {
        for (&pid, worker) in &self.workers {
            if which(worker) {
                // SAFETY: signalling our own, not yet reaped, child.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }

    /// Re-reads the config (or, without a file, the handlers) and switches
    /// each changed tenant, or changes nothing and says why.
    fn reload(&mut self) {
        match self.prepare_reload() {
            Ok(plan) => {
                let summary = self.apply(plan);
                self.metrics.reloaded(true);
                tracing::info!("reloaded: {summary}");
            }
            Err(e) => {
                self.metrics.reloaded(false);
                tracing::error!("reload failed, still serving the previous configuration: {e:#}");
            }
        }
    }

    /// Everything a reload needs, compiled and bound; nothing switched yet.
    fn prepare_reload(&mut self) -> Result<Plan> {
        let config = settings::reload(&self.config)?;
        if let Some(slots) = self.pool_slots {
            for tenant in config
                .tenants
                .iter()
                .filter(|t| t.strategy.kind() != StrategyKind::Async)
            {
                let needs = tenant.max_instances();
                if needs > slots {
                    bail!(
                        "tenant {} needs {needs} instance slots at once, but the host started with {slots}; restart the host to grow the pool",
                        tenant.tenant
                    );
                }
            }
        }
        let mut changed = Vec::new();
        for tenant in &config.tenants {
            let old = self.tenants.get(&tenant.tenant);
            let same_settings = old.is_some_and(|old| old.config == *tenant);
            let digest = match &tenant.handler {
                HandlerSource::File(_) => crate::compile_cache::digest(
                    &crate::handler::read(&tenant.handler)
                        .with_context(|| format!("tenant {}", tenant.tenant))?,
                ),
                HandlerSource::BuiltinEcho => String::new(),
            };
            let same_handler = old.is_some_and(|old| match &tenant.handler {
                HandlerSource::File(_) => old.service.handler().digest() == digest,
                HandlerSource::BuiltinEcho => old.config.handler == tenant.handler,
            });
            if same_settings && same_handler {
                continue;
            }
            let what = match old {
                None => "added".to_string(),
                Some(old) => describe_change(&old.config, tenant, !same_handler),
            };
            let service = self.load_service(tenant)?;
            changed.push((tenant.clone(), service, what));
        }
        // Bind what is new before anything switches.
        let mut bound = BTreeMap::new();
        for tenant in &config.tenants {
            for addr in &tenant.listen {
                let key = listen_key(&tenant.tenant, addr);
                if !self.listeners.contains_key(&key) && !bound.contains_key(&key) {
                    bound.insert(key, Listener::bind(addr)?);
                }
            }
        }
        let removed: Vec<String> = self
            .tenants
            .keys()
            .filter(|name| !config.tenants.iter().any(|t| &t.tenant == *name))
            .cloned()
            .collect();
        Ok(Plan {
            config,
            changed,
            removed,
            bound,
        })
    }

    /// Switches to `plan`: changed and added tenants get new workers, then
    /// their old workers and removed tenants' workers drain.
    fn apply(&mut self, plan: Plan) -> String {
        let Plan {
            config,
            changed,
            removed,
            bound,
        } = plan;
        let fresh: BTreeSet<ListenKey> = bound.keys().cloned().collect();
        self.listeners.extend(bound);
        let mut summary = Vec::new();
        for (tenant, service, what) in changed {
            let name = tenant.tenant.clone();
            let slot = match self.slot_for(&name) {
                Ok(slot) => slot,
                Err(e) => {
                    summary.push(format!("{name}: not started ({e})"));
                    continue;
                }
            };
            log_serving(&tenant, &service);
            let service = Arc::new(service.with_metrics(self.metrics.tenant(slot)));
            let generation = self.tenants.get(&name).map_or(1, |t| t.generation + 1);
            self.tenants.insert(
                name.clone(),
                Tenant {
                    config: tenant,
                    service,
                    generation,
                    slot,
                },
            );
            self.spawn_tenant(&name);
            // The new workers accept from the same sockets; the old ones
            // stop accepting and finish what they have.
            self.signal_workers(server::DRAIN_SIGNAL, |w| {
                w.tenant == name && w.generation < generation
            });
            summary.push(format!("{name}: {what}"));
        }
        for name in removed {
            self.tenants.remove(&name);
            self.signal_workers(server::DRAIN_SIGNAL, |w| w.tenant == name);
            summary.push(format!("{name}: removed, draining"));
        }
        // Close the listeners no tenant lists any more.
        let wanted: BTreeSet<ListenKey> = config
            .tenants
            .iter()
            .flat_map(|t| t.listen.iter().map(|a| listen_key(&t.tenant, a)))
            .collect();
        self.listeners.retain(|key, _| wanted.contains(key));
        for tenant in &config.tenants {
            for addr in &tenant.listen {
                let key = listen_key(&tenant.tenant, addr);
                if !fresh.contains(&key) {
                    continue;
                }
                if let Some(listener) = self.listeners.get(&key) {
                    crate::logging::announce(&format!(
                        "listening on {} tenant={}",
                        listener.local(),
                        tenant.tenant
                    ));
                }
            }
        }
        self.config = config;
        if summary.is_empty() {
            return "nothing changed".to_string();
        }
        // The metrics page shows the tenants as they are now.
        self.update_metrics();
        summary.join("; ")
    }
}

/// The metrics process's work: serve the page, and take new tenant lists
/// from `updates` (see [`Host::update_metrics`]) on a thread of its own.
fn serve_metrics(
    listener: TcpListener,
    metrics: Metrics,
    tenants: Vec<TenantInfo>,
    updates: std::fs::File,
) -> Result<()> {
    let tenants = Arc::new(std::sync::RwLock::new(tenants));
    let shown = tenants.clone();
    std::thread::Builder::new()
        .name("metrics-updates".into())
        .spawn(move || {
            use std::io::BufRead as _;
            let mut next = Vec::new();
            for line in std::io::BufReader::new(updates).lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    *shown.write().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut next);
                    continue;
                }
                let fields: Vec<&str> = line.split('\t').collect();
                if let [slot, name, digest, strategy] = fields[..] {
                    if let Ok(slot) = slot.parse() {
                        next.push(TenantInfo {
                            name: name.to_string(),
                            slot,
                            digest: digest.to_string(),
                            strategy: strategy.to_string(),
                        });
                    }
                }
            }
            // The host process is gone: PR_SET_PDEATHSIG ends this one.
        })
        .context("cannot start the metrics update thread")?;
    crate::metrics::serve_http(listener, move || {
        metrics.render(&tenants.read().unwrap_or_else(|e| e.into_inner()))
    })
}

/// A reload, ready to switch.
struct Plan {
    config: HostConfig,
    /// Tenants with new settings or a new handler, or new tenants, with
    /// their compiled service and a description of the change.
    changed: Vec<(ServeConfig, Service, String)>,
    removed: Vec<String>,
    /// Listeners for addresses no tenant had.
    bound: BTreeMap<ListenKey, Listener>,
}

/// What changed in one tenant, for the reload's log line.
fn describe_change(old: &ServeConfig, new: &ServeConfig, handler: bool) -> String {
    let mut what = Vec::new();
    if handler || old.handler != new.handler {
        what.push("handler");
    }
    if old.listen != new.listen {
        what.push("listen");
    }
    if old.access != new.access {
        what.push("allow/deny");
    }
    if old.strategy != new.strategy || old.max_connections != new.max_connections {
        what.push("strategy/workers");
    }
    if old.limits != new.limits || old.drain_timeout != new.drain_timeout {
        what.push("limits");
    }
    if old.grants != new.grants {
        what.push("grants");
    }
    if what.is_empty() {
        what.push("settings");
    }
    format!("{} changed", what.join(", "))
}

fn log_serving(config: &ServeConfig, service: &Service) {
    let workers = match config.strategy {
        settings::Strategy::Threading { workers } => format!("{workers} threads kept warm"),
        settings::Strategy::Forking { max_children } => format!("at most {max_children} children"),
        settings::Strategy::Prefork { processes, workers } => {
            format!("{processes} processes, {workers} threads kept warm in each")
        }
        settings::Strategy::Async { workers } => format!("{workers} runtime threads"),
    };
    let limits = &config.limits;
    tracing::info!(
        "tenant {}: serving {} (sha256 {}) with the {} strategy ({workers}, at most {} connections in flight); limits: memory {}, timeout {:?}, idle timeout {:?}; grants: {}{}",
        config.tenant,
        config.handler,
        &service.handler().digest()[..12.min(service.handler().digest().len())],
        config.strategy.name(),
        config.max_in_flight(),
        bytesize::ByteSize(limits.max_memory).display().iec(),
        limits.timeout,
        limits.idle_timeout,
        config.grants.describe(),
        if config.access.is_open() {
            String::new()
        } else {
            format!(
                "; allow {:?}, deny {:?}",
                config.access.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                config.access.deny.iter().map(|n| n.to_string()).collect::<Vec<_>>()
            )
        }
    );
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
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return wanted;
    }
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let per_connection = 1 + tenant.grants.dirs.len();
    let budget =
        (limit.rlim_cur as usize).saturating_sub(open + RESERVED_DESCRIPTORS) / per_connection;
    let fits = wanted.min(budget).max(1);
    if fits < wanted {
        tracing::warn!(
            "tenant {}: the descriptor limit ({}) allows {fits} connections in flight per worker process, not {wanted}; raise it (ulimit -n) to serve more at once",
            tenant.tenant,
            limit.rlim_cur
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

/// Raises the soft limit on open descriptors to the hard one: every
/// connection in flight or waiting in the queue holds a socket, and the
/// common soft default (1024) would cap `--max-connections` far below what
/// the machine allows.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!("cannot raise the open-file limit above {}", limit.rlim_cur);
            }
        }
    }
}

/// The compile cache, if one is configured and usable; a cache that cannot be
/// opened costs only speed.
pub(crate) fn open_cache(dir: Option<&std::path::Path>) -> Option<CompileCache> {
    match CompileCache::open(dir?) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!("compiling without a cache: {e:#}");
            None
        }
    }
}

/// What `--watch` compares: a file's identity, size and times. The inode
/// catches a file replaced by a rename even within one tick of the
/// file-system clock, which modification times alone would miss.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    ctime: (i64, i64),
}

/// The files `--watch` looks at in `config`, with their stamps (`None`:
/// missing or unreadable).
fn watch_list(config: &HostConfig) -> Vec<(PathBuf, Option<FileStamp>)> {
    use std::os::unix::fs::MetadataExt;
    let mut paths: BTreeSet<PathBuf> = BTreeSet::new();
    paths.extend(config.file.clone());
    for tenant in &config.tenants {
        if let HandlerSource::File(path) = &tenant.handler {
            paths.insert(path.clone());
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let stamp = std::fs::metadata(&p).ok().map(|m| FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                modified: m.modified().ok(),
                ctime: (m.ctime(), m.ctime_nsec()),
            });
            (p, stamp)
        })
        .collect()
}
