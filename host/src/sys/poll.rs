//! poll(2): how the doorbell and the host process wait (the accept loop
//! waits in `sys::epoll`, with the same timeout rounding).

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

/// Waits until one of `fds` (`None`: skipped) is readable or `until`
/// passes, and says which were readable. EINTR counts as a wake-up with
/// nothing ready.
pub(crate) fn readable(fds: &[Option<RawFd>], until: Option<Instant>) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout = timeout_millis(until);
    // SAFETY: a valid array of pollfds of the given length.
    let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pollfds.iter().map(|p| p.revents != 0).collect())
}

/// The milliseconds left until `until` (rounded up, so a wait never ends
/// early), as poll(2) and epoll_wait(2) take them; -1 (no limit) for `None`.
pub(crate) fn timeout_millis(until: Option<Instant>) -> i32 {
    until.map_or(-1, |t| {
        let left = t.saturating_duration_since(Instant::now());
        left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    })
}
