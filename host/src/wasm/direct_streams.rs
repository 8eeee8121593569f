//! The blocking `wasi:io/streams` calls of the synchronous linker
//! (threading, prefork, forking), made without a tokio runtime when they
//! need none.
//!
//! wasmtime-wasi runs every blocking stream call (`blocking-read`,
//! `blocking-skip`, `blocking-flush`, `blocking-write-and-flush`,
//! `blocking-write-zeroes-and-flush`, `blocking-splice`), and every
//! stream's drop, inside its tokio runtime (`in_tokio`): it enters the runtime for each
//! call, and a forking child must build one first (a worker thread and a
//! reactor per connection). The connection's own streams never use it:
//! they wait in poll(2) on the calling thread (`conn::streams`), and so do
//! the guest's stdout and stderr (the log) and its empty stdin. A store whose
//! streams are all of these kinds (one that grants no `--dir`, whose file
//! streams need the runtime's blocking pool, and no outbound network, whose
//! sockets need its reactor: [`DirectState::direct_streams`]) has these
//! calls polled right here, on the calling thread. Any other store's go
//! through wasmtime-wasi as before, and so do pollables (`poll`, `block`)
//! and sleeps for every store.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use anyhow::Result;
use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType};
use wasmtime::StoreContextMut;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    Host as _, HostInputStream, HostOutputStream, StreamError as WitStreamError,
};
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream, StreamResult};

/// The `wasi:io/streams` interface whose blocking calls are replaced (the
/// guests' older 0.2 versions resolve to it too).
const STREAMS: &str = "wasi:io/streams@0.2.12";

/// What the replaced calls need of a store's data.
pub(crate) trait DirectState: Send + 'static {
    /// Whether every stream in the store's table waits on the calling
    /// thread (so none needs a tokio runtime), and the table.
    fn streams(&mut self) -> (bool, &mut ResourceTable);
}

/// Replaces every blocking stream call and the streams' drops on the sync
/// linker (wasmtime-wasi's `tracing` spans of these calls go with them).
/// Call after wasmtime-wasi's `add_to_linker_sync`.
pub(crate) fn add_to_linker<T: DirectState>(linker: &mut Linker<T>) -> Result<()> {
    linker.allow_shadowing(true);
    let mut streams = linker.instance(STREAMS)?;
    streams.func_wrap(
        "[method]input-stream.blocking-read",
        |mut store: StoreContextMut<'_, T>, (stream, len): (Resource<DynInputStream>, u64)| {
            let (direct, table) = store.data_mut().streams();
            let read = wait(direct, table.blocking_read(stream, len));
            Ok((returned(table, read)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |mut store: StoreContextMut<'_, T>,
         (stream, bytes): (Resource<DynOutputStream>, Vec<u8>)| {
            let (direct, table) = store.data_mut().streams();
            let written = wait(direct, table.blocking_write_and_flush(stream, bytes));
            Ok((returned(table, written)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-flush",
        |mut store: StoreContextMut<'_, T>, (stream,): (Resource<DynOutputStream>,)| {
            let (direct, table) = store.data_mut().streams();
            let flushed = wait(direct, table.blocking_flush(stream));
            Ok((returned(table, flushed)?,))
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-skip",
        |mut store: StoreContextMut<'_, T>, (stream, len): (Resource<DynInputStream>, u64)| {
            let (direct, table) = store.data_mut().streams();
            let skipped = wait(direct, table.blocking_skip(stream, len));
            Ok((returned(table, skipped)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-zeroes-and-flush",
        |mut store: StoreContextMut<'_, T>, (stream, len): (Resource<DynOutputStream>, u64)| {
            let (direct, table) = store.data_mut().streams();
            let written = wait(direct, table.blocking_write_zeroes_and_flush(stream, len));
            Ok((returned(table, written)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-splice",
        |mut store: StoreContextMut<'_, T>,
         (dst, src, len): (Resource<DynOutputStream>, Resource<DynInputStream>, u64)| {
            let (direct, table) = store.data_mut().streams();
            let spliced = wait(direct, table.blocking_splice(dst, src, len));
            Ok((returned(table, spliced)?,))
        },
    )?;
    streams.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut store, rep| {
            let (direct, table) = store.data_mut().streams();
            wait(direct, HostInputStream::drop(table, Resource::new_own(rep)))
        },
    )?;
    streams.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut store, rep| {
            let (direct, table) = store.data_mut().streams();
            wait(
                direct,
                HostOutputStream::drop(table, Resource::new_own(rep)),
            )
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Runs one of wasmtime-wasi-io's stream calls to its end: on this thread
/// if every stream of the store waits here (`direct`), otherwise inside
/// wasmtime-wasi's runtime, as wasmtime-wasi itself would.
fn wait<F: Future>(direct: bool, call: F) -> F::Output {
    if direct {
        block_on(call)
    } else {
        wasmtime_wasi::runtime::in_tokio(call)
    }
}

/// A stream call's result as the guest gets it: a stream error becomes the
/// WIT `stream-error` (a trap stays a trap).
fn returned<V>(
    table: &mut ResourceTable,
    result: StreamResult<V>,
) -> wasmtime::Result<Result<V, WitStreamError>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => Ok(Err(table.convert_stream_error(e)?)),
    }
}

/// Polls `future` to its end on this thread, parking between polls. For
/// futures that do their waiting inside `poll` (the connection's streams
/// under a blocking strategy) this is one poll.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    thread_local! {
        /// The thread's waker, made once: a connection makes several calls.
        static WAKER: Waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    }
    // A fresh one if the thread's own is already gone (during its exit).
    let waker = WAKER
        .try_with(Waker::clone)
        .unwrap_or_else(|_| Waker::from(Arc::new(Unpark(std::thread::current()))));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
            return value;
        }
        std::thread::park();
    }
}
