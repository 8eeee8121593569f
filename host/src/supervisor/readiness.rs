//! The host process's readiness, as `GET /readyz` reports it: ready once
//! every tenant listens and has a live worker process of its current
//! configuration; not while a tenant has none (a worker died and its
//! replacement is not running yet) nor from the start of a shutdown.
//!
//! The host process decides it and writes it into the shared metrics
//! mapping (`Metrics::set_readiness`), which the metrics process reads at
//! each request: a store that is visible at once, so the shutdown can say
//! "not ready" before it closes the listeners, with no message to the
//! metrics process and no answer to wait for.

use std::collections::HashSet;

use super::Host;
use crate::metrics::Readiness;

impl Host {
    /// Writes the readiness the host's state gives now. Called after every
    /// turn of the supervise loop (workers reaped, replaced or reloaded) and
    /// first thing at shutdown.
    pub(super) fn update_readiness(&self) {
        self.metrics.set_readiness(self.readiness());
    }

    pub(super) fn readiness(&self) -> Readiness {
        if self.shutting_down || self.delaying {
            return Readiness::Draining;
        }
        let live: HashSet<(&str, u64)> = self
            .workers
            .values()
            .map(|w| (w.tenant.as_str(), w.generation))
            .collect();
        let every_tenant_served = self
            .tenants
            .iter()
            .all(|(name, t)| live.contains(&(name.as_str(), t.generation)));
        if every_tenant_served {
            Readiness::Ready
        } else {
            Readiness::NoWorker
        }
    }
}
