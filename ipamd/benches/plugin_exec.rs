//! The real plugin exec path, as a runtime calls it: `hostnic-ipam` exec'd with the CNI
//! environment and config, one gRPC call to a running `hostnic-ipamd`, one etcd transaction.
//! Compared in the same run with the reference `host-local` plugin on an equal subnet: the
//! sequential ADDs and DELs of both alternate call by call; the concurrent bursts run one
//! plugin at a time.
//!
//! Run (as root; the daemon serves root only):
//! `cargo build --release --bins && cargo bench -p hostnic-ipamd --bench plugin_exec`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hostnic_testkit::EtcdCluster;
use serde_json::json;

const SEQUENTIAL: usize = 200;
const CONCURRENT: usize = 16;

fn release_dir() -> PathBuf {
    // target/release/deps/plugin_exec-xxxx -> target/release
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/release")
        .to_path_buf()
}

/// Execs an IPAM plugin once, as a main plugin would, and returns how long it took.
fn exec(plugin: &Path, command: &str, container: &str, config: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.as_bytes())
        .expect("config written");
    let out = child.wait_with_output().expect("plugin runs");
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "{} {command} {container}: {}{}",
        plugin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

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

/// `SEQUENTIAL` ADDs, then as many DELs, of both peers in turn (ours, theirs, ours, ...), so
/// that both series see the same machine at the same moments.
fn interleaved(peers: &[Peer; 2]) -> [(Vec<Duration>, Vec<Duration>); 2] {
    let mut out: [(Vec<Duration>, Vec<Duration>); 2] = Default::default();
    for i in 0..SEQUENTIAL {
        for (p, o) in peers.iter().zip(out.iter_mut()) {
            o.0.push(exec(p.plugin, "ADD", &format!("{}{i}", p.tag), p.config));
        }
    }
    for i in 0..SEQUENTIAL {
        for (p, o) in peers.iter().zip(out.iter_mut()) {
            o.1.push(exec(p.plugin, "DEL", &format!("{}{i}", p.tag), p.config));
        }
    }
    out
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
    let bin = release_dir();
    let plugin = bin.join("hostnic-ipam");
    let daemon = bin.join("hostnic-ipamd");
    for b in [&plugin, &daemon] {
        assert!(
            b.exists(),
            "{} missing: run `cargo build --release --bins` first",
            b.display()
        );
    }
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

    let peers = [
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
    let [hl_series, hn_series] = interleaved(&peers);
    let theirs = measure(&peers[0], hl_series);
    let mine = measure(&peers[1], hn_series);
    println!("| plugin | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | {CONCURRENT} concurrent ADD p50 ms | {CONCURRENT} concurrent wall ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, f) in [("host-local", &theirs), ("hostnic-ipam", &mine)] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
            f.add_p50, f.add_p99, f.del_p50, f.del_p99, f.concurrent_p50, f.concurrent_wall
        );
    }
    println!();
    println!(
        "ratio ADD p50 hostnic-ipam : host-local = {:.2} (target <= 1.0)",
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
