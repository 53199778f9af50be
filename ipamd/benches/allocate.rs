//! Allocate + release against a single-member etcd for /24, /16 and /8 pools (the /8 already
//! holding 100,000 allocations), compared in the same run with the raw etcd create-if-absent
//! transaction the allocator is built on.
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

async fn raw_txn(client: &mut etcd_client::Client, run: u32) -> Row {
    let mut samples = Vec::with_capacity(OPS);
    for i in 0..OPS {
        let key = format!("/bench/raw{run}/{i}");
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                r#"{"version":1,"handle":"x"}"#,
                None,
            )]);
        let t = Instant::now();
        let resp = client.txn(txn).await.expect("raw txn");
        samples.push(t.elapsed());
        assert!(resp.succeeded());
    }
    Row {
        what: "raw create-if-absent txn".into(),
        p50: percentile(&mut samples, 0.5),
        p99: percentile(&mut samples, 0.99),
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

async fn allocate_release(
    cluster: &EtcdCluster,
    subnet: &str,
    preloaded: u32,
) -> (Row, Row, Duration) {
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
    for i in 0..OPS {
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
        Row {
            what: format!("allocate {label}"),
            p50: percentile(&mut alloc, 0.5),
            p99: percentile(&mut alloc, 0.99),
        },
        Row {
            what: format!("release {label}"),
            p50: percentile(&mut release, 0.5),
            p99: percentile(&mut release, 0.99),
        },
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
        let raw = raw_txn(&mut client, 1).await;
        let (a24, r24, _) = allocate_release(&cluster, "10.0.0.0/24", 0).await;
        let (a16, r16, _) = allocate_release(&cluster, "10.0.0.0/16", 0).await;
        let (a8, r8, load8) = allocate_release(&cluster, "10.0.0.0/8", PRELOAD).await;
        // A second raw run after the pools, so drift over the run shows.
        let raw2 = raw_txn(&mut client, 2).await;
        println!("| operation | p50 ms | p99 ms |\n|---|---|---|");
        for row in [&raw, &a24, &r24, &a16, &r16, &a8, &r8, &raw2] {
            println!("| {} | {:.3} | {:.3} |", row.what, ms(row.p50), ms(row.p99));
        }
        // Against the slower of the two raw runs; BENCHMARKS.md also gives the other.
        let raw_p50 = ms(raw.p50).max(ms(raw2.p50));
        println!();
        println!("load of the /8 pool with {PRELOAD} allocations at start: {:.0} ms", ms(load8));
        println!("ratio allocate p50 /8 : /24 = {:.2} (target <= 1.2)", ms(a8.p50) / ms(a24.p50));
        println!(
            "ratio allocate : raw txn (rate, = raw p50 / allocate p50) = {:.2} for /24, {:.2} for /8 (target >= 0.8)",
            raw_p50 / ms(a24.p50),
            raw_p50 / ms(a8.p50)
        );
    });
}
