//! Operator commands: list allocations, pool usage, release an attachment or an address, audit
//! etcd, and repair what audit finds (remove an empty pool, drop an unreadable key).
//!
//! Text that came from etcd or a runtime (pod names, container ids) is printed escaped, so a
//! name with a newline cannot forge a line of output.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnet::IpNet;

use crate::audit::{audit, AuditReport};
use crate::pool::{cidr_of_id, pool_id};
use crate::records::{Attachment, KeyRef, Keys, PoolIndex, RECORD_VERSION};
use crate::store::{Store, StoreConfig};
use crate::{Allocator, IpamError};

/// `text` with control characters escaped, for one field of one output line.
pub fn escaped(text: &str) -> String {
    text.chars().flat_map(char::escape_debug).collect()
}

async fn scan(config: &StoreConfig) -> Result<(Store, Keys, AuditReport), IpamError> {
    let store = Store::connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let report = audit(&store, &keys).await?;
    Ok((store, keys, report))
}

/// Prints every allocation, one line each, sorted by pool and address.
pub async fn list(config: &StoreConfig, pool: Option<&IpNet>) -> Result<(), IpamError> {
    let (_, _, report) = scan(config).await?;
    let wanted = pool.map(pool_id);
    let mut rows: Vec<_> = report
        .allocations
        .iter()
        .filter(|((id, _), _)| wanted.as_ref().is_none_or(|w| w == id))
        .collect();
    rows.sort_by_key(|((id, ip), _)| (id.clone(), *ip));
    println!("POOL\tADDRESS\tNETWORK\tCONTAINER\tIFNAME\tPOD\tNODE\tKIND");
    for ((id, ip), r) in rows {
        let pod = r
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_else(|| "-".into());
        let a = &r.attachment;
        println!(
            "{}\t{ip}\t{}\t{}\t{}\t{}\t{}\t{:?}",
            cidr_of_id(id),
            escaped(&a.network),
            escaped(&a.container_id),
            escaped(&a.ifname),
            escaped(&pod),
            escaped(&r.node),
            r.kind
        );
    }
    Ok(())
}

/// Prints each pool's dynamic size, held addresses and claimed blocks.
pub async fn usage(config: &StoreConfig) -> Result<(), IpamError> {
    let (_, _, report) = scan(config).await?;
    println!("POOL\tDYNAMIC\tHELD\tBLOCKS (node=count)");
    for (id, pool) in &report.pools {
        let held = report.allocations.keys().filter(|(p, _)| p == id).count();
        let mut blocks: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, _, node) in report.blocks.iter().filter(|(p, _, _)| p == id) {
            *blocks.entry(node).or_default() += 1;
        }
        let blocks: Vec<String> = blocks
            .iter()
            .map(|(n, c)| format!("{}={c}", escaped(n)))
            .collect();
        println!(
            "{}\t{}\t{held}\t{}",
            pool.subnet,
            pool.dynamic_size(),
            blocks.join(",")
        );
    }
    Ok(())
}

/// Releases the attachments with this container id and ifname (of `network` only, when given),
/// as a CNI DEL on their node would, wherever this command runs.
pub async fn release(
    config: &StoreConfig,
    network: Option<&str>,
    container_id: &str,
    ifname: &str,
) -> Result<(), IpamError> {
    let (_, keys, report) = scan(config).await?;
    // An attachment whose record cannot be read is found by its key, or by the address records
    // that name it.
    let unreadable = report.bad_keys.iter().filter_map(|k| match keys.parse(k) {
        Some(KeyRef::Attachment(a)) => {
            let node = report.indexed.get(&a)?.first()?.clone();
            Some((node, a))
        }
        _ => None,
    });
    let listed = report
        .attachments
        .iter()
        .map(|(a, (_, r))| (r.node.clone(), a.clone()));
    let holders = report
        .allocations
        .values()
        .map(|r| (r.node.clone(), r.attachment.clone()));
    let found: BTreeSet<(String, Attachment)> = listed
        .chain(unreadable)
        .chain(holders)
        .filter(|(_, a)| {
            a.container_id == container_id
                && a.ifname == ifname
                && network.is_none_or(|n| a.network == n)
        })
        .collect();
    let mut released = 0;
    for (node, attachment) in found {
        let allocator = Allocator::start(config, &node).await?;
        allocator.ready().await?;
        if let Some(record) = allocator.release(&attachment).await? {
            for ip in record.ips {
                released += 1;
                println!(
                    "released {} of pool {} from {} on node {}",
                    ip.ip,
                    cidr_of_id(&ip.pool),
                    escaped(&attachment.to_string()),
                    escaped(&node)
                );
            }
        }
    }
    if released == 0 {
        println!(
            "{}/{} holds no address",
            escaped(container_id),
            escaped(ifname)
        );
    }
    Ok(())
}

/// Releases whatever holds `ip`: its whole attachment when the address record names a readable
/// attachment that lists it, else the address record alone.
pub async fn release_address(
    config: &StoreConfig,
    ip: IpAddr,
    dry_run: bool,
) -> Result<(), IpamError> {
    let (store, keys, report) = scan(config).await?;
    let held: Vec<_> = report
        .allocations
        .iter()
        .filter(|((_, held), _)| *held == ip)
        .collect();
    if held.is_empty() {
        println!("{ip} is not held");
        return Ok(());
    }
    for ((pool, _), record) in held {
        let listed = report
            .attachments
            .get(&record.attachment)
            .is_some_and(|(_, a)| a.ips.iter().any(|x| x.ip == ip && x.pool == *pool));
        let holder = escaped(&record.attachment.to_string());
        if listed && !dry_run {
            let allocator = Allocator::start(config, &record.node).await?;
            allocator.ready().await?;
            allocator.release(&record.attachment).await?;
            println!("released {holder} (it held {ip})");
        } else if listed {
            println!("would release {holder} (it holds {ip})");
        } else if dry_run {
            println!("would delete the address record of {ip} (held by {holder}, which does not list it)");
        } else {
            let key = keys.address(pool, ip);
            delete_if_unchanged(&store, &key).await?;
            println!("deleted {key} (held by {holder}, which did not list it)");
        }
    }
    Ok(())
}

/// Removes a pool that holds no address: its record, its block claims and its entry in the pool
/// index, in one transaction guarded on nothing having been allocated meanwhile.
pub async fn remove_pool(
    config: &StoreConfig,
    subnet: &IpNet,
    dry_run: bool,
) -> Result<(), IpamError> {
    let (store, keys, report) = scan(config).await?;
    let id = pool_id(subnet);
    let pool_key = keys.pool(&id);
    let held = report.allocations.keys().filter(|(p, _)| *p == id).count();
    if held > 0 {
        return Err(refused(format!(
            "pool {subnet} holds {held} addresses; release them first (`list --pool {subnet}`)"
        )));
    }
    let ips_prefix = format!("{pool_key}/ips/");
    let under = format!("{pool_key}/");
    let index_resp = store
        .get("read the pool index", &keys.pool_index(), None)
        .await?;
    let index_kv = index_resp.kvs().first();
    let indexed = index_kv
        .and_then(|kv| serde_json::from_slice::<PoolIndex>(kv.value()).ok())
        .is_some_and(|index| index.subnets.contains(subnet));
    let exists = indexed
        || report.pools.contains_key(&id)
        || report.blocks.iter().any(|(pool, _, _)| *pool == id)
        || (report.bad_keys.iter()).any(|k| *k == pool_key || k.starts_with(&under));
    if !exists {
        return Err(refused(format!("there is no pool {subnet} (see `usage`)")));
    }
    if !dry_run {
        // No address record may appear under the pool meanwhile: a range compare holds only
        // while every key in the range (none) has create revision 0.
        let mut guards = vec![
            Compare::create_revision(ips_prefix.as_str(), CompareOp::Equal, 0)
                .with_range(crate::store::prefix_end(ips_prefix.as_bytes())),
        ];
        let mut ops = vec![
            TxnOp::delete(pool_key.as_str(), None),
            TxnOp::delete(
                under.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ];
        if let Some(kv) = index_kv {
            guards.push(Compare::mod_revision(
                keys.pool_index(),
                CompareOp::Equal,
                kv.mod_revision(),
            ));
            if let Ok(mut index) = serde_json::from_slice::<PoolIndex>(kv.value()) {
                index.subnets.retain(|s| s != subnet);
                index.version = RECORD_VERSION;
                let text = serde_json::to_string(&index).unwrap_or_default();
                ops.push(TxnOp::put(keys.pool_index(), text, None));
            }
        }
        let resp = store
            .txn(
                &format!("remove pool {subnet}"),
                Txn::new().when(guards).and_then(ops),
            )
            .await?;
        if !resp.succeeded() {
            return Err(refused(
                "the pool index changed meanwhile; run again".into(),
            ));
        }
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    println!("{verb} pool {subnet}: {pool_key}, its blocks, and its entry in the pool index");
    Ok(())
}

/// Deletes one key whose record audit cannot read or validate, after printing it.
pub async fn drop_key(config: &StoreConfig, key: &str, dry_run: bool) -> Result<(), IpamError> {
    let (store, keys, report) = scan(config).await?;
    if !report.bad_keys.iter().any(|k| k == key) {
        let why = match keys.parse(key) {
            None if !key.starts_with(&format!("{}/", keys.prefix())) => "is not under the prefix",
            _ => "is not a record audit finds unreadable or invalid (only those can be dropped)",
        };
        return Err(refused(format!("{key} {why}")));
    }
    let resp = store.get("read the key", key, None).await?;
    let Some(kv) = resp.kvs().first() else {
        println!("{key} is gone already");
        return Ok(());
    };
    println!("{key} = {}", escaped(&String::from_utf8_lossy(kv.value())));
    if dry_run {
        println!("would delete {key}");
        return Ok(());
    }
    delete_if_unchanged(&store, key).await?;
    if matches!(
        keys.parse(key),
        Some(KeyRef::Attachment { .. }) | Some(KeyRef::LegacyHandle { .. })
    ) {
        println!("deleted {key}; its addresses, if any, are listed by audit: free them with release-address");
    } else {
        println!("deleted {key}");
    }
    Ok(())
}

async fn delete_if_unchanged(store: &Store, key: &str) -> Result<(), IpamError> {
    let resp = store.get("read the key", key, None).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(());
    };
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key,
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then([TxnOp::delete(key, None)]);
    if !store.txn(&format!("delete {key}"), txn).await?.succeeded() {
        return Err(refused(format!("{key} changed meanwhile; run again")));
    }
    Ok(())
}

fn refused(reason: String) -> IpamError {
    IpamError::Refused { reason }
}

/// Prints every problem found; returns whether etcd is consistent.
pub async fn audit_command(config: &StoreConfig) -> Result<bool, IpamError> {
    let (_, _, report) = scan(config).await?;
    for problem in &report.problems {
        println!("PROBLEM {}", escaped(problem));
    }
    println!(
        "{} pools, {} allocations, {} attachments, {} problems",
        report.pools.len(),
        report.allocations.len(),
        report.attachments.len(),
        report.problems.len()
    );
    Ok(report.problems.is_empty())
}
