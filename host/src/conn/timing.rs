//! `host check`'s figures: the cost of a connection's fresh store and
//! instance, and of a whole call, measured on the very path `Service::serve`
//! takes (the same store, streams and close), without its line and counters.
//! Kept apart so the connection path carries no timing code.

use anyhow::Context as _;
use std::time::{Duration, Instant};

use crate::conn::report::{classify, Ending};
use crate::conn::service::{close, Service};
use crate::conn::socket::{Socket, Waits};
use crate::listener::local_of;
use crate::wasm::direct_streams::block_on;
use crate::wasm::handler::ConnectionInfo;
use crate::wasm::one_line;

impl Service {
    /// `host check`'s instantiation figure: a fresh store, made as every
    /// connection's is (`Service::new_store`), over `stream`, and the time
    /// `instantiate` alone takes in it. The socket is not read or written,
    /// so one connection serves any number of these.
    pub(crate) fn time_instantiate(&self, stream: &socket2::Socket) -> anyhow::Result<Duration> {
        let socket = Socket::new(
            stream.try_clone()?,
            self.limits().idle_timeout,
            Instant::now() + self.limits().timeout,
            Waits::Blocking,
        );
        let mut store = self
            .new_store(0, &socket, Waits::Blocking, None)
            .map_err(anyhow::Error::msg)?;
        let started = Instant::now();
        self.handler()
            .pre()
            .context("not a handler of the host:handler/handler world")?
            .instantiate(&mut store)
            .map_err(|e| anyhow::anyhow!("instantiation failed: {}", one_line(&e)))?;
        Ok(started.elapsed())
    }

    /// `host check`'s instantiate + call figure: serves the accepted `stream`
    /// as [`Service::serve`] does, without its log line and counters, and
    /// returns how long `Service::run_guest` took (the fresh store, the
    /// streams, the instance, the whole `handle` call, and the store's drop,
    /// which sends what the output still buffers and frees the instance) and
    /// how the connection ended. The connection is closed, as `serve` closes
    /// it, before this returns.
    pub(crate) fn time_call(&self, stream: socket2::Socket, id: u64) -> (Duration, Ending) {
        let _ = stream.set_tcp_nodelay(true);
        let peer = stream.peer_addr().ok().and_then(|a| a.as_socket());
        let info = ConnectionInfo {
            peer_address: peer.map_or_else(|| "unknown".into(), |a| a.to_string()),
            local_address: local_of(&stream),
            connection_id: id,
            worker: "check".to_string(),
            tenant: self.tenant().to_string(),
        };
        let socket = Socket::new(
            stream,
            self.limits().idle_timeout,
            Instant::now() + self.limits().timeout,
            Waits::Blocking,
        );
        let started = Instant::now();
        let (result, limiter) = self.run_guest(&socket, &info);
        block_on(socket.finish_output());
        let took = started.elapsed();
        let ending = classify(result, &socket, limiter.as_ref());
        block_on(close(&socket, ending.outcome));
        (took, ending)
    }
}
