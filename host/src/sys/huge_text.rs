//! The host's own machine code moved onto anonymous huge pages, for the
//! forking strategy's worker.
//!
//! `fork` copies no page-table entries of a file mapping that holds no
//! anonymous page, so every forked child faulted the host's code in again,
//! 64 KiB at a time, and unmapped it at exit: a third of a child's page
//! faults. On 2 MiB anonymous pages the code is mapped by a handful of
//! entries, which `fork` copies and the child shares, and never faults.
//! The cost is the copy's memory: the text's 2 MiB-aligned part (16 MiB of
//! the release binary), once per forking worker, shared by its children.
//!
//! Only where the kernel gives huge pages for `MADV_HUGEPAGE` (transparent
//! huge pages `always` or `madvise`; `never` turns this off): the copy is
//! made, and kept only if it sits wholly on huge pages. Otherwise the text
//! is left as it is.

use std::ptr::null_mut;

/// The huge page size of x86-64 and aarch64 (4 KiB base pages).
const HUGE: usize = 2 << 20;

/// Moves the 2 MiB-aligned part of the text mapping that holds this
/// function onto anonymous huge pages, and returns its length. `Err` says
/// why nothing moved; the text is then unchanged.
///
/// Call it where no other thread runs (the forking worker before it
/// forks): the new pages hold the same bytes, but a thread running there
/// meanwhile would stall on the page-table change.
pub(crate) fn move_text_to_huge_pages() -> Result<usize, String> {
    let here = move_text_to_huge_pages as fn() -> Result<usize, String> as usize;
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let text = mapping_of(&maps, here).ok_or("no mapping holds the host's code")?;
    if !text.file_backed {
        return Err("the host's code is not a file mapping (moved already?)".into());
    }
    let from = text.start.next_multiple_of(HUGE);
    let to = text.end / HUGE * HUGE;
    if to <= from {
        return Err("the host's code spans no whole 2 MiB page".into());
    }
    let len = to - from;
    let copy = Copy::new(len)?;
    // SAFETY: `from..to` lies inside the readable text mapping; `copy` is a
    // writable mapping of `len` bytes of our own; the two do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(from as *const u8, copy.start as *mut u8, len) };
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| format!("cannot read /proc/self/smaps: {e}"))?;
    let huge = anon_huge_kib(&smaps, copy.start).unwrap_or(0) * 1024;
    if huge < len {
        return Err(format!(
            "the kernel gave {} of {} KiB on huge pages (transparent huge pages off?)",
            huge / 1024,
            len / 1024
        ));
    }
    copy.replace(from)?;
    Ok(len)
}

/// A 2 MiB-aligned anonymous mapping, read-write, advised onto huge pages;
/// unmapped on drop unless it replaced the text.
struct Copy {
    start: usize,
    len: usize,
}

impl Copy {
    fn new(len: usize) -> Result<Copy, String> {
        let error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        let reserved = len + HUGE;
        // SAFETY: a new private anonymous mapping; nothing refers to it.
        let raw = unsafe {
            libc::mmap(
                null_mut(),
                reserved,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(error("mmap"));
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(HUGE);
        let tail = raw + reserved - (start + len);
        // SAFETY: both ranges are the unaligned ends of our new mapping,
        // outside `start..start + len`.
        unsafe {
            if start > raw {
                libc::munmap(raw as *mut libc::c_void, start - raw);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        let copy = Copy { start, len };
        // SAFETY: advice on our own mapping, before anything touches it.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            return Err(error("madvise(MADV_HUGEPAGE)"));
        }
        Ok(copy)
    }

    /// Makes the copy read-only and executable and moves it over
    /// `target..target + len` (which it must equal byte for byte).
    fn replace(self, target: usize) -> Result<(), String> {
        let error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        let (start, len) = (self.start, self.len);
        // SAFETY: our own mapping.
        let protect = unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if protect != 0 {
            return Err(error("mprotect"));
        }
        // SAFETY: `target..target + len` is the text this copy equals byte
        // for byte, so code that runs there (this function returns into it)
        // runs the same before and after; the caller's contract keeps other
        // threads out. `MREMAP_FIXED` unmaps the old pages in the same call;
        // the kernel checks the mapping count first, so a refusal leaves the
        // text in place (only a failure to allocate page tables midway, under
        // memory exhaustion, could leave the range unmapped).
        let moved = unsafe {
            libc::mremap(
                start as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target as *mut libc::c_void,
            )
        };
        if moved as usize != target {
            return Err(error("mremap"));
        }
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        // SAFETY: our own mapping, which nothing else refers to.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

/// One line of /proc/self/maps.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// Whether it maps a file (its inode is not 0).
    file_backed: bool,
}

/// The mapping of `maps` (the text of /proc/self/maps) that holds `address`.
fn mapping_of(maps: &str, address: usize) -> Option<Mapping> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let inode = fields.nth(3)?;
        (start..end).contains(&address).then(|| Mapping {
            start,
            end,
            file_backed: inode != "0",
        })
    })
}

/// `AnonHugePages` in KiB of the mapping of `smaps` (the text of
/// /proc/self/smaps) that starts at `start`.
fn anon_huge_kib(smaps: &str, start: usize) -> Option<usize> {
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if let Some((from, _)) = first.split_once('-') {
            if let Ok(from) = usize::from_str_radix(from, 16) {
                inside = from == start;
                continue;
            }
        }
        if inside {
            if let Some(kib) = line.strip_prefix("AnonHugePages:") {
                return kib.trim().strip_suffix("kB")?.trim().parse().ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c1a00000-55d0c1f91000 r--p 00000000 fe:00 1234 /usr/bin/host
55d0c1f91000-55d0c313e000 r-xp 00590000 fe:00 1234 /usr/bin/host
7f825d600000-7f825f400000 rw-p 00000000 00:00 0 
7ffd1c3a2000-7ffd1c3c3000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn the_mapping_holding_an_address_is_found() {
        let text = mapping_of(MAPS, 0x55d0c2000000).unwrap();
        assert_eq!(
            text,
            Mapping {
                start: 0x55d0c1f91000,
                end: 0x55d0c313e000,
                file_backed: true
            }
        );
        assert!(!mapping_of(MAPS, 0x7f825d600000).unwrap().file_backed);
        assert_eq!(mapping_of(MAPS, 0x1000), None);
        // The end is outside.
        assert_eq!(mapping_of(MAPS, 0x7f825f400000), None);
    }

    #[test]
    fn anon_huge_pages_are_read_for_one_mapping() {
        let smaps = "\
7f825d400000-7f825d600000 rw-p 00000000 00:00 0 
Size:               2048 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac sd
7f825d600000-7f825f400000 r-xp 00000000 00:00 0 
Size:              30720 kB
Rss:               30720 kB
AnonHugePages:     30720 kB
VmFlags: rd ex mr mw me ac sd hg
";
        assert_eq!(anon_huge_kib(smaps, 0x7f825d600000), Some(30720));
        assert_eq!(anon_huge_kib(smaps, 0x7f825d400000), Some(0));
        assert_eq!(anon_huge_kib(smaps, 0x1000), None);
    }
}
