//! The command line: raw flags, and their one-time conversion into a
//! validated [`ServeConfig`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{
    Access, DirGrant, Grants, HostConfig, Limits, ListenAddr, ServeConfig, StrategyKind,
};
use crate::wasm::compile_cache::CompileCache;
use crate::wasm::handler::HandlerSource;

#[derive(Parser, Debug)]
#[command(
    name = "host",
    version,
    about = "Serve TCP with WebAssembly: every connection runs the `handle` export of a component in a fresh, sandboxed instance."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: boxing `ServeArgs` would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Accept TCP connections and run the handler for each one.
    Serve(ServeArgs),
    /// Compile a handler ahead of time into a file `serve --allow-precompiled`
    /// loads without compiling.
    Compile(CompileArgs),
    /// Say whether a file can be served, and why not; with --run, also run
    /// the standard echo scenarios against it.
    Check(CheckArgs),
    /// Work with a multi-tenant config file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Parse, validate and compile everything in a config file, print the
    /// effective settings of every tenant, and exit non-zero on any problem.
    Check {
        /// The config file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Where compiled handlers are cached [default: as `serve`]
        #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
        cache_dir: Option<PathBuf>,
        /// Compile every handler; read and write no cache.
        #[arg(long)]
        no_cache: bool,
    },
}

/// How the host writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The handler component (.wasm) to check.
    #[arg(value_name = "HANDLER")]
    pub handler: PathBuf,

    /// Serve it on loopback and run the echo conformance scenarios (0 B,
    /// 1 B, 1 MiB, half-close, 32 concurrent clients, a fresh instance per
    /// connection).
    #[arg(long)]
    pub run: bool,

    /// The strategy to check it under.
    #[arg(long, value_enum, default_value_t = StrategyKind::Threading)]
    pub strategy: StrategyKind,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The handler component (.wasm) to compile.
    #[arg(value_name = "HANDLER")]
    pub handler: PathBuf,

    /// Where to write the compiled handler.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,

    /// The strategy it will be served with (compiled code is specific to the
    /// engine settings).
    #[arg(long, value_enum, default_value_t = StrategyKind::Threading)]
    pub strategy: StrategyKind,
}

/// The flags that describe the one tenant of a host run without `--config`.
const SINGLE_TENANT_FLAGS: [&str; 16] = [
    "handler",
    "addr",
    "strategy",
    "workers",
    "processes",
    "max_children",
    "max_connections",
    "max_memory",
    "timeout",
    "idle_timeout",
    "drain_timeout",
    "env",
    "dir",
    "allow",
    "deny",
    "allow_precompiled",
];

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Serve every tenant of this config file (TOML; see
    /// docs/configuration.md) instead of the one the flags describe.
    #[arg(long, value_name = "FILE", conflicts_with_all = SINGLE_TENANT_FLAGS)]
    pub config: Option<PathBuf>,

    /// Re-read the config (or the handler) when its file changes, as SIGHUP
    /// does.
    #[arg(long)]
    pub watch: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<String>,

    /// How the log is written to stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The handler: a WebAssembly component of the host:handler/handler world
    /// [default: the built-in echo handler]
    #[arg(long, value_name = "PATH")]
    pub handler: Option<PathBuf>,

    /// The address to listen on: IP:PORT (port 0 picks a free port) or
    /// unix:PATH.
    #[arg(long, visible_alias = "listen", value_name = "ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,

    /// Serve only peers in this network, e.g. 10.0.0.0/8 (repeatable; CIDR).
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<String>,

    /// Refuse peers in this network, before any instance is created
    /// (repeatable; CIDR; wins over --allow).
    #[arg(long, value_name = "CIDR")]
    pub deny: Vec<String>,

    /// Where each connection runs: a thread of its own (threading), a child
    /// process (forking), a thread of one of several worker processes
    /// (prefork), or a task and fiber of an async runtime (async).
    #[arg(long, value_enum, default_value_t = DEFAULT_STRATEGY)]
    pub strategy: StrategyKind,

    /// Threads kept warm for the threading strategy (per process for
    /// prefork; more start as connections need them), or the async
    /// runtime's threads [default: threading 4 per core; prefork 4 per core,
    /// shared out; async one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_WORKERS)))]
    pub workers: Option<u32>,

    /// Worker processes for the prefork strategy [default: one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PROCESSES)))]
    pub processes: Option<u32>,

    /// Child processes alive at once for the forking strategy; the host stops
    /// accepting while this many are running [default: 256]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CHILDREN)))]
    pub max_children: Option<u32>,

    /// The most connections in flight at once, each running at once; beyond
    /// it the host stops accepting until one ends [default: threading 1024;
    /// prefork 1024 per process; async 16384; forking --max-children]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONNECTIONS)))]
    pub max_connections: Option<u32>,

    /// The most memory one instance may use: all its memories and tables
    /// together (e.g. 64MiB).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MAX_MEMORY)]
    pub max_memory: String,

    /// Wall-clock limit for one connection's `handle` (e.g. 500ms, 30s, 2m).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TIMEOUT)]
    pub timeout: String,

    /// Close a connection that sends nothing, or reads nothing it is sent,
    /// for this long.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_IDLE_TIMEOUT)]
    pub idle_timeout: String,

    /// After SIGINT or SIGTERM, how long connections in flight may finish
    /// before they are ended.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_DRAIN_TIMEOUT)]
    pub drain_timeout: String,

    /// Grant the guest an environment variable (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Grant the guest read-only access to a host directory, seen at
    /// GUEST_PATH (repeatable).
    #[arg(long, value_name = "HOST_PATH::GUEST_PATH")]
    pub dir: Vec<String>,

    /// Where compiled handlers are cached between runs [default:
    /// $XDG_CACHE_HOME/wasm-host or ~/.cache/wasm-host]
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,

    /// Compile the handler at every start; read and write no cache.
    #[arg(long)]
    pub no_cache: bool,

    /// Serve a handler precompiled by `host compile`. Precompiled files are
    /// native code that runs unchecked: use only files you trust.
    #[arg(long)]
    pub allow_precompiled: bool,
}

/// `--addr` when not given.
const DEFAULT_ADDR: &str = "127.0.0.1:7878";
/// The strategy when neither a flag nor a key names one.
pub const DEFAULT_STRATEGY: StrategyKind = StrategyKind::Threading;
/// `--max-memory` / `max-memory` when not given.
pub const DEFAULT_MAX_MEMORY: &str = "64MiB";
/// `--timeout` / `timeout` when not given.
pub const DEFAULT_TIMEOUT: &str = "30s";
/// `--idle-timeout` / `idle-timeout` when not given.
pub const DEFAULT_IDLE_TIMEOUT: &str = "10s";
/// `--drain-timeout` / `drain-timeout` when not given.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10s";
/// Child processes alive at once under forking. socketserver's
/// `ForkingMixIn` stops at 40, which turns the 41st live client away until
/// one leaves; a live child costs about 300 KiB of its own (its dirtied pages, its
/// instance and its kernel structures; the rest it shares with its
/// parent), so 256 bound the worst case under 100 MiB while long-lived
/// clients are served at once.
pub const DEFAULT_MAX_CHILDREN: usize = 256;
/// The largest `--workers`.
pub const MAX_WORKERS: u32 = 4096;
/// The largest `--processes`.
pub const MAX_PROCESSES: u32 = 1024;
/// The largest `--max-children`.
pub const MAX_CHILDREN: u32 = 65536;
/// The largest `--max-connections`.
pub const MAX_CONNECTIONS: u32 = 1_000_000;
/// The longest duration a flag takes (deadlines are computed from it).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The most a 32-bit linear memory can hold.
const MAX_MEMORY_LIMIT: u64 = 4 << 30;

/// "a", "a or b", "a, b or c".
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// One setting of a tenant: a `host serve` flag, and the config-file key of
/// the same name, so a flag and a key never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Handler,
    Listen,
    Strategy,
    Workers,
    Processes,
    MaxChildren,
    MaxConnections,
    MaxMemory,
    Timeout,
    IdleTimeout,
    DrainTimeout,
    Env,
    Dirs,
    Allow,
    Deny,
    AllowPrecompiled,
}

impl Setting {
    pub const ALL: [Setting; 16] = [
        Setting::Handler,
        Setting::Listen,
        Setting::Strategy,
        Setting::Workers,
        Setting::Processes,
        Setting::MaxChildren,
        Setting::MaxConnections,
        Setting::MaxMemory,
        Setting::Timeout,
        Setting::IdleTimeout,
        Setting::DrainTimeout,
        Setting::Env,
        Setting::Dirs,
        Setting::Allow,
        Setting::Deny,
        Setting::AllowPrecompiled,
    ];

    /// The config-file key.
    pub fn key(self) -> &'static str {
        match self {
            Setting::Handler => "handler",
            Setting::Listen => "listen",
            Setting::Strategy => "strategy",
            Setting::Workers => "workers",
            Setting::Processes => "processes",
            Setting::MaxChildren => "max-children",
            Setting::MaxConnections => "max-connections",
            Setting::MaxMemory => "max-memory",
            Setting::Timeout => "timeout",
            Setting::IdleTimeout => "idle-timeout",
            Setting::DrainTimeout => "drain-timeout",
            Setting::Env => "env",
            Setting::Dirs => "dirs",
            Setting::Allow => "allow",
            Setting::Deny => "deny",
            Setting::AllowPrecompiled => "allow-precompiled",
        }
    }

    /// The flag.
    pub fn flag(self) -> &'static str {
        match self {
            Setting::Handler => "--handler",
            Setting::Listen => "--addr",
            Setting::Strategy => "--strategy",
            Setting::Workers => "--workers",
            Setting::Processes => "--processes",
            Setting::MaxChildren => "--max-children",
            Setting::MaxConnections => "--max-connections",
            Setting::MaxMemory => "--max-memory",
            Setting::Timeout => "--timeout",
            Setting::IdleTimeout => "--idle-timeout",
            Setting::DrainTimeout => "--drain-timeout",
            Setting::Env => "--env",
            Setting::Dirs => "--dir",
            Setting::Allow => "--allow",
            Setting::Deny => "--deny",
            Setting::AllowPrecompiled => "--allow-precompiled",
        }
    }

    /// The setting a config-file key names.
    pub fn from_key(key: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.key() == key)
    }

    /// The setting a flag names, written without its dashes (`addr`,
    /// `listen`, `dir`).
    pub fn from_flag_name(name: &str) -> Option<Setting> {
        match name {
            "listen" => Some(Setting::Listen),
            _ => Setting::ALL
                .into_iter()
                .find(|s| s.flag().strip_prefix("--") == Some(name)),
        }
    }

    /// The strategies the setting applies to; empty: every strategy.
    pub fn strategies(self) -> &'static [StrategyKind] {
        match self {
            Setting::Workers => &[
                StrategyKind::Threading,
                StrategyKind::Prefork,
                StrategyKind::Async,
            ],
            Setting::Processes => &[StrategyKind::Prefork],
            Setting::MaxChildren => &[StrategyKind::Forking],
            _ => &[],
        }
    }

    pub fn applies_to(self, strategy: StrategyKind) -> bool {
        let strategies = self.strategies();
        strategies.is_empty() || strategies.contains(&strategy)
    }

    /// The largest value of a count (the smallest is 1).
    pub fn max_count(self) -> Option<u32> {
        match self {
            Setting::Workers => Some(MAX_WORKERS),
            Setting::Processes => Some(MAX_PROCESSES),
            Setting::MaxChildren => Some(MAX_CHILDREN),
            Setting::MaxConnections => Some(MAX_CONNECTIONS),
            _ => None,
        }
    }
}

/// How messages name a setting: by its flag or by its config-file key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Naming {
    #[default]
    Flags,
    Keys,
}

impl Naming {
    pub fn name(self, setting: Setting) -> &'static str {
        match self {
            Naming::Flags => setting.flag(),
            Naming::Keys => setting.key(),
        }
    }
}

/// A value as given, and where: `None` for a flag, `FILE:LINE:COLUMN` for a
/// config-file key, so an error about it can point there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Given<T> {
    pub value: T,
    pub at: Option<String>,
}

impl<T> Given<T> {
    /// A value given by a flag.
    pub fn flag(value: T) -> Self {
        Given { value, at: None }
    }

    /// Prefixes `error` with where the value was given.
    pub fn locate(&self, error: anyhow::Error) -> anyhow::Error {
        match &self.at {
            Some(at) => anyhow!("{at}: {error:#}"),
            None => error,
        }
    }
}

/// One read-only directory grant as given: `text` is how it was written
/// (`HOST::GUEST` for `--dir`, the host path for a `dirs` key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirOption {
    pub text: String,
    pub host: PathBuf,
    pub guest: String,
}

/// One tenant's settings as given, by the single-tenant flags or by a config
/// file's `[defaults]` and `[tenants.NAME]`, before the built-in defaults
/// and validation: [`TenantOptions::into_config`] is the one place both
/// become a [`ServeConfig`].
#[derive(Clone, Debug, Default)]
pub struct TenantOptions {
    /// Whether errors name flags or keys.
    pub naming: Naming,
    pub tenant: String,
    /// Relative paths (handler, directory grants, `unix:` addresses) are
    /// relative to this directory; `None`: to the working directory.
    pub base: Option<PathBuf>,
    pub handler: Option<Given<PathBuf>>,
    pub listen: Vec<Given<String>>,
    pub strategy: Option<Given<StrategyKind>>,
    pub workers: Option<Given<u32>>,
    pub processes: Option<Given<u32>>,
    pub max_children: Option<Given<u32>>,
    pub max_connections: Option<Given<u32>>,
    pub max_memory: Option<Given<String>>,
    pub timeout: Option<Given<String>>,
    pub idle_timeout: Option<Given<String>>,
    pub drain_timeout: Option<Given<String>>,
    pub env: Vec<Given<(String, String)>>,
    pub dirs: Vec<Given<DirOption>>,
    pub allow: Vec<Given<String>>,
    pub deny: Vec<Given<String>>,
    pub allow_precompiled: bool,
    pub cache_dir: Option<PathBuf>,
}

impl TenantOptions {
    /// Checks the settings together and fills in the built-in defaults.
    pub fn into_config(self) -> Result<ServeConfig> {
        let naming = self.naming;
        let name = |setting: Setting| naming.name(setting);
        let base = self.base.as_deref();
        // Joined to the base without its `.` components.
        let resolve = |path: &Path| match base {
            Some(base) => relative_to(base, path).components().collect(),
            None => path.to_path_buf(),
        };
        let mut listen = Vec::with_capacity(self.listen.len());
        for given in &self.listen {
            let addr = match parse_listen(name(Setting::Listen), &given.value) {
                Ok(ListenAddr::Unix(path)) => {
                    let path = resolve(&path);
                    check_unix_path(name(Setting::Listen), &given.value, &path)
                        .map_err(|e| given.locate(e))?;
                    ListenAddr::Unix(path)
                }
                Ok(addr) => addr,
                Err(e) => return Err(given.locate(e)),
            };
            listen.push(addr);
        }
        let strategy = self.strategy.as_ref().map_or(DEFAULT_STRATEGY, |s| s.value);
        for (setting, given) in [
            (Setting::MaxChildren, &self.max_children),
            (Setting::Workers, &self.workers),
            (Setting::Processes, &self.processes),
        ] {
            if let Some(given) = given.as_ref().filter(|_| !setting.applies_to(strategy)) {
                let fits: Vec<_> = setting.strategies().iter().map(|s| s.name()).collect();
                return Err(given.locate(anyhow!(
                    "{} applies to {} {}, not {}",
                    name(setting),
                    name(Setting::Strategy),
                    one_of(&fits),
                    strategy.name()
                )));
            }
        }
        let count = |given: &Option<Given<u32>>| given.as_ref().map(|g| g.value as usize);
        let processes = count(&self.processes).unwrap_or_else(ServeConfig::default_processes);
        let default_workers = match strategy {
            StrategyKind::Prefork => (ServeConfig::default_workers() / processes).max(2),
            // Runtime threads: one per core.
            StrategyKind::Async => ServeConfig::default_processes(),
            _ => ServeConfig::default_workers(),
        };
        let nets = |setting: Setting, texts: &[Given<String>]| -> Result<Vec<ipnet::IpNet>> {
            texts
                .iter()
                .map(|g| parse_net(name(setting), &g.value).map_err(|e| g.locate(e)))
                .collect()
        };
        let duration = |setting: Setting, given: &Option<Given<String>>, default: &str| match given
        {
            Some(g) => parse_duration(name(setting), &g.value).map_err(|e| g.locate(e)),
            None => parse_duration(name(setting), default),
        };
        let max_memory = match &self.max_memory {
            Some(g) => parse_size(name(Setting::MaxMemory), &g.value).map_err(|e| g.locate(e))?,
            None => parse_size(name(Setting::MaxMemory), DEFAULT_MAX_MEMORY)?,
        };
        let access = Access {
            allow: nets(Setting::Allow, &self.allow)?,
            deny: nets(Setting::Deny, &self.deny)?,
        };
        let limits = Limits {
            timeout: duration(Setting::Timeout, &self.timeout, DEFAULT_TIMEOUT)?,
            idle_timeout: duration(
                Setting::IdleTimeout,
                &self.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
            )?,
            max_memory,
        };
        let env = self
            .env
            .iter()
            .map(|g| check_env(name(Setting::Env), &g.value).map_err(|e| g.locate(e)))
            .collect::<Result<_>>()?;
        let dirs = self
            .dirs
            .iter()
            .map(|g| check_dir(name(Setting::Dirs), &g.value, resolve).map_err(|e| g.locate(e)))
            .collect::<Result<_>>()?;
        Ok(ServeConfig {
            handler: self.handler.map_or(HandlerSource::BuiltinEcho, |g| {
                HandlerSource::File(resolve(&g.value))
            }),
            listen,
            access,
            strategy,
            workers: count(&self.workers).unwrap_or(default_workers),
            processes,
            max_children: count(&self.max_children).unwrap_or(DEFAULT_MAX_CHILDREN),
            max_connections: count(&self.max_connections),
            tenant: self.tenant,
            limits,
            grants: Grants { env, dirs },
            drain_timeout: duration(
                Setting::DrainTimeout,
                &self.drain_timeout,
                DEFAULT_DRAIN_TIMEOUT,
            )?,
            cache_dir: self.cache_dir,
            allow_precompiled: self.allow_precompiled,
        })
    }
}

impl ServeArgs {
    /// The whole host: the config file's tenants, or the one tenant named
    /// `default` the flags describe.
    pub fn into_host_config(self) -> Result<HostConfig> {
        let metrics_addr = self
            .metrics_addr
            .as_deref()
            .map(|text| parse_socket_addr("--metrics-addr", text))
            .transpose()?;
        let cache_dir = cache_dir(self.cache_dir.clone(), self.no_cache);
        if let Some(file) = &self.config {
            let mut host = crate::config_file::load(file, cache_dir)?;
            if metrics_addr.is_some() {
                host.metrics_addr = metrics_addr;
            }
            return Ok(host);
        }
        let tenant = self.into_config()?;
        Ok(HostConfig {
            tenants: vec![tenant],
            metrics_addr,
            file: None,
        })
    }

    /// Checks the single-tenant flags together and fills in the defaults.
    pub fn into_config(self) -> Result<ServeConfig> {
        self.into_tenant_options()?.into_config()
    }

    /// The single-tenant flags as the options of the tenant named `default`.
    pub fn into_tenant_options(self) -> Result<TenantOptions> {
        let env = self
            .env
            .iter()
            .map(|text| parse_env(text).map(Given::flag))
            .collect::<Result<_>>()?;
        let dirs = self
            .dir
            .iter()
            .map(|text| split_dir(text).map(Given::flag))
            .collect::<Result<_>>()?;
        Ok(TenantOptions {
            naming: Naming::Flags,
            tenant: "default".to_string(),
            base: None,
            handler: self.handler.map(Given::flag),
            listen: vec![Given::flag(self.addr)],
            strategy: Some(Given::flag(self.strategy)),
            workers: self.workers.map(Given::flag),
            processes: self.processes.map(Given::flag),
            max_children: self.max_children.map(Given::flag),
            max_connections: self.max_connections.map(Given::flag),
            max_memory: Some(Given::flag(self.max_memory)),
            timeout: Some(Given::flag(self.timeout)),
            idle_timeout: Some(Given::flag(self.idle_timeout)),
            drain_timeout: Some(Given::flag(self.drain_timeout)),
            env,
            dirs,
            allow: self.allow.into_iter().map(Given::flag).collect(),
            deny: self.deny.into_iter().map(Given::flag).collect(),
            allow_precompiled: self.allow_precompiled,
            cache_dir: cache_dir(self.cache_dir, self.no_cache),
        })
    }
}

/// The compile cache's directory: `--cache-dir`, else the default, unless
/// `--no-cache`.
pub fn cache_dir(flag: Option<PathBuf>, no_cache: bool) -> Option<PathBuf> {
    if no_cache {
        None
    } else {
        flag.or_else(CompileCache::default_dir)
    }
}

/// CIDR networks such as `127.0.0.0/8` or `::1/128`; a bare address means
/// that address alone.
pub fn parse_nets(flag: &str, texts: &[String]) -> Result<Vec<ipnet::IpNet>> {
    texts.iter().map(|text| parse_net(flag, text)).collect()
}

pub fn parse_net(flag: &str, text: &str) -> Result<ipnet::IpNet> {
    let trimmed = text.trim();
    if let Ok(net) = trimmed.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    match trimmed.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ipnet::IpNet::from(ip)),
        Err(_) => bail!(
            "invalid {flag} {text:?}: expected a network in CIDR form, e.g. 10.0.0.0/8 or ::1/128"
        ),
    }
}

/// `IP:PORT`, `HOST:PORT` or `unix:PATH`.
pub fn parse_listen(flag: &str, text: &str) -> Result<ListenAddr> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("invalid {flag} {text:?}: expected unix:PATH");
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    parse_socket_addr(flag, text).map(ListenAddr::Tcp)
}

/// Room for a Unix socket's path, its terminating NUL included
/// (`sizeof(sockaddr_un.sun_path)` on Linux).
const UNIX_PATH_ROOM: usize = 108;

/// What `bind(2)` would refuse of a Unix socket path, found before anything
/// binds: a path too long for `sockaddr_un`, or a directory that does not
/// exist. `text` is the address as given.
fn check_unix_path(flag: &str, text: &str, path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len >= UNIX_PATH_ROOM {
        bail!(
            "invalid {flag} {text:?}: the socket path {} is {len} bytes long; a Unix socket path has at most {} bytes",
            path.display(),
            UNIX_PATH_ROOM - 1
        );
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!(
            "invalid {flag} {text:?}: {} is not a directory",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "invalid {flag} {text:?}: the directory {} does not exist",
            dir.display()
        ),
        // Anything else (a permission, say) is for bind(2) to report.
        _ => Ok(()),
    }
}

/// Resolves a relative path against `base` (the config file's directory).
pub fn relative_to(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// `500ms`, `30s`, `2m`, `1h30m`; zero is refused.
pub fn parse_duration(flag: &str, text: &str) -> Result<Duration> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        anyhow!("invalid {flag} {text:?}: {e} (expected a duration such as 500ms, 30s or 2m)")
    })?;
    if duration.is_zero() {
        bail!("invalid {flag} {text:?}: must be longer than zero");
    }
    if duration > MAX_DURATION {
        bail!("invalid {flag} {text:?}: must be at most 365 days");
    }
    Ok(duration)
}

/// `64MiB`, `512KiB`, `1GiB`, or bytes; between 64 KiB and 4 GiB.
pub fn parse_size(flag: &str, text: &str) -> Result<u64> {
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|e| anyhow!("invalid {flag} {text:?}: {e} (expected a size such as 64MiB)"))?;
    let bytes = size.as_u64();
    if !(64 << 10..=MAX_MEMORY_LIMIT).contains(&bytes) {
        bail!("invalid {flag} {text:?}: must be between 64KiB and 4GiB");
    }
    Ok(bytes)
}

/// `KEY=VALUE`.
pub fn parse_env(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.contains('\0') && !value.contains('\0') => {
            Ok((key.to_string(), value.to_string()))
        }
        _ => bail!("invalid --env {text:?}: expected KEY=VALUE"),
    }
}

/// A variable name and value the guest can be given.
fn check_env(name: &str, (key, value): &(String, String)) -> Result<(String, String)> {
    if key.is_empty() || key.contains(['=', '\0']) {
        bail!("invalid {name} name {key:?}: expected a name without '=' or NUL");
    }
    if value.contains('\0') {
        bail!("invalid {name} value for {key:?}: it contains NUL");
    }
    Ok((key.clone(), value.clone()))
}

/// `HOST_PATH::GUEST_PATH`, split; the directory is checked later.
pub fn split_dir(text: &str) -> Result<DirOption> {
    match text.split_once("::") {
        Some((host, guest)) if !host.is_empty() && !guest.is_empty() => Ok(DirOption {
            text: text.to_string(),
            host: PathBuf::from(host),
            guest: guest.to_string(),
        }),
        _ => bail!("invalid --dir {text:?}: expected HOST_PATH::GUEST_PATH"),
    }
}

/// The grant of an existing host directory, `resolve`d.
fn check_dir(name: &str, dir: &DirOption, resolve: impl Fn(&Path) -> PathBuf) -> Result<DirGrant> {
    let text = &dir.text;
    if dir.guest.is_empty() {
        bail!("invalid {name} {text:?}: the guest path is empty");
    }
    let host = resolve(&dir.host);
    let shown = host.display();
    let meta =
        std::fs::metadata(&host).map_err(|e| anyhow!("invalid {name} {text:?}: {shown}: {e}"))?;
    if !meta.is_dir() {
        bail!("invalid {name} {text:?}: {shown} is not a directory");
    }
    Ok(DirGrant {
        host,
        guest: dir.guest.clone(),
    })
}

/// `HOST_PATH::GUEST_PATH`, of an existing directory.
pub fn parse_dir(text: &str) -> Result<DirGrant> {
    check_dir(Setting::Dirs.flag(), &split_dir(text)?, Path::to_path_buf)
}

pub fn parse_socket_addr(flag: &str, text: &str) -> Result<SocketAddr> {
    let bad = |why: String| anyhow!("invalid {flag} {text:?}: {why}");
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    // A host name such as localhost:7878.
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| bad(format!("{e} (expected IP:PORT, e.g. 127.0.0.1:7878)")))?;
    addrs
        .next()
        .ok_or_else(|| bad("the name resolves to no address".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<ServeConfig> {
        let mut argv = vec!["host", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(serve) => serve.into_config(),
            _ => unreachable!("only serve is parsed here"),
        }
    }

    #[test]
    fn every_setting_is_a_flag_and_a_key() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        for setting in Setting::ALL {
            let long = setting.flag().strip_prefix("--").unwrap();
            assert!(
                serve.get_arguments().any(|a| a.get_long() == Some(long)),
                "{long} is not a flag of serve"
            );
            assert_eq!(Setting::from_key(setting.key()), Some(setting));
            assert_eq!(Setting::from_flag_name(long), Some(setting));
        }
        assert_eq!(Setting::from_flag_name("listen"), Some(Setting::Listen));
    }

    #[test]
    fn defaults() {
        let config = args(&[]).unwrap();
        assert_eq!(
            config.listen,
            vec![ListenAddr::Tcp("127.0.0.1:7878".parse().unwrap())]
        );
        assert_eq!(config.strategy, StrategyKind::Threading);
        assert_eq!(config.handler, HandlerSource::BuiltinEcho);
        assert_eq!(config.max_children, DEFAULT_MAX_CHILDREN);
        assert_eq!(config.workers, ServeConfig::default_workers());
    }

    #[test]
    fn flags_that_do_not_fit_the_strategy_are_refused() {
        let err = args(&["--strategy", "forking", "--workers", "3"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--workers applies to --strategy threading, prefork or async, not forking"
        );
        let err = args(&["--processes", "3"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--processes applies to --strategy prefork, not threading"
        );
        let prefork = args(&[
            "--strategy",
            "prefork",
            "--processes",
            "3",
            "--max-connections",
            "10",
        ]);
        let prefork = prefork.unwrap();
        assert_eq!((prefork.processes, prefork.per_process_in_flight()), (3, 4));
        let err = args(&["--max-children", "3"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-children applies to --strategy forking, not threading"
        );
    }

    #[test]
    fn limits_parse_with_units() {
        let config = args(&[
            "--timeout",
            "500ms",
            "--idle-timeout",
            "2m",
            "--max-memory",
            "32MiB",
        ])
        .unwrap();
        assert_eq!(config.limits.timeout, Duration::from_millis(500));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(config.limits.max_memory, 32 << 20);
        let defaults = args(&[]).unwrap();
        assert_eq!(defaults.limits.timeout, Duration::from_secs(30));
        assert_eq!(defaults.limits.idle_timeout, Duration::from_secs(10));
        assert_eq!(defaults.limits.max_memory, 64 << 20);
        assert_eq!(defaults.drain_timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_limits_are_named() {
        let err = args(&["--timeout", "30x"]).unwrap_err().to_string();
        assert!(err.starts_with("invalid --timeout \"30x\": "), "{err}");
        let err = args(&["--timeout", "300000000000y"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid --timeout \"300000000000y\": must be at most 365 days"
        );
        let err = args(&["--idle-timeout", "0s"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --idle-timeout \"0s\": must be longer than zero"
        );
        let err = args(&["--max-memory", "lots"]).unwrap_err().to_string();
        assert!(err.starts_with("invalid --max-memory \"lots\": "), "{err}");
        let err = args(&["--max-memory", "8GiB"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --max-memory \"8GiB\": must be between 64KiB and 4GiB"
        );
    }

    #[test]
    fn grants() {
        let config = args(&["--env", "A=1", "--env", "B=x=y", "--dir", "/tmp::/scratch"]).unwrap();
        assert_eq!(
            config.grants.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(config.grants.dirs[0].guest, "/scratch");
        let err = args(&["--env", "NOVALUE"]).unwrap_err().to_string();
        assert_eq!(err, "invalid --env \"NOVALUE\": expected KEY=VALUE");
        let err = args(&["--dir", "/tmp"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --dir \"/tmp\": expected HOST_PATH::GUEST_PATH"
        );
        let err = args(&["--dir", "/no/such::/x"]).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid --dir \"/no/such::/x\": /no/such: "),
            "{err}"
        );
    }

    #[test]
    fn bad_addresses_are_named() {
        let err = args(&["--addr", "nonsense"]).unwrap_err().to_string();
        assert!(err.starts_with("invalid --addr \"nonsense\""), "{err}");
        let err = args(&["--addr", "127.0.0.1:99999"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid --addr \"127.0.0.1:99999\""),
            "{err}"
        );
    }
}
