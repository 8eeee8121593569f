//! Which path serves a connection: the raw world's (`Service::serve`) or,
//! for a `wasi:http/proxy` handler, HTTP's (`conn::http`). The strategies
//! call these, so the two paths never need each other.

use crate::conn::http;
use crate::conn::report::Ending;
use crate::conn::service::{Accepted, Service};
use crate::conn::socket::Waits;
use crate::wasm::http::World;

/// Serves `conn` to the end on the calling thread.
pub(crate) fn serve(service: &Service, conn: Accepted, worker: &str) -> Ending {
    match service.handler().world() {
        World::Http => http::serve_blocking(service, conn, worker),
        World::Handler => service.serve(conn, worker),
    }
}

/// Serves `conn` to the end as a task of an async runtime.
pub(crate) async fn serve_async(service: &Service, conn: Accepted, worker: &str) -> Ending {
    match service.handler().world() {
        World::Http => http::serve(service, conn, worker, Waits::Async).await,
        World::Handler => service.serve_async(conn, worker).await,
    }
}
