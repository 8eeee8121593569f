//! Upgrades that drop nothing (issue 14, part 4): a new `host serve
//! --take-over` takes the running host's listening sockets over its
//! `--upgrade-socket`, and only once it is ready does the old one drain.
//! Under continuous short connections and 50 held streams, three upgrades in
//! a row lose nothing; a successor that fails leaves the running host
//! serving, its socket files in place.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;

use crate::for_each_strategy;
use crate::support::{
    connect, run_host, short_exchange, unix_exchange, Load, Server, Strategy, TempDir,
};

/// Held streams, and how many upgrades happen while they are held.
const HELD: usize = 50;
const UPGRADES: usize = 3;

/// The flags every host of one test shares, `--take-over` aside.
fn host_args(strategy: Strategy, addr: &str, upgrade: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["serve", "--addr", addr, "--strategy", strategy.name()]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.push("--upgrade-socket".into());
    args.push(upgrade.into());
    // The held streams outlive three upgrades on the first host.
    args.push("--drain-timeout".into());
    args.push("120s".into());
    args
}

/// 50 connections that stay open and talk: each round sends every one a
/// line and reads its echo.
struct Held {
    streams: Vec<TcpStream>,
    rounds: usize,
}

impl Held {
    fn open(addr: SocketAddr) -> Held {
        let mut held = Held {
            streams: (0..HELD).map(|_| connect(addr)).collect(),
            rounds: 0,
        };
        held.round();
        held
    }

    fn round(&mut self) {
        self.rounds += 1;
        for (i, stream) in self.streams.iter_mut().enumerate() {
            let line = format!("stream {i} round {}\n", self.rounds);
            stream
                .write_all(line.as_bytes())
                .expect("write on a held stream");
            let mut echo = vec![0; line.len()];
            stream
                .read_exact(&mut echo)
                .unwrap_or_else(|e| panic!("held stream {i}, round {}: {e}", self.rounds));
            assert_eq!(echo, line.as_bytes(), "held stream {i}");
        }
    }

    /// Ends every stream as a client does (half-close) and checks it ends
    /// cleanly: nothing more, then EOF (never a reset).
    fn finish(self) {
        for (i, mut stream) in self.streams.into_iter().enumerate() {
            stream.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .unwrap_or_else(|e| panic!("held stream {i} did not end cleanly: {e}"));
            assert!(rest.is_empty(), "held stream {i}: {rest:?}");
        }
    }
}

fn upgrades_drop_nothing(strategy: Strategy) {
    let dir = TempDir::new("upgrade");
    let upgrade = dir.path().join("upgrade.sock");
    let args = host_args(strategy, "127.0.0.1:0", &upgrade);
    let first = Server::start(
        strategy,
        None,
        &[
            "--upgrade-socket",
            upgrade.to_str().unwrap(),
            "--drain-timeout",
            "120s",
        ],
    );
    let addr = first.addr();
    let mut held = Held::open(addr);
    let load = Load::start(addr);
    load.wait_for_more(20);

    let mut hosts = vec![first];
    for round in 1..=UPGRADES {
        let previous = hosts.last().unwrap().pid();
        let next = Server::spawn(&args, &["--take-over"]);
        let line = next.wait_for_log(|l| l.starts_with("listening on "));
        assert_eq!(
            harness::listening_addr(&line),
            Some(addr),
            "upgrade {round}: the successor listens on the same socket"
        );
        next.wait_for_log(|l| {
            l.contains(&format!(
                "upgrade: took over from the host with pid {previous};"
            ))
        });
        hosts[hosts.len() - 1].wait_for_log(|l| {
            l.contains(&format!(
                "upgrade: the host with pid {} is ready",
                next.pid()
            ))
        });
        // The new host serves, while the old ones drain.
        load.wait_for_more(20);
        held.round();
        hosts.push(next);
    }
    let (served, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {served} served");
    held.round();
    held.finish();

    // Each old host exits by itself once its connections are done.
    let (last, old) = hosts.split_last_mut().unwrap();
    for (i, host) in old.iter_mut().enumerate() {
        let status = host.wait_exit();
        assert!(status.success(), "host {i}: {status:?}\n{:#?}", host.log());
        // Each one served (its log is read by a thread that may lag).
        host.wait_for_log(|l| l.contains(" closed peer="));
    }
    // The last one serves on, and is the one to remove the upgrade socket.
    assert_eq!(short_exchange(addr, b"still here").unwrap(), b"still here");
    assert!(upgrade.exists());
    last.signal(libc::SIGTERM);
    assert!(last.wait_exit().success());
    assert!(
        !upgrade.exists(),
        "the last host removes its upgrade socket"
    );
}

for_each_strategy!(upgrades_drop_nothing);

#[test]
fn a_successor_that_fails_leaves_the_running_host_serving() {
    let dir = TempDir::new("upgrade-fails");
    let upgrade = dir.path().join("upgrade.sock");
    let listen = dir.path().join("echo.sock");
    let addr = format!("unix:{}", listen.display());
    let args = host_args(Strategy::Threading, &addr, &upgrade);
    let running = Server::spawn(&args, &[]);
    running.wait_for_log(|l| l.starts_with("listening on "));
    assert_eq!(unix_exchange(&listen, b"before"), b"before");

    // Takes the sockets, then cannot bind its metrics address: it exits
    // before it is ready, having removed nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let mut failing = Server::spawn(&args, &["--take-over", "--metrics-addr", &busy]);
    assert!(!failing.wait_exit().success());
    // Waited for, not read at once: the log is read from the process's
    // stderr by a thread of its own, which may lag its exit.
    failing.wait_for_log(|l| l.starts_with("error: cannot serve metrics on") && l.contains(&busy));
    running.wait_for_log(|l| l.contains("gave up before it was ready") && l.contains("serving on"));
    assert!(listen.exists() && upgrade.exists());
    assert_eq!(unix_exchange(&listen, b"after"), b"after");

    // A second host that does not ask to take over is told how to.
    let other = dir.path().join("other.sock");
    let out = run_host(&[
        "serve",
        "--addr",
        &format!("unix:{}", other.display()),
        "--upgrade-socket",
        upgrade.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("a host is already listening there (start this one with --take-over"),
        "{stderr}"
    );

    // A successor that takes over a Unix listener owns its file in turn.
    let mut successor = Server::spawn(&args, &["--take-over"]);
    successor.wait_for_log(|l| l.contains("upgrade: took over from the host with pid"));
    assert_eq!(unix_exchange(&listen, b"successor"), b"successor");
    let mut running = running;
    assert!(running.wait_exit().success());
    assert!(
        listen.exists(),
        "the old host left the socket file to its successor"
    );
    assert_eq!(unix_exchange(&listen, b"still"), b"still");
    successor.signal(libc::SIGTERM);
    assert!(successor.wait_exit().success());
    assert!(!listen.exists() && !upgrade.exists());
}

#[test]
fn take_over_with_no_host_running_starts_afresh() {
    let dir = TempDir::new("upgrade-afresh");
    let upgrade = dir.path().join("upgrade.sock");
    let args = host_args(Strategy::Threading, "127.0.0.1:0", &upgrade);
    let mut host = Server::spawn(&args, &["--take-over"]);
    let line = host.wait_for_log(|l| l.starts_with("listening on "));
    host.set_addr(harness::listening_addr(&line).unwrap());
    assert!(host
        .log()
        .iter()
        .any(|l| l.contains("nothing to take over; starting afresh")));
    assert_eq!(short_exchange(host.addr(), b"fresh").unwrap(), b"fresh");
    host.signal(libc::SIGTERM);
    assert!(host.wait_exit().success());
}

/// A stand-in successor in Python: takes the sockets, says which, then on
/// a line from stdin asks for the drain, prints the answer, and serves one
/// echo connection on the handed tenant socket.
const FAKE_SUCCESSOR: &str = r#"
import socket, sys
path = sys.argv[1]
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(path)
conn.send(b"take v1 pid=1")
listen = None
keys = []
while True:
    msg, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    text = msg.decode()
    if text.startswith("socket "):
        keys.append(text[7:])
        if text.startswith("socket listen "):
            listen = socket.socket(fileno=fds[0])
    elif text.startswith("done "):
        break
    else:
        sys.exit("unexpected: " + text)
print("HANDED " + ";".join(keys), flush=True)
sys.stdin.readline()
try:
    conn.send(b"drain")
except OSError:
    pass
print("ANSWER " + conn.recv(64).decode(), flush=True)
listen.settimeout(60)
client, _ = listen.accept()
client.sendall(client.recv(64))
client.close()
print("SERVED", flush=True)
"#;

/// While a successor holds the sockets and is starting: a second one is
/// refused; a reload waits; and the running host, stopped by SIGTERM,
/// tells the successor it drains and leaves every socket to it, so the
/// successor still accepts on the very socket afterwards.
#[test]
fn a_pending_successor_keeps_the_sockets_and_a_second_is_refused() {
    use std::io::BufRead as _;
    let dir = TempDir::new("upgrade-pending");
    let upgrade = dir.path().join("upgrade.sock");
    let args = host_args(Strategy::Threading, "127.0.0.1:0", &upgrade);
    let mut running = Server::spawn(&args, &[]);
    let line = running.wait_for_log(|l| l.starts_with("listening on "));
    let addr = harness::listening_addr(&line).unwrap();

    let mut fake = std::process::Command::new("python3")
        .arg("-c")
        .arg(FAKE_SUCCESSOR)
        .arg(&upgrade)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs the stand-in successor");
    let mut said = std::io::BufReader::new(fake.stdout.take().unwrap());
    let mut handed = String::new();
    said.read_line(&mut handed).unwrap();
    assert_eq!(
        handed.trim_end(),
        format!(
            "HANDED listen 127.0.0.1:0 tenant=default;upgrade {}",
            upgrade.display()
        )
    );
    running.wait_for_log(|l| {
        l.contains(&format!(
            "upgrade: handed 1 listening socket(s) to the host with pid {}",
            fake.id()
        ))
    });
    assert_eq!(short_exchange(addr, b"still mine").unwrap(), b"still mine");

    // A second successor is refused, and a reload waits.
    let out = run_host(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--upgrade-socket",
        upgrade.to_str().unwrap(),
        "--take-over",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "it refused: the host with pid {} is already taking over",
            fake.id()
        )),
        "{stderr}"
    );
    running.signal(libc::SIGHUP);
    running.wait_for_log(|l| l.contains("reload postponed: a successor holds the listeners"));

    // Stopped now, the running host leaves the sockets to the successor.
    running.signal(libc::SIGTERM);
    running.wait_for_log(|l| {
        l.contains(&format!(
            "upgrade: stopping while the host with pid {} starts; it keeps the listeners",
            fake.id()
        ))
    });
    assert!(running.wait_exit().success());
    assert!(
        upgrade.exists(),
        "the upgrade socket's file is the successor's"
    );
    writeln!(fake.stdin.as_mut().unwrap(), "go").unwrap();
    let mut answer = String::new();
    said.read_line(&mut answer).unwrap();
    assert_eq!(answer.trim_end(), "ANSWER draining");
    assert_eq!(short_exchange(addr, b"successor").unwrap(), b"successor");
    let mut served = String::new();
    said.read_line(&mut served).unwrap();
    assert_eq!(served.trim_end(), "SERVED");
    assert!(fake.wait().unwrap().success());
}
