//! The `wasi:http/proxy` world: telling it from the host's own world by a
//! component's exports, linking it (WASI plus `wasi:http`, through
//! wasmtime-wasi-http) into a `ProxyPre` once per handler, and what one
//! request's `Store` holds. Outgoing HTTP (`wasi:http/outgoing-handler`)
//! goes out under the tenant's outbound grants (`wasm::http_outgoing`);
//! without a grant every request is refused with `HTTP-request-denied`.

use anyhow::{anyhow, Result};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::Engine;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::settings::HandlerSource;
use crate::wasm::http_outgoing::Outgoing;
use crate::wasm::limits::InstanceLimiter;
use crate::wasm::one_line;

pub(crate) use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// The two worlds a handler may be written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum World {
    /// `host:handler/handler`: `handle` per connection, raw streams.
    Handler,
    /// `wasi:http/proxy`: `wasi:http/incoming-handler`'s `handle` per
    /// request, served over HTTP/1.1.
    Http,
}

impl World {
    /// The world's name, as `host check` and the `serving` line print it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            World::Handler => "host:handler/handler",
            World::Http => "wasi:http/proxy",
        }
    }
}

/// Which world `component` is written for, by its exports: an export of
/// `wasi:http/incoming-handler` (any 0.2 version) makes it an HTTP handler;
/// anything else is judged as the host's own world.
pub(crate) fn world_of(engine: &Engine, component: &Component) -> World {
    let http = component
        .component_type()
        .exports(engine)
        .any(|(name, item)| {
            matches!(item.ty, ComponentItem::ComponentInstance(_))
                && name.starts_with("wasi:http/incoming-handler@0.2")
        });
    if http {
        World::Http
    } else {
        World::Handler
    }
}

/// What one HTTP request's `Store` holds: only what was granted, its
/// resource table, its memory limiter, and the hooks that send outgoing
/// requests under the grants. Dropped with the store when the request ends.
pub(crate) struct HttpState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: InstanceLimiter,
    pub(crate) hooks: Outgoing,
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Links `component` against WASI (async host functions: the HTTP path is
/// always awaited, on a fiber) and `wasi:http`, and pre-instantiates it.
pub(crate) fn link(
    engine: &Engine,
    source: &HandlerSource,
    component: &Component,
) -> Result<ProxyPre<HttpState>> {
    let mut linker = Linker::<HttpState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| anyhow!("cannot link WASI: {}", one_line(&e)))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| anyhow!("cannot link wasi:http: {}", one_line(&e)))?;
    let pre = linker.instantiate_pre(component).map_err(|e| {
        anyhow!(
            "handler {source} needs imports the host does not provide: {}",
            one_line(&e)
        )
    })?;
    ProxyPre::new(pre).map_err(|e| {
        anyhow!(
            "handler {source} does not export `handle` of wasi:http/incoming-handler@0.2: {}",
            one_line(&e)
        )
    })
}
