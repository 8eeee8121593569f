//! The accept loop, and the `Shutdown` doorbell that stops it.
//!
//! One loop for every strategy: it waits in poll(2) on the listener and on a
//! doorbell pipe. The doorbell rings when a worker frees a slot, when a child
//! exits (SIGCHLD) or when shutdown is asked for. The loop only accepts while
//! the strategy has capacity, so a flood waits in the kernel's backlog rather
//! than in the host's memory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::conn::service::Accepted;
use crate::listener::Listener;
use crate::strategy::Strategy;

/// Stops an accept loop from anywhere: another thread, a signal handler (via
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

/// Rings the accept loop's doorbell without asking it to stop.
#[derive(Clone)]
pub struct Wake {
    inner: Arc<Doorbell>,
}

impl Wake {
    pub fn wake(&self) {
        ring(self.inner.write.as_raw_fd());
    }
}

fn ring(fd: RawFd) {
    // A full pipe already guarantees a wake-up, so EAGAIN is fine to ignore.
    // SAFETY: writing one byte from a valid buffer to an open descriptor.
    unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
}

impl Shutdown {
    pub fn new() -> Result<Shutdown> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("cannot create the doorbell pipe");
        }
        // SAFETY: both descriptors were just created and are owned here only.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
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

    /// Asks the loop to stop accepting and return.
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        ring(self.inner.write.as_raw_fd());
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// A handle that wakes the loop without stopping it.
    pub fn waker(&self) -> Wake {
        Wake {
            inner: self.inner.clone(),
        }
    }

    /// Makes `signal` ring the doorbell (from the signal handler, which only
    /// writes one byte). Starts no thread.
    /// Unregister the returned id (`signal_hook::low_level::unregister`)
    /// before this doorbell can be dropped.
    pub fn ring_on_signal(&self, signal: libc::c_int) -> Result<signal_hook::SigId> {
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
                ring(doorbell.write.as_raw_fd());
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
    pub fn reload_on_signal(&self, signal: libc::c_int) -> Result<signal_hook::SigId> {
        let doorbell = self.inner.clone();
        let action = move || {
            doorbell.reload.store(true, Ordering::SeqCst);
            ring(doorbell.write.as_raw_fd());
        };
        // SAFETY: the action only touches an atomic and write(2).
        unsafe { signal_hook::low_level::register(signal, action) }
            .with_context(|| format!("cannot handle signal {signal}"))
    }

    /// Whether a reload was asked for since the last call.
    pub fn take_reload(&self) -> bool {
        self.inner.reload.swap(false, Ordering::SeqCst)
    }

    /// Makes `signal` stop the loop with a handler of our own, replacing any
    /// earlier one (a forked worker must not run its parent's handlers,
    /// which write to the parent's descriptors). [`END_NOW_SIGNAL`] counts as
    /// a second signal at once. One doorbell per process.
    pub fn stop_on_signal_directly(&self, signal: libc::c_int) -> Result<()> {
        if !std::ptr::eq(
            DIRECT_DOORBELL.load(Ordering::SeqCst),
            Arc::as_ptr(&self.inner),
        ) {
            let doorbell = Arc::into_raw(self.inner.clone()).cast_mut();
            DIRECT_DOORBELL.store(doorbell, Ordering::SeqCst);
        }
        install_direct(signal, on_direct_signal)?;
        // A forked worker blocks its parent's orders until it can take them
        // (`strategy::leave_parent`): one sent meanwhile arrives now.
        // SAFETY: unblocking one signal for the calling thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        Ok(())
    }

    /// Makes `signal` ring this process's direct doorbell (the one
    /// [`Shutdown::stop_on_signal_directly`] installed) without stopping
    /// anything: a forked worker's SIGCHLD. signal_hook cannot be used
    /// there: its registrations were inherited from the host process, whose
    /// handler the worker has reset.
    pub fn ring_on_signal_directly(&self, signal: libc::c_int) -> Result<()> {
        let doorbell = DIRECT_DOORBELL.load(Ordering::SeqCst);
        if !std::ptr::eq(doorbell, Arc::as_ptr(&self.inner)) {
            anyhow::bail!("ring_on_signal_directly needs stop_on_signal_directly first");
        }
        install_direct(signal, on_ring_signal)
    }

    /// Waits until the doorbell rings or `until` passes, then empties it.
    pub(crate) fn wait_until(&self, until: Option<Instant>) -> Result<()> {
        let rang = wait(&[Some(self.inner.read.as_raw_fd())], until)?;
        if rang[0] {
            self.drain();
        }
        Ok(())
    }

    /// A second shutdown signal arrived: do not wait for anything.
    pub fn is_forced(&self) -> bool {
        self.inner.signals.load(Ordering::SeqCst) >= 2
    }

    /// The descriptors a forked child must close: the doorbell is the
    /// parent's.
    pub(crate) fn descriptors(&self) -> [RawFd; 2] {
        [self.inner.read.as_raw_fd(), self.inner.write.as_raw_fd()]
    }

    fn drain(&self) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a valid buffer from the non-blocking read end.
        while unsafe {
            libc::read(
                self.inner.read.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        } > 0
        {}
    }
}

/// Connection ids, unique within one run of the host and increasing from 1,
/// even across prefork's worker processes: the counter lives in a page of
/// memory shared with every process forked after it was made.
pub struct ConnectionIds {
    counter: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
}

// SAFETY: the counter is only ever used through atomic operations.
unsafe impl Send for ConnectionIds {}
unsafe impl Sync for ConnectionIds {}

impl ConnectionIds {
    pub fn new() -> Result<ConnectionIds> {
        // SAFETY: a fresh anonymous shared mapping of one u64, zero-filled.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<u64>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("cannot map the connection counter");
        }
        let counter = std::ptr::NonNull::new(page.cast()).context("mmap returned null")?;
        Ok(ConnectionIds { counter })
    }

    pub fn next(&self) -> u64 {
        // SAFETY: the mapping lives as long as `self`; zero is a valid u64.
        unsafe { self.counter.as_ref() }.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Drop for ConnectionIds {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once.
        unsafe { libc::munmap(self.counter.as_ptr().cast(), std::mem::size_of::<u64>()) };
    }
}

/// The doorbell a directly installed signal handler rings (prefork workers).
static DIRECT_DOORBELL: std::sync::atomic::AtomicPtr<Doorbell> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Sent by the prefork parent to a worker: stop accepting and drain.
pub const DRAIN_SIGNAL: libc::c_int = libc::SIGUSR1;
/// Sent by the prefork parent to a worker: end its connections now. A
/// signal of its own, so it cannot merge with a drain signal still pending.
pub const END_NOW_SIGNAL: libc::c_int = libc::SIGUSR2;

/// Installs `handler` for `signal` with sigaction(2).
fn install_direct(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> Result<()> {
    // SAFETY: installs a handler that only uses atomics and write(2).
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    if installed != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot handle signal {signal}"));
    }
    Ok(())
}

extern "C" fn on_ring_signal(_signal: libc::c_int) {
    let doorbell = DIRECT_DOORBELL.load(Ordering::SeqCst);
    // SAFETY: as in `on_direct_signal`.
    if let Some(doorbell) = unsafe { doorbell.as_ref() } {
        ring(doorbell.write.as_raw_fd());
    }
}

extern "C" fn on_direct_signal(signal: libc::c_int) {
    let doorbell = DIRECT_DOORBELL.load(Ordering::SeqCst);
    // SAFETY: the pointer comes from a leaked Arc (see `stop_on_signal_directly`)
    // and is never freed; only atomics and write(2) are used.
    if let Some(doorbell) = unsafe { doorbell.as_ref() } {
        let weight = if signal == END_NOW_SIGNAL { 2 } else { 1 };
        doorbell.signals.fetch_add(weight, Ordering::SeqCst);
        doorbell.requested.store(true, Ordering::SeqCst);
        ring(doorbell.write.as_raw_fd());
    }
}

/// Accepts connections from `listeners` and hands each to `strategy` until
/// `shutdown` is triggered. Then it closes the listeners (this process's
/// copies), lets the connections in flight finish for up to `drain_timeout`
/// (or until a second signal), ends the rest, and returns once every worker
/// is done.
pub fn run(
    listeners: Vec<Listener>,
    strategy: &mut dyn Strategy,
    shutdown: &Shutdown,
    ids: &ConnectionIds,
    drain_timeout: Duration,
) -> Result<()> {
    for listener in &listeners {
        listener
            .set_nonblocking(true)
            .context("cannot make the listener non-blocking")?;
    }
    let doorbell = shutdown.inner.read.as_raw_fd();
    let mut fds: Vec<Option<RawFd>> = Vec::with_capacity(listeners.len() + 1);
    // Listeners whose socket was shut down (at host shutdown) are done.
    let mut open = vec![true; listeners.len()];
    'accepting: while !shutdown.is_triggered() {
        let accepting = strategy.has_capacity();
        fds.clear();
        fds.push(Some(doorbell));
        fds.extend(
            listeners
                .iter()
                .zip(&open)
                .map(|(l, open)| (accepting && *open).then(|| l.as_raw_fd())),
        );
        let ready = wait(&fds, strategy.next_wakeup())?;
        if ready[0] {
            shutdown.drain();
        }
        // Reap, count freed slots and enforce deadlines on every wake-up.
        strategy.maintain();
        for (i, listener) in listeners.iter().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            // Take what the backlog holds, as long as there is room for it.
            while strategy.has_capacity() && !shutdown.is_triggered() {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let id = ids.next();
                        if let Some(conn) = strategy.service().admit(Accepted { stream, peer, id })
                        {
                            strategy.dispatch(conn);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The listening socket was shut down (the host does that
                    // at shutdown, for every process at once).
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        open[i] = false;
                        if !open.contains(&true) {
                            break 'accepting;
                        }
                        break;
                    }
                    Err(e) => {
                        accept_failed(&e);
                        break;
                    }
                }
            }
        }
    }

    drop(listeners);
    strategy.stop_accepting();
    strategy.maintain();
    let in_flight = strategy.in_flight();
    let tenant = strategy.service().tenant().to_string();
    tracing::info!(
        "tenant {tenant}: shutting down: no longer accepting; {in_flight} connection(s) in flight, waiting up to {drain_timeout:?}"
    );
    let deadline = Instant::now() + drain_timeout;
    loop {
        strategy.maintain();
        let in_flight = strategy.in_flight();
        if in_flight == 0 {
            break;
        }
        if shutdown.is_forced() {
            tracing::warn!("tenant {tenant}: second signal: ending {in_flight} connection(s) now");
            strategy.abort();
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "tenant {tenant}: drain timeout: ending {in_flight} connection(s) still in flight"
            );
            strategy.abort();
            break;
        }
        let wake_at = strategy.next_wakeup().map_or(deadline, |t| t.min(deadline));
        shutdown.wait_until(Some(wake_at))?;
    }
    strategy.finish();
    tracing::info!("tenant {tenant}: stopped");
    Ok(())
}

/// poll(2) on descriptors (`None`: skipped) until one is readable or `until`
/// passes; says which were readable. EINTR counts as a wake-up with nothing
/// ready.
pub(crate) fn wait(fds: &[Option<RawFd>], until: Option<Instant>) -> Result<Vec<bool>> {
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
        return Err(err).context("poll on the listeners failed");
    }
    Ok(pollfds.iter().map(|p| p.revents != 0).collect())
}

/// An accept error ends one connection attempt, never the server. Running out
/// of descriptors or memory is waited out briefly instead of spinning.
fn accept_failed(e: &io::Error) {
    match e.raw_os_error() {
        Some(libc::ECONNABORTED) | Some(libc::EPROTO) | Some(libc::EINTR) => {}
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
            tracing::warn!("accept failed: {e}; pausing 100ms");
            std::thread::sleep(Duration::from_millis(100));
        }
        _ => tracing::warn!("accept failed: {e}"),
    }
}
