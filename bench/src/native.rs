//! The native baseline: a std-only echo server and no WebAssembly, in one of
//! two shapes. A pool (`workers > 0`): the shape of the host's threading
//! strategy, one accept loop feeding a fixed pool of worker threads through a
//! bounded queue, one connection per worker at a time. A thread per
//! connection (`workers == 0`): Python's `ThreadingMixIn` without Python, the
//! baseline of the interactive scenario. Run as the hidden `bench
//! native-server` subcommand so it is its own process.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// The host's listen backlog (LISTEN_BACKLOG in host/src/lib.rs).
const BACKLOG: i32 = 1024;
/// The host's read chunk (CHUNK in host/src/net_stream.rs).
const CHUNK: usize = 64 * 1024;

/// Serves echo on `addr` until the process is killed: with a pool of
/// `workers` threads, or with a thread per connection if `workers` is 0.
pub fn serve(addr: SocketAddr, workers: usize) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    let listener: TcpListener = socket.into();
    if workers == 0 {
        return thread_per_connection(&listener);
    }
    // One running and one queued per worker, as the host's default bound.
    let (tx, rx) = sync_channel::<TcpStream>(workers);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..workers {
        let rx = Arc::clone(&rx);
        thread::Builder::new()
            .name(format!("native-worker-{i}"))
            .spawn(move || worker(&rx))?;
    }
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if tx.send(stream).is_err() {
                    return Ok(());
                }
            }
            Err(e) if is_transient(&e) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
}

/// Accepts forever; every connection gets a thread of its own at once.
fn thread_per_connection(listener: &TcpListener) -> io::Result<()> {
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let spawned = thread::Builder::new()
                    .name("native-conn".into())
                    .spawn(move || echo(stream, &mut vec![0u8; CHUNK]));
                // Out of threads: this connection is dropped (closed), as
                // ThreadingMixIn's failing start_new_thread would lose it.
                if let Err(e) = spawned {
                    eprintln!("cannot start a thread for a connection: {e}");
                }
            }
            Err(e) if is_transient(&e) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EMFILE | libc::ENFILE)
    )
}

fn worker(rx: &Mutex<Receiver<TcpStream>>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let next = rx.lock().map(|rx| rx.recv());
        let Ok(Ok(stream)) = next else { return };
        let _ = echo(stream, &mut buf);
    }
}

fn echo(mut stream: TcpStream, buf: &mut [u8]) -> io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let n = stream.read(buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}
