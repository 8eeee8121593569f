//! A connection's socket: sends and receives that never block
//! (`MSG_DONTWAIT`), and poll(2) on one descriptor.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// What a wait on a socket waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interest {
    Read,
    Write,
}

impl Interest {
    fn poll_events(self) -> libc::c_short {
        match self {
            Interest::Read => libc::POLLIN,
            Interest::Write => libc::POLLOUT,
        }
    }
}

/// poll(2) on one descriptor: true once it is ready for `interest` (or has
/// an error or hang-up pending, which its next operation reports), false
/// when `timeout` passes first; `None` waits forever. An interrupted wait
/// goes on to the same deadline.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    interest: Interest,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let millis = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up so a wait never returns before its deadline.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: interest.poll_events(),
            revents: 0,
        };
        // SAFETY: one valid pollfd, for a descriptor `fd` keeps open.
        let n = unsafe { libc::poll(&mut pfd, 1, millis) };
        if n > 0 {
            return Ok(true);
        }
        if n == 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sets `TCP_DEFER_ACCEPT` on a TCP listener: with `seconds` > 0 a
/// connection reaches the accept queue only once its first data has
/// arrived (or, for a client that sends nothing, after about that many
/// seconds); 0 turns it off.
pub(crate) fn set_defer_accept(fd: BorrowedFd<'_>, seconds: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid c_int option value and its size; `fd` is open for the
    // duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `send(2)` that never blocks and never raises SIGPIPE: how many bytes
/// the socket took, or its error (`WouldBlock` when it is full).
pub(crate) fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid buffer of `data.len()` bytes and `fd` is an
    // open descriptor for the duration of the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `recv(2)` with `MSG_PEEK` that never blocks: copies what the socket
/// holds, up to `buf.len()` bytes, into `buf` and leaves it there for the
/// next read. How many came (0 at end of input), or the error
/// (`WouldBlock` when nothing is there).
pub(crate) fn peek_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes and
    // `fd` is open for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `recv(2)` of at most `buf.len()` bytes into `buf` (uninitialised
/// memory, such as a buffer on the stack) that never blocks: the bytes that
/// came (none at end of input), or the error (`WouldBlock` when nothing is
/// there).
pub(crate) fn recv_uninit_nonblocking<'a>(
    fd: BorrowedFd<'_>,
    buf: &'a mut [MaybeUninit<u8>],
) -> io::Result<&'a [u8]> {
    // SAFETY: `buf` is valid to write for `buf.len()` bytes, which `recv`
    // only writes; `fd` is open for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `recv` initialised the first `n` (<= `buf.len()`) bytes.
    Ok(unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) })
}

/// One `recv(2)` of at most `size` bytes that never blocks, appended to
/// `buf`: how many came (0 at end of input), or the error (`WouldBlock` when
/// nothing is there).
pub(crate) fn recv_nonblocking(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    size: usize,
) -> io::Result<usize> {
    buf.reserve(size);
    let len = buf.len();
    let n = recv_uninit_nonblocking(fd, &mut buf.spare_capacity_mut()[..size])?.len();
    // SAFETY: `recv` initialised the `n` bytes after the first `len`.
    unsafe { buf.set_len(len + n) };
    Ok(n)
}
