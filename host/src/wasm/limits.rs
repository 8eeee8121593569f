//! The memory cap of one instance: all of its linear memories and tables
//! together, enforced as wasmtime asks to grow any of them. A refused growth
//! makes `memory.grow` return -1 (or instantiation fail); the guest decides
//! whether that is fatal, and the connection's outcome says `memory-limit`
//! when it was.

use wasmtime::ResourceLimiter;

/// What a table element is counted as.
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

pub(crate) struct InstanceLimiter {
    limit: usize,
    used: usize,
    peak: usize,
    refused: bool,
    /// The last growth allowed, undone if wasmtime then fails it.
    last_grant: usize,
}

impl InstanceLimiter {
    pub(crate) fn new(limit: u64) -> InstanceLimiter {
        InstanceLimiter {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: 0,
            peak: 0,
            refused: false,
            last_grant: 0,
        }
    }

    /// Whether a growth was refused for this instance.
    pub(crate) fn refused(&self) -> bool {
        self.refused
    }

    /// The most bytes the instance held at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let used = self.used - current.min(self.used) + desired;
        if used > self.limit {
            self.refused = true;
            return false;
        }
        self.last_grant = used - self.used.min(used);
        self.used = used;
        self.peak = self.peak.max(used);
        true
    }

    /// wasmtime could not perform a growth this limiter allowed.
    fn undo_last(&mut self) {
        self.used -= self.last_grant.min(self.used);
        self.last_grant = 0;
    }
}

impl ResourceLimiter for InstanceLimiter {
    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.undo_last();
        Ok(())
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.undo_last();
        Ok(())
    }

    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(
            current.saturating_mul(TABLE_ELEMENT_BYTES),
            desired.saturating_mul(TABLE_ELEMENT_BYTES),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceLimiter;

    #[test]
    fn counts_every_memory_and_table_together() {
        let mut limiter = InstanceLimiter::new(100);
        assert!(limiter.grow(0, 60)); // memory A
        assert!(limiter.grow(0, 30)); // memory B
        assert!(!limiter.grow(60, 80)); // A may not take B's share
        assert!(limiter.refused());
        assert!(limiter.grow(30, 40)); // B grows within the total
        assert_eq!(limiter.peak(), 100);
        limiter.undo_last(); // ... but wasmtime failed that growth
        assert!(limiter.grow(30, 40));
    }
}
