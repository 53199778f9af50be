//! Pod churn on the exec path, as kubelets make it: `WORKERS` workers each exec the plugin's ADD
//! for a new container, over and over, for `PHASE`, and the DEL of their oldest once they hold
//! `LIVE` (then the DELs of what is left). hostnic-ipam runs `NODES`
//! release daemons (one per "node", the workers spread over them) on a three-member etcd, all
//! sharing one /24; the peer is `host-local` with the same workers on one node and one /24
//! (host-local cannot share a pool between nodes). The phases alternate, round by round.
//!
//! Every ADD's address is checked against every other holder's: an address is held by a worker
//! at least from its ADD's answer to the start of its DEL (`LIVE` - 1 more ADDs later), and no
//! two such spans of one address may overlap. After the last round no address of the pool is left in etcd.
//!
//! Run (as root; the daemon serves root only):
//! `scripts/build-release.sh && cargo bench -p hostnic-ipamd --bench churn`

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{exec, exec_output, release_daemon, shipped};
use etcd_client::GetOptions;
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::EtcdCluster;
use serde_json::json;

const WORKERS: usize = 16;
const NODES: usize = 4;
const PHASE: Duration = Duration::from_secs(5);
const ROUNDS: usize = 3;
/// Containers each worker holds at once: each address is held for several calls, so that a
/// second holder would overlap it.
const LIVE: usize = 4;
const PREFIX: &str = "/hostnic/ipam/v1";

/// An address one worker held, and when: from its ADD's answer to the start of its DEL.
struct Span {
    ip: IpAddr,
    from: Instant,
    until: Instant,
}

/// The address of a CNI result printed by a plugin.
fn address_of(stdout: &[u8]) -> IpAddr {
    let result: serde_json::Value = serde_json::from_slice(stdout).expect("a CNI result");
    let cidr = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    cidr.split('/')
        .next()
        .unwrap_or(cidr)
        .parse()
        .expect("an address")
}

/// `WORKERS` workers, worker `w` exec'ing `plugin` with `configs[w % configs.len()]`: ADD of a
/// new container each time for `PHASE`, DEL of the oldest beyond `LIVE`. Returns the ADDs per
/// second and every span.
fn phase(plugin: &Path, configs: &[String], tag: &str) -> (f64, Vec<Span>) {
    let configs = Arc::new(configs.to_vec());
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (plugin, configs, tag) =
                (plugin.to_path_buf(), Arc::clone(&configs), tag.to_owned());
            std::thread::spawn(move || {
                let config = &configs[w % configs.len()];
                let mut spans = Vec::new();
                let mut live = VecDeque::new();
                let mut release = |(container, ip, from): (String, IpAddr, Instant)| {
                    let until = Instant::now();
                    exec(&plugin, "DEL", &container, config);
                    spans.push(Span { ip, from, until });
                };
                let mut i = 0;
                while start.elapsed() < PHASE {
                    let container = format!("{tag}w{w}i{i}");
                    let (_, out) = exec_output(&plugin, "ADD", &container, config);
                    live.push_back((container, address_of(&out), Instant::now()));
                    if live.len() > LIVE {
                        live.pop_front().map(&mut release);
                    }
                    i += 1;
                }
                live.into_iter().for_each(&mut release);
                spans
            })
        })
        .collect();
    let spans: Vec<Span> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    (spans.len() as f64 / start.elapsed().as_secs_f64(), spans)
}

/// The addresses held by two workers at once: none, or the plugin handed one out twice.
fn held_twice(spans: &[Span]) -> Vec<IpAddr> {
    let mut by_ip: HashMap<IpAddr, Vec<(Instant, Instant)>> = HashMap::new();
    for s in spans {
        by_ip.entry(s.ip).or_default().push((s.from, s.until));
    }
    by_ip
        .into_iter()
        .filter_map(|(ip, mut held)| {
            held.sort();
            held.windows(2).any(|w| w[1].0 < w[0].1).then_some(ip)
        })
        .collect()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("churn bench: run with `cargo bench -p hostnic-ipamd --bench churn`");
        return;
    }
    let (plugin, daemon) = (shipped("hostnic-ipam"), release_daemon());
    let etcd = EtcdCluster::start(3).expect("etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    let sockets: Vec<PathBuf> = (0..NODES)
        .map(|n| dir.path().join(format!("node{n}.sock")))
        .collect();
    let _daemons: Vec<IpamDaemon> = sockets
        .iter()
        .enumerate()
        .map(|(n, socket)| {
            IpamDaemon::start(
                &daemon,
                &etcd.endpoints(),
                &format!("node{n}"),
                PREFIX,
                socket,
                &[],
            )
            .expect("daemon serves")
        })
        .collect();
    let ours: Vec<String> = sockets
        .iter()
        .map(|socket| {
            json!({"cniVersion": "1.0.0", "name": "churn", "ipam": {
                "type": "hostnic-ipam", "subnet": "10.103.0.0/24", "socket": socket}})
            .to_string()
        })
        .collect();
    // host-local's files on tmpfs, like the test etcd's data.
    let host_local_dir = tempfile::Builder::new()
        .prefix("hostnic-bench-churn-host-local")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let host_local = [json!({"cniVersion": "1.0.0", "name": "churn", "ipam": {
        "type": "host-local", "subnet": "10.104.0.0/24", "dataDir": host_local_dir.path()}})
    .to_string()];
    let hl = Path::new("/usr/lib/cni/host-local");

    // Warm: every daemon loads the pool and claims its block; host-local's page cache.
    for (n, config) in ours.iter().enumerate() {
        exec(&plugin, "ADD", &format!("warm{n}"), config);
        exec(&plugin, "DEL", &format!("warm{n}"), config);
    }
    exec(hl, "ADD", "warm", &host_local[0]);
    exec(hl, "DEL", "warm", &host_local[0]);

    println!(
        "{WORKERS} workers exec'ing ADD for {} s per phase, each holding {LIVE} containers (DEL of the oldest); hostnic-ipam: {NODES} daemons on a three-member etcd sharing one /24; host-local: one node, one /24",
        PHASE.as_secs()
    );
    println!("| round | host-local ADD/s | hostnic-ipam ADD/s | hostnic-ipam : host-local | addresses held twice (host-local, hostnic-ipam) |");
    println!("|---|---|---|---|---|");
    for round in 0..ROUNDS {
        let (theirs, their_spans) = phase(hl, &host_local, &format!("r{round}hl"));
        let (mine, my_spans) = phase(&plugin, &ours, &format!("r{round}hn"));
        let (their_twice, my_twice) = (held_twice(&their_spans), held_twice(&my_spans));
        println!(
            "| {round} | {theirs:.0} | {mine:.0} | {:.2} | {}, {} |",
            mine / theirs,
            their_twice.len(),
            my_twice.len()
        );
        assert!(my_twice.is_empty(), "addresses held twice: {my_twice:?}");
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let left = rt.block_on(async {
        let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
            .await
            .expect("connect to etcd");
        let ips = format!("{PREFIX}/pools/10.103.0.0_24/ips/");
        client
            .get(ips, Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .expect("count the held addresses")
            .count()
    });
    println!("addresses left in etcd after the last DEL: {left}");
    assert_eq!(left, 0, "every DEL released its address");
}
