//! A balancer's PROXY protocol header, read off its connection before any
//! instance exists: exactly the header's bytes (what follows stays in the
//! socket for the guest), at most `conn::proxy_header::MAX_LEN` of them,
//! within the tenant's `proxy-header-timeout`, waiting as the connection's
//! strategy waits (poll(2) on its own thread or child, or the runtime's
//! reactor), never on the accept loop.
//!
//! The bytes are peeked first and consumed only once known to be the
//! header's: a header cannot swallow the client's data, and a slow header
//! costs no busy loop.

use std::io;
use std::os::fd::AsFd as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wasmtime_wasi_io::bytes::BytesMut;

use crate::conn::proxy_header::{parse, Header, Parsed, MAX_LEN};
use crate::conn::report::Ending;
use crate::conn::service::{Service, Unserved};
use crate::conn::socket::Socket;
use crate::listener::Peer;
use crate::outcome::Outcome;
use crate::settings::ProxyVersion;
use crate::sys::socket::{peek_nonblocking, recv_nonblocking};

/// Reads the header `socket` starts with, a tenant taking `version`, within
/// `timeout`. The error says why there is none, for the `closed` line.
pub(crate) async fn read_header(
    socket: &Socket,
    version: ProxyVersion,
    timeout: Duration,
) -> Result<Header, String> {
    let deadline = Instant::now() + timeout;
    // The header's bytes taken from the socket so far, then what is peeked.
    let mut seen: Vec<u8> = Vec::with_capacity(MAX_LEN);
    let mut taken = 0;
    let mut peeked = vec![0u8; MAX_LEN];
    loop {
        match peek_nonblocking(socket.stream().as_fd(), &mut peeked[..MAX_LEN - taken]) {
            Ok(0) => {
                return Err(format!(
                    "the connection closed before its PROXY protocol header was complete ({taken} bytes)"
                ))
            }
            Ok(n) => {
                seen.truncate(taken);
                seen.extend_from_slice(&peeked[..n]);
                match parse(&seen, version).map_err(|e| e.to_string())? {
                    Parsed::Complete(header) => {
                        consume(socket, header.len - taken)?;
                        return Ok(header);
                    }
                    // Every byte seen belongs to the header: take them, and
                    // wait for the rest.
                    Parsed::Incomplete => {
                        consume(socket, n)?;
                        taken += n;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read the PROXY protocol header: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !socket.readable_within(left).await {
            return Err(format!(
                "no whole PROXY protocol header within {timeout:?} ({taken} bytes)"
            ));
        }
    }
}

/// Takes `count` bytes the socket is known to hold (they were peeked).
fn consume(socket: &Socket, mut count: usize) -> Result<(), String> {
    let mut sink = BytesMut::with_capacity(count);
    while count > 0 {
        sink.clear();
        match recv_nonblocking(socket.stream().as_fd(), &mut sink, count) {
            Ok(0) => return Err("the connection closed inside its PROXY protocol header".into()),
            Ok(n) => count -= n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read the PROXY protocol header: {e}")),
        }
    }
    Ok(())
}

/// The client a header names, or, when it names none (v2 `LOCAL`, v1
/// `UNKNOWN`: the balancer's own connection, such as a health check), the
/// balancer itself, as the spec says.
pub(crate) fn client(header: &Header, balancer: &Peer) -> Peer {
    match header.source {
        Some(addr) => Peer {
            inet: Some(addr),
            text: addr.to_string(),
        },
        None => balancer.clone(),
    }
}

/// A balancer's connection refused before any guest ran: its header was
/// bad or late, the client it named is denied, or the host is stopping.
pub(crate) struct Refused {
    client: Peer,
    via: Option<Peer>,
    outcome: Outcome,
    error: Option<String>,
}

/// The PROXY protocol step of serving a connection, shared by the raw and
/// the HTTP paths.
impl Service {
    /// A balancer's connection: the client its PROXY protocol header names
    /// (the peer itself when `peer` is no balancer of this tenant), and
    /// the balancer; allow/deny judge that client. A refusal is returned
    /// for [`Service::refuse`], once the caller has closed the socket.
    pub(crate) async fn proxied(
        &self,
        socket: &Socket,
        peer: Peer,
    ) -> Result<(Peer, Option<Peer>), Refused> {
        let Some(settings) = self.balancer(&peer) else {
            return Ok((peer, None));
        };
        // Bounded by the connection's own `--timeout` too, as all it does.
        let within = settings.header_timeout.min(self.limits().timeout);
        let header = read_header(socket, settings.version, within).await;
        let aborted = socket.traffic.aborted.load(Ordering::SeqCst);
        let (client, refused) = match &header {
            Err(_) if aborted => (peer.clone(), Some((Outcome::Shutdown, None))),
            Err(why) => (
                peer.clone(),
                Some((Outcome::BadProxyHeader, Some(why.clone()))),
            ),
            Ok(header) => {
                let client = client(header, &peer);
                let denied = !self.permits(client.ip());
                (client, denied.then_some((Outcome::Denied, None)))
            }
        };
        match refused {
            None => Ok((client, Some(peer))),
            Some((outcome, error)) => Err(Refused {
                via: header.is_ok().then_some(peer),
                client,
                outcome,
                error,
            }),
        }
    }

    /// Counts and logs a connection [`Service::proxied`] refused.
    pub(crate) fn refuse(&self, r: Refused, id: u64, worker: &str, started: Instant) -> Ending {
        let unserved = Unserved {
            id,
            peer: &r.client,
            via: r.via.as_ref(),
            worker,
            duration: started.elapsed(),
        };
        self.unserved(unserved, r.outcome, r.error.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    use super::*;
    use crate::conn::socket::{block_on, Waits};

    /// A connected pair over loopback TCP: the host's side as a
    /// connection's socket, and the client's.
    fn pair() -> (Arc<Socket>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let socket = Socket::new(
            ours.into(),
            Duration::from_secs(60),
            deadline,
            Waits::Blocking,
        );
        (socket, client)
    }

    fn read(socket: &Socket, timeout: Duration) -> Result<Header, String> {
        block_on(read_header(socket, ProxyVersion::Any, timeout))
    }

    /// What the guest would read after the header.
    fn rest(socket: &Socket) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stream = socket.stream();
        stream.set_nonblocking(false).unwrap();
        stream.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn the_header_is_taken_and_the_data_after_it_left() {
        let (socket, mut client) = pair();
        client
            .write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nhello")
            .unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let header = read(&socket, Duration::from_secs(60)).unwrap();
        assert_eq!(header.source, Some("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(rest(&socket), b"hello");
    }

    #[test]
    fn a_header_sent_in_pieces_is_read_whole() {
        let (socket, mut client) = pair();
        let writer = std::thread::spawn(move || {
            let mut bytes = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
            bytes.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1, 0x01, 0xbb, 0x00, 0x50]);
            bytes.extend_from_slice(b"data");
            for piece in bytes.chunks(3) {
                client.write_all(piece).unwrap();
                client.flush().unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            client.shutdown(std::net::Shutdown::Write).unwrap();
            client
        });
        let header = read(&socket, Duration::from_secs(60)).unwrap();
        let _client = writer.join().unwrap();
        assert_eq!(header.source, Some("192.0.2.7:443".parse().unwrap()));
        assert_eq!(rest(&socket), b"data");
    }

    #[test]
    fn garbage_a_close_and_silence_are_errors() {
        let (socket, mut client) = pair();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let err = read(&socket, Duration::from_secs(60)).unwrap_err();
        assert_eq!(err, "not a PROXY protocol header");

        let (socket, mut client) = pair();
        client.write_all(b"PROXY TCP4 192.0.2").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let err = read(&socket, Duration::from_secs(60)).unwrap_err();
        assert_eq!(
            err,
            "the connection closed before its PROXY protocol header was complete (18 bytes)"
        );

        let (socket, mut client) = pair();
        client.write_all(b"PROXY ").unwrap();
        let err = read(&socket, Duration::from_millis(50)).unwrap_err();
        assert_eq!(err, "no whole PROXY protocol header within 50ms (6 bytes)");
    }

    #[test]
    fn a_header_without_a_client_leaves_the_balancer_as_the_peer() {
        let balancer = Peer {
            inet: Some("127.0.0.1:4000".parse().unwrap()),
            text: "127.0.0.1:4000".to_string(),
        };
        let local = Header {
            version: ProxyVersion::V2,
            source: None,
            destination: None,
            len: 16,
        };
        assert_eq!(client(&local, &balancer).text, "127.0.0.1:4000");
        let proxied = Header {
            source: Some("[2001:db8::7]:80".parse().unwrap()),
            ..local
        };
        let peer = client(&proxied, &balancer);
        assert_eq!(peer.text, "[2001:db8::7]:80");
        assert_eq!(peer.ip(), Some("2001:db8::7".parse().unwrap()));
    }
}
