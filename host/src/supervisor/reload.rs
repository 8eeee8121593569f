//! Reload (SIGHUP or `--watch`): re-read the config, compile and bind what
//! is new, then switch each changed tenant to new workers on the same
//! listeners and let the old ones drain.
//!
//! Invariant: a reload changes nothing until everything it needs is
//! compiled and bound; then, per changed tenant, new workers start on the
//! same listeners before the old ones are told to drain, so no client is
//! refused.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};

use super::{listen_key, log_serving, Host, ListenKey, Tenant};
use crate::conn::service::Service;
use crate::listener::Listener;
use crate::settings::{self, HostConfig, ServeConfig, StrategyKind};
use crate::sys::signals::DRAIN_SIGNAL;
use crate::wasm::handler::HandlerSource;

impl Host {
    /// Re-reads the config (or, without a file, the handlers) and switches
    /// each changed tenant, or changes nothing and says why.
    pub(super) fn reload(&mut self) {
        self.notify.reloading();
        match self.prepare_reload() {
            Ok(plan) => {
                let summary = self.apply(plan);
                self.metrics.reloaded(true);
                tracing::info!("reloaded: {summary}");
            }
            Err(e) => {
                self.metrics.reloaded(false);
                tracing::error!("reload failed, still serving the previous configuration: {e:#}");
            }
        }
        // Over, either way: systemd's `reload` returns.
        self.notify.ready(&self.status_line());
    }

    /// Everything a reload needs, compiled and bound; nothing switched yet.
    fn prepare_reload(&mut self) -> Result<Plan> {
        let config = settings::reload(&self.config)?;
        if let Some(slots) = self.pool_slots {
            for tenant in config
                .tenants
                .iter()
                .filter(|t| t.strategy.kind() != StrategyKind::Async)
            {
                let needs = tenant.max_instances();
                if needs > slots {
                    bail!(
                        "tenant {} needs {needs} instance slots at once, but the host started with {slots}; restart the host to grow the pool",
                        tenant.tenant
                    );
                }
            }
        }
        let mut changed = Vec::new();
        for tenant in &config.tenants {
            let old = self.tenants.get(&tenant.tenant);
            let same_settings = old.is_some_and(|old| old.config == *tenant);
            let digest = match &tenant.handler {
                HandlerSource::File(_) => crate::wasm::compile_cache::digest(
                    &crate::wasm::handler::read(&tenant.handler)
                        .with_context(|| format!("tenant {}", tenant.tenant))?,
                ),
                HandlerSource::BuiltinEcho => String::new(),
            };
            let same_handler = old.is_some_and(|old| match &tenant.handler {
                HandlerSource::File(_) => old.service.handler().digest() == digest,
                HandlerSource::BuiltinEcho => old.config.handler == tenant.handler,
            });
            if same_settings && same_handler {
                continue;
            }
            let what = match old {
                None => "added".to_string(),
                Some(old) => describe_change(&old.config, tenant, !same_handler),
            };
            let (service, fds) = self.load_service(tenant)?;
            changed.push((tenant.clone(), service, fds, what));
        }
        // Bind what is new before anything switches.
        let mut bound = BTreeMap::new();
        for tenant in &config.tenants {
            for addr in &tenant.listen {
                let key = listen_key(&tenant.tenant, addr);
                if !self.listeners.contains_key(&key) && !bound.contains_key(&key) {
                    bound.insert(key, Listener::bind(addr)?);
                }
            }
        }
        let removed: Vec<String> = self
            .tenants
            .keys()
            .filter(|name| !config.tenants.iter().any(|t| &t.tenant == *name))
            .cloned()
            .collect();
        Ok(Plan {
            config,
            changed,
            removed,
            bound,
        })
    }

    /// Switches to `plan`: changed and added tenants get new workers, then
    /// their old workers and removed tenants' workers drain.
    fn apply(&mut self, plan: Plan) -> String {
        let Plan {
            config,
            changed,
            removed,
            bound,
        } = plan;
        let fresh: BTreeSet<ListenKey> = bound.keys().cloned().collect();
        self.listeners.extend(bound);
        let mut summary = Vec::new();
        for (tenant, service, handler_fds, what) in changed {
            let name = tenant.tenant.clone();
            let slot = match self.slot_for(&name) {
                Ok(slot) => slot,
                Err(e) => {
                    summary.push(format!("{name}: not started ({e})"));
                    continue;
                }
            };
            log_serving(&tenant, &service);
            let service = Arc::new(service.with_metrics(self.metrics.tenant(slot)));
            let generation = self.tenants.get(&name).map_or(1, |t| t.generation + 1);
            self.tenants.insert(
                name.clone(),
                Tenant {
                    config: tenant,
                    service,
                    handler_fds,
                    generation,
                    slot,
                },
            );
            self.spawn_tenant(&name);
            // The new workers accept from the same sockets; the old ones
            // stop accepting and finish what they have.
            self.signal_workers(DRAIN_SIGNAL, |w| {
                w.tenant == name && w.generation < generation
            });
            summary.push(format!("{name}: {what}"));
        }
        for name in removed {
            self.tenants.remove(&name);
            self.signal_workers(DRAIN_SIGNAL, |w| w.tenant == name);
            summary.push(format!("{name}: removed, draining"));
        }
        // Close the listeners no tenant lists any more.
        let wanted: BTreeSet<ListenKey> = config
            .tenants
            .iter()
            .flat_map(|t| t.listen.iter().map(|a| listen_key(&t.tenant, a)))
            .collect();
        self.listeners.retain(|key, _| wanted.contains(key));
        for tenant in &config.tenants {
            for addr in &tenant.listen {
                let key = listen_key(&tenant.tenant, addr);
                if !fresh.contains(&key) {
                    continue;
                }
                if let Some(listener) = self.listeners.get(&key) {
                    crate::logging::announce(&format!(
                        "listening on {} tenant={}",
                        listener.local(),
                        tenant.tenant
                    ));
                }
            }
        }
        self.config = config;
        if summary.is_empty() {
            return "nothing changed".to_string();
        }
        // The metrics page shows the tenants as they are now.
        self.update_metrics();
        summary.join("; ")
    }
}

/// A reload, ready to switch.
struct Plan {
    config: HostConfig,
    /// Tenants with new settings or a new handler, or new tenants, with
    /// their compiled service and its descriptors, and a description of
    /// the change.
    changed: Vec<(ServeConfig, Service, Vec<RawFd>, String)>,
    removed: Vec<String>,
    /// Listeners for addresses no tenant had.
    bound: BTreeMap<ListenKey, Listener>,
}

/// What changed in one tenant, for the reload's log line.
fn describe_change(old: &ServeConfig, new: &ServeConfig, handler: bool) -> String {
    let mut what = Vec::new();
    if handler || old.handler != new.handler {
        what.push("handler");
    }
    if old.listen != new.listen {
        what.push("listen");
    }
    if old.access != new.access {
        what.push("allow/deny");
    }
    if old.strategy != new.strategy || old.max_connections != new.max_connections {
        what.push("strategy/workers");
    }
    if old.limits != new.limits || old.drain_timeout != new.drain_timeout {
        what.push("limits");
    }
    if old.grants != new.grants {
        what.push("grants");
    }
    if what.is_empty() {
        what.push("settings");
    }
    format!("{} changed", what.join(", "))
}
