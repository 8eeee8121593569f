//! The host's log on stderr through `tracing`: human-readable lines, or one
//! JSON object per line for log shippers (`--log-format json`).

use std::io::IsTerminal;

use crate::cli::LogFormat;

/// Installs the stderr logger. Call once, before serving.
pub fn init(format: LogFormat) {
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
