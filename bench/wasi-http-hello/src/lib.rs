//! `wasi:http/proxy` hello: every request gets `200`, `Content-Type:
//! text/plain` and the body `Hello, world!\n`, the bytes
//! handlers/http-hello writes, so that `wasmtime serve` running this and
//! `host serve` running that send the same response.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// handlers/http-hello's `BODY`.
const BODY: &[u8] = b"Hello, world!\n";

struct HttpHello;

impl wasip2::exports::http::incoming_handler::Guest for HttpHello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        // With a Content-Length the server sends the body as is, not chunked.
        let headers = Fields::from_list(&[
            ("content-type".to_string(), b"text/plain".to_vec()),
            (
                "content-length".to_string(),
                BODY.len().to_string().into_bytes(),
            ),
        ])
        .expect("valid headers");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("the body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().expect("the stream is taken once");
        // Far below `blocking-write-and-flush`'s 4,096 bytes.
        out.blocking_write_and_flush(BODY).expect("write the body");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish the body");
    }
}

wasip2::http::proxy::export!(HttpHello);
