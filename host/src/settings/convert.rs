//! The one conversion from settings as given ([`RawHost`], from the flags
//! or from a config file) to the validated [`HostConfig`]: each value parsed
//! once, where it was given; a tenant's own table over `[defaults]` over the
//! built-in defaults; the knobs a strategy does not use refused (in a
//! tenant) or dropped (from `[defaults]`); and the host-wide rules (no two
//! listeners on one address, `--metrics-addr` over `[metrics]`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use ipnet::IpNet;

use super::log_level::LogLevel;
use super::model::{
    Access, DirGrant, Grants, HandlerSource, HostConfig, Limits, ListenAddr, ServeConfig, Strategy,
    StrategyKind, MAX_TENANTS,
};
use super::outbound::OutboundLayer;
use super::proxy::ProxyLayer;
use super::raw::{locate, Given, Layer, Place, RawHost, RawTenant};
use super::values::{
    check_dir, check_env, check_unix_path, one_of, parse_duration, parse_listen, parse_net,
    parse_size, parse_socket_addr, relative_to, Naming, Setting, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CHILDREN, DEFAULT_MAX_MEMORY, DEFAULT_STRATEGY,
    DEFAULT_TIMEOUT,
};

/// A layer with every value it gives parsed and checked.
#[derive(Clone, Debug, Default)]
struct Checked {
    handler: Option<PathBuf>,
    /// Each address with where it was given.
    listen: Option<Vec<(Option<Place>, ListenAddr)>>,
    strategy: Option<StrategyKind>,
    workers: Option<Given<u32>>,
    processes: Option<Given<u32>>,
    max_children: Option<Given<u32>>,
    max_connections: Option<u32>,
    max_memory: Option<u64>,
    timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    env: Option<Vec<(String, String)>>,
    dirs: Option<Vec<DirGrant>>,
    allow: Option<Vec<IpNet>>,
    deny: Option<Vec<IpNet>>,
    proxy: ProxyLayer,
    allow_precompiled: Option<bool>,
    outbound: OutboundLayer,
}

/// Validates `raw` into the host's config. Compiles nothing and binds
/// nothing.
pub(crate) fn host(raw: RawHost) -> Result<HostConfig> {
    let metrics_addr_flag = raw.metrics_addr_flag;
    let reader = Reader {
        naming: raw.naming,
        base: raw.base.as_deref(),
    };
    let defaults = reader.layer(&raw.defaults)?;
    let metrics_addr = match &raw.metrics_addr {
        Some(given) => Some(
            parse_socket_addr("[metrics] addr", &given.value)
                .map(|addr| (addr, given.at.clone()))
                .map_err(|e| given.locate(e))?,
        ),
        None => None,
    };
    let mut own = Vec::with_capacity(raw.tenants.len());
    for tenant in &raw.tenants {
        own.push(reader.layer(&tenant.layer)?);
    }
    if raw.tenants.is_empty() {
        let message = anyhow!("no tenants: add a [tenants.NAME] table with a listen key");
        return Err(locate(raw.tenants_at.as_ref(), message));
    }
    if let Some(extra) = raw.tenants.get(MAX_TENANTS) {
        let message = anyhow!(
            "too many tenants: tenant {:?} is number {}, and one host serves at most {MAX_TENANTS}",
            extra.name,
            MAX_TENANTS + 1
        );
        return Err(locate(extra.at.as_ref(), message));
    }
    let mut configs = Vec::with_capacity(raw.tenants.len());
    let mut listening = Vec::new();
    for (tenant, own) in raw.tenants.iter().zip(own) {
        let (config, places) = reader.tenant(tenant, own, &defaults, raw.cache_dir.clone())?;
        for (addr, at) in config.listen.iter().zip(places) {
            listening.push((at, configs.len(), addr.clone()));
        }
        configs.push(config);
    }
    check_addresses(&configs, listening, metrics_addr.as_ref())?;
    configs.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    // Checked even when the flag wins: the file must be right on its own.
    let file_log_level = raw
        .log_level
        .as_ref()
        .map(|given| LogLevel::parse("log-level", &given.value).map_err(|e| given.locate(e)))
        .transpose()?;
    let log_level = raw
        .log_level_flag
        .clone()
        .or(file_log_level)
        .unwrap_or_default();
    Ok(HostConfig {
        tenants: configs,
        metrics_addr: metrics_addr_flag.or(metrics_addr.map(|(addr, _)| addr)),
        file: raw.file,
        metrics_addr_flag,
        cache_dir: raw.cache_dir,
        log_level,
        log_level_flag: raw.log_level_flag,
    })
}

/// How values are read: named as flags or as keys, relative paths against
/// which directory.
struct Reader<'a> {
    naming: Naming,
    base: Option<&'a Path>,
}

impl Reader<'_> {
    fn name(&self, setting: Setting) -> &'static str {
        self.naming.name(setting)
    }

    /// A path as given, relative to the base, without its `.` components.
    fn resolve(&self, path: &Path) -> PathBuf {
        match self.base {
            Some(base) => relative_to(base, path).components().collect(),
            None => path.to_path_buf(),
        }
    }

    /// Every value `layer` gives, each parsed once and checked on its own.
    fn layer(&self, layer: &Layer) -> Result<Checked> {
        let handler = match &layer.handler {
            Some(given) => Some(self.handler(given)?),
            None => None,
        };
        let listen = match &layer.listen {
            Some(addrs) => Some(
                addrs
                    .iter()
                    .map(|given| Ok((given.at.clone(), self.listen(given)?)))
                    .collect::<Result<_>>()?,
            ),
            None => None,
        };
        let name = |setting| self.name(setting);
        let duration = |setting, given: &Option<Given<String>>| {
            given
                .as_ref()
                .map(|g| parse_duration(name(setting), &g.value).map_err(|e| g.locate(e)))
                .transpose()
        };
        let nets = |setting, given: &Option<Vec<Given<String>>>| {
            given
                .as_ref()
                .map(|nets| {
                    nets.iter()
                        .map(|g| parse_net(name(setting), &g.value).map_err(|e| g.locate(e)))
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()
        };
        let max_memory = layer
            .max_memory
            .as_ref()
            .map(|g| parse_size(name(Setting::MaxMemory), &g.value).map_err(|e| g.locate(e)))
            .transpose()?;
        let allow = nets(Setting::Allow, &layer.allow)?;
        let deny = nets(Setting::Deny, &layer.deny)?;
        let proxy = ProxyLayer::read(self.naming, layer)?;
        let outbound = OutboundLayer::read(self.naming, layer)?;
        let timeout = duration(Setting::Timeout, &layer.timeout)?;
        let idle_timeout = duration(Setting::IdleTimeout, &layer.idle_timeout)?;
        let env = layer
            .env
            .as_ref()
            .map(|env| {
                env.iter()
                    .map(|g| check_env(name(Setting::Env), &g.value).map_err(|e| g.locate(e)))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let dirs = layer
            .dirs
            .as_ref()
            .map(|dirs| {
                dirs.iter()
                    .map(|g| {
                        check_dir(name(Setting::Dirs), &g.value, |p| self.resolve(p))
                            .map_err(|e| g.locate(e))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let drain_timeout = duration(Setting::DrainTimeout, &layer.drain_timeout)?;
        Ok(Checked {
            handler,
            listen,
            strategy: layer.strategy.as_ref().map(|g| g.value),
            workers: layer.workers.clone(),
            processes: layer.processes.clone(),
            max_children: layer.max_children.clone(),
            max_connections: layer.max_connections.as_ref().map(|g| g.value),
            max_memory,
            timeout,
            idle_timeout,
            drain_timeout,
            env,
            dirs,
            allow,
            deny,
            proxy,
            allow_precompiled: layer.allow_precompiled,
            outbound,
        })
    }

    /// The handler's path; a config file's must name a file that exists
    /// (a flag's is reported when the handler is read).
    fn handler(&self, given: &Given<PathBuf>) -> Result<PathBuf> {
        let path = self.resolve(&given.value);
        if self.naming == Naming::Keys {
            let checked = match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => Err(anyhow!("it is a directory")),
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            };
            let shown = given.value.display().to_string();
            checked.map_err(|e| given.locate(anyhow!("handler {shown:?}: {e:#}")))?;
        }
        Ok(path)
    }

    fn listen(&self, given: &Given<String>) -> Result<ListenAddr> {
        let name = self.name(Setting::Listen);
        match parse_listen(name, &given.value).map_err(|e| given.locate(e))? {
            ListenAddr::Unix(path) => {
                let path = self.resolve(&path);
                check_unix_path(name, &given.value, &path).map_err(|e| given.locate(e))?;
                Ok(ListenAddr::Unix(path))
            }
            addr => Ok(addr),
        }
    }

    /// A tenant's own settings over `defaults` over the built-in defaults;
    /// and where each listen address was given.
    fn tenant(
        &self,
        tenant: &RawTenant,
        own: Checked,
        defaults: &Checked,
        cache_dir: Option<PathBuf>,
    ) -> Result<(ServeConfig, Vec<Option<Place>>)> {
        let kind = own
            .strategy
            .or(defaults.strategy)
            .unwrap_or(DEFAULT_STRATEGY);
        // A count in [defaults] applies only where the strategy uses it; in
        // the tenant's own layer, a count its strategy ignores is an error.
        let count = |setting: Setting, own: &Option<Given<u32>>, default: &Option<Given<u32>>| {
            if let Some(given) = own.as_ref().filter(|_| !setting.applies_to(kind)) {
                let fits: Vec<_> = setting.strategies().iter().map(|s| s.name()).collect();
                return Err(given.locate(anyhow!(
                    "{} applies to {} {}, not {}",
                    self.name(setting),
                    self.name(Setting::Strategy),
                    one_of(&fits),
                    kind.name()
                )));
            }
            let default = default.as_ref().filter(|_| setting.applies_to(kind));
            Ok(own.as_ref().or(default).map(|g| g.value as usize))
        };
        let max_children = count(
            Setting::MaxChildren,
            &own.max_children,
            &defaults.max_children,
        )?;
        let workers = count(Setting::Workers, &own.workers, &defaults.workers)?;
        let processes = count(Setting::Processes, &own.processes, &defaults.processes)?;
        let strategy = match kind {
            StrategyKind::Threading => Strategy::Threading {
                workers: workers.unwrap_or_else(ServeConfig::default_workers),
            },
            StrategyKind::Forking => Strategy::Forking {
                max_children: max_children.unwrap_or(DEFAULT_MAX_CHILDREN),
            },
            StrategyKind::Prefork => {
                let processes = processes.unwrap_or_else(ServeConfig::default_processes);
                Strategy::Prefork {
                    processes,
                    workers: workers
                        .unwrap_or_else(|| (ServeConfig::default_workers() / processes).max(2)),
                }
            }
            // Runtime threads: one per core.
            StrategyKind::Async => Strategy::Async {
                workers: workers.unwrap_or_else(ServeConfig::default_processes),
            },
        };
        let listen = own.listen.or(defaults.listen.clone()).unwrap_or_default();
        if listen.is_empty() {
            let message = anyhow!(
                "tenant {:?} has no listen address: add e.g. listen = [\"127.0.0.1:7001\"]",
                tenant.name
            );
            return Err(locate(tenant.at.as_ref(), message));
        }
        let proxy = own.proxy.over(&defaults.proxy, self.naming, tenant)?;
        let (places, listen) = listen.into_iter().unzip();
        let builtin = |setting, text| parse_duration(self.name(setting), text);
        let config = ServeConfig {
            handler: own
                .handler
                .or(defaults.handler.clone())
                .map_or(HandlerSource::BuiltinEcho, HandlerSource::File),
            listen,
            access: Access {
                allow: own.allow.or(defaults.allow.clone()).unwrap_or_default(),
                deny: own.deny.or(defaults.deny.clone()).unwrap_or_default(),
            },
            proxy,
            strategy,
            max_connections: own
                .max_connections
                .or(defaults.max_connections)
                .map(|n| n as usize),
            tenant: tenant.name.clone(),
            limits: Limits {
                timeout: match own.timeout.or(defaults.timeout) {
                    Some(timeout) => timeout,
                    None => builtin(Setting::Timeout, DEFAULT_TIMEOUT)?,
                },
                idle_timeout: match own.idle_timeout.or(defaults.idle_timeout) {
                    Some(timeout) => timeout,
                    None => builtin(Setting::IdleTimeout, DEFAULT_IDLE_TIMEOUT)?,
                },
                max_memory: match own.max_memory.or(defaults.max_memory) {
                    Some(size) => size,
                    None => parse_size(self.name(Setting::MaxMemory), DEFAULT_MAX_MEMORY)?,
                },
            },
            grants: Grants {
                env: own.env.or(defaults.env.clone()).unwrap_or_default(),
                dirs: own.dirs.or(defaults.dirs.clone()).unwrap_or_default(),
                outbound: own.outbound.over(&defaults.outbound),
            },
            drain_timeout: match own.drain_timeout.or(defaults.drain_timeout) {
                Some(timeout) => timeout,
                None => builtin(Setting::DrainTimeout, DEFAULT_DRAIN_TIMEOUT)?,
            },
            cache_dir,
            allow_precompiled: own
                .allow_precompiled
                .or(defaults.allow_precompiled)
                .unwrap_or(false),
        };
        Ok((config, places))
    }
}

/// No two listen addresses may be the same, nor the metrics address one of
/// them: the second of two in the file is the error.
fn check_addresses(
    tenants: &[ServeConfig],
    mut listening: Vec<(Option<Place>, usize, ListenAddr)>,
    metrics: Option<&(SocketAddr, Option<Place>)>,
) -> Result<()> {
    let offset = |at: &Option<Place>| at.as_ref().map_or(0, |at| at.offset);
    listening.sort_by(|a, b| {
        (offset(&a.0), &tenants[a.1].tenant).cmp(&(offset(&b.0), &tenants[b.1].tenant))
    });
    for (i, (at, tenant, addr)) in listening.iter().enumerate() {
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
            anyhow!("tenant {second:?} listens twice {on}")
        } else {
            anyhow!("tenants {first:?} and {second:?} both listen {on}")
        };
        return Err(locate(at.as_ref(), message));
    }
    if let Some((metrics, at)) = metrics {
        let addr = ListenAddr::Tcp(*metrics);
        if let Some((_, tenant, other)) = listening.iter().find(|(_, _, a)| overlap(&addr, a)) {
            let message = anyhow!(
                "[metrics] addr {addr} is also where tenant {:?} listens ({other})",
                tenants[*tenant].tenant
            );
            return Err(locate(at.as_ref(), message));
        }
    }
    Ok(())
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
        (ListenAddr::Systemd(a), ListenAddr::Systemd(b)) => a == b,
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
        ListenAddr::Unix(_) | ListenAddr::Systemd(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: usize) -> Option<Place> {
        Some(Place {
            offset,
            shown: format!("FILE:{offset}"),
        })
    }

    fn given<T>(value: T, offset: usize) -> Given<T> {
        Given {
            value,
            at: at(offset),
        }
    }

    fn tenant(name: &str, layer: Layer) -> RawTenant {
        RawTenant {
            name: name.to_string(),
            at: at(0),
            layer,
        }
    }

    fn listen(addr: &str, offset: usize) -> Option<Vec<Given<String>>> {
        Some(vec![given(addr.to_string(), offset)])
    }

    fn keys(defaults: Layer, tenants: Vec<RawTenant>) -> RawHost {
        RawHost {
            naming: Naming::Keys,
            defaults,
            tenants,
            ..RawHost::default()
        }
    }

    #[test]
    fn a_tenant_over_defaults_over_built_in_defaults() {
        let defaults = Layer {
            timeout: Some(given("5s".to_string(), 1)),
            workers: Some(given(3, 2)),
            max_children: Some(given(7, 3)),
            ..Layer::default()
        };
        let own = Layer {
            listen: listen("127.0.0.1:0", 10),
            strategy: Some(given(StrategyKind::Forking, 11)),
            timeout: Some(given("1s".to_string(), 12)),
            ..Layer::default()
        };
        let host = host(keys(defaults, vec![tenant("a", own)])).unwrap();
        let a = &host.tenants[0];
        // workers does not fit forking: dropped from [defaults].
        assert_eq!(a.strategy, Strategy::Forking { max_children: 7 });
        assert_eq!(a.limits.timeout, Duration::from_secs(1));
        assert_eq!(a.limits.idle_timeout, Duration::from_secs(10));
        assert_eq!(a.limits.max_memory, 64 << 20);
        assert_eq!(a.handler, HandlerSource::BuiltinEcho);
    }

    #[test]
    fn a_bad_value_is_named_where_it_was_given() {
        let own = Layer {
            listen: listen("127.0.0.1:0", 10),
            idle_timeout: Some(given("30x".to_string(), 42)),
            ..Layer::default()
        };
        let err = host(keys(Layer::default(), vec![tenant("a", own)])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("FILE:42: invalid idle-timeout \"30x\": "),
            "{err}"
        );
        // In [defaults] too, even where no tenant uses it.
        let defaults = Layer {
            max_memory: Some(given("8GiB".to_string(), 7)),
            ..Layer::default()
        };
        let err = host(keys(defaults, vec![])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "FILE:7: invalid max-memory \"8GiB\": must be between 64KiB and 4GiB"
        );
    }

    #[test]
    fn a_count_the_strategy_ignores_is_refused_in_a_tenant() {
        let own = Layer {
            listen: listen("127.0.0.1:0", 10),
            processes: Some(given(2, 20)),
            ..Layer::default()
        };
        let err = host(keys(Layer::default(), vec![tenant("a", own.clone())])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "FILE:20: processes applies to strategy prefork, not threading"
        );
        let flags = RawHost {
            naming: Naming::Flags,
            tenants: vec![tenant("default", own)],
            ..RawHost::default()
        };
        let err = host(flags).unwrap_err();
        assert_eq!(
            err.to_string(),
            "FILE:20: --processes applies to --strategy prefork, not threading"
        );
    }

    #[test]
    fn the_metrics_flag_wins_over_the_file() {
        let flag: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let mut raw = keys(
            Layer::default(),
            vec![tenant(
                "a",
                Layer {
                    listen: listen("127.0.0.1:0", 10),
                    ..Layer::default()
                },
            )],
        );
        raw.metrics_addr = Some(given("127.0.0.1:9464".to_string(), 5));
        let from_file = host(raw.clone()).unwrap();
        assert_eq!(
            from_file.metrics_addr,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        raw.metrics_addr_flag = Some(flag);
        let host = host(raw).unwrap();
        assert_eq!(host.metrics_addr, Some(flag));
        assert_eq!(host.metrics_addr_flag, Some(flag));
    }

    #[test]
    fn two_tenants_on_one_address_are_refused_at_the_second() {
        let raw = keys(
            Layer::default(),
            vec![
                tenant(
                    "b",
                    Layer {
                        listen: listen("127.0.0.1:7001", 30),
                        ..Layer::default()
                    },
                ),
                tenant(
                    "a",
                    Layer {
                        listen: listen("0.0.0.0:7001", 40),
                        ..Layer::default()
                    },
                ),
            ],
        );
        assert_eq!(
            host(raw).unwrap_err().to_string(),
            "FILE:40: tenants \"b\" and \"a\" both listen on port 7001 \
             (127.0.0.1:7001 and 0.0.0.0:7001)"
        );
    }
}
