//! Operator commands: list allocations, pool usage, release an attachment or an address, audit
//! etcd, and repair what audit finds (remove an empty pool, drop an unreadable key).
//!
//! Each command returns what it found or did as typed rows, and [`Outcome::lines`] is the one
//! place that formats them; the binary only prints the lines and exits as
//! [`Outcome::finish`] says. Tests read the rows without spawning the binary.
//!
//! Text that came from etcd or a runtime (pod names, container ids) is printed escaped, so a
//! name with a newline cannot forge a line of output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnet::IpNet;

use crate::audit::{self, AuditReport};
use crate::pool::{cidr_of_id, pool_id};
use crate::records::{Attachment, KeyRef, Keys, PoolIndex, RECORD_VERSION};
use crate::store::{Store, StoreConfig};
use crate::{Allocator, IpamError, Kind, PodRef};

mod namespaces;
pub use namespaces::{
    namespace_rows, namespaces, unassign_namespace, NamespaceRow, NamespaceSource,
    NamespaceUnassignment,
};
mod output;
pub use output::{Json, OutputFormat};
mod show;
pub use show::{parse_pod_name, pod_holdings, show, PodAddress, PodHoldings, PodName, PodSticky};

/// `text` with control characters escaped, for one field of one output line.
pub fn escaped(text: &str) -> String {
    text.chars().flat_map(char::escape_debug).collect()
}

/// What an operator command found or did: the lines it prints, and how it ends.
pub trait Outcome {
    /// The lines for stdout, with text from etcd or a runtime escaped.
    fn lines(&self) -> Vec<String>;

    /// How the command ends once its lines are printed: `Ok(true)` when it succeeded,
    /// `Ok(false)` when it ran but found something wrong, or the error that stopped it partway
    /// (after what the lines report was done).
    fn finish(self) -> Result<bool, IpamError>
    where
        Self: Sized,
    {
        Ok(true)
    }
}

async fn scan(config: &StoreConfig) -> Result<(Store, Keys, AuditReport), IpamError> {
    let store = Store::connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let report = audit::audit(&store, &keys).await?;
    Ok((store, keys, report))
}

/// One address record, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationRow {
    /// The pool's subnet, as the record's key names it.
    pub pool: String,
    pub ip: IpAddr,
    pub attachment: Attachment,
    pub pod: Option<PodRef>,
    pub node: String,
    pub kind: Kind,
}

impl AllocationRow {
    /// The column names, tab-separated as the rows are.
    pub const HEADER: &'static str = "POOL\tADDRESS\tNETWORK\tCONTAINER\tIFNAME\tPOD\tNODE\tKIND";
}

impl fmt::Display for AllocationRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pod = self
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_else(|| "-".into());
        let a = &self.attachment;
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:?}",
            escaped(&self.pool),
            self.ip,
            escaped(&a.network),
            escaped(&a.container_id),
            escaped(&a.ifname),
            escaped(&pod),
            escaped(&self.node),
            self.kind
        )
    }
}

impl Outcome for Vec<AllocationRow> {
    fn lines(&self) -> Vec<String> {
        let rows = self.iter().map(AllocationRow::to_string);
        std::iter::once(AllocationRow::HEADER.to_string())
            .chain(rows)
            .collect()
    }
}

/// Every address record the scan found (of the pool with this subnet only, when given), sorted
/// by pool and address.
pub fn allocation_rows(report: &AuditReport, pool: Option<&IpNet>) -> Vec<AllocationRow> {
    let wanted = pool.map(pool_id);
    let mut held: Vec<_> = report
        .allocations
        .iter()
        .filter(|((id, _), _)| wanted.as_ref().is_none_or(|w| w == id))
        .collect();
    held.sort_by_key(|((id, ip), _)| (id.clone(), *ip));
    held.into_iter()
        .map(|((id, ip), r)| AllocationRow {
            pool: cidr_of_id(id),
            ip: *ip,
            attachment: r.attachment.clone(),
            pod: r.pod.clone(),
            node: r.node.clone(),
            kind: r.kind,
        })
        .collect()
}

/// Every allocation (of the pool with this subnet only, when given), sorted by pool and address.
pub async fn list(
    config: &StoreConfig,
    pool: Option<&IpNet>,
) -> Result<Vec<AllocationRow>, IpamError> {
    let (_, _, report) = scan(config).await?;
    Ok(allocation_rows(&report, pool))
}

/// One pool, as `usage` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub subnet: IpNet,
    /// Addresses the pool hands out dynamically.
    pub dynamic: u128,
    /// Address records in the pool, of any kind.
    pub held: usize,
    /// Claimed blocks, counted by the node that claimed them.
    pub blocks: BTreeMap<String, u64>,
}

impl PoolUsage {
    /// The column names, tab-separated as the rows are.
    pub const HEADER: &'static str = "POOL\tDYNAMIC\tHELD\tBLOCKS (node=count)";
}

impl fmt::Display for PoolUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let blocks: Vec<String> = self
            .blocks
            .iter()
            .map(|(node, count)| format!("{}={count}", escaped(node)))
            .collect();
        write!(
            f,
            "{}\t{}\t{}\t{}",
            self.subnet,
            self.dynamic,
            self.held,
            blocks.join(",")
        )
    }
}

impl Outcome for Vec<PoolUsage> {
    fn lines(&self) -> Vec<String> {
        let rows = self.iter().map(PoolUsage::to_string);
        std::iter::once(PoolUsage::HEADER.to_string())
            .chain(rows)
            .collect()
    }
}

/// Each pool with a valid record, in the order of its id.
pub fn pool_usage(report: &AuditReport) -> Vec<PoolUsage> {
    report
        .pools
        .iter()
        .map(|(id, pool)| {
            let mut blocks: BTreeMap<String, u64> = BTreeMap::new();
            for (_, _, node) in report.blocks.iter().filter(|(p, _, _)| p == id) {
                *blocks.entry(node.clone()).or_default() += 1;
            }
            PoolUsage {
                subnet: pool.subnet,
                dynamic: pool.dynamic_size(),
                held: report.allocations.keys().filter(|(p, _)| p == id).count(),
                blocks,
            }
        })
        .collect()
}

/// Each pool's dynamic size, held addresses and claimed blocks.
pub async fn usage(config: &StoreConfig) -> Result<Vec<PoolUsage>, IpamError> {
    let (_, _, report) = scan(config).await?;
    Ok(pool_usage(&report))
}

/// What `audit` found: the counts, and every problem (each starts with its key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditSummary {
    pub pools: usize,
    pub allocations: usize,
    pub attachments: usize,
    pub problems: Vec<String>,
}

impl AuditSummary {
    /// Whether etcd holds no problem.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

impl From<&AuditReport> for AuditSummary {
    fn from(report: &AuditReport) -> Self {
        AuditSummary {
            pools: report.pools.len(),
            allocations: report.allocations.len(),
            attachments: report.attachments.len(),
            problems: report.problems.clone(),
        }
    }
}

impl Outcome for AuditSummary {
    fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = (self.problems.iter())
            .map(|p| format!("PROBLEM {}", escaped(p)))
            .collect();
        lines.push(format!(
            "{} pools, {} allocations, {} attachments, {} problems",
            self.pools,
            self.allocations,
            self.attachments,
            self.problems.len()
        ));
        lines
    }

    fn finish(self) -> Result<bool, IpamError> {
        Ok(self.is_consistent())
    }
}

/// Scans etcd: the counts and every problem found.
pub async fn audit(config: &StoreConfig) -> Result<AuditSummary, IpamError> {
    let (_, _, report) = scan(config).await?;
    Ok(AuditSummary::from(&report))
}

/// An address `release` freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedAddress {
    pub ip: IpAddr,
    /// The pool's subnet, as the record's key names it.
    pub pool: String,
    pub attachment: Attachment,
    /// The node the attachment was released for.
    pub node: String,
}

/// What `release` did: the addresses freed, in order, and the error that stopped it, if one did.
#[derive(Debug)]
pub struct Release {
    pub container_id: String,
    pub ifname: String,
    pub released: Vec<ReleasedAddress>,
    pub stopped: Option<IpamError>,
}

impl Outcome for Release {
    fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = (self.released.iter())
            .map(|r| {
                format!(
                    "released {} of pool {} from {} on node {}",
                    r.ip,
                    escaped(&r.pool),
                    escaped(&r.attachment.to_string()),
                    escaped(&r.node)
                )
            })
            .collect();
        if lines.is_empty() && self.stopped.is_none() {
            lines.push(format!(
                "{}/{} holds no address",
                escaped(&self.container_id),
                escaped(&self.ifname)
            ));
        }
        lines
    }

    fn finish(self) -> Result<bool, IpamError> {
        self.stopped.map_or(Ok(true), Err)
    }
}

/// Releases the attachments with this container id and ifname (of `network` only, when given),
/// as a CNI DEL on their node would, wherever this command runs.
pub async fn release(
    config: &StoreConfig,
    network: Option<&str>,
    container_id: &str,
    ifname: &str,
) -> Result<Release, IpamError> {
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
    let mut outcome = Release {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        released: Vec::new(),
        stopped: None,
    };
    for (node, attachment) in found {
        match release_on(config, &node, &attachment).await {
            Ok(ips) => outcome
                .released
                .extend(ips.into_iter().map(|(ip, pool)| ReleasedAddress {
                    ip,
                    pool: cidr_of_id(&pool),
                    attachment: attachment.clone(),
                    node: node.clone(),
                })),
            Err(e) => {
                outcome.stopped = Some(e);
                break;
            }
        }
    }
    Ok(outcome)
}

/// Releases `attachment` as the allocator of `node` would; the addresses (and pool ids) freed.
async fn release_on(
    config: &StoreConfig,
    node: &str,
    attachment: &Attachment,
) -> Result<Vec<(IpAddr, String)>, IpamError> {
    let allocator = Allocator::start(config, node).await?;
    allocator.ready().await?;
    let record = allocator.release(attachment).await?;
    Ok(record
        .map(|r| r.ips.into_iter().map(|x| (x.ip, x.pool)).collect())
        .unwrap_or_default())
}

/// What `release-address` did (or, in a dry run, would do) about one holder of the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressAction {
    /// The holder lists the address: its whole attachment is released.
    ReleaseAttachment { holder: Attachment, dry_run: bool },
    /// The holder does not list the address: only the address record at `key` is deleted.
    DeleteRecord {
        key: String,
        holder: Attachment,
        dry_run: bool,
    },
}

/// What `release-address` did, holder by holder, and the error that stopped it, if one did.
#[derive(Debug)]
pub struct AddressRelease {
    pub ip: IpAddr,
    pub actions: Vec<AddressAction>,
    pub stopped: Option<IpamError>,
}

impl Outcome for AddressRelease {
    fn lines(&self) -> Vec<String> {
        let ip = self.ip;
        let mut lines: Vec<String> = (self.actions.iter())
            .map(|action| match action {
                AddressAction::ReleaseAttachment { holder, dry_run } => {
                    let holder = escaped(&holder.to_string());
                    if *dry_run {
                        format!("would release {holder} (it holds {ip})")
                    } else {
                        format!("released {holder} (it held {ip})")
                    }
                }
                AddressAction::DeleteRecord {
                    key,
                    holder,
                    dry_run,
                } => {
                    let holder = escaped(&holder.to_string());
                    if *dry_run {
                        format!("would delete the address record of {ip} (held by {holder}, which does not list it)")
                    } else {
                        let key = escaped(key);
                        format!("deleted {key} (held by {holder}, which did not list it)")
                    }
                }
            })
            .collect();
        if lines.is_empty() && self.stopped.is_none() {
            lines.push(format!("{ip} is not held"));
        }
        lines
    }

    fn finish(self) -> Result<bool, IpamError> {
        self.stopped.map_or(Ok(true), Err)
    }
}

/// Releases whatever holds `ip`: its whole attachment when the address record names a readable
/// attachment that lists it, else the address record alone.
pub async fn release_address(
    config: &StoreConfig,
    ip: IpAddr,
    dry_run: bool,
) -> Result<AddressRelease, IpamError> {
    let (store, keys, report) = scan(config).await?;
    let mut outcome = AddressRelease {
        ip,
        actions: Vec::new(),
        stopped: None,
    };
    let held = (report.allocations.iter()).filter(|((_, held), _)| *held == ip);
    for ((pool, _), record) in held {
        let listed = report
            .attachments
            .get(&record.attachment)
            .is_some_and(|(_, a)| a.ips.iter().any(|x| x.ip == ip && x.pool == *pool));
        let holder = record.attachment.clone();
        let (action, done) = if listed {
            let done = match dry_run {
                true => Ok(()),
                false => release_on(config, &record.node, &holder).await.map(drop),
            };
            (AddressAction::ReleaseAttachment { holder, dry_run }, done)
        } else {
            let key = keys.address(pool, ip);
            let done = match dry_run {
                true => Ok(()),
                false => delete_if_unchanged(&store, &key).await,
            };
            let action = AddressAction::DeleteRecord {
                key,
                holder,
                dry_run,
            };
            (action, done)
        };
        if let Err(e) = done {
            outcome.stopped = Some(e);
            break;
        }
        outcome.actions.push(action);
    }
    Ok(outcome)
}

/// What `remove-pool` removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRemoval {
    pub subnet: IpNet,
    /// The pool's record; its blocks are under it.
    pub key: String,
    pub dry_run: bool,
}

impl Outcome for PoolRemoval {
    fn lines(&self) -> Vec<String> {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        vec![format!(
            "{verb} pool {}: {}, its blocks, and its entry in the pool index",
            self.subnet, self.key
        )]
    }
}

/// Removes a pool that holds no address: its record, its block claims and its entry in the pool
/// index, in one transaction guarded on nothing having been allocated meanwhile.
pub async fn remove_pool(
    config: &StoreConfig,
    subnet: &IpNet,
    dry_run: bool,
) -> Result<PoolRemoval, IpamError> {
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
    Ok(PoolRemoval {
        subnet: *subnet,
        key: pool_key,
        dry_run,
    })
}

/// What `drop-key` found under the key and did with it.
#[derive(Debug)]
pub enum KeyDrop {
    /// The key was deleted by someone else since the scan.
    Gone { key: String },
    /// A dry run: the key and the value left in place.
    WouldDelete { key: String, value: Vec<u8> },
    /// Deleted. `attachment` when it held an attachment record, whose addresses audit then
    /// lists for `release-address`.
    Deleted {
        key: String,
        value: Vec<u8>,
        attachment: bool,
    },
    /// Read, but deleting it failed.
    Stopped {
        key: String,
        value: Vec<u8>,
        error: IpamError,
    },
}

impl Outcome for KeyDrop {
    fn lines(&self) -> Vec<String> {
        let shown = |key: &str, value: &[u8]| {
            format!("{key} = {}", escaped(&String::from_utf8_lossy(value)))
        };
        match self {
            KeyDrop::Gone { key } => vec![format!("{key} is gone already")],
            KeyDrop::WouldDelete { key, value } => {
                vec![shown(key, value), format!("would delete {key}")]
            }
            KeyDrop::Deleted {
                key,
                value,
                attachment,
            } => {
                let done = if *attachment {
                    format!("deleted {key}; its addresses, if any, are listed by audit: free them with release-address")
                } else {
                    format!("deleted {key}")
                };
                vec![shown(key, value), done]
            }
            KeyDrop::Stopped { key, value, .. } => vec![shown(key, value)],
        }
    }

    fn finish(self) -> Result<bool, IpamError> {
        match self {
            KeyDrop::Stopped { error, .. } => Err(error),
            _ => Ok(true),
        }
    }
}

/// Deletes one key whose record audit cannot read or validate; the outcome shows its value.
pub async fn drop_key(
    config: &StoreConfig,
    key: &str,
    dry_run: bool,
) -> Result<KeyDrop, IpamError> {
    let (store, keys, report) = scan(config).await?;
    if !report.bad_keys.iter().any(|k| k == key) {
        let why = match keys.parse(key) {
            None if !key.starts_with(&format!("{}/", keys.prefix())) => "is not under the prefix",
            _ => "is not a record audit finds unreadable or invalid (only those can be dropped)",
        };
        return Err(refused(format!("{key} {why}")));
    }
    let resp = store.get("read the key", key, None).await?;
    let key = key.to_string();
    let Some(kv) = resp.kvs().first() else {
        return Ok(KeyDrop::Gone { key });
    };
    let value = kv.value().to_vec();
    if dry_run {
        return Ok(KeyDrop::WouldDelete { key, value });
    }
    if let Err(error) = delete_if_unchanged(&store, &key).await {
        return Ok(KeyDrop::Stopped { key, value, error });
    }
    let attachment = matches!(
        keys.parse(&key),
        Some(KeyRef::Attachment { .. }) | Some(KeyRef::LegacyHandle { .. })
    );
    Ok(KeyDrop::Deleted {
        key,
        value,
        attachment,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::parse_range_sets;
    use crate::records::AllocationRecord;
    use serde_json::json;

    fn attachment(container_id: &str) -> Attachment {
        Attachment::new("net", container_id, "eth0")
    }

    fn pod(name: &str) -> Option<PodRef> {
        Some(PodRef {
            namespace: "prod".into(),
            name: name.into(),
            uid: String::new(),
        })
    }

    fn row(pod_name: &str) -> AllocationRow {
        AllocationRow {
            pool: "10.0.0.0/24".into(),
            ip: "10.0.0.5".parse().expect("literal"),
            attachment: attachment("c1"),
            pod: pod(pod_name),
            node: "node-a".into(),
            kind: Kind::Dynamic,
        }
    }

    fn report(subnets: &[&str], held: &[(&str, &str, &str)]) -> AuditReport {
        let mut report = AuditReport::default();
        for subnet in subnets {
            let sets = parse_range_sets(&json!({ "subnet": subnet })).expect("valid");
            let pool = sets[0].pools[0].clone();
            report.pools.insert(pool.id(), pool);
        }
        for (subnet, ip, container_id) in held {
            let id = pool_id(&subnet.parse().expect("literal"));
            let record = AllocationRecord {
                version: RECORD_VERSION,
                attachment: attachment(container_id),
                pod: None,
                node: "node-a".into(),
                kind: Kind::Exact,
                allocated_at: 0,
            };
            let ip = ip.parse().expect("literal");
            report.allocations.insert((id, ip), record);
        }
        report
    }

    #[test]
    fn an_allocation_row_has_one_tab_separated_field_per_header_column() {
        let line = row("db-0").to_string();
        assert_eq!(
            line,
            "10.0.0.0/24\t10.0.0.5\tnet\tc1\teth0\tprod/db-0\tnode-a\tDynamic"
        );
        assert_eq!(
            line.split('\t').count(),
            AllocationRow::HEADER.split('\t').count()
        );
        let no_pod = AllocationRow {
            pod: None,
            ..row("")
        };
        assert_eq!(no_pod.to_string().split('\t').nth(5), Some("-"));
    }

    #[test]
    fn a_pod_name_with_a_newline_cannot_forge_a_row() {
        let rows = vec![row("db-0\n10.0.0.0/24\t10.0.0.6")];
        let lines = rows.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0], AllocationRow::HEADER);
        assert_eq!(
            lines[1],
            r"10.0.0.0/24	10.0.0.5	net	c1	eth0	prod/db-0\n10.0.0.0/24\t10.0.0.6	node-a	Dynamic"
        );
        assert_eq!(lines[1].split('\t').count(), 8);
    }

    #[test]
    fn rows_are_sorted_by_pool_and_address_and_filtered_by_pool() {
        let report = report(
            &["10.0.0.0/24", "10.0.1.0/24"],
            &[
                ("10.0.1.0/24", "10.0.1.3", "c3"),
                ("10.0.0.0/24", "10.0.0.10", "c2"),
                ("10.0.0.0/24", "10.0.0.9", "c1"),
            ],
        );
        let held = |rows: Vec<AllocationRow>| -> Vec<(String, String)> {
            rows.iter()
                .map(|r| (r.ip.to_string(), r.attachment.container_id.clone()))
                .collect()
        };
        let pair = |ip: &str, c: &str| (ip.to_string(), c.to_string());
        assert_eq!(
            held(allocation_rows(&report, None)),
            vec![
                pair("10.0.0.9", "c1"),
                pair("10.0.0.10", "c2"),
                pair("10.0.1.3", "c3")
            ]
        );
        let pool: IpNet = "10.0.1.0/24".parse().expect("literal");
        let rows = allocation_rows(&report, Some(&pool));
        assert_eq!(held(rows.clone()), vec![pair("10.0.1.3", "c3")]);
        assert_eq!(rows[0].pool, "10.0.1.0/24");
        let elsewhere: IpNet = "10.9.0.0/24".parse().expect("literal");
        assert!(allocation_rows(&report, Some(&elsewhere)).is_empty());
    }

    #[test]
    fn usage_counts_held_addresses_and_blocks_by_node() {
        let mut report = report(
            &["10.0.0.0/24", "10.0.1.0/24"],
            &[
                ("10.0.0.0/24", "10.0.0.9", "c1"),
                ("10.0.0.0/24", "10.0.0.10", "c2"),
            ],
        );
        let id = pool_id(&"10.0.0.0/24".parse().expect("literal"));
        for (block, node) in [
            ("10.0.0.0/26", "node-b"),
            ("10.0.0.64/26", "node-a"),
            ("10.0.0.128/26", "node-b"),
        ] {
            let block = block.parse().expect("literal");
            report.blocks.push((id.clone(), block, node.into()));
        }
        let usage = pool_usage(&report);
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].subnet.to_string(), "10.0.0.0/24");
        assert_eq!(usage[0].held, 2);
        let blocks: Vec<(&str, u64)> = (usage[0].blocks.iter())
            .map(|(n, c)| (n.as_str(), *c))
            .collect();
        assert_eq!(blocks, vec![("node-a", 1), ("node-b", 2)]);
        assert_eq!(usage[1].held, 0);
        assert!(usage[1].blocks.is_empty());
        let lines = usage.lines();
        assert_eq!(lines[0], PoolUsage::HEADER);
        assert_eq!(
            lines[1],
            format!("10.0.0.0/24\t{}\t2\tnode-a=1,node-b=2", usage[0].dynamic)
        );
        assert_eq!(lines[2], format!("10.0.1.0/24\t{}\t0\t", usage[1].dynamic));
    }

    #[test]
    fn a_node_name_with_a_newline_stays_in_its_usage_row() {
        let usage = PoolUsage {
            subnet: "10.0.0.0/24".parse().expect("literal"),
            dynamic: 253,
            held: 0,
            blocks: BTreeMap::from([("a\nb".to_string(), 1)]),
        };
        assert_eq!(usage.to_string(), r"10.0.0.0/24	253	0	a\nb=1");
    }

    #[test]
    fn audit_prints_each_problem_escaped_then_the_counts_and_fails_on_any() {
        let clean = AuditSummary {
            pools: 1,
            allocations: 2,
            attachments: 2,
            problems: vec![],
        };
        assert_eq!(
            clean.lines(),
            vec!["1 pools, 2 allocations, 2 attachments, 0 problems"]
        );
        assert!(clean.finish().expect("no error"));
        let broken = AuditSummary {
            problems: vec!["/p/pools/x: unreadable\nrecord".into()],
            ..AuditSummary::default()
        };
        assert_eq!(
            broken.lines(),
            vec![
                r"PROBLEM /p/pools/x: unreadable\nrecord",
                "0 pools, 0 allocations, 0 attachments, 1 problems"
            ]
        );
        assert!(!broken.finish().expect("no error"));
    }

    #[test]
    fn a_release_says_what_it_freed_or_that_nothing_was_held() {
        let nothing = Release {
            container_id: "c\n1".into(),
            ifname: "eth0".into(),
            released: vec![],
            stopped: None,
        };
        assert_eq!(nothing.lines(), vec![r"c\n1/eth0 holds no address"]);
        let freed = Release {
            released: vec![ReleasedAddress {
                ip: "10.0.0.5".parse().expect("literal"),
                pool: "10.0.0.0/24".into(),
                attachment: attachment("c1"),
                node: "node-a".into(),
            }],
            stopped: Some(refused("etcd went away".into())),
            ..nothing
        };
        assert_eq!(
            freed.lines(),
            vec![
                "released 10.0.0.5 of pool 10.0.0.0/24 from c1/eth0 of network net on node node-a"
            ]
        );
        assert!(freed.finish().is_err(), "the error that stopped it is kept");
    }

    #[test]
    fn an_address_release_names_each_action_and_its_dry_run() {
        let ip: IpAddr = "10.0.0.5".parse().expect("literal");
        let outcome = |actions| AddressRelease {
            ip,
            actions,
            stopped: None,
        };
        assert_eq!(outcome(vec![]).lines(), vec!["10.0.0.5 is not held"]);
        let holder = attachment("c1");
        let record = |dry_run| AddressAction::DeleteRecord {
            key: "/p/pools/10.0.0.0_24/ips/10.0.0.5".into(),
            holder: holder.clone(),
            dry_run,
        };
        let whole = |dry_run| AddressAction::ReleaseAttachment {
            holder: holder.clone(),
            dry_run,
        };
        assert_eq!(
            outcome(vec![whole(true), whole(false), record(true), record(false)]).lines(),
            vec![
                "would release c1/eth0 of network net (it holds 10.0.0.5)",
                "released c1/eth0 of network net (it held 10.0.0.5)",
                "would delete the address record of 10.0.0.5 (held by c1/eth0 of network net, which does not list it)",
                "deleted /p/pools/10.0.0.0_24/ips/10.0.0.5 (held by c1/eth0 of network net, which did not list it)",
            ]
        );
    }

    #[test]
    fn a_dropped_key_shows_its_value_escaped_and_what_became_of_it() {
        let key = "/p/attachments/net/c1/eth0".to_string();
        let value = b"{\"ips\":\n".to_vec();
        let shown = r#"/p/attachments/net/c1/eth0 = {\"ips\":\n"#;
        let dry = KeyDrop::WouldDelete {
            key: key.clone(),
            value: value.clone(),
        };
        assert_eq!(
            dry.lines(),
            vec![shown, "would delete /p/attachments/net/c1/eth0"]
        );
        let deleted = KeyDrop::Deleted {
            key: key.clone(),
            value: value.clone(),
            attachment: true,
        };
        assert_eq!(deleted.lines()[0], shown);
        assert!(deleted.lines()[1].ends_with("free them with release-address"));
        let stopped = KeyDrop::Stopped {
            key: key.clone(),
            value,
            error: refused(format!("{key} changed meanwhile; run again")),
        };
        assert_eq!(stopped.lines(), vec![shown]);
        assert!(stopped.finish().is_err());
        let gone = KeyDrop::Gone { key };
        assert_eq!(
            gone.lines(),
            vec!["/p/attachments/net/c1/eth0 is gone already"]
        );
    }

    #[test]
    fn a_pool_removal_names_the_pool_and_its_record() {
        let removal = PoolRemoval {
            subnet: "10.0.0.0/24".parse().expect("literal"),
            key: "/p/pools/10.0.0.0_24".into(),
            dry_run: true,
        };
        assert_eq!(
            removal.lines(),
            vec!["would remove pool 10.0.0.0/24: /p/pools/10.0.0.0_24, its blocks, and its entry in the pool index"]
        );
        let done = PoolRemoval {
            dry_run: false,
            ..removal
        };
        assert!(done.lines()[0].starts_with("removed pool 10.0.0.0/24"));
    }
}
