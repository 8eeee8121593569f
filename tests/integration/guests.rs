//! Guest behaviour seen from outside: a fresh instance per connection, the
//! connection's details, workers, and guests that fail in every way ending
//! only their own connection.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;

use crate::for_each_strategy;
use crate::support::{
    exchange, exchange_reset, fields, guest, language_echo, pattern, read_to_end, read_until_reset,
    Server, Strategy,
};

for_each_strategy!(
    every_connection_gets_a_fresh_instance,
    every_connection_draws_its_own_random_numbers,
    connection_info_describes_the_connection,
    hello_replies_with_its_worker,
    concurrent_calls_run_on_different_workers,
    the_connection_closes_when_handle_returns,
    a_trap_ends_only_its_own_connection,
    a_panic_is_a_trap_and_its_message_is_logged,
    a_handler_error_is_logged_with_its_text,
    guest_stdout_and_stderr_reach_the_log,
    the_sandbox_grants_nothing,
    http_hello_answers_get_and_refuses_post,
);

fn test_guest(strategy: Strategy, extra: &[&str]) -> Server {
    Server::start(strategy, Some(&guest("test-guest")), extra)
}

fn every_connection_gets_a_fresh_instance(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    let addr = server.addr();
    for _ in 0..5 {
        assert_eq!(exchange(addr, b"count\n"), b"1");
    }
    let clients: Vec<_> = (0..16)
        .map(|_| std::thread::spawn(move || exchange(addr, b"count\n")))
        .collect();
    for client in clients {
        assert_eq!(
            client.join().unwrap(),
            b"1",
            "a connection saw another's instance"
        );
    }
}

/// A forking worker makes one spare instance, and each child serves its
/// connection in its own copy of it, when instantiating the handler runs no
/// guest code; a handler with a start function (the C echo's) is
/// instantiated by each child. Both serve every connection afresh.
#[test]
fn forking_children_adopt_a_spare_instance_only_if_instantiation_runs_no_code() {
    let debug = ["--log-level", "debug"];
    let spare = "children adopt a spare instance";
    let server = Server::start(Strategy::Forking, Some(&guest("test-guest")), &debug);
    server.wait_for_log(|line| line.contains(spare));
    for _ in 0..3 {
        assert_eq!(exchange(server.addr(), b"count\n"), b"1");
    }
    let c = Server::start(Strategy::Forking, Some(&language_echo("c")), &debug);
    assert_eq!(exchange(c.addr(), b"ping\n"), b"ping\n");
    assert_eq!(exchange(c.addr(), b"pong\n"), b"pong\n");
    // Every line before the second connection's end is in by now.
    c.closed_line(2);
    let log = c.log();
    assert!(!log.iter().any(|line| line.contains(spare)), "{log:#?}");
}

/// A forking worker moves the host's code onto huge pages before it forks,
/// and its children share them: a child's code is one anonymous executable
/// mapping, wholly on huge pages, shared with its worker, of the size the
/// worker logged. Where transparent huge pages are off (`never`, for all
/// sizes or for 2 MiB pages), the worker says instead that the code stays on
/// its file pages, and the child has no such mapping.
#[test]
fn a_forking_worker_shares_its_code_on_huge_pages_with_its_children() {
    let thp = "/sys/kernel/mm/transparent_hugepage";
    let off = |path: String| {
        std::fs::read_to_string(path).is_ok_and(|setting| setting.contains("[never]"))
    };
    let available = std::path::Path::new(thp).exists()
        && !off(format!("{thp}/enabled"))
        && !off(format!("{thp}/hugepages-2048kB/enabled"));
    let server = test_guest(Strategy::Forking, &[]);
    let held = server.connect();
    (&held).write_all(b"hold\n").unwrap();
    let mut said = String::new();
    BufReader::new(&held).read_line(&mut said).unwrap();
    let child: u32 = said.trim().strip_prefix("pid-").unwrap().parse().unwrap();
    // The child's anonymous executable mappings (no file, no name) and
    // their sizes in KiB: `[Size, AnonHugePages, Shared_Dirty]`.
    let smaps = std::fs::read_to_string(format!("/proc/{child}/smaps")).unwrap();
    let mut code: Vec<Vec<u64>> = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            inside = fields.len() == 5 && fields[1] == "r-xp" && fields[4] == "0";
            if inside {
                code.push(Vec::new());
            }
        } else if inside && ["Size:", "AnonHugePages:", "Shared_Dirty:"].contains(&fields[0]) {
            code.last_mut().unwrap().push(fields[1].parse().unwrap());
        }
    }
    if available {
        let moved = server.wait_for_log(|line| line.contains("moved onto huge pages"));
        let mib: u64 = moved
            .split("the host's code (")
            .nth(1)
            .and_then(|rest| rest.split(" MiB)").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no size in {moved:?}"));
        assert!(mib >= 2, "{moved}");
        let kib = mib * 1024;
        assert_eq!(code, vec![vec![kib, kib, kib]], "child {child}: {smaps}");
    } else {
        server.wait_for_log(|line| line.contains("the host's code stays on its file pages"));
        assert_eq!(code, Vec::<Vec<u64>>::new(), "child {child}: {smaps}");
    }
    drop(held);
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
}

/// A forking child whose guest only reads and writes its connection runs on
/// one thread: its streams wait without a tokio runtime, so it builds none.
/// One whose guest sleeps gets wasmtime-wasi's runtime, of one worker thread.
#[test]
fn a_forking_child_builds_a_runtime_only_for_a_guest_that_needs_one() {
    let server = test_guest(Strategy::Forking, &[]);
    let threads = harness::proc::threads;
    // `hold` says which child serves it, then reads until the client closes.
    let held = server.connect();
    (&held).write_all(b"hold\n").unwrap();
    let mut said = String::new();
    BufReader::new(&held).read_line(&mut said).unwrap();
    let child: u32 = said.trim().strip_prefix("pid-").unwrap().parse().unwrap();
    assert_eq!(
        threads(child),
        1,
        "child {child} of a guest that only reads"
    );
    drop(held);
    // `nap` sleeps (a pollable) after it says so.
    let napping = server.connect();
    (&napping).write_all(b"nap 20000\n").unwrap();
    let mut said = String::new();
    BufReader::new(&napping).read_line(&mut said).unwrap();
    assert_eq!(said, "napping\n");
    crate::support::eventually(std::time::Duration::from_secs(10), || {
        // The host's workers' children: the napping child (and perhaps the
        // held one, still exiting).
        let children: Vec<u32> = harness::proc::children(server.pid())
            .into_iter()
            .flat_map(harness::proc::children)
            .collect();
        let counts: Vec<usize> = children.iter().map(|&c| threads(c)).collect();
        if counts.contains(&2) && counts.iter().all(|&n| n <= 2) {
            Ok(())
        } else {
            Err(format!("children {children:?} with {counts:?} threads"))
        }
    });
    drop(napping);
}

/// `wasi:random` (secure and insecure) differs between connections: no
/// random state is shared by a forked child with its siblings, or kept by a
/// worker for the next connection.
fn every_connection_draws_its_own_random_numbers(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    let draws: Vec<String> = (0..8)
        .map(|_| String::from_utf8(exchange(server.addr(), b"random\n")).unwrap())
        .collect();
    let mut seen = HashSet::new();
    for draw in &draws {
        let lines: Vec<&str> = draw.lines().collect();
        assert_eq!(lines.len(), 2, "{draw:?}");
        for line in lines {
            assert_eq!(line.len(), 32, "{draw:?}");
            assert!(
                seen.insert(line.to_string()),
                "drawn twice: {line} in {draws:?}"
            );
        }
    }
}

fn connection_info_describes_the_connection(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    for expected_id in 1..=3u64 {
        let stream = server.connect();
        let client_addr = stream.local_addr().unwrap();
        let mut writer = stream.try_clone().unwrap();
        writer.write_all(b"info\n").unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        let reply = String::from_utf8(read_to_end(stream)).unwrap();
        let info = fields(&reply);
        assert_eq!(info["peer-address"], client_addr.to_string(), "{reply}");
        assert_eq!(info["local-address"], server.addr().to_string(), "{reply}");
        assert_eq!(info["connection-id"], expected_id.to_string(), "{reply}");
        assert_eq!(info["tenant"], "default", "{reply}");
        assert!(strategy.is_worker_name(&info["worker"]), "{reply}");
    }
}

fn hello_replies_with_its_worker(strategy: Strategy) {
    let server = Server::start(strategy, Some(&guest("hello")), &[]);
    let stream = server.connect();
    // The seed's client: send, then read the reply without half-closing.
    (&stream).write_all(b"Hello World 1").unwrap();
    let reply = String::from_utf8(read_to_end(stream)).unwrap();
    let (worker, data) = reply.split_once(": ").expect("reply is `worker: data`");
    assert!(strategy.is_worker_name(worker), "{reply}");
    assert_eq!(data, "Hello World 1");
    if strategy != Strategy::Threading {
        let parent = format!("pid-{}", server.pid());
        assert!(
            !worker.starts_with(&parent),
            "the parent served it: {worker}"
        );
    }
}

fn concurrent_calls_run_on_different_workers(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    // Four calls that are all running at once (each has answered and waits
    // for its input to end) must be on four different workers.
    let held: Vec<_> = (0..4)
        .map(|_| {
            let stream = server.connect();
            (&stream).write_all(b"hold\n").unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            (stream, line.trim().to_string())
        })
        .collect();
    let workers: HashSet<_> = held.iter().map(|(_, w)| w.clone()).collect();
    // Async runs every connection as a task of one worker process: the four
    // are running at once (each answered) under one worker name.
    let expected = if strategy == Strategy::Async { 1 } else { 4 };
    assert_eq!(workers.len(), expected, "workers: {workers:?}");
    for (stream, _) in held {
        stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(stream), b"");
    }
}

fn the_connection_closes_when_handle_returns(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    let stream = server.connect();
    // The client keeps its side open; the host must close when `handle` returns.
    (&stream).write_all(b"return-early\n").unwrap();
    assert_eq!(read_to_end(stream), b"bye");
    assert!(server.closed_line(1).contains("outcome=ok"));
}

fn a_trap_ends_only_its_own_connection(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    // A stream in flight on another connection while the trap happens.
    let data = pattern(3, 256 * 1024);
    let streaming = server.connect();
    (&streaming).write_all(b"echo\n").unwrap();
    (&streaming).write_all(&data[..1000]).unwrap();

    // The connection is reset, so the client cannot mistake it for a reply.
    let mut trapping = server.connect();
    let peer = trapping.local_addr().unwrap();
    trapping.write_all(b"trap\n").unwrap();
    trapping.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_reset(&mut trapping), b"");
    // (Under prefork, ids are assigned by whichever worker accepts: find the
    // line by the client's address rather than by id.)
    let line =
        server.wait_for_log(|l| l.contains(" closed ") && l.contains(&format!(" peer={peer} ")));
    assert!(line.contains("outcome=trap"), "{line}");
    assert!(line.contains("unreachable"), "{line}");

    let reader = streaming.try_clone().unwrap();
    let rest = data[1000..].to_vec();
    let sender = std::thread::spawn(move || {
        (&streaming).write_all(&rest).unwrap();
        streaming.shutdown(Shutdown::Write).unwrap();
    });
    let echoed = read_to_end(reader);
    sender.join().unwrap();
    assert!(echoed == data, "the other connection's stream was damaged");
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
}

fn a_panic_is_a_trap_and_its_message_is_logged(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    assert_eq!(exchange_reset(server.addr(), b"panic\n"), b"");
    assert!(server.closed_line(1).contains("outcome=trap"));
    server.wait_for_log(|l| {
        l.contains("connection 1 stderr:") && l.contains("the test guest was asked to panic")
    });
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
}

fn a_handler_error_is_logged_with_its_text(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    assert_eq!(exchange(server.addr(), b"error\n"), b"");
    let line = server.closed_line(1);
    assert!(
        line.contains(r#"outcome=handler-error error="requested error""#),
        "{line}"
    );
}

fn guest_stdout_and_stderr_reach_the_log(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    assert_eq!(exchange(server.addr(), b"print\n"), b"printed");
    server.wait_for_log(|l| l.contains("connection 1 stdout: hello from the guest's stdout"));
    server.wait_for_log(|l| l.contains("connection 1 stderr: hello from the guest's stderr"));
}

fn the_sandbox_grants_nothing(strategy: Strategy) {
    let server = test_guest(strategy, &[]);
    let addr = server.addr();
    assert_eq!(
        String::from_utf8(exchange(addr, b"env\n")).unwrap(),
        "env: []"
    );
    let read = String::from_utf8(exchange(addr, b"read-file /etc/passwd\n")).unwrap();
    assert!(read.starts_with("denied: "), "{read}");
    let connect = format!("connect {addr}\n");
    let connect = String::from_utf8(exchange(addr, connect.as_bytes())).unwrap();
    assert!(connect.starts_with("denied: "), "{connect}");
}

fn http_hello_answers_get_and_refuses_post(strategy: Strategy) {
    let server = Server::start(strategy, Some(&guest("http-hello")), &[]);
    // An HTTP client: send the request, keep the connection open, read until
    // the server closes it (`Connection: close`).
    let ask = |request: &[u8]| {
        let stream = server.connect();
        (&stream).write_all(request).unwrap();
        String::from_utf8(read_to_end(stream)).unwrap()
    };
    let reply = ask(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("Content-Length: 14\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nHello, world!\n"), "{reply}");
    let reply = ask(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    assert!(
        reply.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{reply}"
    );
}
