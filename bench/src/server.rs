//! The servers under test as child processes: start one (through the
//! `harness` crate the tests use too), read its `listening on IP:PORT` line
//! (`wasmtime serve`: `Serving HTTP on http://IP:PORT/`), drain its log,
//! sample its memory (summing forked children), read its CPU time, and kill
//! its whole process group when dropped, on panic, or on SIGINT/SIGTERM of
//! the bench.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use harness::{Launch, Process};

/// How long a server may take to print its address.
const START_PATIENCE: Duration = Duration::from_secs(120);
/// The log lines kept for a server that exits before listening; the rest
/// (a line per connection, under load) are read and dropped.
const KEEP_LINES: usize = 200;
/// How long a stopped server's group may take to be gone (a forking
/// server's children are re-parented to init; nothing here can wait for
/// them).
const SETTLE: Duration = Duration::from_secs(1);
/// How often a forking server's process tree is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What to run: a label and a command line.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Whether the server forks processes (sample its whole process tree).
    pub forking: bool,
}

/// Process groups of live servers, for the signal handler.
static GROUPS: [AtomicI32; 16] = [const { AtomicI32::new(0) }; 16];

fn register(pgid: i32) {
    for slot in &GROUPS {
        if slot
            .compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

fn unregister(pgid: i32) {
    for slot in &GROUPS {
        let _ = slot.compare_exchange(pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    for slot in &GROUPS {
        let pgid = slot.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill(2) is async-signal-safe.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(128 + signal) };
}

/// On SIGINT, SIGTERM or SIGHUP, kill every live server's group and exit.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// A running server; dropping it kills its process group.
pub struct Server {
    pub addr: SocketAddr,
    process: Process,
    pgid: i32,
    sampler: Option<Sampler>,
}

impl Server {
    pub fn start(spec: &ServerSpec) -> Result<Server, String> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            // With RUST_BACKTRACE=1, `wasmtime serve` 48 unwinds the stack
            // for a backtrace on every request (~15% of its connections/s):
            // a developer's shell setting, not how a server is run.
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        let process = Launch::new(command)
            // Its own group, so one kill reaches forked children too.
            .own_group()
            .keep_lines(KEEP_LINES)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.program.display()))?;
        let pgid = process.pid() as i32;
        register(pgid);
        // From here on, dropping `server` kills the group, whatever happens.
        let mut server = Server {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            process,
            pgid,
            sampler: None,
        };
        match server
            .process
            .wait_for_line(0, START_PATIENCE, |l| announced(l).is_some())
        {
            Ok(line) => server.addr = announced(&line).expect("an announcement"),
            Err(missing) if missing.ended => {
                return Err(format!(
                    "{} exited before listening:\n{}",
                    spec.name,
                    missing.lines.join("\n")
                ))
            }
            Err(_) => {
                return Err(format!(
                    "{} did not print `listening on` (or `Serving HTTP on`) in time",
                    spec.name
                ))
            }
        }
        server.sampler = Some(Sampler::start(pgid, spec.forking));
        Ok(server)
    }

    /// CPU seconds used so far by the server's process tree (`host serve`
    /// is a supervisor with worker processes) and its reaped children.
    pub fn cpu_secs(&self) -> f64 {
        tree(self.pgid).into_iter().filter_map(cpu_secs).sum()
    }

    /// Minor page faults so far of the server's process tree and its
    /// reaped children (for a forking server mostly its children's
    /// copy-on-write faults).
    pub fn minor_faults(&self) -> u64 {
        tree(self.pgid).into_iter().filter_map(minor_faults).sum()
    }

    /// The memory of the server's whole process tree now: VmRSS and Pss
    /// summed over the server and its descendants.
    pub fn usage(&self) -> Usage {
        let pids = tree(self.pgid);
        Usage {
            rss_kib: pids.iter().filter_map(|&p| status_kib(p, "VmRSS:")).sum(),
            pss_kib: pids
                .iter()
                .filter_map(|&p| proc_kib(p, "smaps_rollup", "Pss:"))
                .sum(),
        }
    }

    /// Stops sampling and returns the memory figures. Peak RSS is the larger
    /// of the server's own VmHWM and the sampled sum of VmRSS over the server
    /// and its children (which counts pages shared after fork() once per
    /// process); peak PSS is the sampled sum of Pss, which splits them.
    pub fn finish_memory(&mut self) -> Memory {
        let hwm = status_kib(self.pgid, "VmHWM:").unwrap_or(0);
        let mut memory = match self.sampler.take() {
            Some(sampler) => sampler.stop(),
            None => Memory::default(),
        };
        memory.peak_rss_kib = memory.peak_rss_kib.max(hwm);
        memory
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            sampler.stop();
        }
        self.process.stop(SETTLE);
        unregister(self.pgid);
    }
}

/// The address a server announces on a line of its log: `listening on
/// IP:PORT ...` (the host, the native and the Python servers) or `Serving HTTP
/// on http://IP:PORT/` (`wasmtime serve`).
fn announced(line: &str) -> Option<SocketAddr> {
    if let Some(addr) = harness::listening_addr(line) {
        return Some(addr);
    }
    let rest = line.trim().strip_prefix("Serving HTTP on http://")?;
    rest.trim_end_matches('/').parse().ok()
}

/// Peak memory of a server and its children, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub peak_rss_kib: u64,
    pub peak_pss_kib: u64,
    pub peak_children: u64,
}

/// The memory of a process tree at one moment, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl Usage {
    /// The larger of each figure (each peak on its own).
    pub fn max(self, other: Usage) -> Usage {
        Usage {
            rss_kib: self.rss_kib.max(other.rss_kib),
            pss_kib: self.pss_kib.max(other.pss_kib),
        }
    }
}

/// A field of /proc/PID/status in KiB.
fn status_kib(pid: i32, field: &str) -> Option<u64> {
    proc_kib(pid, "status", field)
}

/// A `Name:  N kB` field of a /proc/PID file.
fn proc_kib(pid: i32, file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// The sum of fields `first..=last` of /proc/PID/stat, numbered from 1 as
/// proc(5) numbers them (the command name in parentheses is field 2).
fn stat_sum(pid: i32, first: usize, last: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(
        fields
            .get(first - 3..=last - 3)?
            .iter()
            .filter_map(|f| f.parse::<u64>().ok())
            .sum(),
    )
}

/// utime + stime + cutime + cstime of a process (fields 14-17), in seconds.
fn cpu_secs(pid: i32) -> Option<f64> {
    let ticks = stat_sum(pid, 14, 17)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// minflt + cminflt of a process (fields 10-11): its own minor faults and
/// those of the children it has reaped.
fn minor_faults(pid: i32) -> Option<u64> {
    stat_sum(pid, 10, 11)
}

/// A process and all its descendants.
fn tree(pid: i32) -> Vec<i32> {
    harness::proc::tree(pid as u32)
        .into_iter()
        .map(|p| p as i32)
        .collect()
}

/// Samples the sums of VmRSS and Pss over a server and its children.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Memory>,
}

impl Sampler {
    fn start(pid: i32, forking: bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut peak = Memory::default();
                // Bounded by the stop flag, which every path sets.
                while !stop.load(Ordering::Relaxed) {
                    let pids = if forking { tree(pid) } else { vec![pid] };
                    let rss: u64 = pids.iter().filter_map(|&p| status_kib(p, "VmRSS:")).sum();
                    let pss: u64 = pids
                        .iter()
                        .filter_map(|&p| proc_kib(p, "smaps_rollup", "Pss:"))
                        .sum();
                    peak.peak_rss_kib = peak.peak_rss_kib.max(rss);
                    peak.peak_pss_kib = peak.peak_pss_kib.max(pss);
                    peak.peak_children = peak.peak_children.max(pids.len() as u64 - 1);
                    thread::sleep(SAMPLE_EVERY);
                }
                peak
            })
        };
        Sampler { stop, thread }
    }

    fn stop(self) -> Memory {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}
