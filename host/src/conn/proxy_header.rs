//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) parsed from
//! the bytes a balancer sends first: pure, no I/O. [`parse`] says whether
//! the bytes so far are a whole header (and how long it is), need more, or
//! can never become one; `conn::proxy` reads them off the socket.
//!
//! Version 1 is one text line of at most 107 bytes:
//! `PROXY TCP4 SRC DST SPORT DPORT\r\n`, `PROXY TCP6 ...`, or
//! `PROXY UNKNOWN ...\r\n`. Version 2 is a 16-byte binary preamble (a
//! 12-byte signature, version and command, family and transport, a length)
//! and `length` bytes of addresses and TLVs. TLVs are skipped.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::settings::ProxyVersion;

/// The v1 header's signature, its longest line (CRLF included).
const V1_SIGNATURE: &[u8] = b"PROXY ";
pub(crate) const V1_MAX_LEN: usize = 107;

/// The v2 header's signature, and its fixed part.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_PREAMBLE: usize = 16;
/// The most address and TLV bytes a v2 header may declare; more is refused
/// as soon as the preamble says so. The addresses take at most 216 bytes
/// (two Unix paths); the rest leaves room for the TLVs balancers add.
pub(crate) const V2_MAX_BODY: usize = 2048;

/// The most bytes a header can take: what the reader needs to look at.
pub(crate) const MAX_LEN: usize = V2_PREAMBLE + V2_MAX_BODY;

/// A whole header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Which version it was (only the tests look: the tenant's setting
    /// already said which it takes).
    #[allow(dead_code)]
    pub(crate) version: ProxyVersion,
    /// The client's address: `None` when the header carries none (v2
    /// `LOCAL`, v1 `UNKNOWN`, a v2 family other than TCP over IPv4 or IPv6):
    /// the connection is then the balancer's own, and served as such.
    pub(crate) source: Option<SocketAddr>,
    /// The address the client connected to, when the header gives one.
    /// Parsed, not used: the guest's `local-address` stays the host's own.
    #[allow(dead_code)]
    pub(crate) destination: Option<SocketAddr>,
    /// The header's length in bytes; what follows is the client's data.
    pub(crate) len: usize,
}

/// What the bytes received so far come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole header (and possibly data after it).
    Complete(Header),
    /// The beginning of a header: more bytes are needed.
    Incomplete,
}

/// Why the bytes are not a header the tenant takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Neither signature.
    NotProxy,
    /// A header of the version the tenant does not take.
    WrongVersion {
        got: ProxyVersion,
        wanted: ProxyVersion,
    },
    /// A v1 line with no CRLF within 107 bytes.
    V1TooLong,
    /// A v1 line that does not follow the grammar.
    V1Malformed(&'static str),
    /// A v2 version other than 2.
    V2Version(u8),
    /// A v2 command other than `LOCAL` (0) or `PROXY` (1).
    V2Command(u8),
    /// A v2 header declaring more than [`V2_MAX_BODY`] bytes.
    V2TooLong(usize),
    /// A v2 header too short for the addresses its family needs, or
    /// another impossible combination.
    V2Malformed(&'static str),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotProxy => f.write_str("not a PROXY protocol header"),
            HeaderError::WrongVersion { got, wanted } => write!(
                f,
                "a PROXY protocol {} header, but the tenant takes {}",
                got.name(),
                wanted.name()
            ),
            HeaderError::V1TooLong => {
                write!(f, "a v1 header with no CRLF within {V1_MAX_LEN} bytes")
            }
            HeaderError::V1Malformed(why) => write!(f, "a malformed v1 header: {why}"),
            HeaderError::V2Version(v) => write!(f, "a v2 header of version {v}, not 2"),
            HeaderError::V2Command(c) => write!(f, "a v2 header with command {c}"),
            HeaderError::V2TooLong(len) => write!(
                f,
                "a v2 header of {len} bytes after its preamble; at most {V2_MAX_BODY} are taken"
            ),
            HeaderError::V2Malformed(why) => write!(f, "a malformed v2 header: {why}"),
        }
    }
}

/// Reads the header at the start of `bytes`, a tenant taking `accept`.
/// Fails as soon as the bytes cannot begin a header it takes.
pub(crate) fn parse(bytes: &[u8], accept: ProxyVersion) -> Result<Parsed, HeaderError> {
    let version = if begins(bytes, V2_SIGNATURE) {
        ProxyVersion::V2
    } else if begins(bytes, V1_SIGNATURE) {
        ProxyVersion::V1
    } else {
        return Err(HeaderError::NotProxy);
    };
    // Only v2 begins with `\r` and only v1 with `P`: one byte tells them
    // apart; no byte tells nothing yet.
    if bytes.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if accept != ProxyVersion::Any && accept != version {
        return Err(HeaderError::WrongVersion {
            got: version,
            wanted: accept,
        });
    }
    match version {
        ProxyVersion::V2 => parse_v2(bytes),
        _ => parse_v1(bytes),
    }
}

/// Whether `bytes` and `signature` agree as far as both go.
/// What the first bytes of a connection say about a PROXY protocol
/// signature (either version's), for a client that may not send one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signature {
    /// A whole signature: `PROXY ` or v2's twelve bytes.
    Whole(ProxyVersion),
    /// What came so far (maybe nothing) could still become one.
    Maybe,
    /// Not a signature.
    No,
}

/// Whether `bytes` begin with a PROXY protocol signature.
pub(crate) fn signature(bytes: &[u8]) -> Signature {
    if bytes.len() >= V2_SIGNATURE.len() && begins(bytes, V2_SIGNATURE) {
        Signature::Whole(ProxyVersion::V2)
    } else if bytes.len() >= V1_SIGNATURE.len() && begins(bytes, V1_SIGNATURE) {
        Signature::Whole(ProxyVersion::V1)
    } else if begins(bytes, V2_SIGNATURE) || begins(bytes, V1_SIGNATURE) {
        Signature::Maybe
    } else {
        Signature::No
    }
}

fn begins(bytes: &[u8], signature: &[u8]) -> bool {
    let n = bytes.len().min(signature.len());
    bytes[..n] == signature[..n]
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &bytes[..bytes.len().min(V1_MAX_LEN)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        // A bare LF, or CR followed by something else, never ends well.
        if let Some(at) = window.iter().position(|&b| b == b'\n' || b == b'\r') {
            if window[at] == b'\n' || at + 1 < window.len() {
                return Err(HeaderError::V1Malformed("a line end that is not CRLF"));
            }
        }
        if bytes.len() >= V1_MAX_LEN {
            return Err(HeaderError::V1TooLong);
        }
        return Ok(Parsed::Incomplete);
    };
    let line = &window[V1_SIGNATURE.len()..end];
    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(HeaderError::V1Malformed("a line end that is not CRLF"));
    }
    let line = std::str::from_utf8(line)
        .map_err(|_| HeaderError::V1Malformed("bytes that are not ASCII"))?;
    let len = end + 2;
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or("");
    if protocol == "UNKNOWN" {
        // The rest, if any, is to be ignored.
        return Ok(Parsed::Complete(Header {
            version: ProxyVersion::V1,
            source: None,
            destination: None,
            len,
        }));
    }
    let v6 = match protocol {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(HeaderError::V1Malformed(
                "the protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let rest: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = rest[..] else {
        return Err(HeaderError::V1Malformed(
            "not four fields (source, destination and their ports) after the protocol",
        ));
    };
    let ip = |text: &str| -> Result<IpAddr, HeaderError> {
        let ip = if v6 {
            text.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            text.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        ip.map_err(|_| HeaderError::V1Malformed("an address not of the protocol's family"))
    };
    let port = |text: &str| -> Result<u16, HeaderError> {
        let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        let canonical = text == "0" || !text.starts_with('0');
        match text.parse::<u16>() {
            Ok(port) if digits && canonical => Ok(port),
            _ => Err(HeaderError::V1Malformed("a port that is not 0 to 65535")),
        }
    };
    Ok(Parsed::Complete(Header {
        version: ProxyVersion::V1,
        source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
        destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
        len,
    }))
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    if bytes.len() < V2_PREAMBLE {
        // The version and command byte can be judged on its own.
        if let Some(&byte) = bytes.get(12) {
            check_v2_version(byte)?;
        }
        return Ok(Parsed::Incomplete);
    }
    let command = check_v2_version(bytes[12])?;
    let family = bytes[13] >> 4;
    let transport = bytes[13] & 0x0f;
    let body = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if body > V2_MAX_BODY {
        return Err(HeaderError::V2TooLong(body));
    }
    let len = V2_PREAMBLE + body;
    if bytes.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &bytes[V2_PREAMBLE..len];
    let local = Header {
        version: ProxyVersion::V2,
        source: None,
        destination: None,
        len,
    };
    // LOCAL: the balancer's own connection (a health check); its address
    // block, whatever it holds, is ignored.
    if command == 0 {
        return Ok(Parsed::Complete(local));
    }
    if transport > 2 {
        return Err(HeaderError::V2Malformed("an unknown transport"));
    }
    if transport == 2 {
        return Err(HeaderError::V2Malformed(
            "a datagram transport over a stream",
        ));
    }
    let (source, destination) = match family {
        // UNSPEC, or a Unix socket: no address the host can use.
        0 | 3 => return Ok(Parsed::Complete(local)),
        1 => {
            let a: &[u8; 12] = body
                .get(..12)
                .and_then(|a| a.try_into().ok())
                .ok_or(HeaderError::V2Malformed("too short for IPv4 addresses"))?;
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        2 => {
            let a: &[u8; 36] = body
                .get(..36)
                .and_then(|a| a.try_into().ok())
                .ok_or(HeaderError::V2Malformed("too short for IPv6 addresses"))?;
            let ip = |at: usize| {
                let octets: [u8; 16] = a[at..at + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        _ => return Err(HeaderError::V2Malformed("an unknown address family")),
    };
    Ok(Parsed::Complete(Header {
        version: ProxyVersion::V2,
        source: Some(source),
        destination: Some(destination),
        len,
    }))
}

/// The command of a v2 version-and-command byte, if its version is 2 and
/// its command one the spec defines.
fn check_v2_version(byte: u8) -> Result<u8, HeaderError> {
    if byte >> 4 != 2 {
        return Err(HeaderError::V2Version(byte >> 4));
    }
    match byte & 0x0f {
        command @ (0 | 1) => Ok(command),
        command => Err(HeaderError::V2Command(command)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: ProxyVersion = ProxyVersion::Any;

    #[test]
    fn a_signature_is_seen_whole_as_a_prefix_or_not_at_all() {
        assert_eq!(signature(b""), Signature::Maybe);
        assert_eq!(signature(b"PROX"), Signature::Maybe);
        assert_eq!(signature(b"PROXY TCP4"), Signature::Whole(ProxyVersion::V1));
        assert_eq!(signature(b"\r\n\r\n"), Signature::Maybe);
        assert_eq!(
            signature(b"\r\n\r\n\0\r\nQUIT\n!"),
            Signature::Whole(ProxyVersion::V2)
        );
        assert_eq!(signature(b"GET /"), Signature::No);
        assert_eq!(signature(b"PROXZ"), Signature::No);
        assert_eq!(signature(b"\r\nX"), Signature::No);
    }

    fn complete(bytes: &[u8], accept: ProxyVersion) -> Header {
        match parse(bytes, accept) {
            Ok(Parsed::Complete(header)) => header,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    /// A v2 header: command, family and transport, body.
    fn v2(command: u8, family_transport: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family_transport);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_inet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&src);
        body.extend_from_slice(&dst);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&dport.to_be_bytes());
        body
    }

    #[test]
    fn v1_tcp4_and_what_follows() {
        let text = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET / HTTP/1.0\r\n";
        let header = complete(text, ANY);
        assert_eq!(header.version, ProxyVersion::V1);
        assert_eq!(header.source, addr("192.0.2.7:56324"));
        assert_eq!(header.destination, addr("198.51.100.1:443"));
        assert_eq!(&text[header.len..], b"GET / HTTP/1.0\r\n");
        assert_eq!(complete(text, ProxyVersion::V1), header);
    }

    #[test]
    fn v1_tcp6() {
        let text = b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n";
        let header = complete(text, ANY);
        assert_eq!(header.source, addr("[2001:db8::7]:65535"));
        assert_eq!(header.destination, addr("[::1]:0"));
        assert_eq!(header.len, text.len());
    }

    #[test]
    fn v1_unknown_carries_no_address() {
        for text in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n",
        ] {
            let header = complete(text, ANY);
            assert_eq!(header.source, None);
            assert_eq!(header.len, text.len());
        }
    }

    #[test]
    fn v1_of_the_longest_length_is_taken_and_one_byte_more_is_not() {
        let longest =
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), V1_MAX_LEN);
        let tcp6 = String::from_utf8_lossy(longest).replace("UNKNOWN", "TCP6");
        assert_eq!(complete(tcp6.as_bytes(), ANY).len, V1_MAX_LEN - 3);
        assert_eq!(complete(longest, ANY).len, V1_MAX_LEN);
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'x');
        assert_eq!(parse(&long, ANY), Err(HeaderError::V1TooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long, ANY), Err(HeaderError::V1TooLong));
        long.truncate(V1_MAX_LEN - 1);
        assert_eq!(parse(&long, ANY), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v1_malformed_lines_are_refused() {
        for text in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n"[..],
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443 9\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 0443 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +443 443\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",
            b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            match parse(text, ANY) {
                Err(HeaderError::V1Malformed(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(text)),
            }
        }
    }

    #[test]
    fn v2_proxy_over_ipv4_skips_its_tlvs() {
        let mut body = v2_inet([192, 0, 2, 7], [198, 51, 100, 1], 56324, 443);
        // A TLV (PP2_TYPE_ALPN "h2"), skipped.
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        let mut bytes = v2(1, 0x11, &body);
        let len = bytes.len();
        bytes.extend_from_slice(b"hello");
        let header = complete(&bytes, ANY);
        assert_eq!(header.version, ProxyVersion::V2);
        assert_eq!(header.source, addr("192.0.2.7:56324"));
        assert_eq!(header.destination, addr("198.51.100.1:443"));
        assert_eq!(header.len, len);
        assert_eq!(complete(&bytes, ProxyVersion::V2), header);
    }

    #[test]
    fn v2_proxy_over_ipv6() {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "::1".parse().unwrap();
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&1234u16.to_be_bytes());
        body.extend_from_slice(&80u16.to_be_bytes());
        let bytes = v2(1, 0x21, &body);
        let header = complete(&bytes, ANY);
        assert_eq!(header.source, addr("[2001:db8::7]:1234"));
        assert_eq!(header.destination, addr("[::1]:80"));
        assert_eq!(header.len, 16 + 36);
    }

    #[test]
    fn v2_local_and_addressless_families_carry_no_address() {
        // LOCAL over IPv4 (HAProxy's health checks), with addresses ignored.
        let body = v2_inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        for bytes in [
            v2(0, 0x11, &body),
            v2(0, 0x00, &[]),
            // LOCAL over IPv6, its block too short: ignored anyway.
            v2(0, 0x21, &[0; 4]),
            // PROXY, UNSPEC.
            v2(1, 0x00, &[]),
            // PROXY over a Unix socket: no IP address to take.
            v2(1, 0x31, &[0; 216]),
        ] {
            let header = complete(&bytes, ANY);
            assert_eq!(header.source, None, "{bytes:?}");
            assert_eq!(header.len, bytes.len());
        }
    }

    #[test]
    fn v2_bad_version_command_and_addresses_are_refused() {
        let body = v2_inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        let mut bytes = v2(1, 0x11, &body);
        bytes[12] = 0x11;
        assert_eq!(parse(&bytes, ANY), Err(HeaderError::V2Version(1)));
        // Judged as soon as the byte arrives.
        assert_eq!(parse(&bytes[..13], ANY), Err(HeaderError::V2Version(1)));
        bytes[12] = 0x22;
        assert_eq!(parse(&bytes, ANY), Err(HeaderError::V2Command(2)));
        for (family_transport, body) in [
            (0x11, &body[..11]),
            (0x21, &body[..]),
            (0x41, &body[..]),
            (0x12, &body[..]),
            (0x13, &body[..]),
        ] {
            match parse(&v2(1, family_transport, body), ANY) {
                Err(HeaderError::V2Malformed(_)) => {}
                other => panic!("{family_transport:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn v2_oversize_is_refused_from_its_preamble() {
        let mut bytes = v2(1, 0x11, &[]);
        bytes[14..16].copy_from_slice(&((V2_MAX_BODY + 1) as u16).to_be_bytes());
        assert_eq!(
            parse(&bytes, ANY),
            Err(HeaderError::V2TooLong(V2_MAX_BODY + 1))
        );
        let most = v2(1, 0x11, &vec![0; V2_MAX_BODY]);
        assert_eq!(complete(&most, ANY).len, MAX_LEN);
    }

    #[test]
    fn truncated_headers_need_more_and_every_prefix_does() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n".to_vec();
        let v2 = v2(1, 0x11, &v2_inet([192, 0, 2, 7], [198, 51, 100, 1], 1, 2));
        for whole in [v1, v2] {
            for cut in 0..whole.len() {
                assert_eq!(
                    parse(&whole[..cut], ANY),
                    Ok(Parsed::Incomplete),
                    "{cut} of {whole:?}"
                );
            }
            assert!(matches!(parse(&whole, ANY), Ok(Parsed::Complete(_))));
        }
    }

    #[test]
    fn a_header_split_across_reads_is_the_same_header() {
        // As the reader does: bytes arrive in pieces; each piece is parsed
        // with what came before.
        let whole = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\ndata".to_vec();
        let mut got = Vec::new();
        let mut header = None;
        for piece in whole.chunks(5) {
            got.extend_from_slice(piece);
            match parse(&got, ANY).unwrap() {
                Parsed::Incomplete => {}
                Parsed::Complete(h) => {
                    header = Some(h);
                    break;
                }
            }
        }
        let header = header.expect("complete after all pieces");
        assert_eq!(header.source, addr("192.0.2.7:56324"));
        assert_eq!(header.len, whole.len() - 4);
    }

    #[test]
    fn anything_else_is_not_a_header_from_its_first_byte_that_differs() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"hello",
            b"PROXZ",
            b"proxy TCP4",
            b"\r\n\r\n\0\r\nQUIX",
            b"\0",
        ] {
            assert_eq!(parse(bytes, ANY), Err(HeaderError::NotProxy), "{bytes:?}");
        }
    }

    #[test]
    fn a_version_the_tenant_does_not_take_is_refused() {
        let v1 = b"PROXY UNKNOWN\r\n";
        let v2 = v2(0, 0, &[]);
        let wrong = |got, wanted| Err(HeaderError::WrongVersion { got, wanted });
        assert_eq!(
            parse(v1, ProxyVersion::V2),
            wrong(ProxyVersion::V1, ProxyVersion::V2)
        );
        // From the first byte.
        assert_eq!(
            parse(&v1[..1], ProxyVersion::V2),
            wrong(ProxyVersion::V1, ProxyVersion::V2)
        );
        assert_eq!(
            parse(&v2, ProxyVersion::V1),
            wrong(ProxyVersion::V2, ProxyVersion::V1)
        );
        assert_eq!(
            HeaderError::WrongVersion {
                got: ProxyVersion::V1,
                wanted: ProxyVersion::V2
            }
            .to_string(),
            "a PROXY protocol v1 header, but the tenant takes v2"
        );
    }
}
