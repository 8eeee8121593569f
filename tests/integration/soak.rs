//! The soak: 100,000 short connections per strategy with no error, and the
//! host's descriptors, threads and child processes back where they started
//! (threads started for the load exit once idle).
//! Not timed: it asserts counts, never speed.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::for_each_strategy;
use crate::support::{connect_from, eventually, Resources, Server, Strategy, PATIENCE};

for_each_strategy!(a_hundred_thousand_short_connections);

const CONNECTIONS: u64 = 100_000;
const CLIENTS: u64 = 32;
const WARM_UP: u64 = 200;

/// `count` short echo connections from `clients` threads; returns errors.
fn short_connections(server: &Server, count: u64, clients: u64) -> Vec<String> {
    let next = Arc::new(AtomicU64::new(0));
    let addr = server.addr();
    let workers: Vec<_> = (0..clients)
        .map(|t| {
            let next = next.clone();
            thread::spawn(move || {
                let mut errors = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return errors;
                    }
                    // Rotate source addresses: 100k connections would exhaust
                    // one address's ephemeral ports in TIME_WAIT.
                    let source = 2 + ((n + t) % 240) as u8;
                    let request = format!("{n:064}");
                    let result = connect_from(addr, source).and_then(|stream| {
                        (&stream).write_all(request.as_bytes())?;
                        stream.shutdown(Shutdown::Write)?;
                        let mut reply = Vec::new();
                        (&stream).read_to_end(&mut reply)?;
                        Ok(reply)
                    });
                    match result {
                        Ok(reply) if reply == request.as_bytes() => {}
                        Ok(reply) => errors.push(format!("connection {n}: wrong reply {reply:?}")),
                        Err(e) => errors.push(format!("connection {n}: {e}")),
                    }
                }
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

/// The host's resources once it has exactly `children` descendants.
fn idle_resources(server: &Server, children: usize) -> Resources {
    eventually(PATIENCE, || {
        let now = server.resources();
        if now.children == children {
            Ok(now)
        } else {
            Err(format!(
                "the host kept {now:?}, not {children} descendant(s)"
            ))
        }
    })
}

/// Waits until the host's resources are back to `baseline`.
fn settles_to(server: &Server, baseline: Resources) {
    eventually(PATIENCE, || {
        let now = server.resources();
        if now == baseline {
            Ok(())
        } else {
            Err(format!("resources {now:?} did not return to {baseline:?}"))
        }
    })
}

fn a_hundred_thousand_short_connections(strategy: Strategy) {
    let server = Server::start(strategy, None, &[]);
    // Warm up, so anything started lazily counts in the baseline, then let
    // the warm-up connections finish. One client at a time: the thread pool
    // does not grow beyond its warm threads, so the baseline is the idle
    // worker (after the soak, the threads it grew exit once idle).
    assert_eq!(short_connections(&server, WARM_UP, 1), Vec::<String>::new());
    // Every warm-up connection's socket is closed once its line is logged.
    let closed = |l: &str| l.contains(" closed ");
    server.wait_for_log_count(closed, WARM_UP as usize);
    // The baseline is the idle process tree: the host process and its
    // workers, once every forked connection has exited (a child logs its
    // line just before it goes, with its threads still counted).
    let idle = idle_resources(&server, strategy.idle_children());

    let errors = short_connections(&server, CONNECTIONS, CLIENTS);
    if !errors.is_empty() {
        thread::sleep(Duration::from_secs(3));
        let bad: Vec<String> = server
            .log()
            .into_iter()
            .filter(|l| !(l.contains(" closed ") && l.contains("outcome=ok")))
            .collect();
        eprintln!("log lines other than ok closes: {bad:#?}");
    }
    assert!(
        errors.is_empty(),
        "{} errors, the first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    server.wait_for_log_count(closed, (WARM_UP + CONNECTIONS) as usize);
    settles_to(&server, idle);
    let failed = server
        .log()
        .iter()
        .filter(|l| l.contains(" closed ") && !l.contains("outcome=ok"))
        .count();
    assert_eq!(failed, 0, "connections that did not end ok");
}
