//! The host process's side of upgrades (`crate::handoff` has the protocol):
//! as the running host, hand every listening socket to a successor that
//! asks on the upgrade socket and drain once it is ready; as the
//! successor, take the predecessor's sockets instead of binding them, and
//! tell it to drain once this host's workers run.
//!
//! Invariant: from the moment a successor holds this host's sockets, this
//! host never shuts them down nor removes their files, even if it is
//! stopped by a signal before the successor is ready.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd};

use anyhow::Result;

use super::{Host, ListenKey};
use crate::handoff::{Handed, Heard};
use crate::listener::Listener;
use crate::sys::process;

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
    /// socket (a successor asking) and a successor's connection (it is
    /// ready, or gone).
    pub(super) fn upgrade_fds(&self) -> [Option<RawFd>; 2] {
        [
            self.upgrade.as_ref().map(|u| u.as_fd().as_raw_fd()),
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
            Ok(successor) => {
                tracing::info!(
                    "upgrade: handed {} listening socket(s) to the host with pid {}; serving on until it is ready",
                    successor.handed(),
                    successor.pid()
                );
                self.successor = Some(successor);
            }
            Err(e) => tracing::warn!(
                "upgrade: a successor on {} was not served: {e:#}",
                upgrade.path().display()
            ),
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

    /// At shutdown, once a successor holds the sockets: leaves every
    /// socket open for it (no `shutdown(2)`, no file removed), and stops the
    /// metrics process at once, so every health check and scrape from now
    /// on reaches the successor's.
    pub(super) fn release_to_successor(&mut self) {
        if !self.handed_over && self.successor.is_none() {
            return;
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

    /// As the successor, once ready: tells the predecessor to drain.
    pub(super) fn relieve_predecessor(&mut self) {
        let Some(predecessor) = self.predecessor.take() else {
            return;
        };
        let pid = predecessor.pid();
        match predecessor.drain() {
            Ok(()) => {
                // Its files are this host's to remove from now on.
                for listener in self.listeners.values_mut() {
                    listener.claim_file();
                }
                if let Some(upgrade) = &mut self.upgrade {
                    upgrade.claim_file();
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
