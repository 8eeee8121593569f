//! The accept loop of a worker process, for every strategy.
//!
//! It waits in epoll(7) on the listeners and on the worker's doorbell
//! ([`Shutdown`]), which rings when a worker thread frees a slot, when a
//! child exits (SIGCHLD) or when shutdown is asked for. The loop only
//! accepts while the strategy has capacity, so a flood waits in the kernel's
//! backlog rather than in the host's memory.

mod ids;

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

pub(crate) use ids::ConnectionIds;

use crate::conn::service::Accepted;
use crate::listener::Listener;
use crate::shutdown::Shutdown;
use crate::strategy::Strategy;
use crate::sys::epoll::Epoll;
use crate::wasm::http::World;

/// The doorbell's epoll token; a listener's is its index.
const DOORBELL: u64 = u64::MAX;

/// Accepts connections from `listeners` and hands each to `strategy` until
/// `shutdown` is triggered. Then it closes the listeners (this process's
/// copies), lets the connections in flight finish for up to `drain_timeout`
/// (or until a second signal), ends the rest, and returns once every worker
/// is done.
pub(crate) fn run(
    listeners: Vec<Listener>,
    strategy: &mut dyn Strategy,
    shutdown: &Shutdown,
    ids: &ConnectionIds,
    drain_timeout: Duration,
) -> Result<()> {
    let client_speaks_first = strategy.service().handler().world() == World::Http;
    for listener in &listeners {
        listener
            .prepare_for_accept(client_speaks_first)
            .with_context(|| format!("cannot ready the listener on {}", listener.local()))?;
    }
    let locals: Vec<_> = listeners.iter().map(Listener::fixed_local).collect();
    let doorbell = shutdown.read_end();
    // Two ways to wait: on the doorbell and every open listener while the
    // strategy has room, on the doorbell alone while it is full. Not
    // exclusively: every process waiting on a shared listener wakes (see
    // `sys::epoll`), so a stopping worker never strands a connection.
    let everything = Epoll::new().context("cannot make the accept loop's epoll")?;
    let bell_only = Epoll::new().context("cannot make the accept loop's epoll")?;
    for epoll in [&everything, &bell_only] {
        epoll
            .add(doorbell, DOORBELL)
            .context("cannot watch the doorbell")?;
    }
    for (i, listener) in listeners.iter().enumerate() {
        everything
            .add(listener.as_raw_fd(), i as u64)
            .with_context(|| format!("cannot watch the listener on {}", listener.local()))?;
    }
    let mut ready = Vec::with_capacity(listeners.len() + 1);
    // Listeners whose socket was shut down (at host shutdown) are done.
    let mut open = vec![true; listeners.len()];
    'accepting: while !shutdown.is_triggered() {
        let epoll = if strategy.has_capacity() {
            &everything
        } else {
            &bell_only
        };
        epoll
            .wait(&mut ready, strategy.next_wakeup())
            .context("waiting on the listeners failed")?;
        if ready.contains(&DOORBELL) {
            shutdown.drain();
        }
        // Reap, count freed slots and enforce deadlines on every wake-up.
        strategy.maintain();
        for (i, listener) in listeners.iter().enumerate() {
            if !ready.contains(&(i as u64)) {
                continue;
            }
            // Take what the backlog holds, as long as there is room for it.
            while strategy.has_capacity() && !shutdown.is_triggered() {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let conn = Accepted {
                            stream,
                            peer,
                            id: ids.next(),
                            local: locals[i].clone(),
                        };
                        if let Some(conn) = strategy.service().admit(conn) {
                            strategy.dispatch(conn);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The listening socket was shut down (the host does that
                    // at shutdown, for every process at once).
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        open[i] = false;
                        everything.remove(listener.as_raw_fd());
                        if !open.contains(&true) {
                            break 'accepting;
                        }
                        break;
                    }
                    Err(e) => {
                        accept_failed(&e);
                        break;
                    }
                }
            }
        }
    }

    drop(listeners);
    strategy.stop_accepting();
    strategy.service().drain();
    strategy.maintain();
    let in_flight = strategy.in_flight();
    let tenant = strategy.service().tenant().to_string();
    tracing::info!(
        "tenant {tenant}: shutting down: no longer accepting; {in_flight} connection(s) in flight, waiting up to {drain_timeout:?}"
    );
    let deadline = Instant::now() + drain_timeout;
    loop {
        strategy.maintain();
        let in_flight = strategy.in_flight();
        if in_flight == 0 {
            break;
        }
        if shutdown.is_forced() {
            tracing::warn!("tenant {tenant}: second signal: ending {in_flight} connection(s) now");
            strategy.abort();
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "tenant {tenant}: drain timeout: ending {in_flight} connection(s) still in flight"
            );
            strategy.abort();
            break;
        }
        let wake_at = strategy.next_wakeup().map_or(deadline, |t| t.min(deadline));
        shutdown.wait_until(Some(wake_at))?;
    }
    strategy.finish();
    tracing::info!("tenant {tenant}: stopped");
    Ok(())
}

/// An accept error ends one connection attempt, never the server. Running out
/// of descriptors or memory is waited out briefly instead of spinning.
fn accept_failed(e: &io::Error) {
    match e.raw_os_error() {
        Some(libc::ECONNABORTED) | Some(libc::EPROTO) | Some(libc::EINTR) => {}
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
            tracing::warn!("accept failed: {e}; pausing 100ms");
            std::thread::sleep(Duration::from_millis(100));
        }
        _ => tracing::warn!("accept failed: {e}"),
    }
}
