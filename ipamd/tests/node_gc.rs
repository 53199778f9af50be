//! The election of the cleaner and the deleted-node GC, against the shared etcd and the
//! testkit's stateful fake Kubernetes API server (the production kube client unchanged):
//! exactly one of three candidates leads, another takes over within the lease TTL when it
//! stops, and a leader whose lease is gone stops acting at once; a pass releases a deleted
//! node's attachments and empty blocks only after the grace, never a live node's or this
//! node's, keeps a block where another node holds an address, writes nothing in a dry run or
//! when the API cannot list the nodes; `gc-nodes` does the same end to end, and the running
//! daemon does it while elected.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostnic_ipamd::kube::{self, KubeSource};
use hostnic_ipamd::leader::{self, Election, Leadership};
use hostnic_ipamd::node_gc::{self, Absences, Keep, Verdict};
use hostnic_ipamd::store::Store;
use hostnic_ipamd::{Allocator, Attachment, RangeSet};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{self as fake, FakeKube, Fault};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::json;

mod common;
use common::snapshot;

const NETWORK: &str = "node-gc-net";
const TTL: Duration = Duration::from_secs(2);

fn sets() -> Vec<RangeSet> {
    common::sets(json!({ "type": "hostnic-ipam", "subnet": "10.72.0.0/24", "blockSize": 28 }))
}

fn attachment(id: &str) -> Attachment {
    Attachment::new(NETWORK, id, "eth0")
}

/// ADD of `id`/eth0 through `a`, of `exact` if given: the address.
async fn add(a: &Allocator, id: &str, exact: &[&str]) -> String {
    let allocation = a
        .allocate(&common::request(&attachment(id), &sets(), exact))
        .await
        .unwrap_or_else(|e| panic!("allocate {id}: {e}"));
    allocation.ips[0].ip.to_string()
}

async fn held(a: &Allocator, id: &str) -> bool {
    a.lookup(&attachment(id))
        .await
        .unwrap_or_else(|e| panic!("lookup {id}: {e}"))
        .is_some()
}

/// The block claims of `node` under the allocator's prefix, as block CIDRs.
async fn blocks_of(a: &Allocator, node: &str) -> BTreeSet<String> {
    a.block_claims()
        .await
        .expect("block claims")
        .into_iter()
        .filter(|c| c.node == node)
        .map(|c| c.block.to_string())
        .collect()
}

async fn store(prefix: &str) -> Store {
    Store::connect(&common::config(shared_single(), prefix))
        .await
        .expect("etcd client")
}

fn election(prefix: &str, node: &str) -> Election {
    Election {
        key: format!("{prefix}/leader/{}", leader::CLEANER),
        node: node.into(),
        ttl: TTL,
    }
}

/// The indexes of the candidates that lead now.
fn leaders(candidates: &[Option<Leadership>]) -> Vec<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.as_ref().is_some_and(Leadership::is_leader))
        .map(|(i, _)| i)
        .collect()
}

/// Waits up to `within` for exactly one candidate to lead; its index.
async fn one_leader(candidates: &[Option<Leadership>], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let now = leaders(candidates);
        assert!(now.len() <= 1, "two leaders at once: {now:?}");
        if let [one] = now[..] {
            return one;
        }
        assert!(
            Instant::now() < deadline,
            "no leader within {within:?} ({now:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_three_candidates_leads_and_another_takes_over_within_the_ttl_when_it_stops()
{
    let prefix = unique_prefix("node-gc-election");
    let mut candidates = Vec::new();
    for node in ["e-0", "e-1", "e-2"] {
        candidates.push(Some(Leadership::start(
            store(&prefix).await,
            election(&prefix, node),
        )));
    }
    let first = one_leader(&candidates, Duration::from_secs(5)).await;
    // It stays exactly one over several renewals.
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        assert_eq!(leaders(&candidates), vec![first]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = format!("{prefix}/leader/{}", leader::CLEANER);
    let check = store(&prefix).await;
    let named = check.get("leader key", &key, None).await.expect("read");
    let record: serde_json::Value =
        serde_json::from_slice(named.kvs()[0].value()).expect("leader record decodes");
    assert_eq!(record["node"], format!("e-{first}"), "{record}");
    // audit knows the key and its record.
    let audit = hostnic_ipamd::cli::audit(&common::config(shared_single(), &prefix))
        .await
        .expect("audit");
    let lines = hostnic_ipamd::cli::Outcome::lines(&audit);
    assert!(
        lines.iter().all(|l| !l.contains("/leader/")),
        "audit flags the leader key: {lines:?}"
    );

    // The leader stops without resigning (a killed daemon): another leads once the lease
    // expires: within the TTL, etcd's expiry tick (0.5 s) and one campaign period.
    let stopped = Instant::now();
    drop(candidates[first].take());
    let second = one_leader(&candidates, TTL * 3).await;
    assert_ne!(second, first);
    let took = stopped.elapsed();
    assert!(
        took <= TTL + TTL / 3 + Duration::from_millis(1200),
        "takeover took {took:?} with a {TTL:?} lease"
    );

    // Resigning (a daemon's shutdown) hands over at the next campaign, well within the TTL.
    let resigned = Instant::now();
    candidates[second]
        .take()
        .expect("the second leader")
        .resign()
        .await;
    let third = one_leader(&candidates, TTL * 2).await;
    assert!(third != first && third != second);
    assert!(
        resigned.elapsed() < TTL,
        "handover after resigning took {:?}",
        resigned.elapsed()
    );
    candidates[third].take().expect("the third").resign().await;
    let gone = check.get("leader key", &key, None).await.expect("read");
    assert!(gone.kvs().is_empty(), "the last leader's key is revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_is_revoked_behind_its_back_stops_its_task_at_once_and_campaigns_again(
) {
    let prefix = unique_prefix("node-gc-lost");
    let leadership = Leadership::start(store(&prefix).await, election(&prefix, "l-0"));
    let running = Arc::new(AtomicBool::new(false));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(());
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Counted, not sampled: it campaigns again at once, so a stopped task may be running
    // again before a poll of `running` could see it stopped.
    let stops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = tokio::spawn(leader::while_leader(
        "test task",
        leadership.subscribe(),
        async move {
            let _ = stop_rx.changed().await;
        },
        {
            let (running, runs, stops) =
                (Arc::clone(&running), Arc::clone(&runs), Arc::clone(&stops));
            move |stop| {
                let (running, runs, stops) =
                    (Arc::clone(&running), Arc::clone(&runs), Arc::clone(&stops));
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    running.store(true, Ordering::SeqCst);
                    stop.await;
                    running.store(false, Ordering::SeqCst);
                    stops.fetch_add(1, Ordering::SeqCst);
                }
            }
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !running.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the task never ran as leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An operator (or an etcd restore) takes the lease away.
    let s = store(&prefix).await;
    let key = format!("{prefix}/leader/{}", leader::CLEANER);
    let kv = s.get("leader key", &key, None).await.expect("read");
    let lease = kv.kvs()[0].lease();
    s.client().lease_revoke(lease).await.expect("revoke");
    let revoked = Instant::now();
    // It stops at its next renewal (every third of the TTL), which finds the lease gone: long
    // before the lease would have expired. The rest of the bound is slack for scheduling on a
    // loaded 2-core machine.
    while stops.load(Ordering::SeqCst) == 0 {
        assert!(
            revoked.elapsed() < TTL * 2 / 3,
            "the task still runs {:?} after its lease was revoked",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("the task stopped {:?} after the revoke", revoked.elapsed());
    // It campaigns again, wins the free key, and the task runs again.
    let deadline = Instant::now() + TTL * 2;
    while runs.load(Ordering::SeqCst) < 2 || !running.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the task was not started again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    task.await.expect("while_leader ends at shutdown");
    leadership.resign().await;
}

async fn kube_client(fake: &FakeKube) -> ::kube::Client {
    kube::client(&KubeSource::Kubeconfig(fake.kubeconfig_path().to_owned()))
        .await
        .expect("client")
}

fn released_ids(report: &node_gc::PassReport) -> BTreeSet<String> {
    report
        .released
        .iter()
        .map(|r| r.attachment.container_id.clone())
        .collect()
}

fn verdict<'a>(report: &'a node_gc::PassReport, node: &str) -> &'a Verdict {
    &report
        .nodes
        .iter()
        .find(|(n, _)| n == node)
        .unwrap_or_else(|| panic!("{node} not judged: {:?}", report.nodes))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_releases_a_deleted_nodes_attachments_and_empty_blocks_after_the_grace_and_nothing_else(
) {
    let fake = FakeKube::start().expect("fake API server starts");
    for node in ["n-me", "n-live", "n-dead"] {
        fake.create(fake::node(node)).expect("node created");
    }
    let client = kube_client(&fake).await;
    let prefix = unique_prefix("node-gc-pass");
    let me = common::allocator(shared_single(), &prefix, "n-me").await;
    let live = common::allocator(shared_single(), &prefix, "n-live").await;
    let dead = common::allocator(shared_single(), &prefix, "n-dead").await;
    add(&me, "c-me", &[]).await;
    add(&live, "c-live", &[]).await;
    let dead_ip = add(&dead, "c-dead-1", &[]).await;
    add(&dead, "c-dead-2", &[]).await;
    let dead_blocks = blocks_of(&me, "n-dead").await;
    assert_eq!(dead_blocks.len(), 1, "{dead_blocks:?}");
    // The live node holds an address inside the dead node's block (asked for exactly).
    let block: ipnet::IpNet = dead_blocks
        .iter()
        .next()
        .expect("one")
        .parse()
        .expect("cidr");
    let borrowed = block.hosts().last().expect("host").to_string();
    add(&live, "c-borrowed", &[&borrowed]).await;

    fake.delete_node("n-dead").expect("node deleted");
    let grace = Duration::from_secs(2);
    let mut absences = Absences::default();
    let list = || kube::node_names(&client);
    let before = snapshot(&me).await;

    // The first pass that sees the node gone only starts counting.
    let report = node_gc::pass(&me, list, &mut absences, grace, false)
        .await
        .expect("pass");
    assert!(report.released.is_empty(), "{:?}", report.lines());
    assert!(matches!(
        verdict(&report, "n-dead"),
        Verdict::Keep(Keep::Absent { .. })
    ));
    assert_eq!(verdict(&report, "n-live"), &Verdict::Keep(Keep::InTheApi));
    assert_eq!(verdict(&report, "n-me"), &Verdict::Keep(Keep::ThisNode));
    assert_eq!(snapshot(&me).await, before, "nothing before the grace");

    // A dry run past the grace says what it would do and writes nothing.
    tokio::time::sleep(grace).await;
    let report = node_gc::pass(&me, list, &mut absences.clone(), grace, true)
        .await
        .expect("dry run");
    assert_eq!(
        released_ids(&report),
        BTreeSet::from(["c-dead-1".to_string(), "c-dead-2".to_string()])
    );
    assert!(
        report.lines().iter().any(|l| l.starts_with(&format!(
            "would release c-dead-1/eth0 of network {NETWORK} ({dead_ip}) of node n-dead: node n-dead deleted from the Kubernetes API"
        ))),
        "{:?}",
        report.lines()
    );
    assert_eq!(snapshot(&me).await, before, "a dry run writes nothing");

    // The API cannot list the nodes: nothing is judged, nothing written.
    fake.set_fault(Fault::Status(503));
    let report = node_gc::pass(&me, list, &mut absences, grace, false)
        .await
        .expect("pass");
    fake.clear_fault();
    assert!(report.api_error.is_some(), "{:?}", report.lines());
    assert!(report.released.is_empty() && report.nodes.is_empty());
    assert_eq!(snapshot(&me).await, before, "nothing while the API fails");

    // Past the grace: the dead node's attachments go; its block stays claimed while the live
    // node holds an address in it.
    let report = node_gc::pass(&me, list, &mut absences, grace, false)
        .await
        .expect("pass");
    assert_eq!(
        released_ids(&report),
        BTreeSet::from(["c-dead-1".to_string(), "c-dead-2".to_string()]),
        "{:?}",
        report.lines()
    );
    assert!(report.failed.is_empty(), "{:?}", report.lines());
    assert_eq!(report.blocks_held.len(), 1, "{:?}", report.lines());
    for id in ["c-dead-1", "c-dead-2"] {
        assert!(!held(&me, id).await, "{id} released");
    }
    for id in ["c-me", "c-live", "c-borrowed"] {
        assert!(held(&me, id).await, "{id} kept");
    }
    assert_eq!(blocks_of(&me, "n-dead").await, dead_blocks);
    assert!(!blocks_of(&me, "n-live").await.is_empty());
    assert!(!blocks_of(&me, "n-me").await.is_empty());

    // Once the borrowed address is released, the next pass gives the block back.
    live.release(&attachment("c-borrowed"))
        .await
        .expect("DEL of the borrowed address");
    let report = node_gc::pass(&me, list, &mut absences, grace, false)
        .await
        .expect("pass");
    assert_eq!(report.blocks.len(), 1, "{:?}", report.lines());
    assert!(blocks_of(&me, "n-dead").await.is_empty());
    assert!(!blocks_of(&me, "n-live").await.is_empty());

    // A node etcd no longer knows is not judged any more.
    let report = node_gc::pass(&me, list, &mut absences, grace, false)
        .await
        .expect("pass");
    assert!(
        report.nodes.iter().all(|(n, _)| n != "n-dead"),
        "{:?}",
        report.nodes
    );
    assert!(held(&me, "c-me").await && held(&me, "c-live").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_by_a_daemon_whose_node_the_api_does_not_list_judges_nothing() {
    let fake = FakeKube::start().expect("fake API server starts");
    fake.create(fake::node("w-live")).expect("node created");
    let client = kube_client(&fake).await;
    let prefix = unique_prefix("node-gc-wrong-cluster");
    let live = common::allocator(shared_single(), &prefix, "w-live").await;
    add(&live, "c-live", &[]).await;
    // A daemon named after no node of this API (a wrong --node-name, another cluster's
    // kubeconfig) sees every node as gone: it must judge none.
    let stranger = common::allocator(shared_single(), &prefix, "w-stranger").await;
    let other = common::allocator(shared_single(), &prefix, "w-other").await;
    add(&other, "c-other", &[]).await;
    let before = snapshot(&live).await;
    let report = node_gc::pass(
        &stranger,
        || kube::node_names(&client),
        &mut Absences::default(),
        Duration::ZERO,
        false,
    )
    .await
    .expect("pass");
    let error = report.api_error.clone().expect("refused");
    assert!(error.contains("w-stranger"), "{error}");
    assert_eq!(snapshot(&live).await, before);
}

/// Runs `hostnic-ipamd gc-nodes` as `node` against the shared etcd with `kubeconfig`, never
/// the caller's own Kubernetes; returns success and stdout + stderr.
fn gc_nodes(prefix: &str, node: &str, kubeconfig: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"));
    cmd.arg("gc-nodes")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_nodes_dry_run_changes_nothing_an_api_answering_503_frees_nothing_and_then_only_the_deleted_nodes_leftovers_go(
) {
    let fake = FakeKube::start().expect("fake API server starts");
    for node in ["g-me", "g-live", "g-dead"] {
        fake.create(fake::node(node)).expect("node created");
    }
    let prefix = unique_prefix("node-gc-command");
    let me = common::allocator(shared_single(), &prefix, "g-me").await;
    let live = common::allocator(shared_single(), &prefix, "g-live").await;
    let dead = common::allocator(shared_single(), &prefix, "g-dead").await;
    add(&live, "c-live", &[]).await;
    let dead_ip = add(&dead, "c-dead", &[]).await;
    drop(dead);
    fake.delete_node("g-dead").expect("node deleted");
    let kubeconfig = Some(fake.kubeconfig_path());
    let before = snapshot(&me).await;

    let (ok, out) = gc_nodes(&prefix, "g-me", None, &[]);
    assert!(!ok && out.contains("--kubeconfig"), "{out}");

    let (ok, out) = gc_nodes(&prefix, "g-me", kubeconfig, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "would release c-dead/eth0 of network {NETWORK} ({dead_ip}) of node g-dead: node g-dead deleted from the Kubernetes API"
        )),
        "{out}"
    );
    assert!(out.contains("would give back block"), "{out}");
    assert_eq!(snapshot(&me).await, before, "a dry run writes nothing");

    fake.set_fault(Fault::Status(503));
    let (ok, out) = gc_nodes(&prefix, "g-me", kubeconfig, &[]);
    fake.clear_fault();
    assert!(!ok, "an API that cannot answer fails the command: {out}");
    assert!(out.contains("judged no node"), "{out}");
    assert_eq!(snapshot(&me).await, before, "nothing while the API fails");

    let (ok, out) = gc_nodes(&prefix, "g-me", kubeconfig, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "released c-dead/eth0 of network {NETWORK} ({dead_ip}) of node g-dead"
        )) && out.contains("gave back block"),
        "{out}"
    );
    assert!(!held(&me, "c-dead").await);
    assert!(held(&me, "c-live").await);
    assert!(blocks_of(&me, "g-dead").await.is_empty());
    assert!(!blocks_of(&me, "g-live").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_elected_daemon_releases_a_deleted_nodes_attachment_and_logs_why() {
    if !hostnic_testkit::require_root(
        "deleted-node GC daemon test (the daemon serves only from a root-owned socket directory)",
    ) {
        return;
    }
    let fake = FakeKube::start().expect("fake API server starts");
    for node in ["d-me", "d-live", "d-dead"] {
        fake.create(fake::node(node)).expect("node created");
    }
    let prefix = unique_prefix("node-gc-daemon");
    let observer = common::allocator(shared_single(), &prefix, "d-live").await;
    add(&observer, "c-live", &[]).await;
    let dead = common::allocator(shared_single(), &prefix, "d-dead").await;
    let dead_ip = add(&dead, "c-dead", &[]).await;
    drop(dead);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = fake.kubeconfig_path().to_str().expect("utf-8").to_owned();
    let mut daemon = IpamDaemon::start(
        Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
        &shared_single().endpoints(),
        "d-me",
        &prefix,
        &dir.path().join("run/ipamd.sock"),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--node-gc-interval-seconds",
            "1",
            "--gc-grace-seconds",
            "1",
            "--leader-lease-seconds",
            "2",
            "--pod-gc-interval-seconds",
            "0",
            "--netns-gc-interval-seconds",
            "0",
        ],
    )
    .expect("daemon starts");
    // Alive in the API: kept over several passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(held(&observer, "c-dead").await, "{}", daemon.log_tail());
    fake.delete_node("d-dead").expect("node deleted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&observer, "c-dead").await {
        assert!(
            Instant::now() < deadline,
            "the deleted node's attachment was not released:\n{}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(held(&observer, "c-live").await);
    // The pass logs its releases once it is over (after giving back the node's block), a
    // moment after the release shows in etcd.
    let logged = |log: &str| {
        log.contains("released attachment of a deleted node")
            && log.contains(&dead_ip)
            && log.contains("node d-dead deleted from the Kubernetes API")
    };
    let log = daemon.log_tail_once(logged, Duration::from_secs(5));
    assert!(logged(&log), "{log}");
    // At shutdown it resigns: the leader key goes at once, not after the TTL.
    daemon.stop();
    let key = format!("{prefix}/leader/{}", leader::CLEANER);
    let left = observer
        .store()
        .get("leader key", &key, None)
        .await
        .expect("read");
    assert!(left.kvs().is_empty(), "the daemon resigned at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_etcd_knows_are_each_listed_once_even_when_their_names_prefix_each_other() {
    let prefix = unique_prefix("node-gc-known");
    let mut allocators = Vec::new();
    for (i, node) in ["k", "k-1", "k.1", "k-10"].into_iter().enumerate() {
        let a = common::allocator(shared_single(), &prefix, node).await;
        add(&a, &format!("c-{i}-a"), &[]).await;
        add(&a, &format!("c-{i}-b"), &[]).await;
        allocators.push(a);
    }
    let known = allocators[0].indexed_nodes().await.expect("nodes");
    assert_eq!(
        known,
        BTreeSet::from(["k", "k-1", "k.1", "k-10"].map(String::from))
    );
    for node in ["k", "k-1", "k.1", "k-10"] {
        let held = allocators[0].attachments_of(node).await.expect("listed");
        assert_eq!(held.len(), 2, "{node}: {held:?}");
        assert!(held.iter().all(|h| h.record.node == node), "{held:?}");
    }
}
