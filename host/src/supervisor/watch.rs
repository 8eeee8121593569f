//! `--watch`: what the host compares, every [`WATCH_INTERVAL`], to see that
//! the config file or a handler file changed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::settings::HostConfig;
use crate::wasm::handler::HandlerSource;

/// How often `--watch` looks at the config and handler files.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// What `--watch` compares: a file's identity, size and times. The inode
/// catches a file replaced by a rename even within one tick of the
/// file-system clock, which modification times alone would miss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    ctime: (i64, i64),
}

/// The files `--watch` looks at in `config`, with their stamps (`None`:
/// missing or unreadable).
pub(super) fn watch_list(config: &HostConfig) -> Vec<(PathBuf, Option<FileStamp>)> {
    use std::os::unix::fs::MetadataExt;
    let mut paths: BTreeSet<PathBuf> = BTreeSet::new();
    paths.extend(config.file.clone());
    for tenant in &config.tenants {
        if let HandlerSource::File(path) = &tenant.handler {
            paths.insert(path.clone());
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let stamp = std::fs::metadata(&p).ok().map(|m| FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                modified: m.modified().ok(),
                ctime: (m.ctime(), m.ctime_nsec()),
            });
            (p, stamp)
        })
        .collect()
}
