//! Operator commands: list allocations, pool usage, release an attachment, audit etcd.

use std::collections::BTreeMap;

use crate::audit::audit;
use crate::pool::cidr_of_id;
use crate::records::{BlockRecord, Handle, KeyRef, Keys, PoolRecord};
use crate::store::{Store, StoreConfig};
use crate::{Allocator, IpamError};

/// Prints every allocation, one line each, sorted by pool and address.
pub async fn list(config: &StoreConfig, pool: Option<&str>) -> Result<(), IpamError> {
    let store = Store::connect(config).await?;
    let report = audit(&store, &Keys::new(&config.prefix)).await?;
    let wanted = pool.map(|p| p.replace('/', "_"));
    let mut rows: Vec<_> = report
        .allocations
        .iter()
        .filter(|((id, _), _)| wanted.as_ref().is_none_or(|w| w == id))
        .collect();
    rows.sort_by_key(|((id, ip), _)| (id.clone(), *ip));
    println!("POOL\tADDRESS\tATTACHMENT\tPOD\tNODE\tNETWORK\tKIND");
    for ((id, ip), r) in rows {
        let pod = r
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_else(|| "-".into());
        println!(
            "{}\t{ip}\t{}\t{pod}\t{}\t{}\t{:?}",
            cidr_of_id(id),
            r.handle,
            r.node,
            r.network,
            r.kind
        );
    }
    Ok(())
}

/// Prints each pool's dynamic size, held addresses and claimed blocks.
pub async fn usage(config: &StoreConfig) -> Result<(), IpamError> {
    let store = Store::connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let (_, kvs) = store.load_prefix(&keys.pools()).await?;
    #[derive(Default)]
    struct Usage {
        dynamic: u128,
        held: u64,
        blocks: BTreeMap<String, u64>,
    }
    let mut pools: BTreeMap<String, Usage> = BTreeMap::new();
    for kv in &kvs {
        let Ok(key) = kv.key_str() else { continue };
        match keys.parse(key) {
            Some(KeyRef::Pool { pool }) => {
                if let Ok(record) = serde_json::from_slice::<PoolRecord>(kv.value()) {
                    pools.entry(pool).or_default().dynamic = record.to_pool().dynamic_size();
                }
            }
            Some(KeyRef::Address { pool, .. }) => pools.entry(pool).or_default().held += 1,
            Some(KeyRef::Block { pool, .. }) => {
                let node = serde_json::from_slice::<BlockRecord>(kv.value())
                    .map(|b| b.node)
                    .unwrap_or_default();
                *pools
                    .entry(pool)
                    .or_default()
                    .blocks
                    .entry(node)
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    println!("POOL\tDYNAMIC\tHELD\tBLOCKS (node=count)");
    for (id, u) in pools {
        let blocks: Vec<String> = u.blocks.iter().map(|(n, c)| format!("{n}={c}")).collect();
        println!(
            "{}\t{}\t{}\t{}",
            cidr_of_id(&id),
            u.dynamic,
            u.held,
            blocks.join(",")
        );
    }
    Ok(())
}

/// Releases one attachment's addresses.
pub async fn release(config: &StoreConfig, node: &str, handle: Handle) -> Result<(), IpamError> {
    let allocator = Allocator::start(config, node).await?;
    allocator.ready().await?;
    match allocator.release(&handle).await? {
        Some(record) => {
            for ip in record.ips {
                println!(
                    "released {} of pool {} from {handle}",
                    ip.ip,
                    cidr_of_id(&ip.pool)
                );
            }
        }
        None => println!("{handle} holds no address"),
    }
    Ok(())
}

/// Prints every problem found; returns whether etcd is consistent.
pub async fn check(config: &StoreConfig) -> Result<bool, IpamError> {
    let store = Store::connect(config).await?;
    let report = audit(&store, &Keys::new(&config.prefix)).await?;
    for problem in &report.problems {
        println!("PROBLEM {problem}");
    }
    println!(
        "{} allocations, {} attachments, {} problems",
        report.allocations.len(),
        report.handles.len(),
        report.problems.len()
    );
    Ok(report.problems.is_empty())
}
