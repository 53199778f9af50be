//! Allocate + release against a single-member etcd for /24, /16 and /8 pools (the /8 already
//! holding 100,000 allocations), each operation interleaved with the raw etcd create-if-absent
//! transaction the allocator is built on, so that every ratio compares two series measured side
//! by side (etcd slows as its database grows: a raw run before or after would flatter or
//! penalise the pool measured far from it).
//!
//! Run: `cargo bench -p hostnic-ipamd --bench allocate` (results go in BENCHMARKS.md).

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use hostnic_ipamd::records::{BlockRecord, Keys, RECORD_VERSION};
use hostnic_ipamd::{parse_range_sets, AllocateRequest, Allocator, Attachment, Kind, StoreConfig};
use hostnic_testkit::EtcdCluster;
use serde_json::json;

const OPS: usize = 2000;
const PRELOAD: u32 = 100_000;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Row {
    what: String,
    p50: Duration,
    p99: Duration,
}

/// One raw create-if-absent transaction of a new key; its latency.
async fn raw_txn(client: &mut etcd_client::Client, key: &str) -> Duration {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, r#"{"version":1,"handle":"x"}"#, None)]);
    let t = Instant::now();
    let resp = client.txn(txn).await.expect("raw txn");
    let took = t.elapsed();
    assert!(resp.succeeded());
    took
}

fn row(what: String, samples: &mut [Duration]) -> Row {
    Row {
        what,
        p50: percentile(samples, 0.5),
        p99: percentile(samples, 0.99),
    }
}

/// Writes `count` allocation records (and their block claims) straight into etcd, as if other
/// nodes had allocated them.
async fn preload(client: &mut etcd_client::Client, keys: &Keys, subnet: &str, count: u32) {
    let pool = &parse_range_sets(&json!({"subnet": subnet})).expect("valid")[0].pools[0];
    let id = pool.id();
    let record = |i: u32| {
        json!({"version": 1, "handle": {"containerID": format!("pre{i}"), "ifname": "eth0"},
               "node": "filler", "network": "bench", "kind": "dynamic", "allocatedAt": 0})
        .to_string()
    };
    let base = u32::from("10.0.0.0".parse::<std::net::Ipv4Addr>().expect("literal")) + 2;
    let mut ops = Vec::new();
    let mut blocks = std::collections::BTreeSet::new();
    for i in 0..count {
        let ip = std::net::IpAddr::V4((base + i).into());
        blocks.insert(pool.block_of(hostnic_ipamd::addr::to_int(ip)));
        ops.push(TxnOp::put(keys.address(&id, ip), record(i), None));
        if ops.len() == 100 {
            client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .expect("preload");
        }
    }
    for b in blocks {
        let block = BlockRecord {
            version: RECORD_VERSION,
            node: "filler".into(),
        };
        ops.push(TxnOp::put(
            keys.block(&id, &pool.block_cidr(b)),
            serde_json::to_string(&block).expect("json"),
            None,
        ));
        if ops.len() == 100 {
            client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .expect("preload");
        }
    }
    if !ops.is_empty() {
        client.txn(Txn::new().and_then(ops)).await.expect("preload");
    }
}

/// Allocate, release and a raw transaction, in turn, `OPS` times: the rows of each and the
/// time the allocator took to load the pool.
async fn allocate_release(
    cluster: &EtcdCluster,
    client: &mut etcd_client::Client,
    subnet: &str,
    preloaded: u32,
) -> (Row, Row, Row, Duration) {
    let prefix = format!("/bench/{}", subnet.replace('/', "_"));
    let config = StoreConfig::new(cluster.endpoints()).with_prefix(&prefix);
    let sets = parse_range_sets(&json!({"subnet": subnet})).expect("valid");
    if preloaded > 0 {
        // The pool must exist before its records: let one allocator define it.
        let definer = Allocator::start(&config, "definer").await.expect("start");
        let req = request("definer", &sets);
        definer.allocate(&req).await.expect("define");
        definer.release(&req.attachment).await.expect("release");
        let mut client = definer.store().client();
        preload(&mut client, definer.keys(), subnet, preloaded).await;
    }
    let t = Instant::now();
    let allocator = Allocator::start(&config, "bench-node")
        .await
        .expect("start");
    allocator.ready().await.expect("load");
    let load = t.elapsed();
    let mut alloc = Vec::with_capacity(OPS);
    let mut release = Vec::with_capacity(OPS);
    let mut raw = Vec::with_capacity(OPS);
    for i in 0..OPS {
        raw.push(
            raw_txn(
                client,
                &format!("/bench/raw/{}/{i}", subnet.replace('/', "_")),
            )
            .await,
        );
        let req = request(&format!("b{i}"), &sets);
        let t = Instant::now();
        allocator.allocate(&req).await.expect("allocate");
        alloc.push(t.elapsed());
        let t = Instant::now();
        allocator.release(&req.attachment).await.expect("release");
        release.push(t.elapsed());
    }
    let label = if preloaded > 0 {
        format!("{subnet} holding {preloaded}")
    } else {
        subnet.to_string()
    };
    (
        row(
            format!("raw create-if-absent txn, next to {label}"),
            &mut raw,
        ),
        row(format!("allocate {label}"), &mut alloc),
        row(format!("release {label}"), &mut release),
        load,
    )
}

fn request(container: &str, sets: &[hostnic_ipamd::RangeSet]) -> AllocateRequest {
    AllocateRequest {
        attachment: Attachment::new("bench", container, "eth0"),
        pod: None,
        range_sets: sets.to_vec(),
        requested: Vec::new(),
        requested_kind: Kind::Exact,
        netns: String::new(),
    }
}

fn main() {
    // `cargo test --benches` runs bench binaries with no arguments too; only measure under
    // `cargo bench`, which passes `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("allocate bench: run with `cargo bench -p hostnic-ipamd --bench allocate`");
        return;
    }
    let cluster = EtcdCluster::start(1).expect("etcd");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None).await.expect("connect");
        let (raw24, a24, r24, _) = allocate_release(&cluster, &mut client, "10.0.0.0/24", 0).await;
        let (raw16, a16, r16, _) = allocate_release(&cluster, &mut client, "10.0.0.0/16", 0).await;
        let (raw8, a8, r8, load8) =
            allocate_release(&cluster, &mut client, "10.0.0.0/8", PRELOAD).await;
        println!("| operation | p50 ms | p99 ms |\n|---|---|---|");
        for row in [&raw24, &a24, &r24, &raw16, &a16, &r16, &raw8, &a8, &r8] {
            println!("| {} | {:.3} | {:.3} |", row.what, ms(row.p50), ms(row.p99));
        }
        println!();
        println!("load of the /8 pool with {PRELOAD} allocations at start: {:.0} ms", ms(load8));
        // As rates: raw p50 / allocate p50, each against the raw series interleaved with it.
        let rate = |raw: &Row, op: &Row| ms(raw.p50) / ms(op.p50);
        println!(
            "ratio allocate : raw txn (rate) = {:.2} for /24, {:.2} for /16, {:.2} for /8 (target >= 0.8)",
            rate(&raw24, &a24),
            rate(&raw16, &a16),
            rate(&raw8, &a8)
        );
        println!(
            "ratio release : raw txn (rate) = {:.2} for /24, {:.2} for /16, {:.2} for /8",
            rate(&raw24, &r24),
            rate(&raw16, &r16),
            rate(&raw8, &r8)
        );
        // The raw series slows with etcd's database too: the plain ratio mixes that in, the
        // normalised one (each against its own raw series) does not. Both are printed.
        println!(
            "ratio allocate p50 /8 : /24 = {:.2} plain, {:.2} normalised by the interleaved raw txn (target <= 1.2)",
            ms(a8.p50) / ms(a24.p50),
            rate(&raw24, &a24) / rate(&raw8, &a8)
        );
    });
}
