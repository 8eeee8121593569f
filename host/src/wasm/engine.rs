//! The one `Engine` of a host process, configured for the strategy that will
//! run it, and the epoch clock that enforces `--timeout`.

use std::time::Duration;

use anyhow::{anyhow, Result};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::settings::{ServeConfig, StrategyKind};
use crate::sys::fiber_stacks::StackPool;
use crate::wasm::one_line;

/// The epoch ticker's period: the precision of `--timeout` under threading.
const TICK: Duration = Duration::from_millis(10);
/// The async strategy's tick: how long a guest runs before it gives the
/// runtime thread to the other connections (so 20 spinning guests delay an
/// echo by about 10 ms per turn it needs).
const ASYNC_TICK: Duration = Duration::from_micros(500);

/// Builds the engine for `strategy`, with room for `instances` instances of
/// at most `max_memory` bytes at once.
///
/// - threading: the pooling allocator with copy-on-write memory images, one
///   slot per worker, and parallel compilation;
/// - prefork: the same pool in each worker process, but compilation on the
///   main thread, as the workers are forked afterwards;
/// - forking: on-demand allocation (a child instantiates once, and a pool's
///   large reservations would make every `fork()` slower) and compilation on
///   the main thread, so that no thread exists when the accept loop forks.
///
/// Both use epoch interruption, so a guest spinning without host calls stops
/// at its deadline.
pub(crate) fn build(strategy: StrategyKind, instances: usize, max_memory: u64) -> Result<Engine> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.epoch_interruption(true);
    match strategy {
        StrategyKind::Threading | StrategyKind::Prefork => {
            // Prefork forks after compiling: no compiler threads before that.
            wasm.parallel_compilation(strategy == StrategyKind::Threading);
            let pooled = with_pool(wasm.clone(), instances, max_memory);
            match Engine::new(&pooled) {
                Ok(engine) => return Ok(engine),
                Err(e) => tracing::warn!(
                    "the pooling allocator is not available ({}); instances are allocated on demand",
                    one_line(&e)
                ),
            }
        }
        StrategyKind::Forking | StrategyKind::Async => {
            wasm.parallel_compilation(false);
        }
    }
    Engine::new(&wasm).map_err(|e| anyhow!("cannot create the wasm engine: {}", one_line(&e)))
}

/// The one engine of `host serve`, for every tenant, built in the host
/// process before any worker is forked (so compilation runs on the main
/// thread: the host process starts no thread).
///
/// If every tenant uses the forking strategy, instances are allocated on
/// demand, as [`build`] does for it. Otherwise the pooling allocator is
/// sized for the tenant that needs the most instances in one process and for
/// the largest `max-memory`; with `headroom` (a config file, which a reload
/// may change) at least [`RELOAD_SLOTS`] slots of up to 4 GiB each, so most
/// reloads fit. Returns the engine and its slot count (`None`: on demand).
pub(crate) fn for_host(tenants: &[ServeConfig], headroom: bool) -> Result<(Engine, Option<usize>)> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.epoch_interruption(true);
    wasm.parallel_compilation(false);
    // Async tenants have an engine of their own (`for_async`).
    let tenants: Vec<&ServeConfig> = tenants
        .iter()
        .filter(|t| t.strategy.kind() != StrategyKind::Async)
        .collect();
    if tenants
        .iter()
        .all(|t| t.strategy.kind() == StrategyKind::Forking)
    {
        let engine = Engine::new(&wasm)
            .map_err(|e| anyhow!("cannot create the wasm engine: {}", one_line(&e)))?;
        return Ok((engine, None));
    }
    let mut slots = tenants.iter().map(|t| t.max_instances()).max().unwrap_or(1);
    let mut max_memory = tenants
        .iter()
        .map(|t| t.limits.max_memory)
        .max()
        .unwrap_or(0);
    if headroom {
        slots = slots.max(RELOAD_SLOTS);
        max_memory = 4 << 30;
    }
    let pooled = with_pool(wasm.clone(), slots, max_memory);
    match Engine::new(&pooled) {
        Ok(engine) => Ok((engine, Some(slots))),
        Err(e) => {
            tracing::warn!(
                "the pooling allocator is not available ({}); instances are allocated on demand",
                one_line(&e)
            );
            let engine = Engine::new(&wasm)
                .map_err(|e| anyhow!("cannot create the wasm engine: {}", one_line(&e)))?;
            Ok((engine, None))
        }
    }
}

/// The engine of the async tenants, built in the host process like the
/// other (compilation on the main thread). Instances are allocated on
/// demand: an async worker holds thousands of live instances, more than a
/// pool of 4 GiB reservations fits in the address space, and an on-demand
/// instance's memory goes back to the system when its connection ends, so
/// a burst leaves nothing pinned. Same compilation settings as the other
/// engine, so a handler's compiled code (and its cache entry) is the same.
pub(crate) fn for_async() -> Result<Engine> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.epoch_interruption(true);
    wasm.parallel_compilation(false);
    // Each call's fiber stack is reused, not mapped and unmapped per call.
    wasm.with_host_stack(std::sync::Arc::new(StackPool::new()));
    Engine::new(&wasm).map_err(|e| anyhow!("cannot create the wasm engine: {}", one_line(&e)))
}

/// Bytes of a pool slot's memory and tables kept resident between instances.
const KEEP_RESIDENT: usize = 1 << 20;

/// The fewest pool slots a host run from a config file starts with.
pub(crate) const RELOAD_SLOTS: usize = 128;

fn with_pool(mut wasm: Config, slots: usize, max_memory: u64) -> Config {
    let slots = slots as u32;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(16))
        .total_memories(slots.saturating_mul(4))
        .total_tables(slots.saturating_mul(4))
        .total_stacks(slots)
        .max_memory_size(max_memory as usize)
        // Reset a slot's memory by copying back only the pages the guest
        // dirtied (found with PAGEMAP_SCAN where the kernel has it) instead
        // of madvise(DONTNEED): madvise in a threaded process flushes every
        // core's TLB, which cost a fifth of the host's CPU per connection.
        // Reuse the slots used before: with 1,024 slots per worker, handing
        // out never-used ("cold") slots first, wasmtime's default until 100
        // sit unused, spreads short connections over hundreds of slots,
        // each faulting its pages in once and keeping them resident.
        .max_unused_warm_slots(0)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasm
}

/// What advances the engine's epoch, and so how a store's deadline is set.
#[derive(Clone, Copy, Debug)]
pub(crate) enum EpochClock {
    /// One ticker thread per engine advances the epoch every [`TICK`]
    /// (threading).
    Ticker,
    /// Each process arms a one-shot alarm at its connection's deadline that
    /// advances the epoch once (forking: threads do not survive `fork()`).
    Alarm,
    /// One ticker thread per engine advances the epoch every [`ASYNC_TICK`];
    /// at each tick a guest yields its runtime thread, or traps if its
    /// deadline has passed (async: the store's epoch callback).
    Yield,
}

impl EpochClock {
    /// For threading: starts the engine's one ticker thread, which stops by
    /// itself once the engine is dropped.
    pub(crate) fn start_ticker(engine: &Engine) -> Result<EpochClock> {
        start_ticking(engine, TICK)?;
        Ok(EpochClock::Ticker)
    }

    /// For async: the ticker that makes guests take turns (see `Yield`).
    pub(crate) fn start_yield_ticker(engine: &Engine) -> Result<EpochClock> {
        start_ticking(engine, ASYNC_TICK)?;
        Ok(EpochClock::Yield)
    }

    /// The store deadline, in epoch ticks from now, for `timeout`.
    pub(crate) fn deadline_ticks(self, timeout: Duration) -> u64 {
        match self {
            EpochClock::Ticker => ticks(timeout) + 1,
            EpochClock::Alarm | EpochClock::Yield => 1,
        }
    }

    /// Advances the epoch past every store's deadline: running guests trap at
    /// their next check.
    pub(crate) fn expire_all(self, engine: &Engine, timeout: Duration) {
        for _ in 0..=self.deadline_ticks(timeout) {
            engine.increment_epoch();
        }
    }
}

/// Starts the engine's ticker thread, which stops by itself once the engine
/// is dropped.
fn start_ticking(engine: &Engine, period: Duration) -> Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map_err(|e| anyhow!("cannot start the epoch ticker: {e}"))?;
    Ok(())
}

fn ticks(timeout: Duration) -> u64 {
    (timeout.as_nanos().div_ceil(TICK.as_nanos())) as u64
}
