//! Namespace → subnet mapping through the real hostnic-ipamd binary, with `--kubeconfig`
//! pointed at the testkit's fake Kubernetes API server holding the
//! `kube-system/hostnic-ipam-config` ConfigMap, against a real etcd, called over its unix
//! socket with the plugins' gRPC client. What it proves: a mapped namespace's pods get
//! addresses only from its entries (CIDRs and hostnic block names), others from `Default`,
//! never from another namespace's; a namespace mapped only to vxnets is refused; auto-assign
//! gives a new namespace a free block by CAS, recorded in etcd and shown by `namespaces`, and
//! another when it is full; an exact address of another namespace (annotation or `IP=`) is
//! refused naming the request and writes nothing; an invalid ConfigMap keeps the previous
//! mapping, and deleting the ConfigMap lifts it.
//!
//! The daemon serves only from a root-owned socket directory and answers only root callers,
//! so every test needs root and skips loudly without it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use hostnic_ipamd::audit::audit;
use hostnic_ipamd::cli::{self, NamespaceSource};
use hostnic_ipamd::Allocator;
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{self as proto, AllocateRequest, Network, Pod, ReleaseRequest};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self as fake, FakeKube, Kind};
use hostnic_testkit::{shared_single, unique_prefix};
use ipnet::IpNet;
use serde_json::{json, Value};
use tonic::{Code, Status};

mod common;

const NETWORK: &str = "ns-net";
const CM_NS: &str = "kube-system";
const CM_NAME: &str = "hostnic-ipam-config";

/// How long a change written to the fake takes at most to reach the daemon through its watch
/// (milliseconds on loopback; the rest is margin for two busy cores).
const WATCH_DELIVERY: Duration = Duration::from_millis(1500);

/// The mapping ConfigMap with `subnet-auto-assign` and the `ipam` JSON.
fn mapping(auto: &str, ipam: Value) -> Value {
    fake::config_map(
        CM_NS,
        CM_NAME,
        &[("subnet-auto-assign", auto), ("ipam", &ipam.to_string())],
    )
}

/// A daemon for one node reading its own fake API server, and an allocator on the same keys to
/// read what the daemon wrote.
struct Node {
    // Declared first: stopped before the fake, the observer and the directory go.
    daemon: IpamDaemon,
    fake: FakeKube,
    observer: Allocator,
    client: IpamClient<tonic::transport::Channel>,
    prefix: String,
    name: String,
    ipam: Value,
    /// Container ids of the attachments made, for the DELs at the end.
    made: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts the fake with `config_map` in it, then the daemon, and waits until it watches
    /// its pods and the ConfigMap.
    async fn start(test: &str, node: &str, subnet: &str, block: u8, config_map: Value) -> Node {
        let fake = FakeKube::start().expect("fake API server starts");
        fake.create(config_map).expect("ConfigMap created");
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
            &["--kubeconfig", &kubeconfig],
        )
        .expect("daemon starts");
        // The pods' watch and the ConfigMap's: each opens once its list is in.
        fake.wait_for_watches_async(2, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("the daemon's watches: {e}\n{}", daemon.log_tail()));
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
            prefix,
            name: node.to_owned(),
            ipam: json!({"type": "hostnic-ipam", "subnet": subnet, "blockSize": block}),
            made: Vec::new(),
            _dir: dir,
        }
    }

    /// ADD of attachment `id`/eth0 for pod `namespace/pod` (created in the API, with
    /// `annotations`, if it is not there), asking for `ips` exactly: the reply's addresses.
    async fn add(
        &mut self,
        namespace: &str,
        pod: &str,
        annotations: &[(&str, &str)],
        ips: &[&str],
    ) -> Result<Vec<IpAddr>, Status> {
        if self.fake.get(Kind::Pod, namespace, pod).is_none() {
            let mut builder = fake::pod(namespace, pod).node(&self.name);
            for (k, v) in annotations {
                builder = builder.annotation(k, v);
            }
            self.fake.create_pod(builder).expect("pod created");
        }
        let id = format!("c-{namespace}-{pod}");
        let request = AllocateRequest {
            attachment: Some(proto::Attachment {
                container_id: id.clone(),
                ifname: "eth0".into(),
            }),
            network: Some(Network {
                name: NETWORK.into(),
                ipam_json: self.ipam.to_string(),
            }),
            pod: Some(Pod {
                namespace: namespace.into(),
                name: pod.into(),
                uid: String::new(),
                infra_container_id: id.clone(),
            }),
            requested_ips: ips.iter().map(|s| s.to_string()).collect(),
            netns: String::new(),
        };
        let reply = self.client.allocate(request).await?.into_inner();
        self.made.push(id);
        Ok(reply
            .ips
            .into_iter()
            .map(|x| x.address.parse::<IpNet>().expect("CIDR").addr())
            .collect())
    }

    /// ADD that must succeed: its one address.
    async fn add_ok(&mut self, namespace: &str, pod: &str) -> IpAddr {
        let got = self
            .add(namespace, pod, &[], &[])
            .await
            .unwrap_or_else(|e| panic!("ADD {namespace}/{pod}: {e}\n{}", self.daemon.log_tail()));
        assert_eq!(got.len(), 1, "{got:?}");
        got[0]
    }

    /// The blocks etcd records as auto-assigned to `namespace`.
    async fn assigned(&self, namespace: &str) -> Vec<IpNet> {
        self.observer
            .namespace_blocks(namespace)
            .await
            .expect("namespace record")
    }

    async fn snapshot(&self) -> BTreeMap<String, i64> {
        common::snapshot(&self.observer).await
    }

    /// DELs every attachment made, then checks etcd is consistent and holds no address.
    async fn release_all(&mut self) {
        self.release_all_leaving(0).await;
    }

    /// [`Node::release_all`], where the test left `problems` problems for audit to find.
    async fn release_all_leaving(&mut self, problems: usize) {
        for id in std::mem::take(&mut self.made) {
            self.client
                .release(ReleaseRequest {
                    attachment: Some(proto::Attachment {
                        container_id: id.clone(),
                        ifname: "eth0".into(),
                    }),
                    network: Some(Network {
                        name: NETWORK.into(),
                        ipam_json: self.ipam.to_string(),
                    }),
                })
                .await
                .unwrap_or_else(|e| panic!("DEL {id}: {e}"));
        }
        let report = audit(self.observer.store(), self.observer.keys())
            .await
            .expect("audit");
        assert_eq!(report.problems.len(), problems, "{:#?}", report.problems);
        assert!(report.allocations.is_empty(), "{:?}", report.allocations);
    }
}

fn needs_root(what: &str) -> bool {
    hostnic_testkit::require_root(&format!(
        "{what} (the daemon serves only from a root-owned socket directory, to root callers)"
    ))
}

fn net(s: &str) -> IpNet {
    common::net(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_namespaces_get_addresses_only_from_their_entries_and_the_rest_only_from_default() {
    if !needs_root("namespace mapping test") {
        return;
    }
    let cm = mapping(
        "off",
        json!({"Default": ["10.73.0.0/25"], "apps": ["10.73.0.128/26"],
               "db": ["4100-10-73-0-192-26"], "vxnet-only": ["vxnet-abc"]}),
    );
    let mut node = Node::start("ns-mapped", "node-ns1", "10.73.0.0/24", 26, cm).await;
    for (namespace, own) in [
        ("apps", "10.73.0.128/26"),
        ("db", "10.73.0.192/26"),
        ("web", "10.73.0.0/25"),
        ("apps", "10.73.0.128/26"),
        ("web", "10.73.0.0/25"),
        ("db", "10.73.0.192/26"),
    ] {
        let pod = format!("p{}", node.made.len());
        let ip = node.add_ok(namespace, &pod).await;
        assert!(
            net(own).contains(&ip),
            "{namespace}/{pod} got {ip}, not in {own}"
        );
    }

    let before = node.snapshot().await;
    let e = node
        .add("vxnet-only", "v", &[], &[])
        .await
        .expect_err("a namespace mapped only to a vxnet");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for part in ["data.ipam.vxnet-only", "vxnet-abc", "hostnic-ipam-config"] {
        assert!(e.message().contains(part), "{part}: {}", e.message());
    }
    assert_eq!(
        node.snapshot().await,
        before,
        "a refused ADD writes nothing"
    );
    node.release_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_assign_gives_each_new_namespace_a_free_block_by_cas_and_another_when_it_is_full() {
    if !needs_root("namespace auto-assign test") {
        return;
    }
    // /28 blocks of 16 addresses; "team" has the first block.
    let cm = mapping("on", json!({"team": ["10.74.0.0/28"]}));
    let mut node = Node::start("ns-auto", "node-ns2", "10.74.0.0/24", 28, cm).await;
    let first = node.add_ok("alpha", "a0").await;
    assert_eq!(node.assigned("alpha").await, vec![net("10.74.0.16/28")]);
    assert!(net("10.74.0.16/28").contains(&first), "{first}");
    let beta = node.add_ok("beta", "b0").await;
    assert_eq!(node.assigned("beta").await, vec![net("10.74.0.32/28")]);
    assert!(net("10.74.0.32/28").contains(&beta), "{beta}");
    let team = node.add_ok("team", "t0").await;
    assert!(net("10.74.0.0/28").contains(&team), "{team}");
    assert!(
        node.assigned("team").await.is_empty(),
        "a mapped namespace gets no block"
    );

    // alpha fills its block (16 addresses, all dynamic), then gets the next free one.
    let mut alpha = vec![first];
    for i in 1..17 {
        alpha.push(node.add_ok("alpha", &format!("a{i}")).await);
    }
    let blocks = node.assigned("alpha").await;
    assert_eq!(blocks, vec![net("10.74.0.16/28"), net("10.74.0.48/28")]);
    for ip in &alpha {
        assert!(blocks.iter().any(|b| b.contains(ip)), "alpha got {ip}");
    }
    assert!(net("10.74.0.48/28").contains(&alpha[16]), "{alpha:?}");

    // The operator's view, from etcd.
    let config = common::config(shared_single(), &node.prefix);
    let rows = cli::namespaces(&config, None).await.expect("namespaces");
    let shown: Vec<(String, NamespaceSource, Vec<IpNet>)> = rows
        .into_iter()
        .map(|r| (r.namespace, r.source, r.blocks))
        .collect();
    assert_eq!(
        shown,
        vec![
            ("alpha".into(), NamespaceSource::Auto, blocks.clone()),
            (
                "beta".into(),
                NamespaceSource::Auto,
                vec![net("10.74.0.32/28")]
            ),
        ]
    );
    // The same through the binary, with the ConfigMap's entries read from the API.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"))
        .args(["--etcd-endpoints", &shared_single().endpoints().join(",")])
        .args(["--etcd-prefix", &node.prefix, "--node-name", "node-ns2"])
        .args([
            "--kubeconfig",
            node.fake.kubeconfig_path().to_str().expect("utf-8"),
        ])
        .arg("namespaces")
        .output()
        .expect("running hostnic-ipamd namespaces");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            cli::NamespaceRow::HEADER,
            "alpha\tauto\t10.74.0.16/28,10.74.0.48/28\t-",
            "beta\tauto\t10.74.0.32/28\t-",
            "team\tconfigmap\t10.74.0.0/28\t-",
        ]
    );
    // alpha fills its second block too: a repeated ADD of one of its attachments gets its
    // address, and the namespace no new block.
    for i in 17..32 {
        alpha.push(node.add_ok("alpha", &format!("a{i}")).await);
    }
    assert_eq!(node.assigned("alpha").await.len(), 2, "{alpha:?}");
    let again = node.add("alpha", "a31", &[], &[]).await.expect("ADD again");
    assert_eq!(again, vec![alpha[31]]);
    node.made.pop();
    assert_eq!(
        node.assigned("alpha").await.len(),
        2,
        "no block for a repeated ADD"
    );

    // beta is deleted: its block is taken back (its pod keeps its address).
    let dry = cli::unassign_namespace(&config, "beta", true)
        .await
        .expect("dry run");
    assert_eq!(dry.blocks, vec![net("10.74.0.32/28")]);
    assert_eq!(
        node.assigned("beta").await.len(),
        1,
        "a dry run changes nothing"
    );
    cli::unassign_namespace(&config, "beta", false)
        .await
        .expect("unassign beta");
    assert!(node.assigned("beta").await.is_empty());
    let e = cli::unassign_namespace(&config, "beta", false)
        .await
        .expect_err("nothing left to take");
    assert!(e.to_string().contains("no auto-assigned block"), "{e}");
    let report = audit(node.observer.store(), node.observer.keys())
        .await
        .expect("audit");
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(report
        .namespace_blocks
        .keys()
        .all(|b| *b != net("10.74.0.32/28")));
    assert!(report
        .allocations
        .contains_key(&("10.74.0.0_24".to_string(), beta)));
    node.release_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_of_another_namespace_asked_for_by_annotation_or_ip_is_refused_and_writes_nothing(
) {
    if !needs_root("namespace exact address test") {
        return;
    }
    let cm = mapping(
        "off",
        json!({"apps": ["10.75.0.128/26"], "db": ["10.75.0.192/26"]}),
    );
    let mut node = Node::start("ns-exact", "node-ns3", "10.75.0.0/24", 26, cm).await;
    let before = node.snapshot().await;
    let e = node
        .add("apps", "a", &[("kube-ipam.ip", "10.75.0.200")], &[])
        .await
        .expect_err("db's address by annotation");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for part in [
        "annotation kube-ipam.ip",
        "namespace apps",
        "10.75.0.200",
        "10.75.0.128/26",
    ] {
        assert!(e.message().contains(part), "{part}: {}", e.message());
    }
    let e = node
        .add("apps", "b", &[], &["10.75.0.201"])
        .await
        .expect_err("db's address by IP=");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for part in ["CNI_ARGS IP=", "namespace apps", "10.75.0.201"] {
        assert!(e.message().contains(part), "{part}: {}", e.message());
    }
    let e = node
        .add("web", "c", &[("kube-ipam.ip", "10.75.0.130")], &[])
        .await
        .expect_err("an unmapped namespace asking for apps' address");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("namespace web"), "{}", e.message());
    assert_eq!(node.snapshot().await, before, "refused ADDs write nothing");

    // Its own block, and the unmapped rest of the pool for another namespace, are fine.
    let got = node
        .add("apps", "d", &[("kube-ipam.ip", "10.75.0.140")], &[])
        .await
        .expect("apps' own address");
    assert_eq!(got, vec![common::ip("10.75.0.140")]);
    let got = node
        .add("web", "e", &[("kube-ipam.ip", "10.75.0.40")], &[])
        .await
        .expect("an address of no namespace");
    assert_eq!(got, vec![common::ip("10.75.0.40")]);
    node.release_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_map_keeps_the_previous_mapping_and_deleting_it_lifts_the_mapping() {
    if !needs_root("namespace ConfigMap update test") {
        return;
    }
    let cm = mapping("off", json!({"apps": ["10.76.0.128/26"]}));
    let mut node = Node::start("ns-update", "node-ns4", "10.76.0.0/24", 26, cm).await;
    let ip = node.add_ok("apps", "a0").await;
    assert!(net("10.76.0.128/26").contains(&ip), "{ip}");

    node.fake
        .replace(fake::config_map(
            CM_NS,
            CM_NAME,
            &[("subnet-auto-assign", "off"), ("ipam", "{\"apps\": [")],
        ))
        .expect("ConfigMap replaced");
    tokio::time::sleep(WATCH_DELIVERY).await;
    assert!(
        node.daemon
            .log_tail()
            .contains("refusing an invalid namespace mapping"),
        "{}",
        node.daemon.log_tail()
    );
    let ip = node.add_ok("apps", "a1").await;
    assert!(
        net("10.76.0.128/26").contains(&ip),
        "{ip}: previous mapping"
    );
    let e = node
        .add("web", "w0", &[("kube-ipam.ip", "10.76.0.150")], &[])
        .await
        .expect_err("apps' address, the previous mapping still in force");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    node.fake
        .delete(Kind::ConfigMap, CM_NS, CM_NAME)
        .expect("ConfigMap deleted");
    tokio::time::sleep(WATCH_DELIVERY).await;
    let got = node
        .add("web", "w1", &[("kube-ipam.ip", "10.76.0.150")], &[])
        .await
        .expect("no mapping: any address of the pool");
    assert_eq!(got, vec![common::ip("10.76.0.150")]);
    node.release_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_namespace_record_fails_only_its_namespace_and_audit_names_it() {
    if !needs_root("corrupt namespace record test") {
        return;
    }
    let cm = mapping("on", json!({}));
    let mut node = Node::start("ns-corrupt", "node-ns5", "10.77.0.0/24", 26, cm).await;
    let keys = node.observer.keys().clone();
    let bad = keys.namespace("bad");
    let lonely = keys.namespace("lonely");
    let writes = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(bad.as_str(), "{not json", None),
        etcd_client::TxnOp::put(
            lonely.as_str(),
            json!({"version": 1, "blocks": ["10.77.0.64/26"]}).to_string(),
            None,
        ),
    ]);
    node.observer
        .store()
        .txn("write namespace records", writes)
        .await
        .expect("etcd put");
    tokio::time::sleep(WATCH_DELIVERY).await;

    let e = node
        .add("bad", "b0", &[], &[])
        .await
        .expect_err("a namespace whose record does not decode");
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains(&bad), "names the key: {}", e.message());
    // Every other namespace is served, and none gets lonely's block.
    let ip = node.add_ok("fresh", "f0").await;
    assert_eq!(node.assigned("fresh").await, vec![net("10.77.0.0/26")]);
    assert!(net("10.77.0.0/26").contains(&ip), "{ip}");
    let ip = node.add_ok("other", "o0").await;
    assert_eq!(node.assigned("other").await, vec![net("10.77.0.128/26")]);
    assert!(net("10.77.0.128/26").contains(&ip), "{ip}");

    let report = audit(node.observer.store(), node.observer.keys())
        .await
        .expect("audit");
    assert!(report.bad_keys.contains(&bad), "{:#?}", report.problems);
    let lonely_problem = format!(
        "{lonely}: lists block 10.77.0.64/26, which has no record at {}",
        keys.namespace_block(&net("10.77.0.64/26"))
    );
    assert!(
        report.problems.contains(&lonely_problem),
        "{:#?}",
        report.problems
    );
    assert_eq!(report.problems.len(), 2, "{:#?}", report.problems);
    node.release_all_leaving(2).await;
}

/// Two nodes give eight new namespaces blocks at once, each namespace asked of both, neither
/// node knowing what the other assigns: every namespace gets one block, and no block goes to
/// two namespaces (the block's index record is created in the assigning transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_racing_to_give_namespaces_blocks_never_give_one_block_twice() {
    use hostnic_ipamd::namespaces::{Restriction, Source};
    let prefix = unique_prefix("ns-race");
    let a = common::allocator(shared_single(), &prefix, "node-a").await;
    let b = common::allocator(shared_single(), &prefix, "node-b").await;
    let set = common::sets(json!({"subnet": "10.78.0.0/24", "blockSize": 28})).remove(0);
    let unknown = Restriction {
        within: Some(vec![]),
        outside: vec![],
        source: Source::Auto,
        auto_space: Some(None),
    };
    let names: Vec<String> = (0..8).map(|i| format!("ns-{i}")).collect();
    let calls = names.iter().flat_map(|n| {
        [&a, &b]
            .into_iter()
            .map(|node| node.assign_namespace_block(n, &set, &unknown, NETWORK))
    });
    let answers = futures::future::join_all(calls).await;
    let answers: Vec<Vec<IpNet>> = answers
        .into_iter()
        .map(|r| r.expect("a block assigned"))
        .collect();
    let report = audit(a.store(), a.keys()).await.expect("audit");
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.namespaces.len(), 8, "{:?}", report.namespaces);
    let mut all: Vec<IpNet> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let blocks = &report.namespaces[name];
        assert_eq!(blocks.len(), 1, "{name}: {blocks:?}");
        // Both nodes answered with the namespace's one block.
        assert_eq!(&answers[2 * i], blocks, "{name} on node-a");
        assert_eq!(&answers[2 * i + 1], blocks, "{name} on node-b");
        all.push(blocks[0]);
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 8, "a block given twice: {:?}", report.namespaces);
    assert_eq!(report.namespace_blocks.len(), 8);
}
