//! The wasm layer: everything that talks to wasmtime before a connection
//! exists. The engine and its epoch clock (`engine`), loading, checking,
//! compiling and linking a handler (`handler`; `http` for handlers of the
//! `wasi:http/proxy` world, `http_outgoing` for their outgoing requests), the on-disk compile cache
//! (`compile_cache`), the per-instance memory cap (`limits`) and the guest's
//! clock with sleeps capped at the connection's deadline (`guest_clock`), and
//! a tenant's outbound network grants (`outbound`).
//!
//! Nothing here knows about sockets, strategies or processes: the connection
//! layer (`conn`) builds on this one, never the other way round.

pub(crate) mod compile_cache;
pub(crate) mod direct_streams;
pub(crate) mod engine;
pub(crate) mod guest_clock;
pub(crate) mod handler;
pub(crate) mod http;
pub(crate) mod http_outgoing;
pub(crate) mod limits;
pub(crate) mod outbound;

/// An error and its causes on one line.
pub(crate) fn one_line(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
