//! Running the host as operators do (issue 14): the log level (`--log-level`,
//! `[defaults] log-level`) and the health and readiness endpoints
//! (`/healthz`, `/readyz`) on the metrics address.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use crate::support::{
    children_of, eventually, exchange, guest, http_get, run_host, stable_line, toml_path, Server,
    Strategy, TempDir, PATIENCE,
};

fn closed_lines(log: &[String]) -> Vec<&String> {
    log.iter().filter(|l| l.contains(" closed peer=")).collect()
}

/// Serves three echo exchanges, one whose guest prints (info lines of the
/// guest's output) and one whose guest's output is over the log budget (its
/// `more bytes of guest output not logged` line is a warning) through the
/// test guest; stops the host; returns its whole log.
fn serve_and_stop(server: &mut Server) -> Vec<String> {
    for i in 0..3u8 {
        assert_eq!(
            exchange(server.addr(), &[b'e', b'c', b'h', b'o', b'\n', i]),
            [i]
        );
    }
    assert_eq!(exchange(server.addr(), b"print\n"), b"printed");
    assert_eq!(
        exchange(server.addr(), b"flood 200000\n"),
        b"flooded 200000"
    );
    server.wait_for_log(|l| l.contains("more bytes of guest output not logged"));
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
    server.whole_log()
}

#[test]
fn warn_silences_the_closed_lines_but_not_the_warnings() {
    let mut server = Server::start(
        Strategy::Threading,
        Some(&guest("test-guest")),
        &["--log-level", "warn"],
    );
    let log = serve_and_stop(&mut server);
    assert_eq!(closed_lines(&log), Vec::<&String>::new(), "{log:#?}");
    assert!(
        log.iter().any(|l| l.starts_with("listening on ")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains(" WARN ") && l.contains("more bytes of guest output not logged")),
        "{log:#?}"
    );
    // Nothing at info: not the start-up lines, not the guest's own output.
    assert!(!log.iter().any(|l| l.contains(" INFO ")), "{log:#?}");
}

#[test]
fn debug_writes_info_and_debug() {
    let mut server = Server::start(
        Strategy::Threading,
        Some(&guest("test-guest")),
        &["--log-level", "debug"],
    );
    server.wait_for_log(|l| l.contains(" DEBUG ") && l.contains("worker process pid-"));
    let log = serve_and_stop(&mut server);
    assert_eq!(closed_lines(&log).len(), 5, "{log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("stdout: hello from the guest")),
        "{log:#?}"
    );
}

#[test]
fn the_stable_lines_are_written_at_every_level_in_json_too() {
    let args: Vec<std::ffi::OsString> = ["serve", "--addr", "127.0.0.1:0"]
        .into_iter()
        .map(Into::into)
        .collect();
    let mut server = Server::spawn(&args, &["--log-format", "json", "--log-level", "error"]);
    let line = server.wait_for_log(|l| stable_line(l).is_some());
    let addr = harness::listening_addr(&stable_line(&line).unwrap()).expect("IP:PORT");
    server.set_addr(addr);
    assert_eq!(exchange(server.addr(), b"json"), b"json");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
    let log = server.whole_log();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert!(log[0].starts_with('{'), "{log:#?}");
}

#[test]
fn a_bad_log_level_is_refused_with_its_value() {
    let output = run_host(&["serve", "--addr", "127.0.0.1:0", "--log-level", "loud"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr,
        "error: invalid --log-level \"loud\": \"loud\" is not a level (expected error, warn, info, debug, trace or off)\n"
    );
    let dir = TempDir::new("log-level");
    let file = dir.path().join("host.toml");
    for (text, expected) in [
        (
            "[defaults]\nlog-level = \"quiet\"\n[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n",
            ":2:13: invalid log-level \"quiet\": \"quiet\" is not a level",
        ),
        (
            "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\nlog-level = \"warn\"\n",
            ":3:1: log-level is host-wide: set it in [defaults], not in a tenant's table",
        ),
        (
            "log-level = \"warn\"\n[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n",
            ":1:1: unknown key \"log-level\" at the top level (log-level goes in [defaults])",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        for command in [&["serve", "--config"][..], &["config", "check"][..]] {
            let mut args = command.to_vec();
            args.push(file.to_str().unwrap());
            let output = run_host(&args);
            assert!(!output.status.success(), "{text}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with("error: "), "{stderr}");
            assert!(stderr.contains(expected), "{stderr}");
        }
    }
}

#[test]
fn the_files_log_level_applies_and_the_flag_wins() {
    let toml = format!(
        "[defaults]\nlog-level = \"warn\"\nhandler = {}\n\n[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n",
        toml_path(&guest("test-guest"))
    );
    // The file's level alone.
    let mut server = Server::start_config(&toml, &[]);
    let log = serve_and_stop(&mut server);
    assert_eq!(closed_lines(&log), Vec::<&String>::new(), "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("stopped;")), "{log:#?}");
    // The flag over the file, with a target of its own: the host's
    // supervision at info, the rest (the closed lines) at warn.
    let mut server = Server::start_config(&toml, &["--log-level", "warn,host::supervisor=info"]);
    let log = serve_and_stop(&mut server);
    assert_eq!(closed_lines(&log), Vec::<&String>::new(), "{log:#?}");
    assert!(
        log.last()
            .is_some_and(|l| l.ends_with("stopped; every worker process reaped")),
        "{log:#?}"
    );
    // `config check` shows the level the file gives.
    let dir = TempDir::new("log-level-check");
    let file = dir.path().join("host.toml");
    std::fs::write(&file, &toml).unwrap();
    let output = run_host(&["config", "check", file.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("[defaults]\nlog-level = \"warn\"\n"),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------
// Health and readiness on the metrics address.

fn status(addr: SocketAddr, path: &str) -> (u16, String) {
    let (line, body) = http_get(addr, path);
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {line:?}"));
    (code, body)
}

#[test]
fn healthz_and_readyz_answer_and_readyz_turns_503_before_the_listeners_close() {
    let mut server = Server::start(
        Strategy::Threading,
        Some(&guest("test-guest")),
        &["--metrics-addr", "127.0.0.1:0", "--drain-timeout", "10m"],
    );
    let metrics = server.metrics_addr();
    assert_eq!(status(metrics, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(status(metrics, "/readyz"), (200, "ready\n".to_string()));
    let (code, index) = status(metrics, "/");
    assert_eq!(code, 200);
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert!(index.contains(&format!("GET {path} ")), "{index}");
    }
    assert_eq!(status(metrics, "/nothing").0, 404);

    // A call in flight holds the drain open.
    let held = server.connect();
    (&held).write_all(b"hold\n").unwrap();
    let mut line = String::new();
    BufReader::new(&held).read_line(&mut line).unwrap();
    server.signal(libc::SIGTERM);
    // Once the tenant's port refuses, /readyz already says 503.
    eventually(PATIENCE, || match TcpStream::connect(server.addr()) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        other => Err(format!("still accepting: {other:?}")),
    });
    assert_eq!(
        status(metrics, "/readyz"),
        (503, "not ready: shutting down\n".to_string())
    );
    // The host process still runs, and still serves its metrics.
    assert_eq!(status(metrics, "/healthz").0, 200);
    assert_eq!(status(metrics, "/metrics").0, 200);
    server.wait_for_log(|l| l.contains("shutting down"));
    assert_eq!(status(metrics, "/readyz").0, 503);
    // The held call ends; the host stops, and the metrics address with it.
    held.shutdown(Shutdown::Write).unwrap();
    assert!(server.wait_exit().success());
    let log = server.whole_log();
    assert!(
        log.last()
            .is_some_and(|l| l.ends_with("stopped; every worker process reaped")),
        "{log:#?}"
    );
    assert!(TcpStream::connect(metrics).is_err());
}

#[test]
fn readyz_is_503_while_a_dead_worker_awaits_its_replacement() {
    let server = Server::start(Strategy::Async, None, &["--metrics-addr", "127.0.0.1:0"]);
    let metrics = server.metrics_addr();
    assert_eq!(exchange(server.addr(), b"ping"), b"ping");
    server.wait_for_log(|l| l.contains(" worker=pid-"));
    let worker = *server.worker_pids().first().expect("a worker pid");
    let metrics_process = eventually(PATIENCE, || {
        let others: Vec<u32> = children_of(server.pid())
            .into_iter()
            .filter(|pid| *pid != worker)
            .collect();
        match others[..] {
            [one] => Ok(one),
            _ => Err(format!("not one metrics process: {others:?}")),
        }
    });
    assert_eq!(status(metrics, "/readyz").0, 200);
    // Kill the worker, and each replacement as it appears: one that dies
    // within a second of its start is replaced a second later, and until
    // then the tenant has no live worker.
    let answer = eventually(PATIENCE, || {
        for pid in children_of(server.pid()) {
            if pid != metrics_process {
                // SAFETY: killing a worker process of the host this test started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        match status(metrics, "/readyz") {
            (503, body) => Ok(body),
            other => Err(format!("/readyz answered {other:?}")),
        }
    });
    assert_eq!(answer, "not ready: a tenant has no live worker process\n");
    server.wait_for_log(|l| l.contains("starting a replacement in 1s"));
    // Left alone, the replacement runs and the host is ready again.
    eventually(PATIENCE, || match status(metrics, "/readyz") {
        (200, _) => Ok(()),
        other => Err(format!("/readyz answered {other:?}")),
    });
    assert_eq!(exchange(server.addr(), b"pong"), b"pong");
    assert_eq!(status(metrics, "/healthz").0, 200);
}
