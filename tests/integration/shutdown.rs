//! Graceful shutdown: SIGTERM stops accepting at once, lets connections in
//! flight finish, reaps every child, and exits 0; a second signal or the
//! drain timeout ends what is left.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

use crate::for_each_strategy;
use crate::support::{
    children_of, eventually, guest, pattern, process_exists, process_running, Server, Strategy,
    PATIENCE,
};

for_each_strategy!(
    sigterm_drains_50_streams_then_exits_0,
    a_second_signal_ends_at_once,
    a_second_signal_ends_a_sleeping_guest_at_once,
    the_drain_timeout_ends_what_is_left,
    sigterm_to_the_whole_process_group_still_drains,
);

fn refused(server: &Server) -> bool {
    matches!(TcpStream::connect(server.addr()), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

fn sigterm_drains_50_streams_then_exits_0(strategy: Strategy) {
    // The defaults serve 50 at once under every strategy.
    let mut server = Server::start(strategy, None, &[]);
    // 50 streams, each provably being served: its first chunk came back.
    let streams: Vec<_> = (0..50u64)
        .map(|i| {
            let stream = server.connect();
            let data = pattern(1000 + i, 512 * 1024);
            (&stream).write_all(&data[..1000]).unwrap();
            let mut first = vec![0u8; 1000];
            (&stream).read_exact(&mut first).unwrap();
            assert_eq!(first, data[..1000]);
            (stream, data)
        })
        .collect();

    server.signal(libc::SIGTERM);
    server.wait_for_log(|l| l.contains("shutting down: no longer accepting"));
    assert!(
        refused(&server),
        "a new connection was accepted after SIGTERM"
    );

    let finishing: Vec<_> = streams
        .into_iter()
        .map(|(stream, data)| {
            thread::spawn(move || {
                let writer = stream.try_clone().unwrap();
                let rest = data[1000..].to_vec();
                let sender = thread::spawn(move || {
                    (&writer).write_all(&rest).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut echoed = data[..1000].to_vec();
                (&stream).read_to_end(&mut echoed).unwrap();
                sender.join().unwrap();
                assert!(echoed == data, "a stream was cut by the shutdown");
            })
        })
        .collect();
    for stream in finishing {
        stream.join().expect("every stream completes intact");
    }
    // The host's own last line (its workers each say `stopped` too).
    server.wait_for_log(|l| l.ends_with("stopped; every worker process reaped"));
    assert_eq!(
        children_of(server.pid()),
        Vec::<u32>::new(),
        "children left at exit"
    );
    assert_eq!(server.wait_exit().code(), Some(0));
    let log = server.log();
    assert_eq!(log.iter().filter(|l| l.contains("outcome=ok")).count(), 50);
    for pid in server.worker_pids() {
        assert!(!process_exists(pid), "worker pid-{pid} was left behind");
    }
}

/// Starts the test guest with `extra`, and holds one call in flight.
fn one_held_call(strategy: Strategy, extra: &[&str]) -> (Server, TcpStream) {
    let server = Server::start(strategy, Some(&guest("test-guest")), extra);
    let held = server.connect();
    (&held).write_all(b"hold\n").unwrap();
    let mut line = String::new();
    BufReader::new(&held).read_line(&mut line).unwrap();
    (server, held)
}

fn a_second_signal_ends_at_once(strategy: Strategy) {
    let (mut server, held) = one_held_call(strategy, &["--drain-timeout", "10m"]);
    server.signal(libc::SIGTERM);
    server.wait_for_log(|l| l.contains("shutting down"));
    server.signal(libc::SIGINT);
    server.wait_for_log(|l| l.contains("second signal: ending 1 connection(s) now"));
    let mut rest = Vec::new();
    let _ = (&held).read_to_end(&mut rest);
    assert_eq!(server.wait_exit().code(), Some(0));
    // The log is read from a pipe on a thread of its own: wait for it.
    server.wait_for_log(|l| l.contains("outcome=shutdown"));
    for pid in server.worker_pids() {
        assert!(!process_exists(pid), "worker pid-{pid} was left behind");
    }
}

fn the_drain_timeout_ends_what_is_left(strategy: Strategy) {
    let (mut server, held) = one_held_call(strategy, &["--drain-timeout", "1s"]);
    server.signal(libc::SIGTERM);
    server.wait_for_log(|l| l.contains("drain timeout: ending 1 connection(s)"));
    let mut rest = Vec::new();
    let _ = (&held).read_to_end(&mut rest);
    assert_eq!(server.wait_exit().code(), Some(0));
    // The log is read from a pipe on a thread of its own: wait for it.
    server.wait_for_log(|l| l.contains("outcome=shutdown"));
}

fn a_second_signal_ends_a_sleeping_guest_at_once(strategy: Strategy) {
    // A guest blocked in a 10-minute sleep, limits far away: only the forced
    // shutdown can end it, and it must not wait for the sleep.
    let mut server = Server::start(
        strategy,
        Some(&guest("test-guest")),
        &["--timeout", "10m", "--drain-timeout", "10m"],
    );
    let sleeper = server.connect();
    (&sleeper).write_all(b"nap 600000\n").unwrap();
    let mut line = String::new();
    BufReader::new(&sleeper).read_line(&mut line).unwrap();
    assert_eq!(line, "napping\n", "the guest is asleep now");
    server.signal(libc::SIGTERM);
    server.wait_for_log(|l| l.contains("shutting down"));
    server.signal(libc::SIGINT);
    // wait_exit fails after a minute, far sooner than the sleep would end.
    assert_eq!(server.wait_exit().code(), Some(0));
    // The log is read from a pipe on a thread of its own: wait for it.
    server.wait_for_log(|l| l.contains("outcome=shutdown"));
}

fn sigterm_to_the_whole_process_group_still_drains(strategy: Strategy) {
    // As `systemctl stop` does: SIGTERM to the host and every child at once.
    let (mut server, held) = one_held_call(strategy, &[]);
    server.signal_group(libc::SIGTERM);
    server.wait_for_log(|l| l.contains("shutting down"));
    // The held call is still alive and finishes normally.
    held.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&held).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"");
    assert_eq!(server.wait_exit().code(), Some(0));
    let log = server.log();
    assert!(log.iter().any(|l| l.contains("outcome=ok")), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains("killed by signal")),
        "{log:#?}"
    );
}

#[test]
fn killing_the_prefork_parent_ends_its_workers() {
    let server = Server::start(Strategy::Prefork, None, &[]);
    // `listening on` comes before the workers are forked: wait for them.
    let workers = eventually(PATIENCE, || {
        let workers = children_of(server.pid());
        if workers.len() == Strategy::Prefork.idle_children() {
            Ok(workers)
        } else {
            Err(format!("prefork started {workers:?}"))
        }
    });
    server.signal(libc::SIGKILL);
    // The kernel sends each orphaned worker the drain signal; with nothing
    // in flight it exits at once (a zombie awaiting its new parent is gone
    // for good, so it counts as exited).
    for pid in workers {
        eventually(PATIENCE, || {
            if process_running(pid) {
                Err(format!("worker {pid} outlived its parent"))
            } else {
                Ok(())
            }
        });
    }
}
