//! A full scan of etcd that checks every record and the invariants the allocator maintains: no
//! address held twice, every attachment record consistent with its address records, every
//! pool, block, index and marker record readable and valid. Operators run it from the CLI;
//! tests run it after racing allocators.
//!
//! Every problem names its key, so that an operator can look at it (`etcdctl get KEY`) and
//! repair it with the CLI (`release-address`, `remove-pool`, `drop-key`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::pool::{cidr_of_id, Pool};
use crate::records::{
    AllocationRecord, Attachment, AttachmentRecord, BlockRecord, KeyRef, Keys, LeaderRecord,
    NamespaceBlockRecord, NamespaceRecord, PoolIndex, PoolRecord, ReleaseMarker, StickyRecord,
};
use crate::store::Store;

/// What a scan found.
#[derive(Debug, Default)]
pub struct AuditReport {
    /// Valid pool definitions, by pool id.
    pub pools: BTreeMap<String, Pool>,
    /// Address records, by pool and address.
    pub allocations: HashMap<(String, IpAddr), AllocationRecord>,
    /// Attachment records (both key layouts), with the key each was read from.
    pub attachments: HashMap<Attachment, (String, AttachmentRecord)>,
    /// The node index: the nodes whose index lists each attachment.
    pub indexed: HashMap<Attachment, Vec<String>>,
    /// Block claims: pool id, block, node.
    pub blocks: Vec<(String, IpNet, String)>,
    /// Everything that breaks an invariant, one sentence each, starting with the key.
    pub problems: Vec<String>,
    /// The keys whose records cannot be read or do not validate: what `drop-key` may remove.
    pub bad_keys: Vec<String>,
    /// Blocks auto-assigned to each namespace, from valid namespace records.
    pub namespaces: BTreeMap<String, Vec<IpNet>>,
    /// The namespace each auto-assigned block's index record names.
    pub namespace_blocks: BTreeMap<IpNet, String>,
}

impl AuditReport {
    fn problem(&mut self, key: &str, what: impl std::fmt::Display) {
        self.problems.push(format!("{key}: {what}"));
    }

    fn bad_record(&mut self, key: &str, what: impl std::fmt::Display) {
        self.problem(key, what);
        self.bad_keys.push(key.to_string());
    }

    fn decode<T: DeserializeOwned>(&mut self, key: &str, value: &[u8], what: &str) -> Option<T> {
        match serde_json::from_slice(value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.bad_record(key, format!("unreadable {what} record: {e}"));
                None
            }
        }
    }
}

/// Scans every key under the prefix, one revision for all of them.
pub async fn audit(store: &Store, keys: &Keys) -> Result<AuditReport> {
    let mut report = AuditReport::default();
    let (_, kvs) = store.load_prefix(&format!("{}/", keys.prefix())).await?;
    let mut index: Option<PoolIndex> = None;
    let mut addresses: Vec<(String, String, IpAddr, AllocationRecord)> = Vec::new();
    for kv in &kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = kv.value();
        if crate::nics::record::is_nic_key(keys.prefix(), &key) {
            if let Err(reason) = crate::nics::record::NicRecord::decode(value) {
                report.bad_record(&key, &reason);
            }
            continue;
        }
        let Some(what) = keys.parse(&key) else {
            report.bad_record(&key, "not a key of this layout");
            continue;
        };
        match what {
            KeyRef::PoolIndex => index = report.decode(&key, value, "pool index"),
            KeyRef::Pool { pool } => {
                let Some(record) = report.decode::<PoolRecord>(&key, value, "pool") else {
                    continue;
                };
                match record.to_pool() {
                    Ok(def) if def.id() == pool => {
                        report.pools.insert(pool, def);
                    }
                    Ok(def) => report.bad_record(
                        &key,
                        format!("defines subnet {} under another subnet's key", def.subnet),
                    ),
                    Err(e) => report.bad_record(&key, format!("invalid pool record: {e}")),
                }
            }
            KeyRef::Block { pool, block } => {
                if let Some(record) = report.decode::<BlockRecord>(&key, value, "block") {
                    report.blocks.push((pool, block, record.node));
                }
            }
            KeyRef::Address { pool, ip } => {
                if let Some(record) = report.decode::<AllocationRecord>(&key, value, "address") {
                    addresses.push((key, pool, ip, record));
                }
            }
            KeyRef::Attachment(attachment) => {
                let Some(record) = report.decode::<AttachmentRecord>(&key, value, "attachment")
                else {
                    continue;
                };
                if record.network != attachment.network {
                    report.problem(&key, format!("record names network {:?}", record.network));
                }
                report.attachments.insert(attachment, (key, record));
            }
            KeyRef::NodeAttachment { node, attachment } => {
                report.indexed.entry(attachment).or_default().push(node);
            }
            KeyRef::LegacyHandle {
                container_id,
                ifname,
            } => {
                let Some(record) = report.decode::<AttachmentRecord>(&key, value, "attachment")
                else {
                    continue;
                };
                let a = Attachment::new(record.network.clone(), container_id, ifname);
                report.attachments.insert(a, (key, record));
            }
            KeyRef::Released(_) => {
                report.decode::<ReleaseMarker>(&key, value, "release marker");
            }
            KeyRef::Leader { .. } => {
                report.decode::<LeaderRecord>(&key, value, "leader");
            }
            KeyRef::Sticky { .. } => {
                let Some(record) = report.decode::<StickyRecord>(&key, value, "sticky") else {
                    continue;
                };
                if let Err(e) = record.validate(&what) {
                    report.bad_record(&key, format!("invalid sticky record: {e}"));
                }
            }
            KeyRef::Namespace { namespace } => {
                let Some(record) = report.decode::<NamespaceRecord>(&key, value, "namespace")
                else {
                    continue;
                };
                match record.validate() {
                    Ok(()) => {
                        report.namespaces.insert(namespace, record.blocks);
                    }
                    Err(e) => report.bad_record(&key, format!("invalid namespace record: {e}")),
                }
            }
            KeyRef::NamespaceBlock { block } => {
                if let Some(record) =
                    report.decode::<NamespaceBlockRecord>(&key, value, "namespace block")
                {
                    report.namespace_blocks.insert(block, record.namespace);
                }
            }
        }
    }
    check_namespace_blocks(&mut report, keys);

    check_pool_index(&mut report, keys, index);
    check_node_index(&mut report, keys);
    let blocks = std::mem::take(&mut report.blocks);
    for (pool, block, node) in &blocks {
        match report.pools.get(pool) {
            None => report.problem(
                &keys.block(pool, block),
                format!(
                    "block claimed by {node} in pool {} which has no valid record",
                    cidr_of_id(pool)
                ),
            ),
            Some(def) if def.block_index(block).is_none() => report.problem(
                &keys.block(pool, block),
                format!("{block} is not a block of pool {}", def.subnet),
            ),
            Some(_) => {}
        }
    }
    report.blocks = blocks;

    let mut pools_of_ip: HashMap<IpAddr, Vec<String>> = HashMap::new();
    for (key, pool, ip, record) in addresses {
        match report.pools.get(&pool) {
            None => report.problem(
                &key,
                format!(
                    "held by {} in a pool with no valid record",
                    record.attachment
                ),
            ),
            Some(def) if !def.subnet.contains(&ip) => {
                report.problem(&key, format!("{ip} is outside subnet {}", def.subnet))
            }
            Some(_) => {}
        }
        let listed = report
            .attachments
            .get(&record.attachment)
            .is_some_and(|(_, a)| a.ips.iter().any(|x| x.ip == ip && x.pool == pool));
        if !listed {
            report.problem(
                &key,
                format!(
                    "held by {} whose attachment record does not list it (release it with `release-address {ip}`)",
                    record.attachment
                ),
            );
        }
        pools_of_ip.entry(ip).or_default().push(pool.clone());
        report.allocations.insert((pool, ip), record);
    }
    for (ip, pools) in pools_of_ip {
        if pools.len() > 1 {
            report.problems.push(format!(
                "address {ip} is held in several pools: {}",
                pools.join(", ")
            ));
        }
    }
    let mut listed_problems = Vec::new();
    for (attachment, (key, record)) in &report.attachments {
        for x in &record.ips {
            match report.allocations.get(&(x.pool.clone(), x.ip)) {
                Some(a) if a.attachment == *attachment => {}
                Some(a) => listed_problems.push(format!(
                    "{key}: lists {} which {} holds",
                    x.ip, a.attachment
                )),
                None => listed_problems.push(format!(
                    "{key}: lists {} of pool {} which has no address record",
                    x.ip,
                    cidr_of_id(&x.pool)
                )),
            }
        }
    }
    report.problems.extend(listed_problems);
    report.problems.sort();
    report.bad_keys.sort();
    Ok(report)
}

/// Every auto-assigned block of a namespace record has its index record naming that namespace,
/// and every index record is a block of the namespace it names.
fn check_namespace_blocks(report: &mut AuditReport, keys: &Keys) {
    let mut problems = Vec::new();
    for (namespace, blocks) in &report.namespaces {
        for block in blocks {
            match report.namespace_blocks.get(block) {
                Some(n) if n == namespace => {}
                Some(n) => problems.push(format!(
                    "{}: block {block} is assigned to namespace {n:?}, and namespace {namespace:?} lists it too",
                    keys.namespace(namespace)
                )),
                None => problems.push(format!(
                    "{}: lists block {block}, which has no record at {}",
                    keys.namespace(namespace),
                    keys.namespace_block(block)
                )),
            }
        }
    }
    for (block, namespace) in &report.namespace_blocks {
        let listed = report
            .namespaces
            .get(namespace)
            .is_some_and(|blocks| blocks.contains(block));
        if !listed {
            problems.push(format!(
                "{}: names namespace {namespace:?}, whose record does not list {block}",
                keys.namespace_block(block)
            ));
        }
    }
    report.problems.extend(problems);
}

/// Every attachment record of this layout is in the index of its node, and every index entry
/// has its record.
fn check_node_index(report: &mut AuditReport, keys: &Keys) {
    let mut problems = Vec::new();
    let mut dangling = Vec::new();
    for (attachment, (key, record)) in &report.attachments {
        let in_index = report
            .indexed
            .get(attachment)
            .is_some_and(|nodes| nodes.contains(&record.node));
        if !in_index && key == &keys.attachment(attachment) {
            problems.push(format!(
                "{key}: missing from the index of node {:?}, so that node's GC does not see it",
                record.node
            ));
        }
    }
    for (attachment, nodes) in &report.indexed {
        let record_node = report.attachments.get(attachment).map(|(_, r)| &r.node);
        let unreadable = report.bad_keys.contains(&keys.attachment(attachment));
        for node in nodes {
            if record_node != Some(node) && !unreadable {
                dangling.push(keys.node_attachment(node, attachment));
            }
        }
    }
    report.problems.extend(problems);
    for key in dangling {
        report.bad_record(&key, "index entry without a matching attachment record");
    }
}

/// The pool index must list exactly the subnets that have a pool record.
fn check_pool_index(report: &mut AuditReport, keys: &Keys, index: Option<PoolIndex>) {
    let key = keys.pool_index();
    let indexed: Vec<IpNet> = match index {
        Some(index) => index.subnets,
        None if report.bad_keys.contains(&key) => return,
        None => Vec::new(),
    };
    for pool in report.pools.values() {
        if !indexed.contains(&pool.subnet) {
            report.problems.push(format!(
                "{key}: does not list pool {}, so an overlapping pool could be added",
                pool.subnet
            ));
        }
    }
    for subnet in &indexed {
        if !report.pools.values().any(|p| p.subnet == *subnet) {
            report.problems.push(format!(
                "{key}: lists {subnet}, which has no valid pool record"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::parse_range_sets;
    use serde_json::json;

    fn report_with_pools(subnets: &[&str]) -> AuditReport {
        let mut report = AuditReport::default();
        for subnet in subnets {
            let sets = parse_range_sets(&json!({ "subnet": subnet })).expect("valid");
            let pool = sets[0].pools[0].clone();
            report.pools.insert(pool.id(), pool);
        }
        report
    }

    fn index(subnets: &[&str]) -> Option<PoolIndex> {
        Some(PoolIndex {
            version: 1,
            subnets: subnets
                .iter()
                .map(|s| s.parse().expect("literal"))
                .collect(),
        })
    }

    #[test]
    fn the_pool_index_must_list_exactly_the_pools_with_a_valid_record() {
        let keys = Keys::new("/p");
        let cases: [(&[&str], Option<PoolIndex>, &[&str]); 5] = [
            (&["10.0.0.0/24"], index(&["10.0.0.0/24"]), &[]),
            (&[], None, &[]),
            (
                &["10.0.0.0/24", "10.1.0.0/24"],
                index(&["10.0.0.0/24"]),
                &["/p/pool-index: does not list pool 10.1.0.0/24, so an overlapping pool could be added"],
            ),
            (
                &["10.0.0.0/24"],
                None,
                &["/p/pool-index: does not list pool 10.0.0.0/24, so an overlapping pool could be added"],
            ),
            (
                &["10.0.0.0/24"],
                index(&["10.0.0.0/24", "10.2.0.0/16"]),
                &["/p/pool-index: lists 10.2.0.0/16, which has no valid pool record"],
            ),
        ];
        for (pools, stored, expected) in cases {
            let mut report = report_with_pools(pools);
            check_pool_index(&mut report, &keys, stored.clone());
            assert_eq!(
                report.problems, expected,
                "pools {pools:?}, index {stored:?}"
            );
        }
    }

    #[test]
    fn an_unreadable_pool_index_is_reported_once_not_as_empty() {
        let keys = Keys::new("/p");
        let mut report = report_with_pools(&["10.0.0.0/24"]);
        report.bad_record(&keys.pool_index(), "unreadable pool index record");
        check_pool_index(&mut report, &keys, None);
        assert_eq!(
            report.problems,
            vec!["/p/pool-index: unreadable pool index record"]
        );
    }
}
