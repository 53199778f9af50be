//! Pools from CNI-style `ipam` config: kube-ipam's keys (`subnet`, `rangeStart`, `rangeEnd`,
//! `gateway`, `fixedStart`, `fixedEnd`) and host-local's `ranges` (an array of range sets),
//! plus `exclude` and `blockSize`.
//!
//! Parsing validates everything before anything touches etcd, and every error names the field
//! (as a JSON path into the `ipam` object) and the value it rejected. A pool read back from etcd
//! goes through the same rules ([`Pool::validate`]), and every pool has one normal form
//! ([`Pool::normalise`]) so that two spellings of one definition compare equal.
//!
//! The rules, in short:
//! - a subnet is its own network address, IPv4 /8../30 or IPv6 /48../126, and touches none of
//!   the address space that is never a pod's ([`SPECIAL_V4`], [`SPECIAL_V6`]);
//! - the gateway, every range, exclude and the fixed window lie inside the subnet;
//! - an `exclude` CIDR has no host bits set;
//! - `blockSize` is a block prefix of a family the network has a subnet of, and applies to that
//!   family's pools only; the other family keeps its default;
//! - a config has at most [`MAX_RANGE_SETS`] range sets, [`MAX_RANGES`] ranges and
//!   [`MAX_EXCLUDES`] excludes, so that registering its pools and allocating from them fits in
//!   one etcd transaction;
//! - every pool has an address to hand out, dynamic or in its fixed window.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::addr::{
    from_int, merge_ranges, sorted_contains, subtract_ranges, to_int, total_len, AddrRange, Family,
};

/// Default block prefix length for IPv4 pools: 64 addresses per block.
pub const DEFAULT_BLOCK_PREFIX_V4: u8 = 26;
/// Default block prefix length for IPv6 pools: 64 addresses per block.
pub const DEFAULT_BLOCK_PREFIX_V6: u8 = 122;
/// Accepted block prefix lengths. Blocks hold at most 4096 addresses so that a block's
/// bitmap stays small.
pub const BLOCK_PREFIX_V4: RangeInclusive<u8> = 20..=32;
pub const BLOCK_PREFIX_V6: RangeInclusive<u8> = 116..=128;
/// Host bits of the largest block (4096 addresses). Block arithmetic never uses more, even on a
/// pool that was not validated, so no loop over a block can run longer than 4096 steps.
pub const MAX_BLOCK_BITS: u8 = 32 - *BLOCK_PREFIX_V4.start();
const _: () = assert!(128 - *BLOCK_PREFIX_V6.start() == MAX_BLOCK_BITS);

/// Prefix lengths a pool's subnet may have. The widest are a /8 (the design requires a /8 to
/// allocate as fast as a /24) and a /48 (a site's worth of IPv6, Calico's default pool size);
/// anything wider is a typo such as `0.0.0.0/0`, which would overlap every other pool of its
/// family for good. The narrowest keep at least two addresses besides network and broadcast.
pub const SUBNET_PREFIX_V4: RangeInclusive<u8> = 8..=30;
pub const SUBNET_PREFIX_V6: RangeInclusive<u8> = 48..=126;

/// At most this many range sets in one config: an ADD writes one address per range set plus
/// the attachment record and its index entry in one transaction, guarded by a compare per
/// address, the attachment, its release marker and its record of the earlier layout, and etcd
/// refuses a transaction of more than 128 operations (`--max-txn-ops`). A dual-stack network
/// needs 2.
pub const MAX_RANGE_SETS: usize = 16;
/// At most this many ranges in one config (and so pools, and ranges in one pool): a new
/// network registers each of its pools with one put, and 64 pool puts plus the 19 writes of an
/// ADD of 16 range sets stay under etcd's 128 operations per transaction.
pub const MAX_RANGES: usize = 64;
/// At most this many `exclude` entries in one config (and so excluded ranges in one pool).
/// Excludes are stored inside the pool record, so they cost no transaction operations, but they
/// are scanned for every address considered: 1024 keep a record far below etcd's 1.5 MiB
/// request limit and every scan short.
pub const MAX_EXCLUDES: usize = 1024;

/// Address space that is never a pod's address, with why; a subnet touching any of it is
/// refused. `0.0.0.0/8` is "this network" (RFC 1122), `240.0.0.0/4` is reserved and holds the
/// limited broadcast address.
pub const SPECIAL_V4: [(u128, u128, &str); 5] = [
    (
        0x0000_0000,
        0x00ff_ffff,
        "0.0.0.0/8, unspecified (\"this network\")",
    ),
    (0x7f00_0000, 0x7fff_ffff, "127.0.0.0/8, loopback"),
    (0xa9fe_0000, 0xa9fe_ffff, "169.254.0.0/16, link-local"),
    (0xe000_0000, 0xefff_ffff, "224.0.0.0/4, multicast"),
    (
        0xf000_0000,
        0xffff_ffff,
        "240.0.0.0/4, reserved and broadcast",
    ),
];
/// The IPv6 counterpart of [`SPECIAL_V4`]. IPv4-mapped addresses are refused because
/// `::ffff:10.1.0.0/120` next to `10.1.0.0/24` would hand out one address twice, in two
/// spellings.
pub const SPECIAL_V6: [(u128, u128, &str); 5] = [
    (0, 0, "::/128, unspecified"),
    (1, 1, "::1/128, loopback"),
    (
        0xffff_0000_0000,
        0xffff_ffff_ffff,
        "::ffff:0:0/96, IPv4-mapped (the same host as an IPv4 address)",
    ),
    (
        0xfe80 << 112,
        (0xfebf << 112) | ((1 << 112) - 1),
        "fe80::/10, link-local",
    ),
    (0xff << 120, u128::MAX, "ff00::/8, multicast"),
];

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

/// The address keys of an `ipam` object; anything else in it is left to other layers. The
/// top-level range keys are spelled out rather than flattened from [`RawRange`] so that a type
/// error keeps its JSON path.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    subnet: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
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
    /// Dynamic ranges; in normal form sorted, disjoint and not touching.
    pub ranges: Vec<AddrRange>,
    /// Addresses never handed out, dynamic or exact; in normal form sorted, disjoint and not
    /// touching.
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

/// Why `subnet` cannot be a pool's subnet, if it cannot: host bits, a prefix outside
/// [`SUBNET_PREFIX_V4`]/[`SUBNET_PREFIX_V6`], or an overlap with [`SPECIAL_V4`]/[`SPECIAL_V6`].
pub fn subnet_refusal(subnet: &IpNet) -> Option<String> {
    if *subnet != subnet.trunc() {
        return Some(format!(
            "has host bits set; the network is {}",
            subnet.trunc()
        ));
    }
    let family = Family::of(subnet.addr());
    let (prefixes, special) = match family {
        Family::V4 => (SUBNET_PREFIX_V4, &SPECIAL_V4),
        Family::V6 => (SUBNET_PREFIX_V6, &SPECIAL_V6),
    };
    let prefix = subnet.prefix_len();
    if prefix < *prefixes.start() {
        return Some(format!(
            "wider than /{}, the widest {} subnet a pool may have",
            prefixes.start(),
            family.name()
        ));
    }
    if prefix > *prefixes.end() {
        return Some("too small to allocate from (at most /30 or /126)".into());
    }
    let span = AddrRange::new(to_int(subnet.network()), to_int(subnet.broadcast()));
    special
        .iter()
        .find(|(first, last, _)| span.overlaps(&AddrRange::new(*first, *last)))
        .map(|(_, _, what)| format!("overlaps {what}, which is never a pod address"))
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

    /// Puts the pool in normal form: ranges and excludes sorted, and merged where they overlap
    /// or touch; a /32 and a plain address are one exclude. Two definitions of one pool,
    /// however spelled, are equal after this. A pool record written by an older version may
    /// not be normal: normalise it (after [`Pool::validate`], which sees the ranges as
    /// written) before comparing it with a config.
    pub fn normalise(&mut self) {
        merge_ranges(&mut self.ranges);
        merge_ranges(&mut self.exclude);
    }

    /// The pool in normal form (see [`Pool::normalise`]).
    pub fn normalised(mut self) -> Pool {
        self.normalise();
        self
    }

    /// The pool validated and in normal form: what a pool record read from etcd must go
    /// through before anything uses it.
    pub fn checked(self) -> Result<Pool, ConfigError> {
        self.validate()?;
        Ok(self.normalised())
    }

    /// Applies the rules of a config to a pool that did not come from one (a pool record read
    /// from etcd): the subnet rules of [`subnet_refusal`], the gateway inside and not the
    /// network or broadcast address, every range, exclude and the fixed window inside the
    /// subnet with first <= last, ranges disjoint and at most [`MAX_RANGES`], excludes at most
    /// [`MAX_EXCLUDES`], the fixed window clear of the ranges, the block prefix within
    /// [`BLOCK_PREFIX_V4`]/[`BLOCK_PREFIX_V6`] and not shorter than the subnet's, and an
    /// address to hand out. Fields are named as in the pool record.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let family = self.family();
        if self.ranges.len() > MAX_RANGES {
            return Err(invalid(
                "ranges",
                self.ranges.len(),
                format!("more than {MAX_RANGES} ranges"),
            ));
        }
        if self.exclude.len() > MAX_EXCLUDES {
            return Err(invalid(
                "exclude",
                self.exclude.len(),
                format!("more than {MAX_EXCLUDES} excluded ranges"),
            ));
        }
        if let Some(reason) = subnet_refusal(&self.subnet) {
            return Err(invalid("subnet", self.subnet, reason));
        }
        let span = AddrRange::new(self.network_int(), self.broadcast_int());
        let gw = to_int(self.gateway);
        if !self.subnet.contains(&self.gateway) {
            return Err(invalid(
                "gateway",
                self.gateway,
                format!("outside subnet {}", self.subnet),
            ));
        }
        if gw == span.first || (family == Family::V4 && gw == span.last) {
            return Err(invalid(
                "gateway",
                self.gateway,
                "is the subnet's network or broadcast address",
            ));
        }
        let prefixes = match family {
            Family::V4 => BLOCK_PREFIX_V4,
            Family::V6 => BLOCK_PREFIX_V6,
        };
        if !prefixes.contains(&self.block_prefix) {
            return Err(invalid(
                "blockSize",
                self.block_prefix,
                format!(
                    "out of bounds for an {} pool: a block prefix length is {}..{}",
                    family.name(),
                    prefixes.start(),
                    prefixes.end()
                ),
            ));
        }
        if self.block_prefix < self.subnet.prefix_len() {
            return Err(invalid(
                "blockSize",
                self.block_prefix,
                format!(
                    "a /{} block is larger than subnet {}",
                    self.block_prefix, self.subnet
                ),
            ));
        }
        // Bounds are checked on integers before anything is formatted as an address, so an
        // out-of-family integer is reported as the number it is.
        let inside = |field: String, r: &AddrRange| -> Result<(), ConfigError> {
            let text = || format!("{}-{}", r.first, r.last);
            if r.last < r.first {
                return Err(invalid(
                    field,
                    self.fmt_range(r),
                    "last address before first",
                ));
            }
            if r.first < span.first || r.last > span.last {
                let shown = if r.last > u128::from(u32::MAX) && family == Family::V4 {
                    text()
                } else {
                    self.fmt_range(r)
                };
                return Err(invalid(
                    field,
                    shown,
                    format!("outside subnet {}", self.subnet),
                ));
            }
            Ok(())
        };
        if self.ranges.is_empty() {
            return Err(invalid("ranges", "[]", "a pool needs at least one range"));
        }
        for (i, r) in self.ranges.iter().enumerate() {
            inside(format!("ranges[{i}]"), r)?;
        }
        let mut order: Vec<usize> = (0..self.ranges.len()).collect();
        order.sort_unstable_by_key(|&i| self.ranges[i].first);
        for pair in order.windows(2) {
            let (a, b) = (&self.ranges[pair[0]], &self.ranges[pair[1]]);
            if a.overlaps(b) {
                return Err(invalid(
                    format!("ranges[{}]", pair[1]),
                    self.fmt_range(b),
                    format!("overlaps range {}", self.fmt_range(a)),
                ));
            }
        }
        for (i, r) in self.exclude.iter().enumerate() {
            inside(format!("exclude[{i}]"), r)?;
        }
        if let Some(window) = &self.fixed {
            inside("fixed".into(), window)?;
            if let Some(r) = self.ranges.iter().find(|r| r.overlaps(window)) {
                return Err(invalid(
                    "fixed",
                    self.fmt_range(window),
                    format!("overlaps the dynamic range {}", self.fmt_range(r)),
                ));
            }
        }
        if self.dynamic_size() == 0 && self.fixed_size() == 0 {
            return Err(invalid(
                "ranges",
                self.fmt_ranges(&self.ranges),
                "no address to hand out: every address of the ranges and the fixed window is \
                 excluded, the gateway, or the network or broadcast address",
            ));
        }
        Ok(())
    }

    /// The addresses of `of` that may ever be handed out: neither network, broadcast,
    /// gateway nor excluded. Linear in the ranges and excludes, whatever their form.
    fn unreserved_size(&self, of: &[AddrRange]) -> u128 {
        let mut within = of.to_vec();
        merge_ranges(&mut within);
        let mut exclude = self.exclude.clone();
        merge_ranges(&mut exclude);
        let left = subtract_ranges(&within, &exclude);
        let mut size = total_len(&left);
        let mut singles = vec![self.network_int(), to_int(self.gateway)];
        if self.family() == Family::V4 {
            singles.push(self.broadcast_int());
        }
        singles.sort_unstable();
        singles.dedup();
        for n in singles {
            if sorted_contains(&left, n) {
                size = size.saturating_sub(1);
            }
        }
        size
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
    /// over the subnet). Exact on any pool, normal or not; saturates at `u128::MAX`.
    pub fn dynamic_size(&self) -> u128 {
        self.unreserved_size(&self.ranges)
    }

    /// Number of addresses of the fixed window that may be requested exactly.
    pub fn fixed_size(&self) -> u128 {
        self.unreserved_size(self.fixed.as_slice())
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

    /// Checks that `ip` may be held as a fixed address (the `kube-ipam.ip` annotation): never a
    /// reserved address (network, broadcast, gateway, excluded). With a fixed window, inside it
    /// or a dynamic range, as [`Pool::check_exact`]. Without one, anywhere else in the subnet,
    /// as kube-ipam documents: it tells users to put fixed addresses outside
    /// `rangeStart`-`rangeEnd`, where dynamic allocation never goes (its README's pod asks for
    /// 10.188.0.216 of a range starting higher). Exact requests (`IP=`, `runtimeConfig.ips`)
    /// keep the narrower rule: a runtime's request is not a statement that the address is the
    /// pod's to keep.
    pub fn check_fixed(&self, ip: IpAddr) -> Result<(), String> {
        if self.fixed.is_some() {
            return self.check_exact(ip);
        }
        if !self.subnet.contains(&ip) {
            return Err(format!("{ip} is outside subnet {}", self.subnet));
        }
        match self.reserved_reason(to_int(ip)) {
            Some(reason) => Err(format!("{ip} cannot be assigned: {reason}")),
            None => Ok(()),
        }
    }

    /// The first block at or after `index` that is not wholly excluded: lets a search for a
    /// block with free addresses jump over an excluded /9 instead of walking it. Each jump
    /// passes the end of one exclude for good, so there are at most as many jumps as excludes.
    pub fn skip_excluded_blocks(&self, mut index: u128) -> u128 {
        let broadcast = self.broadcast_int();
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
                    if self.block_first(index) > broadcast {
                        return index;
                    }
                    continue 'jump;
                }
            }
            return index;
        }
    }

    /// Host bits of a block, never more than [`MAX_BLOCK_BITS`] (and never an underflow), even
    /// for a block prefix that [`Pool::validate`] would refuse.
    fn block_bits(&self) -> u8 {
        self.family()
            .bits()
            .saturating_sub(self.block_prefix)
            .min(MAX_BLOCK_BITS)
    }

    /// Number of addresses in one block: at most `2^MAX_BLOCK_BITS`.
    pub fn block_len(&self) -> u128 {
        1u128 << self.block_bits()
    }

    /// Index of the block holding address `n` (block 0 for an address below the subnet).
    pub fn block_of(&self, n: u128) -> u128 {
        n.saturating_sub(self.network_int()) >> self.block_bits()
    }

    /// First address of block `index`, saturating at `u128::MAX` past the end of the line.
    pub fn block_first(&self, index: u128) -> u128 {
        let bits = self.block_bits();
        if index > u128::MAX >> bits {
            return u128::MAX;
        }
        self.network_int().saturating_add(index << bits)
    }

    pub fn block_cidr(&self, index: u128) -> IpNet {
        let first = self.addr(self.block_first(index));
        let prefix = self.family().bits() - self.block_bits();
        IpNet::new(first, prefix).map_or(self.subnet, |net| net.trunc())
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

    /// What differs between two definitions of one subnet, one line per field. Both should be
    /// in normal form (see [`Pool::normalise`]), or two spellings of one set of addresses show
    /// as a difference.
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

/// The JSON at `path` in `root`, shortened for an error message.
fn value_at(root: &serde_json::Value, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut v = Some(root);
    for segment in path.iter() {
        v = match segment {
            Segment::Seq { index } => v.and_then(|v| v.get(index)),
            Segment::Map { key } => v.and_then(|v| v.get(key)),
            Segment::Enum { variant } => v.and_then(|v| v.get(variant)),
            Segment::Unknown => None,
        };
    }
    let text = v.map(|v| v.to_string()).unwrap_or_default();
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Parses and validates the pools of an `ipam` config object. Every pool returned is in normal
/// form and passes [`Pool::validate`].
pub fn parse_range_sets(ipam: &serde_json::Value) -> Result<Vec<RangeSet>, ConfigError> {
    // The plugin's type check first, so a key of the wrong JSON type is reported here in the
    // plugin's words (`ipam.ranges[0][0].subnet`, `5`, "expected a string, found a number");
    // the decoder's path is the fallback for anything that check does not cover.
    hostnic_cni::check_pool_key_types(ipam).map_err(|e| match e {
        hostnic_cni::CniError::InvalidConfig {
            field,
            value,
            reason,
        } => {
            // Cut as `value_at` cuts: a status message carries no whole array.
            let value = match value.char_indices().nth(64) {
                Some((cut, _)) => format!("{}...", &value[..cut]),
                None => value,
            };
            ConfigError {
                field,
                value,
                reason,
            }
        }
        // Not produced by that check (its doc says so); kept in its own words all the same.
        other => invalid("ipam", "", other.to_string()),
    })?;
    let raw: RawIpam = serde_path_to_error::deserialize(ipam).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "ipam".into() } else { path };
        let value = value_at(ipam, e.path());
        invalid(field, value, e.into_inner().to_string())
    })?;

    let mut raw_sets: Vec<(String, Vec<RawRange>)> = Vec::new();
    if raw.subnet.is_some() || raw.range_start.is_some() || raw.range_end.is_some() {
        let top = RawRange {
            subnet: raw.subnet,
            range_start: raw.range_start,
            range_end: raw.range_end,
            gateway: raw.gateway,
        };
        raw_sets.push((String::new(), vec![top]));
    } else if let Some(gw) = &raw.gateway {
        return Err(invalid("gateway", gw, "a gateway needs a subnet"));
    }
    let ranges = raw.ranges.unwrap_or_default();
    if raw_sets.len() + ranges.len() > MAX_RANGE_SETS {
        return Err(invalid(
            "ranges",
            format!("{} range sets", raw_sets.len() + ranges.len()),
            format!("more than {MAX_RANGE_SETS}: one ADD must fit in one etcd transaction"),
        ));
    }
    let total: usize = raw_sets.len() + ranges.iter().map(Vec::len).sum::<usize>();
    if total > MAX_RANGES {
        return Err(invalid(
            "ranges",
            format!("{total} ranges"),
            format!(
                "more than {MAX_RANGES} in all: registering the pools must fit in one etcd \
                 transaction"
            ),
        ));
    }
    if raw.exclude.len() > MAX_EXCLUDES {
        return Err(invalid(
            "exclude",
            format!("{} entries", raw.exclude.len()),
            format!("more than {MAX_EXCLUDES}; exclude a CIDR rather than its addresses"),
        ));
    }
    for (i, set) in ranges.into_iter().enumerate() {
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

    // The path of the `subnet` field that made each pool, for errors about the pool.
    let mut sets = Vec::new();
    let mut subnet_fields: Vec<Vec<String>> = Vec::new();
    for (path, set) in raw_sets {
        let mut pools: Vec<Pool> = Vec::new();
        let mut fields: Vec<String> = Vec::new();
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
                None => {
                    pools.push(Pool {
                        subnet,
                        gateway,
                        ranges: vec![dynamic],
                        exclude: Vec::new(),
                        fixed: None,
                        block_prefix: 0,
                    });
                    fields.push(field("subnet"));
                }
            }
        }
        sets.push(RangeSet { pools });
        subnet_fields.push(fields);
    }

    check_overlaps(&sets, &subnet_fields)?;
    apply_excludes(&mut sets, &raw.exclude)?;
    apply_fixed_window(
        &mut sets,
        raw.fixed_start.as_deref(),
        raw.fixed_end.as_deref(),
    )?;
    apply_block_size(&mut sets, raw.block_size)?;
    for (set, fields) in sets.iter_mut().zip(&subnet_fields) {
        for (pool, field) in set.pools.iter_mut().zip(fields) {
            pool.normalise();
            if pool.dynamic_size() == 0 && pool.fixed_size() == 0 {
                return Err(invalid(
                    field,
                    pool.subnet,
                    "no address to hand out: every address of its ranges is excluded, the \
                     gateway, or the network or broadcast address, and it has no fixed window",
                ));
            }
            // The rules above and validate() are one set of rules; a pool that passes the
            // first but not the second is refused all the same, named by its subnet field.
            pool.validate().map_err(|e| {
                invalid(
                    field,
                    pool.subnet,
                    format!("{} {}: {}", e.field, e.value, e.reason),
                )
            })?;
        }
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
    if let Some(reason) = subnet_refusal(&subnet) {
        return Err(invalid(field("subnet"), text, reason));
    }
    let family = Family::of(subnet.addr());

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
    let broadcast = to_int(subnet.broadcast());
    // The subnet rules leave at least four addresses, so neither bound wraps.
    let last = match family {
        Family::V4 => broadcast.saturating_sub(1),
        Family::V6 => broadcast,
    };
    let first = match &range.range_start {
        Some(v) => in_subnet("rangeStart", v)?,
        None => network.saturating_add(1),
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
            if n == network || (family == Family::V4 && n == broadcast) {
                return Err(invalid(
                    field("gateway"),
                    v,
                    "is the subnet's network or broadcast address",
                ));
            }
            from_int(family, n)
        }
        None => from_int(family, network.saturating_add(1)),
    };
    Ok((subnet, AddrRange::new(first, end), gateway))
}

/// No address may belong to two pools, nor two dynamic ranges of one pool.
fn check_overlaps(sets: &[RangeSet], subnet_fields: &[Vec<String>]) -> Result<(), ConfigError> {
    let pools: Vec<(usize, &Pool, &String)> = sets
        .iter()
        .zip(subnet_fields)
        .enumerate()
        .flat_map(|(i, (s, f))| s.pools.iter().zip(f).map(move |(p, f)| (i, p, f)))
        .collect();
    for (a, (set_a, pa, _)) in pools.iter().enumerate() {
        for (_, pb, field_b) in &pools[a + 1..] {
            if pa.subnet.contains(&pb.subnet) || pb.subnet.contains(&pa.subnet) {
                return Err(invalid(
                    *field_b,
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

/// `exclude` entries are addresses or CIDRs, each inside one of the network's subnets. A CIDR
/// with host bits set is refused: `10.75.0.200/24` would exclude the whole /24, which is
/// hardly what its author meant.
fn apply_excludes(sets: &mut [RangeSet], exclude: &[String]) -> Result<(), ConfigError> {
    for (i, text) in exclude.iter().enumerate() {
        let field = format!("exclude[{i}]");
        let net = match IpNet::from_str(text.trim()) {
            Ok(net) if net != net.trunc() => {
                return Err(invalid(
                    &field,
                    text,
                    format!(
                        "has host bits set: it would exclude all of {}; write {} to exclude \
                         one address",
                        net.trunc(),
                        net.addr()
                    ),
                ))
            }
            Ok(net) => net,
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

/// `blockSize` is a block prefix length: /20../32 applies to the IPv4 pools, /116../128 to the
/// IPv6 pools; the pools of the other family keep their default. One `blockSize` can only
/// speak for one family, and a `blockSize` for a family the network has no subnet of is
/// refused rather than ignored.
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
    if let (Some(b), Some(f)) = (block_size, family) {
        if !sets.iter().any(|s| s.family() == f) {
            return Err(invalid(
                "blockSize",
                b,
                format!(
                    "an {} block prefix, but this network has no {} subnet",
                    f.name(),
                    f.name()
                ),
            ));
        }
    }
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
    fn fixed_addresses_lie_anywhere_unreserved_without_a_window_and_in_it_or_a_range_with_one() {
        // kube-ipam's documented layout: no fixed window, fixed addresses below the range.
        let sets = parse(
            json!({"subnet": "10.188.0.0/16", "rangeStart": "10.188.1.0",
            "rangeEnd": "10.188.255.254", "gateway": "10.188.0.1", "exclude": ["10.188.0.250"]}),
        )
        .expect("valid");
        let pool = &sets[0].pools[0];
        for ok in ["10.188.0.216", "10.188.0.2", "10.188.1.0", "10.188.200.7"] {
            assert!(pool.check_fixed(ip(ok)).is_ok(), "{ok}");
        }
        assert!(!pool.is_dynamic(to_int(ip("10.188.0.216"))));
        let e = pool
            .check_exact(ip("10.188.0.216"))
            .expect_err("IP= keeps its rule");
        assert!(e.contains("outside the ranges"), "{e}");
        for (bad, why) in [
            ("10.188.0.0", "network address"),
            ("10.188.255.255", "broadcast address"),
            ("10.188.0.1", "the gateway"),
            ("10.188.0.250", "excluded"),
            ("10.189.0.5", "outside subnet 10.188.0.0/16"),
        ] {
            let e = pool.check_fixed(ip(bad)).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        // With a window, fixed addresses keep to it and the ranges, as exact ones do.
        let sets = parse(
            json!({"subnet": "10.91.0.0/24", "rangeStart": "10.91.0.100",
            "fixedStart": "10.91.0.50", "fixedEnd": "10.91.0.60"}),
        )
        .expect("valid");
        let pool = &sets[0].pools[0];
        assert!(pool.check_fixed(ip("10.91.0.55")).is_ok());
        assert!(pool.check_fixed(ip("10.91.0.150")).is_ok());
        let e = pool.check_fixed(ip("10.91.0.5")).expect_err("between");
        assert!(e.contains("fixed 10.91.0.50-10.91.0.60"), "{e}");
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

    /// A key of the wrong JSON type reads the same from the daemon as from the plugin: the same
    /// path, value (up to the daemon's cut of a long one) and reason; each side keeps its own
    /// error type around them.
    #[test]
    fn a_wrong_json_type_is_reported_as_the_plugin_reports_it() {
        let cases = [
            (
                json!({"ranges": [[{"subnet": 5}]]}),
                "ipam.ranges[0][0].subnet",
                "5",
                "expected a string, found a number",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "gateway": ["10.0.0.1"]}),
                "ipam.gateway",
                "[\"10.0.0.1\"]",
                "expected a string, found an array",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.5", 6]}),
                "ipam.exclude[1]",
                "6",
                "expected a string, found a number",
            ),
            (
                json!({"ranges": {"subnet": "10.0.0.0/24"}}),
                "ipam.ranges",
                "{\"subnet\":\"10.0.0.0/24\"}",
                "expected an array, found an object",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "blockSize": -1}),
                "ipam.blockSize",
                "-1",
                "expected a prefix length, an integer from 0 to 255",
            ),
            (
                json!("10.0.0.0/24"),
                "ipam",
                "\"10.0.0.0/24\"",
                "expected an object",
            ),
        ];
        for (ipam, field, value, reason) in cases {
            let daemon = err(ipam.clone());
            assert_eq!(
                (daemon.field.as_str(), daemon.value.as_str()),
                (field, value),
                "{daemon}"
            );
            assert!(daemon.reason.starts_with(reason), "{daemon}");
            let plugin = hostnic_cni::check_pool_key_types(&ipam).expect_err("refused");
            let hostnic_cni::CniError::InvalidConfig {
                field: plugin_field,
                value: plugin_value,
                reason: plugin_reason,
            } = &plugin
            else {
                panic!("{plugin:?}");
            };
            assert_eq!(
                (plugin_field, plugin_value, plugin_reason),
                (&daemon.field, &daemon.value, &daemon.reason)
            );
            assert_eq!(plugin.code(), 7);
        }
        // A value of the right type is still the daemon's to judge, with its own field names.
        assert_eq!(err(json!({"subnet": "10.0.0.0/33"})).field, "subnet");
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
                "ranges[1][0].subnet",
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
            (
                json!({"subnet": 7}),
                "ipam.subnet",
                "expected a string, found a number",
            ),
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

    #[test]
    fn subnets_that_are_never_pod_addresses_are_refused() {
        let refused = [
            ("0.0.0.0/0", "wider than /8"),
            ("10.0.0.0/7", "wider than /8"),
            ("0.0.0.0/24", "unspecified"),
            ("127.0.0.0/24", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/24", "multicast"),
            ("240.0.0.0/8", "reserved"),
            ("255.255.255.0/24", "broadcast"),
            ("::/0", "wider than /48"),
            ("fd00::/40", "wider than /48"),
            ("::/64", "unspecified"),
            ("::ffff:10.1.0.0/120", "IPv4-mapped"),
            ("fe80::/64", "link-local"),
            ("ff02::/64", "multicast"),
        ];
        for (subnet, reason) in refused {
            let e = err(json!({"ranges": [[{"subnet": subnet}]]}));
            assert_eq!(e.field, "ranges[0][0].subnet", "{subnet}: {e}");
            assert_eq!(e.value, subnet);
            assert!(e.reason.contains(reason), "{subnet}: {e}");
        }
        for subnet in ["10.0.0.0/8", "100.64.0.0/10", "fd00::/48", "2001:db8::/64"] {
            parse(json!({"ranges": [[{"subnet": subnet}]]})).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn an_exclude_cidr_with_host_bits_names_the_network_it_would_mean() {
        let e = err(json!({"subnet": "10.75.0.0/24", "exclude": ["10.75.0.200/24"]}));
        assert_eq!(e.field, "exclude[0]");
        assert!(
            e.reason.contains("10.75.0.0/24") && e.reason.contains("write 10.75.0.200"),
            "{e}"
        );
    }

    #[test]
    fn block_size_applies_to_its_family_only_and_needs_a_subnet_of_it() {
        let e = err(json!({"subnet": "10.0.0.0/24", "blockSize": 120}));
        assert_eq!(e.field, "blockSize");
        assert!(e.reason.contains("no IPv6 subnet"), "{e}");
        let e = err(json!({"ranges": [[{"subnet": "fd00::/64"}]], "blockSize": 28}));
        assert!(e.reason.contains("no IPv4 subnet"), "{e}");
        let sets = parse(
            json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}]],
            "blockSize": 28}),
        )
        .expect("valid");
        assert_eq!(sets[0].pools[0].block_prefix, 28);
        assert_eq!(sets[1].pools[0].block_prefix, DEFAULT_BLOCK_PREFIX_V6);
    }

    #[test]
    fn configs_larger_than_one_transaction_are_refused() {
        let set = |i: usize| json!([{"subnet": format!("10.{i}.0.0/24")}]);
        let sets: Vec<_> = (0..MAX_RANGE_SETS).map(set).collect();
        parse(json!({ "ranges": sets })).expect("the largest config allowed");
        let sets: Vec<_> = (0..=MAX_RANGE_SETS).map(set).collect();
        let e = err(json!({ "ranges": sets }));
        assert_eq!(e.field, "ranges");
        assert!(e.reason.contains("etcd transaction"), "{e}");

        let ranges: Vec<_> = (0..=MAX_RANGES)
            .map(|i| json!({"subnet": format!("10.{i}.0.0/24")}))
            .collect();
        let e = err(json!({ "ranges": [ranges] }));
        assert!(e.value.contains("65 ranges"), "{e}");

        let exclude: Vec<String> = (0..=MAX_EXCLUDES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let e = err(json!({"subnet": "10.0.0.0/16", "exclude": exclude}));
        assert_eq!(e.field, "exclude");
    }

    #[test]
    fn a_pool_with_no_address_to_hand_out_is_refused() {
        let e = err(json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.0/24"]}));
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("subnet", "10.0.0.0/24")
        );
        assert!(e.reason.contains("no address to hand out"), "{e}");
        let e = err(
            json!({"ranges": [[{"subnet": "10.0.0.0/30", "rangeStart": "10.0.0.1",
            "rangeEnd": "10.0.0.1"}]]}),
        );
        assert_eq!(e.field, "ranges[0][0].subnet");
        let fixed_only = parse(json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.100",
            "exclude": ["10.0.0.96/27", "10.0.0.128/25"],
            "fixedStart": "10.0.0.10", "fixedEnd": "10.0.0.20"}))
        .expect("a fixed window is enough");
        assert_eq!(fixed_only[0].pools[0].dynamic_size(), 0);
        assert_eq!(fixed_only[0].pools[0].fixed_size(), 11);
    }

    #[test]
    fn one_pool_however_it_is_spelled() {
        let pool = |v| parse(v).expect("valid")[0].pools[0].clone();
        let a = pool(json!({"subnet": "10.74.0.0/24", "exclude": ["10.74.0.50", "10.74.0.60"]}));
        let b = pool(json!({"subnet": "10.74.0.0/24",
            "exclude": ["10.74.0.60/32", "10.74.0.50", "10.74.0.50"]}));
        assert_eq!(a, b);
        assert!(a.differences(&b).is_empty());

        let split = pool(json!({"ranges": [[
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.21", "rangeEnd": "10.0.0.30"},
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.20"}]],
            "exclude": ["10.0.0.12/31", "10.0.0.14/31", "10.0.0.13"]}));
        let whole = pool(json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10",
            "rangeEnd": "10.0.0.30", "exclude": ["10.0.0.12/30"]}));
        assert_eq!(split, whole);

        // A record stored unnormalised by an older version compares equal once checked.
        let mut stored = whole.clone();
        stored.ranges = vec![
            AddrRange::new(to_int(ip("10.0.0.21")), to_int(ip("10.0.0.30"))),
            AddrRange::new(to_int(ip("10.0.0.10")), to_int(ip("10.0.0.20"))),
        ];
        stored.exclude = vec![
            AddrRange::new(to_int(ip("10.0.0.14")), to_int(ip("10.0.0.15"))),
            AddrRange::new(to_int(ip("10.0.0.12")), to_int(ip("10.0.0.13"))),
            AddrRange::new(to_int(ip("10.0.0.13")), to_int(ip("10.0.0.13"))),
        ];
        assert_ne!(stored, whole);
        assert_eq!(stored.checked().expect("valid record"), whole);
    }

    #[test]
    fn a_wrong_json_type_names_its_path() {
        let cases = [
            (json!({"subnet": 5}), "ipam.subnet", "5"),
            (
                json!({"ranges": [[{"subnet": 5}]]}),
                "ipam.ranges[0][0].subnet",
                "5",
            ),
            (
                json!({"ranges": [{"subnet": "10.0.0.0/24"}]}),
                "ipam.ranges[0]",
                "{\"subnet\":\"10.0.0.0/24\"}",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.9", true]}),
                "ipam.exclude[1]",
                "true",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "blockSize": 300}),
                "ipam.blockSize",
                "300",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "gateway": vec!["x"; 40]}),
                "ipam.gateway",
                "[\"x\",\"x\",",
            ),
            (json!(5), "ipam", "5"),
        ];
        for (config, field, value) in cases {
            let e = err(config.clone());
            assert_eq!(e.field, field, "{config}: {e}");
            assert!(e.value.starts_with(value), "{config}: {e}");
            assert!(e.value.len() < 80, "{config}: {e}");
            assert!(e.reason.starts_with("expected"), "{config}: {e}");
        }
    }

    fn valid_pool() -> Pool {
        parse(json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.100",
            "fixedStart": "10.0.0.10", "fixedEnd": "10.0.0.20", "exclude": ["10.0.0.200"]}))
        .expect("valid")[0]
            .pools[0]
            .clone()
    }

    #[test]
    fn an_invalid_pool_record_is_refused_by_validate() {
        valid_pool().validate().expect("a parsed pool is valid");
        let r = |a: &str, b: &str| AddrRange::new(to_int(ip(a)), to_int(ip(b)));
        type Mutation = Box<dyn Fn(&mut Pool)>;
        let cases: Vec<(Mutation, &str, &str)> = vec![
            (
                Box::new(|p| p.block_prefix = 40),
                "blockSize",
                "out of bounds",
            ),
            (
                Box::new(|p| p.block_prefix = 120),
                "blockSize",
                "out of bounds",
            ),
            (
                Box::new(|p| p.block_prefix = 22),
                "blockSize",
                "larger than subnet",
            ),
            (
                Box::new(|p| p.subnet = "0.0.0.0/0".parse().expect("literal")),
                "subnet",
                "wider",
            ),
            (
                Box::new(|p| p.subnet = "10.0.0.5/24".parse().expect("literal")),
                "subnet",
                "host bits",
            ),
            (
                Box::new(|p| p.subnet = "127.0.0.0/24".parse().expect("literal")),
                "subnet",
                "loopback",
            ),
            (
                Box::new(|p| p.gateway = ip("10.0.1.1")),
                "gateway",
                "outside",
            ),
            (
                Box::new(|p| p.gateway = ip("fd00::1")),
                "gateway",
                "outside",
            ),
            (
                Box::new(|p| p.gateway = ip("10.0.0.255")),
                "gateway",
                "broadcast",
            ),
            (
                Box::new(move |p| p.ranges = vec![r("10.0.0.100", "10.0.1.5")]),
                "ranges[0]",
                "outside",
            ),
            (
                Box::new(|p| p.ranges = vec![AddrRange::new(0x0a00_0064, u128::MAX)]),
                "ranges[0]",
                "outside",
            ),
            (
                Box::new(move |p| p.ranges = vec![r("10.0.0.99", "10.0.0.98")]),
                "ranges[0]",
                "before first",
            ),
            (
                Box::new(move |p| p.ranges.push(r("10.0.0.150", "10.0.0.160"))),
                "ranges[1]",
                "overlaps range",
            ),
            (Box::new(|p| p.ranges.clear()), "ranges", "at least one"),
            (
                Box::new(move |p| p.ranges = vec![r("10.0.0.1", "10.0.0.1"); MAX_RANGES + 1]),
                "ranges",
                "more than",
            ),
            (
                Box::new(move |p| p.exclude = vec![r("10.0.0.1", "10.0.0.1"); MAX_EXCLUDES + 1]),
                "exclude",
                "more than",
            ),
            (
                Box::new(move |p| p.exclude.push(r("10.0.0.250", "10.0.1.0"))),
                "exclude[1]",
                "outside",
            ),
            (
                Box::new(move |p| p.fixed = Some(r("10.0.0.90", "10.0.0.100"))),
                "fixed",
                "overlaps",
            ),
            (
                Box::new(move |p| p.fixed = Some(r("10.0.0.20", "10.0.0.10"))),
                "fixed",
                "before first",
            ),
            (
                Box::new(move |p| {
                    p.fixed = None;
                    p.exclude = vec![r("10.0.0.0", "10.0.0.255")];
                }),
                "ranges",
                "no address",
            ),
        ];
        for (i, (mutate, field, reason)) in cases.into_iter().enumerate() {
            let mut pool = valid_pool();
            mutate(&mut pool);
            let e = pool.clone().checked().expect_err("invalid record");
            assert_eq!(e.field, field, "case {i}: {e}");
            assert!(e.reason.contains(reason), "case {i}: {e}");
            // Whatever validate says, the arithmetic must not panic or run away.
            exercise(&pool);
        }
    }

    /// Calls every arithmetic function of a pool at its extremes.
    fn exercise(pool: &Pool) {
        assert!(pool.block_len() <= 1 << MAX_BLOCK_BITS);
        let _ = pool.dynamic_size();
        let _ = pool.fixed_size();
        for n in [
            0,
            1,
            to_int(pool.subnet.network()),
            u128::from(u32::MAX),
            u128::MAX,
        ] {
            let _ = pool.block_of(n);
            let _ = pool.block_first(n);
            let _ = pool.block_cidr(n);
            let _ = pool.skip_excluded_blocks(n);
            let _ = pool.is_dynamic(n);
            let _ = pool.addr(n);
        }
        let _ = pool.block_index(&pool.subnet);
        let _: Vec<_> = pool.dynamic_block_spans().collect();
        let _ = pool.check_exact(pool.gateway);
        let _ = pool.differences(pool);
        let _ = pool.clone().normalised();
    }

    #[test]
    fn the_block_arithmetic_of_an_unvalidated_pool_neither_panics_nor_runs_away() {
        // The record that hung every daemon: blockSize 40 on an IPv4 pool.
        let mut pool = valid_pool();
        pool.block_prefix = 40;
        assert_eq!(pool.block_len(), 1);
        exercise(&pool);
        for (subnet, prefix) in [
            ("::/0", 0u8),
            ("::/0", 255),
            ("0.0.0.0/0", 0),
            ("10.0.0.0/24", 8),
        ] {
            let mut p = valid_pool();
            p.subnet = subnet.parse().expect("literal");
            p.block_prefix = prefix;
            p.ranges = vec![AddrRange::new(0, u128::MAX), AddrRange::new(u128::MAX, 0)];
            p.exclude = vec![AddrRange::new(0, u128::MAX), AddrRange::new(5, 1)];
            p.fixed = Some(AddrRange::new(u128::MAX, u128::MAX));
            exercise(&p);
            assert!(p.validate().is_err());
        }
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

    /// kube-ipam's README config (only `type` switched; the README's JSON lacks a comma after
    /// `kubeConfig`, added here) and its example pod's annotation, 10.188.0.216: outside the
    /// dynamic range, and there is no fixed window.
    #[test]
    fn kube_ipam_readme_config_takes_its_example_pods_fixed_address() {
        let ipam = ipam_of(include_str!("../../examples/kube-ipam-readme.conf"));
        let sets = parse_range_sets(&ipam).expect("kube-ipam's README config parses");
        let pool = &sets[0].pools[0];
        assert_eq!(pool.fixed, None);
        let deployment = include_str!("../../examples/kube-ipam-fixed-ip-deployment.yaml");
        let annotation = |key: &str| -> String {
            let line = deployment
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("{key} in the example"));
            line.trim_matches('"').to_string()
        };
        let fixed: IpAddr = annotation("kube-ipam.ip").parse().expect("an address");
        assert_eq!(fixed, "10.188.0.216".parse::<IpAddr>().expect("literal"));
        assert!(pool.check_fixed(fixed).is_ok());
        assert!(
            !pool.is_dynamic(to_int(fixed)),
            "dynamic picks never reach it"
        );
        assert!(
            pool.check_exact(fixed).is_err(),
            "IP= keeps the narrower rule"
        );
        assert_eq!(annotation("kube-ipam.gateway"), pool.gateway.to_string());
        assert_eq!(
            annotation("kube-ipam.netmask"),
            pool.subnet.netmask().to_string()
        );
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

/// Properties over arbitrary configs and arbitrary pools: whatever comes in, parsing and the
/// pool arithmetic neither panic nor run away, and what is accepted is valid and normal.
#[cfg(test)]
mod properties {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    use super::*;

    /// Time one call may take on a loaded machine; a runaway loop takes far longer.
    const BUDGET: Duration = Duration::from_secs(2);

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 500,
            ..ProptestConfig::default()
        }
    }

    /// IPv4 addresses near the pools the CIDRs below make, and at the special places.
    fn v4() -> impl Strategy<Value = Ipv4Addr> {
        let near = (0u8..2, 0u8..2, any::<u8>()).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d));
        let special = (
            prop::sample::select(vec![0u8, 127, 169, 224, 240, 255]),
            any::<u8>(),
            any::<u8>(),
        )
            .prop_map(|(a, c, d)| Ipv4Addr::new(a, if a == 169 { 254 } else { 0 }, c, d));
        prop_oneof![
            8 => near,
            1 => special,
            1 => any::<u32>().prop_map(Ipv4Addr::from),
        ]
    }

    fn v6() -> impl Strategy<Value = Ipv6Addr> {
        let head = prop_oneof![
            6 => Just(0xfd00u16),
            1 => prop::sample::select(vec![0xfe80u16, 0xff02, 0, 0x2001]),
        ];
        (head, 0u16..2, 0u16..2, any::<u16>()).prop_map(|(h, a, b, c)| {
            if h == 0 && a == 1 {
                // ::ffff:10.x.y.z, the IPv4-mapped spelling.
                Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, c)
            } else {
                Ipv6Addr::new(h, 0, 0, a, 0, 0, b, c)
            }
        })
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![3 => v4().prop_map(IpAddr::V4), 1 => v6().prop_map(IpAddr::V6)]
    }

    /// CIDRs of both families: with and without host bits, from /0 to the full length.
    fn cidr() -> impl Strategy<Value = String> {
        let v4 = (
            v4(),
            prop_oneof![6 => prop::sample::select(vec![8u8, 16, 22, 24, 26, 28, 30]), 1 => 0u8..=33],
            prop::bool::weighted(0.9),
        )
            .prop_map(|(a, p, trunc)| match ipnet::Ipv4Net::new(a, p) {
                Ok(n) if trunc => n.trunc().to_string(),
                _ => format!("{a}/{p}"),
            });
        let v6 = (
            v6(),
            prop_oneof![6 => prop::sample::select(vec![48u8, 64, 112, 120, 126]), 1 => 0u8..=129],
            prop::bool::weighted(0.9),
        )
            .prop_map(|(a, p, trunc)| match ipnet::Ipv6Net::new(a, p) {
                Ok(n) if trunc => n.trunc().to_string(),
                _ => format!("{a}/{p}"),
            });
        prop_oneof![3 => v4, 1 => v6]
    }

    /// A JSON value of the wrong type now and then.
    fn or_junk(s: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
        prop_oneof![
            60 => s,
            1 => prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                Just(json!([])),
                Just(json!({})),
                "[a-z0-9./:]{0,12}".prop_map(Value::from),
            ],
        ]
    }

    fn address_text() -> impl Strategy<Value = Value> {
        or_junk(ip().prop_map(|a| Value::from(a.to_string())))
    }

    fn range_object() -> impl Strategy<Value = Value> {
        (
            prop::option::weighted(0.9, or_junk(cidr().prop_map(Value::from))),
            prop::option::weighted(0.3, address_text()),
            prop::option::weighted(0.3, address_text()),
            prop::option::weighted(0.3, address_text()),
        )
            .prop_map(|(subnet, start, end, gateway)| {
                let mut m = Map::new();
                let keys = ["subnet", "rangeStart", "rangeEnd", "gateway"];
                for (k, v) in keys.into_iter().zip([subnet, start, end, gateway]) {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                Value::Object(m)
            })
    }

    fn exclude_entry() -> impl Strategy<Value = Value> {
        or_junk(prop_oneof![
            ip().prop_map(|a| Value::from(a.to_string())),
            cidr().prop_map(Value::from),
        ])
    }

    fn ipam() -> impl Strategy<Value = Value> {
        let top = prop_oneof![3 => range_object(), 1 => Just(json!({}))];
        let set = prop_oneof![
            20 => prop::collection::vec(range_object(), 1..3),
            1 => Just(Vec::new()),
        ];
        let ranges = prop::option::of(or_junk(
            prop::collection::vec(set, 1..3).prop_map(|sets| json!(sets)),
        ));
        let exclude = prop::option::weighted(
            0.5,
            prop_oneof![
                20 => prop::collection::vec(exclude_entry(), 0..6).prop_map(Value::from),
                1 => prop::collection::vec(exclude_entry(), 1000..1100).prop_map(Value::from),
            ],
        );
        let block = prop::option::weighted(
            0.4,
            or_junk(
                prop_oneof![
                    4 => prop_oneof![20u8..=32, 116u8..=128],
                    1 => any::<u8>(),
                ]
                .prop_map(Value::from),
            ),
        );
        (
            top,
            ranges,
            exclude,
            prop::option::weighted(0.2, address_text()),
            prop::option::weighted(0.2, address_text()),
            block,
        )
            .prop_map(|(top, ranges, exclude, fixed_start, fixed_end, block)| {
                let mut m = match top {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                let keys = ["ranges", "exclude", "fixedStart", "fixedEnd", "blockSize"];
                for (k, v) in keys
                    .into_iter()
                    .zip([ranges, exclude, fixed_start, fixed_end, block])
                {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                m.insert("type".into(), "hostnic-ipam".into());
                Value::Object(m)
            })
    }

    /// A config whose addresses are drawn inside (or just past) its subnets, so that a good
    /// share is accepted: offsets from the network, excludes of any prefix, host bits now and
    /// then, a dual-stack range set, a blockSize of either family.
    fn plausible_ipam() -> impl Strategy<Value = Value> {
        let v4 = (0u8..4, 16u8..=30);
        let v6 = prop::option::weighted(0.4, (0u16..4, 64u8..=126));
        (v4, v6).prop_flat_map(|((b, p4), v6)| {
            let net4 = u32::from(Ipv4Addr::new(10, b, 0, 0));
            let size4 = 1u64 << (32 - p4);
            let at4 = move |o: u64| Ipv4Addr::from(net4.wrapping_add(o as u32)).to_string();
            let offset = move || 0..size4 + 4;
            let exclude =
                (offset(), 24u8..=32, prop::bool::weighted(0.9)).prop_map(move |(o, p, trunc)| {
                    let net = ipnet::Ipv4Net::new(Ipv4Addr::from(net4.wrapping_add(o as u32)), p)
                        .unwrap_or_default();
                    if p == 32 && trunc {
                        net.addr().to_string()
                    } else if trunc {
                        net.trunc().to_string()
                    } else {
                        net.to_string()
                    }
                });
            (
                prop::option::weighted(0.5, offset()),
                prop::option::weighted(0.5, offset()),
                prop::option::weighted(0.3, offset()),
                prop::collection::vec(exclude, 0..5),
                prop::option::weighted(0.2, (offset(), 0u64..16)),
                prop::option::weighted(
                    0.4,
                    prop_oneof![BLOCK_PREFIX_V4, BLOCK_PREFIX_V6, any::<u8>()],
                ),
                Just(v6),
            )
                .prop_map(move |(start, end, gw, exclude, fixed, block, v6)| {
                    let mut range = Map::new();
                    range.insert("subnet".into(), format!("{}/{p4}", at4(0)).into());
                    for (k, v) in [("rangeStart", start), ("rangeEnd", end), ("gateway", gw)] {
                        if let Some(o) = v {
                            range.insert(k.into(), at4(o).into());
                        }
                    }
                    let mut sets = vec![json!([range])];
                    if let Some((h, p6)) = v6 {
                        let net =
                            ipnet::Ipv6Net::new(Ipv6Addr::new(0xfd00, h, 0, 0, 0, 0, 0, 0), p6)
                                .unwrap_or_default();
                        sets.push(json!([{"subnet": net.to_string()}]));
                    }
                    let mut ipam =
                        json!({"type": "hostnic-ipam", "ranges": sets, "exclude": exclude});
                    if let Some((o, len)) = fixed {
                        ipam["fixedStart"] = at4(o).into();
                        ipam["fixedEnd"] = at4(o + len).into();
                    }
                    if let Some(b) = block {
                        ipam["blockSize"] = b.into();
                    }
                    ipam
                })
        })
    }

    /// A pool with any field any value: subnets of every prefix, integers near the subnet or
    /// anywhere on the line, block prefixes 0..=255.
    fn any_pool() -> impl Strategy<Value = Pool> {
        let subnet = prop_oneof![
            1 => (any::<u32>(), 0u8..=32).prop_map(|(a, p)| IpNet::from(
                ipnet::Ipv4Net::new(Ipv4Addr::from(a), p).unwrap_or_default()
            )),
            4 => (0u32..4, 16u8..=30).prop_map(|(b, p)| IpNet::from(
                ipnet::Ipv4Net::new(Ipv4Addr::new(10, b as u8, 0, 0), p)
                    .unwrap_or_default()
                    .trunc()
            )),
            1 => (any::<u128>(), 0u8..=128).prop_map(|(a, p)| IpNet::from(
                ipnet::Ipv6Net::new(Ipv6Addr::from(a), p).unwrap_or_default()
            )),
            4 => (0u128..4, 48u8..=126).prop_map(|(b, p)| IpNet::from(
                ipnet::Ipv6Net::new(Ipv6Addr::from((0xfd00 << 112) | (b << 64)), p)
                    .unwrap_or_default()
                    .trunc()
            )),
        ];
        subnet.prop_flat_map(|subnet| {
            let base = to_int(subnet.network());
            let host_bits = Family::of(subnet.addr()).bits() - subnet.prefix_len();
            let span = 1u128 << host_bits.min(12);
            let n = move || {
                prop_oneof![
                    12 => (0..span).prop_map(move |o| base.saturating_add(o)),
                    1 => any::<u128>(),
                    1 => Just(u128::MAX),
                ]
            };
            let range = move || {
                prop_oneof![
                    8 => (n(), 0u128..64).prop_map(|(a, l)| AddrRange::new(a, a.saturating_add(l))),
                    1 => (n(), n()).prop_map(|(a, b)| AddrRange::new(a, b)),
                ]
            };
            let gateway = n().prop_map(move |g| from_int(Family::of(subnet.addr()), g));
            let family_prefixes = match Family::of(subnet.addr()) {
                Family::V4 => BLOCK_PREFIX_V4,
                Family::V6 => BLOCK_PREFIX_V6,
            };
            let block_prefix = prop_oneof![
                4 => family_prefixes,
                1 => any::<u8>(),
            ];
            let ranges = prop_oneof![
                8 => prop::collection::vec(range(), 1..3),
                1 => prop::collection::vec(range(), 0..70),
            ];
            (
                gateway,
                ranges,
                prop::collection::vec(range(), 0..12),
                prop::option::weighted(0.2, range()),
                block_prefix,
            )
                .prop_map(move |(gateway, ranges, exclude, fixed, block_prefix)| {
                    Pool {
                        subnet,
                        gateway,
                        ranges,
                        exclude,
                        fixed,
                        block_prefix,
                    }
                })
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn parsing_any_config_is_quick_and_what_it_accepts_is_valid_and_normal(
            ipam in prop_oneof![ipam(), plausible_ipam()]
        ) {
            let start = Instant::now();
            let parsed = parse_range_sets(&ipam);
            prop_assert!(start.elapsed() < BUDGET, "took {:?}", start.elapsed());
            match parsed {
                Ok(sets) => {
                    prop_assert!(!sets.is_empty() && sets.len() <= MAX_RANGE_SETS);
                    for pool in sets.iter().flat_map(|s| &s.pools) {
                        prop_assert_eq!(pool.validate(), Ok(()));
                        prop_assert_eq!(&pool.clone().normalised(), pool);
                        prop_assert_eq!(pool.clone().checked(), Ok(pool.clone()));
                        prop_assert!(pool.dynamic_size() > 0 || pool.fixed_size() > 0);
                    }
                }
                Err(e) => prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "{}", e),
            }
        }

        #[test]
        fn validate_never_panics_and_what_it_accepts_computes_quickly(pool in any_pool()) {
            let start = Instant::now();
            let verdict = pool.validate();
            let _ = pool.dynamic_size();
            let _ = pool.skip_excluded_blocks(0);
            let _ = pool.block_first(pool.block_of(u128::MAX));
            let _ = pool.block_cidr(u128::MAX);
            if verdict.is_ok() {
                let len = pool.block_len();
                prop_assert!(len <= 1 << MAX_BLOCK_BITS);
                let next = pool.skip_excluded_blocks(0);
                let _ = pool.block_cidr(next);
                let spans: Vec<_> = pool.dynamic_block_spans().collect();
                prop_assert_eq!(spans.len(), pool.ranges.len());
                let normal = pool.clone().normalised();
                prop_assert_eq!(normal.validate(), Ok(()));
                prop_assert_eq!(normal.dynamic_size(), pool.dynamic_size());
            }
            prop_assert!(start.elapsed() < BUDGET, "took {:?}", start.elapsed());
        }
    }
}
