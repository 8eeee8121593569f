//! Test support: the guests (built once per run), a real `host serve` process
//! on port 0 whose log the tests can read (started and stopped by the
//! `harness` crate, which `host check --run` and the bench use too), small
//! TCP clients, and [`eventually`] for waits with no log line to wait on.

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use harness::{Launch, Missing, Process};

pub use harness::proc::{
    children as children_of, exists as process_exists, running as process_running,
};

/// How long any single wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Tries `probe` until it returns `Ok`, and returns that value; fails the
/// test with its last `Err` (which says what it saw) once `within` has
/// passed. The tests' one wait for what has no log line to wait on (a count
/// in /proc, a metrics page, a process's end).
#[track_caller]
pub fn eventually<T, E: Display>(within: Duration, probe: impl FnMut() -> Result<T, E>) -> T {
    match harness::poll(within, probe) {
        Ok(value) => value,
        Err(last) => panic!("not within {within:?}: {last}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Threading,
    Forking,
    Prefork,
    Async,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Threading => "threading",
            Strategy::Forking => "forking",
            Strategy::Prefork => "prefork",
            Strategy::Async => "async",
        }
    }

    /// The prefix of `connection-info.worker` under this strategy.
    pub fn worker_prefix(self) -> &'static str {
        match self {
            Strategy::Threading => "thread-",
            Strategy::Forking | Strategy::Prefork | Strategy::Async => "pid-",
        }
    }

    /// Whether `worker` is a worker name this strategy gives: `thread-3`,
    /// `pid-4711`, `pid-4711/thread-3` or `pid-4711/async`.
    pub fn is_worker_name(self, worker: &str) -> bool {
        let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
        match self {
            Strategy::Threading => worker.strip_prefix("thread-").is_some_and(number),
            Strategy::Forking => worker.strip_prefix("pid-").is_some_and(number),
            Strategy::Prefork => worker
                .strip_prefix("pid-")
                .and_then(|rest| rest.split_once("/thread-"))
                .is_some_and(|(pid, thread)| number(pid) && number(thread)),
            Strategy::Async => worker
                .strip_prefix("pid-")
                .and_then(|rest| rest.strip_suffix("/async"))
                .is_some_and(number),
        }
    }

    /// Descendant processes of an idle host: its worker processes (prefork
    /// one per core, else one).
    pub fn idle_children(self) -> usize {
        match self {
            Strategy::Prefork => std::thread::available_parallelism().map_or(1, |n| n.get()),
            _ => 1,
        }
    }
}

/// Declares each scenario `fn name(strategy: Strategy)` as one test per
/// strategy: `threading::name`, `forking::name`, `prefork::name` and
/// `asynchronous::name`.
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
        mod asynchronous {
            $( #[test] fn $name() { super::$name($crate::support::Strategy::Async) } )*
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
    /// Killed with its whole process group when dropped.
    process: Process,
    addr: SocketAddr,
    /// Counts this server among the running ones (see [`alone`]); `None`
    /// for the server of a test that runs alone.
    _running: Option<Running>,
}

/// The servers running now, and whether a test has the machine to itself.
struct Machine {
    running: usize,
    alone: bool,
}

static MACHINE: Mutex<Machine> = Mutex::new(Machine {
    running: 0,
    alone: false,
});
static MACHINE_CHANGED: Condvar = Condvar::new();

thread_local! {
    /// This thread's test runs alone: its servers do not wait for it.
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn machine() -> std::sync::MutexGuard<'static, Machine> {
    MACHINE.lock().unwrap_or_else(|e| e.into_inner())
}

/// One running server of a test that does not run alone.
struct Running;

impl Running {
    fn start() -> Option<Running> {
        if ALONE.with(|a| a.get()) {
            return None;
        }
        let mut machine = machine();
        while machine.alone {
            machine = MACHINE_CHANGED
                .wait(machine)
                .unwrap_or_else(|e| e.into_inner());
        }
        machine.running += 1;
        Some(Running)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        machine().running -= 1;
        MACHINE_CHANGED.notify_all();
    }
}

/// Held by a test whose assertion is a latency bound (the issue states one):
/// no other test's server runs while it lives, so the 2 shared cores are not
/// taken by, say, a soak of 256 forking children. Waits for the servers
/// running now to end; servers started meanwhile by other tests wait for
/// this to drop.
pub struct Alone;

pub fn alone() -> Alone {
    let mut machine = machine();
    while machine.alone || machine.running > 0 {
        machine = MACHINE_CHANGED
            .wait(machine)
            .unwrap_or_else(|e| e.into_inner());
    }
    machine.alone = true;
    ALONE.with(|a| a.set(true));
    Alone
}

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.with(|a| a.set(false));
        machine().alone = false;
        MACHINE_CHANGED.notify_all();
    }
}

impl Server {
    /// Starts the host with `handler` (None: the built-in echo) and waits for
    /// its `listening on` line.
    pub fn start(strategy: Strategy, handler: Option<&Path>, extra: &[&str]) -> Server {
        let mut args: Vec<OsString> = ["serve", "--addr", "127.0.0.1:0", "--strategy"]
            .into_iter()
            .map(OsString::from)
            .collect();
        args.push(strategy.name().into());
        if let Some(handler) = handler {
            args.push("--handler".into());
            args.push(handler.into());
        }
        let mut server = Server::spawn(&args, extra);
        let line = server.wait_for_log(|l| l.starts_with("listening on "));
        server.addr = harness::listening_addr(&line).expect("listening on IP:PORT tenant=NAME");
        server
    }

    /// Starts `host ARGS EXTRA` (with the tests' compile cache unless `extra`
    /// names one) in its own process group, collecting its stderr as the
    /// log. Waits for nothing; `addr()` is unset until the caller sets it.
    pub fn spawn(args: &[OsString], extra: &[&str]) -> Server {
        Server::spawn_with(args, extra, |_| {})
    }

    /// [`Server::spawn`], with `configure` applied to the command first
    /// (e.g. a `pre_exec` that lowers a resource limit).
    pub fn spawn_with(
        args: &[OsString],
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Server {
        let running = Running::start();
        let mut command = Command::new(host_binary());
        configure(&mut command);
        command.args(args);
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
        let process = Launch::new(command)
            .own_group()
            .spawn()
            .expect("cannot start the host");
        Server {
            process,
            addr: "0.0.0.0:0".parse().unwrap(),
            _running: running,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the address `connect` and `addr` use (for a server started with
    /// `spawn`).
    pub fn set_addr(&mut self, addr: SocketAddr) {
        self.addr = addr;
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits until a log line satisfies `matches` and returns it.
    pub fn wait_for_log(&self, matches: impl Fn(&str) -> bool) -> String {
        self.process
            .wait_for_line(0, PATIENCE, matches)
            .unwrap_or_else(|missing| {
                panic!(
                    "no such log line ({}); the log so far:\n{}",
                    missing.why("the host"),
                    missing.lines.join("\n")
                )
            })
    }

    /// Waits until at least `count` log lines satisfy `matches`.
    pub fn wait_for_log_count(&self, matches: impl Fn(&str) -> bool, count: usize) {
        if let Err(Missing { seen, .. }) = self.process.wait_for_count(count, PATIENCE, matches) {
            panic!("only {seen} of {count} matching log lines");
        }
    }

    /// The `connection N closed ...` line of connection `id`.
    pub fn closed_line(&self, id: u64) -> String {
        let prefix = format!("connection {id} closed ");
        self.wait_for_log(|l| l.contains(&prefix))
    }

    pub fn log(&self) -> Vec<String> {
        self.process.log()
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    /// Where `/metrics` is served (waits for the `metrics on` line).
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = stable_line(&self.wait_for_log(is_metrics_line)).unwrap();
        line.trim_start_matches("metrics on http://")
            .trim_end_matches("/metrics")
            .parse()
            .unwrap_or_else(|_| panic!("metrics on http://IP:PORT/metrics: {line}"))
    }

    /// Sends `signal` to the host process.
    pub fn signal(&self, signal: libc::c_int) {
        if let Err(e) = self.process.signal(signal) {
            panic!("cannot signal the host: {e}");
        }
    }

    /// Sends `signal` to the host's whole process group (its children too).
    pub fn signal_group(&self, signal: libc::c_int) {
        if let Err(e) = self.process.signal_group(signal) {
            panic!("cannot signal the host's process group: {e}");
        }
    }

    /// Waits for the host to exit by itself and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.process
            .wait_exit(PATIENCE)
            .expect("the host did not exit")
    }

    /// The pids of worker processes named in connection log lines.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.log()
            .iter()
            .filter_map(|l| l.split(" worker=pid-").nth(1))
            .filter_map(|rest| rest.split([' ', '/']).next()?.parse().ok())
            .collect()
    }

    /// Open descriptors and threads of the host and all its descendant
    /// processes (the host process, its workers, forked connections), and
    /// how many descendants there are.
    pub fn resources(&self) -> Resources {
        let tree = harness::proc::tree(self.pid());
        let mut resources = Resources {
            fds: 0,
            threads: 0,
            children: tree.len() - 1,
        };
        for pid in tree {
            // A process may exit while it is counted: count what is there.
            if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                resources.fds += fds.count();
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            resources.threads += status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
        }
        resources
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub fds: usize,
    pub threads: usize,
    pub children: usize,
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

/// Sends `data` from `stream`, half-closes, and reads until the end or an
/// error (the host may close before taking everything, e.g. at a trap: not
/// a failure here); returns what arrived.
pub fn send_and_read(stream: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let data = data.to_vec();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&data);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut reply = Vec::new();
    let mut reader = stream;
    let _ = reader.read_to_end(&mut reply);
    sender.join().unwrap();
    reply
}

/// Like [`exchange`], and also returns the connection's id, found through
/// its peer address in the host's log.
pub fn exchange_logged(server: &Server, data: &[u8]) -> (u64, Vec<u8>) {
    let stream = server.connect();
    let peer = stream.local_addr().unwrap();
    let reply = send_and_read(stream, data);
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
    run_host_in(Path::new("."), args)
}

/// Like [`run_host`], in the working directory `dir`.
pub fn run_host_in(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(host_binary())
        .args(args)
        .current_dir(dir)
        // `host check --run` serves with the default cache: keep it in target/.
        .env("XDG_CACHE_HOME", test_cache_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the host");
    if harness::poll(PATIENCE, || child.try_wait().unwrap().ok_or(())).is_err() {
        let _ = child.kill();
        panic!("host {args:?} did not exit");
    }
    child.wait_with_output().unwrap()
}

/// What a host that refused to start printed: it failed, never said
/// `listening on`, and wrote exactly one `error: ` line, which is returned.
pub fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the host was not refused:\n{stderr}");
    assert!(!stderr.contains("listening on"), "it listened:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    errors[0].to_string()
}

/// Lines that look like `key=value`, as the test guest's `info` replies.
pub fn fields(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Server {
    /// How many log lines the host has written so far: a mark for
    /// [`Server::wait_for_log_since`].
    pub fn log_len(&self) -> usize {
        self.process.log_len()
    }

    /// The host's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.try_wait().unwrap()
    }

    /// Waits until a log line written after the first `since` lines
    /// satisfies `matches` and returns it.
    pub fn wait_for_log_since(&self, since: usize, matches: impl Fn(&str) -> bool) -> String {
        self.process
            .wait_for_line(since, PATIENCE, matches)
            .unwrap_or_else(|missing| {
                panic!(
                    "no such log line after line {since} ({}); the log so far:\n{}",
                    missing.why("the host"),
                    missing.lines.join("\n")
                )
            })
    }

    /// Waits until the log has ended (every process writing it has exited)
    /// and returns all of it: a check that a line never came.
    pub fn whole_log(&self) -> Vec<String> {
        match self.process.wait_for_line(0, PATIENCE, |_| false) {
            Err(missing) if missing.ended => missing.lines,
            _ => panic!("the log did not end within {PATIENCE:?}"),
        }
    }
}

/// A string as a TOML basic string (quoted, escaped), for paths in configs.
pub fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a TOML basic string.
pub fn toml_path(path: &Path) -> String {
    toml_string(path.to_str().expect("a UTF-8 path"))
}

/// The text of one of the host's stable lines (`listening on ...`,
/// `metrics on ...`) if `line` is one: a bare line, or under `--log-format
/// json` a JSON event whose message is that line.
pub fn stable_line(line: &str) -> Option<String> {
    let stable = |text: &str| text.starts_with("listening on ") || text.starts_with("metrics on ");
    if stable(line) {
        return Some(line.to_string());
    }
    if !line.starts_with('{') {
        return None;
    }
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = event
        .get("fields")
        .and_then(|f| f.get("message"))
        .or_else(|| event.get("message"))?
        .as_str()?;
    stable(message).then(|| message.to_string())
}

fn is_listening_line(line: &str) -> bool {
    stable_line(line).is_some_and(|t| t.starts_with("listening on "))
}

fn is_metrics_line(line: &str) -> bool {
    stable_line(line).is_some_and(|t| t.starts_with("metrics on "))
}

/// How many listeners a config declares: every tenant's `listen` (or the
/// `[defaults]` one), one address where neither gives any.
pub fn listener_count(toml_text: &str) -> usize {
    let table: toml::Table = toml_text.parse().expect("the test's config is valid TOML");
    let default_listen = table
        .get("defaults")
        .and_then(|d| d.get("listen"))
        .and_then(|l| l.as_array())
        .map(|l| l.len());
    let Some(tenants) = table.get("tenants").and_then(|t| t.as_table()) else {
        return 0;
    };
    tenants
        .values()
        .map(|tenant| {
            tenant
                .get("listen")
                .and_then(|l| l.as_array())
                .map(|l| l.len())
                .or(default_listen)
                .unwrap_or(1)
        })
        .sum()
}

/// A running `host serve --config FILE` (the file in its own scratch
/// directory), killed with its whole process group when dropped. Derefs to
/// [`Server`] for the log, signals and exit; `addr()` there is the first TCP
/// listener.
pub struct ConfigServer {
    server: Server,
    file: PathBuf,
    // Dropped after the server: the host may still use the directory.
    dir: TempDir,
}

impl Server {
    /// Starts `host serve --config FILE EXTRA` with `toml` written to FILE in
    /// a fresh scratch directory, and waits for every `listening on` line
    /// (and the `metrics on` line when the file has `[metrics]` or `extra`
    /// has `--metrics-addr`).
    pub fn start_config(toml: &str, extra: &[&str]) -> ConfigServer {
        ConfigServer::start_in(TempDir::new("config"), toml, extra)
    }
}

impl ConfigServer {
    /// As [`Server::start_config`], with the file written into `dir` as
    /// `host.toml` (so the config may name paths inside `dir`).
    pub fn start_in(dir: TempDir, toml: &str, extra: &[&str]) -> ConfigServer {
        let file = dir.path().join("host.toml");
        std::fs::write(&file, toml).unwrap();
        let args: Vec<OsString> = vec!["serve".into(), "--config".into(), file.clone().into()];
        let server = Server::spawn(&args, extra);
        let listeners = listener_count(toml);
        server.wait_for_log_count(is_listening_line, listeners);
        let with_metrics = extra.contains(&"--metrics-addr")
            || toml
                .parse::<toml::Table>()
                .is_ok_and(|t| t.get("metrics").is_some());
        if with_metrics {
            server.wait_for_log(is_metrics_line);
        }
        let mut config = ConfigServer { server, file, dir };
        if let Some(addr) = config.listening().iter().find_map(|(_, a)| a.parse().ok()) {
            config.server.addr = addr;
        }
        config
    }

    /// The scratch directory the config file is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the config file's text (atomically: a watcher never sees a
    /// half-written file).
    pub fn rewrite(&self, toml: &str) {
        let staged = self.dir.path().join(".host.toml.new");
        std::fs::write(&staged, toml).unwrap();
        std::fs::rename(&staged, &self.file).unwrap();
    }

    /// Every `listening on ADDR tenant=NAME` line so far, as (NAME, ADDR).
    pub fn listening(&self) -> Vec<(String, String)> {
        self.server
            .log()
            .iter()
            .filter_map(|l| stable_line(l))
            .filter_map(|l| l.strip_prefix("listening on ").map(str::to_string))
            .filter_map(|rest| {
                let (addr, tenant) = rest.split_once(" tenant=")?;
                Some((tenant.trim().to_string(), addr.to_string()))
            })
            .collect()
    }

    /// The (latest) TCP address `tenant` listens on.
    pub fn addr(&self, tenant: &str) -> SocketAddr {
        self.listening()
            .iter()
            .rev()
            .filter(|(name, _)| name == tenant)
            .find_map(|(_, addr)| addr.parse().ok())
            .unwrap_or_else(|| panic!("tenant {tenant} listens on no TCP address"))
    }

    /// The (latest) Unix socket path `tenant` listens on.
    pub fn unix_path(&self, tenant: &str) -> PathBuf {
        self.listening()
            .iter()
            .rev()
            .filter(|(name, _)| name == tenant)
            .find_map(|(_, addr)| addr.strip_prefix("unix:").map(PathBuf::from))
            .unwrap_or_else(|| panic!("tenant {tenant} listens on no Unix socket"))
    }

    /// `GET /metrics`: the body of a 200 response.
    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.metrics_addr(), "/metrics");
        assert!(
            status.contains(" 200 "),
            "GET /metrics answered {status}:\n{body}"
        );
        body
    }

    /// Sends SIGHUP and returns the next `reloaded: ...` or `reload failed`
    /// line.
    pub fn reload(&self) -> String {
        let mark = self.server.log_len();
        self.server.signal(libc::SIGHUP);
        self.wait_for_reload(mark)
    }

    /// The first `reloaded: ...` or `reload failed` line after line `mark`.
    pub fn wait_for_reload(&self, mark: usize) -> String {
        self.server.wait_for_log_since(mark, |l| {
            l.contains("reloaded: ") || l.contains("reload failed")
        })
    }
}

impl std::ops::Deref for ConfigServer {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}

impl std::ops::DerefMut for ConfigServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

/// A plain HTTP/1.0 `GET`: the status line and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = connect(addr);
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        panic!(
            "GET {path} from {addr} failed after {} bytes of the response: {e}",
            response.len()
        );
    }
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the headers in:\n{response}"));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// One short connection: sends `data`, half-closes, reads the reply to EOF.
pub fn short_exchange(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    stream.write_all(data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(reply)
}

/// Continuous load: short echo connections to one address from
/// [`LOAD_CLIENTS`] clients at once, each one connection after another, on
/// threads of their own, until [`Load::finish`]. Counts those served and
/// keeps what went wrong with the others, for the tests that change the
/// server under running clients (upgrades, a drain behind a balancer).
pub struct Load {
    served: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// The clients of a [`Load`].
pub const LOAD_CLIENTS: usize = 4;

impl Load {
    pub fn start(addr: SocketAddr) -> Load {
        let served = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..LOAD_CLIENTS)
            .map(|client| {
                let (served, failures, stop) = (served.clone(), failures.clone(), stop.clone());
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let data = format!("client {client} short {n}");
                        let failed = match short_exchange(addr, data.as_bytes()) {
                            Ok(reply) if reply == data.as_bytes() => None,
                            Ok(reply) => Some(format!(
                                "client {client} connection {n}: echoed {:?}",
                                String::from_utf8_lossy(&reply)
                            )),
                            Err(e) => Some(format!("client {client} connection {n}: {e}")),
                        };
                        match failed {
                            None => served.fetch_add(1, Ordering::SeqCst),
                            Some(what) => {
                                failures.lock().unwrap().push(what);
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            served,
            failures,
            stop,
            threads,
        }
    }

    /// Waits until `more` connections beyond those served so far are served.
    pub fn wait_for_more(&self, more: usize) {
        let target = self.served.load(Ordering::SeqCst) + more;
        eventually(PATIENCE, || {
            let served = self.served.load(Ordering::SeqCst);
            if served >= target {
                Ok(())
            } else {
                Err(format!("{served} of {target} short connections served"))
            }
        });
    }

    /// Stops it; returns how many were served and what failed.
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.served.load(Ordering::SeqCst), failures)
    }
}

/// One exchange over a Unix socket: sends `data`, half-closes, reads the
/// reply to EOF.
pub fn unix_exchange(path: &Path, data: &[u8]) -> Vec<u8> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    reply
}
