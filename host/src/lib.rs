//! The host: serves TCP connections by running the `handle` export of a
//! WebAssembly component in a fresh, sandboxed instance per connection, on a
//! worker thread or in a child process.
//!
//! [`serve`] is the whole `host serve` command; [`server::run`] is its accept
//! loop, which tests drive directly with their own [`server::Shutdown`].

pub mod check;
pub mod cli;
mod compile_cache;
pub mod config;
pub mod connection;
mod engine;
mod guest_clock;
mod guest_log;
pub mod handler;
mod limits;
pub mod logging;
mod net_stream;
pub mod server;
pub mod strategy;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::compile_cache::CompileCache;
use crate::config::{ServeConfig, StrategyKind};
use crate::connection::Service;
use crate::engine::EpochClock;
use crate::handler::{Handler, HandlerSource, LoadOptions};
use crate::server::{ConnectionIds, Shutdown};

/// Pending connections the kernel holds while every worker is busy.
const LISTEN_BACKLOG: i32 = 1024;

/// `host serve`: compile the handler, bind, print `listening on ADDR`, then
/// accept until `shutdown` is triggered.
pub fn serve(config: &ServeConfig, shutdown: &Shutdown) -> Result<()> {
    // Invariant: everything that can be refused is checked before binding, so
    // a bad handler leaves nothing listening.
    let engine = engine::build(
        config.strategy,
        config.max_instances(),
        config.limits.max_memory,
    )?;
    let options = LoadOptions {
        cache: open_cache(config.cache_dir.as_deref()),
        allow_precompiled: config.allow_precompiled,
    };
    let handler = Handler::load(&engine, &config.handler, &options)?;
    raise_descriptor_limit();
    let listener = bind(config)?;
    let addr = listener
        .local_addr()
        .context("cannot read the listener's address")?;
    let clock = match config.strategy {
        StrategyKind::Threading => EpochClock::start_ticker(&engine)?,
        // Each prefork worker starts its own ticker after the fork.
        StrategyKind::Prefork => EpochClock::Ticker,
        StrategyKind::Forking => EpochClock::Alarm,
    };
    let ids = ConnectionIds::new()?;
    let service = Arc::new(Service::new(
        handler,
        config.tenant.clone(),
        config.limits.clone(),
        config.grants.clone(),
        clock,
    ));
    let workers = match config.strategy {
        StrategyKind::Threading => format!("{} workers", config.workers),
        StrategyKind::Forking => format!("at most {} children", config.max_children),
        StrategyKind::Prefork => format!(
            "{} processes of {} workers",
            config.processes, config.workers
        ),
    };
    let limits = &config.limits;
    tracing::info!(
        "serving {} with the {} strategy ({workers}, at most {} connections in flight); limits: memory {}, timeout {:?}, idle timeout {:?}; grants: {}",
        config.handler,
        config.strategy.name(),
        config.max_in_flight(),
        bytesize::ByteSize(limits.max_memory).display().iec(),
        limits.timeout,
        limits.idle_timeout,
        config.grants.describe(),
    );
    // The one stable line tests and scripts wait for.
    eprintln!("listening on {addr}");
    if config.strategy == StrategyKind::Prefork {
        return strategy::prefork::run(config, service, listener, &ids, shutdown);
    }
    let mut strategy = strategy::build(config, service, shutdown, &listener)?;
    server::run(
        listener,
        strategy.as_mut(),
        shutdown,
        &ids,
        config.drain_timeout,
    )
}

/// `host compile`: writes the handler's compiled form for `strategy`.
pub fn compile(handler: &Path, output: &Path, strategy: StrategyKind) -> Result<()> {
    let engine = engine::build(strategy, 1, 64 << 20)?;
    let compiled = handler::precompile(&engine, &HandlerSource::File(handler.to_path_buf()))?;
    std::fs::write(output, compiled)
        .with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
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
fn open_cache(dir: Option<&Path>) -> Option<CompileCache> {
    match CompileCache::open(dir?) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!("compiling without a cache: {e:#}");
            None
        }
    }
}

fn bind(config: &ServeConfig) -> Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = config.addr;
    let attempt = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(socket.into())
    };
    attempt().with_context(|| format!("cannot listen on {addr}"))
}
