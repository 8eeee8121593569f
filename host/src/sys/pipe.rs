//! Pipes (the doorbell's and the metrics process's) and raw writes.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A new pipe, close-on-exec, `(read, write)`; both ends non-blocking if
/// asked.
pub(crate) fn pipe(nonblocking: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes one byte to `fd`, ignoring a full pipe (it already guarantees a
/// wake-up). Async-signal-safe: signal handlers ring doorbells with it.
pub(crate) fn ring(fd: RawFd) {
    // SAFETY: writing one byte from a valid buffer; a closed or bad
    // descriptor only makes write(2) fail.
    unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
}

/// Reads everything the non-blocking `fd` holds now, discarding it.
pub(crate) fn drain(fd: RawFd) {
    let mut buf = [0u8; 256];
    // SAFETY: reading into a valid buffer of the given length.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// One write(2) of `buf` to `fd`, retried on EINTR, without any lock (the
/// log's way to standard error: the kernel keeps a write to a pipe of up
/// to 4 KiB whole).
pub(crate) fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: writing from a valid buffer of the given length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
