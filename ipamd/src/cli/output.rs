//! `--output json`: every operator command's outcome as one JSON document on stdout, for
//! scripts, next to the table that [`Outcome::lines`](super::Outcome::lines) prints for people.
//!
//! The documents are views built here, not the internal types serialized as they are, so that
//! their field names (camelCase) stay stable when the types change. Text from etcd or a runtime
//! is carried raw: JSON escaping keeps it from forging anything. Every document is an object;
//! an outcome that stopped partway carries the error in `error` (the command still exits as the
//! table's would).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::namespaces::{NamespaceRow, NamespaceSource, NamespaceUnassignment};
use super::{
    AddressAction, AddressRelease, AllocationRow, AuditSummary, KeyDrop, PoolRemoval, PoolUsage,
    Release,
};
use crate::pool::cidr_of_id;
use crate::records::{Attachment, Kind, PodRef};
use crate::{netns_gc, node_gc, pod_gc, sticky_gc};

/// How an operator command prints what it found or did (`--output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Tab-separated rows and sentences, text from etcd escaped.
    #[default]
    Table,
    /// One JSON document (an object) with camelCase field names.
    Json,
}

/// An outcome that renders itself as one JSON document.
pub trait Json {
    /// The document, pretty-printed.
    fn json(&self) -> serde_json::Result<String>;
}

fn document(view: &impl Serialize) -> serde_json::Result<String> {
    serde_json::to_string_pretty(view)
}

/// An attachment's three parts, flattened into the object that names it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentView<'a> {
    network: &'a str,
    container_id: &'a str,
    ifname: &'a str,
}

impl<'a> From<&'a Attachment> for AttachmentView<'a> {
    fn from(a: &'a Attachment) -> Self {
        AttachmentView {
            network: &a.network,
            container_id: &a.container_id,
            ifname: &a.ifname,
        }
    }
}

/// A pod, with its UID always present (empty when the runtime sent none).
#[derive(Debug, Serialize)]
struct PodView<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

impl<'a> From<&'a PodRef> for PodView<'a> {
    fn from(p: &'a PodRef) -> Self {
        PodView {
            namespace: &p.namespace,
            name: &p.name,
            uid: &p.uid,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AllocationView<'a> {
    pool: &'a str,
    ip: IpAddr,
    #[serde(flatten)]
    attachment: AttachmentView<'a>,
    pod: Option<PodView<'a>>,
    node: &'a str,
    kind: Kind,
}

impl Json for Vec<AllocationRow> {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct List<'a> {
            allocations: Vec<AllocationView<'a>>,
        }
        let allocations = (self.iter())
            .map(|r| AllocationView {
                pool: &r.pool,
                ip: r.ip,
                attachment: (&r.attachment).into(),
                pod: r.pod.as_ref().map(PodView::from),
                node: &r.node,
                kind: r.kind,
            })
            .collect();
        document(&List { allocations })
    }
}

impl Json for Vec<PoolUsage> {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct Pool<'a> {
            subnet: ipnet::IpNet,
            dynamic: u128,
            held: usize,
            blocks: &'a BTreeMap<String, u64>,
        }
        #[derive(Serialize)]
        struct Usage<'a> {
            pools: Vec<Pool<'a>>,
        }
        let pools = (self.iter())
            .map(|p| Pool {
                subnet: p.subnet,
                dynamic: p.dynamic,
                held: p.held,
                blocks: &p.blocks,
            })
            .collect();
        document(&Usage { pools })
    }
}

impl Json for AuditSummary {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct Audit<'a> {
            pools: usize,
            allocations: usize,
            attachments: usize,
            problems: &'a [String],
            consistent: bool,
        }
        document(&Audit {
            pools: self.pools,
            allocations: self.allocations,
            attachments: self.attachments,
            problems: &self.problems,
            consistent: self.is_consistent(),
        })
    }
}

impl Json for Release {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Freed<'a> {
            ip: IpAddr,
            pool: &'a str,
            #[serde(flatten)]
            attachment: AttachmentView<'a>,
            node: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            container_id: &'a str,
            ifname: &'a str,
            released: Vec<Freed<'a>>,
            error: Option<String>,
        }
        document(&View {
            container_id: &self.container_id,
            ifname: &self.ifname,
            released: (self.released.iter())
                .map(|r| Freed {
                    ip: r.ip,
                    pool: &r.pool,
                    attachment: (&r.attachment).into(),
                    node: &r.node,
                })
                .collect(),
            error: self.stopped.as_ref().map(ToString::to_string),
        })
    }
}

impl Json for AddressRelease {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Action<'a> {
            /// `releaseAttachment` or `deleteRecord`.
            action: &'static str,
            dry_run: bool,
            /// The holder the address record names.
            #[serde(flatten)]
            holder: AttachmentView<'a>,
            /// The address record deleted alone (`deleteRecord` only).
            key: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct View<'a> {
            ip: IpAddr,
            actions: Vec<Action<'a>>,
            error: Option<String>,
        }
        let actions = (self.actions.iter())
            .map(|a| match a {
                AddressAction::ReleaseAttachment { holder, dry_run } => Action {
                    action: "releaseAttachment",
                    dry_run: *dry_run,
                    holder: holder.into(),
                    key: None,
                },
                AddressAction::DeleteRecord {
                    key,
                    holder,
                    dry_run,
                } => Action {
                    action: "deleteRecord",
                    dry_run: *dry_run,
                    holder: holder.into(),
                    key: Some(key),
                },
            })
            .collect();
        document(&View {
            ip: self.ip,
            actions,
            error: self.stopped.as_ref().map(ToString::to_string),
        })
    }
}

impl Json for PoolRemoval {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            subnet: ipnet::IpNet,
            key: &'a str,
            dry_run: bool,
        }
        document(&View {
            subnet: self.subnet,
            key: &self.key,
            dry_run: self.dry_run,
        })
    }
}

impl Json for KeyDrop {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            key: &'a str,
            /// `gone`, `wouldDelete`, `deleted` or `stopped`.
            result: &'static str,
            /// The value found under the key (lossy UTF-8); null when it was gone.
            value: Option<String>,
            /// Whether it held an attachment record (known once deleted).
            attachment_record: Option<bool>,
            error: Option<String>,
        }
        let text = |v: &[u8]| Some(String::from_utf8_lossy(v).into_owned());
        let view = match self {
            KeyDrop::Gone { key } => View {
                key,
                result: "gone",
                value: None,
                attachment_record: None,
                error: None,
            },
            KeyDrop::WouldDelete { key, value } => View {
                key,
                result: "wouldDelete",
                value: text(value),
                attachment_record: None,
                error: None,
            },
            KeyDrop::Deleted {
                key,
                value,
                attachment,
            } => View {
                key,
                result: "deleted",
                value: text(value),
                attachment_record: Some(*attachment),
                error: None,
            },
            KeyDrop::Stopped { key, value, error } => View {
                key,
                result: "stopped",
                value: text(value),
                attachment_record: None,
                error: Some(error.to_string()),
            },
        };
        document(&view)
    }
}

impl Json for Vec<NamespaceRow> {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct Row<'a> {
            namespace: &'a str,
            /// `configmap` or `auto`.
            source: &'static str,
            blocks: &'a [ipnet::IpNet],
            unmapped: &'a [String],
        }
        #[derive(Serialize)]
        struct View<'a> {
            namespaces: Vec<Row<'a>>,
        }
        let namespaces = (self.iter())
            .map(|r| Row {
                namespace: &r.namespace,
                source: match r.source {
                    NamespaceSource::ConfigMap => "configmap",
                    NamespaceSource::Auto => "auto",
                },
                blocks: &r.blocks,
                unmapped: &r.unmapped,
            })
            .collect();
        document(&View { namespaces })
    }
}

impl Json for NamespaceUnassignment {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            namespace: &'a str,
            blocks: &'a [ipnet::IpNet],
            dry_run: bool,
        }
        document(&View {
            namespace: &self.namespace,
            blocks: &self.blocks,
            dry_run: self.dry_run,
        })
    }
}

/// An attachment a GC pass released (or would release).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReleasedView<'a> {
    #[serde(flatten)]
    attachment: AttachmentView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    ips: &'a [IpAddr],
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<&'a str>,
    reason: &'a str,
}

/// An attachment a GC pass kept: `reason` is a fixed word, `detail` the text behind it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KeptView<'a> {
    #[serde(flatten)]
    attachment: AttachmentView<'a>,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    age_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FailedView<'a> {
    #[serde(flatten)]
    attachment: AttachmentView<'a>,
    error: &'a str,
}

/// The shape shared by the network-namespace and the pod GC.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentPass<'a> {
    dry_run: bool,
    released: Vec<ReleasedView<'a>>,
    kept: Vec<KeptView<'a>>,
    changed: Vec<AttachmentView<'a>>,
    failed: Vec<FailedView<'a>>,
}

fn kept<'a>(
    attachment: &'a Attachment,
    reason: &'static str,
    age_seconds: Option<u64>,
    detail: Option<&'a str>,
) -> KeptView<'a> {
    KeptView {
        attachment: attachment.into(),
        reason,
        age_seconds,
        detail,
    }
}

fn failed(failures: &[(Attachment, String)]) -> Vec<FailedView<'_>> {
    (failures.iter())
        .map(|(a, e)| FailedView {
            attachment: a.into(),
            error: e,
        })
        .collect()
}

impl Json for netns_gc::PassReport {
    fn json(&self) -> serde_json::Result<String> {
        use netns_gc::Keep;
        document(&AttachmentPass {
            dry_run: self.dry_run,
            released: (self.released.iter())
                .map(|r| ReleasedView {
                    attachment: (&r.attachment).into(),
                    node: None,
                    ips: &r.ips,
                    netns: Some(&r.netns),
                    reason: &r.reason,
                })
                .collect(),
            kept: (self.kept.iter())
                .map(|(a, k)| match k {
                    Keep::NoNetns => kept(a, "noNetns", None, None),
                    Keep::Young { age } => kept(a, "young", Some(*age), None),
                    Keep::Present => kept(a, "namespacePresent", None, None),
                    Keep::Unknown(why) => kept(a, "notCheckable", None, Some(why)),
                })
                .collect(),
            changed: self.changed.iter().map(AttachmentView::from).collect(),
            failed: failed(&self.failed),
        })
    }
}

impl Json for pod_gc::PassReport {
    fn json(&self) -> serde_json::Result<String> {
        use pod_gc::Keep;
        document(&AttachmentPass {
            dry_run: self.dry_run,
            released: (self.released.iter())
                .map(|r| ReleasedView {
                    attachment: (&r.attachment).into(),
                    node: None,
                    ips: &r.ips,
                    netns: None,
                    reason: &r.reason,
                })
                .collect(),
            kept: (self.kept.iter())
                .map(|(a, k)| match k {
                    Keep::NotJudged => kept(a, "noPodUid", None, None),
                    Keep::Young { age } => kept(a, "young", Some(*age), None),
                    Keep::Alive => kept(a, "podAlive", None, None),
                    Keep::Terminating => kept(a, "podTerminating", None, None),
                    Keep::Unknown(why) => kept(a, "podNotReadable", None, Some(why)),
                })
                .collect(),
            changed: self.changed.iter().map(AttachmentView::from).collect(),
            failed: failed(&self.failed),
        })
    }
}

impl Json for node_gc::PassReport {
    fn json(&self) -> serde_json::Result<String> {
        use node_gc::{Keep, Verdict};
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Node<'a> {
            node: &'a str,
            /// `keep` or `release`.
            decision: &'static str,
            /// `thisNode`, `inTheApi`, `absent` (kept) or `deleted` (released).
            reason: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            absent_seconds: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a str>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Block<'a> {
            pool: String,
            block: ipnet::IpNet,
            node: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            held: Option<usize>,
        }
        #[derive(Serialize)]
        struct Failure<'a> {
            what: &'a str,
            error: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            dry_run: bool,
            api_error: Option<&'a str>,
            nodes: Vec<Node<'a>>,
            released: Vec<ReleasedView<'a>>,
            blocks_given_back: Vec<Block<'a>>,
            blocks_kept: Vec<Block<'a>>,
            changed: &'a [String],
            failed: Vec<Failure<'a>>,
        }
        fn node<'a>(
            node: &'a str,
            decision: &'static str,
            reason: &'static str,
            absent_seconds: Option<u64>,
            detail: Option<&'a str>,
        ) -> Node<'a> {
            Node {
                node,
                decision,
                reason,
                absent_seconds,
                detail,
            }
        }
        document(&View {
            dry_run: self.dry_run,
            api_error: self.api_error.as_deref(),
            nodes: (self.nodes.iter())
                .map(|(n, v)| match v {
                    Verdict::Keep(Keep::ThisNode) => node(n, "keep", "thisNode", None, None),
                    Verdict::Keep(Keep::InTheApi) => node(n, "keep", "inTheApi", None, None),
                    Verdict::Keep(Keep::Absent { for_ }) => {
                        node(n, "keep", "absent", Some(for_.as_secs()), None)
                    }
                    Verdict::Release { reason } => {
                        node(n, "release", "deleted", None, Some(reason.as_str()))
                    }
                })
                .collect(),
            released: (self.released.iter())
                .map(|r| ReleasedView {
                    attachment: (&r.attachment).into(),
                    node: Some(&r.node),
                    ips: &r.ips,
                    netns: None,
                    reason: &r.reason,
                })
                .collect(),
            blocks_given_back: (self.blocks.iter())
                .map(|(c, reason)| Block {
                    pool: cidr_of_id(&c.pool),
                    block: c.block,
                    node: &c.node,
                    reason: Some(reason),
                    held: None,
                })
                .collect(),
            blocks_kept: (self.blocks_held.iter())
                .map(|(c, held)| Block {
                    pool: cidr_of_id(&c.pool),
                    block: c.block,
                    node: &c.node,
                    reason: None,
                    held: Some(*held),
                })
                .collect(),
            changed: &self.changed,
            failed: (self.failed.iter())
                .map(|(what, error)| Failure { what, error })
                .collect(),
        })
    }
}

impl Json for sticky_gc::PassReport {
    fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct Judged<'a> {
            identity: &'a str,
            ips: &'a [IpAddr],
            reason: &'a str,
        }
        #[derive(Serialize)]
        struct Failure<'a> {
            identity: &'a str,
            error: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            dry_run: bool,
            released: Vec<Judged<'a>>,
            orphaned: Vec<Judged<'a>>,
            waiting: Vec<Judged<'a>>,
            adopted: Vec<Judged<'a>>,
            held: Vec<Judged<'a>>,
            unknown: Vec<Judged<'a>>,
            in_use: usize,
            changed: &'a [String],
            failed: Vec<Failure<'a>>,
        }
        fn judged(list: &[sticky_gc::Judged]) -> Vec<Judged<'_>> {
            (list.iter())
                .map(|j| Judged {
                    identity: &j.identity,
                    ips: &j.ips,
                    reason: &j.reason,
                })
                .collect()
        }
        document(&View {
            dry_run: self.dry_run,
            released: judged(&self.released),
            orphaned: judged(&self.orphaned),
            waiting: judged(&self.waiting),
            adopted: judged(&self.adopted),
            held: judged(&self.held),
            unknown: judged(&self.unknown),
            in_use: self.kept,
            changed: &self.changed,
            failed: (self.failed.iter())
                .map(|(identity, error)| Failure { identity, error })
                .collect(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::IpamError;
    use serde_json::{json, Value};

    fn parsed(outcome: &impl Json) -> Value {
        serde_json::from_str(&outcome.json().unwrap()).unwrap()
    }

    #[test]
    fn an_outcome_stopped_partway_carries_its_error_next_to_what_was_done() {
        let release = Release {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            released: vec![super::super::ReleasedAddress {
                ip: "10.0.0.5".parse().unwrap(),
                pool: "10.0.0.0/24".into(),
                attachment: Attachment::new("net", "c1", "eth0"),
                node: "node-a".into(),
            }],
            stopped: Some(IpamError::Refused {
                reason: "etcd went away".into(),
            }),
        };
        let doc = parsed(&release);
        assert_eq!(doc["released"][0]["ip"], "10.0.0.5");
        assert!(
            doc["error"].as_str().unwrap().contains("etcd went away"),
            "{doc}"
        );
        let drop = KeyDrop::Stopped {
            key: "/p/k".into(),
            value: b"\xff{".to_vec(),
            error: IpamError::Refused {
                reason: "changed meanwhile".into(),
            },
        };
        let doc = parsed(&drop);
        assert_eq!(doc["result"], "stopped");
        assert_eq!(doc["value"], "\u{fffd}{", "lossy UTF-8");
        assert!(doc["error"].as_str().unwrap().contains("changed meanwhile"));
    }

    #[test]
    fn an_ipv6_pool_larger_than_a_u64_is_counted_exactly() {
        let usage = vec![PoolUsage {
            subnet: "fd00::/56".parse().unwrap(),
            dynamic: u128::from(u64::MAX) * 256,
            held: 1,
            blocks: BTreeMap::from([("node-a".to_string(), 2)]),
        }];
        let text = usage.json().unwrap();
        assert!(
            text.contains(&format!("\"dynamic\": {}", u128::from(u64::MAX) * 256)),
            "{text}"
        );
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["pools"][0]["blocks"], json!({"node-a": 2}));
    }

    #[test]
    fn a_gc_pass_lists_each_kept_attachment_with_a_fixed_reason() {
        let a = |c: &str| Attachment::new("net", c, "eth0");
        let report = pod_gc::PassReport {
            dry_run: false,
            released: vec![pod_gc::Released {
                attachment: a("c1"),
                ips: vec!["10.0.0.5".parse().unwrap()],
                reason: "pod prod/web-0 uid u1 no longer exists".into(),
            }],
            kept: vec![
                (a("c2"), pod_gc::Keep::Young { age: 3 }),
                (a("c3"), pod_gc::Keep::Unknown("503".into())),
            ],
            changed: vec![a("c4")],
            failed: vec![(a("c5"), "timed out".into())],
        };
        assert_eq!(
            parsed(&report),
            json!({
                "dryRun": false,
                "released": [{"network": "net", "containerId": "c1", "ifname": "eth0",
                    "ips": ["10.0.0.5"], "reason": "pod prod/web-0 uid u1 no longer exists"}],
                "kept": [
                    {"network": "net", "containerId": "c2", "ifname": "eth0",
                        "reason": "young", "ageSeconds": 3},
                    {"network": "net", "containerId": "c3", "ifname": "eth0",
                        "reason": "podNotReadable", "detail": "503"},
                ],
                "changed": [{"network": "net", "containerId": "c4", "ifname": "eth0"}],
                "failed": [{"network": "net", "containerId": "c5", "ifname": "eth0",
                    "error": "timed out"}],
            })
        );
    }
}
