//! The multi-tenant config file (`host serve --config host.toml`): TOML
//! deserialised (serde, unknown keys refused) into raw settings
//! ([`RawHost`]) for `settings::convert`, every error one line naming the
//! file, line and column.
//!
//! Serde's own messages are rewritten into the host's: `invalid NAME VALUE:
//! expected WHAT` for a value of the wrong type (each value type below says
//! WHAT), and `unknown key "KEY" in TABLE (did you mean "KEY"?)`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::Deserialize as _;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::describe::toml_key;
use super::raw::{Given, Layer, Place, RawHost, RawTenant};
use super::schema::{Count, FileLayer, FileRoot, List, Text, EXPECTED};
use super::values::{DirOption, Naming, Setting};

/// The tables allowed at the top level.
const TOP_LEVEL: [&str; 3] = ["defaults", "metrics", "tenants"];
/// The longest tenant name.
const MAX_TENANT_NAME: usize = 64;

/// Reads `file` into raw settings. Compiles nothing and binds nothing.
pub(crate) fn read(file: &Path, cache_dir: Option<PathBuf>) -> Result<RawHost> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| anyhow!("{name}: {e}"))?;
    let path = std::path::absolute(file).map_err(|e| anyhow!("{name}: {e}"))?;
    let mut doc = Doc {
        name,
        text: &text,
        root: DeTable::default(),
    };
    let root = DeTable::parse(&text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        doc.error(e.span().unwrap_or(0..0), format!("invalid TOML: {message}"))
    })?;
    doc.root = root.get_ref().clone();
    let parsed =
        FileRoot::deserialize(toml::de::Deserializer::from(root)).map_err(|e| doc.explain(e))?;
    let mut tenants = Vec::new();
    if let Some(table) = &parsed.tenants {
        for (name, layer) in &table.get_ref().0 {
            let name = doc.tenant_name(name)?;
            if let Some(level) = &layer.get_ref().0.log_level {
                let span = key_of(&doc.root, &level.span()).unwrap_or(level.span());
                return Err(doc.error(
                    span,
                    "log-level is host-wide: set it in [defaults], not in a tenant's table",
                ));
            }
            tenants.push(RawTenant {
                name,
                at: Some(doc.place(layer.span())),
                layer: doc.layer(&layer.get_ref().0),
            });
        }
    }
    let metrics_addr = match &parsed.metrics {
        Some(metrics) => Some(match &metrics.get_ref().0.addr {
            Some(addr) => doc.given(addr.get_ref().0.clone(), addr.span()),
            None => {
                return Err(doc.error(
                    metrics.span(),
                    "[metrics] has no addr: add addr = \"IP:PORT\", e.g. \"127.0.0.1:9464\"",
                ))
            }
        }),
        None => None,
    };
    Ok(RawHost {
        naming: Naming::Keys,
        base: Some(path.parent().unwrap_or(Path::new("/")).to_path_buf()),
        defaults: parsed
            .defaults
            .as_ref()
            .map_or_else(Layer::default, |d| doc.layer(&d.get_ref().0)),
        tenants,
        tenants_at: Some(doc.place(parsed.tenants.map_or(0..0, |t| t.span()))),
        metrics_addr,
        log_level: parsed
            .defaults
            .as_ref()
            .and_then(|d| doc.text(&d.get_ref().0.log_level)),
        // As given: errors name it so, and a reload reads it again from here.
        file: Some(file.to_path_buf()),
        cache_dir,
        ..RawHost::default()
    })
}

/// The file being read.
struct Doc<'a> {
    /// The file as it was named, for messages.
    name: String,
    text: &'a str,
    /// The file as TOML, to find what an error points at.
    root: DeTable<'a>,
}

/// One step from the file's root to a key or value: a key, or an item of
/// the array before it.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Item,
}

/// What an error's span points at.
enum Hit<'t, 'i> {
    Key(Vec<Step>),
    Value(Vec<Step>, &'t DeValue<'i>),
}

/// The first key or value, depth first in file order, at exactly `span`.
fn find<'t, 'i>(table: &'t DeTable<'i>, span: &Range<usize>, path: &[Step]) -> Option<Hit<'t, 'i>> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    for (key, value) in entries {
        let mut path = path.to_vec();
        path.push(Step::Key(key.get_ref().to_string()));
        if key.span() == *span {
            return Some(Hit::Key(path));
        }
        if let Some(hit) = find_value(value, span, path) {
            return Some(hit);
        }
    }
    None
}

/// The span of the key whose value is at exactly `span`.
fn key_of(table: &DeTable<'_>, span: &Range<usize>) -> Option<Range<usize>> {
    table.iter().find_map(|(key, value)| {
        if value.span() == *span {
            return Some(key.span());
        }
        match value.get_ref() {
            DeValue::Table(table) => key_of(table, span),
            _ => None,
        }
    })
}

fn find_value<'t, 'i>(
    value: &'t Spanned<DeValue<'i>>,
    span: &Range<usize>,
    path: Vec<Step>,
) -> Option<Hit<'t, 'i>> {
    if value.span() == *span {
        return Some(Hit::Value(path, value.get_ref()));
    }
    match value.get_ref() {
        DeValue::Table(table) => find(table, span, &path),
        DeValue::Array(items) => items.iter().find_map(|item| {
            let mut path = path.clone();
            path.push(Step::Item);
            find_value(item, span, path)
        }),
        _ => None,
    }
}

impl Doc<'_> {
    /// `FILE:LINE:COLUMN` of a byte offset, both 1-based, the column in
    /// characters.
    fn at(&self, offset: usize) -> String {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let mut column = before[line_start..].chars().count() + 1;
        if line == 1 && before.starts_with('\u{feff}') {
            column -= 1;
        }
        format!("{}:{line}:{column}", self.name)
    }

    fn place(&self, span: Range<usize>) -> Place {
        Place {
            offset: span.start,
            shown: self.at(span.start),
        }
    }

    fn error(&self, span: Range<usize>, message: impl fmt::Display) -> anyhow::Error {
        anyhow!("{}: {message}", self.at(span.start))
    }

    fn given<T>(&self, value: T, span: Range<usize>) -> Given<T> {
        Given {
            value,
            at: Some(self.place(span)),
        }
    }

    /// Serde's error as the host's: what is wrong, named as the file names
    /// it.
    fn explain(&self, error: toml::de::Error) -> anyhow::Error {
        let span = error.span().unwrap_or(0..0);
        let message = error.message();
        match find(&self.root, &span, &[]) {
            Some(Hit::Key(path)) if message.starts_with("unknown field") => {
                self.unknown_key(&path, span)
            }
            Some(Hit::Value(path, value)) => {
                let expected = match message.rfind(EXPECTED) {
                    Some(i) => &message[i + EXPECTED.len()..],
                    None => return self.error(span, message.replace('\n', " ")),
                };
                let name = name(&path);
                let shown = match value {
                    DeValue::String(text) => format!("{text:?}"),
                    DeValue::Array(_) => {
                        let message = format!("invalid {name}: expected {expected}, not an array");
                        return self.error(span, message);
                    }
                    DeValue::Table(_) => {
                        let message = format!("invalid {name}: expected {expected}, not a table");
                        return self.error(span, message);
                    }
                    _ => self.text[span.clone()].to_string(),
                };
                self.error(span, format!("invalid {name} {shown}: expected {expected}"))
            }
            _ => self.error(span, message.replace('\n', " ")),
        }
    }

    /// `unknown key "KEY" in TABLE`, with a hint when one is near.
    fn unknown_key(&self, path: &[Step], span: Range<usize>) -> anyhow::Error {
        let keys = keys(path);
        let Some((name, table)) = keys.split_last() else {
            return self.error(span, "unknown key");
        };
        let normalized = normalize(name);
        let message = match table {
            [] => {
                let hint = if normalized == "log-level" {
                    "log-level goes in [defaults]".to_string()
                } else if Setting::from_key(&normalized).is_some()
                    || Setting::from_flag_name(&normalized).is_some()
                {
                    "tenant settings go in [defaults] or [tenants.NAME]".to_string()
                } else if let Some(near) = closest(name, TOP_LEVEL) {
                    format!("did you mean {near:?}?")
                } else {
                    "expected [defaults], [metrics] or [tenants.NAME]".to_string()
                };
                format!("unknown key {name:?} at the top level ({hint})")
            }
            ["metrics"] => {
                let hint = closest(name, ["addr"])
                    .map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
                format!("unknown key {name:?} in [metrics]{hint}")
            }
            [.., "dirs", host] => {
                let hint = closest(name, ["guest", "mode"])
                    .map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
                format!(
                    "unknown key {name:?} in dirs.{} (expected guest and mode){hint}",
                    toml_key(host)
                )
            }
            table => {
                let context = match table {
                    ["tenants", tenant] => format!("[tenants.{}]", toml_key(tenant)),
                    _ => "[defaults]".to_string(),
                };
                let near = Setting::from_flag_name(&normalized)
                    .map(Setting::key)
                    .or_else(|| closest(name, Setting::ALL.map(Setting::key)))
                    .or_else(|| closest(name, ["log-level"]));
                let hint = near.map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
                format!("unknown key {name:?} in {context}{hint}")
            }
        };
        self.error(span, message)
    }

    /// A tenant's name, if it is one.
    fn tenant_name(&self, name: &Spanned<String>) -> Result<String> {
        let text = name.get_ref();
        let valid = (1..=MAX_TENANT_NAME).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            let message = format!(
                "invalid tenant name {text:?}: expected 1 to {MAX_TENANT_NAME} of A-Z, a-z, 0-9, '_', '.' and '-'"
            );
            return Err(self.error(name.span(), message));
        }
        Ok(text.clone())
    }

    fn text<E>(&self, value: &Option<Spanned<Text<E>>>) -> Option<Given<String>> {
        value
            .as_ref()
            .map(|v| self.given(v.get_ref().0.clone(), v.span()))
    }

    fn texts<E>(&self, list: &Option<List<E>>) -> Option<Vec<Given<String>>> {
        list.as_ref().map(|list| {
            list.0
                .iter()
                .map(|v| self.given(v.get_ref().0.clone(), v.span()))
                .collect()
        })
    }

    /// A count, placed at its key.
    fn count<const MAX: u32>(&self, value: &Option<Spanned<Count<MAX>>>) -> Option<Given<u32>> {
        value.as_ref().map(|v| {
            let key = key_of(&self.root, &v.span()).unwrap_or(v.span());
            self.given(v.get_ref().0, key)
        })
    }

    /// A table's settings as raw settings, each placed where it was written
    /// (a count at its key: a strategy that does not use it refuses the key).
    fn layer(&self, table: &FileLayer) -> Layer {
        Layer {
            handler: self.text(&table.handler).map(|g| Given {
                value: PathBuf::from(g.value),
                at: g.at,
            }),
            listen: self.texts(&table.listen),
            strategy: table
                .strategy
                .as_ref()
                .map(|s| self.given(s.get_ref().0, s.span())),
            workers: self.count(&table.workers),
            processes: self.count(&table.processes),
            max_children: self.count(&table.max_children),
            max_connections: self.count(&table.max_connections),
            max_memory: self.text(&table.max_memory),
            timeout: self.text(&table.timeout),
            idle_timeout: self.text(&table.idle_timeout),
            drain_timeout: self.text(&table.drain_timeout),
            env: table.env.as_ref().map(|env| {
                env.0
                    .iter()
                    .map(|(key, value)| {
                        self.given((key.get_ref().clone(), value.clone()), key.span())
                    })
                    .collect()
            }),
            dirs: table.dirs.as_ref().map(|dirs| {
                dirs.0
                    .iter()
                    .map(|(host, target)| {
                        let dir = DirOption {
                            text: host.get_ref().clone(),
                            host: PathBuf::from(host.get_ref()),
                            guest: target.guest.clone(),
                            writable: target.writable,
                        };
                        self.given(dir, host.span())
                    })
                    .collect()
            }),
            allow: self.texts(&table.allow),
            deny: self.texts(&table.deny),
            proxy_protocol: self.text(&table.proxy_protocol),
            proxy_from: self.texts(&table.proxy_from),
            proxy_header_timeout: self.text(&table.proxy_header_timeout),
            allow_precompiled: table.allow_precompiled.as_ref().map(|f| f.0),
            allow_outbound: self.texts(&table.allow_outbound),
            max_outbound: self.count(&table.max_outbound),
        }
    }
}

/// The keys of `path`, without its array items.
fn keys(path: &[Step]) -> Vec<&str> {
    path.iter()
        .filter_map(|step| match step {
            Step::Key(key) => Some(key.as_str()),
            Step::Item => None,
        })
        .collect()
}

/// How messages name the value at `path`: `defaults`, `tenants.NAME`,
/// `[metrics] addr`, or within a tenant's settings `KEY` (an array's item
/// too) or `KEY.ENTRY`.
fn name(path: &[Step]) -> String {
    let keys = keys(path);
    let dotted = |keys: &[&str]| {
        let mut keys = keys.iter();
        let first = keys.next().map_or(String::new(), |k| k.to_string());
        keys.fold(first, |name, key| format!("{name}.{}", toml_key(key)))
    };
    match &keys[..] {
        ["metrics", rest @ ..] if !rest.is_empty() => format!("[metrics] {}", rest.join(".")),
        ["defaults", rest @ ..] if !rest.is_empty() => dotted(rest),
        ["tenants", _, rest @ ..] if !rest.is_empty() => dotted(rest),
        all => dotted(all),
    }
}

/// A key as a flag-minded or careless writer might mean it: lower case,
/// dashes for underscores.
fn normalize(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

/// The candidate nearest to `key` (Levenshtein distance, in characters), if
/// near enough to be a typo.
fn closest<'c>(key: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let key = normalize(key);
    let limit = (key.chars().count() / 3).clamp(1, 2);
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(&key, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::handler::HandlerSource;
    use crate::settings::model::{DirGrant, ListenAddr, Strategy};
    use crate::settings::values;
    use crate::settings::{describe, load};

    /// A directory of its own under the system's temp dir, holding
    /// `echo.wasm`, `hello.wasm` and `static/`; removed when dropped.
    struct Scratch {
        dir: PathBuf,
    }

    impl Scratch {
        fn new(name: &str) -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "host-config-file-{}-{n}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("static")).unwrap();
            std::fs::write(dir.join("echo.wasm"), b"").unwrap();
            std::fs::write(dir.join("hello.wasm"), b"").unwrap();
            Scratch { dir }
        }

        /// Writes `host.toml` and returns its path.
        fn config(&self, text: &str) -> PathBuf {
            let file = self.dir.join("host.toml");
            std::fs::write(&file, text).unwrap();
            file
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Loads `text` as a config file and returns its error, with
    /// `FILE` standing for the file's path.
    fn error(name: &str, text: &str) -> String {
        let scratch = Scratch::new(name);
        let file = scratch.config(text);
        let err = load(&file, None).expect_err("the file should be refused");
        let message = format!("{err:#}");
        assert!(!message.contains('\n'), "one line: {message}");
        message.replace(&file.display().to_string(), "FILE")
    }

    const ECHO: &str = "[tenants.echo]\nhandler = \"echo.wasm\"\nlisten = [\"127.0.0.1:7001\"]\n";

    #[test]
    fn a_good_file() {
        let scratch = Scratch::new("good");
        let file = scratch.config(
            r#"# Two tenants.
[defaults]
strategy = "threading"
max-memory = "64MiB"
timeout = "30s"
idle-timeout = "10s"
max-children = 7
workers = 3

[metrics]
addr = "127.0.0.1:9464"

[tenants.hello]
handler = "hello.wasm"
listen = ["127.0.0.1:7002"]

[tenants.echo]
handler = "echo.wasm"
listen = ["127.0.0.1:7001", "unix:echo.sock", "unix:/tmp/host-echo.sock"]
strategy = "forking"
max-connections = 64
max-memory = "32MiB"
timeout = "5s"
env = { GREETING = "hi", "ODD KEY" = "a \"quoted\" value" }
dirs = { "static" = "/static", "/tmp" = { guest = "/scratch", mode = "rw" } }
allow = ["127.0.0.0/8", "::1/128"]
deny = ["127.0.0.3"]
allow-precompiled = true

[tenants.builtin]
listen = ["[::1]:0"]
strategy = "prefork"
processes = 2
"#,
        );
        let cache = PathBuf::from("/var/cache/host-test");
        let host = load(&file, Some(cache.clone())).unwrap();
        assert_eq!(host.file.as_deref(), Some(file.as_path()));
        assert_eq!(
            host.metrics_addr,
            Some("127.0.0.1:9464".parse::<SocketAddr>().unwrap())
        );
        let names: Vec<_> = host.tenants.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(names, ["builtin", "echo", "hello"]);
        let [builtin, echo, hello] = &host.tenants[..] else {
            unreachable!()
        };
        let dir = &scratch.dir;

        assert_eq!(echo.handler, HandlerSource::File(dir.join("echo.wasm")));
        assert_eq!(
            echo.listen,
            vec![
                ListenAddr::Tcp("127.0.0.1:7001".parse().unwrap()),
                ListenAddr::Unix(dir.join("echo.sock")),
                ListenAddr::Unix("/tmp/host-echo.sock".into()),
            ]
        );
        // max-children from [defaults] fits forking; workers does not and
        // is left out rather than refused.
        assert_eq!(echo.strategy, Strategy::Forking { max_children: 7 });
        assert_eq!(echo.max_connections, Some(64));
        assert_eq!(echo.limits.max_memory, 32 << 20);
        assert_eq!(echo.limits.timeout, Duration::from_secs(5));
        assert_eq!(echo.limits.idle_timeout, Duration::from_secs(10));
        assert_eq!(echo.drain_timeout, Duration::from_secs(10));
        assert_eq!(
            echo.grants.env,
            vec![
                ("GREETING".to_string(), "hi".to_string()),
                ("ODD KEY".to_string(), "a \"quoted\" value".to_string()),
            ]
        );
        assert_eq!(
            echo.grants.dirs,
            vec![
                DirGrant {
                    host: dir.join("static"),
                    guest: "/static".into(),
                    writable: false,
                },
                DirGrant {
                    host: "/tmp".into(),
                    guest: "/scratch".into(),
                    writable: true,
                },
            ]
        );
        assert_eq!(
            echo.access.allow,
            vec![
                "127.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert_eq!(echo.access.deny, vec!["127.0.0.3/32".parse().unwrap()]);
        assert!(echo.allow_precompiled);
        assert_eq!(echo.cache_dir.as_deref(), Some(cache.as_path()));

        // Everything from [defaults] or built in.
        assert_eq!(hello.handler, HandlerSource::File(dir.join("hello.wasm")));
        assert_eq!(hello.strategy, Strategy::Threading { workers: 3 });
        assert_eq!(hello.max_connections, None);
        assert_eq!(hello.limits.max_memory, 64 << 20);
        assert_eq!(hello.limits.timeout, Duration::from_secs(30));
        assert!(hello.grants.env.is_empty() && hello.grants.dirs.is_empty());
        assert!(hello.access.is_open());
        assert!(!hello.allow_precompiled);

        assert_eq!(builtin.handler, HandlerSource::BuiltinEcho);
        assert_eq!(
            builtin.strategy,
            Strategy::Prefork {
                processes: 2,
                workers: 3
            }
        );

        let f = |path: &str| dir.join(path).display().to_string();
        assert_eq!(
            describe(&host),
            format!(
                r#"[metrics]
addr = "127.0.0.1:9464"

[tenants.builtin]
# handler: the built-in echo handler
listen = ["[::1]:0"]
strategy = "prefork"
processes = 2
workers = 3
max-connections = 2048
max-memory = "64MiB"
timeout = "30s"
idle-timeout = "10s"
drain-timeout = "10s"
env = {{}}
dirs = {{}}
allow = []
deny = []
allow-precompiled = false

[tenants.echo]
handler = "{echo}"
listen = ["127.0.0.1:7001", "unix:{sock}", "unix:/tmp/host-echo.sock"]
strategy = "forking"
max-children = 7
max-connections = 7
max-memory = "32MiB"
timeout = "5s"
idle-timeout = "10s"
drain-timeout = "10s"
env = {{ GREETING = "hi", "ODD KEY" = "a \"quoted\" value" }}
dirs = {{ "{static_}" = "/static", "/tmp" = {{ guest = "/scratch", mode = "rw" }} }}
allow = ["127.0.0.0/8", "::1/128"]
deny = ["127.0.0.3/32"]
allow-precompiled = true

[tenants.hello]
handler = "{hello}"
listen = ["127.0.0.1:7002"]
strategy = "threading"
workers = 3
max-connections = 1024
max-memory = "64MiB"
timeout = "30s"
idle-timeout = "10s"
drain-timeout = "10s"
env = {{}}
dirs = {{}}
allow = []
deny = []
allow-precompiled = false
"#,
                echo = f("echo.wasm"),
                sock = f("echo.sock"),
                static_ = f("static"),
                hello = f("hello.wasm"),
            )
        );

        // What describe prints is a config file that means the same.
        let again = Scratch::new("described");
        let described = again.config(&describe(&host));
        let reloaded = load(&described, Some(cache)).unwrap();
        assert_eq!(reloaded.metrics_addr, host.metrics_addr);
        for (a, b) in reloaded.tenants.iter().zip(&host.tenants) {
            assert_eq!(a.max_in_flight(), b.max_in_flight());
            let mut a = a.clone();
            a.max_connections = b.max_connections;
            assert_eq!(&a, b);
        }
    }

    #[test]
    fn a_tenant_key_overrides_defaults_whole() {
        let scratch = Scratch::new("override");
        let file = scratch.config(
            "[defaults]\nenv = { A = \"1\", B = \"2\" }\nlisten = [\"127.0.0.1:0\"]\n\
             [tenants.a]\nenv = { C = \"3\" }\n[tenants.b]\n",
        );
        let host = load(&file, None).unwrap();
        assert_eq!(host.tenants[0].grants.env, vec![("C".into(), "3".into())]);
        assert_eq!(host.tenants[1].grants.env.len(), 2);
        // Port 0 picks a free port for each: no conflict.
        assert_eq!(host.tenants[1].listen, host.tenants[0].listen);
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            error("syntax", "[tenants.echo]\nlisten = [\"127.0.0.1:7001\",\n"),
            "FILE:2:28: invalid TOML: unclosed array, expected `]`"
        );
        assert_eq!(
            error(
                "duplicate",
                "[tenants.echo]\ntimeout = \"1s\"\ntimeout = \"2s\"\n"
            ),
            "FILE:3:1: invalid TOML: duplicate key"
        );
    }

    #[test]
    fn a_missing_file() {
        let scratch = Scratch::new("missing");
        let file = scratch.dir.join("nope.toml");
        let err = load(&file, None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}: No such file or directory (os error 2)", file.display())
        );
    }

    #[test]
    fn unknown_keys() {
        let text = format!("{ECHO}tmeout = \"5s\"\n");
        assert_eq!(
            error("typo", &text),
            "FILE:4:1: unknown key \"tmeout\" in [tenants.echo] (did you mean \"timeout\"?)"
        );
        let text = format!("{ECHO}max_memory = \"5MiB\"\n");
        assert_eq!(
            error("underscore", &text),
            "FILE:4:1: unknown key \"max_memory\" in [tenants.echo] (did you mean \"max-memory\"?)"
        );
        let text = "[tenants.echo]\naddr = [\"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("flag-name", text),
            "FILE:2:1: unknown key \"addr\" in [tenants.echo] (did you mean \"listen\"?)"
        );
        let text = format!("[defaults]\ncolour = \"blue\"\n{ECHO}");
        assert_eq!(
            error("far", &text),
            "FILE:2:1: unknown key \"colour\" in [defaults]"
        );
        let text = format!("[metrics]\nadr = \"127.0.0.1:9464\"\n{ECHO}");
        assert_eq!(
            error("metrics-key", &text),
            "FILE:2:1: unknown key \"adr\" in [metrics] (did you mean \"addr\"?)"
        );
        let text = "[tenant.echo]\nlisten = [\"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("top-typo", text),
            "FILE:1:2: unknown key \"tenant\" at the top level (did you mean \"tenants\"?)"
        );
        let text = format!("timeout = \"5s\"\n{ECHO}");
        assert_eq!(
            error("top-setting", &text),
            "FILE:1:1: unknown key \"timeout\" at the top level (tenant settings go in [defaults] or [tenants.NAME])"
        );
        let text = format!("[server]\n{ECHO}");
        assert_eq!(
            error("top-far", &text),
            "FILE:1:2: unknown key \"server\" at the top level (expected [defaults], [metrics] or [tenants.NAME])"
        );
    }

    #[test]
    fn wrong_types() {
        let text = format!("{ECHO}workers = \"four\"\n");
        assert_eq!(
            error("workers-string", &text),
            "FILE:4:11: invalid workers \"four\": expected an integer from 1 to 4096"
        );
        let text = format!("{ECHO}workers = 0\n");
        assert_eq!(
            error("workers-zero", &text),
            "FILE:4:11: invalid workers 0: expected an integer from 1 to 4096"
        );
        let text = format!("{ECHO}max-connections = 1_000_001\n");
        assert_eq!(
            error("connections-big", &text),
            "FILE:4:19: invalid max-connections 1_000_001: expected an integer from 1 to 1000000"
        );
        let text = "[tenants.echo]\nlisten = \"127.0.0.1:7001\"\n";
        assert_eq!(
            error("listen-string", text),
            "FILE:2:10: invalid listen \"127.0.0.1:7001\": expected an array of addresses, \
             e.g. [\"127.0.0.1:7001\", \"unix:/run/host.sock\"]"
        );
        let text = "[tenants.echo]\nlisten = [7001]\n";
        assert_eq!(
            error("listen-int", text),
            "FILE:2:11: invalid listen 7001: expected an address such as \"127.0.0.1:7001\" \
             or \"unix:/run/host.sock\""
        );
        let text = format!("{ECHO}allow-precompiled = \"yes\"\n");
        assert_eq!(
            error("bool", &text),
            "FILE:4:21: invalid allow-precompiled \"yes\": expected true or false"
        );
        let text = format!("{ECHO}env = {{ PORT = 8080 }}\n");
        assert_eq!(
            error("env-int", &text),
            "FILE:4:16: invalid env.PORT 8080: expected a string"
        );
        let text = format!("{ECHO}env = [\"A=1\"]\n");
        assert_eq!(
            error("env-array", &text),
            "FILE:4:7: invalid env: expected a table of strings, e.g. { GREETING = \"hi\" }, \
             not an array"
        );
        let text = format!("{ECHO}timeout = 5\n");
        assert_eq!(
            error("timeout-int", &text),
            "FILE:4:11: invalid timeout 5: expected a duration such as \"30s\""
        );
        let text = format!("{ECHO}strategy = \"fork\"\n");
        assert_eq!(
            error("strategy", &text),
            "FILE:4:12: invalid strategy \"fork\": expected \"threading\", \"forking\", \"prefork\" or \"async\""
        );
        let text = format!("defaults = 3\n{ECHO}");
        assert_eq!(
            error("defaults-int", &text),
            "FILE:1:12: invalid defaults 3: expected a table"
        );
        let text = "[tenants]\necho = \"echo.wasm\"\n";
        assert_eq!(
            error("tenant-string", text),
            "FILE:2:8: invalid tenants.echo \"echo.wasm\": expected a table"
        );
        let text = format!("metrics = [1]\n{ECHO}");
        assert_eq!(
            error("metrics-array", &text),
            "FILE:1:11: invalid metrics: expected a table, not an array"
        );
        let text = format!("defaults = [{{ workers = 3 }}]\n{ECHO}");
        assert_eq!(
            error("defaults-array", &text),
            "FILE:1:12: invalid defaults: expected a table, not an array"
        );
        let text = "[[tenants]]\nlisten = [\"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("tenants-array", text),
            "FILE:1:1: invalid tenants: expected [tenants.NAME] tables, not an array"
        );
    }
    #[test]
    fn two_tenants_on_one_address() {
        let text =
            format!("{ECHO}[tenants.hello]\nlisten = [\"127.0.0.1:7002\", \"127.0.0.1:7001\"]\n");
        assert_eq!(
            error("same-addr", &text),
            "FILE:5:29: tenants \"echo\" and \"hello\" both listen on 127.0.0.1:7001"
        );
        let text = format!("{ECHO}[tenants.hello]\nlisten = [\"0.0.0.0:7001\"]\n");
        assert_eq!(
            error("wildcard", &text),
            "FILE:5:11: tenants \"echo\" and \"hello\" both listen on port 7001 \
             (127.0.0.1:7001 and 0.0.0.0:7001)"
        );
        let text =
            "[tenants.a]\nlisten = [\"unix:x.sock\"]\n[tenants.b]\nlisten = [\"unix:./x.sock\"]\n";
        let scratch = Scratch::new("unix-twice");
        let file = scratch.config(text);
        let err = load(&file, None).unwrap_err().to_string();
        let sock = scratch.dir.join("x.sock");
        assert_eq!(
            err,
            format!(
                "{}:4:11: tenants \"a\" and \"b\" both listen on unix:{}",
                file.display(),
                sock.display()
            )
        );
        let text = "[defaults]\nlisten = [\"127.0.0.1:7001\"]\n[tenants.a]\n[tenants.b]\n";
        assert_eq!(
            error("from-defaults", text),
            "FILE:2:11: tenants \"a\" and \"b\" both listen on 127.0.0.1:7001"
        );
        let text = "[tenants.a]\nlisten = [\"127.0.0.1:7001\", \"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("twice", text),
            "FILE:2:29: tenant \"a\" listens twice on 127.0.0.1:7001"
        );
        let text = format!("[metrics]\naddr = \"127.0.0.1:7001\"\n{ECHO}");
        assert_eq!(
            error("metrics-clash", &text),
            "FILE:2:8: [metrics] addr 127.0.0.1:7001 is also where tenant \"echo\" listens \
             (127.0.0.1:7001)"
        );
        // An IPv4-mapped IPv6 address is its IPv4 address.
        let text = format!("{ECHO}[tenants.hello]\nlisten = [\"[::ffff:127.0.0.1]:7001\"]\n");
        assert_eq!(
            error("mapped", &text),
            "FILE:5:11: tenants \"echo\" and \"hello\" both listen on port 7001 \
             (127.0.0.1:7001 and [::ffff:127.0.0.1]:7001)"
        );
    }

    #[test]
    fn the_ipv4_and_ipv6_wildcards_do_not_collide() {
        // `[::]` is bound IPv6 only (listener::bind_tcp).
        let scratch = Scratch::new("dual-stack");
        let text = "[metrics]\naddr = \"[::]:7003\"\n\
                    [tenants.a]\nlisten = [\"0.0.0.0:7001\", \"127.0.0.1:7003\"]\n\
                    [tenants.b]\nlisten = [\"[::]:7001\"]\n";
        let host = load(&scratch.config(text), None).unwrap();
        assert_eq!(host.tenants.len(), 2);
        let text = "[tenants.a]\nlisten = [\"[::1]:7001\", \"[::]:7001\"]\n";
        assert_eq!(
            error("v6-wildcard", text),
            "FILE:2:25: tenant \"a\" listens twice on port 7001 ([::1]:7001 and [::]:7001)"
        );
    }

    #[test]
    fn a_missing_handler() {
        let text = "[tenants.echo]\nhandler = \"x.wasm\"\nlisten = [\"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("no-handler", text),
            "FILE:2:11: handler \"x.wasm\": No such file or directory (os error 2)"
        );
        let text = "[defaults]\nhandler = \"static\"\n";
        assert_eq!(
            error("dir-handler", text),
            "FILE:2:11: handler \"static\": it is a directory"
        );
    }

    #[test]
    fn bad_values_reuse_the_flags_messages() {
        let expect = |at: &str, result: Result<()>| format!("FILE:{at}: {}", result.unwrap_err());
        let text = format!("{ECHO}allow = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n");
        assert_eq!(
            error("cidr", &text),
            expect("4:24", values::parse_net("allow", "10.0.0.0/33").map(drop))
        );
        assert_eq!(
            error("cidr", &text),
            "FILE:4:24: invalid allow \"10.0.0.0/33\": \
             expected a network in CIDR form, e.g. 10.0.0.0/8 or ::1/128"
        );
        let text = format!("{ECHO}max-memory = \"8GiB\"\n");
        assert_eq!(
            error("size", &text),
            "FILE:4:14: invalid max-memory \"8GiB\": must be between 64KiB and 4GiB"
        );
        let text = format!("{ECHO}max-memory = \"lots\"\n");
        assert_eq!(
            error("size-text", &text),
            expect("4:14", values::parse_size("max-memory", "lots").map(drop))
        );
        let text = format!("[defaults]\nidle-timeout = \"30x\"\n{ECHO}");
        assert_eq!(
            error("duration", &text),
            expect(
                "2:16",
                values::parse_duration("idle-timeout", "30x").map(drop)
            )
        );
        let text = format!("{ECHO}drain-timeout = \"0s\"\n");
        assert_eq!(
            error("duration-zero", &text),
            "FILE:4:17: invalid drain-timeout \"0s\": must be longer than zero"
        );
        let text = "[tenants.echo]\nlisten = [\"127.0.0.1:99999\"]\n";
        assert_eq!(
            error("listen", text),
            expect(
                "2:11",
                values::parse_listen("listen", "127.0.0.1:99999").map(drop)
            )
        );
        let text = "[tenants.echo]\nlisten = [\"unix:\"]\n";
        assert_eq!(
            error("listen-unix", text),
            "FILE:2:11: invalid listen \"unix:\": expected unix:PATH"
        );
        let text = format!("{ECHO}dirs = {{ \"nothere\" = \"/x\" }}\n");
        let scratch = Scratch::new("dir-missing");
        let file = scratch.config(&text);
        let err = load(&file, None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}:4:10: invalid dirs \"nothere\": {}: No such file or directory (os error 2)",
                file.display(),
                scratch.dir.join("nothere").display()
            )
        );
        let text = format!("{ECHO}dirs = {{ \"echo.wasm\" = \"/x\" }}\n");
        let scratch = Scratch::new("dir-file");
        let file = scratch.config(&text);
        let err = load(&file, None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}:4:10: invalid dirs \"echo.wasm\": {} is not a directory",
                file.display(),
                scratch.dir.join("echo.wasm").display()
            )
        );
        let text = format!("{ECHO}dirs = {{ static = \"\" }}\n");
        assert_eq!(
            error("dir-guest", &text),
            "FILE:4:10: invalid dirs \"static\": the guest path is empty"
        );
        let text = format!("{ECHO}env = {{ \"A=B\" = \"1\" }}\n");
        assert_eq!(
            error("env-name", &text),
            "FILE:4:9: invalid env name \"A=B\": expected a name without '=' or NUL"
        );
        let text = format!("{ECHO}env = {{ A = \"x\\u0000y\" }}\n");
        assert_eq!(
            error("env-nul", &text),
            "FILE:4:9: invalid env value for \"A\": it contains NUL"
        );
    }

    #[test]
    fn a_tenant_must_listen() {
        let text = "[tenants.echo]\nhandler = \"echo.wasm\"\n";
        assert_eq!(
            error("no-listen", text),
            "FILE:1:1: tenant \"echo\" has no listen address: add e.g. listen = [\"127.0.0.1:7001\"]"
        );
        let text = format!("{ECHO}[tenants.hello]\nlisten = []\n");
        assert_eq!(
            error("empty-listen", &text),
            "FILE:4:1: tenant \"hello\" has no listen address: add e.g. listen = [\"127.0.0.1:7001\"]"
        );
    }

    #[test]
    fn there_must_be_tenants() {
        let want = "no tenants: add a [tenants.NAME] table with a listen key";
        assert_eq!(error("empty", ""), format!("FILE:1:1: {want}"));
        let text = "[defaults]\ntimeout = \"5s\"\n\n[tenants]\n";
        assert_eq!(error("empty-tenants", text), format!("FILE:4:1: {want}"));
    }

    #[test]
    fn keys_that_do_not_fit_the_strategy_are_refused_in_a_tenant() {
        let text = format!("{ECHO}max-children = 3\n");
        assert_eq!(
            error("max-children", &text),
            "FILE:4:1: max-children applies to strategy forking, not threading"
        );
        let text = format!("{ECHO}strategy = \"forking\"\nworkers = 3\n");
        assert_eq!(
            error("workers", &text),
            "FILE:5:1: workers applies to strategy threading, prefork or async, not forking"
        );
        let text = format!("[defaults]\nstrategy = \"forking\"\n{ECHO}processes = 3\n");
        assert_eq!(
            error("processes", &text),
            "FILE:6:1: processes applies to strategy prefork, not forking"
        );
        // In [defaults] they apply where they fit and are ignored elsewhere.
        let scratch = Scratch::new("fit");
        let file = scratch.config(&format!(
            "[defaults]\nmax-children = 3\nprocesses = 2\nworkers = 5\n{ECHO}"
        ));
        let host = load(&file, None).unwrap();
        let echo = &host.tenants[0];
        assert_eq!(echo.strategy, Strategy::Threading { workers: 5 });
    }

    #[test]
    fn bad_tenant_names() {
        let want = "expected 1 to 64 of A-Z, a-z, 0-9, '_', '.' and '-'";
        let text = "[tenants.\"echo server\"]\nlisten = [\"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("space", text),
            format!("FILE:1:10: invalid tenant name \"echo server\": {want}")
        );
        let text = "[tenants.\"\"]\nlisten = [\"127.0.0.1:7001\"]\n";
        assert_eq!(
            error("empty-name", text),
            format!("FILE:1:10: invalid tenant name \"\": {want}")
        );
        let long = "x".repeat(65);
        let text = format!("[tenants.{long}]\nlisten = [\"127.0.0.1:7001\"]\n");
        assert_eq!(
            error("long", &text),
            format!("FILE:1:10: invalid tenant name \"{long}\": {want}")
        );
        // Dots are allowed: the name is quoted.
        let scratch = Scratch::new("dotted");
        let file = scratch.config("[tenants.\"echo.v2\"]\nlisten = [\"127.0.0.1:0\"]\n");
        let host = load(&file, None).unwrap();
        assert_eq!(host.tenants[0].tenant, "echo.v2");
        assert!(describe(&host).starts_with("[tenants.\"echo.v2\"]\n"));
    }

    #[test]
    fn bad_metrics() {
        let text = format!("[metrics]\naddr = \"nonsense\"\n{ECHO}");
        assert_eq!(
            error("metrics-addr", &text),
            format!(
                "FILE:2:8: {}",
                values::parse_socket_addr("[metrics] addr", "nonsense").unwrap_err()
            )
        );
        let text = format!("[metrics]\naddr = 9464\n{ECHO}");
        assert_eq!(
            error("metrics-int", &text),
            "FILE:2:8: invalid [metrics] addr 9464: expected an address such as \"127.0.0.1:9464\""
        );
        let text = format!("[metrics]\n{ECHO}");
        assert_eq!(
            error("metrics-empty", &text),
            "FILE:1:1: [metrics] has no addr: add addr = \"IP:PORT\", e.g. \"127.0.0.1:9464\""
        );
    }

    #[test]
    fn positions_count_characters() {
        let doc = Doc {
            name: "f".into(),
            text: "\u{feff}a\n\u{e9}\u{e9}x\n",
            root: DeTable::default(),
        };
        assert_eq!(doc.at(0), "f:1:1");
        assert_eq!(doc.at(3), "f:1:1");
        assert_eq!(doc.at(4), "f:1:2");
        assert_eq!(doc.at(9), "f:2:3");
        assert_eq!(doc.at(8), "f:2:2");
        assert_eq!(doc.at(100), "f:3:1");
    }
}
