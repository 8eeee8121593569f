//! Multi-tenant config files (`host serve --config`): tenants side by side
//! with their own names, limits, grants and peers; Unix listeners; a noisy
//! neighbour; reloads under load; metrics; JSON logs; and every bad config
//! refused with its file, line and column.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::for_each_strategy;
use crate::support::{
    connect, connect_from, eventually, exchange, fields, guest, one_error_line, pattern,
    read_to_end, run_host, send_and_read, stable_line, test_cache_dir, toml_path, toml_string,
    unix_exchange, ConfigServer, Server, Strategy, TempDir, PATIENCE,
};

// The scenarios a tenant of each strategy goes through; the others name
// their strategies in their config files.
for_each_strategy!(
    a_flooded_tenant_does_not_slow_its_neighbour,
    tenants_refuse_denied_peers,
    a_tenant_reloads_under_load,
    metrics_count_every_connection,
);

// ---------------------------------------------------------------------------
// Small clients.

/// One connection to `addr` (from 127.0.0.`from` if given) sending `data`;
/// returns the reply and the host's `connection N closed` line for it.
fn served(server: &Server, addr: SocketAddr, from: Option<u8>, data: &[u8]) -> (Vec<u8>, String) {
    let stream = match from {
        Some(n) => connect_from(addr, n).expect("connect to the host"),
        None => connect(addr),
    };
    let peer = stream.local_addr().unwrap();
    let reply = send_and_read(stream, data);
    let marker = format!(" peer={peer} ");
    let line = server.wait_for_log(|l| l.contains(" closed ") && l.contains(&marker));
    (reply, line)
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("a UTF-8 reply")
}

/// Sends `data` over the Unix socket at `path`, half-closes, reads the reply.
/// The variables of the test guest's `env: [A=1, B=2]` reply, sorted.
fn env_vars(reply: &str) -> Vec<String> {
    let list = reply
        .strip_prefix("env: [")
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not an env reply: {reply:?}"));
    let mut vars: Vec<String> = list
        .split(", ")
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect();
    vars.sort();
    vars
}

/// N of the test guest's `allocation failed after N MiB`.
fn allocated_mib(reply: &str) -> u64 {
    reply
        .strip_prefix("allocation failed after ")
        .and_then(|r| r.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an alloc-try reply: {reply:?}"))
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// Polls `done` until it holds; fails naming `what` after [`PATIENCE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    eventually(PATIENCE, || {
        if done() {
            Ok(())
        } else {
            Err(format!("timed out waiting until {what}"))
        }
    })
}

/// Copies a guest into `dir` under `name`, so a config can name it relative
/// to its own directory.
fn copy_guest(dir: &Path, guest_name: &str, name: &str) {
    std::fs::copy(guest(guest_name), dir.join(name)).unwrap();
}

// ---------------------------------------------------------------------------
// 1. Tenants side by side; Unix listeners.

#[test]
fn two_tenants_see_their_own_name_limits_and_grants() {
    let dir = TempDir::new("tenants");
    copy_guest(dir.path(), "test-guest", "guest.wasm");
    let data = dir.path().join("beta-data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "granted file").unwrap();
    let sock = dir.path().join("alpha.sock");
    let toml = format!(
        r#"
[defaults]
handler = "guest.wasm"
idle-timeout = "5s"

[tenants.alpha]
listen = ["127.0.0.1:0", {sock}]
strategy = "threading"
max-memory = "32MiB"
timeout = "10s"
env = {{ TENANT_NAME = "alpha", ALPHA_ONLY = "yes" }}

[tenants.beta]
listen = ["127.0.1.2:0"]
strategy = "forking"
max-memory = "16MiB"
timeout = "500ms"
env = {{ TENANT_NAME = "beta" }}
dirs = {{ {data} = "/data" }}
"#,
        sock = toml_string(&format!("unix:{}", sock.display())),
        data = toml_path(&data),
    );
    let mut server = ConfigServer::start_in(dir, &toml, &[]);
    let (alpha, beta) = (server.addr("alpha"), server.addr("beta"));
    assert_ne!(alpha, beta);
    assert_eq!(server.unix_path("alpha"), sock);

    // Each tenant's name and strategy, over TCP and over the Unix socket.
    let (reply, line) = served(&server, alpha, None, b"info\n");
    let info = fields(&text(reply));
    assert_eq!(info["tenant"], "alpha");
    assert!(
        Strategy::Threading.is_worker_name(&info["worker"]),
        "{info:?}"
    );
    assert!(line.contains(" tenant=alpha "), "{line}");
    let (reply, line) = served(&server, beta, None, b"info\n");
    let info = fields(&text(reply));
    assert_eq!(info["tenant"], "beta");
    assert!(
        Strategy::Forking.is_worker_name(&info["worker"]),
        "{info:?}"
    );
    assert!(line.contains(" tenant=beta "), "{line}");
    let info = fields(&text(unix_exchange(&sock, b"info\n")));
    assert_eq!(info["tenant"], "alpha");
    assert_eq!(info["peer-address"], "unix:");
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o660,
        "socket file mode"
    );

    // Each tenant's own grants.
    assert_eq!(
        env_vars(&text(exchange(alpha, b"env\n"))),
        ["ALPHA_ONLY=yes", "TENANT_NAME=alpha"]
    );
    assert_eq!(
        env_vars(&text(unix_exchange(&sock, b"env\n"))),
        ["ALPHA_ONLY=yes", "TENANT_NAME=alpha"]
    );
    assert_eq!(
        env_vars(&text(exchange(beta, b"env\n"))),
        ["TENANT_NAME=beta"]
    );
    let read = text(exchange(beta, b"read-file /data/hello.txt\n"));
    assert_eq!(read, "read 12 bytes: granted file");
    let read = text(exchange(alpha, b"read-file /data/hello.txt\n"));
    assert!(
        read.starts_with("denied: "),
        "alpha read beta's grant: {read}"
    );

    // Each tenant's own limits: memory...
    let alpha_mib = allocated_mib(&text(exchange(alpha, b"alloc-try\n")));
    let beta_mib = allocated_mib(&text(exchange(beta, b"alloc-try\n")));
    assert!(
        (16..32).contains(&alpha_mib),
        "alpha (32MiB) got {alpha_mib} MiB"
    );
    assert!(beta_mib < 16, "beta (16MiB) got {beta_mib} MiB");
    // ...and time: both sleep 1s; only beta's 500ms timeout stops it.
    let slow = thread::spawn(move || text(exchange(alpha, b"sleep 1000\n")));
    let (reply, line) = served(&server, beta, None, b"sleep 1000\n");
    assert_eq!(reply, b"", "beta's guest outlived its timeout");
    assert!(
        line.contains(" tenant=beta ") && line.contains("outcome=timeout"),
        "{line}"
    );
    assert_eq!(slow.join().unwrap(), "slept");

    // SIGTERM: the socket file goes with the host.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    assert!(status.success(), "the host exited with {status}");
    assert!(
        !sock.exists(),
        "{} is left after the host exited",
        sock.display()
    );
}

#[test]
fn a_stale_unix_socket_file_is_replaced() {
    let dir = TempDir::new("stale");
    let sock = dir.path().join("stale.sock");
    // A server that died without removing its socket file.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let toml = format!(
        "[tenants.u]\nlisten = [{}]\n",
        toml_string(&format!("unix:{}", sock.display()))
    );
    let server = ConfigServer::start_in(dir, &toml, &[]);
    assert_eq!(server.unix_path("u"), sock);
    assert_eq!(unix_exchange(&sock, b"still works"), b"still works");
}

#[test]
fn a_live_unix_socket_is_an_error() {
    let dir = TempDir::new("live");
    let sock = dir.path().join("live.sock");
    let live = UnixListener::bind(&sock).unwrap();
    let file = dir.path().join("host.toml");
    std::fs::write(
        &file,
        format!(
            "[tenants.u]\nlisten = [\"127.0.0.1:0\", {}]\n",
            toml_string(&format!("unix:{}", sock.display()))
        ),
    )
    .unwrap();
    let cache = test_cache_dir();
    let out = run_host(&[
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    let error = one_error_line(&out);
    assert!(
        error.contains(sock.to_str().unwrap()),
        "the error does not name {}: {error}",
        sock.display(),
    );
    // The other server's socket is left alone.
    assert!(sock.exists(), "the live socket file was removed");
    let _client = UnixStream::connect(&sock).expect("the live socket still answers");
    drop(live);
}

/// One config file may mix the four strategies: each tenant is served by
/// its own, with its own name, and an async tenant beside the others keeps
/// a connection open and live while theirs come and go.
#[test]
fn a_config_file_mixes_async_tenants_with_the_others() {
    let dir = TempDir::new("mixed");
    copy_guest(dir.path(), "test-guest", "guest.wasm");
    let tenants = [
        ("t", Strategy::Threading),
        ("f", Strategy::Forking),
        ("p", Strategy::Prefork),
        ("a", Strategy::Async),
    ];
    let mut toml = "[defaults]\nhandler = \"guest.wasm\"\n".to_string();
    for (name, strategy) in tenants {
        toml.push_str(&format!(
            "\n[tenants.{name}]\nlisten = [\"127.0.0.1:0\"]\nstrategy = \"{}\"\n",
            strategy.name()
        ));
    }
    let server = ConfigServer::start_in(dir, &toml, &[]);
    // A call held open in the async tenant while the others serve.
    let held = TcpStream::connect(server.addr("a")).unwrap();
    (&held).write_all(b"hold\n").unwrap();
    let mut worker = String::new();
    BufReader::new(&held).read_line(&mut worker).unwrap();
    assert!(Strategy::Async.is_worker_name(worker.trim()), "{worker}");
    for (name, strategy) in tenants {
        for _ in 0..3 {
            let (reply, line) = served(&server, server.addr(name), None, b"info\n");
            let info = fields(&text(reply));
            assert_eq!(info["tenant"], name);
            assert!(strategy.is_worker_name(&info["worker"]), "{name}: {info:?}");
            assert!(line.contains(&format!(" tenant={name} ")), "{line}");
        }
    }
    held.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_end(held), b"");
}

// ---------------------------------------------------------------------------
// 2. A noisy neighbour.

/// Tenant `noisy` spins in every connection (4 at once, 2s each) and is sent
/// 40; meanwhile 200 clients of tenant `quiet` all get their bytes back.
fn a_flooded_tenant_does_not_slow_its_neighbour(strategy: Strategy) {
    let toml = format!(
        r#"
[tenants.noisy]
handler = {guest}
listen = ["127.0.0.1:0"]
strategy = "{strategy}"
max-connections = 4
timeout = "2s"
idle-timeout = "2s"

[tenants.quiet]
listen = ["127.0.1.2:0"]
strategy = "threading"
"#,
        guest = toml_path(&guest("test-guest")),
        strategy = strategy.name(),
    );
    let server = Server::start_config(&toml, &[]);
    let (noisy, quiet) = (server.addr("noisy"), server.addr("quiet"));

    // The flood: 40 spinning connections, ten times the tenant's bound.
    // Detached: the host is killed before all of them are served.
    let flood: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut stream = connect(noisy);
            stream.write_all(b"spin\n").unwrap();
            stream
        })
        .collect();
    for stream in flood {
        thread::spawn(move || {
            let mut sink = Vec::new();
            let mut stream = stream;
            let _ = stream.read_to_end(&mut sink);
        });
    }

    let started = Instant::now();
    let clients: Vec<_> = (0..20u64)
        .map(|t| {
            thread::spawn(move || {
                (0..10u64)
                    .filter(|i| {
                        let data = pattern(t * 100 + i, 4096);
                        exchange(quiet, &data) != data
                    })
                    .count()
            })
        })
        .collect();
    let failed: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let took = started.elapsed();
    assert_eq!(
        failed, 0,
        "{failed} of 200 quiet clients did not get their bytes"
    );

    // The flood was still going: quiet did not wait behind it.
    let noisy_done = server
        .log()
        .iter()
        .filter(|l| l.contains(" closed ") && l.contains(" tenant=noisy "))
        .count();
    assert!(
        noisy_done < 40,
        "the quiet clients took {took:?}, until the whole flood was served"
    );
    // And the noisy tenant's guests were running, and stopped by the timeout.
    server.wait_for_log_count(
        |l| l.contains(" tenant=noisy ") && l.contains("outcome=timeout"),
        4,
    );
}

/// A forking tenant at its bound (2 children alive at once) takes the next
/// client as soon as those children have exited, not at their deadline.
#[test]
fn a_forking_tenant_serves_again_as_soon_as_its_children_exit() {
    let toml = r#"
[tenants.f]
listen = ["127.0.0.1:0"]
strategy = "forking"
max-children = 2
timeout = "30s"
"#;
    let server = Server::start_config(toml, &[]);
    let addr = server.addr("f");
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = connect(addr);
            stream.write_all(b"x").unwrap();
            let mut echoed = [0u8; 1];
            stream.read_exact(&mut echoed).unwrap();
            stream
        })
        .collect();
    for stream in held {
        stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(stream), b"");
    }
    server.wait_for_log_count(|l| l.contains(" tenant=f ") && l.contains("outcome=ok"), 2);

    let started = Instant::now();
    let mut stream = connect(addr);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"third").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let read = stream.read_to_end(&mut reply);
    assert!(
        read.is_ok() && reply == b"third",
        "the third client was not served within 5s ({read:?} after {:?}): the tenant's \
         exited children were not reaped; the log:\n{}",
        started.elapsed(),
        server.log().join("\n")
    );
}

fn read_all(mut stream: TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    stream.read_to_end(&mut data).expect("read to the end");
    data
}

// ---------------------------------------------------------------------------
// 3. allow / deny.

fn tenants_refuse_denied_peers(strategy: Strategy) {
    let toml = format!(
        r#"
[defaults]
strategy = "{strategy}"

[tenants.guarded]
listen = ["127.0.0.1:0"]
deny = ["127.0.0.3/32"]

[tenants.members]
listen = ["127.0.1.2:0"]
allow = ["127.0.0.2/32"]
"#,
        strategy = strategy.name(),
    );
    let server = Server::start_config(&toml, &[]);
    let (guarded, members) = (server.addr("guarded"), server.addr("members"));

    let refused_from = |addr: SocketAddr, from: Option<u8>, tenant: &str| {
        let (reply, line) = served(&server, addr, from, b"hello?");
        assert_eq!(reply, b"", "a refused peer got a reply");
        let parts = [
            format!(" peer=127.0.0.{}:", from.unwrap_or(1)),
            " worker=acceptor ".to_string(),
            format!(" tenant={tenant} "),
            " in=0 out=0 ".to_string(),
            "outcome=denied".to_string(),
        ];
        for part in parts {
            assert!(line.contains(&part), "{part:?} is not in: {line}");
        }
    };
    let served_from = |addr: SocketAddr, from: u8, tenant: &str| {
        let data = pattern(u64::from(from), 1000);
        let (reply, line) = served(&server, addr, Some(from), &data);
        assert!(reply == data, "127.0.0.{from} was not served by {tenant}");
        assert!(line.contains(&format!(" tenant={tenant} ")), "{line}");
        assert!(line.contains("outcome=ok"), "{line}");
    };

    refused_from(guarded, Some(3), "guarded");
    served_from(guarded, 2, "guarded");
    refused_from(members, Some(4), "members");
    refused_from(members, None, "members");
    served_from(members, 2, "members");
    // A refusal costs nothing: the tenant still serves right after.
    refused_from(guarded, Some(3), "guarded");
    served_from(guarded, 4, "guarded");
}

// ---------------------------------------------------------------------------
// 4. Reloads.

#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Echo,
    Hello,
    Failed(String),
}

/// One connection of the load: `data` in, the whole echo or hello's
/// `WORKER: data` back, or a failure.
fn load_exchange(addr: SocketAddr, data: &[u8]) -> Reply {
    let stream = match TcpStream::connect(addr) {
        Ok(stream) => stream,
        Err(e) => return Reply::Failed(format!("connect: {e}")),
    };
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = &stream;
    if let Err(e) = writer
        .write_all(data)
        .and_then(|()| stream.shutdown(Shutdown::Write))
    {
        return Reply::Failed(format!("send: {e}"));
    }
    let mut reply = Vec::new();
    if let Err(e) = (&stream).read_to_end(&mut reply) {
        return Reply::Failed(format!("read after {} bytes: {e}", reply.len()));
    }
    if reply == data {
        return Reply::Echo;
    }
    let mut suffix = b": ".to_vec();
    suffix.extend_from_slice(data);
    let worker = reply.strip_suffix(suffix.as_slice());
    if worker.is_some_and(|w| !w.is_empty() && !w.contains(&b'\n')) {
        return Reply::Hello;
    }
    Reply::Failed(format!("reply {:?}", String::from_utf8_lossy(&reply)))
}

/// Client threads looping on one address, recording (start, reply).
struct Load {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Vec<(Instant, Reply)>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|t| {
                let (stop, record) = (stop.clone(), record.clone());
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let data = format!("ping {t} {n}\n");
                        let started = Instant::now();
                        let reply = load_exchange(addr, data.as_bytes());
                        record.lock().unwrap().push((started, reply));
                        n += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            record,
            threads,
        }
    }

    /// Replies of `kind` to connections started after `since`.
    fn count(&self, kind: &Reply, since: Option<Instant>) -> usize {
        self.record
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, r)| r == kind && since.is_none_or(|s| *at > s))
            .count()
    }

    fn wait_for(&self, kind: Reply, since: Option<Instant>, count: usize) {
        wait_until(&format!("{count} {kind:?} replies"), || {
            self.count(&kind, since) >= count
        });
    }

    fn finish(self) -> Vec<(Instant, Reply)> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().unwrap();
        }
        Arc::try_unwrap(self.record).unwrap().into_inner().unwrap()
    }
}

fn reload_config(strategy: Strategy, handler_a: &str, others: &str) -> String {
    format!(
        r#"
[defaults]
strategy = "{strategy}"
timeout = "20s"
idle-timeout = "20s"
drain-timeout = "30s"

[tenants.a]
handler = {handler_a}
listen = ["127.0.0.1:0"]
{others}"#,
        strategy = strategy.name(),
    )
}

/// Every `listening on` line is whole: `listening on ADDR tenant=NAME` on a
/// line of its own, never torn by another process's log line.
fn assert_whole_listening_lines(server: &Server) {
    let log = server.log();
    let torn: Vec<&String> = log
        .iter()
        .filter(|l| {
            let whole = l.strip_prefix("listening on ").is_some_and(|rest| {
                rest.split_once(" tenant=").is_some_and(|(addr, name)| {
                    !addr.contains(' ') && !name.is_empty() && !name.contains(' ')
                })
            });
            (l.contains("listening on") || l.ends_with(" tenant=added")) && !whole
        })
        .collect();
    assert!(
        torn.is_empty(),
        "torn `listening on` lines (another process wrote into the middle of one):\n{}\nthe log:\n{}",
        torn.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"),
        log.join("\n")
    );
}

fn a_tenant_reloads_under_load(strategy: Strategy) {
    let echo = toml_path(&guest("echo"));
    let hello = toml_path(&guest("hello"));
    let gone = format!(
        "[tenants.gone]\nhandler = {}\nlisten = [\"127.0.1.2:0\"]\n",
        toml_path(&guest("test-guest"))
    );
    let added = "[tenants.added]\nlisten = [\"127.0.1.3:0\"]\n";
    let server = Server::start_config(&reload_config(strategy, &echo, &gone), &[]);
    let (a, gone_addr) = (server.addr("a"), server.addr("gone"));

    // A connection in flight on the tenant about to be removed.
    let mut held = connect(gone_addr);
    let held_peer = held.local_addr().unwrap();
    held.write_all(b"hold\n").unwrap();
    let mut worker = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        held.read_exact(&mut byte).unwrap();
        worker.push(byte[0]);
    }

    let load = Load::start(a, 3);
    load.wait_for(Reply::Echo, None, 30);

    // One reload: a's handler changes, `added` comes, `gone` goes.
    server.rewrite(&reload_config(strategy, &hello, added));
    let mark = server.log_len();
    let line = server.reload();
    for part in [
        "reloaded: ",
        "a: ",
        "handler",
        "added: added",
        "gone: removed",
    ] {
        assert!(line.contains(part), "{part:?} is not in: {line}");
    }
    // (The tail of its `listening on` line, whole or not.)
    server.wait_for_log_since(mark, |l| {
        l.ends_with(" tenant=added")
            || (l.contains("listening on ") && l.contains(" tenant=added"))
            || stable_line(l).is_some_and(|t| t.ends_with(" tenant=added"))
    });
    assert_whole_listening_lines(&server);
    assert_eq!(exchange(server.addr("added"), b"new tenant"), b"new tenant");
    wait_until("the removed tenant's port refuses", || refused(gone_addr));
    // The removed tenant's connection in flight still finishes.
    held.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest)
        .expect("the held connection finishes");
    assert_eq!(rest, b"");
    let marker = format!(" peer={held_peer} ");
    // The tenant too: a client of tenant a (another address) may have had
    // the same source port.
    let line = server.wait_for_log(|l| {
        l.contains(" closed ") && l.contains(&marker) && l.contains(" tenant=gone ")
    });
    assert!(line.contains("outcome=ok"), "{line}");

    // Once a's old worker has drained, every reply is hello's.
    server.wait_for_log_since(mark, |l| {
        l.contains("tenant a: worker process") && l.contains("previous configuration has drained")
    });
    let switched = Instant::now();
    load.wait_for(Reply::Hello, Some(switched), 30);

    // A broken file and a handler that is not a component change nothing.
    server.rewrite("[tenants.a\nhandler = \n");
    let line = server.reload();
    assert!(line.contains("reload failed"), "{line}");
    let before = load.count(&Reply::Hello, None);
    load.wait_for(Reply::Hello, None, before + 10);
    let garbage = server.dir().join("garbage.wasm");
    std::fs::write(&garbage, pattern(7, 4096)).unwrap();
    server.rewrite(&reload_config(strategy, &toml_path(&garbage), added));
    let line = server.reload();
    assert!(line.contains("reload failed"), "{line}");
    assert!(
        line.contains("garbage.wasm"),
        "the reason does not name the file: {line}"
    );
    let before = load.count(&Reply::Hello, None);
    load.wait_for(Reply::Hello, None, before + 10);
    assert_eq!(exchange(server.addr("added"), b"still here"), b"still here");

    let record = load.finish();
    assert_whole_listening_lines(&server);
    let failures: Vec<_> = record
        .iter()
        .filter(|(_, r)| matches!(r, Reply::Failed(_)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {:?}",
        failures.len(),
        record.len(),
        &failures[..failures.len().min(10)]
    );
    let late_echoes = record
        .iter()
        .filter(|(at, r)| *at > switched && *r == Reply::Echo)
        .count();
    assert_eq!(late_echoes, 0, "echo replies after the old worker drained");
}

/// The `listening on` lines are what scripts wait for before they signal:
/// a SIGHUP right after them is a reload, never the default disposition.
#[test]
fn sighup_right_after_the_listening_lines_reloads() {
    let dir = TempDir::new("early-hup");
    let file = dir.path().join("host.toml");
    std::fs::write(
        &file,
        "[metrics]\naddr = \"127.0.0.1:0\"\n\n[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n",
    )
    .unwrap();
    let args: Vec<std::ffi::OsString> = vec!["serve".into(), "--config".into(), file.into()];
    for attempt in 0..40 {
        let mut server = Server::spawn(&args, &[]);
        // The last line it prints before serving; signal at once.
        server.wait_for_log(|l| l.starts_with("metrics on "));
        let mark = server.log_len();
        server.signal(libc::SIGHUP);
        let mut reloaded = None;
        wait_until("a reload line or the host's exit", || {
            if let Some(status) = server.exited() {
                panic!(
                    "attempt {attempt}: a SIGHUP sent right after the `listening on` and \
                     `metrics on` lines ended the host ({status}); the log:\n{}",
                    server.log().join("\n")
                );
            }
            reloaded = server.log()[mark..]
                .iter()
                .find(|l| l.contains("reloaded: ") || l.contains("reload failed"))
                .cloned();
            reloaded.is_some()
        });
        let line = reloaded.unwrap();
        assert!(line.contains("reloaded: nothing changed"), "{line}");
    }
}

#[test]
fn watch_reloads_when_the_config_changes() {
    let echo = toml_path(&guest("echo"));
    let hello = toml_path(&guest("hello"));
    let server = Server::start_config(&reload_config(Strategy::Threading, &echo, ""), &["--watch"]);
    let a = server.addr("a");
    assert_eq!(load_exchange(a, b"before\n"), Reply::Echo);
    let mark = server.log_len();
    server.rewrite(&reload_config(Strategy::Threading, &hello, ""));
    let line = server.wait_for_reload(mark);
    assert!(
        line.contains("reloaded: ") && line.contains("a: ") && line.contains("handler"),
        "{line}"
    );
    server.wait_for_log_since(mark, |l| {
        l.contains("tenant a: worker process") && l.contains("previous configuration has drained")
    });
    assert_eq!(load_exchange(a, b"after\n"), Reply::Hello);
}

// ---------------------------------------------------------------------------
// 5. Metrics.

/// One sample of a metrics page.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn unparsable(line: &str) -> ! {
    panic!("cannot parse the metrics line {line:?}")
}

fn samples(page: &str) -> Vec<Sample> {
    page.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, rest) = match line.find('{') {
                Some(open) if open < line.find(' ').unwrap_or(usize::MAX) => {
                    let close = line.rfind('}').unwrap_or_else(|| unparsable(line));
                    (&line[..=close], &line[close + 1..])
                }
                _ => line.split_at(line.find(' ').unwrap_or_else(|| unparsable(line))),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            let mut rest_labels = labels;
            while let Some((key, after)) = rest_labels.split_once("=\"") {
                let end = after.find('"').unwrap_or_else(|| unparsable(line));
                map.insert(
                    key.trim_start_matches(',').trim().to_string(),
                    after[..end].to_string(),
                );
                rest_labels = &after[end + 1..];
            }
            let value = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| unparsable(line));
            Sample {
                name: name.to_string(),
                labels: map,
                value,
            }
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}

/// The sum of every series of `name` whose labels include `labels`.
fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// `promtool check metrics` on `page`; CI installs it (Debian: prometheus).
fn promtool_check(page: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool is not on PATH: install the Debian package `prometheus` (CI installs it)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\nthe page:\n{page}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metrics_count_every_connection(strategy: Strategy) {
    let toml = format!(
        r#"
[metrics]
addr = "127.0.0.1:0"

[defaults]
strategy = "{strategy}"
timeout = "10s"

[tenants.a]
listen = ["127.0.0.1:0"]

[tenants.b]
handler = {guest}
listen = ["127.0.1.2:0"]
deny = ["127.0.0.3/32"]
"#,
        strategy = strategy.name(),
        guest = toml_path(&guest("test-guest")),
    );
    let server = Server::start_config(&toml, &[]);
    let (a, b) = (server.addr("a"), server.addr("b"));

    // 3 echoes on a (600 bytes each way), 2 refusals and 1 trap on b.
    for (i, len) in [100usize, 200, 300].into_iter().enumerate() {
        let data = pattern(i as u64, len);
        let (reply, line) = served(&server, a, None, &data);
        assert!(reply == data, "echo {i} failed");
        assert!(line.contains("outcome=ok"), "{line}");
    }
    for _ in 0..2 {
        let (_, line) = served(&server, b, Some(3), b"hello?");
        assert!(line.contains("outcome=denied"), "{line}");
    }
    let (_, line) = served(&server, b, None, b"trap\n");
    assert!(line.contains("outcome=trap"), "{line}");

    let page = server.metrics();
    let all = samples(&page);
    let count = |tenant: &str, outcome: &str| {
        metric(
            &all,
            "host_connections_total",
            &[("tenant", tenant), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    let context = format!("the page:\n{page}");
    assert_eq!(count("a", "ok"), 3.0, "{context}");
    assert_eq!(count("b", "denied"), 2.0, "{context}");
    assert_eq!(count("b", "trap"), 1.0, "{context}");
    assert_eq!(
        metric_sum(&all, "host_connections_total", &[("tenant", "a")]),
        3.0,
        "a's connections, all outcomes; {context}"
    );
    assert_eq!(
        metric_sum(&all, "host_connections_total", &[("tenant", "b")]),
        3.0,
        "b's connections, all outcomes; {context}"
    );
    let bytes = |name: &str, tenant: &str| metric(&all, name, &[("tenant", tenant)]);
    assert_eq!(
        bytes("host_received_bytes_total", "a"),
        Some(600.0),
        "{context}"
    );
    assert_eq!(
        bytes("host_sent_bytes_total", "a"),
        Some(600.0),
        "{context}"
    );
    assert_eq!(bytes("host_sent_bytes_total", "b"), Some(0.0), "{context}");
    // The gauge: back to 0 once every connection is over (it may lag the
    // connection's log line a little, so poll briefly).
    eventually(Duration::from_secs(5), || {
        let page = server.metrics();
        let now = samples(&page);
        let in_flight =
            |tenant: &str| metric(&now, "host_connections_in_flight", &[("tenant", tenant)]);
        if in_flight("a") == Some(0.0) && in_flight("b") == Some(0.0) {
            Ok(())
        } else {
            Err(format!(
                "connections are still in flight after every connection ended; the page:\n{page}"
            ))
        }
    });
    assert!(
        all.iter()
            .any(|s| s.name == "host_connection_duration_seconds_count"),
        "no duration histogram; {context}"
    );
    assert!(
        all.iter()
            .any(|s| s.name == "host_instance_memory_peak_bytes_count"),
        "no memory histogram; {context}"
    );
    for tenant in ["a", "b"] {
        assert!(
            all.iter().any(|s| s.name == "host_handler_info"
                && s.labels.get("tenant").map(String::as_str) == Some(tenant)
                && s.labels.get("strategy").map(String::as_str) == Some(strategy.name())
                && s.labels.contains_key("digest")
                && s.value == 1.0),
            "no host_handler_info for {tenant}; {context}"
        );
    }
    promtool_check(&page);

    // A reload is counted.
    let reloads = |all: &[Sample], result: &str| {
        metric(all, "host_reloads_total", &[("result", result)]).unwrap_or(0.0)
    };
    let (ok_before, failed_before) = (reloads(&all, "ok"), reloads(&all, "failed"));
    let line = server.reload();
    assert!(line.contains("reloaded: "), "{line}");
    let page = server.metrics();
    let all = samples(&page);
    assert_eq!(reloads(&all, "ok"), ok_before + 1.0, "the page:\n{page}");
    assert_eq!(reloads(&all, "failed"), failed_before, "the page:\n{page}");
    // The counters survive the reload.
    assert_eq!(
        metric(
            &all,
            "host_connections_total",
            &[("tenant", "a"), ("outcome", "ok")]
        ),
        Some(3.0),
        "the page:\n{page}"
    );
    // So is a failed one.
    server.rewrite("[tenants.a\n");
    let line = server.reload();
    assert!(line.contains("reload failed"), "{line}");
    let page = server.metrics();
    let all = samples(&page);
    assert_eq!(reloads(&all, "ok"), ok_before + 1.0, "the page:\n{page}");
    assert_eq!(
        reloads(&all, "failed"),
        failed_before + 1.0,
        "the page:\n{page}"
    );
}

// ---------------------------------------------------------------------------
// 6. JSON logs.

/// Every string anywhere in `value`.
fn strings(value: &serde_json::Value) -> Vec<&str> {
    match value {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => items.iter().flat_map(strings).collect(),
        serde_json::Value::Object(map) => map.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let toml = format!(
        r#"
[metrics]
addr = "127.0.0.1:0"

[tenants.a]
listen = ["127.0.0.1:0"]

[tenants.b]
handler = {guest}
listen = ["127.0.1.2:0"]
deny = ["127.0.0.3/32"]
"#,
        guest = toml_path(&guest("test-guest")),
    );
    let mut server = Server::start_config(&toml, &["--log-format", "json"]);
    let (a, b) = (server.addr("a"), server.addr("b"));
    let (reply, _) = served(&server, a, None, b"json please");
    assert_eq!(reply, b"json please");
    served(&server, b, Some(3), b"denied");
    let (reply, _) = served(&server, b, None, b"print\n");
    assert_eq!(reply, b"printed");
    let line = server.reload();
    assert!(line.contains("reloaded: "), "{line}");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());

    let mut connection_lines = 0;
    for line in server.log() {
        if line.starts_with("listening on ") || line.starts_with("metrics on ") {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value.is_object(), "not a JSON object: {line}");
        let texts = strings(&value);
        if let Some(message) = texts
            .iter()
            .find(|t| t.starts_with("connection ") && t.contains(" closed "))
        {
            assert!(message.contains(" tenant="), "{message}");
            connection_lines += 1;
        }
    }
    assert_eq!(connection_lines, 3, "the log:\n{}", server.log().join("\n"));
}

// ---------------------------------------------------------------------------
// 7. Bad configs.

/// One bad config: its text (written as `host.toml` next to a
/// `garbage.wasm`), the lines its error may point at (docs/configuration.md,
/// section 7: the offending value; the key of an unknown key; the tenant's
/// table for a tenant without an address; the second of two colliding
/// addresses), and what the error must name. A handler whose bytes are bad is
/// not a problem at a place in the file: `lines` is empty, and the error must
/// still name the config file.
struct BadConfig {
    what: &'static str,
    toml: &'static str,
    lines: &'static [usize],
    names: &'static [&'static str],
}

const BAD_CONFIGS: &[BadConfig] = &[
    BadConfig {
        what: "TOML syntax",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\ntimeout = 5s\n",
        lines: &[3],
        names: &[],
    },
    BadConfig {
        what: "an unknown key",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\ntmeout = \"5s\"\n",
        lines: &[3],
        names: &["tmeout"],
    },
    BadConfig {
        what: "a wrong type",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\nworkers = \"four\"\n",
        lines: &[3],
        names: &["workers"],
    },
    BadConfig {
        what: "two tenants on one address",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:7999\"]\n\n[tenants.b]\nlisten = [\"127.0.0.1:7999\"]\n",
        lines: &[5],
        names: &["127.0.0.1:7999"],
    },
    BadConfig {
        what: "a missing handler",
        toml: "[tenants.a]\nhandler = \"missing.wasm\"\nlisten = [\"127.0.0.1:0\"]\n",
        lines: &[2],
        names: &["missing.wasm"],
    },
    BadConfig {
        what: "a handler that is not a component",
        toml: "[tenants.a]\nhandler = \"garbage.wasm\"\nlisten = [\"127.0.0.1:0\"]\n",
        lines: &[],
        names: &["garbage.wasm"],
    },
    BadConfig {
        what: "a bad CIDR",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\ndeny = [\"10.0.0.0/33\"]\n",
        lines: &[3],
        names: &["10.0.0.0/33"],
    },
    BadConfig {
        what: "a bad size",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\nmax-memory = \"lots\"\n",
        lines: &[3],
        names: &["lots"],
    },
    BadConfig {
        what: "a bad duration",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\ntimeout = \"30x\"\n",
        lines: &[3],
        names: &["30x"],
    },
    BadConfig {
        what: "an empty listen",
        toml: "[tenants.a]\nlisten = []\n",
        lines: &[1],
        names: &["listen"],
    },
    BadConfig {
        what: "a Unix socket path too long for sockaddr_un",
        toml: "[tenants.a]\nlisten = [\"127.0.0.1:0\", \"unix:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock\"]\n",
        lines: &[2],
        names: &["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock", "at most 107 bytes"],
    },
    BadConfig {
        what: "a Unix socket in a directory that does not exist",
        toml: "[tenants.a]\nlisten = [\"unix:no/such/dir/a.sock\"]\n",
        lines: &[2],
        names: &["no/such/dir", "does not exist"],
    },
];

/// Checks `stderr` of a refused run: one `error:` line naming the file, a
/// line (and column) of `bad`, and what `bad` must name. `only_error`: the
/// error is all there is on stderr.
fn check_refusal(
    bad: &BadConfig,
    file: &Path,
    how: &str,
    stderr: &str,
    only_error: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    if errors.len() != 1 {
        problems.push(format!(
            "{how}, {}: expected one error line:\n{stderr}",
            bad.what
        ));
        return problems;
    }
    if only_error && stderr.trim_end().lines().count() != 1 {
        problems.push(format!(
            "{how}, {}: the error is more than one line:\n{stderr}",
            bad.what
        ));
    }
    // Lines of the tracing log start with their timestamp.
    if let Some(stray) = stderr
        .lines()
        .find(|l| !l.starts_with("error: ") && !l.starts_with(|c: char| c.is_ascii_digit()))
    {
        problems.push(format!(
            "{how}, {}: a line that is neither the error nor a log line: {stray:?}\n{stderr}",
            bad.what
        ));
    }
    let error = errors[0];
    if stderr.contains("listening on") {
        problems.push(format!("{how}, {}: it listened:\n{stderr}", bad.what));
    }
    for name in bad.names {
        if !error.contains(name) {
            problems.push(format!(
                "{how}, {}: the error does not name {name:?}: {error}",
                bad.what
            ));
        }
    }
    let file = file.to_str().unwrap();
    if bad.lines.is_empty() {
        if !error.contains(file) {
            problems.push(format!(
                "{how}, {}: the error does not name the config file {file}: {error}",
                bad.what
            ));
        }
        return problems;
    }
    let located = bad.lines.iter().any(|line| {
        let at = format!("{file}:{line}:");
        error.match_indices(&at).any(|(i, _)| {
            let column: String = error[i + at.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            !column.is_empty() && error[i + at.len() + column.len()..].starts_with(':')
        })
    });
    if !located {
        problems.push(format!(
            "{how}, {}: the error does not point at {file}:LINE:COLUMN with LINE in {:?}: {error}",
            bad.what, bad.lines
        ));
    }
    problems
}

#[test]
fn every_bad_config_is_refused_with_its_file_line_and_column() {
    let cache = test_cache_dir();
    let cache = cache.to_str().unwrap();
    let mut problems = Vec::new();
    for bad in BAD_CONFIGS {
        let dir = TempDir::new("badconfig");
        std::fs::write(dir.path().join("garbage.wasm"), pattern(3, 4096)).unwrap();
        let file = dir.path().join("host.toml");
        std::fs::write(&file, bad.toml).unwrap();
        let path = file.to_str().unwrap();

        let error_line = |stderr: &str| {
            stderr
                .lines()
                .find(|l| l.starts_with("error: "))
                .map(str::to_string)
        };
        let out = run_host(&["config", "check", path, "--cache-dir", cache]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let check_error = error_line(&stderr);
        if out.status.success() {
            problems.push(format!("config check, {}: accepted:\n{stderr}", bad.what));
        } else {
            problems.extend(check_refusal(bad, &file, "config check", &stderr, true));
        }

        let out = run_host(&["serve", "--config", path, "--cache-dir", cache]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let serve_error = error_line(&stderr);
        if out.status.success() {
            problems.push(format!("serve, {}: exited 0:\n{stderr}", bad.what));
        } else {
            problems.extend(check_refusal(bad, &file, "serve --config", &stderr, false));
        }
        // docs/configuration.md: `serve` and `config check` report the same
        // errors.
        if check_error != serve_error {
            problems.push(format!(
                "{}: serve and config check report different errors:\n  config check: {}\n  serve:        {}",
                bad.what,
                check_error.as_deref().unwrap_or("(none)"),
                serve_error.as_deref().unwrap_or("(none)")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// An error names the config file as given on the command line (a relative
/// path stays relative), and `serve` says the same as `config check`.
#[test]
fn errors_name_the_config_file_as_given() {
    let cache = test_cache_dir();
    let cache = cache.to_str().unwrap();
    let mut problems = Vec::new();
    for (what, toml) in [
        (
            "a syntax error",
            "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\ntimeout = 5s\n",
        ),
        (
            "a handler that is not a component",
            "[tenants.a]\nhandler = \"garbage.wasm\"\nlisten = [\"127.0.0.1:0\"]\n",
        ),
    ] {
        let dir = TempDir::new("relative");
        std::fs::write(dir.path().join("garbage.wasm"), pattern(5, 4096)).unwrap();
        std::fs::write(dir.path().join("host.toml"), toml).unwrap();
        let mut errors = Vec::new();
        for args in [
            ["config", "check", "host.toml", "--cache-dir", cache],
            ["serve", "--config", "host.toml", "--cache-dir", cache],
        ] {
            let out = crate::support::run_host_in(dir.path(), &args);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let error = stderr
                .lines()
                .find(|l| l.starts_with("error: "))
                .map(str::to_string);
            match &error {
                Some(line) if line.starts_with("error: host.toml:") => {}
                _ => problems.push(format!(
                    "{} {what}: expected `error: host.toml:...`, got:\n{stderr}",
                    args[0]
                )),
            }
            errors.push(error);
        }
        if errors[0] != errors[1] {
            problems.push(format!(
                "{what}: serve and config check report different errors:\n  config check: {:?}\n  serve:        {:?}",
                errors[0], errors[1]
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// Two tenants on `127.0.0.1:0`: "Port 0 collides with nothing"
/// (docs/configuration.md, section 2), so `config check` accepts the file
/// and `serve` gives each tenant a port of its own.
#[test]
fn two_tenants_may_both_listen_on_port_0() {
    let toml =
        "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n\n[tenants.b]\nlisten = [\"127.0.0.1:0\"]\n";
    let dir = TempDir::new("port0");
    let file = dir.path().join("host.toml");
    std::fs::write(&file, toml).unwrap();
    let cache = test_cache_dir();
    let check = run_host(&[
        "config",
        "check",
        file.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(
        check.status.success(),
        "config check refused it:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let args: Vec<std::ffi::OsString> = vec!["serve".into(), "--config".into(), file.into()];
    let mut server = Server::spawn(&args, &[]);
    let listening = |server: &Server| {
        server
            .log()
            .iter()
            .filter_map(|l| l.strip_prefix("listening on "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    wait_until("two listening lines or the host's exit", || {
        listening(&server).len() >= 2 || server.exited().is_some()
    });
    let lines = listening(&server);
    if lines.len() < 2 {
        server.wait_exit();
        // Its last line, once the log reader has it.
        server.wait_for_log(|l| l.starts_with("error: "));
        panic!(
            "`host config check` accepted two tenants on 127.0.0.1:0, but \
             `host serve --config` did not serve them:\n{}",
            server.log().join("\n")
        );
    }
    let a: SocketAddr = lines[0].split(' ').next().unwrap().parse().unwrap();
    let b: SocketAddr = lines[1].split(' ').next().unwrap().parse().unwrap();
    assert_ne!(a, b);
    assert_eq!(exchange(a, b"to a"), b"to a");
    assert_eq!(exchange(b, b"to b"), b"to b");
}

#[test]
fn config_check_prints_the_effective_settings() {
    let dir = TempDir::new("goodconfig");
    copy_guest(dir.path(), "echo", "echo.wasm");
    let file = dir.path().join("host.toml");
    std::fs::write(
        &file,
        r#"
[defaults]
timeout = "7s"

[tenants.alpha]
handler = "echo.wasm"
listen = ["127.0.0.1:0"]

[tenants.beta]
listen = ["127.0.1.2:0"]
strategy = "forking"
"#,
    )
    .unwrap();
    let cache = test_cache_dir();
    let out = run_host(&[
        "config",
        "check",
        file.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "refused:\n{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    // The wording is not fixed: the names, and each tenant's strategy.
    let lower = stdout.to_lowercase();
    for part in ["alpha", "beta", "forking", "threading"] {
        assert!(lower.contains(part), "{part:?} is not in:\n{stdout}");
    }
}
