//! What the README says about the build and the shipped files, checked against the build and
//! the files themselves:
//!
//! - the plugin binary links no etcd, Kubernetes or HTTP client: it only talks to the node's
//!   daemon over a unix socket, so a node's CNI directory holds no cluster credentials' user;
//! - every config under `etc/` and every example under `examples/` parses, through the parsers
//!   the plugin and the daemon really use, so that what a user copies works.
//!
//! Files are found by listing the directories, so a new example is checked without a test
//! change; a file of a kind this test does not know fails it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Crates whose presence among the plugin's dependencies would mean it talks to etcd,
/// Kubernetes or an HTTP API itself.
const FORBIDDEN_IN_PLUGIN: [&str; 5] = [
    "etcd-client",
    "kube",
    "kube-client",
    "k8s-openapi",
    "reqwest",
];

fn workspace_root() -> PathBuf {
    // This package is `tests/` in the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

#[test]
fn the_plugin_links_no_etcd_kubernetes_or_http_client() {
    // The cargo that runs the tests, so the same toolchain and lockfile; offline: the
    // dependency graph is in Cargo.lock and the sources are already fetched.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "hostnic-cni",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {} tree: {e}", cargo.to_string_lossy()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // One package a line: `name vX.Y.Z [(source)] [(*)]`.
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"hostnic-cni") && names.contains(&"tonic"),
        "cargo tree listed an unexpected graph:\n{stdout}"
    );
    let found: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| FORBIDDEN_IN_PLUGIN.contains(n) || n.starts_with("kube-"))
        .collect();
    assert!(
        found.is_empty(),
        "hostnic-cni (the plugin) depends on {found:?}: the plugin must only talk to \
         hostnic-ipamd\n{stdout}"
    );
}

/// Regular files under `dir` (recursively), sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("listing {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Checks a CNI network config (a single plugin or a `plugins` list): every plugin that
/// delegates to hostnic-ipam is parsed as the plugin parses its stdin and its `ipam` as the
/// daemon parses pools. Returns how many plugins delegate to hostnic-ipam.
fn check_network_config(what: &str, config: &Value) -> usize {
    let plugins: Vec<Value> = match config.get("plugins") {
        Some(list) => {
            let list = list
                .as_array()
                .unwrap_or_else(|| panic!("{what}: `plugins` is not a list"));
            // A runtime hands each plugin of a list its own object plus the list's
            // cniVersion and name.
            list.iter()
                .map(|p| {
                    let mut p = p.clone();
                    p["cniVersion"] = config["cniVersion"].clone();
                    p["name"] = config["name"].clone();
                    p
                })
                .collect()
        }
        None => vec![config.clone()],
    };
    let mut ours = 0;
    for plugin in plugins {
        if plugin["ipam"]["type"] != "hostnic-ipam" {
            continue;
        }
        ours += 1;
        let parsed = hostnic_cni::NetworkConfig::parse(plugin.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{what}: the plugin refuses it: {e}"));
        let sets = hostnic_ipamd::parse_range_sets(&parsed.ipam.raw)
            .unwrap_or_else(|e| panic!("{what}: the daemon refuses its ipam: {e}"));
        assert!(!sets.is_empty(), "{what}: no pool");
    }
    ours
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

#[test]
fn every_config_under_etc_parses_as_the_daemon_and_the_plugin_read_it() {
    let root = workspace_root();
    let files = files_under(&root.join("etc"));
    assert!(!files.is_empty(), "etc/ is empty");
    for path in files {
        let what = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        if path.starts_with(root.join("etc/cni/net.d")) {
            let config = read_json(&path);
            assert!(
                check_network_config(&what, &config) > 0,
                "{what}: no plugin delegates to hostnic-ipam"
            );
        } else if path.file_name().is_some_and(|n| n == "hostnic-ipamd.json") {
            let file = hostnic_ipamd::config::read_file(&path)
                .unwrap_or_else(|e| panic!("{what}: the daemon refuses it: {e}"));
            hostnic_ipamd::config::resolve(
                hostnic_ipamd::config::Flags::default(),
                file,
                Some("node-a".to_owned()),
            )
            .unwrap_or_else(|e| panic!("{what}: the daemon refuses its values: {e}"));
        } else if path.starts_with(root.join("etc/kubernetes")) {
            // tests/manifests.rs holds the manifests to the daemon and the plugin.
            continue;
        } else {
            panic!("{what}: a file of a kind this test does not check; teach it");
        }
    }
}

#[test]
fn every_example_parses_as_the_plugin_and_kubernetes_read_it() {
    let root = workspace_root();
    let files = files_under(&root.join("examples"));
    assert!(!files.is_empty(), "examples/ is empty");
    for path in files {
        let what = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("conf" | "conflist") => {
                let config = read_json(&path);
                assert!(
                    check_network_config(&what, &config) > 0,
                    "{what}: no plugin delegates to hostnic-ipam"
                );
            }
            Some("yaml" | "yml") => check_manifests(&what, &path),
            _ => panic!("{what}: a file of a kind this test does not check; teach it"),
        }
    }
}

/// Every document of a Kubernetes manifest file parses as YAML and has `apiVersion` and `kind`;
/// a NetworkAttachmentDefinition's `spec.config` is a CNI config that delegates to hostnic-ipam,
/// and a pod's Multus network selection is JSON whose `ips` are addresses with a prefix.
fn check_manifests(what: &str, path: &Path) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut documents = 0;
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(document)
            .unwrap_or_else(|e| panic!("{what}: not valid YAML: {e}"));
        if doc.is_null() {
            continue;
        }
        documents += 1;
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: a document without kind: {doc}"));
        assert!(
            doc["apiVersion"].is_string(),
            "{what}: {kind} without apiVersion"
        );
        let what = format!("{what} ({kind} {})", doc["metadata"]["name"]);
        if kind == "NetworkAttachmentDefinition" {
            let config = doc["spec"]["config"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no spec.config string"));
            let config: Value = serde_json::from_str(config)
                .unwrap_or_else(|e| panic!("{what}: spec.config is not JSON: {e}"));
            assert!(
                check_network_config(&what, &config) > 0,
                "{what}: no plugin delegates to hostnic-ipam"
            );
        }
        if let Some(networks) =
            doc["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"].as_str()
        {
            let networks: Value = serde_json::from_str(networks)
                .unwrap_or_else(|e| panic!("{what}: the networks annotation is not JSON: {e}"));
            for ip in networks
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|n| n["ips"].as_array().into_iter().flatten())
            {
                let ip = ip
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: ips holds {ip}"));
                let (addr, len) = ip
                    .split_once('/')
                    .unwrap_or_else(|| panic!("{what}: {ip} has no prefix length"));
                addr.parse::<std::net::IpAddr>()
                    .unwrap_or_else(|e| panic!("{what}: {ip}: {e}"));
                len.parse::<u8>()
                    .unwrap_or_else(|e| panic!("{what}: {ip}: {e}"));
            }
        }
    }
    assert!(documents > 0, "{what}: no YAML document");
}
