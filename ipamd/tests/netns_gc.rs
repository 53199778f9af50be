//! The network-namespace GC against a real etcd and real network namespaces: an attachment
//! whose namespace is deleted is released, by the `gc-netns` command and by the daemon's
//! periodic pass, and nothing else is: not an attachment whose namespace lives, nor one
//! without a recorded namespace, nor one younger than the grace, nor another node's.
//!
//! Needs root and iproute2 (`ip netns`); skips with a SKIPPED message otherwise. Every
//! namespace a test creates is deleted when its guard drops, also when the test fails.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hostnic_ipamd::{AllocateRequest, Allocator, Attachment, Kind, RangeSet};
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{self as proto, Network};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::netns::{require_netns, NetNs};
use hostnic_testkit::{shared_single, unique_prefix};

mod common;
use common::snapshot;

const NETWORK: &str = "gc-net";

async fn allocator(prefix: &str, node: &str) -> Allocator {
    common::allocator(shared_single(), prefix, node).await
}

fn sets(subnet: &str) -> Vec<RangeSet> {
    common::sets(serde_json::json!({ "subnet": subnet }))
}

fn attachment(id: &str) -> Attachment {
    Attachment::new(NETWORK, id, "eth0")
}

/// The path a runtime passes as `CNI_NETNS` for a namespace made with `ip netns add`.
fn run_path(ns: &NetNs) -> String {
    format!("/run/netns/{}", ns.name())
}

async fn add(a: &Allocator, id: &str, sets: &[RangeSet], netns: &str) {
    a.allocate(&AllocateRequest {
        attachment: attachment(id),
        pod: None,
        netns: netns.to_string(),
        range_sets: sets.to_vec(),
        requested: vec![],
        requested_kind: Kind::Exact,
    })
    .await
    .unwrap_or_else(|e| panic!("allocate {id}: {e}"));
}

async fn held(a: &Allocator, id: &str) -> bool {
    a.lookup(&attachment(id))
        .await
        .unwrap_or_else(|e| panic!("lookup {id}: {e}"))
        .is_some()
}

/// Runs `hostnic-ipamd gc-netns` for `node` against the shared etcd; returns success and stdout.
fn gc_netns(prefix: &str, node: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"))
        .arg("gc-netns")
        .args(args)
        .arg("--etcd-endpoints")
        .arg(shared_single().endpoints().join(","))
        .args(["--etcd-prefix", prefix, "--node-name", node])
        .env("RUST_LOG", "warn")
        .output()
        .expect("command runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn release_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            (l.starts_with("released ") || l.starts_with("would release "))
                && !l.contains(" attachments; ")
        })
        .collect()
}

#[tokio::test]
async fn gc_netns_dry_run_changes_nothing_and_then_releases_only_the_attachment_whose_namespace_is_gone(
) {
    if !require_netns("gc-netns test (creates network namespaces)") {
        return;
    }
    // Long enough that the first four attachments are past it when the command runs, and the
    // last one is not: allocation times are whole seconds.
    const GRACE: Duration = Duration::from_secs(4);
    let grace = GRACE.as_secs().to_string();
    let prefix = unique_prefix("gc-netns");
    let node = "node-gc";
    let a = allocator(&prefix, node).await;
    let other = allocator(&prefix, "node-other").await;
    let sets = sets("10.92.0.0/24");
    let doomed = NetNs::new("gcdead").expect("netns");
    let alive = NetNs::new("gcalive").expect("netns");
    let dead_path = run_path(&doomed);
    add(&a, "dead", &sets, &dead_path).await;
    add(&a, "alive", &sets, &run_path(&alive)).await;
    add(&a, "no-netns", &sets, "").await;
    // Another node's attachment: its path means nothing on this node.
    add(&other, "elsewhere", &sets, &dead_path).await;
    let dead_ip = a
        .lookup(&attachment("dead"))
        .await
        .expect("lookup")
        .expect("held")
        .ips[0]
        .ip;
    tokio::time::sleep(GRACE + Duration::from_millis(200)).await;
    let young_since = Instant::now();
    add(&a, "young", &sets, &dead_path).await;

    // Every namespace exists: nothing to release.
    let (ok, out) = gc_netns(&prefix, node, &["--dry-run", "--gc-grace-seconds", &grace]);
    assert!(ok, "{out}");
    assert!(release_lines(&out).is_empty(), "{out}");
    assert!(out.contains("would release 0 attachments"), "{out}");

    drop(doomed); // ip netns del
    assert!(!Path::new(&dead_path).exists(), "{dead_path} deleted");

    let before = snapshot(&a).await;
    let (ok, out) = gc_netns(&prefix, node, &["--dry-run", "--gc-grace-seconds", &grace]);
    assert!(ok, "{out}");
    let expected = format!(
        "dead/eth0 of network {NETWORK} ({dead_ip}): network namespace {dead_path} no longer exists"
    );
    assert_eq!(
        release_lines(&out),
        vec![format!("would release {expected}")],
        "{out}"
    );
    assert!(
        out.contains("would release 1 attachments; kept 3 (namespace present 1, younger than the grace 1, no netns path 1, namespace not checkable 0); changed meanwhile 0; failed 0"),
        "{out}"
    );
    assert_eq!(snapshot(&a).await, before, "a dry run writes nothing");
    assert!(held(&a, "dead").await);

    let (ok, out) = gc_netns(&prefix, node, &["--gc-grace-seconds", &grace]);
    assert!(ok, "{out}");
    assert_eq!(
        release_lines(&out),
        vec![format!("released {expected}")],
        "{out}"
    );
    assert!(
        young_since.elapsed() < GRACE,
        "the young attachment outgrew the grace before the command ran; the machine is too slow for this test"
    );
    assert!(!held(&a, "dead").await, "the dead attachment is released");
    for id in ["alive", "no-netns", "young"] {
        assert!(held(&a, id).await, "{id} is kept");
    }
    assert!(
        held(&other, "elsewhere").await,
        "another node's attachment is kept"
    );

    // Idempotent: nothing left to do.
    let (ok, out) = gc_netns(&prefix, node, &["--gc-grace-seconds", &grace]);
    assert!(ok, "{out}");
    assert!(release_lines(&out).is_empty(), "{out}");
    drop(alive);
}

async fn client(socket: &Path) -> IpamClient<tonic::transport::Channel> {
    IpamClient::new(
        hostnic_proto::connect(socket, Duration::from_secs(1))
            .await
            .expect("connects"),
    )
}

#[tokio::test]
async fn the_daemon_releases_an_attachment_soon_after_its_namespace_is_deleted_and_nothing_else() {
    if !require_netns("daemon netns GC test (creates network namespaces)") {
        return;
    }
    let prefix = unique_prefix("gc-netns-daemon");
    let node = "node-gcd";
    let dir = tempfile::tempdir().expect("temp dir");
    let mut daemon = IpamDaemon::start(
        Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
        &shared_single().endpoints(),
        node,
        &prefix,
        &dir.path().join("run/ipamd.sock"),
        &[
            "--netns-gc-interval-seconds",
            "1",
            "--gc-grace-seconds",
            "0",
        ],
    )
    .expect("daemon starts");
    let doomed = NetNs::new("gcddead").expect("netns");
    let alive = NetNs::new("gcdalive").expect("netns");
    let dead_path = run_path(&doomed);
    let mut c = client(&daemon.socket).await;
    let ipam = serde_json::json!({"type": "hostnic-ipam", "subnet": "10.93.0.0/24"});
    let mut dead_ip = String::new();
    for (id, netns) in [
        ("dead", dead_path.clone()),
        ("alive", run_path(&alive)),
        ("no-netns", String::new()),
    ] {
        let reply = c
            .allocate(proto::AllocateRequest {
                attachment: Some(proto::Attachment {
                    container_id: id.into(),
                    ifname: "eth0".into(),
                }),
                network: Some(Network {
                    name: NETWORK.into(),
                    ipam_json: ipam.to_string(),
                }),
                pod: None,
                requested_ips: vec![],
                netns,
            })
            .await
            .unwrap_or_else(|e| panic!("allocate {id}: {e}"))
            .into_inner();
        if id == "dead" {
            dead_ip = reply.ips[0]
                .address
                .split('/')
                .next()
                .expect("address")
                .to_string();
        }
    }
    let a = allocator(&prefix, node).await;
    // Passes run every second, and the namespace exists: the attachment stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(held(&a, "dead").await, "{}", daemon.log_tail());

    drop(doomed); // ip netns del
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&a, "dead").await {
        assert!(
            Instant::now() < deadline,
            "the attachment of the deleted namespace is still held after 10 s\n{}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more passes release nothing else.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in ["alive", "no-netns"] {
        assert!(held(&a, id).await, "{id} is kept\n{}", daemon.log_tail());
    }

    let log = daemon.log_tail();
    let releases: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("released attachment whose network namespace is gone"))
        .collect();
    assert_eq!(releases.len(), 1, "one line per release\n{log}");
    let line = releases[0];
    for part in [
        "INFO",
        &format!("dead/eth0 of network {NETWORK}"),
        &dead_ip,
        &format!("netns={dead_path}"),
        &format!("network namespace {dead_path} no longer exists"),
    ] {
        assert!(line.contains(part), "{part:?} missing from {line}");
    }

    drop(c);
    let (status, took) = daemon.stop().expect("the daemon was running");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(took < Duration::from_secs(4), "stopped in {took:?}");
    let log = daemon.log_tail();
    assert!(
        log.contains("network-namespace GC stopped"),
        "the GC task stops with the daemon\n{log}"
    );
    drop(alive);
}

/// A child process killed and reaped on drop, also when the test fails.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_proc_pid_path_is_released_once_its_process_is_gone_and_kept_while_it_lives() {
    use std::os::unix::fs::MetadataExt;
    let own_pid_ns = std::fs::metadata("/proc/self/ns/pid").map(|m| m.ino());
    if !own_pid_ns.is_ok_and(|ino| ino == hostnic_ipamd::netns_gc::HOST_PID_NS_INODE) {
        hostnic_testkit::report_skip(
            "/proc/<pid>/ns/net GC test",
            "the test is not in the host's PID namespace, where such paths are kept by design",
        );
        return;
    }
    let prefix = unique_prefix("gc-netns-proc");
    let a = allocator(&prefix, "node-proc").await;
    let sets = sets("10.94.0.0/24");
    let spawn = || {
        Process(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("sleep starts"),
        )
    };
    let (gone, living) = (spawn(), spawn());
    let path = |p: &Process| format!("/proc/{}/ns/net", p.0.id());
    add(&a, "proc-gone", &sets, &path(&gone)).await;
    add(&a, "proc-living", &sets, &path(&living)).await;
    let gone_path = path(&gone);
    drop(gone);
    assert!(!Path::new(&gone_path).exists(), "{gone_path} is gone");

    let report = hostnic_ipamd::netns_gc::pass(&a, Duration::ZERO, false)
        .await
        .expect("pass");
    let released: Vec<&str> = report
        .released
        .iter()
        .map(|r| r.attachment.container_id.as_str())
        .collect();
    assert_eq!(released, vec!["proc-gone"], "{:?}", report.lines());
    assert_eq!(
        report.released[0].reason,
        format!("network namespace {gone_path} no longer exists")
    );
    assert!(!held(&a, "proc-gone").await);
    assert!(held(&a, "proc-living").await);
    drop(living);
}
