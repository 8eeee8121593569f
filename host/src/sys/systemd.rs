//! What systemd hands a service through its environment: the listening
//! sockets of socket activation (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`, as `sd_listen_fds_with_names` reads them), the
//! readiness socket's address (`NOTIFY_SOCKET`), and `CLOCK_MONOTONIC` for
//! its `MONOTONIC_USEC=`.
//!
//! Each variable is taken once and removed from the environment, so no
//! process the host starts sees it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The name systemd gives a passed socket that has none
/// (`LISTEN_FDNAMES` unset or short).
const UNNAMED: &str = "unknown";

/// Takes the value of `name` and removes it from the environment. Called
/// by the host process before it starts any thread or child.
pub(crate) fn take_var(name: &str) -> Option<String> {
    let value = std::env::var(name).ok();
    std::env::remove_var(name);
    value
}

/// The sockets systemd passed this process, with their names, in order
/// (descriptor 3 first), each marked close-on-exec. Empty when
/// `LISTEN_PID` is not this process (the variables were meant for another,
/// e.g. a parent that exec'd us without them) or `LISTEN_FDS` is unset.
/// An unreadable `LISTEN_FDS` is an error naming it.
pub(crate) fn take_listen_fds() -> Result<Vec<(OwnedFd, String)>, String> {
    let pid = take_var("LISTEN_PID");
    let count = take_var("LISTEN_FDS");
    let names = take_var("LISTEN_FDNAMES");
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| format!("invalid LISTEN_FDS {count:?}: expected a number of sockets"))?;
    let names: Vec<&str> = names
        .as_deref()
        .map_or(Vec::new(), |n| n.split(':').collect());
    let mut passed = Vec::new();
    for i in 0..count {
        let fd = LISTEN_FDS_START + i;
        // SAFETY: F_GETFD only reads the flags of `fd`; it fails with EBADF
        // if `fd` is not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(format!(
                "LISTEN_FDS is {count}, but descriptor {fd} is not open"
            ));
        }
        // SAFETY: as above; setting FD_CLOEXEC changes nothing but whether
        // an exec keeps the descriptor (sd_listen_fds does the same).
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: systemd passed `fd` to this process for it to own; it is
        // open (checked above) and taken here once, before anything else in
        // the process knows of it, so nothing else closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names.get(i as usize).copied().unwrap_or(UNNAMED);
        passed.push((owned, name.to_string()));
    }
    Ok(passed)
}

/// An `int` socket option of `fd`.
fn int_option(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of an int and a
    // socklen_t, and `len` says how much room `value` has; `fd` is open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Whether `fd` is a stream socket in the listening state (`SO_TYPE` is
/// `SOCK_STREAM` and `SO_ACCEPTCONN` is set). Not a socket at all is an
/// error (`ENOTSOCK`).
pub(crate) fn is_listening_stream(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let kind = int_option(fd, libc::SO_TYPE)?;
    let listening = int_option(fd, libc::SO_ACCEPTCONN)?;
    Ok(kind == libc::SOCK_STREAM && listening != 0)
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `MONOTONIC_USEC=` wants.
pub(crate) fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}
