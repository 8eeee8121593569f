//! epoll(7): how the accept loop waits on its listeners and its doorbell.
//! Registrations stay in place between waits (poll(2) made and unmade
//! them at every call).
//!
//! Nothing is added with `EPOLLEXCLUSIVE`. A listener is shared by
//! prefork's processes and, across a reload or an upgrade, by the old and
//! the new worker; an exclusive wake-up goes to one of them, and if that
//! one is stopping (or fills up before it has taken every connection
//! waiting) the rest stay in the backlog and the others never hear of
//! them: a client waits until the next connection wakes someone.

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

    /// Watches `fd` for input (level-triggered), reported as `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A connection on a listener that two accept loops watch wakes both:
    /// if only one woke and it was stopping, the other would never take the
    /// connection (the failure an `EPOLLEXCLUSIVE` registration caused).
    #[test]
    fn a_connection_wakes_every_loop_waiting_on_its_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = listener.as_raw_fd();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let epoll = Epoll::new().unwrap();
                epoll.add(fd, 7).unwrap();
                std::thread::spawn(move || {
                    let mut ready = Vec::new();
                    let until = Instant::now() + Duration::from_secs(10);
                    while ready.is_empty() && Instant::now() < until {
                        epoll.wait(&mut ready, Some(until)).unwrap();
                    }
                    ready
                })
            })
            .collect();
        // Both are (very likely) blocked in epoll_wait by now; if one is
        // not, it finds the listener ready when it gets there.
        std::thread::sleep(Duration::from_millis(200));
        let _client = TcpStream::connect(addr).unwrap();
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap(), vec![7]);
        }
    }
}
