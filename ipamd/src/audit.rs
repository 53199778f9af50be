//! A full scan of etcd that checks the invariants the allocator maintains: no address held
//! twice, and every handle index consistent with its address records. Operators run it from
//! the CLI; tests run it after racing allocators.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::error::Result;
use crate::records::{AllocationRecord, Handle, HandleRecord, KeyRef, Keys};
use crate::store::Store;

/// What a scan found.
#[derive(Debug, Default)]
pub struct AuditReport {
    /// Address records, by pool and address.
    pub allocations: HashMap<(String, IpAddr), AllocationRecord>,
    pub handles: HashMap<Handle, HandleRecord>,
    /// Everything that breaks an invariant, one sentence each.
    pub problems: Vec<String>,
}

/// Scans every pool and handle under the prefix at one revision each.
pub async fn audit(store: &Store, keys: &Keys) -> Result<AuditReport> {
    let mut report = AuditReport::default();
    let (_, pool_kvs) = store.load_prefix(&keys.pools()).await?;
    let (_, handle_kvs) = store.load_prefix(&keys.handles()).await?;
    for kv in pool_kvs.iter().chain(&handle_kvs) {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match keys.parse(&key) {
            Some(KeyRef::Address { pool, ip }) => match serde_json::from_slice(kv.value()) {
                Ok(record) => {
                    report.allocations.insert((pool, ip), record);
                }
                Err(e) => report
                    .problems
                    .push(format!("{key}: unreadable allocation: {e}")),
            },
            Some(KeyRef::Handle(handle)) => match serde_json::from_slice(kv.value()) {
                Ok(record) => {
                    report.handles.insert(handle, record);
                }
                Err(e) => report
                    .problems
                    .push(format!("{key}: unreadable handle: {e}")),
            },
            _ => {}
        }
    }

    let mut pools_of_ip: HashMap<IpAddr, Vec<&str>> = HashMap::new();
    for ((pool, ip), record) in &report.allocations {
        pools_of_ip.entry(*ip).or_default().push(pool);
        let listed = report
            .handles
            .get(&record.handle)
            .is_some_and(|h| h.ips.iter().any(|x| x.ip == *ip && x.pool == *pool));
        if !listed {
            report.problems.push(format!(
                "address {ip} of pool {pool} is held by {} whose handle does not list it",
                record.handle
            ));
        }
    }
    for (ip, pools) in pools_of_ip {
        if pools.len() > 1 {
            report
                .problems
                .push(format!("address {ip} is held in several pools: {pools:?}"));
        }
    }
    for (handle, record) in &report.handles {
        for x in &record.ips {
            match report.allocations.get(&(x.pool.clone(), x.ip)) {
                Some(a) if a.handle == *handle => {}
                Some(a) => report.problems.push(format!(
                    "handle {handle} lists {} which {} holds",
                    x.ip, a.handle
                )),
                None => report.problems.push(format!(
                    "handle {handle} lists {} of pool {} which has no record",
                    x.ip, x.pool
                )),
            }
        }
    }
    Ok(report)
}
