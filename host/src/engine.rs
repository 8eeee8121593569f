//! The one `Engine` of a host process, configured for the strategy that will
//! run it.

use anyhow::{anyhow, Result};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::{ServeConfig, StrategyKind};
use crate::handler::one_line;

/// Builds the engine for `config`.
///
/// - threading: the pooling allocator with copy-on-write memory images, sized
///   for the connections that can be in flight at once, and parallel
///   compilation;
/// - forking: on-demand allocation (a child instantiates once, and a pool's
///   large reservations would make every `fork()` slower) and compilation on
///   the main thread, so that no thread exists when the accept loop forks.
pub fn build(config: &ServeConfig) -> Result<Engine> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    match config.strategy {
        StrategyKind::Threading => {
            wasm.parallel_compilation(true);
            let slots = config.max_in_flight() as u32;
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(slots)
                .total_core_instances(slots.saturating_mul(16))
                .total_memories(slots.saturating_mul(4))
                .total_tables(slots.saturating_mul(4))
                .total_stacks(slots)
                .max_memory_size(config.max_memory as usize);
            let mut pooled = wasm.clone();
            pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            match Engine::new(&pooled) {
                Ok(engine) => return Ok(engine),
                Err(e) => tracing::warn!(
                    "the pooling allocator is not available ({}); instances are allocated on demand",
                    one_line(&e)
                ),
            }
        }
        StrategyKind::Forking => {
            wasm.parallel_compilation(false);
        }
    }
    Engine::new(&wasm).map_err(|e| anyhow!("cannot create the wasm engine: {}", one_line(&e)))
}
