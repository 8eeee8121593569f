//! The host's log on stderr through `tracing`: human-readable lines, or one
//! JSON object per line for log shippers (`--log-format json`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cli::LogFormat;

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the log is JSON (events then carry their values as fields too).
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// One of the stable lines scripts wait for (`listening on ADDR
/// tenant=NAME`): a bare line in the text log, an event whose message is
/// that line in the JSON log, so every line stays JSON there.
pub fn announce(line: &str) {
    if json() {
        tracing::info!("{line}");
    } else {
        // One write(2), so other processes' lines cannot land inside it.
        use std::io::Write as _;
        let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
    }
}

/// Installs the stderr logger. Call once, before serving.
pub fn init(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_max_level(tracing::Level::INFO);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}
