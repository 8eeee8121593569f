//! The validated settings of `host serve`: what the command line or the
//! config file says, turned into values once, before anything is compiled or
//! bound. [`HostConfig`] is the whole host; [`ServeConfig`] one tenant.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::wasm::handler::HandlerSource;

/// Where each connection runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyKind {
    /// A thread per connection (reused; `--workers` kept warm) in the
    /// tenant's worker process, as Python's `ThreadingMixIn`.
    Threading,
    /// A child process per connection, as Python's `ForkingMixIn`.
    Forking,
    /// A fixed set of worker processes, forked at start-up, each accepting
    /// from the shared listener and serving with its own threads (Apache's
    /// prefork, for wasm).
    Prefork,
    /// One worker process with a tokio runtime: each connection is a task
    /// and each guest a fiber, so a guest waiting for its client costs a
    /// suspended fiber, not a thread (as `wasmtime serve` runs handlers).
    Async,
}

impl StrategyKind {
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Threading => "threading",
            StrategyKind::Forking => "forking",
            StrategyKind::Prefork => "prefork",
            StrategyKind::Async => "async",
        }
    }
}

/// Tenants one host serves at most: distinct tenant names over one run,
/// since each keeps its own slot of the shared metrics.
pub const MAX_TENANTS: usize = 1024;

/// Everything `host serve` runs: its tenants and the host-wide settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Sorted by name; names are unique, and so are their listen addresses.
    pub tenants: Vec<ServeConfig>,
    /// Where `GET /metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The config file the tenants came from (re-read on reload); `None`
    /// when they came from flags.
    pub file: Option<PathBuf>,
}

/// One address a tenant listens on: `IP:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Which peers a tenant serves (socketserver's `verify_request`): a peer in
/// `deny` is refused; otherwise, if `allow` is not empty, only peers in it
/// are served. Unix-socket peers have no address and are always served
/// (the socket file's mode guards them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl Access {
    pub fn permits(&self, peer: Option<IpAddr>) -> bool {
        let Some(ip) = peer else {
            return true;
        };
        // An IPv4 client of a listener on an IPv4-mapped address (`[::]` is
        // bound IPv6 only, see `listener::bind_tcp`) arrives as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }

    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// Everything one tenant needs to run.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    pub handler: HandlerSource,
    /// At least one address.
    pub listen: Vec<ListenAddr>,
    /// Which peers are served.
    pub access: Access,
    pub strategy: StrategyKind,
    /// Threads kept warm (threading; per process under prefork), or the
    /// runtime's threads (async).
    pub workers: usize,
    /// Worker processes (prefork).
    pub processes: usize,
    /// Child processes alive at once (forking).
    pub max_children: usize,
    /// The most connections in flight at once, if narrower than the
    /// strategy's own bound.
    pub max_connections: Option<usize>,
    /// The service name handlers see in `connection-info.tenant`.
    pub tenant: String,
    pub limits: Limits,
    pub grants: Grants,
    /// How long in-flight connections may finish after SIGINT/SIGTERM.
    pub drain_timeout: Duration,
    /// The compile cache's directory; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
    /// Whether a precompiled handler file may be served.
    pub allow_precompiled: bool,
}

/// What one connection may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time for one connection's `handle`.
    pub timeout: Duration,
    /// A connection that neither sends nor reads for this long is closed.
    pub idle_timeout: Duration,
    /// All linear memories and tables of one instance together, in bytes.
    pub max_memory: u64,
}

/// What the guest may see of the host beyond its connection: nothing unless
/// granted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Environment variables, in the order given.
    pub env: Vec<(String, String)>,
    /// Host directories the guest may read.
    pub dirs: Vec<DirGrant>,
}

/// One read-only preopened directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
}

impl Grants {
    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        if self.env.is_empty() && self.dirs.is_empty() {
            return "none (no directories, no environment, no network)".to_string();
        }
        let mut parts = Vec::new();
        if !self.env.is_empty() {
            let keys: Vec<_> = self.env.iter().map(|(k, _)| k.as_str()).collect();
            parts.push(format!("env {}", keys.join(", ")));
        }
        for dir in &self.dirs {
            parts.push(format!(
                "dir {} as {} (read-only)",
                dir.host.display(),
                dir.guest
            ));
        }
        parts.push("no network".to_string());
        parts.join("; ")
    }
}

/// Connections in flight at once per worker process (threading, prefork)
/// unless `--max-connections` says otherwise: every one of them runs at once
/// on a thread of its own, so this is a bound that protects the machine,
/// not a pool size. A live connection costs its thread's stack and its
/// instance's dirtied memory (about 80 KiB for the Rust echo), so 1,024
/// cost tens of MiB, not the host's whole memory.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Connections in flight at once under `async` unless `--max-connections`
/// says otherwise: a live connection is a task and a suspended fiber, so
/// the bound is set by descriptors (two per connection, the client's and
/// the host's, must fit the usual 20,000-ish limits of a test machine)
/// rather than memory.
pub const DEFAULT_MAX_ASYNC_CONNECTIONS: usize = 16384;

impl ServeConfig {
    /// The default number of worker threads kept warm: four per core.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
    }

    /// The default number of prefork processes: one per core.
    pub fn default_processes() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// The most connections accepted and not yet finished, host-wide.
    /// Threading: `--max-connections`, by default
    /// [`DEFAULT_MAX_CONNECTIONS`]. Forking: `--max-children`, narrowed by
    /// `--max-connections`. Prefork: each process's share, times the
    /// processes.
    pub fn max_in_flight(&self) -> usize {
        match self.strategy {
            StrategyKind::Threading => self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            StrategyKind::Async => self
                .max_connections
                .unwrap_or(DEFAULT_MAX_ASYNC_CONNECTIONS),
            StrategyKind::Forking => self
                .max_connections
                .map_or(self.max_children, |m| m.min(self.max_children)),
            StrategyKind::Prefork => self.per_process_in_flight() * self.processes,
        }
    }

    /// Prefork: the connections one worker process takes at once
    /// (`--max-connections` shared out, by default
    /// [`DEFAULT_MAX_CONNECTIONS`] each).
    pub fn per_process_in_flight(&self) -> usize {
        self.max_connections
            .map_or(DEFAULT_MAX_CONNECTIONS, |m| m.div_ceil(self.processes))
    }

    /// The most instances alive at once in one process (a queued connection
    /// has none yet).
    pub fn max_instances(&self) -> usize {
        match self.strategy {
            StrategyKind::Threading | StrategyKind::Async => self.max_in_flight(),
            StrategyKind::Forking => 1,
            StrategyKind::Prefork => self.per_process_in_flight(),
        }
    }
}
