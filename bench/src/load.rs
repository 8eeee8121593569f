//! The load generator's blocking scenarios: short connections (many client
//! threads, one 64 B echo or one HTTP/1.1 `GET` per connection) and streaming
//! (a writer and a reader thread per connection pushing a large volume through
//! echo).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::net;

/// What one scenario against one server measured.
#[derive(Debug, Default)]
pub struct Measure {
    /// Connections that completed their echo correctly.
    pub ok: u64,
    /// Connections attempted (in the measured window).
    pub attempted: u64,
    /// Connections the server saw, warm-up included (for CPU per connection).
    pub served: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// The measured window.
    pub elapsed: Duration,
    /// Per-connection latencies in microseconds (successful ones).
    pub latencies_us: Vec<u64>,
    /// Bytes echoed back to the clients.
    pub bytes: u64,
    /// Scenario-specific extra figures (name, value) for the JSON.
    pub extra: Vec<(&'static str, f64)>,
}

impl Measure {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// A scenario-specific figure by name (the last one, if several rounds).
    pub fn extra(&self, name: &str) -> Option<f64> {
        self.extra
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    pub fn add_error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Measure) {
        self.ok += other.ok;
        self.attempted += other.attempted;
        self.served += other.served;
        self.bytes += other.bytes;
        self.latencies_us.extend(other.latencies_us);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    /// Adds a later round against the same server: windows add up.
    pub fn add_round(&mut self, other: Measure) {
        self.elapsed += other.elapsed;
        self.extra.extend(other.extra.iter().copied());
        self.merge(other);
    }
}

/// A short name for an I/O failure at a step.
pub fn kind(step: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{step}: {:?} (os {code})", e.kind()),
        None => format!("{step}: {:?}", e.kind()),
    }
}

/// What one short connection exchanges with the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchange {
    /// Send `payload` bytes, half-close, expect exactly them back before EOF.
    Echo,
    /// Send [`HTTP_REQUEST`] (no half-close: an HTTP server may take EOF as
    /// an aborted request), read to EOF, expect a `200` ending in
    /// [`HTTP_BODY`].
    Http,
}

/// The request of [`Exchange::Http`].
pub const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
/// The body both HTTP hello servers send (handlers/http-hello's `BODY`).
pub const HTTP_BODY: &[u8] = b"Hello, world!\n";
/// The most response an [`Exchange::Http`] connection reads.
const HTTP_MAX_RESPONSE: usize = 4096;

pub struct ShortConfig {
    pub exchange: Exchange,
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop after this many measured connections instead of `duration`.
    pub count: Option<u64>,
    /// Bytes per echo ([`Exchange::Echo`]).
    pub payload: usize,
    pub timeout: Duration,
}

/// Hard cap on a count-bounded short run.
const COUNT_PATIENCE: Duration = Duration::from_secs(600);

/// `clients` threads, each in a loop: connect, send the payload and
/// half-close (echo) or send the request (HTTP), read the reply to EOF and
/// check it, close. Connections started during the warm-up are not measured.
pub fn short(addr: SocketAddr, cfg: &ShortConfig) -> Measure {
    let payload: Vec<u8> = match cfg.exchange {
        Exchange::Echo => (0..cfg.payload).map(|i| b'a' + (i % 26) as u8).collect(),
        Exchange::Http => HTTP_REQUEST.to_vec(),
    };
    let buf_len = match cfg.exchange {
        Exchange::Echo => payload.len() * 2 + 1,
        Exchange::Http => HTTP_MAX_RESPONSE,
    };
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let deadline = measure_from
        + match cfg.count {
            Some(_) => COUNT_PATIENCE,
            None => cfg.duration,
        };
    let issued = AtomicU64::new(0);
    let mut total = Measure::default();
    let mut last_end = measure_from;
    thread::scope(|scope| {
        let workers: Vec<_> = (0..cfg.clients)
            .map(|_| {
                let (payload, issued) = (&payload, &issued);
                scope.spawn(move || {
                    let mut m = Measure::default();
                    let mut buf = vec![0u8; buf_len];
                    loop {
                        let began = Instant::now();
                        if began >= deadline {
                            break;
                        }
                        let measured = began >= measure_from;
                        if measured {
                            if let Some(count) = cfg.count {
                                if issued.fetch_add(1, Ordering::Relaxed) >= count {
                                    break;
                                }
                            }
                        }
                        let result = one_short(addr, cfg.exchange, payload, &mut buf, cfg.timeout);
                        m.served += 1;
                        if !measured {
                            continue;
                        }
                        m.attempted += 1;
                        match result {
                            Ok(received) => {
                                m.ok += 1;
                                m.bytes += received as u64;
                                m.latencies_us.push(began.elapsed().as_micros() as u64);
                            }
                            Err(kind) => m.add_error(kind),
                        }
                    }
                    (m, Instant::now())
                })
            })
            .collect();
        for worker in workers {
            let (m, ended) = worker.join().expect("client thread panicked");
            total.merge(m);
            last_end = last_end.max(ended);
        }
    });
    total.elapsed = last_end.saturating_duration_since(measure_from);
    total
}

/// One short connection; the bytes received, if the reply was right.
fn one_short(
    addr: SocketAddr,
    exchange: Exchange,
    payload: &[u8],
    buf: &mut [u8],
    timeout: Duration,
) -> Result<usize, String> {
    let mut stream = net::connect(addr, timeout).map_err(|e| kind("connect", &e))?;
    stream.write_all(payload).map_err(|e| kind("write", &e))?;
    if exchange == Exchange::Echo {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| kind("shutdown", &e))?;
    }
    let mut got = 0;
    loop {
        if got == buf.len() {
            return Err(match exchange {
                Exchange::Echo => "echo longer than sent".into(),
                Exchange::Http => format!("response longer than {} bytes", buf.len()),
            });
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(kind("read", &e)),
        }
    }
    let reply = &buf[..got];
    match exchange {
        Exchange::Echo if reply != payload => {
            Err(format!("echo mismatch ({got} of {} bytes)", payload.len()))
        }
        Exchange::Http if got == 0 => Err("no response".into()),
        Exchange::Http if !reply.starts_with(b"HTTP/1.1 200") => {
            let status = reply.split(|&b| b == b'\r').next().unwrap_or_default();
            Err(format!(
                "status: {:?}",
                String::from_utf8_lossy(&status[..status.len().min(40)])
            ))
        }
        Exchange::Http if !reply.ends_with(HTTP_BODY) => Err(format!(
            "body: not ending in {:?}",
            String::from_utf8_lossy(HTTP_BODY)
        )),
        _ => Ok(got),
    }
}

pub struct StreamConfig {
    pub connections: usize,
    pub bytes_per_connection: u64,
    /// The longest any single read or write may stall.
    pub stall: Duration,
}

const STREAM_CHUNK: usize = 64 * 1024;

/// `connections` connections at once; on each a writer thread sends
/// `bytes_per_connection` then half-closes while a reader thread counts the
/// echo to EOF. A connection is ok when every byte came back.
pub fn stream(addr: SocketAddr, cfg: &StreamConfig) -> Measure {
    let start = Instant::now();
    let mut total = Measure::default();
    thread::scope(|scope| {
        let runs: Vec<_> = (0..cfg.connections)
            .map(|_| scope.spawn(move || one_stream(addr, cfg, start)))
            .collect();
        for run in runs {
            let m = run.join().expect("stream thread panicked");
            total.merge(m);
        }
    });
    total.elapsed = start.elapsed();
    total
}

fn one_stream(addr: SocketAddr, cfg: &StreamConfig, start: Instant) -> Measure {
    let mut m = Measure {
        attempted: 1,
        served: 1,
        ..Measure::default()
    };
    let stream = match net::connect(addr, cfg.stall) {
        Ok(s) => s,
        Err(e) => {
            m.add_error(kind("connect", &e));
            return m;
        }
    };
    let mut reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            m.add_error(kind("clone", &e));
            return m;
        }
    };
    let total = cfg.bytes_per_connection;
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut stream = stream;
        let chunk: Vec<u8> = (0..STREAM_CHUNK).map(|i| (i % 251) as u8).collect();
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(STREAM_CHUNK as u64) as usize;
            stream
                .write_all(&chunk[..n])
                .map_err(|e| kind("write", &e))?;
            sent += n as u64;
        }
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| kind("shutdown", &e))
    });
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut received = 0u64;
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => received += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(kind("read", &e)),
        }
    };
    // If reading failed the writer may be stuck: closing unblocks it.
    if read_result.is_err() {
        let _ = reader.shutdown(Shutdown::Both);
    }
    let write_result = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    m.bytes = received;
    match (write_result, read_result) {
        (Err(e), _) | (_, Err(e)) => m.add_error(e),
        (Ok(()), Ok(())) if received != total => {
            m.add_error(format!("byte count: echoed {received} of {total}"))
        }
        _ => {
            m.ok = 1;
            m.latencies_us.push(start.elapsed().as_micros() as u64);
        }
    }
    m
}
