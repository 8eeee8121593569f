//! The `Strategy` seam: where a connection runs (a worker thread, a child
//! process), never what runs; that is always [`Service::serve`]. A new
//! strategy is one new file here.

mod forking;
mod threading;

use std::sync::Arc;

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

    /// Called when the doorbell rang: catch up on finished work (reap
    /// children, count freed slots).
    fn maintain(&mut self);

    /// The accept loop has stopped: wait for the connections in flight.
    fn finish(&mut self);
}

/// The strategy `config` asks for, serving `service`.
pub fn build(
    config: &ServeConfig,
    service: Arc<Service>,
    shutdown: &Shutdown,
    listener: &std::net::TcpListener,
) -> Result<Box<dyn Strategy>> {
    Ok(match config.strategy {
        StrategyKind::Threading => {
            Box::new(Threading::new(service, config.workers, shutdown.waker()))
        }
        StrategyKind::Forking => Box::new(Forking::new(
            service,
            config.max_children,
            shutdown,
            listener,
        )?),
    })
}
