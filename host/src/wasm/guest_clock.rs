//! The guest's monotonic clock, and sleeps that end at the connection's
//! deadline: a guest blocked in `subscribe-duration`/`subscribe-instant` wakes
//! no later than its `--timeout`, the connection is marked timed out (its
//! streams refuse further I/O), and the guest traps at its next epoch check.
//! A long sleep cannot outlive the limit, nor a forced shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime_wasi::clocks::HostMonotonicClock;
use wasmtime_wasi_io::poll::{subscribe, DynPollable, Pollable};

/// The `wasi:clocks` interface whose subscriptions are replaced.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The connection a guest's sleeps belong to, as they see it (the
/// connection layer's socket): when its time is up, and whether the host
/// ended it.
pub(crate) trait Deadline: Send + Sync {
    /// When the connection's `--timeout` runs out.
    fn deadline(&self) -> Instant;
    /// Resolves once the host has ended the connection.
    fn aborted(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Records that the connection ran into its `--timeout`.
    fn mark_timed_out(&self);
}

/// What the capped sleeps need of a store's data.
pub(crate) trait SleepState: Send + 'static {
    fn clock(&self) -> &GuestClock;
    fn deadline(&self) -> &Arc<dyn Deadline>;
    fn table(&mut self) -> &mut ResourceTable;
}

/// Nanoseconds since the connection's store was created.
#[derive(Clone, Copy)]
pub(crate) struct GuestClock {
    pub(crate) base: Instant,
}

impl GuestClock {
    fn now_nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.now_nanos()
    }
}

/// A sleep that ends at `until`, or when the connection is aborted;
/// `cut_short` when `until` is the deadline rather than what the guest asked
/// for.
struct Sleep {
    until: tokio::time::Instant,
    socket: Arc<dyn Deadline>,
    cut_short: bool,
}

#[wasmtime_wasi_io::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        let mut slept = std::pin::pin!(tokio::time::sleep_until(self.until));
        let mut aborted = self.socket.aborted();
        let woke_by_sleep = std::future::poll_fn(|cx| {
            if slept.as_mut().poll(cx).is_ready() {
                Poll::Ready(true)
            } else if aborted.as_mut().poll(cx).is_ready() {
                Poll::Ready(false)
            } else {
                Poll::Pending
            }
        })
        .await;
        if woke_by_sleep && self.cut_short {
            self.socket.mark_timed_out();
        }
    }
}

/// Replaces wasmtime-wasi's `subscribe-duration` and `subscribe-instant` with
/// versions capped at the store's deadline. Call after
/// `wasmtime_wasi::p2::add_to_linker_sync`.
pub(crate) fn add_to_linker<T: SleepState>(linker: &mut Linker<T>) -> Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |store: StoreContextMut<'_, T>, (nanos,): (u64,)| {
            Ok((sleep(store, Duration::from_nanos(nanos))?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |store: StoreContextMut<'_, T>, (when,): (u64,)| {
            let now = store.data().clock().now_nanos();
            Ok((sleep(
                store,
                Duration::from_nanos(when.saturating_sub(now)),
            )?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn sleep<T: SleepState>(
    mut store: StoreContextMut<'_, T>,
    duration: Duration,
) -> wasmtime::Result<Resource<DynPollable>> {
    let state = store.data_mut();
    let now = Instant::now();
    let connection = state.deadline().clone();
    let deadline = connection.deadline();
    let wanted = now.checked_add(duration);
    let cut_short = wanted.is_none_or(|wanted| wanted > deadline);
    let until = if cut_short {
        deadline
    } else {
        wanted.unwrap_or(deadline)
    };
    let table = state.table();
    let sleep = table.push(Sleep {
        until: tokio::time::Instant::from_std(until.max(now)),
        socket: connection,
        cut_short,
    })?;
    subscribe(table, sleep)
}
