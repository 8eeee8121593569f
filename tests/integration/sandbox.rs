//! Hostile guests: each misbehaves next to 20 well-behaved echo clients that
//! must all get their bytes back; the misbehaviour ends only its own
//! connection, with its cause named in the log.

use std::thread;

use crate::for_each_strategy;
use crate::support::{exchange, exchange_logged, guest, pattern, Server, Strategy};

for_each_strategy!(
    an_infinite_loop_is_stopped_by_the_timeout,
    a_memory_bomb_hits_the_memory_limit,
    deep_recursion_traps,
    a_panic_traps,
    a_guest_sleeping_past_its_timeout_is_stopped,
    a_gibibyte_to_stdout_is_capped_in_the_log,
    a_flood_of_empty_lines_is_capped_in_the_log,
    exit_0_is_ok_and_other_statuses_are_errors,
    reading_etc_passwd_is_denied,
    the_environment_is_empty,
    opening_a_socket_is_denied,
    granted_env_and_dirs_are_visible,
);

/// The test guest with short limits (`--timeout 2s` unless `extra` sets it).
fn hostile_server(strategy: Strategy, extra: &[&str]) -> Server {
    let mut args = vec!["--idle-timeout", "2s", "--max-memory", "32MiB"];
    if !extra.contains(&"--timeout") {
        args.extend_from_slice(&["--timeout", "2s"]);
    }
    args.extend_from_slice(extra);
    Server::start(strategy, Some(&guest("test-guest")), &args)
}

/// Runs `hostile` while 20 echo clients stream through the same host; each
/// must get exactly its own bytes back. Returns what `hostile` returned.
fn beside_20_echo_clients<T>(server: &Server, hostile: impl FnOnce() -> T) -> T {
    let addr = server.addr();
    let clients: Vec<_> = (0..20u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(i + 500, 64 * 1024);
                let mut request = b"echo\n".to_vec();
                request.extend_from_slice(&data);
                let reply = exchange(addr, &request);
                assert!(reply == data, "echo client {i} did not get its bytes back");
            })
        })
        .collect();
    let result = hostile();
    for client in clients {
        client.join().expect("a well-behaved client failed");
    }
    result
}

fn an_infinite_loop_is_stopped_by_the_timeout(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, reply) = beside_20_echo_clients(&server, || exchange_logged(&server, b"spin\n"));
    assert_eq!(reply, b"");
    let line = server.closed_line(id);
    assert!(line.contains("outcome=timeout"), "{line}");
    assert_eq!(
        exchange(server.addr(), b"count\n"),
        b"1",
        "the host still serves"
    );
}

fn a_memory_bomb_hits_the_memory_limit(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, reply) = beside_20_echo_clients(&server, || exchange_logged(&server, b"alloc\n"));
    assert_eq!(reply, b"");
    let line = server.closed_line(id);
    assert!(line.contains("outcome=memory-limit"), "{line}");
    // The instance never held more than the limit.
    let kib: u64 = line
        .split(" memory=")
        .nth(1)
        .and_then(|r| r.split("KiB").next())
        .and_then(|n| n.parse().ok())
        .expect("memory=NKiB in the line");
    assert!(kib <= 32 * 1024, "{line}");
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
}

fn deep_recursion_traps(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, reply) = beside_20_echo_clients(&server, || exchange_logged(&server, b"recurse\n"));
    assert_eq!(reply, b"");
    let line = server.closed_line(id);
    assert!(line.contains("outcome=trap"), "{line}");
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
}

fn a_panic_traps(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, _) = beside_20_echo_clients(&server, || exchange_logged(&server, b"panic\n"));
    assert!(server.closed_line(id).contains("outcome=trap"));
    let stderr = format!("connection {id} stderr:");
    server.wait_for_log(|l| l.contains(&stderr) && l.contains("asked to panic"));
}

fn a_guest_sleeping_past_its_timeout_is_stopped(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    // Blocked in a host call, not in wasm: the epoch alone would not stop it.
    let (id, reply) =
        beside_20_echo_clients(&server, || exchange_logged(&server, b"sleep 60000\n"));
    assert_eq!(reply, b"", "nothing is written after the deadline");
    let line = server.closed_line(id);
    assert!(line.contains("outcome=timeout"), "{line}");
}

fn a_gibibyte_to_stdout_is_capped_in_the_log(strategy: Strategy) {
    let server = hostile_server(strategy, &["--timeout", "60s"]);
    let (id, reply) =
        beside_20_echo_clients(&server, || exchange_logged(&server, b"flood 1073741824\n"));
    assert_eq!(String::from_utf8(reply).unwrap(), "flooded 1073741824");
    assert!(server.closed_line(id).contains("outcome=ok"));
    let stdout = format!("connection {id} stdout: ");
    let logged: usize = server
        .log()
        .iter()
        .filter_map(|l| l.split_once(&stdout).map(|(_, text)| text.len() + 1))
        .sum();
    assert!(
        logged <= 64 * 1024 + 4096,
        "{logged} bytes of guest output were logged"
    );
    let note = format!("connection {id} output:");
    server.wait_for_log(|l| l.contains(&note) && l.contains("not logged"));
}

fn reading_etc_passwd_is_denied(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, reply) = beside_20_echo_clients(&server, || {
        exchange_logged(&server, b"read-file /etc/passwd\n")
    });
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("denied: "), "{reply}");
    let stderr = format!("connection {id} stderr: denied: ");
    server.wait_for_log(|l| l.contains(&stderr));
}

fn the_environment_is_empty(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, reply) = beside_20_echo_clients(&server, || exchange_logged(&server, b"env\n"));
    assert_eq!(String::from_utf8(reply).unwrap(), "env: []");
    let stderr = format!("connection {id} stderr: env: []");
    server.wait_for_log(|l| l.contains(&stderr));
}

fn opening_a_socket_is_denied(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let target = format!("connect {}\n", server.addr());
    let (id, reply) =
        beside_20_echo_clients(&server, || exchange_logged(&server, target.as_bytes()));
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("denied: "), "{reply}");
    let stderr = format!("connection {id} stderr: denied: ");
    server.wait_for_log(|l| l.contains(&stderr));
}

fn granted_env_and_dirs_are_visible(strategy: Strategy) {
    let dir = crate::support::TempDir::new("grant");
    std::fs::write(dir.path().join("hello.txt"), "granted file").unwrap();
    let grant = format!("{}::/data", dir.path().display());
    let server = hostile_server(strategy, &["--env", "GREETING=hi", "--dir", &grant]);
    server.wait_for_log(|l| {
        l.contains("grants: env GREETING; dir ") && l.contains("as /data (read-only)")
    });
    let env = String::from_utf8(exchange(server.addr(), b"env\n")).unwrap();
    assert_eq!(env, "env: [GREETING=hi]");
    let read = String::from_utf8(exchange(server.addr(), b"read-file /data/hello.txt\n")).unwrap();
    assert_eq!(read, "read 12 bytes: granted file");
    // Granted directories are read-only; the rest of the host stays hidden.
    let passwd = String::from_utf8(exchange(server.addr(), b"read-file /etc/passwd\n")).unwrap();
    assert!(passwd.starts_with("denied: "), "{passwd}");
}

fn a_flood_of_empty_lines_is_capped_in_the_log(strategy: Strategy) {
    // Writing 200,000 lines takes a while on a loaded machine; this test is
    // about the log's budget, not the deadline.
    let server = hostile_server(strategy, &["--timeout", "30s"]);
    let (id, reply) = exchange_logged(&server, b"lines 200000\n");
    assert_eq!(String::from_utf8(reply).unwrap(), "lined 200000");
    let stdout = format!("connection {id} stdout:");
    let lines = server.log().iter().filter(|l| l.contains(&stdout)).count();
    // Each line costs its prefix too: at most 64 KiB / 64 B of them.
    assert!(lines <= 1024, "{lines} empty guest lines were logged");
    let note = format!("connection {id} output:");
    server.wait_for_log(|l| l.contains(&note) && l.contains("not logged"));
}

fn exit_0_is_ok_and_other_statuses_are_errors(strategy: Strategy) {
    let server = hostile_server(strategy, &[]);
    let (id, reply) = exchange_logged(&server, b"exit 0\n");
    assert_eq!(reply, b"exiting");
    let line = server.closed_line(id);
    assert!(line.contains("outcome=ok"), "{line}");
    // WASI 0.2's exit carries success or failure only: any other status is 1.
    let (id, reply) = exchange_logged(&server, b"exit 3\n");
    assert_eq!(reply, b"exiting");
    let line = server.closed_line(id);
    assert!(
        line.contains(r#"outcome=handler-error error="exited with status 1""#),
        "{line}"
    );
}
