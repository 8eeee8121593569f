//! Client sockets for the load generator: every connection binds a rotating
//! source address in 127.0.0.0/8 (with `IP_BIND_ADDRESS_NO_PORT`, so the port
//! is chosen at connect time per 4-tuple) to keep TIME_WAIT from exhausting
//! one address's ephemeral ports; and the file-descriptor limit.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Source addresses 127.0.0.2 ..= 127.0.0.250.
const FIRST_SOURCE: u8 = 2;
const LAST_SOURCE: u8 = 250;

static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

/// The next source address in the rotation (shared by every client thread).
pub fn next_source() -> Ipv4Addr {
    let span = usize::from(LAST_SOURCE - FIRST_SOURCE) + 1;
    let i = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % span;
    Ipv4Addr::new(127, 0, 0, FIRST_SOURCE + i as u8)
}

/// A TCP socket bound to the next source address, port left to connect().
pub fn client_socket() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(next_source(), 0)).into())?;
    Ok(socket)
}

/// A blocking connection from a rotated source address, with I/O timeouts.
pub fn connect(server: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = client_socket()?;
    socket.connect_timeout(&server.into(), timeout)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (children inherit it) and
/// returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}
