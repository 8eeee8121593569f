//! systemd integration: the host serves on sockets `systemd-socket-activate`
//! bound and passed it (`systemd:NAME`, TCP and Unix, kept across a
//! reload, never unlinked), a socket that was not passed is a start-up
//! error, and a `NOTIFY_SOCKET` listener here records `READY=1`,
//! `RELOADING=1` + `MONOTONIC_USEC`, `READY=1` and `STOPPING=1` in order.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{Launch, Process};

use crate::support::{
    exchange, host_binary, run_host, test_cache_dir, unix_exchange, TempDir, PATIENCE,
};

const ACTIVATE: &str = "systemd-socket-activate";

/// Where `systemd-socket-activate` is: a missing tool fails the test (it is
/// installed by handlers/install-toolchains.sh, from Debian's `systemd`).
fn activate_binary() -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(ACTIVATE);
        if path.exists() {
            return path;
        }
    }
    panic!("{ACTIVATE} is missing: run handlers/install-toolchains.sh (Debian package systemd)");
}

/// A free TCP port on 127.0.0.1 (`systemd-socket-activate` needs a fixed
/// one).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `systemd-socket-activate -l LISTEN --fdname=NAME [-E ENV...] host ARGS`,
/// its log (and then the host's, after the exec) collected; waits until it
/// listens. The host starts at the first connection attempt.
fn activate(listen: &str, fdname: &str, env: &[String], host_args: &[&str]) -> Process {
    let mut command = Command::new(activate_binary());
    command.arg("-l").arg(listen);
    command.arg(format!("--fdname={fdname}"));
    for var in env {
        command.arg("-E").arg(var);
    }
    command.arg(host_binary());
    command.args(host_args);
    command.arg("--cache-dir").arg(test_cache_dir());
    let process = Launch::new(command)
        .own_group()
        .spawn()
        .expect("cannot start systemd-socket-activate");
    wait_line(&process, 0, |l| l.contains("Listening on"));
    process
}

fn wait_line(process: &Process, since: usize, matches: impl Fn(&str) -> bool) -> String {
    process
        .wait_for_line(since, PATIENCE, matches)
        .unwrap_or_else(|missing| {
            panic!(
                "no such log line ({}); the log so far:\n{}",
                missing.why("the host"),
                missing.lines.join("\n")
            )
        })
}

#[test]
fn serves_on_a_tcp_socket_systemd_passed() {
    let addr = free_addr();
    let process = activate(
        &addr.to_string(),
        "web",
        &[],
        &["serve", "--addr", "systemd:web"],
    );
    // The first connection starts the host, then waits in the backlog.
    assert_eq!(exchange(addr, b"passed by systemd"), b"passed by systemd");
    let line = wait_line(&process, 0, |l| l.starts_with("listening on "));
    assert_eq!(line.trim(), format!("listening on {addr} tenant=default"));
    wait_line(&process, 0, |l| l.contains("connection 1 closed"));
}

#[test]
fn serves_on_a_unix_socket_systemd_passed_across_a_reload_and_never_unlinks_it() {
    let dir = TempDir::new("systemd-unix");
    let socket = dir.path().join("app.sock");
    let config = dir.path().join("host.toml");
    std::fs::write(&config, "[tenants.app]\nlisten = [\"systemd:app\"]\n").unwrap();
    let config_arg = config.to_str().unwrap();
    let mut process = activate(
        socket.to_str().unwrap(),
        "app",
        &[],
        &["serve", "--config", config_arg],
    );
    assert_eq!(unix_exchange(&socket, b"over unix"), b"over unix");
    let line = wait_line(&process, 0, |l| l.starts_with("listening on "));
    assert_eq!(
        line.trim(),
        format!("listening on unix:{} tenant=app", socket.display())
    );

    // A reload that changes the tenant keeps the adopted socket.
    std::fs::write(
        &config,
        "[tenants.app]\nlisten = [\"systemd:app\"]\ntimeout = \"20s\"\n",
    )
    .unwrap();
    let mark = process.log_len();
    process.signal(libc::SIGHUP).unwrap();
    let reloaded = wait_line(&process, mark, |l| {
        l.contains("reloaded: ") || l.contains("reload failed")
    });
    assert!(
        reloaded.contains("reloaded: app: limits changed"),
        "{reloaded}"
    );
    assert_eq!(unix_exchange(&socket, b"after reload"), b"after reload");

    process.signal(libc::SIGTERM).unwrap();
    let status = process.wait_exit(PATIENCE).expect("the host did not exit");
    assert!(status.success(), "{status:?}: {:?}", process.log());
    // systemd's socket file: the host did not bind it and leaves it.
    assert!(
        socket.exists(),
        "the host removed the socket file systemd bound"
    );
}

#[test]
fn a_socket_systemd_did_not_pass_is_a_start_up_error() {
    let addr = free_addr();
    let mut process = activate(
        &addr.to_string(),
        "web",
        &[],
        &["serve", "--addr", "systemd:missing"],
    );
    // Starts the host; it refuses to start, so this connection is dropped.
    let _ = std::net::TcpStream::connect(addr);
    let status = process.wait_exit(PATIENCE).expect("the host did not exit");
    assert!(!status.success());
    let log = process.log().join("\n");
    assert!(
        log.contains(
            "error: cannot listen on systemd:missing: systemd passed no socket named \"missing\" (it passed: web)"
        ),
        "{log}"
    );
}

#[test]
fn without_passed_sockets_systemd_addresses_are_an_error_but_config_check_accepts_them() {
    let dir = TempDir::new("systemd-check");
    let config = dir.path().join("host.toml");
    std::fs::write(&config, "[tenants.app]\nlisten = [\"systemd:app\"]\n").unwrap();
    let checked = run_host(&["config", "check", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(stdout.contains("systemd:app"), "{stdout}");

    let served = run_host(&["serve", "--addr", "systemd:app", "--no-cache"]);
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success());
    assert!(
        stderr.contains("error: cannot listen on systemd:app: systemd passed no sockets"),
        "{stderr}"
    );

    let bad = run_host(&["serve", "--addr", "systemd:a b", "--no-cache"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("invalid --addr \"systemd:a b\": expected systemd:NAME"),
        "{stderr}"
    );
}

/// The next message on the notify socket that is more than a `STATUS=`
/// refresh.
fn next_notice(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).expect("a notify message in time");
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.lines().any(|l| !l.starts_with("STATUS=")) {
            return text;
        }
    }
}

#[test]
fn notifies_ready_reloading_and_stopping_in_order() {
    let dir = TempDir::new("systemd-notify");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let addr = free_addr();
    let env = [format!("NOTIFY_SOCKET={}", notify_path.display())];
    let mut process = activate(
        &addr.to_string(),
        "web",
        &env,
        // `systemd:` alone: the first passed socket.
        &["serve", "--addr", "systemd:"],
    );
    assert_eq!(exchange(addr, b"ready?"), b"ready?");

    let ready = next_notice(&notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving 1 tenant(s): default (")),
        "{ready:?}"
    );
    // READY comes after every `listening on` line.
    wait_line(&process, 0, |l| l.starts_with("listening on "));

    process.signal(libc::SIGHUP).unwrap();
    let reloading = next_notice(&notify);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading:?}");
    let ready_again = next_notice(&notify);
    assert!(
        ready_again.lines().any(|l| l == "READY=1"),
        "{ready_again:?}"
    );
    wait_line(&process, 0, |l| l.contains("reloaded: "));

    process.signal(libc::SIGTERM).unwrap();
    let stopping = next_notice(&notify);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = process.wait_exit(PATIENCE).expect("the host did not exit");
    assert!(status.success(), "{status:?}");
}

/// The example units in deploy/systemd pass `systemd-analyze verify` with
/// not one warning (an unknown or misspelt directive is one), with
/// `ExecStart` pointed at the host binary under test. No running systemd is
/// needed; the units have not been run under a live one here.
#[test]
fn the_example_units_verify_cleanly() {
    let analyze = ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join("systemd-analyze"))
        .find(|path| path.exists())
        .expect("systemd-analyze is missing: run handlers/install-toolchains.sh (Debian package systemd)");
    let units = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/systemd");
    let dir = TempDir::new("units");
    for name in ["host.socket", "host.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        assert!(
            name != "host.service" || text.contains("ExecStart=/usr/local/bin/host serve"),
            "{text}"
        );
        let text = text.replace("/usr/local/bin/host", host_binary());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("host.socket"))
        .arg(dir.path().join("host.service"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
