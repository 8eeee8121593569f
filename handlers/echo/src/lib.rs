//! The echo handler: writes back exactly the bytes it reads, until the input
//! ends, then returns. The host embeds this component as its built-in handler.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:handler/handler",
    // Generate the `wasi:io` bindings the contract uses, too.
    generate_all,
});

use wasi::io::streams::StreamError;

/// The most the handler asks for in one read.
const READ_CHUNK: u64 = 64 * 1024;

struct Echo;

impl Guest for Echo {
    fn handle(
        _info: ConnectionInfo,
        input: InputStream,
        output: OutputStream,
    ) -> Result<(), String> {
        loop {
            match input.blocking_read(READ_CHUNK) {
                Ok(bytes) => write_all(&output, &bytes)?,
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("read failed: {}", e.to_debug_string()))
                }
            }
        }
        output.blocking_flush().map_err(describe)
    }
}

/// Writes all of `data`, waiting for the stream's permission between chunks
/// (`check-write`/`write` instead of `blocking-write-and-flush`, which takes at
/// most 4,096 bytes a call and flushes each time).
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

export!(Echo);
