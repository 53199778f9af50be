//! The pod GC: each daemon releases, after a grace period, its own node's attachments whose
//! pod no longer exists in the Kubernetes API, or exists under another UID.
//!
//! A pod deleted while the runtime's DEL could not reach the daemon (or never came: a node
//! rebooted, a kubelet gave up) leaves its attachment, and its addresses, held. The attachment
//! record keeps the pod's namespace, name and UID from the ADD; when the API has no pod of that
//! name, or one of another UID (a StatefulSet pod re-created under the same name), the pod the
//! attachment was made for is gone and nothing can use its addresses any more.
//!
//! Never on doubt: a pod the API cannot be asked about keeps its attachment, and so does a
//! terminating pod (its DEL is still coming), a record without a pod UID (nothing to compare)
//! and one younger than the grace. A cached pod of the record's UID answers without a request;
//! everything else is one GET ([`PodCache::node_holder`]), so only the API server's own answer
//! releases anything. Each release happens only if the record is still at the revision listed
//! ([`Allocator::release_if_unchanged`]): an attachment added again meanwhile is left alone, and
//! a re-created pod's new attachment is another record, never touched.
//!
//! The rules are in [`decide`], pure and table-tested; [`pass`] lists, asks and releases;
//! [`run`] repeats a pass on an interval inside the daemon; the `gc-pods` command runs one.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::allocator::Allocator;
use crate::cli::{escaped, Outcome};
use crate::error::Result;
use crate::gc::{join_ips, run_every, Schedule};
use crate::kube::{Holder, PodCache};
use crate::records::{now_unix, Attachment, AttachmentRecord, PodRef};

/// How many pods one pass asks the API server about at once.
const CONCURRENT_GETS: usize = 8;

/// Why an attachment is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// The record names no pod, or a pod without a UID (an ADD without Kubernetes, or a
    /// runtime that sent none): there is nothing to judge it by.
    NotJudged,
    /// Younger than the grace period: `age` seconds old.
    Young { age: u64 },
    /// Its pod exists with the record's UID.
    Alive,
    /// Its pod is being deleted: the runtime's DEL is still coming.
    Terminating,
    /// The API server could not be asked; the reason says why.
    Unknown(String),
}

/// What to do with one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(Keep),
    /// Release it; the reason is printed and logged with the release.
    Release {
        reason: String,
    },
}

/// The pod a record can be judged by: one with a namespace, a name and a UID.
fn judged_pod(record: &AttachmentRecord) -> Option<&PodRef> {
    record
        .pod
        .as_ref()
        .filter(|p| !p.namespace.is_empty() && !p.name.is_empty() && !p.uid.is_empty())
}

/// Whether `record`, at unix time `now`, is old enough for its pod to be asked about.
fn is_due(record: &AttachmentRecord, now: u64, grace: Duration) -> bool {
    now.saturating_sub(record.allocated_at) >= grace.as_secs()
}

/// The rules, for one of this node's attachment records at unix time `now`:
///
/// 1. no pod namespace, name and UID: keep (not judged);
/// 2. younger than `grace`: keep, without asking (the ADD may have been answered before the
///    pod reached the API server's readers);
/// 3. `judge` (the API's answer for the pod, Err with the reason when there is none) says
///    [`Holder::Gone`]: release, with its reason;
/// 4. alive, terminating, or no answer: keep.
///
/// A record whose time lies in the future (clock skew between nodes) counts as age 0.
pub fn decide(
    record: &AttachmentRecord,
    now: u64,
    grace: Duration,
    judge: impl FnOnce(&PodRef) -> std::result::Result<Holder, String>,
) -> Verdict {
    let Some(pod) = judged_pod(record) else {
        return Verdict::Keep(Keep::NotJudged);
    };
    if !is_due(record, now, grace) {
        return Verdict::Keep(Keep::Young {
            age: now.saturating_sub(record.allocated_at),
        });
    }
    match judge(pod) {
        Ok(Holder::Gone { reason }) => Verdict::Release { reason },
        Ok(Holder::Alive) => Verdict::Keep(Keep::Alive),
        Ok(Holder::Terminating) => Verdict::Keep(Keep::Terminating),
        Err(why) => Verdict::Keep(Keep::Unknown(why)),
    }
}

/// An attachment the pass released (or, in a dry run, would release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub attachment: Attachment,
    pub ips: Vec<IpAddr>,
    pub reason: String,
}

/// What one pass found and did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub dry_run: bool,
    /// Released (or, in a dry run, to be released).
    pub released: Vec<Released>,
    /// Kept, and why.
    pub kept: Vec<(Attachment, Keep)>,
    /// Changed (re-added, released by a DEL) between the listing and the release: left for the
    /// next pass.
    pub changed: Vec<Attachment>,
    /// Releases that failed, with the error.
    pub failed: Vec<(Attachment, String)>,
}

impl PassReport {
    fn unknown(&self) -> impl Iterator<Item = (&Attachment, &str)> {
        self.kept.iter().filter_map(|(a, k)| match k {
            Keep::Unknown(why) => Some((a, why.as_str())),
            _ => None,
        })
    }

    /// One line per released (or, in a dry run, to-be-released) attachment, one per
    /// attachment whose pod could not be read and one per failure, then a summary. Names from
    /// etcd and the runtime are escaped.
    pub fn lines(&self) -> Vec<String> {
        let verb = if self.dry_run {
            "would release"
        } else {
            "released"
        };
        let mut lines: Vec<String> = self
            .released
            .iter()
            .map(|r| {
                format!(
                    "{verb} {} ({}): {}",
                    escaped(&r.attachment.to_string()),
                    join_ips(&r.ips),
                    escaped(&r.reason)
                )
            })
            .collect();
        lines.extend(self.unknown().map(|(a, why)| {
            format!(
                "kept {}: its pod cannot be read: {}",
                escaped(&a.to_string()),
                escaped(why)
            )
        }));
        lines.extend(self.failed.iter().map(|(a, e)| {
            format!(
                "could not release {}: {}",
                escaped(&a.to_string()),
                escaped(e)
            )
        }));
        let count = |f: fn(&Keep) -> bool| self.kept.iter().filter(|(_, k)| f(k)).count();
        lines.push(format!(
            "{verb} {} attachments; kept {} (pod alive {}, pod terminating {}, younger than the grace {}, no pod uid {}, pod not readable {}); changed meanwhile {}; failed {}",
            self.released.len(),
            self.kept.len(),
            count(|k| matches!(k, Keep::Alive)),
            count(|k| matches!(k, Keep::Terminating)),
            count(|k| matches!(k, Keep::Young { .. })),
            count(|k| matches!(k, Keep::NotJudged)),
            count(|k| matches!(k, Keep::Unknown(_))),
            self.changed.len(),
            self.failed.len(),
        ));
        lines
    }
}

/// The pass fails when a release failed or a pod could not be read: what it left is tried again
/// at the next pass.
impl Outcome for PassReport {
    fn lines(&self) -> Vec<String> {
        PassReport::lines(self)
    }

    fn finish(self) -> Result<bool, crate::IpamError> {
        Ok(self.failed.is_empty() && self.unknown().next().is_none())
    }
}

type PodKey = (String, String, String);

fn key_of(pod: &PodRef) -> PodKey {
    (pod.namespace.clone(), pod.name.clone(), pod.uid.clone())
}

/// One pass: lists this node's attachments, asks `pods` about each pod due (each pod once),
/// decides with [`decide`] at the current time, and releases each one to release (unless
/// `dry_run`), only if its record is still the one listed. Keeps going past failures.
pub async fn pass(
    allocator: &Allocator,
    pods: &PodCache,
    grace: Duration,
    dry_run: bool,
) -> Result<PassReport> {
    allocator.ready().await?;
    let records = allocator.node_attachments(None).await?;
    let now = now_unix();
    let mut due: Vec<PodKey> = records
        .iter()
        .map(|h| &h.record)
        .filter(|r| is_due(r, now, grace))
        .filter_map(judged_pod)
        .map(key_of)
        .collect();
    due.sort();
    due.dedup();
    let answers: HashMap<PodKey, std::result::Result<Holder, String>> = futures::stream::iter(due)
        .map(|key| async move {
            let answer = pods
                .node_holder(&key.0, &key.1, &key.2)
                .await
                .map_err(|e| e.to_string());
            (key, answer)
        })
        .buffer_unordered(CONCURRENT_GETS)
        .collect()
        .await;
    let mut report = PassReport {
        dry_run,
        ..PassReport::default()
    };
    for held in records {
        let (attachment, record) = (&held.attachment, &held.record);
        let verdict = decide(record, now, grace, |pod| {
            answers
                .get(&key_of(pod))
                .cloned()
                .unwrap_or_else(|| Err("the pod was not asked about".into()))
        });
        let reason = match verdict {
            Verdict::Keep(keep) => {
                report.kept.push((attachment.clone(), keep));
                continue;
            }
            Verdict::Release { reason } => reason,
        };
        let released = Released {
            ips: record.ips.iter().map(|h| h.ip).collect(),
            reason,
            attachment: attachment.clone(),
        };
        if dry_run {
            report.released.push(released);
            continue;
        }
        match allocator.release_if_unchanged(&held).await {
            Ok(Some(record)) => report.released.push(Released {
                ips: record.ips.iter().map(|h| h.ip).collect(),
                ..released
            }),
            Ok(None) => report.changed.push(attachment.clone()),
            Err(e) => report.failed.push((attachment.clone(), e.to_string())),
        }
    }
    Ok(report)
}

/// Runs a pass every `schedule.interval` until `shutdown` completes ([`run_every`]). Logs one
/// line per release, one per failure, and once per outage that pods cannot be read.
pub async fn run(
    allocator: Arc<Allocator>,
    pods: Arc<PodCache>,
    schedule: Schedule,
    shutdown: impl Future<Output = ()>,
) {
    let mut unreadable = false;
    run_every(
        "pod GC",
        schedule,
        shutdown,
        || pass(&allocator, &pods, schedule.grace, false),
        |report| unreadable = log_pass(&report, unreadable),
    )
    .await;
}

/// Logs a pass of the daemon's GC; `unreadable` says whether the previous pass could not read
/// some pod, so that an API outage is warned about once, not on every pass. Returns whether
/// this one could not.
fn log_pass(report: &PassReport, unreadable: bool) -> bool {
    crate::metrics::gc_released("pod", "pod_gone", report.released.len());
    for r in &report.released {
        tracing::info!(
            attachment = %escaped(&r.attachment.to_string()),
            ips = %join_ips(&r.ips),
            reason = %escaped(&r.reason),
            "released attachment whose pod is gone"
        );
    }
    for (a, e) in &report.failed {
        tracing::warn!(attachment = %escaped(&a.to_string()), error = %escaped(e), "could not release attachment whose pod is gone; trying again at the next interval");
    }
    let mut unknown = report.unknown();
    match unknown.next() {
        Some((a, why)) if !unreadable => {
            tracing::warn!(
                attachment = %escaped(&a.to_string()),
                reason = %escaped(why),
                more = unknown.count(),
                "cannot read the pods of some attachments from the Kubernetes API; keeping them"
            );
            true
        }
        Some(_) => true,
        None => {
            if unreadable {
                tracing::info!("the pods of all attachments can be read again");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{HeldIp, RECORD_VERSION};

    const GRACE: Duration = Duration::from_secs(60);
    const NOW: u64 = 1_700_000_000;

    fn record(pod: Option<(&str, &str, &str)>, allocated_at: u64) -> AttachmentRecord {
        AttachmentRecord {
            version: RECORD_VERSION,
            network: "net".into(),
            node: "node-1".into(),
            pod: pod.map(|(namespace, name, uid)| PodRef {
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.into(),
            }),
            ips: vec![HeldIp {
                pool: "10.0.0.0_24".into(),
                ip: "10.0.0.5".parse().expect("literal"),
                kind: None,
            }],
            allocated_at,
            netns: String::new(),
        }
    }

    fn never_asked(pod: &PodRef) -> std::result::Result<Holder, String> {
        panic!("{pod:?} must not be asked about")
    }

    const OLD: u64 = NOW - 3600;

    #[test]
    fn a_record_without_a_pod_namespace_name_or_uid_is_kept_unasked() {
        for pod in [
            None,
            Some(("apps", "web-0", "")),
            Some(("", "web-0", "u1")),
            Some(("apps", "", "u1")),
        ] {
            let v = decide(&record(pod, OLD), NOW, GRACE, never_asked);
            assert_eq!(v, Verdict::Keep(Keep::NotJudged), "{pod:?}");
        }
    }

    #[test]
    fn a_record_younger_than_the_grace_is_kept_unasked() {
        let pod = Some(("apps", "web-0", "u1"));
        let v = decide(&record(pod, NOW - 59), NOW, GRACE, never_asked);
        assert_eq!(v, Verdict::Keep(Keep::Young { age: 59 }));
        // Clock skew: a record from the future is age 0.
        let v = decide(&record(pod, NOW + 30), NOW, GRACE, never_asked);
        assert_eq!(v, Verdict::Keep(Keep::Young { age: 0 }));
    }

    #[test]
    fn a_gone_pod_past_the_grace_is_released_with_the_apis_reason() {
        let r = record(Some(("apps", "web-0", "u1")), NOW - 60);
        let v = decide(&r, NOW, GRACE, |pod| {
            assert_eq!(
                (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
                ("apps", "web-0", "u1")
            );
            Ok(Holder::Gone {
                reason: "pod apps/web-0 uid u1 no longer exists".into(),
            })
        });
        assert_eq!(
            v,
            Verdict::Release {
                reason: "pod apps/web-0 uid u1 no longer exists".into()
            }
        );
        // Grace 0 asks at once.
        let r = record(Some(("apps", "web-0", "u1")), NOW);
        let v = decide(&r, NOW, Duration::ZERO, |_| {
            Ok(Holder::Gone {
                reason: "re-created".into(),
            })
        });
        assert!(matches!(v, Verdict::Release { .. }), "{v:?}");
    }

    #[test]
    fn a_live_or_terminating_pod_or_one_the_api_cannot_tell_about_is_kept() {
        let r = record(Some(("apps", "web-0", "u1")), OLD);
        assert_eq!(
            decide(&r, NOW, GRACE, |_| Ok(Holder::Alive)),
            Verdict::Keep(Keep::Alive)
        );
        assert_eq!(
            decide(&r, NOW, GRACE, |_| Ok(Holder::Terminating)),
            Verdict::Keep(Keep::Terminating)
        );
        assert_eq!(
            decide(&r, NOW, GRACE, |_| Err("503 Service Unavailable".into())),
            Verdict::Keep(Keep::Unknown("503 Service Unavailable".into()))
        );
    }

    fn attachment(id: &str) -> Attachment {
        Attachment::new("net", id, "eth0")
    }

    #[test]
    fn report_lines_name_each_release_and_unreadable_pod_and_summarise() {
        let report = PassReport {
            dry_run: true,
            released: vec![Released {
                attachment: attachment("c1"),
                ips: vec!["10.0.0.5".parse().expect("literal")],
                reason: "pod apps/web-0 uid u1 was re-created with uid u2".into(),
            }],
            kept: vec![
                (attachment("c2"), Keep::Alive),
                (attachment("c3"), Keep::NotJudged),
                (attachment("c4"), Keep::Young { age: 3 }),
                (attachment("c5"), Keep::Terminating),
                (attachment("c6"), Keep::Unknown("HTTP\n503".into())),
            ],
            changed: vec![],
            failed: vec![(attachment("c7"), "etcd unavailable".into())],
        };
        assert_eq!(
            report.lines(),
            vec![
                "would release c1/eth0 of network net (10.0.0.5): pod apps/web-0 uid u1 was re-created with uid u2",
                r"kept c6/eth0 of network net: its pod cannot be read: HTTP\n503",
                "could not release c7/eth0 of network net: etcd unavailable",
                "would release 1 attachments; kept 5 (pod alive 1, pod terminating 1, younger than the grace 1, no pod uid 1, pod not readable 1); changed meanwhile 0; failed 1",
            ]
        );
        let done = PassReport {
            dry_run: false,
            failed: vec![],
            ..report
        };
        assert!(done.lines()[0].starts_with("released c1/eth0"));
        assert!(
            !Outcome::finish(done).expect("no error"),
            "an unreadable pod fails the pass"
        );
        let clean = PassReport {
            kept: vec![(attachment("c2"), Keep::Alive)],
            ..PassReport::default()
        };
        assert!(Outcome::finish(clean).expect("no error"));
    }

    #[test]
    fn an_api_outage_is_warned_about_once() {
        let outage = PassReport {
            kept: vec![(attachment("a"), Keep::Unknown("503".into()))],
            ..PassReport::default()
        };
        assert!(log_pass(&outage, false));
        assert!(log_pass(&outage, true));
        assert!(!log_pass(&PassReport::default(), true));
    }
}
