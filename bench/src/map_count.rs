//! `vm.max_map_count` for the async row at 10,000 live connections: each live
//! async instance costs about 7 memory mappings in the host's worker, and the
//! kernel's default of 65,530 per process holds about 8,000 of them (the
//! host serves no more than fit, and says so). When the bench runs as root it
//! raises the limit for that row and puts it back afterwards, printing both;
//! otherwise it says what the row needs.

use std::path::Path;

const SYSCTL: &str = "/proc/sys/vm/max_map_count";
/// Mappings the host budgets per live async connection.
const PER_CONNECTION: usize = 8;

/// Restores the previous limit when dropped.
pub struct Raised {
    previous: Option<usize>,
}

/// Raises `vm.max_map_count` so `connections` live async instances fit, if
/// it is lower and this process may write it.
pub fn raise_for(connections: usize) -> Raised {
    let Some(current) = read() else {
        return Raised { previous: None };
    };
    let needed = (connections * PER_CONNECTION + 4096).next_power_of_two();
    if current >= needed {
        return Raised { previous: None };
    }
    match std::fs::write(SYSCTL, needed.to_string()) {
        Ok(()) => {
            eprintln!(
                "vm.max_map_count raised from {current} to {needed} for {connections} live async connections (restored after the row)"
            );
            Raised {
                previous: Some(current),
            }
        }
        Err(e) => {
            eprintln!(
                "vm.max_map_count is {current}; {connections} live async connections need about {needed} (sysctl vm.max_map_count={needed}); cannot raise it here ({e}): the host serves what fits"
            );
            Raised { previous: None }
        }
    }
}

fn read() -> Option<usize> {
    if !Path::new(SYSCTL).exists() {
        return None;
    }
    std::fs::read_to_string(SYSCTL).ok()?.trim().parse().ok()
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            if let Err(e) = std::fs::write(SYSCTL, previous.to_string()) {
                eprintln!("cannot restore vm.max_map_count to {previous}: {e}");
            } else {
                eprintln!("vm.max_map_count restored to {previous}");
            }
        }
    }
}
