//! The metrics process: serves `/metrics` from the counters every worker
//! shares, in a process of its own so a slow scraper never touches the
//! host's loop. It lives for the whole run (restarted only if it dies); a
//! reload sends it the new tenant list through a pipe, so no scrape is cut
//! off by a reload.
//!
//! The pipe's protocol: one line per tenant, `slot name digest strategy`,
//! tab-separated (tenant names hold no tabs), then an empty line that ends
//! the list. Readiness (`GET /readyz`) does not go through the pipe: the
//! host process writes it into the shared mapping (`Metrics::set_readiness`,
//! `supervisor::readiness`), where it is seen at once, with no message to
//! wait for, and by a restarted metrics process too.

use std::io::{BufRead as _, Write as _};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use anyhow::{Context as _, Result};

use super::Host;
use crate::metrics::{Metrics, TenantInfo};
use crate::sys::{pipe, process};

impl Host {
    /// The tenants as the metrics page shows them.
    fn tenant_infos(&self) -> Vec<TenantInfo> {
        self.tenants
            .values()
            .map(|t| TenantInfo {
                name: t.config.tenant.clone(),
                slot: t.slot,
                digest: t.service.handler().digest().to_string(),
                strategy: t.config.strategy.name().to_string(),
            })
            .collect()
    }

    /// Starts the metrics process, if a metrics address is configured.
    pub(super) fn spawn_metrics(&mut self) {
        let Some(listener) = &self.metrics_listener else {
            return;
        };
        let (read, write) = match pipe::pipe(false) {
            Ok(ends) => ends,
            Err(e) => {
                tracing::error!("cannot start the metrics process: {e}");
                return;
            }
        };
        let tenants = self.tenant_infos();
        let keep = [listener.as_raw_fd(), read.as_raw_fd()];
        let child = process::Child {
            keep: &keep,
            on_parent_death: libc::SIGKILL,
        };
        match process::fork(&child) {
            Err(e) => tracing::error!("cannot start the metrics process: {e}"),
            Ok(process::Forked::Child) => {
                // As a worker: no panic unwinds into the host's code.
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    listener
                        .try_clone()
                        .map_err(anyhow::Error::from)
                        .and_then(|listener| {
                            serve(listener, self.metrics.clone(), tenants, read.into())
                        })
                }));
                match served {
                    Ok(Err(e)) => tracing::error!("the metrics server stopped: {e:#}"),
                    Err(_) => tracing::error!("the metrics server stopped: the host panicked"),
                    Ok(Ok(())) => {}
                }
                process::exit_now(1)
            }
            Ok(process::Forked::Parent(pid)) => {
                self.metrics_pid = Some(pid);
                self.metrics_tx = Some(write.into());
            }
        }
    }

    /// Tells the metrics process the tenants as they are now.
    pub(super) fn update_metrics(&mut self) {
        let infos = self.tenant_infos();
        let Some(tx) = &mut self.metrics_tx else {
            return;
        };
        if let Err(e) = tx.write_all(encode(&infos).as_bytes()) {
            tracing::warn!("cannot update the metrics process: {e}");
        }
    }
}

/// One tenant list as the pipe carries it.
fn encode(infos: &[TenantInfo]) -> String {
    let mut text = String::new();
    for t in infos {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            t.slot, t.name, t.digest, t.strategy
        ));
    }
    text.push('\n');
    text
}

/// One tenant's line, or `None` for a line that is not one.
fn decode(line: &str) -> Option<TenantInfo> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [slot, name, digest, strategy] = fields[..] else {
        return None;
    };
    Some(TenantInfo {
        name: name.to_string(),
        slot: slot.parse().ok()?,
        digest: digest.to_string(),
        strategy: strategy.to_string(),
    })
}

/// The metrics process's work: serve the page, and take new tenant lists
/// from `updates` on a thread of its own.
fn serve(
    listener: TcpListener,
    metrics: Metrics,
    tenants: Vec<TenantInfo>,
    updates: std::fs::File,
) -> Result<()> {
    let tenants = Arc::new(RwLock::new(tenants));
    let shown = tenants.clone();
    std::thread::Builder::new()
        .name("metrics-updates".into())
        .spawn(move || {
            let mut next = Vec::new();
            for line in std::io::BufReader::new(updates).lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    *shown.write().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut next);
                    continue;
                }
                next.extend(decode(&line));
            }
            // The host process is gone: PR_SET_PDEATHSIG ends this one.
        })
        .context("cannot start the metrics update thread")?;
    let readiness = metrics.clone();
    crate::metrics::serve_http(
        listener,
        move || metrics.render(&tenants.read().unwrap_or_else(|e| e.into_inner())),
        move || readiness.readiness(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_list_survives_the_pipe() {
        let infos = vec![
            TenantInfo {
                name: "a".into(),
                slot: 0,
                digest: "abc".into(),
                strategy: "threading".into(),
            },
            TenantInfo {
                name: "b-2".into(),
                slot: 7,
                digest: String::new(),
                strategy: "async".into(),
            },
        ];
        let text = encode(&infos);
        assert!(text.ends_with("\n\n"));
        let back: Vec<TenantInfo> = text.lines().filter_map(decode).collect();
        assert_eq!(back, infos);
    }
}
