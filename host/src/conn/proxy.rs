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

use crate::conn::proxy_header::{parse, signature, Header, Parsed, Signature, MAX_LEN};
use crate::conn::report::Ending;
use crate::conn::service::{Service, Unserved};
use crate::conn::socket::Socket;
use crate::listener::Peer;
use crate::outcome::Outcome;
use crate::settings::{Access, ProxyProtocol, ProxyVersion};
use crate::sys::socket::{peek_nonblocking, recv_nonblocking};

/// A connection refused before any instance: the peer to log, the balancer
/// it came through, and why.
pub(crate) struct Refused {
    pub(crate) peer: Peer,
    pub(crate) via: Option<Peer>,
    pub(crate) outcome: Outcome,
    pub(crate) error: Option<String>,
}

/// Who the client of a connection from `peer` is, and the balancer it came
/// through, for a tenant with `proxy` settings (if any) and `access` lists,
/// everything bounded by `cap` (the connection's `--timeout`) too. From a
/// balancer (`proxy-from`): the client its header names, judged by
/// `access`. From anyone else: `peer` itself (the accept loop judged it),
/// unless it starts with a PROXY protocol header it may not send.
pub(crate) async fn identify(
    socket: &Socket,
    proxy: Option<&ProxyProtocol>,
    peer: Peer,
    access: &Access,
    cap: Duration,
) -> Result<(Peer, Option<Peer>), Refused> {
    let Some(settings) = proxy else {
        return Ok((peer, None));
    };
    let within = settings.header_timeout.min(cap);
    if !settings.trusts(peer.ip()) {
        // A Unix socket's peers carry no header either way.
        if peer.ip().is_none() {
            return Ok((peer, None));
        }
        return match forged_header(socket, within).await {
            None => Ok((peer, None)),
            Some(why) => Err(Refused {
                peer,
                via: None,
                outcome: Outcome::BadProxyHeader,
                error: Some(why),
            }),
        };
    }
    let header = match read_header(socket, settings.version, within).await {
        Ok(header) => header,
        Err(why) => {
            let aborted = socket.traffic.aborted.load(Ordering::SeqCst);
            let (outcome, error) = match aborted {
                true => (Outcome::Shutdown, None),
                false => (Outcome::BadProxyHeader, Some(why)),
            };
            return Err(Refused {
                peer,
                via: None,
                outcome,
                error,
            });
        }
    };
    let client = client(&header, &peer);
    if !access.permits(client.ip()) {
        return Err(Refused {
            peer: client,
            via: Some(peer),
            outcome: Outcome::Denied,
            error: None,
        });
    }
    Ok((client, Some(peer)))
}

/// Reads the header `socket` starts with, a tenant taking `version`, within
/// `timeout`. The error says why there is none, for the `closed` line.
async fn read_header(
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

/// Whether a client outside `proxy-from`, on a tenant behind a balancer,
/// begins with a PROXY protocol signature: a header it may not send (it
/// would claim another client's address), said in the error. Its first
/// bytes are peeked, never taken, and judged as soon as any have come, so
/// a client that sends data is served without delay; one that sends
/// nothing waits for its first bytes up to `timeout`, and is then served.
/// A signature cut by the network (its first bytes alone) is served as
/// data: the refusal is a courtesy, since a header from outside
/// `proxy-from` is never trusted anyway.
async fn forged_header(socket: &Socket, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut peeked = [0u8; 12];
    loop {
        match peek_nonblocking(socket.stream().as_fd(), &mut peeked) {
            // Closed: nothing forged; the guest sees the end.
            Ok(0) => return None,
            Ok(n) => {
                return match signature(&peeked[..n]) {
                    Signature::Whole(version) => Some(format!(
                        "a PROXY protocol {} header from a peer outside proxy-from",
                        version.name()
                    )),
                    Signature::Maybe | Signature::No => None,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The guest meets the same error on its first read.
            Err(_) => return None,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !socket.readable_within(left).await {
            return None;
        }
    }
}

/// Takes `count` bytes the socket is known to hold (they were peeked).
fn consume(socket: &Socket, mut count: usize) -> Result<(), String> {
    let mut sink = Vec::with_capacity(count);
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
fn client(header: &Header, balancer: &Peer) -> Peer {
    match header.source {
        Some(addr) => Peer {
            inet: Some(addr),
            text: addr.to_string(),
        },
        None => balancer.clone(),
    }
}

/// The PROXY protocol step of serving a connection, shared by the raw and
/// the HTTP paths.
impl Service {
    /// Who the client is ([`identify`], with this tenant's settings). A
    /// refusal is returned for [`Service::refuse`], once the caller has
    /// closed the socket.
    pub(crate) async fn proxied(
        &self,
        socket: &Socket,
        peer: Peer,
    ) -> Result<(Peer, Option<Peer>), Refused> {
        identify(
            socket,
            self.proxy_protocol(),
            peer,
            self.access(),
            self.limits().timeout,
        )
        .await
    }

    /// Counts and logs a connection [`Service::proxied`] refused.
    pub(crate) fn refuse(&self, r: Refused, id: u64, worker: &str, started: Instant) -> Ending {
        let unserved = Unserved {
            id,
            peer: &r.peer,
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
    use crate::conn::socket::Waits;
    use crate::wasm::direct_streams::block_on;

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
