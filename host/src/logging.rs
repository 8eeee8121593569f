//! The host's log on stderr through `tracing`: human-readable lines, or one
//! JSON object per line for log shippers (`--log-format json`), filtered by
//! `--log-level` (tracing-subscriber's `Targets`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::settings::{LogFormat, LogLevel, LogLevelName};

/// The target of the stable lines ([`announce`]), which every log level
/// writes.
const ANNOUNCE: &str = "host::announce";

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the log is JSON (events then carry their values as fields too).
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// `text` fit for one line of the log: every control character (C0, DEL,
/// C1) and the Unicode line and paragraph separators are written as an
/// escape (`\n`, `\r`, `\t`, `\u{1b}`), so a value a client or a guest
/// controls (a Unix peer's path, a guest's output) can neither start a line
/// of its own nor drive the reader's terminal. Everything else is kept.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.contains(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One of the stable lines scripts wait for (`listening on ADDR
/// tenant=NAME`): a bare line in the text log, an event whose message is
/// that line in the JSON log, so every line stays JSON there.
pub fn announce(line: &str) {
    if json() {
        tracing::info!(target: ANNOUNCE, "{line}");
    } else {
        // One write(2), so other processes' lines cannot land inside it.
        use std::io::Write as _;
        let _ = Stderr.write_all(format!("{line}\n").as_bytes());
    }
}

/// Standard error without std's lock: the logger hands over each event
/// formatted in full, and one write(2) of it needs no lock (the kernel keeps
/// a write to a pipe of up to 4 KiB whole). Worker threads logging their
/// connections' lines at once otherwise queue on std's stderr mutex.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::sys::pipe::write(2, buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the stderr logger, writing what `level` lets through. Call
/// once, before serving (forked processes inherit it).
pub fn init(format: LogFormat, level: &LogLevel) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    let mut targets = Targets::new().with_default(filter(level.default));
    for (target, level) in &level.targets {
        targets = targets.with_target(target.clone(), filter(*level));
    }
    let mut most = level.most_verbose();
    if format == LogFormat::Json {
        // The stable lines are events there: written at every level.
        targets = targets.with_target(ANNOUNCE, LevelFilter::INFO);
        most = most.max(LogLevelName::Info);
    }
    // The outer bound equals the filter's own, so events no target wants are
    // turned away by the level check in `tracing`'s macros, as before.
    let builder = tracing_subscriber::fmt()
        .with_writer(|| Stderr)
        .with_target(false)
        .with_max_level(filter(most));
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(targets)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .finish()
            .with(targets)
            .try_init(),
    };
}

fn filter(level: LogLevelName) -> LevelFilter {
    match level {
        LogLevelName::Off => LevelFilter::OFF,
        LogLevelName::Error => LevelFilter::ERROR,
        LogLevelName::Warn => LevelFilter::WARN,
        LogLevelName::Info => LevelFilter::INFO,
        LogLevelName::Debug => LevelFilter::DEBUG,
        LogLevelName::Trace => LevelFilter::TRACE,
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("unix:/tmp/plain.sock"), "unix:/tmp/plain.sock");
        assert_eq!(
            escape("a\nINFO forged\r\tx\u{0}\u{1b}[2J\u{7f}\u{85}\u{9f}\u{2028}é"),
            "a\\nINFO forged\\r\\tx\\u{0}\\u{1b}[2J\\u{7f}\\u{85}\\u{9f}\\u{2028}é"
        );
    }
}
