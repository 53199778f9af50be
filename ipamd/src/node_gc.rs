//! The deleted-node GC: one daemon, elected (`leader`, role [`crate::leader::CLEANER`]),
//! releases what nodes deleted from the Kubernetes API left behind: their attachments, and then
//! their block claims whose block holds no address.
//!
//! A node removed from the cluster (scaled in, replaced) takes its daemon with it: its
//! attachments, and the blocks it claimed, would stay held for ever. The nodes etcd knows are
//! those named by the attachment index (`nodes/<node>/attachments/`) and by block claims; a
//! node that the API server's own LIST of Nodes does not name is gone. One LIST per pass, read
//! after etcd (so a node that allocated before the read had registered before the LIST); when
//! it fails, or does not name this daemon's own node (a kubeconfig of another cluster, a wrong
//! `--node-name`), nothing is judged in that pass.
//!
//! The grace: a node is released only once it has been absent from every LIST for the grace
//! period, counted in this daemon's memory from the first pass that saw it absent
//! ([`Absences`]). A daemon that becomes leader starts counting afresh, so a change of leader
//! only delays a release, and a node deleted and registered again within the grace (a
//! re-joining machine) loses nothing. This daemon's own node is never judged.
//!
//! Each attachment is released through the allocator's release path, only if its record is
//! still the one listed ([`Allocator::release_if_unchanged`]): markers and guards apply as for
//! a DEL. A block claim is then deleted only if the block holds no address and nothing changed
//! ([`Allocator::give_back_block`]); a block where another node borrowed addresses stays
//! claimed until they are released, and is given back by a later pass.
//!
//! The rules are in [`decide`] and [`Absences`], pure and table-tested; [`pass`] reads, asks
//! and releases; [`run`] repeats a pass on an interval while this daemon leads; the `gc-nodes`
//! command runs one pass.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::allocator::{Allocator, BlockClaim, GiveBack};
use crate::cli::{escaped, Outcome};
use crate::error::Result;
use crate::gc::{join_ips, run_every, Schedule};
use crate::records::Attachment;

/// Why a node etcd knows is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// This daemon's own node.
    ThisNode,
    /// The API lists it.
    InTheApi,
    /// Absent from the API for less than the grace period.
    Absent { for_: Duration },
}

/// What to do with the leftovers of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(Keep),
    /// Release its attachments and give back its empty blocks; the reason is logged with each.
    Release {
        reason: String,
    },
}

/// The rules, for node `node` known to etcd, judged by a daemon of node `own`: `absent_for`
/// is how long the API has not listed it (None: it lists it now).
///
/// 1. this daemon's own node: keep;
/// 2. listed by the API: keep;
/// 3. absent for less than `grace`: keep;
/// 4. otherwise: release, because the node was deleted from the API.
pub fn decide(node: &str, own: &str, absent_for: Option<Duration>, grace: Duration) -> Verdict {
    if node == own {
        return Verdict::Keep(Keep::ThisNode);
    }
    match absent_for {
        None => Verdict::Keep(Keep::InTheApi),
        Some(for_) if for_ < grace => Verdict::Keep(Keep::Absent { for_ }),
        Some(for_) => Verdict::Release {
            reason: format!(
                "node {node} deleted from the Kubernetes API (absent for {} s)",
                for_.as_secs()
            ),
        },
    }
}

/// Since when each node etcd knows has been absent from the API's LISTs, as this daemon saw
/// them.
#[derive(Debug, Default, Clone)]
pub struct Absences {
    since: HashMap<String, Instant>,
}

impl Absences {
    /// Notes one LIST (`listed`) at `now` for the nodes etcd knows (`known`); returns how long
    /// each of them has been absent (None: listed). A node listed again, or no longer known,
    /// is forgotten, so its next absence counts from zero.
    pub fn observe(
        &mut self,
        known: &BTreeSet<String>,
        listed: &BTreeSet<String>,
        now: Instant,
    ) -> Vec<(String, Option<Duration>)> {
        self.since
            .retain(|node, _| known.contains(node) && !listed.contains(node));
        known
            .iter()
            .map(|node| {
                if listed.contains(node) {
                    return (node.clone(), None);
                }
                let since = *self.since.entry(node.clone()).or_insert(now);
                (node.clone(), Some(now.saturating_duration_since(since)))
            })
            .collect()
    }
}

/// An attachment the pass released (or, in a dry run, would release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub node: String,
    pub attachment: Attachment,
    pub ips: Vec<IpAddr>,
    pub reason: String,
}

/// What one pass found and did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub dry_run: bool,
    /// Why the API could not be asked; then nothing was judged.
    pub api_error: Option<String>,
    /// The nodes etcd knows, and what was decided for each.
    pub nodes: Vec<(String, Verdict)>,
    /// Attachments released (or, in a dry run, to be released).
    pub released: Vec<Released>,
    /// Block claims of released nodes given back (in a dry run: to be given back if their
    /// block holds no address once the node's attachments are released).
    pub blocks: Vec<(BlockClaim, String)>,
    /// Block claims of released nodes kept because their block still holds addresses.
    pub blocks_held: Vec<(BlockClaim, usize)>,
    /// Attachments and blocks changed between the listing and the release: left for the
    /// next pass.
    pub changed: Vec<String>,
    /// What could not be released, with the error.
    pub failed: Vec<(String, String)>,
}

impl PassReport {
    /// One line per released attachment and given-back block (or, in a dry run, what would
    /// be), one per block kept and per failure, then a summary. Names from etcd are escaped.
    pub fn lines(&self) -> Vec<String> {
        let (verb, gave) = if self.dry_run {
            ("would release", "would give back")
        } else {
            ("released", "gave back")
        };
        let mut lines = Vec::new();
        if let Some(e) = &self.api_error {
            lines.push(format!(
                "judged no node: the Kubernetes API cannot tell which nodes exist: {}",
                escaped(e)
            ));
        }
        lines.extend(self.released.iter().map(|r| {
            format!(
                "{verb} {} ({}) of node {}: {}",
                escaped(&r.attachment.to_string()),
                join_ips(&r.ips),
                escaped(&r.node),
                escaped(&r.reason)
            )
        }));
        lines.extend(self.blocks.iter().map(|(c, reason)| {
            format!(
                "{gave} block {} of pool {} claimed by node {}: {}",
                c.block,
                c.pool,
                escaped(&c.node),
                escaped(reason)
            )
        }));
        lines.extend(self.blocks_held.iter().map(|(c, held)| {
            format!(
                "kept block {} of pool {} claimed by node {}: it holds {held} addresses",
                c.block,
                c.pool,
                escaped(&c.node)
            )
        }));
        lines.extend(
            self.failed
                .iter()
                .map(|(what, e)| format!("could not release {}: {}", escaped(what), escaped(e))),
        );
        let count = |f: fn(&Verdict) -> bool| self.nodes.iter().filter(|(_, v)| f(v)).count();
        lines.push(format!(
            "{verb} {} attachments and {gave} {} blocks of {} deleted nodes; kept {} nodes (in the API {}, absent for less than the grace {}, this node {}); changed meanwhile {}; failed {}",
            self.released.len(),
            self.blocks.len(),
            count(|v| matches!(v, Verdict::Release { .. })),
            count(|v| matches!(v, Verdict::Keep(_))),
            count(|v| matches!(v, Verdict::Keep(Keep::InTheApi))),
            count(|v| matches!(v, Verdict::Keep(Keep::Absent { .. }))),
            count(|v| matches!(v, Verdict::Keep(Keep::ThisNode))),
            self.changed.len(),
            self.failed.len(),
        ));
        lines
    }
}

/// The pass fails when the API could not be asked or a release failed: what it left is tried
/// again at the next pass.
impl Outcome for PassReport {
    fn lines(&self) -> Vec<String> {
        PassReport::lines(self)
    }

    fn finish(self) -> Result<bool, crate::IpamError> {
        Ok(self.failed.is_empty() && self.api_error.is_none())
    }
}

/// One pass: reads the nodes etcd knows, asks the API for its nodes with `list_nodes` (one
/// LIST), notes absences in `absences`, decides with [`decide`], and for each node to release
/// releases its attachments (each only if unchanged) and gives back its empty block claims,
/// unless `dry_run`. Keeps going past failures.
pub async fn pass<L, Fut>(
    allocator: &Allocator,
    list_nodes: L,
    absences: &mut Absences,
    grace: Duration,
    dry_run: bool,
) -> Result<PassReport>
where
    L: FnOnce() -> Fut,
    Fut: Future<Output = std::result::Result<BTreeSet<String>, String>>,
{
    allocator.ready().await?;
    let own = allocator.node().to_string();
    // etcd first: a node that allocated before this read registered before the LIST below.
    let claims = allocator.block_claims().await?;
    let mut known = allocator.indexed_nodes().await?;
    known.extend(claims.iter().map(|c| c.node.clone()));
    let mut report = PassReport {
        dry_run,
        ..PassReport::default()
    };
    let listed = match list_nodes().await {
        Ok(listed) if !listed.contains(&own) => Err(format!(
            "the API lists {} nodes but not this daemon's node {own}: another cluster's \
             kubeconfig, or a --node-name that is not the node's name",
            listed.len()
        )),
        other => other,
    };
    let listed = match listed {
        Ok(listed) => listed,
        Err(e) => {
            report.api_error = Some(e);
            return Ok(report);
        }
    };
    let now = Instant::now();
    for (node, absent_for) in absences.observe(&known, &listed, now) {
        let verdict = decide(&node, &own, absent_for, grace);
        if let Verdict::Release { reason } = &verdict {
            release_node(allocator, &node, reason, &claims, &mut report).await;
        }
        report.nodes.push((node, verdict));
    }
    Ok(report)
}

/// Releases what `node` left: its attachments, then its block claims whose block is empty.
async fn release_node(
    allocator: &Allocator,
    node: &str,
    reason: &str,
    claims: &[BlockClaim],
    report: &mut PassReport,
) {
    let dry_run = report.dry_run;
    match allocator.attachments_of(node).await {
        Ok(held) => {
            for h in held {
                let released = Released {
                    node: node.to_string(),
                    attachment: h.attachment.clone(),
                    ips: h.record.ips.iter().map(|i| i.ip).collect(),
                    reason: reason.to_string(),
                };
                if dry_run {
                    report.released.push(released);
                    continue;
                }
                match allocator.release_if_unchanged(&h).await {
                    Ok(Some(record)) => report.released.push(Released {
                        ips: record.ips.iter().map(|i| i.ip).collect(),
                        ..released
                    }),
                    Ok(None) => report.changed.push(h.attachment.to_string()),
                    Err(e) => report
                        .failed
                        .push((h.attachment.to_string(), e.to_string())),
                }
            }
        }
        Err(e) => {
            report
                .failed
                .push((format!("the attachments of node {node}"), e.to_string()));
            // Its blocks still hold its addresses.
            return;
        }
    }
    for claim in claims.iter().filter(|c| c.node == node) {
        if dry_run {
            let reason = format!("{reason}; if the block holds no address once they are released");
            report.blocks.push((claim.clone(), reason));
            continue;
        }
        let reason = format!("{reason}; the block holds no address");
        match allocator.give_back_block(claim).await {
            Ok(GiveBack::Deleted) => report.blocks.push((claim.clone(), reason)),
            Ok(GiveBack::Holds { held }) => report.blocks_held.push((claim.clone(), held)),
            Ok(GiveBack::Changed) => report.changed.push(format!("block {}", claim.block)),
            Err(e) => report
                .failed
                .push((format!("block {}", claim.block), e.to_string())),
        }
    }
}

/// Runs a pass every `schedule.interval` until `stop` completes ([`run_every`]): inside the
/// daemon, `stop` is the end of this daemon's leadership or its shutdown
/// ([`crate::leader::while_leader`]). The absences are counted from the first pass of this
/// run. Logs one line per release, block given back and failure, and an API that cannot be
/// asked once per outage.
pub async fn run(
    allocator: Arc<Allocator>,
    client: ::kube::Client,
    schedule: Schedule,
    stop: impl Future<Output = ()>,
) {
    let absences = Arc::new(tokio::sync::Mutex::new(Absences::default()));
    let mut unreadable = false;
    run_every(
        "deleted-node GC",
        schedule,
        stop,
        || {
            let (allocator, client, absences) = (
                Arc::clone(&allocator),
                client.clone(),
                Arc::clone(&absences),
            );
            async move {
                let mut absences = absences.lock().await;
                pass(
                    &allocator,
                    || async { crate::kube::node_names(&client).await },
                    &mut absences,
                    schedule.grace,
                    false,
                )
                .await
            }
        },
        |report| unreadable = log_pass(&report, unreadable),
    )
    .await;
}

/// Logs a pass of the daemon's GC; `unreadable` says whether the previous pass could not ask
/// the API, so that an outage is warned about once. Returns whether this one could not.
fn log_pass(report: &PassReport, unreadable: bool) -> bool {
    crate::metrics::gc_released("node", "node_deleted", report.released.len());
    for r in &report.released {
        tracing::info!(
            node = %escaped(&r.node),
            attachment = %escaped(&r.attachment.to_string()),
            ips = %join_ips(&r.ips),
            reason = %escaped(&r.reason),
            "released attachment of a deleted node"
        );
    }
    for (c, reason) in &report.blocks {
        tracing::info!(node = %escaped(&c.node), block = %c.block, pool = %c.pool, reason = %escaped(reason), "gave back block of a deleted node");
    }
    for (what, e) in &report.failed {
        tracing::warn!(what = %escaped(what), error = %escaped(e), "could not release what a deleted node left; trying again at the next interval");
    }
    match &report.api_error {
        Some(e) if !unreadable => {
            tracing::warn!(error = %escaped(e), "cannot ask the Kubernetes API which nodes exist; releasing nothing");
            true
        }
        Some(_) => true,
        None => {
            if unreadable {
                tracing::info!("the Kubernetes API lists the nodes again");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn only_another_node_absent_for_the_grace_is_released() {
        let s = Duration::from_secs;
        assert_eq!(
            decide("me", "me", Some(s(3600)), GRACE),
            Verdict::Keep(Keep::ThisNode)
        );
        assert_eq!(
            decide("n1", "me", None, GRACE),
            Verdict::Keep(Keep::InTheApi)
        );
        assert_eq!(
            decide("n1", "me", Some(s(59)), GRACE),
            Verdict::Keep(Keep::Absent { for_: s(59) })
        );
        assert_eq!(
            decide("n1", "me", Some(s(60)), GRACE),
            Verdict::Release {
                reason: "node n1 deleted from the Kubernetes API (absent for 60 s)".into()
            }
        );
        assert!(matches!(
            decide("n1", "me", Some(Duration::ZERO), Duration::ZERO),
            Verdict::Release { .. }
        ));
    }

    #[test]
    fn an_absence_counts_from_the_first_list_that_missed_the_node_and_resets_when_it_is_back() {
        let t0 = Instant::now();
        let mut a = Absences::default();
        let known = set(&["n1", "n2"]);
        assert_eq!(
            a.observe(&known, &set(&["n1"]), t0),
            vec![
                ("n1".to_string(), None),
                ("n2".to_string(), Some(Duration::ZERO))
            ]
        );
        let later = t0 + Duration::from_secs(30);
        assert_eq!(
            a.observe(&known, &set(&["n1"]), later)[1],
            ("n2".to_string(), Some(Duration::from_secs(30)))
        );
        // Registered again: the next absence starts from zero.
        a.observe(&known, &set(&["n1", "n2"]), later);
        let again = later + Duration::from_secs(40);
        assert_eq!(
            a.observe(&known, &set(&["n1"]), again)[1],
            ("n2".to_string(), Some(Duration::ZERO))
        );
        // No longer known to etcd: forgotten.
        a.observe(&set(&["n1"]), &set(&["n1"]), again);
        assert!(a.since.is_empty());
    }

    #[test]
    fn report_lines_name_each_release_and_block_and_an_api_error_fails_the_pass() {
        let claim = BlockClaim {
            pool: "10.0.0.0_24".into(),
            block: "10.0.0.64/26".parse().expect("literal"),
            node: "n2".into(),
            revision: 7,
        };
        let report = PassReport {
            dry_run: false,
            api_error: None,
            nodes: vec![
                (
                    "n2".into(),
                    Verdict::Release {
                        reason: "node n2 deleted".into(),
                    },
                ),
                ("n1".into(), Verdict::Keep(Keep::InTheApi)),
            ],
            released: vec![Released {
                node: "n2".into(),
                attachment: Attachment::new("net", "c1", "eth0"),
                ips: vec!["10.0.0.65".parse().expect("literal")],
                reason: "node n2 deleted".into(),
            }],
            blocks: vec![(
                claim.clone(),
                "node n2 deleted; the block holds no address".into(),
            )],
            blocks_held: vec![(claim, 2)],
            changed: vec![],
            failed: vec![],
        };
        assert_eq!(
            report.lines(),
            vec![
                "released c1/eth0 of network net (10.0.0.65) of node n2: node n2 deleted",
                "gave back block 10.0.0.64/26 of pool 10.0.0.0_24 claimed by node n2: node n2 deleted; the block holds no address",
                "kept block 10.0.0.64/26 of pool 10.0.0.0_24 claimed by node n2: it holds 2 addresses",
                "released 1 attachments and gave back 1 blocks of 1 deleted nodes; kept 1 nodes (in the API 1, absent for less than the grace 0, this node 0); changed meanwhile 0; failed 0",
            ]
        );
        assert!(Outcome::finish(report).expect("no error"));
        let failed = PassReport {
            api_error: Some("503".into()),
            ..PassReport::default()
        };
        assert!(failed.lines()[0].starts_with("judged no node"));
        assert!(!Outcome::finish(failed).expect("no error"));
    }

    #[test]
    fn an_api_outage_is_warned_about_once() {
        let outage = PassReport {
            api_error: Some("503".into()),
            ..PassReport::default()
        };
        assert!(log_pass(&outage, false));
        assert!(log_pass(&outage, true));
        assert!(!log_pass(&PassReport::default(), true));
    }
}
