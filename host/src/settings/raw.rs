//! Settings as given, before any value is parsed: what the flags
//! (`settings::flags`) and the config file (`settings::file`) each produce,
//! and the one input of `settings::convert`. Each value remembers where it
//! was given, so an error about it can point there.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::log_level::LogLevel;
use super::model::StrategyKind;
use super::values::{DirOption, Naming};

/// Where a value was given in a config file: its byte offset (to keep the
/// file's order) and `FILE:LINE:COLUMN` (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub offset: usize,
    pub shown: String,
}

/// A value as given, and where: `None` for a flag, a [`Place`] for a
/// config-file key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Given<T> {
    pub value: T,
    pub at: Option<Place>,
}

impl<T> Given<T> {
    /// A value given by a flag.
    pub fn flag(value: T) -> Self {
        Given { value, at: None }
    }

    /// Prefixes `error` with where the value was given.
    pub fn locate(&self, error: anyhow::Error) -> anyhow::Error {
        locate(self.at.as_ref(), error)
    }
}

/// Prefixes `error` with `at`, if anywhere.
pub(crate) fn locate(at: Option<&Place>, error: anyhow::Error) -> anyhow::Error {
    match at {
        Some(at) => anyhow::anyhow!("{}: {error:#}", at.shown),
        None => error,
    }
}

/// One layer of a tenant's settings as written: the single-tenant flags, a
/// config file's `[defaults]`, or a `[tenants.NAME]` table. `None`: not
/// given here. A count is placed at its key (a strategy that does not use
/// it refuses the key); every other value at the value.
#[derive(Clone, Debug, Default)]
pub(crate) struct Layer {
    pub handler: Option<Given<PathBuf>>,
    pub listen: Option<Vec<Given<String>>>,
    pub strategy: Option<Given<StrategyKind>>,
    pub workers: Option<Given<u32>>,
    pub processes: Option<Given<u32>>,
    pub max_children: Option<Given<u32>>,
    pub max_connections: Option<Given<u32>>,
    pub max_memory: Option<Given<String>>,
    pub timeout: Option<Given<String>>,
    pub idle_timeout: Option<Given<String>>,
    pub drain_timeout: Option<Given<String>>,
    /// In the order given; placed by the variable's name.
    pub env: Option<Vec<Given<(String, String)>>>,
    /// In the order given; placed by the host path.
    pub dirs: Option<Vec<Given<DirOption>>>,
    pub allow: Option<Vec<Given<String>>>,
    pub deny: Option<Vec<Given<String>>>,
    pub proxy_protocol: Option<Given<String>>,
    pub proxy_from: Option<Vec<Given<String>>>,
    pub proxy_header_timeout: Option<Given<String>>,
    pub allow_precompiled: Option<bool>,
    pub allow_outbound: Option<Vec<Given<String>>>,
    pub max_outbound: Option<Given<u32>>,
}

/// One tenant as written: its name, where its table is, and its own layer.
#[derive(Clone, Debug)]
pub(crate) struct RawTenant {
    pub name: String,
    pub at: Option<Place>,
    pub layer: Layer,
}

/// The whole host as given: by the flags (one tenant named `default`) or by
/// a config file, plus the host-wide flags.
#[derive(Clone, Debug, Default)]
pub(crate) struct RawHost {
    /// Whether errors name flags or keys.
    pub naming: Naming,
    /// Relative paths (handlers, directory grants, `unix:` addresses) are
    /// relative to this directory; `None`: to the working directory.
    pub base: Option<PathBuf>,
    /// Under every tenant's own layer (`[defaults]`).
    pub defaults: Layer,
    /// In the order written.
    pub tenants: Vec<RawTenant>,
    /// Where "no tenants" points: the `[tenants]` table, or the file's start.
    pub tenants_at: Option<Place>,
    /// `[metrics] addr`.
    pub metrics_addr: Option<Given<String>>,
    /// `--metrics-addr`: wins over `[metrics] addr`, at start and at every
    /// reload.
    pub metrics_addr_flag: Option<SocketAddr>,
    /// `[defaults] log-level`.
    pub log_level: Option<Given<String>>,
    /// `--log-level`: wins over `[defaults] log-level`, at start and at
    /// every reload.
    pub log_level_flag: Option<LogLevel>,
    /// The config file, as named (re-read on reload).
    pub file: Option<PathBuf>,
    /// The compile cache's directory; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}
