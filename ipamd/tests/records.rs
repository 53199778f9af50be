//! A bad record stays contained: pool, block, attachment and pool-index records that cannot be
//! read or do not validate affect their own key only, `audit` names each of them, and the
//! repair commands remove what it names. Real etcd (one member shared by the tests of this
//! binary, each test under its own prefix) and the real `hostnic-ipamd` binary.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hostnic_ipamd::audit::audit;
use hostnic_ipamd::records::{Keys, PoolIndex};
use hostnic_ipamd::store::Store;
use hostnic_ipamd::{
    AllocateRequest, Allocation, Allocator, Attachment, IpamError, RangeSet, StoreConfig,
};
use hostnic_testkit::daemon::{IpamDaemon, STOP_GRACE};
use hostnic_testkit::{shared_single, unique_prefix};
use ipnet::IpNet;
use serde_json::json;

mod common;
use common::{ip, net, sets};

fn config(prefix: &str) -> StoreConfig {
    common::config(shared_single(), prefix)
}

async fn allocator(prefix: &str, node: &str) -> Allocator {
    common::allocator(shared_single(), prefix, node).await
}

fn request(attachment: &Attachment, range_sets: &[RangeSet]) -> AllocateRequest {
    common::request(attachment, range_sets, &[])
}

async fn add(a: &Allocator, attachment: &Attachment, range_sets: &[RangeSet]) -> IpAddr {
    let allocation = a
        .allocate(&request(attachment, range_sets))
        .await
        .unwrap_or_else(|e| panic!("allocate for {attachment}: {e}"));
    allocation.ips[0].ip
}

async fn put(store: &Store, key: &str, value: impl Into<Vec<u8>>) {
    store
        .client()
        .put(key, value.into(), None)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

async fn get(store: &Store, key: &str) -> Option<Vec<u8>> {
    let resp = store
        .client()
        .get(key, None)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    resp.kvs().first().map(|kv| kv.value().to_vec())
}

/// Every key under the prefix with its value, to prove that a command changed nothing.
async fn snapshot(store: &Store, keys: &Keys) -> Vec<(String, Vec<u8>)> {
    let (_, kvs) = store
        .load_prefix(&format!("{}/", keys.prefix()))
        .await
        .expect("scan");
    kvs.iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

async fn problems(a: &Allocator) -> Vec<String> {
    audit(a.store(), a.keys()).await.expect("scan").problems
}

/// An address record as the earlier layout and this one both write it.
fn address_record(attachment: &Attachment) -> String {
    json!({"version": 1, "handle": {"containerID": attachment.container_id,
        "ifname": attachment.ifname}, "node": "n", "network": attachment.network,
        "kind": "dynamic", "allocatedAt": 0})
    .to_string()
}

/// What an operator command of the real binary printed, and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `hostnic-ipamd ARGS` against the shared etcd under `prefix`.
fn operator(prefix: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"))
        .args(args)
        .args(["--etcd-endpoints", &shared_single().endpoints().join(",")])
        .args(["--etcd-prefix", prefix, "--node-name", "operator"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("hostnic-ipamd runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_pool_record_is_skipped_and_neither_hangs_an_allocator_nor_the_daemon() {
    let prefix = unique_prefix("bad-pool");
    let store = Store::connect(&config(&prefix)).await.expect("connects");
    let keys = Keys::new(&prefix);
    let bad_key = keys.pool("10.61.0.0_24");
    put(
        &store,
        &bad_key,
        json!({"version": 1, "subnet": "10.61.0.0/24", "gateway": "10.61.0.1",
            "ranges": [["10.61.0.2", "10.61.0.254"]], "blockSize": 40})
        .to_string(),
    )
    .await;
    // Valid block size, but a range that starts outside the subnet: the block arithmetic
    // must never see it.
    let outside_key = keys.pool("10.62.0.0_24");
    put(
        &store,
        &outside_key,
        json!({"version": 1, "subnet": "10.62.0.0/24", "gateway": "10.62.0.1",
            "ranges": [["10.0.0.1", "10.62.0.254"]], "blockSize": 26})
        .to_string(),
    )
    .await;
    let holder = Attachment::new("net-a", "old", "eth0");
    put(
        &store,
        &keys.address("10.61.0.0_24", ip("10.61.0.5")),
        address_record(&holder),
    )
    .await;

    let started = Instant::now();
    let a = allocator(&prefix, "node-a").await;
    assert!(
        started.elapsed() < config(&prefix).retry_timeout,
        "ready within the retry budget, took {:?}",
        started.elapsed()
    );
    let good = sets(json!({"subnet": "10.63.0.0/24"}));
    let got = add(&a, &Attachment::new("net-a", "c1", "eth0"), &good).await;
    assert_eq!(got, ip("10.63.0.2"));

    let bad = sets(json!({"subnet": "10.61.0.0/24"}));
    match a
        .allocate(&request(&Attachment::new("net-a", "c2", "eth0"), &bad))
        .await
    {
        Err(IpamError::Corrupt { key, reason }) => {
            assert_eq!(key, bad_key);
            assert!(reason.contains("blockSize \"40\""), "{reason}");
        }
        other => panic!("expected a corrupt-record error naming {bad_key}, got {other:?}"),
    }
    let outside = sets(json!({"subnet": "10.62.0.0/24"}));
    match a.status(&outside, "net-a").await {
        Err(IpamError::Corrupt { key, .. }) => assert_eq!(key, outside_key),
        other => panic!("STATUS of a pool whose record is skipped names it, got {other:?}"),
    }
    match a
        .allocate(&request(&Attachment::new("net-a", "c3", "eth0"), &outside))
        .await
    {
        Err(IpamError::Corrupt { key, reason }) => {
            assert_eq!(key, outside_key);
            assert!(reason.contains("outside subnet"), "{reason}");
        }
        other => panic!("expected a corrupt-record error naming {outside_key}, got {other:?}"),
    }
    drop(a);

    // The real daemon on the same prefix serves and stops on SIGTERM.
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("run/ipamd.sock");
    let mut daemon = IpamDaemon::start(
        Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
        &shared_single().endpoints(),
        "node-d",
        &prefix,
        &socket,
        &[],
    )
    .expect("daemon serves");
    if hostnic_testkit::require_root("allocating over the daemon socket (it only serves root)") {
        use hostnic_proto::v1::ipam_client::IpamClient;
        use hostnic_proto::v1::{AllocateRequest, Attachment, Network, StatusRequest};
        let channel = hostnic_proto::connect(&socket, Duration::from_secs(1))
            .await
            .expect("connects");
        let mut client = IpamClient::new(channel);
        let network = |subnet: &str| {
            Some(Network {
                name: "net-d".into(),
                ipam_json: json!({"subnet": subnet}).to_string(),
            })
        };
        client
            .status(StatusRequest {
                network: network("10.63.0.0/24"),
            })
            .await
            .expect("status of another pool");
        let reply = client
            .allocate(AllocateRequest {
                attachment: Some(Attachment {
                    container_id: "d1".into(),
                    ifname: "eth0".into(),
                }),
                network: network("10.63.0.0/24"),
                ..Default::default()
            })
            .await
            .expect("allocates from another pool")
            .into_inner();
        let address = &reply.ips[0].address;
        assert!(
            address.starts_with("10.63.0.") && address.ends_with("/24"),
            "{address}"
        );
        let refused = client
            .allocate(AllocateRequest {
                attachment: Some(Attachment {
                    container_id: "d2".into(),
                    ifname: "eth0".into(),
                }),
                network: network("10.61.0.0/24"),
                ..Default::default()
            })
            .await
            .expect_err("the bad pool is unusable");
        assert_eq!(refused.code(), tonic::Code::Internal);
        assert!(
            refused.message().contains(&bad_key),
            "{}",
            refused.message()
        );
    }
    let log = daemon.log_tail();
    let (status, took) = daemon.stop().expect("was running");
    assert!(status.success(), "clean exit on SIGTERM: {status}\n{log}");
    assert!(
        took < STOP_GRACE,
        "stopped {took:?} after SIGTERM, not within {STOP_GRACE:?}\n{log}"
    );
    assert!(log.contains("pools loaded"), "{log}");
    assert!(
        log.contains("skipping a record that does not validate") && log.contains(&bad_key),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_record_is_never_claimed_and_does_not_stop_other_nodes() {
    let prefix = unique_prefix("bad-block");
    // Four blocks of 16: .0/28 (14 dynamic), .16/28 (16), .32/28 (16), .48/28 (15).
    let pool = sets(json!({"subnet": "10.64.0.0/26", "blockSize": 28}));
    let block = |text: &str| -> IpNet { net(text) };
    let in_block = |ip: IpAddr, b: &str| block(b).contains(&ip);
    let a = allocator(&prefix, "node-a").await;
    let corrupt_key = a.keys().block("10.64.0.0_26", &block("10.64.0.16/28"));
    for i in 0..14 {
        // After 10 of 14, while more than a quarter of the block is free and no block has
        // been claimed ahead. node-a learns of the record from its watch, or from losing the
        // claim (ahead, or once its block is full) to it.
        if i == 10 {
            put(a.store(), &corrupt_key, "{not json").await;
        }
        let got = add(&a, &Attachment::new("net", format!("a{i}"), "eth0"), &pool).await;
        assert!(in_block(got, "10.64.0.0/28"), "{got}");
    }
    let got = add(&a, &Attachment::new("net", "a14", "eth0"), &pool).await;
    assert!(in_block(got, "10.64.0.32/28"), "{got}");

    // node-b loads it at start. The one unclaimed block is used first, then addresses of
    // claimed blocks are borrowed: the corrupt one counts as claimed by nobody usable.
    let b = allocator(&prefix, "node-b").await;
    let mut handed_out: Vec<IpAddr> = Vec::new();
    for i in 0.. {
        match b
            .allocate(&request(
                &Attachment::new("net", format!("b{i}"), "eth0"),
                &pool,
            ))
            .await
        {
            Ok(allocation) => handed_out.push(allocation.ips[0].ip),
            Err(IpamError::Exhausted { .. }) => break,
            Err(e) => panic!("ADD {i} on node-b: {e}"),
        }
    }
    let (unclaimed, borrowed) = handed_out.split_at(15.min(handed_out.len()));
    assert!(
        unclaimed.iter().all(|ip| in_block(*ip, "10.64.0.48/28")),
        "the unclaimed block first, never the corrupt one: {unclaimed:?}"
    );
    assert_eq!(
        borrowed.len(),
        15 + 16,
        "then what is left of node-a's and the corrupt block: {borrowed:?}"
    );
    let unique: BTreeSet<IpAddr> = handed_out.iter().copied().collect();
    assert_eq!(
        unique.len(),
        handed_out.len(),
        "an address handed out twice"
    );

    let report = audit(b.store(), b.keys()).await.expect("scan");
    assert_eq!(report.bad_keys, vec![corrupt_key.clone()]);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].starts_with(&corrupt_key));
    assert_eq!(report.allocations.len(), 61, "every dynamic address held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_attachment_record_does_not_leak_its_addresses() {
    let prefix = unique_prefix("bad-attachment");
    let pool = sets(json!({"subnet": "10.65.0.0/24"}));
    let a = allocator(&prefix, "node-c").await;
    let address_key = |ip: IpAddr| a.keys().address("10.65.0.0_24", ip);

    // DEL through the allocator.
    let c1 = Attachment::new("net-c", "c1", "eth0");
    let ip1 = add(&a, &c1, &pool).await;
    let record_key = a.keys().attachment(&c1);
    put(a.store(), &record_key, "garbage").await;
    match a.lookup(&c1).await {
        Err(IpamError::Corrupt { key, .. }) => assert_eq!(key, record_key),
        other => panic!("lookup of an unreadable record: {other:?}"),
    }
    let released = a
        .release(&c1)
        .await
        .expect("release")
        .expect("something released");
    let freed: Vec<IpAddr> = released.ips.iter().map(|h| h.ip).collect();
    assert_eq!(freed, vec![ip1]);
    assert!(a.lookup(&c1).await.expect("lookup").is_none());
    assert_eq!(get(a.store(), &address_key(ip1)).await, None);
    assert_eq!(get(a.store(), &record_key).await, None);
    assert_eq!(problems(&a).await, Vec::<String>::new());

    // The CLI, with and without --network, from a process that never saw the ADD.
    for (cid, args) in [("c2", &["--network", "net-c"][..]), ("c3", &[][..])] {
        let attachment = Attachment::new("net-c", cid, "eth0");
        let held = add(&a, &attachment, &pool).await;
        put(a.store(), &a.keys().attachment(&attachment), "garbage").await;
        let mut command = vec!["release", cid, "eth0"];
        command.extend_from_slice(args);
        let run = operator(&prefix, &command);
        assert_eq!(run.code, Some(0), "{run}");
        assert!(
            run.stdout.contains(&format!(
                "released {held} of pool 10.65.0.0/24 from {cid}/eth0 of network net-c"
            )),
            "{command:?}: {run}"
        );
        assert_eq!(get(a.store(), &address_key(held)).await, None, "{run}");
        assert!(a.lookup(&attachment).await.expect("lookup").is_none());
    }
    assert_eq!(problems(&a).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_pool_index_is_rebuilt_and_still_refuses_overlapping_pools() {
    let prefix = unique_prefix("bad-index");
    let a = allocator(&prefix, "node-i").await;
    let index_key = a.keys().pool_index();
    add(
        &a,
        &Attachment::new("net", "i1", "eth0"),
        &sets(json!({"subnet": "10.66.1.0/24"})),
    )
    .await;
    put(a.store(), &index_key, "\u{0}\u{1}garbage").await;

    let overlapping = sets(json!({"subnet": "10.66.1.128/25"}));
    let refused = |r: Result<Allocation, IpamError>| match r {
        Err(IpamError::PoolOverlap { subnet, existing }) => {
            assert_eq!(
                (subnet.as_str(), existing.as_str()),
                ("10.66.1.128/25", "10.66.1.0/24")
            );
        }
        other => panic!("expected an overlap refusal, got {other:?}"),
    };
    refused(
        a.allocate(&request(
            &Attachment::new("net", "i2", "eth0"),
            &overlapping,
        ))
        .await,
    );

    let got = add(
        &a,
        &Attachment::new("net", "i3", "eth0"),
        &sets(json!({"subnet": "10.66.2.0/24"})),
    )
    .await;
    assert_eq!(got, ip("10.66.2.2"));
    let index: PoolIndex =
        serde_json::from_slice(&get(a.store(), &index_key).await.expect("index written"))
            .expect("the index is readable again");
    let listed: BTreeSet<IpNet> = index.subnets.into_iter().collect();
    assert_eq!(
        listed,
        BTreeSet::from([net("10.66.1.0/24"), net("10.66.2.0/24")])
    );

    refused(
        a.allocate(&request(
            &Attachment::new("net", "i4", "eth0"),
            &overlapping,
        ))
        .await,
    );
    assert_eq!(problems(&a).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_names_every_bad_key_and_exits_1() {
    let empty = unique_prefix("audit-empty");
    let run = operator(&empty, &["audit"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("0 problems"), "{run}");

    let prefix = unique_prefix("audit");
    let a = allocator(&prefix, "node-e").await;
    let held = Attachment::new("net-e", "e1", "eth0");
    add(&a, &held, &sets(json!({"subnet": "10.67.0.0/24"}))).await;
    let run = operator(&prefix, &["audit"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout
            .contains("1 pools, 1 allocations, 1 attachments, 0 problems"),
        "{run}"
    );

    let keys = a.keys();
    let bad = [
        (
            keys.pool("10.68.0.0_24"),
            json!({"version": 1, "subnet": "10.68.0.0/24", "gateway": "10.68.0.1",
                "ranges": [["10.68.0.2", "10.68.0.254"]], "blockSize": 40})
            .to_string(),
        ),
        (
            keys.block("10.67.0.0_24", &net("10.67.0.192/26")),
            "garbage".into(),
        ),
        (
            keys.attachment(&Attachment::new("net-e", "e9", "eth0")),
            "garbage".into(),
        ),
        (keys.pool_index(), "garbage".into()),
        (keys.address("10.67.0.0_24", ip("10.67.0.77")), "{}".into()),
        (
            keys.released(&Attachment::new("net-e", "e8", "eth0")),
            "garbage".into(),
        ),
        (
            keys.legacy_handle(&Attachment::new("", "e7", "eth0")),
            "garbage".into(),
        ),
    ];
    for (key, value) in &bad {
        put(a.store(), key, value.as_str()).await;
    }
    let run = operator(&prefix, &["audit"]);
    assert_eq!(run.code, Some(1), "{run}");
    for (key, _) in &bad {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with(&format!("PROBLEM {key}: "))),
            "{key} not named: {run}"
        );
    }
    let report = audit(a.store(), keys).await.expect("scan");
    let mut expected: Vec<String> = bad.iter().map(|(k, _)| k.clone()).collect();
    expected.sort();
    assert_eq!(report.bad_keys, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_key_shows_a_corrupt_key_then_deletes_it_and_refuses_any_other() {
    let prefix = unique_prefix("drop-key");
    let a = allocator(&prefix, "node-k").await;
    add(
        &a,
        &Attachment::new("net", "k1", "eth0"),
        &sets(json!({"subnet": "10.69.0.0/24"})),
    )
    .await;
    let corrupt = a.keys().block("10.69.0.0_24", &net("10.69.0.64/26"));
    put(a.store(), &corrupt, "garbage-value").await;
    let before = snapshot(a.store(), a.keys()).await;

    let run = operator(&prefix, &["drop-key", &corrupt, "--dry-run"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains(&format!("{corrupt} = garbage-value"))
            && run.stdout.contains("would delete"),
        "{run}"
    );
    assert_eq!(snapshot(a.store(), a.keys()).await, before, "dry run wrote");

    let valid = a.keys().pool("10.69.0.0_24");
    let run = operator(&prefix, &["drop-key", &valid]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("not a record audit finds"), "{run}");

    // A key of another prefix that shares this one's text.
    let outside = format!("{prefix}-other/pool-index");
    put(a.store(), &outside, "garbage").await;
    let run = operator(&prefix, &["drop-key", &outside]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("is not under the prefix"), "{run}");
    assert!(get(a.store(), &outside).await.is_some());
    assert_eq!(
        snapshot(a.store(), a.keys()).await,
        before,
        "a refusal wrote"
    );

    let run = operator(&prefix, &["drop-key", &corrupt]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains(&format!("deleted {corrupt}")), "{run}");
    assert_eq!(get(a.store(), &corrupt).await, None);
    let run = operator(&prefix, &["audit"]);
    assert_eq!(run.code, Some(0), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_pool_removes_only_a_pool_that_holds_nothing() {
    let prefix = unique_prefix("remove-pool");
    let a = allocator(&prefix, "node-r").await;
    let keys = a.keys().clone();
    add(
        &a,
        &Attachment::new("net", "r1", "eth0"),
        &sets(json!({"subnet": "10.70.1.0/24"})),
    )
    .await;
    let emptied = Attachment::new("net", "r2", "eth0");
    add(&a, &emptied, &sets(json!({"subnet": "10.70.2.0/24"}))).await;
    a.release(&emptied).await.expect("release");
    let empty_pool = keys.pool("10.70.2.0_24");
    let before = snapshot(a.store(), &keys).await;
    assert!(
        before
            .iter()
            .any(|(k, _)| k.starts_with(&format!("{empty_pool}/blocks/"))),
        "the emptied pool keeps its block claim"
    );

    let run = operator(&prefix, &["remove-pool", "10.70.1.0/24"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("holds 1 addresses"), "{run}");
    let run = operator(&prefix, &["remove-pool", "10.70.9.0/24"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr.contains("there is no pool 10.70.9.0/24"),
        "{run}"
    );
    let run = operator(&prefix, &["remove-pool", "10.70.2.0/24", "--dry-run"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains("would remove pool 10.70.2.0/24"),
        "{run}"
    );
    assert_eq!(snapshot(a.store(), &keys).await, before, "nothing changed");

    let run = operator(&prefix, &["remove-pool", "10.70.2.0/24"]);
    assert_eq!(run.code, Some(0), "{run}");
    let after = snapshot(a.store(), &keys).await;
    assert!(
        !after
            .iter()
            .any(|(k, _)| k == &empty_pool || k.starts_with(&format!("{empty_pool}/"))),
        "{after:?}"
    );
    assert!(get(a.store(), &keys.pool("10.70.1.0_24")).await.is_some());
    let index: PoolIndex =
        serde_json::from_slice(&get(a.store(), &keys.pool_index()).await.expect("index"))
            .expect("readable");
    assert_eq!(index.subnets, vec![net("10.70.1.0/24")]);
    let run = operator(&prefix, &["audit"]);
    assert_eq!(run.code, Some(0), "{run}");

    // The subnet is free to be defined again, differently.
    let b = allocator(&prefix, "node-s").await;
    add(
        &b,
        &Attachment::new("net", "r3", "eth0"),
        &sets(json!({"subnet": "10.70.2.0/24", "blockSize": 28})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_address_frees_the_attachment_holding_it_or_an_orphan_record_alone() {
    let prefix = unique_prefix("release-address");
    let a = allocator(&prefix, "node-f").await;
    let keys = a.keys().clone();
    let pool = sets(json!({"subnet": "10.71.0.0/24"}));
    let f1 = Attachment::new("net-f", "f1", "eth0");
    let ip1 = add(&a, &f1, &pool).await;
    let ip1_text = ip1.to_string();
    let before = snapshot(a.store(), &keys).await;

    let run = operator(&prefix, &["release-address", &ip1_text, "--dry-run"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains(&format!(
            "would release f1/eth0 of network net-f (it holds {ip1})"
        )),
        "{run}"
    );
    assert_eq!(snapshot(a.store(), &keys).await, before, "dry run wrote");

    let run = operator(&prefix, &["release-address", &ip1_text]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains(&format!(
            "released f1/eth0 of network net-f (it held {ip1})"
        )),
        "{run}"
    );
    assert!(a.lookup(&f1).await.expect("lookup").is_none());
    assert_eq!(
        get(a.store(), &keys.address("10.71.0.0_24", ip1)).await,
        None
    );

    // An address record whose attachment holds another address and does not list this one.
    let f2 = Attachment::new("net-f", "f2", "eth0");
    let ip2 = add(&a, &f2, &pool).await;
    let orphan = keys.address("10.71.0.0_24", ip("10.71.0.99"));
    put(a.store(), &orphan, address_record(&f2)).await;
    let before = snapshot(a.store(), &keys).await;
    let run = operator(&prefix, &["release-address", "10.71.0.99", "--dry-run"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout
            .contains("would delete the address record of 10.71.0.99"),
        "{run}"
    );
    assert_eq!(snapshot(a.store(), &keys).await, before, "dry run wrote");

    let run = operator(&prefix, &["release-address", "10.71.0.99"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains(&format!("deleted {orphan}")), "{run}");
    assert_eq!(get(a.store(), &orphan).await, None);
    let still = a.lookup(&f2).await.expect("lookup").expect("f2 still held");
    assert_eq!(still.ips[0].ip, ip2);
    assert_eq!(problems(&a).await, Vec::<String>::new());

    let run = operator(&prefix, &["release-address", "10.71.0.200"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("10.71.0.200 is not held"), "{run}");
}

/// A DEL that this allocator's memory cannot serve (after a restart, or past what it keeps)
/// reads the attachment record, then releases in one guarded transaction when the record's
/// address records and index entry are still those its ADD wrote. An address record written
/// since is read and checked first, and one that now names another attachment stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_not_remembered_reads_only_the_attachment_record_unless_an_address_changed() {
    let prefix = unique_prefix("release-unremembered");
    let pool = sets(json!({"subnet": "10.72.0.0/24"}));
    let a = allocator(&prefix, "node-g").await;
    let mut held = Vec::new();
    for cid in ["g1", "g2", "g3", "g4"] {
        let attachment = Attachment::new("net-g", cid, "eth0");
        let ip = add(&a, &attachment, &pool).await;
        held.push((attachment, a.keys().address("10.72.0.0_24", ip)));
    }
    // The same node after a restart: it remembers none of these ADDs.
    let b = allocator(&prefix, "node-g").await;
    let release = |attachment: &Attachment| {
        let (b, attachment) = (&b, attachment.clone());
        async move {
            let before = b.store().requests_sent();
            let released = b.release(&attachment).await.expect("release");
            (released, b.store().requests_sent() - before)
        }
    };

    // The first release also grants the lease of the release markers.
    let (released, _) = release(&held[0].0).await;
    assert!(released.is_some(), "g1 released");
    let (released, requests) = release(&held[1].0).await;
    assert!(released.is_some(), "g2 released");
    assert_eq!(requests, 2, "the read of the record and the release");
    for (attachment, address_key) in &held[..2] {
        assert!(a.lookup(attachment).await.expect("lookup").is_none());
        assert_eq!(get(a.store(), address_key).await, None, "{attachment}");
    }

    // g3's address record written again, unchanged: read, found to be g3's, released.
    let (g3, g3_address) = &held[2];
    let value = get(a.store(), g3_address)
        .await
        .expect("g3's address record");
    put(a.store(), g3_address, value).await;
    let (released, requests) = release(g3).await;
    assert!(released.is_some(), "g3 released");
    assert!(
        requests > 2,
        "g3's address records were read: {requests} requests"
    );
    assert!(a.lookup(g3).await.expect("lookup").is_none());
    assert_eq!(get(a.store(), g3_address).await, None);

    // g4's address record now names another attachment: the record goes, the address stays.
    let (g4, g4_address) = &held[3];
    let other = Attachment::new("net-g", "other", "eth0");
    put(a.store(), g4_address, address_record(&other)).await;
    let (released, _) = release(g4).await;
    assert!(released.is_some(), "g4's record released");
    assert!(a.lookup(g4).await.expect("lookup").is_none());
    assert_eq!(
        get(a.store(), g4_address).await,
        Some(address_record(&other).into_bytes()),
        "the address record of another attachment stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_earlier_layout_are_read_not_lost() {
    let prefix = unique_prefix("legacy");
    let a = allocator(&prefix, "node-l").await;
    let keys = a.keys().clone();
    let pool = sets(json!({"subnet": "10.72.0.0/24"}));
    add(&a, &Attachment::new("net-a", "other", "eth0"), &pool).await;

    let legacy = Attachment::new("net-a", "old1", "eth0");
    let legacy_key = keys.legacy_handle(&legacy);
    assert!(legacy_key.ends_with("/handles/old1/eth0"), "{legacy_key}");
    let address_key = keys.address("10.72.0.0_24", ip("10.72.0.5"));
    put(
        a.store(),
        &legacy_key,
        json!({"version": 1, "network": "net-a", "node": "n",
            "ips": [{"pool": "10.72.0.0_24", "ip": "10.72.0.5"}], "allocatedAt": 0})
        .to_string(),
    )
    .await;
    put(a.store(), &address_key, address_record(&legacy)).await;
    assert_eq!(problems(&a).await, Vec::<String>::new());

    let found = a.lookup(&legacy).await.expect("lookup").expect("found");
    assert_eq!(found.ips[0].ip, ip("10.72.0.5"));
    assert_eq!(found.ips[0].gateway, ip("10.72.0.1"));
    let other_network = Attachment::new("net-b", "old1", "eth0");
    assert!(a.lookup(&other_network).await.expect("lookup").is_none());
    assert!(
        a.release(&other_network).await.expect("release").is_none(),
        "DEL of another network frees nothing"
    );
    assert!(get(a.store(), &address_key).await.is_some());

    let released = a
        .release(&legacy)
        .await
        .expect("release")
        .expect("released");
    assert_eq!(released.ips[0].ip, ip("10.72.0.5"));
    assert!(a.lookup(&legacy).await.expect("lookup").is_none());
    assert_eq!(get(a.store(), &address_key).await, None);
    assert_eq!(get(a.store(), &legacy_key).await, None);
    assert_eq!(problems(&a).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_pool_and_its_address_are_repaired_with_the_operator_commands() {
    let prefix = unique_prefix("repair-pool");
    let store = Store::connect(&config(&prefix)).await.expect("connects");
    let keys = Keys::new(&prefix);
    let bad_key = keys.pool("10.73.0.0_24");
    put(
        &store,
        &bad_key,
        json!({"version": 1, "subnet": "10.73.0.0/24", "gateway": "10.73.0.1",
            "ranges": [["10.73.0.2", "10.73.0.254"]], "blockSize": 40})
        .to_string(),
    )
    .await;
    let address = keys.address("10.73.0.0_24", ip("10.73.0.5"));
    put(
        &store,
        &address,
        address_record(&Attachment::new("net", "gone", "eth0")),
    )
    .await;
    let run = operator(&prefix, &["audit"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stdout.contains(&format!("PROBLEM {bad_key}: ")),
        "{run}"
    );
    assert!(
        run.stdout.contains(&format!("PROBLEM {address}: ")),
        "{run}"
    );

    let run = operator(&prefix, &["remove-pool", "10.73.0.0/24"]);
    assert_eq!(run.code, Some(1), "{run}");
    let run = operator(&prefix, &["release-address", "10.73.0.5"]);
    assert_eq!(run.code, Some(0), "{run}");
    let run = operator(&prefix, &["remove-pool", "10.73.0.0/24"]);
    assert_eq!(run.code, Some(0), "{run}");
    let run = operator(&prefix, &["audit"]);
    assert_eq!(run.code, Some(0), "{run}");

    let a = allocator(&prefix, "node-p").await;
    let got = add(
        &a,
        &Attachment::new("net", "p1", "eth0"),
        &sets(json!({"subnet": "10.73.0.0/24"})),
    )
    .await;
    assert_eq!(got, ip("10.73.0.2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_of_the_earlier_layout_does_not_leak_its_addresses() {
    let prefix = unique_prefix("legacy-corrupt");
    let a = allocator(&prefix, "node-m").await;
    let keys = a.keys().clone();
    add(
        &a,
        &Attachment::new("net-a", "other", "eth0"),
        &sets(json!({"subnet": "10.74.0.0/24"})),
    )
    .await;
    let legacy = Attachment::new("net-a", "old2", "eth0");
    let legacy_key = keys.legacy_handle(&legacy);
    let address_key = keys.address("10.74.0.0_24", ip("10.74.0.5"));
    put(a.store(), &legacy_key, "garbage").await;
    put(a.store(), &address_key, address_record(&legacy)).await;

    // The earlier layout keyed records without the network: the addresses tell whose it is.
    let other_network = Attachment::new("net-b", "old2", "eth0");
    assert!(a.lookup(&other_network).await.expect("lookup").is_none());
    assert!(a.release(&other_network).await.expect("release").is_none());
    assert!(get(a.store(), &legacy_key).await.is_some());
    assert!(get(a.store(), &address_key).await.is_some());
    match a.lookup(&legacy).await {
        Err(IpamError::Corrupt { key, .. }) => assert_eq!(key, legacy_key),
        other => panic!("lookup of an unreadable record: {other:?}"),
    }

    let released = a
        .release(&legacy)
        .await
        .expect("release")
        .expect("released");
    assert_eq!(released.ips[0].ip, ip("10.74.0.5"));
    assert_eq!(get(a.store(), &address_key).await, None);
    assert_eq!(get(a.store(), &legacy_key).await, None);
    assert_eq!(problems(&a).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_add_of_an_attachment_held_under_the_earlier_layout_returns_its_address() {
    let prefix = unique_prefix("legacy-readd");
    let a = allocator(&prefix, "node-n").await;
    let keys = a.keys().clone();
    let pool = sets(json!({"subnet": "10.75.0.0/24"}));
    add(&a, &Attachment::new("net-a", "other", "eth0"), &pool).await;
    let legacy = Attachment::new("net-a", "old3", "eth0");
    put(
        a.store(),
        &keys.legacy_handle(&legacy),
        json!({"version": 1, "network": "net-a", "node": "n",
            "ips": [{"pool": "10.75.0.0_24", "ip": "10.75.0.5"}], "allocatedAt": 0})
        .to_string(),
    )
    .await;
    put(
        a.store(),
        &keys.address("10.75.0.0_24", ip("10.75.0.5")),
        address_record(&legacy),
    )
    .await;

    let again = add(&a, &legacy, &pool).await;
    assert_eq!(
        again,
        ip("10.75.0.5"),
        "a repeated ADD returns what it holds"
    );
    a.release(&legacy).await.expect("release");
    let report = audit(a.store(), &keys).await.expect("scan");
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.allocations.len(), 1, "only `other` holds an address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_the_earlier_layout_for_another_network_does_not_block_an_add() {
    let prefix = unique_prefix("legacy-other");
    let a = allocator(&prefix, "node-n").await;
    let keys = a.keys().clone();
    let pool = sets(json!({"subnet": "10.76.0.0/24"}));
    add(&a, &Attachment::new("net-a", "other", "eth0"), &pool).await;
    let on_b = Attachment::new("net-b", "old4", "eth0");
    put(
        a.store(),
        &keys.legacy_handle(&on_b),
        json!({"version": 1, "network": "net-b", "node": "n",
            "ips": [{"pool": "10.76.0.0_24", "ip": "10.76.0.5"}], "allocatedAt": 0})
        .to_string(),
    )
    .await;
    put(
        a.store(),
        &keys.address("10.76.0.0_24", ip("10.76.0.5")),
        address_record(&on_b),
    )
    .await;

    let on_a = Attachment::new("net-a", "old4", "eth0");
    let got = add(&a, &on_a, &pool).await;
    assert_ne!(got, ip("10.76.0.5"), "net-b's address is not net-a's");
    assert_eq!(
        a.lookup(&on_b).await.expect("lookup").map(|x| x.ips[0].ip),
        Some(ip("10.76.0.5")),
        "net-b's record of the earlier layout is untouched"
    );
    let report = audit(a.store(), &keys).await.expect("scan");
    assert_eq!(report.problems, Vec::<String>::new());
}

/// Writes a record of the earlier layout for `attachment` on `node`, holding `address` of
/// `pool`, with the address record that goes with it.
async fn put_legacy(a: &Allocator, attachment: &Attachment, node: &str, pool: &str, address: &str) {
    let keys = a.keys();
    put(
        a.store(),
        &keys.legacy_handle(attachment),
        json!({"version": 1, "network": attachment.network, "node": node,
            "ips": [{"pool": pool, "ip": address}], "allocatedAt": 0})
        .to_string(),
    )
    .await;
    put(
        a.store(),
        &keys.address(pool, ip(address)),
        address_record(attachment),
    )
    .await;
}

/// The attachments a listing found, by container id.
fn container_ids(held: &[hostnic_ipamd::allocator::HeldAttachment]) -> BTreeSet<String> {
    held.iter()
        .map(|h| h.attachment.container_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_finds_this_nodes_records_of_the_earlier_layout_while_any_remain_and_works_without() {
    let prefix = unique_prefix("legacy-gc");
    let a = allocator(&prefix, "node-g").await;
    let keys = a.keys().clone();
    let pool = sets(json!({"subnet": "10.77.0.0/24"}));
    let none = std::collections::HashSet::new();

    // No record of the earlier layout: the index alone answers.
    let current = Attachment::new("net-a", "new1", "eth0");
    add(&a, &current, &pool).await;
    let listed = a.node_attachments(None).await.expect("listed");
    assert_eq!(container_ids(&listed), BTreeSet::from(["new1".to_string()]));
    let freed = a.gc("net-a", &none, Duration::ZERO).await.expect("gc");
    assert_eq!(freed, vec![current.clone()]);
    assert!(a.node_attachments(None).await.expect("listed").is_empty());
    assert!(a.attachments_of("node-g").await.expect("listed").is_empty());

    // Records written later (a daemon of the earlier version still runs) are found: nothing
    // remembers that none existed.
    let mine = Attachment::new("net-a", "old5", "eth0");
    let theirs = Attachment::new("net-a", "old6", "eth0");
    let mine_b = Attachment::new("net-b", "old7", "eth0");
    put_legacy(&a, &mine, "node-g", "10.77.0.0_24", "10.77.0.5").await;
    put_legacy(&a, &theirs, "node-o", "10.77.0.0_24", "10.77.0.6").await;
    put_legacy(&a, &mine_b, "node-g", "10.77.0.0_24", "10.77.0.7").await;
    let listed = a.node_attachments(Some("net-a")).await.expect("listed");
    assert_eq!(container_ids(&listed), BTreeSet::from(["old5".to_string()]));
    let listed = a.attachments_of("node-o").await.expect("listed");
    assert_eq!(container_ids(&listed), BTreeSet::from(["old6".to_string()]));

    let freed = a.gc("net-a", &none, Duration::ZERO).await.expect("gc");
    assert_eq!(freed, vec![mine.clone()], "only this node's, of net-a");
    assert_eq!(get(a.store(), &keys.legacy_handle(&mine)).await, None);
    assert!(get(a.store(), &keys.legacy_handle(&theirs)).await.is_some());
    let freed = a.gc("net-b", &none, Duration::ZERO).await.expect("gc");
    assert_eq!(freed, vec![mine_b]);

    // One record of the earlier layout left: still found.
    let listed = a.attachments_of("node-o").await.expect("listed");
    assert_eq!(container_ids(&listed), BTreeSet::from(["old6".to_string()]));
    assert!(a.node_attachments(None).await.expect("listed").is_empty());
    assert_eq!(problems(&a).await, Vec::<String>::new());
}
