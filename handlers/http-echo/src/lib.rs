//! `wasi:http/proxy` echo: answers every request with `200`, a plain-text
//! body of the request's method and path (`GET /a?b`), its headers (one
//! `name: value` line each), a blank line and the request body as it came.
//! The header `x-instance-requests` says how many requests this instance
//! has served: always 1, as the host gives every request a fresh instance.

use std::sync::atomic::{AtomicU64, Ordering};

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Requests this instance has served (state a reused instance would keep).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// `blocking-write-and-flush` takes at most 4,096 bytes per call.
const CHUNK: usize = 4096;

struct HttpEcho;

impl wasip2::exports::http::incoming_handler::Guest for HttpEcho {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let served = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
        let mut reply = format!(
            "{} {}\n",
            method_name(&request.method()),
            request.path_with_query().unwrap_or_default()
        )
        .into_bytes();
        for (name, value) in request.headers().entries() {
            reply.extend_from_slice(name.as_bytes());
            reply.extend_from_slice(b": ");
            reply.extend_from_slice(&value);
            reply.push(b'\n');
        }
        reply.push(b'\n');
        read_body(&request, &mut reply);

        let headers = Fields::from_list(&[
            ("content-type".to_string(), b"text/plain".to_vec()),
            (
                "content-length".to_string(),
                reply.len().to_string().into_bytes(),
            ),
            (
                "x-instance-requests".to_string(),
                served.to_string().into_bytes(),
            ),
        ])
        .expect("valid headers");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("the body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let Ok(out) = body.write() else { return };
        // A HEAD request's body is dropped by the server: writes then fail,
        // which ends the reply, not the instance.
        for chunk in reply.chunks(CHUNK) {
            if out.blocking_write_and_flush(chunk).is_err() {
                return;
            }
        }
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

/// Appends the request body, whole, to `reply`.
fn read_body(request: &IncomingRequest, reply: &mut Vec<u8>) {
    let Ok(body) = request.consume() else { return };
    if let Ok(stream) = body.stream() {
        // Ends with `closed` at the end of the body.
        while let Ok(chunk) = stream.blocking_read(64 * 1024) {
            reply.extend_from_slice(&chunk);
        }
    }
    let _ = IncomingBody::finish(body);
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}

wasip2::http::proxy::export!(HttpEcho);
