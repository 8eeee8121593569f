//! The multi-tenant config file (`host serve --config host.toml`): TOML read
//! once into a validated [`HostConfig`], every error one line naming the
//! file, line and column; and [`describe`], the effective settings written
//! back as TOML.
//!
//! Each `[tenants.NAME]` table, over `[defaults]`, becomes the same
//! [`TenantOptions`] the single-tenant flags become, so a key and its flag
//! share their defaults and their validation.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::cli::{self, DirOption, Given, Naming, Setting, TenantOptions, DEFAULT_STRATEGY};
use crate::config::{HostConfig, ListenAddr, ServeConfig, StrategyKind, MAX_TENANTS};
use crate::wasm::handler::HandlerSource;

/// The tables allowed at the top level.
const TOP_LEVEL: [&str; 3] = ["defaults", "metrics", "tenants"];
/// The longest tenant name.
const MAX_TENANT_NAME: usize = 64;

/// What `listen`, `allow`/`deny`, `env` and `dirs` hold, and each item.
const ADDRESSES: [&str; 2] = [
    "an array of addresses, e.g. [\"127.0.0.1:7001\", \"unix:/run/host.sock\"]",
    "an address such as \"127.0.0.1:7001\" or \"unix:/run/host.sock\"",
];
const NETWORKS: [&str; 2] = [
    "an array of networks, e.g. [\"10.0.0.0/8\"]",
    "a network such as \"10.0.0.0/8\"",
];
const ENV: [&str; 2] = ["a table of strings, e.g. { GREETING = \"hi\" }", "a string"];
const DIRS: [&str; 2] = [
    "a table of host path = guest path, e.g. { \"/srv/static\" = \"/static\" }",
    "a guest path such as \"/static\"",
];

/// Reads and validates `file`. Compiles nothing and binds nothing.
pub fn load(file: &Path, cache_dir: Option<PathBuf>) -> Result<HostConfig> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| anyhow!("{name}: {e}"))?;
    let path = std::path::absolute(file).map_err(|e| anyhow!("{name}: {e}"))?;
    let doc = Doc {
        name,
        text: &text,
        base: path.parent().unwrap_or(Path::new("/")).to_path_buf(),
        cache_dir,
    };
    let mut host = doc.host()?;
    // As given: errors name it so, and a reload reads it again from here.
    host.file = Some(file.to_path_buf());
    Ok(host)
}

/// The effective settings of every tenant, defaults filled in, as TOML a
/// config file may hold (`host config check`).
pub fn describe(host: &HostConfig) -> String {
    let mut out = String::new();
    if let Some(addr) = host.metrics_addr {
        out.push_str("[metrics]\n");
        line(&mut out, "addr", toml_str(&addr.to_string()));
    }
    for tenant in &host.tenants {
        if !out.is_empty() {
            out.push('\n');
        }
        describe_tenant(&mut out, tenant);
    }
    out
}

fn describe_tenant(out: &mut String, tenant: &ServeConfig) {
    let _ = writeln!(out, "[tenants.{}]", toml_key(&tenant.tenant));
    match &tenant.handler {
        HandlerSource::BuiltinEcho => out.push_str("# handler: the built-in echo handler\n"),
        HandlerSource::File(path) => line(out, "handler", toml_str(&path.display().to_string())),
    }
    let listen = tenant.listen.iter().map(|a| toml_str(&a.to_string()));
    line(out, "listen", toml_array(listen));
    line(out, "strategy", toml_str(tenant.strategy.name()));
    for setting in [Setting::Processes, Setting::Workers, Setting::MaxChildren] {
        if setting.applies_to(tenant.strategy) {
            let count = match setting {
                Setting::Processes => tenant.processes,
                Setting::Workers => tenant.workers,
                _ => tenant.max_children,
            };
            line(out, setting.key(), count.to_string());
        }
    }
    line(out, "max-connections", tenant.max_in_flight().to_string());
    line(
        out,
        "max-memory",
        toml_str(&format_size(tenant.limits.max_memory)),
    );
    let duration = |d| toml_str(&humantime::format_duration(d).to_string());
    line(out, "timeout", duration(tenant.limits.timeout));
    line(out, "idle-timeout", duration(tenant.limits.idle_timeout));
    line(out, "drain-timeout", duration(tenant.drain_timeout));
    let env = tenant
        .grants
        .env
        .iter()
        .map(|(k, v)| (toml_key(k), toml_str(v)));
    line(out, "env", toml_inline_table(env));
    let dirs = tenant.grants.dirs.iter().map(|d| {
        let host = d.host.display().to_string();
        (toml_key(&host), toml_str(&d.guest))
    });
    line(out, "dirs", toml_inline_table(dirs));
    let nets = |nets: &[ipnet::IpNet]| toml_array(nets.iter().map(|n| toml_str(&n.to_string())));
    line(out, "allow", nets(&tenant.access.allow));
    line(out, "deny", nets(&tenant.access.deny));
    line(
        out,
        "allow-precompiled",
        tenant.allow_precompiled.to_string(),
    );
}

fn line(out: &mut String, key: &str, value: String) {
    let _ = writeln!(out, "{key} = {value}");
}

/// The largest binary unit that divides `bytes` exactly.
fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A TOML basic string.
fn toml_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML key: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_string()
    } else {
        toml_str(key)
    }
}

fn toml_array(items: impl Iterator<Item = String>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(", "))
}

fn toml_inline_table(entries: impl Iterator<Item = (String, String)>) -> String {
    let entries: Vec<_> = entries.map(|(k, v)| format!("{k} = {v}")).collect();
    if entries.is_empty() {
        "{}".to_string()
    } else {
        format!("{{ {} }}", entries.join(", "))
    }
}

/// One table's settings as written, `[defaults]` or `[tenants.NAME]`. Each
/// span is where an error about the setting points: the value, or for the
/// counts (refused by the tenant's strategy) the key.
#[derive(Clone, Debug, Default)]
struct Layer {
    handler: Option<Spanned<String>>,
    /// The array's span, and each address's.
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    strategy: Option<Spanned<StrategyKind>>,
    workers: Option<Spanned<u32>>,
    processes: Option<Spanned<u32>>,
    max_children: Option<Spanned<u32>>,
    max_connections: Option<Spanned<u32>>,
    max_memory: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    /// Spanned by the variable's name.
    env: Option<Vec<Spanned<(String, String)>>>,
    /// Host path to guest path, spanned by the host path.
    dirs: Option<Vec<Spanned<(String, String)>>>,
    allow: Option<Vec<Spanned<String>>>,
    deny: Option<Vec<Spanned<String>>>,
    allow_precompiled: Option<bool>,
}

/// A `[tenants.NAME]` table.
struct TenantTable {
    name: String,
    /// The table: its header, or its name in a dotted key.
    span: Range<usize>,
    layer: Layer,
}

type Entry<'t, 'i> = (
    &'t Spanned<std::borrow::Cow<'i, str>>,
    &'t Spanned<DeValue<'i>>,
);

/// The entries of `table` in the order they appear in the file, so the
/// first problem reported is the first in the file.
fn in_file_order<'t, 'i>(table: &'t DeTable<'i>) -> Vec<Entry<'t, 'i>> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

/// The file being read.
struct Doc<'a> {
    /// The file as it was named, for messages.
    name: String,
    text: &'a str,
    /// The file's directory: relative paths are relative to it.
    base: PathBuf,
    cache_dir: Option<PathBuf>,
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

    fn error(&self, span: Range<usize>, message: impl fmt::Display) -> anyhow::Error {
        anyhow!("{}: {message}", self.at(span.start))
    }

    fn given<T>(&self, value: T, span: Range<usize>) -> Given<T> {
        Given {
            value,
            at: Some(self.at(span.start)),
        }
    }

    /// A check of `spanned`'s value, its error pointed at the value.
    fn check<T, U>(&self, spanned: &Spanned<T>, result: Result<U>) -> Result<U> {
        result.map_err(|e| self.error(spanned.span(), format!("{e:#}")))
    }

    fn host(&self) -> Result<HostConfig> {
        let root = DeTable::parse(self.text).map_err(|e| {
            let message = e.message().replace('\n', " ");
            self.error(e.span().unwrap_or(0..0), format!("invalid TOML: {message}"))
        })?;
        let mut defaults = Layer::default();
        let mut metrics_addr = None;
        let mut tenants = Vec::new();
        let mut tenants_span = None;
        for (key, value) in in_file_order(root.get_ref()) {
            match key.get_ref().as_ref() {
                "defaults" => {
                    defaults =
                        self.layer(self.table("defaults", value, "a table")?, "[defaults]")?
                }
                "metrics" => metrics_addr = Some(self.metrics(value)?),
                "tenants" => {
                    tenants_span = Some(value.span());
                    tenants = self.tenants(value)?;
                }
                _ => return Err(self.unknown_top_level_key(key)),
            }
        }
        if tenants.is_empty() {
            return Err(self.error(
                tenants_span.unwrap_or(0..0),
                "no tenants: add a [tenants.NAME] table with a listen key",
            ));
        }
        if let Some(extra) = tenants.get(MAX_TENANTS) {
            let message = format!(
                "too many tenants: tenant {:?} is number {}, and one host serves at most {MAX_TENANTS}",
                extra.name,
                MAX_TENANTS + 1
            );
            return Err(self.error(extra.span.clone(), message));
        }
        let mut configs = Vec::with_capacity(tenants.len());
        let mut listening = Vec::new();
        for tenant in &tenants {
            let (options, spans) = self.options(tenant, &defaults)?;
            let config = options.into_config()?;
            for (addr, span) in config.listen.iter().zip(spans) {
                listening.push((span, configs.len(), addr.clone()));
            }
            configs.push(config);
        }
        self.check_addresses(&configs, listening, metrics_addr.as_ref())?;
        configs.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        Ok(HostConfig {
            tenants: configs,
            metrics_addr: metrics_addr.map(|addr| *addr.get_ref()),
            file: None,
        })
    }

    fn unknown_top_level_key(&self, key: &Spanned<std::borrow::Cow<'_, str>>) -> anyhow::Error {
        let name = key.get_ref().as_ref();
        let normalized = normalize(name);
        let hint = if Setting::from_key(&normalized).is_some()
            || Setting::from_flag_name(&normalized).is_some()
        {
            "tenant settings go in [defaults] or [tenants.NAME]".to_string()
        } else if let Some(near) = closest(name, TOP_LEVEL) {
            format!("did you mean {near:?}?")
        } else {
            "expected [defaults], [metrics] or [tenants.NAME]".to_string()
        };
        self.error(
            key.span(),
            format!("unknown key {name:?} at the top level ({hint})"),
        )
    }

    /// `value` as a table, or an error naming `name`.
    fn table<'t, 'i>(
        &self,
        name: &str,
        value: &'t Spanned<DeValue<'i>>,
        expected: &str,
    ) -> Result<&'t DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(table) => Ok(table),
            _ => Err(self.wrong_type(name, value, expected)),
        }
    }

    /// `invalid NAME VALUE: expected WHAT`, at the value.
    fn wrong_type(
        &self,
        name: &str,
        value: &Spanned<DeValue<'_>>,
        expected: &str,
    ) -> anyhow::Error {
        let shown = match value.get_ref() {
            DeValue::String(text) => format!("{text:?}"),
            DeValue::Array(_) => {
                let message = format!("invalid {name}: expected {expected}, not an array");
                return self.error(value.span(), message);
            }
            DeValue::Table(_) => {
                let message = format!("invalid {name}: expected {expected}, not a table");
                return self.error(value.span(), message);
            }
            _ => self.text[value.span()].to_string(),
        };
        self.error(
            value.span(),
            format!("invalid {name} {shown}: expected {expected}"),
        )
    }

    fn string(
        &self,
        name: &str,
        value: &Spanned<DeValue<'_>>,
        expected: &str,
    ) -> Result<Spanned<String>> {
        match value.get_ref() {
            DeValue::String(text) => Ok(Spanned::new(value.span(), text.to_string())),
            _ => Err(self.wrong_type(name, value, expected)),
        }
    }

    /// An array of strings; `[whole, item]` say what is expected of the
    /// array and of each string.
    fn strings(
        &self,
        name: &str,
        value: &Spanned<DeValue<'_>>,
        [whole, item]: [&str; 2],
    ) -> Result<Spanned<Vec<Spanned<String>>>> {
        let DeValue::Array(array) = value.get_ref() else {
            return Err(self.wrong_type(name, value, whole));
        };
        let items = array
            .iter()
            .map(|value| self.string(name, value, item))
            .collect::<Result<_>>()?;
        Ok(Spanned::new(value.span(), items))
    }

    /// A table of strings, each entry spanned by its key; `[whole, item]`
    /// say what is expected of the table and of each string.
    fn string_table(
        &self,
        name: &str,
        value: &Spanned<DeValue<'_>>,
        [whole, expected]: [&str; 2],
    ) -> Result<Vec<Spanned<(String, String)>>> {
        let table = self.table(name, value, whole)?;
        in_file_order(table)
            .into_iter()
            .map(|(key, value)| {
                let entry = format!("{name}.{}", toml_key(key.get_ref()));
                let text = self.string(&entry, value, expected)?;
                Ok(Spanned::new(
                    key.span(),
                    (key.get_ref().to_string(), text.into_inner()),
                ))
            })
            .collect()
    }

    /// A count from 1 to the setting's maximum, spanned by its key.
    fn count(
        &self,
        setting: Setting,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<Spanned<u32>> {
        let max = setting.max_count().unwrap_or(u32::MAX);
        let count = match value.get_ref() {
            DeValue::Integer(n) => u32::from_str_radix(n.as_str(), n.radix()).ok(),
            _ => None,
        };
        match count.filter(|n| (1..=max).contains(n)) {
            Some(n) => Ok(Spanned::new(key.span(), n)),
            None => {
                Err(self.wrong_type(setting.key(), value, &format!("an integer from 1 to {max}")))
            }
        }
    }

    /// The settings of `[defaults]` or a `[tenants.NAME]` table (`context`):
    /// known keys of the right types, each value checked on its own.
    fn layer(&self, table: &DeTable<'_>, context: &str) -> Result<Layer> {
        let mut layer = Layer::default();
        for (key, value) in in_file_order(table) {
            let Some(setting) = Setting::from_key(key.get_ref()) else {
                let name = key.get_ref().as_ref();
                let normalized = normalize(name);
                let near = Setting::from_flag_name(&normalized)
                    .map(Setting::key)
                    .or_else(|| closest(name, Setting::ALL.map(Setting::key)));
                let hint = near.map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
                let message = format!("unknown key {name:?} in {context}{hint}");
                return Err(self.error(key.span(), message));
            };
            let name = setting.key();
            let duration = |slot: &mut Option<Spanned<String>>| -> Result<()> {
                let text = self.string(name, value, "a duration such as \"30s\"")?;
                self.check(&text, cli::parse_duration(name, text.get_ref()))?;
                *slot = Some(text);
                Ok(())
            };
            let nets = |slot: &mut Option<Vec<Spanned<String>>>| -> Result<()> {
                let nets = self.strings(name, value, NETWORKS)?;
                for net in nets.get_ref() {
                    self.check(net, cli::parse_net(name, net.get_ref()))?;
                }
                *slot = Some(nets.into_inner());
                Ok(())
            };
            match setting {
                Setting::Handler => {
                    let path = self.string(name, value, "a path to a component")?;
                    let resolved = cli::relative_to(&self.base, Path::new(path.get_ref()));
                    let checked = match std::fs::metadata(&resolved) {
                        Ok(meta) if meta.is_dir() => Err(anyhow!("it is a directory")),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.into()),
                    };
                    let shown = path.get_ref();
                    self.check(
                        &path,
                        checked.map_err(|e| anyhow!("handler {shown:?}: {e}")),
                    )?;
                    layer.handler = Some(path);
                }
                Setting::Listen => {
                    let addrs = self.strings(name, value, ADDRESSES)?;
                    for addr in addrs.get_ref() {
                        self.check(addr, cli::parse_listen(name, addr.get_ref()))?;
                    }
                    layer.listen = Some(addrs);
                }
                Setting::Strategy => {
                    let expected = "\"threading\", \"forking\", \"prefork\" or \"async\"";
                    let text = self.string(name, value, expected)?;
                    let kind = [
                        StrategyKind::Threading,
                        StrategyKind::Forking,
                        StrategyKind::Prefork,
                        StrategyKind::Async,
                    ]
                    .into_iter()
                    .find(|kind| kind.name() == text.get_ref())
                    .ok_or_else(|| self.wrong_type(name, value, expected))?;
                    layer.strategy = Some(Spanned::new(value.span(), kind));
                }
                Setting::Workers => layer.workers = Some(self.count(setting, key, value)?),
                Setting::Processes => layer.processes = Some(self.count(setting, key, value)?),
                Setting::MaxChildren => layer.max_children = Some(self.count(setting, key, value)?),
                Setting::MaxConnections => {
                    layer.max_connections = Some(self.count(setting, key, value)?);
                }
                Setting::MaxMemory => {
                    let text = self.string(name, value, "a size such as \"64MiB\"")?;
                    self.check(&text, cli::parse_size(name, text.get_ref()))?;
                    layer.max_memory = Some(text);
                }
                Setting::Timeout => duration(&mut layer.timeout)?,
                Setting::IdleTimeout => duration(&mut layer.idle_timeout)?,
                Setting::DrainTimeout => duration(&mut layer.drain_timeout)?,
                Setting::Env => layer.env = Some(self.string_table(name, value, ENV)?),
                Setting::Dirs => layer.dirs = Some(self.string_table(name, value, DIRS)?),
                Setting::Allow => nets(&mut layer.allow)?,
                Setting::Deny => nets(&mut layer.deny)?,
                Setting::AllowPrecompiled => match value.get_ref() {
                    DeValue::Boolean(yes) => layer.allow_precompiled = Some(*yes),
                    _ => return Err(self.wrong_type(name, value, "true or false")),
                },
            }
        }
        Ok(layer)
    }

    /// `[metrics]`: its `addr`.
    fn metrics(&self, value: &Spanned<DeValue<'_>>) -> Result<Spanned<SocketAddr>> {
        let table = self.table("metrics", value, "a table")?;
        let mut addr = None;
        for (key, value) in in_file_order(table) {
            let name = key.get_ref().as_ref();
            if name != "addr" {
                let hint = closest(name, ["addr"])
                    .map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
                let message = format!("unknown key {name:?} in [metrics]{hint}");
                return Err(self.error(key.span(), message));
            }
            let text = self.string(
                "[metrics] addr",
                value,
                "an address such as \"127.0.0.1:9464\"",
            )?;
            let parsed = self.check(
                &text,
                cli::parse_socket_addr("[metrics] addr", text.get_ref()),
            )?;
            addr = Some(Spanned::new(text.span(), parsed));
        }
        addr.ok_or_else(|| {
            self.error(
                value.span(),
                "[metrics] has no addr: add addr = \"IP:PORT\", e.g. \"127.0.0.1:9464\"",
            )
        })
    }

    /// `[tenants.NAME]`, each table in file order.
    fn tenants(&self, value: &Spanned<DeValue<'_>>) -> Result<Vec<TenantTable>> {
        let table = self.table("tenants", value, "[tenants.NAME] tables")?;
        let mut tenants = Vec::with_capacity(table.len());
        for (key, value) in in_file_order(table) {
            let name = key.get_ref().as_ref();
            let valid = (1..=MAX_TENANT_NAME).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                let message = format!(
                    "invalid tenant name {name:?}: expected 1 to {MAX_TENANT_NAME} of A-Z, a-z, 0-9, '_', '.' and '-'"
                );
                return Err(self.error(key.span(), message));
            }
            let context = format!("[tenants.{}]", toml_key(name));
            let table = self.table(&format!("tenants.{}", toml_key(name)), value, "a table")?;
            tenants.push(TenantTable {
                name: name.to_string(),
                span: value.span(),
                layer: self.layer(table, &context)?,
            });
        }
        Ok(tenants)
    }

    /// A tenant's own settings over `[defaults]`, as the options the flags
    /// would give; and where each listen address was written.
    fn options(
        &self,
        tenant: &TenantTable,
        defaults: &Layer,
    ) -> Result<(TenantOptions, Vec<Range<usize>>)> {
        let own = &tenant.layer;
        let strategy = own.strategy.as_ref().or(defaults.strategy.as_ref());
        let kind = strategy.map_or(DEFAULT_STRATEGY, |s| *s.get_ref());
        // A count in [defaults] applies only where the strategy uses it; in
        // the tenant's own table, a count its strategy ignores is an error.
        fn pick<T: Clone>(own: &Option<T>, default: &Option<T>, applies: bool) -> Option<T> {
            own.clone().or_else(|| default.clone().filter(|_| applies))
        }
        let count = |setting: Setting,
                     own: &Option<Spanned<u32>>,
                     default: &Option<Spanned<u32>>| {
            pick(own, default, setting.applies_to(kind)).map(|n| self.given(*n.get_ref(), n.span()))
        };
        let text = |own: &Option<Spanned<String>>, default: &Option<Spanned<String>>| {
            pick(own, default, true).map(|s| self.given(s.get_ref().clone(), s.span()))
        };
        let texts = |own: &Option<Vec<Spanned<String>>>, default: &Option<Vec<Spanned<String>>>| {
            pick(own, default, true)
                .unwrap_or_default()
                .into_iter()
                .map(|s| self.given(s.get_ref().clone(), s.span()))
                .collect::<Vec<_>>()
        };
        let listen = pick(&own.listen, &defaults.listen, true)
            .map(Spanned::into_inner)
            .unwrap_or_default();
        if listen.is_empty() {
            let message = format!(
                "tenant {:?} has no listen address: add e.g. listen = [\"127.0.0.1:7001\"]",
                tenant.name
            );
            return Err(self.error(tenant.span.clone(), message));
        }
        let spans = listen.iter().map(Spanned::span).collect();
        let listen = texts(&Some(listen), &None);
        let env = pick(&own.env, &defaults.env, true)
            .unwrap_or_default()
            .into_iter()
            .map(|e| self.given(e.get_ref().clone(), e.span()))
            .collect();
        let dirs = pick(&own.dirs, &defaults.dirs, true)
            .unwrap_or_default()
            .into_iter()
            .map(|d| {
                let (host, guest) = d.get_ref().clone();
                let dir = DirOption {
                    text: host.clone(),
                    host: PathBuf::from(host),
                    guest,
                };
                self.given(dir, d.span())
            })
            .collect();
        let options = TenantOptions {
            naming: Naming::Keys,
            tenant: tenant.name.clone(),
            base: Some(self.base.clone()),
            handler: pick(&own.handler, &defaults.handler, true)
                .map(|h| self.given(PathBuf::from(h.get_ref()), h.span())),
            listen,
            strategy: strategy.map(|s| self.given(*s.get_ref(), s.span())),
            workers: count(Setting::Workers, &own.workers, &defaults.workers),
            processes: count(Setting::Processes, &own.processes, &defaults.processes),
            max_children: count(
                Setting::MaxChildren,
                &own.max_children,
                &defaults.max_children,
            ),
            max_connections: count(
                Setting::MaxConnections,
                &own.max_connections,
                &defaults.max_connections,
            ),
            max_memory: text(&own.max_memory, &defaults.max_memory),
            timeout: text(&own.timeout, &defaults.timeout),
            idle_timeout: text(&own.idle_timeout, &defaults.idle_timeout),
            drain_timeout: text(&own.drain_timeout, &defaults.drain_timeout),
            env,
            dirs,
            allow: texts(&own.allow, &defaults.allow),
            deny: texts(&own.deny, &defaults.deny),
            allow_precompiled: own
                .allow_precompiled
                .or(defaults.allow_precompiled)
                .unwrap_or(false),
            cache_dir: self.cache_dir.clone(),
        };
        Ok((options, spans))
    }

    /// No two listen addresses may be the same, nor the metrics address one
    /// of them: the second of two in the file is the error.
    fn check_addresses(
        &self,
        tenants: &[ServeConfig],
        mut listening: Vec<(Range<usize>, usize, ListenAddr)>,
        metrics: Option<&Spanned<SocketAddr>>,
    ) -> Result<()> {
        listening.sort_by(|a, b| {
            (a.0.start, &tenants[a.1].tenant).cmp(&(b.0.start, &tenants[b.1].tenant))
        });
        for (i, (span, tenant, addr)) in listening.iter().enumerate() {
            let earlier = listening[..i]
                .iter()
                .find(|(_, _, other)| overlap(addr, other));
            let Some((_, first, other)) = earlier else {
                continue;
            };
            let (first, second) = (&tenants[*first].tenant, &tenants[*tenant].tenant);
            let on = if addr == other {
                format!("on {addr}")
            } else {
                format!("on port {} ({other} and {addr})", port(addr))
            };
            let message = if first == second {
                format!("tenant {second:?} listens twice {on}")
            } else {
                format!("tenants {first:?} and {second:?} both listen {on}")
            };
            return Err(self.error(span.clone(), message));
        }
        if let Some(metrics) = metrics {
            let addr = ListenAddr::Tcp(*metrics.get_ref());
            if let Some((_, tenant, other)) = listening.iter().find(|(_, _, a)| overlap(&addr, a)) {
                let message = format!(
                    "[metrics] addr {addr} is also where tenant {:?} listens ({other})",
                    tenants[*tenant].tenant
                );
                return Err(self.error(metrics.span(), message));
            }
        }
        Ok(())
    }
}

/// Whether binding both addresses would collide: the same Unix path, or the
/// same TCP port on the same IP or on the unspecified IP of the same family
/// (an IPv4-mapped IPv6 address counts as IPv4). Port 0 (any free port)
/// collides with nothing. `[::]` and `0.0.0.0` do not collide: the host
/// binds `[::]` IPv6 only (`listener::bind_tcp`).
fn overlap(a: &ListenAddr, b: &ListenAddr) -> bool {
    let ip = |addr: &SocketAddr| match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match (a, b) {
        (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
        (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => {
            let (ip_a, ip_b) = (ip(a), ip(b));
            a.port() != 0
                && a.port() == b.port()
                && (ip_a == ip_b
                    || (ip_a.is_ipv4() == ip_b.is_ipv4()
                        && (ip_a.is_unspecified() || ip_b.is_unspecified())))
        }
        _ => false,
    }
}

fn port(addr: &ListenAddr) -> u16 {
    match addr {
        ListenAddr::Tcp(addr) => addr.port(),
        ListenAddr::Unix(_) => 0,
    }
}

/// A key as a flag-minded or careless writer might mean it: lower case,
/// dashes for underscores.
fn normalize(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

/// The candidate nearest to `key`, if near enough to be a typo.
fn closest<'c>(key: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let key = normalize(key);
    let limit = (key.chars().count() / 3).clamp(1, 2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&key, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::config::DirGrant;

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
dirs = { "static" = "/static", "/tmp" = "/scratch" }
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
        assert_eq!(echo.strategy, StrategyKind::Forking);
        // max-children from [defaults] fits forking; workers does not and
        // is left out rather than refused.
        assert_eq!(echo.max_children, 7);
        assert_eq!(echo.workers, ServeConfig::default_workers());
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
                    guest: "/static".into()
                },
                DirGrant {
                    host: "/tmp".into(),
                    guest: "/scratch".into()
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
        assert_eq!(hello.strategy, StrategyKind::Threading);
        assert_eq!(hello.workers, 3);
        assert_eq!(hello.max_children, cli::DEFAULT_MAX_CHILDREN);
        assert_eq!(hello.max_connections, None);
        assert_eq!(hello.limits.max_memory, 64 << 20);
        assert_eq!(hello.limits.timeout, Duration::from_secs(30));
        assert!(hello.grants.env.is_empty() && hello.grants.dirs.is_empty());
        assert!(hello.access.is_open());
        assert!(!hello.allow_precompiled);

        assert_eq!(builtin.handler, HandlerSource::BuiltinEcho);
        assert_eq!(builtin.strategy, StrategyKind::Prefork);
        assert_eq!((builtin.processes, builtin.workers), (2, 3));

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
dirs = {{ "{static_}" = "/static", "/tmp" = "/scratch" }}
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
            expect("4:24", cli::parse_net("allow", "10.0.0.0/33").map(drop))
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
            expect("4:14", cli::parse_size("max-memory", "lots").map(drop))
        );
        let text = format!("[defaults]\nidle-timeout = \"30x\"\n{ECHO}");
        assert_eq!(
            error("duration", &text),
            expect("2:16", cli::parse_duration("idle-timeout", "30x").map(drop))
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
                cli::parse_listen("listen", "127.0.0.1:99999").map(drop)
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
        assert_eq!(
            (echo.workers, echo.max_children),
            (5, cli::DEFAULT_MAX_CHILDREN)
        );
        assert_eq!(echo.processes, ServeConfig::default_processes());
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
                cli::parse_socket_addr("[metrics] addr", "nonsense").unwrap_err()
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
        let scratch = Scratch::new("position");
        let doc = Doc {
            name: "f".into(),
            text: "\u{feff}a\n\u{e9}\u{e9}x\n",
            base: scratch.dir.clone(),
            cache_dir: None,
        };
        assert_eq!(doc.at(0), "f:1:1");
        assert_eq!(doc.at(3), "f:1:1");
        assert_eq!(doc.at(4), "f:1:2");
        assert_eq!(doc.at(9), "f:2:3");
        assert_eq!(doc.at(8), "f:2:2");
        assert_eq!(doc.at(100), "f:3:1");
    }
}
