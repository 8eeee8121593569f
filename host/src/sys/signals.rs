//! Signals: the host's orders to its workers, installing handlers that only
//! touch atomics and write(2), masks, and the one-shot `--timeout` alarm.

use std::io;
use std::time::Duration;

/// Sent by the host process to a worker: stop accepting and drain.
pub(crate) const DRAIN_SIGNAL: libc::c_int = libc::SIGUSR1;
/// Sent by the host process to a worker: end its connections now. A
/// signal of its own, so it cannot merge with a drain signal still pending.
pub(crate) const END_NOW_SIGNAL: libc::c_int = libc::SIGUSR2;

/// Installs `handler` for `signal` with sigaction(2), replacing whatever
/// was installed (a forked process must not run its parent's handlers).
/// The handler must be async-signal-safe: atomics and write(2) only.
pub(crate) fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: installs a handler the caller vouches is async-signal-safe.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    if installed != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Changes the calling thread's mask by `how` for `signals`; returns the
/// mask it had before.
fn mask(how: libc::c_int, signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: builds signal sets on the stack and changes the calling
    // thread's mask, saving the old one.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(how, &set, &mut old);
        old
    }
}

/// A thread's signal mask, to put back with [`Mask::restore`].
pub(crate) struct Mask(libc::sigset_t);

impl Mask {
    /// Blocks `signals` for the calling thread, and returns the mask it
    /// had before.
    pub(crate) fn block(signals: &[libc::c_int]) -> Mask {
        Mask(mask(libc::SIG_BLOCK, signals))
    }

    /// Puts the saved mask back (a signal that arrived meanwhile is
    /// delivered now).
    pub(crate) fn restore(self) {
        // SAFETY: sets the calling thread's mask from a valid saved set.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Delivers `signals` to the calling thread again (one pending arrives now).
pub(crate) fn unblock(signals: &[libc::c_int]) {
    let _ = mask(libc::SIG_UNBLOCK, signals);
}

/// Waits until `signal`, which every thread of the process must keep
/// blocked, is sent to the process (sigwait(3)): the calling thread takes
/// it, and no handler runs.
pub(crate) fn wait_for(signal: libc::c_int) {
    // SAFETY: builds a signal set on the stack and waits on it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        let mut got = 0;
        while libc::sigwait(&set, &mut got) != 0 {}
    }
}

/// Calls `handler` (async-signal-safe) once, `after` from now, on SIGALRM.
pub(crate) fn alarm_after(after: Duration, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    install(libc::SIGALRM, handler)?;
    let timer = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: after.as_secs() as libc::time_t,
            tv_usec: after.subsec_micros() as libc::suseconds_t,
        },
    };
    // SAFETY: a one-shot real-time timer for this process, from a valid
    // struct.
    if unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
