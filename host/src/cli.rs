//! The command line: raw flags, and their one-time conversion into a
//! validated [`ServeConfig`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::compile_cache::CompileCache;
use crate::config::{DirGrant, Grants, Limits, ServeConfig, StrategyKind};
use crate::handler::HandlerSource;

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

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The handler: a WebAssembly component of the host:handler/handler world
    /// [default: the built-in echo handler]
    #[arg(long, value_name = "PATH")]
    pub handler: Option<PathBuf>,

    /// The address to listen on, IP:PORT (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878")]
    pub addr: String,

    /// Where each connection runs: a worker thread or a child process.
    #[arg(long, value_enum, default_value_t = StrategyKind::Threading)]
    pub strategy: StrategyKind,

    /// Worker threads for the threading strategy, or per process for prefork
    /// [default: threading 4 per core; prefork 4 per core, shared out]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: Option<u32>,

    /// Worker processes for the prefork strategy [default: one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub processes: Option<u32>,

    /// Child processes alive at once for the forking strategy; the host stops
    /// accepting while this many are running [default: 40]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_children: Option<u32>,

    /// The most connections in flight at once; beyond it the host stops
    /// accepting until one ends [default: threading 2 per worker, forking
    /// --max-children]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: Option<u32>,

    /// The most memory one instance may use: all its memories and tables
    /// together (e.g. 64MiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB")]
    pub max_memory: String,

    /// Wall-clock limit for one connection's `handle` (e.g. 500ms, 30s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub timeout: String,

    /// Close a connection that sends nothing, or reads nothing it is sent,
    /// for this long.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub idle_timeout: String,

    /// After SIGINT or SIGTERM, how long connections in flight may finish
    /// before they are ended.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
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

/// socketserver's `ForkingMixIn.max_children`.
const DEFAULT_MAX_CHILDREN: usize = 40;
/// The longest duration a flag takes (deadlines are computed from it).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The most a 32-bit linear memory can hold.
const MAX_MEMORY_LIMIT: u64 = 4 << 30;

impl ServeArgs {
    /// Checks the flags together and fills in the defaults.
    pub fn into_config(self) -> Result<ServeConfig> {
        let addr = parse_addr(&self.addr)?;
        let strategy = self.strategy.name();
        if self.max_children.is_some() && self.strategy != StrategyKind::Forking {
            bail!("--max-children applies to --strategy forking, not {strategy}");
        }
        if self.workers.is_some() && self.strategy == StrategyKind::Forking {
            bail!("--workers applies to --strategy threading or prefork, not forking");
        }
        if self.processes.is_some() && self.strategy != StrategyKind::Prefork {
            bail!("--processes applies to --strategy prefork, not {strategy}");
        }
        let processes = self
            .processes
            .map_or_else(ServeConfig::default_processes, |n| n as usize);
        let default_workers = match self.strategy {
            StrategyKind::Prefork => (ServeConfig::default_workers() / processes).max(2),
            _ => ServeConfig::default_workers(),
        };
        Ok(ServeConfig {
            handler: self
                .handler
                .map_or(HandlerSource::BuiltinEcho, HandlerSource::File),
            addr,
            strategy: self.strategy,
            workers: self.workers.map_or(default_workers, |n| n as usize),
            processes,
            max_children: self
                .max_children
                .map_or(DEFAULT_MAX_CHILDREN, |n| n as usize),
            max_connections: self.max_connections.map(|n| n as usize),
            tenant: "default".to_string(),
            limits: Limits {
                timeout: parse_duration("--timeout", &self.timeout)?,
                idle_timeout: parse_duration("--idle-timeout", &self.idle_timeout)?,
                max_memory: parse_size("--max-memory", &self.max_memory)?,
            },
            grants: Grants {
                env: self
                    .env
                    .iter()
                    .map(|e| parse_env(e))
                    .collect::<Result<_>>()?,
                dirs: self
                    .dir
                    .iter()
                    .map(|d| parse_dir(d))
                    .collect::<Result<_>>()?,
            },
            drain_timeout: parse_duration("--drain-timeout", &self.drain_timeout)?,
            cache_dir: if self.no_cache {
                None
            } else {
                self.cache_dir.or_else(CompileCache::default_dir)
            },
            allow_precompiled: self.allow_precompiled,
        })
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

fn parse_env(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.contains('\0') && !value.contains('\0') => {
            Ok((key.to_string(), value.to_string()))
        }
        _ => bail!("invalid --env {text:?}: expected KEY=VALUE"),
    }
}

fn parse_dir(text: &str) -> Result<DirGrant> {
    let Some((host, guest)) = text.split_once("::") else {
        bail!("invalid --dir {text:?}: expected HOST_PATH::GUEST_PATH");
    };
    if host.is_empty() || guest.is_empty() {
        bail!("invalid --dir {text:?}: expected HOST_PATH::GUEST_PATH");
    }
    let meta =
        std::fs::metadata(host).map_err(|e| anyhow!("invalid --dir {text:?}: {host}: {e}"))?;
    if !meta.is_dir() {
        bail!("invalid --dir {text:?}: {host} is not a directory");
    }
    Ok(DirGrant {
        host: PathBuf::from(host),
        guest: guest.to_string(),
    })
}

fn parse_addr(text: &str) -> Result<SocketAddr> {
    let bad = |why: String| anyhow!("invalid --addr {text:?}: {why}");
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
    fn defaults() {
        let config = args(&[]).unwrap();
        assert_eq!(config.addr, "127.0.0.1:7878".parse().unwrap());
        assert_eq!(config.strategy, StrategyKind::Threading);
        assert_eq!(config.handler, HandlerSource::BuiltinEcho);
        assert_eq!(config.max_children, 40);
        assert_eq!(config.workers, ServeConfig::default_workers());
    }

    #[test]
    fn flags_that_do_not_fit_the_strategy_are_refused() {
        let err = args(&["--strategy", "forking", "--workers", "3"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--workers applies to --strategy threading or prefork, not forking"
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
