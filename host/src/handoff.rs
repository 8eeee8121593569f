//! Upgrades that drop nothing: the running host hands its listening
//! sockets to its successor over the upgrade socket (`--upgrade-socket
//! PATH`, a Unix `SOCK_SEQPACKET` socket of mode 0600), as HAProxy's `-x`
//! does; the successor (`host serve --take-over ...`) serves on the very
//! same sockets, and only once it is ready does the old host drain.
//!
//! The conversation, one message each line, descriptors by `SCM_RIGHTS`
//! (`sys::handoff`):
//!
//! ```text
//! successor                      running host
//!   take v1 pid=NEW        ->
//!                          <-    socket KEY        (+ the socket), one per listener
//!                          <-    done pid=OLD      (or: refused REASON)
//!   ... binds nothing it was handed, forks its workers, is ready ...
//!   drain                  ->
//!                          <-    draining          then it drains and exits
//! ```
//!
//! A KEY names what a socket is for (`listen ADDR`, `listen ADDR
//! tenant=NAME` for a port 0, `metrics ADDR`, `upgrade PATH`), so the
//! successor takes each socket its own config lists and binds the rest.
//! Until `drain` the running host changes nothing: a successor that fails
//! (a bad config, a handler that does not compile, a crash) closes the
//! connection and the running host goes on as if nothing happened.
//!
//! Invariant: a socket handed to a successor is never shut down
//! (`shutdown(2)` would stop it for the successor too) and its Unix socket
//! file is never removed by the host that handed it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::sys::handoff as sys;

/// How long either side waits for the other's next message while the
/// sockets are handed over, and the successor for `draining`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the running host waits for a successor's request after it
/// connected (it sends it at once): the host's supervise loop waits
/// meanwhile, so a peer that connects and says nothing holds it up no
/// longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// How long probing a socket file may wait for the host behind it.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The protocol's version, in the first message.
const VERSION: &str = "v1";

/// The upgrade socket a host listens on for its successor.
pub(crate) struct UpgradeSocket {
    socket: OwnedFd,
    path: PathBuf,
    /// The file's identity, while this process is the one to remove it.
    file: Option<(u64, u64)>,
}

impl UpgradeSocket {
    /// Binds `path`, replacing a stale socket file; a live host there is
    /// an error that says how to replace it.
    pub(crate) fn bind(path: &Path) -> Result<UpgradeSocket> {
        let shown = path.display();
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match sys::connect(path, PROBE_TIMEOUT) {
                Ok(_) => bail!(
                    "cannot listen for upgrades on {shown}: a host is already listening there (start this one with --take-over to replace it)"
                ),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove the stale upgrade socket {shown}")
                    })?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => bail!(
                    "cannot listen for upgrades on {shown}: a host is already listening there, and busy"
                ),
                Err(e) => bail!("cannot tell whether a host listens on {shown}: {e}"),
            },
            Ok(_) => bail!("cannot listen for upgrades on {shown}: it exists and is not a socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot listen for upgrades on {shown}: {e}"),
        }
        let socket =
            sys::listen(path).with_context(|| format!("cannot listen for upgrades on {shown}"))?;
        let mut upgrade = UpgradeSocket {
            socket,
            path: path.to_path_buf(),
            file: None,
        };
        upgrade.own_file();
        Ok(upgrade)
    }

    /// The upgrade socket a predecessor handed over; its file stays the
    /// predecessor's until [`UpgradeSocket::claim_file`].
    fn handed(path: &Path, socket: OwnedFd) -> UpgradeSocket {
        UpgradeSocket {
            socket,
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// Makes this process the one to remove the file at exit (once the
    /// predecessor that handed it over has let it go).
    pub(crate) fn claim(&mut self) {
        if self.file.is_none() {
            self.own_file();
        }
    }

    fn own_file(&mut self) {
        self.file = std::fs::symlink_metadata(&self.path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| (m.dev(), m.ino()));
    }

    /// The key a successor looks this socket up by.
    fn key(&self) -> String {
        format!("upgrade {}", self.path.display())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the file to the successor: this process no longer removes it.
    pub(crate) fn release(&mut self) {
        self.file = None;
    }

    /// Takes a successor's request: checks who asks, reads `take`, hands
    /// over every socket in `offers` (key, socket) and this one, and
    /// returns the successor, which then holds copies of them all (also
    /// when an error cut the hand-over short: the caller treats them as
    /// handed until the successor is gone). `None`: no one was waiting.
    pub(crate) fn hand_over(
        &self,
        offers: &[(String, BorrowedFd<'_>)],
    ) -> Result<Option<Successor>> {
        let conn = match sys::accept(self.socket.as_fd()) {
            Ok(conn) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(anyhow!(e).context("cannot accept")),
        };
        sys::set_timeouts(conn.as_fd(), REQUEST_TIMEOUT)?;
        let (uid, pid) = sys::peer_cred(conn.as_fd())?;
        if uid != sys::own_uid() && uid != 0 {
            let _ = sys::send(conn.as_fd(), b"refused not the host's user", None);
            bail!("refused pid {pid}, which runs as uid {uid}");
        }
        let request = receive(&conn)?.ok_or_else(|| anyhow!("pid {pid} closed at once"))?;
        parse_take(&request).with_context(|| format!("pid {pid}"))?;
        sys::set_timeouts(conn.as_fd(), ANSWER_TIMEOUT)?;
        // From the first socket sent, the successor may hold copies: it is
        // returned whatever happens next, and its connection tells the rest.
        let mut handed = 0;
        let mut sent = || -> io::Result<()> {
            for (key, socket) in offers {
                sys::send(
                    conn.as_fd(),
                    format!("socket {key}").as_bytes(),
                    Some(*socket),
                )?;
                handed += 1;
            }
            sys::send(
                conn.as_fd(),
                format!("socket {}", self.key()).as_bytes(),
                Some(self.socket.as_fd()),
            )?;
            sys::send(
                conn.as_fd(),
                format!("done pid={}", std::process::id()).as_bytes(),
                None,
            )
        };
        if let Err(e) = sent() {
            tracing::warn!("upgrade: handing the sockets to pid {pid} failed: {e}");
        }
        let _ = sys::set_nonblocking(conn.as_fd(), true);
        Ok(Some(Successor { conn, pid, handed }))
    }

    /// Answers a successor that comes while another one is taking over.
    pub(crate) fn refuse(&self, reason: &str) {
        if let Ok(conn) = sys::accept(self.socket.as_fd()) {
            let _ = sys::set_timeouts(conn.as_fd(), REQUEST_TIMEOUT);
            // Its request is read first: a Unix socket closed with a
            // message unread resets the peer, which would lose the answer.
            let _ = receive_with_fd(&conn);
            let _ = sys::send(conn.as_fd(), format!("refused {reason}").as_bytes(), None);
        }
    }
}

impl AsFd for UpgradeSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for UpgradeSocket {
    fn drop(&mut self) {
        let Some((dev, ino)) = self.file else { return };
        // A successor's or another host's file: leave it alone.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == dev && meta.ino() == ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Reads one message as text; `None` when the other side closed.
fn receive(conn: &OwnedFd) -> Result<Option<String>> {
    let (text, fd) = receive_with_fd(conn)?;
    if fd.is_some() {
        bail!("an unexpected descriptor came with {text:?}");
    }
    Ok((!text.is_empty()).then_some(text))
}

fn receive_with_fd(conn: &OwnedFd) -> Result<(String, Option<OwnedFd>)> {
    let mut buf = vec![0u8; sys::MAX_MESSAGE];
    let (n, fd) = sys::recv(conn.as_fd(), &mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => anyhow!("no answer within {ANSWER_TIMEOUT:?}"),
        _ => anyhow!(e),
    })?;
    let text =
        String::from_utf8(buf[..n].to_vec()).map_err(|_| anyhow!("a message that is not UTF-8"))?;
    Ok((text, fd))
}

/// Checks `take v1 pid=N` (the pid is for a person reading the protocol;
/// the host uses the one the kernel gives, `SO_PEERCRED`).
fn parse_take(request: &str) -> Result<u32> {
    let mut words = request.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("take"), Some(VERSION), Some(pid), None) => pid
            .strip_prefix("pid=")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("a malformed request {request:?}")),
        (Some("take"), Some(version), ..) => {
            bail!("it speaks upgrade protocol {version:?}; this host speaks {VERSION}")
        }
        _ => bail!("a malformed request {request:?}"),
    }
}

/// A successor that holds this host's sockets and is starting up.
pub(crate) struct Successor {
    conn: OwnedFd,
    pid: u32,
    handed: usize,
}

/// What a successor said since the last look.
pub(crate) enum Heard {
    /// Nothing yet.
    Nothing,
    /// It is ready: this host must drain now.
    Drain,
    /// It went away before it was ready (the reason, for the log).
    Gone(String),
}

impl Successor {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How many tenant and metrics sockets it was handed.
    pub(crate) fn handed(&self) -> usize {
        self.handed
    }

    /// Reads what it said, without waiting.
    pub(crate) fn hear(&self) -> Heard {
        let mut buf = [0u8; 64];
        match sys::recv(self.conn.as_fd(), &mut buf) {
            Ok((0, _)) => Heard::Gone("its connection closed before it was ready".into()),
            Ok((n, _)) if &buf[..n] == b"drain" => Heard::Drain,
            Ok((n, _)) => Heard::Gone(format!("it said {:?}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Heard::Nothing,
            Err(e) => Heard::Gone(e.to_string()),
        }
    }

    /// Confirms the drain: the successor's last message from this host.
    /// Also sent unasked when this host is stopped while the successor
    /// starts: it then finds the answer waiting when it asks.
    pub(crate) fn confirm_drain(&self) {
        let _ = sys::set_nonblocking(self.conn.as_fd(), false);
        let _ = sys::send(self.conn.as_fd(), b"draining", None);
    }
}

impl AsFd for Successor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

/// What a successor took over from the running host.
pub(crate) struct Handed {
    sockets: BTreeMap<String, OwnedFd>,
    predecessor: Option<Predecessor>,
}

/// The running host a successor took over from, waiting for `drain`.
pub(crate) struct Predecessor {
    conn: OwnedFd,
    pid: u32,
}

impl Handed {
    /// Nothing handed over: every socket is bound afresh.
    pub(crate) fn nothing() -> Handed {
        Handed {
            sockets: BTreeMap::new(),
            predecessor: None,
        }
    }

    /// The socket handed over under `key`, if any.
    pub(crate) fn take(&mut self, key: &str) -> Option<OwnedFd> {
        self.sockets.remove(key)
    }

    /// The upgrade socket handed over for `path`, or a new one bound there.
    pub(crate) fn upgrade_socket(&mut self, path: &Path) -> Result<UpgradeSocket> {
        match self.take(&format!("upgrade {}", path.display())) {
            Some(socket) => Ok(UpgradeSocket::handed(path, socket)),
            None => UpgradeSocket::bind(path),
        }
    }

    /// The keys of the sockets no one took: closed here, and for good
    /// once the predecessor has drained.
    pub(crate) fn leftover(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sockets).into_keys().collect()
    }

    pub(crate) fn predecessor(&mut self) -> Option<Predecessor> {
        self.predecessor.take()
    }
}

impl Predecessor {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells it to drain, and waits for it to say it does (it may have said
    /// so already, if it was stopped meanwhile: then the send may fail,
    /// and the answer is still there to read).
    pub(crate) fn drain(self) -> Result<()> {
        let sent = sys::send(self.conn.as_fd(), b"drain", None);
        match receive(&self.conn).map_err(|e| match sent {
            Err(send) => anyhow!(send),
            Ok(()) => e,
        })? {
            Some(text) if text == "draining" => Ok(()),
            Some(text) => bail!("it answered {text:?}"),
            None => bail!("it closed the connection"),
        }
    }
}

/// Asks the host listening on `path` for its sockets. No host there (no
/// file, or a stale one) is not an error: nothing is handed over and the
/// caller binds everything, as at a first start.
pub(crate) fn take_over(path: &Path) -> Result<Handed> {
    let shown = path.display();
    let conn = match sys::connect(path, ANSWER_TIMEOUT) {
        Ok(conn) => conn,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ECONNREFUSED) =>
        {
            tracing::info!("no host listens on {shown}: nothing to take over; starting afresh");
            return Ok(Handed::nothing());
        }
        Err(e) => bail!("cannot take over from the host at {shown}: {e}"),
    };
    let fail = |e: anyhow::Error| anyhow!("cannot take over from the host at {shown}: {e:#}");
    // Sockets are taken only from the host's own user (or root): the
    // user that made the upgrade socket, which every host since shares.
    let (uid, _) = sys::peer_cred(conn.as_fd()).map_err(|e| fail(e.into()))?;
    if uid != sys::own_uid() && uid != 0 {
        return Err(fail(anyhow!("it runs as uid {uid}, not as this user")));
    }
    let request = format!("take {VERSION} pid={}", std::process::id());
    // A host that refuses may answer and close before the request is
    // sent: its answer is read either way.
    let sent = sys::send(conn.as_fd(), request.as_bytes(), None);
    let mut sockets = BTreeMap::new();
    loop {
        let (text, fd) = receive_with_fd(&conn).map_err(fail)?;
        if let Some(key) = text.strip_prefix("socket ") {
            let socket = fd.ok_or_else(|| fail(anyhow!("{text:?} came without its socket")))?;
            sockets.insert(key.to_string(), socket);
        } else if let Some(pid) = text.strip_prefix("done pid=") {
            // The pid the answering host gives: SO_PEERCRED names the
            // process that made the listening socket, which after an
            // upgrade is an older host.
            let pid = pid
                .parse()
                .map_err(|_| fail(anyhow!("a malformed message {text:?}")))?;
            return Ok(Handed {
                sockets,
                predecessor: Some(Predecessor { conn, pid }),
            });
        } else if let Some(reason) = text.strip_prefix("refused ") {
            return Err(fail(anyhow!("it refused: {reason}")));
        } else if text.is_empty() {
            return Err(fail(match &sent {
                Err(e) => anyhow!("it closed the connection ({e})"),
                Ok(()) => anyhow!("it closed the connection"),
            }));
        } else {
            return Err(fail(anyhow!("a malformed message {text:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_request_names_the_successor() {
        assert_eq!(parse_take("take v1 pid=42").unwrap(), 42);
        let err = parse_take("take v2 pid=42").unwrap_err().to_string();
        assert!(err.contains("\"v2\""), "{err}");
        assert!(parse_take("take v1 pid=x").is_err());
        assert!(parse_take("give").is_err());
    }
}
