//! Processes: the one way the host forks a child, reaping, signalling and
//! ending processes.
//!
//! Invariant: every child the host forks (a prefork or per-tenant worker,
//! forking's per-connection child, the metrics process) is made by [`fork`],
//! which refuses to fork a process running more than one thread, and in the
//! child closes every descriptor it is not given (stdin, stdout and stderr
//! stay). A descriptor added to the host process so never leaks into a
//! child unnoticed: the child must be handed it.

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use super::signals;

/// A process id.
pub(crate) type Pid = libc::pid_t;

/// What a child inherits and how it ends with its parent.
pub(crate) struct Child<'a> {
    /// The descriptors the child keeps (besides 0, 1 and 2). Everything
    /// else is closed in the child before [`fork`] returns there.
    pub keep: &'a [RawFd],
    /// Sent to the child by the kernel when its parent dies.
    pub on_parent_death: libc::c_int,
}

/// Which side of [`fork`] this is.
pub(crate) enum Forked {
    /// The new process. It has left its parent: default signal handling
    /// (the parent's handlers write to descriptors that are closed here),
    /// SIGINT, SIGTERM and SIGHUP ignored (a terminal's Ctrl-C and a
    /// service manager's stop reach the whole process group, and the parent
    /// decides), the worker orders ([`signals::DRAIN_SIGNAL`],
    /// [`signals::END_NOW_SIGNAL`]) blocked until it takes them, and only
    /// the descriptors it was given open. Its parent was still alive after
    /// the death signal was set, so it can never be missed.
    Child,
    /// The parent, with the child's pid.
    Parent(Pid),
}

/// Forks a child as [`Child`] says. Fails without forking if this process
/// runs more than one thread: threads do not survive `fork()`, and a lock
/// one of them held would stay locked in the child forever.
pub(crate) fn fork(child: &Child) -> io::Result<Forked> {
    match thread_count() {
        Some(1) => {}
        Some(n) => {
            return Err(io::Error::other(format!(
                "refusing to fork a process that runs {n} threads"
            )))
        }
        None => return Err(io::Error::other(
            "refusing to fork: cannot tell how many threads run (/proc/self/stat is unreadable)",
        )),
    }
    let parent = std::process::id();
    // The child must not take its parent's orders before it can: they are
    // blocked from before the fork, so one sent to the new pid at once
    // stays pending instead of killing it (their default action).
    let mask = signals::Mask::block(&[signals::DRAIN_SIGNAL, signals::END_NOW_SIGNAL]);
    // SAFETY: this process runs one thread (checked above), so the child
    // starts with consistent memory.
    match unsafe { libc::fork() } {
        -1 => {
            let err = io::Error::last_os_error();
            mask.restore();
            Err(err)
        }
        0 => {
            // The orders stay blocked (the inherited mask).
            leave_parent(child.keep);
            // SAFETY: prctl and getppid on this process.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, child.on_parent_death);
                if libc::getppid() as u32 != parent {
                    // The parent died before the line above: nothing to do.
                    libc::_exit(0);
                }
            }
            Ok(Forked::Child)
        }
        pid => {
            mask.restore();
            Ok(Forked::Parent(pid))
        }
    }
}

/// The child's first steps (see [`Forked::Child`]).
fn leave_parent(keep: &[RawFd]) {
    // SAFETY: plain calls on a fresh single-threaded child.
    unsafe {
        for signal in [libc::SIGCHLD, libc::SIGQUIT] {
            libc::signal(signal, libc::SIG_DFL);
        }
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
    close_all_but(keep);
}

/// Closes every descriptor from 3 up except those in `keep`.
fn close_all_but(keep: &[RawFd]) {
    for (first, last) in ranges_to_close(keep) {
        close_range(first, last);
    }
}

/// The ranges of descriptors, from 3 up, that are not in `keep`.
fn ranges_to_close(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::with_capacity(keep.len() + 1);
    let mut first = 3;
    for fd in keep {
        if fd > first {
            ranges.push((first, fd - 1));
        }
        first = fd + 1;
    }
    ranges.push((first, u32::MAX));
    ranges
}

/// Closes the descriptors `first..=last` that are open.
fn close_range(first: u32, last: u32) {
    // SAFETY: close_range(2) closes descriptors only; none of those in the
    // range is used by anything in this (single-threaded) child.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if closed == 0 {
        return;
    }
    // Before Linux 5.9: close the open ones one by one.
    let open = open_descriptors().unwrap_or_default();
    for fd in open
        .into_iter()
        .filter(|&fd| (first..=last).contains(&(fd as u32)))
    {
        // SAFETY: as above; closing a descriptor that is open.
        unsafe { libc::close(fd) };
    }
}

/// The number of threads this process runs, if /proc says. A forking
/// worker asks before every fork, so `/proc/self/stat` is opened once per
/// process and read again from its start at each call (the kernel writes
/// its text afresh for every read).
pub(crate) fn thread_count() -> Option<usize> {
    use std::os::unix::fs::FileExt as _;
    static STAT: Mutex<Option<(u32, File)>> = Mutex::new(None);
    let me = std::process::id();
    let mut stat = STAT.lock().unwrap_or_else(|e| e.into_inner());
    if stat.as_ref().is_none_or(|(opener, _)| *opener != me) {
        // A parent's, inherited across `fork`: its descriptor was closed
        // with the parent's others (`close_all_but`) and its number may
        // be another's now, so it is forgotten, not closed.
        if let Some((_, inherited)) = stat.take() {
            std::mem::forget(inherited);
        }
        *stat = Some((me, File::open("/proc/self/stat").ok()?));
    }
    let (_, file) = stat.as_ref()?;
    let mut text = [0u8; 4096];
    let len = file.read_at(&mut text, 0).ok()?;
    let stat = std::str::from_utf8(&text[..len]).ok()?;
    // The fields after the command (which may hold spaces), in parentheses;
    // the number of threads is field 20, the 18th after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(17)?.parse().ok()
}

/// Whether getrandom(2) works here (it is not missing, nor blocked by a
/// seccomp filter), asked for no bytes, which never blocks.
pub(crate) fn getrandom_works() -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: getrandom(2) of zero bytes writes nothing.
    unsafe { libc::syscall(libc::SYS_getrandom, byte.as_mut_ptr(), 0usize, 0u32) == 0 }
}

/// The descriptors this process has open, from /proc (leaving out the one
/// that reads /proc).
pub(crate) fn open_descriptors() -> io::Result<Vec<RawFd>> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory's own descriptor was open while it was read, and is
    // closed now: what is still open is what counts.
    let mut fds: Vec<RawFd> = listed.into_iter().filter(|&fd| is_open(fd)).collect();
    fds.sort_unstable();
    Ok(fds)
}

/// Whether `fd` is an open descriptor of this process.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; a closed one fails
    // with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Runs `f` and returns, with its result, the descriptors it left open:
/// the ones a child that uses what `f` made must keep (a compiled
/// handler's image file, say). Only meaningful while this process runs
/// one thread, so that nothing else opens a descriptor meanwhile.
pub(crate) fn descriptors_opened_by<T>(f: impl FnOnce() -> T) -> io::Result<(T, Vec<RawFd>)> {
    let unlisted = |e: io::Error| {
        io::Error::other(format!(
            "cannot list this process's descriptors (/proc/self/fd): {e}"
        ))
    };
    let before = open_descriptors().map_err(unlisted)?;
    let value = f();
    let after = open_descriptors().map_err(unlisted)?;
    let new = after
        .into_iter()
        .filter(|fd| before.binary_search(fd).is_err())
        .collect();
    Ok((value, new))
}

/// Ends this process at once, without running destructors or exit
/// handlers: a forked child's exit, which must not flush or free what its
/// parent owns.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Sends `signal` to `pid`, one of this process's own children that was
/// not reaped yet (so the pid cannot have been reused).
pub(crate) fn signal_child(pid: Pid, signal: libc::c_int) {
    // SAFETY: kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(pid, signal) };
}

/// Makes this process the reaper of its descendants' orphans.
pub(crate) fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    fn of(status: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// What one `waitpid(-1)` found.
pub(crate) enum Reaped {
    /// A child exited: its pid and how.
    Child(Pid, Exit),
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
            pid if pid > 0 => return Reaped::Child(pid, Exit::of(status)),
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return Reaped::NoChildren,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_process_threads() {
        // Seen from a thread of its own: the main thread and this one.
        let spawned = std::thread::spawn(thread_count);
        assert!(spawned.join().unwrap().expect("/proc/self/stat") >= 2);
    }

    #[test]
    fn closes_everything_but_what_is_kept() {
        assert_eq!(ranges_to_close(&[]), [(3, u32::MAX)]);
        assert_eq!(
            ranges_to_close(&[9, 0, 4, 3, 9, 2]),
            [(5, 8), (10, u32::MAX)]
        );
        assert_eq!(ranges_to_close(&[5, 6]), [(3, 4), (7, u32::MAX)]);
    }
}
