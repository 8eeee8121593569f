//! A server run as a child process: started with its stderr as a [`Log`],
//! stopped (its process group too, when it has its own) when dropped.

use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::log::{Log, Missing};
use crate::wait::poll;

/// How to start a [`Process`]: a command, whether it gets its own process
/// group, and how much of its log to keep.
pub struct Launch {
    command: Command,
    own_group: bool,
    keep_lines: usize,
}

impl Launch {
    /// `command` with stdin and stdout null and stderr read as the log (all
    /// of it kept), in the caller's process group.
    pub fn new(command: Command) -> Launch {
        Launch {
            command,
            own_group: false,
            keep_lines: usize::MAX,
        }
    }

    /// In a process group of its own, so a signal to the group (and the
    /// kill at the end) reaches every process it forks, as a service manager
    /// would. Without it, a terminal's Ctrl-C reaches the child along with
    /// the caller.
    pub fn own_group(mut self) -> Launch {
        self.own_group = true;
        self
    }

    /// Keep only the first `lines` lines of the log and drop the rest as it
    /// is read (a server that logs every connection, under a long load).
    pub fn keep_lines(mut self, lines: usize) -> Launch {
        self.keep_lines = lines;
        self
    }

    pub fn spawn(mut self) -> io::Result<Process> {
        self.command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.own_group {
            self.command.process_group(0);
        }
        let mut child = self.command.spawn()?;
        let stderr = child.stderr.take().expect("stderr is piped");
        Ok(Process {
            child,
            own_group: self.own_group,
            log: Log::follow(stderr, self.keep_lines),
            stopped: false,
        })
    }
}

/// A running child process and its log; dropping it kills it (its whole
/// group when it has its own) and reaps it.
pub struct Process {
    child: Child,
    own_group: bool,
    log: Arc<Log>,
    stopped: bool,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // child's, not reaped before `stop`.
        if unsafe { libc::kill(self.pid() as libc::pid_t, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends `signal` to the process group the process leads (its children
    /// too); for a process started with [`Launch::own_group`].
    pub fn signal_group(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: killpg(2) has no memory-safety preconditions; the group is
        // the one our child leads.
        if unsafe { libc::killpg(self.pid() as libc::pid_t, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits up to `within` for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        poll(within, || match self.child.try_wait() {
            Ok(Some(status)) => Ok(Some(status)),
            Ok(None) => Err(()),
            Err(_) => Ok(None),
        })
        .ok()
        .flatten()
    }

    /// The log so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lines()
    }

    /// How many lines the log has so far: a mark for [`Process::wait_for_line`].
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Waits up to `within` until a log line after the first `since`
    /// satisfies `matches`, and returns it.
    pub fn wait_for_line(
        &self,
        since: usize,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String, Missing> {
        self.log.wait_for_line(since, within, matches)
    }

    /// Waits up to `within` until at least `count` log lines satisfy
    /// `matches`.
    pub fn wait_for_count(
        &self,
        count: usize,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<(), Missing> {
        self.log.wait_for_count(count, within, matches)
    }

    /// Kills the process (with SIGKILL; its whole group when it has its own)
    /// and reaps it; then waits up to `settle` for the rest of its group to
    /// be gone (a forking server's children, re-parented to init, which
    /// nothing here can wait for). Once only; dropping does it with no
    /// `settle`.
    pub fn stop(&mut self, settle: Duration) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        if self.own_group {
            let _ = self.signal_group(libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.own_group && !settle.is_zero() {
            let group = self.pid() as libc::pid_t;
            let _ = poll(settle, || {
                // SAFETY: signal 0 only asks whether the group still exists.
                if unsafe { libc::killpg(group, 0) } == 0 {
                    Err(())
                } else {
                    Ok(())
                }
            });
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The address of a `listening on IP:PORT ...` line (as the host, and the
/// bench's other servers, announce where they listen); `None` for any other
/// line, or a `listening on` line whose first word is not an IP address and
/// port (a Unix socket's `unix:PATH`).
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_name_their_address() {
        assert_eq!(
            listening_addr("listening on 127.0.0.1:4711 tenant=default\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4711)))
        );
        assert_eq!(
            listening_addr("listening on [::1]:80"),
            "[::1]:80".parse().ok()
        );
        assert_eq!(
            listening_addr("listening on unix:/run/a.sock tenant=a"),
            None
        );
        assert_eq!(
            listening_addr("metrics on http://127.0.0.1:9/metrics"),
            None
        );
    }

    #[test]
    fn the_log_is_read_and_the_end_seen() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo one >&2; echo two >&2; exit 3"]);
        let mut process = Launch::new(command).own_group().spawn().unwrap();
        let patience = Duration::from_secs(60);
        let line = process.wait_for_line(0, patience, |l| l.starts_with("tw"));
        assert_eq!(line.unwrap(), "two");
        let missing = process
            .wait_for_count(3, patience, |l| l.contains('o'))
            .unwrap_err();
        assert!(missing.ended);
        assert_eq!(missing.seen, 2);
        assert_eq!(missing.lines, ["one", "two"]);
        assert_eq!(process.wait_exit(patience).and_then(|s| s.code()), Some(3));
    }

    #[test]
    fn a_kept_log_drops_later_lines_but_reads_them() {
        let mut command = Command::new("sh");
        command.args(["-c", "for i in 1 2 3 4 5; do echo $i >&2; done"]);
        let process = Launch::new(command).keep_lines(2).spawn().unwrap();
        let missing = process
            .wait_for_line(0, Duration::from_secs(60), |l| l == "5")
            .unwrap_err();
        assert!(missing.ended);
        assert_eq!(missing.lines, ["1", "2"]);
    }

    #[test]
    fn stopping_kills_the_whole_group() {
        let mut command = Command::new("sh");
        // A child that outlives its parent's kill but not the group's.
        command.args(["-c", "sleep 600 & echo $! >&2; wait"]);
        let mut process = Launch::new(command).own_group().spawn().unwrap();
        let grandchild: u32 = process
            .wait_for_line(0, Duration::from_secs(60), |_| true)
            .unwrap()
            .parse()
            .unwrap();
        assert!(crate::proc::running(grandchild));
        process.stop(Duration::ZERO);
        let gone = poll(Duration::from_secs(60), || {
            if crate::proc::running(grandchild) {
                Err(())
            } else {
                Ok(())
            }
        });
        assert_eq!(gone, Ok(()), "the group's other process outlived the stop");
    }
}
