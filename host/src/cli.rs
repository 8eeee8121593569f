//! The command line: raw flags, and their one-time conversion into a
//! validated [`ServeConfig`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{ServeConfig, StrategyKind};
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

    /// Worker threads for the threading strategy [default: 4 per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: Option<u32>,

    /// Child processes alive at once for the forking strategy; the host stops
    /// accepting while this many are running.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_children: Option<u32>,
}

/// socketserver's `ForkingMixIn.max_children`.
const DEFAULT_MAX_CHILDREN: usize = 40;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_MEMORY: u64 = 64 << 20;

impl ServeArgs {
    /// Checks the flags together and fills in the defaults.
    pub fn into_config(self) -> Result<ServeConfig> {
        let addr = parse_addr(&self.addr)?;
        match self.strategy {
            StrategyKind::Threading if self.max_children.is_some() => {
                bail!("--max-children applies to --strategy forking, not threading")
            }
            StrategyKind::Forking if self.workers.is_some() => {
                bail!("--workers applies to --strategy threading, not forking")
            }
            _ => {}
        }
        Ok(ServeConfig {
            handler: self
                .handler
                .map_or(HandlerSource::BuiltinEcho, HandlerSource::File),
            addr,
            strategy: self.strategy,
            workers: self
                .workers
                .map_or_else(ServeConfig::default_workers, |n| n as usize),
            max_children: self
                .max_children
                .map_or(DEFAULT_MAX_CHILDREN, |n| n as usize),
            tenant: "default".to_string(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_memory: DEFAULT_MAX_MEMORY,
        })
    }
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
        let Command::Serve(serve) = Cli::try_parse_from(argv)?.command;
        serve.into_config()
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
            "--workers applies to --strategy threading, not forking"
        );
        let err = args(&["--max-children", "3"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-children applies to --strategy forking, not threading"
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
