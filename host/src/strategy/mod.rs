//! The `Strategy` seam: where a connection runs (a worker thread, a child
//! process, a task), never what runs; that is always [`Service::serve`]. A new
//! strategy is one new file here.

mod forking;
mod pool;
mod slots;
mod tasks;
mod threading;

use std::time::Instant;

use crate::conn::service::{Accepted, Service};

pub use forking::Forking;
pub use tasks::Async;
pub use threading::Threading;

/// Runs accepted connections somewhere, within a bound.
pub trait Strategy {
    /// Whether another connection may be dispatched now. While this is false
    /// the accept loop leaves new connections in the kernel's backlog until
    /// its doorbell rings.
    fn has_capacity(&self) -> bool;

    /// Starts serving `conn` and returns without waiting for it.
    fn dispatch(&mut self, conn: Accepted);

    /// What every connection runs (the accept loop asks it to admit peers).
    fn service(&self) -> &Service;

    /// Called on every wake-up of the accept loop: catch up on finished work
    /// (reap children, count freed slots) and enforce deadlines.
    fn maintain(&mut self);

    /// Connections dispatched and not yet finished.
    fn in_flight(&self) -> usize;

    /// When `maintain` must run next even if nothing rings the doorbell.
    fn next_wakeup(&self) -> Option<Instant> {
        None
    }

    /// The accept loop has stopped: from now on every finished connection
    /// must ring the doorbell, so the drain sees it.
    fn stop_accepting(&mut self);

    /// Ends every connection in flight now (the drain ran out, or a second
    /// signal came).
    fn abort(&mut self);

    /// Waits until every connection has ended and every worker is gone.
    fn finish(&mut self);
}

/// Returns the allocator's free memory (every thread's arena) to the
/// system: after a burst of connections, or once the threads that served it
/// have exited.
pub(crate) fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What one `waitpid(-1)` found.
pub(crate) enum Reaped {
    /// A child exited: its pid and wait status.
    Child(libc::pid_t, libc::c_int),
    /// None has exited yet (only without `block`).
    Nothing,
    /// There are no children left at all (ECHILD).
    NoChildren,
}

/// Reaps one exited child of this process; with `block`, waits for one.
/// EINTR is retried.
pub(crate) fn reap_one(block: bool) -> Reaped {
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
        match pid {
            0 => return Reaped::Nothing,
            pid if pid > 0 => return Reaped::Child(pid, status),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Reaped::NoChildren,
        }
    }
}

/// First thing in a forked child (forking's per-connection child, prefork's
/// worker): restore default signal dispositions, since the parent's handlers
/// write to descriptors that are closed here and whose numbers may be reused;
/// ignore SIGINT and SIGTERM, since a terminal's Ctrl-C and a service
/// manager's stop reach the whole process group and the parent decides
/// (it drains, then kills); ignore SIGHUP, which asks the host process to
/// reload, and a closing terminal sends to the whole group; and close the
/// parent's descriptors.
pub(crate) fn leave_parent(close: &[std::os::fd::RawFd]) {
    // SAFETY: async-signal-safe calls only, on a fresh single-threaded child.
    unsafe {
        for signal in [libc::SIGCHLD, libc::SIGQUIT] {
            libc::signal(signal, libc::SIG_DFL);
        }
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(signal, libc::SIG_IGN);
        }
        // The parent's orders to its workers stay pending until a worker
        // installs its own handlers (`stop_on_signal_directly` unblocks
        // them); a forked connection never takes them.
        let mut orders: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut orders);
        libc::sigaddset(&mut orders, crate::server::DRAIN_SIGNAL);
        libc::sigaddset(&mut orders, crate::server::END_NOW_SIGNAL);
        libc::sigprocmask(libc::SIG_BLOCK, &orders, std::ptr::null_mut());
        for &fd in close {
            libc::close(fd);
        }
    }
}
