//! The etcd data model: key layout and the JSON records stored under it.
//!
//! ```text
//! <prefix>/pools/<pool-id>                    PoolRecord   (pool-id: subnet, "10.0.0.0_22")
//! <prefix>/pools/<pool-id>/blocks/<block>     BlockRecord  (block: its CIDR, "10.0.1.64_26")
//! <prefix>/pools/<pool-id>/ips/<ip>           AllocationRecord
//! <prefix>/attachments/<network>/<containerID>/<ifname>
//!                                             AttachmentRecord
//! <prefix>/nodes/<node>/attachments/<network>/<containerID>/<ifname>
//!                                             "" (index: a node lists its own attachments
//!                                             without reading the cluster's)
//! <prefix>/released/<network>/<containerID>/<ifname>
//!                                             ReleaseMarker (under a lease: it expires)
//! <prefix>/pool-index                         PoolIndex    (every subnet with a pool)
//! <prefix>/handles/<containerID>/<ifname>     AttachmentRecord of the earlier layout: read by
//!                                             DEL, CHECK, GC and audit, never written
//! <prefix>/leader/<role>                      LeaderRecord (under the holder's lease: the
//!                                             daemon elected for a cluster-wide task)
//! <prefix>/sticky/<network>/<namespace>/<statefulset>/<ordinal>
//!                                             StickyRecord (the address a StatefulSet pod
//!                                             identity keeps across re-creation)
//! <prefix>/namespaces/<namespace>             NamespaceRecord (blocks auto-assigned to it)
//! <prefix>/namespace-blocks/<block>           NamespaceBlockRecord (which namespace has it)
//! ```
//! Every value carries `version` so the layout can evolve.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::addr::{to_int, AddrRange, Family};
use crate::pool::{cidr_of_id, pool_id, Pool};

pub const RECORD_VERSION: u32 = 1;

/// The CNI attachment an allocation belongs to: `(network name, containerID, ifname)`, the
/// spec's key for one attachment. Two networks of one container may use the same ifname in
/// different namespaces, so the network is part of the identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// Empty only in records written before the network was part of the identity; decoding
    /// fills it from the record's `network` field.
    #[serde(default)]
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    pub fn new(
        network: impl Into<String>,
        container_id: impl Into<String>,
        ifname: impl Into<String>,
    ) -> Self {
        Attachment {
            network: network.into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    /// Checks each part with the CNI spec's rules, so that every part is safe as an etcd key
    /// segment and in a log line.
    pub fn validate(&self) -> Result<(), String> {
        hostnic_cni::validate_network_name(&self.network)
            .map_err(|e| format!("network name {:?} {e}", self.network))?;
        hostnic_cni::validate_container_id(&self.container_id)
            .map_err(|e| format!("container id {:?} {e}", self.container_id))?;
        hostnic_cni::validate_ifname(&self.ifname)
            .map_err(|e| format!("ifname {:?} {e}", self.ifname))
    }
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} of network {}",
            self.container_id, self.ifname, self.network
        )
    }
}

/// The pod behind an attachment, when the runtime told us (`K8S_POD_*` CNI args).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// How an address was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Next free address of the pool.
    Dynamic,
    /// An address the caller asked for (`IP=`, `runtimeConfig.ips`).
    Exact,
    /// A fixed-IP annotation.
    Fixed,
    /// The address a StatefulSet pod identity keeps across re-creation.
    Sticky,
}

/// Who holds an address. Stored at `pools/<pool-id>/ips/<ip>`.
///
/// On the wire the attachment is written as it always was (`handle: {containerID, ifname}` next
/// to `network`), so daemons of either layout read each other's records during an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AllocationWire", into = "AllocationWire")]
pub struct AllocationRecord {
    pub version: u32,
    pub attachment: Attachment,
    pub pod: Option<PodRef>,
    pub node: String,
    pub kind: Kind,
    /// Seconds since the Unix epoch.
    pub allocated_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AllocationWire {
    version: u32,
    handle: HandleWire,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<PodRef>,
    node: String,
    network: String,
    kind: Kind,
    allocated_at: u64,
}

#[derive(Serialize, Deserialize)]
struct HandleWire {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

impl From<AllocationWire> for AllocationRecord {
    fn from(w: AllocationWire) -> Self {
        AllocationRecord {
            version: w.version,
            attachment: Attachment::new(w.network, w.handle.container_id, w.handle.ifname),
            pod: w.pod,
            node: w.node,
            kind: w.kind,
            allocated_at: w.allocated_at,
        }
    }
}

impl From<AllocationRecord> for AllocationWire {
    fn from(r: AllocationRecord) -> Self {
        AllocationWire {
            version: r.version,
            handle: HandleWire {
                container_id: r.attachment.container_id,
                ifname: r.attachment.ifname,
            },
            pod: r.pod,
            node: r.node,
            network: r.attachment.network,
            kind: r.kind,
            allocated_at: r.allocated_at,
        }
    }
}

/// One address of an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldIp {
    pub pool: String,
    pub ip: IpAddr,
    /// How it was chosen (absent in records of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
}

/// Index from an attachment to its addresses, so DEL is one read, not a scan.
/// Stored at `attachments/<network>/<containerID>/<ifname>` (earlier layout:
/// `handles/<containerID>/<ifname>`, same value, still read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    pub version: u32,
    pub network: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub ips: Vec<HeldIp>,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub allocated_at: u64,
    /// The attachment's network namespace as the runtime named it (`CNI_NETNS`), so the node
    /// that made it can tell when it is gone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
}

/// Every subnet that has a pool, in one key, so that registering a pool can be checked
/// against all others in the same transaction that writes it. Stored at `pool-index`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolIndex {
    pub version: u32,
    pub subnets: Vec<IpNet>,
}

/// Block affinity: the node that claimed a block allocates from it without racing others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub version: u32,
    pub node: String,
}

/// A pool definition as stored in etcd: the first config to use a subnet defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolRecord {
    pub version: u32,
    pub subnet: IpNet,
    pub gateway: IpAddr,
    pub ranges: Vec<[IpAddr; 2]>,
    #[serde(default)]
    pub exclude: Vec<[IpAddr; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<[IpAddr; 2]>,
    pub block_size: u8,
}

impl PoolRecord {
    pub fn from_pool(pool: &Pool) -> Self {
        let pair = |r: &AddrRange| [pool.addr(r.first), pool.addr(r.last)];
        PoolRecord {
            version: RECORD_VERSION,
            subnet: pool.subnet,
            gateway: pool.gateway,
            ranges: pool.ranges.iter().map(pair).collect(),
            exclude: pool.exclude.iter().map(pair).collect(),
            fixed: pool.fixed.as_ref().map(pair),
            block_size: pool.block_prefix,
        }
    }

    /// The pool this record defines, checked with the rules a config must pass and in normal
    /// form: a record is input like any other, and an invalid one (a `blockSize` of 40, a
    /// range outside its subnet) must be refused rather than drive the block arithmetic.
    pub fn to_pool(&self) -> Result<Pool, String> {
        let range = |p: &[IpAddr; 2]| AddrRange::new(to_int(p[0]), to_int(p[1]));
        let family = Family::of(self.subnet.addr());
        let all = self
            .ranges
            .iter()
            .chain(&self.exclude)
            .chain(self.fixed.as_ref())
            .flatten()
            .chain([&self.gateway]);
        if let Some(ip) = all.into_iter().find(|ip| Family::of(**ip) != family) {
            return Err(format!(
                "{ip} is not of the family of subnet {}",
                self.subnet
            ));
        }
        let pool = Pool {
            subnet: self.subnet,
            gateway: self.gateway,
            ranges: self.ranges.iter().map(range).collect(),
            exclude: self.exclude.iter().map(range).collect(),
            fixed: self.fixed.as_ref().map(range),
            block_prefix: self.block_size,
        };
        // Records written by earlier versions may be in another (equivalent) spelling.
        pool.checked().map_err(|e| e.to_string())
    }
}

/// A DEL's mark on its attachment, so that an ADD that began before the DEL (and whose
/// transaction etcd commits late, after a leader election or a timeout) cannot commit after it.
/// Stored at `released/<network>/<containerID>/<ifname>` under a lease, so it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseMarker {
    pub version: u32,
    pub node: String,
    /// Seconds since the Unix epoch.
    pub released_at: u64,
    /// What the attachment held and since when: an ADD right after the DEL that asks for the
    /// same address (Podman's `network reload` is a DEL, then an ADD with `IP=` the old
    /// address) gets the address back with its kind and time, not as a new exact request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<HeldIp>,
    #[serde(default)]
    pub allocated_at: u64,
}

/// The daemon elected for a role (`leader/<role>`), written under that daemon's lease: it
/// disappears when the daemon resigns or stops renewing the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderRecord {
    pub version: u32,
    pub node: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
}

/// The addresses a StatefulSet pod identity (namespace, StatefulSet, ordinal, network) keeps
/// across re-creation. Stored at `sticky/<network>/<namespace>/<statefulset>/<ordinal>`,
/// created in the transaction of the identity's first ADD; deleted by the sticky GC once the
/// ordinal or the StatefulSet is gone for the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StickyRecord {
    pub version: u32,
    pub network: String,
    pub namespace: String,
    pub stateful_set: String,
    pub ordinal: u32,
    /// The UID of the StatefulSet the identity belongs to: one of the same name but another
    /// UID is another StatefulSet. Empty when the pod's owner reference had none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stateful_set_uid: String,
    pub ips: Vec<HeldIp>,
    /// Seconds since the Unix epoch: when the identity got its addresses.
    pub since: u64,
    /// Seconds since the Unix epoch: since when the sticky GC has seen the ordinal or the
    /// StatefulSet gone; None while it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphaned_since: Option<u64>,
}

impl StickyRecord {
    /// Checks the record against its key (`network`, `namespace`, `stateful_set`, `ordinal`)
    /// and itself: a record is input like any other.
    pub fn validate(&self, key: &KeyRef) -> Result<(), String> {
        let KeyRef::Sticky {
            network,
            namespace,
            stateful_set,
            ordinal,
        } = key
        else {
            return Err("not a sticky key".into());
        };
        if (
            &self.network,
            &self.namespace,
            &self.stateful_set,
            self.ordinal,
        ) != (network, namespace, stateful_set, *ordinal)
        {
            return Err(format!(
                "names {}/{}/{}/{} under another identity's key",
                self.network, self.namespace, self.stateful_set, self.ordinal
            ));
        }
        if self.ips.is_empty() {
            return Err("lists no address".into());
        }
        for h in &self.ips {
            let subnet: IpNet = cidr_of_id(&h.pool)
                .parse()
                .map_err(|_| format!("names pool {:?}, which is not a pool id", h.pool))?;
            if !subnet.contains(&h.ip) {
                return Err(format!("lists {} outside its pool {subnet}", h.ip));
            }
        }
        Ok(())
    }
}

/// The blocks assigned to a namespace automatically (`subnet-auto-assign: "on"` in the
/// `hostnic-ipam-config` ConfigMap), in the order they were assigned. Stored at
/// `namespaces/<namespace>`; each block also has its [`NamespaceBlockRecord`], written in the
/// same transaction, so that no block is ever assigned to two namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRecord {
    pub version: u32,
    pub blocks: Vec<IpNet>,
}

impl NamespaceRecord {
    /// Checks the record like a config: blocks without host bits, none twice.
    pub fn validate(&self) -> Result<(), String> {
        for (i, block) in self.blocks.iter().enumerate() {
            if block.trunc() != *block {
                return Err(format!("block {block} has host bits set"));
            }
            if self.blocks[..i].iter().any(|b| b == block) {
                return Err(format!("block {block} is listed twice"));
            }
        }
        Ok(())
    }
}

/// The namespace a block is assigned to. Stored at `namespace-blocks/<block>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceBlockRecord {
    pub version: u32,
    pub namespace: String,
}

/// What a key under the prefix refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Pool {
        pool: String,
    },
    Block {
        pool: String,
        block: IpNet,
    },
    Address {
        pool: String,
        ip: IpAddr,
    },
    Attachment(Attachment),
    /// The entry of an attachment in its node's index.
    NodeAttachment {
        node: String,
        attachment: Attachment,
    },
    /// An attachment record of the earlier layout, keyed without its network.
    LegacyHandle {
        container_id: String,
        ifname: String,
    },
    Released(Attachment),
    PoolIndex,
    /// The holder of an elected role.
    Leader {
        role: String,
    },
    /// The record of a StatefulSet pod identity's sticky addresses.
    Sticky {
        network: String,
        namespace: String,
        stateful_set: String,
        ordinal: u32,
    },
    /// The blocks auto-assigned to a namespace.
    Namespace {
        namespace: String,
    },
    /// The namespace an auto-assigned block belongs to.
    NamespaceBlock {
        block: IpNet,
    },
}

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Prefix of every pool key: definitions, blocks and addresses.
    pub fn pools(&self) -> String {
        format!("{}/pools/", self.prefix)
    }

    /// Prefix of every attachment record.
    pub fn attachments(&self) -> String {
        format!("{}/attachments/", self.prefix)
    }

    /// Prefix of the index of one node's attachments, of one network when given.
    pub fn node_attachments(&self, node: &str, network: Option<&str>) -> String {
        match network {
            Some(network) => format!("{}/nodes/{node}/attachments/{network}/", self.prefix),
            None => format!("{}/nodes/{node}/attachments/", self.prefix),
        }
    }

    /// The entry of attachment `a` in the index of `node`.
    pub fn node_attachment(&self, node: &str, a: &Attachment) -> String {
        format!(
            "{}/nodes/{node}/attachments/{}/{}/{}",
            self.prefix, a.network, a.container_id, a.ifname
        )
    }

    /// Prefix of the attachment records of the earlier layout.
    pub fn legacy_handles(&self) -> String {
        format!("{}/handles/", self.prefix)
    }

    /// The key of the daemon elected for `role` (see `leader`).
    pub fn leader(&self, role: &str) -> String {
        format!("{}/leader/{role}", self.prefix)
    }

    pub fn pool_index(&self) -> String {
        format!("{}/pool-index", self.prefix)
    }

    /// Prefix of the records of auto-assigned namespace blocks.
    pub fn namespaces(&self) -> String {
        format!("{}/namespaces/", self.prefix)
    }

    pub fn namespace(&self, namespace: &str) -> String {
        format!("{}/namespaces/{namespace}", self.prefix)
    }

    pub fn namespace_block(&self, block: &IpNet) -> String {
        format!("{}/namespace-blocks/{}", self.prefix, pool_id(block))
    }

    pub fn pool(&self, pool: &str) -> String {
        format!("{}/pools/{pool}", self.prefix)
    }

    pub fn block(&self, pool: &str, block: &IpNet) -> String {
        format!("{}/pools/{pool}/blocks/{}", self.prefix, pool_id(block))
    }

    pub fn address(&self, pool: &str, ip: IpAddr) -> String {
        format!("{}/pools/{pool}/ips/{ip}", self.prefix)
    }

    /// Prefix of the address records of one pool.
    pub fn addresses(&self, pool: &str) -> String {
        format!("{}/pools/{pool}/ips/", self.prefix)
    }

    /// The key range `[start, end)` of every address record of one pool.
    pub fn all_addresses(&self, pool: &str) -> (Vec<u8>, Vec<u8>) {
        let start = self.addresses(pool).into_bytes();
        let end = crate::store::prefix_end(&start);
        (start, end)
    }

    /// The key range `[start, end)` of a pool's definition and its block claims, without its
    /// addresses (which sort after them).
    pub fn definition_and_blocks(&self, pool: &str) -> (Vec<u8>, Vec<u8>) {
        let start = self.pool(pool).into_bytes();
        let end =
            crate::store::prefix_end(format!("{}/pools/{pool}/blocks/", self.prefix).as_bytes());
        (start, end)
    }

    /// The key ranges that hold exactly the address records of block `block` of pool `pool`;
    /// None for an IPv6 block, whose address keys (compressed text) have no block order.
    pub fn block_addresses(&self, pool: &str, block: &IpNet) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        match block {
            IpNet::V4(block) => Some(crate::key_ranges::block_key_ranges(
                &self.addresses(pool),
                *block,
            )),
            IpNet::V6(_) => None,
        }
    }

    pub fn attachment(&self, a: &Attachment) -> String {
        format!(
            "{}/attachments/{}/{}/{}",
            self.prefix, a.network, a.container_id, a.ifname
        )
    }

    /// Where the earlier layout kept this attachment's record.
    pub fn legacy_handle(&self, a: &Attachment) -> String {
        format!("{}/handles/{}/{}", self.prefix, a.container_id, a.ifname)
    }

    pub fn released(&self, a: &Attachment) -> String {
        format!(
            "{}/released/{}/{}/{}",
            self.prefix, a.network, a.container_id, a.ifname
        )
    }

    /// Prefix of every StatefulSet identity's sticky record.
    pub fn sticky_all(&self) -> String {
        format!("{}/sticky/", self.prefix)
    }

    /// The sticky record of ordinal `ordinal` of StatefulSet `namespace/stateful_set` on
    /// `network`.
    pub fn sticky(
        &self,
        network: &str,
        namespace: &str,
        stateful_set: &str,
        ordinal: u32,
    ) -> String {
        format!(
            "{}/sticky/{network}/{namespace}/{stateful_set}/{ordinal}",
            self.prefix
        )
    }

    /// Parses a key written by this layout; None for anything else.
    pub fn parse(&self, key: &str) -> Option<KeyRef> {
        let rest = key.strip_prefix(&*self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["pool-index"] => Some(KeyRef::PoolIndex),
            ["leader", role] => Some(KeyRef::Leader {
                role: role.to_string(),
            }),
            ["namespaces", namespace] => Some(KeyRef::Namespace {
                namespace: namespace.to_string(),
            }),
            ["namespace-blocks", block] => Some(KeyRef::NamespaceBlock {
                block: cidr_of_id(block).parse().ok()?,
            }),
            ["pools", pool] => Some(KeyRef::Pool {
                pool: pool.to_string(),
            }),
            ["pools", pool, "blocks", block] => Some(KeyRef::Block {
                pool: pool.to_string(),
                block: cidr_of_id(block).parse().ok()?,
            }),
            ["pools", pool, "ips", ip] => Some(KeyRef::Address {
                pool: pool.to_string(),
                ip: ip.parse().ok()?,
            }),
            ["attachments", network, container_id, ifname] => Some(KeyRef::Attachment(
                Attachment::new(*network, *container_id, *ifname),
            )),
            ["nodes", node, "attachments", network, container_id, ifname] => {
                Some(KeyRef::NodeAttachment {
                    node: node.to_string(),
                    attachment: Attachment::new(*network, *container_id, *ifname),
                })
            }
            ["handles", container_id, ifname] => Some(KeyRef::LegacyHandle {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            }),
            ["released", network, container_id, ifname] => Some(KeyRef::Released(Attachment::new(
                *network,
                *container_id,
                *ifname,
            ))),
            ["sticky", network, namespace, stateful_set, ordinal] => Some(KeyRef::Sticky {
                network: network.to_string(),
                namespace: namespace.to_string(),
                stateful_set: stateful_set.to_string(),
                ordinal: ordinal.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// Seconds since the Unix epoch, for records.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::parse_range_sets;
    use serde_json::json;

    #[test]
    fn every_key_parses_back_to_what_it_names() {
        let keys = Keys::new("/hostnic/ipam/v1/");
        let block: IpNet = "10.0.1.64/26".parse().expect("literal");
        let ip: IpAddr = "fd00::5".parse().expect("literal");
        let attachment = Attachment::new("net1", "abc123", "eth0");
        assert_eq!(
            keys.block("10.0.0.0_22", &block),
            "/hostnic/ipam/v1/pools/10.0.0.0_22/blocks/10.0.1.64_26"
        );
        let cases = [
            (keys.pool("p"), KeyRef::Pool { pool: "p".into() }),
            (
                keys.block("p", &block),
                KeyRef::Block {
                    pool: "p".into(),
                    block,
                },
            ),
            (
                keys.address("p", ip),
                KeyRef::Address {
                    pool: "p".into(),
                    ip,
                },
            ),
            (
                keys.attachment(&attachment),
                KeyRef::Attachment(attachment.clone()),
            ),
            (
                keys.node_attachment("node-1", &attachment),
                KeyRef::NodeAttachment {
                    node: "node-1".into(),
                    attachment: attachment.clone(),
                },
            ),
            (
                keys.released(&attachment),
                KeyRef::Released(attachment.clone()),
            ),
            (
                keys.legacy_handle(&attachment),
                KeyRef::LegacyHandle {
                    container_id: "abc123".into(),
                    ifname: "eth0".into(),
                },
            ),
            (keys.pool_index(), KeyRef::PoolIndex),
            (
                keys.sticky("net1", "db", "web", 2),
                KeyRef::Sticky {
                    network: "net1".into(),
                    namespace: "db".into(),
                    stateful_set: "web".into(),
                    ordinal: 2,
                },
            ),
            (
                keys.namespace("apps"),
                KeyRef::Namespace {
                    namespace: "apps".into(),
                },
            ),
            (
                keys.namespace_block(&block),
                KeyRef::NamespaceBlock { block },
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(keys.parse(&key), Some(expected), "{key}");
        }
        assert_eq!(keys.parse("/other/pools/p"), None);
        assert_eq!(keys.parse("/hostnic/ipam/v1/pools/p/ips/not-an-ip"), None);
    }

    #[test]
    fn the_leader_key_parses_back_to_its_role() {
        let keys = Keys::new("/p");
        assert_eq!(keys.leader("cleaner"), "/p/leader/cleaner");
        assert_eq!(
            keys.parse(&keys.leader("cleaner")),
            Some(KeyRef::Leader {
                role: "cleaner".into()
            })
        );
    }

    #[test]
    fn pool_records_round_trip() {
        let sets = parse_range_sets(&json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.20",
            "fixedStart": "10.0.0.2", "fixedEnd": "10.0.0.9", "exclude": ["10.0.0.100"]}))
        .expect("valid");
        let pool = &sets[0].pools[0];
        let record = PoolRecord::from_pool(pool);
        let text = serde_json::to_string(&record).expect("serialises");
        let back: PoolRecord = serde_json::from_str(&text).expect("parses");
        assert_eq!(&back.to_pool().expect("valid"), pool);
        assert!(text.contains("\"version\":1"));
    }

    #[test]
    fn a_pool_record_with_an_impossible_block_size_is_refused() {
        let record: PoolRecord = serde_json::from_value(json!({"version": 1,
            "subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "ranges": [["10.0.0.2", "10.0.0.254"]],
            "blockSize": 40}))
        .expect("decodes");
        let err = record.to_pool().expect_err("blockSize 40 refused");
        assert!(err.contains("blockSize"), "{err}");
    }

    #[test]
    fn a_pool_record_whose_addresses_leave_its_subnet_is_refused() {
        let base = json!({"version": 1, "subnet": "10.0.0.0/24", "gateway": "10.0.0.1",
            "ranges": [["10.0.0.2", "10.0.0.254"]], "blockSize": 26});
        let with = |field: &str, value: serde_json::Value| {
            let mut record = base.clone();
            record[field] = value;
            serde_json::from_value::<PoolRecord>(record).expect("decodes")
        };
        let cases = [
            (with("subnet", json!("10.0.0.5/24")), "host bits"),
            (with("gateway", json!("10.0.1.1")), "gateway"),
            (with("ranges", json!([["10.0.0.0", "10.0.1.0"]])), "range"),
            (with("ranges", json!([["9.0.0.0", "10.0.0.9"]])), "range"),
            (
                with("ranges", json!([["10.0.0.9", "10.0.0.2"]])),
                "before first",
            ),
            (
                with("exclude", json!([["10.0.0.9", "10.0.9.9"]])),
                "exclude",
            ),
            (with("fixed", json!(["10.0.0.9", "10.0.0.2"])), "fixed"),
        ];
        for (record, expected) in cases {
            let err = record.to_pool().expect_err("refused");
            assert!(err.contains(expected), "{record:?}: {err}");
        }
        assert!(with("exclude", json!([["10.0.0.9", "10.0.0.9"]]))
            .to_pool()
            .is_ok());
    }

    #[test]
    fn a_sticky_record_must_match_its_key_and_list_addresses_of_its_pools() {
        let keys = Keys::new("/p");
        let key = keys
            .parse(&keys.sticky("net", "db", "web", 1))
            .expect("a sticky key");
        let record = |ordinal: u32, ips: serde_json::Value| -> StickyRecord {
            serde_json::from_value(json!({"version": 1, "network": "net", "namespace": "db",
                "statefulSet": "web", "ordinal": ordinal, "ips": ips, "since": 5}))
            .expect("decodes")
        };
        let good = json!([{"pool": "10.0.0.0_24", "ip": "10.0.0.5", "kind": "sticky"}]);
        assert_eq!(record(1, good.clone()).validate(&key), Ok(()));
        let cases = [
            (record(2, good), "another identity's key"),
            (record(1, json!([])), "no address"),
            (
                record(1, json!([{"pool": "10.0.0.0_24", "ip": "10.0.1.5"}])),
                "outside its pool",
            ),
            (
                record(1, json!([{"pool": "nonsense", "ip": "10.0.0.5"}])),
                "not a pool id",
            ),
        ];
        for (r, want) in cases {
            let e = r.validate(&key).expect_err("refused");
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn allocation_records_keep_the_wire_shape_of_the_earlier_layout() {
        let earlier = json!({"version": 1, "handle": {"containerID": "c1", "ifname": "eth0"},
            "node": "n1", "network": "net1", "kind": "dynamic", "allocatedAt": 7});
        let record: AllocationRecord = serde_json::from_value(earlier.clone()).expect("decodes");
        assert_eq!(record.attachment, Attachment::new("net1", "c1", "eth0"));
        assert_eq!(serde_json::to_value(&record).expect("encodes"), earlier);
    }

    mod decoding {
        use super::*;
        use proptest::prelude::*;

        /// Values shaped like records, with fields of the wrong type, out of range or missing.
        fn record_like() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u8>().prop_map(serde_json::Value::from),
                "[0-9a-f:./_]{0,20}".prop_map(serde_json::Value::from),
                prop_oneof![
                    Just("10.0.0.0/24"),
                    Just("10.0.0.1"),
                    Just("10.0.0.255"),
                    Just("::/0"),
                    Just("0.0.0.0/0"),
                    Just("fd00::1"),
                    Just("255.255.255.255"),
                ]
                .prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("version".to_string()),
                            Just("subnet".to_string()),
                            Just("gateway".to_string()),
                            Just("ranges".to_string()),
                            Just("exclude".to_string()),
                            Just("fixed".to_string()),
                            Just("blockSize".to_string()),
                            Just("handle".to_string()),
                            Just("network".to_string()),
                            Just("node".to_string()),
                            Just("kind".to_string()),
                            Just("ips".to_string()),
                            Just("allocatedAt".to_string()),
                        ],
                        inner,
                        0..8,
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Whatever a key holds, decoding it is an error or a record, never a panic, and a
            /// pool record either is refused or yields a pool whose block arithmetic is sound.
            #[test]
            fn any_value_decodes_to_a_record_or_an_error(value in record_like(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
                for text in [value.to_string().into_bytes(), bytes] {
                    let _ = serde_json::from_slice::<AllocationRecord>(&text);
                    let _ = serde_json::from_slice::<AttachmentRecord>(&text);
                    let _ = serde_json::from_slice::<BlockRecord>(&text);
                    let _ = serde_json::from_slice::<PoolIndex>(&text);
                    let _ = serde_json::from_slice::<ReleaseMarker>(&text);
                    let _ = serde_json::from_slice::<StickyRecord>(&text);
                    if let Ok(record) = serde_json::from_slice::<NamespaceRecord>(&text) {
                        let _ = record.validate();
                    }
                    if let Ok(record) = serde_json::from_slice::<PoolRecord>(&text) {
                        if let Ok(pool) = record.to_pool() {
                            prop_assert!(pool.block_len() <= 4096);
                            let _ = pool.dynamic_size();
                            let _ = pool.skip_excluded_blocks(0);
                            prop_assert_eq!(PoolRecord::from_pool(&pool).to_pool(), Ok(pool));
                        }
                    }
                }
            }
        }
    }
}
