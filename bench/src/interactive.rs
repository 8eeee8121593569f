//! The interactive scenario (issue 19 §3): N clients connect at once; each
//! sends a line, waits for its echo, holds its connection idle for H seconds,
//! sends a second line, waits for its echo and closes. A connection between
//! its first echo and its close is *live*: the server echoed from inside its
//! handler and the handler has not ended. One epoll loop on one thread drives
//! every connection (so 10,000 cost no client threads); a second thread
//! samples the server's memory, for the memory per live connection and after
//! the burst.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::backlog::AcceptQueue;
use crate::epoll::Epoll;
use crate::load::{kind, Measure};
use crate::net;
use crate::server::Usage;

/// The sizes and bounds of one interactive run.
pub struct InteractiveConfig {
    /// Clients, all connected before the first line is sent.
    pub clients: usize,
    /// How long each client holds its connection idle after its first echo.
    pub hold: Duration,
    /// Connects in flight at once (sent, not yet established); with the
    /// server's accept queue (see [`AcceptQueue`]) they pace the connect
    /// phase so that it does not overflow the server's listen backlog.
    pub connects_in_flight: usize,
    /// The bound of the whole connect phase; a connection not established by
    /// then fails with `connect: timed out`.
    pub connect_timeout: Duration,
    /// How long each echo may take, from its line's send.
    pub echo_timeout: Duration,
    /// How long after the last client ends the server's memory is read again.
    pub settle: Duration,
}

/// Attempts per connection when connect is refused or reset.
const CONNECT_ATTEMPTS: u32 = 3;
/// How often the server's memory is sampled during the run.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How often the loop checks the echo deadlines (and the connect phase its
/// own).
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// How soon the connect phase reads the server's accept queue again when it
/// had no room.
const QUEUE_POLL: Duration = Duration::from_millis(1);
/// First lines sent between two looks at the replies.
const SEND_BATCH: usize = 64;
/// Room for a line's echo: `interactive 00042 line 1\n` is 26 bytes (27 from
/// client 100000 on).
const MAX_LINE: usize = 32;

enum State {
    /// Not attempted yet.
    Waiting,
    /// A connect attempt in flight.
    Connecting { attempt: u32 },
    /// Established, its first line not yet sent.
    Connected,
    /// Line `line` sent at `sent`; `got` bytes of its echo read so far.
    Awaiting { line: u8, sent: Instant, got: usize },
    /// Idle after its first echo, until its entry in `Run::holds` is due.
    Holding,
    /// Ended, ok or failed; the socket is closed.
    Ended,
}

struct Conn {
    socket: Option<Socket>,
    state: State,
    buf: [u8; MAX_LINE],
}

/// The line client `token` sends as its line `n` (1 or 2).
fn line(token: usize, n: u8) -> String {
    format!("interactive {token:05} line {n}\n")
}

/// Runs the scenario against the server at `addr`; `usage` reads the
/// server's memory now (its whole process tree), from a sampling thread
/// beside the client's loop. In the [`Measure`]: `latencies_us` are the
/// first echoes' (from each first line's send), `elapsed` the whole exchange
/// (from the first connect to the last client's end, ok or not); in `extra`:
/// `hold_secs`, `connected` (clients established), `connect_secs`,
/// `accept_queue_peak` (the most connections seen in the server's accept
/// queue while connecting, if it could be read),
/// `live_peak` (most connections live at once), `second_echo_p99_ms`, and
/// for RSS and PSS (`*_rss_kib`, `*_pss_kib`): `idle_` (before connecting),
/// `peak_` (sampled every 100 ms until the last client's end), `after_`
/// (`settle` after it) and `*_per_live_kib` ((peak - idle) / live_peak).
pub fn interactive(
    addr: SocketAddr,
    cfg: &InteractiveConfig,
    usage: &(dyn Fn() -> Usage + Sync),
) -> Measure {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            let mut m = Measure::default();
            m.add_error(kind("epoll", &e));
            return m;
        }
    };
    let mut run = Run {
        epoll,
        events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        conns: (0..cfg.clients)
            .map(|_| Conn {
                socket: None,
                state: State::Waiting,
                buf: [0; MAX_LINE],
            })
            .collect(),
        m: Measure {
            attempted: cfg.clients as u64,
            served: cfg.clients as u64,
            ..Measure::default()
        },
        second_us: Vec::new(),
        holds: VecDeque::new(),
        live: 0,
        live_peak: 0,
        open: 0,
        last_end: None,
        next_scan: Instant::now(),
        queue_peak: None,
    };
    let idle = usage();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    // The longest the run can take (its phases' bounds), and some slack.
    let longest = cfg.connect_timeout + cfg.echo_timeout * 2 + cfg.hold + Duration::from_secs(5);
    let (connected, connect_secs, peak) = thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = idle;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < longest {
                peak = peak.max(usage());
                thread::sleep(SAMPLE_EVERY);
            }
            peak.max(usage())
        });
        // Stops the sampler however this closure ends, a panic included.
        let stop_sampler = StopOnDrop(&stop);
        run.connect_all(addr, cfg);
        let connected = run.connected();
        let connect_secs = start.elapsed().as_secs_f64();
        run.exchange(cfg);
        drop(stop_sampler);
        let peak = sampler.join().unwrap_or(idle);
        (connected, connect_secs, peak)
    });
    let end = run.last_end.unwrap_or_else(Instant::now);
    run.m.elapsed = end.duration_since(start);
    thread::sleep(cfg.settle);
    let after = usage();

    let second = crate::report::percentile(&run.second_us, 99.0);
    let mut m = run.m;
    m.extra.extend([
        ("hold_secs", cfg.hold.as_secs_f64()),
        ("connected", connected as f64),
        ("connect_secs", connect_secs),
        ("live_peak", run.live_peak as f64),
        ("idle_rss_kib", idle.rss_kib as f64),
        ("peak_rss_kib", peak.rss_kib as f64),
        ("after_rss_kib", after.rss_kib as f64),
        ("idle_pss_kib", idle.pss_kib as f64),
        ("peak_pss_kib", peak.pss_kib as f64),
        ("after_pss_kib", after.pss_kib as f64),
    ]);
    if run.live_peak > 0 {
        let per_live =
            |peak: u64, idle: u64| peak.saturating_sub(idle) as f64 / run.live_peak as f64;
        m.extra.extend([
            ("rss_per_live_kib", per_live(peak.rss_kib, idle.rss_kib)),
            ("pss_per_live_kib", per_live(peak.pss_kib, idle.pss_kib)),
        ]);
    }
    if let Some(us) = second {
        m.extra.push(("second_echo_p99_ms", us as f64 / 1000.0));
    }
    if let Some(peak) = run.queue_peak {
        m.extra.push(("accept_queue_peak", f64::from(peak)));
    }
    m
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Run {
    epoll: Epoll,
    events: Vec<libc::epoll_event>,
    conns: Vec<Conn>,
    m: Measure,
    /// Second-echo latencies, microseconds.
    second_us: Vec<u64>,
    /// Connections holding, in the order their holds end (all holds are
    /// equally long and start in order, so the queue stays sorted).
    holds: VecDeque<(Instant, usize)>,
    /// Connections past their first echo and not yet ended, now and at most.
    live: usize,
    live_peak: usize,
    /// Connections established or waiting for an echo, not yet ended.
    open: usize,
    last_end: Option<Instant>,
    /// When the echo deadlines are next checked.
    next_scan: Instant,
    /// The most connections seen waiting in the server's accept queue during
    /// the connect phase (`None`: the queue could not be read).
    queue_peak: Option<u32>,
}

impl Run {
    fn connected(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| matches!(c.state, State::Connected))
            .count()
    }

    /// Ends connection `token` (closing its socket) as ok or with an error.
    fn end(&mut self, token: usize, result: Result<(), String>) {
        let conn = &mut self.conns[token];
        let was_live = matches!(conn.state, State::Holding | State::Awaiting { line: 2, .. });
        let was_open = matches!(
            conn.state,
            State::Connected | State::Awaiting { .. } | State::Holding
        );
        conn.state = State::Ended;
        // Closing the only descriptor also removes it from the epoll set.
        conn.socket = None;
        if was_live {
            self.live -= 1;
        }
        if was_open {
            self.open -= 1;
        }
        self.last_end = Some(Instant::now());
        match result {
            Ok(()) => self.m.ok += 1,
            Err(e) => self.m.add_error(e),
        }
    }

    /// Phase 1: establish every connection within `connect_timeout`, at most
    /// `connects_in_flight` attempts at a time, and (when the server's accept
    /// queue can be read) keeping the attempts in flight plus the
    /// connections waiting in that queue within its backlog.
    fn connect_all(&mut self, addr: SocketAddr, cfg: &InteractiveConfig) {
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut queue = AcceptQueue::new(addr).ok();
        let mut next = 0;
        let mut in_flight = 0;
        while (next < self.conns.len() || in_flight > 0) && Instant::now() < deadline {
            let mut may_start = cfg
                .connects_in_flight
                .max(1)
                .saturating_sub(in_flight)
                .min(self.conns.len() - next);
            let mut throttled = false;
            if may_start > 0 {
                match queue.as_mut().map(AcceptQueue::depth) {
                    Some(Ok(Some(depth))) => {
                        self.queue_peak = Some(self.queue_peak.unwrap_or(0).max(depth.queued));
                        let room = (depth.backlog as usize)
                            .saturating_sub(depth.queued as usize + in_flight);
                        throttled = room < may_start;
                        may_start = may_start.min(room);
                    }
                    // Unreadable, or no such listener: paced by the
                    // attempts in flight alone.
                    Some(_) => queue = None,
                    None => {}
                }
            }
            for _ in 0..may_start {
                if self.start_connect(addr, next, 1) {
                    in_flight += 1;
                }
                next += 1;
            }
            // Throttled by the server's queue: look again soon, as nothing
            // on the client's side signals that the server accepted.
            let pause = if throttled { QUEUE_POLL } else { SCAN_EVERY };
            let wake = deadline.min(Instant::now() + pause);
            let ready = self.epoll.wait(&mut self.events, wake);
            for token in ready {
                if let State::Connecting { attempt } = self.conns[token].state {
                    in_flight -= 1;
                    if self.finish_connect(addr, token, attempt) {
                        in_flight += 1;
                    }
                } else {
                    // Established and readable before its first line: the
                    // server closed it (level-triggered: handle it, not spin).
                    self.readable(token, cfg);
                }
            }
        }
        for token in 0..self.conns.len() {
            match self.conns[token].state {
                State::Connecting { .. } => self.end(token, Err("connect: timed out".into())),
                State::Waiting => self.end(token, Err("connect: not attempted in time".into())),
                _ => {}
            }
        }
    }

    /// Starts a connect attempt; true if it is in flight.
    fn start_connect(&mut self, addr: SocketAddr, token: usize, attempt: u32) -> bool {
        let opened = net::client_socket().and_then(|socket| {
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            match socket.connect(&addr.into()) {
                Ok(()) => Ok(socket),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
                Err(e) => Err(e),
            }
        });
        let registered = opened.and_then(|socket| {
            let events = (libc::EPOLLOUT | libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            self.epoll
                .ctl(libc::EPOLL_CTL_ADD, socket.as_raw_fd(), events, token)?;
            Ok(socket)
        });
        match registered {
            Ok(socket) => {
                self.conns[token].socket = Some(socket);
                self.conns[token].state = State::Connecting { attempt };
                true
            }
            Err(e) => {
                self.end(token, Err(kind("connect", &e)));
                false
            }
        }
    }

    /// A connecting socket became ready: established, or failed (retried if
    /// refused or reset, up to [`CONNECT_ATTEMPTS`]). True if a new attempt
    /// is in flight.
    fn finish_connect(&mut self, addr: SocketAddr, token: usize, attempt: u32) -> bool {
        let Some(socket) = &self.conns[token].socket else {
            return false;
        };
        let error = match socket.take_error() {
            Ok(None) => {
                let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
                match self
                    .epoll
                    .ctl(libc::EPOLL_CTL_MOD, socket.as_raw_fd(), events, token)
                {
                    Ok(()) => {
                        self.conns[token].state = State::Connected;
                        self.open += 1;
                        return false;
                    }
                    Err(e) => e,
                }
            }
            Ok(Some(e)) | Err(e) => e,
        };
        let retry = matches!(
            error.raw_os_error(),
            Some(libc::ECONNREFUSED | libc::ECONNRESET)
        );
        self.conns[token].socket = None;
        if retry && attempt < CONNECT_ATTEMPTS {
            return self.start_connect(addr, token, attempt + 1);
        }
        self.end(token, Err(kind("connect", &error)));
        false
    }

    /// Phase 2: every established client sends its first line (in batches,
    /// reading replies in between), holds after its echo, sends its second
    /// line, and ends after that echo; bounded by the echo timeouts.
    fn exchange(&mut self, cfg: &InteractiveConfig) {
        let tokens: Vec<usize> = (0..self.conns.len())
            .filter(|&t| matches!(self.conns[t].state, State::Connected))
            .collect();
        for batch in tokens.chunks(SEND_BATCH) {
            for &token in batch {
                self.send(token, 1);
            }
            self.step(cfg, Instant::now());
        }
        // Every echo has a deadline, so this ends; the hard stop is a
        // backstop on top of them.
        let stop = Instant::now() + cfg.echo_timeout * 2 + cfg.hold + Duration::from_secs(1);
        while self.open > 0 && Instant::now() < stop {
            let mut wake = self.next_scan;
            if let Some(&(until, _)) = self.holds.front() {
                wake = wake.min(until);
            }
            self.step(cfg, wake.min(stop));
        }
        for token in 0..self.conns.len() {
            if !matches!(self.conns[token].state, State::Ended) {
                self.end(token, Err("exchange: not done in time".into()));
            }
        }
    }

    /// Sends line `n` of `token` and waits for its echo.
    fn send(&mut self, token: usize, n: u8) {
        let text = line(token, n);
        let Some(socket) = &self.conns[token].socket else {
            return;
        };
        // A line is far smaller than an idle socket's send buffer.
        match (&*socket).write(text.as_bytes()) {
            Ok(len) if len == text.len() => {
                self.conns[token].state = State::Awaiting {
                    line: n,
                    sent: Instant::now(),
                    got: 0,
                };
            }
            Ok(_) => self.end(token, Err(format!("send {n}: short write"))),
            Err(e) => self.end(token, Err(kind(&format!("send {n}"), &e))),
        }
    }

    /// One turn of the loop: read what is ready (waiting until `wake` at
    /// most), send the second lines whose holds are over, time out the
    /// overdue echoes.
    fn step(&mut self, cfg: &InteractiveConfig, wake: Instant) {
        let ready = self.epoll.wait(&mut self.events, wake);
        for token in ready {
            self.readable(token, cfg);
        }
        let now = Instant::now();
        while let Some(&(until, token)) = self.holds.front() {
            if until > now {
                break;
            }
            self.holds.pop_front();
            if matches!(self.conns[token].state, State::Holding) {
                self.send(token, 2);
            }
        }
        if now >= self.next_scan {
            self.next_scan = now + SCAN_EVERY;
            for token in 0..self.conns.len() {
                if let State::Awaiting { line, sent, .. } = self.conns[token].state {
                    if now.duration_since(sent) > cfg.echo_timeout {
                        self.end(token, Err(format!("echo {line}: timed out")));
                    }
                }
            }
        }
    }

    /// Connection `token` is readable: an echo (or part of one), or the
    /// server closing it.
    fn readable(&mut self, token: usize, cfg: &InteractiveConfig) {
        let conn = &mut self.conns[token];
        let Some(socket) = &conn.socket else { return };
        let (n, sent, got) = match conn.state {
            State::Awaiting { line, sent, got } => (line, sent, got),
            State::Holding | State::Connected => {
                let what = if matches!(conn.state, State::Connected) {
                    "before the first line"
                } else {
                    "during the hold"
                };
                let mut byte = [0u8; 1];
                let error = match (&*socket).read(&mut byte) {
                    Ok(0) => format!("closed by the server {what}"),
                    Ok(_) => format!("unexpected bytes {what}"),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => kind(&format!("read {what}"), &e),
                };
                self.end(token, Err(error));
                return;
            }
            _ => return,
        };
        let expected = line(token, n);
        let read = (&*socket).read(&mut conn.buf[got..]);
        let got = match read {
            Ok(0) => {
                self.end(token, Err(format!("echo {n}: closed by the server")));
                return;
            }
            Ok(k) => got + k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                self.end(token, Err(kind(&format!("echo {n}"), &e)));
                return;
            }
        };
        if got < expected.len() {
            conn.state = State::Awaiting { line: n, sent, got };
            return;
        }
        if conn.buf[..got] != *expected.as_bytes() {
            self.end(token, Err(format!("echo {n}: mismatch")));
            return;
        }
        let now = Instant::now();
        let latency = now.duration_since(sent).as_micros() as u64;
        if n == 1 {
            self.m.latencies_us.push(latency);
            let until = now + cfg.hold;
            conn.state = State::Holding;
            self.holds.push_back((until, token));
            self.live += 1;
            self.live_peak = self.live_peak.max(self.live);
        } else {
            self.second_us.push(latency);
            self.m.bytes += 2 * expected.len() as u64;
            self.end(token, Ok(()));
        }
    }
}
