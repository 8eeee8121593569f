//! The held-connections scenario: open N idle connections at once
//! (non-blocking connects watched with epoll), hold them, then release them
//! all: each sends 16 B and half-closes, and counts as ok when exactly those
//! bytes come back before EOF.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::epoll::Epoll;
use crate::load::{kind, Measure};
use crate::net;

pub struct HeldConfig {
    pub connections: usize,
    pub hold: Duration,
    pub connect_timeout: Duration,
    pub echo_timeout: Duration,
}

const PAYLOAD: &[u8; 16] = b"held-echo-16byte";

struct Conn {
    socket: Socket,
    got: usize,
    data: [u8; 32],
}

pub fn held(addr: SocketAddr, cfg: &HeldConfig) -> Measure {
    let mut m = Measure {
        attempted: cfg.connections as u64,
        served: cfg.connections as u64,
        ..Measure::default()
    };
    if let Err(e) = run(addr, cfg, &mut m) {
        m.add_error(kind("epoll", &e));
    }
    m
}

fn run(addr: SocketAddr, cfg: &HeldConfig, m: &mut Measure) -> io::Result<()> {
    let epoll = Epoll::new()?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(cfg.connections);

    // 1. Open every connection at once.
    let open_start = Instant::now();
    let mut pending = 0usize;
    for token in 0..cfg.connections {
        let opened = net::client_socket().and_then(|socket| {
            socket.set_nonblocking(true)?;
            match socket.connect(&addr.into()) {
                Ok(()) => Ok((socket, false)),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((socket, true)),
                Err(e) => Err(e),
            }
        });
        match opened {
            Ok((socket, in_progress)) => {
                if in_progress {
                    epoll.ctl(
                        libc::EPOLL_CTL_ADD,
                        socket.as_raw_fd(),
                        libc::EPOLLOUT as u32,
                        token,
                    )?;
                    pending += 1;
                }
                conns.push(Some(Conn {
                    socket,
                    got: 0,
                    data: [0; 32],
                }));
            }
            Err(e) => {
                m.add_error(kind("connect", &e));
                conns.push(None);
            }
        }
    }
    let deadline = open_start + cfg.connect_timeout;
    while pending > 0 && Instant::now() < deadline {
        for token in epoll.wait(&mut events, deadline) {
            let Some(conn) = conns[token].as_ref() else {
                continue;
            };
            epoll.ctl(libc::EPOLL_CTL_DEL, conn.socket.as_raw_fd(), 0, token)?;
            pending -= 1;
            match conn.socket.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    m.add_error(kind("connect", &e));
                    conns[token] = None;
                }
            }
        }
    }
    if pending > 0 {
        // Still connecting at the deadline: the server's backlog was full.
        for conn in conns.iter_mut() {
            if let Some(c) = conn {
                if epoll
                    .ctl(libc::EPOLL_CTL_DEL, c.socket.as_raw_fd(), 0, 0)
                    .is_ok()
                {
                    m.add_error("connect: timed out".into());
                    *conn = None;
                }
            }
        }
    }
    let opened = conns.iter().filter(|c| c.is_some()).count();
    m.extra.push(("opened", opened as f64));
    m.extra
        .push(("open_secs", open_start.elapsed().as_secs_f64()));

    // 2. Hold them, idle.
    thread::sleep(cfg.hold);

    // 3. Release: every connection sends 16 B and half-closes.
    let release = Instant::now();
    let mut waiting = 0usize;
    for (token, slot) in conns.iter_mut().enumerate() {
        let Some(conn) = slot else { continue };
        let sent = (&conn.socket)
            .write(PAYLOAD)
            .and_then(|n| match n {
                16 => conn.socket.shutdown(Shutdown::Write),
                _ => Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            })
            .and_then(|()| {
                epoll.ctl(
                    libc::EPOLL_CTL_ADD,
                    conn.socket.as_raw_fd(),
                    (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    token,
                )
            });
        match sent {
            Ok(()) => waiting += 1,
            Err(e) => {
                m.add_error(kind("write", &e));
                *slot = None;
            }
        }
    }
    let deadline = release + cfg.echo_timeout;
    let mut last_ok = release;
    while waiting > 0 && Instant::now() < deadline {
        for token in epoll.wait(&mut events, deadline) {
            let Some(conn) = conns[token].as_mut() else {
                continue;
            };
            let done = match read_some(conn) {
                Ok(false) => continue,
                Ok(true) if conn.data[..conn.got] == PAYLOAD[..] => {
                    m.ok += 1;
                    m.bytes += PAYLOAD.len() as u64;
                    last_ok = Instant::now();
                    m.latencies_us
                        .push(last_ok.duration_since(release).as_micros() as u64);
                    Ok(())
                }
                Ok(true) if conn.got == 0 => Err("echo: closed by the server unanswered".into()),
                Ok(true) => Err(format!("echo mismatch ({} of 16 bytes)", conn.got)),
                Err(e) => Err(kind("read", &e)),
            };
            if let Err(e) = done {
                m.add_error(e);
            }
            let _ = epoll.ctl(libc::EPOLL_CTL_DEL, conn.socket.as_raw_fd(), 0, token);
            conns[token] = None;
            waiting -= 1;
        }
    }
    for _ in 0..waiting {
        m.add_error("echo: timed out".into());
    }
    m.elapsed = last_ok.duration_since(release);
    Ok(())
}

/// Reads what is there; Ok(true) at EOF.
fn read_some(conn: &mut Conn) -> io::Result<bool> {
    loop {
        if conn.got == conn.data.len() {
            return Ok(true);
        }
        match (&conn.socket).read(&mut conn.data[conn.got..]) {
            Ok(0) => return Ok(true),
            Ok(n) => conn.got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
