//! Fiber stacks for the async engine, kept for reuse. An on-demand
//! instance's call runs on a fiber whose stack wasmtime maps and unmaps
//! itself: an `mmap`, an `mprotect` for its guard page and an `munmap` per
//! request, each taking the process's memory-map lock for writing, and each
//! `munmap` interrupting every other core to flush its TLB. In the async
//! worker, where every core runs a runtime thread, that cost a fifth of its
//! CPU. A stack given back here is kept (up to [`KEEP`]) and handed to the
//! next call; nothing is unmapped until there are more than that.
//!
//! A reused stack holds what the previous call left in it, as wasmtime's
//! own pooled stacks do unless `async_stack_zeroing` is set; a guest cannot
//! read below its own frames. A stack asked for zeroed is always a fresh
//! mapping.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use wasmtime::{StackCreator, StackMemory};

/// How many free stacks are kept. Only their touched pages are resident: a
/// guest's own frames are bounded by wasmtime's `max_wasm_stack` (512 KiB),
/// so a burst of deep recursions leaves at most about 64 x 0.6 MiB.
const KEEP: usize = 64;

/// Hands out fiber stacks and takes them back (wasmtime's `StackCreator`).
pub(crate) struct StackPool(Arc<Free>);

/// The stacks given back, waiting for the next call.
struct Free {
    free: Mutex<Vec<Mapping>>,
}

/// One stack's mapping: a guard page at its bottom, then `size` bytes.
struct Mapping {
    base: usize,
    guard: usize,
    size: usize,
}

impl StackPool {
    pub(crate) fn new() -> StackPool {
        StackPool(Arc::new(Free {
            free: Mutex::new(Vec::new()),
        }))
    }
}

impl Free {
    fn map(size: usize) -> Result<Mapping, String> {
        let guard = page_size();
        let too_big = || format!("a {size}-byte fiber stack is too big to map");
        let size = size
            .div_ceil(guard)
            .max(1)
            .checked_mul(guard)
            .ok_or_else(too_big)?;
        let len = size.checked_add(guard).ok_or_else(too_big)?;
        // SAFETY: a new anonymous mapping at an address the kernel picks;
        // no pointer is passed.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "cannot map a {size}-byte fiber stack: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mapping = Mapping {
            base: base as usize,
            guard,
            size,
        };
        // SAFETY: the part above the guard page of the mapping just made.
        let rc = unsafe {
            libc::mprotect(
                (mapping.base + guard) as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            unmap(&mapping);
            return Err(format!("cannot map a {size}-byte fiber stack: {err}"));
        }
        Ok(mapping)
    }

    fn give_back(&self, mapping: Mapping) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEEP {
            free.push(mapping);
        } else {
            drop(free);
            unmap(&mapping);
        }
    }
}

fn unmap(mapping: &Mapping) {
    // SAFETY: a whole mapping made by `StackPool::map`, used by no stack
    // any more (its owner is being dropped or was never made).
    unsafe {
        libc::munmap(
            mapping.base as *mut libc::c_void,
            mapping.guard + mapping.size,
        );
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes no pointer.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// A stack in use; back to its pool when wasmtime drops it.
struct Stack {
    mapping: Option<Mapping>,
    pool: Arc<Free>,
}

// SAFETY: every stack is its own page-aligned mapping, a whole number of
// pages, with a guard page (PROT_NONE) below it; a mapping is in use by at
// most one `Stack` at a time (it leaves the free list when handed out).
unsafe impl StackCreator for StackPool {
    fn new_stack(&self, size: usize, zeroed: bool) -> wasmtime::Result<Box<dyn StackMemory>> {
        let reused = if zeroed {
            None
        } else {
            let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
            let at = free.iter().rposition(|m| m.size >= size);
            at.map(|at| free.swap_remove(at))
        };
        let mapping = match reused {
            Some(mapping) => mapping,
            None => Free::map(size).map_err(wasmtime::Error::msg)?,
        };
        Ok(Box::new(Stack {
            mapping: Some(mapping),
            pool: self.0.clone(),
        }))
    }
}

// SAFETY: as for `StackCreator` above: the ranges describe the mapping this
// stack holds alone.
unsafe impl StackMemory for Stack {
    fn top(&self) -> *mut u8 {
        let m = self
            .mapping
            .as_ref()
            .expect("a stack in use has its mapping");
        (m.base + m.guard + m.size) as *mut u8
    }

    fn range(&self) -> Range<usize> {
        let m = self
            .mapping
            .as_ref()
            .expect("a stack in use has its mapping");
        m.base + m.guard..m.base + m.guard + m.size
    }

    fn guard_range(&self) -> Range<*mut u8> {
        let m = self
            .mapping
            .as_ref()
            .expect("a stack in use has its mapping");
        m.base as *mut u8..(m.base + m.guard) as *mut u8
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mapping) = self.mapping.take() {
            self.pool.give_back(mapping);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_given_back_is_handed_out_again_and_zeroed_ones_are_fresh() {
        let pool = StackPool::new();
        let first = pool.new_stack(64 * 1024, false).unwrap();
        let top = first.top();
        assert_eq!(first.range().len(), 64 * 1024);
        assert_eq!(first.guard_range().end as usize, first.range().start);
        // The stack is writable all the way down to its guard page.
        // SAFETY: inside the stack's writable range.
        unsafe { *(first.range().start as *mut u8) = 1 };
        drop(first);
        let again = pool.new_stack(64 * 1024, false).unwrap();
        assert_eq!(again.top(), top, "the free stack was not reused");
        let zeroed = pool.new_stack(64 * 1024, true).unwrap();
        assert_ne!(zeroed.top(), top);
        // SAFETY: inside the stack's writable range.
        assert_eq!(unsafe { *(zeroed.range().start as *const u8) }, 0);
    }

    #[test]
    fn no_more_than_keep_stacks_are_kept() {
        let pool = StackPool::new();
        let stacks: Vec<_> = (0..KEEP + 3)
            .map(|_| pool.new_stack(16 * 1024, false).unwrap())
            .collect();
        drop(stacks);
        assert_eq!(pool.0.free.lock().unwrap().len(), KEEP);
    }
}
