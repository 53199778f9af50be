//! Sticky StatefulSet addresses with the real hostnic-ipamd binary, two daemons (two nodes) on
//! one real etcd and the testkit's stateful fake Kubernetes API server, called over their unix
//! sockets with the plugins' gRPC client. What it proves: a StatefulSet pod without an
//! annotation gets a dynamic address that its identity keeps: deleted and re-created (new
//! container, new UID, on the same node or another) it gets the same address back, also when
//! the new ADD comes before the old container's DEL, whose late DEL then frees nothing; between
//! DEL and ADD the address is held by the identity's reservation, never free; `gc-sticky`
//! releases it only once the ordinal (scale-down) or the StatefulSet has been gone for the
//! grace, keeps it when the ordinal comes back first, never frees an address a container holds,
//! writes nothing in a dry run or while the API fails; and `stickyStatefulSets: false` gives
//! ordinary dynamic addresses.
//!
//! The daemon serves only from a root-owned socket directory and answers only root callers,
//! so every test needs root and skips loudly without it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hostnic_ipamd::audit::audit;
use hostnic_ipamd::{Allocator, Attachment};
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{self as proto, AllocateRequest, Network, Pod, ReleaseRequest};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self as fake, FakeKube, Fault, Kind};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::{json, Value};
use tonic::{Code, Status};

mod common;

const NETWORK: &str = "sticky-net";
const NS: &str = "apps";
const STS_UID: &str = "uid-sts";

fn ipam() -> Value {
    json!({
        "type": "hostnic-ipam",
        "subnet": "10.72.0.0/24",
        "rangeStart": "10.72.0.100",
        "rangeEnd": "10.72.0.200",
        "gateway": "10.72.0.1",
    })
}

/// How long a pod written to the fake takes at most to reach the daemons' caches.
const WATCH_DELIVERY: Duration = Duration::from_millis(1500);

/// A daemon of one node and its gRPC client.
struct Daemon {
    daemon: IpamDaemon,
    client: IpamClient<tonic::transport::Channel>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// ADD of attachment `id`/eth0 for pod `NS/pod` of `uid` on the network `ipam` configures:
    /// the addresses of the reply, without their prefix.
    async fn add_on(
        &mut self,
        ipam: &Value,
        id: &str,
        pod: &str,
        uid: &str,
    ) -> Result<Vec<String>, Status> {
        let request = AllocateRequest {
            attachment: Some(proto::Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            }),
            network: Some(Network {
                name: NETWORK.into(),
                ipam_json: ipam.to_string(),
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
        let reply = self.client.allocate(request).await?.into_inner();
        Ok(reply
            .ips
            .into_iter()
            .map(|x| x.address.split('/').next().unwrap_or_default().to_string())
            .collect())
    }

    async fn add(&mut self, id: &str, pod: &str, uid: &str) -> String {
        let got = self
            .add_on(&ipam(), id, pod, uid)
            .await
            .unwrap_or_else(|e| panic!("ADD {id} for {pod}: {e}\n{}", self.daemon.log_tail()));
        assert_eq!(got.len(), 1, "{got:?}");
        got[0].clone()
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
}

/// One fake API server, an observer allocator on the test's keys, and daemons of nodes
/// `node-a` and `node-b` watching the fake.
struct Cluster {
    // Declared first: stopped before the fake goes.
    a: Daemon,
    b: Daemon,
    fake: FakeKube,
    observer: Allocator,
    prefix: String,
}

impl Cluster {
    /// Starts the fake with StatefulSet `web` of `replicas`, then both daemons (their own GCs
    /// off: the tests run `gc-sticky` themselves).
    async fn start(test: &str, replicas: u32) -> Cluster {
        Cluster::start_with(test, replicas, &[]).await
    }

    /// [`Cluster::start`], with `a_gc` (the sticky GC's interval and grace, seconds) for the
    /// daemon of node-a.
    async fn start_with(test: &str, replicas: u32, a_gc: &[&str]) -> Cluster {
        let fake = FakeKube::start().expect("fake API server starts");
        fake.create(fake::stateful_set(NS, "web", STS_UID, replicas, &[]))
            .expect("StatefulSet");
        let prefix = unique_prefix(test);
        let kubeconfig = fake
            .kubeconfig_path()
            .to_str()
            .expect("utf-8 path")
            .to_owned();
        let start = |node: &str, gc: &[&str]| {
            let dir = tempfile::tempdir().expect("temp dir");
            let socket = dir.path().join("run/ipamd.sock");
            let daemon = IpamDaemon::start(
                Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
                &shared_single().endpoints(),
                node,
                &prefix,
                &socket,
                &[
                    &[
                        "--kubeconfig",
                        &kubeconfig,
                        "--pod-gc-interval-seconds",
                        "0",
                        "--netns-gc-interval-seconds",
                        "0",
                    ],
                    gc,
                ]
                .concat(),
            )
            .expect("daemon starts");
            (daemon, socket, dir)
        };
        let mut daemons = Vec::new();
        let off = ["--sticky-gc-interval-seconds", "0"];
        for (node, gc) in [
            ("node-a", if a_gc.is_empty() { &off[..] } else { a_gc }),
            ("node-b", &off[..]),
        ] {
            let (daemon, socket, dir) = start(node, gc);
            let client = IpamClient::new(
                hostnic_proto::connect(&socket, Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|e| panic!("connects: {e}\n{}", daemon.log_tail())),
            );
            daemons.push(Daemon {
                daemon,
                client,
                _dir: dir,
            });
        }
        fake.wait_for_watches_async(2, Duration::from_secs(10))
            .await
            .expect("both daemons watch their pods");
        let observer = common::allocator(shared_single(), &prefix, "observer").await;
        let b = daemons.pop().expect("two daemons");
        let a = daemons.pop().expect("two daemons");
        Cluster {
            a,
            b,
            fake,
            observer,
            prefix,
        }
    }

    /// Creates pod `web-<ordinal>` of the StatefulSet on `node` with `uid`.
    fn create_replica(&self, ordinal: u32, uid: &str, node: &str) {
        self.fake
            .create_pod(
                fake::pod(NS, &format!("web-{ordinal}"))
                    .node(node)
                    .uid(uid)
                    .owned_by_statefulset("web", STS_UID),
            )
            .expect("pod created");
    }

    fn scale(&self, replicas: u32) {
        self.fake
            .merge_patch(
                Kind::StatefulSet,
                NS,
                "web",
                json!({"spec": {"replicas": replicas}}),
            )
            .expect("scaled");
    }

    /// The value at `key`, if any.
    async fn get(&self, key: &str) -> Option<Value> {
        let resp = self
            .observer
            .store()
            .get("read", key, None)
            .await
            .expect("etcd get");
        resp.kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).expect("JSON"))
    }

    async fn sticky_record(&self, ordinal: u32) -> Option<Value> {
        let key = self.observer.keys().sticky(NETWORK, NS, "web", ordinal);
        self.get(&key).await
    }

    /// The container id the address record of `ip` names, if it is held.
    async fn holder(&self, ip: &str) -> Option<String> {
        let key = self
            .observer
            .keys()
            .address("10.72.0.0_24", ip.parse().expect("ip"));
        self.get(&key)
            .await
            .map(|v| v["handle"]["containerID"].as_str().expect("id").to_string())
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
        let mut want: Vec<(String, String)> = held
            .iter()
            .map(|(ip, id)| (ip.to_string(), id.to_string()))
            .collect();
        want.sort();
        assert_eq!(got, want, "the addresses held");
    }

    async fn snapshot(&self) -> BTreeMap<String, i64> {
        common::snapshot(&self.observer).await
    }

    /// Runs `hostnic-ipamd gc-sticky` with the fake's kubeconfig; success and stdout + stderr.
    fn gc_sticky(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"))
            .arg("gc-sticky")
            .args(args)
            .arg("--etcd-endpoints")
            .arg(shared_single().endpoints().join(","))
            .args(["--etcd-prefix", &self.prefix, "--node-name", "node-gc"])
            .arg("--kubeconfig")
            .arg(self.fake.kubeconfig_path())
            .env_remove("KUBERNETES_SERVICE_HOST")
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
}

fn needs_root(what: &str) -> bool {
    hostnic_testkit::require_root(&format!(
        "{what} (the daemon serves only from a root-owned socket directory, to root callers)"
    ))
}

const RESERVED_1: &str = "sticky_apps_web_1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_statefulset_pod_gets_its_sticky_address_back_on_the_same_node_and_on_another()
{
    if !needs_root("sticky re-create test") {
        return;
    }
    let mut c = Cluster::start("sticky-recreate", 3).await;
    c.create_replica(0, "uid-web-0", "node-a");
    c.create_replica(1, "uid-web-1", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let ip0 = c.a.add("c-web-0", "web-0", "uid-web-0").await;
    let ip1 = c.a.add("c-web-1", "web-1", "uid-web-1").await;
    assert_ne!(ip0, ip1);
    let record = c.sticky_record(1).await.expect("the identity's record");
    assert_eq!(record["ips"][0]["ip"], ip1.as_str(), "{record}");
    assert_eq!(record["statefulSetUid"], STS_UID, "{record}");
    let attachment = c
        .get(
            &c.observer
                .keys()
                .attachment(&Attachment::new(NETWORK, "c-web-1", "eth0")),
        )
        .await
        .expect("attachment record");
    assert_eq!(attachment["ips"][0]["kind"], "sticky", "{attachment}");

    // DEL: the address goes to the identity's reservation, not back to the pool.
    assert_eq!(c.a.del("c-web-1").await, vec![ip1.clone()]);
    assert_eq!(c.holder(&ip1).await.as_deref(), Some(RESERVED_1));
    c.assert_audit_holds(&[(&ip0, "c-web-0"), (&ip1, RESERVED_1)])
        .await;
    // Another pod's ADD cannot get it meanwhile.
    c.fake
        .create_pod(fake::pod(NS, "other").node("node-a").uid("uid-other"))
        .expect("pod created");
    let other = c.a.add("c-other", "other", "").await;
    assert!(other != ip0 && other != ip1, "{other}");
    assert_eq!(c.a.del("c-other").await, vec![other]);

    // Re-created on the same node: new UID, new container, same address.
    c.fake.delete(Kind::Pod, NS, "web-1").expect("deleted");
    c.create_replica(1, "uid-web-1-b", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(c.a.add("c-web-1-b", "web-1", "uid-web-1-b").await, ip1);
    assert_eq!(c.holder(&ip1).await.as_deref(), Some("c-web-1-b"));
    // A repeated ADD answers the same.
    assert_eq!(c.a.add("c-web-1-b", "web-1", "uid-web-1-b").await, ip1);

    // Re-created on the other node.
    assert_eq!(c.a.del("c-web-1-b").await, vec![ip1.clone()]);
    c.fake.delete(Kind::Pod, NS, "web-1").expect("deleted");
    c.create_replica(1, "uid-web-1-c", "node-b");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(c.b.add("c-web-1-c", "web-1", "uid-web-1-c").await, ip1);
    c.assert_audit_holds(&[(&ip0, "c-web-0"), (&ip1, "c-web-1-c")])
        .await;
    let attachment = c
        .get(
            &c.observer
                .keys()
                .attachment(&Attachment::new(NETWORK, "c-web-1-c", "eth0")),
        )
        .await
        .expect("attachment record");
    assert_eq!(attachment["node"], "node-b", "{attachment}");
    assert_eq!(attachment["pod"]["uid"], "uid-web-1-c", "{attachment}");

    // Another ordinal has an address of its own.
    c.create_replica(2, "uid-web-2", "node-b");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let ip2 = c.b.add("c-web-2", "web-2", "uid-web-2").await;
    assert!(ip2 != ip0 && ip2 != ip1, "{ip2}");
    c.a.del("c-web-0").await;
    c.b.del("c-web-1-c").await;
    c.b.del("c-web-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_add_before_the_old_del_gets_the_same_address_and_the_late_del_frees_nothing() {
    if !needs_root("sticky quick re-create race test") {
        return;
    }
    let mut c = Cluster::start("sticky-race", 2).await;
    c.create_replica(1, "uid-old", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let ip = c.a.add("c-old", "web-1", "uid-old").await;

    // web-1 is deleted and re-created on node-b; its ADD comes before the old container's DEL.
    c.fake.delete(Kind::Pod, NS, "web-1").expect("deleted");
    c.create_replica(1, "uid-new", "node-b");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(c.b.add("c-new", "web-1", "uid-new").await, ip);
    assert_eq!(c.holder(&ip).await.as_deref(), Some("c-new"));
    c.assert_audit_holds(&[(&ip, "c-new")]).await;

    // The old DEL arrives at last: it succeeds, frees nothing and moves nothing.
    assert_eq!(c.a.del("c-old").await, Vec::<String>::new());
    assert_eq!(c.holder(&ip).await.as_deref(), Some("c-new"));
    c.assert_audit_holds(&[(&ip, "c-new")]).await;
    assert!(c.sticky_record(1).await.is_some());

    // The sticky GC keeps an identity whose ordinal exists, and its address.
    let before = c.snapshot().await;
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(out.contains("released 0 sticky identities"), "{out}");
    assert!(out.contains("1 in use"), "{out}");
    assert_eq!(c.snapshot().await, before, "nothing written");
    c.b.del("c-new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_down_ordinal_is_released_only_after_the_grace_and_kept_if_it_comes_back_first() {
    if !needs_root("sticky scale-down test") {
        return;
    }
    let mut c = Cluster::start("sticky-scale", 2).await;
    c.create_replica(0, "uid-web-0", "node-a");
    c.create_replica(1, "uid-web-1", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let ip0 = c.a.add("c-web-0", "web-0", "uid-web-0").await;
    let ip1 = c.a.add("c-web-1", "web-1", "uid-web-1").await;

    // Scale-down: web-1 goes.
    c.scale(1);
    assert_eq!(c.a.del("c-web-1").await, vec![ip1.clone()]);
    c.fake.delete(Kind::Pod, NS, "web-1").expect("deleted");
    let before = c.snapshot().await;

    // A dry run says what it would do and writes nothing.
    let (ok, out) = c.gc_sticky(&["--dry-run", "--gc-grace-seconds", "3600"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "would mark orphaned sticky {NS}/web-1 on network {NETWORK} ({ip1}): ordinal 1 is gone: StatefulSet {NS}/web has 1 replicas (ordinals 0..1)"
        )),
        "{out}"
    );
    let (ok, out) = c.gc_sticky(&["--dry-run", "--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "would release sticky {NS}/web-1 on network {NETWORK} ({ip1}): ordinal 1 is gone"
        )),
        "{out}"
    );
    assert_eq!(c.snapshot().await, before, "a dry run writes nothing");

    // An API that cannot answer changes nothing, and the command fails saying so.
    c.fake.set_fault(Fault::Status(503));
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "0"]);
    c.fake.clear_fault();
    assert!(!ok, "{out}");
    assert!(out.contains("its StatefulSet cannot be read"), "{out}");
    assert_eq!(
        c.snapshot().await,
        before,
        "nothing written while the API fails"
    );

    // Seen gone: marked, not released; seen again within the grace: still waiting.
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "3600"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("marked orphaned sticky {NS}/web-1")),
        "{out}"
    );
    assert!(c.sticky_record(1).await.expect("kept")["orphanedSince"].is_u64());
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "3600"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("waiting sticky {NS}/web-1")), "{out}");
    assert_eq!(c.holder(&ip1).await.as_deref(), Some(RESERVED_1));

    // Scaled up again before the grace: kept, the orphan time cleared, the address back.
    c.scale(2);
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "3600"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("kept again sticky {NS}/web-1")),
        "{out}"
    );
    assert!(c.sticky_record(1).await.expect("kept")["orphanedSince"].is_null());
    c.create_replica(1, "uid-web-1-b", "node-b");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert_eq!(c.b.add("c-web-1-b", "web-1", "uid-web-1-b").await, ip1);

    // Scaled down again: the running container's address is never freed, even past the grace.
    c.scale(1);
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("still holds it"),
        "a container holds it: kept\n{out}"
    );
    assert_eq!(c.holder(&ip1).await.as_deref(), Some("c-web-1-b"));
    assert!(c.sticky_record(1).await.is_some());

    // Its DEL returns the address to the reservation; past the grace the GC frees it.
    assert_eq!(c.b.del("c-web-1-b").await, vec![ip1.clone()]);
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "released sticky {NS}/web-1 on network {NETWORK} ({ip1}): ordinal 1 is gone"
        )),
        "{out}"
    );
    assert!(c.sticky_record(1).await.is_none());
    assert_eq!(c.holder(&ip1).await, None, "the address is free");
    c.assert_audit_holds(&[(&ip0, "c-web-0")]).await;
    assert!(
        c.sticky_record(0).await.is_some(),
        "web-0 keeps its identity"
    );
    c.a.del("c-web-0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_statefulset_releases_its_identities_once_no_container_holds_them() {
    if !needs_root("sticky StatefulSet deletion test") {
        return;
    }
    let mut c = Cluster::start("sticky-deleted", 2).await;
    c.create_replica(0, "uid-web-0", "node-a");
    c.create_replica(1, "uid-web-1", "node-b");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let ip0 = c.a.add("c-web-0", "web-0", "uid-web-0").await;
    let ip1 = c.b.add("c-web-1", "web-1", "uid-web-1").await;
    c.fake
        .delete(Kind::StatefulSet, NS, "web")
        .expect("StatefulSet deleted");
    assert_eq!(c.b.del("c-web-1").await, vec![ip1.clone()]);

    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "released sticky {NS}/web-1 on network {NETWORK} ({ip1}): StatefulSet {NS}/web no longer exists"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("kept sticky {NS}/web-0")) && out.contains("c-web-0/eth0"),
        "web-0's container still holds its address\n{out}"
    );
    c.assert_audit_holds(&[(&ip0, "c-web-0")]).await;

    assert_eq!(c.a.del("c-web-0").await, vec![ip0.clone()]);
    let (ok, out) = c.gc_sticky(&["--gc-grace-seconds", "0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("released sticky {NS}/web-0")),
        "{out}"
    );
    c.assert_audit_holds(&[]).await;
    assert!(c.sticky_record(0).await.is_none() && c.sticky_record(1).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_switch_off_a_statefulset_pod_gets_an_ordinary_dynamic_address() {
    if !needs_root("sticky switch test") {
        return;
    }
    let mut c = Cluster::start("sticky-off", 1).await;
    c.create_replica(0, "uid-web-0", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let mut off = ipam();
    off["stickyStatefulSets"] = json!(false);
    let ip =
        c.a.add_on(&off, "c-web-0", "web-0", "uid-web-0")
            .await
            .expect("ADD");
    let attachment = c
        .get(
            &c.observer
                .keys()
                .attachment(&Attachment::new(NETWORK, "c-web-0", "eth0")),
        )
        .await
        .expect("attachment record");
    assert_eq!(attachment["ips"][0]["kind"], "dynamic", "{attachment}");
    assert!(c.sticky_record(0).await.is_none(), "no identity record");
    assert_eq!(c.a.del("c-web-0").await, ip);
    c.assert_audit_holds(&[]).await;

    // A switch that is not a boolean is refused, naming the key, and writes nothing.
    let before = c.snapshot().await;
    let mut bad = ipam();
    bad["stickyStatefulSets"] = json!("yes");
    let e =
        c.a.add_on(&bad, "c-web-0", "web-0", "uid-web-0")
            .await
            .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("ipam.stickyStatefulSets"), "{e}");
    assert_eq!(c.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_sticky_gc_releases_a_scaled_down_ordinal_past_the_grace_and_logs_why() {
    if !needs_root("sticky GC in the daemon test") {
        return;
    }
    let mut c = Cluster::start_with(
        "sticky-daemon-gc",
        2,
        &[
            "--sticky-gc-interval-seconds",
            "1",
            "--gc-grace-seconds",
            "2",
        ],
    )
    .await;
    c.create_replica(0, "uid-web-0", "node-a");
    c.create_replica(1, "uid-web-1", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let ip0 = c.a.add("c-web-0", "web-0", "uid-web-0").await;
    let ip1 = c.a.add("c-web-1", "web-1", "uid-web-1").await;
    c.scale(1);
    assert_eq!(c.a.del("c-web-1").await, vec![ip1.clone()]);
    c.fake.delete(Kind::Pod, NS, "web-1").expect("deleted");

    // Marked at the next pass, released one grace (2 s) later.
    let marked = std::time::Instant::now();
    let deadline = marked + Duration::from_secs(20);
    while c.sticky_record(1).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "not released:\n{}",
            c.a.daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Times are whole seconds: a grace of 2 s lasts more than 1 s.
    assert!(
        marked.elapsed() > Duration::from_secs(1),
        "released before the grace: {:?}",
        marked.elapsed()
    );
    assert_eq!(c.holder(&ip1).await, None, "the address is free");
    c.assert_audit_holds(&[(&ip0, "c-web-0")]).await;
    let logged = |log: &str| {
        log.contains("released sticky addresses")
            && log.contains("ordinal 1 is gone: StatefulSet apps/web has 1 replicas")
    };
    let log = c.a.daemon.log_tail_once(logged, Duration::from_secs(5));
    assert!(
        logged(&log),
        "the release is logged with its reason:\n{log}"
    );
    assert!(
        c.sticky_record(0).await.is_some(),
        "web-0 keeps its identity"
    );
    c.a.del("c-web-0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_whose_address_left_the_networks_pools_gets_a_new_one_and_frees_the_old() {
    if !needs_root("sticky pools changed test") {
        return;
    }
    let mut c = Cluster::start("sticky-repooled", 1).await;
    c.create_replica(0, "uid-web-0", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let old = c.a.add("c-web-0", "web-0", "uid-web-0").await;
    assert_eq!(c.a.del("c-web-0").await, vec![old.clone()]);
    assert!(c.holder(&old).await.is_some(), "kept for the identity");

    // The network now has another subnet: the re-created pod gets an address of it.
    let moved = json!({"type": "hostnic-ipam", "subnet": "10.74.0.0/24"});
    c.fake.delete(Kind::Pod, NS, "web-0").expect("deleted");
    c.create_replica(0, "uid-web-0-b", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let new =
        c.a.add_on(&moved, "c-web-0-b", "web-0", "uid-web-0-b")
            .await
            .unwrap_or_else(|e| panic!("ADD: {e}\n{}", c.a.daemon.log_tail()));
    assert!(new[0].starts_with("10.74.0."), "{new:?}");
    assert_eq!(c.holder(&old).await, None, "the old address is freed");
    let record = c.sticky_record(0).await.expect("a new identity record");
    assert_eq!(record["ips"][0]["ip"], new[0].as_str(), "{record}");
    c.assert_audit_holds(&[(&new[0], "c-web-0-b")]).await;
    c.a.client
        .release(ReleaseRequest {
            attachment: Some(proto::Attachment {
                container_id: "c-web-0-b".into(),
                ifname: "eth0".into(),
            }),
            network: Some(Network {
                name: NETWORK.into(),
                ipam_json: moved.to_string(),
            }),
        })
        .await
        .expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_whose_address_was_freed_by_hand_and_taken_by_another_pod_gets_a_new_one() {
    if !needs_root("sticky address taken by another pod test") {
        return;
    }
    let mut c = Cluster::start("sticky-taken", 1).await;
    c.create_replica(0, "uid-web-0", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let old = c.a.add("c-web-0", "web-0", "uid-web-0").await;
    c.a.del("c-web-0").await;
    // An operator frees the reserved address (`release` of the reservation), and another
    // container asks for it exactly.
    let reservation = Attachment::new(NETWORK, "sticky_apps_web_0", "sticky");
    c.observer
        .release(&reservation)
        .await
        .expect("released by hand")
        .expect("the reservation held it");
    let squatter = Attachment::new(NETWORK, "c-squatter", "eth0");
    c.observer
        .allocate(&common::request(&squatter, &common::sets(ipam()), &[&old]))
        .await
        .expect("the address is free to ask for");

    c.fake.delete(Kind::Pod, NS, "web-0").expect("deleted");
    c.create_replica(0, "uid-web-0-b", "node-a");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let new = c.a.add("c-web-0-b", "web-0", "uid-web-0-b").await;
    assert_ne!(new, old);
    let record = c.sticky_record(0).await.expect("a new identity record");
    assert_eq!(record["ips"][0]["ip"], new.as_str(), "{record}");
    c.assert_audit_holds(&[(&old, "c-squatter"), (&new, "c-web-0-b")])
        .await;
    c.a.del("c-web-0-b").await;
    c.observer.release(&squatter).await.expect("released");
}
