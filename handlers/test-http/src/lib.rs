//! Test-only `wasi:http/proxy` guest that misbehaves on request: `/trap`
//! panics (a trap) before answering, `/spin` loops forever without host
//! calls (stopped only by the epoch at `--timeout`), `/silent` returns
//! without answering; any other path gets `200 ok`.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct TestHttp;

impl wasip2::exports::http::incoming_handler::Guest for TestHttp {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        match request.path_with_query().as_deref() {
            Some("/trap") => panic!("asked to trap"),
            Some("/spin") => spin(),
            Some("/silent") => return,
            _ => {}
        }
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("the body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().expect("the stream is taken once");
        let _ = out.blocking_write_and_flush(b"ok\n");
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

/// Runs until the host stops it.
fn spin() {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

wasip2::http::proxy::export!(TestHttp);
