//! The network-namespace GC: each daemon releases, after a grace period, its own node's
//! attachments whose network namespace no longer exists.
//!
//! This is the second line of defence against leaks. The first is the runtime's DEL (and CNI
//! GC), but runtimes give up: Podman never retries a DEL that failed (the daemon was down, etcd
//! had no leader), and never sends CNI GC. The attachment record keeps the `CNI_NETNS` path the
//! runtime gave at ADD; once that path is gone, so is the attachment's namespace, and nothing
//! can use its addresses any more.
//!
//! The path is only meaningful on the node that made the attachment, so each daemon looks only
//! at its own node's records, through the host's view of the paths: in a container the daemon
//! needs the host's `/run/netns` mounted at the same path, and the host's PID namespace for
//! `/proc/<pid>/ns/net` paths.
//!
//! The rules are in [`decide`], pure and table-tested; [`pass`] lists, probes and releases;
//! [`run`] repeats a pass on an interval inside the daemon; the `gc-netns` command runs one.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::allocator::{Allocator, HeldAttachment};
use crate::cli::{escaped, Outcome};
use crate::error::Result;
use crate::gc::{join_ips, run_every, Schedule};
use crate::records::{now_unix, Attachment, AttachmentRecord};

/// How long probing the namespace paths of one pass may take. A `stat` on a hung mount never
/// returns; the pass then keeps everything and says why, rather than stalling the daemon.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What this daemon sees at a recorded network-namespace path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    /// The path exists: the namespace (or, for a reused `/proc/<pid>` path, some namespace) is
    /// there.
    Present,
    /// The path does not exist (ENOENT) while the directory it lives in does: the namespace is
    /// gone.
    Missing,
    /// Anything else (EACCES, EIO, a relative path, a directory that is not there because the
    /// daemon does not see the host's mounts): nothing is known, so nothing is released.
    Unknown(String),
}

/// Why an attachment is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// The record has no netns path (written before the path was recorded, or the runtime
    /// gave none): there is nothing to check.
    NoNetns,
    /// Younger than the grace period: `age` seconds old.
    Young { age: u64 },
    /// Its namespace path exists.
    Present,
    /// The path could not be checked; the reason says why.
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

/// The rules, for one of this node's attachment records at unix time `now`:
///
/// 1. no netns path: keep (unknown);
/// 2. younger than `grace`: keep, without looking at the path (a runtime may record the path
///    before the namespace is mounted, or tear the namespace down just before its DEL);
/// 3. the path is missing ([`PathState::Missing`]): release;
/// 4. the path exists or cannot be checked: keep.
///
/// A `/proc/<pid>/ns/net` path (Docker, dockershim) can be taken over by a new process that
/// reuses the PID; the path then exists and the attachment is kept longer than it lives. That
/// errs on the safe side: a path that exists never releases anything, only a missing one does.
/// A record whose time lies in the future (clock skew between nodes) counts as age 0.
pub fn decide(
    record: &AttachmentRecord,
    now: u64,
    grace: Duration,
    probe: impl FnOnce(&str) -> PathState,
) -> Verdict {
    if record.netns.is_empty() {
        return Verdict::Keep(Keep::NoNetns);
    }
    let age = now.saturating_sub(record.allocated_at);
    if age < grace.as_secs() {
        return Verdict::Keep(Keep::Young { age });
    }
    match probe(&record.netns) {
        PathState::Present => Verdict::Keep(Keep::Present),
        PathState::Missing => Verdict::Release {
            reason: format!(
                "network namespace {} no longer exists",
                escaped(&record.netns)
            ),
        },
        PathState::Unknown(why) => Verdict::Keep(Keep::Unknown(why)),
    }
}

/// The inode number of the initial PID namespace (`PROC_PID_INIT_INO` in the kernel's
/// `include/linux/proc_ns.h`): `/proc/self/ns/pid` has it only in the host's PID namespace.
pub const HOST_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// What `stat` (returning the inode number) says about `path`, read as [`PathState`]: only
/// ENOENT, in a place the daemon can see, is [`PathState::Missing`]. A daemon that does not see
/// the host's paths must release nothing rather than everything, so:
///
/// - for a path under `/run/netns` (or anywhere but `/proc`), its directory must exist: a
///   container without the host's `/run/netns` mounted has no such directory;
/// - for a `/proc/<pid>/...` path, the daemon must be in the host's PID namespace (`hostPID`):
///   in a container's own, no host PID is visible and every such path looks gone.
pub fn classify(path: &str, stat: impl Fn(&Path) -> io::Result<u64>) -> PathState {
    let p = Path::new(path);
    if !p.is_absolute() {
        return PathState::Unknown(format!("{} is not an absolute path", escaped(path)));
    }
    match stat(p) {
        Ok(_) => return PathState::Present,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return PathState::Unknown(format!("checking {}: {e}", escaped(path))),
    }
    if p.starts_with("/proc") {
        let own = Path::new("/proc/self/ns/pid");
        return match stat(own) {
            Ok(HOST_PID_NS_INODE) => PathState::Missing,
            Ok(_) => PathState::Unknown(format!(
                "{} does not exist, but the daemon is not in the host's PID namespace (hostPID), so it cannot see the process",
                escaped(path)
            )),
            Err(e) => PathState::Unknown(format!(
                "{} does not exist, but neither does {} ({e}): is /proc mounted?",
                escaped(path),
                own.display()
            )),
        };
    }
    let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return PathState::Unknown(format!("{} has no parent directory", escaped(path)));
    };
    match stat(dir) {
        Ok(_) => PathState::Missing,
        Err(e) => PathState::Unknown(format!(
            "{} does not exist, but neither does {} ({e}): does the daemon see the host's namespace paths?",
            escaped(path),
            dir.display()
        )),
    }
}

/// [`classify`] against this host's filesystem (`stat`, following links: `/proc/<pid>/ns/net`
/// is a link to the namespace).
pub fn host_path_state(path: &str) -> PathState {
    classify(path, |p| std::fs::metadata(p).map(|m| m.ino()))
}

/// An attachment the pass released (or, in a dry run, would release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub attachment: Attachment,
    pub ips: Vec<IpAddr>,
    pub netns: String,
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
    /// One line per released (or, in a dry run, to-be-released) attachment and one per
    /// failure, then a summary. Names from etcd and the runtime are escaped.
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
                    r.reason
                )
            })
            .collect();
        lines.extend(self.failed.iter().map(|(a, e)| {
            format!(
                "could not release {}: {}",
                escaped(&a.to_string()),
                escaped(e)
            )
        }));
        let count = |f: fn(&Keep) -> bool| self.kept.iter().filter(|(_, k)| f(k)).count();
        lines.push(format!(
            "{verb} {} attachments; kept {} (namespace present {}, younger than the grace {}, no netns path {}, namespace not checkable {}); changed meanwhile {}; failed {}",
            self.released.len(),
            self.kept.len(),
            count(|k| matches!(k, Keep::Present)),
            count(|k| matches!(k, Keep::Young { .. })),
            count(|k| matches!(k, Keep::NoNetns)),
            count(|k| matches!(k, Keep::Unknown(_))),
            self.changed.len(),
            self.failed.len(),
        ));
        lines
    }
}

/// The pass fails when a release failed; the attachment is tried again at the next pass.
impl Outcome for PassReport {
    fn lines(&self) -> Vec<String> {
        PassReport::lines(self)
    }

    fn finish(self) -> Result<bool, crate::IpamError> {
        Ok(self.failed.is_empty())
    }
}

/// Probes `paths` on a blocking thread, bounded by [`PROBE_TIMEOUT`]; every path is
/// [`PathState::Unknown`] if the probe does not finish in time.
async fn probe_all(paths: Vec<String>) -> Vec<PathState> {
    let n = paths.len();
    let probe = tokio::task::spawn_blocking(move || {
        paths.iter().map(|p| host_path_state(p)).collect::<Vec<_>>()
    });
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(states)) => states,
        Ok(Err(e)) => vec![PathState::Unknown(format!("probe failed: {e}")); n],
        Err(_) => vec![
            PathState::Unknown(format!(
                "checking the namespace paths took longer than {PROBE_TIMEOUT:?}"
            ));
            n
        ],
    }
}

/// One pass: lists this node's attachments, decides with [`decide`] at the current time, and
/// releases each one to release (unless `dry_run`). Keeps going past failures.
///
/// Just before a release the path must still be missing, and the release happens only if the
/// record is still at the revision listed: a container restarted with the same id meanwhile
/// (a new ADD, a new namespace) is left alone.
pub async fn pass(allocator: &Allocator, grace: Duration, dry_run: bool) -> Result<PassReport> {
    allocator.ready().await?;
    let records = allocator.node_attachments(None).await?;
    let now = now_unix();
    let to_probe: Vec<String> = records
        .iter()
        .map(|h| &h.record)
        .filter(|r| !r.netns.is_empty() && now.saturating_sub(r.allocated_at) >= grace.as_secs())
        .map(|r| r.netns.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let states: HashMap<String, PathState> = to_probe
        .iter()
        .cloned()
        .zip(probe_all(to_probe.clone()).await)
        .collect();
    let state_of = |path: &str| {
        states
            .get(path)
            .cloned()
            .unwrap_or_else(|| PathState::Unknown(format!("{} was not probed", escaped(path))))
    };
    let mut report = PassReport {
        dry_run,
        ..PassReport::default()
    };
    for held in records {
        let (attachment, record) = (&held.attachment, &held.record);
        let reason = match decide(record, now, grace, state_of) {
            Verdict::Keep(keep) => {
                report.kept.push((attachment.clone(), keep));
                continue;
            }
            Verdict::Release { reason } => reason,
        };
        let released = Released {
            ips: record.ips.iter().map(|h| h.ip).collect(),
            netns: record.netns.clone(),
            reason,
            attachment: attachment.clone(),
        };
        if dry_run {
            report.released.push(released);
            continue;
        }
        match release_if_still_gone(allocator, &held).await {
            Ok(Some(ips)) => report.released.push(Released { ips, ..released }),
            Ok(None) => report.changed.push(attachment.clone()),
            Err(e) => report.failed.push((attachment.clone(), e.to_string())),
        }
    }
    Ok(report)
}

/// Releases `held` if its path is still missing and etcd still holds the record listed.
/// Returns the released addresses, or None if it changed meanwhile.
async fn release_if_still_gone(
    allocator: &Allocator,
    held: &HeldAttachment,
) -> Result<Option<Vec<IpAddr>>> {
    let state = probe_all(vec![held.record.netns.clone()]).await;
    if state.first() != Some(&PathState::Missing) {
        return Ok(None);
    }
    Ok(allocator
        .release_if_unchanged(held)
        .await?
        .map(|record| record.ips.iter().map(|h| h.ip).collect()))
}

/// Runs a pass every `schedule.interval` until `shutdown` completes ([`run_every`]). Logs one
/// line per release, one per failure, and each kept attachment that cannot be checked once.
pub async fn run(
    allocator: Arc<Allocator>,
    schedule: Schedule,
    shutdown: impl Future<Output = ()>,
) {
    let mut noted = HashSet::new();
    run_every(
        "network-namespace GC",
        schedule,
        shutdown,
        || pass(&allocator, schedule.grace, false),
        |report| log_pass(&report, &mut noted),
    )
    .await;
}

/// Logs a pass of the daemon's GC. Attachments kept for want of a checkable path are logged
/// once each (at debug without a path, at warn when the check fails), not on every pass.
fn log_pass(report: &PassReport, noted: &mut HashSet<Attachment>) {
    crate::metrics::gc_released("netns", "netns_gone", report.released.len());
    for r in &report.released {
        tracing::info!(
            attachment = %escaped(&r.attachment.to_string()),
            ips = %join_ips(&r.ips),
            netns = %escaped(&r.netns),
            reason = %r.reason,
            "released attachment whose network namespace is gone"
        );
    }
    for (a, e) in &report.failed {
        tracing::warn!(attachment = %escaped(&a.to_string()), error = %escaped(e), "could not release attachment whose network namespace is gone; trying again at the next interval");
    }
    let mut still = HashSet::new();
    for (a, keep) in &report.kept {
        match keep {
            Keep::NoNetns | Keep::Unknown(_) => {
                still.insert(a.clone());
            }
            Keep::Young { .. } | Keep::Present => continue,
        }
        if noted.contains(a) {
            continue;
        }
        match keep {
            Keep::NoNetns => {
                tracing::debug!(attachment = %escaped(&a.to_string()), "attachment has no netns path; the namespace GC keeps it")
            }
            Keep::Unknown(why) => {
                tracing::warn!(attachment = %escaped(&a.to_string()), reason = %why, "cannot tell whether the attachment's network namespace exists; keeping it")
            }
            Keep::Young { .. } | Keep::Present => {}
        }
    }
    *noted = still;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{HeldIp, RECORD_VERSION};

    const GRACE: Duration = Duration::from_secs(60);
    const NOW: u64 = 1_700_000_000;

    fn record(netns: &str, allocated_at: u64) -> AttachmentRecord {
        AttachmentRecord {
            version: RECORD_VERSION,
            network: "net".into(),
            node: "node-1".into(),
            pod: None,
            ips: vec![HeldIp {
                pool: "10.0.0.0_24".into(),
                ip: "10.0.0.5".parse().expect("literal"),
                kind: None,
            }],
            allocated_at,
            netns: netns.into(),
        }
    }

    fn never_probed(path: &str) -> PathState {
        panic!("{path} must not be probed")
    }

    #[test]
    fn a_record_without_a_netns_path_is_kept_unprobed() {
        let v = decide(&record("", 0), NOW, GRACE, never_probed);
        assert_eq!(v, Verdict::Keep(Keep::NoNetns));
    }

    #[test]
    fn a_record_younger_than_the_grace_is_kept_unprobed() {
        let v = decide(&record("/run/netns/x", NOW - 59), NOW, GRACE, never_probed);
        assert_eq!(v, Verdict::Keep(Keep::Young { age: 59 }));
        // Clock skew: a record from the future is age 0.
        let v = decide(&record("/run/netns/x", NOW + 30), NOW, GRACE, never_probed);
        assert_eq!(v, Verdict::Keep(Keep::Young { age: 0 }));
    }

    #[test]
    fn a_missing_path_past_the_grace_is_released_with_its_path_in_the_reason() {
        let v = decide(&record("/run/netns/cni-1", NOW - 60), NOW, GRACE, |p| {
            assert_eq!(p, "/run/netns/cni-1");
            PathState::Missing
        });
        assert_eq!(
            v,
            Verdict::Release {
                reason: "network namespace /run/netns/cni-1 no longer exists".into()
            }
        );
        // Grace 0 releases at once.
        let v = decide(
            &record("/run/netns/cni-1", NOW),
            NOW,
            Duration::ZERO,
            |_| PathState::Missing,
        );
        assert!(matches!(v, Verdict::Release { .. }), "{v:?}");
    }

    #[test]
    fn a_present_or_uncheckable_path_is_kept() {
        let old = record("/proc/42/ns/net", NOW - 3600);
        assert_eq!(
            decide(&old, NOW, GRACE, |_| PathState::Present),
            Verdict::Keep(Keep::Present)
        );
        assert_eq!(
            decide(&old, NOW, GRACE, |_| PathState::Unknown("EIO".into())),
            Verdict::Keep(Keep::Unknown("EIO".into()))
        );
    }

    #[test]
    fn a_path_with_control_characters_is_escaped_in_the_reason() {
        let v = decide(&record("/run/netns/a\nb", 0), NOW, GRACE, |_| {
            PathState::Missing
        });
        let Verdict::Release { reason } = v else {
            panic!("{v:?}")
        };
        assert!(!reason.contains('\n'), "{reason}");
        assert!(reason.contains(r"a\nb"), "{reason}");
    }

    /// A fake `stat`: `entries` exist (with inode 1, except `/proc/self/ns/pid`, which has
    /// `pid_ns`), `errors` fail with that OS error, everything else is ENOENT.
    fn fake_stat<'a>(
        entries: &'a [&'a str],
        errors: &'a [(&'a str, i32)],
        pid_ns: u64,
    ) -> impl Fn(&Path) -> io::Result<u64> + 'a {
        move |p: &Path| {
            let p = p.to_str().expect("utf-8");
            if let Some((_, code)) = errors.iter().find(|(e, _)| *e == p) {
                return Err(io::Error::from_raw_os_error(*code));
            }
            if p == "/proc/self/ns/pid" {
                Ok(pid_ns)
            } else if entries.contains(&p) {
                Ok(1)
            } else {
                Err(io::Error::from(io::ErrorKind::NotFound))
            }
        }
    }

    const ENOENT: i32 = 2;
    const EIO: i32 = 5;
    const EACCES: i32 = 13;
    const ENOTDIR: i32 = 20;

    #[test]
    fn only_enoent_in_an_existing_directory_is_missing() {
        let stat = fake_stat(
            &["/run/netns", "/run/netns/alive"],
            &[
                ("/run/netns/denied", EACCES),
                ("/run/netns/broken", EIO),
                ("/run/netns/file/x", ENOTDIR),
            ],
            HOST_PID_NS_INODE,
        );
        assert_eq!(classify("/run/netns/alive", &stat), PathState::Present);
        assert_eq!(classify("/run/netns/gone", &stat), PathState::Missing);
        assert_eq!(classify("/proc/4242/ns/net", &stat), PathState::Missing);
        for path in [
            "/run/netns/denied",
            "/run/netns/broken",
            "/run/netns/file/x",
        ] {
            let state = classify(path, &stat);
            assert!(
                matches!(&state, PathState::Unknown(why) if why.contains(path)),
                "{path}: {state:?}"
            );
        }
    }

    #[test]
    fn a_missing_directory_or_another_pid_namespace_means_unknown_not_gone() {
        // A daemon in a container without the host's /run/netns sees no namespace at all.
        let stat = fake_stat(&[], &[], HOST_PID_NS_INODE);
        let state = classify("/run/netns/cni-1", &stat);
        assert!(
            matches!(&state, PathState::Unknown(why) if why.contains("host's namespace paths")),
            "{state:?}"
        );
        // Nor, without hostPID, any host process.
        let stat = fake_stat(&[], &[], 4_026_532_000);
        let state = classify("/proc/4242/ns/net", &stat);
        assert!(
            matches!(&state, PathState::Unknown(why) if why.contains("hostPID")),
            "{state:?}"
        );
        let stat = fake_stat(&[], &[("/proc/self/ns/pid", ENOENT)], 0);
        let state = classify("/proc/4242/ns/net", &stat);
        assert!(
            matches!(&state, PathState::Unknown(why) if why.contains("is /proc mounted?")),
            "{state:?}"
        );
        let stat = fake_stat(&[], &[], HOST_PID_NS_INODE);
        let state = classify("/var/run/netns/x", &stat);
        assert!(
            matches!(&state, PathState::Unknown(why)
                if why.starts_with("/var/run/netns/x does not exist, but neither does /var/run/netns ")),
            "{state:?}"
        );
    }

    #[test]
    fn a_relative_path_is_unknown() {
        let stat = fake_stat(&[], &[], HOST_PID_NS_INODE);
        assert!(matches!(
            classify("netns/x", &stat),
            PathState::Unknown(why) if why.contains("not an absolute path")
        ));
        assert!(matches!(classify("/", &stat), PathState::Unknown(_)));
    }

    #[test]
    fn host_paths_are_classified_by_the_real_filesystem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("ns");
        std::fs::write(&file, "").expect("write");
        let path = file.to_str().expect("utf-8").to_string();
        assert_eq!(host_path_state(&path), PathState::Present);
        std::fs::remove_file(&file).expect("remove");
        assert_eq!(host_path_state(&path), PathState::Missing);
        assert_eq!(host_path_state("/proc/self/ns/net"), PathState::Present);
        let own_pid_ns = std::fs::metadata("/proc/self/ns/pid").map(|m| m.ino());
        if own_pid_ns.is_ok_and(|ino| ino == HOST_PID_NS_INODE) {
            // No process has PID 2^22 + 1 (above the kernel's pid_max limit).
            assert_eq!(host_path_state("/proc/4194305/ns/net"), PathState::Missing);
        }
        let nul = format!("{path}\0x");
        assert!(matches!(host_path_state(&nul), PathState::Unknown(_)));
    }

    fn attachment(id: &str) -> Attachment {
        Attachment::new("net", id, "eth0")
    }

    #[test]
    fn report_lines_name_each_release_and_summarise() {
        let report = PassReport {
            dry_run: true,
            released: vec![Released {
                attachment: attachment("c1"),
                ips: vec!["10.0.0.5".parse().expect("literal")],
                netns: "/run/netns/cni-1".into(),
                reason: "network namespace /run/netns/cni-1 no longer exists".into(),
            }],
            kept: vec![
                (attachment("c2"), Keep::Present),
                (attachment("c3"), Keep::NoNetns),
                (attachment("c4"), Keep::Young { age: 3 }),
            ],
            changed: vec![],
            failed: vec![(attachment("c5"), "etcd\nunavailable".into())],
        };
        let lines = report.lines();
        assert_eq!(
            lines,
            vec![
                "would release c1/eth0 of network net (10.0.0.5): network namespace /run/netns/cni-1 no longer exists",
                r"could not release c5/eth0 of network net: etcd\nunavailable",
                "would release 1 attachments; kept 3 (namespace present 1, younger than the grace 1, no netns path 1, namespace not checkable 0); changed meanwhile 0; failed 1",
            ]
        );
        let done = PassReport {
            dry_run: false,
            ..report
        };
        assert!(done.lines()[0].starts_with("released c1/eth0"));
    }

    #[test]
    fn kept_attachments_are_noted_once_until_they_go() {
        let mut noted = HashSet::new();
        let report = PassReport {
            kept: vec![
                (attachment("a"), Keep::NoNetns),
                (attachment("b"), Keep::Unknown("EIO".into())),
                (attachment("c"), Keep::Present),
            ],
            ..PassReport::default()
        };
        log_pass(&report, &mut noted);
        assert_eq!(noted, HashSet::from([attachment("a"), attachment("b")]));
        let report = PassReport {
            kept: vec![(attachment("b"), Keep::Unknown("EIO".into()))],
            ..PassReport::default()
        };
        log_pass(&report, &mut noted);
        assert_eq!(noted, HashSet::from([attachment("b")]));
    }
}
