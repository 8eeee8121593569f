//! `host check` for a `wasi:http/proxy` handler: its `wasi:http` imports in
//! words and its verdict, once it is linked as `serve` links it.

use anyhow::Result;
use wasmtime::Engine;

use crate::wasm::handler::HandlerSource;
use crate::wasm::http::World;

/// What the host does with one of a handler's imports (either world).
#[derive(PartialEq, Eq)]
pub(crate) enum ImportVerdict {
    Granted,
    Denied,
    Missing,
}

/// `host check`'s end for a `wasi:http/proxy` handler: linked as `serve`
/// links it. Its timings and `--run`'s scenarios are the raw world's
/// (connections of echo bytes), so they are not run: serve it and ask it
/// with any HTTP client.
pub(crate) fn check_http(
    engine: &Engine,
    source: &HandlerSource,
    component: &wasmtime::component::Component,
    bytes: &[u8],
    unavailable: &[String],
    run: bool,
    verdict: &dyn Fn(bool, &str) -> bool,
) -> Result<bool> {
    println!("world:       {}", World::Http.name());
    if let Err(e) = crate::wasm::http::link(engine, source, component) {
        let why = if unavailable.is_empty() {
            format!("{e:#}")
        } else {
            format!(
                "it imports {}, which the host does not provide",
                unavailable.join(", ")
            )
        };
        return Ok(verdict(false, &why));
    }
    let digest = crate::wasm::compile_cache::digest(bytes);
    println!("handle:      exported by wasi:http/incoming-handler (sha256 {digest})");
    println!("served as:   HTTP/1.1 with keep-alive, a fresh instance per request");
    if run {
        println!("run:         the conformance scenarios are for host:handler/handler; skipped");
    }
    Ok(verdict(true, ""))
}

/// What the host does with a `wasi:http` import of an HTTP handler.
pub(crate) fn classify_import(name: &str) -> (ImportVerdict, &'static str) {
    let interface = name.split('@').next().unwrap_or(name);
    match interface {
        "wasi:http/outgoing-handler" => (
            ImportVerdict::Granted,
            "plain http:// to what allow-outbound grants; anything else fails (HTTP-request-denied)",
        ),
        _ => (ImportVerdict::Granted, "provided"),
    }
}
