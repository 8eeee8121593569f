//! A minimal HTTP/1.1 responder over the raw connection: reads the request
//! head (up to the blank line), answers `200 OK` with `Hello, world!` and
//! `Connection: close`, and returns, so the host closes the connection. For
//! comparing per-connection cost with HTTP servers such as `wasmtime serve`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:handler/handler",
    // Generate the `wasi:io` bindings the contract uses, too.
    generate_all,
});

use wasi::io::streams::StreamError;

/// The most request head the handler reads before it answers 431.
const MAX_HEAD: usize = 16 * 1024;
const BODY: &str = "Hello, world!\n";

struct HttpHello;

impl Guest for HttpHello {
    fn handle(
        _info: ConnectionInfo,
        input: InputStream,
        output: OutputStream,
    ) -> Result<(), String> {
        let mut head = Vec::new();
        let complete = loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                break true;
            }
            if head.len() > MAX_HEAD {
                break false;
            }
            match input.blocking_read(4096) {
                Ok(bytes) => head.extend_from_slice(&bytes),
                Err(StreamError::Closed) => break false,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("read failed: {}", e.to_debug_string()))
                }
            }
        };
        let response = if !complete {
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        } else if head.starts_with(b"GET ") || head.starts_with(b"HEAD ") {
            let body = if head.starts_with(b"HEAD ") { "" } else { BODY };
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                BODY.len()
            )
        } else {
            "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        };
        // The response is far below `blocking-write-and-flush`'s 4,096 bytes.
        output
            .blocking_write_and_flush(response.as_bytes())
            .map_err(|e| format!("write failed: {e:?}"))
    }
}

export!(HttpHello);
