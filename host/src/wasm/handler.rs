//! Loading a handler: read the file, check that it is a component of the
//! `host:handler/handler` world (or of `wasi:http/proxy`, `wasm::http`),
//! compile it once and pre-instantiate it. Every refusal is one line naming
//! the file and what is wrong with it.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Precompiled};

use crate::wasm::compile_cache::CompileCache;
use crate::wasm::direct_streams::DirectState;
use crate::wasm::guest_clock::{Deadline, GuestClock, SleepState};
use crate::wasm::http::{world_of, HttpState, ProxyPre, World};
use crate::wasm::one_line;
use crate::wasm::outbound::{Network, NetworkState};
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

/// The same world for the async strategy: `handle` is called with
/// `call_async` on a fiber, and WASI is linked with its async host functions.
mod bindings_async {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "host:handler/handler",
        with: {
            "wasi:io/poll": wasmtime_wasi_io::bindings::wasi::io::poll,
            "wasi:io/streams": wasmtime_wasi_io::bindings::wasi::io::streams,
            "wasi:io/error": wasmtime_wasi_io::bindings::wasi::io::error,
            "host:handler/types": super::bindings::host::handler::types,
        },
        exports: { default: async },
        require_store_data_send: true,
    });
}

pub(crate) use bindings::host::handler::types::ConnectionInfo;
pub(crate) use bindings::Handler as HandlerInstance;
pub(crate) use bindings::HandlerPre;
pub(crate) use bindings_async::HandlerPre as HandlerPreAsync;

/// The echo handler built from `handlers/echo`, served when no handler is given.
pub(crate) static BUILTIN_ECHO: &[u8] = include_bytes!(env!("HOST_BUILTIN_ECHO_WASM"));

pub(crate) use crate::settings::HandlerSource;

/// What one connection's `Store` holds: its WASI context (only what was
/// granted), the resource table its streams live in, and its memory limiter.
/// Dropped with the store when the connection ends.
pub(crate) struct ConnState {
    /// `None` only in a forking worker's spare instance, whose guest never
    /// runs there (`conn::store::Spare`): a child sets it before the call.
    pub(crate) wasi: Option<WasiCtx>,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: crate::wasm::limits::InstanceLimiter,
    /// The guest's monotonic clock.
    pub(crate) clock: GuestClock,
    /// The connection: its deadline ends guest sleeps too.
    pub(crate) connection: Arc<dyn Deadline>,
    /// The outbound network the tenant grants (perhaps none).
    pub(crate) network: Arc<Network>,
    /// Every stream the guest can have waits on the calling thread, so its
    /// blocking calls need no tokio runtime (`wasm::direct_streams`).
    pub(crate) direct_streams: bool,
}

impl DirectState for ConnState {
    fn streams(&mut self) -> (bool, &mut ResourceTable) {
        (self.direct_streams, &mut self.table)
    }
}

impl NetworkState for ConnState {
    fn network(&self) -> &Arc<Network> {
        &self.network
    }

    fn connection(&self) -> &Arc<dyn Deadline> {
        &self.connection
    }

    fn poll_table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl SleepState for ConnState {
    fn clock(&self) -> &GuestClock {
        &self.clock
    }

    fn deadline(&self) -> &Arc<dyn Deadline> {
        &self.connection
    }

    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl WasiView for ConnState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self
                .wasi
                .as_mut()
                .expect("a store's WASI context is set before its guest runs"),
            table: &mut self.table,
        }
    }
}

/// A compiled, linked and pre-instantiated handler, ready for one fresh
/// instance per connection.
pub(crate) struct Handler {
    digest: String,
    /// The engine it was compiled for.
    engine: Engine,
    /// The `host:handler/handler` world's (`None`: an HTTP handler).
    pre: Option<HandlerPre<ConnState>>,
    /// Linked with WASI's async host functions, for the async strategy.
    pre_async: Option<HandlerPreAsync<ConnState>>,
    /// The `wasi:http/proxy` world's, for every strategy.
    http: Option<ProxyPre<HttpState>>,
    /// Instantiating it runs no guest code (no start function anywhere in
    /// it), so an instance made ahead of its connection is the same as one
    /// made for it ([`Handler::instantiates_inertly`]).
    inert: bool,
}

/// How a handler may be loaded.
#[derive(Default)]
pub(crate) struct LoadOptions {
    /// Where compiled handlers are kept between runs, if anywhere.
    pub(crate) cache: Option<CompileCache>,
    /// Whether a precompiled (`host compile`) file may be served.
    pub(crate) allow_precompiled: bool,
    /// Also link it for the async strategy.
    pub(crate) for_async: bool,
}

/// Links `component` against everything the host provides (all of WASI
/// 0.2, granting nothing by itself) and checks its `handle` export.
pub(crate) fn link(
    engine: &Engine,
    source: &HandlerSource,
    component: &Component,
) -> Result<HandlerPre<ConnState>> {
    let pre = instantiate_pre(
        engine,
        source,
        component,
        wasmtime_wasi::p2::add_to_linker_sync,
        true,
    )?;
    HandlerPre::new(pre).map_err(|e| not_a_handler(source, &e))
}

/// [`link`] with WASI's async host functions, for `call_async` on a fiber.
fn link_async(
    engine: &Engine,
    source: &HandlerSource,
    component: &Component,
) -> Result<HandlerPreAsync<ConnState>> {
    let pre = instantiate_pre(
        engine,
        source,
        component,
        wasmtime_wasi::p2::add_to_linker_async,
        false,
    )?;
    HandlerPreAsync::new(pre).map_err(|e| not_a_handler(source, &e))
}

/// `component` pre-instantiated with WASI as `add_wasi` links it, and the
/// guest clock's capped sleeps.
fn instantiate_pre(
    engine: &Engine,
    source: &HandlerSource,
    component: &Component,
    add_wasi: fn(&mut Linker<ConnState>) -> wasmtime::Result<()>,
    blocking: bool,
) -> Result<wasmtime::component::InstancePre<ConnState>> {
    let mut linker = Linker::<ConnState>::new(engine);
    add_wasi(&mut linker).map_err(|e| anyhow!("cannot link WASI: {}", one_line(&e)))?;
    crate::wasm::guest_clock::add_to_linker(&mut linker)?;
    crate::wasm::outbound::add_to_linker(&mut linker, blocking)?;
    if blocking {
        crate::wasm::direct_streams::add_to_linker(&mut linker)?;
    }
    linker.instantiate_pre(component).map_err(|e| {
        anyhow!(
            "handler {source} needs imports the host does not provide: {}",
            one_line(&e)
        )
    })
}

fn not_a_handler(source: &HandlerSource, e: &wasmtime::Error) -> anyhow::Error {
    anyhow!(
        "handler {source} does not export `handle` of the host:handler/handler@0.1.0 world: {}",
        one_line(e)
    )
}

/// The largest handler file the host reads: far beyond any real component
/// (wasmtime's own are a few MiB), and a bound on what a mistaken path such
/// as `/dev/zero` or a huge file can cost the host process.
pub(crate) const MAX_HANDLER_SIZE: u64 = 512 << 20;

/// The handler's bytes.
pub(crate) fn read(source: &HandlerSource) -> Result<Cow<'static, [u8]>> {
    Ok(match source {
        HandlerSource::BuiltinEcho => Cow::Borrowed(BUILTIN_ECHO),
        HandlerSource::File(path) => Cow::Owned(read_file(path)?),
    })
}

/// Reads a handler file: a regular file of at most [`MAX_HANDLER_SIZE`]
/// bytes, and nothing else. A FIFO, a device or a socket is refused before
/// it is opened, and the open does not block (`O_NONBLOCK`) in case the path
/// was swapped meanwhile: what was opened is checked again (`fstat`), so
/// neither `config check` nor a reload can hang in an open or a read, or
/// read without end.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cannot_read = || format!("handler {} cannot be read", path.display());
    let check = |meta: &std::fs::Metadata| -> Result<()> {
        if !meta.is_file() {
            bail!(
                "handler {} is {}, not a regular file",
                path.display(),
                file_kind(meta)
            );
        }
        if meta.len() > MAX_HANDLER_SIZE {
            bail!(
                "handler {} is {} bytes, more than the {} bytes (512 MiB) a handler may have",
                path.display(),
                meta.len(),
                MAX_HANDLER_SIZE
            );
        }
        Ok(())
    };
    check(&std::fs::metadata(path).with_context(cannot_read)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(cannot_read)?;
    let meta = file.metadata().with_context(cannot_read)?;
    check(&meta)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte more than the limit: a file that grew past it is refused too.
    file.take(MAX_HANDLER_SIZE + 1)
        .read_to_end(&mut bytes)
        .with_context(cannot_read)?;
    if bytes.len() as u64 > MAX_HANDLER_SIZE {
        bail!(
            "handler {} grew past the {} bytes (512 MiB) a handler may have while it was read",
            path.display(),
            MAX_HANDLER_SIZE
        );
    }
    Ok(bytes)
}

/// What a file that is not a regular file is, for an error message.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a named pipe (FIFO)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Compiles a component, and stores the result in `cache` if there is one.
pub(crate) fn compile(
    engine: &Engine,
    source: &HandlerSource,
    bytes: &[u8],
    cache: Option<(&CompileCache, &str)>,
) -> Result<Component> {
    let started = Instant::now();
    let component = Component::from_binary(engine, bytes).map_err(|e| {
        anyhow!(
            "handler {source} is not a valid component: {}",
            one_line(&e)
        )
    })?;
    let took = started.elapsed();
    match cache.map(|(c, digest)| (c, c.store(engine, digest, &component))) {
        Some((_, Ok(path))) => tracing::info!(
            "compiled handler {source} in {took:.2?}; cached as {}",
            path.display()
        ),
        Some((cache, Err(e))) => tracing::warn!(
            "compiled handler {source} in {took:.2?}, but cannot cache it in {}: {e:#}",
            cache.dir().display()
        ),
        None => tracing::info!("compiled handler {source} in {took:.2?} (no compile cache)"),
    }
    Ok(component)
}

/// Loads a file made by `host compile`: trusted native code, so only when
/// the user asked for it.
fn load_precompiled(
    engine: &Engine,
    source: &HandlerSource,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<Component> {
    if !options.allow_precompiled {
        bail!(
            "handler {source} is precompiled native code; it runs unchecked, so serve it only if you trust it, with --allow-precompiled"
        );
    }
    // SAFETY: the user vouched for this file with --allow-precompiled; wasmtime
    // still checks that it was compiled for this engine's settings.
    unsafe { Component::deserialize(engine, bytes) }.map_err(|e| {
        anyhow!(
            "handler {source} cannot be loaded: {} (compile it again with `host compile` of this version, with the same --strategy)",
            one_line(&e)
        )
    })
}

/// `host compile`: the handler's compiled form for `engine`.
pub(crate) fn precompile(engine: &Engine, source: &HandlerSource) -> Result<Vec<u8>> {
    let bytes = read(source)?;
    if Engine::detect_precompiled(&bytes).is_some() {
        bail!("handler {source} is already precompiled");
    }
    check_header(&bytes).map_err(|what| anyhow!("handler {source} {what}"))?;
    let component = compile(engine, source, &bytes, None)?;
    component
        .serialize()
        .map_err(|e| anyhow!("cannot serialize {source}: {}", one_line(&e)))
}

impl Handler {
    /// Reads, checks, compiles (or loads from the compile cache) and
    /// pre-instantiates the handler.
    pub(crate) fn load(
        engine: &Engine,
        source: &HandlerSource,
        options: &LoadOptions,
    ) -> Result<Handler> {
        let bytes = read(source)?;
        let digest = crate::wasm::compile_cache::digest(&bytes);
        let precompiled = Engine::detect_precompiled(&bytes);
        // A precompiled file's sections are native code: not known inert.
        let inert = precompiled.is_none() && runs_no_code_at_start(&bytes);
        let component = match precompiled {
            Some(Precompiled::Component) => load_precompiled(engine, source, &bytes, options)?,
            Some(Precompiled::Module) => {
                bail!("handler {source} is a precompiled core module, not a component")
            }
            None => {
                check_header(&bytes).map_err(|what| anyhow!("handler {source} {what}"))?;
                let cache = options.cache.as_ref().map(|c| (c, digest.as_str()));
                match cache.and_then(|(c, digest)| c.load(engine, digest)) {
                    Some(component) => {
                        tracing::info!("loaded handler {source} from the compile cache");
                        component
                    }
                    None => compile(engine, source, &bytes, cache)?,
                }
            }
        };

        // Its memory images made now, in the host process: where the code
        // was compiled here (not mapped from the cache) each is a memfd, a
        // descriptor the workers (and forking children) inherit. Made at
        // the first instantiation instead, it would be the instantiating
        // process's own: every forking child would make its own copy.
        if let Err(e) = component.initialize_copy_on_write_image() {
            tracing::debug!(
                "handler {source}: no memory image made ahead ({}); instances make it",
                one_line(&e)
            );
        }
        if world_of(engine, &component) == World::Http {
            return Ok(Handler {
                digest,
                engine: engine.clone(),
                pre: None,
                pre_async: None,
                http: Some(crate::wasm::http::link(engine, source, &component)?),
                inert,
            });
        }
        let pre = link(engine, source, &component)?;
        let pre_async = if options.for_async {
            Some(link_async(engine, source, &component)?)
        } else {
            None
        };
        Ok(Handler {
            digest,
            engine: engine.clone(),
            pre: Some(pre),
            pre_async,
            http: None,
            inert,
        })
    }

    /// The world the handler is written for.
    pub(crate) fn world(&self) -> World {
        if self.http.is_some() {
            World::Http
        } else {
            World::Handler
        }
    }

    /// An HTTP handler's pre-instantiated proxy.
    pub(crate) fn http(&self) -> Option<&ProxyPre<HttpState>> {
        self.http.as_ref()
    }

    /// The SHA-256 of the handler file, in hex.
    pub(crate) fn digest(&self) -> &str {
        &self.digest
    }

    /// A handler from parts already checked (`host check`).
    pub(crate) fn from_parts(digest: String, pre: HandlerPre<ConnState>) -> Handler {
        Handler {
            digest,
            engine: pre.engine().clone(),
            pre: Some(pre),
            pre_async: None,
            http: None,
            inert: false,
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The `host:handler/handler` world's (`None` for an HTTP handler).
    pub(crate) fn pre(&self) -> Option<&HandlerPre<ConnState>> {
        self.pre.as_ref()
    }

    pub(crate) fn pre_async(&self) -> Option<&HandlerPreAsync<ConnState>> {
        self.pre_async.as_ref()
    }

    /// Instantiating it runs no guest code, so calls no import: an instance
    /// made before its connection exists, and never run, is exactly what a
    /// fresh instantiation for that connection would make.
    pub(crate) fn instantiates_inertly(&self) -> bool {
        self.inert
    }
}

/// Whether instantiating the component `bytes` runs none of its code: no
/// core module in it has a start function and it has no start of its own.
/// Anything unreadable counts as running code.
fn runs_no_code_at_start(bytes: &[u8]) -> bool {
    use wasmparser::Payload;
    wasmparser::Parser::new(0).parse_all(bytes).all(|payload| {
        !matches!(
            payload,
            Err(_) | Ok(Payload::StartSection { .. } | Payload::ComponentStartSection { .. })
        )
    })
}

/// Tells a component from a core module and from something that is not
/// WebAssembly at all, before the compiler gives a less direct message.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), &'static str> {
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

#[cfg(test)]
mod tests {
    use super::{check_header, runs_no_code_at_start, BUILTIN_ECHO};

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

    /// A core module with one function, `()`, and a start section naming it
    /// if `start`.
    fn module(start: bool) -> Vec<u8> {
        let mut bytes = b"\0asm\x01\0\0\0".to_vec();
        bytes.extend([1, 4, 1, 0x60, 0, 0]); // type section: () -> ()
        bytes.extend([3, 2, 1, 0]); // function section: one of type 0
        if start {
            bytes.extend([8, 1, 0]); // start section: function 0
        }
        bytes.extend([10, 4, 1, 2, 0, 0x0b]); // code section: an empty body
        bytes
    }

    /// A component holding `module(start)` as its one core module.
    fn component(start: bool) -> Vec<u8> {
        let module = module(start);
        let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
        bytes.push(1); // core module section
        bytes.push(module.len() as u8);
        bytes.extend(module);
        bytes
    }

    #[test]
    fn instantiation_that_runs_code_is_told_apart() {
        assert!(runs_no_code_at_start(BUILTIN_ECHO));
        assert!(runs_no_code_at_start(&module(false)));
        assert!(!runs_no_code_at_start(&module(true)));
        // A start in a module nested in a component counts too.
        assert!(runs_no_code_at_start(&component(false)));
        assert!(!runs_no_code_at_start(&component(true)));
        // Unreadable: counted as running code.
        let mut truncated = module(false);
        truncated.truncate(truncated.len() - 2);
        assert!(!runs_no_code_at_start(&truncated));
        assert!(!runs_no_code_at_start(b"not wasm at all"));
    }
}
