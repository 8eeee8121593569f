//! The effective settings of a host, written back as TOML a config file may
//! hold (`host config check`): every tenant with its defaults filled in.

use std::fmt::Write as _;

use super::log_level::LogLevel;
use super::model::{HandlerSource, HostConfig, ServeConfig, Strategy};

/// The effective settings of every tenant, defaults filled in, as TOML a
/// config file may hold (`host config check`).
pub(crate) fn describe(host: &HostConfig) -> String {
    let mut out = String::new();
    if let Some(addr) = host.metrics_addr {
        out.push_str("[metrics]\n");
        line(&mut out, "addr", toml_str(&addr.to_string()));
    }
    // Only when not the default, so a file without it reads as before.
    if host.log_level != LogLevel::default() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str("[defaults]\n");
        line(&mut out, "log-level", toml_str(&host.log_level.to_string()));
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
    match tenant.strategy {
        Strategy::Threading { workers } | Strategy::Async { workers } => {
            line(out, "workers", workers.to_string());
        }
        Strategy::Prefork { processes, workers } => {
            line(out, "processes", processes.to_string());
            line(out, "workers", workers.to_string());
        }
        Strategy::Forking { max_children } => {
            line(out, "max-children", max_children.to_string());
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
        let guest = if d.writable {
            format!("{{ guest = {}, mode = \"rw\" }}", toml_str(&d.guest))
        } else {
            toml_str(&d.guest)
        };
        (toml_key(&host), guest)
    });
    line(out, "dirs", toml_inline_table(dirs));
    let nets = |nets: &[ipnet::IpNet]| toml_array(nets.iter().map(|n| toml_str(&n.to_string())));
    line(out, "allow", nets(&tenant.access.allow));
    line(out, "deny", nets(&tenant.access.deny));
    if let Some(proxy) = &tenant.proxy {
        line(out, "proxy-protocol", toml_str(proxy.version.name()));
        line(out, "proxy-from", nets(&proxy.from));
        line(out, "proxy-header-timeout", duration(proxy.header_timeout));
    }
    line(
        out,
        "allow-precompiled",
        tenant.allow_precompiled.to_string(),
    );
    let outbound = &tenant.grants.outbound;
    if !outbound.grants.is_empty() {
        let grants = outbound.grants.iter().map(|g| toml_str(&g.text));
        line(out, "allow-outbound", toml_array(grants));
        line(out, "max-outbound", outbound.max.to_string());
    }
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
pub(super) fn toml_str(text: &str) -> String {
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
pub(super) fn toml_key(key: &str) -> String {
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
