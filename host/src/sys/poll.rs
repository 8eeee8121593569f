//! poll(2): the accept loop's (and the host process's) one way to wait.

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
    let timeout = until.map_or(-1, |t| {
        let left = t.saturating_duration_since(Instant::now());
        left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
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
