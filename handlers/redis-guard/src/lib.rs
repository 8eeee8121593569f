//! redis-guard: a Redis protocol (RESP) guard. Per client connection it opens
//! one connection to the Redis named by `UPSTREAM` (std's `TcpStream`, which
//! on wasm32-wasip2 goes through `wasi:sockets`: the host must grant it with
//! `--allow-outbound`), relays every command and reply, and answers the
//! commands on the deny list (`DENY`, default `FLUSHALL FLUSHDB CONFIG
//! SHUTDOWN DEBUG KEYS`) with an error without forwarding them. Pipelined
//! commands are relayed in batches and their replies, with the guard's own
//! errors in between, reach the client in order. An unreachable upstream
//! makes every command an error reply, never a hang.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:handler/handler",
    generate_all,
});

mod resp;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;

use resp::Parsed;
use wasi::io::streams::StreamError;

/// The deny list when `DENY` is not set.
const DEFAULT_DENY: &str = "FLUSHALL FLUSHDB CONFIG SHUTDOWN DEBUG KEYS";
/// Commands that make the server send replies nobody asked for: not relayed.
const UNSUPPORTED: [&str; 4] = ["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"];
/// The most the guard reads from the client at once.
const READ_CHUNK: u64 = 64 * 1024;
/// Commands are sent upstream in batches of about this many bytes; the
/// replies to one batch are relayed before the next is sent.
const BATCH: usize = 64 * 1024;

struct Guard;

/// What answers one of the client's commands, in order.
enum Answer {
    /// The upstream's next reply.
    Upstream,
    /// The guard's own reply.
    Own(Vec<u8>),
}

struct Relay {
    deny: Vec<String>,
    upstream_name: String,
    /// The connection to Redis, or why there is none.
    upstream: Result<TcpStream, String>,
    /// Bytes from the upstream not yet relayed.
    from_upstream: Vec<u8>,
    /// Commands to send upstream.
    to_upstream: Vec<u8>,
    answers: VecDeque<Answer>,
    /// Replies for the client.
    out: Vec<u8>,
}

impl Guest for Guard {
    fn handle(
        _info: ConnectionInfo,
        input: InputStream,
        output: OutputStream,
    ) -> Result<(), String> {
        let deny = std::env::var("DENY")
            .unwrap_or_else(|_| DEFAULT_DENY.to_string())
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|word| !word.is_empty())
            .map(str::to_ascii_uppercase)
            .collect();
        let (upstream_name, upstream) = match std::env::var("UPSTREAM") {
            Ok(name) => {
                let connected = TcpStream::connect(name.as_str())
                    .map_err(|e| format!("upstream {name} unreachable: {e}"));
                (name, connected)
            }
            Err(_) => (String::new(), Err("no UPSTREAM is set".to_string())),
        };
        if let Err(why) = &upstream {
            eprintln!("{why}");
        }
        let mut relay = Relay {
            deny,
            upstream_name,
            upstream,
            from_upstream: Vec::new(),
            to_upstream: Vec::new(),
            answers: VecDeque::new(),
            out: Vec::new(),
        };
        let mut from_client = Vec::new();
        loop {
            match input.blocking_read(READ_CHUNK) {
                Ok(bytes) => from_client.extend_from_slice(&bytes),
                Err(StreamError::Closed) => return Ok(()),
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("read failed: {}", e.to_debug_string()))
                }
            }
            let mut used = 0;
            let mut protocol_error = None;
            loop {
                match resp::command(&from_client[used..]) {
                    Parsed::Incomplete => break,
                    Parsed::Invalid(why) => {
                        protocol_error = Some(why);
                        break;
                    }
                    Parsed::Complete(None, n) => used += n,
                    Parsed::Complete(Some(name), n) => {
                        relay.take(&name, &from_client[used..used + n]);
                        used += n;
                        if relay.to_upstream.len() >= BATCH {
                            relay.round();
                        }
                    }
                }
            }
            from_client.drain(..used);
            relay.round();
            if let Some(why) = protocol_error {
                // As Redis does: say why, then close.
                let error = format!("-ERR Protocol error: {why}\r\n");
                relay.out.extend_from_slice(error.as_bytes());
            }
            write_all(&output, &relay.out)?;
            relay.out.clear();
            output.blocking_flush().map_err(describe)?;
            if protocol_error.is_some() {
                return Ok(());
            }
        }
    }
}

impl Relay {
    /// One whole command named `name`: refused, or queued for the upstream.
    fn take(&mut self, name: &str, command: &[u8]) {
        if self.deny.iter().any(|denied| denied == name) {
            let error = format!("-ERR redis-guard: {name} is not allowed\r\n");
            self.answers.push_back(Answer::Own(error.into_bytes()));
        } else if UNSUPPORTED.contains(&name) {
            let error = format!("-ERR redis-guard: {name} is not supported through the guard\r\n");
            self.answers.push_back(Answer::Own(error.into_bytes()));
        } else if let Err(why) = &self.upstream {
            let error = format!("-ERR redis-guard: {why}\r\n");
            self.answers.push_back(Answer::Own(error.into_bytes()));
        } else {
            self.to_upstream.extend_from_slice(command);
            self.answers.push_back(Answer::Upstream);
        }
    }

    /// Sends the queued commands upstream and collects every answer owed,
    /// in order, into `out`.
    fn round(&mut self) {
        if !self.to_upstream.is_empty() {
            let sent = match &mut self.upstream {
                Ok(stream) => stream
                    .write_all(&self.to_upstream)
                    .map_err(|e| e.to_string()),
                Err(why) => Err(why.clone()),
            };
            self.to_upstream.clear();
            if let Err(why) = sent {
                self.lost(format!("upstream {} failed: {why}", self.upstream_name));
            }
        }
        while let Some(answer) = self.answers.pop_front() {
            match answer {
                Answer::Own(bytes) => self.out.extend_from_slice(&bytes),
                Answer::Upstream => {
                    if let Err(why) = self.relay_one() {
                        self.lost(why);
                        let error = format!("-ERR redis-guard: {}\r\n", self.lost_reason());
                        self.out.extend_from_slice(error.as_bytes());
                    }
                }
            }
        }
    }

    /// Relays the upstream's next reply (and any push before it).
    fn relay_one(&mut self) -> Result<(), String> {
        loop {
            match resp::reply(&self.from_upstream) {
                Parsed::Complete(answers, n) => {
                    self.out.extend_from_slice(&self.from_upstream[..n]);
                    self.from_upstream.drain(..n);
                    if answers {
                        return Ok(());
                    }
                }
                Parsed::Invalid(why) => {
                    return Err(format!(
                        "upstream {} sent no RESP: {why}",
                        self.upstream_name
                    ))
                }
                Parsed::Incomplete => {
                    let Ok(stream) = &mut self.upstream else {
                        return Err(self.lost_reason());
                    };
                    let mut buf = [0u8; 16 * 1024];
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            return Err(format!(
                                "upstream {} closed the connection",
                                self.upstream_name
                            ))
                        }
                        Ok(n) => self.from_upstream.extend_from_slice(&buf[..n]),
                        Err(e) => {
                            return Err(format!("upstream {} failed: {e}", self.upstream_name))
                        }
                    }
                }
            }
        }
    }

    /// The upstream is gone: every later command gets an error saying why.
    fn lost(&mut self, why: String) {
        if self.upstream.is_ok() {
            eprintln!("{why}");
            self.upstream = Err(why);
        }
    }

    fn lost_reason(&self) -> String {
        match &self.upstream {
            Err(why) => why.clone(),
            Ok(_) => "upstream failed".to_string(),
        }
    }
}

/// Writes all of `data`, waiting for the stream's permission between chunks.
fn write_all(output: &OutputStream, mut data: &[u8]) -> Result<(), String> {
    while !data.is_empty() {
        let permit = output.check_write().map_err(describe)?;
        if permit == 0 {
            output.subscribe().block();
            continue;
        }
        let n = data
            .len()
            .min(usize::try_from(permit).unwrap_or(usize::MAX));
        output.write(&data[..n]).map_err(describe)?;
        data = &data[n..];
    }
    Ok(())
}

fn describe(e: StreamError) -> String {
    match e {
        StreamError::Closed => "the client closed the connection".to_string(),
        StreamError::LastOperationFailed(e) => format!("write failed: {}", e.to_debug_string()),
    }
}

export!(Guard);
