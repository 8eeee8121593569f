//! One connection of a `wasi:http/proxy` handler, start to end: a
//! balancer's PROXY protocol header if the tenant takes one, then hyper's
//! HTTP/1.1 server with keep-alive over the socket, and per request a fresh
//! `Store` and instance (`http_request`), so no request sees another's
//! state. Ends with the connection's one `closed` line, as
//! `Service::serve` does; each request has its own `request` line.
//!
//! Where hyper runs. wasmtime-wasi-http is asynchronous throughout (the
//! guest runs on a fiber, its response body reaches hyper through channels
//! while it still runs), so a connection always runs on a tokio runtime:
//! - threading and prefork: a current-thread runtime per pool thread, made
//!   on the thread at its first HTTP connection and reused by the next ones
//!   (`block_on` per connection; nothing is left on it between
//!   connections: every request's tasks are awaited before `serve` ends).
//!   The guest and hyper share the thread; the guest yields at every epoch
//!   tick of the worker's ticker (10 ms), so a spinning guest still lets
//!   hyper read and write.
//! - forking: the same, made in the child after `fork()` (the parent never
//!   starts a runtime or a thread; see `strategy/forking.rs`), and the
//!   child starts its own epoch ticker thread, since a keep-alive
//!   connection's requests each need their deadline, which the one
//!   `SIGALRM` of the raw path cannot give.
//! - async: the worker's multi-thread runtime, on the connection's task.
//!
//! wasmtime-wasi's hidden global runtime is never used: every spawn and
//! every blocking helper finds the current runtime first.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::conn::http_io::{Counters, Io};
use crate::conn::http_request::{log_request, ConnMeta, RequestLine, Requests};
use crate::conn::phase::{ABORTING, DRAINING};
use crate::conn::report::{log_closed, Closed, Ending, Level, Usage};
use crate::conn::service::{Accepted, Service};
use crate::conn::socket::{Socket, Waits};
use crate::outcome::Outcome;
use crate::wasm::engine::EpochClock;

thread_local! {
    /// The calling thread's runtime for HTTP connections (`None`: it could
    /// not be made).
    static RUNTIME: OnceCell<Option<tokio::runtime::Runtime>> = const { OnceCell::new() };
}

/// Serves `conn` to the end on the calling thread (threading, prefork,
/// forking), on the thread's own current-thread runtime.
pub(crate) fn serve_blocking(service: &Service, conn: Accepted, worker: &str) -> Ending {
    if let Err(why) = ensure_ticker(service) {
        return service.not_served(conn, worker, &why);
    }
    RUNTIME.with(|runtime| {
        let runtime = runtime.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| tracing::error!("cannot start an HTTP connection's runtime: {e}"))
                .ok()
        });
        match runtime {
            Some(runtime) => runtime.block_on(serve(service, conn, worker, Waits::Async)),
            None => service.not_served(conn, worker, "cannot start the connection's runtime"),
        }
    })
}

/// A forking child has no epoch ticker (threads do not survive `fork()`):
/// its first HTTP connection starts one, in the child.
fn ensure_ticker(service: &Service) -> Result<(), String> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    if !matches!(service.clock(), EpochClock::Alarm) {
        return Ok(());
    }
    STARTED
        .get_or_init(|| {
            EpochClock::start_ticker(service.engine())
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
}

/// Serves `conn` to the end on the current tokio runtime and returns how
/// it ended. `waits` is how the PROXY protocol header is waited for.
pub(crate) async fn serve(service: &Service, conn: Accepted, worker: &str, waits: Waits) -> Ending {
    let started = Instant::now();
    // (`TCP_NODELAY` is the listener's, inherited: `prepare_for_accept`.)
    let Accepted {
        stream, peer, id, ..
    } = conn;
    let tcp = peer.inet.is_some();
    let limits = service.limits();
    let (stream, peer, via) = if service.takes_proxy_header(&peer) {
        let socket = Socket::new(stream, limits.idle_timeout, started + limits.timeout, waits);
        match service.proxied(&socket, peer.clone()).await {
            Err(refused) => {
                drop(socket);
                return service.refuse(refused, id, worker, started);
            }
            Ok((client, via)) => match socket.into_stream() {
                Some(stream) => (stream, client, via),
                None => return service.unserved_error(id, &peer, worker, "socket still shared"),
            },
        }
    } else {
        (stream, peer, None)
    };

    let counters = Arc::new(Counters::default());
    let io = match Io::new(stream, tcp, limits.idle_timeout, counters.clone()) {
        Ok(io) => io,
        Err(e) => {
            let why = format!("cannot register the socket: {e}");
            return service.unserved_error(id, &peer, worker, &why);
        }
    };
    let meta = Arc::new(ConnMeta {
        id,
        peer,
        via,
        worker: worker.to_string(),
        tenant: service.tenant().to_string(),
        metrics: service.metrics().cloned(),
        counters: counters.clone(),
        requests: AtomicU64::new(0),
        marks: Default::default(),
    });
    let (pending, mut finishing) = mpsc::unbounded_channel();
    let requests = Requests::new(service, meta.clone(), pending);
    let mut phase = service.http_phase().watch();
    // In a block: the connection (and with it the last body and the
    // service's borrow of `requests`) is dropped at its end.
    let served = {
        let http = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(
                TokioIo::new(io),
                service_fn(|request| requests.handle(request)),
            );
        let mut http = std::pin::pin!(http);
        if *phase.borrow_and_update() >= DRAINING {
            http.as_mut().graceful_shutdown();
        }
        let served = loop {
            tokio::select! {
                served = http.as_mut() => break Some(served),
                changed = phase.changed() => match changed.map(|()| *phase.borrow_and_update()) {
                    Ok(ABORTING) => break None,
                    Ok(DRAINING) => http.as_mut().graceful_shutdown(),
                    Ok(_) => {}
                    // The service is gone: serve on undisturbed.
                    Err(_) => break Some(http.as_mut().await),
                },
            }
        };
        served
    };
    // Every request's tasks end (each bounded by `--timeout`) before the
    // connection's line: nothing is left behind on the runtime.
    drop(requests);
    while let Some(finisher) = finishing.recv().await {
        let _ = finisher.await;
    }

    let (outcome, error) = match served {
        None => (Outcome::Shutdown, None),
        // The idle timer's flag, whether hyper reported its failed read as
        // an error or (between requests) as a clean end.
        Some(_) if counters.idle_timed_out.load(Ordering::Relaxed) => (Outcome::IdleTimeout, None),
        Some(Ok(())) => (Outcome::Ok, None),
        Some(Err(e)) => connection_error(&e, &meta),
    };
    let duration = started.elapsed();
    let bytes_in = counters.bytes_in.load(Ordering::Relaxed);
    let bytes_out = counters.bytes_out.load(Ordering::Relaxed);
    if let Some(metrics) = &meta.metrics {
        metrics.record(outcome, bytes_in, bytes_out, duration, None);
    }
    log_closed(&Closed {
        id,
        peer: &meta.peer,
        via: meta.via.as_ref(),
        worker: Some(worker),
        tenant: service.tenant(),
        usage: Some(Usage {
            bytes_in,
            bytes_out,
            memory: 0,
        }),
        duration: Some(duration),
        outcome,
        error: error.as_deref(),
        level: Level::Info,
    });
    Ending { outcome, error }
}

/// How a connection hyper gave up on ended. A request hyper could not
/// parse got its 400 (or 414, 431) from hyper, without running a guest:
/// it has a `request` line and is counted by status too.
fn connection_error(e: &hyper::Error, meta: &ConnMeta) -> (Outcome, Option<String>) {
    if e.is_timeout() {
        return (Outcome::IdleTimeout, None);
    }
    if e.is_parse() || e.is_parse_too_large() {
        let status = if e.is_parse_too_large() { 431 } else { 400 };
        let n = meta.requests.fetch_add(1, Ordering::Relaxed) + 1;
        log_request(
            meta,
            &RequestLine {
                n,
                method: "-",
                path: "-",
                status,
                bytes_in: 0,
                bytes_out: 0,
                memory: 0,
                duration: Duration::ZERO,
                outcome: Outcome::BadRequest,
                error: Some(&e.to_string()),
            },
        );
        return (Outcome::BadRequest, Some(e.to_string()));
    }
    (Outcome::ClientReset, Some(e.to_string()))
}
