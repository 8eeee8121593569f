//! The command line (clap): every command and flag, with the help text
//! `host --help` prints, and the single-tenant flags of `host serve` as raw
//! settings ([`RawHost`]) for `settings::convert`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use super::log_level::LogLevel;
use super::model::StrategyKind;
use super::outbound::MAX_OUTBOUND;
use super::raw::{Given, Layer, RawHost, RawTenant};
use super::values::{
    parse_env, parse_socket_addr, split_dir, Naming, DEFAULT_ADDR, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT, MAX_CHILDREN, MAX_CONNECTIONS,
    MAX_PROCESSES, MAX_WORKERS,
};

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
    /// Make a new Rust handler crate at PATH (named after its last
    /// component), an echo handler to start from.
    New(super::extras::NewArgs),
    /// Print a shell completion script for SHELL to stdout.
    Completions(super::extras::CompletionsArgs),
    /// Print the man page (roff) of host or of one of its commands to
    /// stdout, or write them all into a directory.
    Manpage(super::extras::ManpageArgs),
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

/// Where each connection runs: the values of `--strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
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

impl From<StrategyArg> for StrategyKind {
    fn from(arg: StrategyArg) -> StrategyKind {
        match arg {
            StrategyArg::Threading => StrategyKind::Threading,
            StrategyArg::Forking => StrategyKind::Forking,
            StrategyArg::Prefork => StrategyKind::Prefork,
            StrategyArg::Async => StrategyKind::Async,
        }
    }
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
    #[arg(long, value_enum, default_value_t = StrategyArg::Threading)]
    pub strategy: StrategyArg,
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
    #[arg(long, value_enum, default_value_t = StrategyArg::Threading)]
    pub strategy: StrategyArg,
}

/// The flags that describe the one tenant of a host run without `--config`.
const SINGLE_TENANT_FLAGS: [&str; 22] = [
    "handler",
    "handler_path",
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
    "proxy_protocol",
    "proxy_from",
    "proxy_header_timeout",
    "allow_outbound",
    "max_outbound",
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

    /// Listen on this Unix socket for a successor: a new `host serve
    /// --take-over` given the same path is handed every listening socket,
    /// and this host drains once the successor is ready
    /// (docs/deployment.md, "Upgrades").
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,

    /// Take over the listening sockets of the host on --upgrade-socket
    /// (starting afresh if none runs there), then tell it to drain once
    /// this one is ready.
    #[arg(long, requires = "upgrade_socket")]
    pub take_over: bool,

    /// At SIGINT/SIGTERM, go on accepting this long while /readyz answers
    /// 503, so health-checking balancers take this host out of rotation
    /// before its listeners close; then drain [default: none]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_delay: Option<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<String>,

    /// How the log is written to stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What the log writes: error, warn, info or debug (trace, off), or
    /// per-target levels such as warn,host::supervisor=info; wins over the
    /// config file's log-level [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// The handler: a WebAssembly component of the host:handler/handler world
    /// [default: the built-in echo handler]
    #[arg(long, value_name = "PATH")]
    pub handler: Option<PathBuf>,

    /// The handler, as wasmtime takes it: `host serve app.wasm` is `host
    /// serve --handler app.wasm` (give one or the other).
    #[arg(value_name = "HANDLER", conflicts_with = "handler")]
    pub handler_path: Option<PathBuf>,

    /// The address to listen on: IP:PORT (port 0 picks a free port),
    /// unix:PATH, or systemd:NAME (a socket systemd passed; systemd: alone
    /// is the first).
    #[arg(long, visible_alias = "listen", value_name = "ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,

    /// Serve only peers in this network, e.g. 10.0.0.0/8 (repeatable; CIDR).
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<String>,

    /// Refuse peers in this network, before any instance is created
    /// (repeatable; CIDR; wins over --allow).
    #[arg(long, value_name = "CIDR")]
    pub deny: Vec<String>,

    /// Take a PROXY protocol header (v1, v2 or any) from the balancers
    /// named by --proxy-from; the client it names is the peer.
    #[arg(long, value_name = "VERSION", value_parser = ["v1", "v2", "any"])]
    pub proxy_protocol: Option<String>,

    /// A balancer's network: connections from it must start with a PROXY
    /// protocol header (repeatable; CIDR; needed by --proxy-protocol).
    #[arg(long, value_name = "CIDR")]
    pub proxy_from: Vec<String>,

    /// How long a balancer may take to send its PROXY protocol header
    /// [default: 3s]
    #[arg(long, value_name = "DURATION")]
    pub proxy_header_timeout: Option<String>,

    /// Let the guest open TCP connections to HOST:PORT, IP:PORT,
    /// CIDR:PORT or [IPv6]:PORT (PORT may be *; repeatable; a name is
    /// resolved by the host at start-up and reload). Nothing else is
    /// reachable; guests never listen.
    #[arg(long, value_name = "HOST:PORT")]
    pub allow_outbound: Vec<String>,

    /// Outbound connections one instance (one client connection) may open
    /// [default: 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_OUTBOUND)))]
    pub max_outbound: Option<u32>,

    /// Where each connection runs: a thread of its own (threading), a child
    /// process (forking), a thread of one of several worker processes
    /// (prefork), or a task and fiber of an async runtime (async).
    #[arg(long, value_enum, default_value_t = StrategyArg::Threading)]
    pub strategy: StrategyArg,

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
    /// together, in binary units (KiB, MiB, GiB) or bytes, e.g. 64MiB;
    /// decimal units (64MB, 64M) are refused as ambiguous.
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

    /// Grant the guest an environment variable: NAME=VALUE, or NAME alone
    /// for the host's own value of NAME (only the names given are passed;
    /// repeatable).
    #[arg(long, value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,

    /// Grant the guest a host directory, seen at GUEST_PATH (default: the
    /// same path); read-only, or with ::rw read-write (create, write, rename
    /// and remove files under it) (repeatable).
    #[arg(long, value_name = "HOST_PATH[::GUEST_PATH[::rw]]")]
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

impl ServeArgs {
    /// `--shutdown-delay`, parsed (zero when not given).
    pub(crate) fn shutdown_delay(&self) -> Result<std::time::Duration> {
        self.shutdown_delay
            .as_deref()
            .map_or(Ok(std::time::Duration::ZERO), |text| {
                super::values::parse_duration("--shutdown-delay", text)
            })
    }

    /// `--metrics-addr`, parsed.
    pub(crate) fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        self.metrics_addr
            .as_deref()
            .map(|text| parse_socket_addr("--metrics-addr", text))
            .transpose()
    }

    /// `--log-level`, parsed.
    pub(crate) fn log_level(&self) -> Result<Option<LogLevel>> {
        self.log_level
            .as_deref()
            .map(|text| LogLevel::parse("--log-level", text))
            .transpose()
    }

    /// The compile cache's directory: `--cache-dir`, else the default,
    /// unless `--no-cache`.
    pub(crate) fn cache_dir(&self) -> Option<PathBuf> {
        cache_dir(self.cache_dir.clone(), self.no_cache)
    }

    /// The single-tenant flags as given: the tenant named `default`.
    pub(crate) fn into_raw(self) -> Result<RawHost> {
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
        let cache_dir = self.cache_dir();
        let flags = |texts: Vec<String>| Some(texts.into_iter().map(Given::flag).collect());
        let layer = Layer {
            handler: self.handler.or(self.handler_path).map(Given::flag),
            listen: Some(vec![Given::flag(self.addr)]),
            strategy: Some(Given::flag(self.strategy.into())),
            workers: self.workers.map(Given::flag),
            processes: self.processes.map(Given::flag),
            max_children: self.max_children.map(Given::flag),
            max_connections: self.max_connections.map(Given::flag),
            max_memory: Some(Given::flag(self.max_memory)),
            timeout: Some(Given::flag(self.timeout)),
            idle_timeout: Some(Given::flag(self.idle_timeout)),
            drain_timeout: Some(Given::flag(self.drain_timeout)),
            env: Some(env),
            dirs: Some(dirs),
            allow: flags(self.allow),
            deny: flags(self.deny),
            proxy_protocol: self.proxy_protocol.map(Given::flag),
            proxy_from: if self.proxy_from.is_empty() {
                None
            } else {
                flags(self.proxy_from)
            },
            proxy_header_timeout: self.proxy_header_timeout.map(Given::flag),
            allow_precompiled: Some(self.allow_precompiled),
            allow_outbound: if self.allow_outbound.is_empty() {
                None
            } else {
                flags(self.allow_outbound)
            },
            max_outbound: self.max_outbound.map(Given::flag),
        };
        Ok(RawHost {
            naming: Naming::Flags,
            tenants: vec![RawTenant {
                name: "default".to_string(),
                at: None,
                layer,
            }],
            cache_dir,
            ..RawHost::default()
        })
    }
}

/// The compile cache's directory: `--cache-dir`, else the default, unless
/// `--no-cache`.
pub(crate) fn cache_dir(flag: Option<PathBuf>, no_cache: bool) -> Option<PathBuf> {
    if no_cache {
        None
    } else {
        flag.or_else(default_cache_dir)
    }
}

/// The compile cache's default location: `$XDG_CACHE_HOME/wasm-host` or
/// `$HOME/.cache/wasm-host`.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasm-host"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::handler::HandlerSource;
    use crate::settings::model::{ListenAddr, ServeConfig, Strategy};
    use crate::settings::values::{Setting, DEFAULT_MAX_CHILDREN};

    /// The tenant `host serve ARGS` runs.
    fn args(extra: &[&str]) -> Result<ServeConfig> {
        let mut argv = vec!["host", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(serve) => {
                let mut host = crate::settings::convert::host(serve.into_raw()?)?;
                Ok(host.tenants.remove(0))
            }
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
        assert_eq!(
            config.strategy,
            Strategy::Threading {
                workers: ServeConfig::default_workers()
            }
        );
        assert_eq!(config.handler, HandlerSource::BuiltinEcho);
        let forking = args(&["--strategy", "forking"]).unwrap();
        assert_eq!(
            forking.strategy,
            Strategy::Forking {
                max_children: DEFAULT_MAX_CHILDREN
            }
        );
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
        assert_eq!(prefork.strategy.processes(), 3);
        assert_eq!(prefork.per_process_in_flight(), 4);
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
        let err = args(&["--env", "HOST_TEST_SURELY_UNSET"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid --env \"HOST_TEST_SURELY_UNSET\": HOST_TEST_SURELY_UNSET is not set in the host's environment (write HOST_TEST_SURELY_UNSET=VALUE to give a value)"
        );
        let err = args(&["--dir", "/tmp::/x::rwx"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --dir \"/tmp::/x::rwx\": expected HOST_PATH, HOST_PATH::GUEST_PATH or HOST_PATH::GUEST_PATH::rw"
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
