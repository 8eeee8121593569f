//! The built-in echo handler: bytes come back exactly, whatever their size,
//! and concurrent clients each get their own.

use std::thread;

use crate::for_each_strategy;
use crate::support::{exchange, pattern, Server, Strategy};

for_each_strategy!(
    echoes_nothing,
    echoes_one_byte,
    echoes_one_mebibyte,
    echoes_64_concurrent_clients_their_own_bytes,
    logs_one_line_per_connection,
);

fn echoes_nothing(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    assert_eq!(exchange(server.addr(), b""), b"");
    assert!(server.closed_line(1).contains("in=0 out=0"));
}

fn echoes_one_byte(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    assert_eq!(exchange(server.addr(), b"x"), b"x");
}

fn echoes_one_mebibyte(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    let data = pattern(7, 1 << 20);
    let reply = exchange(server.addr(), &data);
    assert_eq!(reply.len(), data.len());
    assert!(
        reply == data,
        "the echoed mebibyte differs from what was sent"
    );
    assert!(server.closed_line(1).contains("in=1048576 out=1048576"));
}

fn echoes_64_concurrent_clients_their_own_bytes(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    let addr = server.addr();
    let clients: Vec<_> = (0..64u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(i + 100, 16 * 1024 + i as usize);
                let reply = exchange(addr, &data);
                assert!(reply == data, "client {i} got bytes that are not its own");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    for id in 1..=64 {
        assert!(server.closed_line(id).contains("outcome=ok"));
    }
}

fn logs_one_line_per_connection(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    assert_eq!(exchange(server.addr(), b"hello"), b"hello");
    let line = server.closed_line(1);
    let peer_and_worker = format!("worker={}", strategy.worker_prefix());
    let worker = line
        .split(" worker=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap();
    assert!(strategy.is_worker_name(worker), "{line}");
    for part in [
        "peer=127.0.0.1:",
        &peer_and_worker,
        "in=5 out=5",
        "duration=",
        "outcome=ok",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    let closed = server
        .log()
        .iter()
        .filter(|l| l.contains("connection 1 closed"))
        .count();
    assert_eq!(closed, 1, "one line per connection");
}
