//! The real plugin exec path, as a runtime calls it: `hostnic-ipam` exec'd with the CNI
//! environment and config, one gRPC call to a running `hostnic-ipamd`, one etcd transaction.
//! Compared in the same run with the reference `host-local` plugin on an equal subnet: the
//! sequential ADDs and DELs of both alternate call by call, the first of each round in turn;
//! the concurrent bursts run one plugin at a time. The floors are measured in the same loop as
//! the ADDs: an exec of `/bin/true` and each plugin's VERSION (which execs and answers without
//! any I/O), so that the work past exec start-up (ADD minus VERSION) of both plugins is
//! compared too.
//!
//! `HOSTNIC_BENCH_BASELINE=/path/to/hostnic-ipam` adds a third peer in the same loop (another
//! build of the plugin, e.g. before a change to the release profile), on the same daemon.
//!
//! Run (as root; the daemon serves root only):
//! `scripts/build-release.sh && cargo bench -p hostnic-ipamd --bench plugin_exec`

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{exec, release_daemon, shipped};
use hostnic_testkit::EtcdCluster;
use serde_json::json;

const SEQUENTIAL: usize = 200;
const CONCURRENT: usize = 16;

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

struct Figures {
    add_p50: f64,
    add_p99: f64,
    del_p50: f64,
    del_p99: f64,
    concurrent_p50: f64,
    concurrent_wall: f64,
}

/// One plugin under measurement: its binary, its config, a prefix for its container ids.
struct Peer<'a> {
    plugin: &'a Path,
    config: &'a str,
    tag: &'a str,
}

/// One peer's sequential ADD and DEL latencies.
type Series = (Vec<Duration>, Vec<Duration>);

/// `SEQUENTIAL` ADDs, then as many DELs, of the peers in turn, so that all series see the same
/// machine at the same moments. The peer that goes first changes every round: the first call of
/// a round meets a daemon and an etcd that have been idle since the last round's floors, the
/// next ones meet them warm, and each peer takes each place equally often. Each ADD round also
/// execs `/bin/true` and each peer's VERSION: the floors, returned per peer after `/bin/true`'s.
fn interleaved(peers: &[Peer]) -> (Vec<Series>, Vec<Vec<Duration>>) {
    let mut out: Vec<Series> = vec![Default::default(); peers.len()];
    let mut floors: Vec<Vec<Duration>> = vec![Vec::new(); peers.len() + 1];
    let bin_true = Path::new("/bin/true");
    // Round `i` of `command`: each peer's call for container `i`, by peer, the first in turn.
    let round = |i: usize, command: &str| {
        let mut took = vec![Duration::ZERO; peers.len()];
        for k in 0..peers.len() {
            let p = (i + k) % peers.len();
            let peer = &peers[p];
            took[p] = exec(
                peer.plugin,
                command,
                &format!("{}{i}", peer.tag),
                peer.config,
            );
        }
        took
    };
    for i in 0..SEQUENTIAL {
        for (o, took) in out.iter_mut().zip(round(i, "ADD")) {
            o.0.push(took);
        }
        floors[0].push(exec(bin_true, "VERSION", "floor", ""));
        for (p, f) in peers.iter().zip(floors[1..].iter_mut()) {
            f.push(exec(p.plugin, "VERSION", "floor", p.config));
        }
    }
    for i in 0..SEQUENTIAL {
        for (o, took) in out.iter_mut().zip(round(i, "DEL")) {
            o.1.push(took);
        }
    }
    (out, floors)
}

/// The figures of `peer`: its interleaved sequential series, then a burst of `CONCURRENT`
/// ADDs started at once (a burst of each peer alone: two bursts at once would measure each
/// other).
fn measure(peer: &Peer, (mut adds, mut dels): (Vec<Duration>, Vec<Duration>)) -> Figures {
    let Peer {
        plugin,
        config,
        tag,
    } = *peer;
    let barrier = Arc::new(Barrier::new(CONCURRENT));
    let t = Instant::now();
    let threads: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let (barrier, plugin, config) = (
                Arc::clone(&barrier),
                plugin.to_path_buf(),
                config.to_string(),
            );
            let container = format!("{tag}c{i}");
            std::thread::spawn(move || {
                barrier.wait();
                exec(&plugin, "ADD", &container, &config)
            })
        })
        .collect();
    let mut concurrent: Vec<Duration> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    for i in 0..CONCURRENT {
        exec(plugin, "DEL", &format!("{tag}c{i}"), config);
    }
    Figures {
        add_p50: percentile(&mut adds, 0.5),
        add_p99: percentile(&mut adds, 0.99),
        del_p50: percentile(&mut dels, 0.5),
        del_p99: percentile(&mut dels, 0.99),
        concurrent_p50: percentile(&mut concurrent, 0.5),
        concurrent_wall: wall,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("plugin_exec bench: run with `cargo bench -p hostnic-ipamd --bench plugin_exec`");
        return;
    }
    let (plugin, daemon) = (shipped("hostnic-ipam"), release_daemon());
    let etcd = EtcdCluster::start(1).expect("etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("ipamd.sock");
    let _daemon = hostnic_testkit::daemon::IpamDaemon::start(
        &daemon,
        &etcd.endpoints(),
        "bench",
        "/hostnic/ipam/v1",
        &socket,
        &[],
    )
    .expect("daemon serves");

    let ours = json!({"cniVersion": "1.0.0", "name": "bench", "ipam": {
        "type": "hostnic-ipam", "subnet": "10.100.0.0/16", "socket": socket}})
    .to_string();
    // host-local's files on tmpfs, like the test etcd's data: both peers skip the disk.
    let host_local_dir = tempfile::Builder::new()
        .prefix("hostnic-bench-host-local")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let host_local = json!({"cniVersion": "1.0.0", "name": "bench", "ipam": {
        "type": "host-local", "subnet": "10.101.0.0/16", "dataDir": host_local_dir.path()}})
    .to_string();

    // Warm both (page cache, daemon pool load, block claim) before measuring.
    exec(&plugin, "ADD", "warm", &ours);
    exec(&plugin, "DEL", "warm", &ours);
    let hl = Path::new("/usr/lib/cni/host-local");
    exec(hl, "ADD", "warm", &host_local);
    exec(hl, "DEL", "warm", &host_local);

    let baseline = std::env::var_os("HOSTNIC_BENCH_BASELINE").map(PathBuf::from);
    let mut peers = vec![
        Peer {
            plugin: hl,
            config: &host_local,
            tag: "hl",
        },
        Peer {
            plugin: &plugin,
            config: &ours,
            tag: "hn",
        },
    ];
    if let Some(baseline) = &baseline {
        exec(baseline, "ADD", "warmb", &ours);
        exec(baseline, "DEL", "warmb", &ours);
        peers.push(Peer {
            plugin: baseline,
            config: &ours,
            tag: "hb",
        });
    }
    let (series, mut floors) = interleaved(&peers);
    let figures: Vec<Figures> = peers
        .iter()
        .zip(series)
        .map(|(peer, s)| measure(peer, s))
        .collect();
    let (theirs, mine) = (&figures[0], &figures[1]);
    println!("| plugin | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | {CONCURRENT} concurrent ADD p50 ms | {CONCURRENT} concurrent wall ms | VERSION p50 ms | ADD - VERSION p50 ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let names = ["host-local", "hostnic-ipam", "hostnic-ipam (baseline)"];
    let mut version_p50 = Vec::new();
    for ((name, f), v) in names.iter().zip(&figures).zip(floors[1..].iter_mut()) {
        let version = percentile(v, 0.5);
        version_p50.push(version);
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {version:.2} | {:.2} |",
            f.add_p50,
            f.add_p99,
            f.del_p50,
            f.del_p99,
            f.concurrent_p50,
            f.concurrent_wall,
            f.add_p50 - version
        );
    }
    println!(
        "| /bin/true | | | | | | | {:.2} | |",
        percentile(&mut floors[0], 0.5)
    );
    println!();
    println!(
        "work past exec start-up (ADD p50 - VERSION p50) hostnic-ipam : host-local = {:.2} (target < 1.0)",
        (mine.add_p50 - version_p50[1]) / (theirs.add_p50 - version_p50[0])
    );
    if baseline.is_some() {
        println!(
            "ratio ADD p50 baseline : host-local = {:.2}",
            figures[2].add_p50 / theirs.add_p50
        );
    }
    println!(
        "ratio ADD p50 hostnic-ipam : host-local = {:.2} (target <= 0.6)",
        mine.add_p50 / theirs.add_p50
    );
    println!(
        "ratio DEL p50 hostnic-ipam : host-local = {:.2}",
        mine.del_p50 / theirs.del_p50
    );
    println!(
        "hostnic-ipam ADD p99 / p50 = {:.2} (target <= 2.0)",
        mine.add_p99 / mine.add_p50
    );
}
