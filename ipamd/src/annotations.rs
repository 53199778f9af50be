//! kube-ipam's fixed-IP annotations, read from a pod: which address a pod asks for, on which
//! network, or why the request is refused. Pure: the pod comes from the Kubernetes cache
//! (`kube.rs`) as a [`PodMeta`], the pools from the network's `ipam` config.
//!
//! The annotations, as kube-ipam defines them:
//! - `kube-ipam.ip`: one address, or a comma-separated list; an entry may be written in CIDR
//!   form (`10.188.0.216/16`), whose prefix must then be the pool's.
//! - `kube-ipam.netmask`: optional, dotted (`255.255.0.0`); must be the pool's prefix.
//! - `kube-ipam.gateway`: optional; must be the pool's gateway.
//!
//! A list is for StatefulSets: a pod whose controller is a StatefulSet takes the entry at its
//! ordinal (the name's trailing `-N`: `web-2` takes the third), so one annotation on the
//! template serves every replica. A list of more than one address on any other pod is refused:
//! every replica of a Deployment would ask for the same first address, and only one could
//! have it.
//!
//! An annotated address applies to the network whose pools contain it: a pod on `eth0`
//! (network A) and `net1` (network B) with an address inside B's subnet gets it on `net1` and a
//! dynamic address on `eth0`. A pod that asks Multus for no secondary network
//! (`k8s.v1.cni.cncf.io/networks`) has one network, so an address outside its subnets is
//! refused rather than ignored: a pod that asks for a fixed address never silently gets
//! another one.
//!
//! Every refusal names the annotation and its value ([`AnnotationError`]); nothing is
//! allocated for a pod whose annotations are refused.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hostnic_cni::RequestedIp;

use crate::addr::Family;
use crate::pool::RangeSet;

/// The fixed address (or StatefulSet list of addresses).
pub const IP: &str = "kube-ipam.ip";
/// The netmask the pod expects, dotted.
pub const NETMASK: &str = "kube-ipam.netmask";
/// The gateway the pod expects.
pub const GATEWAY: &str = "kube-ipam.gateway";
/// Multus' list of a pod's secondary networks: a pod with it is attached to more than one.
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";

/// What the allocator needs to know of a pod, as the API server has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
    /// The owner reference marked `controller: true`, if any.
    pub controller: Option<Owner>,
}

/// An owner reference: the object that controls a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// The owner's UID (empty if the reference had none).
    pub uid: String,
}

impl Owner {
    /// A StatefulSet of `apps` (any version).
    pub fn is_stateful_set(&self) -> bool {
        self.kind == "StatefulSet"
            && (self.api_version == "apps" || self.api_version.starts_with("apps/"))
    }
}

impl PodMeta {
    /// `namespace/name`, as errors and logs name a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The StatefulSet that controls the pod, if one does.
    pub fn stateful_set(&self) -> Option<&Owner> {
        self.controller.as_ref().filter(|o| o.is_stateful_set())
    }

    /// Whether the pod asks Multus for secondary networks (a non-empty list).
    fn has_secondary_networks(&self) -> bool {
        self.annotations
            .get(MULTUS_NETWORKS)
            .is_some_and(|v| !matches!(v.trim(), "" | "[]"))
    }
}

/// A refused annotation: which pod, which annotation, its value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {pod}: annotation {annotation} {value:?}: {reason}")]
pub struct AnnotationError {
    pub pod: String,
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

/// The fixed-address request of a pod, parsed and checked against nothing but itself: the
/// address its annotations give it (its ordinal's entry for a StatefulSet pod). Which network
/// it applies to, and whether that network's pool allows it, is [`FixedRequest::for_network`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedRequest {
    pod: String,
    /// The whole `kube-ipam.ip` value, for errors.
    value: String,
    pub ip: IpAddr,
    /// The prefix of the CIDR form, if the entry had one.
    prefix: Option<u8>,
    /// `kube-ipam.netmask` as a prefix length, with its text.
    netmask: Option<(u8, String)>,
    gateway: Option<IpAddr>,
    /// The pod is attached to more networks than the one of this ADD.
    multi_network: bool,
}

impl FixedRequest {
    /// Reads the pod's annotations. None: the pod asks for no fixed address. Refused: an entry
    /// that is not an address, an empty value or entry, a list on a pod that is not a
    /// StatefulSet's, a StatefulSet pod whose ordinal has no entry (or whose name has no
    /// ordinal), a netmask that is not a contiguous mask of the address's family, a gateway
    /// that is not an address of its family, a netmask or gateway without `kube-ipam.ip`.
    pub fn from_pod(pod: &PodMeta) -> Result<Option<FixedRequest>, AnnotationError> {
        let refuse = |annotation: &'static str, value: &str, reason: String| AnnotationError {
            pod: pod.key(),
            annotation,
            value: value.to_string(),
            reason,
        };
        let netmask_text = pod.annotations.get(NETMASK);
        let gateway_text = pod.annotations.get(GATEWAY);
        let Some(value) = pod.annotations.get(IP) else {
            // A netmask or gateway alone means a misspelt `kube-ipam.ip`: the pod wanted a
            // fixed address, and would silently get a dynamic one.
            if let Some((annotation, value)) = netmask_text
                .map(|v| (NETMASK, v))
                .or(gateway_text.map(|v| (GATEWAY, v)))
            {
                return Err(refuse(
                    annotation,
                    value,
                    format!("has no effect without {IP}; set {IP}, or remove {annotation}"),
                ));
            }
            return Ok(None);
        };
        if value.trim().is_empty() {
            return Err(refuse(
                IP,
                value,
                "is empty; remove the annotation for a dynamic address".into(),
            ));
        }
        let entries: Vec<&str> = value.split(',').map(str::trim).collect();
        let mut parsed = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if entry.is_empty() {
                return Err(refuse(IP, value, format!("entry {i} of the list is empty")));
            }
            let ip: RequestedIp = entry
                .parse()
                .map_err(|reason| refuse(IP, value, format!("{entry:?} is {reason}")))?;
            parsed.push(ip);
        }
        let chosen = match pod.stateful_set() {
            Some(set) => {
                let ordinal = ordinal_of(&pod.name).ok_or_else(|| {
                    refuse(
                        IP,
                        value,
                        format!(
                            "pod {} is owned by StatefulSet {} but its name does not end in an \
                             ordinal (-N), so no entry of the list can be chosen",
                            pod.name, set.name
                        ),
                    )
                })?;
                *usize::try_from(ordinal)
                    .ok()
                    .and_then(|i| parsed.get(i))
                    .ok_or_else(|| {
                        refuse(
                            IP,
                            value,
                            format!(
                                "pod {} is ordinal {ordinal} of StatefulSet {}, but the list has \
                                 {} address(es), for ordinals 0-{}; add an address for every \
                                 replica",
                                pod.name,
                                set.name,
                                parsed.len(),
                                parsed.len() - 1
                            ),
                        )
                    })?
            }
            None if parsed.len() > 1 => {
                return Err(refuse(
                    IP,
                    value,
                    format!(
                        "is a list of {} addresses, which only a StatefulSet's pod can use (it \
                         takes the entry at its ordinal); pod {} is not controlled by a \
                         StatefulSet, so give it one address",
                        parsed.len(),
                        pod.name
                    ),
                ));
            }
            None => parsed[0],
        };
        let family = Family::of(chosen.address);
        let netmask = netmask_text
            .map(|text| {
                prefix_of_netmask(text.trim(), family)
                    .map(|prefix| (prefix, text.clone()))
                    .map_err(|reason| refuse(NETMASK, text, reason))
            })
            .transpose()?;
        let gateway = gateway_text
            .map(|text| {
                let ip: IpAddr = text
                    .trim()
                    .parse()
                    .map_err(|e| refuse(GATEWAY, text, format!("not an IP address: {e}")))?;
                if Family::of(ip) != family {
                    return Err(refuse(
                        GATEWAY,
                        text,
                        format!(
                            "is {}, the address {} is not",
                            Family::of(ip).name(),
                            chosen.address
                        ),
                    ));
                }
                Ok(ip)
            })
            .transpose()?;
        if let (Some(prefix), Some((mask, text))) = (chosen.prefix_len, &netmask) {
            if prefix != *mask {
                return Err(refuse(
                    NETMASK,
                    text,
                    format!("is /{mask}, but {IP} gives {chosen} (/{prefix})"),
                ));
            }
        }
        Ok(Some(FixedRequest {
            pod: pod.key(),
            value: value.clone(),
            ip: chosen.address,
            prefix: chosen.prefix_len,
            netmask,
            gateway,
            multi_network: pod.has_secondary_networks(),
        }))
    }

    /// The address this request asks of the network whose range sets are `range_sets`: Some
    /// when a pool of the network holds it, and the pool allows it as a fixed address
    /// ([`crate::Pool::check_fixed`]) with the annotated prefix, netmask and gateway. None when
    /// no pool holds it and the pod has other networks (the address is theirs). Refused when no
    /// pool holds it and the pod has no other network, or when the pool disagrees.
    pub fn for_network(
        &self,
        network: &str,
        range_sets: &[RangeSet],
    ) -> Result<Option<IpAddr>, AnnotationError> {
        let refuse = |annotation: &'static str, value: &str, reason: String| AnnotationError {
            pod: self.pod.clone(),
            annotation,
            value: value.to_string(),
            reason,
        };
        let ip = self.ip;
        let Some(pool) = range_sets.iter().find_map(|s| s.pool_for(ip)) else {
            if self.multi_network {
                return Ok(None);
            }
            let subnets: Vec<String> = range_sets
                .iter()
                .flat_map(|s| s.pools.iter().map(|p| p.subnet.to_string()))
                .collect();
            return Err(refuse(
                IP,
                &self.value,
                format!(
                    "{ip} is outside every subnet of network {network:?} ({}), and the pod is \
                     attached to no other network",
                    subnets.join(", ")
                ),
            ));
        };
        let pool_prefix = pool.subnet.prefix_len();
        if let Some(prefix) = self.prefix.filter(|&p| p != pool_prefix) {
            return Err(refuse(
                IP,
                &self.value,
                format!(
                    "{ip}/{prefix} disagrees with the prefix of subnet {} of network {network:?}",
                    pool.subnet
                ),
            ));
        }
        if let Some((mask, text)) = self.netmask.as_ref().filter(|(m, _)| *m != pool_prefix) {
            return Err(refuse(
                NETMASK,
                text,
                format!(
                    "is /{mask}, but subnet {} of network {network:?} is /{pool_prefix} ({})",
                    pool.subnet,
                    pool.subnet.netmask()
                ),
            ));
        }
        if let Some(gateway) = self.gateway.filter(|g| *g != pool.gateway) {
            return Err(refuse(
                GATEWAY,
                &gateway.to_string(),
                format!(
                    "disagrees with the gateway {} of subnet {} of network {network:?}",
                    pool.gateway, pool.subnet
                ),
            ));
        }
        pool.check_fixed(ip)
            .map_err(|reason| refuse(IP, &self.value, reason))?;
        Ok(Some(ip))
    }
}

/// The ordinal of a StatefulSet pod: the decimal number after the name's last `-`.
pub fn ordinal_of(name: &str) -> Option<u32> {
    let (_, digits) = name.rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The prefix length of a netmask written as an address (`255.255.0.0` → 16): of the family
/// of the address it goes with, and contiguous ones then zeros.
fn prefix_of_netmask(text: &str, family: Family) -> Result<u8, String> {
    let mask: IpAddr = text
        .parse()
        .map_err(|e| format!("not a netmask such as 255.255.255.0: {e}"))?;
    if Family::of(mask) != family {
        return Err(format!(
            "is an {} netmask, but the address is {}",
            Family::of(mask).name(),
            family.name()
        ));
    }
    ipnet::ip_mask_to_prefix(mask)
        .map_err(|_| "not a contiguous netmask (ones, then zeros)".to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::pool::parse_range_sets;
    use serde_json::json;

    fn pod(name: &str, annotations: &[(&str, &str)], owner: Option<(&str, &str)>) -> PodMeta {
        PodMeta {
            namespace: "default".into(),
            name: name.into(),
            uid: "uid-1".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            controller: owner.map(|(kind, name)| Owner {
                api_version: "apps/v1".into(),
                kind: kind.into(),
                name: name.into(),
                uid: String::new(),
            }),
        }
    }

    /// kube-ipam's README network: no fixed window, fixed addresses below the range.
    fn kube_ipam_sets() -> Vec<RangeSet> {
        parse_range_sets(&json!({
            "type": "hostnic-ipam",
            "subnet": "10.188.0.0/16",
            "rangeStart": "10.188.1.0",
            "rangeEnd": "10.188.255.254",
            "gateway": "10.188.0.1",
        }))
        .unwrap()
    }

    fn ask(p: &PodMeta, sets: &[RangeSet]) -> Result<Option<IpAddr>, AnnotationError> {
        match FixedRequest::from_pod(p)? {
            None => Ok(None),
            Some(req) => req.for_network("k8snetwork", sets),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const STS: Option<(&str, &str)> = Some(("StatefulSet", "web"));
    const RS: Option<(&str, &str)> = Some(("ReplicaSet", "web-6d9b74fd4d"));

    #[test]
    fn good_annotations_give_the_address() {
        let sets = kube_ipam_sets();
        let list = "10.188.0.10, 10.188.0.11,10.188.0.12";
        for (name, annotations, owner, want) in [
            // kube-ipam's README pod.
            (
                "fixed-ip-test-6d9b74fd4d-dbbsd",
                vec![
                    (IP, "10.188.0.216"),
                    (NETMASK, "255.255.0.0"),
                    (GATEWAY, "10.188.0.1"),
                ],
                RS,
                Some("10.188.0.216"),
            ),
            (
                "plain",
                vec![(IP, " 10.188.0.216 ")],
                None,
                Some("10.188.0.216"),
            ),
            (
                "cidr",
                vec![(IP, "10.188.0.216/16")],
                None,
                Some("10.188.0.216"),
            ),
            (
                "in-range",
                vec![(IP, "10.188.7.7")],
                None,
                Some("10.188.7.7"),
            ),
            ("web-0", vec![(IP, list)], STS, Some("10.188.0.10")),
            ("web-2", vec![(IP, list)], STS, Some("10.188.0.12")),
            ("web-0", vec![(IP, "10.188.0.10")], STS, Some("10.188.0.10")),
            ("nothing", vec![], None, None),
            ("other", vec![("kube-ipam.other", "x")], None, None),
        ] {
            let p = pod(name, &annotations, owner);
            assert_eq!(
                ask(&p, &sets).unwrap(),
                want.map(ip),
                "{name} {annotations:?}"
            );
        }
    }

    #[test]
    fn bad_annotations_are_refused_naming_the_annotation_and_value() {
        let sets = kube_ipam_sets();
        let list = "10.188.0.10,10.188.0.11,10.188.0.12";
        for (name, annotations, owner, annotation, says) in [
            (
                "a",
                vec![(IP, "10.188.0.300")],
                None,
                IP,
                "not an IP address",
            ),
            ("a", vec![(IP, "web")], None, IP, "not an IP address"),
            ("a", vec![(IP, "")], None, IP, "is empty"),
            (
                "a",
                vec![(IP, "10.188.0.10,")],
                None,
                IP,
                "entry 1 of the list is empty",
            ),
            (
                "a",
                vec![(IP, "10.9.0.5")],
                None,
                IP,
                "outside every subnet of network \"k8snetwork\" (10.188.0.0/16)",
            ),
            ("a", vec![(IP, "10.188.0.0")], None, IP, "network address"),
            (
                "a",
                vec![(IP, "10.188.255.255")],
                None,
                IP,
                "broadcast address",
            ),
            ("a", vec![(IP, "10.188.0.1")], None, IP, "it is the gateway"),
            (
                "a",
                vec![(IP, "10.188.0.216/24")],
                None,
                IP,
                "disagrees with the prefix of subnet 10.188.0.0/16",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (NETMASK, "255.255.255.0")],
                None,
                NETMASK,
                "is /24, but subnet 10.188.0.0/16 of network \"k8snetwork\" is /16 (255.255.0.0)",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216/16"), (NETMASK, "255.255.255.0")],
                None,
                NETMASK,
                "is /24, but kube-ipam.ip gives 10.188.0.216/16",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (NETMASK, "255.0.255.0")],
                None,
                NETMASK,
                "not a contiguous netmask",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (NETMASK, "sixteen")],
                None,
                NETMASK,
                "not a netmask",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (NETMASK, "ffff::")],
                None,
                NETMASK,
                "is an IPv6 netmask",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (GATEWAY, "10.188.0.254")],
                None,
                GATEWAY,
                "disagrees with the gateway 10.188.0.1 of subnet 10.188.0.0/16",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (GATEWAY, "gw")],
                None,
                GATEWAY,
                "not an IP address",
            ),
            (
                "a",
                vec![(IP, "10.188.0.216"), (GATEWAY, "fd00::1")],
                None,
                GATEWAY,
                "is IPv6",
            ),
            (
                "a",
                vec![(NETMASK, "255.255.0.0")],
                None,
                NETMASK,
                "has no effect without kube-ipam.ip",
            ),
            (
                "a",
                vec![(GATEWAY, "10.188.0.1")],
                None,
                GATEWAY,
                "has no effect without kube-ipam.ip",
            ),
            (
                "web-5",
                vec![(IP, list)],
                STS,
                IP,
                "ordinal 5 of StatefulSet web, but the list has 3 address(es), for ordinals 0-2",
            ),
            (
                "web",
                vec![(IP, list)],
                STS,
                IP,
                "does not end in an ordinal",
            ),
            (
                "web-x",
                vec![(IP, list)],
                STS,
                IP,
                "does not end in an ordinal",
            ),
            (
                "web-6d9b74fd4d-dbbsd",
                vec![(IP, list)],
                RS,
                IP,
                "only a StatefulSet's pod can use",
            ),
            (
                "lonely",
                vec![(IP, list)],
                None,
                IP,
                "only a StatefulSet's pod can use",
            ),
        ] {
            let p = pod(name, &annotations, owner);
            let e = ask(&p, &sets).expect_err(&format!("{name} {annotations:?}"));
            assert_eq!(e.annotation, annotation, "{e}");
            let text = e.to_string();
            assert!(text.contains(says), "{name} {annotations:?}: {text}");
            assert!(
                text.starts_with(&format!("pod default/{name}: annotation {annotation} ")),
                "{text}"
            );
        }
    }

    #[test]
    fn a_statefulset_of_another_api_group_is_not_a_statefulset() {
        let mut p = pod("web-1", &[(IP, "10.188.0.10,10.188.0.11")], STS);
        p.controller.as_mut().unwrap().api_version = "example.com/v1".into();
        let e = ask(&p, &kube_ipam_sets()).unwrap_err();
        assert!(e.reason.contains("only a StatefulSet's pod"), "{e}");
    }

    #[test]
    fn an_address_of_another_network_applies_there_only_when_the_pod_has_other_networks() {
        let net1 = parse_range_sets(&json!({"subnet": "172.30.0.0/24"})).unwrap();
        let multus = [(IP, "10.188.0.216"), (MULTUS_NETWORKS, "storage-net")];
        // On the network that does not hold it (here net1), the annotation does not apply ...
        assert_eq!(ask(&pod("a", &multus, None), &net1).unwrap(), None);
        // ... on the one that holds it, it does.
        assert_eq!(
            ask(&pod("a", &multus, None), &kube_ipam_sets()).unwrap(),
            Some(ip("10.188.0.216"))
        );
        // A pod without secondary networks (or an empty list) is refused instead.
        for annotations in [
            vec![(IP, "10.188.0.216")],
            vec![(IP, "10.188.0.216"), (MULTUS_NETWORKS, "[]")],
        ] {
            let e = ask(&pod("a", &annotations, None), &net1).unwrap_err();
            assert!(e.reason.contains("outside every subnet"), "{e}");
        }
    }

    #[test]
    fn a_fixed_window_confines_fixed_addresses_to_it_and_the_ranges() {
        let sets = parse_range_sets(&json!({
            "subnet": "10.188.0.0/16",
            "fixedStart": "10.188.0.10",
            "fixedEnd": "10.188.0.255",
            "rangeStart": "10.188.1.0",
            "rangeEnd": "10.188.255.254",
            "gateway": "10.188.0.1",
        }))
        .unwrap();
        assert_eq!(
            ask(&pod("a", &[(IP, "10.188.0.216")], None), &sets).unwrap(),
            Some(ip("10.188.0.216"))
        );
        let e = ask(&pod("a", &[(IP, "10.188.0.5")], None), &sets).unwrap_err();
        assert!(e.reason.contains("outside the ranges"), "{e}");
    }

    #[test]
    fn ordinals_are_the_trailing_decimal_number() {
        assert_eq!(ordinal_of("web-0"), Some(0));
        assert_eq!(ordinal_of("my-web-12"), Some(12));
        assert_eq!(ordinal_of("web"), None);
        assert_eq!(ordinal_of("web-"), None);
        assert_eq!(ordinal_of("web-1a"), None);
        assert_eq!(ordinal_of("web-+1"), None);
        assert_eq!(ordinal_of("web-99999999999"), None);
    }
}
