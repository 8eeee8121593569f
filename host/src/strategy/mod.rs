//! The `Strategy` seam: where a connection runs (a worker thread, a child
//! process, a task), never what runs; that is always [`Service::serve`]. A new
//! strategy is one new file here.

mod forking;
mod pool;
mod slots;
mod tasks;
mod threading;

use std::time::Instant;

use crate::conn::service::{Accepted, Service};

pub(crate) use forking::Forking;
pub(crate) use tasks::Async;
pub(crate) use threading::Threading;

/// Runs accepted connections somewhere, within a bound.
pub(crate) trait Strategy {
    /// Whether another connection may be dispatched now. While this is false
    /// the accept loop leaves new connections in the kernel's backlog until
    /// its doorbell rings.
    fn has_capacity(&self) -> bool;

    /// Starts serving `conn` and returns without waiting for it.
    fn dispatch(&mut self, conn: Accepted);

    /// What every connection runs (the accept loop asks it to admit peers).
    fn service(&self) -> &Service;

    /// Called on every wake-up of the accept loop: catch up on finished work
    /// (reap children, count freed slots) and enforce deadlines.
    fn maintain(&mut self);

    /// Connections dispatched and not yet finished.
    fn in_flight(&self) -> usize;

    /// When `maintain` must run next even if nothing rings the doorbell.
    fn next_wakeup(&self) -> Option<Instant> {
        None
    }

    /// The accept loop has stopped: from now on every finished connection
    /// must ring the doorbell, so the drain sees it.
    fn stop_accepting(&mut self);

    /// Ends every connection in flight now (the drain ran out, or a second
    /// signal came).
    fn abort(&mut self);

    /// Waits until every connection has ended and every worker is gone.
    fn finish(&mut self);
}
