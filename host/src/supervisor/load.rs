//! Start-up pieces the host process uses again at reload: compiling a
//! tenant's handler into a service, the tenant's metrics slot, the line that
//! says what a tenant serves, and the open-file limit.

use std::os::fd::RawFd;

use anyhow::{bail, Context as _, Result};

use super::Host;
use crate::conn::service::Service;
use crate::settings::{self, ServeConfig, StrategyKind};
use crate::sys::{process, resources};
use crate::wasm::compile_cache::CompileCache;
use crate::wasm::engine::{self, EpochClock};
use crate::wasm::handler::{Handler, LoadOptions};

impl Host {
    /// Compiles (or loads from the cache) a tenant's handler, and says which
    /// descriptors it holds (its image file), which its workers must keep.
    pub(super) fn load_service(&mut self, tenant: &ServeConfig) -> Result<(Service, Vec<RawFd>)> {
        let (service, fds) = process::descriptors_opened_by(|| self.compile(tenant))?;
        Ok((service?, fds))
    }

    fn compile(&mut self, tenant: &ServeConfig) -> Result<Service> {
        let for_async = tenant.strategy.kind() == StrategyKind::Async;
        let options = LoadOptions {
            cache: open_cache(tenant.cache_dir.as_deref()),
            allow_precompiled: tenant.allow_precompiled,
            for_async,
        };
        let engine = if for_async {
            match &self.async_engine {
                Some(engine) => engine.clone(),
                None => {
                    let (engine, fds) = process::descriptors_opened_by(engine::for_async)?;
                    self.engine_fds.extend(fds);
                    self.async_engine.insert(engine?).clone()
                }
            }
        } else {
            self.engine.clone()
        };
        let handler = Handler::load(&engine, &tenant.handler, &options);
        // From a config file, say which file and tenant; the flags have
        // only one.
        let handler = match &self.config.file {
            Some(file) => {
                handler.with_context(|| format!("{}: tenant {}", file.display(), tenant.tenant))?
            }
            None => handler?,
        };
        let clock = match tenant.strategy.kind() {
            StrategyKind::Forking => EpochClock::Alarm,
            StrategyKind::Threading | StrategyKind::Prefork => EpochClock::Ticker,
            StrategyKind::Async => EpochClock::Yield,
        };
        Ok(Service::new(
            handler,
            tenant.tenant.clone(),
            tenant.limits.clone(),
            tenant.grants.clone(),
            clock,
        )
        .with_access(tenant.access.clone())
        .with_proxy(tenant.proxy.clone()))
    }

    /// The metrics slot of a tenant name, kept for the whole run so a
    /// tenant's counters survive its reloads.
    pub(super) fn slot_for(&mut self, name: &str) -> Result<usize> {
        if let Some(&slot) = self.slots.get(name) {
            return Ok(slot);
        }
        let slot = self.slots.len();
        if slot >= self.metrics.max_tenants() {
            bail!(
                "more than {} distinct tenant names in one run; restart the host",
                self.metrics.max_tenants()
            );
        }
        self.slots.insert(name.to_string(), slot);
        Ok(slot)
    }
}

/// The line that says what a tenant serves, and how.
pub(super) fn log_serving(config: &ServeConfig, service: &Service) {
    let workers = match config.strategy {
        settings::Strategy::Threading { workers } => format!("{workers} threads kept warm"),
        settings::Strategy::Forking { max_children } => format!("at most {max_children} children"),
        settings::Strategy::Prefork { processes, workers } => {
            format!("{processes} processes, {workers} threads kept warm in each")
        }
        settings::Strategy::Async { workers } => format!("{workers} runtime threads"),
    };
    let limits = &config.limits;
    tracing::info!(
        "tenant {}: serving {} (sha256 {}) with the {} strategy ({workers}, at most {} connections in flight); limits: memory {}, timeout {:?}, idle timeout {:?}; grants: {}{}{}",
        config.tenant,
        config.handler,
        &service.handler().digest()[..12.min(service.handler().digest().len())],
        config.strategy.name(),
        config.max_in_flight(),
        bytesize::ByteSize(limits.max_memory).display().iec(),
        limits.timeout,
        limits.idle_timeout,
        config.grants.describe(),
        if config.access.is_open() {
            String::new()
        } else {
            format!(
                "; allow {:?}, deny {:?}",
                config.access.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                config.access.deny.iter().map(|n| n.to_string()).collect::<Vec<_>>()
            )
        },
        match &config.proxy {
            None => String::new(),
            Some(proxy) => format!(
                "; proxy protocol {} from {:?}, header timeout {:?}",
                proxy.version.name(),
                proxy.from.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                proxy.header_timeout
            ),
        }
    );
}

/// Raises the soft limit on open descriptors to the hard one: every
/// connection in flight or waiting in the queue holds a socket, and the
/// common soft default (1024) would cap `--max-connections` far below what
/// the machine allows.
pub(super) fn raise_descriptor_limit() {
    if let Err(soft) = resources::raise_descriptor_limit() {
        tracing::warn!("cannot raise the open-file limit above {soft}");
    }
}

/// The compile cache, if one is configured and usable; a cache that cannot be
/// opened costs only speed.
pub(crate) fn open_cache(dir: Option<&std::path::Path>) -> Option<CompileCache> {
    match CompileCache::open(dir?) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!("compiling without a cache: {e:#}");
            None
        }
    }
}
