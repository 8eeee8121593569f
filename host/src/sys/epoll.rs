//! epoll(7): how the accept loop waits on its listeners. A listener is
//! added with `EPOLLEXCLUSIVE`, so a new connection on a listener that
//! prefork's processes share wakes one of them, not all.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// An epoll instance, close-on-exec.
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointer; a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned here only.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for input (level-triggered), reported as `token`;
    /// `exclusive`: among the epoll instances watching `fd` so, an event
    /// wakes one (or a few) of those waiting, not all.
    pub(crate) fn add(&self, fd: RawFd, token: u64, exclusive: bool) -> io::Result<()> {
        let mut flags = libc::EPOLLIN as u32;
        if exclusive {
            flags |= libc::EPOLLEXCLUSIVE as u32;
        }
        let mut event = libc::epoll_event {
            events: flags,
            u64: token,
        };
        // SAFETY: a valid event for the duration of the call.
        let rc =
            unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (ignoring a descriptor that is not watched).
    pub(crate) fn remove(&self, fd: RawFd) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: a valid event (ignored by EPOLL_CTL_DEL on current
        // kernels, required non-null by old ones).
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut event) };
    }

    /// Waits until input on the watched descriptors, or `until` passes
    /// (`None`: no limit), and puts the tokens of those ready in `ready`
    /// (emptied first). EINTR counts as a wake-up with nothing ready.
    pub(crate) fn wait(&self, ready: &mut Vec<u64>, until: Option<Instant>) -> io::Result<()> {
        ready.clear();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let millis = super::poll::timeout_millis(until);
        // SAFETY: `events` has room for the number of events passed.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                millis,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(err);
        }
        ready.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}
