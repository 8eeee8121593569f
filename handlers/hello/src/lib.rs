//! The hello handler, the seed's `handle()`: reads one chunk of up to 1,024
//! bytes and replies `{worker}: {data}`, so a client sees which thread or
//! process served it.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:handler/handler",
    // Generate the `wasi:io` bindings the contract uses, too.
    generate_all,
});

use wasi::io::streams::StreamError;

struct Hello;

impl Guest for Hello {
    fn handle(
        info: ConnectionInfo,
        input: InputStream,
        output: OutputStream,
    ) -> Result<(), String> {
        let data = match input.blocking_read(1024) {
            Ok(bytes) => bytes,
            Err(StreamError::Closed) => Vec::new(),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(format!("read failed: {}", e.to_debug_string()))
            }
        };
        let mut reply = format!("{}: ", info.worker).into_bytes();
        reply.extend_from_slice(&data);
        // `blocking-write-and-flush` takes at most 4,096 bytes; the reply is
        // at most 1,024 bytes plus the worker's name.
        output
            .blocking_write_and_flush(&reply)
            .map_err(|e| format!("write failed: {e:?}"))
    }
}

export!(Hello);
