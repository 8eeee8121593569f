//! The host's own machine code moved onto anonymous huge pages, for the
//! forking strategy's worker.
//!
//! `fork` copies no page-table entries of a file mapping that holds no
//! anonymous page, so every forked child faulted the host's code in again,
//! 64 KiB at a time, and unmapped it at exit: a quarter of a child's page
//! faults. On 2 MiB anonymous pages the code is mapped by a handful of
//! entries, which `fork` copies and the child shares, and never faults.
//! The cost is the copy's memory: the text's whole 2 MiB pages (14 or 16
//! MiB of the release binary, by where it is loaded), anonymous and once per
//! forking worker, shared by its children.
//!
//! Only where the kernel gives huge pages for `MADV_HUGEPAGE` (transparent
//! huge pages `always` or `madvise`; `never` turns this off): the copy is
//! made, and kept only if it sits wholly on huge pages. Otherwise, or if the
//! text is not exactly the file's (a debugger's breakpoint or a uprobe
//! wrote into it), the text is left as it is.

use std::ptr::null_mut;

/// Why the code was not moved.
#[derive(Debug)]
pub(crate) enum NotMoved {
    /// This kernel, its settings or this process give no whole huge pages
    /// for it, or the text is not the file's as it stands: the host runs as
    /// before, by design.
    Unavailable(String),
    /// A system call failed: the host runs as before, but something is off.
    Failed(String),
}

/// Moves the whole huge pages of the text mapping that holds this function
/// onto anonymous huge pages, and returns how many bytes moved. Refuses,
/// leaving the text as it was, if the process runs more than one thread:
/// the new pages hold the same bytes, but a thread running there meanwhile
/// would stall on the page-table change.
pub(crate) fn move_text_to_huge_pages() -> Result<usize, NotMoved> {
    use NotMoved::{Failed, Unavailable};
    if super::process::thread_count() != Some(1) {
        return Err(Failed("the process runs more than one thread".into()));
    }
    let huge = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .filter(|size| size.is_power_of_two())
        .ok_or_else(|| Unavailable("this kernel has no transparent huge pages".into()))?;
    let here = move_text_to_huge_pages as fn() -> Result<usize, NotMoved> as usize;
    let maps = read("/proc/self/maps").map_err(Failed)?;
    let text =
        mapping_of(&maps, here).ok_or_else(|| Failed("no mapping holds the host's code".into()))?;
    if !(text.file_backed && text.perms.starts_with("r-x")) {
        return Err(Unavailable(format!(
            "the host's code is not a readable file mapping ({}; moved already?)",
            text.perms
        )));
    }
    let smaps = read("/proc/self/smaps").map_err(Failed)?;
    if smaps_kib(&smaps, text.start, "Anonymous:") != Some(0) {
        return Err(Unavailable(
            "the host's code has pages of its own (a debugger's breakpoints or uprobes?)".into(),
        ));
    }
    let from = text.start.next_multiple_of(huge);
    let to = text.end / huge * huge;
    if to <= from {
        return Err(Unavailable(format!(
            "the host's code spans no whole {} KiB page",
            huge >> 10
        )));
    }
    let len = to - from;
    let staging = Staging::new(len, huge).map_err(Failed)?;
    // SAFETY: `from..to` lies inside the text mapping, which is readable
    // (`r-x` above); `staging` is a writable mapping of `len` bytes of our
    // own; the two do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(from as *const u8, staging.start as *mut u8, len) };
    let smaps = read("/proc/self/smaps").map_err(Failed)?;
    let on_huge = smaps_kib(&smaps, staging.start, "AnonHugePages:").unwrap_or(0) << 10;
    if on_huge < len {
        return Err(Unavailable(format!(
            "the kernel gave {} of {} KiB on huge pages",
            on_huge >> 10,
            len >> 10
        )));
    }
    staging.replace(from).map_err(Failed)?;
    Ok(len)
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// The last system call's error, after the name of what failed.
fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A huge-page-aligned anonymous mapping, read-write, advised onto huge
/// pages; unmapped on drop unless it replaced the text.
struct Staging {
    start: usize,
    len: usize,
}

impl Staging {
    fn new(len: usize, huge: usize) -> Result<Staging, String> {
        let reserved = len + huge;
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
            return Err(os_error("mmap"));
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(huge);
        let tail = raw + reserved - (start + len);
        // SAFETY: both ranges are the unaligned ends of our new mapping,
        // outside `start..start + len`.
        let trimmed = unsafe {
            (start == raw || libc::munmap(raw as *mut libc::c_void, start - raw) == 0)
                && libc::munmap((start + len) as *mut libc::c_void, tail) == 0
        };
        if !trimmed {
            let e = os_error("munmap");
            // SAFETY: our new mapping, whatever of it is left.
            unsafe { libc::munmap(raw as *mut libc::c_void, reserved) };
            return Err(e);
        }
        let staging = Staging { start, len };
        // SAFETY: advice on our own mapping, before anything touches it.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            return Err(os_error("madvise(MADV_HUGEPAGE)"));
        }
        Ok(staging)
    }

    /// Makes the copy read-only and executable and moves it over
    /// `target..target + len` (which it must equal byte for byte).
    fn replace(self, target: usize) -> Result<(), String> {
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
            return Err(os_error("mprotect"));
        }
        // SAFETY: `target..target + len` is the text this copy equals byte
        // for byte, so code that runs there (this function returns into it)
        // runs the same before and after, and the caller checked that no
        // other thread runs. `MREMAP_FIXED` unmaps the old pages in the same
        // call. The kernel refuses early (mapping count, limits), leaving the
        // text in place; but should it run out of memory after it unmapped
        // the target, the range is left unmapped and the process crashes on
        // return: a risk only under memory exhaustion.
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
            return Err(os_error("mremap"));
        }
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: our own mapping, which nothing else refers to.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

/// One line of /proc/self/maps.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    /// Whether it maps a file (its inode is not 0).
    file_backed: bool,
}

/// The mapping of `maps` (the text of /proc/self/maps) that holds `address`.
fn mapping_of(maps: &str, address: usize) -> Option<Mapping<'_>> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let perms = fields.next()?;
        let inode = fields.nth(2)?;
        (start..end).contains(&address).then_some(Mapping {
            start,
            end,
            perms,
            file_backed: inode != "0",
        })
    })
}

/// The `field` (e.g. `AnonHugePages:`), in KiB, of the mapping of `smaps`
/// (the text of /proc/self/smaps) that starts at `start`.
fn smaps_kib(smaps: &str, start: usize, field: &str) -> Option<usize> {
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
            if let Some(kib) = line.strip_prefix(field) {
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
55d0c1a00000-55d0c1f91000 r--p 00000000 fe:00 1234 /usr/bin/my host (deleted)
55d0c1f91000-55d0c313e000 r-xp 00590000 fe:00 1234 /usr/bin/my host (deleted)
7f825d600000-7f825f400000 r-xp 00000000 00:00 0 
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
                perms: "r-xp",
                file_backed: true
            }
        );
        let moved = mapping_of(MAPS, 0x7f825d600000).unwrap();
        assert_eq!((moved.perms, moved.file_backed), ("r-xp", false));
        assert_eq!(mapping_of(MAPS, 0x1000), None);
        // The end is outside.
        assert_eq!(mapping_of(MAPS, 0x7f825f400000), None);
    }

    #[test]
    fn a_field_is_read_for_one_mapping() {
        let smaps = "\
7f825d400000-7f825d600000 rw-p 00000000 00:00 0 
Size:               2048 kB
Anonymous:          2048 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac sd
7f825d600000-7f825f400000 r-xp 00000000 00:00 0 
Size:              30720 kB
Rss:               30720 kB
Anonymous:         30720 kB
AnonHugePages:     30720 kB
VmFlags: rd ex mr mw me ac sd hg
";
        let huge = |start| smaps_kib(smaps, start, "AnonHugePages:");
        assert_eq!(huge(0x7f825d600000), Some(30720));
        assert_eq!(huge(0x7f825d400000), Some(0));
        assert_eq!(huge(0x1000), None);
        assert_eq!(smaps_kib(smaps, 0x7f825d400000, "Anonymous:"), Some(2048));
        assert_eq!(smaps_kib(smaps, 0x7f825d400000, "Swap:"), None);
    }
}
