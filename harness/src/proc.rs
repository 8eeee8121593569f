//! A process tree as /proc shows it: a process's children, all its
//! descendants, its threads, and whether a pid is still there or still
//! running. The one
//! walker for the tests' resource counts and the bench's memory and CPU
//! figures.

use std::fs;

/// The children of `pid`, forked by any of its threads, zombies included
/// (the kernel's own lists, `/proc/PID/task/TID/children`). Empty if `pid`
/// is gone. A child that exits or is re-parented while this reads may be
/// missed, so a caller waiting for a count polls.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        // A thread may exit while this reads: count what is there.
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            children.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children
}

/// `pid` and all its descendants, parents before their children.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let more = children(pids[i]);
        pids.extend(more);
        i += 1;
    }
    pids
}

/// The threads `pid` runs (0 if it is gone).
pub fn threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |tasks| tasks.count())
}

/// Whether a process with this pid exists (a zombie counts).
pub fn exists(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// Whether `pid` exists and is not a zombie (a process that has exited and
/// waits to be reaped has stopped running for good).
pub fn running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_child_is_in_the_tree_and_gone_after_its_reaping() {
        let mut child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let me = std::process::id();
        let pid = child.id();
        assert!(children(me).contains(&pid));
        assert!(tree(me).contains(&pid));
        assert!(exists(pid) && running(pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children(me).contains(&pid));
        assert!(!exists(pid) && !running(pid));
        assert_eq!(tree(u32::MAX), [u32::MAX]);
        assert!(children(u32::MAX).is_empty());
    }
}
