//! The `Strategy` seam: where a connection runs (a worker thread, a child
//! process), never what runs; that is always [`Service::serve`]. A new
//! strategy is one new file here.

mod forking;
pub mod prefork;
mod threading;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use crate::config::{ServeConfig, StrategyKind};
use crate::connection::{Accepted, Service};
use crate::server::Shutdown;

pub use forking::Forking;
pub use threading::Threading;

/// Runs accepted connections somewhere, within a bound.
pub trait Strategy {
    /// Whether another connection may be dispatched now. While this is false
    /// the accept loop leaves new connections in the kernel's backlog until
    /// its doorbell rings.
    fn has_capacity(&self) -> bool;

    /// Starts serving `conn` and returns without waiting for it.
    fn dispatch(&mut self, conn: Accepted);

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

/// First thing in a forked child (forking's per-connection child, prefork's
/// worker): restore default signal dispositions, since the parent's handlers
/// write to descriptors that are closed here and whose numbers may be reused;
/// ignore SIGINT and SIGTERM, since a terminal's Ctrl-C and a service
/// manager's stop reach the whole process group and the parent decides
/// (it drains, then kills); and close the parent's descriptors.
fn leave_parent(close: &[std::os::fd::RawFd]) {
    // SAFETY: async-signal-safe calls only, on a fresh single-threaded child.
    unsafe {
        for signal in [libc::SIGCHLD, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(signal, libc::SIG_DFL);
        }
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        for &fd in close {
            libc::close(fd);
        }
    }
}

/// The strategy `config` asks for, serving `service`.
pub fn build(
    config: &ServeConfig,
    service: Arc<Service>,
    shutdown: &Shutdown,
    listener: &TcpListener,
) -> Result<Box<dyn Strategy>> {
    Ok(match config.strategy {
        StrategyKind::Threading => Box::new(Threading::new(
            service,
            config.workers,
            config.max_in_flight(),
            shutdown.waker(),
            "",
        )),
        StrategyKind::Forking => Box::new(Forking::new(
            service,
            config.max_in_flight(),
            shutdown,
            listener,
        )?),
        StrategyKind::Prefork => unreachable!("prefork runs its own supervisor: prefork::run"),
    })
}
