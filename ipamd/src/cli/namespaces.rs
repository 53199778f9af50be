//! `namespaces`: which namespace may use which subnets, from the `hostnic-ipam-config`
//! ConfigMap (when the command can read it) and the blocks auto-assigned in etcd.

use std::fmt;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnet::IpNet;

use super::{escaped, scan, Outcome};
use crate::audit::AuditReport;
use crate::namespaces::{NamespaceMapping, DEFAULT_ENTRY};
use crate::records::{Keys, NamespaceRecord};
use crate::store::Store;
use crate::{IpamError, StoreConfig};

/// Where a namespace's subnets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NamespaceSource {
    /// The ConfigMap's entry for it (or `Default`).
    ConfigMap,
    /// Blocks assigned automatically, recorded at `namespaces/<namespace>` in etcd.
    Auto,
}

/// One namespace's subnets, as `namespaces` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRow {
    pub namespace: String,
    pub source: NamespaceSource,
    pub blocks: Vec<IpNet>,
    /// ConfigMap entries that name no addresses (vxnet ids).
    pub unmapped: Vec<String>,
}

impl NamespaceRow {
    /// The column names, tab-separated as the rows are.
    pub const HEADER: &'static str = "NAMESPACE\tSOURCE\tBLOCKS\tUNMAPPED";
}

impl fmt::Display for NamespaceRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(",")
            }
        };
        let source = match self.source {
            NamespaceSource::ConfigMap => "configmap",
            NamespaceSource::Auto => "auto",
        };
        write!(
            f,
            "{}\t{source}\t{}\t{}",
            escaped(&self.namespace),
            list(self.blocks.iter().map(ToString::to_string).collect()),
            escaped(&list(self.unmapped.clone()))
        )
    }
}

impl Outcome for Vec<NamespaceRow> {
    fn lines(&self) -> Vec<String> {
        let rows = self.iter().map(NamespaceRow::to_string);
        std::iter::once(NamespaceRow::HEADER.to_string())
            .chain(rows)
            .collect()
    }
}

/// The ConfigMap's entries (when given) and every namespace's auto-assigned blocks, sorted by
/// namespace, ConfigMap first.
pub fn namespace_rows(
    report: &AuditReport,
    mapping: Option<&NamespaceMapping>,
) -> Vec<NamespaceRow> {
    let mut rows = Vec::new();
    if let Some(m) = mapping {
        let default = m.default.iter().map(|e| (DEFAULT_ENTRY.to_string(), e));
        let named = m.namespaces.iter().map(|(n, e)| (n.clone(), e));
        for (namespace, entries) in default.chain(named) {
            rows.push(NamespaceRow {
                namespace,
                source: NamespaceSource::ConfigMap,
                blocks: entries.cidrs.clone(),
                unmapped: entries.unmapped.clone(),
            });
        }
    }
    for (namespace, blocks) in &report.namespaces {
        rows.push(NamespaceRow {
            namespace: namespace.clone(),
            source: NamespaceSource::Auto,
            blocks: blocks.clone(),
            unmapped: Vec::new(),
        });
    }
    rows.sort_by(|a, b| (&a.namespace, a.source).cmp(&(&b.namespace, b.source)));
    rows
}

/// Every namespace's subnets: the ConfigMap's `mapping` when the caller could read it, and the
/// blocks auto-assigned in etcd.
pub async fn namespaces(
    config: &StoreConfig,
    mapping: Option<&NamespaceMapping>,
) -> Result<Vec<NamespaceRow>, IpamError> {
    let (_, _, report) = scan(config).await?;
    Ok(namespace_rows(&report, mapping))
}

/// What `unassign-namespace` removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceUnassignment {
    pub namespace: String,
    pub blocks: Vec<IpNet>,
    pub dry_run: bool,
}

impl Outcome for NamespaceUnassignment {
    fn lines(&self) -> Vec<String> {
        let verb = if self.dry_run { "would take" } else { "took" };
        let blocks: Vec<String> = self.blocks.iter().map(ToString::to_string).collect();
        vec![format!(
            "{verb} block(s) {} from namespace {}; addresses held in them stay held",
            blocks.join(", "),
            escaped(&self.namespace)
        )]
    }
}

/// Takes every auto-assigned block from `namespace` (a namespace that was deleted): its record
/// and the blocks' index records, in one transaction guarded on the record being unchanged.
/// Addresses held in the blocks are left alone; the blocks can then be given to another
/// namespace once they hold none.
pub async fn unassign_namespace(
    config: &StoreConfig,
    namespace: &str,
    dry_run: bool,
) -> Result<NamespaceUnassignment, IpamError> {
    let store = Store::connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let key = keys.namespace(namespace);
    let resp = store.get("read the namespace's blocks", &key, None).await?;
    let Some(kv) = resp.kvs().first() else {
        return Err(IpamError::Refused {
            reason: format!("namespace {namespace:?} has no auto-assigned block ({key} is absent)"),
        });
    };
    let record: NamespaceRecord =
        serde_json::from_slice(kv.value()).map_err(|e| IpamError::Corrupt {
            key: key.clone(),
            reason: format!("{e} (remove it with `drop-key`)"),
        })?;
    let outcome = NamespaceUnassignment {
        namespace: namespace.to_string(),
        blocks: record.blocks.clone(),
        dry_run,
    };
    if dry_run {
        return Ok(outcome);
    }
    let mut deletes = vec![TxnOp::delete(key.as_str(), None)];
    deletes.extend(
        record
            .blocks
            .iter()
            .map(|b| TxnOp::delete(keys.namespace_block(b), None)),
    );
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then(deletes);
    let op = format!("take the blocks of namespace {namespace}");
    if !store.txn(&op, txn).await?.succeeded() {
        return Err(IpamError::Refused {
            reason: format!("{key} changed meanwhile; run again"),
        });
    }
    Ok(outcome)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn rows_list_the_config_map_entries_and_the_auto_assigned_blocks_by_namespace() {
        let data: BTreeMap<String, String> = [(
            "ipam".to_string(),
            r#"{"Default": ["10.1.0.0/17"], "apps": ["10.1.1.0/26", "vxnet-a"]}"#.to_string(),
        )]
        .into();
        let mapping = NamespaceMapping::from_config_map(&data).unwrap();
        let mut report = AuditReport::default();
        report
            .namespaces
            .insert("web".into(), vec!["10.1.0.64/26".parse().unwrap()]);
        let lines = namespace_rows(&report, Some(&mapping)).lines();
        assert_eq!(
            lines,
            vec![
                NamespaceRow::HEADER.to_string(),
                "Default\tconfigmap\t10.1.0.0/17\t-".to_string(),
                "apps\tconfigmap\t10.1.1.0/26\tvxnet-a".to_string(),
                "web\tauto\t10.1.0.64/26\t-".to_string(),
            ]
        );
        assert_eq!(namespace_rows(&report, None).len(), 1);
    }
}
