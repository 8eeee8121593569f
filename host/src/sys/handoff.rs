//! The kernel side of handing listening sockets from one host process to
//! its successor (`--upgrade-socket`): a Unix `SOCK_SEQPACKET` socket, on
//! which every message is one datagram of text carrying at most one
//! descriptor (`SCM_RIGHTS`), so messages keep their boundaries and a
//! descriptor always arrives with the message that names it; and the
//! peer's user id (`SO_PEERCRED`), so only the host's own user (or root)
//! is handed anything.

use std::io;
use std::mem;
use std::os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::time::Duration;

/// The longest message either side sends (a key is an address or a path).
pub(crate) const MAX_MESSAGE: usize = 4096;

/// A `sockaddr_un` for `path`; an error if the path does not fit.
fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a usable socket path (empty, longer than {} bytes, or holding a NUL)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A new close-on-exec `SOCK_SEQPACKET` Unix socket.
fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; it returns a new
    // descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening, non-blocking `SOCK_SEQPACKET` socket bound at `path`,
/// with the file's mode `0600` set before `listen`, so no one but the owner
/// can ever connect. The file must not exist (the caller replaces a stale
/// one).
pub(crate) fn listen(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = unix_addr(path)?;
    let socket = seqpacket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::unix::fs::PermissionsExt as _;
    let listened = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        // SAFETY: listen(2) on a socket this function owns.
        .and_then(|()| match unsafe { libc::listen(socket.as_raw_fd(), 4) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        });
    if let Err(e) = listened.and_then(|()| set_nonblocking(socket.as_fd(), true)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(socket)
}

/// Connects to the `SOCK_SEQPACKET` socket at `path`, waiting at most
/// `timeout` (a Unix connect waits while the listener's backlog is full;
/// the send timeout bounds that wait), which then also bounds every send
/// and receive on it.
pub(crate) fn connect(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    let (addr, len) = unix_addr(path)?;
    let socket = seqpacket()?;
    set_timeouts(socket.as_fd(), timeout)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if rc == 0 {
            return Ok(socket);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Accepts one connection (close-on-exec, blocking); `WouldBlock` if none
/// waits.
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: accept4(2) on an open socket, asking for no peer address.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `fd` non-blocking (or blocking again).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor change only its flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Bounds every later send and receive on `fd` by `timeout` (they fail
/// with `WouldBlock` once it passes).
pub(crate) fn set_timeouts(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval and the length says so.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The user id and pid of the process at the other end of `fd`, as the
/// kernel recorded them (not as the peer says): for an accepted
/// connection, the process that connected; for a connecting one, the
/// process that made the listening socket.
pub(crate) fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: ucred is plain data; all zeros is a valid value.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes, and `len` says how
    // much room `cred` has.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid as u32))
}

/// This process's effective user id.
pub(crate) fn own_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() }
}

/// The room a control message with one descriptor needs.
fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) as usize }
}

/// Sends `text` as one message, with `fd` attached if given.
pub(crate) fn send(
    socket: BorrowedFd<'_>,
    text: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: text.as_ptr() as *mut libc::c_void,
        iov_len: text.len(),
    };
    // u64s keep the control buffer aligned for a cmsghdr.
    let mut control = vec![0u64; cmsg_space().div_ceil(8)];
    // SAFETY: msghdr is plain data; all zeros is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space() as _;
        // SAFETY: `msg` points at a control buffer of `msg_controllen`
        // bytes, room for one cmsghdr with one descriptor, so the first
        // header exists and its data holds one RawFd.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `msg` describes `text` and the control buffer, both alive
        // for the call; MSG_NOSIGNAL keeps a closed peer from raising SIGPIPE.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message into `buf`: its length (0 when the peer closed)
/// and the descriptor it carried, if any (close-on-exec). A message longer
/// than `buf` is an error, never silently cut.
pub(crate) fn recv(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u64; cmsg_space().div_ceil(8)];
    // SAFETY: msghdr is plain data; all zeros is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space() as _;
    let n = loop {
        // SAFETY: `msg` describes `buf` and the control buffer, both alive
        // and writable for the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // Every descriptor that came is owned here at once, so none leaks
    // whatever the message held.
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg`'s control buffer; CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk only within `msg_controllen`, and an SCM_RIGHTS
    // header's data holds `(cmsg_len - CMSG_LEN(0)) / sizeof(int)`
    // descriptors this process now owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..data / mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(first.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message longer than expected, or with more than one descriptor",
        ));
    }
    let fd = fds.pop();
    Ok((n, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_in_one_message_are_refused_and_closed() {
        let (a, b) = socketpair();
        // Two copies of a pipe's write end: once both are closed, its read
        // end sees the end.
        let (mut reader, writer) = std::io::pipe().unwrap();
        let text = b"two";
        let mut iov = libc::iovec {
            iov_base: text.as_ptr() as *mut libc::c_void,
            iov_len: text.len(),
        };
        // SAFETY (test): CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(2 * mem::size_of::<RawFd>() as u32) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY (test): as in `send`, with room for two descriptors.
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(2 * mem::size_of::<RawFd>() as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            std::ptr::write_unaligned(data, writer.as_raw_fd());
            std::ptr::write_unaligned(data.add(1), writer.as_raw_fd());
            assert!(libc::sendmsg(a.as_raw_fd(), &msg, 0) > 0);
        }
        drop(writer);
        let mut buf = [0u8; 16];
        assert!(recv(b.as_fd(), &mut buf).is_err());
        set_nonblocking(reader.as_fd(), true).unwrap();
        use std::io::Read as _;
        assert_eq!(reader.read(&mut buf).unwrap(), 0, "both copies closed");
    }

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY (test): socketpair(2) writes two descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY (test): both were just made and are owned by no one else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_descriptor_travels_with_its_message() {
        let dir = std::env::temp_dir().join(format!("handoff-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let listener = listen(&path).unwrap();
        let client = connect(&path, Duration::from_secs(5)).unwrap();
        let server = accept(listener.as_fd()).unwrap();
        let (uid, pid) = peer_cred(server.as_fd()).unwrap();
        assert_eq!((uid, pid), (own_uid(), std::process::id()));

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        send(server.as_fd(), b"socket one", Some(tcp.as_fd())).unwrap();
        send(server.as_fd(), b"done", None).unwrap();
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, fd) = recv(client.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"socket one");
        let got = std::net::TcpListener::from(fd.expect("a descriptor"));
        assert_eq!(got.local_addr().unwrap().port(), port);
        let (n, fd) = recv(client.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"done");
        assert!(fd.is_none());
        drop(server);
        assert_eq!(recv(client.as_fd(), &mut buf).unwrap().0, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
