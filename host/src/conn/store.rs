//! A connection's `Store` and instance, for the raw world: a fresh store
//! granting only what the tenant grants (`--env`, `--dir`, the outbound
//! network), the memory limiter and the deadline, the socket's streams in
//! its table, the instance from the handler's `HandlerPre`, and the
//! `handle` call. The store, and with it every guest resource, is dropped
//! before the connection is closed and logged (`conn::service`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};

use crate::conn::guest_log::GuestOutput;
use crate::conn::report::CallResult;
use crate::conn::service::{Service, Spare};
use crate::conn::socket::{Socket, Waits};
use crate::conn::streams::{SocketInput, SocketOutput};
use crate::wasm::guest_clock::{Deadline, GuestClock};
use crate::wasm::handler::{ConnState, ConnectionInfo, HandlerInstance};
use crate::wasm::limits::InstanceLimiter;
use crate::wasm::one_line;
use crate::wasm::outbound::{self, Network};

impl Service {
    /// Instantiates the handler in a fresh store and calls `handle`. The
    /// store, and with it every guest resource, is gone when this returns.
    /// In a forking child that inherited a spare instance, that instance is
    /// the fresh one.
    pub(super) fn run_guest(
        &self,
        socket: &Arc<Socket>,
        info: &ConnectionInfo,
    ) -> (CallResult, Option<InstanceLimiter>) {
        let (spare, made) = self
            .take_spare()
            .map(|spare| (spare.store, spare.instance))
            .unzip();
        let (mut store, input, output) = match self.prepare(socket, info, Waits::Blocking, spare) {
            Ok(prepared) => prepared,
            Err(why) => return (CallResult::SetupFailed(why), None),
        };
        let result = match made.map_or_else(|| self.instantiate(&mut store), Ok) {
            Ok(instance) => returned(instance.call_handle(&mut store, info, input, output)),
            Err(failed) => failed,
        };
        (result, Some(dispose(store)))
    }

    /// A fresh instance of the handler in `store`, or why there is none.
    fn instantiate(&self, store: &mut Store<ConnState>) -> Result<HandlerInstance, CallResult> {
        let Some(pre) = self.handler.pre() else {
            let why = "the handler is not of the host:handler/handler world".to_string();
            return Err(CallResult::SetupFailed(why));
        };
        // Instantiation runs guest code (start functions) and grows memory:
        // its failures are the guest's.
        pre.instantiate(store)
            .map_err(|e| CallResult::Trapped(e.context("instantiation failed")))
    }

    /// Forking: makes the spare instance every child forked from now on
    /// serves its connection in (each in its own copy-on-write copy),
    /// instead of instantiating the handler itself. Only if instantiating
    /// it runs no guest code: the spare has then never run, and is what a
    /// fresh instantiation would make. Returns whether there is one.
    pub(crate) fn make_spare(&self) -> bool {
        let Some(pre) = self
            .handler
            .pre()
            .filter(|_| self.handler.instantiates_inertly())
        else {
            return false;
        };
        // No WASI context: building one seeds the thread's random
        // generator, which every child would then inherit (each child
        // builds its own).
        let clock = GuestClock {
            base: Instant::now(),
        };
        let mut store = self.store_of(None, clock, Arc::new(Unconnected), self.network(0), false);
        // wasmtime initializes each core instance (globals, tables, data)
        // with compiled code, which checks the store's deadline: none here,
        // the child sets the connection's.
        store.set_epoch_deadline(u64::MAX / 2);
        store.epoch_deadline_trap();
        match pre.instantiate(&mut store) {
            Ok(instance) => {
                *self.spare_slot() = Some(Spare { store, instance });
                true
            }
            Err(e) => {
                tracing::debug!(
                    "no spare instance: {}; each connection instantiates the handler",
                    one_line(&e)
                );
                false
            }
        }
    }

    fn take_spare(&self) -> Option<Spare> {
        self.spare_slot().take()
    }

    fn spare_slot(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Service::run_guest`] on a fiber: every wait suspends it.
    pub(super) async fn run_guest_async(
        &self,
        socket: &Arc<Socket>,
        info: &ConnectionInfo,
    ) -> (CallResult, Option<InstanceLimiter>) {
        let (mut store, input, output) = match self.prepare(socket, info, Waits::Async, None) {
            Ok(prepared) => prepared,
            Err(why) => return (CallResult::SetupFailed(why), None),
        };
        let Some(pre) = self.handler.pre_async() else {
            let why = "the handler was not linked for the async strategy".to_string();
            return (CallResult::SetupFailed(why), Some(dispose(store)));
        };
        let result = match pre.instantiate_async(&mut store).await {
            Err(e) => CallResult::Trapped(e.context("instantiation failed")),
            Ok(instance) => returned(instance.call_handle(&mut store, info, input, output).await),
        };
        (result, Some(dispose(store)))
    }

    /// A fresh store (or `spare`'s, made ready for this connection) with
    /// the connection's streams in its table.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        socket: &Arc<Socket>,
        info: &ConnectionInfo,
        waits: Waits,
        spare: Option<Store<ConnState>>,
    ) -> Result<
        (
            Store<ConnState>,
            Resource<DynInputStream>,
            Resource<DynOutputStream>,
        ),
        String,
    > {
        let mut store = self.new_store(info.connection_id, socket, waits, spare)?;
        let table = &mut store.data_mut().table;
        let input: DynInputStream = Box::new(SocketInput::new(socket.clone()));
        let output: DynOutputStream = Box::new(SocketOutput::new(socket.clone()));
        let streams = table
            .push(input)
            .and_then(|input| Ok((input, table.push(output)?)));
        match streams {
            Ok((input, output)) => Ok((store, input, output)),
            Err(e) => Err(format!("cannot create the streams: {e}")),
        }
    }

    /// Connection `id`'s view of the tenant's outbound grants.
    pub(crate) fn network(&self, id: u64) -> Arc<Network> {
        Network::of(&self.outbound, &self.tenant_name, id, self.metrics.as_ref())
    }

    /// A WASI context granting what `--env` and `--dir` grant and nothing
    /// else (no network: the raw world's store adds its outbound grants),
    /// the guest's stdout and stderr going to the log.
    pub(super) fn granted_wasi(
        &self,
        output_log: &Arc<GuestOutput>,
    ) -> Result<WasiCtxBuilder, String> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(output_log.stream("stdout"))
            .stderr(output_log.stream("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (key, value) in &self.grants.env {
            wasi.env(key, value);
        }
        for dir in &self.grants.dirs {
            let perms = if dir.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| {
                    format!("cannot open --dir {}: {}", dir.host.display(), one_line(&e))
                })?;
        }
        Ok(wasi)
    }

    /// A store granting what `--env` and `--dir` grant and nothing else, with
    /// the memory limit and the deadline set: a new one, or `spare`'s with
    /// this connection's context (its memory limiter, which counted the
    /// instantiation, kept).
    pub(super) fn new_store(
        &self,
        id: u64,
        socket: &Arc<Socket>,
        waits: Waits,
        spare: Option<Store<ConnState>>,
    ) -> Result<Store<ConnState>, String> {
        let output_log = GuestOutput::new(id);
        let clock = GuestClock {
            base: Instant::now(),
        };
        let mut wasi = self.granted_wasi(&output_log)?;
        wasi.monotonic_clock(clock);
        // The raw world's outbound grants (`allow-outbound`).
        let network = self.network(id);
        outbound::grant(&mut wasi, &network);
        // No file streams (`--dir`) and no outbound sockets: every stream
        // the guest can have waits on the calling thread.
        let direct_streams =
            waits == Waits::Blocking && self.grants.dirs.is_empty() && !network.granted();
        let mut store = match spare {
            Some(mut store) => {
                let state = store.data_mut();
                state.wasi = Some(wasi.build());
                state.clock = clock;
                state.connection = socket.clone();
                state.network = network;
                state.direct_streams = direct_streams;
                store
            }
            None => self.store_of(
                Some(wasi.build()),
                clock,
                socket.clone(),
                network,
                direct_streams,
            ),
        };
        if waits == Waits::Async {
            // At every epoch tick the guest gives the runtime's thread to
            // the other connections (fairness), unless its time is up or
            // the host is ending it: then it traps, as under `--timeout`.
            store.set_epoch_deadline(1);
            let socket = socket.clone();
            store.epoch_deadline_callback(move |_| {
                if socket.must_stop() {
                    Ok(UpdateDeadline::Interrupt)
                } else {
                    Ok(UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(tokio::task::yield_now()),
                    ))
                }
            });
            return Ok(store);
        }
        store.set_epoch_deadline(self.clock.deadline_ticks(self.limits.timeout));
        store.epoch_deadline_trap();
        if self.aborting.load(Ordering::SeqCst) {
            // `abort_all` may have advanced the epoch before this store
            // existed: trap at the first check instead.
            store.set_epoch_deadline(0);
        }
        Ok(store)
    }

    /// A new store of the tenant's engine holding what one connection's
    /// store holds (its WASI context, perhaps not yet), with an empty table
    /// and the memory limiter installed.
    fn store_of(
        &self,
        wasi: Option<WasiCtx>,
        clock: GuestClock,
        connection: Arc<dyn Deadline>,
        network: Arc<Network>,
        direct_streams: bool,
    ) -> Store<ConnState> {
        let mut store = Store::new(
            self.engine(),
            ConnState {
                wasi,
                table: ResourceTable::new(),
                limiter: InstanceLimiter::new(self.limits.max_memory),
                clock,
                connection,
                network,
                direct_streams,
            },
        );
        store.limiter(|state| &mut state.limiter);
        store
    }
}

/// The connection of a spare instance's store until a child gives it its
/// own: no deadline and never aborted. Never asked, as the spare's guest
/// never runs before that.
struct Unconnected;

impl Deadline for Unconnected {
    fn deadline(&self) -> Instant {
        Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600)
    }

    fn aborted(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }

    fn mark_timed_out(&self) {}
}

/// What the guest's `handle` call came to.
fn returned(call: wasmtime::Result<Result<(), String>>) -> CallResult {
    match call {
        Ok(returned) => CallResult::Returned(returned),
        // `wasi:cli/exit`: status 0 is a normal return.
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(wasmtime_wasi::I32Exit(0)) => CallResult::Returned(Ok(())),
            Some(wasmtime_wasi::I32Exit(code)) => {
                CallResult::Returned(Err(format!("exited with status {code}")))
            }
            None => CallResult::Trapped(e),
        },
    }
}

/// Drops the store (and with it the instance and every guest resource) and
/// keeps its memory limiter, for the log line.
fn dispose(mut store: Store<ConnState>) -> InstanceLimiter {
    let limiter = std::mem::replace(&mut store.data_mut().limiter, InstanceLimiter::new(0));
    drop(store);
    limiter
}
