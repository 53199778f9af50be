//! Pools from CNI-style `ipam` config: kube-ipam's keys (`subnet`, `rangeStart`, `rangeEnd`,
//! `gateway`, `fixedStart`, `fixedEnd`) and host-local's `ranges` (an array of range sets),
//! plus `exclude` and `blockSize`.
//!
//! Parsing validates everything before anything touches etcd, and every error names the field
//! and the value it rejected.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::addr::{from_int, to_int, AddrRange, Family};

/// Default block prefix length for IPv4 pools: 64 addresses per block.
pub const DEFAULT_BLOCK_PREFIX_V4: u8 = 26;
/// Default block prefix length for IPv6 pools: 64 addresses per block.
pub const DEFAULT_BLOCK_PREFIX_V6: u8 = 122;
/// Accepted block prefix lengths. Blocks hold at most 4096 addresses so that a block's
/// bitmap stays small.
pub const BLOCK_PREFIX_V4: std::ops::RangeInclusive<u8> = 20..=32;
pub const BLOCK_PREFIX_V6: std::ops::RangeInclusive<u8> = 116..=128;

/// A rejected config value: which field, which value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ipam config: {field} {value:?}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn invalid(
    field: impl Into<String>,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// One `{subnet, rangeStart, rangeEnd, gateway}` object as written by the user.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

/// The address keys of an `ipam` object; anything else in it is left to other layers.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(flatten)]
    top: RawRange,
    ranges: Option<Vec<Vec<RawRange>>>,
    #[serde(default)]
    exclude: Vec<String>,
    fixed_start: Option<String>,
    fixed_end: Option<String>,
    block_size: Option<u8>,
}

/// A validated pool: one subnet, the uniqueness domain of its addresses across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The subnet, always its network address.
    pub subnet: IpNet,
    pub gateway: IpAddr,
    /// Dynamic ranges, sorted and disjoint.
    pub ranges: Vec<AddrRange>,
    /// Addresses never handed out, dynamic or exact.
    pub exclude: Vec<AddrRange>,
    /// Window reserved for exact (fixed) addresses; dynamic allocation never enters it.
    pub fixed: Option<AddrRange>,
    /// Prefix length of a block: the unit a node claims with one CAS.
    pub block_prefix: u8,
}

/// Pools from which one address each is allocated: host-local's "range set".
/// A dual-stack network has one IPv4 and one IPv6 range set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    pub pools: Vec<Pool>,
}

impl RangeSet {
    pub fn family(&self) -> Family {
        self.pools[0].family()
    }

    /// The pool whose subnet holds `ip`.
    pub fn pool_for(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.subnet.contains(&ip))
    }
}

impl Pool {
    /// The pool's identity in etcd: its subnet, made key-safe.
    pub fn id(&self) -> String {
        pool_id(&self.subnet)
    }

    pub fn family(&self) -> Family {
        Family::of(self.subnet.addr())
    }

    fn network_int(&self) -> u128 {
        to_int(self.subnet.network())
    }

    fn broadcast_int(&self) -> u128 {
        to_int(self.subnet.broadcast())
    }

    pub fn addr(&self, n: u128) -> IpAddr {
        from_int(self.family(), n)
    }

    /// Why `n` may never be handed out, if it may not.
    fn reserved_reason(&self, n: u128) -> Option<&'static str> {
        if n == self.network_int() {
            Some("it is the subnet's network address")
        } else if self.family() == Family::V4 && n == self.broadcast_int() {
            Some("it is the subnet's broadcast address")
        } else if n == to_int(self.gateway) {
            Some("it is the gateway")
        } else if self.exclude.iter().any(|r| r.contains(n)) {
            Some("it is excluded by the pool's exclude list")
        } else {
            None
        }
    }

    /// Whether dynamic allocation may hand out `n`.
    pub fn is_dynamic(&self, n: u128) -> bool {
        self.ranges.iter().any(|r| r.contains(n)) && self.reserved_reason(n).is_none()
    }

    /// Number of addresses dynamic allocation may hand out, computed from the ranges (no walk
    /// over the subnet).
    pub fn dynamic_size(&self) -> u128 {
        let in_ranges = |n: u128| self.ranges.iter().any(|r| r.contains(n));
        let mut size: u128 = self.ranges.iter().fold(0u128, |acc, r| {
            acc.saturating_add((r.last - r.first).saturating_add(1))
        });
        let mut excluded: Vec<AddrRange> = Vec::new();
        for e in &self.exclude {
            for r in &self.ranges {
                let (first, last) = (e.first.max(r.first), e.last.min(r.last));
                if first <= last {
                    excluded.push(AddrRange::new(first, last));
                }
            }
        }
        excluded.sort_by_key(|r| r.first);
        let mut covered_to: Option<u128> = None;
        for r in &excluded {
            let first = covered_to.map_or(r.first, |c| r.first.max(c + 1));
            if first <= r.last {
                size = size.saturating_sub((r.last - first).saturating_add(1));
            }
            covered_to = Some(covered_to.map_or(r.last, |c| c.max(r.last)));
        }
        let mut singles = vec![self.network_int(), to_int(self.gateway)];
        if self.family() == Family::V4 {
            singles.push(self.broadcast_int());
        }
        singles.sort_unstable();
        singles.dedup();
        for n in singles {
            if in_ranges(n) && !self.exclude.iter().any(|e| e.contains(n)) {
                size = size.saturating_sub(1);
            }
        }
        size
    }

    /// Checks that `ip` may be requested exactly (fixed IP, `IP=`, `runtimeConfig.ips`): inside
    /// a dynamic range or the fixed window, and not reserved. The rest of the subnet is
    /// usually routers, VMs or VIPs that etcd knows nothing about.
    pub fn check_exact(&self, ip: IpAddr) -> Result<(), String> {
        if !self.subnet.contains(&ip) {
            return Err(format!("{ip} is outside subnet {}", self.subnet));
        }
        let n = to_int(ip);
        if let Some(reason) = self.reserved_reason(n) {
            return Err(format!("{ip} cannot be assigned: {reason}"));
        }
        let in_window = self.fixed.is_some_and(|w| w.contains(n));
        if !in_window && !self.ranges.iter().any(|r| r.contains(n)) {
            let mut allowed: Vec<String> = self.ranges.iter().map(|r| self.fmt_range(r)).collect();
            allowed.extend(
                self.fixed
                    .iter()
                    .map(|w| format!("fixed {}", self.fmt_range(w))),
            );
            return Err(format!(
                "{ip} is outside the ranges of subnet {} ({})",
                self.subnet,
                allowed.join(", ")
            ));
        }
        Ok(())
    }

    /// The first block at or after `index` that is not wholly excluded: lets a search for a
    /// block with free addresses jump over an excluded /9 instead of walking it.
    pub fn skip_excluded_blocks(&self, mut index: u128) -> u128 {
        'jump: loop {
            let first = self.block_first(index);
            let last = first.saturating_add(self.block_len() - 1);
            for e in &self.exclude {
                if e.first <= first && last <= e.last {
                    let next = self.block_of(e.last).saturating_add(1);
                    if next <= index {
                        return index;
                    }
                    index = next;
                    if self.block_first(index) > to_int(self.subnet.broadcast()) {
                        return index;
                    }
                    continue 'jump;
                }
            }
            return index;
        }
    }

    fn block_bits(&self) -> u8 {
        self.family().bits() - self.block_prefix
    }

    /// Number of addresses in one block.
    pub fn block_len(&self) -> u128 {
        1u128 << self.block_bits()
    }

    /// Index of the block holding address `n`.
    pub fn block_of(&self, n: u128) -> u128 {
        (n - self.network_int()) >> self.block_bits()
    }

    /// First address of block `index`.
    pub fn block_first(&self, index: u128) -> u128 {
        self.network_int() + (index << self.block_bits())
    }

    pub fn block_cidr(&self, index: u128) -> IpNet {
        let first = self.addr(self.block_first(index));
        IpNet::new(first, self.block_prefix).expect("block prefix is validated against the family")
    }

    /// Index of the block whose CIDR is `cidr`, if it is a block of this pool.
    pub fn block_index(&self, cidr: &IpNet) -> Option<u128> {
        if cidr.prefix_len() != self.block_prefix || !self.subnet.contains(cidr) {
            return None;
        }
        let n = to_int(cidr.network());
        Some(self.block_of(n)).filter(|&i| self.block_first(i) == n)
    }

    /// Indices of the blocks that intersect a dynamic range, in order.
    pub fn dynamic_block_spans(&self) -> impl Iterator<Item = (u128, u128)> + '_ {
        self.ranges
            .iter()
            .map(|r| (self.block_of(r.first), self.block_of(r.last)))
    }

    /// What differs between two definitions of one subnet, one line per field.
    pub fn differences(&self, other: &Pool) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |field: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{field}: {a} (stored) vs {b} (requested)"));
            }
        };
        diff(
            "gateway",
            self.gateway.to_string(),
            other.gateway.to_string(),
        );
        diff(
            "ranges",
            self.fmt_ranges(&self.ranges),
            other.fmt_ranges(&other.ranges),
        );
        diff(
            "exclude",
            self.fmt_ranges(&self.exclude),
            other.fmt_ranges(&other.exclude),
        );
        diff(
            "fixed",
            self.fmt_ranges(self.fixed.as_slice()),
            other.fmt_ranges(other.fixed.as_slice()),
        );
        diff(
            "blockSize",
            self.block_prefix.to_string(),
            other.block_prefix.to_string(),
        );
        out
    }

    pub fn fmt_range(&self, r: &AddrRange) -> String {
        format!("{}-{}", self.addr(r.first), self.addr(r.last))
    }

    fn fmt_ranges(&self, ranges: &[AddrRange]) -> String {
        let parts: Vec<String> = ranges.iter().map(|r| self.fmt_range(r)).collect();
        format!("[{}]", parts.join(","))
    }
}

/// The key-safe identity of the pool of `subnet`: `10.0.0.0_22`.
pub fn pool_id(subnet: &IpNet) -> String {
    subnet.to_string().replace('/', "_")
}

/// The CIDR text a pool (or block) id was made from by [`pool_id`]: `10.0.0.0/22`.
pub fn cidr_of_id(id: &str) -> String {
    id.replacen('_', "/", 1)
}

/// Parses and validates the pools of an `ipam` config object.
pub fn parse_range_sets(ipam: &serde_json::Value) -> Result<Vec<RangeSet>, ConfigError> {
    let raw = RawIpam::deserialize(ipam).map_err(|e| invalid("ipam", "", e.to_string()))?;

    let mut raw_sets: Vec<(String, Vec<RawRange>)> = Vec::new();
    let top = raw.top;
    if top.subnet.is_some() || top.range_start.is_some() || top.range_end.is_some() {
        raw_sets.push((String::new(), vec![top]));
    } else if let Some(gw) = &top.gateway {
        return Err(invalid("gateway", gw, "a gateway needs a subnet"));
    }
    for (i, set) in raw.ranges.unwrap_or_default().into_iter().enumerate() {
        if set.is_empty() {
            return Err(invalid(
                format!("ranges[{i}]"),
                "[]",
                "a range set needs at least one range",
            ));
        }
        raw_sets.push((format!("ranges[{i}]"), set));
    }
    if raw_sets.is_empty() {
        return Err(invalid("subnet", "", "required: set subnet or ranges"));
    }

    let mut sets = Vec::new();
    for (path, set) in raw_sets {
        let mut pools: Vec<Pool> = Vec::new();
        for (j, range) in set.into_iter().enumerate() {
            let field = |name: &str| {
                if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}[{j}].{name}")
                }
            };
            let (subnet, dynamic, gateway) = parse_range(&range, &field)?;
            if let Some(first) = pools.first() {
                if first.family() != Family::of(subnet.addr()) {
                    return Err(invalid(
                        field("subnet"),
                        subnet,
                        format!(
                            "mixes {} and {} in one range set; use one range set per family",
                            first.family().name(),
                            Family::of(subnet.addr()).name()
                        ),
                    ));
                }
            }
            match pools.iter_mut().find(|p| p.subnet == subnet) {
                Some(pool) if pool.gateway != gateway => {
                    return Err(invalid(
                        field("gateway"),
                        gateway,
                        format!(
                            "differs from gateway {} of another range in {subnet}",
                            pool.gateway
                        ),
                    ))
                }
                Some(pool) => pool.ranges.push(dynamic),
                None => pools.push(Pool {
                    subnet,
                    gateway,
                    ranges: vec![dynamic],
                    exclude: Vec::new(),
                    fixed: None,
                    block_prefix: 0,
                }),
            }
        }
        sets.push(RangeSet { pools });
    }

    check_overlaps(&sets)?;
    apply_excludes(&mut sets, &raw.exclude)?;
    apply_fixed_window(
        &mut sets,
        raw.fixed_start.as_deref(),
        raw.fixed_end.as_deref(),
    )?;
    apply_block_size(&mut sets, raw.block_size)?;
    for pool in sets.iter_mut().flat_map(|s| s.pools.iter_mut()) {
        pool.ranges.sort_by_key(|r| r.first);
    }
    Ok(sets)
}

fn parse_ip(field: &str, value: &str) -> Result<IpAddr, ConfigError> {
    IpAddr::from_str(value.trim()).map_err(|_| invalid(field, value, "not an IP address"))
}

/// Parses one range: its subnet, its dynamic range and its gateway (defaults as host-local:
/// the range spans the subnet and the gateway is the subnet's first address).
fn parse_range(
    range: &RawRange,
    field: &dyn Fn(&str) -> String,
) -> Result<(IpNet, AddrRange, IpAddr), ConfigError> {
    let text = range
        .subnet
        .as_deref()
        .ok_or_else(|| invalid(field("subnet"), "", "required"))?;
    let subnet = IpNet::from_str(text.trim()).map_err(|_| {
        invalid(
            field("subnet"),
            text,
            "not a CIDR (expected address/prefix)",
        )
    })?;
    if subnet != subnet.trunc() {
        return Err(invalid(
            field("subnet"),
            text,
            format!("has host bits set; the network is {}", subnet.trunc()),
        ));
    }
    let family = Family::of(subnet.addr());
    if subnet.prefix_len() > family.bits() - 2 {
        return Err(invalid(
            field("subnet"),
            text,
            "too small to allocate from (at most /30 or /126)",
        ));
    }

    let in_subnet = |name: &str, value: &str| -> Result<u128, ConfigError> {
        let ip = parse_ip(&field(name), value)?;
        if !subnet.contains(&ip) {
            return Err(invalid(
                field(name),
                value,
                format!("outside subnet {subnet}"),
            ));
        }
        Ok(to_int(ip))
    };
    let network = to_int(subnet.network());
    let last = match family {
        Family::V4 => to_int(subnet.broadcast()) - 1,
        Family::V6 => to_int(subnet.broadcast()),
    };
    let first = match &range.range_start {
        Some(v) => in_subnet("rangeStart", v)?,
        None => network + 1,
    };
    let end = match &range.range_end {
        Some(v) => in_subnet("rangeEnd", v)?,
        None => last,
    };
    if end < first {
        let end_text = range.range_end.as_deref().unwrap_or_default();
        return Err(invalid(
            field("rangeEnd"),
            end_text,
            format!("before rangeStart {}", from_int(family, first)),
        ));
    }
    let gateway = match &range.gateway {
        Some(v) => {
            let n = in_subnet("gateway", v)?;
            if n == network || (family == Family::V4 && n == to_int(subnet.broadcast())) {
                return Err(invalid(
                    field("gateway"),
                    v,
                    "is the subnet's network or broadcast address",
                ));
            }
            from_int(family, n)
        }
        None => from_int(family, network + 1),
    };
    Ok((subnet, AddrRange::new(first, end), gateway))
}

/// No address may belong to two pools, nor two dynamic ranges of one pool.
fn check_overlaps(sets: &[RangeSet]) -> Result<(), ConfigError> {
    let pools: Vec<(usize, &Pool)> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.pools.iter().map(move |p| (i, p)))
        .collect();
    for (a, (set_a, pa)) in pools.iter().enumerate() {
        for (set_b, pb) in &pools[a + 1..] {
            if pa.subnet.contains(&pb.subnet) || pb.subnet.contains(&pa.subnet) {
                return Err(invalid(
                    format!("ranges[{set_b}].subnet"),
                    pb.subnet,
                    format!("overlaps subnet {} of range set {set_a}", pa.subnet),
                ));
            }
        }
        for (i, r) in pa.ranges.iter().enumerate() {
            if let Some(o) = pa.ranges[i + 1..].iter().find(|o| o.overlaps(r)) {
                return Err(invalid(
                    "ranges",
                    pa.fmt_range(o),
                    format!("overlaps range {} of subnet {}", pa.fmt_range(r), pa.subnet),
                ));
            }
        }
    }
    Ok(())
}

fn pool_containing(sets: &mut [RangeSet], ip: IpAddr) -> Option<&mut Pool> {
    sets.iter_mut()
        .flat_map(|s| s.pools.iter_mut())
        .find(|p| p.subnet.contains(&ip))
}

/// `exclude` entries are addresses or CIDRs, each inside one of the network's subnets.
fn apply_excludes(sets: &mut [RangeSet], exclude: &[String]) -> Result<(), ConfigError> {
    for (i, text) in exclude.iter().enumerate() {
        let field = format!("exclude[{i}]");
        let net = match IpNet::from_str(text.trim()) {
            Ok(net) => net.trunc(),
            Err(_) => IpNet::from(
                parse_ip(&field, text)
                    .map_err(|_| invalid(&field, text, "neither an IP address nor a CIDR"))?,
            ),
        };
        let pool = pool_containing(sets, net.network())
            .filter(|p| p.subnet.contains(&net))
            .ok_or_else(|| invalid(&field, text, "not inside any subnet of this network"))?;
        pool.exclude.push(AddrRange::new(
            to_int(net.network()),
            to_int(net.broadcast()),
        ));
    }
    Ok(())
}

/// `fixedStart`/`fixedEnd`: a window of one subnet reserved for fixed IPs.
fn apply_fixed_window(
    sets: &mut [RangeSet],
    start: Option<&str>,
    end: Option<&str>,
) -> Result<(), ConfigError> {
    let (start_text, end_text) = match (start, end) {
        (None, None) => return Ok(()),
        (Some(_), None) => return Err(invalid("fixedEnd", "", "required when fixedStart is set")),
        (None, Some(_)) => return Err(invalid("fixedStart", "", "required when fixedEnd is set")),
        (Some(s), Some(e)) => (s, e),
    };
    let start = parse_ip("fixedStart", start_text)?;
    let end = parse_ip("fixedEnd", end_text)?;
    let pool = pool_containing(sets, start).ok_or_else(|| {
        invalid(
            "fixedStart",
            start_text,
            "not inside any subnet of this network",
        )
    })?;
    if !pool.subnet.contains(&end) {
        return Err(invalid(
            "fixedEnd",
            end_text,
            format!("outside subnet {} of fixedStart", pool.subnet),
        ));
    }
    let window = AddrRange::new(to_int(start), to_int(end));
    if window.last < window.first {
        return Err(invalid(
            "fixedEnd",
            end_text,
            format!("before fixedStart {start}"),
        ));
    }
    if let Some(r) = pool.ranges.iter().find(|r| r.overlaps(&window)) {
        return Err(invalid(
            "fixedStart",
            format!("{start_text}-{end_text}"),
            format!(
                "fixed window overlaps the dynamic range {}; set rangeStart/rangeEnd to leave it out",
                pool.fmt_range(r)
            ),
        ));
    }
    pool.fixed = Some(window);
    Ok(())
}

/// `blockSize` is a block prefix length: /20../32 applies to IPv4 pools, /116../128 to IPv6.
fn apply_block_size(sets: &mut [RangeSet], block_size: Option<u8>) -> Result<(), ConfigError> {
    let family = match block_size {
        None => None,
        Some(b) if BLOCK_PREFIX_V4.contains(&b) => Some(Family::V4),
        Some(b) if BLOCK_PREFIX_V6.contains(&b) => Some(Family::V6),
        Some(b) => {
            return Err(invalid(
                "blockSize",
                b,
                "out of bounds: a block prefix length is 20..32 for IPv4 or 116..128 for IPv6",
            ))
        }
    };
    for pool in sets.iter_mut().flat_map(|s| s.pools.iter_mut()) {
        let prefix = pool.subnet.prefix_len();
        pool.block_prefix = match (block_size, family) {
            (Some(b), Some(f)) if f == pool.family() => {
                if b < prefix {
                    return Err(invalid(
                        "blockSize",
                        b,
                        format!("a /{b} block is larger than subnet {}", pool.subnet),
                    ));
                }
                b
            }
            _ if pool.family() == Family::V4 => DEFAULT_BLOCK_PREFIX_V4.max(prefix),
            _ => DEFAULT_BLOCK_PREFIX_V6.max(prefix),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Vec<RangeSet>, ConfigError> {
        parse_range_sets(&v)
    }

    fn err(v: serde_json::Value) -> ConfigError {
        parse(v).expect_err("config must be rejected")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn kube_ipam_keys_make_one_pool_with_host_local_defaults() {
        let sets = parse(json!({"type": "hostnic-ipam", "subnet": "10.0.0.0/22"})).expect("valid");
        assert_eq!(sets.len(), 1);
        let pool = &sets[0].pools[0];
        assert_eq!(pool.id(), "10.0.0.0_22");
        assert_eq!(pool.gateway, ip("10.0.0.1"));
        assert_eq!(pool.fmt_range(&pool.ranges[0]), "10.0.0.1-10.0.3.254");
        assert_eq!(pool.block_prefix, 26);
    }

    #[test]
    fn network_broadcast_gateway_and_excludes_are_never_dynamic() {
        let sets = parse(json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.8/30", "10.0.0.20"]}))
            .expect("valid");
        let pool = &sets[0].pools[0];
        let dynamic: Vec<u128> = (0..256)
            .map(|i| 0x0a00_0000 + i)
            .filter(|&n| pool.is_dynamic(n))
            .collect();
        assert_eq!(dynamic.len(), 256 - 3 - 4 - 1);
        for reserved in [
            "10.0.0.0",
            "10.0.0.255",
            "10.0.0.1",
            "10.0.0.9",
            "10.0.0.20",
        ] {
            assert!(!pool.is_dynamic(to_int(ip(reserved))), "{reserved}");
            assert!(pool.check_exact(ip(reserved)).is_err(), "{reserved}");
        }
        assert!(pool.check_exact(ip("10.0.0.100")).is_ok());
        let outside = pool.check_exact(ip("10.0.1.1")).expect_err("outside");
        assert!(outside.contains("outside subnet"), "{outside}");
    }

    #[test]
    fn host_local_ranges_make_one_range_set_per_family() {
        let sets = parse(json!({"ranges": [
            [{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.20"},
             {"subnet": "10.2.0.0/24"}],
            [{"subnet": "fd00::/64", "gateway": "fd00::fe"}]
        ]}))
        .expect("valid");
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].pools.len(), 2);
        assert_eq!(sets[0].family(), Family::V4);
        assert_eq!(sets[1].family(), Family::V6);
        assert_eq!(sets[1].pools[0].block_prefix, DEFAULT_BLOCK_PREFIX_V6);
        assert_eq!(sets[1].pools[0].gateway, ip("fd00::fe"));
        assert!(sets[0].pool_for(ip("10.2.0.7")).is_some());
    }

    #[test]
    fn exact_addresses_must_lie_in_a_range_or_the_fixed_window() {
        let sets = parse(
            json!({"subnet": "10.91.0.0/24", "rangeStart": "10.91.0.100",
            "fixedStart": "10.91.0.50", "fixedEnd": "10.91.0.60"}),
        )
        .expect("valid");
        let pool = &sets[0].pools[0];
        assert!(pool.check_exact(ip("10.91.0.55")).is_ok(), "fixed window");
        assert!(pool.check_exact(ip("10.91.0.150")).is_ok(), "dynamic range");
        let e = pool.check_exact(ip("10.91.0.5")).expect_err("between");
        assert!(
            e.contains("outside the ranges") && e.contains("fixed 10.91.0.50-10.91.0.60"),
            "{e}"
        );
    }

    #[test]
    fn wholly_excluded_blocks_are_skipped_in_one_step() {
        let sets = parse(json!({"ranges": [[{"subnet": "fd00::/64"}]], "exclude": ["fd00::/96"]}))
            .expect("valid");
        let pool = &sets[0].pools[0];
        let next = pool.skip_excluded_blocks(0);
        assert_eq!(pool.addr(pool.block_first(next)).to_string(), "fd00::1:0:0");
        assert_eq!(pool.skip_excluded_blocks(next), next);
    }

    #[test]
    fn fixed_window_outside_the_dynamic_range_is_accepted() {
        let sets = parse(
            json!({"subnet": "10.188.0.0/16", "fixedStart": "10.188.0.10",
            "fixedEnd": "10.188.0.255", "rangeStart": "10.188.1.0", "rangeEnd": "10.188.255.254"}),
        )
        .expect("valid");
        let pool = &sets[0].pools[0];
        assert!(!pool.is_dynamic(to_int(ip("10.188.0.10"))));
        assert!(pool.check_exact(ip("10.188.0.10")).is_ok());
        assert!(pool.fixed.is_some());
    }

    #[test]
    fn each_invalid_config_gets_its_own_error_naming_field_and_value() {
        let cases = [
            (json!({"subnet": "10.0.0.0/33"}), "subnet", "not a CIDR"),
            (json!({"subnet": "banana"}), "subnet", "not a CIDR"),
            (json!({"subnet": "10.0.0.5/24"}), "subnet", "host bits"),
            (
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.5"}),
                "rangeStart",
                "outside subnet",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.50", "rangeEnd": "10.0.0.40"}),
                "rangeEnd",
                "before rangeStart",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "gateway": "10.9.0.1"}),
                "gateway",
                "outside subnet",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "gateway": "10.0.0.255"}),
                "gateway",
                "broadcast",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24", "rangeEnd": "10.0.0.100"},
                                   {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.50"}]]}),
                "ranges",
                "overlaps range",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/16"}], [{"subnet": "10.0.3.0/24"}]]}),
                "ranges[1].subnet",
                "overlaps subnet",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]}),
                "ranges[0][1].subnet",
                "mixes IPv4 and IPv6",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "blockSize": 40}),
                "blockSize",
                "out of bounds",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "blockSize": 22}),
                "blockSize",
                "larger than subnet",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "fixedStart": "10.0.0.2", "fixedEnd": "10.0.0.9"}),
                "fixedStart",
                "overlaps the dynamic range",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.100", "fixedStart": "10.0.0.9"}),
                "fixedEnd",
                "required",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "exclude": ["10.1.0.0/24"]}),
                "exclude[0]",
                "not inside",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "exclude": ["x"]}),
                "exclude[0]",
                "neither",
            ),
            (json!({"type": "hostnic-ipam"}), "subnet", "required"),
            (json!({"subnet": "10.0.0.0/31"}), "subnet", "too small"),
            (json!({"subnet": 7}), "ipam", "invalid type"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (config, field, reason) in cases {
            let e = err(config.clone());
            assert_eq!(e.field, field, "{config}: {e}");
            assert!(e.reason.contains(reason), "{config}: {e}");
            assert!(seen.insert(e.to_string()), "duplicate message {e}");
        }
    }

    #[test]
    fn dynamic_size_matches_a_walk_over_the_subnet() {
        for config in [
            json!({"subnet": "10.0.0.0/24"}),
            json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.0/30", "10.0.0.2/31", "10.0.0.200"]}),
            json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.100", "gateway": "10.0.0.1"}),
            json!({"ranges": [[{"subnet": "fd00::/120", "gateway": "fd00::80"}]], "exclude": ["fd00::80/126"]}),
        ] {
            let pool = &parse(config.clone()).expect("valid")[0].pools[0];
            let base = to_int(pool.subnet.network());
            let walked = (0..256).filter(|&i| pool.is_dynamic(base + i)).count() as u128;
            assert_eq!(pool.dynamic_size(), walked, "{config}");
        }
    }

    #[test]
    fn blocks_map_addresses_to_cidrs_and_back() {
        let sets = parse(json!({"subnet": "10.0.0.0/22", "blockSize": 26})).expect("valid");
        let pool = &sets[0].pools[0];
        let n = to_int(ip("10.0.1.70"));
        let b = pool.block_of(n);
        assert_eq!(b, 5);
        let cidr = pool.block_cidr(b);
        assert_eq!(cidr.to_string(), "10.0.1.64/26");
        assert_eq!(pool.block_index(&cidr), Some(5));
        assert_eq!(
            pool.block_index(&"10.0.1.65/26".parse::<IpNet>().expect("literal").trunc()),
            Some(5)
        );
        assert_eq!(
            pool.block_index(&"10.0.1.0/24".parse().expect("literal")),
            None
        );
    }

    #[test]
    fn differences_name_each_field_that_differs() {
        let a = &parse(json!({"subnet": "10.0.0.0/24"})).expect("valid")[0].pools[0];
        let b = &parse(json!({"subnet": "10.0.0.0/24", "gateway": "10.0.0.254", "blockSize": 28}))
            .expect("valid")[0]
            .pools[0];
        let d = a.differences(b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("gateway: 10.0.0.1 (stored) vs 10.0.0.254"));
        assert!(d[1].starts_with("blockSize: 26 (stored) vs 28"));
        assert!(a.differences(a).is_empty());
    }
}

/// The configs shipped in `etc/` and `examples/` are what users copy: they must stay valid.
#[cfg(test)]
mod shipped_configs {
    use super::*;

    fn ipam_of(text: &str) -> serde_json::Value {
        let conf: serde_json::Value = serde_json::from_str(text).expect("shipped config is JSON");
        match conf.get("plugins") {
            Some(plugins) => plugins[0]["ipam"].clone(),
            None => conf["ipam"].clone(),
        }
    }

    #[test]
    fn a_kube_ipam_config_with_its_type_switched_is_accepted() {
        let ipam = ipam_of(include_str!("../../examples/kube-ipam-switch.conf"));
        assert_eq!(ipam["type"], "hostnic-ipam");
        assert!(ipam.get("etcdConfig").is_some() && ipam.get("kubeConfig").is_some());
        let sets = parse_range_sets(&ipam).expect("kube-ipam keys parse");
        let pool = &sets[0].pools[0];
        assert_eq!(pool.subnet.to_string(), "10.188.0.0/16");
        assert!(pool.fixed.is_some(), "fixedStart/fixedEnd kept");
        assert!(pool
            .check_exact("10.188.0.20".parse().expect("literal"))
            .is_ok());
    }

    #[test]
    fn every_shipped_network_config_parses() {
        for (name, text) in [
            (
                "etc/cni/net.d/10-macvlan-hostnic-ipam.conflist",
                include_str!("../../etc/cni/net.d/10-macvlan-hostnic-ipam.conflist"),
            ),
            (
                "examples/dual-stack-host-local-ranges.conf",
                include_str!("../../examples/dual-stack-host-local-ranges.conf"),
            ),
        ] {
            let sets = parse_range_sets(&ipam_of(text)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!sets.is_empty(), "{name}");
        }
    }
}
