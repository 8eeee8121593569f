//! The host process's side of upgrades (`crate::handoff` has the protocol):
//! as the running host, hand every listening socket to a successor that
//! asks on the upgrade socket and drain once it is ready; as the
//! successor, take the predecessor's sockets instead of binding them, and
//! tell it to drain once this host's workers run.
//!
//! Invariant: from the moment a successor holds this host's sockets, this
//! host never shuts them down nor removes their files, even if it is
//! stopped by a signal before the successor is ready; and a successor
//! treats what it was handed as the predecessor's (never shut down, files
//! left) until the predecessor has agreed to drain.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Host, ListenKey};
use crate::handoff::{Handed, Heard};
use crate::listener::Listener;
use crate::metrics::Readiness;
use crate::sys::process;

/// How long the upgrade socket is not listened to after accepting on it
/// failed (out of descriptors, say).
const UPGRADE_PAUSE: Duration = Duration::from_secs(1);

/// The key a tenant's listener is handed over under.
pub(super) fn listen_key_text(key: &ListenKey) -> String {
    match &key.1 {
        Some(tenant) => format!("listen {} tenant={tenant}", key.0),
        None => format!("listen {}", key.0),
    }
}

/// The key the metrics listener is handed over under.
fn metrics_key_text(addr: SocketAddr) -> String {
    format!("metrics {addr}")
}

/// A tenant's listener: the one handed over under `key`, else a new one.
pub(super) fn listener_for(handed: &mut Handed, key: &ListenKey) -> Result<Listener> {
    match handed.take(&listen_key_text(key)) {
        Some(socket) => Listener::handed(&key.0, socket),
        None => Listener::bind(&key.0),
    }
}

/// The metrics listener: the one handed over for `addr`, else a new one.
pub(super) fn metrics_listener_for(handed: &mut Handed, addr: SocketAddr) -> Result<TcpListener> {
    use anyhow::Context as _;
    match handed.take(&metrics_key_text(addr)) {
        Some(socket) => Ok(TcpListener::from(socket)),
        None => Ok(crate::listener::bind_tcp(addr)
            .with_context(|| format!("cannot serve metrics on {addr}"))?
            .into()),
    }
}

impl Host {
    /// The descriptors the supervise loop also waits on: the upgrade
    /// socket (a successor asking; not while paused after an error) and a
    /// successor's connection (it is ready, or gone).
    pub(super) fn upgrade_fds(&self) -> [Option<RawFd>; 2] {
        let paused = self
            .upgrade_paused
            .is_some_and(|until| Instant::now() < until);
        [
            self.upgrade
                .as_ref()
                .filter(|_| !paused)
                .map(|u| u.as_fd().as_raw_fd()),
            self.successor.as_ref().map(|s| s.as_fd().as_raw_fd()),
        ]
    }

    /// A successor knocked on the upgrade socket: hand it every socket, or
    /// refuse it while another one is taking over.
    pub(super) fn answer_successor(&mut self) {
        let Some(upgrade) = &self.upgrade else { return };
        if let Some(pending) = &self.successor {
            upgrade.refuse(&format!(
                "the host with pid {} is already taking over",
                pending.pid()
            ));
            return;
        }
        let mut offers: Vec<(String, BorrowedFd<'_>)> = self
            .listeners
            .iter()
            .map(|(key, listener)| (listen_key_text(key), listener.as_fd()))
            .collect();
        if let (Some(addr), Some(listener)) = (self.config.metrics_addr, &self.metrics_listener) {
            offers.push((metrics_key_text(addr), listener.as_fd()));
        }
        match upgrade.hand_over(&offers) {
            Ok(None) => {}
            Ok(Some(successor)) => {
                tracing::info!(
                    "upgrade: handed {} listening socket(s) to the host with pid {}; serving on until it is ready",
                    successor.handed(),
                    successor.pid()
                );
                self.successor = Some(successor);
            }
            Err(e) => {
                tracing::warn!(
                    "upgrade: a successor on {} was not served: {e:#}",
                    upgrade.path().display()
                );
                // A failing accept (out of descriptors, say) must not
                // spin the loop.
                self.upgrade_paused = Some(Instant::now() + UPGRADE_PAUSE);
            }
        }
    }

    /// The successor spoke (or went away). Returns true when it is ready
    /// and this host must drain.
    pub(super) fn hear_successor(&mut self) -> bool {
        let Some(successor) = &self.successor else {
            return false;
        };
        match successor.hear() {
            Heard::Nothing => false,
            Heard::Drain => {
                successor.confirm_drain();
                tracing::info!(
                    "upgrade: the host with pid {} is ready; draining and handing it the listeners for good",
                    successor.pid()
                );
                self.handed_over = true;
                true
            }
            Heard::Gone(why) => {
                tracing::warn!(
                    "upgrade: the host with pid {} gave up before it was ready ({why}); serving on",
                    successor.pid()
                );
                self.successor = None;
                false
            }
        }
    }

    /// First thing at shutdown. With a successor holding the sockets
    /// (ready, or still starting: it is told this host drains, and finds
    /// that answer when it asks): every socket is left open for it (no
    /// `shutdown(2)`, no file removed) and the metrics process stops at
    /// once, before this host says it is draining, so every health check
    /// and scrape from now on reaches the successor's. With none: the
    /// upgrade socket closes, so a successor started now starts afresh
    /// instead of waiting for a host that is going away.
    pub(super) fn release_to_successor(&mut self) {
        let Some(successor) = &self.successor else {
            self.upgrade = None;
            return;
        };
        if !self.handed_over {
            successor.confirm_drain();
            tracing::info!(
                "upgrade: stopping while the host with pid {} starts; it keeps the listeners",
                successor.pid()
            );
        }
        for listener in self.listeners.values_mut() {
            listener.release();
        }
        if let Some(upgrade) = &mut self.upgrade {
            upgrade.release();
        }
        self.upgrade = None;
        if let Some(pid) = self.metrics_pid.take() {
            // Reaped with the orphans at the end of the stop.
            process::signal_child(pid, libc::SIGKILL);
        }
        self.metrics_listener = None;
        self.metrics_tx = None;
    }

    /// As the successor, once every tenant has a live worker: tells the
    /// predecessor to drain. A successor stopped before that tells it
    /// nothing (it serves on) and never shuts down what it was handed.
    pub(super) fn relieve_predecessor(&mut self, stopping: bool) {
        if self.predecessor.is_none() || (!stopping && self.readiness() != Readiness::Ready) {
            return;
        }
        let Some(predecessor) = self.predecessor.take() else {
            return;
        };
        let pid = predecessor.pid();
        if stopping {
            tracing::info!(
                "upgrade: stopped before it was ready; the host with pid {pid} serves on"
            );
            return;
        }
        match predecessor.drain() {
            Ok(()) => {
                // The sockets, and their files, are this host's from now on.
                for listener in self.listeners.values_mut() {
                    listener.claim();
                }
                if let Some(upgrade) = &mut self.upgrade {
                    upgrade.claim();
                }
                tracing::info!(
                    "upgrade: took over from the host with pid {pid}; it drains its connections and exits"
                )
            }
            Err(e) => tracing::warn!(
                "upgrade: the host with pid {pid} did not confirm it drains ({e:#}); it may still be serving on the same sockets: stop it with SIGTERM"
            ),
        }
    }
}
/// Says which handed-over sockets this host's config does not list.
pub(super) fn log_leftovers(handed: &mut Handed) {
    for key in handed.leftover() {
        tracing::info!(
            "upgrade: this config does not list the previous host's {key}; it closes once that host has drained"
        );
    }
}
