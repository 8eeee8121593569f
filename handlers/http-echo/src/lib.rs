//! `wasi:http/proxy` echo: answers every request with `200`, a plain-text
//! body of the request's method and path (`GET /a?b`), its headers (one
//! `name: value` line each), a blank line and the request body as it came.
//! The header `x-instance-requests` says how many requests this instance
//! has served: always 1, as the host gives every request a fresh instance.
//!
//! A request with an `x-fetch: http://HOST:PORT/PATH` header is answered
//! instead with what a `GET` of that URL through `wasi:http/outgoing-handler`
//! came to: `200` and `fetched STATUS` plus the upstream's body, or `502`
//! and `fetch failed: ERROR` (`HTTP-request-denied` when the host refuses).

use std::sync::atomic::{AtomicU64, Ordering};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};

/// Requests this instance has served (state a reused instance would keep).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// `blocking-write-and-flush` takes at most 4,096 bytes per call.
const CHUNK: usize = 4096;

struct HttpEcho;

impl wasip2::exports::http::incoming_handler::Guest for HttpEcho {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let served = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(url) = request.headers().get("x-fetch").into_iter().next() {
            let url = String::from_utf8_lossy(&url).into_owned();
            let (status, reply) = match fetch(&url) {
                Ok((status, body)) => (
                    200,
                    [format!("fetched {status}\n").into_bytes(), body].concat(),
                ),
                Err(why) => (502, format!("fetch failed: {why}\n").into_bytes()),
            };
            return respond(response_out, status, served, &reply);
        }
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

        respond(response_out, 200, served, &reply);
    }
}

/// Sends `reply` as the response, with `status`.
fn respond(response_out: ResponseOutparam, status: u16, served: u64, reply: &[u8]) {
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
    let _ = response.set_status_code(status);
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

/// `GET url` (`http://AUTHORITY/PATH`) through the host; the status and
/// body, or what went wrong.
fn fetch(url: &str) -> Result<(u16, Vec<u8>), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {url}"))?;
    // The path may be only a query (`http://host?q=1`).
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    let set = request.set_scheme(Some(&Scheme::Http)).is_ok()
        && request.set_authority(Some(authority)).is_ok()
        && request.set_path_with_query(Some(path)).is_ok();
    if !set {
        return Err(format!("not a valid URL: {url}"));
    }
    let body = request.body().map_err(|_| "no request body".to_string())?;
    let future = outgoing_handler::handle(request, None).map_err(|e| describe(&e))?;
    OutgoingBody::finish(body, None).map_err(|e| describe(&e))?;
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(describe(&e)),
        _ => return Err("no response".to_string()),
    };
    let status = response.status();
    let mut fetched = Vec::new();
    if let Ok(body) = response.consume() {
        if let Ok(stream) = body.stream() {
            while let Ok(chunk) = stream.blocking_read(64 * 1024) {
                fetched.extend_from_slice(&chunk);
            }
        }
    }
    Ok((status, fetched))
}

/// An error code as the WIT names it (`HTTP-request-denied`), with its
/// payload if any.
fn describe(error: &ErrorCode) -> String {
    match error {
        ErrorCode::HttpRequestDenied => "HTTP-request-denied".to_string(),
        other => format!("{other:?}"),
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
