//! The host's log: human-readable lines on stderr through `tracing`.

use std::io::IsTerminal;

/// Installs the stderr logger. Call once, before serving.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(tracing::Level::INFO)
        .try_init();
}
