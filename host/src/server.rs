//! The accept loop, and the `Shutdown` doorbell that stops it.
//!
//! One loop for every strategy: it waits in poll(2) on the listener and on a
//! doorbell pipe. The doorbell rings when a worker frees a slot, when a child
//! exits (SIGCHLD) or when shutdown is asked for. The loop only accepts while
//! the strategy has capacity, so a flood waits in the kernel's backlog rather
//! than in the host's memory.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::connection::Accepted;
use crate::strategy::Strategy;

/// Stops an accept loop from anywhere: another thread, a signal handler (via
/// [`Shutdown::register_signal`]) or a test. Clones share one doorbell.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Doorbell>,
}

struct Doorbell {
    requested: Arc<AtomicBool>,
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
                requested: Arc::new(AtomicBool::new(false)),
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
    pub fn ring_on_signal(&self, signal: libc::c_int) -> Result<()> {
        signal_hook::low_level::pipe::register_raw(signal, self.inner.write.as_raw_fd())
            .with_context(|| format!("cannot handle signal {signal}"))?;
        Ok(())
    }

    /// Makes `signal` stop the loop.
    pub fn register_signal(&self, signal: libc::c_int) -> Result<()> {
        // Handlers run in registration order: the flag is set before the
        // doorbell rings, so the woken loop sees it.
        signal_hook::flag::register(signal, self.inner.requested.clone())
            .with_context(|| format!("cannot handle signal {signal}"))?;
        self.ring_on_signal(signal)
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

/// Accepts connections from `listener` and hands each to `strategy` until
/// `shutdown` is triggered; then lets the strategy finish what is in flight.
pub fn run(listener: &TcpListener, strategy: &mut dyn Strategy, shutdown: &Shutdown) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("cannot make the listener non-blocking")?;
    let mut next_id: u64 = 1;
    while !shutdown.is_triggered() {
        let accepting = strategy.has_capacity();
        let mut fds = [
            libc::pollfd {
                fd: if accepting { listener.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shutdown.inner.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("poll on the listener failed");
        }
        if fds[1].revents != 0 {
            shutdown.drain();
            strategy.maintain();
            continue;
        }
        if fds[0].revents == 0 {
            continue;
        }
        // Take what the backlog holds, as long as there is room for it.
        while strategy.has_capacity() && !shutdown.is_triggered() {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let id = next_id;
                    next_id += 1;
                    strategy.dispatch(Accepted { stream, peer, id });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    accept_failed(&e);
                    break;
                }
            }
        }
    }
    strategy.finish();
    Ok(())
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
