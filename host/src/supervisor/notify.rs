//! Tells systemd (`Type=notify`) where the host process is: `READY=1` once
//! every tenant listens, `RELOADING=1` with `MONOTONIC_USEC=` and then
//! `READY=1` around a reload, `STOPPING=1` when shutdown starts, and
//! `STATUS=` lines with the tenants and their connection counts. The
//! `sd_notify` protocol itself: one datagram per message to the Unix socket
//! named by `NOTIFY_SOCKET` (a path, or an abstract name after `@`).
//!
//! Only the host process notifies: `NOTIFY_SOCKET` is taken out of the
//! environment at start, and the socket is closed in every child by the
//! one fork (`sys::process::fork`).

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::sys::systemd;

/// How often the `STATUS=` line is refreshed while the host runs.
pub(super) const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// The notify socket, if systemd gave one.
pub(super) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Takes `NOTIFY_SOCKET` (and removes it from the environment). An
    /// address it cannot use is logged once and ignored: the host serves
    /// all the same.
    pub(super) fn from_env() -> Notifier {
        let Some(text) = systemd::take_var("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        match open(&text) {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET {text:?}: {e}; not notifying systemd");
                Notifier { target: None }
            }
        }
    }

    /// Whether a notify socket was given.
    pub(super) fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Every tenant listens (at start, or after a reload).
    pub(super) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload starts now.
    pub(super) fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            systemd::monotonic_usec()
        ));
    }

    /// Shutdown starts now.
    pub(super) fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    pub(super) fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// One datagram; a failure (systemd gone, a full queue) is logged at
    /// debug level and changes nothing else.
    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            tracing::debug!("cannot notify systemd: {e}");
        }
    }
}

/// An unbound datagram socket and the address `text` names: `/PATH`, or
/// `@NAME` for an abstract socket.
fn open(text: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match text.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None if text.starts_with('/') => SocketAddr::from_pathname(text)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "expected an absolute socket path or @NAME",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_each_message_as_one_datagram_to_a_path() {
        let dir = std::env::temp_dir().join(format!("host-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some(open(path.to_str().unwrap()).unwrap()),
        };
        notifier.ready("serving 1 tenant(s): a (0 in flight, 0 served)");
        notifier.reloading();
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"READY=1\nSTATUS=serving 1 tenant(s): a (0 in flight, 0 served)"
        );
        let n = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn takes_a_path_or_an_abstract_name_only() {
        assert!(open("@host-test-abstract").is_ok());
        assert!(open("/run/systemd/notify").is_ok());
        let error = open("relative/notify").unwrap_err();
        assert_eq!(
            error.to_string(),
            "expected an absolute socket path or @NAME"
        );
    }
}
