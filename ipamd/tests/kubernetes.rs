//! The real hostnic-ipamd binary with `--kubeconfig` pointed at the testkit's stateful fake
//! Kubernetes API server, against a real etcd, called over its unix socket with the plugins'
//! gRPC client. What it proves: the daemon watches only its node's pods; an ADD naming a pod
//! gets the pod's annotated fixed address (a StatefulSet pod the entry at its ordinal, again
//! after re-creation); a refused annotation writes nothing; the cache follows the watch (new
//! pods, changed annotations, relisting after 410 Gone, resuming from a bookmark); an API
//! server that is away fails an ADD as retryable unless the cache or the attachment's record
//! can answer; and a daemon without a kubeconfig never asks the API anything.
//!
//! The daemon serves only from a root-owned socket directory and answers only root callers,
//! so every test needs root and skips loudly without it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hostnic_ipamd::audit::audit;
use hostnic_ipamd::{Allocator, Attachment, Kind as AddressKind, PodRef};
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{self as proto, AllocateRequest, Network, Pod, ReleaseRequest};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self as fake, FakeKube, Fault, Kind};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::{json, Value};
use tonic::{Code, Status};

mod common;

const NETWORK: &str = "kube-net";
const NS: &str = "apps";

/// kube-ipam's layout: no fixed window, fixed addresses outside the dynamic range, so an
/// annotated address (below .100) is told apart from a dynamic one at a glance.
fn ipam() -> Value {
    json!({
        "type": "hostnic-ipam",
        "subnet": "10.70.0.0/24",
        "rangeStart": "10.70.0.100",
        "rangeEnd": "10.70.0.200",
        "gateway": "10.70.0.1",
    })
}

/// How long a pod written to the fake takes at most to reach the daemon's cache through the
/// open watch: one event on loopback takes milliseconds; the rest is margin for two busy cores,
/// since the cache cannot be observed from outside without the GET the tests rule out.
const WATCH_DELIVERY: Duration = Duration::from_millis(1500);

/// A daemon for one node with (or without) `--kubeconfig` naming its own fake API server, and
/// an allocator on the same keys to read what the daemon wrote.
struct Node {
    // Declared first: stopped before the fake, the observer and the directory go.
    daemon: IpamDaemon,
    fake: FakeKube,
    observer: Allocator,
    client: IpamClient<tonic::transport::Channel>,
    name: String,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts the fake with `pods` in it, then the daemon; with `kube`, waits until the
    /// daemon's cache has listed its pods and watches.
    async fn start(test: &str, node: &str, kube: bool, pods: Vec<fake::PodBuilder>) -> Node {
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
        let args: Vec<&str> = if kube {
            vec!["--kubeconfig", &kubeconfig]
        } else {
            vec![]
        };
        let daemon = IpamDaemon::start(
            Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
            &shared_single().endpoints(),
            node,
            &prefix,
            &socket,
            &args,
        )
        .expect("daemon starts");
        if kube {
            // The watcher opens its watch only once the list is in the cache.
            fake.wait_for_watches_async(1, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("the daemon's pod watch: {e}\n{}", daemon.log_tail()));
        }
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
            name: node.to_owned(),
            _dir: dir,
        }
    }

    /// A pod of `NS` scheduled to this node.
    fn pod(&self, name: &str) -> fake::PodBuilder {
        fake::pod(NS, name).node(&self.name)
    }

    /// ADD of attachment `id`/eth0 for pod `NS/pod` (the runtime's `uid`, empty if it sent
    /// none), asking for `ips` exactly: the addresses of the reply.
    async fn add(
        &mut self,
        id: &str,
        pod: &str,
        uid: &str,
        ips: &[&str],
    ) -> Result<Vec<String>, Status> {
        let request = AllocateRequest {
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
            requested_ips: ips.iter().map(|s| s.to_string()).collect(),
            netns: String::new(),
        };
        let reply = self.client.allocate(request).await?.into_inner();
        Ok(reply.ips.into_iter().map(|x| x.address).collect())
    }

    async fn del(&mut self, id: &str) -> Vec<String> {
        self.client
            .release(ReleaseRequest {
                attachment: Some(proto::Attachment {
                    container_id: id.into(),
                    ifname: "eth0".into(),
                }),
                network: Some(Network {
                    name: NETWORK.into(),
                    ipam_json: ipam().to_string(),
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("DEL {id}: {e}"))
            .into_inner()
            .released
    }

    /// The attachment record of `id`/eth0 as the daemon wrote it.
    async fn record(&self, id: &str) -> Value {
        let key = self
            .observer
            .keys()
            .attachment(&Attachment::new(NETWORK, id, "eth0"));
        let resp = self
            .observer
            .store()
            .get("read attachment", &key, None)
            .await
            .expect("etcd get");
        let kv = resp
            .kvs()
            .first()
            .unwrap_or_else(|| panic!("no record at {key}"));
        serde_json::from_slice(kv.value()).expect("record is JSON")
    }

    /// Whether `id`/eth0 has an attachment record.
    async fn has_record(&self, id: &str) -> bool {
        let key = self
            .observer
            .keys()
            .attachment(&Attachment::new(NETWORK, id, "eth0"));
        let resp = self
            .observer
            .store()
            .get("read attachment", &key, None)
            .await
            .expect("etcd get");
        !resp.kvs().is_empty()
    }

    /// Asserts that the audit finds no problem and that exactly `held` (address, container id)
    /// are held.
    async fn assert_audit_holds(&self, held: &[(&str, &str)]) {
        let report = audit(self.observer.store(), self.observer.keys())
            .await
            .expect("audit");
        assert_eq!(report.problems, Vec::<String>::new(), "audit is clean");
        let mut got: Vec<(String, String)> = report
            .allocations
            .iter()
            .map(|((_, ip), r)| (ip.to_string(), r.attachment.container_id.clone()))
            .collect();
        got.sort();
        let want: Vec<(String, String)> = held
            .iter()
            .map(|(ip, id)| (ip.to_string(), id.to_string()))
            .collect();
        assert_eq!(got, want, "the addresses held");
        assert_eq!(
            report.attachments.len(),
            held.len(),
            "{:?}",
            report.attachments
        );
    }

    /// The address record of `ip` (`pools/<pool>/ips/<ip>`), which names the holder.
    async fn address_record(&self, ip: &str) -> Value {
        let (_, kvs) = self
            .observer
            .store()
            .load_prefix(&self.observer.keys().pools())
            .await
            .expect("scan");
        let suffix = format!("/ips/{ip}");
        let kv = kvs
            .iter()
            .find(|kv| kv.key_str().is_ok_and(|k| k.ends_with(&suffix)))
            .unwrap_or_else(|| panic!("no address record of {ip}"));
        serde_json::from_slice(kv.value()).expect("record is JSON")
    }

    /// Every key under the test's prefix with its mod revision: equal snapshots mean nothing
    /// was written.
    async fn snapshot(&self) -> BTreeMap<String, i64> {
        common::snapshot(&self.observer).await
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

fn needs_root(what: &str) -> bool {
    hostnic_testkit::require_root(&format!(
        "{what} (the daemon serves only from a root-owned socket directory, to root callers)"
    ))
}

fn cidr(ip: &str) -> Vec<String> {
    vec![format!("{ip}/24")]
}

/// The LISTs (not watches) of all namespaces' pods among `requests`.
fn pod_lists(requests: &[fake::RecordedRequest]) -> Vec<&fake::RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/pods" && !r.is_watch())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_lists_its_nodes_pods_and_an_annotated_pod_gets_its_address_as_fixed_with_the_api_uid(
) {
    if !needs_root("kube annotated pod test") {
        return;
    }
    let mut node = Node::start(
        "kube-fixed",
        "node-k1",
        true,
        vec![
            fake::pod(NS, "db")
                .node("node-k1")
                .uid("uid-db")
                .annotation("kube-ipam.ip", "10.70.0.10"),
            fake::pod(NS, "elsewhere").node("node-other"),
        ],
    )
    .await;
    let requests = node.fake.requests();
    let lists = pod_lists(&requests);
    assert!(!lists.is_empty(), "the daemon listed pods: {requests:?}");
    for list in &lists {
        assert!(
            list.query
                .replace("%3D", "=")
                .contains("fieldSelector=spec.nodeName=node-k1"),
            "every list selects this node's pods: {list:?}"
        );
    }
    assert!(
        requests
            .iter()
            .filter(|r| r.is_watch() && r.path == "/api/v1/pods")
            .all(|r| r
                .query
                .replace("%3D", "=")
                .contains("spec.nodeName=node-k1")),
        "every watch selects this node's pods: {requests:?}"
    );

    // The runtime sends no UID: the record keeps the API's.
    assert_eq!(
        node.add("c-db", "db", "", &[]).await.expect("ADD"),
        cidr("10.70.0.10")
    );
    assert_eq!(node.gets_of("db"), 0, "a cached pod costs no GET");
    let record = node.record("c-db").await;
    assert_eq!(record["pod"]["uid"], "uid-db", "{record}");
    assert_eq!(record["pod"]["name"], "db", "{record}");
    assert_eq!(record["ips"][0]["kind"], "fixed", "{record}");
    let address = node.address_record("10.70.0.10").await;
    assert_eq!(address["kind"], "fixed", "{address}");
    assert_eq!(address["pod"]["uid"], "uid-db", "{address}");
    // Again: the same address, held once.
    assert_eq!(
        node.add("c-db", "db", "uid-db", &[])
            .await
            .expect("ADD again"),
        cidr("10.70.0.10")
    );
    assert_eq!(node.del("c-db").await, vec!["10.70.0.10".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_gets_its_addresses_by_ordinal_and_a_recreated_pod_gets_its_address_back() {
    if !needs_root("kube StatefulSet test") {
        return;
    }
    const LIST: &str = "10.70.0.20,10.70.0.21,10.70.0.22";
    let mut node = Node::start("kube-sts", "node-k2", true, vec![]).await;
    node.fake
        .create(fake::stateful_set(
            NS,
            "web",
            "uid-sts",
            3,
            &[("kube-ipam.ip", LIST)],
        ))
        .expect("StatefulSet");
    let replica = |node: &Node, ordinal: u32, uid: &str| {
        node.pod(&format!("web-{ordinal}"))
            .uid(uid)
            .owned_by_statefulset("web", "uid-sts")
            .annotation("kube-ipam.ip", LIST)
    };
    for i in 0..3 {
        node.fake
            .create_pod(replica(&node, i, &format!("uid-web-{i}")))
            .expect("pod");
    }
    tokio::time::sleep(WATCH_DELIVERY).await;
    for i in 0..3 {
        let got = node
            .add(
                &format!("c-web-{i}"),
                &format!("web-{i}"),
                &format!("uid-web-{i}"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("ADD web-{i}: {e}"));
        assert_eq!(got, cidr(&format!("10.70.0.2{i}")), "web-{i} by ordinal");
    }

    // web-1 goes (DEL, pod deleted) and comes back with a new UID and container.
    assert_eq!(node.del("c-web-1").await, vec!["10.70.0.21".to_string()]);
    node.fake
        .delete(Kind::Pod, NS, "web-1")
        .expect("pod deleted");
    node.fake
        .create_pod(replica(&node, 1, "uid-web-1-new"))
        .expect("pod re-created");
    let got = node
        .add("c-web-1-new", "web-1", "uid-web-1-new", &[])
        .await
        .expect("ADD of the re-created web-1");
    assert_eq!(got, cidr("10.70.0.21"));
    let record = node.record("c-web-1-new").await;
    assert_eq!(record["pod"]["uid"], "uid-web-1-new", "{record}");
    assert_eq!(record["ips"][0]["kind"], "fixed", "{record}");
    for id in ["c-web-0", "c-web-1-new", "c-web-2"] {
        node.del(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_annotations_are_refused_naming_the_annotation_and_write_nothing() {
    if !needs_root("kube bad annotations test") {
        return;
    }
    let mut node = Node::start("kube-bad", "node-k3", true, vec![]).await;
    let cases = [
        (
            "not-ip",
            vec![("kube-ipam.ip", "10.70.0.x")],
            "kube-ipam.ip",
        ),
        (
            "outside",
            vec![("kube-ipam.ip", "10.71.0.5")],
            "kube-ipam.ip",
        ),
        (
            "prefix",
            vec![("kube-ipam.ip", "10.70.0.32/16")],
            "kube-ipam.ip",
        ),
        (
            "reserved",
            vec![("kube-ipam.ip", "10.70.0.1")],
            "kube-ipam.ip",
        ),
        (
            "mask",
            vec![
                ("kube-ipam.ip", "10.70.0.30"),
                ("kube-ipam.netmask", "255.255.0.0"),
            ],
            "kube-ipam.netmask",
        ),
        (
            "gw",
            vec![
                ("kube-ipam.ip", "10.70.0.31"),
                ("kube-ipam.gateway", "10.70.0.254"),
            ],
            "kube-ipam.gateway",
        ),
        (
            "web-3",
            vec![("kube-ipam.ip", "10.70.0.40,10.70.0.41,10.70.0.42")],
            "kube-ipam.ip",
        ),
    ];
    for (name, annotations, _) in &cases {
        let mut pod = node.pod(name);
        for (k, v) in annotations {
            pod = pod.annotation(k, v);
        }
        if name.starts_with("web-") {
            pod = pod.owned_by_statefulset("web", "uid-sts");
        }
        node.fake.create_pod(pod).expect("pod");
    }
    node.fake.create_pod(node.pod("good")).expect("pod");
    tokio::time::sleep(WATCH_DELIVERY).await;

    // First on an empty prefix (not even the pool is registered), then with the pool in use.
    for round in ["before any ADD", "with the pool in use"] {
        let before = node.snapshot().await;
        for (name, _, annotation) in &cases {
            let e = node
                .add(&format!("c-{name}"), name, "", &[])
                .await
                .expect_err("refused");
            assert_eq!(e.code(), Code::InvalidArgument, "{name} ({round}): {e:?}");
            assert!(
                e.message().contains(&format!("annotation {annotation} ")),
                "{name} ({round}) names {annotation}: {}",
                e.message()
            );
            assert!(
                e.message().contains(&format!("pod {NS}/{name}")),
                "{}",
                e.message()
            );
        }
        assert_eq!(node.snapshot().await, before, "nothing written ({round})");
        if round == "before any ADD" {
            let got = node.add("c-good", "good", "", &[]).await.expect("ADD");
            assert_eq!(got.len(), 1);
        }
    }
    node.del("c-good").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotation_and_a_runtime_ip_must_agree() {
    if !needs_root("kube annotation and IP= test") {
        return;
    }
    let mut node = Node::start(
        "kube-agree",
        "node-k4",
        true,
        vec![fake::pod(NS, "p")
            .node("node-k4")
            .annotation("kube-ipam.ip", "10.70.0.50")],
    )
    .await;
    let before = node.snapshot().await;
    let e = node
        .add("c-p", "p", "", &["10.70.0.51"])
        .await
        .expect_err("disagreeing IP= refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(
            "annotation kube-ipam.ip asks for 10.70.0.50, the runtime (CNI_ARGS IP=, \
             runtimeConfig.ips) asks for 10.70.0.51; they must agree"
        ),
        "{}",
        e.message()
    );
    assert_eq!(node.snapshot().await, before, "nothing written");
    let got = node
        .add("c-p", "p", "", &["10.70.0.50"])
        .await
        .expect("agreeing IP=");
    assert_eq!(got, cidr("10.70.0.50"));
    assert_eq!(node.record("c-p").await["ips"][0]["kind"], "fixed");
    node.del("c-p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_after_the_sync_comes_through_the_watch_and_a_changed_annotation_is_seen() {
    if !needs_root("kube watch test") {
        return;
    }
    let mut node = Node::start("kube-watch", "node-k5", true, vec![]).await;
    node.fake
        .create_pod(node.pod("late").annotation("kube-ipam.ip", "10.70.0.60"))
        .expect("pod");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(
        node.add("c-late-1", "late", "", &[]).await.expect("ADD"),
        cidr("10.70.0.60")
    );
    assert_eq!(
        node.gets_of("late"),
        0,
        "found in the cache, through the watch"
    );
    node.del("c-late-1").await;

    node.fake
        .merge_patch(
            Kind::Pod,
            NS,
            "late",
            json!({"metadata": {"annotations": {"kube-ipam.ip": "10.70.0.61"}}}),
        )
        .expect("annotation changed");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(
        node.add("c-late-2", "late", "", &[]).await.expect("ADD"),
        cidr("10.70.0.61")
    );
    assert_eq!(node.gets_of("late"), 0);

    // The annotation removed: a dynamic address.
    node.fake
        .merge_patch(
            Kind::Pod,
            NS,
            "late",
            json!({"metadata": {"annotations": null}}),
        )
        .expect("annotations removed");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let got = node.add("c-late-3", "late", "", &[]).await.expect("ADD");
    assert_eq!(got, cidr("10.70.0.100"), "the first dynamic address");
    assert_eq!(node.record("c-late-3").await["ips"][0]["kind"], "dynamic");
    for id in ["c-late-2", "c-late-3"] {
        node.del(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_away_an_uncached_pod_is_retryable_and_allocates_nothing_but_cached_pods_and_held_attachments_are_answered(
) {
    if !needs_root("kube API outage test") {
        return;
    }
    let mut node = Node::start(
        "kube-down",
        "node-k6",
        true,
        vec![
            fake::pod(NS, "cached")
                .node("node-k6")
                .annotation("kube-ipam.ip", "10.70.0.70"),
            // Not this node's: never cached, read by GET.
            fake::pod(NS, "remote")
                .node("node-other")
                .annotation("kube-ipam.ip", "10.70.0.71"),
        ],
    )
    .await;
    assert_eq!(
        node.add("c-remote", "remote", "", &[]).await.expect("ADD"),
        cidr("10.70.0.71")
    );
    assert_eq!(node.gets_of("remote"), 1, "a miss costs one GET");
    node.fake
        .create(fake::pod(NS, "new").node("node-other").build())
        .expect("pod");

    for (i, fault) in [Fault::Drop, Fault::Status(503), Fault::Hang]
        .into_iter()
        .enumerate()
    {
        node.fake.set_fault(fault);
        let before = node.snapshot().await;
        let e = node
            .add(&format!("c-new-{i}"), "new", "", &[])
            .await
            .expect_err("the pod cannot be read");
        assert_eq!(e.code(), Code::Unavailable, "{fault:?}: {e:?}");
        assert!(
            e.message().contains(&format!("pod {NS}/new")),
            "{fault:?}: {}",
            e.message()
        );
        assert_eq!(
            node.snapshot().await,
            before,
            "{fault:?}: nothing allocated"
        );

        // The repeated ADD of an attachment that holds its address: answered from its record.
        assert_eq!(
            node.add("c-remote", "remote", "", &[]).await.expect("held"),
            cidr("10.70.0.71"),
            "{fault:?}"
        );
        // A cached pod: its annotation read from the cache.
        let id = format!("c-cached-{i}");
        assert_eq!(
            node.add(&id, "cached", "", &[])
                .await
                .unwrap_or_else(|e| panic!("{fault:?}: {e}")),
            cidr("10.70.0.70"),
            "{fault:?}"
        );
        node.fake.clear_fault();
        node.del(&id).await;
    }
    node.del("c-remote").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_compaction_the_cache_relists_and_stays_correct() {
    if !needs_root("kube watch compaction test") {
        return;
    }
    let mut node = Node::start(
        "kube-410",
        "node-k7",
        true,
        vec![
            fake::pod(NS, "old").node("node-k7"),
            fake::pod(NS, "kept")
                .node("node-k7")
                .annotation("kube-ipam.ip", "10.70.0.80"),
        ],
    )
    .await;
    // The watch is cut; meanwhile a pod comes, another goes, and the history is compacted:
    // resuming the watch from its version gets 410 Gone.
    node.fake.set_fault(Fault::Drop);
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.fake.open_watches() > 0 {
        assert!(Instant::now() < deadline, "the watch was not cut");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.fake
        .create_pod(node.pod("new").annotation("kube-ipam.ip", "10.70.0.81"))
        .expect("pod");
    node.fake.delete(Kind::Pod, NS, "old").expect("pod deleted");
    node.fake.compact();
    let mark = node.fake.requests().len();
    node.fake.clear_fault();

    // Relisted, and watching again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let requests = node.fake.requests();
        if !pod_lists(&requests[mark..]).is_empty() && node.fake.open_watches() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no relist after the compaction: {:?}\n{}",
            &requests[mark..],
            node.daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after: Vec<_> = node.fake.requests()[mark..].to_vec();
    let first_list = after
        .iter()
        .position(|r| r.method == "GET" && r.path == "/api/v1/pods" && !r.is_watch())
        .expect("a list");
    assert!(
        after[..first_list].iter().any(|r| r.is_watch()),
        "the watch was resumed (and got 410) before the relist: {after:?}"
    );

    assert_eq!(
        node.add("c-new", "new", "", &[]).await.expect("ADD"),
        cidr("10.70.0.81")
    );
    assert_eq!(node.gets_of("new"), 0, "the new pod came with the relist");
    assert_eq!(
        node.add("c-kept", "kept", "", &[]).await.expect("ADD"),
        cidr("10.70.0.80")
    );
    assert_eq!(node.gets_of("kept"), 0);
    let before = node.snapshot().await;
    let e = node
        .add("c-old", "old", "", &[])
        .await
        .expect_err("deleted pod");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains(&format!("pod {NS}/old does not exist")),
        "{}",
        e.message()
    );
    assert_eq!(node.gets_of("old"), 1, "the deleted pod left the cache");
    assert_eq!(node.snapshot().await, before);
    for id in ["c-new", "c-kept"] {
        node.del(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_kubeconfig_nothing_reads_the_api_and_a_named_pod_gets_a_dynamic_address() {
    if !needs_root("daemon without Kubernetes test") {
        return;
    }
    let mut node = Node::start("kube-none", "node-k8", false, vec![]).await;
    let got = node
        .add("c-ghost", "ghost", "uid-ghost", &[])
        .await
        .expect("ADD of a pod no API knows");
    assert_eq!(got, cidr("10.70.0.100"));
    let record = node.record("c-ghost").await;
    assert_eq!(record["pod"]["name"], "ghost", "{record}");
    assert_eq!(record["pod"]["uid"], "uid-ghost", "{record}");
    assert_eq!(record["ips"][0]["kind"], "dynamic", "{record}");
    assert!(
        node.fake.requests().is_empty(),
        "{:?}",
        node.fake.requests()
    );
    node.del("c-ghost").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_keep_the_watch_current_so_a_compaction_alone_costs_no_relist() {
    if !needs_root("kube watch bookmark test") {
        return;
    }
    let mut node = Node::start("kube-bookmark", "node-k9", true, vec![]).await;
    // Writes this node's watch does not see move the version past the watch's last event.
    for i in 0..3 {
        node.fake
            .create_pod(fake::pod(NS, &format!("other-{i}")).node("node-other"))
            .expect("pod");
    }
    node.fake.send_bookmarks();
    tokio::time::sleep(WATCH_DELIVERY).await;
    node.fake.compact();
    let mark = node.fake.requests().len();
    node.fake.close_watches();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.fake.requests()[mark..].iter().any(|r| r.is_watch())
        || node.fake.open_watches() == 0
    {
        assert!(
            Instant::now() < deadline,
            "the watch was not resumed\n{}",
            node.daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(WATCH_DELIVERY).await;
    let after = node.fake.requests()[mark..].to_vec();
    assert!(
        pod_lists(&after).is_empty(),
        "resumed from the bookmark's version, not relisted: {after:?}"
    );

    node.fake
        .create_pod(node.pod("p").annotation("kube-ipam.ip", "10.70.0.90"))
        .expect("pod");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(
        node.add("c-p", "p", "", &[]).await.expect("ADD"),
        cidr("10.70.0.90")
    );
    assert_eq!(node.gets_of("p"), 0, "through the resumed watch");
    node.del("c-p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_deleted_from_the_api_is_released_and_the_new_pod_takes_its_address_over() {
    if !needs_root("kube take-over of a deleted holder test") {
        return;
    }
    let mut node = Node::start(
        "kube-gone",
        "node-k9",
        true,
        vec![fake::pod(NS, "old")
            .node("node-k9")
            .uid("uid-old")
            .annotation("kube-ipam.ip", "10.70.0.30")],
    )
    .await;
    assert_eq!(
        node.add("c-old", "old", "uid-old", &[]).await.expect("ADD"),
        cidr("10.70.0.30")
    );
    // The old pod is deleted behind the daemon's back (no DEL); a new pod asks for its address.
    node.fake.delete(Kind::Pod, NS, "old").expect("deleted");
    node.fake
        .create_pod(
            node.pod("new")
                .uid("uid-new")
                .annotation("kube-ipam.ip", "10.70.0.30"),
        )
        .expect("pod");
    assert_eq!(
        node.add("c-new", "new", "uid-new", &[])
            .await
            .unwrap_or_else(|e| panic!("take-over: {e}\n{}", node.daemon.log_tail())),
        cidr("10.70.0.30")
    );
    assert!(
        !node.has_record("c-old").await,
        "the old attachment is released"
    );
    let address = node.address_record("10.70.0.30").await;
    assert_eq!(address["handle"]["containerID"], "c-new", "{address}");
    assert_eq!(address["pod"]["uid"], "uid-new", "{address}");
    node.assert_audit_holds(&[("10.70.0.30", "c-new")]).await;
    assert!(
        node.daemon
            .log_tail()
            .contains(&format!("pod {NS}/old uid uid-old no longer exists")),
        "the take-over is logged with its reason:\n{}",
        node.daemon.log_tail()
    );
    assert_eq!(node.del("c-new").await, vec!["10.70.0.30".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_statefulset_pod_takes_over_an_address_another_node_left_and_the_late_del_frees_nothing(
) {
    if !needs_root("kube take-over of a re-created StatefulSet pod test") {
        return;
    }
    let mut node = Node::start("kube-recreated", "node-k10", true, vec![]).await;
    let web_1 = |node: &Node, uid: &str| {
        node.pod("web-1")
            .uid(uid)
            .owned_by_statefulset("web", "uid-sts")
            .annotation("kube-ipam.ip", "10.70.0.40,10.70.0.41")
    };
    node.fake
        .create_pod(web_1(&node, "uid-web-1"))
        .expect("pod");
    // The old web-1 got its address on another node, whose daemon is gone since: the observer
    // plays that node.
    let old = Attachment::new(NETWORK, "c-old", "eth0");
    let mut request = common::request(&old, &common::sets(ipam()), &["10.70.0.41"]);
    request.pod = Some(PodRef {
        namespace: NS.into(),
        name: "web-1".into(),
        uid: "uid-web-1".into(),
    });
    request.requested_kind = AddressKind::Fixed;
    node.observer.allocate(&request).await.expect("the old ADD");

    // web-1 is re-created with a new UID; no DEL came for the old one.
    node.fake.delete(Kind::Pod, NS, "web-1").expect("deleted");
    node.fake
        .create_pod(web_1(&node, "uid-web-1-new"))
        .expect("re-created");
    assert_eq!(
        node.add("c-new", "web-1", "uid-web-1-new", &[])
            .await
            .unwrap_or_else(|e| panic!("take-over: {e}\n{}", node.daemon.log_tail())),
        cidr("10.70.0.41")
    );
    assert!(
        !node.has_record("c-old").await,
        "the old attachment is released"
    );
    node.assert_audit_holds(&[("10.70.0.41", "c-new")]).await;
    assert!(
        node.daemon.log_tail().contains(&format!(
            "pod {NS}/web-1 uid uid-web-1 was re-created with uid uid-web-1-new"
        )),
        "the take-over is logged with its reason:\n{}",
        node.daemon.log_tail()
    );

    // The old container's DEL arrives at last: it succeeds and frees nothing of the new one.
    assert_eq!(node.del("c-old").await, Vec::<String>::new());
    let address = node.address_record("10.70.0.41").await;
    assert_eq!(address["handle"]["containerID"], "c-new", "{address}");
    node.assert_audit_holds(&[("10.70.0.41", "c-new")]).await;
    assert_eq!(node.del("c-new").await, vec!["10.70.0.41".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_holder_is_retryable_naming_it_and_once_it_is_gone_the_retry_takes_the_address(
) {
    if !needs_root("kube take-over from a terminating holder test") {
        return;
    }
    let mut node = Node::start(
        "kube-terminating",
        "node-k11",
        true,
        vec![
            fake::pod(NS, "v1")
                .node("node-k11")
                .uid("uid-v1")
                .annotation("kube-ipam.ip", "10.70.0.50"),
            fake::pod(NS, "v2")
                .node("node-k11")
                .uid("uid-v2")
                .annotation("kube-ipam.ip", "10.70.0.50"),
        ],
    )
    .await;
    assert_eq!(
        node.add("c-v1", "v1", "uid-v1", &[]).await.expect("ADD"),
        cidr("10.70.0.50")
    );
    // A rolling update: v1 is being deleted while v2 starts.
    node.fake
        .set_terminating(NS, "v1", Duration::from_secs(30))
        .expect("terminating");
    let before = node.snapshot().await;
    let e = node
        .add("c-v2", "v2", "uid-v2", &[])
        .await
        .expect_err("the holder is still there");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&format!("pod {NS}/v1")) && e.message().contains("terminating; retry"),
        "{}",
        e.message()
    );
    assert_eq!(node.snapshot().await, before, "nothing changed");

    // The kubelet confirms the deletion without a DEL reaching this daemon; its retry wins.
    node.fake.finish_deletion(NS, "v1").expect("deleted");
    assert_eq!(
        node.add("c-v2", "v2", "uid-v2", &[])
            .await
            .unwrap_or_else(|e| panic!("retried ADD: {e}")),
        cidr("10.70.0.50")
    );
    node.assert_audit_holds(&[("10.70.0.50", "c-v2")]).await;
    node.del("c-v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_is_named_and_one_the_api_cannot_judge_is_retryable_and_neither_changes_anything(
) {
    if !needs_root("kube live holder test") {
        return;
    }
    let mut node = Node::start(
        "kube-live-holder",
        "node-k12",
        true,
        vec![
            fake::pod(NS, "holder")
                .node("node-k12")
                .uid("uid-holder")
                .annotation("kube-ipam.ip", "10.70.0.60"),
            fake::pod(NS, "asker")
                .node("node-k12")
                .uid("uid-asker")
                .annotation("kube-ipam.ip", "10.70.0.60"),
        ],
    )
    .await;
    assert_eq!(
        node.add("c-holder", "holder", "uid-holder", &[])
            .await
            .expect("ADD"),
        cidr("10.70.0.60")
    );
    let before = node.snapshot().await;
    let e = node
        .add("c-asker", "asker", "uid-asker", &[])
        .await
        .expect_err("the holder is alive");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        e.message().contains(&format!("pod {NS}/holder")),
        "{}",
        e.message()
    );
    assert_eq!(node.snapshot().await, before, "nothing changed");

    // The API server fails while the holder is judged (the asker is read from the cache).
    node.fake.set_fault(Fault::Status(503));
    let e = node
        .add("c-asker", "asker", "uid-asker", &[])
        .await
        .expect_err("the holder cannot be judged");
    node.fake.clear_fault();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&format!("pod {NS}/holder")),
        "{}",
        e.message()
    );
    assert_eq!(node.snapshot().await, before, "nothing changed");
    node.assert_audit_holds(&[("10.70.0.60", "c-holder")]).await;
    node.del("c-holder").await;
}
