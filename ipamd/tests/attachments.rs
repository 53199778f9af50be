//! Attachments against a real etcd: the identity (network, container id, ifname), the release
//! marker that stops a late ADD after its DEL, requests refused without a trace, re-ADD of a
//! held attachment, an etcd that has run out of space, and an ADD whose plugin gave up.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostnic_ipamd::audit::audit;
use hostnic_ipamd::records::{AllocationRecord, AttachmentRecord};
use hostnic_ipamd::service::status_of;
use hostnic_ipamd::{Allocator, Attachment, IpamError, Kind, RangeSet};
use hostnic_testkit::{shared_single, unique_prefix, EtcdCluster};
use serde_json::json;
use tokio::sync::Barrier;

mod common;
use common::{allocator, allocator_with, config, ip, ips, request, sets};

/// Every key under the allocator's prefix.
async fn keys(a: &Allocator) -> Vec<String> {
    let (_, kvs) = a
        .store()
        .load_prefix(a.keys().prefix())
        .await
        .expect("scan");
    kvs.iter()
        .map(|kv| kv.key_str().expect("utf-8 key").to_string())
        .collect()
}

/// The value of `key` decoded, with its mod revision; None if there is no such key.
async fn record<T: serde::de::DeserializeOwned>(a: &Allocator, key: &str) -> Option<(T, i64)> {
    let resp = a.store().get("test read", key, None).await.expect("get");
    resp.kvs().first().map(|kv| {
        (
            serde_json::from_slice(kv.value()).expect("record decodes"),
            kv.mod_revision(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_container_on_two_networks_holds_one_address_in_each_and_del_frees_only_its_own() {
    let cluster = shared_single();
    let prefix = unique_prefix("two-networks");
    let a = allocator(cluster, &prefix, "node-a").await;
    let net_a = sets(json!({"subnet": "10.91.0.0/24"}));
    let net_b = sets(json!({"subnet": "10.92.0.0/24", "gateway": "10.92.0.254"}));
    let on_a = Attachment::new("net-a", "q1", "eth0");
    let on_b = Attachment::new("net-b", "q1", "eth0");

    let got_a = a.allocate(&request(&on_a, &net_a, &[])).await.expect("A");
    let got_b = a.allocate(&request(&on_b, &net_b, &[])).await.expect("B");
    assert_eq!(got_a.ips.len(), 1);
    assert_eq!(got_b.ips.len(), 1);
    let (ip_a, ip_b) = (&got_a.ips[0], &got_b.ips[0]);
    assert!(ip_a.subnet.contains(&ip_a.ip) && ip_a.subnet.to_string() == "10.91.0.0/24");
    assert_eq!(ip_a.gateway, ip("10.91.0.1"));
    assert!(
        ip_b.subnet.contains(&ip_b.ip) && ip_b.subnet.to_string() == "10.92.0.0/24",
        "B's address is in B's subnet: {ip_b:?}"
    );
    assert_eq!(ip_b.gateway, ip("10.92.0.254"), "B's own gateway");
    // A repeated ADD on each network answers with that network's address.
    let again_b = a
        .allocate(&request(&on_b, &net_b, &[]))
        .await
        .expect("B again");
    assert_eq!(ips(&again_b), vec![ip_b.ip]);
    let again_a = a
        .allocate(&request(&on_a, &net_a, &[]))
        .await
        .expect("A again");
    assert_eq!(ips(&again_a), vec![ip_a.ip]);

    // DEL on B frees B's address only.
    let released = a.release(&on_b).await.expect("DEL B").expect("B held one");
    assert_eq!(released.network, "net-b");
    assert_eq!(released.ips.len(), 1);
    assert_eq!(released.ips[0].ip, ip_b.ip);
    assert_eq!(a.lookup(&on_b).await.expect("lookup B"), None);
    let held_a = a
        .lookup(&on_a)
        .await
        .expect("lookup A")
        .expect("A still held");
    assert_eq!(held_a, got_a, "CHECK on A sees A's address and gateway");
    let report = audit(a.store(), a.keys()).await.expect("audit");
    assert_eq!(report.problems, Vec::<String>::new());
    let held: Vec<(IpAddr, &Attachment)> = report
        .allocations
        .iter()
        .map(|((_, ip), r)| (*ip, &r.attachment))
        .collect();
    assert_eq!(held, vec![(ip_a.ip, &on_a)], "only A's address is held");

    // GC of network B, with nothing valid, leaves network A alone.
    a.allocate(&request(&on_b, &net_b, &[]))
        .await
        .expect("B again after DEL");
    let freed = a
        .gc("net-b", &HashSet::new(), Duration::ZERO)
        .await
        .expect("gc B");
    assert_eq!(freed, vec![on_b.clone()]);
    assert_eq!(a.lookup(&on_b).await.expect("lookup B"), None);
    assert_eq!(
        a.lookup(&on_a).await.expect("lookup A"),
        Some(got_a.clone()),
        "GC of network B did not touch A"
    );
    // GC of network A that lists A's attachment frees nothing.
    let valid: HashSet<Attachment> = [on_a.clone()].into();
    let freed = a.gc("net-a", &valid, Duration::ZERO).await.expect("gc A");
    assert_eq!(freed, Vec::<Attachment>::new());
    assert_eq!(a.lookup(&on_a).await.expect("lookup A"), Some(got_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_held_past_its_del_is_refused_and_leaves_nothing_then_a_fresh_add_works() {
    let cluster = shared_single();
    let prefix = unique_prefix("late-add");
    let pool = sets(json!({"subnet": "10.94.0.0/24"}));
    // Two daemons of one node on one etcd: the runtime's ADD went to the first, its DEL (sent
    // after the ADD answered "try again later") reaches the second.
    let first = Arc::new(allocator(cluster, &prefix, "node-a").await);
    let second = allocator(cluster, &prefix, "node-a").await;
    // The pool and this node's block exist already: the late ADD would write only its own
    // address and attachment records.
    first
        .allocate(&request(
            &Attachment::new("net", "other", "eth0"),
            &pool,
            &[],
        ))
        .await
        .expect("defines the pool");
    let late = Attachment::new("net", "late", "eth0");

    let gate = Arc::new(Barrier::new(2));
    first.hold_commits_at(Some(Arc::clone(&gate)));
    let add = {
        let (first, req) = (Arc::clone(&first), request(&late, &pool, &[]));
        tokio::spawn(async move { first.allocate(&req).await })
    };
    // The ADD has noted the revision it arrived at and is about to send its transaction.
    gate.wait().await;
    let before: HashSet<String> = keys(&second).await.into_iter().collect();
    assert_eq!(
        second.release(&late).await.expect("DEL"),
        None,
        "nothing committed yet"
    );
    let marker = second.keys().released(&late);
    gate.wait().await;
    let err = add
        .await
        .expect("task")
        .expect_err("the late ADD is refused");
    first.hold_commits_at(None);

    let IpamError::ReleasedMeanwhile {
        attachment,
        released,
        began,
    } = &err
    else {
        panic!("expected ReleasedMeanwhile, got {err}");
    };
    assert_eq!(attachment, &late);
    assert!(released > began, "{err}");
    assert!(err.is_retryable());
    assert_eq!(status_of(&err).code(), tonic::Code::Unavailable, "CNI 11");
    assert!(err.to_string().contains("ADD again"), "{err}");
    let after: HashSet<String> = keys(&second).await.into_iter().collect();
    let written: Vec<&String> = after.difference(&before).collect();
    assert_eq!(
        written,
        vec![&marker],
        "the refused ADD wrote nothing; only the DEL's marker is new"
    );
    let report = audit(first.store(), first.keys()).await.expect("audit");
    assert_eq!(report.problems, Vec::<String>::new());
    assert!(!report.attachments.contains_key(&late));
    assert!(report.allocations.values().all(|r| r.attachment != late));

    // The container is started again with the same id: its ADD comes after the DEL.
    let fresh = first
        .allocate(&request(&late, &pool, &[]))
        .await
        .expect("a fresh ADD after the DEL");
    assert_eq!(fresh.ips.len(), 1);
    // DEL then ADD again through one daemon, with nothing in between.
    first
        .release(&late)
        .await
        .expect("DEL")
        .expect("held an address");
    let again = first
        .allocate(&request(&late, &pool, &[]))
        .await
        .expect("ADD right after DEL through the same daemon");
    assert_eq!(again.ips.len(), 1);
    assert_eq!(
        first.lookup(&late).await.expect("lookup"),
        Some(again),
        "CHECK sees it"
    );
}

/// What one worker of the paused-leader run saw.
#[derive(Default)]
struct Tally {
    added: usize,
    failed_adds: usize,
    /// DELs after a failed ADD that found an allocation: the ADD had committed after all.
    committed_despite_failure: usize,
    del_retries: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_given_up_while_the_etcd_leader_is_paused_do_not_outlive_their_dels() {
    // A cluster of its own: this test freezes members.
    let cluster = Arc::new(EtcdCluster::start(3).expect("3-member etcd"));
    let prefix = unique_prefix("paused-leader");
    let pool = sets(json!({"subnet": "10.95.0.0/22"}));
    // A retry budget shorter than one request's deadline: a request whose proposal is lost at
    // the paused leader is given up rather than sent again to the next leader, so every pause
    // gives up the ADDs in flight at that moment. With the default budget (two deadlines) most
    // of them got through on the second try, and a run could give up none.
    let mut config = config(&cluster, &prefix);
    config.retry_timeout = config.request_timeout * 3 / 5;
    let mut nodes = Vec::new();
    for n in 0..4 {
        nodes.push(Arc::new(
            allocator_with(&config, &format!("node-{n}")).await,
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Addresses held between an ADD's success and the start of its DEL, to catch a double
    // hand-out while the run goes on.
    let holders: Arc<Mutex<HashMap<IpAddr, Attachment>>> = Arc::default();
    let adds_sent = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for w in 0..6 {
            let (node, pool, stop, holders, adds_sent) = (
                Arc::clone(node),
                pool.clone(),
                Arc::clone(&stop),
                Arc::clone(&holders),
                Arc::clone(&adds_sent),
            );
            workers.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let attachment = Attachment::new("churn", format!("c{n}x{w}x{i}"), "eth0");
                    i += 1;
                    adds_sent.fetch_add(1, Ordering::Relaxed);
                    let added = match node.allocate(&request(&attachment, &pool, &[])).await {
                        Ok(allocation) => {
                            tally.added += 1;
                            let ip = allocation.ips[0].ip;
                            let previous = holders
                                .lock()
                                .expect("holders")
                                .insert(ip, attachment.clone());
                            assert_eq!(previous, None, "{ip} handed out twice");
                            holders.lock().expect("holders").remove(&ip);
                            true
                        }
                        Err(e) if e.is_retryable() => {
                            tally.failed_adds += 1;
                            false
                        }
                        Err(e) => panic!("node-{n}: {e}"),
                    };
                    // The runtime DELs after every ADD, failed or not, and (as kubelet does)
                    // retries the DEL until it succeeds.
                    loop {
                        match node.release(&attachment).await {
                            Ok(found) => {
                                if !added && found.is_some() {
                                    tally.committed_despite_failure += 1;
                                }
                                break;
                            }
                            Err(e) if e.is_retryable() => {
                                tally.del_retries += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => panic!("node-{n} DEL: {e}"),
                        }
                    }
                }
                tally
            }));
        }
    }

    let started = Instant::now();
    let mut paused = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = loop {
            if let Some(l) = cluster.leader() {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let sent = adds_sent.load(Ordering::Relaxed);
        cluster.pause_member(leader);
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.resume_member(leader);
        paused.push((leader, adds_sent.load(Ordering::Relaxed) - sent));
    }
    // Let proposals queued at the paused leaders settle before the runtime's last DELs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.expect("worker");
        total.added += t.added;
        total.failed_adds += t.failed_adds;
        total.committed_despite_failure += t.committed_despite_failure;
        total.del_retries += t.del_retries;
    }
    eprintln!(
        "{:.1} s; leader paused 3 × 5 s (member, ADDs sent meanwhile): {paused:?}; ADDs: {} \
         succeeded, {} answered try-again; {} of those had committed and were freed by their \
         DEL; {} DEL retries",
        started.elapsed().as_secs_f64(),
        total.added,
        total.failed_adds,
        total.committed_despite_failure,
        total.del_retries
    );
    assert!(
        total.failed_adds > 0,
        "no ADD failed while the leader was paused: the run proves nothing"
    );
    // A late commit of a given-up ADD would land now, after its DEL: give it time to.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = audit(nodes[0].store(), nodes[0].keys())
        .await
        .expect("audit");
    assert_eq!(report.problems, Vec::<String>::new());
    let leaked: Vec<String> = report.attachments.keys().map(ToString::to_string).collect();
    assert_eq!(
        leaked,
        Vec::<String>::new(),
        "{} attachments left after DEL",
        leaked.len()
    );
    let held: Vec<String> = report
        .allocations
        .iter()
        .map(|((_, ip), r)| format!("{ip} by {}", r.attachment))
        .collect();
    assert_eq!(held, Vec::<String>::new(), "addresses left after DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_writes_no_key_at_all() {
    let cluster = shared_single();
    let prefix = unique_prefix("refused-nothing");
    let a = allocator(cluster, &prefix, "node-a").await;
    let att = Attachment::new("net", "refused", "eth0");
    let ranged = sets(json!({
        "subnet": "10.96.0.0/24",
        "rangeStart": "10.96.0.100",
        "rangeEnd": "10.96.0.150",
        "exclude": ["10.96.0.120"],
    }));
    let dual = sets(json!({"ranges": [
        [{"subnet": "10.97.0.0/24"}],
        [{"subnet": "fd00:97::/64"}],
    ]}));
    let cases: Vec<(&str, &[RangeSet], Vec<&str>, &str)> = vec![
        (
            "IP= outside the range",
            &ranged,
            vec!["10.96.0.5"],
            "10.96.0.5",
        ),
        ("IP= the gateway", &ranged, vec!["10.96.0.1"], "gateway"),
        ("IP= excluded", &ranged, vec!["10.96.0.120"], "excluded"),
        (
            "IP= the broadcast",
            &ranged,
            vec!["10.96.0.255"],
            "broadcast",
        ),
        (
            "IP= in no subnet",
            &ranged,
            vec!["10.99.0.5"],
            "outside every subnet",
        ),
        (
            "two addresses for one range set",
            &ranged,
            vec!["10.96.0.101", "10.96.0.102"],
            "same range set",
        ),
        (
            "a good first family, the second's gateway",
            &dual,
            vec!["10.97.0.7", "fd00:97::1"],
            "gateway",
        ),
    ];
    for (what, range_sets, requested, reason) in cases {
        let err = a
            .allocate(&request(&att, range_sets, &requested))
            .await
            .expect_err(what);
        assert!(
            matches!(err, IpamError::InvalidRequest { .. }),
            "{what}: {err}"
        );
        assert_eq!(
            status_of(&err).code(),
            tonic::Code::InvalidArgument,
            "{what}"
        );
        assert!(err.to_string().contains(reason), "{what}: {err}");
        assert_eq!(keys(&a).await, Vec::<String>::new(), "{what} wrote keys");
    }
    let err = a
        .allocate(&request(
            &Attachment::new("net", "bad/id", "eth0"),
            &ranged,
            &[],
        ))
        .await
        .expect_err("slash in the container id");
    assert!(matches!(err, IpamError::InvalidAttachment { .. }), "{err}");
    assert_eq!(keys(&a).await, Vec::<String>::new(), "bad attachment");

    // The same pool, once defined, accepts an address inside its range.
    let ok = a
        .allocate(&request(&att, &ranged, &["10.96.0.101"]))
        .await
        .expect("in range");
    assert_eq!(ips(&ok), vec![ip("10.96.0.101")]);

    // An address another attachment holds, asked for together with a new pool.
    let before = keys(&a).await;
    let with_new_pool = sets(json!({
        "ranges": [
            [{"subnet": "10.96.0.0/24", "rangeStart": "10.96.0.100", "rangeEnd": "10.96.0.150"}],
            [{"subnet": "fd00:96::/64"}],
        ],
        "exclude": ["10.96.0.120"],
    }));
    let err = a
        .allocate(&request(
            &Attachment::new("net", "taker", "eth0"),
            &with_new_pool,
            &["10.96.0.101"],
        ))
        .await
        .expect_err("held by another attachment");
    assert!(matches!(err, IpamError::AddressInUse { .. }), "{err}");
    assert_eq!(keys(&a).await, before, "the held address wrote nothing");

    // A full pool, asked for together with a new pool.
    let tiny = sets(json!({"subnet": "10.96.1.0/30"}));
    a.allocate(&request(
        &Attachment::new("net", "only", "eth0"),
        &tiny,
        &[],
    ))
    .await
    .expect("the one address of a /30");
    let before = keys(&a).await;
    let full_and_new = sets(json!({"ranges": [
        [{"subnet": "10.96.1.0/30"}],
        [{"subnet": "fd00:961::/64"}],
    ]}));
    let err = a
        .allocate(&request(
            &Attachment::new("net", "late-comer", "eth0"),
            &full_and_new,
            &[],
        ))
        .await
        .expect_err("the /30 is full");
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    assert_eq!(keys(&a).await, before, "the full pool wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_again_for_a_held_attachment_with_its_own_address_keeps_its_kind_and_time() {
    let cluster = shared_single();
    let prefix = unique_prefix("reload");
    let a = allocator(cluster, &prefix, "node-a").await;
    let pool = sets(json!({"subnet": "10.98.0.0/24"}));
    let att = Attachment::new("net", "reloaded", "eth0");
    let first = a.allocate(&request(&att, &pool, &[])).await.expect("ADD");
    let held = first.ips[0].ip;
    let pool_id = audit(a.store(), a.keys())
        .await
        .expect("audit")
        .pools
        .keys()
        .next()
        .expect("one pool")
        .clone();
    let address_key = a.keys().address(&pool_id, held);
    let attachment_key = a.keys().attachment(&att);
    let (address, address_rev) = record::<AllocationRecord>(&a, &address_key)
        .await
        .expect("address record");
    let (attachment, attachment_rev) = record::<AttachmentRecord>(&a, &attachment_key)
        .await
        .expect("attachment record");
    assert_eq!(address.kind, Kind::Dynamic);

    // Times are kept in seconds: let one pass, so a rewrite would show.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Podman's `network reload` sends the container's addresses back as IP=.
    let held_str = held.to_string();
    let again = a
        .allocate(&request(&att, &pool, &[held_str.as_str()]))
        .await
        .expect("re-ADD");
    assert_eq!(again, first);
    let (address_now, address_rev_now) = record::<AllocationRecord>(&a, &address_key)
        .await
        .expect("address record");
    let (attachment_now, attachment_rev_now) = record::<AttachmentRecord>(&a, &attachment_key)
        .await
        .expect("attachment record");
    assert_eq!(address_now.kind, Kind::Dynamic, "still dynamic");
    assert_eq!(address_now.allocated_at, address.allocated_at);
    assert_eq!(attachment_now.allocated_at, attachment.allocated_at);
    assert_eq!(
        (address_rev_now, attachment_rev_now),
        (address_rev, attachment_rev),
        "neither record was rewritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_out_of_space_fails_new_adds_and_status_but_answers_a_repeated_add() {
    // A member of its own, with a 1 MiB quota.
    let cluster = EtcdCluster::start_with_flags(1, &["--quota-backend-bytes", "1048576"])
        .expect("etcd with a small quota");
    let prefix = unique_prefix("nospace");
    let a = allocator(&cluster, &prefix, "node-a").await;
    // Blocks of four: the first one holds .2 and .3 (.0 and .1 are the subnet and gateway).
    let pool = sets(json!({"subnet": "10.99.0.0/24", "blockSize": 30}));
    let held = Attachment::new("net", "held", "eth0");
    let first = a.allocate(&request(&held, &pool, &[])).await.expect("ADD");
    // Fill the node's block, so that an ADD's next dynamic address needs a new block (a
    // write) before its transaction.
    a.allocate(&request(
        &Attachment::new("net", "fills", "eth0"),
        &pool,
        &[],
    ))
    .await
    .expect("second ADD");
    a.status(&pool, "net")
        .await
        .expect("status while there is room");

    // Fill the database until etcd raises its NOSPACE alarm. etcd measures its size when it
    // commits its write batch (every 100 ms), so the filler pauses now and then.
    let mut client = a.store().client();
    let filler = "x".repeat(64 * 1024);
    let mut refused = None;
    for i in 0..128 {
        if let Err(e) = client
            .put(format!("/filler/{i}"), filler.as_str(), None)
            .await
        {
            refused = Some(e);
            break;
        }
        if i % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    }
    let refused = refused.expect("etcd refused a write within 8 MiB of filler");
    assert!(
        refused.to_string().contains("database space exceeded"),
        "{refused}"
    );

    let err = a
        .allocate(&request(&Attachment::new("net", "new", "eth0"), &pool, &[]))
        .await
        .expect_err("no room for a new ADD");
    assert!(matches!(err, IpamError::StoreFull { .. }), "{err}");
    assert_eq!(status_of(&err).code(), tonic::Code::Unavailable, "CNI 11");
    let text = err.to_string();
    for says in [
        "database space exceeded",
        "compact",
        "defragment",
        "alarm disarm",
    ] {
        assert!(text.contains(says), "the message says {says:?}: {text}");
    }

    let again = a
        .allocate(&request(&held, &pool, &[]))
        .await
        .expect("a repeated ADD gets its address");
    assert_eq!(again, first);

    let err = a
        .status(&pool, "net")
        .await
        .expect_err("STATUS fails while etcd refuses writes");
    assert!(matches!(err, IpamError::StoreFull { .. }), "{err}");
    assert!(err.to_string().contains("NOSPACE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_then_add_asking_for_the_released_address_keeps_its_kind_and_time() {
    let cluster = shared_single();
    let prefix = unique_prefix("reload-del-add");
    let a = allocator(cluster, &prefix, "node-a").await;
    let pool = sets(json!({"subnet": "10.97.0.0/24"}));
    let att = Attachment::new("net", "reloaded", "eth0");
    let first = a.allocate(&request(&att, &pool, &[])).await.expect("ADD");
    let held = first.ips[0].ip;
    let address_key = a.keys().address("10.97.0.0_24", held);
    let attachment_key = a.keys().attachment(&att);
    let (address, _) = record::<AllocationRecord>(&a, &address_key)
        .await
        .expect("address record");
    let (attachment, _) = record::<AttachmentRecord>(&a, &attachment_key)
        .await
        .expect("attachment record");
    assert_eq!(address.kind, Kind::Dynamic);

    // Times are kept in seconds: let one pass, so a new time would show.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Podman 4.3's `network reload`: a DEL, then an ADD with IP= the address it had.
    a.release(&att).await.expect("DEL");
    let held_str = held.to_string();
    let again = a
        .allocate(&request(&att, &pool, &[held_str.as_str()]))
        .await
        .expect("ADD with IP=");
    assert_eq!(again, first);
    let (address_now, _) = record::<AllocationRecord>(&a, &address_key)
        .await
        .expect("address record");
    let (attachment_now, _) = record::<AttachmentRecord>(&a, &attachment_key)
        .await
        .expect("attachment record");
    assert_eq!(address_now.kind, Kind::Dynamic, "still dynamic");
    assert_eq!(address_now.allocated_at, address.allocated_at);
    assert_eq!(attachment_now.allocated_at, attachment.allocated_at);

    // An exact request for another address is a new allocation of its own kind and time.
    a.release(&att).await.expect("DEL");
    let other = a
        .allocate(&request(&att, &pool, &["10.97.0.77"]))
        .await
        .expect("ADD with another IP=");
    assert_eq!(other.ips[0].ip.to_string(), "10.97.0.77");
    let (other_record, _) =
        record::<AllocationRecord>(&a, &a.keys().address("10.97.0.0_24", other.ips[0].ip))
            .await
            .expect("address record");
    assert_eq!(other_record.kind, Kind::Exact);
    assert!(other_record.allocated_at > address.allocated_at);
}

/// A plugin that gives up while its ADD waits to commit: it closes its connection at its
/// deadline, the daemon drops the call, and nothing is written. The plugins' own client, so
/// the call is the one the daemon answers without its HTTP/2 server (`one_call`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_plugin_gave_up_before_its_commit_writes_nothing() {
    if !hostnic_testkit::require_root("a daemon serving a socket (root callers only)") {
        return;
    }
    let cluster = shared_single();
    let prefix = unique_prefix("gave-up");
    let a = Arc::new(allocator(cluster, &prefix, "node-a").await);
    let ipam = json!({"subnet": "10.95.0.0/24"});
    // The pool and this node's block exist already: the ADD below only waits to commit.
    a.allocate(&request(
        &Attachment::new("net", "first", "eth0"),
        &sets(ipam.clone()),
        &[],
    ))
    .await
    .expect("defines the pool");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("run/ipamd.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let (a, socket) = (Arc::clone(&a), socket.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            hostnic_ipamd::server::serve(a, Duration::ZERO, &socket, shutdown).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the daemon serves");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let gate = Arc::new(Barrier::new(2));
    a.hold_commits_at(Some(Arc::clone(&gate)));
    let request = hostnic_proto::v1::AllocateRequest {
        attachment: Some(hostnic_proto::v1::Attachment {
            container_id: "gave-up".into(),
            ifname: "eth0".into(),
        }),
        network: Some(hostnic_proto::v1::Network {
            name: "net".into(),
            ipam_json: ipam.to_string(),
        }),
        ..Default::default()
    };
    let call = tokio::task::spawn_blocking(move || {
        hostnic_cni::grpc::unary::<_, hostnic_proto::v1::AllocateReply>(
            &socket,
            "/hostnic.ipam.v1.Ipam/Allocate",
            &request,
            Duration::from_secs(1),
            Duration::from_millis(300),
        )
    });
    // The ADD has arrived at its commit; the plugin's deadline passes while it waits.
    gate.wait().await;
    let outcome = call.await.expect("the plugin's thread");
    assert!(
        matches!(&outcome, Err(hostnic_cni::grpc::CallFailure::Status(s)) if s.code() == tonic::Code::DeadlineExceeded),
        "{outcome:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Let a commit that is still waiting go on: none should be.
    let _ = tokio::time::timeout(Duration::from_millis(500), gate.wait()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.hold_commits_at(None);
    let gave_up = Attachment::new("net", "gave-up", "eth0");
    assert_eq!(
        a.lookup(&gave_up).await.expect("lookup"),
        None,
        "the dropped ADD wrote nothing"
    );
    let _ = stop.send(());
    server.await.expect("server task").expect("served");
}
