//! A tenant's PROXY protocol settings (`proxy-protocol`, `proxy-from`,
//! `proxy-header-timeout`), from one layer as given to the tenant's
//! [`ProxyProtocol`], with the one rule that binds them: a tenant that takes
//! headers says from which networks.

use std::time::Duration;

use anyhow::{anyhow, Result};
use ipnet::IpNet;

use super::model::{ProxyProtocol, ProxyVersion};
use super::raw::{locate, Layer, RawTenant};
use super::values::{
    parse_duration, parse_net, parse_proxy_version, Naming, Setting, DEFAULT_PROXY_HEADER_TIMEOUT,
};

/// The three settings of one layer, each parsed and checked on its own.
#[derive(Clone, Debug, Default)]
pub(super) struct ProxyLayer {
    version: Option<ProxyVersion>,
    from: Option<Vec<IpNet>>,
    header_timeout: Option<Duration>,
}

impl ProxyLayer {
    pub(super) fn read(naming: Naming, layer: &Layer) -> Result<ProxyLayer> {
        let name = |setting| naming.name(setting);
        let version = layer
            .proxy_protocol
            .as_ref()
            .map(|g| {
                parse_proxy_version(name(Setting::ProxyProtocol), &g.value).map_err(|e| g.locate(e))
            })
            .transpose()?;
        let from = layer
            .proxy_from
            .as_ref()
            .map(|nets| {
                nets.iter()
                    .map(|g| parse_net(name(Setting::ProxyFrom), &g.value).map_err(|e| g.locate(e)))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let header_timeout = layer
            .proxy_header_timeout
            .as_ref()
            .map(|g| {
                parse_duration(name(Setting::ProxyHeaderTimeout), &g.value).map_err(|e| g.locate(e))
            })
            .transpose()?;
        Ok(ProxyLayer {
            version,
            from,
            header_timeout,
        })
    }

    /// The tenant's PROXY protocol: this (its own layer) over `defaults`.
    /// `proxy-protocol` needs `proxy-from`; `proxy-from` or
    /// `proxy-header-timeout` in the tenant's own layer need
    /// `proxy-protocol` (from `[defaults]` they apply only where it is set).
    pub(super) fn over(
        &self,
        defaults: &ProxyLayer,
        naming: Naming,
        tenant: &RawTenant,
    ) -> Result<Option<ProxyProtocol>> {
        let name = |setting| naming.name(setting);
        let Some(version) = self.version.or(defaults.version) else {
            let stray = [
                (Setting::ProxyFrom, self.from.is_some()),
                (Setting::ProxyHeaderTimeout, self.header_timeout.is_some()),
            ];
            if let Some((setting, _)) = stray.into_iter().find(|(_, given)| *given) {
                let add = match naming {
                    Naming::Flags => "add --proxy-protocol v1, v2 or any",
                    Naming::Keys => "add proxy-protocol = \"v1\", \"v2\" or \"any\"",
                };
                let message = anyhow!(
                    "tenant {:?}: {} is set but {} is not ({add})",
                    tenant.name,
                    name(setting),
                    name(Setting::ProxyProtocol)
                );
                return Err(locate(tenant.at.as_ref(), message));
            }
            return Ok(None);
        };
        let from = self
            .from
            .clone()
            .or(defaults.from.clone())
            .unwrap_or_default();
        if from.is_empty() {
            let example = match naming {
                Naming::Flags => "--proxy-from 10.0.0.0/8",
                Naming::Keys => "proxy-from = [\"10.0.0.0/8\"]",
            };
            let message = anyhow!(
                "tenant {:?}: {} needs {}: the networks of the balancers that send the header (e.g. {example})",
                tenant.name,
                name(Setting::ProxyProtocol),
                name(Setting::ProxyFrom)
            );
            return Err(locate(tenant.at.as_ref(), message));
        }
        let header_timeout = match self.header_timeout.or(defaults.header_timeout) {
            Some(timeout) => timeout,
            None => parse_duration(
                name(Setting::ProxyHeaderTimeout),
                DEFAULT_PROXY_HEADER_TIMEOUT,
            )?,
        };
        Ok(Some(ProxyProtocol {
            version,
            from,
            header_timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::raw::{Given, Place};

    fn tenant(name: &str) -> RawTenant {
        RawTenant {
            name: name.to_string(),
            at: Some(Place {
                offset: 9,
                shown: "FILE:9".to_string(),
            }),
            layer: Layer::default(),
        }
    }

    fn layer(version: Option<&str>, from: Option<&[&str]>, timeout: Option<&str>) -> Layer {
        let text = |t: &str| Given::flag(t.to_string());
        Layer {
            proxy_protocol: version.map(text),
            proxy_from: from.map(|nets| nets.iter().map(|n| text(n)).collect()),
            proxy_header_timeout: timeout.map(text),
            ..Layer::default()
        }
    }

    fn resolve(naming: Naming, own: Layer, defaults: Layer) -> Result<Option<ProxyProtocol>> {
        let own = ProxyLayer::read(naming, &own)?;
        let defaults = ProxyLayer::read(naming, &defaults)?;
        own.over(&defaults, naming, &tenant("edge"))
    }

    #[test]
    fn unset_is_none_and_set_fills_the_timeout() {
        let none = resolve(Naming::Keys, Layer::default(), Layer::default()).unwrap();
        assert_eq!(none, None);
        let set = resolve(
            Naming::Keys,
            layer(Some("v2"), Some(&["10.0.0.0/8", "192.0.2.7"]), None),
            Layer::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(set.version, ProxyVersion::V2);
        assert_eq!(
            set.from,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.0.2.7/32".parse().unwrap()
            ]
        );
        assert_eq!(set.header_timeout, Duration::from_secs(3));
        assert!(set.trusts(Some("10.1.2.3".parse().unwrap())));
        assert!(set.trusts(Some("::ffff:10.1.2.3".parse().unwrap())));
        assert!(!set.trusts(Some("192.0.2.8".parse().unwrap())));
        assert!(!set.trusts(None));
    }

    #[test]
    fn a_tenant_takes_defaults_under_its_own() {
        let defaults = layer(Some("any"), Some(&["10.0.0.0/8"]), Some("1s"));
        let own = layer(Some("v1"), None, None);
        let got = resolve(Naming::Keys, own, defaults.clone())
            .unwrap()
            .unwrap();
        assert_eq!(got.version, ProxyVersion::V1);
        assert_eq!(got.from, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(got.header_timeout, Duration::from_secs(1));
        // `[defaults]` proxy-from alone applies to no tenant, and is no error.
        let only_from = layer(None, Some(&["10.0.0.0/8"]), Some("1s"));
        assert_eq!(
            resolve(Naming::Keys, Layer::default(), only_from).unwrap(),
            None
        );
    }

    #[test]
    fn proxy_protocol_without_proxy_from_is_refused_naming_the_tenant() {
        let keys = resolve(
            Naming::Keys,
            layer(Some("v2"), None, None),
            Layer::default(),
        );
        assert_eq!(
            keys.unwrap_err().to_string(),
            "FILE:9: tenant \"edge\": proxy-protocol needs proxy-from: the networks of the \
             balancers that send the header (e.g. proxy-from = [\"10.0.0.0/8\"])"
        );
        let flags = resolve(
            Naming::Flags,
            layer(Some("any"), Some(&[]), None),
            Layer::default(),
        );
        assert_eq!(
            flags.unwrap_err().to_string(),
            "FILE:9: tenant \"edge\": --proxy-protocol needs --proxy-from: the networks of the \
             balancers that send the header (e.g. --proxy-from 10.0.0.0/8)"
        );
    }

    #[test]
    fn proxy_from_or_a_timeout_without_proxy_protocol_is_refused_in_a_tenant() {
        let from = resolve(
            Naming::Keys,
            layer(None, Some(&["10.0.0.0/8"]), None),
            Layer::default(),
        );
        assert_eq!(
            from.unwrap_err().to_string(),
            "FILE:9: tenant \"edge\": proxy-from is set but proxy-protocol is not \
             (add proxy-protocol = \"v1\", \"v2\" or \"any\")"
        );
        let timeout = resolve(
            Naming::Flags,
            layer(None, None, Some("1s")),
            Layer::default(),
        );
        assert_eq!(
            timeout.unwrap_err().to_string(),
            "FILE:9: tenant \"edge\": --proxy-header-timeout is set but --proxy-protocol is not \
             (add --proxy-protocol v1, v2 or any)"
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let version = resolve(
            Naming::Keys,
            layer(Some("v3"), None, None),
            Layer::default(),
        );
        assert_eq!(
            version.unwrap_err().to_string(),
            "invalid proxy-protocol \"v3\": expected v1, v2 or any"
        );
        let net = resolve(
            Naming::Flags,
            layer(Some("v1"), Some(&["10.0.0.0/33"]), None),
            Layer::default(),
        );
        assert!(net
            .unwrap_err()
            .to_string()
            .starts_with("invalid --proxy-from \"10.0.0.0/33\""));
        let timeout = resolve(
            Naming::Keys,
            layer(Some("v1"), Some(&["10.0.0.0/8"]), Some("0s")),
            Layer::default(),
        );
        assert_eq!(
            timeout.unwrap_err().to_string(),
            "invalid proxy-header-timeout \"0s\": must be longer than zero"
        );
    }
}
