//! Faults found by trying to break the host (issue 12), each pinned by the
//! scenario that found it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::support::{eventually, guest, Server, TempDir, PATIENCE};

// ---------------------------------------------------------------------------
// Forged log lines (#3): whatever a client or a guest controls is one line.

/// What the client's path and the guest's output try to slip into the log.
const FORGED: &str = "INFO connection 999 closed peer=10.6.6.6:1 tenant=admin outcome=ok";

/// Serves the test guest on a Unix socket, connects from a client socket
/// bound to a path holding a newline and a forged log line, and asks the
/// guest to print and return text full of control characters. Returns the
/// host's log.
fn forge_log_lines(format: &str) -> Vec<String> {
    let dir = TempDir::new("forge");
    let sock = dir.path().join("h.sock");
    let args: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        "--addr".into(),
        format!("unix:{}", sock.display()).into(),
        "--handler".into(),
        guest("test-guest").into(),
        "--log-format".into(),
        format.into(),
    ];
    let server = Server::spawn(&args, &[]);
    server.wait_for_log(|l| l.contains("listening on unix:"));

    // A client may bind its own socket to any path it can create.
    let client_path = dir.path().join(format!("c\n{FORGED}"));
    let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    client.bind(&SockAddr::unix(&client_path).unwrap()).unwrap();
    client.connect(&SockAddr::unix(&sock).unwrap()).unwrap();
    let mut client = UnixStream::from(std::os::fd::OwnedFd::from(client));
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    // A newline, a carriage return, ESC, DEL and C1 (NEL, U+0085, in UTF-8).
    let text = "x%0AINFO connection 998 closed peer=10.6.6.7:1 outcome=ok\
                %0DINFO connection 997 closed%1B[2J%7F%C2%85INFO connection 996%09end";
    client
        .write_all(format!("forge {text}\n").as_bytes())
        .unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply);
    server.wait_for_log(|l| l.contains(" closed ") && l.contains("handler-error"));
    server.log()
}

/// Every line of the log: no control character (JSON: none that JSON must
/// escape), and no line that is the forged one.
fn assert_no_forged_line(log: &[String], json: bool) {
    let all = log.join("\n");
    let forbidden = |c: char| match json {
        false => c.is_control(),
        true => c < ' ',
    };
    for line in log {
        assert!(
            !line.chars().any(forbidden),
            "a log line holds a control character: {line:?}\nthe log:\n{all}"
        );
        assert!(
            !line.starts_with("INFO connection 99"),
            "a forged log line: {line:?}\nthe log:\n{all}"
        );
    }
}

#[test]
fn a_text_log_line_cannot_be_forged() {
    let log = forge_log_lines("text");
    assert_no_forged_line(&log, false);
    let all = log.join("\n");
    // The values are there, escaped.
    let closed = log
        .iter()
        .find(|l| l.contains(" closed peer=unix:"))
        .unwrap_or_else(|| panic!("no closed line:\n{all}"));
    assert!(
        closed.contains(&format!("/c\\n{FORGED} worker=")),
        "the peer path is not escaped: {closed}"
    );
    assert!(
        closed.contains("\\n") && closed.contains("handler-error error=\"x\\n"),
        "the guest's error is not escaped: {closed}"
    );
    for stream in ["stdout", "stderr"] {
        let marker = format!(" {stream}: INFO connection 998 closed peer=10.6.6.7:1 outcome=ok\\rINFO connection 997 closed\\u{{1b}}[2J\\u{{7f}}\\u{{85}}INFO connection 996\\tend");
        assert!(
            log.iter().any(|l| l.ends_with(&marker)),
            "no escaped {stream} line ending {marker:?}:\n{all}"
        );
    }
}

#[test]
fn a_json_log_line_cannot_be_forged() {
    let log = forge_log_lines("json");
    assert_no_forged_line(&log, true);
    let mut peers = Vec::new();
    for line in &log {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        let message = event["fields"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.starts_with("INFO connection 99"),
            "a forged event: {line}"
        );
        if let Some(peer) = event["fields"]["peer"].as_str() {
            peers.push(peer.to_string());
        }
    }
    assert!(
        peers.iter().any(|p| p.ends_with(&format!("/c\\n{FORGED}"))),
        "no event has the client's path as its peer, escaped: {peers:?}"
    );
}

// ---------------------------------------------------------------------------
// A busy Unix socket at a listen path (#2): probing it never blocks.

/// A live Unix listener at `path` whose backlog is full: the next client's
/// blocking connect would wait until the listener accepts, which it never
/// does. Returns the listener and the clients filling its backlog.
fn busy_unix_listener(path: &Path) -> (Socket, Vec<Socket>) {
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    listener.bind(&SockAddr::unix(path).unwrap()).unwrap();
    listener.listen(0).unwrap();
    let mut clients = Vec::new();
    loop {
        let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&SockAddr::unix(path).unwrap()) {
            Ok(()) => clients.push(client),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => panic!("cannot fill the backlog of {}: {e}", path.display()),
        }
        assert!(clients.len() < 1000, "the backlog never fills");
    }
    (listener, clients)
}

#[test]
fn a_busy_unix_socket_is_refused_at_start_without_hanging() {
    let dir = TempDir::new("busy");
    let sock = dir.path().join("busy.sock");
    let _busy = busy_unix_listener(&sock);
    let started = std::time::Instant::now();
    // `run_host` fails the test if the host does not exit by itself.
    let out = crate::support::run_host(&[
        "serve",
        "--addr",
        &format!("unix:{}", sock.display()),
        "--cache-dir",
        crate::support::test_cache_dir().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the host served:\n{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "refusing took {:?}",
        started.elapsed()
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(
        error.contains(&format!("{} is in use by a running server", sock.display())),
        "{error}"
    );
    assert!(sock.exists(), "the busy server's socket file was removed");
}

#[test]
fn a_busy_unix_socket_fails_a_reload_without_hanging_the_host() {
    let busy_dir = TempDir::new("busy-reload");
    let sock = busy_dir.path().join("busy.sock");
    let _busy = busy_unix_listener(&sock);
    let before = "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n";
    let mut server = Server::start_config(before, &[]);
    let addr = server.addr("a");
    server.rewrite(&format!(
        "[tenants.a]\nlisten = [\"127.0.0.1:0\", {}]\n",
        crate::support::toml_string(&format!("unix:{}", sock.display()))
    ));
    let line = server.reload();
    assert!(
        line.contains("reload failed") && line.contains("is in use by a running server"),
        "{line}"
    );
    // The host still serves, and still obeys SIGTERM.
    assert_eq!(crate::support::exchange(addr, b"still here"), b"still here");
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------------------
// Special files as a handler (#5): only regular files, of bounded size,
// opened without blocking.

/// A named pipe at `path` that nobody writes to: opening it for reading
/// blocks until a writer comes, reading it until one writes.
fn make_fifo(path: &Path) {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let made = unsafe { libc::mkfifo(name.as_ptr(), 0o600) };
    assert_eq!(made, 0, "mkfifo {}", path.display());
}

/// `host config check` of a tenant whose handler is `handler`: it must fail
/// by itself, quickly, with one error line; returns that line.
fn config_check_error(dir: &Path, handler: &Path) -> String {
    let file = dir.join("host.toml");
    std::fs::write(
        &file,
        format!(
            "[tenants.a]\nhandler = {}\nlisten = [\"127.0.0.1:0\"]\n",
            crate::support::toml_path(handler)
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let cache = crate::support::test_cache_dir();
    let out = crate::support::run_host(&[
        "config",
        "check",
        file.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "config check took {:?}",
        started.elapsed()
    );
    crate::support::one_error_line(&out)
}

#[test]
fn a_fifo_a_device_or_a_huge_file_is_refused_as_a_handler() {
    let dir = TempDir::new("special");
    let fifo = dir.path().join("handler.fifo");
    make_fifo(&fifo);
    let error = config_check_error(dir.path(), &fifo);
    assert!(
        error.contains(&format!(
            "handler {} is a named pipe (FIFO), not a regular file",
            fifo.display()
        )),
        "{error}"
    );

    let error = config_check_error(dir.path(), Path::new("/dev/zero"));
    assert!(
        error.contains("handler /dev/zero is a character device, not a regular file"),
        "{error}"
    );

    // A sparse file: big, without using the disk.
    let huge = dir.path().join("huge.wasm");
    let size: u64 = (512 << 20) + 1;
    std::fs::File::create(&huge).unwrap().set_len(size).unwrap();
    let error = config_check_error(dir.path(), &huge);
    assert!(
        error.contains(&format!(
            "handler {} is {size} bytes, more than the {} bytes (512 MiB) a handler may have",
            huge.display(),
            512u64 << 20
        )),
        "{error}"
    );

    // `serve` refuses the FIFO the same way, before listening.
    let cache = crate::support::test_cache_dir();
    let out = crate::support::run_host(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--handler",
        fifo.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the host served:\n{stderr}");
    assert!(!stderr.contains("listening on"), "it listened:\n{stderr}");
    assert!(stderr.contains("is a named pipe (FIFO)"), "{stderr}");
}

#[test]
fn a_reload_to_a_fifo_handler_fails_and_the_host_goes_on() {
    let dir = TempDir::new("fifo-reload");
    let fifo = dir.path().join("handler.fifo");
    make_fifo(&fifo);
    let mut server = Server::start_config("[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n", &[]);
    let addr = server.addr("a");
    server.rewrite(&format!(
        "[tenants.a]\nhandler = {}\nlisten = [\"127.0.0.1:0\"]\n",
        crate::support::toml_path(&fifo)
    ));
    let line = server.reload();
    assert!(
        line.contains("reload failed") && line.contains("is a named pipe (FIFO)"),
        "{line}"
    );
    assert_eq!(crate::support::exchange(addr, b"still here"), b"still here");
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------------------
// A forking worker's children die with it (#4).

/// A connection the test guest holds open (`hold`): the pid of the child
/// serving it (from the worker name it replies), and the client's stream.
fn hold(server: &Server) -> (u32, std::net::TcpStream) {
    let mut stream = server.connect();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"hold\n").unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        name.push(byte[0]);
    }
    let name = String::from_utf8(name).unwrap();
    let child = name
        .strip_prefix("pid-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a forking worker name: {name:?}"));
    (child, stream)
}

#[test]
fn a_killed_forking_worker_takes_its_connections_children_with_it() {
    let handler = guest("test-guest");
    // Limits far beyond the test: only the worker's death may end the child.
    let limits = ["--timeout", "5m", "--idle-timeout", "5m"];
    let mut server = Server::start(crate::support::Strategy::Forking, Some(&handler), &limits);
    // The worker is forked right after the `listening on` line.
    let workers = eventually(PATIENCE, || {
        let workers = crate::support::children_of(server.pid());
        if workers.is_empty() {
            Err("the host has no worker process")
        } else {
            Ok(workers)
        }
    });
    assert_eq!(workers.len(), 1, "one worker process: {workers:?}");
    let worker = workers[0];

    // Two connections held open by their children.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (child, stream) = hold(&server);
        assert!(
            crate::support::children_of(worker).contains(&child),
            "the connection's child pid-{child} is not the worker's"
        );
        held.push((child, stream));
    }

    // SAFETY: killing the host's worker process, which this test started.
    unsafe { libc::kill(worker as libc::pid_t, libc::SIGKILL) };
    for (child, stream) in &mut held {
        eventually(std::time::Duration::from_secs(5), || {
            if crate::support::process_exists(*child) {
                Err(format!(
                    "the connection's child pid-{child} outlived its killed worker"
                ))
            } else {
                Ok(())
            }
        });
        // Its client sees the end of the connection.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }

    // The host replaces the worker and still serves.
    server.wait_for_log(|l| l.contains(&format!("pid-{worker} was killed by signal 9")));
    let reply = crate::support::exchange(server.addr(), b"hold\n");
    assert!(reply.starts_with(b"pid-"), "{reply:?}");

    // Again, with the host told to stop right after the kill: by its last
    // line, every process it started is gone.
    let worker = *crate::support::children_of(server.pid())
        .first()
        .expect("a replacement worker");
    let (child, _stream) = hold(&server);
    assert!(crate::support::children_of(worker).contains(&child));
    // SAFETY: as above.
    unsafe { libc::kill(worker as libc::pid_t, libc::SIGKILL) };
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    assert!(status.success(), "{status}");
    let log = server.log();
    assert!(
        log.last()
            .is_some_and(|l| l.ends_with("stopped; every worker process reaped")),
        "{}",
        log.join("\n")
    );
    for pid in [worker, child] {
        assert!(
            !crate::support::process_exists(pid),
            "pid {pid} outlived the host"
        );
    }
}

// ---------------------------------------------------------------------------
// The metrics endpoint is not starved by idle connections (#8).

#[test]
fn scrapes_succeed_while_32_idle_clients_hold_the_metrics_port() {
    let toml = "[metrics]\naddr = \"127.0.0.1:0\"\n\n[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n";
    let server = Server::start_config(toml, &[]);
    let metrics = server.metrics_addr();
    let idle: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(metrics).unwrap())
        .collect();
    // Let the metrics process accept every idle client first.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let (status, body) = crate::support::http_get(metrics, "/metrics");
        assert!(status.contains(" 200 "), "GET /metrics answered {status}");
        assert!(body.contains("host_connections"), "{body}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "a scrape took {:?}",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(idle);
}

// ---------------------------------------------------------------------------
// `config check` finds what `serve` would refuse (#6); the bad Unix paths
// are in `tenants::BAD_CONFIGS`.

/// A TCP port free on 0.0.0.0 and on [::] at the time of asking.
fn free_port() -> u16 {
    loop {
        let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        v6.set_only_v6(true).unwrap();
        let any6: std::net::SocketAddr = format!("[::]:{port}").parse().unwrap();
        if v6.bind(&any6.into()).is_ok() {
            return port;
        }
    }
}

#[test]
fn ipv4_and_ipv6_wildcards_on_one_port_coexist() {
    let (p, q) = (free_port(), free_port());
    let toml = format!(
        "[metrics]\naddr = \"[::]:{q}\"\n\n\
         [tenants.a]\nlisten = [\"0.0.0.0:{p}\", \"0.0.0.0:{q}\"]\n\n\
         [tenants.b]\nhandler = {}\nlisten = [\"[::]:{p}\"]\n",
        crate::support::toml_path(&guest("test-guest"))
    );
    let dir = TempDir::new("dual");
    let file = dir.path().join("host.toml");
    std::fs::write(&file, &toml).unwrap();
    let cache = crate::support::test_cache_dir();
    let out = crate::support::run_host(&[
        "config",
        "check",
        file.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "config check refused:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And `serve` binds all of it: IPv4 clients reach a, IPv6 clients b.
    let server = Server::start_config(&toml, &[]);
    let v4: std::net::SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
    let v6: std::net::SocketAddr = format!("[::1]:{p}").parse().unwrap();
    assert_eq!(crate::support::exchange(v4, b"count\n"), b"count\n");
    assert_eq!(crate::support::exchange(v6, b"count\n"), b"1");
    let other: std::net::SocketAddr = format!("127.0.0.1:{q}").parse().unwrap();
    assert_eq!(crate::support::exchange(other, b"a"), b"a");
    let metrics: std::net::SocketAddr = format!("[::1]:{q}").parse().unwrap();
    let (status, _) = crate::support::http_get(metrics, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    drop(server);
}

#[test]
fn more_than_1024_tenants_are_refused_at_the_first_one_too_many() {
    let mut toml = String::new();
    for n in 1..=1025 {
        toml.push_str(&format!("[tenants.t{n:04}]\nlisten = [\"127.0.0.1:0\"]\n"));
    }
    let dir = TempDir::new("tenants");
    let file = dir.path().join("host.toml");
    std::fs::write(&file, &toml).unwrap();
    let path = file.to_str().unwrap();
    let cache = crate::support::test_cache_dir();
    let cache = cache.to_str().unwrap();
    let check = crate::support::run_host(&["config", "check", path, "--cache-dir", cache]);
    let serve = crate::support::run_host(&["serve", "--config", path, "--cache-dir", cache]);
    // Tenant 1025's table starts on line 2 * 1024 + 1.
    let expected = format!(
        "error: {path}:2049:1: too many tenants: tenant \"t1025\" is number 1025, and one host serves at most 1024"
    );
    for (what, out) in [("config check", check), ("serve", serve)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} accepted it");
        assert!(!stderr.contains("listening on"), "{what} listened");
        let error = stderr.lines().find(|l| l.starts_with("error: "));
        assert_eq!(error, Some(expected.as_str()), "{what}:\n{stderr}");
    }
}

// ---------------------------------------------------------------------------
// Descriptor exhaustion (#1): a burst bigger than the descriptor limit allows
// waits in the backlog; the tenant keeps serving afterwards.

/// Starts the built-in echo under `strategy` with the open-file limit (soft
/// and hard) at `nofile`, waiting for its `listening on` line.
fn start_with_nofile(strategy: &str, nofile: u64, extra: &[&str]) -> Server {
    use std::os::unix::process::CommandExt;
    let mut args: Vec<std::ffi::OsString> = ["serve", "--addr", "127.0.0.1:0", "--strategy"]
        .into_iter()
        .map(Into::into)
        .collect();
    args.push(strategy.into());
    let mut server = Server::spawn_with(&args, extra, |command| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let line = server.wait_for_log(|l| l.starts_with("listening on "));
    server.set_addr(
        line["listening on ".len()..]
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .expect("listening on IP:PORT"),
    );
    server
}

/// `ulimit -n 64`, `--max-connections 500`, and 600 clients at once reaching
/// a fresh worker: every one is echoed (those beyond what 64 descriptors
/// allow wait in the backlog, not in a worker out of descriptors), and the
/// tenant serves as before afterwards. Before the fix the first connection
/// built wasmtime-wasi's runtime out of descriptors, poisoning it: every
/// later connection panicked and hung, and the worker was never replaced.
fn a_burst_past_the_descriptor_limit_is_served(strategy: &str) {
    let server = start_with_nofile(strategy, 64, &["--max-connections", "500"]);
    let addr = server.addr();
    let clients: Vec<_> = (0..600u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = format!("client {i}");
                crate::support::exchange(addr, data.as_bytes()) == data.as_bytes()
            })
        })
        .collect();
    let served = clients
        .into_iter()
        .map(|c| c.join().unwrap_or(false))
        .filter(|&ok| ok)
        .count();
    assert_eq!(served, 600, "{served} of 600 clients were echoed");
    for i in 0..20u64 {
        let data = format!("after {i}");
        assert_eq!(
            crate::support::exchange(addr, data.as_bytes()),
            data.as_bytes()
        );
    }
    let log = server.log();
    assert!(
        !log.iter()
            .any(|l| l.contains("panicked") || l.contains("poisoned")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("the descriptor limit (64) allows")),
        "no line says the limit narrows --max-connections"
    );
}

#[test]
fn a_burst_past_the_descriptor_limit_is_served_threading() {
    a_burst_past_the_descriptor_limit_is_served("threading");
}

#[test]
fn a_burst_past_the_descriptor_limit_is_served_async() {
    a_burst_past_the_descriptor_limit_is_served("async");
}

// ---------------------------------------------------------------------------
// The idle timeout's bound (#7): a connection is closed once it has made no
// progress for --idle-timeout, not twice that or that plus a linger.

/// A client that sends a line and then neither sends nor closes: its echo
/// comes back and the host closes the connection one idle timeout later
/// (before: the idle timeout plus a 2 s linger).
#[test]
fn a_silent_client_is_closed_after_one_idle_timeout() {
    let _alone = crate::support::alone();
    let server = Server::start(
        crate::support::Strategy::Threading,
        None,
        &["--idle-timeout", "1s"],
    );
    let mut stream = server.connect();
    stream.write_all(b"hello").unwrap();
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo).unwrap();
    let silent_from = std::time::Instant::now();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let held = silent_from.elapsed();
    assert!(
        held >= std::time::Duration::from_millis(900)
            && held < std::time::Duration::from_millis(1800),
        "a silent client was held {held:?} with --idle-timeout 1s"
    );
}

/// A client that keeps sending and never reads: once both directions are
/// full nothing moves, and the host closes the connection one idle timeout
/// after that (before: twice the idle timeout).
#[test]
fn a_client_that_never_reads_is_closed_after_one_idle_timeout() {
    let _alone = crate::support::alone();
    let server = Server::start(
        crate::support::Strategy::Threading,
        None,
        &["--idle-timeout", "1s"],
    );
    let mut stream = server.connect();
    stream
        .set_write_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let started = std::time::Instant::now();
    // When the last write made progress, and when the host closed.
    let mut last_progress = std::time::Instant::now();
    let closed_at = loop {
        assert!(started.elapsed() < PATIENCE, "the host never closed");
        match stream.write(&chunk) {
            Ok(_) => last_progress = std::time::Instant::now(),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break std::time::Instant::now(),
        }
    };
    let stalled = closed_at - last_progress;
    assert!(
        stalled < std::time::Duration::from_millis(1800),
        "closed {stalled:?} after the last progress with --idle-timeout 1s"
    );
    let line = server.wait_for_log(|l| l.contains(" closed "));
    assert!(line.contains("outcome=idle-timeout"), "{line}");
}
