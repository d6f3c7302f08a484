//! The guard on where deliveries may go (SSRF): destination URLs are set by
//! operators, but a host name can resolve, or be made to resolve, to an
//! address inside our own network, such as a cloud metadata service. Every
//! connection is checked against the addresses it actually resolved to, at
//! connect time (DNS can change after the config was loaded); an IP-literal
//! URL is checked once, when the config is validated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};

/// The `[outbound]` section of the router config.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Networks (CIDR) deliveries may reach even though they are internal.
    #[serde(default)]
    pub allowed_networks: Vec<String>,
    /// Host names deliveries may reach whatever they resolve to.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// Why a destination address is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused to connect to {host} at {address}: a {range} address; allow-list it in \
     outbound.allowed_networks or outbound.allowed_hosts if it is meant to be reached"
)]
pub struct Refused {
    pub host: String,
    pub address: IpAddr,
    pub range: &'static str,
}

/// Which addresses deliveries may reach.
#[derive(Debug, Clone)]
pub struct Policy {
    allowed_networks: Vec<IpNet>,
    allowed_hosts: Vec<String>,
}

impl Policy {
    pub fn new(config: &OutboundConfig) -> Result<Self, String> {
        let allowed_networks = config
            .allowed_networks
            .iter()
            .map(|network| {
                network.parse::<IpNet>().map_err(|_| {
                    format!(
                        "outbound.allowed_networks: `{network}` is not a network like 10.0.0.0/8"
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allowed_networks,
            allowed_hosts: config
                .allowed_hosts
                .iter()
                .map(|host| host.to_ascii_lowercase())
                .collect(),
        })
    }

    /// Whether `host` (a name or an IP literal) may be reached at `address`.
    pub fn check(&self, host: &str, address: IpAddr) -> Result<(), Refused> {
        if self
            .allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
            || self
                .allowed_networks
                .iter()
                .any(|network| network.contains(&address))
        {
            return Ok(());
        }
        match internal_range(address) {
            None => Ok(()),
            Some(range) => Err(Refused {
                host: host.to_owned(),
                address,
                range,
            }),
        }
    }

    /// Checks a destination URL whose host is an IP literal (no DNS is
    /// involved, so this check is final); names are checked at connect time.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().unwrap_or_default();
        match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(literal) => self.check(host, literal),
            Err(_) => Ok(()),
        }
    }

    /// A resolver for reqwest that drops refused addresses, and fails the
    /// connection (naming the address) when none is left.
    pub fn resolver(&self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            policy: self.clone(),
        })
    }
}

/// The name of the internal range `address` lies in, if any: loopback,
/// private, carrier-grade NAT, link-local (which holds the cloud metadata
/// address 169.254.169.254), multicast, unspecified and reserved addresses.
fn internal_range(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let first = v6.segments()[0];
            if v6 == Ipv6Addr::LOCALHOST {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn internal_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT")
    } else if v4.is_multicast() {
        Some("multicast")
    } else if a == 0 {
        Some("unspecified")
    } else if a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

pub struct GuardedResolver {
    policy: Policy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|address| match policy.check(&host, address.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refusal) {
                (true, Some(refused)) => Err(refused.into()),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// The refusal behind a failed request, if the guard caused it.
pub fn refusal_of(error: &reqwest::Error) -> Option<&Refused> {
    let mut source = std::error::Error::source(error);
    while let Some(error) = source {
        if let Some(refused) = error.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(networks: &[&str], hosts: &[&str]) -> Policy {
        Policy::new(&OutboundConfig {
            allowed_networks: networks.iter().map(|s| s.to_string()).collect(),
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
        })
        .expect("valid policy")
    }

    #[test]
    fn internal_ranges_are_refused_and_public_ones_allowed() {
        let guard = policy(&[], &[]);
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            let address: IpAddr = refused.parse().expect("an address");
            assert!(guard.check("h", address).is_err(), "{refused} is refused");
        }
        for allowed in [
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            let address: IpAddr = allowed.parse().expect("an address");
            assert!(guard.check("h", address).is_ok(), "{allowed} is allowed");
        }
    }

    #[test]
    fn allow_lists_open_networks_and_hosts() {
        let guard = policy(&["127.0.0.0/8", "10.1.0.0/16"], &["Mock-Destinations"]);
        let ip = |text: &str| text.parse::<IpAddr>().expect("an address");
        assert!(guard.check("h", ip("127.0.0.1")).is_ok());
        assert!(guard.check("h", ip("10.1.9.9")).is_ok());
        assert!(guard.check("h", ip("10.2.0.1")).is_err());
        assert!(guard.check("mock-destinations", ip("172.18.0.5")).is_ok());
        let refused = guard
            .check("h", ip("169.254.169.254"))
            .expect_err("metadata");
        assert!(refused.to_string().contains("outbound.allowed_networks"));
        assert!(Policy::new(&OutboundConfig {
            allowed_networks: vec!["10.0.0.0/33".into()],
            allowed_hosts: vec![],
        })
        .is_err());
    }

    #[test]
    fn ip_literal_urls_are_checked_and_names_left_to_connect_time() {
        let guard = policy(&[], &[]);
        let url = |text: &str| reqwest::Url::parse(text).expect("a URL");
        assert!(guard.check_url(&url("http://127.0.0.1:9000/ok")).is_err());
        assert!(guard.check_url(&url("http://[::1]/ok")).is_err());
        assert!(guard.check_url(&url("https://93.184.216.34/")).is_ok());
        assert!(guard.check_url(&url("http://localhost/")).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_inside() {
        let refused = policy(&[], &[])
            .resolver()
            .resolve("localhost".parse().expect("a name"))
            .await
            .err()
            .expect("localhost is refused");
        assert!(refused.to_string().contains("loopback"), "{refused}");
        let allowed = policy(&["127.0.0.0/8", "::1/128"], &[])
            .resolver()
            .resolve("localhost".parse().expect("a name"))
            .await
            .expect("allow-listed");
        assert!(allowed.count() > 0);
    }
}
