//! Socket activation: the listening sockets systemd passed the host
//! (`LISTEN_FDS`), which a tenant names as `systemd:NAME` (the socket's
//! `FileDescriptorName=`) or `systemd:` (the first one).
//!
//! The host process takes them once, at start ([`take`]), and keeps the
//! originals open for as long as it runs; a listener gets its own copy
//! ([`listener`]), so a reload that drops `systemd:NAME` and a later one
//! that lists it again find the same socket. The host never binds,
//! unlinks nor shuts down a passed socket: systemd owns it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context as _, Result};
use socket2::Socket;

use crate::sys::systemd;

/// The passed sockets and their names, in order; empty when none were.
static PASSED: OnceLock<Vec<(OwnedFd, String)>> = OnceLock::new();

/// Takes the sockets systemd passed this process and removes
/// `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` from the environment.
/// Once, in the host process, before anything else opens a descriptor or
/// starts a thread; later calls do nothing.
pub(crate) fn take() -> Result<()> {
    if PASSED.get().is_some() {
        return Ok(());
    }
    let passed = systemd::take_listen_fds().map_err(|e| anyhow!(e))?;
    let _ = PASSED.set(passed);
    Ok(())
}

/// The names of the passed sockets, for messages.
fn names(passed: &[(OwnedFd, String)]) -> String {
    passed
        .iter()
        .map(|(_, name)| name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A copy of the passed socket named `name` (the first one if `name` is
/// empty), checked to be a listening stream socket (TCP or Unix). The
/// errors name the address and what was passed.
pub(crate) fn listener(name: &str) -> Result<Socket> {
    let addr = format!("systemd:{name}");
    let passed = PASSED.get().map_or(&[][..], Vec::as_slice);
    if passed.is_empty() {
        bail!("cannot listen on {addr}: systemd passed no sockets to this process (LISTEN_FDS is not set for it)");
    }
    let found = if name.is_empty() {
        passed.first()
    } else {
        passed.iter().find(|(_, n)| n == name)
    };
    let Some((fd, _)) = found else {
        bail!(
            "cannot listen on {addr}: systemd passed no socket named {name:?} (it passed: {})",
            names(passed)
        );
    };
    let index = passed
        .iter()
        .position(|(f, _)| std::ptr::eq(f, fd))
        .unwrap_or(0);
    let number = 3 + index;
    match systemd::is_listening_stream(fd.as_fd()) {
        Ok(true) => {}
        Ok(false) => bail!(
            "cannot listen on {addr}: the socket systemd passed (descriptor {number}) is not a listening stream socket; use ListenStream= with Accept=no"
        ),
        Err(e) => bail!(
            "cannot listen on {addr}: descriptor {number} that systemd passed is not a socket: {e}"
        ),
    }
    let copy = fd
        .try_clone()
        .with_context(|| format!("cannot listen on {addr}: cannot copy descriptor {number}"))?;
    Ok(Socket::from(copy))
}
