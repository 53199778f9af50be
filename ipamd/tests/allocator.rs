//! The allocator against a real etcd: a single member and a 3-member loopback cluster shared
//! by the tests of this binary, each test under its own key prefix.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostnic_ipamd::audit::audit;
use hostnic_ipamd::{AllocateRequest, Allocator, Attachment, IpamError, RangeSet};
use hostnic_testkit::{shared_cluster3, shared_single, unique_prefix, EtcdCluster};

mod common;
use common::{allocator, config, ips, sets};
use serde_json::json;

fn request(container: &str, range_sets: &[RangeSet], requested: &[&str]) -> AllocateRequest {
    common::request(
        &Attachment::new("test-net", container, "eth0"),
        range_sets,
        requested,
    )
}

/// Number of keys under `prefix`, to prove that failed requests wrote nothing.
async fn key_count(a: &Allocator) -> usize {
    let (_, kvs) = a
        .store()
        .load_prefix(a.keys().prefix())
        .await
        .expect("scan");
    kvs.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_with_64_tasks_each_exhaust_a_slash_22_exactly_once_on_three_members() {
    let cluster = shared_cluster3();
    let prefix = unique_prefix("exhaust");
    let pool = sets(json!({"subnet": "10.20.0.0/22"}));
    let mut nodes = Vec::new();
    for n in 0..4 {
        nodes.push(Arc::new(
            allocator(cluster, &prefix, &format!("node-{n}")).await,
        ));
    }
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..64 {
            let (node, pool) = (Arc::clone(node), pool.clone());
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0.. {
                    let req = request(&format!("c{n}x{t}x{i}"), &pool, &[]);
                    match node.allocate(&req).await {
                        Ok(a) => got.push(a.ips[0].ip),
                        Err(IpamError::Exhausted { pools, .. }) => {
                            assert_eq!(pools, "10.20.0.0/22");
                            return got;
                        }
                        Err(e) => panic!("node-{n} task {t}: {e}"),
                    }
                }
                unreachable!()
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let unique: HashSet<IpAddr> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "an address was handed out twice");
    assert_eq!(
        all.len(),
        1024 - 3,
        "every usable address of the /22 is handed out"
    );
    for ip in ["10.20.0.0", "10.20.0.1", "10.20.3.255"] {
        assert!(
            !unique.contains(&ip.parse().expect("literal")),
            "{ip} must never be handed out"
        );
    }

    let err = nodes[0]
        .allocate(&request("one-more", &pool, &[]))
        .await
        .expect_err("pool is full");
    assert!(
        err.to_string().contains("pool exhausted") && err.to_string().contains("10.20.0.0/22"),
        "{err}"
    );

    let report = audit(nodes[1].store(), nodes[1].keys())
        .await
        .expect("scan");
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.allocations.len(), 1021);
    assert_eq!(report.attachments.len(), 1021);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_racing_for_one_exact_address_have_exactly_one_winner() {
    let cluster = shared_cluster3();
    let prefix = unique_prefix("exact-race");
    let pool = sets(json!({"subnet": "10.30.0.0/24"}));
    let mut tasks = Vec::new();
    for n in 0..6 {
        let node = allocator(cluster, &prefix, &format!("node-{n}")).await;
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            node.allocate(&request(&format!("racer{n}"), &pool, &["10.30.0.77"]))
                .await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(a) => winners.push(a),
            Err(e) => losers.push(e),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner, losers: {losers:?}");
    let winner = &winners[0].attachment.container_id;
    for e in &losers {
        assert!(matches!(e, IpamError::AddressInUse { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("pod-{winner}")),
            "error names the holder: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_twice_returns_the_same_address_and_del_is_idempotent() {
    let cluster = shared_single();
    let prefix = unique_prefix("idempotent");
    let a = allocator(cluster, &prefix, "node-a").await;
    let pool = sets(json!({"subnet": "10.40.0.0/24"}));
    let req = request("ctr1", &pool, &[]);
    let first = a.allocate(&req).await.expect("add");
    let second = a.allocate(&req).await.expect("add again");
    assert_eq!(ips(&first), ips(&second));
    assert_eq!(
        a.lookup(&req.attachment)
            .await
            .expect("lookup")
            .map(|x| ips(&x)),
        Some(ips(&first))
    );

    // Another node running the same ADD for the same attachment gets the same answer too.
    let b = allocator(cluster, &prefix, "node-b").await;
    assert_eq!(ips(&b.allocate(&req).await.expect("add on b")), ips(&first));

    assert!(a
        .release(&Attachment::new("test-net", "never-added", "eth0"))
        .await
        .expect("del unknown")
        .is_none());
    let released = a
        .release(&req.attachment)
        .await
        .expect("del")
        .expect("held something");
    assert_eq!(
        released.ips.iter().map(|x| x.ip).collect::<Vec<_>>(),
        ips(&first)
    );
    assert!(a
        .release(&req.attachment)
        .await
        .expect("del twice")
        .is_none());
    assert!(b
        .release(&req.attachment)
        .await
        .expect("del on another node")
        .is_none());
    assert_eq!(a.lookup(&req.attachment).await.expect("lookup"), None);

    let report = audit(a.store(), a.keys()).await.expect("scan");
    assert!(
        report.allocations.is_empty() && report.attachments.is_empty(),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_address_is_not_handed_out_again_at_once() {
    let cluster = shared_single();
    let prefix = unique_prefix("no-reuse");
    let a = allocator(cluster, &prefix, "node-a").await;
    let pool = sets(json!({"subnet": "10.41.0.0/24"}));
    let first = a.allocate(&request("r1", &pool, &[])).await.expect("add");
    a.release(&Attachment::new("test-net", "r1", "eth0"))
        .await
        .expect("del");
    let second = a.allocate(&request("r2", &pool, &[])).await.expect("add");
    assert_ne!(ips(&first), ips(&second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_allocator_sees_every_existing_allocation() {
    let cluster = shared_single();
    let prefix = unique_prefix("restart");
    let pool = sets(json!({"subnet": "10.50.0.0/26", "blockSize": 28}));
    let before: HashSet<IpAddr> = {
        let a = allocator(cluster, &prefix, "node-a").await;
        let mut held = HashSet::new();
        for i in 0..30 {
            held.extend(ips(&a
                .allocate(&request(&format!("old{i}"), &pool, &[]))
                .await
                .expect("add")));
        }
        held
    };
    // A fresh instance, same node name (a restarted daemon) and another node.
    for node in ["node-a", "node-b"] {
        let fresh = allocator(cluster, &prefix, node).await;
        let mut i = 0;
        loop {
            match fresh
                .allocate(&request(&format!("{node}-new{i}"), &pool, &[]))
                .await
            {
                Ok(a) => assert!(
                    !before.contains(&a.ips[0].ip),
                    "{node} handed out {} again",
                    a.ips[0].ip
                ),
                Err(IpamError::Exhausted { .. }) => break,
                Err(e) => panic!("{e}"),
            }
            i += 1;
        }
        // Leave the pool as it was for the next instance.
        for j in 0..i {
            fresh
                .release(&Attachment::new(
                    "test-net",
                    format!("{node}-new{j}"),
                    "eth0",
                ))
                .await
                .expect("del");
        }
        assert_eq!(i, 64 - 3 - 30, "{node} found exactly the free addresses");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_gets_one_address_per_range_set_in_one_transaction() {
    let cluster = shared_single();
    let prefix = unique_prefix("dual");
    let a = allocator(cluster, &prefix, "node-a").await;
    let pool =
        sets(json!({"ranges": [[{"subnet": "10.60.0.0/24"}], [{"subnet": "fd00:60::/120"}]]}));
    let got = a
        .allocate(&request("dual", &pool, &["fd00:60::42"]))
        .await
        .expect("add");
    assert_eq!(got.ips.len(), 2);
    assert!(got.ips[0].ip.is_ipv4());
    assert_eq!(
        got.ips[1].ip,
        "fd00:60::42".parse::<IpAddr>().expect("literal")
    );
    assert_eq!(got.ips[1].address().to_string(), "fd00:60::42/120");

    // The IPv6 address is taken: a second attachment asking for it gets nothing at all,
    // not even the IPv4 address of the first range set.
    let keys_before = key_count(&a).await;
    let err = a
        .allocate(&request("dual2", &pool, &["fd00:60::42"]))
        .await
        .expect_err("held");
    assert!(
        err.to_string()
            .contains("fd00:60::42 is held by pod default/pod-dual"),
        "{err}"
    );
    assert_eq!(key_count(&a).await, keys_before, "nothing half-written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_write_nothing_to_etcd() {
    let cluster = shared_single();
    let prefix = unique_prefix("rejected");
    let a = allocator(cluster, &prefix, "node-a").await;
    let pool = sets(json!({"subnet": "10.70.0.0/24", "exclude": ["10.70.0.9"]}));
    a.allocate(&request("first", &pool, &[]))
        .await
        .expect("defines the pool");
    let keys_before = key_count(&a).await;

    let redefined = sets(json!({"subnet": "10.70.0.0/24", "gateway": "10.70.0.254"}));
    let err = a
        .allocate(&request("conflict", &redefined, &[]))
        .await
        .expect_err("conflict");
    let text = err.to_string();
    assert!(
        text.contains("10.70.0.0/24")
            && text.contains("gateway: 10.70.0.1 (stored) vs 10.70.0.254"),
        "{text}"
    );

    let overlapping = sets(json!({"subnet": "10.70.0.0/23"}));
    let err = a
        .allocate(&request("overlap", &overlapping, &[]))
        .await
        .expect_err("overlap");
    assert!(matches!(err, IpamError::PoolOverlap { .. }), "{err}");

    for (ip, reason) in [
        ("10.71.0.5", "outside every subnet"),
        ("10.70.0.1", "gateway"),
        ("10.70.0.9", "excluded"),
        ("10.70.0.255", "broadcast"),
    ] {
        let err = a
            .allocate(&request("bad-ip", &pool, &[ip]))
            .await
            .expect_err(ip);
        assert!(
            err.to_string().contains(reason) && err.to_string().contains(ip),
            "{err}"
        );
    }
    let err = a
        .allocate(&request("bad/handle", &pool, &[]))
        .await
        .expect_err("slash");
    assert!(matches!(err, IpamError::InvalidAttachment { .. }), "{err}");
    assert_eq!(
        key_count(&a).await,
        keys_before,
        "no rejected request wrote anything"
    );
}

/// One allocation as a kubelet sees it: from the first try to the answer, across the retries
/// it made while told to try again later.
struct Served {
    attachment: Attachment,
    ip: IpAddr,
    started: Instant,
    ended: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_mid_run_loses_no_allocation_and_duplicates_none() {
    const TASKS_PER_NODE: usize = 16;
    // A bound on each task, so that a run much longer than planned fails on its own assertion
    // instead of exhausting the pool: 48 tasks x 150 stay below the /19's 8190 addresses.
    const MAX_PER_TASK: usize = 150;
    // A cluster of its own: this test kills members.
    let cluster = EtcdCluster::start(3).expect("3-member etcd");
    let prefix = unique_prefix("leader-kill");
    let pool = sets(json!({"subnet": "10.80.0.0/19"}));
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(Arc::new(
            allocator(&cluster, &prefix, &format!("node-{n}")).await,
        ));
    }
    // Every task allocates back to back until told to stop, which is only after etcd has a
    // leader again: whenever the leader is absent, every task has a request in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let served_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..TASKS_PER_NODE {
            let (node, pool) = (Arc::clone(node), pool.clone());
            let (stop, served_count) = (Arc::clone(&stop), Arc::clone(&served_count));
            tasks.push(tokio::spawn(async move {
                let mut served = Vec::new();
                let mut retries = 0;
                let mut stopped = false;
                for i in 0..MAX_PER_TASK {
                    if stop.load(Ordering::Acquire) {
                        stopped = true;
                        break;
                    }
                    let req = request(&format!("k{n}x{t}x{i}"), &pool, &[]);
                    let started = Instant::now();
                    // Like a kubelet: retry the same attachment while told to try again later.
                    let ip = loop {
                        match node.allocate(&req).await {
                            Ok(a) => break a.ips[0].ip,
                            Err(e) if e.is_retryable() => retries += 1,
                            Err(e) => panic!("node-{n}: {e}"),
                        }
                    };
                    served.push(Served {
                        attachment: req.attachment.clone(),
                        ip,
                        started,
                        ended: Instant::now(),
                    });
                    served_count.fetch_add(1, Ordering::Relaxed);
                }
                (served, retries, stopped || stop.load(Ordering::Acquire))
            }));
        }
    }
    // Kill the leader once the run is under way: a few allocations per task, blocks claimed.
    let warm_up = Instant::now() + Duration::from_secs(30);
    while served_count.load(Ordering::Relaxed) < 8 * tasks.len() {
        assert!(Instant::now() < warm_up, "no allocations before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Blocking HTTP polls of the members: off the runtime's async path.
    let (leader, killed_at, leaderless_at, recovered_at) = tokio::task::block_in_place(|| {
        let leader = cluster.leader().expect("a leader");
        cluster.kill_member(leader);
        let killed_at = Instant::now();
        // The last instant at which no member was leader: a poll that finds none started
        // then (each member answers for itself, and a leader elected mid-poll stays leader).
        let mut leaderless_at = None;
        let deadline = killed_at + Duration::from_secs(15);
        loop {
            let polled = Instant::now();
            if cluster.leader().is_some() {
                break (leader, killed_at, leaderless_at, Instant::now());
            }
            leaderless_at = Some(polled);
            assert!(Instant::now() < deadline, "no new leader within 15 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    stop.store(true, Ordering::Release);
    cluster.restart_member(leader).expect("member rejoins");

    let mut all = Vec::new();
    let mut retries = 0;
    for t in tasks {
        let (served, r, stopped) = t.await.expect("task");
        assert!(
            stopped,
            "a task made {MAX_PER_TASK} allocations before etcd had a leader again"
        );
        all.extend(served);
        retries += r;
    }
    let leaderless_at = leaderless_at.expect(
        "every poll after the kill found a leader: the election cannot have been that fast",
    );
    // The requests that met the outage: in flight at an instant when etcd had no leader. All
    // of them are in `all`, so each was answered with an address.
    let met_outage = all
        .iter()
        .filter(|s| s.started <= leaderless_at && s.ended >= leaderless_at)
        .count();
    let spanned_outage = all
        .iter()
        .filter(|s| s.started <= killed_at && s.ended >= recovered_at)
        .count();
    eprintln!(
        "{} allocations; leader gone for {:?} (last seen leaderless {:?} after the kill); {met_outage} requests in flight while leaderless, {spanned_outage} across the whole outage; {retries} surfaced as try-again (the store retried the rest within its budget)",
        all.len(),
        recovered_at - killed_at,
        leaderless_at - killed_at,
    );
    assert!(
        met_outage > 0,
        "no request was in flight while etcd had no leader"
    );
    let unique: HashSet<IpAddr> = all.iter().map(|s| s.ip).collect();
    assert_eq!(unique.len(), all.len(), "an address was handed out twice");
    let report = audit(nodes[0].store(), nodes[0].keys())
        .await
        .expect("scan");
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(
        report.allocations.len(),
        all.len(),
        "no leaked or lost address ({retries} retries)"
    );
    for s in &all {
        let (_, held) = &report.attachments[&s.attachment];
        assert_eq!(held.ips.len(), 1);
        assert_eq!(
            held.ips[0].ip, s.ip,
            "{} holds what it was told",
            s.attachment
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_authentication_needs_the_configured_user() {
    // A member of its own: this test turns authentication on.
    let cluster = EtcdCluster::start(1).expect("etcd");
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(cluster.endpoints().join(","))
            .args(args)
            .output()
            .expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    etcdctl(&["user", "add", "root:rootpw"]);
    etcdctl(&["user", "add", "ipam:ipampw"]);
    etcdctl(&["role", "add", "ipam"]);
    etcdctl(&[
        "role",
        "grant-permission",
        "ipam",
        "--prefix=true",
        "readwrite",
        "/auth/",
    ]);
    etcdctl(&["user", "grant-role", "ipam", "ipam"]);
    etcdctl(&["auth", "enable"]);

    let pool = sets(json!({"subnet": "10.85.0.0/24"}));
    let mut config = config(&cluster, "/auth/ipam");
    config.retry_timeout = std::time::Duration::from_millis(500);
    let anonymous = Allocator::start(&config, "node-a")
        .await
        .expect("client builds");
    let err = anonymous
        .allocate(&request("anon", &pool, &[]))
        .await
        .expect_err("refused");
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("user name is empty"),
        "the cause is named: {err}"
    );

    config.username = Some("ipam".into());
    config.password = Some("ipampw".into());
    let authed = Allocator::start(&config, "node-a")
        .await
        .expect("authenticates");
    authed
        .ready()
        .await
        .expect("loads with the user's permissions");
    let got = authed
        .allocate(&request("authed", &pool, &[]))
        .await
        .expect("allocates");
    assert_eq!(got.ips.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_allocates_inside_the_blocks_it_claimed() {
    let cluster = shared_single();
    let prefix = unique_prefix("affinity");
    let pool = sets(json!({"subnet": "10.86.0.0/22", "blockSize": 26}));
    let a = allocator(cluster, &prefix, "node-a").await;
    let b = allocator(cluster, &prefix, "node-b").await;
    // 40 of a /26's 62: short of the quarter left free that claims the next block ahead.
    for i in 0..40 {
        a.allocate(&request(&format!("a{i}"), &pool, &[]))
            .await
            .expect("a");
        b.allocate(&request(&format!("b{i}"), &pool, &[]))
            .await
            .expect("b");
    }
    let (_, kvs) = a
        .store()
        .load_prefix(&a.keys().pools())
        .await
        .expect("scan");
    let mut owner = std::collections::HashMap::new();
    for kv in &kvs {
        let key = kv.key_str().expect("utf8");
        if let Some(hostnic_ipamd::records::KeyRef::Block { block, .. }) = a.keys().parse(key) {
            let record: serde_json::Value = serde_json::from_slice(kv.value()).expect("json");
            owner.insert(block, record["node"].as_str().expect("node").to_string());
        }
    }
    assert_eq!(
        owner.len(),
        2,
        "one /26 block each for 40 addresses: {owner:?}"
    );
    let report = audit(a.store(), a.keys()).await.expect("scan");
    for ((_, ip), record) in &report.allocations {
        let block = ipnet::IpNet::new(*ip, 26).expect("prefix").trunc();
        assert_eq!(
            owner[&block], record.node,
            "{ip} of {} lies in {block} of {}",
            record.node, owner[&block]
        );
    }
}

/// How many blocks of the pool of `subnet` `a` knows claimed by `node`.
fn blocks_of(a: &Allocator, subnet: &str, node: &str) -> u64 {
    let usage = a.pool_usage();
    let pool = usage.iter().find(|(s, _)| s == subnet);
    pool.and_then(|(_, u)| u.blocks.get(node).copied())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claims_its_next_block_before_its_blocks_fill() {
    let cluster = shared_single();
    let prefix = unique_prefix("ahead");
    let subnet = "10.88.0.0/22";
    let pool = sets(json!({"subnet": subnet, "blockSize": 26}));
    let a = allocator(cluster, &prefix, "node-a").await;
    let add = |i: usize| {
        let req = request(&format!("a{i}"), &pool, &[]);
        let a = &a;
        async move { a.allocate(&req).await }
    };
    for i in 0..46 {
        add(i).await.expect("a");
    }
    assert_eq!(blocks_of(&a, subnet, "node-a"), 1, "16 of 62 free");
    add(46).await.expect("a");
    eventually("a second block claimed with 15 left free", || {
        blocks_of(&a, subnet, "node-a") == 2
    })
    .await;
    let mut handed = HashSet::new();
    for i in 47..100 {
        handed.insert(ips(&add(i).await.expect("a"))[0]);
    }
    let second: ipnet::IpNet = "10.88.0.64/26".parse().expect("literal");
    assert_eq!(
        handed.iter().filter(|ip| second.contains(*ip)).count(),
        38,
        "the 15 left, then 38 of the block claimed ahead"
    );
    assert_eq!(
        blocks_of(&a, subnet, "node-a"),
        2,
        "26 of 64 free: no third block"
    );
    assert_eq!(
        a.claims_sent(),
        2,
        "the first block, then the second ahead: no ADD waited for a claim of its own"
    );
    let b = allocator(cluster, &prefix, "node-b").await;
    let got = b.allocate(&request("b0", &pool, &[])).await.expect("b");
    let third: ipnet::IpNet = "10.88.0.128/26".parse().expect("literal");
    assert!(third.contains(&ips(&got)[0]), "{:?}", ips(&got));
}

/// Past half of the pool claimed, blocks are claimed only when an ADD finds no free address:
/// ADDs that find none at the same moment wait for one claim instead of each sending its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_that_need_a_block_at_once_send_one_claim() {
    let cluster = shared_single();
    let prefix = unique_prefix("one-claim");
    let subnet = "10.89.0.0/24";
    let pool = sets(json!({"subnet": subnet, "blockSize": 26}));
    for node in ["node-b", "node-c"] {
        let other = allocator(cluster, &prefix, node).await;
        other
            .allocate(&request(node, &pool, &[]))
            .await
            .expect("one block each");
    }
    let a = Arc::new(allocator(cluster, &prefix, "node-a").await);
    // The third block, .128/26: 64 dynamic addresses.
    for i in 0..64 {
        a.allocate(&request(&format!("a{i}"), &pool, &[]))
            .await
            .expect("a");
    }
    assert_eq!(
        a.claims_sent(),
        1,
        "half of the pool claimed: nothing ahead"
    );
    let burst: Vec<_> = (0..16)
        .map(|i| {
            let (a, req) = (Arc::clone(&a), request(&format!("burst{i}"), &pool, &[]));
            tokio::spawn(async move { a.allocate(&req).await })
        })
        .collect();
    let last: ipnet::IpNet = "10.89.0.192/26".parse().expect("literal");
    for add in burst {
        let got = add.await.expect("task").expect("burst ADD");
        assert!(last.contains(&ips(&got)[0]), "{:?}", ips(&got));
    }
    assert_eq!(a.claims_sent(), 2, "one claim for the 16 ADDs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_one_node_reaches_another_node_through_the_watch() {
    let cluster = shared_single();
    let prefix = unique_prefix("watch");
    let pool = sets(json!({"subnet": "10.87.0.0/29", "blockSize": 29}));
    let a = allocator(cluster, &prefix, "node-a").await;
    let b = allocator(cluster, &prefix, "node-b").await;
    // /29: 8 addresses minus network, broadcast and gateway.
    for i in 0..5 {
        a.allocate(&request(&format!("w{i}"), &pool, &[]))
            .await
            .expect("a");
    }
    let err = b
        .allocate(&request("late", &pool, &[]))
        .await
        .expect_err("full");
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    // A repeated ADD of an attachment that holds an address still gets it from a full pool.
    let again = a
        .allocate(&request("w1", &pool, &[]))
        .await
        .expect("repeated ADD on a full pool");
    let held = a
        .lookup(&Attachment::new("test-net", "w1", "eth0"))
        .await
        .expect("lookup")
        .expect("held");
    assert_eq!(ips(&again), ips(&held));
    let status = b
        .status(&pool, "test-net")
        .await
        .expect_err("CNI STATUS reports the exhaustion");
    assert!(matches!(status, IpamError::Exhausted { .. }), "{status}");
    let freed = a
        .release(&Attachment::new("test-net", "w3", "eth0"))
        .await
        .expect("release")
        .expect("held");
    // b learns of the release from its watch, not from a restart or a scan.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let got = loop {
        match b.allocate(&request("late", &pool, &[])).await {
            Ok(got) => break got,
            Err(IpamError::Exhausted { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(got.ips[0].ip, freed.ips[0].ip);
    a.release(&Attachment::new("test-net", "w0", "eth0"))
        .await
        .expect("release");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while b.status(&pool, "test-net").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "STATUS stays failed after a release"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits up to 5 s until `done` holds, failing with `what` (what should have happened).
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `a` counts `held` addresses held in the pool of `subnet`, as far as it follows it,
/// and knows a block of it claimed by `claimed_by`.
fn sees(a: &Allocator, subnet: &str, held: Option<u128>, claimed_by: Option<&str>) -> bool {
    a.pool_usage().iter().any(|(s, u)| {
        s == subnet
            && held.is_none_or(|h| u.held == h)
            && claimed_by.is_none_or(|node| u.blocks.contains_key(node))
    })
}

/// `a`'s count of watch events once it stays the same for 300 ms.
async fn quiet(a: &Allocator) -> u64 {
    loop {
        let seen = a.watch_events();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if a.watch_events() == seen {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_in_another_nodes_block_costs_this_node_no_watch_event() {
    let cluster = shared_single();
    let prefix = unique_prefix("fan-out");
    let pool = sets(json!({"subnet": "10.88.0.0/24", "blockSize": 26}));
    let a = allocator(cluster, &prefix, "node-a").await;
    let b = allocator(cluster, &prefix, "node-b").await;
    a.allocate(&request("a0", &pool, &[])).await.expect("a");
    b.allocate(&request("b0", &pool, &[])).await.expect("b");
    // a learns of b's block claim: claims reach every node.
    eventually("a sees b's claim", || {
        sees(&a, "10.88.0.0/24", None, Some("node-b"))
    })
    .await;
    // And has had every change so far: its own a0 may come on its block's watch after b's claim.
    let before = quiet(&a).await;

    for i in 1..=20 {
        b.allocate(&request(&format!("b{i}"), &pool, &[]))
            .await
            .expect("b");
    }
    for i in 1..=10 {
        b.release(&Attachment::new("test-net", format!("b{i}"), "eth0"))
            .await
            .expect("release");
    }
    // b takes an exact address in a's block: that one a follows.
    b.allocate(&request("b-exact", &pool, &["10.88.0.40"]))
        .await
        .expect("exact address in a's block");
    eventually("the change in a's block reaches a", || {
        a.watch_events() > before
    })
    .await;
    assert_eq!(
        (a.watch_events(), quiet(&a).await),
        (before + 1, before + 1),
        "30 changes in b's block cost a nothing; the one in a's block is delivered"
    );
    let usage = &a.pool_usage()[0].1;
    assert_eq!(
        usage.held, 2,
        "a0 and b's exact address, nothing of b's block"
    );
    let got = a.allocate(&request("a1", &pool, &[])).await.expect("a");
    assert_eq!(ips(&got), vec!["10.88.0.3".parse::<IpAddr>().expect("ip")]);
    for i in 2..=38 {
        a.allocate(&request(&format!("a{i}"), &pool, &[]))
            .await
            .expect("a");
    }
    let skipped = a
        .lookup(&Attachment::new("test-net", "a38", "eth0"))
        .await
        .expect("lookup")
        .expect("held");
    assert_eq!(
        ips(&skipped),
        vec!["10.88.0.41".parse::<IpAddr>().expect("ip")],
        "a skips the address b holds in a's block"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_pool_made_after_a_node_started_is_followed_whole() {
    let cluster = shared_single();
    let prefix = unique_prefix("v6-later");
    let a = allocator(cluster, &prefix, "node-a").await;
    let b = allocator(cluster, &prefix, "node-b").await;
    let pool = sets(json!({"subnet": "fd00:61::/120"}));
    b.allocate(&request("b0", &pool, &[])).await.expect("b");
    // a learns of the pool from the pool index, then reads and watches its addresses.
    eventually("a counts 1 held", || {
        sees(&a, "fd00:61::/120", Some(1), None)
    })
    .await;
    b.allocate(&request("b1", &pool, &[])).await.expect("b");
    eventually("a counts 2 held", || {
        sees(&a, "fd00:61::/120", Some(2), None)
    })
    .await;
    b.release(&Attachment::new("test-net", "b0", "eth0"))
        .await
        .expect("release");
    eventually("a counts 1 held", || {
        sees(&a, "fd00:61::/120", Some(1), None)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_without_the_pool_index_follows_the_pools_the_records_name() {
    let cluster = shared_single();
    let prefix = unique_prefix("no-index");
    let pool = sets(json!({"subnet": "10.89.0.0/24", "blockSize": 26}));
    let a = allocator(cluster, &prefix, "node-a").await;
    a.allocate(&request("a0", &pool, &[])).await.expect("a");
    let mut client = a.store().client();
    client
        .delete(a.keys().pool_index(), None)
        .await
        .expect("delete the pool index");

    // b loads the pool and a's claim from the records, so it claims another block.
    let b = allocator(cluster, &prefix, "node-b").await;
    let usage = b.pool_usage();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].1.blocks.get("node-a"), Some(&1));
    let got = b.allocate(&request("b0", &pool, &[])).await.expect("b");
    assert_eq!(ips(&got), vec!["10.89.0.64".parse::<IpAddr>().expect("ip")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_on_a_quiet_node_after_a_release_made_through_another_node_is_not_refused() {
    let cluster = shared_single();
    let prefix = unique_prefix("quiet-node");
    let a = allocator(cluster, &prefix, "node-a").await;
    let b = allocator(cluster, &prefix, "node-b").await;
    // A pool each: nothing a writes in its block reaches b's watch.
    let pool_a = sets(json!({"subnet": "10.90.0.0/24"}));
    let pool_b = sets(json!({"subnet": "10.91.0.0/24"}));
    b.allocate(&request("b0", &pool_b, &[])).await.expect("b");
    a.allocate(&request("a0", &pool_a, &[])).await.expect("a");
    eventually("b sees a's pool and claim", || {
        sees(&b, "10.90.0.0/24", None, Some("node-a"))
    })
    .await;
    a.allocate(&request("moved", &pool_a, &[]))
        .await
        .expect("a");
    a.release(&Attachment::new("test-net", "moved", "eth0"))
        .await
        .expect("release");
    // The DEL was done before b's ADD arrives, though b's watch heard nothing since: the ADD
    // is a fresh one, not one that began before the DEL. (A quiet watch asks for etcd's
    // revision after 1 s.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    b.allocate(&request("moved", &pool_b, &[]))
        .await
        .expect("a fresh ADD after the DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_the_configured_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = hostnic_testkit::certs::make_certs(dir.path()).expect("certificates");
    let cluster = EtcdCluster::start_tls(1, certs.server()).expect("etcd with TLS");
    assert!(cluster.endpoints()[0].starts_with("https://"));
    let pool = sets(json!({"subnet": "10.88.0.0/24"}));

    let mut config = config(&cluster, "/tls/ipam");
    config.retry_timeout = std::time::Duration::from_millis(800);
    config.tls = Some(hostnic_ipamd::store::TlsFiles {
        ca: Some(certs.ca.clone()),
        cert: None,
        key: None,
    });
    let no_client_cert = Allocator::start(&config, "node-a")
        .await
        .expect("client builds");
    let err = no_client_cert
        .allocate(&request("nocert", &pool, &[]))
        .await
        .expect_err("refused");
    assert!(err.is_retryable(), "{err}");

    config.tls = Some(hostnic_ipamd::store::TlsFiles {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.client_cert.clone()),
        key: Some(certs.client_key.clone()),
    });
    let a = Allocator::start(&config, "node-a")
        .await
        .expect("client builds");
    a.ready().await.expect("loads over TLS");
    let got = a
        .allocate(&request("tls", &pool, &[]))
        .await
        .expect("allocates over TLS");
    assert_eq!(got.ips[0].subnet.to_string(), "10.88.0.0/24");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_racing_to_define_overlapping_pools_cannot_both_succeed() {
    let cluster = shared_cluster3();
    for round in 0..5 {
        let prefix = unique_prefix(&format!("overlap-race-{round}"));
        let a = allocator(cluster, &prefix, "node-a").await;
        let b = allocator(cluster, &prefix, "node-b").await;
        let wide = sets(json!({"subnet": "10.90.0.0/16"}));
        let narrow = sets(json!({"subnet": "10.90.0.0/24"}));
        let (wide, narrow) = (request("wide", &wide, &[]), request("narrow", &narrow, &[]));
        let (ra, rb) = tokio::join!(a.allocate(&wide), b.allocate(&narrow));
        let errors: Vec<&IpamError> = [&ra, &rb]
            .into_iter()
            .filter_map(|r| r.as_ref().err())
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "round {round}: exactly one pool is defined: {ra:?} {rb:?}"
        );
        assert!(
            matches!(errors[0], IpamError::PoolOverlap { .. }),
            "{}",
            errors[0]
        );
        let report = audit(a.store(), a.keys()).await.expect("scan");
        assert_eq!(report.problems, Vec::<String>::new());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_releases_only_this_nodes_stale_attachments_of_the_network_past_the_grace() {
    let cluster = shared_single();
    let prefix = unique_prefix("gc");
    let pool = sets(json!({"subnet": "10.89.0.0/24"}));
    let a = allocator(cluster, &prefix, "node-a").await;
    let b = allocator(cluster, &prefix, "node-b").await;
    for id in ["live", "stale"] {
        a.allocate(&request(id, &pool, &[])).await.expect("a");
    }
    b.allocate(&request("other-node", &pool, &[]))
        .await
        .expect("b");
    let mut other_network = request("other-net", &pool, &[]);
    other_network.attachment.network = "another-network".into();
    a.allocate(&other_network).await.expect("other network");

    let valid: HashSet<Attachment> = [Attachment::new("test-net", "live", "eth0")].into();
    let grace = std::time::Duration::from_secs(60);
    let kept = a.gc("test-net", &valid, grace).await.expect("gc");
    assert!(
        kept.is_empty(),
        "attachments younger than the grace are kept: {kept:?}"
    );
    let freed = a
        .gc("test-net", &valid, std::time::Duration::ZERO)
        .await
        .expect("gc");
    assert_eq!(freed, vec![Attachment::new("test-net", "stale", "eth0")]);
    for (network, id, held) in [
        ("test-net", "live", true),
        ("test-net", "stale", false),
        ("test-net", "other-node", true),
        ("another-network", "other-net", true),
    ] {
        let found = a
            .lookup(&Attachment::new(network, id, "eth0"))
            .await
            .expect("lookup");
        assert_eq!(found.is_some(), held, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_again_asking_for_another_exact_address_is_refused() {
    let cluster = shared_single();
    let prefix = unique_prefix("readd");
    let pool = sets(json!({"subnet": "10.84.0.0/24"}));
    let a = allocator(cluster, &prefix, "node-a").await;
    a.allocate(&request("re", &pool, &["10.84.0.10"]))
        .await
        .expect("first");
    let err = a
        .allocate(&request("re", &pool, &["10.84.0.11"]))
        .await
        .expect_err("different address");
    assert!(
        err.to_string().contains("already holds 10.84.0.10"),
        "{err}"
    );
    let same = a
        .allocate(&request("re", &pool, &["10.84.0.10"]))
        .await
        .expect("same again");
    assert_eq!(
        ips(&same),
        vec!["10.84.0.10".parse::<IpAddr>().expect("literal")]
    );
}

/// kube-ipam's layout: no fixed window, a fixed address (an annotation's, `Kind::Fixed`)
/// outside the dynamic range but inside the subnet. It is allocated, recorded as fixed, held
/// by one pod only, seen by another node, and never handed out dynamically, even once the
/// dynamic range is exhausted. A runtime's exact request (`IP=`) for it keeps the narrower
/// rule and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_address_outside_the_dynamic_range_is_held_once_and_never_handed_out_dynamically() {
    let cluster = shared_single();
    let prefix = unique_prefix("fixed-outside");
    let pool = sets(json!({"subnet": "10.86.0.0/24", "rangeStart": "10.86.0.10",
        "rangeEnd": "10.86.0.20", "gateway": "10.86.0.1"}));
    let a = allocator(cluster, &prefix, "node-a").await;
    let fixed = |container: &str| AllocateRequest {
        requested_kind: hostnic_ipamd::Kind::Fixed,
        ..request(container, &pool, &["10.86.0.216"])
    };

    let exact = a
        .allocate(&request("by-ip-arg", &pool, &["10.86.0.216"]))
        .await
        .expect_err("IP= outside the ranges");
    assert!(matches!(exact, IpamError::InvalidRequest { .. }), "{exact}");

    let got = a.allocate(&fixed("fixed-1")).await.expect("fixed ADD");
    assert_eq!(ips(&got), vec![common::ip("10.86.0.216")]);
    let report = audit(a.store(), a.keys()).await.expect("scan");
    let record = &report.allocations[&("10.86.0.0_24".to_string(), common::ip("10.86.0.216"))];
    assert_eq!(record.kind, hostnic_ipamd::Kind::Fixed);

    for (node, allocator) in [
        ("node-a", &a),
        ("node-b", &allocator(cluster, &prefix, "node-b").await),
    ] {
        let err = allocator
            .allocate(&fixed("fixed-2"))
            .await
            .expect_err("a second pod asking for the held address");
        match &err {
            IpamError::AddressInUse { ip, holder, .. } => {
                assert_eq!(*ip, common::ip("10.86.0.216"));
                assert!(holder.contains("pod-fixed-1"), "{node}: {holder}");
            }
            other => panic!("{node}: {other}"),
        }
    }

    let mut handed = HashSet::new();
    for i in 0.. {
        match a.allocate(&request(&format!("dyn-{i}"), &pool, &[])).await {
            Ok(got) => assert!(handed.insert(ips(&got)[0])),
            Err(IpamError::Exhausted { .. }) => break,
            Err(e) => panic!("dynamic ADD {i}: {e}"),
        }
    }
    assert_eq!(handed.len(), 11, "10.86.0.10-20, each once: {handed:?}");
    assert!(!handed.contains(&common::ip("10.86.0.216")));

    // Released, the fixed address goes to the next pod that asks for it, and still to no
    // dynamic request.
    a.release(&Attachment::new("test-net", "fixed-1", "eth0"))
        .await
        .expect("DEL");
    let err = a
        .allocate(&request("dyn-after", &pool, &[]))
        .await
        .expect_err("the dynamic range is still full");
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    let got = a
        .allocate(&fixed("fixed-2"))
        .await
        .expect("fixed ADD after DEL");
    assert_eq!(ips(&got), vec![common::ip("10.86.0.216")]);
}
