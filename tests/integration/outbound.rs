//! Outbound grants (issue 15): `handlers/redis-guard` in front of a real
//! Debian `redis-server` (started per test on a free port, no persistence),
//! driven by `redis-cli` and `redis-benchmark`; refused connects and their
//! log line; every outbound socket closed when the instance ends (the
//! client's end, a timeout while the guest waits on its upstream, a trap),
//! under every strategy; grant settings refused and listed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::thread;

use harness::{Launch, Process};

use crate::for_each_strategy;
use crate::support::{
    connect, eventually, guest, http_get, one_error_line, run_host, Server, Strategy, TempDir,
    PATIENCE,
};

for_each_strategy!(
    redis_cli_through_the_guard_sets_gets_and_is_refused_flushall_and_config,
    redis_benchmark_through_the_guard_has_no_errors,
    the_upstream_sees_eof_when_the_client_ends_on_a_timeout_and_on_a_trap,
    a_connect_that_never_completes_ends_at_the_timeout,
);

// ---------------------------------------------------------------------------
// Redis.

/// A Redis tool (`redis-server`, `redis-cli`, `redis-benchmark`), or `None`
/// (said out loud) when it is not installed and the run is not CI's; under
/// CI (`CI` set) its absence fails the test.
fn redis_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|bin| bin.is_file());
    if found.is_none() {
        let why = format!(
            "{name} is not installed (Debian packages redis-server and redis-tools; \
             handlers/install-toolchains.sh redis installs them)"
        );
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    found
}

/// The three tools, or `None` (said out loud) outside CI.
struct Tools {
    server: PathBuf,
    cli: PathBuf,
    benchmark: PathBuf,
}

fn tools() -> Option<Tools> {
    Some(Tools {
        server: redis_tool("redis-server")?,
        cli: redis_tool("redis-cli")?,
        benchmark: redis_tool("redis-benchmark")?,
    })
}

/// A `redis-server` on a free port of 127.0.0.1 without persistence,
/// killed when dropped.
struct Redis {
    _process: Process,
    _dir: TempDir,
    addr: SocketAddr,
}

fn start_redis(tools: &Tools) -> Redis {
    let dir = TempDir::new("redis");
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut command = Command::new(&tools.server);
    command
        .args(["--bind", "127.0.0.1", "--port"])
        .arg(addr.port().to_string())
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path());
    let mut process = Launch::new(command)
        .own_group()
        .spawn()
        .expect("cannot start redis-server");
    eventually(PATIENCE, || {
        if let Ok(Some(status)) = process.try_wait() {
            panic!(
                "redis-server exited ({status}):\n{}",
                process.log().join("\n")
            );
        }
        TcpStream::connect(addr).map_err(|e| format!("redis-server {addr}: {e}"))
    });
    Redis {
        _process: process,
        _dir: dir,
        addr,
    }
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS`: its output, trimmed.
fn cli(tools: &Tools, addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(&tools.cli)
        .args(["-h", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .args(args)
        .output()
        .expect("cannot run redis-cli");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.trim().to_string()
}

/// The host serving redis-guard in front of `upstream`, granted it.
fn guard(strategy: Strategy, upstream: SocketAddr, extra: &[&str]) -> Server {
    let env = format!("UPSTREAM={upstream}");
    let grant = upstream.to_string();
    let mut args = vec!["--env", &env, "--allow-outbound", &grant];
    args.extend_from_slice(extra);
    Server::start(strategy, Some(&guest("redis-guard")), &args)
}

// ---------------------------------------------------------------------------
// redis-cli and redis-benchmark through the guard.

fn redis_cli_through_the_guard_sets_gets_and_is_refused_flushall_and_config(strategy: Strategy) {
    let Some(tools) = tools() else { return };
    let redis = start_redis(&tools);
    let server = guard(strategy, redis.addr, &[]);
    let via = server.addr();
    assert_eq!(cli(&tools, via, &["SET", "greeting", "hello"]), "OK");
    assert_eq!(cli(&tools, via, &["GET", "greeting"]), "hello");
    assert_eq!(
        cli(&tools, via, &["FLUSHALL"]),
        "ERR redis-guard: FLUSHALL is not allowed"
    );
    // Not forwarded: the data is still there, asked of Redis directly.
    assert_eq!(cli(&tools, redis.addr, &["GET", "greeting"]), "hello");
    assert_eq!(
        cli(&tools, via, &["CONFIG", "GET", "*"]),
        "ERR redis-guard: CONFIG is not allowed"
    );
    // A pipeline mixing forwarded and refused commands: replies in order.
    let mut stream = connect(via);
    stream
        .write_all(b"*2\r\n$3\r\nGET\r\n$8\r\ngreeting\r\n*1\r\n$7\r\nFLUSHDB\r\nPING\r\n")
        .unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut replies = String::new();
    stream.read_to_string(&mut replies).unwrap();
    assert_eq!(
        replies,
        "$5\r\nhello\r\n-ERR redis-guard: FLUSHDB is not allowed\r\n+PONG\r\n"
    );
}

/// redis-benchmark's CSV rows (`"SET","21141.65",...`): test and requests
/// per second; fails on any error it reports.
fn benchmark(tools: &Tools, addr: SocketAddr, args: &[&str]) -> Vec<(String, f64)> {
    let out = Command::new(&tools.benchmark)
        .args(["-h", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .args(args)
        .arg("--csv")
        .output()
        .expect("cannot run redis-benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("Error") && !stderr.contains("Error"),
        "redis-benchmark {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .skip(1)
        .map(|line| {
            let cells: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
            let rps = cells.get(1).and_then(|r| r.parse().ok());
            (
                cells[0].to_string(),
                rps.unwrap_or_else(|| panic!("{line}")),
            )
        })
        .collect()
}

fn redis_benchmark_through_the_guard_has_no_errors(strategy: Strategy) {
    let Some(tools) = tools() else { return };
    let redis = start_redis(&tools);
    // Each benchmark client is one connection for the whole run.
    let server = guard(
        strategy,
        redis.addr,
        &["--timeout", "10m", "--idle-timeout", "1m"],
    );
    // The numbers are the bench's (bench/: the redis scenario);
    // fewer requests here keep the suite short on a loaded machine.
    for args in [
        &["-t", "set,get", "-n", "20000", "-c", "50"][..],
        &["-t", "set,get", "-n", "100000", "-c", "50", "-P", "16"][..],
    ] {
        let rows = benchmark(&tools, server.addr(), args);
        let tests: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tests, ["SET", "GET"], "{rows:?}");
        assert!(rows.iter().all(|(_, rps)| *rps > 0.0), "{rows:?}");
    }
    // Every SET reached Redis: its key is there.
    assert_ne!(cli(&tools, redis.addr, &["GET", "key:__rand_int__"]), "");
    let log = server.log();
    assert!(
        !log.iter().any(|l| l.contains("refused")),
        "{}",
        log.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Refusals.

#[test]
fn a_tenant_without_the_grant_gets_an_error_reply_and_the_log_names_the_address() {
    let Some(tools) = tools() else { return };
    let redis = start_redis(&tools);
    let env = format!("UPSTREAM={}", redis.addr);
    // Granted another port of the same address only.
    let other = format!("127.0.0.1:{}", redis.addr.port() ^ 1);
    let server = Server::start(
        Strategy::Threading,
        Some(&guest("redis-guard")),
        &[
            "--env",
            &env,
            "--allow-outbound",
            &other,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let reply = cli(&tools, server.addr(), &["GET", "greeting"]);
    assert!(
        reply.starts_with(&format!(
            "ERR redis-guard: upstream {} unreachable: ",
            redis.addr
        )),
        "{reply}"
    );
    let wanted = format!(
        "outbound connect to {} refused: no grant of the tenant names it (tenant default)",
        redis.addr
    );
    server.wait_for_log(|l| l.contains(&wanted));
    let metrics = server.metrics_addr();
    eventually(PATIENCE, || {
        let (_, page) = http_get(metrics, "/metrics");
        let want = [
            "host_outbound_connections_total{tenant=\"default\",result=\"opened\"} 0",
            "host_outbound_connections_total{tenant=\"default\",result=\"refused\"} 1",
        ];
        match want.iter().find(|w| !page.contains(*w)) {
            None => Ok(()),
            Some(missing) => Err(format!("no {missing} in:\n{page}")),
        }
    });

    // No grant at all: the guest cannot even make a socket.
    let bare = Server::start(
        Strategy::Threading,
        Some(&guest("redis-guard")),
        &["--env", &env],
    );
    let reply = cli(&tools, bare.addr(), &["GET", "greeting"]);
    assert!(reply.starts_with("ERR redis-guard: upstream "), "{reply}");
    bare.wait_for_log(|l| {
        l.contains(
            "outbound socket refused: the tenant grants no outbound network (tenant default)",
        )
    });
}

// ---------------------------------------------------------------------------
// Outbound sockets end with their instance.

/// A stand-in upstream: accepts one connection, answers `+PONG` to its
/// first bytes if `answer`, then reads to the end; sends how that end came
/// (`eof`, or an error) once the guest's socket is closed.
fn upstream(answer: bool) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 64 * 1024];
        let mut answered = !answer;
        let end = loop {
            match stream.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(_) if !answered => {
                    answered = true;
                    let _ = stream.write_all(b"+PONG\r\n");
                }
                Ok(_) => {}
                Err(e) => break format!("error: {e}"),
            }
        };
        let _ = tx.send(end);
    });
    (addr, rx)
}

fn the_upstream_sees_eof_when_the_client_ends_on_a_timeout_and_on_a_trap(strategy: Strategy) {
    // The client ends its connection: the guest returns, its socket closes.
    let (addr, ended) = upstream(true);
    let server = guard(strategy, addr, &[]);
    let mut stream = connect(server.addr());
    stream.write_all(b"PING\r\n").unwrap();
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+PONG\r\n");
    drop(stream);
    assert_eq!(ended.recv_timeout(PATIENCE).unwrap(), "eof");
    server.wait_for_log(|l| l.contains("closed") && l.contains("outcome=ok"));

    // The guest waits on an upstream that never answers: the connection's
    // --timeout ends the wait, the instance and its socket.
    let (addr, ended) = upstream(false);
    let server = guard(strategy, addr, &["--timeout", "2s"]);
    let mut stream = connect(server.addr());
    stream.write_all(b"PING\r\n").unwrap();
    assert_eq!(ended.recv_timeout(PATIENCE).unwrap(), "eof");
    server.wait_for_log(|l| l.contains("closed") && l.contains("outcome=timeout"));
    drop(stream);

    // A trap (the guest runs out of memory buffering a huge command).
    let (addr, ended) = upstream(true);
    let server = guard(strategy, addr, &["--max-memory", "16MiB"]);
    let mut stream = connect(server.addr());
    stream.write_all(b"PING\r\n").unwrap();
    stream.read_exact(&mut reply).unwrap();
    stream.write_all(b"*1\r\n$100000000\r\n").unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    assert_eq!(ended.recv_timeout(PATIENCE).unwrap(), "eof");
    server.wait_for_log(|l| {
        l.contains("closed") && (l.contains("outcome=memory-limit") || l.contains("outcome=trap"))
    });
}

/// A listener whose backlog is full, so the kernel drops further SYNs: a
/// connect to it neither completes nor fails for minutes.
fn full_backlog() -> (socket2::Socket, Vec<socket2::Socket>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let fillers = (0..4)
        .map(|_| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_nonblocking(true).unwrap();
            let _ = socket.connect(&addr.into());
            socket
        })
        .collect();
    (listener, fillers, addr)
}

fn a_connect_that_never_completes_ends_at_the_timeout(strategy: Strategy) {
    let (_listener, _fillers, addr) = full_backlog();
    let server = guard(strategy, addr, &["--timeout", "2s"]);
    let mut stream = connect(server.addr());
    stream.write_all(b"PING\r\n").unwrap();
    let line = server.wait_for_log(|l| l.contains(" closed ") && l.contains("tenant=default"));
    assert!(line.contains("outcome=timeout"), "{line}");
}

// ---------------------------------------------------------------------------
// Settings.

#[test]
fn bad_grants_are_refused_in_one_line_and_config_check_lists_the_grants() {
    let tail = "(expected HOST:PORT, IP:PORT, CIDR:PORT or [IPv6]:PORT; PORT may be *)";
    for (grant, why) in [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:0", "the port is not 1 to 65535 or *"),
        (
            "::1:6379",
            "an IPv6 address goes in brackets, e.g. [::1]:6379",
        ),
        ("10.0.0.0/33:443", "not a network in CIDR form"),
    ] {
        let out = run_host(&["serve", "--addr", "127.0.0.1:0", "--allow-outbound", grant]);
        assert_eq!(
            one_error_line(&out),
            format!("error: invalid --allow-outbound {grant:?}: {why} {tail}"),
            "{grant}"
        );
    }

    let dir = TempDir::new("outbound-config");
    let file = dir.path().join("host.toml");
    std::fs::write(
        &file,
        "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n\
         allow-outbound = [\"127.0.0.1:6379\", \"localhost:*\", \"10.0.0.0/8:443\", \"[::1]:*\"]\n\
         max-outbound = 2\n\
         [tenants.b]\nlisten = [\"127.0.0.1:0\"]\nallow-outbound = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = run_host(&["config", "check", path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "{path}:7:19: invalid allow-outbound \"10.0.0.0/8\": no port {tail}"
        )),
        "{stderr}"
    );
    std::fs::write(
        &file,
        "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n\
         allow-outbound = [\"127.0.0.1:6379\", \"localhost:*\", \"10.0.0.0/8:443\", \"[::1]:*\"]\n\
         max-outbound = 2\n",
    )
    .unwrap();
    let out = run_host(&["config", "check", path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "allow-outbound = [\"127.0.0.1:6379\", \"localhost:*\", \"10.0.0.0/8:443\", \"[::1]:*\"]\nmax-outbound = 2\n"
        ),
        "{stdout}"
    );
}
