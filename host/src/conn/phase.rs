//! Where a tenant's HTTP connections stand, shared by the service (which
//! drains or aborts) and the HTTP path (which watches): serving, draining
//! or aborting, as a `tokio::sync::watch` value every connection reads.

use tokio::sync::watch;

pub(super) const SERVING: u8 = 0;
pub(super) const DRAINING: u8 = 1;
pub(super) const ABORTING: u8 = 2;

/// Where a service's HTTP connections stand: serving, draining (finish the
/// request in flight, then close; idle connections close at once) or
/// aborting (close now; running guests trap at their next epoch tick).
pub(crate) struct Phase(watch::Sender<u8>);

impl Default for Phase {
    fn default() -> Phase {
        Phase(watch::Sender::new(SERVING))
    }
}

impl Phase {
    pub(crate) fn drain(&self) {
        self.0
            .send_if_modified(|p| std::mem::replace(p, (*p).max(DRAINING)) < DRAINING);
    }

    pub(crate) fn abort(&self) {
        self.0.send_replace(ABORTING);
    }

    pub(super) fn watch(&self) -> watch::Receiver<u8> {
        self.0.subscribe()
    }
}

/// Whether `phase` says the host is ending every connection now.
pub(super) fn aborting(phase: &watch::Receiver<u8>) -> bool {
    *phase.borrow() == ABORTING
}
