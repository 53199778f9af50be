//! The sticky GC: releases the sticky addresses of StatefulSet pod identities whose ordinal is
//! gone (scale-down) or whose StatefulSet is gone (deleted, or re-created under another UID),
//! once that has held for a grace period.
//!
//! An identity keeps its addresses while no container holds them (`crate::sticky`), so nothing
//! else ever frees them. For each identity record the pass asks the API server for its
//! StatefulSet (one GET per StatefulSet) and judges it with [`sticky::gone_reason`]; the first
//! pass that sees it gone records the time in the record (`orphanedSince`, by CAS, so a
//! restarted daemon keeps counting), a pass that sees it back clears it, and a pass past the
//! grace deletes the record with what its reservation holds ([`Allocator::release_identity`]),
//! guarded by the revisions it read. An address a container still holds is left alone: that
//! container's DEL, or the pod GC, moves it to the reservation first, and the next pass frees
//! it. A StatefulSet the API cannot be asked about keeps its identities.
//!
//! The identities are the cluster's, not one node's: the pass is meant to run on one daemon at
//! a time, though every write is guarded, so two passes at once free nothing twice. [`pass`] is
//! one pass (also the `gc-sticky` command); [`run`] repeats it inside the daemon.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::Api;
use ::kube::{Client, ResourceExt};
use k8s_openapi::api::apps::v1::StatefulSet;

use crate::allocator::{Allocator, IdentityRelease};
use crate::cli::{escaped, Outcome};
use crate::error::Result;
use crate::gc::{join_ips, run_every, Schedule};
use crate::kube::GET_TIMEOUT;
use crate::records::now_unix;
use crate::sticky::{self, Identity, StatefulSetView, Verdict};

/// One identity the pass released (or, in a dry run, would release), or one it left, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// `namespace/statefulset-ordinal on network <network>`.
    pub identity: String,
    pub ips: Vec<IpAddr>,
    pub reason: String,
}

/// What one pass found and did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub dry_run: bool,
    /// Released (or, in a dry run, to be released).
    pub released: Vec<Judged>,
    /// Seen gone for the first time: the grace starts now.
    pub orphaned: Vec<Judged>,
    /// Gone, within the grace; the reason says how long is left.
    pub waiting: Vec<Judged>,
    /// Their ordinal exists again: the orphan time is cleared.
    pub adopted: Vec<Judged>,
    /// Due, but a container holds the addresses: the reason names it.
    pub held: Vec<Judged>,
    /// Their StatefulSet could not be read: the reason says why.
    pub unknown: Vec<Judged>,
    /// In use (ordinal exists): how many.
    pub kept: usize,
    /// Changed between the listing and the write: left for the next pass.
    pub changed: Vec<String>,
    /// Writes that failed, with the error.
    pub failed: Vec<(String, String)>,
}

impl PassReport {
    /// One line per identity released (or to be released), orphaned, waiting, adopted, held by
    /// a container, or whose StatefulSet cannot be read, one per failure, then a summary.
    /// Names from etcd and the API are escaped.
    pub fn lines(&self) -> Vec<String> {
        let verb = if self.dry_run {
            "would release"
        } else {
            "released"
        };
        let line = |what: &str, j: &Judged| {
            format!(
                "{what} sticky {} ({}): {}",
                escaped(&j.identity),
                join_ips(&j.ips),
                escaped(&j.reason)
            )
        };
        let orphaned = if self.dry_run {
            "would mark orphaned"
        } else {
            "marked orphaned"
        };
        let adopted = if self.dry_run {
            "would keep again"
        } else {
            "kept again"
        };
        let mut lines: Vec<String> = self.released.iter().map(|j| line(verb, j)).collect();
        lines.extend(self.orphaned.iter().map(|j| line(orphaned, j)));
        lines.extend(self.waiting.iter().map(|j| line("waiting", j)));
        lines.extend(self.adopted.iter().map(|j| line(adopted, j)));
        lines.extend(self.held.iter().map(|j| line("kept", j)));
        lines.extend(self.unknown.iter().map(|j| line("kept", j)));
        lines.extend(self.failed.iter().map(|(identity, e)| {
            format!(
                "could not release sticky {}: {}",
                escaped(identity),
                escaped(e)
            )
        }));
        lines.push(format!(
            "{verb} {} sticky identities; {} newly orphaned, {} within the grace, {} in use, {} in use again, {} held by a container, {} whose StatefulSet cannot be read; changed meanwhile {}; failed {}",
            self.released.len(),
            self.orphaned.len(),
            self.waiting.len(),
            self.kept,
            self.adopted.len(),
            self.held.len(),
            self.unknown.len(),
            self.changed.len(),
            self.failed.len(),
        ));
        lines
    }
}

/// The pass fails when a write failed or a StatefulSet could not be read.
impl Outcome for PassReport {
    fn lines(&self) -> Vec<String> {
        PassReport::lines(self)
    }

    fn finish(self) -> Result<bool, crate::IpamError> {
        Ok(self.failed.is_empty() && self.unknown.is_empty())
    }
}

/// What the API says of a StatefulSet, for [`sticky::gone_reason`].
pub fn view_of(set: &StatefulSet) -> StatefulSetView {
    let spec = &set.spec;
    let count = |n: Option<i32>, default: u32| n.map_or(default, |n| u32::try_from(n).unwrap_or(0));
    StatefulSetView {
        uid: set.uid().unwrap_or_default(),
        replicas: count(spec.replicas, 1),
        start: count(spec.ordinals.as_ref().and_then(|o| o.start), 0),
    }
}

/// One GET of the StatefulSet `namespace/name`, within the timeout; Err says why there was
/// no answer.
async fn stateful_set(
    client: &Client,
    namespace: &str,
    name: &str,
) -> std::result::Result<Option<StatefulSetView>, String> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let found = tokio::time::timeout(GET_TIMEOUT, api.get_opt(name))
        .await
        .map_err(|_| format!("no answer to GET within {GET_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(found.as_ref().map(view_of))
}

/// One pass: lists the identity records, asks the API about each StatefulSet once, decides
/// with [`sticky::decide`] at the current time, and (unless `dry_run`) records, clears or
/// releases, each write guarded by the revision listed. Keeps going past failures.
pub async fn pass(
    allocator: &Allocator,
    client: &Client,
    grace: Duration,
    dry_run: bool,
) -> Result<PassReport> {
    allocator.ready().await?;
    let identities = allocator.sticky_identities().await?;
    let mut answers: HashMap<
        (String, String),
        std::result::Result<Option<StatefulSetView>, String>,
    > = HashMap::new();
    for held in &identities {
        let key = (
            held.record.namespace.clone(),
            held.record.stateful_set.clone(),
        );
        if let std::collections::hash_map::Entry::Vacant(entry) = answers.entry(key) {
            let (namespace, name) = entry.key();
            let answer = stateful_set(client, namespace, name).await;
            entry.insert(answer);
        }
    }
    let now = now_unix();
    let mut report = PassReport {
        dry_run,
        ..PassReport::default()
    };
    for held in identities {
        let record = &held.record;
        let judged = |reason: String| Judged {
            identity: Identity::of_record(record).describe(),
            ips: record.ips.iter().map(|h| h.ip).collect(),
            reason,
        };
        let answer = &answers[&(record.namespace.clone(), record.stateful_set.clone())];
        let gone = match answer {
            Err(why) => {
                report
                    .unknown
                    .push(judged(format!("its StatefulSet cannot be read: {why}")));
                continue;
            }
            Ok(found) => sticky::gone_reason(record, found.as_ref()),
        };
        let write = match sticky::decide(record, gone, now, grace) {
            Verdict::Keep => {
                report.kept += 1;
                continue;
            }
            Verdict::Adopted => {
                report
                    .adopted
                    .push(judged("its ordinal exists again".into()));
                (!dry_run).then_some(None)
            }
            Verdict::Orphaned { reason } => {
                report.orphaned.push(judged(format!(
                    "{reason}; released after {} s unless it comes back",
                    grace.as_secs()
                )));
                (!dry_run).then_some(Some(now))
            }
            Verdict::Waiting { reason, left } => {
                report
                    .waiting
                    .push(judged(format!("{reason}; released in {left} s")));
                continue;
            }
            Verdict::Release { reason } => {
                if dry_run {
                    report.released.push(judged(reason));
                    continue;
                }
                match allocator.release_identity(&held).await {
                    Ok(IdentityRelease::Released { ips }) => report.released.push(Judged {
                        ips,
                        ..judged(reason)
                    }),
                    Ok(IdentityRelease::HeldByContainer(a)) => report.held.push(judged(format!(
                        "{reason}, but {a} still holds it: freed once its DEL or the pod GC returns it"
                    ))),
                    Ok(IdentityRelease::Changed) => report.changed.push(held.key.clone()),
                    Err(e) => report
                        .failed
                        .push((Identity::of_record(record).describe(), e.to_string())),
                }
                continue;
            }
        };
        if let Some(since) = write {
            match allocator.set_orphaned_since(&held, since).await {
                Ok(true) => {}
                Ok(false) => report.changed.push(held.key.clone()),
                Err(e) => report
                    .failed
                    .push((Identity::of_record(record).describe(), e.to_string())),
            }
        }
    }
    Ok(report)
}

/// Runs a pass every `schedule.interval` until `shutdown` completes ([`run_every`]), with
/// `schedule.grace` as the time an identity must be gone before it is released. Logs one line
/// per release, per identity newly orphaned or in use again, and per failure.
pub async fn run(
    allocator: Arc<Allocator>,
    client: Client,
    schedule: Schedule,
    shutdown: impl Future<Output = ()>,
) {
    run_every(
        "sticky GC",
        schedule,
        shutdown,
        || pass(&allocator, &client, schedule.grace, false),
        |report| log_pass(&report),
    )
    .await;
}

fn log_pass(report: &PassReport) {
    crate::metrics::gc_released("sticky", "identity_gone", report.released.len());
    for j in &report.released {
        tracing::info!(identity = %escaped(&j.identity), ips = %join_ips(&j.ips), reason = %escaped(&j.reason), "released sticky addresses");
    }
    for j in &report.orphaned {
        tracing::info!(identity = %escaped(&j.identity), ips = %join_ips(&j.ips), reason = %escaped(&j.reason), "sticky identity orphaned");
    }
    for j in &report.adopted {
        tracing::info!(identity = %escaped(&j.identity), "sticky identity in use again");
    }
    for j in report.held.iter().chain(&report.unknown) {
        tracing::warn!(identity = %escaped(&j.identity), reason = %escaped(&j.reason), "sticky addresses kept");
    }
    for (identity, e) in &report.failed {
        tracing::warn!(identity = %escaped(identity), error = %escaped(e), "could not release sticky addresses; trying again at the next interval");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetOrdinals, StatefulSetSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn a_statefulset_is_read_with_its_defaults() {
        let set = |replicas: Option<i32>, start: Option<i32>| StatefulSet {
            metadata: ObjectMeta {
                uid: Some("u".into()),
                ..ObjectMeta::default()
            },
            spec: StatefulSetSpec {
                replicas,
                ordinals: start.map(|s| StatefulSetOrdinals { start: Some(s) }),
                ..StatefulSetSpec::default()
            },
            ..StatefulSet::default()
        };
        let view = |uid: &str, replicas, start| StatefulSetView {
            uid: uid.into(),
            replicas,
            start,
        };
        assert_eq!(view_of(&set(None, None)), view("u", 1, 0));
        assert_eq!(view_of(&set(Some(3), Some(5))), view("u", 3, 5));
        assert_eq!(view_of(&set(Some(-1), None)), view("u", 0, 0));
    }

    #[test]
    fn report_lines_name_each_identity_and_summarise() {
        let j = |id: &str, reason: &str| Judged {
            identity: id.into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            reason: reason.into(),
        };
        let report = PassReport {
            dry_run: true,
            released: vec![j("db/web-2 on network n", "ordinal 2 is gone")],
            orphaned: vec![j("db/web-3 on network n", "gone\n")],
            kept: 4,
            ..PassReport::default()
        };
        assert_eq!(
            report.lines(),
            vec![
                "would release sticky db/web-2 on network n (10.0.0.5): ordinal 2 is gone",
                r"would mark orphaned sticky db/web-3 on network n (10.0.0.5): gone\n",
                "would release 1 sticky identities; 1 newly orphaned, 0 within the grace, 4 in use, 0 in use again, 0 held by a container, 0 whose StatefulSet cannot be read; changed meanwhile 0; failed 0",
            ]
        );
        assert!(Outcome::finish(report).unwrap());
        let unknown = PassReport {
            unknown: vec![j("db/web-0 on network n", "503")],
            ..PassReport::default()
        };
        assert!(!Outcome::finish(unknown).unwrap());
    }
}
