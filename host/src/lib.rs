//! The host: serves TCP connections by running the `handle` export of a
//! WebAssembly component in a fresh, sandboxed instance per connection, on a
//! worker thread or in a child process.
//!
//! [`serve`] is the whole `host serve` command: [`supervisor::run`] forks a
//! worker process per tenant, each running [`server::run`], the accept loop.

pub mod check;
pub mod cli;
pub mod config;
pub mod config_file;
pub(crate) mod conn;
pub mod listener;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod outcome;
mod server;
pub mod shutdown;
mod strategy;
pub mod supervisor;
mod sys;
pub(crate) mod wasm;
mod worker;

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::config::{HostConfig, StrategyKind};
use crate::shutdown::Shutdown;
use crate::wasm::handler::HandlerSource;
use crate::wasm::{engine, handler};

/// `host serve`: compile every tenant's handler, bind every listener, print
/// a `listening on ADDR tenant=NAME` line for each, then serve until
/// `shutdown` is triggered.
pub fn serve(config: HostConfig, shutdown: &Shutdown, options: &supervisor::Options) -> Result<()> {
    supervisor::run(config, shutdown, options)
}

/// `host compile`: writes the handler's compiled form for `strategy`.
pub fn compile(handler: &Path, output: &Path, strategy: StrategyKind) -> Result<()> {
    let engine = engine::build(strategy, 1, 64 << 20)?;
    let compiled = handler::precompile(&engine, &HandlerSource::File(handler.to_path_buf()))?;
    std::fs::write(output, compiled)
        .with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}

/// `host config check FILE`: parses and validates the file, compiles every
/// handler with the engine `serve` would use, and returns the effective
/// settings of every tenant.
pub fn config_check(file: &Path, cache_dir: Option<std::path::PathBuf>) -> Result<String> {
    let config = config_file::load(file, cache_dir)?;
    let (engine, _) = engine::for_host(&config.tenants, true)?;
    let mut async_engine = None;
    for tenant in &config.tenants {
        let for_async = tenant.strategy == StrategyKind::Async;
        let options = handler::LoadOptions {
            cache: supervisor::open_cache(tenant.cache_dir.as_deref()),
            allow_precompiled: tenant.allow_precompiled,
            for_async,
        };
        let engine = match (for_async, &async_engine) {
            (false, _) => &engine,
            (true, Some(engine)) => engine,
            (true, None) => async_engine.insert(engine::for_async()?),
        };
        handler::Handler::load(engine, &tenant.handler, &options)
            .with_context(|| format!("{}: tenant {}", file.display(), tenant.tenant))?;
    }
    Ok(config_file::describe(&config))
}
