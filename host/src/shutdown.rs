//! The doorbell: how anything (another thread, a signal handler, a test)
//! wakes a process's loop, and how it asks that loop to stop or reload.
//!
//! A [`Shutdown`] is a non-blocking pipe plus a few flags. The accept loop
//! (`server::run`) and the host process's loop wait in poll(2) on its read
//! end; a [`Wake`] (a freed slot, an exited child) or a signal writes a byte.
//!
//! Invariant: signal handlers installed here touch only atomics and write(2)
//! and allocate nothing.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::sys::{pipe, poll, signals};

pub(crate) use crate::sys::signals::{DRAIN_SIGNAL, END_NOW_SIGNAL};

/// Stops a loop from anywhere: another thread, a signal handler (via
/// [`Shutdown::stop_on_signals`]) or a test. Clones share one doorbell.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Doorbell>,
}

struct Doorbell {
    requested: AtomicBool,
    /// Shutdown signals received; a second one means "now".
    signals: AtomicUsize,
    /// A reload was asked for (SIGHUP) and not yet taken.
    reload: AtomicBool,
    read: OwnedFd,
    write: OwnedFd,
}

impl Doorbell {
    fn ring(&self) {
        pipe::ring(self.write.as_raw_fd());
    }
}

/// Rings the loop's doorbell without asking it to stop.
#[derive(Clone)]
pub(crate) struct Wake {
    inner: Arc<Doorbell>,
}

impl Wake {
    pub(crate) fn wake(&self) {
        self.inner.ring();
    }
}

impl Shutdown {
    pub fn new() -> Result<Shutdown> {
        let (read, write) = pipe::pipe(true).context("cannot create the doorbell pipe")?;
        Ok(Shutdown {
            inner: Arc::new(Doorbell {
                requested: AtomicBool::new(false),
                signals: AtomicUsize::new(0),
                reload: AtomicBool::new(false),
                read,
                write,
            }),
        })
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// A handle that wakes the loop without stopping it.
    pub(crate) fn waker(&self) -> Wake {
        Wake {
            inner: self.inner.clone(),
        }
    }

    /// Makes `signal` ring the doorbell (from the signal handler, which only
    /// writes one byte). Starts no thread.
    /// Unregister the returned id (`signal_hook::low_level::unregister`)
    /// before this doorbell can be dropped.
    pub(crate) fn ring_on_signal(&self, signal: libc::c_int) -> Result<signal_hook::SigId> {
        signal_hook::low_level::pipe::register_raw(signal, self.inner.write.as_raw_fd())
            .with_context(|| format!("cannot handle signal {signal}"))
    }

    /// Makes SIGINT and SIGTERM stop the loop: the first drains, a second
    /// one ends what is left at once.
    pub fn stop_on_signals(&self) -> Result<()> {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            let doorbell = self.inner.clone();
            let action = move || {
                doorbell.signals.fetch_add(1, Ordering::SeqCst);
                doorbell.requested.store(true, Ordering::SeqCst);
                doorbell.ring();
            };
            // SAFETY: the action only touches atomics and write(2), which
            // are async-signal-safe, and allocates nothing.
            unsafe { signal_hook::low_level::register(signal, action) }
                .with_context(|| format!("cannot handle signal {signal}"))?;
        }
        Ok(())
    }

    /// Makes `signal` (SIGHUP) ask for a reload: [`Shutdown::take_reload`]
    /// says so once.
    pub(crate) fn reload_on_signal(&self, signal: libc::c_int) -> Result<signal_hook::SigId> {
        let doorbell = self.inner.clone();
        let action = move || {
            doorbell.reload.store(true, Ordering::SeqCst);
            doorbell.ring();
        };
        // SAFETY: the action only touches an atomic and write(2).
        unsafe { signal_hook::low_level::register(signal, action) }
            .with_context(|| format!("cannot handle signal {signal}"))
    }

    /// Whether a reload was asked for since the last call.
    pub(crate) fn take_reload(&self) -> bool {
        self.inner.reload.swap(false, Ordering::SeqCst)
    }

    /// Makes `signal` stop the loop with a handler of our own, replacing any
    /// earlier one (a forked worker must not run its parent's handlers,
    /// which write to the parent's descriptors). [`END_NOW_SIGNAL`] counts as
    /// a second signal at once. One such doorbell per process: the first
    /// one made direct stays the process's.
    pub(crate) fn stop_on_signal_directly(&self, signal: libc::c_int) -> Result<()> {
        self.make_direct()?;
        signals::install(signal, on_direct_signal)
            .with_context(|| format!("cannot handle signal {signal}"))?;
        // A forked worker blocks its parent's orders until it can take them
        // (`sys::process::fork`): one sent meanwhile arrives now.
        signals::unblock(&[signal]);
        Ok(())
    }

    /// Makes `signal` ring this process's direct doorbell (the one
    /// [`Shutdown::stop_on_signal_directly`] installed) without stopping
    /// anything: a forked worker's SIGCHLD. signal_hook cannot be used
    /// there: its registrations were inherited from the host process, whose
    /// handler the worker has reset.
    pub(crate) fn ring_on_signal_directly(&self, signal: libc::c_int) -> Result<()> {
        self.make_direct()?;
        signals::install(signal, on_ring_signal)
            .with_context(|| format!("cannot handle signal {signal}"))
    }

    fn make_direct(&self) -> Result<()> {
        let direct = DIRECT_DOORBELL.get_or_init(|| self.inner.clone());
        if !Arc::ptr_eq(direct, &self.inner) {
            anyhow::bail!("this process already has a doorbell for its signals");
        }
        Ok(())
    }

    /// Waits until the doorbell rings or `until` passes, then empties it.
    pub(crate) fn wait_until(&self, until: Option<Instant>) -> Result<()> {
        let rang = poll::readable(&[Some(self.read_end())], until).context("poll failed")?;
        if rang[0] {
            self.drain();
        }
        Ok(())
    }

    /// As [`Shutdown::wait_until`], also waking when one of `fds` is
    /// readable; says which of them were.
    pub(crate) fn wait_for(
        &self,
        until: Option<Instant>,
        fds: &[Option<RawFd>],
    ) -> Result<Vec<bool>> {
        let mut all = vec![Some(self.read_end())];
        all.extend_from_slice(fds);
        let rang = poll::readable(&all, until).context("poll failed")?;
        if rang[0] {
            self.drain();
        }
        Ok(rang[1..].to_vec())
    }

    /// A second shutdown signal arrived: do not wait for anything.
    pub fn is_forced(&self) -> bool {
        self.inner.signals.load(Ordering::SeqCst) >= 2
    }

    /// The descriptor that becomes readable when the doorbell rings.
    pub(crate) fn read_end(&self) -> RawFd {
        self.inner.read.as_raw_fd()
    }

    /// Empties the doorbell after it rang.
    pub(crate) fn drain(&self) {
        pipe::drain(self.read_end());
    }
}

/// The doorbell directly installed signal handlers ring (in a worker
/// process). Set once, never dropped.
static DIRECT_DOORBELL: OnceLock<Arc<Doorbell>> = OnceLock::new();

extern "C" fn on_ring_signal(_signal: libc::c_int) {
    if let Some(doorbell) = DIRECT_DOORBELL.get() {
        doorbell.ring();
    }
}

extern "C" fn on_direct_signal(signal: libc::c_int) {
    if let Some(doorbell) = DIRECT_DOORBELL.get() {
        let weight = if signal == END_NOW_SIGNAL { 2 } else { 1 };
        doorbell.signals.fetch_add(weight, Ordering::SeqCst);
        doorbell.requested.store(true, Ordering::SeqCst);
        doorbell.ring();
    }
}
