//! The small HTTP server of the metrics process: `GET /metrics` answered
//! with the page, `/healthz`, `/readyz` and the index `/` (see `health`),
//! everything else refused, every client bounded in time and size.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::health::{Readiness, HEALTHY, INDEX};
use super::page::CONTENT_TYPE;

/// Metrics clients served at once, each on its own thread: far more than
/// scrapers need, so idle connections do not starve them. Beyond it, a new
/// client is answered `503 Service Unavailable` at once.
const MAX_CLIENTS: usize = 128;
/// The most a request's line and headers may take.
const MAX_HEAD: usize = 8 << 10;
/// How long a client has to send its request line and headers: a scraper
/// sends them at once, so an idle connection holds its slot only briefly.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client has to take the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the response: how long, and how much, unread input is drained so
/// the close is a FIN and not a reset that could destroy the response.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: usize = 64 << 10;

type Render = dyn Fn() -> String + Send + Sync;
type Ready = dyn Fn() -> Readiness + Send + Sync;

/// What the server answers from: the page, and the host's readiness.
struct Site {
    render: Box<Render>,
    ready: Box<Ready>,
}

/// Serves `GET /metrics` (and `GET /metrics?...`) on `listener` forever with
/// `render()`'s page, `/readyz` from `ready()`, `/healthz` and the index
/// `/` (those three also to `HEAD`); any other path 404, other methods 405.
/// Each client gets
/// a thread (at most 128; beyond that a new client is answered 503 at once),
/// 8 KiB for its request line and headers, 2 s to send them and 5 s to
/// take the response. HTTP/1.0 and 1.1, one request per connection
/// (`Connection: close`). Returns only if the listener itself fails.
pub(crate) fn serve_http(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> Readiness + Send + Sync + 'static,
) -> Result<()> {
    listener
        .set_nonblocking(false)
        .context("cannot make the metrics listener blocking")?;
    let site = Arc::new(Site {
        render: Box::new(render),
        ready: Box::new(ready),
    });
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(e)?;
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse_busy(stream);
            continue;
        }
        let slot = ClientSlot(Arc::clone(&active));
        let site = Arc::clone(&site);
        // On failure the closure, and with it the stream and the slot, is
        // dropped: the client is closed and the slot freed.
        let spawned = std::thread::Builder::new()
            .name("metrics-http".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                serve_client(stream, &site);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread for a metrics client: {e}");
        }
    }
}

/// Answers `503 Service Unavailable` to a client there is no slot for,
/// without waiting for it: a scraper learns to retry instead of seeing a
/// bare close or a reset. What it sent so far is read first, so the close
/// does not turn into a reset that destroys the answer.
fn refuse_busy(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut chunk = [0u8; 4096];
    while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
    let response = Response::new(
        503,
        "text/plain; charset=utf-8",
        "Retry-After: 1\r\n",
        b"Service Unavailable: too many metrics clients\n".to_vec(),
    );
    let mut whole = response.head;
    whole.extend_from_slice(&response.body);
    // Small enough for any socket buffer: one write, never a wait.
    let _ = stream.write(&whole);
    let _ = stream.shutdown(Shutdown::Write);
}

/// What to do after `accept` failed: go on (after a pause if the process is
/// out of something), or give up if the listener itself is unusable.
fn accept_failed(e: io::Error) -> Result<()> {
    match e.raw_os_error() {
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => {
            Err(e).context("cannot accept metrics clients")
        }
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!("cannot accept a metrics client: {e}");
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        }
        // EINTR, ECONNABORTED, and the pending connection's own network
        // errors, which accept(2) says to treat like EAGAIN.
        _ => {
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        }
    }
}

/// Frees a client slot when its thread ends, however it ends.
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why no request could be read.
enum HeadError {
    /// More than [`MAX_HEAD`] bytes without the end of the headers.
    TooLarge,
    /// The client closed, timed out or failed: nothing to answer.
    Gone,
}

fn serve_client(mut stream: TcpStream, site: &Site) {
    let response = match read_head(&mut stream, Instant::now() + HEAD_TIMEOUT) {
        Ok(head) => respond(&head, site),
        Err(HeadError::TooLarge) => Response::text(431, "Request Header Fields Too Large"),
        Err(HeadError::Gone) => return,
    };
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    if write_by(&mut stream, &response.head, deadline).is_ok() {
        let _ = write_by(&mut stream, &response.body, deadline);
    }
    let _ = stream.shutdown(Shutdown::Write);
    drain(&mut stream);
}

/// Reads the request line and headers, up to the empty line ending them.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // Empty lines before the request line are to be ignored (RFC 9112).
        let start = head
            .iter()
            .position(|byte| !matches!(byte, b'\r' | b'\n'))
            .unwrap_or(head.len());
        let request = &head[start..];
        if let Some(end) = find(request, b"\r\n\r\n").or_else(|| find(request, b"\n\n")) {
            return Ok(request[..end].to_vec());
        }
        if head.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(HeadError::Gone)?;
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|_| HeadError::Gone)?;
        let room = (MAX_HEAD - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(HeadError::Gone),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// An HTTP response: its status line and headers, and its body.
struct Response {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &str, extra: &str, body: Vec<u8>) -> Response {
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        );
        Response {
            head: head.into_bytes(),
            body,
        }
    }

    fn text(status: u16, message: &str) -> Response {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            "",
            format!("{message}\n").into_bytes(),
        )
    }
}

/// The response to a request whose head is `head`.
fn respond(head: &[u8], site: &Site) -> Response {
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text(400, "Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request");
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !token(method) || !token(target) || !token(version) {
        return Response::text(400, "Bad Request");
    }
    if !version.starts_with("HTTP/") {
        return Response::text(400, "Bad Request");
    }
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return Response::text(505, "HTTP Version Not Supported");
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let health = match path {
        "/" => Some((200, INDEX.trim_end())),
        "/healthz" => Some((200, HEALTHY)),
        "/readyz" => Some((site.ready)().answer()),
        "/metrics" => None,
        _ => return Response::text(404, "Not Found"),
    };
    if let Some((status, text)) = health {
        let mut response = Response::text(status, text);
        match method {
            "GET" => {}
            "HEAD" => response.body.clear(),
            _ => {
                return Response::new(
                    405,
                    "text/plain; charset=utf-8",
                    "Allow: GET, HEAD\r\n",
                    b"Method Not Allowed\n".to_vec(),
                )
            }
        }
        return response;
    }
    if method != "GET" {
        return Response::new(
            405,
            "text/plain; charset=utf-8",
            "Allow: GET\r\n",
            b"Method Not Allowed\n".to_vec(),
        );
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (site.render)())) {
        Ok(page) => Response::new(200, CONTENT_TYPE, "", page.into_bytes()),
        Err(_) => Response::text(500, "Internal Server Error"),
    }
}

/// Writes all of `bytes` unless `deadline` passes first.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(io::ErrorKind::TimedOut)?;
        stream.set_write_timeout(Some(remaining))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and drops what the client still sends (a bounded amount, for a
/// bounded time), so that closing does not reset the connection.
fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        let Some(remaining) = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
        else {
            return;
        };
        if stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const MS: Duration = Duration::from_millis(1);

    /// Starts `serve_http` on a fresh port with a fixed page.
    fn start_server() -> SocketAddr {
        start_with(|| Readiness::Ready)
    }

    /// Starts `serve_http` on a fresh port with a fixed page and `ready`.
    fn start_with(ready: impl Fn() -> Readiness + Send + Sync + 'static) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_http(listener, || "page 1\n".to_string(), ready));
        addr
    }

    /// Sends `request`, then reads until the server closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    fn get_metrics(addr: SocketAddr) -> String {
        exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap()
    }

    #[test]
    fn http_serves_the_page_and_refuses_the_rest() {
        let addr = start_server();
        let response = get_metrics(addr);
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nContent-Type: {CONTENT_TYPE}\r\n")));
        assert!(head.contains("\r\nContent-Length: 7\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert_eq!(body, "page 1\n");

        let response = exchange(addr, b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\npage 1\n"), "{response}");
        let response = exchange(addr, b"GET /metrics\n\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");

        let response = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        assert!(response.contains("Connection: close"));
        let response = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert!(
            response.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nAllow: GET\r\n"));
        let response = exchange(addr, b"GET /metrics HTTP/2.0\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 505 "), "{response}");
        let response = exchange(addr, b"\xff\xfe /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    }

    #[test]
    fn http_serves_health_readiness_and_an_index() {
        use std::sync::atomic::AtomicU64;
        let state = Arc::new(AtomicU64::new(Readiness::Ready.code()));
        let seen = Arc::clone(&state);
        let addr = start_with(move || Readiness::from_code(seen.load(Ordering::SeqCst)));
        let get = |path: &str| exchange(addr, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
        let response = get("/healthz").unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok\n"), "{response}");
        let response = get("/readyz").unwrap();
        assert!(response.ends_with("\r\n\r\nready\n"), "{response}");
        state.store(Readiness::Draining.code(), Ordering::SeqCst);
        let response = get("/readyz?verbose").unwrap();
        assert!(
            response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{response}"
        );
        assert!(
            response.ends_with("not ready: shutting down\n"),
            "{response}"
        );
        let response = get("/").unwrap();
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert!(response.contains(&format!("GET {path} ")), "{response}");
        }
        // HEAD: the head alone; other methods are refused.
        let response = exchange(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("\r\nContent-Length: 3\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\n"), "{response}");
        let response = exchange(addr, b"POST /readyz HTTP/1.1\r\n\r\n").unwrap();
        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
        assert!(response.contains("\r\nAllow: GET, HEAD\r\n"), "{response}");
    }

    #[test]
    fn http_survives_oversized_and_abandoned_requests() {
        let addr = start_server();
        let garbage = vec![b'x'; 100 << 10];
        // The server answers 431 and closes, possibly while the client is
        // still writing: an error is as good as the 431.
        if let Ok(response) = exchange(addr, &garbage) {
            assert!(
                response.is_empty() || response.starts_with("HTTP/1.1 431 "),
                "{response}"
            );
        }
        // Headers that never end, and a client that leaves mid-request.
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b"X-Pad: yyyyyyyyyyyyyyy\r\n".as_slice(), 1000).flatten());
        let _ = exchange(addr, &long);
        drop(TcpStream::connect(addr).unwrap());
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /met").unwrap();
        drop(half);
        assert!(get_metrics(addr).ends_with("\r\n\r\npage 1\n"));
    }

    #[test]
    fn http_bounds_its_clients() {
        let addr = start_server();
        // Fill every client slot with a connection that sends nothing.
        let idle: Vec<TcpStream> = (0..MAX_CLIENTS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // One more is answered 503 at once, before the idle ones time out.
        let started = Instant::now();
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut response = Vec::new();
        extra
            .read_to_end(&mut response)
            .expect("a 503, not a reset");
        let response = String::from_utf8(response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
        assert!(started.elapsed() < HEAD_TIMEOUT);
        drop(idle);
        // Their threads see the close and free their slots.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n") {
                Ok(response) if response.ends_with("page 1\n") => break,
                _ if Instant::now() < deadline => std::thread::sleep(10 * MS),
                other => panic!("no slot freed: {other:?}"),
            }
        }
    }

    #[test]
    fn http_cuts_off_a_slow_client() {
        let addr = start_server();
        let mut reader = TcpStream::connect(addr).unwrap();
        let mut writer = reader.try_clone().unwrap();
        let started = Instant::now();
        // One byte every 200 ms would take half an hour to fill the head.
        std::thread::spawn(move || {
            while started.elapsed() < Duration::from_secs(20) && writer.write_all(b"X").is_ok() {
                std::thread::sleep(200 * MS);
            }
        });
        reader
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        match reader.read(&mut [0u8; 64]) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("not cut off: {other:?}"),
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= HEAD_TIMEOUT - 200 * MS, "{elapsed:?}");
        assert!(
            elapsed < HEAD_TIMEOUT + Duration::from_secs(3),
            "{elapsed:?}"
        );
    }
}
