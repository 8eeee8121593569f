//! One HTTP request of a `wasi:http/proxy` handler: a fresh `Store` and
//! instance from the handler's `ProxyPre`, the guest's `handle` on a task
//! of the connection's runtime (it may still write the body after it has
//! set the response), the response or the host's own (500 when the guest
//! failed before answering, 504 when it did not answer within
//! `--timeout`), and, once both the body and the guest are done, the
//! request's one `request` line and its counters.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

use crate::conn::guest_log::GuestOutput;
use crate::conn::http_io::{BodyEnd, BodyError, Counters, Logged};
use crate::conn::phase::aborting;
use crate::conn::report::Millis;
use crate::conn::service::Service;
use crate::listener::Peer;
use crate::metrics::TenantMetrics;
use crate::outcome::Outcome;
use crate::wasm::http::HttpState;
use crate::wasm::http_outgoing::Outgoing;
use crate::wasm::limits::InstanceLimiter;
use crate::wasm::one_line;

/// What every request of one connection shares, and its line names.
pub(super) struct ConnMeta {
    pub(super) id: u64,
    pub(super) peer: Peer,
    pub(super) via: Option<Peer>,
    pub(super) worker: String,
    pub(super) tenant: String,
    pub(super) metrics: Option<TenantMetrics>,
    pub(super) counters: Arc<Counters>,
    /// Requests so far: the next one is number `requests + 1`.
    pub(super) requests: AtomicU64,
    /// The connection's bytes in and out when the last request's line was
    /// written: a request's traffic is what came after.
    pub(super) marks: [AtomicU64; 2],
}

/// The requests of one connection: hyper calls [`Requests::handle`] for
/// each; each request's finisher task is sent to `pending`, which the
/// connection awaits before its line.
pub(super) struct Requests<'a> {
    service: &'a Service,
    meta: Arc<ConnMeta>,
    pending: mpsc::UnboundedSender<JoinHandle<()>>,
}

/// How the guest's call ended.
struct GuestEnd {
    /// `None`: it ran past `--timeout` while waiting in the host.
    result: Option<wasmtime::Result<()>>,
    limiter: InstanceLimiter,
}

/// What the host answered before the body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    /// The guest's own response.
    Guest,
    /// The guest answered `response-outparam.set` with an error code.
    GuestError,
    /// 500: the guest ended (or trapped) without answering.
    Failed,
    /// 504: no answer within `--timeout`.
    TimedOut,
    /// 400: the request cannot be given to a guest (no authority).
    BadRequest,
    /// 500: the host could not set the request up.
    HostError,
}

impl<'a> Requests<'a> {
    pub(super) fn new(
        service: &'a Service,
        meta: Arc<ConnMeta>,
        pending: mpsc::UnboundedSender<JoinHandle<()>>,
    ) -> Requests<'a> {
        Requests {
            service,
            meta,
            pending,
        }
    }

    /// Serves one request: never an error for hyper, every failure is a
    /// response (or a cut body) and a line.
    pub(super) async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Logged>, Infallible> {
        let started = Instant::now();
        self.meta.counters.busy.fetch_add(1, Ordering::SeqCst);
        let method = request.method().clone();
        let path = request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().to_string(), |p| p.to_string());
        let deadline = started + self.service.limits().timeout;
        let (answer, answered) = oneshot::channel();
        let (guest, head, response) = match self.start_guest(request, answer, deadline) {
            Err((head, why)) => (None, head, host_response(head, &why)),
            Ok(guest) => {
                let waited = tokio::time::timeout_at(deadline.into(), answered).await;
                let (head, response) = match waited {
                    Ok(Ok(Ok(response))) => (Head::Guest, response.map(box_body)),
                    Ok(Ok(Err(code))) => (
                        Head::GuestError,
                        host_response(Head::GuestError, &format!("{code:?}")),
                    ),
                    // The guest ended without answering: stopped at its
                    // deadline (an epoch trap), or failed on its own.
                    Ok(Err(_)) if Instant::now() >= deadline => {
                        (Head::TimedOut, host_response(Head::TimedOut, ""))
                    }
                    Ok(Err(_)) => (Head::Failed, host_response(Head::Failed, "")),
                    Err(_) => (Head::TimedOut, host_response(Head::TimedOut, "")),
                };
                (Some(guest), head, response)
            }
        };
        let status = response.status().as_u16();
        let length = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let (body_done, body_end) = oneshot::channel();
        let counters = self.meta.counters.clone();
        let response = response.map(|body| Logged::new(body, length, body_done, counters));
        let finish = Finish {
            meta: self.meta.clone(),
            n: self.meta.requests.fetch_add(1, Ordering::Relaxed) + 1,
            head,
            status,
            head_only: method == hyper::Method::HEAD,
            method: method.to_string(),
            path,
            started,
        };
        let finisher = tokio::spawn(finish.run(guest, body_end));
        let _ = self.pending.send(finisher);
        Ok(response)
    }

    /// A fresh store and instance for `request`, the guest's `handle`
    /// running on a task of the current runtime until it returns or
    /// `deadline` passes.
    fn start_guest(
        &self,
        request: Request<Incoming>,
        answer: oneshot::Sender<
            Result<Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, ErrorCode>,
        >,
        deadline: Instant,
    ) -> Result<JoinHandle<GuestEnd>, (Head, String)> {
        let service = self.service;
        let pre = service
            .handler()
            .http()
            .cloned()
            .ok_or((Head::HostError, "not an HTTP handler".to_string()))?;
        let output_log = GuestOutput::new(self.meta.id);
        let mut wasi = service
            .granted_wasi(&output_log)
            .map_err(|why| (Head::HostError, why))?;
        let mut store = Store::new(
            service.engine(),
            HttpState {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limiter: InstanceLimiter::new(service.limits().max_memory),
                hooks: Outgoing::new(service.network(self.meta.id)),
            },
        );
        store.limiter(|state| &mut state.limiter);
        // At every epoch tick the guest lets the runtime's other work run
        // (hyper, other connections), unless its time is up or the host is
        // ending it: then it traps.
        store.set_epoch_deadline(1);
        let phase = service.http_phase().watch();
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline || aborting(&phase) {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        let mut http = store.data_mut().http();
        let request = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(|e| (Head::BadRequest, one_line(&e)))?;
        let out = http
            .new_response_outparam(answer)
            .map_err(|e| (Head::HostError, one_line(&e)))?;
        Ok(tokio::spawn(async move {
            let call = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, out)
                    .await
            };
            let result = tokio::time::timeout_at(deadline.into(), call).await.ok();
            let limiter = std::mem::replace(&mut store.data_mut().limiter, InstanceLimiter::new(0));
            drop(store);
            GuestEnd { result, limiter }
        }))
    }
}

/// A guest's body as the response body type.
fn box_body(
    body: wasmtime_wasi_http::p2::body::HyperOutgoingBody,
) -> http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError> {
    body.map_err(|e| Box::new(e) as BodyError).boxed_unsync()
}

/// The host's own answer: a short plain-text body, keep-alive intact.
fn host_response(
    head: Head,
    detail: &str,
) -> Response<http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>> {
    let (status, text) = match head {
        Head::TimedOut => (
            StatusCode::GATEWAY_TIMEOUT,
            "the handler did not answer in time".to_string(),
        ),
        Head::BadRequest => (StatusCode::BAD_REQUEST, format!("bad request: {detail}")),
        Head::GuestError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the handler failed: {detail}"),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the handler failed".to_string(),
        ),
    };
    let body = Full::new(Bytes::from(text + "\n"))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// What a request's finisher needs to write its line.
struct Finish {
    meta: Arc<ConnMeta>,
    n: u64,
    head: Head,
    status: u16,
    head_only: bool,
    method: String,
    path: String,
    started: Instant,
}

impl Finish {
    /// Waits for the body to be sent (or dropped) and the guest to end,
    /// then writes the request's line and counts it.
    async fn run(self, guest: Option<JoinHandle<GuestEnd>>, body: oneshot::Receiver<BodyEnd>) {
        let body = body.await.unwrap_or(BodyEnd {
            bytes: 0,
            complete: false,
            failed: true,
        });
        let guest = match guest {
            Some(task) => task.await.ok(),
            None => None,
        };
        let (outcome, error) = self.classify(&body, guest.as_ref());
        let counters = &self.meta.counters;
        let traffic = |i: usize, counter: &AtomicU64| {
            let now = counter.load(Ordering::Relaxed);
            now.saturating_sub(self.meta.marks[i].swap(now, Ordering::Relaxed))
        };
        let line = RequestLine {
            n: self.n,
            method: &self.method,
            path: &self.path,
            status: self.status,
            bytes_in: traffic(0, &counters.bytes_in),
            bytes_out: traffic(1, &counters.bytes_out),
            memory: guest.as_ref().map_or(0, |g| g.limiter.peak() as u64),
            duration: self.started.elapsed(),
            outcome,
            error: error.as_deref(),
        };
        log_request(&self.meta, &line);
    }

    /// The request's outcome: the host's view (a timeout, the memory
    /// limit, a cut body) wins over the guest's.
    fn classify(&self, body: &BodyEnd, guest: Option<&GuestEnd>) -> (Outcome, Option<String>) {
        match self.head {
            Head::TimedOut => return (Outcome::Timeout, None),
            Head::HostError => return (Outcome::HostError, None),
            Head::BadRequest => return (Outcome::BadRequest, None),
            _ => {}
        }
        if let Some(guest) = guest {
            match &guest.result {
                None => return (Outcome::Timeout, None),
                Some(Err(e)) => {
                    if let Some(wasmtime_wasi::I32Exit(0)) = e.downcast_ref() {
                    } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                        return (Outcome::Timeout, None);
                    } else if guest.limiter.refused() {
                        return (Outcome::MemoryLimit, Some(trap_text(e)));
                    } else {
                        return (Outcome::Trap, Some(trap_text(e)));
                    }
                }
                Some(Ok(())) => {}
            }
        }
        match self.head {
            Head::GuestError => (Outcome::HandlerError, None),
            Head::Failed => (
                Outcome::HandlerError,
                Some("the handler returned without a response".to_string()),
            ),
            _ if body.failed || (!body.complete && !self.head_only) => (
                Outcome::ClientReset,
                Some("the response was not sent whole".to_string()),
            ),
            _ => (Outcome::Ok, None),
        }
    }
}

/// A trap's message without its wasm backtrace.
fn trap_text(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => one_line(e),
    }
}

/// What a `request` line says.
pub(super) struct RequestLine<'a> {
    pub(super) n: u64,
    pub(super) method: &'a str,
    pub(super) path: &'a str,
    pub(super) status: u16,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) memory: u64,
    pub(super) duration: Duration,
    pub(super) outcome: Outcome,
    pub(super) error: Option<&'a str>,
}

/// Logs a request's line and counts it: `request ID.N peer=... [via=...]
/// worker=... tenant=... method=... path="..." status=... in=... out=...
/// memory=...KiB duration=...ms outcome=... [error="..."]`.
pub(super) fn log_request(meta: &ConnMeta, r: &RequestLine<'_>) {
    if let Some(metrics) = &meta.metrics {
        metrics.record_request(r.status, r.duration);
    }
    // Below its level the line is not even formatted.
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let mut text = format!("request {}.{} peer={}", meta.id, r.n, meta.peer);
    if let Some(via) = &meta.via {
        text.push_str(&format!(" via={via}"));
    }
    text.push_str(&format!(
        " worker={} tenant={} method={} path={:?} status={} in={} out={} memory={}KiB duration={} outcome={}",
        meta.worker,
        meta.tenant,
        crate::logging::escape(r.method),
        r.path,
        r.status,
        r.bytes_in,
        r.bytes_out,
        r.memory.div_ceil(1024),
        Millis(r.duration),
        r.outcome.name()
    ));
    if let Some(error) = r.error {
        text.push_str(&format!(" error={error:?}"));
    }
    if crate::logging::json() {
        tracing::info!(
            connection = meta.id,
            request = r.n,
            peer = %meta.peer,
            worker = meta.worker,
            tenant = meta.tenant,
            method = r.method,
            path = r.path,
            status = r.status,
            bytes_in = r.bytes_in,
            bytes_out = r.bytes_out,
            memory_kib = r.memory.div_ceil(1024),
            duration_ms = r.duration.as_secs_f64() * 1000.0,
            outcome = r.outcome.name(),
            error = r.error,
            "{text}"
        );
    } else {
        tracing::info!("{text}");
    }
}
