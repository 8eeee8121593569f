//! Loading a handler: read the file, check that it is a component of the
//! `host:handler/handler` world, compile it once and pre-instantiate it. Every
//! refusal is one line naming the file and what is wrong with it.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;

use anyhow::{anyhow, Context as _, Result};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::Engine;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "host:handler/handler",
        with: {
            "wasi:io/poll": wasmtime_wasi_io::bindings::wasi::io::poll,
            "wasi:io/streams": wasmtime_wasi_io::bindings::wasi::io::streams,
            "wasi:io/error": wasmtime_wasi_io::bindings::wasi::io::error,
        },
        require_store_data_send: true,
    });
}

pub use bindings::host::handler::types::ConnectionInfo;
use bindings::HandlerPre;

/// The echo handler built from `handlers/echo`, served when no handler is given.
pub static BUILTIN_ECHO: &[u8] = include_bytes!(env!("HOST_BUILTIN_ECHO_WASM"));

/// Where a handler comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerSource {
    /// The echo handler embedded in the binary.
    BuiltinEcho,
    /// A component file.
    File(PathBuf),
}

impl fmt::Display for HandlerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerSource::BuiltinEcho => f.write_str("built-in echo"),
            HandlerSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// What one connection's `Store` holds: its WASI context (only what was
/// granted), the resource table its streams live in, and its memory limiter.
/// Dropped with the store when the connection ends.
pub struct ConnState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: crate::limits::InstanceLimiter,
    /// The guest's monotonic clock.
    pub clock: crate::guest_clock::GuestClock,
    /// The connection: its deadline ends guest sleeps too.
    pub socket: std::sync::Arc<crate::net_stream::Socket>,
}

impl WasiView for ConnState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled, linked and pre-instantiated handler, ready for one fresh
/// instance per connection.
pub struct Handler {
    source: HandlerSource,
    pre: HandlerPre<ConnState>,
}

impl Handler {
    /// Reads, checks, compiles and pre-instantiates the handler.
    pub fn load(engine: &Engine, source: &HandlerSource) -> Result<Handler> {
        let bytes: Cow<'static, [u8]> = match source {
            HandlerSource::BuiltinEcho => Cow::Borrowed(BUILTIN_ECHO),
            HandlerSource::File(path) => Cow::Owned(
                std::fs::read(path)
                    .with_context(|| format!("handler {} cannot be read", path.display()))?,
            ),
        };
        check_header(&bytes).map_err(|what| anyhow!("handler {source} {what}"))?;
        let component = Component::from_binary(engine, &bytes).map_err(|e| {
            anyhow!(
                "handler {source} is not a valid component: {}",
                one_line(&e)
            )
        })?;

        let mut linker = Linker::<ConnState>::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| anyhow!("cannot link WASI: {}", one_line(&e)))?;
        crate::guest_clock::add_to_linker(&mut linker)?;
        let pre = linker.instantiate_pre(&component).map_err(|e| {
            anyhow!(
                "handler {source} needs imports the host does not provide: {}",
                one_line(&e)
            )
        })?;
        let pre = HandlerPre::new(pre).map_err(|e| {
            anyhow!(
                "handler {source} does not export `handle` of the host:handler/handler@0.1.0 world: {}",
                one_line(&e)
            )
        })?;
        Ok(Handler {
            source: source.clone(),
            pre,
        })
    }

    pub fn source(&self) -> &HandlerSource {
        &self.source
    }

    pub fn engine(&self) -> &Engine {
        self.pre.engine()
    }

    pub(crate) fn pre(&self) -> &HandlerPre<ConnState> {
        &self.pre
    }
}

/// Tells a component from a core module and from something that is not
/// WebAssembly at all, before the compiler gives a less direct message.
fn check_header(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.is_empty() {
        return Err("is empty, not a WebAssembly component");
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("is not a WebAssembly file (it does not start with the `\\0asm` header)");
    }
    match &bytes[4..8] {
        [1, 0, 0, 0] => Err("is a core module, not a component"),
        [_, _, 1, 0] => Ok(()),
        _ => Err("has an unknown WebAssembly version or layer"),
    }
}

/// An error and its causes on one line.
pub(crate) fn one_line(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::check_header;

    #[test]
    fn headers() {
        assert_eq!(
            check_header(b""),
            Err("is empty, not a WebAssembly component")
        );
        assert!(check_header(b"hello world")
            .unwrap_err()
            .contains("not a WebAssembly file"));
        assert_eq!(
            check_header(b"\0asm\x01\0\0\0"),
            Err("is a core module, not a component")
        );
        assert_eq!(check_header(b"\0asm\x0d\0\x01\0"), Ok(()));
    }
}
