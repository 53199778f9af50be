//! Daemon throughput: `CLIENTS` concurrent clients calling Allocate, then Release, over the real
//! unix socket of a running `hostnic-ipamd` (release build) on a single-member etcd, against raw
//! etcd create-if-absent transactions at the same concurrency. The phases alternate round by
//! round (raw, daemon with its request log, daemon without it, raw, ...), so that every ratio
//! compares series measured at the same moments of the same run.
//!
//! Each client keeps one connection for a phase (a plugin makes one per call: see the
//! `plugin_exec` bench for that path) and allocates a new attachment per call, so every
//! Allocate is one etcd transaction (plus a block claim per new block); the Release phase
//! releases what the Allocate phase made. The raw peer runs twice per round: `CLIENTS` tasks
//! sharing one etcd client, as the daemon shares one; and `CLIENTS` tasks with an etcd client
//! each, one connection per client as the daemon's clients have, so that the bench's own
//! clients cost the same on both sides.
//!
//! A second part does the same on a three-member etcd with four daemons sharing one pool, the
//! clients spread over them.
//!
//! Run (as root; the daemon serves root only):
//! `cargo build --release --bins && cargo bench -p hostnic-ipamd --bench throughput`

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{compact, release_daemon};
use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use hostnic_cni::plugin::{prepare, DaemonCall};
use hostnic_cni::{Invocation, NetworkConfig};
use hostnic_proto::v1;
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::EtcdCluster;
use serde_json::json;
use tonic::transport::Channel;

const CLIENTS: usize = 64;
const PHASE: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;

/// What one phase did: operations per second, the latency of each, and the CPU time each
/// process of [`Cpu`] spent per operation (µs).
struct Phase {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: Vec<f64>,
}

/// The processes whose CPU time a phase accounts: etcd, the daemons and this bench (whose
/// clients make the calls and the raw transactions), by name and pid.
struct Cpu {
    processes: Vec<(&'static str, u32)>,
    ticks_per_s: f64,
}

impl Cpu {
    /// User plus system CPU time of each process so far, in clock ticks (`/proc/<pid>/stat`).
    fn snapshot(&self) -> Vec<u64> {
        self.processes
            .iter()
            .map(|(_, pid)| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
                // The fields after the command name, which is in parentheses: state is the
                // first, utime the 12th, stime the 13th.
                let rest = &stat[stat.rfind(')').expect("comm") + 1..];
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields[11].parse::<u64>().expect("utime")
                    + fields[12].parse::<u64>().expect("stime")
            })
            .collect()
    }

    /// µs of CPU per operation of each process between two snapshots.
    fn per_op(&self, before: &[u64], after: &[u64], ops: usize) -> Vec<f64> {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| (a - b) as f64 / self.ticks_per_s * 1e6 / ops.max(1) as f64)
            .collect()
    }
}

fn phase(mut samples: Vec<Duration>, wall: Duration) -> Phase {
    samples.sort();
    let at =
        |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    Phase {
        rate: samples.len() as f64 / wall.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        cpu_us: Vec::new(),
    }
}

/// The ADD and DEL requests the plugin would send for `container`, built by the plugin's own
/// code from a CNI environment and config.
fn requests(config: &NetworkConfig, container: &str) -> (v1::AllocateRequest, v1::ReleaseRequest) {
    let call = |command: &str| {
        let vars = [
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", container.to_owned()),
            ("CNI_NETNS", "/var/run/netns/bench".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", "/usr/lib/cni".to_owned()),
            (
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"),
            ),
        ];
        let invocation = Invocation::from_env(vars).expect("valid environment");
        prepare(&invocation, config).expect("valid request")
    };
    let DaemonCall::Allocate(add) = call("ADD") else {
        panic!("ADD is an allocation")
    };
    let DaemonCall::Release(del) = call("DEL") else {
        panic!("DEL is a release")
    };
    (add.request, del)
}

/// A daemon's socket and the network config its clients send.
type Target = (PathBuf, Arc<NetworkConfig>);

/// `CLIENTS` clients, each on its own connection to one of `targets` (in turn), allocating
/// new attachments for `PHASE`; then each releases what it allocated. Returns the allocate and
/// release phases.
async fn daemon_phases(targets: &[Target], tag: &str, cpu: &Cpu) -> (Phase, Phase) {
    let mut clients = Vec::with_capacity(CLIENTS);
    for c in 0..CLIENTS {
        let (socket, config) = &targets[c % targets.len()];
        let channel: Channel = hostnic_proto::connect(socket, Duration::from_secs(1))
            .await
            .expect("connect to the daemon");
        clients.push((IpamClient::new(channel), Arc::clone(config)));
    }
    let cpu_before = cpu.snapshot();
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, (mut client, config))| {
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let (mut took, mut made) = (Vec::new(), Vec::new());
                let mut i = 0;
                while start.elapsed() < PHASE {
                    let (add, del) = requests(&config, &format!("{tag}c{c}n{i}"));
                    let t = Instant::now();
                    client.allocate(add).await.expect("allocate");
                    took.push(t.elapsed());
                    made.push(del);
                    i += 1;
                }
                (client, took, made)
            })
        })
        .collect();
    let mut allocated = Vec::new();
    let mut work = Vec::new();
    for task in tasks {
        let (client, took, made) = task.await.expect("client task");
        allocated.extend(took);
        work.push((client, made));
    }
    let mut allocate = phase(allocated, start.elapsed());
    let cpu_after = cpu.snapshot();
    let allocations: usize = work.iter().map(|(_, made)| made.len()).sum();
    allocate.cpu_us = cpu.per_op(&cpu_before, &cpu_after, allocations);

    let start = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(mut client, made)| {
            tokio::spawn(async move {
                let mut took = Vec::with_capacity(made.len());
                for del in made {
                    let t = Instant::now();
                    client.release(del).await.expect("release");
                    took.push(t.elapsed());
                }
                took
            })
        })
        .collect();
    let mut released = Vec::new();
    for task in tasks {
        released.extend(task.await.expect("client task"));
    }
    let mut release = phase(released, start.elapsed());
    release.cpu_us = cpu.per_op(&cpu_after, &cpu.snapshot(), allocations);
    (allocate, release)
}

/// `CLIENTS` tasks on `clients` (in turn: one client shared by all, or one each), each writing
/// new keys with a create-if-absent transaction for `PHASE`; the keys are deleted afterwards
/// (not timed).
async fn raw_phase(clients: &[etcd_client::Client], round: usize, cpu: &Cpu) -> Phase {
    let prefix = format!("/bench/raw/{round}/{}/", clients.len());
    let cpu_before = cpu.snapshot();
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (mut client, prefix) = (clients[c % clients.len()].clone(), prefix.clone());
            tokio::spawn(async move {
                let mut took = Vec::new();
                let mut i = 0;
                while start.elapsed() < PHASE {
                    let key = format!("{prefix}{c}/{i}");
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.as_str(),
                            r#"{"version":1,"handle":"x"}"#,
                            None,
                        )]);
                    let t = Instant::now();
                    let resp = client.txn(txn).await.expect("raw txn");
                    took.push(t.elapsed());
                    assert!(resp.succeeded(), "{key} was new");
                    i += 1;
                }
                took
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("raw task"));
    }
    let ops = samples.len();
    let mut result = phase(samples, start.elapsed());
    result.cpu_us = cpu.per_op(&cpu_before, &cpu.snapshot(), ops);
    clients[0]
        .clone()
        .delete(prefix, Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("delete raw keys");
    result
}

/// Compacts etcd's history up to now (not timed), before each phase: without compaction etcd
/// slows several-fold within a minute of these writes, and the later phases would pay for the
/// history of the earlier ones. The daemons' watches have caught up by then (a phase ends when
/// its last reply came back), and a daemon whose watch is compacted reloads anyway.
async fn compact_settled(client: &etcd_client::Client) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    compact(client).await;
}

/// `CLIENTS` etcd clients, each on its own connection: the raw peer shaped like the daemon's
/// clients, which each have their own.
async fn own_connections(etcd: &EtcdCluster) -> Vec<etcd_client::Client> {
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(
            etcd_client::Client::connect(etcd.endpoints(), None)
                .await
                .expect("connect to etcd"),
        );
    }
    clients
}

fn config(subnet: &str, socket: &Path) -> Arc<NetworkConfig> {
    let text = json!({"cniVersion": "1.0.0", "name": "bench", "ipam": {
        "type": "hostnic-ipam", "subnet": subnet, "socket": socket}})
    .to_string();
    Arc::new(NetworkConfig::parse(text.as_bytes()).expect("valid config"))
}

fn ticks_per_s() -> f64 {
    let ticks = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&ticks.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// Starts the release daemon of `node` on `etcd`, logging at `log`; returns it and its socket.
fn start_daemon(etcd: &EtcdCluster, dir: &Path, node: &str, log: &str) -> (IpamDaemon, PathBuf) {
    let socket = dir.join(format!("{node}.sock"));
    // The testkit passes RUST_LOG on to the daemon.
    std::env::set_var("RUST_LOG", log);
    let daemon = IpamDaemon::start(
        &release_daemon(),
        &etcd.endpoints(),
        node,
        "/hostnic/ipam/v1",
        &socket,
        &[],
    )
    .expect("daemon serves");
    (daemon, socket)
}

fn cpu_table(cpu: &Cpu, rows: Vec<String>) {
    println!();
    println!("CPU µs per operation (user + system, from /proc/<pid>/stat); a daemon that is not");
    println!("serving the phase pays only for following the others' writes through its watch:");
    let names: Vec<&str> = cpu.processes.iter().map(|(name, _)| *name).collect();
    println!("| round | phase | {} |", names.join(" | "));
    println!("|---|---|{}", "---|".repeat(names.len()));
    for row in rows {
        println!("{row}");
    }
}

fn cpu_row(round: usize, what: &str, phase: &Phase) -> String {
    format!(
        "| {round} | {what} | {} |",
        phase
            .cpu_us
            .iter()
            .map(|us| format!("{us:.0}"))
            .collect::<Vec<_>>()
            .join(" | ")
    )
}

/// One member, two daemons (two nodes, a /16 each): one logging every request at info, as
/// deployed; one at warn, which leaves the request log out.
async fn single_member(rt_dir: &Path) {
    let etcd = EtcdCluster::start(1).expect("etcd");
    let (logged, logged_socket) = start_daemon(&etcd, rt_dir, "logged", "info");
    let (quiet, quiet_socket) = start_daemon(&etcd, rt_dir, "quiet", "warn");
    let cpu = Cpu {
        processes: vec![
            ("etcd", etcd.member_pid(0).expect("etcd runs")),
            ("daemon (request log)", logged.pid().expect("daemon runs")),
            ("daemon (no request log)", quiet.pid().expect("daemon runs")),
            ("clients (this bench)", std::process::id()),
        ],
        ticks_per_s: ticks_per_s(),
    };
    let logged = [(
        logged_socket.clone(),
        config("10.100.0.0/16", &logged_socket),
    )];
    let quiet = [(quiet_socket.clone(), config("10.101.0.0/16", &quiet_socket))];
    let client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("connect to etcd");
    let own = own_connections(&etcd).await;
    // Warm both daemons (pool definition, first block claims) before measuring.
    // Attachments of their own: an ADD of one another daemon just released may be refused as
    // begun before that DEL, until this daemon hears etcd's newer revision.
    daemon_phases(&logged, "warm-logged", &cpu).await;
    daemon_phases(&quiet, "warm-quiet", &cpu).await;

    println!(
        "{CLIENTS} concurrent clients, {} s phases, single-member etcd",
        PHASE.as_secs()
    );
    println!("| round | raw txn/s | raw p50 ms | allocate/s (request log) | p50 ms | p99 ms | release/s | allocate/s (no request log) | p50 ms | p99 ms | release/s | allocate : raw | release : raw | no log : raw | raw txn/s, 64 connections | allocate : raw, 64 connections | no log : raw, 64 connections |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    for round in 0..ROUNDS {
        compact_settled(&client).await;
        let raw = raw_phase(std::slice::from_ref(&client), round, &cpu).await;
        compact_settled(&client).await;
        let raw_own = raw_phase(&own, round, &cpu).await;
        compact_settled(&client).await;
        let (alloc, release) = daemon_phases(&logged, &format!("r{round}l"), &cpu).await;
        compact_settled(&client).await;
        let (quiet_alloc, quiet_release) = daemon_phases(&quiet, &format!("r{round}q"), &cpu).await;
        println!(
            "| {round} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
            raw.rate,
            raw.p50_ms,
            alloc.rate,
            alloc.p50_ms,
            alloc.p99_ms,
            release.rate,
            quiet_alloc.rate,
            quiet_alloc.p50_ms,
            quiet_alloc.p99_ms,
            quiet_release.rate,
            alloc.rate / raw.rate,
            release.rate / raw.rate,
            quiet_alloc.rate / raw.rate,
            raw_own.rate,
            alloc.rate / raw_own.rate,
            quiet_alloc.rate / raw_own.rate,
        );
        for (what, p) in [
            ("raw txn", &raw),
            ("raw txn, 64 connections", &raw_own),
            ("allocate (request log)", &alloc),
            ("release (request log)", &release),
            ("allocate (no request log)", &quiet_alloc),
            ("release (no request log)", &quiet_release),
        ] {
            cpu_rows.push(cpu_row(round, what, p));
        }
    }
    cpu_table(&cpu, cpu_rows);
}

/// Three members and `NODES` daemons (request log at info, as deployed) sharing one /16: the
/// clients spread over the daemons in turn; the raw peer's client talks to all three members.
async fn three_members(rt_dir: &Path) {
    const NODES: usize = 4;
    let etcd = EtcdCluster::start(3).expect("etcd");
    let daemons: Vec<(IpamDaemon, PathBuf)> = (0..NODES)
        .map(|n| start_daemon(&etcd, rt_dir, &format!("node{n}"), "info"))
        .collect();
    let mut processes: Vec<(&'static str, u32)> = (0..3)
        .map(|m| ("etcd member", etcd.member_pid(m).expect("etcd runs")))
        .collect();
    processes.extend(
        daemons
            .iter()
            .map(|(d, _)| ("daemon", d.pid().expect("daemon runs"))),
    );
    processes.push(("clients (this bench)", std::process::id()));
    let cpu = Cpu {
        processes,
        ticks_per_s: ticks_per_s(),
    };
    let targets: Vec<Target> = daemons
        .iter()
        .map(|(_, socket)| (socket.clone(), config("10.102.0.0/16", socket)))
        .collect();
    let client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("connect to etcd");
    let own = own_connections(&etcd).await;
    daemon_phases(&targets, "warm", &cpu).await;

    println!();
    println!(
        "{CLIENTS} concurrent clients spread over {NODES} daemons, {} s phases, three-member etcd",
        PHASE.as_secs()
    );
    println!("| round | raw txn/s | raw p50 ms | allocate/s | p50 ms | p99 ms | release/s | allocate : raw | release : raw | raw txn/s, 64 connections | allocate : raw, 64 connections |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    for round in 0..ROUNDS {
        compact_settled(&client).await;
        let raw = raw_phase(std::slice::from_ref(&client), round, &cpu).await;
        compact_settled(&client).await;
        let raw_own = raw_phase(&own, round, &cpu).await;
        compact_settled(&client).await;
        let (alloc, release) = daemon_phases(&targets, &format!("r{round}c"), &cpu).await;
        println!(
            "| {round} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} |",
            raw.rate,
            raw.p50_ms,
            alloc.rate,
            alloc.p50_ms,
            alloc.p99_ms,
            release.rate,
            alloc.rate / raw.rate,
            release.rate / raw.rate,
            raw_own.rate,
            alloc.rate / raw_own.rate,
        );
        for (what, p) in [
            ("raw txn", &raw),
            ("raw txn, 64 connections", &raw_own),
            ("allocate", &alloc),
            ("release", &release),
        ] {
            cpu_rows.push(cpu_row(round, what, p));
        }
    }
    cpu_table(&cpu, cpu_rows);
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput bench: run with `cargo bench -p hostnic-ipamd --bench throughput`");
        return;
    }
    release_daemon();
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        single_member(dir.path()).await;
        three_members(dir.path()).await;
    });
}
