//! End to end, namespace → subnet mapping: pods are network namespaces attached by the
//! reference `macvlan` plugin, which delegates to the real `hostnic-ipam`; the real
//! `hostnic-ipamd` reads the pods and the `kube-system/hostnic-ipam-config` ConfigMap from a
//! fake Kubernetes API server (`hostnic_testkit::kube::FakeKube`, the real wire format) through
//! its production client (`--kubeconfig`), and commits to a real etcd.
//!
//! The ConfigMap is `examples/namespace-subnets-configmap.yaml`, read from the file, so that
//! what a user copies is what is proven: its two namespaces get addresses only from their own
//! blocks, a namespace it does not name is given a free block of its own (auto-assign), and a
//! pod whose annotation asks for another namespace's address fails with code 7 naming the
//! annotation, with nothing allocated.
//!
//! Needs root and `ip netns` (the tests skip with `SKIPPED ...` otherwise), `etcd`, `ping`,
//! the reference `macvlan` in `/usr/lib/cni`, and the workspace binaries built from the current
//! sources (`cargo build --workspace --bins`).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hostnic_ipamd::audit::{audit, AuditReport};
use hostnic_ipamd::namespaces::{parse_entry, Entry};
use hostnic_ipamd::records::Keys;
use hostnic_ipamd::store::Store;
use hostnic_ipamd::StoreConfig;
use hostnic_testkit::bins::workspace_binary;
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self, FakeKube};
use hostnic_testkit::netns::{
    addresses, link_exists, ping, require_netns, run_cni, temp_dir, CniCall, CniOutput, CniPath,
    NetNs, VethPair, REFERENCE_PLUGINS_DIR,
};
use hostnic_testkit::{shared_single, unique_prefix};
use ipnet::IpNet;
use serde_json::{json, Value};

const IFNAME: &str = "eth0";
const NODE: &str = "node-ns-e2e";
/// The pool the example's entries are blocks of (its comment says so).
const SUBNET: &str = "10.212.0.0/16";
const BLOCK_SIZE: u8 = 26;
const CODE_INVALID: u64 = 7;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// The ConfigMap of `examples/namespace-subnets-configmap.yaml`.
fn example_config_map() -> Value {
    let path = example("namespace-subnets-configmap.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cm: Value = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
    assert_eq!(cm["kind"], "ConfigMap", "{cm}");
    assert_eq!(cm["metadata"]["namespace"], "kube-system", "{cm}");
    assert_eq!(cm["metadata"]["name"], "hostnic-ipam-config", "{cm}");
    cm
}

/// The CIDRs the example maps `namespace` to.
fn entries_of(cm: &Value, namespace: &str) -> Vec<IpNet> {
    let ipam: Value = serde_json::from_str(cm["data"]["ipam"].as_str().expect("data.ipam"))
        .expect("data.ipam is JSON");
    ipam[namespace]
        .as_array()
        .unwrap_or_else(|| panic!("the example maps {namespace}: {ipam}"))
        .iter()
        .map(
            |e| match parse_entry(e.as_str().expect("entry")).expect("valid entry") {
                Entry::Cidr(net) => net,
                Entry::Vxnet(id) => panic!("{namespace} maps to vxnet {id}"),
            },
        )
        .collect()
}

struct Setup {
    daemon: PathBuf,
    cni_path: CniPath,
}

fn setup(what: &str) -> Option<Setup> {
    if !require_netns(what) {
        return None;
    }
    let plugin = workspace_binary("hostnic-ipam").unwrap_or_else(|e| panic!("{e:#}"));
    let daemon = workspace_binary("hostnic-ipamd").unwrap_or_else(|e| panic!("{e:#}"));
    let macvlan = Path::new(REFERENCE_PLUGINS_DIR).join("macvlan");
    assert!(
        macvlan.is_file(),
        "{} is missing: run scripts/install-deps.sh (containernetworking-plugins)",
        macvlan.display()
    );
    let cni_path = CniPath::new(&[&plugin]).expect("creating the CNI_PATH directory");
    Some(Setup { daemon, cni_path })
}

/// A pod: its object in the API server and its network namespace.
struct Pod {
    netns: NetNs,
    namespace: String,
    name: String,
    uid: String,
    container: String,
}

impl Pod {
    fn create(api: &FakeKube, pod: kube::PodBuilder) -> Pod {
        static N: AtomicU64 = AtomicU64::new(0);
        let stored = api.create_pod(pod).expect("creating the pod");
        let field = |p: &str| {
            stored
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("stored pod without {p}: {stored}"))
                .to_owned()
        };
        Pod {
            netns: NetNs::new("nm").expect("creating a pod netns"),
            namespace: field("/metadata/namespace"),
            name: field("/metadata/name"),
            uid: field("/metadata/uid"),
            container: format!(
                "nse2e{}c{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn run(&self, setup: &Setup, command: &str, config: &str) -> CniOutput {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container, self.uid
        );
        let call = CniCall {
            command,
            container_id: &self.container,
            netns: &self.netns.path(),
            ifname: IFNAME,
            cni_path: setup.cni_path.path(),
            args: &args,
        };
        run_cni(&setup.cni_path.plugin("macvlan"), &call, config)
            .unwrap_or_else(|e| panic!("macvlan {command} for {}: {e:#}", self.key()))
    }

    /// ADD, which must succeed: the pod's address, also as `ip addr` shows it in its netns.
    fn add(&self, setup: &Setup, config: &str) -> IpAddr {
        let out = self.run(setup, "ADD", config);
        assert!(out.success(), "ADD of {}: {}", self.key(), describe(&out));
        let result: Value = serde_json::from_str(&out.stdout).expect("ADD printed JSON");
        let cidr: IpNet = result["ips"][0]["address"]
            .as_str()
            .expect("ips[0].address")
            .parse()
            .expect("a CIDR");
        let shown = addresses(&self.netns, IFNAME).expect("ip addr in the pod");
        assert_eq!(shown, vec![cidr.to_string()], "{}", self.key());
        cidr.addr()
    }

    fn del(&self, setup: &Setup, config: &str) {
        let out = self.run(setup, "DEL", config);
        assert!(out.success(), "DEL of {}: {}", self.key(), describe(&out));
    }
}

fn describe(out: &CniOutput) -> String {
    format!(
        "{} after {:?}\n  stdout: {}\n  stderr: {}",
        out.status,
        out.elapsed,
        out.stdout.trim(),
        out.stderr.trim()
    )
}

/// The full scan of the test's keys.
fn scan(endpoints: &[String], prefix: &str) -> AuditReport {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let config = StoreConfig::new(endpoints.to_vec()).with_prefix(prefix);
        let store = Store::connect(&config).await.expect("etcd");
        audit(&store, &Keys::new(prefix)).await.expect("audit")
    })
}

#[test]
fn the_example_mapping_keeps_each_namespace_in_its_blocks_and_gives_a_new_namespace_its_own() {
    let Some(setup) = setup("namespace mapping e2e") else {
        return;
    };
    let cm = example_config_map();
    let team_a = entries_of(&cm, "team-a");
    let team_b = entries_of(&cm, "team-b");
    let default = entries_of(&cm, "Default");
    assert_eq!(
        team_b,
        vec!["10.212.128.64/26".parse::<IpNet>().expect("literal")],
        "hostnic's block name 4100-10-212-128-64-26"
    );
    assert_eq!(cm["data"]["subnet-auto-assign"], "on");

    let api = FakeKube::start().expect("starting the fake Kubernetes API server");
    api.create(kube::node(NODE)).expect("creating the Node");
    api.create(cm.clone())
        .expect("loading the example ConfigMap");
    let dir = temp_dir("ns-e2e").expect("temp dir");
    let endpoints = shared_single().endpoints();
    let prefix = unique_prefix("ns-e2e");
    let kubeconfig = api.kubeconfig_path().to_str().expect("UTF-8 path");
    let daemon = IpamDaemon::start(
        &setup.daemon,
        &endpoints,
        NODE,
        &prefix,
        &dir.path().join("ipamd.sock"),
        &["--kubeconfig", kubeconfig],
    )
    .expect("starting hostnic-ipamd");
    let parent = VethPair::new("nm").expect("creating the macvlan parent veth pair");
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "ns-e2e",
        "type": "macvlan",
        "master": parent.master(),
        "mode": "bridge",
        "ipam": {
            "type": "hostnic-ipam",
            "subnet": SUBNET,
            "blockSize": BLOCK_SIZE,
            "socket": daemon.socket,
        },
    })
    .to_string();

    let pod = |ns: &str, name: &str| Pod::create(&api, kube::pod(ns, name).node(NODE));
    let pods = [
        pod("team-a", "a1"),
        pod("team-b", "b1"),
        pod("team-a", "a2"),
        pod("team-b", "b2"),
        pod("team-c", "c1"),
        pod("team-c", "c2"),
    ];
    let mut addrs = Vec::new();
    for p in &pods {
        let ip = p.add(&setup, &config);
        eprintln!("{}: {ip}", p.key());
        addrs.push(ip);
    }
    let within = |ip: &IpAddr, nets: &[IpNet]| nets.iter().any(|n| n.contains(ip));
    for (p, ip) in pods.iter().zip(&addrs) {
        match p.namespace.as_str() {
            "team-a" => assert!(within(ip, &team_a), "{}: {ip} not in {team_a:?}", p.key()),
            "team-b" => assert!(within(ip, &team_b), "{}: {ip} not in {team_b:?}", p.key()),
            _ => {}
        }
    }
    // team-c is not in the ConfigMap: auto-assign gave it one block of Default's, recorded
    // in etcd, and both its pods are in it.
    let report = scan(&endpoints, &prefix);
    let team_c = report.namespaces.get("team-c").cloned().unwrap_or_default();
    assert_eq!(team_c.len(), 1, "{:?}", report.namespaces);
    assert_eq!(team_c[0].prefix_len(), BLOCK_SIZE);
    assert!(within(&team_c[0].network(), &default), "{team_c:?}");
    assert!(!within(&team_c[0].network(), &team_a) && !within(&team_c[0].network(), &team_b));
    for ip in &addrs[4..] {
        assert!(within(ip, &team_c), "team-c got {ip}, not in {team_c:?}");
    }
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    // They are real interfaces on one segment.
    assert!(
        ping(&pods[0].netns, addrs[1]),
        "team-a/a1 cannot ping team-b/b1"
    );
    assert!(
        ping(&pods[4].netns, addrs[0]),
        "team-c/c1 cannot ping team-a/a1"
    );

    // A team-a pod asking for team-b's address by annotation: refused, nothing allocated.
    let taken = team_b[0]
        .hosts()
        .nth(10)
        .expect("an address of team-b's block");
    let thief = Pod::create(
        &api,
        kube::pod("team-a", "thief")
            .node(NODE)
            .annotation("kube-ipam.ip", &taken.to_string()),
    );
    let before = scan(&endpoints, &prefix).allocations.len();
    let out = thief.run(&setup, "ADD", &config);
    assert!(!out.success(), "ADD of team-a/thief: {}", describe(&out));
    let reply: Value = serde_json::from_str(&out.stdout).expect("a CNI error object");
    let text = format!("{} {}", reply["msg"], reply["details"]);
    assert_eq!(reply["code"], CODE_INVALID, "{text}");
    for part in ["kube-ipam.ip", "namespace team-a", &taken.to_string()] {
        assert!(text.contains(part), "{part}: {text}");
    }
    // The reference macvlan (1.1.1) leaves the link it made before calling IPAM when IPAM
    // fails; nothing of the refused allocation is on it, and the DEL below removes it.
    if link_exists(Some(&thief.netns), IFNAME) {
        let left = addresses(&thief.netns, IFNAME).expect("ip addr in the pod");
        assert!(left.is_empty(), "the refused ADD left {left:?}");
    }
    assert_eq!(scan(&endpoints, &prefix).allocations.len(), before);

    for p in pods.iter().chain([&thief]) {
        p.del(&setup, &config);
    }
    let report = scan(&endpoints, &prefix);
    assert!(report.allocations.is_empty(), "{:?}", report.allocations);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    drop(daemon);
}
