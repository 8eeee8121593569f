//! Test support: the guests (built once per run), a real `host serve` process
//! on port 0 whose log the tests can read, and small TCP clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Threading,
    Forking,
    Prefork,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Threading => "threading",
            Strategy::Forking => "forking",
            Strategy::Prefork => "prefork",
        }
    }

    /// The prefix of `connection-info.worker` under this strategy.
    pub fn worker_prefix(self) -> &'static str {
        match self {
            Strategy::Threading => "thread-",
            Strategy::Forking | Strategy::Prefork => "pid-",
        }
    }

    /// Whether `worker` is a worker name this strategy gives: `thread-3`,
    /// `pid-4711`, or `pid-4711/thread-3`.
    pub fn is_worker_name(self, worker: &str) -> bool {
        let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
        match self {
            Strategy::Threading => worker.strip_prefix("thread-").is_some_and(number),
            Strategy::Forking => worker.strip_prefix("pid-").is_some_and(number),
            Strategy::Prefork => worker
                .strip_prefix("pid-")
                .and_then(|rest| rest.split_once("/thread-"))
                .is_some_and(|(pid, thread)| number(pid) && number(thread)),
        }
    }

    /// Child processes of an idle host: prefork keeps its workers.
    pub fn idle_children(self) -> usize {
        match self {
            Strategy::Prefork => std::thread::available_parallelism().map_or(1, |n| n.get()),
            _ => 0,
        }
    }
}

/// Declares each scenario `fn name(strategy: Strategy)` as one test per
/// strategy: `threading::name`, `forking::name` and `prefork::name`.
#[macro_export]
macro_rules! for_each_strategy {
    ($($name:ident),* $(,)?) => {
        mod threading {
            $( #[test] fn $name() { super::$name($crate::support::Strategy::Threading) } )*
        }
        mod forking {
            $( #[test] fn $name() { super::$name($crate::support::Strategy::Forking) } )*
        }
        mod prefork {
            $( #[test] fn $name() { super::$name($crate::support::Strategy::Prefork) } )*
        }
    };
}

/// The compile cache the tests share, under the target directory.
pub fn test_cache_dir() -> PathBuf {
    PathBuf::from(env!("HOST_GUEST_TARGET_DIR")).with_file_name("test-compile-cache")
}

pub fn host_binary() -> &'static str {
    env!("CARGO_BIN_EXE_host")
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The path of a guest component from `handlers/`, building the whole guest
/// workspace once per test run. `name` is the crate name (`test-guest`).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target_dir = PathBuf::from(env!("HOST_GUEST_TARGET_DIR"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--workspace",
            ])
            .arg("--manifest-path")
            .arg(repo_root().join("handlers/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            // Nor are the wrappers of `cargo clippy`.
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CLIPPY_ARGS")
            .status()
            .expect("cannot run cargo to build the guests");
        assert!(status.success(), "building the guests in handlers/ failed");
        target_dir.join("wasm32-wasip2/release")
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    let path = if path.exists() {
        path
    } else {
        dir.join(format!("{name}.wasm"))
    };
    assert!(
        path.is_file(),
        "guest {name} was not built at {}",
        path.display()
    );
    path
}

/// The echo handler in `lang` (python, js, c, go, wat), building all five
/// with `handlers/build-all.sh` once per test run. Their toolchains come from
/// `handlers/install-toolchains.sh`.
pub fn language_echo(lang: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let dir = PathBuf::from(env!("HOST_GUEST_TARGET_DIR"));
        let status = Command::new(repo_root().join("handlers/build-all.sh"))
            .arg(&dir)
            .status()
            .expect("cannot run handlers/build-all.sh");
        assert!(
            status.success(),
            "handlers/build-all.sh failed; are the toolchains installed (handlers/install-toolchains.sh)?"
        );
        dir
    });
    let path = dir.join(format!("echo-{lang}.wasm"));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A scratch directory for one test, removed at the end.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("host-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `host serve --addr 127.0.0.1:0`, killed when dropped.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<(Mutex<Log>, Condvar)>,
}

/// What the host has written to stderr so far.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    /// stderr is closed: the host has exited.
    ended: bool,
}

impl Server {
    /// Starts the host with `handler` (None: the built-in echo) and waits for
    /// its `listening on` line.
    pub fn start(strategy: Strategy, handler: Option<&Path>, extra: &[&str]) -> Server {
        let mut command = Command::new(host_binary());
        command.args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--strategy",
            strategy.name(),
        ]);
        if let Some(handler) = handler {
            command.arg("--handler").arg(handler);
        }
        if !extra
            .iter()
            .any(|a| *a == "--no-cache" || *a == "--cache-dir")
        {
            // Share compiled guests between the tests, not with the user's cache.
            command.arg("--cache-dir").arg(test_cache_dir());
        }
        command.args(extra);
        // Its own process group, so a test can signal it as a service
        // manager would: the host and all its children at once.
        use std::os::unix::process::CommandExt;
        let mut child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the host");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let sink = log.clone();
        thread::spawn(move || {
            let (log, changed) = &*sink;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lock().unwrap().lines.push(line);
                changed.notify_all();
            }
            log.lock().unwrap().ended = true;
            changed.notify_all();
        });
        let mut server = Server {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let line = server.wait_for_log(|l| l.starts_with("listening on "));
        server.addr = line["listening on ".len()..]
            .parse()
            .expect("listening on IP:PORT");
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a log line satisfies `matches` and returns it.
    pub fn wait_for_log(&self, matches: impl Fn(&str) -> bool) -> String {
        let (log, changed) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut guard = log.lock().unwrap();
        loop {
            if let Some(line) = guard.lines.iter().find(|l| matches(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let why = if guard.ended {
                "the host exited"
            } else {
                "timed out"
            };
            assert!(
                !left.is_zero() && !guard.ended,
                "no such log line ({why}); the log so far:\n{}",
                guard.lines.join("\n")
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits until at least `count` log lines satisfy `matches`.
    pub fn wait_for_log_count(&self, matches: impl Fn(&str) -> bool, count: usize) {
        let (log, changed) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut guard = log.lock().unwrap();
        loop {
            let seen = guard.lines.iter().filter(|l| matches(l)).count();
            if seen >= count {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && !guard.ended,
                "only {seen} of {count} matching log lines"
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// The `connection N closed ...` line of connection `id`.
    pub fn closed_line(&self, id: u64) -> String {
        let prefix = format!("connection {id} closed ");
        self.wait_for_log(|l| l.contains(&prefix))
    }

    pub fn log(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    /// Sends `signal` to the host process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child process.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) },
            0
        );
    }

    /// Sends `signal` to the host's whole process group (its children too).
    pub fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: signalling the process group our child leads.
        assert_eq!(
            unsafe { libc::killpg(self.child.id() as libc::pid_t, signal) },
            0
        );
    }

    /// Waits for the host to exit by itself and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the host did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pids of worker processes named in connection log lines.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.log()
            .iter()
            .filter_map(|l| l.split(" worker=pid-").nth(1))
            .filter_map(|rest| rest.split([' ', '/']).next()?.parse().ok())
            .collect()
    }

    /// Open descriptors, threads and live child processes of the host.
    pub fn resources(&self) -> Resources {
        let pid = self.child.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        Resources {
            fds,
            threads,
            children: children_of(pid).len(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub fds: usize,
    pub threads: usize,
    pub children: usize,
}

/// The pids of the processes whose parent is `pid` (zombies included).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// Whether a process with this pid exists (a zombie counts).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Connects from the source address 127.0.0.`n` (2..=250), so that many
/// short connections do not exhaust one address's ephemeral ports.
pub fn connect_from(addr: SocketAddr, n: u8) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let source: SocketAddr = format!("127.0.0.{n}:0").parse().unwrap();
    socket.bind(&source.into())?;
    socket.connect_timeout(&addr.into(), PATIENCE)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    Ok(stream)
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole group: prefork's workers and forking's children too.
        // SAFETY: signalling the process group our child leads.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the host");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Sends `data` (from a second thread, so large inputs cannot deadlock),
/// half-closes, and reads the reply to the end.
pub fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let data = data.to_vec();
    let sender = thread::spawn(move || {
        writer.write_all(&data).expect("send to the host");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let reply = read_to_end(stream);
    sender.join().unwrap();
    reply
}

/// Like [`exchange`], and also returns the connection's id, found through
/// its peer address in the host's log.
pub fn exchange_logged(server: &Server, data: &[u8]) -> (u64, Vec<u8>) {
    let stream = server.connect();
    let peer = stream.local_addr().unwrap();
    let mut writer = stream.try_clone().unwrap();
    let data = data.to_vec();
    let sender = thread::spawn(move || {
        // The host may close before taking everything (a trap): not an error.
        let _ = writer.write_all(&data);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut reply = Vec::new();
    let mut reader = stream;
    let _ = reader.read_to_end(&mut reply);
    sender.join().unwrap();
    let marker = format!(" peer={peer} ");
    let line = server.wait_for_log(|l| l.contains(" closed ") && l.contains(&marker));
    let id = line
        .split("connection ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("connection N closed");
    (id, reply)
}

/// Sends `data`, half-closes, and reads until the host resets the
/// connection; returns what arrived before the reset. Fails if the host
/// closes normally instead: a reply cut short must not look complete.
pub fn exchange_reset(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr);
    let _ = stream.write_all(data);
    let _ = stream.shutdown(Shutdown::Write);
    read_until_reset(&mut stream)
}

/// Reads until the connection is reset; panics on a normal end.
pub fn read_until_reset(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "the host closed normally after {} bytes; expected a reset",
                got.len()
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

pub fn read_to_end(mut stream: TcpStream) -> Vec<u8> {
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("read the reply to the end");
    reply
}

/// Deterministic pseudo-random bytes, different for each `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs the host with `args` to completion (it must end by itself) and
/// returns what it did.
pub fn run_host(args: &[&str]) -> Output {
    let mut child = Command::new(host_binary())
        .args(args)
        // `host check --run` serves with the default cache: keep it in target/.
        .env("XDG_CACHE_HOME", test_cache_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the host");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("host {args:?} did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Lines that look like `key=value`, as the test guest's `info` replies.
pub fn fields(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
