//! End to end: the real `hostnic-ipam` plugin, delegated to by the reference `macvlan`,
//! `bridge` and `ipvlan` plugins inside real network namespaces, calling real `hostnic-ipamd`
//! processes that commit allocations to a real etcd.
//!
//! Needs root and `ip netns` (the tests skip with `SKIPPED ...` otherwise), `etcd`, `etcdctl`,
//! `ping` and the reference plugins in `/usr/lib/cni` (`scripts/install-deps.sh`), and the
//! workspace binaries in `target/debug` built from the current sources (`cargo test
//! --workspace` builds them; `cargo test -p hostnic-e2e` does not, and the tests then fail
//! naming the stale or missing binary).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hostnic_cni::plugin::CONNECT_TIMEOUT;
use hostnic_ipamd::pool::pool_id;
use hostnic_ipamd::records::Keys;
use hostnic_testkit::bins::workspace_binary;
use hostnic_testkit::daemon::{IpamDaemon, STOP_GRACE};
use hostnic_testkit::netns::{
    addresses, link_exists, ping, require_netns, run_cni, temp_dir, CniCall, CniOutput, CniPath,
    LinkGuard, NetNs, SysctlGuard, VethPair, REFERENCE_PLUGINS_DIR,
};
use hostnic_testkit::{shared_single, unique_prefix, EtcdCluster};
use serde_json::{json, Value};

/// The CNI versions this project serves that the tests try with each reference plugin.
const CNI_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// CNI error code for "try again later": the daemon or etcd is unreachable.
const CODE_TRY_AGAIN_LATER: u64 = 11;
const IFNAME: &str = "eth0";
/// What a loaded 2-core machine may add to one CNI call chain (the main plugin and hostnic-ipam
/// started, scheduled and exited) beyond the waits the code promises. Such a chain takes 3-10 ms
/// here when idle; 2 s is far above that, so a bound of "promised wait + SLACK" fails only when
/// the code waits on something it does not promise to wait on.
const SLACK: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Setup: binaries, tools, CNI_PATH
// ---------------------------------------------------------------------------------------------

/// What every test needs: the binaries under test and a `CNI_PATH` holding the reference
/// plugins plus our `hostnic-ipam`.
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
        assert!(
            on_path(tool),
            "`{tool}` is not on PATH: run scripts/install-deps.sh"
        );
    }
    for plugin in ["macvlan", "bridge", "ipvlan"] {
        let p = Path::new(REFERENCE_PLUGINS_DIR).join(plugin);
        assert!(
            p.is_file(),
            "{} is missing: run scripts/install-deps.sh (containernetworking-plugins)",
            p.display()
        );
    }
    let cni_path = CniPath::new(&[&plugin]).expect("creating the CNI_PATH directory");
    Some(Setup { daemon, cni_path })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|dir| dir.join(tool).is_file())
}

/// The `supportedVersions` a plugin reports for `CNI_COMMAND=VERSION`.
fn supported_versions(plugin: &Path) -> Vec<String> {
    let out = Command::new(plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} VERSION: {e}", plugin.display()));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{} VERSION printed no JSON ({e}): {}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    reply["supportedVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// The daemon under test (`target/debug/hostnic-ipamd`) for `node` on `socket`.
fn start_daemon(
    setup: &Setup,
    endpoints: &[String],
    node: &str,
    prefix: &str,
    socket: &Path,
) -> anyhow::Result<IpamDaemon> {
    IpamDaemon::start(&setup.daemon, endpoints, node, prefix, socket, &[])
}

// ---------------------------------------------------------------------------------------------
// Pods and CNI calls
// ---------------------------------------------------------------------------------------------

/// A "pod": a network namespace and the container ID the runtime would use for it.
struct Pod {
    ns: Arc<NetNs>,
    id: String,
    name: String,
}

impl Pod {
    /// A pod in a namespace of its own.
    fn new(tag: &str) -> Pod {
        let ns = Arc::new(NetNs::new(tag).expect("creating a pod netns"));
        Pod::in_ns(tag, &ns)
    }

    /// A pod in a shared namespace: enough for calls to the IPAM plugin alone.
    fn in_ns(tag: &str, ns: &Arc<NetNs>) -> Pod {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Pod {
            ns: Arc::clone(ns),
            id: format!("{tag}{}c{n}", std::process::id()),
            name: format!("{tag}-{n}"),
        }
    }

    /// What the kubelet passes: the pod's identity, with `IgnoreUnknown` for plugins that
    /// do not know the keys.
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.name, self.id
        )
    }
}

/// Runs the plugin called `plugin` in the test's `CNI_PATH` (a reference main plugin, or
/// `hostnic-ipam` itself) for `pod`.
fn cni(setup: &Setup, plugin: &str, command: &str, pod: &Pod, config: &str) -> CniOutput {
    cni_with_args(setup, plugin, command, pod, config, "")
}

/// `cni` with more `CNI_ARGS` (`IP=...`) after the pod's own.
fn cni_with_args(
    setup: &Setup,
    plugin: &str,
    command: &str,
    pod: &Pod,
    config: &str,
    extra_args: &str,
) -> CniOutput {
    let mut args = pod.cni_args();
    if !extra_args.is_empty() {
        args = format!("{args};{extra_args}");
    }
    let netns = pod.ns.path();
    let call = CniCall {
        command,
        container_id: &pod.id,
        netns: &netns,
        ifname: IFNAME,
        cni_path: setup.cni_path.path(),
        args: &args,
    };
    run_cni(&setup.cni_path.plugin(plugin), &call, config)
        .unwrap_or_else(|e| panic!("{plugin} {command} for {}: {e:#}", pod.id))
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

/// The result JSON of a successful call; panics with everything the plugin said otherwise.
fn ok_json(out: &CniOutput, what: &str) -> Value {
    assert!(out.success(), "{what} failed: {}", describe(out));
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON result ({e}): {}", describe(out)))
}

/// Asserts a call succeeded (DEL prints nothing).
fn assert_ok(out: &CniOutput, what: &str) {
    assert!(out.success(), "{what} failed: {}", describe(out));
}

/// The CNI error code of a failed call.
fn error_code(out: &CniOutput, what: &str) -> u64 {
    assert!(
        !out.success(),
        "{what} should have failed: {}",
        describe(out)
    );
    let reply: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no CNI error JSON ({e}): {}", describe(out)));
    reply["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: error without a code: {}", describe(out)))
}

/// The (first) IPv4 address of a result, with its prefix length.
fn result_ipv4(result: &Value) -> (Ipv4Addr, u8, Option<Ipv4Addr>) {
    let ip = &result["ips"][0];
    let cidr = ip["address"]
        .as_str()
        .unwrap_or_else(|| panic!("result without ips[0].address: {result}"));
    let (addr, len) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("ips[0].address {cidr:?} has no prefix length"));
    let gateway = ip["gateway"].as_str().map(|g| {
        g.parse()
            .unwrap_or_else(|e| panic!("ips[0].gateway {g:?}: {e}"))
    });
    (
        addr.parse()
            .unwrap_or_else(|e| panic!("ips[0].address {cidr:?}: {e}")),
        len.parse()
            .unwrap_or_else(|e| panic!("ips[0].address {cidr:?}: {e}")),
        gateway,
    )
}

fn in_subnet(ip: Ipv4Addr, subnet: &str) -> bool {
    let (net, len) = subnet.split_once('/').expect("subnet with prefix");
    let net: Ipv4Addr = net.parse().expect("subnet address");
    let len: u32 = len.parse().expect("subnet prefix");
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// A network configuration for one main plugin delegating to hostnic-ipam.
fn net_conf(version: &str, name: &str, mut plugin: Value, ipam: Value) -> String {
    plugin["cniVersion"] = json!(version);
    plugin["name"] = json!(name);
    plugin["ipam"] = ipam;
    plugin.to_string()
}

fn ipam_conf(socket: &Path, subnet: &str) -> Value {
    json!({"type": "hostnic-ipam", "socket": socket, "subnet": subnet})
}

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

fn etcdctl(endpoints: &[String], args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=3s")
        .args(args)
        .output()
        .expect("running etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every key and its JSON value under `prefix/` (a trailing slash, so `/t/x-1-1` does not
/// match `/t/x-1-10`).
fn etcd_records(endpoints: &[String], prefix: &str) -> BTreeMap<String, Value> {
    let text = etcdctl(
        endpoints,
        &["get", "--prefix", &format!("{prefix}/"), "-w", "json"],
    );
    let reply: Value = serde_json::from_str(&text).expect("etcdctl -w json output");
    reply["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key = base64_decode(kv["key"].as_str().expect("kv.key"));
            let value = base64_decode(kv["value"].as_str().unwrap_or(""));
            let key = String::from_utf8(key).expect("utf-8 key");
            let value = serde_json::from_slice(&value).unwrap_or(Value::Null);
            (key, value)
        })
        .collect()
}

/// etcdctl's JSON output base64-encodes keys and values.
fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
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

fn ip_key(prefix: &str, subnet: &str, ip: Ipv4Addr) -> String {
    let subnet = subnet.parse().expect("literal subnet");
    Keys::new(prefix).address(&pool_id(&subnet), ip.into())
}

/// The key of `pod`'s attachment record (`attachments/<network>/<containerID>/<ifname>`), if
/// there is one.
fn attachment_key(records: &BTreeMap<String, Value>, prefix: &str, pod: &Pod) -> Option<String> {
    let suffix = format!("/{}/{IFNAME}", pod.id);
    records
        .keys()
        .find(|k| k.starts_with(&format!("{prefix}/attachments/")) && k.ends_with(&suffix))
        .cloned()
}

/// The allocation and attachment records of `pod` say it holds `ip`, allocated by `node`.
fn assert_recorded(
    records: &BTreeMap<String, Value>,
    prefix: &str,
    subnet: &str,
    ip: Ipv4Addr,
    pod: &Pod,
    node: &str,
) {
    let key = ip_key(prefix, subnet, ip);
    let rec = records
        .get(&key)
        .unwrap_or_else(|| panic!("no allocation record {key}; records: {records:#?}"));
    assert_eq!(rec["handle"]["containerID"], json!(pod.id), "{key}: {rec}");
    assert_eq!(rec["handle"]["ifname"], json!(IFNAME), "{key}: {rec}");
    assert_eq!(rec["node"], json!(node), "{key}: {rec}");
    let key = attachment_key(records, prefix, pod)
        .unwrap_or_else(|| panic!("no attachment record of {}; records: {records:#?}", pod.id));
    let rec = &records[&key];
    let ips: Vec<&Value> = rec["ips"].as_array().into_iter().flatten().collect();
    assert!(
        ips.iter().any(|h| h["ip"] == json!(ip.to_string())),
        "{key} does not list {ip}: {rec}"
    );
}

/// No allocation or attachment record of `pod` remains.
fn assert_released(records: &BTreeMap<String, Value>, prefix: &str, pod: &Pod) {
    if let Some(key) = attachment_key(records, prefix, pod) {
        panic!("{key} still exists: {}", records[&key]);
    }
    for (key, rec) in records {
        assert!(
            !(key.contains("/ips/") && rec["handle"]["containerID"] == json!(pod.id)),
            "{key} still allocated to {}: {rec}",
            pod.id
        );
    }
}

/// Allocation (`/ips/`) and attachment (`/attachments/`) keys: what must be gone once every pod
/// is deleted (pool, block and release-marker records may stay).
fn allocation_keys(records: &BTreeMap<String, Value>, prefix: &str) -> Vec<String> {
    records
        .keys()
        .filter(|k| k.contains("/ips/") || k.starts_with(&format!("{prefix}/attachments/")))
        .cloned()
        .collect()
}

fn scratch_dir() -> tempfile::TempDir {
    temp_dir("e2e").expect("creating a temp dir")
}

// ---------------------------------------------------------------------------------------------
// Main plugins delegating to hostnic-ipam
// ---------------------------------------------------------------------------------------------

/// One network as the tests drive it: a main plugin delegating to hostnic-ipam, served by one
/// daemon, recorded under one etcd prefix.
struct Network<'a> {
    setup: &'a Setup,
    /// The main plugin: `macvlan`, `bridge`, `ipvlan`.
    main: &'a str,
    version: &'a str,
    config: String,
    endpoints: &'a [String],
    prefix: &'a str,
    subnet: &'a str,
    /// The node name of the daemon that allocates.
    node: &'a str,
}

impl Network<'_> {
    fn call(&self, command: &str, pod: &Pod) -> CniOutput {
        cni(self.setup, self.main, command, pod, &self.config)
    }

    /// ADDs `pods`, checks each address (in the pod, in the result, in etcd), that they are
    /// distinct and that every pod reaches every other; returns the addresses.
    fn add_and_check(&self, pods: &[Pod]) -> Vec<Ipv4Addr> {
        let (main, version, subnet) = (self.main, self.version, self.subnet);
        let mut addrs = Vec::new();
        for pod in pods {
            let what = format!("{main} ADD (cniVersion {version}) for {}", pod.id);
            let out = self.call("ADD", pod);
            let result = ok_json(&out, &what);
            eprintln!("{what}: {:?}", out.elapsed);
            assert_eq!(result["cniVersion"], json!(version), "{what}: {result}");
            let (ip, len, gateway) = result_ipv4(&result);
            assert!(in_subnet(ip, subnet), "{what}: {ip} is not in {subnet}");
            assert_eq!(len, 24, "{what}: prefix length of {ip}");
            assert_ne!(Some(ip), gateway, "{what}: the pod got the gateway address");
            let in_pod = addresses(&pod.ns, IFNAME).expect("reading the pod's addresses");
            assert_eq!(
                in_pod,
                vec![format!("{ip}/{len}")],
                "{what}: addresses in the pod"
            );
            addrs.push(ip);
        }
        let distinct: BTreeSet<_> = addrs.iter().collect();
        assert_eq!(
            distinct.len(),
            addrs.len(),
            "duplicate addresses: {addrs:?}"
        );
        let records = etcd_records(self.endpoints, self.prefix);
        for (pod, &ip) in pods.iter().zip(&addrs) {
            assert_recorded(&records, self.prefix, subnet, ip, pod, self.node);
        }
        for (i, from) in pods.iter().enumerate() {
            for (j, &to) in addrs.iter().enumerate() {
                if i != j {
                    assert!(
                        ping(&from.ns, IpAddr::V4(to)),
                        "{main} {version}: pod {} cannot ping {to}",
                        from.id
                    );
                }
            }
        }
        addrs
    }

    /// DELs every pod twice (the second must succeed too) and checks that the interface and
    /// every record are gone.
    fn delete_and_check(&self, pods: &[Pod]) {
        let main = self.main;
        for pod in pods {
            let out = self.call("DEL", pod);
            assert_ok(&out, &format!("{main} DEL for {}", pod.id));
            eprintln!("{main} DEL for {}: {:?}", pod.id, out.elapsed);
            assert!(
                !link_exists(Some(&pod.ns), IFNAME),
                "{main} DEL left {IFNAME} in {}",
                pod.ns.name()
            );
        }
        let records = etcd_records(self.endpoints, self.prefix);
        for pod in pods {
            assert_released(&records, self.prefix, pod);
        }
        assert_eq!(allocation_keys(&records, self.prefix), Vec::<String>::new());
        for pod in pods {
            let out = self.call("DEL", pod);
            assert_ok(&out, &format!("second {main} DEL for {}", pod.id));
        }
    }
}

/// Tests that bound a time (code 11 within a promised wait + [`SLACK`]) and the test that starts 60 plugin
/// processes at once hold this, so that process start-up of one is not charged to the other
/// on a 2-core machine.
fn run_alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn macvlan_pods_get_distinct_recorded_addresses_and_reach_each_other() {
    let Some(setup) = setup("e2e macvlan") else {
        return;
    };
    let started = Instant::now();
    let supported = supported_versions(&Path::new(REFERENCE_PLUGINS_DIR).join("macvlan"));
    let (versions, dropped): (Vec<&str>, Vec<&str>) = CNI_VERSIONS
        .into_iter()
        .partition(|v| supported.iter().any(|s| s == v));
    for version in dropped {
        hostnic_testkit::report_skipped_part(
            &format!("macvlan with cniVersion {version}"),
            &format!("the installed macvlan does not speak it (it supports {supported:?})"),
        );
    }
    assert!(
        !versions.is_empty(),
        "macvlan supports none of {CNI_VERSIONS:?}: {supported:?}"
    );
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-macvlan");
    let daemon = start_daemon(
        &setup,
        &endpoints,
        "node-a",
        &prefix,
        &dir.path().join("ipamd.sock"),
    )
    .expect("starting hostnic-ipamd");
    let parent = VethPair::new("mv").expect("creating the macvlan parent veth pair");
    for (i, &version) in versions.iter().enumerate() {
        let subnet = format!("10.201.{i}.0/24");
        let mut ipam = ipam_conf(&daemon.socket, &subnet);
        ipam["routes"] = json!([{"dst": "10.250.0.0/16"}]);
        let net = Network {
            setup: &setup,
            main: "macvlan",
            version,
            config: net_conf(
                version,
                &format!("e2e-macvlan-{i}"),
                json!({"type": "macvlan", "master": parent.master(), "mode": "bridge"}),
                ipam,
            ),
            endpoints: &endpoints,
            prefix: &prefix,
            subnet: &subnet,
            node: &daemon.node,
        };
        let pods: Vec<Pod> = (0..3).map(|_| Pod::new("mv")).collect();
        let addrs = net.add_and_check(&pods);
        // The route from ipam.routes reaches the pod (macvlan installs the result's routes).
        let routes = pods[0]
            .ns
            .exec(["ip", "-4", "route", "show", "10.250.0.0/16"])
            .expect("reading the pod's routes");
        assert!(
            routes.contains("10.250.0.0/16"),
            "macvlan {version}: the route from ipam.routes is missing in the pod: {routes:?}"
        );
        net.delete_and_check(&pods);
        eprintln!("macvlan cniVersion {version}: pods {addrs:?} OK");
    }
    eprintln!("macvlan e2e over {versions:?}: {:?}", started.elapsed());
}

#[test]
fn bridge_pods_get_addresses_and_reach_each_other() {
    let Some(setup) = setup("e2e bridge") else {
        return;
    };
    let started = Instant::now();
    // The bridge plugin turns forwarding on when it is a gateway: restore it whatever happens.
    let forwarding = SysctlGuard::save("net/ipv4/ip_forward").expect("reading ip_forward");
    // The bridge plugin never deletes its bridge: the guard does.
    let bridge = LinkGuard::reserve("br").expect("naming the bridge");
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-bridge");
    let daemon = start_daemon(
        &setup,
        &endpoints,
        "node-b",
        &prefix,
        &dir.path().join("ipamd.sock"),
    )
    .expect("starting hostnic-ipamd");
    let supported = supported_versions(&Path::new(REFERENCE_PLUGINS_DIR).join("bridge"));
    let version = CNI_VERSIONS
        .into_iter()
        .rev()
        .find(|v| supported.iter().any(|s| s == v))
        .expect("bridge supports one of our CNI versions");
    if version != CNI_VERSIONS[CNI_VERSIONS.len() - 1] {
        hostnic_testkit::report_skipped_part(
            &format!("bridge with cniVersion {}", CNI_VERSIONS[CNI_VERSIONS.len() - 1]),
            &format!("the installed bridge does not speak it (it supports {supported:?}); {version} is tried instead"),
        );
    }
    let subnet = "10.202.0.0/24";
    let net = Network {
        setup: &setup,
        main: "bridge",
        version,
        config: net_conf(
            version,
            "e2e-bridge",
            json!({"type": "bridge", "bridge": bridge.name(), "isGateway": false, "ipMasq": false}),
            ipam_conf(&daemon.socket, subnet),
        ),
        endpoints: &endpoints,
        prefix: &prefix,
        subnet,
        node: &daemon.node,
    };
    let pods: Vec<Pod> = (0..2).map(|_| Pod::new("br")).collect();
    net.add_and_check(&pods);
    assert!(
        link_exists(None, bridge.name()),
        "bridge {} was not created",
        bridge.name()
    );
    net.delete_and_check(&pods);
    let now = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    assert_eq!(
        now.trim(),
        forwarding.saved(),
        "bridge with isGateway=false changed net.ipv4.ip_forward"
    );
    eprintln!("bridge e2e (cniVersion {version}): {:?}", started.elapsed());
}

#[test]
fn ipvlan_pods_get_addresses_or_skip_without_kernel_support() {
    let Some(setup) = setup("e2e ipvlan") else {
        return;
    };
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-ipvlan");
    let daemon = start_daemon(
        &setup,
        &endpoints,
        "node-c",
        &prefix,
        &dir.path().join("ipamd.sock"),
    )
    .expect("starting hostnic-ipamd");
    let parent = VethPair::new("iv").expect("creating the ipvlan parent veth pair");
    let subnet = "10.203.0.0/24";
    let net = Network {
        setup: &setup,
        main: "ipvlan",
        version: "1.0.0",
        config: net_conf(
            "1.0.0",
            "e2e-ipvlan",
            json!({"type": "ipvlan", "master": parent.master(), "mode": "l2"}),
            ipam_conf(&daemon.socket, subnet),
        ),
        endpoints: &endpoints,
        prefix: &prefix,
        subnet,
        node: &daemon.node,
    };
    let pods: Vec<Pod> = (0..2).map(|_| Pod::new("iv")).collect();
    let probe = net.call("ADD", &pods[0]);
    if !probe.success() && probe.stdout.contains("operation not supported") {
        // ipvlan creates its link before it calls IPAM: nothing may have been allocated.
        let records = etcd_records(&endpoints, &prefix);
        assert_eq!(allocation_keys(&records, &prefix), Vec::<String>::new());
        assert_ok(&net.call("DEL", &pods[0]), "ipvlan DEL after a failed ADD");
        hostnic_testkit::report_skip(
            "ipvlan",
            &format!(
                "kernel has no ipvlan ({})",
                probe
                    .stdout
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        return;
    }
    ok_json(&probe, "ipvlan ADD");
    // The kernel has ipvlan: run the whole check from a clean state.
    assert_ok(&net.call("DEL", &pods[0]), "ipvlan DEL");
    net.add_and_check(&pods);
    net.delete_and_check(&pods);
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// A macvlan network config on `parent`, delegating to the daemon at `socket`.
fn macvlan_conf(name: &str, parent: &VethPair, socket: &Path, subnet: &str) -> String {
    net_conf(
        "1.0.0",
        name,
        json!({"type": "macvlan", "master": parent.master(), "mode": "bridge"}),
        ipam_conf(socket, subnet),
    )
}

/// What a runtime does after a failed macvlan ADD: DEL (which must succeed and remove the link
/// macvlan left behind), then ADD again. Returns the address of the second ADD.
fn retry_after_failed_add(setup: &Setup, config: &str, pod: &Pod) -> Ipv4Addr {
    assert_ok(
        &cni(setup, "macvlan", "DEL", pod, config),
        &format!("DEL after the failed ADD of {}", pod.id),
    );
    assert!(
        !link_exists(Some(&pod.ns), IFNAME),
        "DEL after a failed ADD left {IFNAME} in {}",
        pod.ns.name()
    );
    let out = cni(setup, "macvlan", "ADD", pod, config);
    let (ip, _, _) = result_ipv4(&ok_json(&out, &format!("retried ADD of {}", pod.id)));
    ip
}

#[test]
fn add_without_daemon_waits_for_it_then_says_try_again_later() {
    let Some(setup) = setup("e2e no daemon") else {
        return;
    };
    let _alone = run_alone();
    let dir = scratch_dir();
    let socket = dir.path().join("absent.sock");
    let parent = VethPair::new("nd").expect("creating a veth pair");
    let mut config: Value = serde_json::from_str(&macvlan_conf(
        "e2e-no-daemon",
        &parent,
        &socket,
        "10.205.0.0/24",
    ))
    .expect("config is JSON");
    // A restarting daemon is waited for (ipam.daemonWaitSeconds), then the runtime is told to
    // try again later.
    const WAIT: Duration = Duration::from_secs(1);
    config["ipam"]["daemonWaitSeconds"] = json!(WAIT.as_secs());
    let config = config.to_string();
    let pod = Pod::new("nd");
    let bound = WAIT + CONNECT_TIMEOUT + SLACK;

    for main in ["hostnic-ipam", "macvlan"] {
        // Through macvlan too: the code reaches the runtime.
        let out = cni(&setup, main, "ADD", &pod, &config);
        assert_eq!(
            error_code(&out, &format!("{main} ADD without a daemon")),
            CODE_TRY_AGAIN_LATER,
            "{}",
            describe(&out)
        );
        assert!(
            out.elapsed >= WAIT && out.elapsed < bound,
            "{main} took {:?} to give up on the daemon (wait {WAIT:?}, bound {bound:?})",
            out.elapsed
        );
        eprintln!("{main} ADD without daemon: code 11 in {:?}", out.elapsed);
    }
    // macvlan 1.1.1 leaves its (down) link in the pod when IPAM fails, with host-local too:
    // the runtime's DEL after a failed ADD removes it. Not ours to check here.
}

#[test]
fn add_while_etcd_is_down_is_retryable_and_writes_nothing() {
    let Some(setup) = setup("e2e etcd down") else {
        return;
    };
    let _alone = run_alone();
    let etcd = EtcdCluster::start(1).expect("starting a dedicated etcd");
    let endpoints = etcd.endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-etcd-down");
    let daemon = start_daemon(
        &setup,
        &endpoints,
        "node-d",
        &prefix,
        &dir.path().join("ipamd.sock"),
    )
    .expect("starting hostnic-ipamd");
    let parent = VethPair::new("ed").expect("creating a veth pair");
    let subnet = "10.206.0.0/24";
    let config = macvlan_conf("e2e-etcd-down", &parent, &daemon.socket, subnet);
    let before = Pod::new("ed");
    let during = Pod::new("ed");
    let after = Pod::new("ed");

    let out = cni(&setup, "macvlan", "ADD", &before, &config);
    let (ip_before, _, _) = result_ipv4(&ok_json(&out, "ADD while etcd is up"));

    etcd.stop_member(0);
    let out = cni(&setup, "macvlan", "ADD", &during, &config);
    assert_eq!(
        error_code(&out, "ADD while etcd is down"),
        CODE_TRY_AGAIN_LATER,
        "{}",
        describe(&out)
    );
    // The daemon (started without --etcd-retry-ms) promises an answer within its etcd retry
    // budget, no attempt outliving it; the plugin promises to connect within CONNECT_TIMEOUT.
    let budget = hostnic_ipamd::StoreConfig::new(Vec::new()).retry_timeout;
    let bound = CONNECT_TIMEOUT + budget + SLACK;
    assert!(
        out.elapsed < bound,
        "ADD took {:?} to report that etcd is down (bound: connect timeout {CONNECT_TIMEOUT:?} + retry budget {budget:?} + slack {SLACK:?})",
        out.elapsed
    );
    eprintln!("ADD with etcd down: code 11 in {:?}", out.elapsed);

    let restarted = Instant::now();
    etcd.restart_member(0).expect("restarting etcd");
    eprintln!("etcd healthy again after {:?}", restarted.elapsed());
    // The same daemon, not restarted, serves the very next ADD.
    let out = cni(&setup, "macvlan", "ADD", &after, &config);
    let (ip_after, _, _) = result_ipv4(&ok_json(&out, "first ADD after etcd came back"));
    eprintln!("first ADD after the etcd restart: {:?}", out.elapsed);
    assert_ne!(ip_before, ip_after);

    let records = etcd_records(&endpoints, &prefix);
    assert_recorded(&records, &prefix, subnet, ip_before, &before, &daemon.node);
    assert_recorded(&records, &prefix, subnet, ip_after, &after, &daemon.node);
    assert_released(&records, &prefix, &during);
    assert_eq!(
        allocation_keys(&records, &prefix).len(),
        4,
        "two allocations, an address and an attachment record each: {records:#?}"
    );

    // What the runtime does after a failed ADD: DEL (which removes the link macvlan left
    // behind), then ADD again, which now succeeds.
    retry_after_failed_add(&setup, &config, &during);
    for pod in [&before, &during, &after] {
        assert_ok(
            &cni(&setup, "macvlan", "DEL", pod, &config),
            &format!("DEL {}", pod.id),
        );
    }
    let records = etcd_records(&endpoints, &prefix);
    assert_eq!(allocation_keys(&records, &prefix), Vec::<String>::new());
}

#[test]
fn add_works_again_after_daemon_restart() {
    let Some(setup) = setup("e2e daemon restart") else {
        return;
    };
    let _alone = run_alone();
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-restart");
    let socket = dir.path().join("ipamd.sock");
    let parent = VethPair::new("rs").expect("creating a veth pair");
    let subnet = "10.207.0.0/24";
    let mut config: Value =
        serde_json::from_str(&macvlan_conf("e2e-restart", &parent, &socket, subnet))
            .expect("config is JSON");
    // The ADD while the daemon is down gives up after a second instead of the default wait.
    config["ipam"]["daemonWaitSeconds"] = json!(1);
    let config = config.to_string();
    let first = Pod::new("rs");
    let second = Pod::new("rs");

    let mut daemon =
        start_daemon(&setup, &endpoints, "node-e", &prefix, &socket).expect("starting ipamd");
    let out = cni(&setup, "macvlan", "ADD", &first, &config);
    let (ip_first, _, _) = result_ipv4(&ok_json(&out, "ADD before the restart"));

    let (status, took) = daemon.stop().expect("the daemon was running");
    eprintln!("hostnic-ipamd stopped by SIGTERM in {took:?}: {status}");
    assert!(
        took < STOP_GRACE,
        "hostnic-ipamd ignored SIGTERM\n{}",
        daemon.log_tail()
    );
    assert!(
        status.success(),
        "hostnic-ipamd exited with {status} on SIGTERM\n{}",
        daemon.log_tail()
    );
    assert!(
        !socket.exists(),
        "hostnic-ipamd left its socket {} behind",
        socket.display()
    );
    let out = cni(&setup, "macvlan", "ADD", &second, &config);
    assert_eq!(
        error_code(&out, "ADD while the daemon is down"),
        CODE_TRY_AGAIN_LATER,
        "{}",
        describe(&out)
    );
    drop(daemon);

    let daemon =
        start_daemon(&setup, &endpoints, "node-e", &prefix, &socket).expect("restarting ipamd");
    let ip_second = retry_after_failed_add(&setup, &config, &second);
    assert_ne!(
        ip_first, ip_second,
        "the restarted daemon handed out an address that is still held"
    );
    let records = etcd_records(&endpoints, &prefix);
    assert_recorded(&records, &prefix, subnet, ip_first, &first, &daemon.node);
    assert_recorded(&records, &prefix, subnet, ip_second, &second, &daemon.node);
    assert!(
        ping(&second.ns, IpAddr::V4(ip_first)),
        "the pods cannot reach each other"
    );

    // The restarted daemon releases what its predecessor allocated.
    let net = Network {
        setup: &setup,
        main: "macvlan",
        version: "1.0.0",
        config,
        endpoints: &endpoints,
        prefix: &prefix,
        subnet,
        node: &daemon.node,
    };
    net.delete_and_check(&[first, second]);
}

#[test]
fn concurrent_adds_through_two_daemons_never_share_an_address() {
    const PODS: usize = 60;
    let Some(setup) = setup("e2e two daemons") else {
        return;
    };
    let _alone = run_alone();
    let started = Instant::now();
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-two-daemons");
    let daemons: Vec<IpamDaemon> = ["node-f1", "node-f2"]
        .iter()
        .map(|node| {
            start_daemon(
                &setup,
                &endpoints,
                node,
                &prefix,
                &dir.path().join(format!("{node}.sock")),
            )
            .expect("starting hostnic-ipamd")
        })
        .collect();
    let subnet = "10.204.0.0/24";
    // Small blocks and a range of 125 addresses: each daemon must claim several blocks, and
    // the two race for them.
    let configs: Vec<String> = daemons
        .iter()
        .map(|d| {
            let mut ipam = ipam_conf(&d.socket, subnet);
            ipam["rangeStart"] = json!("10.204.0.2");
            ipam["rangeEnd"] = json!("10.204.0.126");
            ipam["blockSize"] = json!(28);
            net_conf(
                "1.0.0",
                "e2e-two-daemons",
                json!({"type": "macvlan", "master": "unused"}),
                ipam,
            )
        })
        .collect();
    // An IPAM plugin never enters the namespace: the pods share one to keep the test light.
    let ns = Arc::new(NetNs::new("tw").expect("creating a netns"));
    let pods: Vec<Pod> = (0..PODS).map(|_| Pod::in_ns("tw", &ns)).collect();

    // Pod i goes through daemon i % 2; all plugin processes run at once.
    let run_all = |command: &'static str| -> Vec<CniOutput> {
        thread::scope(|s| {
            let threads: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let setup = &setup;
                    let config = &configs[i % 2];
                    s.spawn(move || cni(setup, "hostnic-ipam", command, pod, config))
                })
                .collect();
            threads
                .into_iter()
                .map(|h| h.join().expect("a plugin thread panicked"))
                .collect()
        })
    };

    let adds = Instant::now();
    let outs = run_all("ADD");
    let adds = adds.elapsed();
    let mut owner: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for (i, out) in outs.iter().enumerate() {
        let (ip, _, _) = result_ipv4(&ok_json(out, &format!("concurrent ADD #{i}")));
        assert!(in_subnet(ip, subnet), "{ip} is not in {subnet}");
        assert!(
            (2..=126).contains(&ip.octets()[3]),
            "{ip} is outside rangeStart..rangeEnd"
        );
        if let Some(other) = owner.insert(ip, i) {
            panic!("{ip} was handed to pod #{other} and to pod #{i}");
        }
    }
    let records = etcd_records(&endpoints, &prefix);
    for (&ip, &i) in &owner {
        assert_recorded(
            &records,
            &prefix,
            subnet,
            ip,
            &pods[i],
            &daemons[i % 2].node,
        );
    }
    let ip_keys = records.keys().filter(|k| k.contains("/ips/")).count();
    assert_eq!(ip_keys, PODS, "allocation records");

    let dels = Instant::now();
    for (i, out) in run_all("DEL").iter().enumerate() {
        assert_ok(out, &format!("concurrent DEL #{i}"));
    }
    let dels = dels.elapsed();
    let records = etcd_records(&endpoints, &prefix);
    assert_eq!(allocation_keys(&records, &prefix), Vec::<String>::new());
    eprintln!(
        "{PODS} concurrent ADDs through 2 daemons: {adds:?}, DELs: {dels:?}, test {:?}",
        started.elapsed()
    );
}

#[test]
fn exact_addresses_from_runtime_config_and_cni_args_reach_the_pod_or_fail_cleanly() {
    let Some(setup) = setup("e2e exact addresses") else {
        return;
    };
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-exact");
    let daemon = start_daemon(
        &setup,
        &endpoints,
        "node-x",
        &prefix,
        &dir.path().join("ipamd.sock"),
    )
    .expect("starting hostnic-ipamd");
    let parent = VethPair::new("ex").expect("creating the macvlan parent veth pair");
    let subnet = "10.208.0.0/24";
    let mut ipam = ipam_conf(&daemon.socket, subnet);
    ipam["rangeStart"] = json!("10.208.0.100");
    ipam["fixedStart"] = json!("10.208.0.10");
    ipam["fixedEnd"] = json!("10.208.0.20");
    let macvlan = json!({"type": "macvlan", "master": parent.master(), "mode": "bridge"});
    let plain = net_conf("1.0.0", "e2e-exact", macvlan.clone(), ipam.clone());
    // What libcni hands a plugin that declares the `ips` capability (Multus per-pod ips).
    let mut with_ips: Value =
        serde_json::from_str(&net_conf("1.0.0", "e2e-exact", macvlan, ipam)).expect("config JSON");
    with_ips["capabilities"] = json!({"ips": true});
    with_ips["runtimeConfig"] = json!({"ips": ["10.208.0.12/24"]});
    let with_ips = with_ips.to_string();

    let multus = Pod::new("ex");
    let out = cni(&setup, "macvlan", "ADD", &multus, &with_ips);
    let (ip, _, _) = result_ipv4(&ok_json(&out, "ADD with runtimeConfig.ips"));
    assert_eq!(ip.to_string(), "10.208.0.12");
    assert_eq!(
        addresses(&multus.ns, IFNAME).expect("addresses"),
        vec!["10.208.0.12/24"]
    );

    let args_pod = Pod::new("ex");
    let out = cni_with_args(
        &setup,
        "macvlan",
        "ADD",
        &args_pod,
        &plain,
        "IP=10.208.0.15",
    );
    let (ip, _, _) = result_ipv4(&ok_json(&out, "ADD with CNI_ARGS IP="));
    assert_eq!(ip.to_string(), "10.208.0.15");
    assert!(
        ping(&args_pod.ns, "10.208.0.12".parse().expect("literal")),
        "pods reach each other"
    );

    let before = allocation_keys(&etcd_records(&endpoints, &prefix), &prefix);
    // Another pod asking for a held address: refused, naming the holder; nothing written.
    let thief = Pod::new("ex");
    let out = cni_with_args(&setup, "macvlan", "ADD", &thief, &plain, "IP=10.208.0.15");
    assert_eq!(
        error_code(&out, "ADD of a held address"),
        101,
        "{}",
        describe(&out)
    );
    assert!(
        out.stdout.contains(&args_pod.name),
        "the error names the holder: {}",
        out.stdout
    );
    // An address outside the ranges and the fixed window: invalid request.
    let outside = Pod::new("ex");
    let out = cni_with_args(&setup, "macvlan", "ADD", &outside, &plain, "IP=10.208.0.50");
    assert_eq!(
        error_code(&out, "ADD outside the ranges"),
        7,
        "{}",
        describe(&out)
    );
    assert!(out.stdout.contains("10.208.0.50"), "{}", out.stdout);
    assert_eq!(
        allocation_keys(&etcd_records(&endpoints, &prefix), &prefix),
        before,
        "refused requests wrote nothing"
    );
    // The runtime cleans up after the failed ADDs, then after the pods.
    for pod in [&thief, &outside] {
        assert_ok(
            &cni(&setup, "macvlan", "DEL", pod, &plain),
            "DEL after a failed ADD",
        );
    }
    for pod in [&multus, &args_pod] {
        assert_ok(&cni(&setup, "macvlan", "DEL", pod, &plain), "DEL");
    }
    assert_eq!(
        allocation_keys(&etcd_records(&endpoints, &prefix), &prefix),
        Vec::<String>::new()
    );
}

/// A daemon upgrade as a DaemonSet makes it, twice, while 16 workers churn ADD/DEL through the
/// plugin: first with a surge (the new daemon starts, waits for the old one's socket lock, and
/// takes over when the old one gets SIGTERM), then without (SIGTERM, and only then the new
/// daemon is started). The plugin waits for the restarting daemon (`ipam.daemonWaitSeconds`),
/// so no call fails, and no address is ever handed to two pods.
#[test]
fn restarting_the_daemon_under_churn_fails_no_call_and_duplicates_no_address() {
    const WORKERS: usize = 16;
    let Some(setup) = setup("e2e daemon upgrade under churn") else {
        return;
    };
    let _alone = run_alone();
    let endpoints = shared_single().endpoints();
    let dir = scratch_dir();
    let prefix = unique_prefix("e2e-upgrade");
    let socket = dir.path().join("ipamd.sock");
    let subnet = "10.219.0.0/24";
    let config = net_conf(
        "1.0.0",
        "e2e-upgrade",
        json!({"type": "macvlan", "master": "unused"}),
        ipam_conf(&socket, subnet),
    );
    let node = "node-upgrade";
    let start = |extra: &[&str]| {
        IpamDaemon::start(&setup.daemon, &endpoints, node, &prefix, &socket, extra)
            .expect("starting hostnic-ipamd")
    };
    let ns = Arc::new(NetNs::new("up").expect("creating a netns"));

    // Who holds each address, as the workers saw their ADDs answered. A worker unlists an
    // address before its DEL, so it is listed only while etcd holds it for that worker.
    let held: std::sync::Mutex<BTreeMap<Ipv4Addr, String>> = Default::default();
    let failures: std::sync::Mutex<Vec<String>> = Default::default();
    let calls = AtomicU64::new(0);
    let churning = std::sync::atomic::AtomicBool::new(true);

    let fail = |what: String| failures.lock().expect("failure list").push(what);
    let mut old = start(&[]);
    let restarts = thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                // Each worker keeps its last pod while it adds the next, so an address stays
                // listed for as long as another worker's ADD takes.
                let mut previous: Option<(Pod, Ipv4Addr)> = None;
                let del = |pod: Pod, ip: Ipv4Addr| {
                    held.lock().expect("holder list").remove(&ip);
                    let out = cni(&setup, "hostnic-ipam", "DEL", &pod, &config);
                    calls.fetch_add(1, Ordering::Relaxed);
                    if !out.success() {
                        fail(format!("DEL {}: {}", pod.id, describe(&out)));
                    }
                };
                while churning.load(Ordering::Relaxed) {
                    let pod = Pod::in_ns("up", &ns);
                    let out = cni(&setup, "hostnic-ipam", "ADD", &pod, &config);
                    calls.fetch_add(1, Ordering::Relaxed);
                    if !out.success() {
                        fail(format!("ADD {}: {}", pod.id, describe(&out)));
                        continue;
                    }
                    let (ip, _, _) = result_ipv4(&ok_json(&out, "ADD"));
                    let other = held.lock().expect("holder list").insert(ip, pod.id.clone());
                    if let Some(other) = other {
                        fail(format!("{ip} handed to {} while {other} holds it", pod.id));
                    }
                    if let Some((pod, ip)) = previous.replace((pod, ip)) {
                        del(pod, ip);
                    }
                }
                if let Some((pod, ip)) = previous {
                    del(pod, ip);
                }
            });
        }
        let mut restarts = Vec::new();
        thread::sleep(Duration::from_secs(1));

        // With a surge: the new daemon waits for the old one's lock.
        let began = Instant::now();
        let new = start(&["--socket-wait-seconds", "30"]);
        thread::sleep(Duration::from_millis(500));
        old.stop().expect("the old daemon was running");
        // The log is shared by every daemon of the node: the second "serving" is the new one's.
        wait_for_log(&new, "server: serving", 2);
        restarts.push(("surge", began.elapsed(), calls.load(Ordering::Relaxed)));
        old = new;
        thread::sleep(Duration::from_secs(1));

        // Without: stopped first, then the new one starts.
        let began = Instant::now();
        old.stop().expect("the daemon was running");
        old = start(&[]);
        restarts.push((
            "stop, then start",
            began.elapsed(),
            calls.load(Ordering::Relaxed),
        ));
        thread::sleep(Duration::from_secs(1));
        churning.store(false, Ordering::Relaxed);
        restarts
    });

    let failures = failures.into_inner().expect("failure list");
    let calls = calls.into_inner();
    eprintln!("{calls} calls by {WORKERS} workers across two restarts: {restarts:?}");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed or duplicated an address:\n{}\nold daemon log:\n{}",
        failures.len(),
        failures.join("\n"),
        old.log_tail()
    );
    assert!(
        calls > 100,
        "only {calls} calls were made: the churn did not run"
    );
    let records = etcd_records(&endpoints, &prefix);
    assert_eq!(allocation_keys(&records, &prefix), Vec::<String>::new());
}

/// Waits until `daemon`'s log says `what` `times` times.
fn wait_for_log(daemon: &IpamDaemon, what: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_to_string(daemon.log_path())
        .unwrap_or_default()
        .matches(what)
        .count()
        < times
    {
        assert!(
            Instant::now() < deadline,
            "hostnic-ipamd never logged {what:?}:\n{}",
            daemon.log_tail()
        );
        thread::sleep(Duration::from_millis(20));
    }
}
