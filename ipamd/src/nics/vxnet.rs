//! Vxnets as pools of NIC addresses, hostnic-compatible (pure).
//!
//! A vxnet is usable for pod NICs only inside a VPC and with a DHCP range, as hostnic requires:
//! [`VxnetPool::from_vxnet`] refuses the others with hostnic's own reasons ("vxnet … should
//! bind to vpc", "vxnet … should open DHCP"). The addresses handed to NICs are the DHCP range
//! less what hostnic keeps back at its top (12 for vxlan vxnets, a seventh of the range for
//! vlan ones); the allocator sees that as an ordinary `ipam` pool (`subnet`, `rangeStart`,
//! `rangeEnd`, `gateway`), so a vxnet's subnet shares one uniqueness domain with every other
//! network that covers it.
//!
//! With several vxnets and no mapping, the vxnet of a new NIC is chosen by [`Policy`], as the
//! old qingagent did.

use std::net::Ipv4Addr;

use hostnic_iaas::types::Vxnet;
use ipnet::Ipv4Net;
use serde_json::json;

/// Addresses hostnic keeps back at the top of a vxlan vxnet's DHCP range.
pub const RESERVED_VXLAN: u32 = 12;
/// hostnic keeps back a seventh of a vlan vxnet's DHCP range.
pub const RESERVED_VLAN_DIVISOR: u32 = 7;

/// A vxnet ready to give NICs addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxnetPool {
    /// `vxnet-…`.
    pub id: String,
    /// The router's `ip_network`.
    pub subnet: Ipv4Net,
    /// The router's `manager_ip`.
    pub gateway: Ipv4Addr,
    /// First address NICs get.
    pub first: Ipv4Addr,
    /// Last address NICs get.
    pub last: Ipv4Addr,
}

impl VxnetPool {
    /// The pool of `vxnet`, or hostnic's reason for refusing it.
    pub fn from_vxnet(vxnet: &Vxnet) -> Result<Self, String> {
        let id = &vxnet.vxnet_id;
        let Some(router) = &vxnet.router else {
            return Err(format!("vxnet {id} should bind to vpc (it has no router)"));
        };
        if router.dyn_ip_start.is_empty() || router.dyn_ip_end.is_empty() {
            return Err(format!(
                "vxnet {id} should open DHCP (its router has no DHCP range)"
            ));
        }
        let subnet: Ipv4Net = router
            .ip_network
            .parse()
            .map_err(|e| format!("vxnet {id}: router ip_network {:?}: {e}", router.ip_network))?;
        let subnet = subnet.trunc();
        let addr = |field: &str, text: &str| -> Result<Ipv4Addr, String> {
            let ip: Ipv4Addr = text
                .parse()
                .map_err(|e| format!("vxnet {id}: router {field} {text:?}: {e}"))?;
            if subnet.contains(&ip) {
                Ok(ip)
            } else {
                Err(format!(
                    "vxnet {id}: router {field} {ip} is outside {subnet}"
                ))
            }
        };
        let gateway = addr("manager_ip", &router.manager_ip)?;
        let start = addr("dyn_ip_start", &router.dyn_ip_start)?;
        let end = addr("dyn_ip_end", &router.dyn_ip_end)?;
        let (first, last) = usable_range(start, end, &vxnet.tunnel_type).ok_or_else(|| {
            format!(
                "vxnet {id}: DHCP range {start}-{end} leaves no address once hostnic's reserve \
                 at its top is kept back"
            )
        })?;
        Ok(VxnetPool {
            id: id.clone(),
            subnet,
            gateway,
            first,
            last,
        })
    }

    /// The `ipam` object the allocator reads this vxnet's pool from.
    pub fn ipam(&self) -> serde_json::Value {
        json!({
            "type": "hostnic-ipam",
            "subnet": self.subnet.to_string(),
            "rangeStart": self.first.to_string(),
            "rangeEnd": self.last.to_string(),
            "gateway": self.gateway.to_string(),
        })
    }
}

/// The DHCP range `start..=end` less hostnic's reserve at its top; None if nothing is left.
pub fn usable_range(
    start: Ipv4Addr,
    end: Ipv4Addr,
    tunnel_type: &str,
) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (s, e) = (u32::from(start), u32::from(end));
    if e < s {
        return None;
    }
    let len = e - s + 1;
    let reserved = if tunnel_type == "vlan" {
        len / RESERVED_VLAN_DIVISOR
    } else {
        RESERVED_VXLAN
    };
    if reserved >= len {
        return None;
    }
    Some((start, Ipv4Addr::from(e - reserved)))
}

/// The name hostnic gives a block of a pool: the pool's number, then the block's network
/// address and prefix length with dashes, e.g. `4100-172-16-3-0-26`, so that namespace
/// entries of `hostnic-ipam-config` naming a block mean what they mean in hostnic.
pub fn block_name(pool_number: u32, block: Ipv4Net) -> String {
    let o = block.network().octets();
    format!(
        "{pool_number}-{}-{}-{}-{}-{}",
        o[0],
        o[1],
        o[2],
        o[3],
        block.prefix_len()
    )
}

/// Parses a [`block_name`]: the pool number and the block.
pub fn parse_block_name(name: &str) -> Option<(u32, Ipv4Net)> {
    let parts: Vec<&str> = name.split('-').collect();
    let [number, a, b, c, d, prefix] = parts.as_slice() else {
        return None;
    };
    let octets = [a, b, c, d].map(|o| o.parse::<u8>().ok());
    let [Some(a), Some(b), Some(c), Some(d)] = octets else {
        return None;
    };
    let net = Ipv4Net::new(Ipv4Addr::new(a, b, c, d), prefix.parse().ok()?).ok()?;
    (net.trunc() == net).then_some((number.parse().ok()?, net))
}

/// The subnets a namespace's entries allow (see `NicPool::placement`): a vxnet id is its whole
/// subnet, a block name its block, which must lie inside one of `pools`. A block name's leading
/// number (hostnic's pool number) is read but not checked: the block's CIDR identifies it.
pub fn placement(pools: &[&VxnetPool], entries: &[String]) -> Result<Vec<Ipv4Net>, String> {
    entries
        .iter()
        .map(|entry| {
            if entry.starts_with("vxnet-") {
                pools
                    .iter()
                    .find(|p| p.id == *entry)
                    .map(|p| p.subnet)
                    .ok_or_else(|| format!("{entry} is not one of the daemon's vxnets"))
            } else {
                // A CIDR, or hostnic's name of a block.
                let block = match entry.parse::<Ipv4Net>() {
                    Ok(cidr) => cidr,
                    Err(_) => parse_block_name(entry)
                        .map(|(_, block)| block)
                        .ok_or_else(|| {
                            format!(
                                "{entry:?} is neither a vxnet id, a CIDR nor a block name such as \
                             4100-172-16-3-0-26"
                            )
                        })?,
                };
                pools
                    .iter()
                    .any(|p| p.subnet.contains(&block))
                    .then_some(block)
                    .ok_or_else(|| format!("block {entry} lies in none of the daemon's vxnets"))
            }
        })
        .collect()
}

/// How the vxnet of a new NIC is chosen among several, as qingagent chose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Stay on one vxnet until it fails or fills, then move to the next (the default).
    #[default]
    FailRotate,
    /// A different vxnet for each new NIC, in turn.
    RoundRotate,
    /// Any vxnet, at random.
    Random,
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "FailRotate" => Ok(Policy::FailRotate),
            "RoundRotate" => Ok(Policy::RoundRotate),
            "Random" => Ok(Policy::Random),
            other => Err(format!(
                "policy {other:?} is not one of FailRotate, RoundRotate, Random"
            )),
        }
    }
}

/// The state of a [`Policy`] over `n` vxnets: which one the next NIC goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    policy: Policy,
    n: usize,
    current: usize,
}

impl Rotation {
    pub fn new(policy: Policy, n: usize) -> Self {
        Rotation {
            policy,
            n,
            current: 0,
        }
    }

    /// The index of the vxnet for the next NIC; `random` is a number the caller drew (used by
    /// [`Policy::Random`] only). None when there are no vxnets.
    pub fn pick(&mut self, random: u64) -> Option<usize> {
        if self.n == 0 {
            return None;
        }
        let picked = match self.policy {
            Policy::FailRotate => self.current,
            Policy::RoundRotate => {
                let picked = self.current;
                self.current = (self.current + 1) % self.n;
                picked
            }
            Policy::Random => (random % self.n as u64) as usize,
        };
        Some(picked)
    }

    /// The vxnet at `index` failed or is full: [`Policy::FailRotate`] moves on to the next.
    pub fn failed(&mut self, index: usize) {
        if self.policy == Policy::FailRotate && self.n > 0 && index == self.current {
            self.current = (self.current + 1) % self.n;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn vxnet(router: Option<(&str, &str, &str, &str)>, tunnel: &str) -> Vxnet {
        let router = router.map(|(net, gw, start, end)| {
            serde_json::json!({
                "ip_network": net, "manager_ip": gw, "dyn_ip_start": start, "dyn_ip_end": end,
            })
        });
        serde_json::from_value(serde_json::json!({
            "vxnet_id": "vxnet-abc1234",
            "router": router,
            "tunnel_type": tunnel,
        }))
        .unwrap()
    }

    #[test]
    fn vxnets_without_a_router_or_a_dhcp_range_are_refused_with_hostnics_reasons() {
        let cases = [
            (vxnet(None, ""), "vxnet vxnet-abc1234 should bind to vpc"),
            (
                vxnet(Some(("172.16.3.0/24", "172.16.3.1", "", "")), ""),
                "vxnet vxnet-abc1234 should open DHCP",
            ),
            (
                vxnet(Some(("172.16.3.0/24", "172.16.3.1", "172.16.3.2", "")), ""),
                "should open DHCP",
            ),
            (
                vxnet(
                    Some(("172.16.3.0/24", "172.16.4.1", "172.16.3.2", "172.16.3.254")),
                    "",
                ),
                "manager_ip 172.16.4.1 is outside 172.16.3.0/24",
            ),
            (
                vxnet(
                    Some(("172.16.3.0/24", "172.16.3.1", "172.16.3.2", "172.16.3.10")),
                    "",
                ),
                "leaves no address",
            ),
        ];
        for (v, reason) in cases {
            let e = VxnetPool::from_vxnet(&v).unwrap_err();
            assert!(e.contains(reason), "{e:?} should say {reason:?}");
        }
    }

    #[test]
    fn a_vxnets_pool_is_its_dhcp_range_less_hostnics_reserve() {
        let p = VxnetPool::from_vxnet(&vxnet(
            Some(("172.16.3.0/24", "172.16.3.1", "172.16.3.2", "172.16.3.254")),
            "vxlan",
        ))
        .unwrap();
        assert_eq!(p.first, Ipv4Addr::new(172, 16, 3, 2));
        assert_eq!(p.last, Ipv4Addr::new(172, 16, 3, 242));
        assert_eq!(p.gateway, Ipv4Addr::new(172, 16, 3, 1));
        let vlan = VxnetPool::from_vxnet(&vxnet(
            Some(("172.16.3.0/24", "172.16.3.1", "172.16.3.2", "172.16.3.71")),
            "vlan",
        ))
        .unwrap();
        // 70 addresses, a seventh (10) kept back.
        assert_eq!(vlan.last, Ipv4Addr::new(172, 16, 3, 61));
        let ipam = p.ipam();
        assert_eq!(ipam["subnet"], "172.16.3.0/24");
        assert_eq!(ipam["rangeEnd"], "172.16.3.242");
        crate::pool::parse_range_sets(&ipam).unwrap();
    }

    #[test]
    fn block_names_are_hostnics_and_read_back() {
        let block: Ipv4Net = "172.16.3.0/26".parse().unwrap();
        assert_eq!(block_name(4100, block), "4100-172-16-3-0-26");
        assert_eq!(parse_block_name("4100-172-16-3-0-26"), Some((4100, block)));
        for bad in [
            "4100-172-16-3-1-26",
            "x-172-16-3-0-26",
            "4100-172-16-3-0",
            "4100-300-16-3-0-26",
            "vxnet-abc",
        ] {
            assert_eq!(parse_block_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn namespace_entries_name_vxnets_or_blocks_of_them() {
        let pool = VxnetPool::from_vxnet(&vxnet(
            Some(("172.16.3.0/24", "172.16.3.1", "172.16.3.2", "172.16.3.254")),
            "",
        ))
        .unwrap();
        let pools = [&pool];
        let entries = |e: &[&str]| e.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            placement(
                &pools,
                &entries(&["vxnet-abc1234", "4100-172-16-3-64-26", "172.16.3.128/26"])
            )
            .unwrap(),
            vec![
                "172.16.3.0/24".parse::<Ipv4Net>().unwrap(),
                "172.16.3.64/26".parse().unwrap(),
                "172.16.3.128/26".parse().unwrap()
            ]
        );
        for (bad, reason) in [
            ("vxnet-other01", "not one of the daemon's vxnets"),
            ("4100-172-16-4-0-26", "lies in none"),
            ("default", "neither a vxnet id, a CIDR nor a block name"),
            ("172.16.4.0/26", "lies in none"),
        ] {
            let e = placement(&pools, &entries(&[bad])).unwrap_err();
            assert!(e.contains(reason), "{e:?} should say {reason:?}");
        }
    }

    #[test]
    fn policies_choose_as_qingagent_did() {
        // (policy, random draws, failures after the pick of step i, expected picks)
        type Case = (Policy, Vec<u64>, Vec<bool>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (
                Policy::FailRotate,
                vec![0; 5],
                vec![false, false, true, false, true],
                vec![0, 0, 0, 1, 1],
            ),
            (
                Policy::RoundRotate,
                vec![0; 5],
                vec![false, true, false, false, false],
                vec![0, 1, 2, 0, 1],
            ),
            (
                Policy::Random,
                vec![5, 1, 3, 8, 0],
                vec![true; 5],
                vec![2, 1, 0, 2, 0],
            ),
        ];
        for (policy, draws, failures, expected) in cases {
            let mut r = Rotation::new(policy, 3);
            let picks: Vec<usize> = draws
                .iter()
                .zip(&failures)
                .map(|(draw, failed)| {
                    let i = r.pick(*draw).unwrap();
                    if *failed {
                        r.failed(i);
                    }
                    i
                })
                .collect();
            assert_eq!(picks, expected, "{policy:?}");
        }
        assert_eq!(Rotation::new(Policy::FailRotate, 0).pick(0), None);
        assert_eq!("RoundRotate".parse::<Policy>(), Ok(Policy::RoundRotate));
        assert!("round"
            .parse::<Policy>()
            .unwrap_err()
            .contains("FailRotate"));
    }
}
