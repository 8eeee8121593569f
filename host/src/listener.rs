//! The sockets a tenant listens on, TCP or Unix-domain, and what `accept`
//! gives back: a socket and a printable peer.
//!
//! Unix listeners (socketserver's `UnixStreamServer`): the socket file is
//! created with mode 0660; a file left by a dead host is replaced, one a live
//! server listens on is an error (found by a connect that never blocks, so a
//! server with a full backlog cannot hang start-up or a reload); the file is
//! removed when the process that bound it drops the listener (never by a
//! forked worker dropping its copy).
//!
//! A `systemd:NAME` listener is a copy of a socket systemd passed
//! (`crate::activation`): never bound, unlinked nor shut down here.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::settings::ListenAddr;

/// Pending connections the kernel holds while every worker is busy.
const LISTEN_BACKLOG: i32 = 1024;

/// The mode of a Unix listener's socket file: owner and group may connect.
const UNIX_SOCKET_MODE: u32 = 0o660;

/// `TCP_DEFER_ACCEPT` for HTTP listeners: a client that connects and sends
/// nothing is still accepted, about this many seconds late (the kernel then
/// resends its SYN-ACK and takes the client's next ACK), and its idle
/// timeout starts then.
const DEFER_ACCEPT_SECS: i32 = 1;

/// A bound, listening socket.
pub struct Listener {
    socket: Socket,
    /// What it was asked to listen on (port 0 stays 0 here).
    configured: ListenAddr,
    /// What it listens on (port 0 resolved).
    local: ListenAddr,
    /// For a Unix listener: the pid that created the file and the file's
    /// identity, so only that process removes it, and only if it is still
    /// this socket's file.
    unix_file: Option<(u32, u64, u64)>,
    /// A socket systemd passed, or one handed to a successor: someone else
    /// keeps listening on it after this host stops, so
    /// [`Listener::shut_down`] leaves it alone.
    adopted: bool,
}

/// The other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The peer's IP address and port (TCP); `None` over a Unix socket.
    pub inet: Option<SocketAddr>,
    /// `IP:PORT`, or `unix:` plus the peer's path (usually `unix:`), as the
    /// guest sees it. The client picks the path: it may hold any byte but
    /// NUL, a newline too, so the log prints it through `Display`, escaped.
    pub text: String,
}

impl Peer {
    pub fn ip(&self) -> Option<IpAddr> {
        self.inet.map(|a| a.ip())
    }
}

/// The peer for the log: control characters escaped
/// ([`crate::logging::escape`]), so a peer path cannot forge a log line.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::logging::escape(&self.text))
    }
}

impl Listener {
    /// Binds and listens on `addr`; the error names the address.
    pub fn bind(addr: &ListenAddr) -> Result<Listener> {
        let (socket, unix_file) = match addr {
            ListenAddr::Tcp(inet) => {
                let socket = bind_tcp(*inet).with_context(|| format!("cannot listen on {addr}"))?;
                (socket, None)
            }
            ListenAddr::Unix(path) => {
                let (socket, file) =
                    bind_unix(path).with_context(|| format!("cannot listen on {addr}"))?;
                (socket, Some(file))
            }
            ListenAddr::Systemd(name) => (crate::activation::listener(name)?, None),
        };
        let local = match addr {
            ListenAddr::Tcp(_) => ListenAddr::Tcp(
                socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .context("cannot read the listener's address")?,
            ),
            ListenAddr::Unix(_) => addr.clone(),
            ListenAddr::Systemd(_) => adopted_local(&socket).unwrap_or_else(|| addr.clone()),
        };
        Ok(Listener {
            socket,
            configured: addr.clone(),
            local,
            unix_file,
            adopted: matches!(addr, ListenAddr::Systemd(_)),
        })
    }

    /// The socket for `addr` a predecessor handed over
    /// (`crate::handoff`), checked to be listening. It stays the
    /// predecessor's until [`Listener::claim`] (once the predecessor has
    /// agreed to drain): a successor that fails or is stopped first never
    /// shuts it down nor removes its file.
    pub(crate) fn handed(addr: &ListenAddr, socket: std::os::fd::OwnedFd) -> Result<Listener> {
        match crate::sys::systemd::is_listening_stream(socket.as_fd()) {
            Ok(true) => {}
            Ok(false) => bail!("cannot listen on {addr}: the socket handed over is not listening"),
            Err(e) => {
                bail!("cannot listen on {addr}: the descriptor handed over is not a socket: {e}")
            }
        }
        let socket = Socket::from(socket);
        let local = adopted_local(&socket).unwrap_or_else(|| addr.clone());
        let local = match addr {
            // As configured, as `bind` gives it (the same text in the log).
            ListenAddr::Unix(_) => addr.clone(),
            _ => local,
        };
        Ok(Listener {
            socket,
            configured: addr.clone(),
            local,
            unix_file: None,
            adopted: true,
        })
    }

    /// Makes a handed-over listener this process's own, once its
    /// predecessor has let it go: shut down at this host's stop (a
    /// `systemd:` one excepted), its Unix socket file removed at exit.
    pub(crate) fn claim(&mut self) {
        self.adopted = matches!(self.configured, ListenAddr::Systemd(_));
        if let (ListenAddr::Unix(path), None) = (&self.configured, self.unix_file) {
            self.unix_file = std::fs::symlink_metadata(path)
                .ok()
                .filter(|m| m.file_type().is_socket())
                .map(|m| (std::process::id(), m.dev(), m.ino()));
        }
    }

    /// Gives the socket to a successor: this process never shuts it down
    /// nor removes its Unix socket file any more.
    pub(crate) fn release(&mut self) {
        self.adopted = true;
        self.unix_file = None;
    }

    /// The address it listens on, with port 0 resolved.
    pub fn local(&self) -> &ListenAddr {
        &self.local
    }

    /// Readies it for the accept loop: non-blocking, and for TCP with
    /// `TCP_NODELAY` set once here, which every accepted socket inherits
    /// (replies are often one small write: Nagle must not hold them back),
    /// rather than once per connection. `client_speaks_first` (HTTP): with
    /// `TCP_DEFER_ACCEPT`, so a connection is accepted once its request has
    /// arrived and its first read finds it, with no wait in between; else
    /// without (set to 0: a reload may change the handler on this socket).
    /// Whichever worker readies a shared socket last decides: across a
    /// reload that is the new one.
    pub(crate) fn prepare_for_accept(&self, client_speaks_first: bool) -> io::Result<()> {
        self.socket.set_nonblocking(true)?;
        if matches!(self.local, ListenAddr::Tcp(_)) {
            // A protocol that refuses these (a passed socket of another
            // kind) keeps its defaults: nothing to stop serving for.
            if let Err(e) = self.socket.set_tcp_nodelay(true) {
                tracing::debug!("listener on {}: cannot set TCP_NODELAY: {e}", self.local);
            }
            // A socket systemd passed keeps its unit's `DeferAcceptSec=`:
            // the admin's, and it outlives this host.
            let defer = if client_speaks_first {
                DEFER_ACCEPT_SECS
            } else {
                0
            };
            if !matches!(self.configured, ListenAddr::Systemd(_)) {
                if let Err(e) = crate::sys::socket::set_defer_accept(self.socket.as_fd(), defer) {
                    tracing::debug!(
                        "listener on {}: cannot set TCP_DEFER_ACCEPT: {e}",
                        self.local
                    );
                }
            }
        }
        Ok(())
    }

    /// The local address of every connection it accepts, when that is known
    /// without asking (TCP bound by this host to one address, not a
    /// wildcard), so no connection pays a getsockname(2) for it. A socket
    /// systemd passed may be transparent (`Transparent=yes`): asked.
    pub(crate) fn fixed_local(&self) -> Option<Arc<str>> {
        match (&self.configured, &self.local) {
            (ListenAddr::Systemd(_), _) => None,
            (_, ListenAddr::Tcp(addr)) if !addr.ip().to_canonical().is_unspecified() => {
                Some(addr.to_string().into())
            }
            _ => None,
        }
    }

    /// Takes one connection from the backlog.
    pub fn accept(&self) -> io::Result<(Socket, Peer)> {
        let (socket, addr) = self.socket.accept()?;
        Ok((socket, peer_of(&addr)))
    }

    /// Another descriptor for the same socket (a worker's copy). It never
    /// removes the Unix socket file: only the listener that bound it does.
    pub(crate) fn duplicate(&self) -> io::Result<Listener> {
        Ok(Listener {
            socket: self.socket.try_clone()?,
            configured: self.configured.clone(),
            local: self.local.clone(),
            unix_file: None,
            adopted: self.adopted,
        })
    }

    /// Stops listening for every process sharing this socket at once: their
    /// `accept` fails with EINVAL, and new clients are refused.
    /// A socket systemd passed is left listening: systemd holds it for
    /// the next start, and clients wait in its backlog meanwhile (the
    /// workers stop accepting at their drain signal).
    pub fn shut_down(&self) {
        if self.adopted {
            return;
        }
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let (Some((owner, dev, ino)), ListenAddr::Unix(path)) = (self.unix_file, &self.configured)
        else {
            return;
        };
        if owner != std::process::id() {
            return;
        }
        // Another host may have replaced the file since: leave theirs alone.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.dev() == dev && meta.ino() == ino {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Where a passed socket listens: `IP:PORT`, or `unix:PATH` for a Unix
/// socket with a path; `None` for one with no path (abstract, unnamed).
fn adopted_local(socket: &Socket) -> Option<ListenAddr> {
    let addr = socket.local_addr().ok()?;
    if let Some(inet) = addr.as_socket() {
        return Some(ListenAddr::Tcp(inet));
    }
    addr.as_pathname()
        .map(|p| ListenAddr::Unix(p.to_path_buf()))
}

/// A listening TCP socket on `addr`. On `[::]` it is IPv6 only
/// (`IPV6_V6ONLY`), whatever the system's default: `0.0.0.0:P` and
/// `[::]:P` are then two listeners that coexist, as the config check
/// assumes, instead of the second failing to bind.
pub(crate) fn bind_tcp(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_cloexec(true)?;
    if let IpAddr::V6(ip) = addr.ip() {
        if ip.is_unspecified() {
            socket.set_only_v6(true)?;
        }
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// The printable form of an accepted peer's address.
pub fn peer_of(addr: &SockAddr) -> Peer {
    if let Some(inet) = addr.as_socket() {
        return Peer {
            inet: Some(inet),
            text: inet.to_string(),
        };
    }
    let path = addr
        .as_pathname()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Peer {
        inet: None,
        text: format!("unix:{path}"),
    }
}

/// The local address of an accepted socket, printable.
pub fn local_of(socket: &Socket) -> String {
    match socket.local_addr() {
        Ok(addr) => match addr.as_socket() {
            Some(inet) => inet.to_string(),
            None => peer_of(&addr).text,
        },
        Err(_) => "unknown".to_string(),
    }
}

/// How long the probe of an existing socket file may wait for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What connecting to an existing socket file found.
enum Probe {
    /// A server accepted the connection.
    Live,
    /// A server listens, but its backlog is full.
    Busy,
    /// Nothing listens: a dead server's file.
    Stale,
    /// The file went away meanwhile.
    Gone,
    Unknown(io::Error),
}

/// Whether a server listens on the socket file at `path`. The connect does
/// not block: a live server whose backlog is full (anyone who can connect
/// can fill it) answers `EAGAIN` at once instead of holding start-up or a
/// reload for as long as that server likes; a connect still in progress is
/// given [`PROBE_TIMEOUT`].
fn probe_unix(path: &Path) -> Probe {
    let attempt = || -> io::Result<Probe> {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        socket.set_cloexec(true)?;
        socket.set_nonblocking(true)?;
        let error = match socket.connect(&SockAddr::unix(path)?) {
            Ok(()) => return Ok(Probe::Live),
            Err(e) => e,
        };
        let in_progress = error.raw_os_error() == Some(libc::EINPROGRESS);
        if in_progress {
            use crate::sys::socket::{poll_one, Interest};
            // A failed wait counts as a busy server, as a timed-out one.
            let ready = poll_one(socket.as_fd(), Interest::Write, Some(PROBE_TIMEOUT));
            if !ready.unwrap_or(false) {
                return Ok(Probe::Busy);
            }
            return Ok(match socket.take_error()? {
                None => Probe::Live,
                Some(e) => classify_connect_error(e),
            });
        }
        Ok(classify_connect_error(error))
    };
    attempt().unwrap_or_else(Probe::Unknown)
}

fn classify_connect_error(error: io::Error) -> Probe {
    match error.raw_os_error() {
        Some(libc::EAGAIN) => Probe::Busy,
        Some(libc::ECONNREFUSED) => Probe::Stale,
        Some(libc::ENOENT) => Probe::Gone,
        _ => Probe::Unknown(error),
    }
}

/// Binds a Unix listener at `path`, replacing a stale socket file.
fn bind_unix(path: &Path) -> Result<(Socket, (u32, u64, u64))> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match probe_unix(path) {
            Probe::Live => bail!("{} is in use by a running server", path.display()),
            Probe::Busy => bail!(
                "{} is in use by a running server (its backlog is full)",
                path.display()
            ),
            Probe::Stale => {
                tracing::info!("replacing the stale socket file {}", path.display());
                std::fs::remove_file(path).with_context(|| {
                    format!("cannot remove the stale socket file {}", path.display())
                })?;
            }
            Probe::Gone => {}
            Probe::Unknown(e) => bail!("cannot tell whether {} is in use: {e}", path.display()),
        },
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: {e}", path.display()),
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_cloexec(true)?;
    socket.bind(&SockAddr::unix(path)?)?;
    // Before `listen`, no client can connect: the mode is right by then.
    let file = PathBuf::from(path);
    let set_mode = || -> io::Result<(u64, u64)> {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))?;
        let meta = std::fs::symlink_metadata(&file)?;
        Ok((meta.dev(), meta.ino()))
    };
    let (dev, ino) = match set_mode() {
        Ok(id) => id,
        Err(e) => {
            let _ = std::fs::remove_file(&file);
            return Err(e.into());
        }
    };
    if let Err(e) = socket.listen(LISTEN_BACKLOG) {
        let _ = std::fs::remove_file(&file);
        return Err(e.into());
    }
    Ok((socket, (std::process::id(), dev, ino)))
}
