//! Memory shared between processes: an anonymous shared mapping, made
//! before a `fork()` so that every process forked afterwards sees the same
//! pages.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// `len` bytes of zero-filled, page-aligned memory shared with every process
/// forked after it was made; unmapped when dropped (in this process only).
pub(crate) struct SharedMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; what is stored in
// it, and how it is accessed, is its user's to make thread-safe.
unsafe impl Send for SharedMapping {}
// SAFETY: as above; `&SharedMapping` only hands out the base pointer.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    pub(crate) fn new(len: usize) -> io::Result<SharedMapping> {
        // SAFETY: a fresh anonymous shared mapping; no existing memory is
        // touched. The kernel zero-fills it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMapping { base, len })
    }

    /// The first byte: page-aligned, valid for `len` bytes while `self` lives.
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once; no reference into it
        // outlives `self` (its users borrow from it).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One `u64` in memory shared with every process forked after it was made,
/// zero at first.
pub(crate) struct SharedU64 {
    memory: SharedMapping,
}

impl SharedU64 {
    pub(crate) fn new() -> io::Result<SharedU64> {
        Ok(SharedU64 {
            memory: SharedMapping::new(std::mem::size_of::<AtomicU64>())?,
        })
    }

    pub(crate) fn get(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned, at least 8 bytes long,
        // zero-filled (a valid AtomicU64) and lives as long as `self`; it is
        // only ever used through atomic operations.
        unsafe { &*self.memory.base().as_ptr().cast::<AtomicU64>() }
    }
}
