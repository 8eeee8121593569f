//! `--log-level` and the config file's `log-level`: which log events are
//! written. One level (`error`, `warn`, `info`, `debug`, `trace`, `off`),
//! or `RUST_LOG`-style directives as tracing-subscriber's `Targets` reads
//! them: `TARGET=LEVEL` items separated by commas, with at most one bare
//! `LEVEL` for every other target (`info` when none is given). A target
//! is a module path prefix such as `host::conn`. Only the value: the log
//! itself is `crate::logging`.

use std::fmt;

use anyhow::{anyhow, Result};

use super::values::one_of;

/// A level of the log, from the quietest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    const ALL: [Level; 6] = [
        Level::Error,
        Level::Warn,
        Level::Info,
        Level::Debug,
        Level::Trace,
        Level::Off,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    /// A level's name, in any case.
    fn parse(text: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|level| level.name().eq_ignore_ascii_case(text))
    }
}

/// What the log writes: events at `default` or above, except for the
/// targets named in `targets` (in the order given), each at its own level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLevel {
    pub default: Level,
    pub targets: Vec<(String, Level)>,
}

impl Default for LogLevel {
    /// `info`: every connection's `closed` line and the host's own events.
    fn default() -> LogLevel {
        LogLevel {
            default: Level::Info,
            targets: Vec::new(),
        }
    }
}

impl LogLevel {
    /// The most verbose level any target is written at.
    pub fn most_verbose(&self) -> Level {
        self.targets
            .iter()
            .map(|(_, level)| *level)
            .fold(self.default, Level::max)
    }

    /// `text` as `name` (`--log-level`, `log-level`) gave it.
    pub fn parse(name: &str, text: &str) -> Result<LogLevel> {
        let levels = one_of(&Level::ALL.map(Level::name));
        let bad = |why: String| anyhow!("invalid {name} {text:?}: {why}");
        if text.trim().is_empty() {
            return Err(bad(format!(
                "expected a level ({levels}) or TARGET=LEVEL items separated by commas"
            )));
        }
        let level = |word: &str| {
            Level::parse(word.trim()).ok_or_else(|| {
                bad(format!(
                    "{:?} is not a level (expected {levels})",
                    word.trim()
                ))
            })
        };
        let mut default = None;
        let mut targets = Vec::new();
        for item in text.split(',') {
            match item.split_once('=') {
                None => {
                    let given = level(item)?;
                    if let Some(first) = default.replace(given) {
                        let (first, second) = (Level::name(first), given.name());
                        return Err(bad(format!(
                            "two levels for every target ({first} and {second}); \
                             name a target with TARGET=LEVEL"
                        )));
                    }
                }
                Some((target, given)) => {
                    let target = target.trim();
                    let valid = !target.is_empty()
                        && target
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
                    if !valid {
                        return Err(bad(format!(
                            "{target:?} is not a target (expected a module path such as host::conn)"
                        )));
                    }
                    targets.push((target.to_string(), level(given)?));
                }
            }
        }
        Ok(LogLevel {
            default: default.unwrap_or(Level::Info),
            targets,
        })
    }
}

impl fmt::Display for LogLevel {
    /// The level as `parse` reads it: `warn`, or `warn,host::conn=debug`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.default.name())?;
        for (target, level) in &self.targets {
            write!(f, ",{target}={}", level.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LogLevel> {
        LogLevel::parse("--log-level", text)
    }

    #[test]
    fn levels_and_targets() {
        assert_eq!(parse("warn").unwrap().default, Level::Warn);
        assert_eq!(parse("DEBUG").unwrap().to_string(), "debug");
        let mixed = parse("warn, host::supervisor=info,wasmtime_wasi=off").unwrap();
        assert_eq!(mixed.default, Level::Warn);
        assert_eq!(
            mixed.targets,
            vec![
                ("host::supervisor".to_string(), Level::Info),
                ("wasmtime_wasi".to_string(), Level::Off)
            ]
        );
        assert_eq!(
            mixed.to_string(),
            "warn,host::supervisor=info,wasmtime_wasi=off"
        );
        assert_eq!(mixed.most_verbose(), Level::Info);
        // No bare level: every other target stays at info.
        let one = parse("host::conn=debug").unwrap();
        assert_eq!(one.default, Level::Info);
        assert_eq!(one.most_verbose(), Level::Debug);
        assert_eq!(LogLevel::default().to_string(), "info");
    }

    #[test]
    fn bad_levels_are_named() {
        let err = |text| parse(text).unwrap_err().to_string();
        assert_eq!(
            err("loud"),
            "invalid --log-level \"loud\": \"loud\" is not a level (expected error, warn, info, debug, trace or off)"
        );
        assert_eq!(
            err("host=verbose"),
            "invalid --log-level \"host=verbose\": \"verbose\" is not a level (expected error, warn, info, debug, trace or off)"
        );
        assert_eq!(
            err("ho st=info"),
            "invalid --log-level \"ho st=info\": \"ho st\" is not a target (expected a module path such as host::conn)"
        );
        assert_eq!(
            err("warn,info"),
            "invalid --log-level \"warn,info\": two levels for every target (warn and info); name a target with TARGET=LEVEL"
        );
        assert!(err("").starts_with("invalid --log-level \"\": expected a level"));
        assert!(err("warn,").contains("\"\" is not a level"));
    }
}
