//! Watch fan-out: what an allocation made on one node costs every other daemon. A daemon
//! watches the pool index, pool definitions and block claims, and the addresses of only the
//! blocks it follows (`allocator/follow.rs`); the idle daemons here follow none of the churner's.
//!
//! First, the unit costs of one pod: the records one ADD, one DEL, a block claim and a
//! StatefulSet pod's first ADD leave in etcd (key and value bytes, read back), and the etcd
//! requests each makes (etcd's own `grpc_server_handled_total` and `etcd_mvcc_*` counters).
//!
//! Then the fan-out: the production `Allocator` in-process (node "churner") makes `OPS`
//! allocations, then releases them (each half measured apart), `TASKS` at a time, while 0, 1,
//! 8 or 32 release daemons of other nodes sit idle, watching (`IDLE`). The phases alternate
//! within each round (the order reversed every other round), so each watcher count is compared
//! with the others at the same moments of one run. Per phase, from etcd's `/metrics` on its client URL: the watch events
//! it sent (`etcd_debugging_mvcc_events_total`, counted as each watch response leaves), the
//! watch responses (`grpc_server_msg_sent_total` of `Watch`), the bytes sent to all gRPC
//! clients (`etcd_network_client_grpc_sent_bytes_total`); CPU time of etcd and of each idle
//! daemon from `/proc/<pid>/stat`. The cost per watcher is the difference to the phase with 0
//! idle daemons, divided by the number of idle daemons.
//!
//! Run (as root; the daemon serves root only):
//! `cargo build --release --bins && cargo bench -p hostnic-ipamd --bench fanout`

mod common;

use common::{compact, release_daemon};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use hostnic_ipamd::sticky::Identity;
use hostnic_ipamd::{
    parse_range_sets, AllocateRequest, Allocator, Attachment, Kind, PodRef, StoreConfig,
};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::EtcdCluster;
use serde_json::json;

/// The daemon's default prefix, so that keys have the length they have in a cluster.
const PREFIX: &str = hostnic_ipamd::store::DEFAULT_PREFIX;
const SUBNET: &str = "10.188.0.0/16";
/// Allocations per phase, each released in the same phase: 2 × `OPS` operations.
const OPS: usize = 10_000;
const TASKS: usize = 16;
/// The idle daemons of each phase of a round, in the order of even rounds (odd rounds run it
/// backwards). 32 besides the 1 and 8 asked for: etcd's CPU per watcher is small against its
/// drift between phases, and 32 watchers make it show. 0 next to 32, so that the largest
/// difference is taken between neighbours.
const IDLE: [usize; 4] = [1, 0, 32, 8];
const ROUNDS: usize = 3;
/// The network of the example install (`etc/kubernetes/hostnic-ipam.yaml`): with the sizes of
/// the identifiers in [`request`], the records have the size they have in a cluster.
const NETWORK: &str = "hostnic-pods";

/// etcd's Prometheus page, from its client URL (HTTP/1.0: a body to EOF, not chunked).
fn scrape(endpoint: &str) -> String {
    let addr = endpoint.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).expect("connect to etcd's client URL");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request sent");
    let mut page = String::new();
    stream.read_to_string(&mut page).expect("metrics page");
    match page.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_owned(),
        None => panic!("no end of headers in etcd's /metrics answer"),
    }
}

/// Every sample of a Prometheus page, by series (`name{labels}` as exposed).
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The counters this bench reads, from one page.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    events: f64,
    watch_responses: f64,
    sent_bytes: f64,
    watchers: f64,
}

const EVENTS: &str = "etcd_debugging_mvcc_events_total";
const WATCH_RESPONSES: &str = r#"grpc_server_msg_sent_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"}"#;
const SENT_BYTES: &str = "etcd_network_client_grpc_sent_bytes_total";
const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

fn counters(endpoint: &str) -> Counters {
    let all = samples(&scrape(endpoint));
    let get = |series: &str| {
        *all.get(series)
            .unwrap_or_else(|| panic!("etcd exposes no {series}"))
    };
    Counters {
        events: get(EVENTS),
        watch_responses: get(WATCH_RESPONSES),
        sent_bytes: get(SENT_BYTES),
        watchers: get(WATCHERS),
    }
}

/// User plus system CPU time of `pid` so far, in seconds (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32, ticks_per_s: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name, which is in parentheses: state is the first, utime
    // the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / ticks_per_s
}

fn ticks_per_s() -> f64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// A request as kubelet's runtime makes it: a 64-hex container id, the pod's namespace, name
/// and UID, its network namespace's path.
fn request(container: usize, pod: &str) -> AllocateRequest {
    AllocateRequest {
        attachment: Attachment::new(NETWORK, format!("{container:064x}"), "eth0"),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: pod.into(),
            uid: format!("{:08x}-0000-4000-8000-{container:012x}", container),
        }),
        range_sets: parse_range_sets(&json!({ "subnet": SUBNET, "blockSize": 26 })).expect("valid"),
        requested: Vec::new(),
        requested_kind: Kind::Exact,
        netns: format!(
            "/var/run/netns/cni-{:08x}-0000-4000-8000-{container:012x}",
            container
        ),
    }
}

/// The requests etcd answered and the keys it wrote, between two pages: every
/// `grpc_server_handled_total` series that moved, and the mvcc put and delete counters.
fn requests_between(before: &str, after: &str) -> Vec<(String, f64)> {
    let (before, after) = (samples(before), samples(after));
    after
        .iter()
        .filter(|(series, _)| {
            series.starts_with("grpc_server_handled_total{")
                || series.starts_with("etcd_mvcc_put_total")
                || series.starts_with("etcd_mvcc_delete_total")
                || series.starts_with("etcd_debugging_mvcc_total_put_size_in_bytes")
        })
        .filter_map(|(series, v)| {
            let d = v - before.get(series).copied().unwrap_or(0.0);
            (d != 0.0).then(|| {
                // `grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",...}` -> `Txn OK`
                let short = match series.split_once('{') {
                    Some(("grpc_server_handled_total", labels)) => {
                        let label = |name: &str| {
                            labels
                                .split(',')
                                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                                .map(|v| v.trim_end_matches(['"', '}']).to_owned())
                                .unwrap_or_default()
                        };
                        format!("{} {}", label("grpc_method"), label("grpc_code"))
                    }
                    _ => series.clone(),
                };
                (short, d)
            })
        })
        .collect()
}

/// Every key under `prefix` with its key and value sizes. (Read before a step's first page and
/// after its last, so its own Range is not counted.)
async fn keys_under(
    client: &etcd_client::Client,
    prefix: &str,
) -> BTreeMap<String, (usize, usize)> {
    let resp = client
        .clone()
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("read back");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.key().len(), kv.value().len()),
            )
        })
        .collect()
}

/// Prints the keys that are new or changed in `after`, with their sizes.
fn print_new(
    what: &str,
    before: &BTreeMap<String, (usize, usize)>,
    after: &BTreeMap<String, (usize, usize)>,
) {
    for (key, (k, v)) in after {
        if before.get(key) != Some(&(*k, *v)) {
            println!("| {what} | `{key}` | {k} | {v} | {} |", k + v);
        }
    }
    for key in before.keys().filter(|k| !after.contains_key(*k)) {
        println!("| {what} | deleted `{key}` | | | |");
    }
}

/// The records and etcd requests of one pod's ADD and DEL, of a block claim, and of a
/// StatefulSet pod's first ADD, through the production allocator.
async fn unit_costs(etcd: &EtcdCluster, client: &etcd_client::Client) {
    let endpoint = etcd.endpoint(0);
    let config = StoreConfig::new(etcd.endpoints()).with_prefix(PREFIX);
    let allocator = Arc::new(
        Allocator::start(&config, "node-0001.cluster.local")
            .await
            .expect("start"),
    );
    println!("## Records one pod leaves in etcd (key and value bytes, read back)");
    println!();
    println!("| step | key | key bytes | value bytes | total |");
    println!("|---|---|---|---|---|");
    let mut steps = Vec::new();
    // The first ADD defines the pool and claims a block; the second is a plain ADD.
    for (what, container, pod) in [
        ("first ADD of the pool", 1, "web-5d4f8c7b9-x7k2p"),
        ("ADD", 2, "web-5d4f8c7b9-q9m4z"),
    ] {
        let req = request(container, pod);
        let (keys, page) = (keys_under(client, PREFIX).await, scrape(&endpoint));
        allocator.allocate(&req).await.expect("allocate");
        let (page_after, after) = (scrape(&endpoint), keys_under(client, PREFIX).await);
        print_new(what, &keys, &after);
        steps.push((what, requests_between(&page, &page_after)));
    }
    let req = request(2, "");
    let (keys, page) = (keys_under(client, PREFIX).await, scrape(&endpoint));
    allocator.release(&req.attachment).await.expect("release");
    let (page_after, after) = (scrape(&endpoint), keys_under(client, PREFIX).await);
    print_new("DEL", &keys, &after);
    steps.push(("DEL", requests_between(&page, &page_after)));
    let identity = Identity {
        network: NETWORK.into(),
        namespace: "default".into(),
        stateful_set: "db".into(),
        ordinal: 0,
        stateful_set_uid: "6f1c2a9e-0000-4000-8000-00000000beef".into(),
    };
    let req = request(3, "db-0");
    let (keys, page) = (keys_under(client, PREFIX).await, scrape(&endpoint));
    allocator
        .allocate_sticky(&req, &identity, &[])
        .await
        .expect("sticky allocate");
    let (page_after, after) = (scrape(&endpoint), keys_under(client, PREFIX).await);
    print_new("first ADD of a StatefulSet pod", &keys, &after);
    steps.push((
        "first ADD of a StatefulSet pod",
        requests_between(&page, &page_after),
    ));
    println!();
    println!(
        "## etcd requests per step (grpc_server_handled_total by method and code; mvcc counters)"
    );
    println!();
    for (what, requests) in steps {
        let list: Vec<String> = requests.iter().map(|(s, d)| format!("{s}: {d}")).collect();
        println!("- {what}: {}", list.join(", "));
    }
    println!();
    keyspace_growth(&endpoint, client, &allocator).await;
}

/// etcd's database in use (`etcd_mvcc_db_total_size_in_use_in_bytes`), once its backend has
/// committed (every 100 ms).
async fn db_in_use(endpoint: &str) -> f64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    samples(&scrape(endpoint))["etcd_mvcc_db_total_size_in_use_in_bytes"]
}

/// What `OPS` pods cost etcd's database: held, then released (their history until a
/// compaction), then after a compaction.
async fn keyspace_growth(endpoint: &str, client: &etcd_client::Client, allocator: &Arc<Allocator>) {
    compact(client).await;
    let start = db_in_use(endpoint).await;
    churn(allocator, 1, Half::Allocate).await;
    let held = db_in_use(endpoint).await;
    churn(allocator, 1, Half::Release).await;
    let released = db_in_use(endpoint).await;
    compact(client).await;
    let compacted = db_in_use(endpoint).await;
    let per_pod = |from: f64, to: f64| (to - from) / OPS as f64;
    println!("## etcd's database in use (etcd_mvcc_db_total_size_in_use_in_bytes), {OPS} pods of one node");
    println!();
    println!("| state | bytes in use | per pod |");
    println!("|---|---|---|");
    println!("| compacted, before | {start:.0} | |");
    println!(
        "| {OPS} pods held | {held:.0} | {:.0} |",
        per_pod(start, held)
    );
    println!("| then released, not compacted (history, tombstones, release markers) | {released:.0} | {:.0} |", per_pod(start, released));
    println!(
        "| then compacted (release markers live until their lease ends) | {compacted:.0} | {:.0} |",
        per_pod(start, compacted)
    );
    println!();
}

/// What a phase does: `OPS` allocations by the churner, or the releases of the allocations
/// the same phase made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    Allocate,
    Release,
}

/// One half of phase `phase`, `TASKS` at a time (phase 0 warms, 1 is the unit costs'). Returns
/// the wall time.
async fn churn(allocator: &Arc<Allocator>, phase: usize, half: Half) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let allocator = Arc::clone(allocator);
            tokio::spawn(async move {
                for i in (0..OPS).filter(|i| i % TASKS == t) {
                    let req = request(phase * OPS + i, "churn");
                    match half {
                        Half::Allocate => drop(allocator.allocate(&req).await.expect("allocate")),
                        Half::Release => {
                            drop(allocator.release(&req.attachment).await.expect("release"))
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("churn task");
    }
    start.elapsed()
}

/// Waits until etcd counts `watchers` watchers.
fn wait_for_watchers(endpoint: &str, watchers: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while counters(endpoint).watchers != watchers {
        assert!(
            Instant::now() < deadline,
            "etcd counts {} watchers, expected {watchers}",
            counters(endpoint).watchers
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one phase cost: deltas of etcd's counters, etcd's CPU seconds, and each idle
/// daemon's CPU seconds.
struct Phase {
    idle: usize,
    half: Half,
    wall: Duration,
    events: f64,
    watch_responses: f64,
    sent_bytes: f64,
    etcd_cpu: f64,
    daemon_cpu: Vec<f64>,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("fanout bench: run with `cargo bench -p hostnic-ipamd --bench fanout`");
        return;
    }
    let daemon = release_daemon();
    let etcd = EtcdCluster::start(1).expect("etcd");
    let endpoint = etcd.endpoint(0);
    let etcd_pid = etcd.member_pid(0).expect("etcd runs");
    let ticks = ticks_per_s();
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt.block_on(async {
        etcd_client::Client::connect(etcd.endpoints(), None)
            .await
            .expect("connect to etcd")
    });
    rt.block_on(async {
        unit_costs(&etcd, &client).await;
        // The fan-out starts from an empty keyspace.
        client
            .clone()
            .delete(
                PREFIX,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .expect("delete the unit-cost records");
    });

    let allocator = rt.block_on(async {
        let config = StoreConfig::new(etcd.endpoints()).with_prefix(PREFIX);
        let allocator = Arc::new(Allocator::start(&config, "churner").await.expect("start"));
        // Warm: the pool's definition and the churner's first blocks.
        churn(&allocator, 0, Half::Allocate).await;
        churn(&allocator, 0, Half::Release).await;
        allocator
    });
    // The unit-cost allocator is gone; what watches now is the churner alone.
    let base_watchers = counters(&endpoint).watchers;
    // Each daemon's own watchers, learnt from the first one started.
    let mut per_daemon = 0.0;

    let mut phases = Vec::new();
    let mut phase_no = 2;
    for round in 0..ROUNDS {
        let mut order = IDLE.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for idle in order {
            // Spawned from the main thread: the daemon is killed when the thread that spawned it
            // ends.
            let daemons: Vec<IpamDaemon> = (0..idle)
                .map(|d| {
                    let socket = dir.path().join(format!("idle{d}.sock"));
                    IpamDaemon::start(
                        &daemon,
                        &etcd.endpoints(),
                        &format!("idle-{d}"),
                        PREFIX,
                        &socket,
                        &[],
                    )
                    .expect("daemon serves")
                })
                .collect();
            if idle > 0 && per_daemon == 0.0 {
                // Wait for the first daemon's watches to settle, then learn how many it has.
                let deadline = Instant::now() + Duration::from_secs(30);
                while counters(&endpoint).watchers == base_watchers {
                    assert!(Instant::now() < deadline, "idle daemons never watched");
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(Duration::from_millis(500));
                per_daemon = (counters(&endpoint).watchers - base_watchers) / idle as f64;
                println!("watchers: the churner {base_watchers}, each idle daemon {per_daemon}");
            }
            wait_for_watchers(&endpoint, base_watchers + per_daemon * idle as f64);
            let pids: Vec<u32> = daemons.iter().map(|d| d.pid().expect("runs")).collect();
            rt.block_on(compact(&client));
            // Quiet for a moment: the daemons' load and etcd's compaction are done.
            std::thread::sleep(Duration::from_millis(300));
            for half in [Half::Allocate, Half::Release] {
                let before = counters(&endpoint);
                let etcd_before = cpu_seconds(etcd_pid, ticks);
                let daemons_before: Vec<f64> =
                    pids.iter().map(|p| cpu_seconds(*p, ticks)).collect();
                let wall = rt.block_on(churn(&allocator, phase_no, half));
                // The last events reach the watchers after the churner's last reply.
                std::thread::sleep(Duration::from_millis(300));
                let after = counters(&endpoint);
                phases.push(Phase {
                    idle,
                    half,
                    wall,
                    events: after.events - before.events,
                    watch_responses: after.watch_responses - before.watch_responses,
                    sent_bytes: after.sent_bytes - before.sent_bytes,
                    etcd_cpu: cpu_seconds(etcd_pid, ticks) - etcd_before,
                    daemon_cpu: pids
                        .iter()
                        .zip(&daemons_before)
                        .map(|(p, b)| cpu_seconds(*p, ticks) - b)
                        .collect(),
                });
            }
            phase_no += 1;
            drop(daemons);
            wait_for_watchers(&endpoint, base_watchers);
        }
    }

    let ops = OPS as f64;
    let name = |half: Half| match half {
        Half::Allocate => "allocate",
        Half::Release => "release",
    };
    println!("## Watch fan-out: {OPS} allocations, then their releases, per phase by one node, {TASKS} at a time");
    println!();
    println!("| round | idle daemons | operation | ops/s | watch events per op | watch responses per op | bytes sent per op | etcd CPU µs per op | idle daemon CPU µs per remote op (mean; each) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let rounds: Vec<&[Phase]> = phases.chunks(2 * IDLE.len()).collect();
    for (round, phases) in rounds.iter().enumerate() {
        for p in phases.iter() {
            let each: Vec<String> = p
                .daemon_cpu
                .iter()
                .map(|s| format!("{:.1}", s * 1e6 / ops))
                .collect();
            let mean = match p.daemon_cpu.len() {
                0 => String::new(),
                n => format!(
                    "{:.1} ({})",
                    p.daemon_cpu.iter().sum::<f64>() * 1e6 / ops / n as f64,
                    each.join(", ")
                ),
            };
            println!(
                "| {round} | {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {mean} |",
                p.idle,
                name(p.half),
                ops / p.wall.as_secs_f64(),
                p.events / ops,
                p.watch_responses / ops,
                p.sent_bytes / ops,
                p.etcd_cpu * 1e6 / ops,
            );
        }
    }
    println!();
    println!("Per idle watcher, against the same round's phase with 0 idle daemons: (phase − peer) / idle daemons / ops");
    println!();
    println!("| round | idle daemons | operation | watch events per op per watcher | bytes sent per op per watcher | etcd CPU µs per op per watcher |");
    println!("|---|---|---|---|---|---|");
    for (round, phases) in rounds.iter().enumerate() {
        for p in phases.iter().filter(|p| p.idle > 0) {
            let peer = phases
                .iter()
                .find(|q| q.idle == 0 && q.half == p.half)
                .expect("a peer with 0 idle daemons");
            let n = p.idle as f64 * ops;
            println!(
                "| {round} | {} | {} | {:.3} | {:.0} | {:.1} |",
                p.idle,
                name(p.half),
                (p.events - peer.events) / n,
                (p.sent_bytes - peer.sent_bytes) / n,
                (p.etcd_cpu - peer.etcd_cpu) * 1e6 / n,
            );
        }
    }
}
