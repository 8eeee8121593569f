//! One setting's value, from its text to its type: the parsers every flag
//! and config-file key share (a duration, a size, a network, an address, a
//! variable, a directory grant), the built-in defaults and bounds, and
//! [`Setting`], the names of one tenant's settings as flags and as keys.
//! Every error names the setting as given: `invalid NAME "TEXT": why`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::model::{DirGrant, ListenAddr, ProxyVersion, StrategyKind};

/// `--addr` when not given.
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:7878";
/// The strategy when neither a flag nor a key names one.
pub(crate) const DEFAULT_STRATEGY: StrategyKind = StrategyKind::Threading;
/// `--max-memory` / `max-memory` when not given.
pub(crate) const DEFAULT_MAX_MEMORY: &str = "64MiB";
/// `--timeout` / `timeout` when not given.
pub(crate) const DEFAULT_TIMEOUT: &str = "30s";
/// `--idle-timeout` / `idle-timeout` when not given.
pub(crate) const DEFAULT_IDLE_TIMEOUT: &str = "10s";
/// `--drain-timeout` / `drain-timeout` when not given.
pub(crate) const DEFAULT_DRAIN_TIMEOUT: &str = "10s";
/// `--proxy-header-timeout` / `proxy-header-timeout` when not given: a
/// balancer sends its header at once, with the connection's first bytes.
pub(crate) const DEFAULT_PROXY_HEADER_TIMEOUT: &str = "3s";
/// Child processes alive at once under forking. socketserver's
/// `ForkingMixIn` stops at 40, which turns the 41st live client away until
/// one leaves; a live child costs about 300 KiB of its own (its dirtied pages, its
/// instance and its kernel structures; the rest it shares with its
/// parent), so 256 bound the worst case under 100 MiB while long-lived
/// clients are served at once.
pub(crate) const DEFAULT_MAX_CHILDREN: usize = 256;
/// The largest `--workers`.
pub(crate) const MAX_WORKERS: u32 = 4096;
/// The largest `--processes`.
pub(crate) const MAX_PROCESSES: u32 = 1024;
/// The largest `--max-children`.
pub(crate) const MAX_CHILDREN: u32 = 65536;
/// The largest `--max-connections`.
pub(crate) const MAX_CONNECTIONS: u32 = 1_000_000;
/// The longest duration a flag takes (deadlines are computed from it).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The most a 32-bit linear memory can hold.
const MAX_MEMORY_LIMIT: u64 = 4 << 30;

/// "a", "a or b", "a, b or c".
pub(crate) fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// One setting of a tenant: a `host serve` flag, and the config-file key of
/// the same name, so a flag and a key never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Setting {
    Handler,
    Listen,
    Strategy,
    Workers,
    Processes,
    MaxChildren,
    MaxConnections,
    MaxMemory,
    Timeout,
    IdleTimeout,
    DrainTimeout,
    Env,
    Dirs,
    Allow,
    Deny,
    AllowPrecompiled,
    ProxyProtocol,
    ProxyFrom,
    ProxyHeaderTimeout,
    AllowOutbound,
    MaxOutbound,
}

impl Setting {
    pub(crate) const ALL: [Setting; 21] = [
        Setting::Handler,
        Setting::Listen,
        Setting::Strategy,
        Setting::Workers,
        Setting::Processes,
        Setting::MaxChildren,
        Setting::MaxConnections,
        Setting::MaxMemory,
        Setting::Timeout,
        Setting::IdleTimeout,
        Setting::DrainTimeout,
        Setting::Env,
        Setting::Dirs,
        Setting::Allow,
        Setting::Deny,
        Setting::AllowPrecompiled,
        Setting::ProxyProtocol,
        Setting::ProxyFrom,
        Setting::ProxyHeaderTimeout,
        Setting::AllowOutbound,
        Setting::MaxOutbound,
    ];

    /// The config-file key.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Setting::Handler => "handler",
            Setting::Listen => "listen",
            Setting::Strategy => "strategy",
            Setting::Workers => "workers",
            Setting::Processes => "processes",
            Setting::MaxChildren => "max-children",
            Setting::MaxConnections => "max-connections",
            Setting::MaxMemory => "max-memory",
            Setting::Timeout => "timeout",
            Setting::IdleTimeout => "idle-timeout",
            Setting::DrainTimeout => "drain-timeout",
            Setting::Env => "env",
            Setting::Dirs => "dirs",
            Setting::Allow => "allow",
            Setting::Deny => "deny",
            Setting::AllowPrecompiled => "allow-precompiled",
            Setting::ProxyProtocol => "proxy-protocol",
            Setting::ProxyFrom => "proxy-from",
            Setting::ProxyHeaderTimeout => "proxy-header-timeout",
            Setting::AllowOutbound => "allow-outbound",
            Setting::MaxOutbound => "max-outbound",
        }
    }

    /// The flag.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Setting::Handler => "--handler",
            Setting::Listen => "--addr",
            Setting::Strategy => "--strategy",
            Setting::Workers => "--workers",
            Setting::Processes => "--processes",
            Setting::MaxChildren => "--max-children",
            Setting::MaxConnections => "--max-connections",
            Setting::MaxMemory => "--max-memory",
            Setting::Timeout => "--timeout",
            Setting::IdleTimeout => "--idle-timeout",
            Setting::DrainTimeout => "--drain-timeout",
            Setting::Env => "--env",
            Setting::Dirs => "--dir",
            Setting::Allow => "--allow",
            Setting::Deny => "--deny",
            Setting::AllowPrecompiled => "--allow-precompiled",
            Setting::ProxyProtocol => "--proxy-protocol",
            Setting::ProxyFrom => "--proxy-from",
            Setting::ProxyHeaderTimeout => "--proxy-header-timeout",
            Setting::AllowOutbound => "--allow-outbound",
            Setting::MaxOutbound => "--max-outbound",
        }
    }

    /// The setting a config-file key names.
    pub(crate) fn from_key(key: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.key() == key)
    }

    /// The setting a flag names, written without its dashes (`addr`,
    /// `listen`, `dir`).
    pub(crate) fn from_flag_name(name: &str) -> Option<Setting> {
        match name {
            "listen" => Some(Setting::Listen),
            _ => Setting::ALL
                .into_iter()
                .find(|s| s.flag().strip_prefix("--") == Some(name)),
        }
    }

    /// The strategies the setting applies to; empty: every strategy.
    pub(crate) fn strategies(self) -> &'static [StrategyKind] {
        match self {
            Setting::Workers => &[
                StrategyKind::Threading,
                StrategyKind::Prefork,
                StrategyKind::Async,
            ],
            Setting::Processes => &[StrategyKind::Prefork],
            Setting::MaxChildren => &[StrategyKind::Forking],
            _ => &[],
        }
    }

    pub(crate) fn applies_to(self, strategy: StrategyKind) -> bool {
        let strategies = self.strategies();
        strategies.is_empty() || strategies.contains(&strategy)
    }
}

/// How messages name a setting: by its flag or by its config-file key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Naming {
    #[default]
    Flags,
    Keys,
}

impl Naming {
    pub(crate) fn name(self, setting: Setting) -> &'static str {
        match self {
            Naming::Flags => setting.flag(),
            Naming::Keys => setting.key(),
        }
    }
}

/// A CIDR network such as `127.0.0.0/8` or `::1/128`; a bare address means
/// that address alone.
pub(crate) fn parse_net(flag: &str, text: &str) -> Result<ipnet::IpNet> {
    let trimmed = text.trim();
    if let Ok(net) = trimmed.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    match trimmed.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ipnet::IpNet::from(ip)),
        Err(_) => bail!(
            "invalid {flag} {text:?}: expected a network in CIDR form, e.g. 10.0.0.0/8 or ::1/128"
        ),
    }
}

/// `v1`, `v2` or `any`: the PROXY protocol versions a tenant takes.
pub(crate) fn parse_proxy_version(flag: &str, text: &str) -> Result<ProxyVersion> {
    match text.trim() {
        "v1" => Ok(ProxyVersion::V1),
        "v2" => Ok(ProxyVersion::V2),
        "any" => Ok(ProxyVersion::Any),
        _ => bail!("invalid {flag} {text:?}: expected v1, v2 or any"),
    }
}

/// `IP:PORT`, `HOST:PORT`, `unix:PATH` or `systemd:NAME`.
pub(crate) fn parse_listen(flag: &str, text: &str) -> Result<ListenAddr> {
    if let Some(name) = text.strip_prefix("systemd:") {
        return parse_systemd_name(flag, text, name).map(ListenAddr::Systemd);
    }
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("invalid {flag} {text:?}: expected unix:PATH");
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    parse_socket_addr(flag, text).map(ListenAddr::Tcp)
}

/// A socket name as systemd's `FileDescriptorName=` allows it: at most 255
/// printable ASCII characters, no `:`. Empty: the first passed socket.
fn parse_systemd_name(flag: &str, text: &str, name: &str) -> Result<String> {
    let printable = |c: char| c.is_ascii_graphic() && c != ':';
    if name.len() > 255 || !name.chars().all(printable) {
        bail!(
            "invalid {flag} {text:?}: expected systemd:NAME, NAME a socket's FileDescriptorName= (at most 255 printable ASCII characters, no ':' or space), or systemd: for the first passed socket"
        );
    }
    Ok(name.to_string())
}

/// Room for a Unix socket's path, its terminating NUL included
/// (`sizeof(sockaddr_un.sun_path)` on Linux).
const UNIX_PATH_ROOM: usize = 108;

/// What `bind(2)` would refuse of a Unix socket path, found before anything
/// binds: a path too long for `sockaddr_un`, or a directory that does not
/// exist. `text` is the address as given.
pub(crate) fn check_unix_path(flag: &str, text: &str, path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len >= UNIX_PATH_ROOM {
        bail!(
            "invalid {flag} {text:?}: the socket path {} is {len} bytes long; a Unix socket path has at most {} bytes",
            path.display(),
            UNIX_PATH_ROOM - 1
        );
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!(
            "invalid {flag} {text:?}: {} is not a directory",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "invalid {flag} {text:?}: the directory {} does not exist",
            dir.display()
        ),
        // Anything else (a permission, say) is for bind(2) to report.
        _ => Ok(()),
    }
}

/// Resolves a relative path against `base` (the config file's directory).
pub(crate) fn relative_to(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// `500ms`, `30s`, `2m`, `1h30m`; zero is refused.
pub(crate) fn parse_duration(flag: &str, text: &str) -> Result<Duration> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        anyhow!("invalid {flag} {text:?}: {e} (expected a duration such as 500ms, 30s or 2m)")
    })?;
    if duration.is_zero() {
        bail!("invalid {flag} {text:?}: must be longer than zero");
    }
    if duration > MAX_DURATION {
        bail!("invalid {flag} {text:?}: must be at most 365 days");
    }
    Ok(duration)
}

/// `64MiB`, `512KiB`, `1GiB`, or bytes; between 64 KiB and 4 GiB. Decimal
/// units (`64MB`, `64M`, `1G`) are refused as ambiguous: the docs write
/// binary units, and `64MB` would be 61 MiB.
pub(crate) fn parse_size(flag: &str, text: &str) -> Result<u64> {
    refuse_decimal_unit(flag, text)?;
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|e| anyhow!("invalid {flag} {text:?}: {e} (expected a size such as 64MiB)"))?;
    let bytes = size.as_u64();
    if !(64 << 10..=MAX_MEMORY_LIMIT).contains(&bytes) {
        bail!("invalid {flag} {text:?}: must be between 64KiB and 4GiB");
    }
    Ok(bytes)
}

/// A size written with a decimal unit (`MB`, `M`, `gb`...): refused, with
/// the binary spelling to use instead.
fn refuse_decimal_unit(flag: &str, text: &str) -> Result<()> {
    let trimmed = text.trim();
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let unit = unit.trim();
    let letter = unit.chars().next().map(|c| c.to_ascii_uppercase());
    let decimal = matches!(unit.len(), 1 | 2)
        && matches!(letter, Some('K' | 'M' | 'G' | 'T' | 'P'))
        && (unit.len() == 1 || unit[1..].eq_ignore_ascii_case("b"));
    if decimal && !number.is_empty() {
        let binary = format!("{}iB", letter.unwrap_or('M'));
        bail!(
            "invalid {flag} {text:?}: {unit} is ambiguous (decimal or binary?); write {number}{binary} for binary units, or the size in bytes"
        );
    }
    Ok(())
}

/// `KEY=VALUE`, or `KEY` alone: the host's own value of `KEY`, read here,
/// once (only the variables named are ever passed; never the whole
/// environment). A `KEY` the host's environment lacks is refused.
pub(crate) fn parse_env(text: &str) -> Result<(String, String)> {
    parse_env_from(text, |key| std::env::var_os(key))
}

/// [`parse_env`], reading the host's environment through `lookup`.
pub(crate) fn parse_env_from(
    text: &str,
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(String, String)> {
    let no_nul = |s: &str| !s.contains('\0');
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && no_nul(key) && no_nul(value) => {
            Ok((key.to_string(), value.to_string()))
        }
        None if !text.is_empty() && no_nul(text) => match lookup(text) {
            Some(value) => match value.into_string() {
                Ok(value) if no_nul(&value) => Ok((text.to_string(), value)),
                _ => bail!("invalid --env {text:?}: the host's value of {text} is not UTF-8 text"),
            },
            None => bail!(
                "invalid --env {text:?}: {text} is not set in the host's environment (write {text}=VALUE to give a value)"
            ),
        },
        _ => bail!("invalid --env {text:?}: expected NAME=VALUE, or NAME to pass the host's value"),
    }
}

/// A variable name and value the guest can be given.
pub(crate) fn check_env(name: &str, (key, value): &(String, String)) -> Result<(String, String)> {
    if key.is_empty() || key.contains(['=', '\0']) {
        bail!("invalid {name} name {key:?}: expected a name without '=' or NUL");
    }
    if value.contains('\0') {
        bail!("invalid {name} value for {key:?}: it contains NUL");
    }
    Ok((key.clone(), value.clone()))
}

/// One directory grant as given: `text` is how it was written
/// (`HOST::GUEST` for `--dir`, the host path for a `dirs` key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirOption {
    pub text: String,
    pub host: PathBuf,
    pub guest: String,
    /// `::rw` / `mode = "rw"`: the guest may also create, write, rename and
    /// remove files and directories under it. Read-only otherwise.
    pub writable: bool,
}

/// `HOST`, `HOST::GUEST`, `HOST::GUEST::ro` or `HOST::GUEST::rw`, split;
/// `HOST` alone is seen at the same path in the guest (as wasmtime's
/// `--dir`). The directory is checked later.
pub(crate) fn split_dir(text: &str) -> Result<DirOption> {
    let bad = || {
        anyhow!("invalid --dir {text:?}: expected HOST_PATH, HOST_PATH::GUEST_PATH or HOST_PATH::GUEST_PATH::rw")
    };
    let mut parts = text.split("::");
    let host = parts.next().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    let guest = parts.next().unwrap_or(host);
    let writable = match parts.next() {
        None | Some("ro") => false,
        Some("rw") => true,
        Some(_) => return Err(bad()),
    };
    if guest.is_empty() || parts.next().is_some() {
        return Err(bad());
    }
    Ok(DirOption {
        text: text.to_string(),
        host: PathBuf::from(host),
        guest: guest.to_string(),
        writable,
    })
}

/// The grant of an existing host directory, `resolve`d.
pub(crate) fn check_dir(
    name: &str,
    dir: &DirOption,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<DirGrant> {
    let text = &dir.text;
    if dir.guest.is_empty() {
        bail!("invalid {name} {text:?}: the guest path is empty");
    }
    let host = resolve(&dir.host);
    let shown = host.display();
    let meta =
        std::fs::metadata(&host).map_err(|e| anyhow!("invalid {name} {text:?}: {shown}: {e}"))?;
    if !meta.is_dir() {
        bail!("invalid {name} {text:?}: {shown} is not a directory");
    }
    Ok(DirGrant {
        host,
        guest: dir.guest.clone(),
        writable: dir.writable,
    })
}

pub(crate) fn parse_socket_addr(flag: &str, text: &str) -> Result<SocketAddr> {
    let bad = |why: String| anyhow!("invalid {flag} {text:?}: {why}");
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(why) = not_an_ip(text) {
        return Err(bad(why));
    }
    // A host name such as localhost:7878.
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| bad(format!("{e} (expected IP:PORT, e.g. 127.0.0.1:7878)")))?;
    addrs
        .next()
        .ok_or_else(|| bad("the name resolves to no address".to_string()))
}

/// Why `text`, which did not parse as `IP:PORT`, is not worth a name lookup:
/// its host part is written like an IP address (digits and dots, or in
/// brackets) but is not one, e.g. `999.1.1.1:80`.
fn not_an_ip(text: &str) -> Option<String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Some("expected IP:PORT, e.g. 127.0.0.1:7878".to_string());
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Some(format!("{port:?} is not a port (0 to 65535)"));
    }
    let bracketed = host.starts_with('[') || host.ends_with(']');
    let dotted = !host.is_empty() && host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if bracketed || dotted {
        return Some(format!(
            "{host} is not an IP address (expected IP:PORT, e.g. 127.0.0.1:7878 or [::1]:7878)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_is_written_as_wasmtime_writes_it_or_with_rw() {
        let same = split_dir("/srv/data").unwrap();
        assert_eq!((same.guest.as_str(), same.writable), ("/srv/data", false));
        let moved = split_dir("/srv/data::/data").unwrap();
        assert_eq!((moved.guest.as_str(), moved.writable), ("/data", false));
        let ro = split_dir("/srv/data::/data::ro").unwrap();
        assert!(!ro.writable);
        let rw = split_dir("/srv/data::/data::rw").unwrap();
        assert_eq!((rw.guest.as_str(), rw.writable), ("/data", true));
        for bad in ["", "::/x", "/a::", "/a::/b::rw::x", "/a::/b::w"] {
            assert!(split_dir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_name_alone_takes_the_hosts_value_only_if_it_has_one() {
        let host = |key: &str| (key == "HOME").then(|| "/root".into());
        let value = |text| parse_env_from(text, host);
        assert_eq!(value("HOME").unwrap(), ("HOME".into(), "/root".into()));
        assert_eq!(value("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(value("A=").unwrap(), ("A".into(), String::new()));
        assert_eq!(
            value("NOPE").unwrap_err().to_string(),
            "invalid --env \"NOPE\": NOPE is not set in the host's environment (write NOPE=VALUE to give a value)"
        );
        assert_eq!(
            value("=x").unwrap_err().to_string(),
            "invalid --env \"=x\": expected NAME=VALUE, or NAME to pass the host's value"
        );
    }

    #[test]
    fn decimal_size_units_are_refused_binary_ones_taken() {
        assert_eq!(parse_size("--max-memory", "64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("--max-memory", "67108864").unwrap(), 64 << 20);
        assert_eq!(parse_size("--max-memory", "512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("--max-memory", "1gib").unwrap(), 1 << 30);
        for (text, unit, binary) in [
            ("64MB", "MB", "64MiB"),
            ("64M", "M", "64MiB"),
            ("64 mb", "mb", "64MiB"),
            ("1GB", "GB", "1GiB"),
            ("512kb", "kb", "512KiB"),
        ] {
            let err = parse_size("--max-memory", text).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("invalid --max-memory {text:?}: {unit} is ambiguous (decimal or binary?); write {binary} for binary units, or the size in bytes")
            );
        }
    }

    #[test]
    fn an_address_that_is_no_ip_is_not_looked_up() {
        let err = |text| parse_socket_addr("--addr", text).unwrap_err().to_string();
        assert_eq!(
            err("999.1.1.1:80"),
            "invalid --addr \"999.1.1.1:80\": 999.1.1.1 is not an IP address (expected IP:PORT, e.g. 127.0.0.1:7878 or [::1]:7878)"
        );
        assert!(err("[::g]:80").contains("[::g] is not an IP address"));
        assert_eq!(
            err("127.0.0.1:99999"),
            "invalid --addr \"127.0.0.1:99999\": \"99999\" is not a port (0 to 65535)"
        );
        assert_eq!(
            err("127.0.0.1"),
            "invalid --addr \"127.0.0.1\": expected IP:PORT, e.g. 127.0.0.1:7878"
        );
        assert!(parse_socket_addr("--addr", "localhost:7878").is_ok());
        assert!(matches!(
            parse_listen("--addr", "systemd:web").unwrap(),
            ListenAddr::Systemd(name) if name == "web"
        ));
        assert!(matches!(
            parse_listen("--addr", "unix:/run/h.sock").unwrap(),
            ListenAddr::Unix(_)
        ));
    }
}
