//! `forking`: a child process per connection, as Python's `ForkingMixIn`, at
//! most `max_children` alive at once. The parent only accepts, forks and
//! reaps; a child serves one connection and exits, so a crash or kill of a
//! child costs that connection only.
//!
//! Invariant: the parent starts no thread before it forks (the engine is
//! built without parallel compilation for this strategy, and the parent never
//! runs guest code, so wasmtime-wasi's tokio runtime is never started in it).
//! Children inherit nothing half-locked.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::Strategy;
use crate::connection::{Accepted, Service};
use crate::server::Shutdown;

pub struct Forking {
    service: Arc<Service>,
    max_children: usize,
    children: HashMap<libc::pid_t, Child>,
    /// The parent's descriptors a child closes first (listener, doorbell).
    close_in_child: Vec<RawFd>,
}

struct Child {
    id: u64,
    peer: std::net::SocketAddr,
    started: Instant,
}

impl Forking {
    pub fn new(
        service: Arc<Service>,
        max_children: usize,
        shutdown: &Shutdown,
        listener: &std::net::TcpListener,
    ) -> Result<Forking> {
        // Every exiting child rings the doorbell, so it is reaped at once.
        shutdown.ring_on_signal(libc::SIGCHLD)?;
        let mut close_in_child = shutdown.descriptors().to_vec();
        close_in_child.push(listener.as_raw_fd());
        Ok(Forking {
            service,
            max_children,
            children: HashMap::new(),
            close_in_child,
        })
    }

    /// The child's side of `fork()`: serve, then exit without running the
    /// parent's destructors or exit handlers.
    fn run_child(&self, conn: Accepted) -> ! {
        // SAFETY: only async-signal-safe calls before serving: restore default
        // signal dispositions (the parent's handlers write to descriptors
        // that are closed here and whose numbers may be reused), and close
        // the parent's descriptors. SIGINT is ignored: a terminal's Ctrl-C
        // reaches the whole process group, and the parent decides.
        unsafe {
            for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::signal(signal, libc::SIG_DFL);
            }
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            for &fd in &self.close_in_child {
                libc::close(fd);
            }
        }
        let worker = format!("pid-{}", std::process::id());
        let id = conn.id;
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.service.serve(conn, &worker);
        }));
        let code = match served {
            Ok(()) => 0,
            Err(_) => {
                tracing::error!("connection {id} worker={worker}: the host panicked serving it");
                101
            }
        };
        // SAFETY: ends this child process immediately.
        unsafe { libc::_exit(code) }
    }

    /// Reaps every child that has exited; with `block`, waits for one first.
    fn reap(&mut self, block: bool) {
        let mut flags = if block { 0 } else { libc::WNOHANG };
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if pid < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // ECHILD: no children are left, whatever the table says.
                for (pid, child) in self.children.drain() {
                    tracing::warn!(
                        "connection {} worker=pid-{pid}: the worker process vanished",
                        child.id
                    );
                }
                return;
            }
            if pid == 0 {
                return;
            }
            flags = libc::WNOHANG;
            if let Some(child) = self.children.remove(&pid) {
                report_exit(pid, &child, status);
            }
        }
    }
}

/// A child that did not exit normally never wrote its connection's line:
/// the parent writes it.
fn report_exit(pid: libc::pid_t, child: &Child, status: libc::c_int) {
    let cause = if libc::WIFSIGNALED(status) {
        format!(
            "the worker process was killed by signal {}",
            libc::WTERMSIG(status)
        )
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
        format!(
            "the worker process exited with status {}",
            libc::WEXITSTATUS(status)
        )
    } else {
        return;
    };
    tracing::warn!(
        "connection {} closed peer={} worker=pid-{pid} duration={:.3}ms outcome=host-error error={cause:?}",
        child.id,
        child.peer,
        child.started.elapsed().as_secs_f64() * 1000.0,
    );
}

impl Strategy for Forking {
    fn has_capacity(&self) -> bool {
        self.children.len() < self.max_children
    }

    fn dispatch(&mut self, conn: Accepted) {
        // SAFETY: the parent is single-threaded (see the module invariant),
        // so the child starts with consistent memory.
        match unsafe { libc::fork() } {
            -1 => {
                let err = io::Error::last_os_error();
                tracing::error!(
                    "connection {} closed peer={} outcome=host-error error=\"fork failed: {err}\"",
                    conn.id,
                    conn.peer
                );
            }
            0 => self.run_child(conn),
            pid => {
                self.children.insert(
                    pid,
                    Child {
                        id: conn.id,
                        peer: conn.peer,
                        started: Instant::now(),
                    },
                );
                // The child has its own copy of the socket; this one closes.
                drop(conn);
            }
        }
    }

    fn maintain(&mut self) {
        self.reap(false);
    }

    fn finish(&mut self) {
        while !self.children.is_empty() {
            self.reap(true);
        }
    }
}
