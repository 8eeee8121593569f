//! A test-only handler whose behaviour the client picks with its first line,
//! so one component covers every guest-side scenario of the test suite:
//!
//! - `count`: bumps a global counter and replies its value (always `1` when
//!   every connection gets a fresh instance).
//! - `info`: replies the `connection-info` fields, one `key=value` a line.
//! - `random`: replies 16 bytes of `wasi:random/random` and 16 of
//!   `wasi:random/insecure`, in hex, one line each.
//! - `echo`: echoes the rest of the input, like the echo handler.
//! - `trap`: executes `unreachable`.
//! - `panic`: panics with a message (reaches the host's log through stderr).
//! - `error`: returns `Err("requested error")`.
//! - `print`: writes a line to stdout and one to stderr, replies `printed`.
//! - `return-early`: replies `bye` and returns without reading further.
//! - `hold`: replies its worker's name at once, then waits for the end of
//!   the input before returning (so a client knows the call is running).
//! - `spin`: loops forever without calling the host.
//! - `alloc`: allocates memory until the allocator aborts (a memory bomb).
//! - `alloc-try`: allocates until allocation fails, then replies how far it
//!   got (a guest that copes with the limit).
//! - `recurse`: recurses without bound.
//! - `flood N`: writes N bytes to stdout.
//! - `read-file PATH`, `env`, `connect ADDR`: try what the sandbox denies and
//!   reply what happened (also written to stderr, so it shows in the log).
//! - `write-file PATH TEXT`: writes TEXT into the file PATH (created or
//!   truncated), and replies what happened, like `read-file`.
//! - `sleep MS`: sleeps (a blocking host call), then replies `slept`.
//! - `nap MS`: replies `napping` at once, then sleeps like `sleep`.
//! - `lines N`: writes N empty lines to stdout, replies `lined N`.
//! - `exit N`: calls `wasi:cli/exit` with status N (after replying `exiting`);
//!   WASI 0.2 carries only success (0) or failure (any other N).
//! - `forge TEXT`: percent-decodes TEXT (`%0A` is a newline), writes it to
//!   stdout and to stderr, then returns it as its error: every string a
//!   guest puts in the host's log, with any bytes the client picks.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:handler/handler",
    // Generate the `wasi:io` bindings the contract uses, too.
    generate_all,
});

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use wasi::io::streams::StreamError;

static CALLS: AtomicU64 = AtomicU64::new(0);

struct TestGuest;

impl Guest for TestGuest {
    fn handle(
        info: ConnectionInfo,
        input: InputStream,
        output: OutputStream,
    ) -> Result<(), String> {
        let (line, rest) = read_line(&input)?;
        let (command, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let reply = match command {
            "count" => format!("{}", CALLS.fetch_add(1, Ordering::SeqCst) + 1),
            "info" => format!(
                "peer-address={}\nlocal-address={}\nconnection-id={}\nworker={}\ntenant={}\n",
                info.peer_address, info.local_address, info.connection_id, info.worker, info.tenant
            ),
            "random" => format!(
                "{}\n{}\n",
                hex(&wasip2::random::random::get_random_bytes(16)),
                hex(&wasip2::random::insecure::get_insecure_random_bytes(16))
            ),
            "echo" => {
                write_all(&output, &rest)?;
                loop {
                    match input.blocking_read(65536) {
                        Ok(bytes) => write_all(&output, &bytes)?,
                        Err(StreamError::Closed) => break,
                        Err(e) => return Err(format!("read failed: {e:?}")),
                    }
                }
                String::new()
            }
            "trap" => core::arch::wasm32::unreachable(),
            "panic" => panic!("the test guest was asked to panic"),
            "error" => return Err("requested error".to_string()),
            "print" => {
                println!("hello from the guest's stdout");
                eprintln!("hello from the guest's stderr");
                "printed".to_string()
            }
            "return-early" => "bye".to_string(),
            "hold" => {
                write_all(&output, format!("{}\n", info.worker).as_bytes())?;
                output
                    .blocking_flush()
                    .map_err(|e| format!("flush failed: {e:?}"))?;
                loop {
                    match input.blocking_read(65536) {
                        Ok(_) => {}
                        Err(StreamError::Closed) => break String::new(),
                        Err(e) => return Err(format!("read failed: {e:?}")),
                    }
                }
            }
            "spin" => spin(),
            "alloc" => {
                // A memory bomb: allocates until the allocator aborts.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "alloc-try" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = Vec::new();
                    if block.try_reserve_exact(1 << 20).is_err() {
                        break format!("allocation failed after {} MiB", hoard.len());
                    }
                    block.resize(1 << 20, 1);
                    hoard.push(block);
                }
            }
            "recurse" => format!("{}", recurse(0)),
            "flood" => {
                let total: usize = arg.parse().map_err(|_| format!("bad size {arg:?}"))?;
                let chunk = vec![b'x'; 64 * 1024];
                let mut out = std::io::stdout();
                let mut written = 0;
                while written < total {
                    let n = chunk.len().min(total - written);
                    if out.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    written += n;
                }
                format!("flooded {written}")
            }
            "read-file" => report(match std::fs::read(arg) {
                Ok(data) => format!(
                    "read {} bytes: {}",
                    data.len(),
                    String::from_utf8_lossy(&data)
                ),
                Err(e) => format!("denied: {e}"),
            }),
            "write-file" => {
                let (path, text) = arg.split_once(' ').unwrap_or((arg, ""));
                report(match std::fs::write(path, text) {
                    Ok(()) => format!("wrote {} bytes", text.len()),
                    Err(e) => format!("denied: {e}"),
                })
            }
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                report(format!("env: [{}]", vars.join(", ")))
            }
            "connect" => report(match std::net::TcpStream::connect(arg) {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("denied: {e}"),
            }),
            "lines" => {
                let total: usize = arg.parse().map_err(|_| format!("bad count {arg:?}"))?;
                let mut out = std::io::stdout().lock();
                for _ in 0..total {
                    if out.write_all(b"\n").is_err() {
                        break;
                    }
                }
                let _ = out.flush();
                format!("lined {total}")
            }
            "exit" => {
                let code: i32 = arg.parse().map_err(|_| format!("bad status {arg:?}"))?;
                write_all(&output, b"exiting")?;
                output
                    .blocking_flush()
                    .map_err(|e| format!("flush failed: {e:?}"))?;
                std::process::exit(code)
            }
            "nap" => {
                let ms: u64 = arg.parse().map_err(|_| format!("bad duration {arg:?}"))?;
                write_all(&output, b"napping\n")?;
                output
                    .blocking_flush()
                    .map_err(|e| format!("flush failed: {e:?}"))?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                "woke".to_string()
            }
            "sleep" => {
                let ms: u64 = arg.parse().map_err(|_| format!("bad duration {arg:?}"))?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                "slept".to_string()
            }
            "forge" => {
                let text = percent_decode(arg);
                let _ = std::io::stdout().write_all(&text);
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().write_all(&text);
                return Err(String::from_utf8_lossy(&text).into_owned());
            }
            other => return Err(format!("unknown command {other:?}")),
        };
        write_all(&output, reply.as_bytes())?;
        output
            .blocking_flush()
            .map_err(|e| format!("flush failed: {e:?}"))
    }
}

/// Writes `text` to stderr too, so the host's log shows it.
fn report(text: String) -> String {
    eprintln!("{text}");
    text
}

/// `%HH` as the byte HH; everything else as it is.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Reads up to the first `\n`; returns the line and whatever followed it.
fn read_line(input: &InputStream) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::new();
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let rest = buf.split_off(pos + 1);
            buf.pop();
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        match input.blocking_read(4096) {
            Ok(bytes) => buf.extend_from_slice(&bytes),
            Err(StreamError::Closed) => {
                return Ok((String::from_utf8_lossy(&buf).into_owned(), Vec::new()))
            }
            Err(e) => return Err(format!("read failed: {e:?}")),
        }
    }
}

fn write_all(output: &OutputStream, mut data: &[u8]) -> Result<(), String> {
    while !data.is_empty() {
        let permit = output
            .check_write()
            .map_err(|e| format!("write failed: {e:?}"))?;
        if permit == 0 {
            output.subscribe().block();
            continue;
        }
        let n = data.len().min(permit as usize);
        output
            .write(&data[..n])
            .map_err(|e| format!("write failed: {e:?}"))?;
        data = &data[n..];
    }
    Ok(())
}

#[inline(never)]
fn spin() -> String {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let pad = std::hint::black_box([depth; 16]);
    if pad[3] == u64::MAX {
        return 0;
    }
    1 + recurse(std::hint::black_box(pad[3] + 1))
}

export!(TestGuest);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
