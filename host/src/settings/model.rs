//! The validated settings of `host serve`: what the command line or the
//! config file says, turned into values once (by `settings::convert`),
//! before anything is compiled or bound. [`HostConfig`] is the whole host;
//! [`ServeConfig`] one tenant; [`Strategy`] where its connections run, with
//! the knobs of that strategy alone. Plain values: nothing here parses.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::log_level::LogLevel;
pub use super::outbound::Outbound;

/// Where a handler comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerSource {
    /// The echo handler embedded in the binary.
    BuiltinEcho,
    /// A component file.
    File(PathBuf),
}

impl fmt::Display for HandlerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerSource::BuiltinEcho => f.write_str("built-in echo"),
            HandlerSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Where each connection runs, by name (the flags' `--strategy` values are
/// documented in `settings::flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyKind {
    Threading,
    Forking,
    Prefork,
    Async,
}

impl StrategyKind {
    pub const ALL: [StrategyKind; 4] = [
        StrategyKind::Threading,
        StrategyKind::Forking,
        StrategyKind::Prefork,
        StrategyKind::Async,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Threading => "threading",
            StrategyKind::Forking => "forking",
            StrategyKind::Prefork => "prefork",
            StrategyKind::Async => "async",
        }
    }
}

/// Where each connection of a tenant runs, with the knobs of that strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A thread per connection; `workers` threads kept warm.
    Threading { workers: usize },
    /// A child process per connection; at most `max_children` alive at once.
    Forking { max_children: usize },
    /// `processes` worker processes, each with `workers` threads kept warm.
    Prefork { processes: usize, workers: usize },
    /// One worker process whose tokio runtime has `workers` threads.
    Async { workers: usize },
}

impl Strategy {
    pub fn kind(self) -> StrategyKind {
        match self {
            Strategy::Threading { .. } => StrategyKind::Threading,
            Strategy::Forking { .. } => StrategyKind::Forking,
            Strategy::Prefork { .. } => StrategyKind::Prefork,
            Strategy::Async { .. } => StrategyKind::Async,
        }
    }

    pub fn name(self) -> &'static str {
        self.kind().name()
    }

    /// The worker processes of the tenant: `processes` under prefork, one
    /// otherwise.
    pub fn processes(self) -> usize {
        match self {
            Strategy::Prefork { processes, .. } => processes,
            _ => 1,
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
    /// `--metrics-addr`, which wins over the file's `[metrics]` at start and
    /// at every reload.
    pub metrics_addr_flag: Option<SocketAddr>,
    /// The compile cache's directory (`--cache-dir`, `--no-cache`), which a
    /// reload reads the file with again; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
    /// What the log writes: `--log-level`, else `[defaults] log-level`,
    /// else `info`.
    pub log_level: LogLevel,
    /// `--log-level`, which wins over the file at start and at every reload.
    pub log_level_flag: Option<LogLevel>,
}

/// One address a tenant listens on: `IP:PORT`, `unix:PATH`, or
/// `systemd:NAME` (a socket systemd passed; an empty name is the first).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Systemd(String),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Systemd(name) => write!(f, "systemd:{name}"),
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

/// Which PROXY protocol headers a tenant takes (`proxy-protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
    Any,
}

impl ProxyVersion {
    /// As written in `proxy-protocol`.
    pub fn name(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
            ProxyVersion::Any => "any",
        }
    }
}

/// A tenant behind balancers that speak the PROXY protocol: connections
/// from `from` must start with a header of `version` within
/// `header_timeout`, and the client it names is the peer from then on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyProtocol {
    pub version: ProxyVersion,
    /// The balancers' networks; never empty.
    pub from: Vec<IpNet>,
    pub header_timeout: Duration,
}

impl ProxyProtocol {
    /// Whether a connection from `peer` must carry a header: a balancer's.
    /// Unix-socket peers have no address and never do.
    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| {
            let ip = ip.to_canonical();
            self.from.iter().any(|net| net.contains(&ip))
        })
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
    /// The PROXY protocol, if the tenant is behind balancers that send it.
    pub proxy: Option<ProxyProtocol>,
    /// Where connections run, with that strategy's knobs.
    pub strategy: Strategy,
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
    /// Where the guest may connect.
    pub outbound: Outbound,
}

/// One preopened directory: read-only unless `writable` (`::rw`,
/// `mode = "rw"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}

impl Grants {
    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        if self.env.is_empty() && self.dirs.is_empty() && self.outbound.grants.is_empty() {
            return "none (no directories, no environment, no network)".to_string();
        }
        let mut parts = Vec::new();
        if !self.env.is_empty() {
            let keys: Vec<_> = self.env.iter().map(|(k, _)| k.as_str()).collect();
            parts.push(format!("env {}", keys.join(", ")));
        }
        for dir in &self.dirs {
            parts.push(format!(
                "dir {} as {} ({})",
                dir.host.display(),
                dir.guest,
                if dir.writable {
                    "read-write"
                } else {
                    "read-only"
                }
            ));
        }
        if self.outbound.grants.is_empty() {
            parts.push("no network".to_string());
        } else {
            parts.push(self.outbound.describe());
        }
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
            Strategy::Threading { .. } => self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            Strategy::Async { .. } => self
                .max_connections
                .unwrap_or(DEFAULT_MAX_ASYNC_CONNECTIONS),
            Strategy::Forking { max_children } => self
                .max_connections
                .map_or(max_children, |m| m.min(max_children)),
            Strategy::Prefork { processes, .. } => self.per_process_in_flight() * processes,
        }
    }

    /// Prefork: the connections one worker process takes at once
    /// (`--max-connections` shared out, by default
    /// [`DEFAULT_MAX_CONNECTIONS`] each).
    pub fn per_process_in_flight(&self) -> usize {
        let processes = self.strategy.processes();
        self.max_connections
            .map_or(DEFAULT_MAX_CONNECTIONS, |m| m.div_ceil(processes))
    }

    /// The most instances alive at once in one process (a queued connection
    /// has none yet).
    pub fn max_instances(&self) -> usize {
        match self.strategy {
            Strategy::Threading { .. } | Strategy::Async { .. } => self.max_in_flight(),
            Strategy::Forking { .. } => 1,
            Strategy::Prefork { .. } => self.per_process_in_flight(),
        }
    }
}
