//! `--output json` and `show NAMESPACE/POD` of the real `hostnic-ipamd` binary against the
//! shared etcd (each test under its own prefix) and, for the GC commands that ask Kubernetes,
//! the testkit's fake API server: every command's JSON parses and carries the same facts as
//! its table, with the same exit code; `show` lists what a pod holds on every network, says
//! when it holds nothing, and refuses what is not NAMESPACE/POD as clap refuses bad input.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use hostnic_ipamd::store::Store;
use hostnic_ipamd::{AllocateRequest, Allocator, Attachment, Kind, PodRef};
use hostnic_testkit::kube::{self as fake, FakeKube};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::{json, Value};

mod common;

/// What an operator command of the real binary printed, and how it exited.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `hostnic-ipamd ARGS` as `node` against the shared etcd under `prefix`, with
/// `kubeconfig` or no Kubernetes at all.
fn run(prefix: &str, node: &str, kubeconfig: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"));
    cmd.args(args)
        .args(["--etcd-endpoints", &shared_single().endpoints().join(",")])
        .args(["--etcd-prefix", prefix, "--node-name", node])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "warn");
    if let Some(path) = kubeconfig {
        cmd.arg("--kubeconfig").arg(path);
    }
    let out = cmd.output().expect("hostnic-ipamd runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The command's table lines and its JSON document, run once each way; both must exit with
/// `code`.
fn both(
    prefix: &str,
    node: &str,
    kubeconfig: Option<&Path>,
    args: &[&str],
    code: i32,
) -> (Vec<String>, Value) {
    let table = run(prefix, node, kubeconfig, args);
    assert_eq!(table.code, Some(code), "{args:?} as a table: {table:?}");
    let mut with_json = args.to_vec();
    with_json.extend(["--output", "json"]);
    let doc = run(prefix, node, kubeconfig, &with_json);
    assert_eq!(doc.code, Some(code), "{with_json:?}: {doc:?}");
    let value: Value = serde_json::from_str(&doc.stdout)
        .unwrap_or_else(|e| panic!("{with_json:?} prints one JSON document: {e}: {doc:?}"));
    assert!(value.is_object(), "{with_json:?} prints an object: {value}");
    (table.stdout.lines().map(str::to_owned).collect(), value)
}

fn pod(name: &str, uid: &str) -> Option<PodRef> {
    Some(PodRef {
        namespace: "prod".into(),
        name: name.into(),
        uid: uid.into(),
    })
}

/// Allocates for `attachment` of `pod` in the pool of `subnet` (`requested` exactly, or the
/// next free address), recorded with `netns`; the address.
async fn add(
    a: &Allocator,
    attachment: &Attachment,
    pod: Option<PodRef>,
    subnet: &str,
    requested: Option<&str>,
    netns: &str,
) -> String {
    let request = AllocateRequest {
        attachment: attachment.clone(),
        pod,
        netns: netns.into(),
        range_sets: common::sets(json!({ "subnet": subnet })),
        requested: requested.map(common::ip).into_iter().collect(),
        requested_kind: Kind::Exact,
    };
    let allocation =
        (a.allocate(&request).await).unwrap_or_else(|e| panic!("allocate for {attachment}: {e}"));
    allocation.ips[0].ip.to_string()
}

async fn put(store: &Store, key: &str, value: impl Into<Vec<u8>>) {
    (store.client().put(key, value.into(), None).await)
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

fn strings(value: &Value) -> Vec<String> {
    (value.as_array().expect("an array").iter())
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_of_every_etcd_command_parses_and_carries_the_facts_of_its_table() {
    let prefix = unique_prefix("out-json");
    let node_a = common::allocator(shared_single(), &prefix, "node-a").await;
    let node_b = common::allocator(shared_single(), &prefix, "node-b").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let gone = dir.path().join("gone-netns");
    let gone = gone.to_str().expect("utf-8 temp path");
    let db_a = Attachment::new("out-a", "c1", "eth0");
    let db_b = Attachment::new("out-b", "c1", "net1");
    let plain = Attachment::new("out-a", "c2", "eth0");
    let db = pod("db-0", "u1");
    add(
        &node_a,
        &db_a,
        db.clone(),
        "10.95.0.0/24",
        Some("10.95.0.7"),
        gone,
    )
    .await;
    let db_b_ip = add(&node_a, &db_b, db.clone(), "10.95.1.0/24", None, "").await;
    let plain_ip = add(&node_b, &plain, None, "10.95.0.0/24", None, "").await;
    // A pool that holds nothing, for `remove-pool`.
    let empty = Attachment::new("out-a", "c3", "eth0");
    add(&node_a, &empty, None, "10.95.2.0/24", None, "").await;
    node_a.release(&empty).await.expect("release");
    // A namespace with an auto-assigned block, for `namespaces` and `unassign-namespace`.
    let store = node_a.store();
    let keys = node_a.keys();
    let block = common::net("10.95.4.0/26");
    put(
        store,
        &keys.namespace("team"),
        json!({"version": 1, "blocks": [block]}).to_string(),
    )
    .await;
    put(
        store,
        &keys.namespace_block(&block),
        json!({"version": 1, "namespace": "team"}).to_string(),
    )
    .await;

    // list: one JSON object per table row, the same fields.
    let (table, doc) = both(&prefix, "operator", None, &["list"], 0);
    let allocations = doc["allocations"].as_array().expect("allocations");
    assert_eq!(table.len(), allocations.len() + 1, "{table:?}\n{doc}");
    let from_table: BTreeSet<Vec<String>> = (table[1..].iter())
        .map(|l| l.split('\t').map(str::to_lowercase).collect())
        .collect();
    let from_json: BTreeSet<Vec<String>> = (allocations.iter())
        .map(|a| {
            let pod = match &a["pod"] {
                Value::Null => "-".to_string(),
                p => format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"]),
            };
            [
                a["pool"].as_str().unwrap_or("").to_string(),
                a["ip"].as_str().unwrap_or("").to_string(),
                a["network"].as_str().unwrap_or("").to_string(),
                a["containerId"].as_str().unwrap_or("").to_string(),
                a["ifname"].as_str().unwrap_or("").to_string(),
                pod.replace('"', ""),
                a["node"].as_str().unwrap_or("").to_string(),
                a["kind"].as_str().unwrap_or("").to_string(),
            ]
            .into()
        })
        .collect();
    assert_eq!(from_table, from_json);
    assert!(from_json.contains(&vec![
        "10.95.0.0/24".to_string(),
        "10.95.0.7".into(),
        "out-a".into(),
        "c1".into(),
        "eth0".into(),
        "prod/db-0".into(),
        "node-a".into(),
        "exact".into(),
    ]));
    let db_json = (allocations.iter())
        .find(|a| a["ip"] == "10.95.0.7")
        .expect("listed");
    assert_eq!(db_json["pod"]["uid"], "u1", "{db_json}");
    let (_, only_b) = both(
        &prefix,
        "operator",
        None,
        &["list", "--pool", "10.95.1.0/24"],
        0,
    );
    let only_b = only_b["allocations"]
        .as_array()
        .expect("allocations")
        .clone();
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0]["ip"], db_b_ip.as_str());

    // usage: per pool, the dynamic size, the held addresses, the blocks by node.
    let (table, doc) = both(&prefix, "operator", None, &["usage"], 0);
    let pools = doc["pools"].as_array().expect("pools");
    assert_eq!(table.len(), pools.len() + 1, "{table:?}\n{doc}");
    for (line, pool) in table[1..].iter().zip(pools) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols[0], pool["subnet"], "{line} / {pool}");
        assert_eq!(cols[1], pool["dynamic"].to_string(), "{line} / {pool}");
        assert_eq!(cols[2], pool["held"].to_string(), "{line} / {pool}");
        let blocks: Vec<String> = (pool["blocks"].as_object().expect("blocks").iter())
            .map(|(node, n)| format!("{node}={n}"))
            .collect();
        assert_eq!(cols[3], blocks.join(","), "{line} / {pool}");
    }
    let held: Vec<(String, u64)> = (pools.iter())
        .map(|p| {
            (
                p["subnet"].as_str().unwrap_or("").into(),
                p["held"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        held,
        vec![
            ("10.95.0.0/24".into(), 2),
            ("10.95.1.0/24".into(), 1),
            ("10.95.2.0/24".into(), 0)
        ]
    );

    // audit: the counts of the summary line, no problem, exit 0.
    let (table, doc) = both(&prefix, "operator", None, &["audit"], 0);
    assert_eq!(
        table,
        vec![format!(
            "{} pools, {} allocations, {} attachments, 0 problems",
            doc["pools"], doc["allocations"], doc["attachments"]
        )],
        "{doc}"
    );
    assert_eq!(doc["allocations"], 3);
    assert_eq!(doc["consistent"], true);
    assert_eq!(doc["problems"], json!([]));

    // gc-netns: the attachment whose namespace path is gone would be released.
    let (table, doc) = both(
        &prefix,
        "node-a",
        None,
        &["gc-netns", "--dry-run", "--gc-grace-seconds", "0"],
        0,
    );
    assert_eq!(doc["dryRun"], true);
    let released = doc["released"].as_array().expect("released");
    assert_eq!(released.len(), 1, "{doc}");
    assert_eq!(
        (&released[0]["containerId"], &released[0]["netns"]),
        (&json!("c1"), &json!(gone))
    );
    assert_eq!(released[0]["ips"], json!(["10.95.0.7"]));
    assert!(
        table[0].starts_with("would release c1/eth0 of network out-a (10.95.0.7): "),
        "{table:?}"
    );
    assert!(table[0].ends_with(released[0]["reason"].as_str().expect("reason")));
    let kept = doc["kept"].as_array().expect("kept");
    assert_eq!(kept.len(), 1, "{doc}");
    assert_eq!(
        (&kept[0]["containerId"], &kept[0]["reason"]),
        (&json!("c1"), &json!("noNetns"))
    );
    assert!(
        table[1].starts_with("would release 1 attachments; kept 1 (namespace present 0, younger than the grace 0, no netns path 1,"),
        "{table:?}"
    );

    // release-address --dry-run: the holder's whole attachment.
    let (table, doc) = both(
        &prefix,
        "operator",
        None,
        &["release-address", "10.95.0.7", "--dry-run"],
        0,
    );
    assert_eq!(
        table,
        vec!["would release c1/eth0 of network out-a (it holds 10.95.0.7)"]
    );
    assert_eq!(
        doc,
        json!({"ip": "10.95.0.7", "error": null, "actions": [{"action": "releaseAttachment",
            "dryRun": true, "network": "out-a", "containerId": "c1", "ifname": "eth0",
            "key": null}]})
    );

    // remove-pool --dry-run of the empty pool: its record.
    let (table, doc) = both(
        &prefix,
        "operator",
        None,
        &["remove-pool", "10.95.2.0/24", "--dry-run"],
        0,
    );
    let key = keys.pool("10.95.2.0_24");
    assert_eq!(
        doc,
        json!({"subnet": "10.95.2.0/24", "key": key, "dryRun": true})
    );
    assert_eq!(
        table,
        vec![format!(
            "would remove pool 10.95.2.0/24: {key}, its blocks, and its entry in the pool index"
        )]
    );

    // namespaces and unassign-namespace --dry-run: the auto-assigned block.
    let (table, doc) = both(&prefix, "operator", None, &["namespaces"], 0);
    assert_eq!(table[1..], ["team\tauto\t10.95.4.0/26\t-"]);
    assert_eq!(
        doc,
        json!({"namespaces": [{"namespace": "team", "source": "auto",
            "blocks": ["10.95.4.0/26"], "unmapped": []}]})
    );
    let (table, doc) = both(
        &prefix,
        "operator",
        None,
        &["unassign-namespace", "team", "--dry-run"],
        0,
    );
    assert_eq!(
        table,
        vec!["would take block(s) 10.95.4.0/26 from namespace team; addresses held in them stay held"]
    );
    assert_eq!(
        doc,
        json!({"namespace": "team", "blocks": ["10.95.4.0/26"], "dryRun": true})
    );

    // release: the attachment of one network, for real (so the JSON run finds it gone).
    let release = ["release", "c1", "net1", "--network", "out-b"];
    let table = run(&prefix, "operator", None, &release);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert_eq!(
        table.stdout.trim(),
        format!(
            "released {db_b_ip} of pool 10.95.1.0/24 from c1/net1 of network out-b on node node-a"
        )
    );
    let again = run(
        &prefix,
        "operator",
        None,
        &[&release[..], &["--output", "json"]].concat(),
    );
    assert_eq!(again.code, Some(0), "{again:?}");
    let doc: Value = serde_json::from_str(&again.stdout).expect("one JSON document");
    assert_eq!(
        doc,
        json!({"containerId": "c1", "ifname": "net1", "released": [], "error": null})
    );
    // The JSON run first this time: it is the one that releases.
    let freed = run(
        &prefix,
        "operator",
        None,
        &["release", "c2", "eth0", "--output", "json"],
    );
    assert_eq!(freed.code, Some(0), "{freed:?}");
    let doc: Value = serde_json::from_str(&freed.stdout).expect("one JSON document");
    assert_eq!(
        doc,
        json!({"containerId": "c2", "ifname": "eth0", "error": null, "released": [{
            "ip": plain_ip, "pool": "10.95.0.0/24", "network": "out-a", "containerId": "c2",
            "ifname": "eth0", "node": "node-b"}]})
    );

    // A corrupt record: audit exits 1 either way and names it; drop-key shows, then deletes it.
    let bad = keys.pool("10.95.9.0_24");
    put(store, &bad, "not json").await;
    let (table, doc) = both(&prefix, "operator", None, &["audit"], 1);
    let problems = strings(&doc["problems"]);
    assert_eq!(problems.len(), 1, "{doc}");
    assert!(problems[0].starts_with(&bad), "{doc}");
    assert_eq!(table[0], format!("PROBLEM {}", problems[0]));
    assert_eq!(doc["consistent"], false);
    let (table, doc) = both(
        &prefix,
        "operator",
        None,
        &["drop-key", &bad, "--dry-run"],
        0,
    );
    assert_eq!(
        table,
        vec![format!("{bad} = not json"), format!("would delete {bad}")]
    );
    assert_eq!(
        doc,
        json!({"key": bad, "result": "wouldDelete", "value": "not json",
            "attachmentRecord": null, "error": null})
    );
    let dropped = run(
        &prefix,
        "operator",
        None,
        &["drop-key", &bad, "--output", "json"],
    );
    assert_eq!(dropped.code, Some(0), "{dropped:?}");
    let doc: Value = serde_json::from_str(&dropped.stdout).expect("one JSON document");
    assert_eq!(
        doc,
        json!({"key": bad, "result": "deleted", "value": "not json",
            "attachmentRecord": false, "error": null})
    );
    let (_, doc) = both(&prefix, "operator", None, &["audit"], 0);
    assert_eq!(doc["consistent"], true);

    // A command that fails before it has an outcome prints no document, and exits 1.
    let refused = run(
        &prefix,
        "operator",
        None,
        &["remove-pool", "10.95.0.0/24", "--output", "json"],
    );
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert_eq!(refused.stdout, "", "{refused:?}");
    assert!(refused.stderr.contains("holds 1 addresses"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_of_the_kubernetes_gc_commands_carries_the_facts_of_their_table() {
    let api = FakeKube::start().expect("fake API server starts");
    api.create(fake::node("k-me")).expect("node created");
    let kubeconfig = Some(api.kubeconfig_path());
    let prefix = unique_prefix("out-gc");
    let me = common::allocator(shared_single(), &prefix, "k-me").await;
    let dead = common::allocator(shared_single(), &prefix, "k-dead").await;
    // A pod the API does not have: gc-pods would release its attachment.
    let gone_pod = Attachment::new("out-k", "k1", "eth0");
    let gone_ip = add(
        &me,
        &gone_pod,
        pod("gone-0", "u-gone"),
        "10.95.8.0/24",
        None,
        "",
    )
    .await;
    // A node the API does not list: gc-nodes would release its attachment.
    let stranded = Attachment::new("out-k", "k2", "eth0");
    let stranded_ip = add(&dead, &stranded, None, "10.95.8.0/24", None, "").await;
    // A sticky identity whose StatefulSet is gone: with no grace, gc-sticky would release it.
    let sticky_key = me.keys().sticky("out-k", "prod", "gone", 0);
    put(
        me.store(),
        &sticky_key,
        json!({"version": 1, "network": "out-k", "namespace": "prod", "statefulSet": "gone",
            "ordinal": 0, "ips": [{"pool": "10.95.8.0_24", "ip": "10.95.8.200"}], "since": 1})
        .to_string(),
    )
    .await;
    let grace = ["--dry-run", "--gc-grace-seconds", "0"];

    let (table, doc) = both(
        &prefix,
        "k-me",
        kubeconfig,
        &[&["gc-pods"], &grace[..]].concat(),
        0,
    );
    let released = doc["released"].as_array().expect("released");
    assert_eq!(released.len(), 1, "{doc}");
    assert_eq!(released[0]["containerId"], "k1");
    assert_eq!(released[0]["ips"], json!([gone_ip]));
    assert!(
        table[0].starts_with(&format!(
            "would release k1/eth0 of network out-k ({gone_ip}): "
        )),
        "{table:?}"
    );
    assert_eq!(doc["kept"], json!([]));
    assert!(table
        .last()
        .expect("summary")
        .starts_with("would release 1 attachments; kept 0"));

    let (table, doc) = both(&prefix, "k-me", kubeconfig, &["gc-nodes", "--dry-run"], 0);
    let released = doc["released"].as_array().expect("released");
    assert_eq!(released.len(), 1, "{doc}");
    assert_eq!(
        (&released[0]["containerId"], &released[0]["node"]),
        (&json!("k2"), &json!("k-dead"))
    );
    assert_eq!(released[0]["ips"], json!([stranded_ip]));
    assert!(
        table.iter().any(|l| l.starts_with(&format!(
            "would release k2/eth0 of network out-k ({stranded_ip}) of node k-dead: "
        ))),
        "{table:?}"
    );
    let decisions: BTreeSet<(String, String, String)> = (doc["nodes"].as_array().expect("nodes"))
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or("").to_string();
            (s("node"), s("decision"), s("reason"))
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("k-dead".into(), "release".into(), "deleted".into()),
            ("k-me".into(), "keep".into(), "thisNode".into())
        ]
        .into()
    );
    assert_eq!(doc["apiError"], Value::Null);

    let (table, doc) = both(
        &prefix,
        "k-me",
        kubeconfig,
        &[&["gc-sticky"], &grace[..]].concat(),
        0,
    );
    let released = doc["released"].as_array().expect("released");
    assert_eq!(released.len(), 1, "{doc}");
    assert_eq!(released[0]["ips"], json!(["10.95.8.200"]));
    assert_eq!(released[0]["identity"], "prod/gone-0 on network out-k");
    let reason = released[0]["reason"].as_str().expect("reason");
    assert_eq!(
        table[0],
        format!("would release sticky prod/gone-0 on network out-k (10.95.8.200): {reason}")
    );
    assert_eq!(doc["orphaned"], json!([]));
    assert_eq!(doc["inUse"], 0);
    assert_eq!(doc["dryRun"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_what_a_pod_holds_on_every_network_and_says_when_it_holds_nothing() {
    let prefix = unique_prefix("out-show");
    let node_a = common::allocator(shared_single(), &prefix, "node-a").await;
    let node_b = common::allocator(shared_single(), &prefix, "node-b").await;
    let web = pod("web-0", "u-web");
    let first = Attachment::new("show-a", "w1", "eth0");
    let second = Attachment::new("show-b", "w1", "net1");
    let first_ip = add(&node_a, &first, web.clone(), "10.96.0.0/24", None, "").await;
    let second_ip = add(&node_a, &second, web.clone(), "10.96.1.0/24", None, "").await;
    // Another pod of the namespace, and a pod of another namespace with the same name.
    let other = Attachment::new("show-a", "w2", "eth0");
    add(
        &node_b,
        &other,
        pod("web-1", "u-1"),
        "10.96.0.0/24",
        None,
        "",
    )
    .await;
    let elsewhere = Attachment::new("show-a", "w3", "eth0");
    let elsewhere_pod = Some(PodRef {
        namespace: "dev".into(),
        name: "web-0".into(),
        uid: "u-dev".into(),
    });
    add(&node_b, &elsewhere, elsewhere_pod, "10.96.0.0/24", None, "").await;
    let keys = node_a.keys();
    put(
        node_a.store(),
        &keys.sticky("show-a", "prod", "web", 0),
        json!({"version": 1, "network": "show-a", "namespace": "prod", "statefulSet": "web",
            "ordinal": 0, "ips": [{"pool": "10.96.0.0_24", "ip": first_ip}], "since": 1})
        .to_string(),
    )
    .await;
    let block = common::net("10.96.4.0/26");
    put(
        node_a.store(),
        &keys.namespace("prod"),
        json!({"version": 1, "blocks": [block]}).to_string(),
    )
    .await;

    let (table, doc) = both(&prefix, "operator", None, &["show", "prod/web-0"], 0);
    assert_eq!(
        table,
        vec![
            "NETWORK\tCONTAINER\tIFNAME\tADDRESS\tPOOL\tKIND\tNODE\tPOD UID\tRECORD".to_string(),
            format!(
                "show-a\tw1\teth0\t{first_ip}\t10.96.0.0/24\tDynamic\tnode-a\tu-web\tattachment"
            ),
            format!(
                "show-b\tw1\tnet1\t{second_ip}\t10.96.1.0/24\tDynamic\tnode-a\tu-web\tattachment"
            ),
            "STICKY NETWORK\tSTATEFULSET\tORDINAL\tADDRESSES\tORPHANED SINCE".to_string(),
            format!("show-a\tweb\t0\t{first_ip}\t-"),
            "namespace prod has block(s) 10.96.4.0/26".to_string(),
        ]
    );
    let address = |network: &str, container: &str, ifname: &str, ip: &str, pool: &str| {
        json!({"network": network, "containerId": container, "ifname": ifname, "ip": ip,
            "pool": pool, "kind": "dynamic", "node": "node-a", "uid": "u-web",
            "attachmentRecord": true})
    };
    assert_eq!(
        doc,
        json!({
            "namespace": "prod",
            "name": "web-0",
            "addresses": [
                address("show-a", "w1", "eth0", &first_ip, "10.96.0.0/24"),
                address("show-b", "w1", "net1", &second_ip, "10.96.1.0/24"),
            ],
            "sticky": [{"network": "show-a", "statefulSet": "web", "ordinal": 0,
                "ips": [first_ip], "pools": ["10.96.0.0/24"], "orphanedSince": null}],
            "namespaceBlocks": ["10.96.4.0/26"],
        })
    );

    // A pod that holds nothing, in a namespace without blocks.
    let (table, doc) = both(&prefix, "operator", None, &["show", "dev/nobody"], 0);
    assert_eq!(
        table,
        vec!["dev/nobody holds no address, no sticky address and its namespace no block"]
    );
    assert_eq!(
        doc,
        json!({"namespace": "dev", "name": "nobody", "addresses": [], "sticky": [],
            "namespaceBlocks": []})
    );
}

#[test]
fn show_refuses_what_is_not_namespace_slash_pod_as_clap_refuses_bad_input() {
    // Refused while parsing the command line: no etcd is asked, so any prefix will do.
    for (arg, why) in [
        ("web-0", "it has no '/'"),
        ("prod/web/0", "more than one '/'"),
        ("/web-0", "namespace \"\" is not valid: it is empty"),
        ("prod/", "pod name \"\" is not valid: it is empty"),
        ("Prod/web-0", "namespace \"Prod\" is not valid"),
        ("prod/web_0", "pod name \"web_0\" is not valid"),
    ] {
        for output in ["table", "json"] {
            let out = run(
                "/unused",
                "operator",
                None,
                &["show", arg, "--output", output],
            );
            assert_eq!(out.code, Some(2), "show {arg}: {out:?}");
            assert_eq!(out.stdout, "", "show {arg}: {out:?}");
            assert!(
                out.stderr
                    .contains(&format!("invalid value '{arg}' for '<POD>'"))
                    && out.stderr.contains(why),
                "show {arg}: {out:?}"
            );
        }
    }
    let out = run("/unused", "operator", None, &["list", "--output", "yaml"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("invalid value 'yaml' for '--output"),
        "{out:?}"
    );
}
