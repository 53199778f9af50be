//! The abbreviated IPAM result printed on a successful ADD, shaped for the config's version.
//!
//! An IPAM plugin returns `ips`, `routes` and `dns` but never `interfaces` nor an `interface`
//! index: it does not know the interfaces, the main plugin fills them in.
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#section-5-result-types> and the
//! 0.4.0 result format <https://github.com/containernetworking/cni/blob/spec-v0.4.0/SPEC.md#ip-allocation>.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::types::CniVersion;

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpConfig {
    /// The address with its subnet's prefix length, e.g. `10.1.0.5/24`.
    pub address: IpNet,
    /// The default gateway of that subnet, if it has one.
    pub gateway: Option<IpAddr>,
}

/// A route the container should get.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Route {
    /// Destination network.
    pub dst: IpNet,
    /// Next hop; when absent, the main plugin uses the address's gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// The result's `dns`, as resolv.conf(5) describes it. Empty fields are omitted from the reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Dns {
    /// `nameserver` lines, in order. Kept as text: a link-local server may carry a `%zone`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// `domain`: the local domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `search`: the search list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// `options`, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether there is nothing to report (the reply then has no `dns` key).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// Reads the text of a resolv.conf (the caller reads the file named by `ipam.resolvConf`).
///
/// Follows resolv.conf(5) where the CNI plugins' reader also does: comments start with `#` or `;`,
/// `nameserver` lines accumulate, `options` accumulate. Where glibc says "the last instance
/// wins", so does this: a later `domain` replaces an earlier one, a later `search` replaces the
/// whole earlier list. Unknown keywords (`sortlist`, ...) and keywords without a value are
/// skipped. The three-nameserver limit of glibc is not applied: that is the resolver's business.
pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(keyword), Some(first)) = (fields.next(), fields.next()) else {
            continue;
        };
        match keyword {
            "nameserver" => dns.nameservers.push(first.to_owned()),
            "domain" => dns.domain = Some(first.to_owned()),
            "search" => {
                dns.search = std::iter::once(first)
                    .chain(fields)
                    .map(str::to_owned)
                    .collect();
            }
            "options" => dns
                .options
                .extend(std::iter::once(first).chain(fields).map(str::to_owned)),
            _ => {}
        }
    }
    dns
}

/// What ADD allocated, before it is shaped for a version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamResult {
    /// The allocated addresses.
    pub ips: Vec<IpConfig>,
    /// Routes from `ipam.routes` (and any the daemon adds).
    pub routes: Vec<Route>,
    /// DNS, usually from [`parse_resolv_conf`].
    pub dns: Dns,
}

impl IpamResult {
    /// The reply for `version` (the config's `cniVersion`): serialize it to stdout.
    ///
    /// For 0.3.x and 0.4.0 every `ips` entry carries `"version": "4"|"6"`; from 1.0.0 it does
    /// not. Empty `routes` and `dns` are omitted; `ips` is always present.
    pub fn reply(&self, version: CniVersion) -> ResultReply<'_> {
        let with_version = version.ip_has_version_field();
        ResultReply {
            cni_version: version,
            ips: self
                .ips
                .iter()
                .map(|ip| IpReply {
                    version: with_version.then_some(match ip.address {
                        IpNet::V4(_) => "4",
                        IpNet::V6(_) => "6",
                    }),
                    address: &ip.address,
                    gateway: ip.gateway.as_ref(),
                })
                .collect(),
            routes: &self.routes,
            dns: &self.dns,
        }
    }
}

/// The serializable result, from [`IpamResult::reply`].
#[derive(Debug, Serialize)]
pub struct ResultReply<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: CniVersion,
    ips: Vec<IpReply<'a>>,
    #[serde(skip_serializing_if = "<[Route]>::is_empty")]
    routes: &'a [Route],
    #[serde(skip_serializing_if = "Dns::is_empty")]
    dns: &'a Dns,
}

#[derive(Debug, Serialize)]
struct IpReply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    address: &'a IpNet,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<&'a IpAddr>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn dual_stack() -> IpamResult {
        IpamResult {
            ips: vec![
                IpConfig {
                    address: "10.1.0.5/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                },
                IpConfig {
                    address: "fd00:10:1::5/64".parse().unwrap(),
                    gateway: None,
                },
            ],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: None,
                },
                Route {
                    dst: "192.168.0.0/16".parse().unwrap(),
                    gw: Some("10.1.0.254".parse().unwrap()),
                },
            ],
            dns: Dns {
                nameservers: vec!["10.96.0.10".to_owned()],
                domain: Some("cluster.local".to_owned()),
                search: vec![
                    "default.svc.cluster.local".to_owned(),
                    "svc.cluster.local".to_owned(),
                ],
                options: vec!["ndots:5".to_owned()],
            },
        }
    }

    fn reply_json(result: &IpamResult, version: CniVersion) -> Value {
        serde_json::to_value(result.reply(version)).unwrap()
    }

    /// The IPAM result of spec 0.3.0/0.3.1/0.4.0: `ips[].version`, no `interface`.
    #[test]
    fn result_0_x_has_ip_version() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let want = json!({
                "cniVersion": version.as_str(),
                "ips": [
                    { "version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1" },
                    { "version": "6", "address": "fd00:10:1::5/64" }
                ],
                "routes": [
                    { "dst": "0.0.0.0/0" },
                    { "dst": "192.168.0.0/16", "gw": "10.1.0.254" }
                ],
                "dns": {
                    "nameservers": ["10.96.0.10"],
                    "domain": "cluster.local",
                    "search": ["default.svc.cluster.local", "svc.cluster.local"],
                    "options": ["ndots:5"]
                }
            });
            assert_eq!(reply_json(&dual_stack(), version), want, "{version}");
        }
    }

    /// The IPAM result of spec 1.0.0/1.1.0: no `version` in `ips` entries.
    #[test]
    fn result_1_x_has_no_ip_version() {
        for version in [CniVersion::V1_0_0, CniVersion::V1_1_0] {
            let want = json!({
                "cniVersion": version.as_str(),
                "ips": [
                    { "address": "10.1.0.5/24", "gateway": "10.1.0.1" },
                    { "address": "fd00:10:1::5/64" }
                ],
                "routes": [
                    { "dst": "0.0.0.0/0" },
                    { "dst": "192.168.0.0/16", "gw": "10.1.0.254" }
                ],
                "dns": {
                    "nameservers": ["10.96.0.10"],
                    "domain": "cluster.local",
                    "search": ["default.svc.cluster.local", "svc.cluster.local"],
                    "options": ["ndots:5"]
                }
            });
            assert_eq!(reply_json(&dual_stack(), version), want, "{version}");
        }
    }

    #[test]
    fn empty_routes_and_dns_are_omitted() {
        let result = IpamResult {
            ips: vec![IpConfig {
                address: "10.1.0.5/24".parse().unwrap(),
                gateway: None,
            }],
            ..IpamResult::default()
        };
        assert_eq!(
            reply_json(&result, CniVersion::V1_0_0),
            json!({ "cniVersion": "1.0.0", "ips": [{ "address": "10.1.0.5/24" }] })
        );
        assert_eq!(
            reply_json(&result, CniVersion::V0_4_0),
            json!({ "cniVersion": "0.4.0", "ips": [{ "version": "4", "address": "10.1.0.5/24" }] })
        );
        let only_search = IpamResult {
            dns: Dns {
                search: vec!["svc".to_owned()],
                ..Dns::default()
            },
            ..result
        };
        assert_eq!(
            reply_json(&only_search, CniVersion::V1_1_0)["dns"],
            json!({ "search": ["svc"] })
        );
    }

    #[test]
    fn result_text_has_fields_in_spec_order_and_no_interface() {
        let text = serde_json::to_string(&dual_stack().reply(CniVersion::V0_3_1)).unwrap();
        assert!(text.starts_with(r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.5/24","gateway":"10.1.0.1"}"#), "{text}");
        assert!(!text.contains("interface"), "{text}");
    }

    #[test]
    fn address_keeps_host_bits() {
        let result = IpamResult {
            ips: vec![IpConfig {
                address: "10.1.0.5/8".parse().unwrap(),
                gateway: None,
            }],
            ..IpamResult::default()
        };
        assert_eq!(
            reply_json(&result, CniVersion::V1_0_0)["ips"][0]["address"],
            "10.1.0.5/8"
        );
    }

    #[test]
    fn resolv_conf_typical() {
        let text = "\
# Generated by NetworkManager
search default.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
nameserver fe80::1%eth0
options ndots:5 timeout:1
options attempts:2
";
        assert_eq!(
            parse_resolv_conf(text),
            Dns {
                nameservers: vec!["10.96.0.10".to_owned(), "fe80::1%eth0".to_owned()],
                domain: None,
                search: vec![
                    "default.svc.cluster.local".to_owned(),
                    "svc.cluster.local".to_owned(),
                    "cluster.local".to_owned()
                ],
                options: vec![
                    "ndots:5".to_owned(),
                    "timeout:1".to_owned(),
                    "attempts:2".to_owned()
                ],
            }
        );
    }

    #[test]
    fn resolv_conf_comments_blank_and_unknown_lines() {
        let text = "\n   \n; comment\n  # indented comment\nsortlist 130.155.160.0/255.255.240.0\nnameserver\n\tnameserver\t1.1.1.1  \r\ndomain\n";
        assert_eq!(
            parse_resolv_conf(text),
            Dns {
                nameservers: vec!["1.1.1.1".to_owned()],
                ..Dns::default()
            }
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    #[test]
    fn resolv_conf_last_domain_and_search_win() {
        let text =
            "domain a.example\nsearch x.example y.example\ndomain b.example\nsearch z.example\n";
        let dns = parse_resolv_conf(text);
        assert_eq!(dns.domain.as_deref(), Some("b.example"));
        assert_eq!(dns.search, ["z.example"]);
    }
}
