//! A guest's outbound network, granted per tenant (`allow-outbound`): TCP
//! sockets counted against `max-outbound`, every connect checked against
//! the grants (wasmtime-wasi's `socket_addr_check`); lookups only of names a
//! grant names; no listening, no UDP; a refusal logged once per connection
//! and counted; and, once a guest has network, every wait of its
//! `wasi:io/poll` (`poll`, `pollable.block`: a connect, a lookup, a read of
//! its upstream) ended at the connection's `--timeout`. A tenant without
//! grants keeps wasmtime-wasi's own behaviour: no sockets at all.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;

use anyhow::Result;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{self, ResolveAddressStream};
use wasmtime_wasi::p2::bindings::sockets::network::{self, ErrorCode, IpAddressFamily};
use wasmtime_wasi::p2::bindings::sockets::tcp_create_socket;
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsView};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_io::bindings::wasi::io::poll::{Host as _, HostPollable as _};
use wasmtime_wasi_io::poll::DynPollable;

use crate::metrics::TenantMetrics;
use crate::settings::Outbound;
use crate::wasm::guest_clock::Deadline;

/// The interfaces whose functions are replaced.
const POLL: &str = "wasi:io/poll@0.2.12";
const IP_NAME_LOOKUP: &str = "wasi:sockets/ip-name-lookup@0.2.12";
const TCP_CREATE_SOCKET: &str = "wasi:sockets/tcp-create-socket@0.2.12";

/// One connection's outbound network: the tenant's grants (perhaps none)
/// and what this instance has used of them.
pub(crate) struct Network {
    grants: Arc<Outbound>,
    tenant: Arc<str>,
    id: u64,
    /// Sockets the guest has made.
    sockets: AtomicU32,
    refusal_logged: AtomicBool,
    metrics: Option<TenantMetrics>,
}

impl Network {
    /// The network of connection `id`.
    pub(crate) fn of(
        grants: &Arc<Outbound>,
        tenant: &Arc<str>,
        id: u64,
        metrics: Option<&TenantMetrics>,
    ) -> Arc<Network> {
        Arc::new(Network {
            grants: grants.clone(),
            tenant: tenant.clone(),
            id,
            sockets: AtomicU32::new(0),
            refusal_logged: AtomicBool::new(false),
            metrics: metrics.cloned(),
        })
    }

    /// Whether the tenant grants any outbound network.
    pub(crate) fn granted(&self) -> bool {
        !self.grants.grants.is_empty()
    }

    /// Whether the guest may make another TCP socket: only if the tenant
    /// grants a network, and at most `max-outbound` per instance.
    fn may_create(&self) -> bool {
        if !self.granted() {
            self.refuse("outbound socket", "the tenant grants no outbound network");
            return false;
        }
        if self.sockets.fetch_add(1, Ordering::SeqCst) >= self.grants.max {
            self.sockets.fetch_sub(1, Ordering::SeqCst);
            let why = format!("max-outbound {} reached", self.grants.max);
            self.refuse("outbound socket", &why);
            return false;
        }
        true
    }

    /// Whether the guest may use `addr` so: only TCP connects the grants
    /// name. The implicit bind of a connect (the wildcard address, port 0)
    /// is allowed; any other bind, a listen, and all of UDP are refused.
    fn check(&self, addr: SocketAddr, used_for: SocketAddrUse) -> bool {
        match used_for {
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
            SocketAddrUse::TcpConnect if self.grants.permits(addr) => {
                self.count_opened();
                true
            }
            SocketAddrUse::TcpConnect => {
                let what = format!("outbound connect to {addr}");
                self.refuse(&what, "no grant of the tenant names it");
                false
            }
            _ => false,
        }
    }

    /// Counts a connection the grants let out (a guest's connect, or the
    /// host's for its outgoing HTTP request).
    fn count_opened(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.outbound(true);
        }
    }

    /// Counts a refused socket or connect; the connection's first refusal
    /// is logged, with the address the guest asked for if it got that far.
    fn refuse(&self, what: &str, why: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.outbound(false);
        }
        if !self.refusal_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "connection {} {what} refused: {why} (tenant {})",
                self.id,
                self.tenant
            );
        }
    }

    /// Whether the guest may look `name` up: an address (no lookup
    /// happens), or a name one of the grants names.
    pub(crate) fn may_resolve(&self, name: &str) -> bool {
        if name.parse::<IpAddr>().is_ok() || self.grants.may_resolve(name) {
            return true;
        }
        if !self.refusal_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "connection {} outbound lookup of {} refused: no grant of the tenant names it (tenant {})",
                self.id,
                crate::logging::escape(name),
                self.tenant
            );
        }
        false
    }
}

/// What an outgoing HTTP request (`wasm::http_outgoing`) asks of the
/// same grants.
impl Network {
    /// The address an outgoing HTTP request to `uri` connects to: the
    /// first of `candidates` (its authority, looked up) that a grant names,
    /// if another connection fits `max-outbound`; counted as opened.
    /// Otherwise the request is refused: logged once and counted.
    pub(crate) fn http_target(&self, uri: &str, candidates: &[SocketAddr]) -> Option<SocketAddr> {
        let Some(addr) = candidates.iter().copied().find(|a| self.grants.permits(*a)) else {
            let named: Vec<String> = candidates.iter().map(ToString::to_string).collect();
            let why = format!("no grant of the tenant names {}", named.join(", "));
            self.refuse_http(uri, &why);
            return None;
        };
        if !self.may_create() {
            return None;
        }
        self.count_opened();
        Some(addr)
    }

    /// Counts and logs (once) a refused outgoing request to `uri`.
    pub(crate) fn refuse_http(&self, uri: &str, why: &str) {
        self.refuse(&format!("outgoing HTTP request to {uri}"), why);
    }
}

/// Grants `network` to the WASI context being built: if the tenant grants
/// any, TCP (each socket counted by [`add_to_linker`]'s
/// `create-tcp-socket`, each address checked by [`Network::check`]) and
/// lookups (checked by name in its `resolve-addresses`); never UDP.
pub(crate) fn grant(wasi: &mut WasiCtxBuilder, network: &Arc<Network>) {
    wasi.allow_udp(false);
    if !network.granted() {
        wasi.allow_tcp(false).allow_ip_name_lookup(false);
        return;
    }
    let network = network.clone();
    wasi.allow_tcp(true)
        .allow_ip_name_lookup(true)
        .socket_addr_check(move |addr, used_for| {
            let allowed = network.check(addr, used_for);
            Box::pin(async move { allowed })
        });
}

/// What the replaced functions need of a store's data.
pub(crate) trait NetworkState: WasiSocketsView + 'static {
    fn network(&self) -> &Arc<Network>;
    fn connection(&self) -> &Arc<dyn Deadline>;
    fn poll_table(&mut self) -> &mut ResourceTable;
}

/// Replaces `resolve-addresses` (names checked against the grants) and, for
/// the sync linker (`blocking`) or the async one, `poll` and
/// `pollable.block` (bounded by the connection's deadline once it has
/// network). Call after wasmtime-wasi's `add_to_linker_*`.
pub(crate) fn add_to_linker<T: NetworkState>(linker: &mut Linker<T>, blocking: bool) -> Result<()> {
    linker.allow_shadowing(true);
    let mut lookup = linker.instance(IP_NAME_LOOKUP)?;
    lookup.func_wrap(
        "resolve-addresses",
        |mut store: StoreContextMut<'_, T>,
         (net, name): (Resource<wasmtime_wasi::p2::Network>, String)| {
            let state = store.data_mut();
            let network = state.network();
            if network.granted() && !network.may_resolve(&name) {
                return Ok((Err(ErrorCode::AccessDenied),));
            }
            resolve(&mut state.sockets(), net, name)
        },
    )?;
    let mut create = linker.instance(TCP_CREATE_SOCKET)?;
    create.func_wrap(
        "create-tcp-socket",
        |mut store: StoreContextMut<'_, T>, (family,): (IpAddressFamily,)| {
            let state = store.data_mut();
            if !state.network().may_create() {
                return Ok((Err(ErrorCode::AccessDenied),));
            }
            let view = &mut state.sockets();
            match tcp_create_socket::Host::create_tcp_socket(view, family) {
                Ok(socket) => Ok((Ok(socket),)),
                Err(e) => Ok((Err(network::Host::convert_error_code(view, e)?),)),
            }
        },
    )?;
    let mut poll = linker.instance(POLL)?;
    if blocking {
        poll.func_wrap(
            "poll",
            |mut store: StoreContextMut<'_, T>, (list,): (Vec<Resource<DynPollable>>,)| {
                let (table, bound) = parts(store.data_mut());
                let ready = wasmtime_wasi::runtime::in_tokio(within(bound, table.poll(list)))?;
                Ok((ready,))
            },
        )?;
        poll.func_wrap(
            "[method]pollable.block",
            |mut store: StoreContextMut<'_, T>, (pollable,): (Resource<DynPollable>,)| {
                let (table, bound) = parts(store.data_mut());
                wasmtime_wasi::runtime::in_tokio(within(bound, table.block(pollable)))
            },
        )?;
    } else {
        poll.func_wrap_async(
            "poll",
            |mut store: StoreContextMut<'_, T>, (list,): (Vec<Resource<DynPollable>>,)| {
                Box::new(async move {
                    let (table, bound) = parts(store.data_mut());
                    Ok((within(bound, table.poll(list)).await?,))
                })
            },
        )?;
        poll.func_wrap_async(
            "[method]pollable.block",
            |mut store: StoreContextMut<'_, T>, (pollable,): (Resource<DynPollable>,)| {
                Box::new(async move {
                    let (table, bound) = parts(store.data_mut());
                    within(bound, table.block(pollable)).await
                })
            },
        )?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// wasmtime-wasi's own `resolve-addresses`.
#[allow(clippy::type_complexity)]
fn resolve(
    view: &mut wasmtime_wasi::sockets::WasiSocketsCtxView<'_>,
    net: Resource<wasmtime_wasi::p2::Network>,
    name: String,
) -> wasmtime::Result<(Result<Resource<ResolveAddressStream>, ErrorCode>,)> {
    match ip_name_lookup::Host::resolve_addresses(view, net, name) {
        Ok(stream) => Ok((Ok(stream),)),
        Err(e) => Ok((Err(network::Host::convert_error_code(view, e)?),)),
    }
}

/// The table, and the connection whose deadline bounds the wait if the
/// guest has network.
fn parts<T: NetworkState>(state: &mut T) -> (&mut ResourceTable, Option<Arc<dyn Deadline>>) {
    let bound = state
        .network()
        .granted()
        .then(|| state.connection().clone());
    (state.poll_table(), bound)
}

/// `wait`, ended at `bound`'s deadline (marked timed out) or when the host
/// ends the connection: either traps the guest, whose connection then ends
/// as `timeout` or `shutdown`.
async fn within<R>(
    bound: Option<Arc<dyn Deadline>>,
    wait: impl Future<Output = wasmtime::Result<R>>,
) -> wasmtime::Result<R> {
    let Some(connection) = bound else {
        return wait.await;
    };
    let until = tokio::time::Instant::from_std(connection.deadline());
    let mut wait = std::pin::pin!(wait);
    let mut expired = std::pin::pin!(tokio::time::sleep_until(until));
    let mut aborted = connection.aborted();
    let ended = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = wait.as_mut().poll(cx) {
            Poll::Ready(Ok(result))
        } else if expired.as_mut().poll(cx).is_ready() {
            Poll::Ready(Err(true))
        } else if aborted.as_mut().poll(cx).is_ready() {
            Poll::Ready(Err(false))
        } else {
            Poll::Pending
        }
    })
    .await;
    match ended {
        Ok(result) => result,
        Err(timed_out) => {
            if timed_out {
                connection.mark_timed_out();
            }
            Err(wasmtime::format_err!(
                "the connection ended while the guest waited on its network"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(grants: &[&str], max: u32) -> Arc<Network> {
        let grants = grants
            .iter()
            .map(|g| crate::settings::parse_grant("--allow-outbound", g).unwrap())
            .collect();
        Network::of(
            &Arc::new(Outbound { grants, max }),
            &Arc::from("t"),
            1,
            None,
        )
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_granted_connects_and_the_implicit_bind_pass() {
        let net = network(&["127.0.0.1:6379", "10.0.0.0/8:*"], 8);
        assert!(net.check(addr("127.0.0.1:6379"), SocketAddrUse::TcpConnect));
        assert!(net.check(addr("10.9.8.7:1"), SocketAddrUse::TcpConnect));
        assert!(!net.check(addr("127.0.0.1:6380"), SocketAddrUse::TcpConnect));
        assert!(net.check(addr("0.0.0.0:0"), SocketAddrUse::TcpBind));
        assert!(net.check(addr("[::]:0"), SocketAddrUse::TcpBind));
        assert!(!net.check(addr("0.0.0.0:6379"), SocketAddrUse::TcpBind));
        assert!(!net.check(addr("127.0.0.1:0"), SocketAddrUse::TcpBind));
        assert!(!net.check(addr("0.0.0.0:0"), SocketAddrUse::TcpListen));
        assert!(!net.check(addr("127.0.0.1:6379"), SocketAddrUse::UdpSend));
        assert!(!net.check(addr("0.0.0.0:0"), SocketAddrUse::UdpBind));
    }

    #[test]
    fn sockets_are_counted_up_to_max_outbound_and_none_without_grants() {
        let net = network(&["127.0.0.1:6379"], 2);
        assert!(net.may_create() && net.may_create());
        assert!(!net.may_create());
        assert!(!net.may_create());
        assert!(!network(&[], 8).may_create());
    }

    #[test]
    fn lookups_only_of_granted_names_and_addresses() {
        let net = network(&["localhost:6379"], 8);
        assert!(net.may_resolve("localhost") && net.may_resolve("LOCALHOST."));
        assert!(net.may_resolve("127.0.0.1") && net.may_resolve("::1"));
        assert!(!net.may_resolve("example.com"));
    }
}
