//! The pod GC against the testkit's stateful fake Kubernetes API server and a real etcd, with
//! the real hostnic-ipamd binary: an attachment whose pod was deleted behind the daemon's back,
//! or re-created under the same name with another UID, is released by the running daemon and by
//! `gc-pods`, and nothing else is: not a live pod's, not a terminating pod's, not one without a
//! pod UID, not the re-created pod's new attachment, and nothing at all while the API answers
//! 503. `gc-pods --dry-run` writes nothing.
//!
//! The daemon serves only from a root-owned socket directory and answers only root callers, so
//! the daemon's test needs root and skips loudly without it; the command's test does not.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hostnic_ipamd::{AllocateRequest, Allocator, Attachment, Kind, PodRef, RangeSet};
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{self as proto, AllocateRequest as WireRequest, Network, Pod};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self as fake, FakeKube, Fault, Kind as ObjectKind};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::{json, Value};

mod common;
use common::snapshot;

const NETWORK: &str = "pod-gc-net";
const NS: &str = "apps";

fn ipam() -> Value {
    json!({ "type": "hostnic-ipam", "subnet": "10.71.0.0/24" })
}

fn sets() -> Vec<RangeSet> {
    common::sets(ipam())
}

fn attachment(id: &str) -> Attachment {
    Attachment::new(NETWORK, id, "eth0")
}

async fn held(a: &Allocator, id: &str) -> bool {
    a.lookup(&attachment(id))
        .await
        .unwrap_or_else(|e| panic!("lookup {id}: {e}"))
        .is_some()
}

/// Runs `hostnic-ipamd gc-pods` for `node` against the shared etcd, with `kubeconfig` if given
/// and never the caller's own Kubernetes; returns success and stdout + stderr.
fn gc_pods(prefix: &str, node: &str, kubeconfig: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"));
    cmd.arg("gc-pods")
        .args(args)
        .arg("--etcd-endpoints")
        .arg(shared_single().endpoints().join(","))
        .args(["--etcd-prefix", prefix, "--node-name", node])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "warn");
    if let Some(path) = kubeconfig {
        cmd.arg("--kubeconfig").arg(path);
    }
    let out = cmd.output().expect("command runs");
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
    let mut lines: Vec<&str> = out
        .lines()
        .filter(|l| {
            (l.starts_with("released ") || l.starts_with("would release "))
                && !l.contains(" attachments; ")
        })
        .collect();
    lines.sort();
    lines
}

/// An ADD through `a` (on the node the test plays) of `id`/eth0 for pod `NS/pod` of `uid`
/// (None: no pod at all); returns the address.
async fn add(a: &Allocator, id: &str, pod: Option<(&str, &str)>) -> String {
    let allocation = a
        .allocate(&AllocateRequest {
            attachment: attachment(id),
            pod: pod.map(|(name, uid)| PodRef {
                namespace: NS.into(),
                name: name.into(),
                uid: uid.into(),
            }),
            netns: String::new(),
            range_sets: sets(),
            requested: vec![],
            requested_kind: Kind::Exact,
        })
        .await
        .unwrap_or_else(|e| panic!("allocate {id}: {e}"));
    allocation.ips[0].ip.to_string()
}

/// The addresses `id`/eth0 holds, from its record.
async fn addresses(a: &Allocator, id: &str) -> Vec<String> {
    a.lookup(&attachment(id))
        .await
        .unwrap_or_else(|e| panic!("lookup {id}: {e}"))
        .map(|r| r.ips.iter().map(|h| h.ip.to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_pods_dry_run_changes_nothing_an_api_answering_503_frees_nothing_and_then_only_gone_pods_are_released(
) {
    let node = "node-p2";
    let fake = FakeKube::start().expect("fake API server starts");
    for pod in [
        fake::pod(NS, "live").node(node).uid("uid-live"),
        fake::pod(NS, "term").node(node).uid("uid-term"),
        fake::pod(NS, "sts").node(node).uid("uid-new"),
    ] {
        fake.create_pod(pod).expect("pod created");
    }
    fake.set_terminating(NS, "term", Duration::from_secs(30))
        .expect("terminating");
    let prefix = unique_prefix("pod-gc-command");
    let a = common::allocator(shared_single(), &prefix, node).await;
    add(&a, "c-live", Some(("live", "uid-live"))).await;
    add(&a, "c-term", Some(("term", "uid-term"))).await;
    let gone_ip = add(&a, "c-gone", Some(("gone", "uid-gone"))).await;
    let old_ip = add(&a, "c-old", Some(("sts", "uid-old"))).await;
    let new_ip = add(&a, "c-new", Some(("sts", "uid-new"))).await;
    add(&a, "c-nouid", Some(("gone", ""))).await;
    add(&a, "c-nopod", None).await;
    let kubeconfig = Some(fake.kubeconfig_path());
    let before = snapshot(&a).await;

    // Without Kubernetes the command refuses, saying what it needs.
    let (ok, out) = gc_pods(&prefix, node, None, &["--gc-grace-seconds", "0"]);
    assert!(!ok, "{out}");
    assert!(out.contains("--kubeconfig"), "{out}");

    let (ok, out) = gc_pods(
        &prefix,
        node,
        kubeconfig,
        &["--dry-run", "--gc-grace-seconds", "0"],
    );
    assert!(ok, "{out}");
    assert_eq!(
        release_lines(&out),
        vec![
            format!("would release c-gone/eth0 of network {NETWORK} ({gone_ip}): pod {NS}/gone uid uid-gone no longer exists"),
            format!("would release c-old/eth0 of network {NETWORK} ({old_ip}): pod {NS}/sts uid uid-old was re-created with uid uid-new"),
        ],
        "{out}"
    );
    assert!(
        out.contains("would release 2 attachments; kept 5 (pod alive 2, pod terminating 1, younger than the grace 0, no pod uid 2, pod not readable 0)"),
        "{out}"
    );
    assert_eq!(snapshot(&a).await, before, "a dry run writes nothing");

    // Younger than the grace: not even asked about.
    fake.clear_requests();
    let (ok, out) = gc_pods(&prefix, node, kubeconfig, &["--gc-grace-seconds", "3600"]);
    assert!(ok, "{out}");
    assert!(release_lines(&out).is_empty(), "{out}");
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    assert_eq!(snapshot(&a).await, before);

    // An API that cannot answer releases nothing, and the command says so and fails.
    fake.set_fault(Fault::Status(503));
    let (ok, out) = gc_pods(&prefix, node, kubeconfig, &["--gc-grace-seconds", "0"]);
    fake.clear_fault();
    assert!(!ok, "{out}");
    assert!(release_lines(&out).is_empty(), "{out}");
    assert!(
        out.contains(&format!(
            "kept c-gone/eth0 of network {NETWORK}: its pod cannot be read"
        )),
        "{out}"
    );
    assert!(out.contains("pod not readable 5"), "{out}");
    assert_eq!(
        snapshot(&a).await,
        before,
        "nothing written while the API fails"
    );

    let (ok, out) = gc_pods(&prefix, node, kubeconfig, &["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert_eq!(
        release_lines(&out),
        vec![
            format!("released c-gone/eth0 of network {NETWORK} ({gone_ip}): pod {NS}/gone uid uid-gone no longer exists"),
            format!("released c-old/eth0 of network {NETWORK} ({old_ip}): pod {NS}/sts uid uid-old was re-created with uid uid-new"),
        ],
        "{out}"
    );
    for id in ["c-gone", "c-old"] {
        assert!(!held(&a, id).await, "{id} is released");
    }
    for id in ["c-live", "c-term", "c-nouid", "c-nopod"] {
        assert!(held(&a, id).await, "{id} is kept");
    }
    assert_eq!(
        addresses(&a, "c-new").await,
        vec![new_ip],
        "the re-created pod keeps its address"
    );
    let (ok, out) = gc_pods(&prefix, node, kubeconfig, &["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(
        release_lines(&out).is_empty(),
        "a second pass finds nothing: {out}"
    );

    // Another node's attachment of a pod that is gone is not this node's to release.
    let other = common::allocator(shared_single(), &prefix, "node-p3").await;
    add(&other, "c-elsewhere", Some(("gone", "uid-gone"))).await;
    let (ok, out) = gc_pods(&prefix, node, kubeconfig, &["--gc-grace-seconds", "0"]);
    assert!(ok && release_lines(&out).is_empty(), "{out}");
    assert!(held(&a, "c-elsewhere").await);
}

/// A daemon of `node` watching its own fake API server, passing the pod GC every second with no
/// grace, and an allocator on the same keys to read what it wrote.
struct Node {
    // Declared first: stopped before the fake, the observer and the directory go.
    daemon: IpamDaemon,
    fake: FakeKube,
    observer: Allocator,
    client: IpamClient<tonic::transport::Channel>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(test: &str, node: &str, pods: Vec<fake::PodBuilder>) -> Node {
        let fake = FakeKube::start().expect("fake API server starts");
        for pod in pods {
            fake.create_pod(pod).expect("pod created");
        }
        let prefix = unique_prefix(test);
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/ipamd.sock");
        let kubeconfig = fake
            .kubeconfig_path()
            .to_str()
            .expect("utf-8 path")
            .to_owned();
        let daemon = IpamDaemon::start(
            Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
            &shared_single().endpoints(),
            node,
            &prefix,
            &socket,
            &[
                "--kubeconfig",
                &kubeconfig,
                "--pod-gc-interval-seconds",
                "1",
                "--gc-grace-seconds",
                "0",
                "--netns-gc-interval-seconds",
                "0",
            ],
        )
        .expect("daemon starts");
        fake.wait_for_watches_async(1, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("the daemon's pod watch: {e}\n{}", daemon.log_tail()));
        let client = IpamClient::new(
            hostnic_proto::connect(&socket, Duration::from_secs(1))
                .await
                .expect("connects"),
        );
        let observer = common::allocator(shared_single(), &prefix, "observer").await;
        Node {
            daemon,
            fake,
            observer,
            client,
            _dir: dir,
        }
    }

    /// ADD of `id`/eth0 for pod `NS/pod` of `uid` through the daemon: the address.
    async fn add(&mut self, id: &str, pod: &str, uid: &str) -> String {
        let request = WireRequest {
            attachment: Some(proto::Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            }),
            network: Some(Network {
                name: NETWORK.into(),
                ipam_json: ipam().to_string(),
            }),
            pod: Some(Pod {
                namespace: NS.into(),
                name: pod.into(),
                uid: uid.into(),
                infra_container_id: id.into(),
            }),
            requested_ips: vec![],
            netns: String::new(),
        };
        let reply = self
            .client
            .allocate(request)
            .await
            .unwrap_or_else(|e| panic!("ADD {id}: {e}\n{}", self.daemon.log_tail()))
            .into_inner();
        let address = &reply.ips[0].address;
        address.split('/').next().expect("address").to_string()
    }

    /// GETs of the single pod `NS/name` the fake received.
    fn gets_of(&self, name: &str) -> usize {
        let path = format!("/api/v1/namespaces/{NS}/pods/{name}");
        self.fake
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path && !r.is_watch())
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_releases_a_deleted_pods_attachment_and_a_re_created_pods_old_one_and_keeps_live_terminating_and_new_ones(
) {
    if !hostnic_testkit::require_root(
        "pod GC daemon test (the daemon serves only from a root-owned socket directory, to root callers)",
    ) {
        return;
    }
    let node_name = "node-p1";
    let mut node = Node::start(
        "pod-gc-daemon",
        node_name,
        vec![
            fake::pod(NS, "live").node(node_name).uid("uid-live"),
            fake::pod(NS, "term").node(node_name).uid("uid-term"),
            fake::pod(NS, "gone").node(node_name).uid("uid-gone"),
            fake::pod(NS, "sts").node(node_name).uid("uid-old"),
        ],
    )
    .await;
    node.add("c-live", "live", "uid-live").await;
    node.add("c-term", "term", "uid-term").await;
    let gone_ip = node.add("c-gone", "gone", "uid-gone").await;
    node.add("c-old", "sts", "uid-old").await;

    // Behind the daemon's back: one pod starts terminating, one is deleted, and one is
    // re-created under its name with a new UID, whose ADD comes before the old DEL ever does.
    node.fake
        .set_terminating(NS, "term", Duration::from_secs(300))
        .expect("terminating");
    node.fake
        .delete(ObjectKind::Pod, NS, "gone")
        .expect("deleted");
    node.fake
        .delete(ObjectKind::Pod, NS, "sts")
        .expect("deleted");
    node.fake
        .create_pod(fake::pod(NS, "sts").node(node_name).uid("uid-new"))
        .expect("re-created");
    let new_ip = node.add("c-new", "sts", "uid-new").await;

    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&node.observer, "c-gone").await || held(&node.observer, "c-old").await {
        assert!(
            Instant::now() < deadline,
            "the pod GC did not release the gone pods' attachments:\n{}",
            node.daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A few more passes change nothing else.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in ["c-live", "c-term"] {
        assert!(
            held(&node.observer, id).await,
            "{id} is kept:\n{}",
            node.daemon.log_tail()
        );
    }
    assert_eq!(
        addresses(&node.observer, "c-new").await,
        vec![new_ip],
        "the re-created pod's new attachment keeps its address:\n{}",
        node.daemon.log_tail()
    );
    let log = node.daemon.log_tail();
    assert!(
        log.contains("released attachment whose pod is gone")
            && log.contains(&gone_ip)
            && log.contains(&format!("pod {NS}/gone uid uid-gone no longer exists")),
        "each release is logged with its addresses and reason:\n{log}"
    );
    assert!(
        log.contains(&format!("pod {NS}/sts uid uid-old")),
        "the old sandbox's release is logged:\n{log}"
    );
    assert_eq!(
        node.gets_of("live"),
        0,
        "a pod the cache holds with the record's UID costs no GET"
    );
}
