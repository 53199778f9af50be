//! Allocate + release against a single-member etcd, each operation interleaved with the raw
//! etcd create-if-absent transaction the allocator is built on, so that every ratio compares
//! two series measured side by side (etcd slows as its database grows: a raw run before or
//! after would flatter or penalise the pool measured far from it).
//!
//! Pools: /24, /16 and /8 with nothing held by this node (the /8 already holding 100,000
//! allocations of another node), where every allocation lands in a fresh block; a /20 and a
//! /16 that are 95 % full with the free addresses scattered over this node's blocks; and a /16
//! as full whose every block another node claimed, so that this node must borrow; and a /16 that
//! is 99.9 % full, its few free addresses all in its last blocks. In every pool each round also
//! allocates as a pod whose namespace must stay out of another namespace's block, and as a pod
//! of a namespace auto-assigned the whole pool.
//!
//! Run: `cargo bench -p hostnic-ipamd --bench allocate` (results go in BENCHMARKS.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use hostnic_ipamd::addr::to_int;
use hostnic_ipamd::namespaces::{Restriction, Source};
use hostnic_ipamd::records::{BlockRecord, Keys, RECORD_VERSION};
use hostnic_ipamd::{
    parse_range_sets, AllocateRequest, Allocator, Attachment, Kind, Pool, StoreConfig,
};
use hostnic_testkit::EtcdCluster;
use serde_json::json;

const OPS: usize = 2000;
const PRELOAD: u32 = 100_000;
/// Share of the dynamic addresses a full pool leaves free, in percent.
const FREE_PERCENT: usize = 5;
/// Share of the dynamic addresses a nearly exhausted pool leaves free, in thousandths.
const NEARLY_FREE_PER_MILLE: usize = 1;
/// The other nodes whose blocks a borrowing node borrows from.
const PEERS: u128 = 8;
const NODE: &str = "bench-node";

/// What the pool holds when the allocator starts.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Nothing: allocations claim and fill fresh blocks of this node.
    Empty,
    /// This many consecutive addresses from the start of the pool, in blocks of another node.
    Preloaded(u32),
    /// All but `FREE_PERCENT` % of the dynamic addresses, the free ones picked at random, every
    /// block claimed by this node: the free addresses are scattered over its blocks.
    Fragmented,
    /// As `Fragmented`, but every block claimed by one of `PEERS` other nodes: no block is left
    /// to claim and this node allocates by borrowing.
    Borrowing,
    /// All but `NEARLY_FREE_PER_MILLE` ‰ of the dynamic addresses, every block claimed by this
    /// node, the free ones the pool's last: a handful of free addresses in its last blocks.
    NearlyExhausted,
}

impl Fill {
    fn label(self, subnet: &str) -> String {
        match self {
            Fill::Empty => subnet.to_string(),
            Fill::Preloaded(n) => format!("{subnet} holding {n}"),
            Fill::Fragmented => format!("{subnet} 95 % full, fragmented"),
            Fill::Borrowing => format!("{subnet} 95 % full, borrowing"),
            Fill::NearlyExhausted => format!("{subnet} 99.9 % full, free only in its last blocks"),
        }
    }

    /// The node that claims block `index`.
    fn owner(self, index: u128) -> String {
        match self {
            Fill::Fragmented | Fill::NearlyExhausted => NODE.to_string(),
            Fill::Borrowing => format!("peer-{}", index % PEERS),
            Fill::Empty | Fill::Preloaded(_) => "filler".to_string(),
        }
    }

    /// The addresses held when the allocator starts, in order.
    fn held(self, pool: &Pool) -> Vec<u128> {
        let first = to_int(pool.subnet.network());
        match self {
            Fill::Empty => Vec::new(),
            Fill::Preloaded(n) => (first + 2..first + 2 + u128::from(n)).collect(),
            Fill::Fragmented | Fill::Borrowing | Fill::NearlyExhausted => {
                let last = to_int(pool.subnet.broadcast());
                let mut dynamic: Vec<u128> =
                    (first..=last).filter(|&n| pool.is_dynamic(n)).collect();
                if let Fill::NearlyExhausted = self {
                    let free = dynamic.len() * NEARLY_FREE_PER_MILLE / 1000;
                    dynamic.truncate(dynamic.len() - free);
                    return dynamic;
                }
                shuffle(&mut dynamic);
                let free = dynamic.len() * FREE_PERCENT / 100;
                let mut held = dynamic.split_off(free);
                held.sort_unstable();
                held
            }
        }
    }

    /// The blocks claimed when the allocator starts: every block of a full pool, the blocks of
    /// the held addresses otherwise.
    fn claimed(self, pool: &Pool, held: &[u128]) -> Vec<u128> {
        match self {
            Fill::Fragmented | Fill::Borrowing | Fill::NearlyExhausted => pool
                .dynamic_block_spans()
                .flat_map(|(first, last)| first..=last)
                .collect(),
            Fill::Empty | Fill::Preloaded(_) => {
                let mut blocks: Vec<u128> = held.iter().map(|&n| pool.block_of(n)).collect();
                blocks.dedup();
                blocks
            }
        }
    }
}

/// Fisher-Yates with a fixed xorshift seed: every run fragments the pool alike.
fn shuffle(items: &mut [u128]) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

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

/// Writes the address records and block claims of `fill` straight into etcd, 100 keys per
/// transaction, as if their nodes had allocated them. Returns how many addresses it wrote.
async fn write_fill(
    client: &mut etcd_client::Client,
    keys: &Keys,
    pool: &Pool,
    fill: Fill,
) -> usize {
    let id = pool.id();
    let held = fill.held(pool);
    let addresses = held.iter().enumerate().map(|(i, &n)| {
        let record = json!({"version": 1,
            "handle": {"containerID": format!("pre{i}"), "ifname": "eth0"},
            "node": fill.owner(pool.block_of(n)), "network": "bench", "kind": "dynamic",
            "allocatedAt": 0});
        TxnOp::put(keys.address(&id, pool.addr(n)), record.to_string(), None)
    });
    let claims = fill.claimed(pool, &held).into_iter().map(|b| {
        let block = BlockRecord {
            version: RECORD_VERSION,
            node: fill.owner(b),
        };
        let value = serde_json::to_string(&block).expect("json");
        TxnOp::put(keys.block(&id, &pool.block_cidr(b)), value, None)
    });
    let ops: Vec<TxnOp> = addresses.chain(claims).collect();
    for chunk in ops.chunks(100) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .expect("preload");
    }
    held.len()
}

/// The allocator's picture of the pool: addresses held, and blocks by the node claiming them.
fn usage(allocator: &Allocator, subnet: &str) -> (u128, BTreeMap<String, u64>) {
    allocator
        .pool_usage()
        .into_iter()
        .find(|(s, _)| s == subnet)
        .map(|(_, u)| (u.held, u.blocks))
        .unwrap_or_default()
}

/// The rows of one pool: a raw transaction, allocate, release, and allocate kept outside another
/// namespace's block (then released, untimed), in turn, `OPS` times, and the time the allocator
/// took to load the pool.
struct Series {
    raw: Row,
    allocate: Row,
    release: Row,
    outside: Row,
    auto: Row,
    load: Duration,
}

/// A namespace whose auto-assigned blocks are the whole pool.
fn auto_assigned_whole(pool: &Pool) -> Restriction {
    Restriction {
        within: Some(vec![pool.subnet]),
        outside: Vec::new(),
        source: Source::Auto,
        auto_space: Some(None),
    }
}

/// What the namespace mapping makes of a pod in a namespace without an entry, when another
/// namespace is mapped to the pool's first block: the whole pool but that block.
fn outside_first_block(pool: &Pool) -> Restriction {
    Restriction {
        within: None,
        outside: vec![pool.block_cidr(0)],
        source: Source::Pool,
        auto_space: None,
    }
}

async fn allocate_release(
    cluster: &EtcdCluster,
    client: &mut etcd_client::Client,
    subnet: &str,
    fill: Fill,
) -> Series {
    let name = format!("{fill:?}-{}", subnet.replace('/', "_")).to_lowercase();
    let mut config = StoreConfig::new(cluster.endpoints()).with_prefix(format!("/bench/{name}"));
    // Loading 100,000 records may take longer than the default budget on a busy machine: the
    // load is timed, not limited.
    config.retry_timeout = Duration::from_secs(30);
    let sets = parse_range_sets(&json!({"subnet": subnet})).expect("valid");
    let mut held = 0;
    if !matches!(fill, Fill::Empty) {
        // The pool must exist before its records: let one allocator define it.
        let definer = Allocator::start(&config, "definer").await.expect("start");
        let req = request("definer", &sets);
        definer.allocate(&req).await.expect("define");
        definer.release(&req.attachment).await.expect("release");
        let (mut writer, keys) = (definer.store().client(), definer.keys().clone());
        drop(definer);
        held = write_fill(&mut writer, &keys, &sets[0].pools[0], fill).await;
    }
    let t = Instant::now();
    let allocator = Allocator::start(&config, NODE).await.expect("start");
    allocator.ready().await.expect("load");
    let load = t.elapsed();
    let (before, claims) = usage(&allocator, subnet);
    // A node follows the addresses of its own blocks only, until it must borrow.
    let own = match fill {
        Fill::Fragmented | Fill::NearlyExhausted => held as u128,
        _ => 0,
    };
    assert_eq!(
        before, own,
        "the allocator sees the addresses held in its own blocks, and no other"
    );
    let mut alloc = Vec::with_capacity(OPS);
    let mut release = Vec::with_capacity(OPS);
    let mut raw = Vec::with_capacity(OPS);
    let mut outside = Vec::with_capacity(OPS);
    let restrictions = [outside_first_block(&sets[0].pools[0])];
    let mut auto = Vec::with_capacity(OPS);
    let auto_restrictions = [auto_assigned_whole(&sets[0].pools[0])];
    for i in 0..OPS {
        raw.push(raw_txn(client, &format!("/bench/raw/{name}/{i}")).await);
        let req = request(&format!("b{i}"), &sets);
        let t = Instant::now();
        allocator.allocate(&req).await.expect("allocate");
        alloc.push(t.elapsed());
        let t = Instant::now();
        allocator.release(&req.attachment).await.expect("release");
        release.push(t.elapsed());
        outside.push(allocate_within(&allocator, &format!("n{i}"), &sets, &restrictions).await);
        // What the daemon does for a pod of an auto-assigned namespace: asks twice whether
        // its blocks have a free address (before and while extending them), then allocates.
        let t = Instant::now();
        for _ in 0..2 {
            assert!(allocator.has_free_within(&sets[0], &auto_restrictions[0]));
        }
        let checks = t.elapsed();
        auto.push(
            checks + allocate_within(&allocator, &format!("a{i}"), &sets, &auto_restrictions).await,
        );
    }
    if matches!(
        fill,
        Fill::Fragmented | Fill::Borrowing | Fill::NearlyExhausted
    ) {
        // The rounds kept the fill level and claimed nothing: a borrowing node still owns no
        // block, a fragmented one no new block. A borrowing node now follows the whole pool.
        let settle = Instant::now() + Duration::from_secs(5);
        while usage(&allocator, subnet).0 != held as u128 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(usage(&allocator, subnet), (held as u128, claims));
    }
    let label = fill.label(subnet);
    Series {
        raw: row(
            format!("raw create-if-absent txn, next to {label}"),
            &mut raw,
        ),
        allocate: row(format!("allocate {label}"), &mut alloc),
        release: row(format!("release {label}"), &mut release),
        outside: row(
            format!("allocate {label}, outside another namespace's first block"),
            &mut outside,
        ),
        auto: row(
            format!("allocate {label}, a namespace auto-assigned the whole pool"),
            &mut auto,
        ),
        load,
    }
}

/// How long an allocation for `container` within `restrictions` took; it is then released
/// (not timed).
async fn allocate_within(
    allocator: &Allocator,
    container: &str,
    sets: &[hostnic_ipamd::RangeSet],
    restrictions: &[Restriction],
) -> Duration {
    let req = request(container, sets);
    let t = Instant::now();
    allocator
        .allocate_within(&req, restrictions)
        .await
        .expect("allocate within the namespace's restriction");
    let took = t.elapsed();
    allocator.release(&req.attachment).await.expect("release");
    took
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
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .expect("connect");
        let mut all = Vec::new();
        for (subnet, fill) in [
            ("10.0.0.0/24", Fill::Empty),
            ("10.0.0.0/16", Fill::Empty),
            ("10.0.0.0/8", Fill::Preloaded(PRELOAD)),
            ("10.0.0.0/20", Fill::Fragmented),
            ("10.0.0.0/16", Fill::Fragmented),
            ("10.0.0.0/16", Fill::Borrowing),
            ("10.0.0.0/16", Fill::NearlyExhausted),
        ] {
            let series = allocate_release(&cluster, &mut client, subnet, fill).await;
            println!(
                "{}: pool loaded at start in {:.0} ms",
                fill.label(subnet),
                ms(series.load)
            );
            all.push(series);
        }
        let [p24, p16, p8, frag20, frag16, borrow16, nearly16] = &all[..] else {
            unreachable!("seven pools measured")
        };
        println!();
        println!("| operation | p50 ms | p99 ms |\n|---|---|---|");
        for s in &all {
            for row in [&s.raw, &s.allocate, &s.release, &s.outside, &s.auto] {
                println!("| {} | {:.3} | {:.3} |", row.what, ms(row.p50), ms(row.p99));
            }
        }
        println!();
        // As rates: raw p50 / operation p50, each against the raw series interleaved with it.
        let rate = |s: &Series, op: &Row| ms(s.raw.p50) / ms(op.p50);
        let rates = |op: fn(&Series) -> &Row| {
            all.iter()
                .map(|s| format!("{:.2}", rate(s, op(s))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "ratio allocate : raw txn (rate), pools in the table's order = {}",
            rates(|s| &s.allocate)
        );
        println!(
            "ratio release : raw txn (rate), pools in the table's order = {}",
            rates(|s| &s.release)
        );
        println!(
            "ratio allocate outside another namespace's block : raw txn (rate), pools in the \
             table's order = {}",
            rates(|s| &s.outside)
        );
        println!(
            "ratio allocate in a namespace auto-assigned the whole pool : raw txn (rate), pools \
             in the table's order = {}",
            rates(|s| &s.auto)
        );
        // The raw series slows with etcd's database too: the plain ratio mixes that in, the
        // normalised one (each against its own raw series) does not. Both are printed.
        let against = |s: &Series, base: &Series, what: &str| {
            println!(
                "ratio allocate p50 {what} = {:.2} plain, {:.2} normalised by the interleaved raw txn",
                ms(s.allocate.p50) / ms(base.allocate.p50),
                rate(base, &base.allocate) / rate(s, &s.allocate)
            );
        };
        against(p8, p24, "/8 : /24");
        against(p16, p24, "/16 : /24");
        against(frag20, p24, "fragmented /20 : /24");
        against(frag16, p24, "fragmented /16 : /24");
        against(frag16, frag20, "fragmented /16 : fragmented /20");
        against(borrow16, p24, "borrowing /16 : /24");
        against(nearly16, p24, "99.9 % full /16 : /24");
    });
}
