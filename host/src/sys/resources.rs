//! Resource limits and memory: the open-file limit, the allocator's free
//! memory, and a page shared with forked children.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// The soft limit on open descriptors, or `None` when there is none.
pub(crate) fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

/// Raises the soft limit on open descriptors to the hard one. Err holds the
/// soft limit that stays.
pub(crate) fn raise_descriptor_limit() -> Result<(), u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with valid structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                return Err(limit.rlim_cur);
            }
        }
    }
    Ok(())
}

/// Returns the allocator's free memory (every thread's arena) to the
/// system.
pub(crate) fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One `u64` in memory shared with every process forked after it was made
/// (an anonymous shared mapping), zero at first. Unmapped on drop.
pub(crate) struct SharedU64 {
    page: NonNull<AtomicU64>,
}

// SAFETY: the value is only ever used through atomic operations.
unsafe impl Send for SharedU64 {}
unsafe impl Sync for SharedU64 {}

impl SharedU64 {
    pub(crate) fn new() -> io::Result<SharedU64> {
        // SAFETY: a fresh anonymous shared mapping of one u64, zero-filled.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<u64>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page =
            NonNull::new(page.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedU64 { page })
    }

    pub(crate) fn get(&self) -> &AtomicU64 {
        // SAFETY: the mapping lives as long as `self`; zero is a valid u64.
        unsafe { self.page.as_ref() }
    }
}

impl Drop for SharedU64 {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once.
        unsafe { libc::munmap(self.page.as_ptr().cast(), std::mem::size_of::<u64>()) };
    }
}
