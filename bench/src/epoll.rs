//! A minimal level-triggered epoll wrapper for the load generator's event
//! loops (held and interactive connections): register a socket under a
//! token, wait for ready tokens until a deadline.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// A minimal epoll wrapper (level-triggered).
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor we own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: usize) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events,
            u64: token as u64,
        };
        // SAFETY: valid epoll fd, socket fd and event pointer.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ready tokens, waiting at most until `deadline`.
    pub fn wait(&self, events: &mut [libc::epoll_event], deadline: Instant) -> Vec<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so that a wait shorter than 1 ms does not spin.
        let ms = left.as_micros().div_ceil(1000).min(1000) as libc::c_int;
        // SAFETY: valid epoll fd and a buffer of events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                ms,
            )
        };
        if n <= 0 {
            return Vec::new();
        }
        events[..n as usize]
            .iter()
            .map(|e| e.u64 as usize)
            .collect()
    }
}
