//! The accept queue of a listening TCP socket on this machine: how many
//! connections the kernel has established that the server has not accepted
//! yet, and the backlog that bounds them (what `ss -lt` shows as Recv-Q and
//! Send-Q of a listener), read with a sock_diag netlink dump of the IPv4
//! listening sockets. The interactive scenario paces its connects with it, so
//! that a burst of clients waits in the client rather than overflowing the
//! server's backlog (an overflow drops the SYN and costs the client a
//! retransmission a second later).

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `NETLINK_SOCK_DIAG` (linux/netlink.h).
const NETLINK_SOCK_DIAG: libc::c_int = 4;
/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
/// `TCP_LISTEN` in the kernel's TCP state numbering.
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// `struct inet_diag_req_v2`.
const REQUEST: usize = 56;
/// `struct inet_diag_msg`, as far as `idiag_wqueue`.
const MESSAGE: usize = 64;
/// Most dumps hold fewer than 100 listeners of 72+ bytes each.
const BUFFER: usize = 32 * 1024;
/// Messages received per dump at most (a bound; a dump ends with DONE).
const MAX_RECVS: usize = 64;

/// A listener's queue at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Depth {
    /// Established, not yet accepted.
    pub queued: u32,
    /// The listener's backlog (its `listen()` argument, capped by somaxconn).
    pub backlog: u32,
}

/// Reads the accept queue of the IPv4 listener at one address.
pub struct AcceptQueue {
    socket: OwnedFd,
    listener: SocketAddrV4,
    buf: Vec<u8>,
    seq: u32,
}

impl AcceptQueue {
    /// For the listener at `listener` (IPv4 only).
    pub fn new(listener: SocketAddr) -> io::Result<AcceptQueue> {
        let SocketAddr::V4(listener) = listener else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only IPv4 listeners",
            ));
        };
        // SAFETY: socket(2) returns a new descriptor or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a freshly created descriptor we own.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // A dump that never ends must not hang the client: 1 s per recv.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a pointer to a timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AcceptQueue {
            socket,
            listener,
            buf: vec![0; BUFFER],
            seq: 0,
        })
    }

    /// The listener's queue now; `None` if no such listener exists.
    pub fn depth(&mut self) -> io::Result<Option<Depth>> {
        self.seq = self.seq.wrapping_add(1);
        self.send_request()?;
        let mut found = None;
        for _ in 0..MAX_RECVS {
            // SAFETY: a valid socket and a buffer of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let (depth, done) = self.parse(n as usize)?;
            found = found.or(depth);
            if done {
                return Ok(found);
            }
        }
        Err(io::Error::other("sock_diag dump did not end"))
    }

    /// One dump request for every IPv4 TCP listener.
    fn send_request(&self) -> io::Result<()> {
        let mut msg = [0u8; HEADER + REQUEST];
        msg[0..4].copy_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // inet_diag_req_v2: family, protocol, ext, pad, states; the socket id
        // (left zero) is not a filter in a dump.
        msg[HEADER] = libc::AF_INET as u8;
        msg[HEADER + 1] = libc::IPPROTO_TCP as u8;
        msg[HEADER + 4..HEADER + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        // SAFETY: an all-zero sockaddr_nl is valid; the kernel is pid 0.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: a valid socket, message and address of the given sizes.
        let n = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Walks the messages of one datagram: our listener's depth if among
    /// them, and whether the dump is done.
    fn parse(&self, len: usize) -> io::Result<(Option<Depth>, bool)> {
        let buf = &self.buf[..len];
        let u16_at = |at: usize| u16::from_ne_bytes([buf[at], buf[at + 1]]);
        let u32_at = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
        let mut found = None;
        let mut at = 0;
        while at + HEADER <= len {
            let size = u32_at(at) as usize;
            if size < HEADER || at + size > len {
                return Err(io::Error::other("malformed sock_diag reply"));
            }
            match u16_at(at + 4) {
                NLMSG_DONE => return Ok((found, true)),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the dump")),
                SOCK_DIAG_BY_FAMILY if size >= HEADER + MESSAGE => {
                    let msg = at + HEADER;
                    // idiag_sport (big-endian) and the first word of
                    // idiag_src (the address, in network order).
                    let port = u16::from_be_bytes([buf[msg + 4], buf[msg + 5]]);
                    let ip = [buf[msg + 8], buf[msg + 9], buf[msg + 10], buf[msg + 11]];
                    if port == self.listener.port() && ip == self.listener.ip().octets() {
                        found = Some(Depth {
                            queued: u32_at(msg + 56),
                            backlog: u32_at(msg + 60),
                        });
                    }
                }
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            at += (size + 3) & !3;
        }
        Ok((found, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn counts_connections_not_yet_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queue = AcceptQueue::new(addr).unwrap();
        let before = queue.depth().unwrap().expect("the listener is found");
        assert_eq!(before.queued, 0);
        assert!(before.backlog > 0);
        let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(queue.depth().unwrap().unwrap().queued, 3);
        let (_accepted, _) = listener.accept().unwrap();
        assert_eq!(queue.depth().unwrap().unwrap().queued, 2);
        drop(clients);
    }

    #[test]
    fn no_such_listener() {
        // A TCP socket bound but not listening holds its port: no listener
        // can have it, so the dump has none.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut queue = AcceptQueue::new(addr).unwrap();
        assert!(queue.depth().unwrap().is_none());
    }
}
