//! A tenant's outbound network grants (`allow-outbound`, `max-outbound`):
//! each grant parsed once (`HOST:PORT`, `IP:PORT`, `CIDR:PORT`,
//! `[v6]:PORT`, port `*`), a host name resolved here, by the host, when the
//! settings are read (start-up, `config check`, reload), and the tenant's
//! [`Outbound`] made from its own layer over `[defaults]`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{anyhow, bail, Result};
use ipnet::IpNet;

use super::raw::Layer;
use super::values::{Naming, Setting};

/// Outbound connections one instance may open unless `max-outbound` says.
pub(crate) const DEFAULT_MAX_OUTBOUND: u32 = 8;
/// The most `max-outbound` may be.
pub(crate) const MAX_OUTBOUND: u32 = 1024;

/// Where a tenant's guests may connect: nothing unless granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// The grants, in the order given.
    pub grants: Vec<OutboundGrant>,
    /// Outbound connections one instance (one client connection) may open.
    pub max: u32,
}

impl Default for Outbound {
    fn default() -> Outbound {
        Outbound {
            grants: Vec::new(),
            max: DEFAULT_MAX_OUTBOUND,
        }
    }
}

/// One grant: TCP connections to these addresses and this port (or any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundGrant {
    /// As written, for messages and `config check`.
    pub text: String,
    pub target: Target,
    /// `None`: any port (`*`).
    pub port: Option<u16>,
}

/// What a grant's host part names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An address or a network.
    Net(IpNet),
    /// A name, lower-case and without a final dot, and the addresses the
    /// host resolved it to when the settings were read.
    Name(String, Vec<IpAddr>),
}

impl OutboundGrant {
    /// Whether a connection to `addr` is granted.
    pub fn permits(&self, addr: SocketAddr) -> bool {
        if self.port.is_some_and(|port| port != addr.port()) {
            return false;
        }
        let ip = addr.ip().to_canonical();
        match &self.target {
            Target::Net(net) => net.contains(&ip),
            Target::Name(_, ips) => ips.contains(&ip),
        }
    }

    /// The name this grant lets the guest look up, if it names one.
    pub fn name(&self) -> Option<&str> {
        match &self.target {
            Target::Name(name, _) => Some(name),
            Target::Net(_) => None,
        }
    }
}

impl Outbound {
    /// Whether a connection to `addr` is granted.
    pub fn permits(&self, addr: SocketAddr) -> bool {
        self.grants.iter().any(|grant| grant.permits(addr))
    }

    /// Whether the guest may look `name` up: only names a grant names.
    pub fn may_resolve(&self, name: &str) -> bool {
        let name = normal_name(name);
        self.grants.iter().any(|grant| grant.name() == Some(&name))
    }

    /// For the start-up line: each grant, a name with what it resolved to.
    pub fn describe(&self) -> String {
        let grants: Vec<String> = self
            .grants
            .iter()
            .map(|grant| match &grant.target {
                Target::Name(_, ips) => {
                    let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
                    format!("{} ({})", grant.text, ips.join(" "))
                }
                Target::Net(_) => grant.text.clone(),
            })
            .collect();
        format!(
            "outbound tcp {} (at most {} per connection)",
            grants.join(", "),
            self.max
        )
    }
}

/// A name as compared: lower-case, without a final dot.
fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// One grant from its text; a name is resolved now.
pub(crate) fn parse_grant(flag: &str, text: &str) -> Result<OutboundGrant> {
    let bad = |why: &str| {
        anyhow!(
            "invalid {flag} {text:?}: {why} (expected HOST:PORT, IP:PORT, CIDR:PORT or [IPv6]:PORT; PORT may be *)"
        )
    };
    let trimmed = text.trim();
    let (host, port) = if let Some(rest) = trimmed.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(|| bad("no ]:PORT"))?;
        (host, port)
    } else {
        let (host, port) = trimmed.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.contains(':') {
            return Err(bad("an IPv6 address goes in brackets, e.g. [::1]:6379"));
        }
        (host, port)
    };
    let port = match port {
        "*" => None,
        _ => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port is not 1 to 65535 or *")),
            Ok(port) => Some(port),
        },
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let target = if let Ok(net) = host.parse::<IpNet>() {
        Target::Net(net.trunc())
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        Target::Net(IpNet::from(ip.to_canonical()))
    } else if trimmed.starts_with('[') {
        return Err(bad("not an IPv6 address in the brackets"));
    } else if host.contains('/') {
        return Err(bad("not a network in CIDR form"));
    } else {
        let name = normal_name(host);
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(bad("not a host name"));
        }
        let mut ips: Vec<IpAddr> = (name.as_str(), 0)
            .to_socket_addrs()
            .map_err(|e| anyhow!("invalid {flag} {text:?}: cannot resolve {name}: {e}"))?
            .map(|addr| addr.ip().to_canonical())
            .collect();
        ips.sort();
        ips.dedup();
        if ips.is_empty() {
            bail!("invalid {flag} {text:?}: {name} resolves to no address");
        }
        Target::Name(name, ips)
    };
    Ok(OutboundGrant {
        text: trimmed.to_string(),
        target,
        port,
    })
}

/// The two settings of one layer, each parsed and checked on its own.
#[derive(Clone, Debug, Default)]
pub(super) struct OutboundLayer {
    grants: Option<Vec<OutboundGrant>>,
    max: Option<u32>,
}

impl OutboundLayer {
    pub(super) fn read(naming: Naming, layer: &Layer) -> Result<OutboundLayer> {
        let grants = layer
            .allow_outbound
            .as_ref()
            .map(|grants| {
                let flag = naming.name(Setting::AllowOutbound);
                grants
                    .iter()
                    .map(|g| parse_grant(flag, &g.value).map_err(|e| g.locate(e)))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        Ok(OutboundLayer {
            grants,
            max: layer.max_outbound.as_ref().map(|g| g.value),
        })
    }

    /// The tenant's grants: this (its own layer) over `defaults`.
    pub(super) fn over(&self, defaults: &OutboundLayer) -> Outbound {
        Outbound {
            grants: self
                .grants
                .clone()
                .or(defaults.grants.clone())
                .unwrap_or_default(),
            max: self.max.or(defaults.max).unwrap_or(DEFAULT_MAX_OUTBOUND),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(text: &str) -> Result<OutboundGrant> {
        parse_grant("--allow-outbound", text)
    }

    fn err(text: &str) -> String {
        grant(text).unwrap_err().to_string()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forms_and_matching() {
        let one = grant("127.0.0.1:6379").unwrap();
        assert!(one.permits(addr("127.0.0.1:6379")));
        assert!(!one.permits(addr("127.0.0.1:6380")));
        assert!(!one.permits(addr("127.0.0.2:6379")));
        // An IPv4-mapped IPv6 address is the IPv4 address.
        assert!(one.permits(addr("[::ffff:127.0.0.1]:6379")));
        let net = grant("10.0.0.0/8:443").unwrap();
        assert!(net.permits(addr("10.1.2.3:443")));
        assert!(!net.permits(addr("11.1.2.3:443")));
        let v6 = grant("[::1]:*").unwrap();
        assert!(v6.permits(addr("[::1]:1")) && v6.permits(addr("[::1]:65535")));
        assert!(!v6.permits(addr("127.0.0.1:1")));
        let v6net = grant("[fd00::/8]:5432").unwrap();
        assert!(v6net.permits(addr("[fd12::1]:5432")));
        let name = grant("LocalHost.:6379").unwrap();
        assert_eq!(name.name(), Some("localhost"));
        assert!(name.permits(addr("127.0.0.1:6379")));
        let outbound = Outbound {
            grants: vec![name, one],
            max: 8,
        };
        assert!(outbound.may_resolve("localhost") && outbound.may_resolve("LOCALHOST."));
        assert!(!outbound.may_resolve("example.com") && !outbound.may_resolve("127.0.0.1"));
    }

    #[test]
    fn bad_grants_are_named() {
        let tail = "(expected HOST:PORT, IP:PORT, CIDR:PORT or [IPv6]:PORT; PORT may be *)";
        assert_eq!(
            err("127.0.0.1"),
            format!("invalid --allow-outbound \"127.0.0.1\": no port {tail}")
        );
        assert_eq!(
            err("127.0.0.1:0"),
            format!(
                "invalid --allow-outbound \"127.0.0.1:0\": the port is not 1 to 65535 or * {tail}"
            )
        );
        assert_eq!(
            err("::1:80"),
            format!("invalid --allow-outbound \"::1:80\": an IPv6 address goes in brackets, e.g. [::1]:6379 {tail}")
        );
        assert_eq!(
            err("10.0.0.0/33:80"),
            format!(
                "invalid --allow-outbound \"10.0.0.0/33:80\": not a network in CIDR form {tail}"
            )
        );
        assert_eq!(
            err("[nope]:80"),
            format!("invalid --allow-outbound \"[nope]:80\": not an IPv6 address in the brackets {tail}")
        );
        assert_eq!(
            err("bad_name!:80"),
            format!("invalid --allow-outbound \"bad_name!:80\": not a host name {tail}")
        );
        assert!(err("no-such-host.invalid:80")
            .starts_with("invalid --allow-outbound \"no-such-host.invalid:80\": cannot resolve no-such-host.invalid: "));
    }
}
