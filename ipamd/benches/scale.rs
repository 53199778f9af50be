//! Daemon memory and start with many allocations in etcd: the release `hostnic-ipamd` started
//! on a /8 pool with no allocations (the baseline), then on the pool holding `LOADED`
//! allocations of another node (written straight into etcd): its time from spawn to the first
//! Allocate served and its resident memory (`/proc/<pid>/status` VmRSS, and VmHWM the peak;
//! `smaps` for what it is made of); then its memory after it made `MADE` allocations
//! itself (64 concurrent clients over the socket); then the same start with `BIG` allocations
//! in etcd. Each start is followed by its peers: a raw read of every key as the daemon reads
//! (bounded pages), and as it read before (unbounded pages).
//!
//! Run (as root; the daemon serves root only):
//! `cargo build --release --bins && cargo bench -p hostnic-ipamd --bench scale`

mod common;

use common::release_daemon;
use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use hostnic_ipamd::records::{BlockRecord, Keys, RECORD_VERSION};
use hostnic_ipamd::store::{Store, PAGE};
use hostnic_ipamd::{parse_range_sets, AllocateRequest, Allocator, Attachment, Kind, StoreConfig};
use hostnic_proto::v1;
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::EtcdCluster;
use serde_json::json;

const PREFIX: &str = "/hostnic/ipam/v1";
const SUBNET: &str = "10.0.0.0/8";
const LOADED: u32 = 100_000;
const MADE: usize = 100_000;
const BIG: u32 = 1_000_000;
const CLIENTS: usize = 64;

/// VmRSS and VmHWM of `pid`, in MB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .expect("field in /proc status")
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Writes allocation records `from..to` of `SUBNET` (and their block claims) straight into
/// etcd, as node "filler", 8 writers of 100-key transactions at once.
async fn preload(client: &etcd_client::Client, from: u32, to: u32) {
    let pool = &parse_range_sets(&json!({ "subnet": SUBNET })).expect("valid")[0].pools[0];
    let keys = Keys::new(PREFIX);
    let base = u32::from("10.0.0.0".parse::<std::net::Ipv4Addr>().expect("literal")) + 2;
    let writers: Vec<_> = (0..8u32)
        .map(|w| {
            let (mut client, pool, keys) = (client.clone(), pool.clone(), keys.clone());
            tokio::spawn(async move {
                let id = pool.id();
                let mut ops = Vec::new();
                let mut blocks = std::collections::BTreeSet::new();
                for i in (from..to).filter(|i| i % 8 == w) {
                    let ip = std::net::IpAddr::V4((base + i).into());
                    blocks.insert(pool.block_of(hostnic_ipamd::addr::to_int(ip)));
                    let record = json!({"version": 1,
                        "handle": {"containerID": format!("pre{i}"), "ifname": "eth0"},
                        "node": "filler", "network": "bench", "kind": "dynamic", "allocatedAt": 0});
                    ops.push(TxnOp::put(keys.address(&id, ip), record.to_string(), None));
                    if ops.len() == 100 {
                        let txn = Txn::new().and_then(std::mem::take(&mut ops));
                        client.txn(txn).await.expect("preload");
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
                        let txn = Txn::new().and_then(std::mem::take(&mut ops));
                        client.txn(txn).await.expect("preload");
                    }
                }
                if !ops.is_empty() {
                    client.txn(Txn::new().and_then(ops)).await.expect("preload");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("preload writer");
    }
}

/// The peer of a start: reading every key under the prefix as the daemon reads (5,000-key
/// pages over ranges bounded by the last key read), without decoding them. Returns how many
/// keys and how long it took.
async fn bounded_read(store: &Store) -> (usize, Duration) {
    let t = Instant::now();
    let mut keys = 0;
    store
        .for_each_page(
            &format!("{PREFIX}/"),
            PAGE,
            |_, _| false,
            |kvs| keys += kvs.len(),
        )
        .await
        .expect("bounded paged read");
    (keys, t.elapsed())
}

/// The former peer: 5,000-key pages, each over the whole rest of the prefix (etcd 3.4 walks
/// that rest to count it on every page).
async fn unbounded_read(client: &etcd_client::Client) -> (usize, Duration) {
    let mut client = client.clone();
    let t = Instant::now();
    let end = etcd_client::GetOptions::new().with_range(format!("{PREFIX}0"));
    let mut from = format!("{PREFIX}/");
    let mut keys = 0;
    loop {
        let resp = client
            .get(from.as_str(), Some(end.clone().with_limit(PAGE)))
            .await
            .expect("range read");
        keys += resp.kvs().len();
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = format!("{}\0", String::from_utf8_lossy(last.key()));
            }
            _ => return (keys, t.elapsed()),
        }
    }
}

/// Both peers, printed.
async fn peers(store: &Store) {
    let (keys, bounded) = bounded_read(store).await;
    let (_, unbounded) = unbounded_read(&store.client()).await;
    println!(
        "peers, just after: a raw read of the {keys} keys under the prefix in bounded pages {:.0} ms; in unbounded pages {:.0} ms",
        bounded.as_secs_f64() * 1000.0,
        unbounded.as_secs_f64() * 1000.0
    );
}

/// What the memory of `pid` is made of: its resident anonymous memory in the main heap (`brk`)
/// and in other anonymous mappings (glibc's per-thread arenas, large allocations, stacks), its
/// resident file-backed memory (the binary), from `/proc/<pid>/smaps`.
fn rollup(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut heap, mut anonymous, mut file) = (0u64, 0u64, 0u64);
    let mut mapping = "";
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            mapping = line;
        } else if fields.first() == Some(&"Rss:") {
            let kb: u64 = fields[1].parse().expect("Rss kB");
            let named = mapping.split_whitespace().nth(5);
            match named {
                Some("[heap]") => heap += kb,
                Some(path) if path.starts_with('/') => file += kb,
                _ => anonymous += kb,
            }
        }
    }
    format!(
        "resident: main heap {:.1} MB, other anonymous {:.1} MB, files {:.1} MB",
        heap as f64 / 1024.0,
        anonymous as f64 / 1024.0,
        file as f64 / 1024.0
    )
}

fn allocate_request(container: &str) -> v1::AllocateRequest {
    v1::AllocateRequest {
        attachment: Some(v1::Attachment {
            container_id: container.to_owned(),
            ifname: "eth0".to_owned(),
        }),
        network: Some(v1::Network {
            name: "bench".to_owned(),
            ipam_json: json!({ "type": "hostnic-ipam", "subnet": SUBNET }).to_string(),
        }),
        pod: None,
        requested_ips: Vec::new(),
        netns: String::new(),
    }
}

/// Starts the daemon and returns it with the time from spawn to its first Allocate served
/// (asked again while the daemon answers that it is still loading).
/// Spawned from the main thread: the daemon is killed when the thread that spawned it ends.
fn start(
    rt: &tokio::runtime::Runtime,
    daemon: &Path,
    etcd: &EtcdCluster,
    socket: &Path,
) -> (IpamDaemon, Duration) {
    let t = Instant::now();
    let d = IpamDaemon::start(daemon, &etcd.endpoints(), "bench", PREFIX, socket, &[])
        .expect("daemon serves");
    rt.block_on(async {
        let channel = hostnic_proto::connect(socket, Duration::from_secs(1))
            .await
            .expect("connect");
        let mut client = IpamClient::new(channel);
        // Until the pools are loaded the daemon answers Unavailable (code 11): ask again.
        loop {
            match client.allocate(allocate_request("first")).await {
                Ok(_) => break,
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && t.elapsed() < Duration::from_secs(120) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(status) => panic!("first allocate: {status:?}"),
            }
        }
    });
    (d, t.elapsed())
}

/// `count` allocations made by the daemon, `CLIENTS` at a time.
async fn allocate_many(socket: &Path, count: usize) {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = socket.to_owned();
            tokio::spawn(async move {
                let channel = hostnic_proto::connect(&socket, Duration::from_secs(1))
                    .await
                    .expect("connect");
                let mut client = IpamClient::new(channel);
                for i in (0..count).filter(|i| i % CLIENTS == c) {
                    client
                        .allocate(allocate_request(&format!("made{i}")))
                        .await
                        .expect("allocate");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale bench: run with `cargo bench -p hostnic-ipamd --bench scale`");
        return;
    }
    let daemon = release_daemon();
    let etcd = EtcdCluster::start(1).expect("etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("ipamd.sock");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = rt.block_on(async {
        // The pool must exist before its records: let one allocator define it.
        let config = StoreConfig::new(etcd.endpoints()).with_prefix(PREFIX);
        let definer = Allocator::start(&config, "definer").await.expect("start");
        let req = AllocateRequest {
            attachment: Attachment::new("bench", "define", "eth0"),
            pod: None,
            range_sets: parse_range_sets(&json!({ "subnet": SUBNET })).expect("valid"),
            requested: Vec::new(),
            requested_kind: Kind::Exact,
            netns: String::new(),
        };
        definer.allocate(&req).await.expect("define");
        definer.release(&req.attachment).await.expect("release");
        // The peers' reads may take longer than the daemon's 1 s per request: they are timed,
        // not bounded.
        let patient = StoreConfig {
            request_timeout: Duration::from_secs(60),
            retry_timeout: Duration::from_secs(120),
            ..config
        };
        Store::connect(&patient).await.expect("connect")
    });
    let client = store.client();

    // The baseline: the pool and no allocations.
    let (mut d, took) = start(&rt, &daemon, &etcd, &socket);
    let pid = d.pid().expect("running");
    let (rss, hwm) = memory(pid);
    println!(
        "no allocations: start to first Allocate served {:.0} ms, VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB; {}",
        took.as_secs_f64() * 1000.0,
        rollup(pid)
    );
    d.stop();

    rt.block_on(async {
        let t = Instant::now();
        preload(&client, 0, LOADED).await;
        println!(
            "preloaded {LOADED} allocations in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    });
    let (mut d, took) = start(&rt, &daemon, &etcd, &socket);
    let pid = d.pid().expect("running");
    rt.block_on(async {
        let (rss, hwm) = memory(pid);
        println!(
            "{LOADED} allocations loaded: start to first Allocate served {:.0} ms, VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB; {}",
            took.as_secs_f64() * 1000.0,
            rollup(pid)
        );
        peers(&store).await;
        let t = Instant::now();
        allocate_many(&socket, MADE).await;
        let (rss, hwm) = memory(pid);
        println!(
            "then {MADE} allocations made by the daemon ({:.1} s): VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB; {}",
            t.elapsed().as_secs_f64(),
            rollup(pid)
        );
    });
    d.stop();

    rt.block_on(async {
        let t = Instant::now();
        preload(&client, LOADED, BIG).await;
        println!(
            "preloaded up to {BIG} allocations (plus the {MADE} made) in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    });
    let (d, took) = start(&rt, &daemon, &etcd, &socket);
    let pid = d.pid().expect("running");
    let (rss, hwm) = memory(pid);
    println!(
        "{} allocations in etcd: start to first Allocate served {:.0} ms, VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB; {}",
        BIG as usize + MADE,
        took.as_secs_f64() * 1000.0,
        rollup(pid)
    );
    rt.block_on(peers(&store));
}
