//! The operator commands' rows, read in-process against a real etcd (one member shared by the
//! tests of this binary, each test under its own prefix): what `list`, `usage` and `audit`
//! report is asserted field by field, without spawning the binary. `daemon.rs` and
//! `records.rs` check the printed text and exit codes of the binary itself.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hostnic_ipamd::cli::{self, AllocationRow, Outcome};
use hostnic_ipamd::{AllocateRequest, Allocator, Attachment, Kind, PodRef, RangeSet, StoreConfig};
use hostnic_testkit::{shared_single, unique_prefix};
use ipnet::IpNet;
use serde_json::json;

mod common;
use common::{ip, net};

fn config(prefix: &str) -> StoreConfig {
    common::config(shared_single(), prefix)
}

async fn allocator(prefix: &str, node: &str) -> Allocator {
    common::allocator(shared_single(), prefix, node).await
}

fn sets(subnet: &str) -> Vec<RangeSet> {
    common::sets(json!({ "subnet": subnet }))
}

fn pod(name: &str) -> Option<PodRef> {
    Some(PodRef {
        namespace: "prod".into(),
        name: name.into(),
        uid: String::new(),
    })
}

/// Allocates for `attachment` in the pool of `subnet`: `requested` exactly, or the next free
/// address.
async fn add(
    a: &Allocator,
    attachment: &Attachment,
    pod: Option<PodRef>,
    subnet: &str,
    requested: Option<&str>,
) -> IpAddr {
    let request = AllocateRequest {
        attachment: attachment.clone(),
        pod,
        netns: String::new(),
        range_sets: sets(subnet),
        requested: requested.map(ip).into_iter().collect(),
        requested_kind: Kind::Exact,
    };
    let allocation = a
        .allocate(&request)
        .await
        .unwrap_or_else(|e| panic!("allocate for {attachment}: {e}"));
    allocation.ips[0].ip
}

#[tokio::test]
async fn list_gives_one_row_per_address_sorted_and_filtered_by_pool() {
    let prefix = unique_prefix("op-list");
    let node_a = allocator(&prefix, "node-a").await;
    let node_b = allocator(&prefix, "node-b").await;
    let db = Attachment::new("op-net", "db", "eth0");
    let web = Attachment::new("op-net", "web", "eth0");
    let odd = Attachment::new("op-net", "odd", "eth1");
    add(&node_a, &db, pod("db-0"), "10.93.0.0/24", Some("10.93.0.7")).await;
    let web_ip = add(&node_b, &web, None, "10.93.1.0/24", None).await;
    add(
        &node_a,
        &odd,
        pod("odd\nname"),
        "10.93.0.0/24",
        Some("10.93.0.5"),
    )
    .await;

    let rows = cli::list(&config(&prefix), None).await.expect("list");
    let at: Vec<(String, IpAddr)> = rows.iter().map(|r| (r.pool.clone(), r.ip)).collect();
    assert_eq!(
        at,
        vec![
            ("10.93.0.0/24".into(), ip("10.93.0.5")),
            ("10.93.0.0/24".into(), ip("10.93.0.7")),
            ("10.93.1.0/24".into(), web_ip),
        ],
        "sorted by pool, then address"
    );
    assert_eq!(
        rows[1],
        AllocationRow {
            pool: "10.93.0.0/24".into(),
            ip: ip("10.93.0.7"),
            attachment: db.clone(),
            pod: pod("db-0"),
            node: "node-a".into(),
            kind: Kind::Exact,
        }
    );
    assert_eq!(rows[2].attachment, web);
    assert_eq!(rows[2].pod, None);
    assert_eq!(rows[2].node, "node-b");
    assert_eq!(rows[2].kind, Kind::Dynamic);
    assert_eq!(rows[0].pod, pod("odd\nname"), "rows keep the raw text");
    let lines = rows.lines();
    assert_eq!(lines.len(), 4, "a header and one line per row: {lines:?}");
    assert!(
        lines[1].contains("\tprod/odd\\nname\t"),
        "printed escaped: {lines:?}"
    );

    let only_b = cli::list(&config(&prefix), Some(&net("10.93.1.0/24")))
        .await
        .expect("list --pool");
    assert_eq!(only_b, rows[2..].to_vec());
    let only_a = cli::list(&config(&prefix), Some(&net("10.93.0.0/24")))
        .await
        .expect("list --pool");
    assert_eq!(only_a, rows[..2].to_vec());
    let none = cli::list(&config(&prefix), Some(&net("10.93.9.0/24")))
        .await
        .expect("list --pool of no pool");
    assert!(none.is_empty(), "{none:?}");

    node_a.release(&db).await.expect("release");
    let rows = cli::list(&config(&prefix), None).await.expect("list");
    assert!(rows.iter().all(|r| r.attachment != db), "{rows:?}");
    assert_eq!(rows.len(), 2);
}

#[tokio::test]
async fn usage_counts_each_pools_held_addresses_and_blocks_by_node() {
    let prefix = unique_prefix("op-usage");
    let node_a = allocator(&prefix, "node-a").await;
    let node_b = allocator(&prefix, "node-b").await;
    for n in 0..2 {
        let a = Attachment::new("op-net", format!("a{n}"), "eth0");
        add(&node_a, &a, None, "10.94.0.0/24", None).await;
    }
    let b = Attachment::new("op-net", "b0", "eth0");
    add(&node_b, &b, None, "10.94.0.0/24", None).await;
    // A second pool whose only address was released again: it stays, holding nothing.
    let gone = Attachment::new("op-net", "gone", "eth0");
    add(&node_a, &gone, None, "10.94.1.0/24", None).await;
    node_a.release(&gone).await.expect("release");

    let usage = cli::usage(&config(&prefix)).await.expect("usage");
    let subnets: Vec<IpNet> = usage.iter().map(|u| u.subnet).collect();
    assert_eq!(subnets, vec![net("10.94.0.0/24"), net("10.94.1.0/24")]);
    let busy = &usage[0];
    assert_eq!(
        busy.dynamic,
        sets("10.94.0.0/24")[0].pools[0].dynamic_size()
    );
    assert_eq!(busy.held, 3);
    let nodes: Vec<&str> = busy.blocks.keys().map(String::as_str).collect();
    assert_eq!(nodes, vec!["node-a", "node-b"], "each node claimed a block");
    assert_eq!(
        busy.blocks,
        BTreeMap::from([("node-a".to_string(), 1), ("node-b".to_string(), 1)]),
        "two addresses fit one block"
    );
    assert_eq!(usage[1].held, 0);
    let lines = usage.lines();
    assert_eq!(
        lines[1],
        format!("10.94.0.0/24\t{}\t3\tnode-a=1,node-b=1", busy.dynamic)
    );
}

#[tokio::test]
async fn audit_counts_the_records_and_names_each_problem_by_its_key() {
    let prefix = unique_prefix("op-audit");
    let empty = cli::audit(&config(&prefix)).await.expect("audit");
    assert_eq!(
        empty,
        cli::AuditSummary::default(),
        "nothing under a new prefix"
    );

    let a = allocator(&prefix, "node-a").await;
    let db = Attachment::new("op-net", "db", "eth0");
    add(&a, &db, pod("db-0"), "10.95.0.0/24", Some("10.95.0.7")).await;
    let summary = cli::audit(&config(&prefix)).await.expect("audit");
    assert_eq!(
        (summary.pools, summary.allocations, summary.attachments),
        (1, 1, 1)
    );
    assert!(summary.problems.is_empty(), "{:?}", summary.problems);
    assert!(
        summary.finish().expect("no error"),
        "consistent etcd passes"
    );

    // The attachment record goes: its address record is now held by no record that lists it.
    let record_key = a.keys().attachment(&db);
    let saved = a
        .store()
        .client()
        .get(record_key.as_str(), None)
        .await
        .expect("get")
        .kvs()[0]
        .value()
        .to_vec();
    a.store()
        .client()
        .delete(record_key.as_str(), None)
        .await
        .expect("delete");
    let summary = cli::audit(&config(&prefix)).await.expect("audit");
    assert_eq!(summary.attachments, 0);
    assert_eq!(summary.allocations, 1);
    let address_key = a.keys().address(
        &hostnic_ipamd::pool::pool_id(&net("10.95.0.0/24")),
        ip("10.95.0.7"),
    );
    assert!(
        summary.problems.iter().any(|p| p
            == &format!("{address_key}: held by {db} whose attachment record does not list it (release it with `release-address 10.95.0.7`)")),
        "{:?}",
        summary.problems
    );
    assert!(!summary.finish().expect("no error"), "problems fail audit");

    a.store()
        .client()
        .put(record_key.as_str(), saved, None)
        .await
        .expect("restore");
    let summary = cli::audit(&config(&prefix)).await.expect("audit");
    assert!(summary.is_consistent(), "{:?}", summary.problems);
}
