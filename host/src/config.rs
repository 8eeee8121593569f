//! The validated settings of `host serve`: what the command line says, turned
//! into values once, before anything is compiled or bound.

use std::net::SocketAddr;
use std::time::Duration;

use crate::handler::HandlerSource;

/// Where each connection runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyKind {
    /// A bounded pool of worker threads in the host process.
    Threading,
    /// A child process per connection, as Python's `ForkingMixIn`.
    Forking,
}

impl StrategyKind {
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Threading => "threading",
            StrategyKind::Forking => "forking",
        }
    }
}

/// Everything `host serve` needs to run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub handler: HandlerSource,
    pub addr: SocketAddr,
    pub strategy: StrategyKind,
    /// Worker threads (threading).
    pub workers: usize,
    /// Child processes alive at once (forking).
    pub max_children: usize,
    /// The service name handlers see in `connection-info.tenant`.
    pub tenant: String,
    /// A connection that makes no progress for this long is closed.
    pub idle_timeout: Duration,
    /// The most linear memory one instance may use, in bytes.
    pub max_memory: u64,
}

impl ServeConfig {
    /// The default number of worker threads: four per core, since handlers
    /// spend much of their time waiting for their clients.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
    }

    /// The most connections accepted and not yet finished: threading queues
    /// at most one connection per worker behind the busy ones; forking runs
    /// at most `max_children`.
    pub fn max_in_flight(&self) -> usize {
        match self.strategy {
            StrategyKind::Threading => self.workers * 2,
            StrategyKind::Forking => self.max_children,
        }
    }
}
