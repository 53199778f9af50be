//! The etcd data model: key layout and the JSON records stored under it.
//!
//! ```text
//! <prefix>/pools/<pool-id>                    PoolRecord   (pool-id: subnet, "10.0.0.0_22")
//! <prefix>/pools/<pool-id>/blocks/<block>     BlockRecord  (block: its CIDR, "10.0.1.64_26")
//! <prefix>/pools/<pool-id>/ips/<ip>           AllocationRecord
//! <prefix>/handles/<containerID>/<ifname>     HandleRecord
//! <prefix>/pool-index                         PoolIndex    (every subnet with a pool)
//! ```
//! Every value carries `version` so the layout can evolve.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::addr::{to_int, AddrRange};
use crate::pool::{cidr_of_id, pool_id, Pool};

pub const RECORD_VERSION: u32 = 1;

/// The CNI attachment an allocation belongs to: `(containerID, ifname)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Handle {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl Handle {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Handle {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// The pod behind a handle, when the runtime told us (`K8S_POD_*` CNI args).
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    pub version: u32,
    pub handle: Handle,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub node: String,
    pub network: String,
    pub kind: Kind,
    /// Seconds since the Unix epoch.
    pub allocated_at: u64,
}

/// One address of a handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleIp {
    pub pool: String,
    pub ip: IpAddr,
}

/// Index from a handle to its addresses, so DEL is one read, not a scan.
/// Stored at `handles/<containerID>/<ifname>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandleRecord {
    pub version: u32,
    pub network: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub ips: Vec<HandleIp>,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub allocated_at: u64,
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

    pub fn to_pool(&self) -> Pool {
        let range = |p: &[IpAddr; 2]| AddrRange::new(to_int(p[0]), to_int(p[1]));
        Pool {
            subnet: self.subnet,
            gateway: self.gateway,
            ranges: self.ranges.iter().map(range).collect(),
            exclude: self.exclude.iter().map(range).collect(),
            fixed: self.fixed.as_ref().map(range),
            block_prefix: self.block_size,
        }
    }
}

/// What a key under the prefix refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Pool { pool: String },
    Block { pool: String, block: IpNet },
    Address { pool: String, ip: IpAddr },
    Handle(Handle),
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

    pub fn handles(&self) -> String {
        format!("{}/handles/", self.prefix)
    }

    pub fn pool_index(&self) -> String {
        format!("{}/pool-index", self.prefix)
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

    pub fn handle(&self, handle: &Handle) -> String {
        format!(
            "{}/handles/{}/{}",
            self.prefix, handle.container_id, handle.ifname
        )
    }

    /// Parses a key written by this layout; None for anything else.
    pub fn parse(&self, key: &str) -> Option<KeyRef> {
        let rest = key.strip_prefix(&*self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
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
            ["handles", container_id, ifname] => {
                Some(KeyRef::Handle(Handle::new(*container_id, *ifname)))
            }
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
        let handle = Handle::new("abc123", "eth0");
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
            (keys.handle(&handle), KeyRef::Handle(handle.clone())),
        ];
        for (key, expected) in cases {
            assert_eq!(keys.parse(&key), Some(expected), "{key}");
        }
        assert_eq!(keys.parse("/other/pools/p"), None);
        assert_eq!(keys.parse("/hostnic/ipam/v1/pools/p/ips/not-an-ip"), None);
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
        assert_eq!(&back.to_pool(), pool);
        assert!(text.contains("\"version\":1"));
    }
}
