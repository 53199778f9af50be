//! Namespace → subnet mapping in hostnic-cni's format: the ConfigMap
//! `kube-system/hostnic-ipam-config` with `subnet-auto-assign: "on"|"off"` and `ipam`, a JSON
//! object from namespace (or `Default`) to a list of entries.
//!
//! An entry is a CIDR (a pool subnet, or a block of one) or one of hostnic's block names,
//! `<anything>-a-b-c-d-prefix` (`4100-172-16-3-0-26` is 172.16.3.0/26). A `vxnet-…` entry
//! names a QingCloud subnet, which cannot be mapped to addresses without the QingCloud API: it
//! is reported and ignored, but a namespace whose every entry is such is refused rather than
//! silently given another namespace's addresses.
//!
//! For each range set of an ADD, a pod's namespace gets a [`Restriction`]: the CIDRs it may
//! take dynamic addresses from (its own entries that meet the range set's pools, else
//! auto-assigned blocks when `subnet-auto-assign` is on, else `Default`'s, else the whole
//! pool), and the CIDRs it must never use: those mapped to other namespaces (tenant isolation).
//!
//! Everything here is pure: the ConfigMap watch and the etcd records of auto-assigned blocks
//! are in `namespace_watch`, the picking in the allocator.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// Where the mapping lives.
pub const CONFIG_MAP_NAMESPACE: &str = "kube-system";
pub const CONFIG_MAP_NAME: &str = "hostnic-ipam-config";
/// The ConfigMap's keys.
pub const AUTO_ASSIGN_KEY: &str = "subnet-auto-assign";
pub const IPAM_KEY: &str = "ipam";
/// The entry of namespaces that have none of their own.
pub const DEFAULT_ENTRY: &str = "Default";

/// One namespace's entries (or `Default`'s) in the ConfigMap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// The entries that name addresses.
    pub cidrs: Vec<IpNet>,
    /// Entries that cannot be mapped to addresses here (QingCloud vxnet ids), as written.
    pub unmapped: Vec<String>,
}

impl Entries {
    /// True when the list names something, but nothing that can be mapped: its namespace must
    /// be refused, not fall back to another entry.
    fn only_unmappable(&self) -> bool {
        self.cidrs.is_empty() && !self.unmapped.is_empty()
    }
}

/// The mapping a valid ConfigMap defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceMapping {
    /// `subnet-auto-assign: "on"`: a namespace without entries gets blocks of its own.
    pub auto_assign: bool,
    /// `Default`'s entries, if it has any.
    pub default: Option<Entries>,
    /// Entries by namespace.
    pub namespaces: BTreeMap<String, Entries>,
}

/// What one entry of the `ipam` lists names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Cidr(IpNet),
    /// A QingCloud vxnet id: a subnet whose addresses only the QingCloud API knows.
    Vxnet(String),
}

/// `ConfigMap kube-system/hostnic-ipam-config`, for messages.
pub fn config_map_name() -> String {
    format!("ConfigMap {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}")
}

/// Reads one entry: a CIDR without host bits, a hostnic block name, or a vxnet id.
pub fn parse_entry(text: &str) -> Result<Entry, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set (the block is {})",
                net.trunc()
            ));
        }
        return Ok(Entry::Cidr(net));
    }
    if text.starts_with("vxnet-") {
        return Ok(Entry::Vxnet(text.to_string()));
    }
    block_name(text).map(Entry::Cidr).ok_or_else(|| {
        format!(
            "{text:?} is neither a CIDR (10.0.1.0/26), a hostnic block name \
             (<name>-a-b-c-d-prefix, such as 4100-172-16-3-0-26) nor a vxnet id"
        )
    })
}

/// hostnic's block name `<anything>-a-b-c-d-prefix` as a CIDR; None if it is not one, or
/// names an address with host bits set.
fn block_name(text: &str) -> Option<IpNet> {
    let parts: Vec<&str> = text.rsplitn(6, '-').collect();
    let [prefix, d, c, b, a, name] = parts.as_slice() else {
        return None;
    };
    if name.is_empty() {
        return None;
    }
    let octet = |s: &str| s.parse::<u8>().ok().filter(|_| !s.starts_with('+'));
    let addr = std::net::Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?);
    let net = Ipv4Net::new(addr, octet(prefix)?).ok()?;
    (net.trunc() == net).then_some(IpNet::V4(net))
}

impl NamespaceMapping {
    /// The mapping of the ConfigMap's `data`; Err says what is wrong, naming the key (and the
    /// namespace and entry).
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<NamespaceMapping, String> {
        let auto_assign = match data.get(AUTO_ASSIGN_KEY).map(|v| v.trim()) {
            None | Some("off") => false,
            Some("on") => true,
            Some(other) => {
                return Err(format!(
                    "data.{AUTO_ASSIGN_KEY} is {other:?}; it must be \"on\" or \"off\""
                ))
            }
        };
        let lists: BTreeMap<String, Vec<String>> = match data.get(IPAM_KEY) {
            None => BTreeMap::new(),
            Some(text) => serde_json::from_str(text).map_err(|e| {
                format!(
                    "data.{IPAM_KEY} is not a JSON object of namespace to a list of subnets: {e}"
                )
            })?,
        };
        let mut mapping = NamespaceMapping {
            auto_assign,
            ..NamespaceMapping::default()
        };
        for (namespace, list) in lists {
            if namespace.trim().is_empty() {
                return Err(format!("data.{IPAM_KEY} has an empty namespace name"));
            }
            let mut entries = Entries::default();
            for text in &list {
                match parse_entry(text).map_err(|e| format!("data.{IPAM_KEY}.{namespace}: {e}"))? {
                    Entry::Cidr(net) => entries.cidrs.push(net),
                    Entry::Vxnet(id) => entries.unmapped.push(id),
                }
            }
            if entries == Entries::default() {
                continue;
            }
            if namespace == DEFAULT_ENTRY {
                mapping.default = Some(entries);
            } else {
                mapping.namespaces.insert(namespace, entries);
            }
        }
        Ok(mapping)
    }

    /// Every entry that cannot be mapped, as `(namespace, entry)`: what to log once.
    pub fn unmapped(&self) -> Vec<(String, String)> {
        let default = self.default.iter().map(|e| (DEFAULT_ENTRY, e));
        let named = self.namespaces.iter().map(|(n, e)| (n.as_str(), e));
        default
            .chain(named)
            .flat_map(|(n, e)| e.unmapped.iter().map(move |u| (n.to_string(), u.clone())))
            .collect()
    }

    /// The restriction of `namespace` on a range set whose pools are `pools`, given the blocks
    /// auto-assigned to each namespace (`assigned`). Err (the ADD is refused) when the entry
    /// that applies names nothing that can be mapped.
    pub fn restriction(
        &self,
        namespace: &str,
        pools: &[IpNet],
        assigned: &BTreeMap<String, Vec<IpNet>>,
    ) -> Result<Restriction, String> {
        let meets = |cidrs: &[IpNet]| -> Vec<IpNet> {
            cidrs
                .iter()
                .filter(|c| pools.iter().any(|p| overlap(p, c)))
                .copied()
                .collect()
        };
        let configured = self
            .namespaces
            .iter()
            .filter(|(n, _)| n.as_str() != namespace)
            .flat_map(|(_, e)| e.cidrs.iter());
        let auto = assigned
            .iter()
            .filter(|(n, _)| n.as_str() != namespace)
            .flat_map(|(_, blocks)| blocks.iter());
        let others: Vec<IpNet> = configured.chain(auto).copied().collect();
        let others = meets(&others);
        let restrict = |within: Vec<IpNet>, source: Source| Restriction {
            outside: others
                .iter()
                .filter(|c| !within.contains(c))
                .copied()
                .collect(),
            within: Some(within),
            source,
            auto_space: None,
        };
        if let Some(entries) = self.namespaces.get(namespace) {
            if entries.only_unmappable() {
                return Err(unmappable(namespace, entries));
            }
            let own = meets(&entries.cidrs);
            if !own.is_empty() {
                return Ok(restrict(own, Source::ConfigMap(namespace.to_string())));
            }
        }
        let default = self.default.as_ref();
        if self.auto_assign {
            let own = meets(assigned.get(namespace).map_or(&[][..], Vec::as_slice));
            let space = default.map(|d| meets(&d.cidrs)).filter(|s| !s.is_empty());
            let mut r = restrict(own, Source::Auto);
            r.auto_space = Some(space);
            return Ok(r);
        }
        if let Some(entries) = default {
            if entries.only_unmappable() {
                return Err(unmappable(DEFAULT_ENTRY, entries));
            }
            let own = meets(&entries.cidrs);
            if !own.is_empty() {
                return Ok(restrict(own, Source::ConfigMap(DEFAULT_ENTRY.to_string())));
            }
        }
        Ok(Restriction {
            within: None,
            outside: others,
            source: Source::Pool,
            auto_space: None,
        })
    }
}

fn unmappable(entry: &str, entries: &Entries) -> String {
    format!(
        "{} maps this namespace by data.{IPAM_KEY}.{entry} to {}, which hostnic-ipam cannot map \
         to addresses (a vxnet is known only to the QingCloud API); write the CIDRs of its pool \
         subnets or blocks instead",
        config_map_name(),
        entries.unmapped.join(", ")
    )
}

/// Whether two CIDRs share an address (one contains the other).
pub fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where a namespace's allowed CIDRs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// No entry restricts it: the whole pool (but what other namespaces have).
    Pool,
    /// The ConfigMap's entry of this name (the namespace, or `Default`).
    ConfigMap(String),
    /// Blocks assigned to the namespace automatically (`subnet-auto-assign: "on"`).
    Auto,
}

/// What a namespace may take from one range set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// Dynamic addresses come only from these CIDRs; None: from the whole pool.
    pub within: Option<Vec<IpNet>>,
    /// Never an address in these: they belong to other namespaces.
    pub outside: Vec<IpNet>,
    pub source: Source,
    /// With auto-assign, where a new block may be taken when `within` is full: Some(None) the
    /// pool, Some(Some(cidrs)) `Default`'s CIDRs; None without auto-assign.
    pub auto_space: Option<Option<Vec<IpNet>>>,
}

impl Restriction {
    /// No restriction at all: the allocator's path without namespaces.
    pub fn none() -> Restriction {
        Restriction {
            within: None,
            outside: Vec::new(),
            source: Source::Pool,
            auto_space: None,
        }
    }

    /// True when dynamic picking is the unrestricted one.
    pub fn is_none(&self) -> bool {
        self.within.is_none() && self.outside.is_empty()
    }

    /// Whether the namespace may hold `ip` when it asks for it exactly (an annotation,
    /// `IP=`, `runtimeConfig.ips`): not in another namespace's CIDRs, and in its own (with
    /// auto-assign: in its blocks or anywhere it could be given one).
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.outside.iter().any(|c| c.contains(&ip)) {
            return false;
        }
        let within = self
            .within
            .as_ref()
            .is_none_or(|w| w.iter().any(|c| c.contains(&ip)));
        match &self.auto_space {
            Some(space) => {
                within
                    || space
                        .as_ref()
                        .is_none_or(|s| s.iter().any(|c| c.contains(&ip)))
            }
            None => within,
        }
    }

    /// What the namespace may use, for messages: "10.1.0.0/26 (ConfigMap …, data.ipam.apps)".
    pub fn describe(&self) -> String {
        let list = |cidrs: &[IpNet]| {
            cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let own = match (&self.within, &self.source) {
            (Some(w), Source::ConfigMap(entry)) => format!(
                "{} ({}, data.{IPAM_KEY}.{entry})",
                list(w),
                config_map_name()
            ),
            (Some(w), Source::Auto) if w.is_empty() => {
                "no block yet (auto-assigned on its first dynamic address)".to_string()
            }
            (Some(w), Source::Auto) => format!("{} (auto-assigned)", list(w)),
            _ => "the pool".to_string(),
        };
        if self.outside.is_empty() {
            own
        } else {
            format!("{own}, never {} (other namespaces')", list(&self.outside))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn data(auto: &str, ipam: &str) -> BTreeMap<String, String> {
        [
            (AUTO_ASSIGN_KEY.to_string(), auto.to_string()),
            (IPAM_KEY.to_string(), ipam.to_string()),
        ]
        .into()
    }

    fn mapping(auto: &str, ipam: &str) -> NamespaceMapping {
        NamespaceMapping::from_config_map(&data(auto, ipam)).unwrap()
    }

    #[test]
    fn entries_are_cidrs_hostnic_block_names_or_vxnets() {
        let cases: &[(&str, Result<Entry, &str>)] = &[
            ("10.1.0.0/26", Ok(Entry::Cidr(nets(&["10.1.0.0/26"])[0]))),
            (" fd00::/120 ", Ok(Entry::Cidr(nets(&["fd00::/120"])[0]))),
            (
                "4100-172-16-3-0-26",
                Ok(Entry::Cidr(nets(&["172.16.3.0/26"])[0])),
            ),
            (
                "blk-a-10-9-0-64-26",
                Ok(Entry::Cidr(nets(&["10.9.0.64/26"])[0])),
            ),
            ("vxnet-abc123", Ok(Entry::Vxnet("vxnet-abc123".into()))),
            ("10.1.0.5/24", Err("host bits")),
            ("4100-172-16-3-5-26", Err("neither")),
            ("172-16-3-0-26", Err("neither")),
            ("4100-300-16-3-0-26", Err("neither")),
            ("4100-172-16-3-0-33", Err("neither")),
            ("10.1.0.5", Err("neither")),
            ("", Err("neither")),
        ];
        for (text, expected) in cases {
            match (parse_entry(text), expected) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{text}"),
                (Err(e), Err(part)) => assert!(e.contains(part), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_config_map_is_read_with_every_mistake_named() {
        let m = mapping(
            "on",
            r#"{"Default": ["10.1.0.0/16"], "apps": ["10.1.1.0/26", "vxnet-x"], "web": [], "db": ["vxnet-y"]}"#,
        );
        assert!(m.auto_assign);
        assert_eq!(m.default.as_ref().unwrap().cidrs, nets(&["10.1.0.0/16"]));
        assert_eq!(m.namespaces["apps"].cidrs, nets(&["10.1.1.0/26"]));
        assert!(
            !m.namespaces.contains_key("web"),
            "an empty list maps nothing"
        );
        assert_eq!(
            m.unmapped(),
            vec![
                ("apps".into(), "vxnet-x".into()),
                ("db".into(), "vxnet-y".into())
            ]
        );
        let empty = NamespaceMapping::from_config_map(&BTreeMap::new()).unwrap();
        assert_eq!(empty, NamespaceMapping::default());
        let bad = [
            (data("yes", "{}"), "data.subnet-auto-assign is \"yes\""),
            (data("off", "{"), "data.ipam is not a JSON object"),
            (data("off", r#"{"a": "10.0.0.0/24"}"#), "data.ipam is not"),
            (
                data("off", r#"{"apps": ["10.0.0.1/24"]}"#),
                "data.ipam.apps: \"10.0.0.1/24\" has host bits",
            ),
            (
                data("off", r#"{"apps": ["nonsense"]}"#),
                "data.ipam.apps: \"nonsense\" is neither",
            ),
        ];
        for (d, expected) in bad {
            let e = NamespaceMapping::from_config_map(&d).unwrap_err();
            assert!(e.contains(expected), "{d:?}: {e}");
        }
    }

    #[test]
    fn each_namespace_gets_its_entries_else_default_else_the_pool_and_never_anothers() {
        let pool = nets(&["10.1.0.0/16"]);
        let none = BTreeMap::new();
        let m = mapping(
            "off",
            r#"{"Default": ["10.1.0.0/17"], "apps": ["10.1.1.0/26"], "db": ["4100-10-1-2-0-26"],
                "other-net": ["192.168.0.0/24"]}"#,
        );
        let apps = m.restriction("apps", &pool, &none).unwrap();
        assert_eq!(apps.within, Some(nets(&["10.1.1.0/26"])));
        assert_eq!(apps.outside, nets(&["10.1.2.0/26"]));
        assert_eq!(apps.source, Source::ConfigMap("apps".into()));
        assert!(apps.admits("10.1.1.5".parse().unwrap()));
        assert!(!apps.admits("10.1.2.5".parse().unwrap()), "db's block");
        assert!(!apps.admits("10.1.3.5".parse().unwrap()), "Default's");
        let unmapped = m.restriction("web", &pool, &none).unwrap();
        assert_eq!(unmapped.within, Some(nets(&["10.1.0.0/17"])));
        assert_eq!(unmapped.outside, nets(&["10.1.1.0/26", "10.1.2.0/26"]));
        assert!(unmapped.admits("10.1.0.9".parse().unwrap()));
        assert!(!unmapped.admits("10.1.2.9".parse().unwrap()));
        assert!(!unmapped.admits("10.1.200.9".parse().unwrap()));
        // A namespace whose entries are all of another network falls back on this one.
        let other = m.restriction("other-net", &pool, &none).unwrap();
        assert_eq!(other.source, Source::ConfigMap(DEFAULT_ENTRY.into()));
        // A network whose pools no entry meets: the whole pool.
        let free = m
            .restriction("apps", &nets(&["172.20.0.0/24"]), &none)
            .unwrap();
        assert!(free.is_none());
        assert_eq!(Restriction::none(), free);
        // Without Default: the pool, minus the namespaces' blocks.
        let m = mapping("off", r#"{"apps": ["10.1.1.0/26"]}"#);
        let web = m.restriction("web", &pool, &none).unwrap();
        assert_eq!(web.within, None);
        assert_eq!(web.outside, nets(&["10.1.1.0/26"]));
    }

    #[test]
    fn a_namespace_mapped_only_to_vxnets_is_refused_naming_the_entry() {
        let pool = nets(&["10.1.0.0/16"]);
        let none = BTreeMap::new();
        let m = mapping(
            "off",
            r#"{"Default": ["vxnet-d"], "apps": ["vxnet-a"], "db": ["vxnet-b", "10.1.2.0/26"]}"#,
        );
        let e = m.restriction("apps", &pool, &none).unwrap_err();
        assert!(e.contains("data.ipam.apps to vxnet-a"), "{e}");
        assert!(e.contains("kube-system/hostnic-ipam-config"), "{e}");
        let e = m.restriction("web", &pool, &none).unwrap_err();
        assert!(e.contains("data.ipam.Default to vxnet-d"), "{e}");
        let db = m.restriction("db", &pool, &none).unwrap();
        assert_eq!(db.within, Some(nets(&["10.1.2.0/26"])));
    }

    #[test]
    fn with_auto_assign_a_namespace_uses_its_blocks_and_others_are_denied() {
        let pool = nets(&["10.1.0.0/16"]);
        let assigned: BTreeMap<String, Vec<IpNet>> = [
            ("web".to_string(), nets(&["10.1.0.64/26"])),
            ("batch".to_string(), nets(&["10.1.0.128/26"])),
        ]
        .into();
        let m = mapping("on", r#"{"apps": ["10.1.1.0/26"]}"#);
        let web = m.restriction("web", &pool, &assigned).unwrap();
        assert_eq!(web.within, Some(nets(&["10.1.0.64/26"])));
        assert_eq!(web.outside, nets(&["10.1.1.0/26", "10.1.0.128/26"]));
        assert_eq!(web.auto_space, Some(None));
        assert!(web.admits("10.1.0.70".parse().unwrap()));
        assert!(web.admits("10.1.9.7".parse().unwrap()), "a free block");
        assert!(!web.admits("10.1.0.130".parse().unwrap()), "batch's block");
        let new = m.restriction("new", &pool, &assigned).unwrap();
        assert_eq!(new.within, Some(vec![]));
        assert!(
            new.describe().contains("no block yet"),
            "{}",
            new.describe()
        );
        let apps = m.restriction("apps", &pool, &assigned).unwrap();
        assert_eq!(
            apps.outside,
            nets(&["10.1.0.128/26", "10.1.0.64/26"]),
            "auto-assigned blocks are other namespaces' too"
        );
        let m = mapping("on", r#"{"Default": ["10.1.4.0/24"]}"#);
        let new = m.restriction("new", &pool, &assigned).unwrap();
        assert_eq!(new.auto_space, Some(Some(nets(&["10.1.4.0/24"]))));
        assert!(!new.admits("10.1.9.7".parse().unwrap()), "outside Default");
    }
}
