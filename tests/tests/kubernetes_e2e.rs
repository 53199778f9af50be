//! End to end with Kubernetes: pods are network namespaces attached by the reference `macvlan`
//! plugin, which delegates to the real `hostnic-ipam`; the real `hostnic-ipamd` reads the pods
//! from a fake Kubernetes API server (`hostnic_testkit::kube::FakeKube`, the real wire format)
//! through its production client (`--kubeconfig`), and commits to a real etcd.
//!
//! The Kubernetes objects come from the shipped examples, so that what a user copies is what is
//! proven: `examples/statefulset-fixed-ips.yaml` (a StatefulSet with an address per ordinal),
//! `examples/kube-ipam-readme.conf` and `examples/kube-ipam-fixed-ip-deployment.yaml` (kube-ipam's
//! own README config, with only `type` changed, and its example Deployment),
//! `examples/multus-two-networks.yaml` (a pod on two networks with a fixed address on `net1` only)
//! and `examples/multus-macvlan-static-ip.yaml` (Multus' `ips` as `runtimeConfig.ips`).
//!
//! Needs root and `ip netns` (the tests skip with `SKIPPED ...` otherwise), `etcd`, `etcdctl`,
//! `ping`, the reference `macvlan` in `/usr/lib/cni`, and the workspace binaries built from the
//! current sources (`cargo build --workspace --bins`).

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use hostnic_testkit::bins::workspace_binary;
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self, FakeKube, Kind};
use hostnic_testkit::netns::{
    addresses, link_exists, ping, require_netns, run_cni, temp_dir, CniCall, CniOutput, CniPath,
    NetNs, VethPair, REFERENCE_PLUGINS_DIR,
};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::{json, Value};

const IFNAME: &str = "eth0";
/// The node every pod is scheduled to, and the daemon's `--node-name`: the daemon watches the
/// pods whose `spec.nodeName` is its node.
const NODE: &str = "node-k8s-e2e";
/// The subnet of `examples/statefulset-fixed-ips.yaml`, used by no other test.
const STS_SUBNET: &str = "10.211.0.0/24";
/// CNI error code for an invalid request (a refused annotation).
const CODE_INVALID: u64 = 7;

// ---------------------------------------------------------------------------------------------
// Setup: binaries, tools, the API server and the daemon
// ---------------------------------------------------------------------------------------------

struct Setup {
    daemon: PathBuf,
    cni_path: CniPath,
}

/// `None` (after a `SKIPPED` line) when not root or without network namespaces. Panics when a
/// binary or tool is missing: that is a broken setup, not a reason to pass.
fn setup(what: &str) -> Option<Setup> {
    if !require_netns(what) {
        return None;
    }
    let plugin = workspace_binary("hostnic-ipam").unwrap_or_else(|e| panic!("{e:#}"));
    let daemon = workspace_binary("hostnic-ipamd").unwrap_or_else(|e| panic!("{e:#}"));
    for tool in ["etcd", "etcdctl", "ping"] {
        let found = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "`{tool}` is not on PATH: run scripts/install-deps.sh"
        );
    }
    let macvlan = Path::new(REFERENCE_PLUGINS_DIR).join("macvlan");
    assert!(
        macvlan.is_file(),
        "{} is missing: run scripts/install-deps.sh (containernetworking-plugins)",
        macvlan.display()
    );
    let cni_path = CniPath::new(&[&plugin]).expect("creating the CNI_PATH directory");
    Some(Setup { daemon, cni_path })
}

/// One node: a fake API server, a daemon reading it, the etcd prefix it commits under, and the
/// veth pair that parents the pods' macvlan links. Dropped in this order: the daemon stops before
/// the API server it watches goes away; every netns and link goes with its guard.
struct Node {
    daemon: IpamDaemon,
    kube: FakeKube,
    endpoints: Vec<String>,
    prefix: String,
    parent: VethPair,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts the API server, lets `populate` create the objects the daemon should find when it
    /// starts, then starts the daemon with `--kubeconfig`.
    fn start(setup: &Setup, tag: &str, populate: impl FnOnce(&FakeKube)) -> Node {
        let kube = FakeKube::start().expect("starting the fake Kubernetes API server");
        kube.create(kube::node(NODE)).expect("creating the Node");
        populate(&kube);
        let dir = temp_dir("k8s-e2e").expect("creating a temp dir");
        let endpoints = shared_single().endpoints();
        let prefix = unique_prefix(&format!("k8s-e2e-{tag}"));
        let kubeconfig = kube.kubeconfig_path().to_str().expect("UTF-8 temp path");
        let daemon = IpamDaemon::start(
            &setup.daemon,
            &endpoints,
            NODE,
            &prefix,
            &dir.path().join("ipamd.sock"),
            &["--kubeconfig", kubeconfig],
        )
        .expect("starting hostnic-ipamd");
        let parent = VethPair::new("ks").expect("creating the macvlan parent veth pair");
        Node {
            daemon,
            kube,
            endpoints,
            prefix,
            parent,
            _dir: dir,
        }
    }

    /// A macvlan network config on this node's parent: `plugin` with `master` and the daemon's
    /// socket filled in.
    fn config(&self, mut plugin: Value) -> String {
        plugin["master"] = json!(self.parent.master());
        plugin["ipam"]["socket"] = json!(self.daemon.socket);
        plugin.to_string()
    }

    /// Allocation (`/ips/`) and attachment (`/attachments/`) records under this node's prefix.
    fn allocations(&self) -> BTreeMap<String, Value> {
        etcd_records(&self.endpoints, &self.prefix)
            .into_iter()
            .filter(|(k, _)| {
                k.contains("/ips/") || k.starts_with(&format!("{}/attachments/", self.prefix))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Pods
// ---------------------------------------------------------------------------------------------

/// A running pod: its object in the API server, its network namespace, and the infra
/// container ID the kubelet would use.
struct Pod {
    netns: NetNs,
    namespace: String,
    name: String,
    uid: String,
    container: String,
}

impl Pod {
    /// Creates `object` in the API server (which gives it a UID) and a netns for it.
    fn create(kube: &FakeKube, object: Value) -> Pod {
        static N: AtomicU64 = AtomicU64::new(0);
        let stored = kube.create(object).expect("creating the pod");
        let field = |p: &str| {
            stored
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("stored pod without {p}: {stored}"))
                .to_owned()
        };
        Pod {
            netns: NetNs::new("ks").expect("creating a pod netns"),
            namespace: field("/metadata/namespace"),
            name: field("/metadata/name"),
            uid: field("/metadata/uid"),
            container: format!(
                "k8se2e{}c{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// What the kubelet passes in `CNI_ARGS`.
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container, self.uid
        )
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Runs the reference macvlan plugin (delegating to hostnic-ipam) for `pod`.
fn macvlan(setup: &Setup, command: &str, pod: &Pod, config: &str) -> CniOutput {
    let call = PodCall::of(pod);
    call.run(setup, command, config)
}

/// What the kubelet hands the plugins for one pod sandbox; outlives the pod's netns, as a DEL
/// that arrives after the sandbox is gone does.
struct PodCall {
    key: String,
    container: String,
    netns: PathBuf,
    args: String,
}

impl PodCall {
    fn of(pod: &Pod) -> PodCall {
        PodCall {
            key: pod.key(),
            container: pod.container.clone(),
            netns: pod.netns.path(),
            args: pod.cni_args(),
        }
    }

    fn run(&self, setup: &Setup, command: &str, config: &str) -> CniOutput {
        self.run_on(setup, command, IFNAME, config)
    }

    /// As [`PodCall::run`], for the pod's interface `ifname` (a secondary network's `net1`).
    fn run_on(&self, setup: &Setup, command: &str, ifname: &str, config: &str) -> CniOutput {
        let call = CniCall {
            command,
            container_id: &self.container,
            netns: &self.netns,
            ifname,
            cni_path: setup.cni_path.path(),
            args: &self.args,
        };
        run_cni(&setup.cni_path.plugin("macvlan"), &call, config)
            .unwrap_or_else(|e| panic!("macvlan {command} for {}: {e:#}", self.key))
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

/// ADDs `pod` and returns the result's first address with its prefix length and gateway.
fn add(setup: &Setup, pod: &Pod, config: &str) -> (Ipv4Addr, u8, Option<Ipv4Addr>) {
    let out = macvlan(setup, "ADD", pod, config);
    assert!(
        out.success(),
        "ADD of {} failed: {}",
        pod.key(),
        describe(&out)
    );
    let result: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ADD of {} printed no JSON ({e}): {}", pod.key(), out.stdout));
    let ip = &result["ips"][0];
    let cidr = ip["address"]
        .as_str()
        .unwrap_or_else(|| panic!("result without ips[0].address: {result}"));
    let (addr, len) = cidr.split_once('/').expect("address with a prefix length");
    let gateway = ip["gateway"]
        .as_str()
        .map(|g| g.parse().expect("gateway is an address"));
    (
        addr.parse().expect("result address"),
        len.parse().expect("result prefix length"),
        gateway,
    )
}

/// DELs `pod`, which must succeed and leave no interface behind.
fn del(setup: &Setup, pod: &Pod, config: &str) {
    let out = macvlan(setup, "DEL", pod, config);
    assert!(
        out.success(),
        "DEL of {} failed: {}",
        pod.key(),
        describe(&out)
    );
    assert!(
        !link_exists(Some(&pod.netns), IFNAME),
        "DEL of {} left {IFNAME} in its netns",
        pod.key()
    );
}

/// The CNI error of a failed call: its code and message.
fn cni_error(out: &CniOutput, what: &str) -> (u64, String) {
    assert!(
        !out.success(),
        "{what} should have failed: {}",
        describe(out)
    );
    let reply: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no CNI error JSON ({e}): {}", describe(out)));
    let code = reply["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: error without a code: {}", describe(out)));
    let text = format!(
        "{} {}",
        reply["msg"].as_str().unwrap_or_default(),
        reply["details"].as_str().unwrap_or_default()
    );
    (code, text)
}

/// The addresses on the pod's interface, as `ip addr` inside its netns shows them.
fn addresses_in(pod: &Pod) -> Vec<String> {
    addresses(&pod.netns, IFNAME)
        .unwrap_or_else(|e| panic!("reading {IFNAME} of {}: {e:#}", pod.key()))
}

fn assert_reach_each_other(pods: &[&Pod], addrs: &[Ipv4Addr]) {
    for (i, from) in pods.iter().enumerate() {
        for (j, &to) in addrs.iter().enumerate() {
            if i != j {
                assert!(
                    ping(&from.netns, IpAddr::V4(to)),
                    "{} cannot ping {to} ({})",
                    from.key(),
                    pods[j].key()
                );
            }
        }
    }
}

/// The allocation record of `ip` says `pod` holds it (its container, on this node, for its
/// UID) because of its `kube-ipam.ip` annotation.
fn assert_held_by(node: &Node, ip: Ipv4Addr, pod: &Pod) {
    let records = node.allocations();
    let (key, rec) = records
        .iter()
        .find(|(k, _)| k.contains("/ips/") && k.ends_with(&format!("/{ip}")))
        .unwrap_or_else(|| panic!("no allocation record of {ip}: {records:#?}"));
    assert_eq!(
        rec["handle"]["containerID"],
        json!(pod.container),
        "{key}: {rec}"
    );
    assert_eq!(rec["node"], json!(NODE), "{key}: {rec}");
    assert_eq!(
        rec["pod"],
        json!({"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}),
        "{key}: {rec}"
    );
    assert_eq!(rec["kind"], "fixed", "{key}: {rec}");
}

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

/// Every key and its JSON value under `prefix/`.
fn etcd_records(endpoints: &[String], prefix: &str) -> BTreeMap<String, Value> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args([
            "--dial-timeout=2s",
            "--command-timeout=3s",
            "get",
            "--prefix",
        ])
        .arg(format!("{prefix}/"))
        .args(["-w", "json"])
        .output()
        .expect("running etcdctl");
    assert!(
        out.status.success(),
        "etcdctl get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("etcdctl -w json output");
    reply["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key = base64_decode(kv["key"].as_str().expect("kv.key"));
            let value = base64_decode(kv["value"].as_str().unwrap_or(""));
            (
                String::from_utf8(key).expect("UTF-8 key"),
                serde_json::from_slice(&value).unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// etcdctl's JSON output base64-encodes keys and values.
fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => panic!("not base64: {s:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The shipped examples
// ---------------------------------------------------------------------------------------------

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// The documents of a manifest file under `examples/`.
fn manifests(name: &str) -> Vec<Value> {
    let path = example(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()))
        })
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

/// The one document of `kind` in the manifest file `name`.
fn manifest(name: &str, kind: &str) -> Value {
    let mut found: Vec<Value> = manifests(name)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "examples/{name} holds one {kind}");
    found.remove(0)
}

/// The pod the controller of `owner` makes from its template: `name`, the template's labels
/// and annotations, scheduled to [`NODE`], controlled by `owner`.
fn pod_from_template(owner: &Value, owner_kind: &str, name: &str) -> Value {
    let template = &owner["spec"]["template"]["metadata"];
    let namespace = owner["metadata"]["namespace"].as_str().unwrap_or("default");
    let owner_name = owner["metadata"]["name"]
        .as_str()
        .expect("owner with a name");
    let owner_uid = owner["metadata"]["uid"].as_str().expect("owner with a UID");
    let mut pod = kube::pod(namespace, name).node(NODE);
    pod = match owner_kind {
        "StatefulSet" => pod.owned_by_statefulset(owner_name, owner_uid),
        kind => pod.owned_by("apps/v1", kind, owner_name, owner_uid),
    };
    for (k, v) in template["labels"].as_object().into_iter().flatten() {
        pod = pod.label(k, v.as_str().expect("label value"));
    }
    for (k, v) in template["annotations"].as_object().into_iter().flatten() {
        pod = pod.annotation(k, v.as_str().expect("annotation value"));
    }
    pod.build()
}

/// The `kube-ipam.ip` of a template, split at the commas.
fn template_ips(owner: &Value) -> Vec<Ipv4Addr> {
    owner["spec"]["template"]["metadata"]["annotations"]["kube-ipam.ip"]
        .as_str()
        .expect("the template has kube-ipam.ip")
        .split(',')
        .map(|ip| ip.trim().parse().expect("kube-ipam.ip entry is an address"))
        .collect()
}

/// The network of the StatefulSet example: macvlan with hostnic-ipam on [`STS_SUBNET`], a
/// dynamic range that leaves the example's addresses out.
fn statefulset_network(node: &Node) -> String {
    node.config(json!({
        "cniVersion": "1.0.0",
        "name": "k8s-e2e-web",
        "type": "macvlan",
        "mode": "bridge",
        "ipam": {
            "type": "hostnic-ipam",
            "subnet": STS_SUBNET,
            "rangeStart": "10.211.0.100",
            "rangeEnd": "10.211.0.200",
        },
    }))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn statefulset_pods_get_their_ordinals_addresses_and_a_recreated_pod_gets_its_own_back() {
    let Some(setup) = setup("kubernetes e2e StatefulSet") else {
        return;
    };
    let sts = manifest("statefulset-fixed-ips.yaml", "StatefulSet");
    let replicas = sts["spec"]["replicas"].as_u64().expect("spec.replicas");
    let ips = template_ips(&sts);
    assert_eq!(
        (replicas, ips.len()),
        (3, 3),
        "the example is a 3-replica StatefulSet with an address per ordinal"
    );
    let name = sts["metadata"]["name"].as_str().expect("name").to_owned();
    let mut stored = Value::Null;
    let node = Node::start(&setup, "sts", |kube| {
        stored = kube.create(sts.clone()).expect("creating the StatefulSet");
    });
    let config = statefulset_network(&node);
    let mut pods: Vec<Pod> = (0..replicas)
        .map(|i| {
            let object = pod_from_template(&stored, "StatefulSet", &format!("{name}-{i}"));
            Pod::create(&node.kube, object)
        })
        .collect();

    for (pod, &want) in pods.iter().zip(&ips) {
        let (ip, len, gateway) = add(&setup, pod, &config);
        eprintln!("{} (UID {}): {ip}/{len}", pod.key(), pod.uid);
        assert_eq!(
            ip,
            want,
            "{} got another address than its ordinal's",
            pod.key()
        );
        assert_eq!(len, 24, "prefix length of {}", pod.key());
        assert_eq!(gateway, Some(Ipv4Addr::new(10, 211, 0, 1)));
        assert_eq!(
            addresses_in(pod),
            vec![format!("{want}/24")],
            "{}",
            pod.key()
        );
        assert_held_by(&node, want, pod);
    }
    assert_reach_each_other(&pods.iter().collect::<Vec<_>>(), &ips);

    // web-1 goes away as the kubelet and the StatefulSet controller make it: DEL, its netns
    // gone, the pod object deleted. Its address is free again.
    let old = pods.remove(1);
    del(&setup, &old, &config);
    let (old_uid, old_container) = (old.uid.clone(), old.container.clone());
    let (namespace, pod_name) = (old.namespace.clone(), old.name.clone());
    let template = pod_from_template(&stored, "StatefulSet", &pod_name);
    drop(old);
    node.kube
        .delete(Kind::Pod, &namespace, &pod_name)
        .expect("deleting web-1");
    let left = node.allocations();
    assert!(
        !left.keys().any(|k| k.ends_with(&format!("/{}", ips[1]))),
        "{} is still allocated after web-1's DEL: {left:#?}",
        ips[1]
    );

    // The controller re-creates it: same name, new UID, new sandbox and netns.
    let new = Pod::create(&node.kube, template);
    assert_ne!(new.uid, old_uid, "the re-created pod has a new UID");
    assert_ne!(new.container, old_container);
    let (ip, _, _) = add(&setup, &new, &config);
    eprintln!("re-created {} (UID {}): {ip}", new.key(), new.uid);
    assert_eq!(
        ip, ips[1],
        "the re-created web-1 did not get its address back"
    );
    assert_eq!(addresses_in(&new), vec![format!("{}/24", ips[1])]);
    assert_held_by(&node, ips[1], &new);
    pods.insert(1, new);
    assert_reach_each_other(&pods.iter().collect::<Vec<_>>(), &ips);

    for pod in &pods {
        del(&setup, pod, &config);
    }
    let left = node.allocations();
    assert!(left.is_empty(), "records left after every DEL: {left:#?}");
}

#[test]
fn kube_ipam_readme_config_gives_its_example_deployment_pod_the_annotated_address() {
    let Some(setup) = setup("kubernetes e2e kube-ipam README") else {
        return;
    };
    let readme: Value = serde_json::from_str(
        &fs::read_to_string(example("kube-ipam-readme.conf")).expect("reading the README config"),
    )
    .expect("the README config is JSON");
    assert_eq!(readme["ipam"]["type"], "hostnic-ipam");
    let deployment = manifest("kube-ipam-fixed-ip-deployment.yaml", "Deployment");
    let fixed = template_ips(&deployment);
    assert_eq!(fixed.len(), 1, "a Deployment's pod asks for one address");
    let fixed = fixed[0];

    let node = Node::start(&setup, "kube-ipam", |_| {});
    // What a node of this machine needs besides the README's config: its own parent link for
    // macvlan (the README's `eth1` is the reader's), and the test daemon's socket.
    let config = node.config(readme.clone());
    // The Deployment's ReplicaSet owns the pod; the fake has no ReplicaSets, so it is made up.
    let deploy_name = deployment["metadata"]["name"].as_str().expect("name");
    let replica_set = json!({
        "metadata": {
            "name": format!("{deploy_name}-6d4cf56db6"),
            "namespace": deployment["metadata"]["namespace"],
            "uid": "6d4cf56d-b600-4000-8000-00000000e2e0",
        },
        "spec": deployment["spec"],
    });
    let fixed_pod = Pod::create(
        &node.kube,
        pod_from_template(
            &replica_set,
            "ReplicaSet",
            &format!("{deploy_name}-6d4cf56db6-x7k2p"),
        ),
    );
    // A pod of the same network without annotations: a dynamic address from the range.
    let plain = Pod::create(
        &node.kube,
        kube::pod("default", "kube-ipam-dynamic").node(NODE).build(),
    );

    let (ip, len, gateway) = add(&setup, &fixed_pod, &config);
    eprintln!("{}: {ip}/{len} gateway {gateway:?}", fixed_pod.key());
    assert_eq!(ip, fixed, "the annotated address");
    assert_eq!(len, 16, "the README's subnet is a /16");
    assert_eq!(gateway, Some(Ipv4Addr::new(10, 188, 0, 1)));
    assert_eq!(addresses_in(&fixed_pod), vec![format!("{fixed}/16")]);
    // The README's route 0.0.0.0/0 through its gateway reaches the pod.
    let routes = fixed_pod
        .netns
        .exec(["ip", "-4", "route", "show", "default"])
        .expect("reading the pod's routes");
    assert!(
        routes.contains("via 10.188.0.1"),
        "no default route via the gateway in {}: {routes:?}",
        fixed_pod.key()
    );
    assert_held_by(&node, fixed, &fixed_pod);

    let (dynamic, _, _) = add(&setup, &plain, &config);
    eprintln!("{}: {dynamic}", plain.key());
    let octets = dynamic.octets();
    assert!(
        octets[..3] == [10, 188, 0] && (10..=200).contains(&octets[3]),
        "{dynamic} is outside the README's rangeStart-rangeEnd"
    );
    assert_reach_each_other(&[&fixed_pod, &plain], &[fixed, dynamic]);

    for pod in [&fixed_pod, &plain] {
        del(&setup, pod, &config);
    }
    let left = node.allocations();
    assert!(left.is_empty(), "records left after every DEL: {left:#?}");
}

#[test]
fn a_refused_annotation_fails_add_with_code_7_naming_it_and_leaves_nothing() {
    let Some(setup) = setup("kubernetes e2e bad annotations") else {
        return;
    };
    let sts = manifest("statefulset-fixed-ips.yaml", "StatefulSet");
    let mut stored = Value::Null;
    let node = Node::start(&setup, "bad", |kube| {
        stored = kube.create(sts.clone()).expect("creating the StatefulSet");
    });
    let config = statefulset_network(&node);
    let outside = Pod::create(
        &node.kube,
        kube::pod("default", "outside-the-subnet")
            .node(NODE)
            .annotation("kube-ipam.ip", "10.212.0.5")
            .build(),
    );
    // Ordinal 3 of a StatefulSet whose list has three addresses (0-2).
    let beyond = Pod::create(
        &node.kube,
        pod_from_template(&stored, "StatefulSet", "web-3"),
    );

    for (pod, value) in [(&outside, "10.212.0.5"), (&beyond, "10.211.0.21")] {
        let out = macvlan(&setup, "ADD", pod, &config);
        let (code, text) = cni_error(&out, &format!("ADD of {}", pod.key()));
        eprintln!("ADD of {}: code {code}: {text}", pod.key());
        assert_eq!(code, CODE_INVALID, "{}", describe(&out));
        assert!(
            text.contains("kube-ipam.ip") && text.contains(value),
            "the error names the annotation and its value: {text}"
        );
        assert!(text.contains(&pod.key()), "the error names the pod: {text}");
        let left = node.allocations();
        assert!(left.is_empty(), "a refused ADD wrote records: {left:#?}");
        // The reference macvlan (1.1.1) leaves the link it made before calling IPAM when IPAM
        // fails, with host-local as with hostnic-ipam: down and without an address. Nothing of
        // the refused allocation is on it; the runtime's DEL below removes it.
        if link_exists(Some(&pod.netns), IFNAME) {
            let link = pod
                .netns
                .exec(["ip", "-o", "link", "show", "dev", IFNAME])
                .expect("reading the leftover link");
            eprintln!("macvlan left after the failed ADD: {}", link.trim());
            assert!(
                !link.contains(",UP") && !link.contains("<UP"),
                "the failed ADD of {} left {IFNAME} up: {link}",
                pod.key()
            );
            assert_eq!(
                addresses_in(pod),
                Vec::<String>::new(),
                "the failed ADD of {} left an address on {IFNAME}",
                pod.key()
            );
        }
        // What the runtime does after a failed ADD: DEL, which succeeds and releases nothing.
        del(&setup, pod, &config);
    }
    let left = node.allocations();
    assert!(left.is_empty(), "records after the DELs: {left:#?}");
}

/// A StatefulSet pod re-created while its old sandbox was never DELeted (its node failed, the
/// pod was force-deleted) takes its address over, since the holder's UID is gone from the API;
/// the old sandbox's DEL, arriving late, does not free what the new one holds.
#[test]
fn a_recreated_statefulset_pod_takes_over_its_address_when_the_old_del_never_came() {
    let Some(setup) = setup("kubernetes e2e StatefulSet take-over") else {
        return;
    };
    let sts = manifest("statefulset-fixed-ips.yaml", "StatefulSet");
    let want = template_ips(&sts)[1];
    let mut stored = Value::Null;
    let node = Node::start(&setup, "takeover", |kube| {
        stored = kube.create(sts.clone()).expect("creating the StatefulSet");
    });
    let config = statefulset_network(&node);
    let old = Pod::create(
        &node.kube,
        pod_from_template(&stored, "StatefulSet", "web-1"),
    );
    let (ip, _, _) = add(&setup, &old, &config);
    assert_eq!(ip, want);

    // The old pod is gone behind the daemon's back (its node failed, the pod was force-deleted):
    // no DEL, its netns gone, the pod object deleted. The controller re-creates web-1.
    let late = PodCall::of(&old);
    drop(old);
    node.kube
        .delete(Kind::Pod, "default", "web-1")
        .expect("deleting web-1");
    let new = Pod::create(
        &node.kube,
        pod_from_template(&stored, "StatefulSet", "web-1"),
    );
    let (ip, _, _) = add(&setup, &new, &config);
    eprintln!("re-created {} without the old DEL: {ip}", new.key());
    assert_eq!(
        ip, want,
        "the re-created web-1 did not take its address over"
    );
    assert_eq!(addresses_in(&new), vec![format!("{want}/24")]);
    assert_held_by(&node, want, &new);

    // The old sandbox's DEL arrives at last: it releases nothing the new one holds.
    let out = late.run(&setup, "DEL", &config);
    assert!(out.success(), "the late DEL failed: {}", describe(&out));
    assert_held_by(&node, want, &new);
    assert_eq!(addresses_in(&new), vec![format!("{want}/24")]);

    del(&setup, &new, &config);
    let left = node.allocations();
    assert!(left.is_empty(), "records left after every DEL: {left:#?}");
}

// ---------------------------------------------------------------------------------------------
// Multus: a pod on two networks
// ---------------------------------------------------------------------------------------------

/// The interface Multus gives a pod's first secondary network.
const SECONDARY_IFNAME: &str = "net1";

/// The plugin config libcni runs for the NetworkAttachmentDefinition `nad`: the first plugin of
/// its conflist with the list's `name` and `cniVersion`, on this node's parent and socket.
fn attachment_definition_config(node: &Node, nad: &Value) -> String {
    let list: Value = serde_json::from_str(
        nad["spec"]["config"]
            .as_str()
            .expect("NetworkAttachmentDefinition with spec.config"),
    )
    .expect("spec.config is JSON");
    let mut plugin = list["plugins"][0].clone();
    plugin["name"] = list["name"].clone();
    plugin["cniVersion"] = list["cniVersion"].clone();
    node.config(plugin)
}

/// The one NetworkAttachmentDefinition named `name` in the manifest file `file`.
fn attachment_definition(file: &str, name: &str) -> Value {
    let mut found: Vec<Value> = manifests(file)
        .into_iter()
        .filter(|d| d["kind"] == "NetworkAttachmentDefinition" && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "examples/{file} defines network {name} once"
    );
    found.remove(0)
}

/// The example's pod as the API server has it once scheduled to [`NODE`]: its name, namespace
/// and annotations.
fn scheduled_pod(example: &Value) -> Value {
    let meta = &example["metadata"];
    let mut pod = kube::pod(
        meta["namespace"].as_str().unwrap_or("default"),
        meta["name"].as_str().expect("pod with a name"),
    )
    .node(NODE);
    for (k, v) in meta["annotations"].as_object().into_iter().flatten() {
        pod = pod.annotation(k, v.as_str().expect("annotation value"));
    }
    pod.build()
}

/// The pod's Multus network selection (`k8s.v1.cni.cncf.io/networks`, JSON form).
fn selected_networks(pod: &Value) -> Vec<Value> {
    let text = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
        .as_str()
        .expect("the pod selects secondary networks");
    serde_json::from_str(text).expect("the network selection is JSON")
}

/// ADDs `pod`'s interface `ifname` and returns the address of the result.
fn add_on(setup: &Setup, pod: &Pod, ifname: &str, config: &str) -> Ipv4Addr {
    let out = PodCall::of(pod).run_on(setup, "ADD", ifname, config);
    assert!(
        out.success(),
        "ADD of {} {ifname} failed: {}",
        pod.key(),
        describe(&out)
    );
    let result: Value = serde_json::from_str(&out.stdout).expect("ADD printed a CNI result");
    let cidr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("result without ips[0].address: {result}"));
    cidr.split_once('/')
        .and_then(|(ip, _)| ip.parse().ok())
        .unwrap_or_else(|| panic!("result address {cidr:?}"))
}

fn del_on(setup: &Setup, pod: &Pod, ifname: &str, config: &str) {
    let out = PodCall::of(pod).run_on(setup, "DEL", ifname, config);
    assert!(
        out.success(),
        "DEL of {} {ifname} failed: {}",
        pod.key(),
        describe(&out)
    );
}

/// The addresses of this node's attachment records: network → the addresses it holds.
fn held_per_network(node: &Node, container: &str) -> BTreeMap<String, Vec<String>> {
    let mut held = BTreeMap::new();
    for (key, record) in node.allocations() {
        if key.contains("/ips/") || !key.contains(&format!("/{container}/")) {
            continue;
        }
        let ips = record["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|ip| ip["ip"].as_str().unwrap_or_default().to_owned())
            .collect();
        held.insert(
            record["network"].as_str().unwrap_or_default().to_owned(),
            ips,
        );
    }
    held
}

#[test]
fn a_pod_on_two_multus_networks_holds_one_address_per_network_with_its_fixed_address_on_net1() {
    let Some(setup) = setup("kubernetes e2e Multus two networks") else {
        return;
    };
    let file = "multus-two-networks.yaml";
    let example_pod = manifest(file, "Pod");
    let selection = selected_networks(&example_pod);
    assert_eq!(
        selection.len(),
        1,
        "the example pod has one secondary network"
    );
    assert_eq!(selection[0]["interface"], SECONDARY_IFNAME);
    let default_network = example_pod["metadata"]["annotations"]
        ["v1.multus-cni.io/default-network"]
        .as_str()
        .expect("the example names its default network");
    let (_, blue_name) = default_network
        .split_once('/')
        .expect("namespace/name of the default network");
    let green_name = selection[0]["name"].as_str().expect("network name");
    let fixed: Ipv4Addr = example_pod["metadata"]["annotations"]["kube-ipam.ip"]
        .as_str()
        .expect("the example pod has kube-ipam.ip")
        .parse()
        .expect("kube-ipam.ip is an address");

    let node = Node::start(&setup, "multus", |_| {});
    let blue = attachment_definition_config(&node, &attachment_definition(file, blue_name));
    let green = attachment_definition_config(&node, &attachment_definition(file, green_name));
    let pod = Pod::create(&node.kube, scheduled_pod(&example_pod));

    // Multus attaches the default network first, then the secondary one, in one sandbox.
    let on_eth0 = add_on(&setup, &pod, IFNAME, &blue);
    let on_net1 = add_on(&setup, &pod, SECONDARY_IFNAME, &green);
    eprintln!(
        "{}: {IFNAME} {on_eth0}, {SECONDARY_IFNAME} {on_net1}",
        pod.key()
    );
    assert_eq!(
        on_net1, fixed,
        "net1 did not get the annotated address of its network"
    );
    let blue_range = Ipv4Addr::new(10, 217, 0, 100)..=Ipv4Addr::new(10, 217, 0, 200);
    assert!(
        blue_range.contains(&on_eth0),
        "eth0 got {on_eth0}, not a dynamic address of {blue_name}"
    );
    assert_eq!(addresses_in(&pod), vec![format!("{on_eth0}/24")]);
    assert_eq!(
        addresses(&pod.netns, SECONDARY_IFNAME).expect("reading net1"),
        vec![format!("{on_net1}/24")]
    );
    let held = held_per_network(&node, &pod.container);
    assert_eq!(
        held,
        BTreeMap::from([
            (blue_name.to_owned(), vec![on_eth0.to_string()]),
            (green_name.to_owned(), vec![on_net1.to_string()]),
        ]),
        "one attachment per network, one address each"
    );

    // A DEL of net1 frees green's address only.
    del_on(&setup, &pod, SECONDARY_IFNAME, &green);
    let held = held_per_network(&node, &pod.container);
    assert_eq!(
        held,
        BTreeMap::from([(blue_name.to_owned(), vec![on_eth0.to_string()])]),
        "after net1's DEL"
    );
    assert!(
        !node
            .allocations()
            .keys()
            .any(|k| k.ends_with(&format!("/ips/{on_net1}"))),
        "{on_net1} is still allocated after net1's DEL"
    );
    del_on(&setup, &pod, IFNAME, &blue);
    let left = node.allocations();
    assert!(left.is_empty(), "records left after both DELs: {left:#?}");
}

#[test]
fn a_multus_ips_request_reaches_hostnic_ipam_as_runtime_config_ips() {
    let Some(setup) = setup("kubernetes e2e Multus ips") else {
        return;
    };
    let file = "multus-macvlan-static-ip.yaml";
    let example_pod = manifest(file, "Pod");
    let selection = selected_networks(&example_pod);
    assert_eq!(
        selection.len(),
        1,
        "the example pod has one secondary network"
    );
    let name = selection[0]["name"].as_str().expect("network name");
    let asked = selection[0]["ips"][0]
        .as_str()
        .expect("the selection asks for an address");
    let (want, _) = asked.split_once('/').expect("Multus ips are CIDRs");
    let want: Ipv4Addr = want.parse().expect("an IPv4 address");

    let node = Node::start(&setup, "multus-ips", |_| {});
    let nad = attachment_definition(file, name);
    let list: Value =
        serde_json::from_str(nad["spec"]["config"].as_str().expect("spec.config")).expect("JSON");
    assert_eq!(
        list["plugins"][0]["capabilities"]["ips"],
        json!(true),
        "the network declares the ips capability"
    );
    // libcni passes a capability's runtime value only to a plugin that declares it.
    let mut config: Value =
        serde_json::from_str(&attachment_definition_config(&node, &nad)).expect("config");
    config["runtimeConfig"] = json!({ "ips": [asked] });
    let config = config.to_string();
    let pod = Pod::create(&node.kube, scheduled_pod(&example_pod));

    let ip = add_on(&setup, &pod, SECONDARY_IFNAME, &config);
    assert_eq!(
        ip, want,
        "net1 did not get the address the selection asks for"
    );
    assert_eq!(
        addresses(&pod.netns, SECONDARY_IFNAME).expect("reading net1"),
        vec![asked.to_owned()]
    );
    let held = held_per_network(&node, &pod.container);
    assert_eq!(
        held,
        BTreeMap::from([(name.to_owned(), vec![want.to_string()])])
    );
    del_on(&setup, &pod, SECONDARY_IFNAME, &config);
    let left = node.allocations();
    assert!(left.is_empty(), "records left after the DEL: {left:#?}");
}

// ---------------------------------------------------------------------------------------------
// StatefulSets without annotations: sticky addresses
// ---------------------------------------------------------------------------------------------

/// A StatefulSet pod without an annotation keeps a sticky dynamic address: deleted and
/// re-created as the kubelet and the controller do it (DEL, netns gone, pod object deleted, a
/// new pod with a new UID and a new sandbox), it gets the same address back; in between, the
/// address stays held by the pod's identity, not free.
#[test]
fn an_unannotated_statefulset_pod_gets_its_sticky_dynamic_address_back_when_re_created() {
    let Some(setup) = setup("kubernetes e2e sticky StatefulSet address") else {
        return;
    };
    let sts = kube::stateful_set("default", "db", "uid-db", 2, &[]);
    let mut stored = Value::Null;
    let node = Node::start(&setup, "sticky", |kube| {
        stored = kube.create(sts.clone()).expect("creating the StatefulSet");
    });
    let config = node.config(json!({
        "cniVersion": "1.0.0",
        "name": "k8s-e2e-db",
        "type": "macvlan",
        "mode": "bridge",
        "ipam": {
            "type": "hostnic-ipam",
            "subnet": "10.213.0.0/24",
            "rangeStart": "10.213.0.100",
            "rangeEnd": "10.213.0.200",
        },
    }));
    let mut pods: Vec<Pod> = (0..2)
        .map(|i| {
            let object = pod_from_template(&stored, "StatefulSet", &format!("db-{i}"));
            Pod::create(&node.kube, object)
        })
        .collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|pod| add(&setup, pod, &config).0).collect();
    eprintln!("db-0, db-1: {ips:?}");
    assert_ne!(ips[0], ips[1]);
    assert_reach_each_other(&pods.iter().collect::<Vec<_>>(), &ips);

    let old = pods.remove(1);
    del(&setup, &old, &config);
    let old_uid = old.uid.clone();
    drop(old);
    node.kube
        .delete(Kind::Pod, "default", "db-1")
        .expect("deleting db-1");
    let records = node.allocations();
    let (key, rec) = records
        .iter()
        .find(|(k, _)| k.contains("/ips/") && k.ends_with(&format!("/{}", ips[1])))
        .unwrap_or_else(|| panic!("{} was freed by db-1's DEL: {records:#?}", ips[1]));
    assert_eq!(
        rec["handle"]["containerID"], "sticky_default_db_1",
        "{key}: {rec}"
    );

    let new = Pod::create(
        &node.kube,
        pod_from_template(&stored, "StatefulSet", "db-1"),
    );
    assert_ne!(new.uid, old_uid);
    let (ip, _, _) = add(&setup, &new, &config);
    assert_eq!(
        ip, ips[1],
        "the re-created db-1 did not get its address back"
    );
    assert_eq!(addresses_in(&new), vec![format!("{ip}/24")]);
    let records = node.allocations();
    let rec = records
        .iter()
        .find(|(k, _)| k.contains("/ips/") && k.ends_with(&format!("/{ip}")))
        .map(|(_, v)| v)
        .expect("allocation record");
    assert_eq!(rec["handle"]["containerID"], json!(new.container), "{rec}");
    assert_eq!(rec["pod"]["uid"], json!(new.uid), "{rec}");
    assert_eq!(rec["kind"], "sticky", "{rec}");
    pods.insert(1, new);
    assert_reach_each_other(&pods.iter().collect::<Vec<_>>(), &ips);

    // DEL keeps each identity's address for it; only the sticky GC frees them.
    for pod in &pods {
        del(&setup, pod, &config);
    }
    let left: Vec<String> = node
        .allocations()
        .values()
        .filter_map(|v| v["handle"]["containerID"].as_str().map(str::to_owned))
        .collect();
    assert!(
        left.iter().all(|id| id.starts_with("sticky_default_db_")),
        "{left:?}"
    );
}
