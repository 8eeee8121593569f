//! Hostile clients: slow, too many, rude, or huge. Each costs only itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::for_each_strategy;
use crate::support::{
    exchange, exchange_logged, guest, pattern, read_to_end, read_until_reset, Server, Strategy,
};

for_each_strategy!(
    a_silent_client_is_closed_by_the_idle_timeout,
    a_slowloris_is_stopped_by_the_timeout,
    a_client_that_does_not_read_is_closed,
    ten_times_max_connections_wait_their_turn,
    a_reset_in_the_middle_of_a_stream_is_named,
    a_256_mebibyte_upload_comes_back_intact,
);

fn a_silent_client_is_closed_by_the_idle_timeout(strategy: Strategy) {
    let server = Server::start(strategy, None, &["--idle-timeout", "1s"]);
    let silent = server.connect();
    let peer = silent.local_addr().unwrap();
    // The host closes it; the client sees the end of the stream.
    assert_eq!(read_to_end(silent), b"");
    let line = server.wait_for_log(|l| l.contains(&format!(" peer={peer} ")));
    assert!(line.contains("outcome=idle-timeout"), "{line}");
    assert_eq!(exchange(server.addr(), b"still serving"), b"still serving");
}

fn a_slowloris_is_stopped_by_the_timeout(strategy: Strategy) {
    let server = Server::start(strategy, None, &["--idle-timeout", "2s", "--timeout", "4s"]);
    let slow = server.connect();
    let peer = slow.local_addr().unwrap();
    // A byte every 100ms never trips the idle timeout (a 20x margin, for a
    // loaded machine); the wall-clock timeout ends it. The client would give
    // up after 100 bytes (10 s).
    let writer = slow.try_clone().unwrap();
    let dripping = thread::spawn(move || {
        for _ in 0..100 {
            if (&writer).write_all(b".").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    // Cut short by the timeout: the host resets rather than closes.
    let mut slow = slow;
    let echoed = read_until_reset(&mut slow);
    assert!(
        echoed.len() < 100 && echoed.iter().all(|&b| b == b'.'),
        "{echoed:?}"
    );
    let line = server.wait_for_log(|l| l.contains(&format!(" peer={peer} ")));
    assert!(line.contains("outcome=timeout"), "{line}");
    dripping.join().unwrap();
    assert_eq!(exchange(server.addr(), b"still serving"), b"still serving");
}

fn a_client_that_does_not_read_is_closed(strategy: Strategy) {
    let server = Server::start(strategy, None, &["--idle-timeout", "1s"]);
    let stuffed = server.connect();
    let peer = stuffed.local_addr().unwrap();
    // Send far more than the socket buffers hold and never read: the echo
    // stalls on a full send buffer until the idle timeout closes it.
    let data = pattern(9, 64 << 20);
    let _ = (&stuffed).write_all(&data);
    let line = server.wait_for_log(|l| l.contains(&format!(" peer={peer} ")));
    assert!(line.contains("outcome=idle-timeout"), "{line}");
    drop(stuffed);
    assert_eq!(exchange(server.addr(), b"still serving"), b"still serving");
}

fn ten_times_max_connections_wait_their_turn(strategy: Strategy) {
    let server = Server::start(
        strategy,
        Some(&guest("test-guest")),
        &["--max-connections", "4"],
    );
    // 40 clients at once, each asking to be held; a held call answers its
    // worker's name at once and ends when its client half-closes.
    let (started, events) = mpsc::channel();
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let stream = server.connect();
            (&stream).write_all(b"hold\n").unwrap();
            let started = started.clone();
            let reader = stream.try_clone().unwrap();
            let waiter = thread::spawn(move || {
                let mut line = String::new();
                BufReader::new(reader).read_line(&mut line).unwrap();
                started.send(i).unwrap();
            });
            (stream, waiter)
        })
        .collect();
    let mut running = Vec::new();
    for _ in 0..4 {
        running.push(
            events
                .recv_timeout(crate::support::PATIENCE)
                .expect("4 are served"),
        );
    }
    // While those four hold, nobody else is let in.
    assert!(
        events.recv_timeout(Duration::from_millis(500)).is_err(),
        "a fifth connection was served while four were in flight"
    );
    // Release them one by one; each release lets exactly one more in.
    let mut streams: Vec<_> = clients.into_iter().map(Some).collect();
    let mut served = 4;
    while let Some(i) = running.pop() {
        let (stream, waiter) = streams[i].take().unwrap();
        waiter.join().unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&stream).read_to_end(&mut rest).unwrap();
        if served < 40 {
            running.push(
                events
                    .recv_timeout(crate::support::PATIENCE)
                    .expect("the next is served"),
            );
            served += 1;
        }
    }
    assert_eq!(served, 40);
    assert!(
        streams.iter().all(Option::is_none),
        "every client was served"
    );
}

fn a_reset_in_the_middle_of_a_stream_is_named(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    let stream = server.connect();
    let peer = stream.local_addr().unwrap();
    (&stream).write_all(&pattern(4, 256 * 1024)).unwrap();
    let mut first = [0u8; 1024];
    (&stream).read_exact(&mut first).unwrap();
    // SO_LINGER 0: close() sends a reset instead of a FIN.
    let socket = socket2::SockRef::from(&stream);
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
    let line = server.wait_for_log(|l| l.contains(&format!(" peer={peer} ")));
    assert!(line.contains("outcome=client-reset"), "{line}");
    let (_, reply) = exchange_logged(&server, b"next");
    assert_eq!(reply, b"next");
}

fn a_256_mebibyte_upload_comes_back_intact(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    let data = pattern(256, 256 << 20);
    let reply = exchange(server.addr(), &data);
    assert_eq!(reply.len(), data.len());
    assert!(
        reply == data,
        "the echoed 256 MiB differ from what was sent"
    );
    assert!(server.closed_line(1).contains("outcome=ok"));
}
