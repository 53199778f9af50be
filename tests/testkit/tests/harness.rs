//! The harness itself, against real etcd: members start and serve, a 3-member cluster survives
//! its leader's death, restarted members rejoin, and nothing (process or directory) outlives a
//! cluster, whether it is dropped, shared until exit, or orphaned by a crashed test process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hostnic_testkit::{shared_cluster3, shared_single, unique_prefix, EtcdCluster};

/// Selects what the re-executed test binary does in `child_process_helper`.
const CHILD_MODE_ENV: &str = "HOSTNIC_TESTKIT_CHILD_MODE";

fn etcdctl(endpoints: &[String], args: &[&str]) -> Result<String, String> {
    etcdctl_within(Duration::from_secs(2), endpoints, args)
}

/// etcdctl 3.4 speaks v3 only with `ETCDCTL_API=3`. A request proposed while there is no leader
/// waits out the whole `timeout`, so retry loops during failover use a short one.
fn etcdctl_within(
    timeout: Duration,
    endpoints: &[String],
    args: &[&str],
) -> Result<String, String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg("--dial-timeout=1s")
        .arg(format!("--command-timeout={}ms", timeout.as_millis()))
        .args(args)
        .output()
        .map_err(|e| format!("running etcdctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "etcdctl {args:?} against {endpoints:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Retries `f` every 50 ms until it succeeds or `within` has passed; returns the time it took.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return (v, start.elapsed()),
            Err(e) if start.elapsed() >= within => panic!("still failing after {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Running means present and not a zombie (an orphan killed by PDEATHSIG may wait to be reaped).
fn process_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// PIDs of live processes whose command line names `dir` (an etcd member's `--data-dir`).
fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) && process_running(pid) {
            found.push(pid);
        }
    }
    found
}

fn wait_all_exited(what: &str, pids: &[u32]) {
    eventually(Duration::from_secs(2), || {
        match pids.iter().find(|&&p| process_running(p)) {
            Some(p) => Err(format!("{what}: etcd pid {p} still running")),
            None => Ok(()),
        }
    });
}

fn assert_nothing_left(what: &str, pids: &[u32], dir: &Path) {
    wait_all_exited(what, pids);
    assert_eq!(
        processes_using(dir),
        Vec::<u32>::new(),
        "{what}: processes still use {dir:?}"
    );
    assert!(!dir.exists(), "{what}: {dir:?} still exists");
}

#[test]
fn shared_single_serves_put_and_get() {
    let start = Instant::now();
    let etcd = shared_single();
    eprintln!("shared_single ready after {:?}", start.elapsed());
    assert_eq!(etcd.member_count(), 1);
    assert_eq!(etcd.endpoints().len(), 1);
    assert!(
        std::ptr::eq(etcd, shared_single()),
        "one shared etcd per process"
    );
    assert_eq!(etcd.leader(), Some(0));

    let key = format!("{}/k", unique_prefix("shared_single_serves_put_and_get"));
    etcdctl(&etcd.endpoints(), &["put", &key, "v1"]).expect("put");
    let got = etcdctl(&etcd.endpoints(), &["get", &key, "--print-value-only"]).expect("get");
    assert_eq!(got, "v1");
}

#[test]
fn shared_cluster3_replicates_across_endpoints() {
    let start = Instant::now();
    let etcd = shared_cluster3();
    eprintln!("shared_cluster3 ready after {:?}", start.elapsed());
    assert_eq!(etcd.member_count(), 3);
    let (leader, _) = eventually(Duration::from_secs(3), || {
        etcd.leader().ok_or_else(|| "no leader".to_owned())
    });
    assert!(leader < 3);

    let prefix = unique_prefix("shared_cluster3_replicates_across_endpoints");
    for i in 0..3 {
        let key = format!("{prefix}/from-{i}");
        etcdctl(&[etcd.endpoint(i)], &["put", &key, &format!("v{i}")]).expect("put");
    }
    for j in 0..3 {
        let got = etcdctl(
            &[etcd.endpoint(j)],
            &["get", "--prefix", &prefix, "--keys-only"],
        )
        .expect("get");
        assert_eq!(
            got.lines().filter(|l| !l.is_empty()).count(),
            3,
            "member {j}: {got}"
        );
    }
}

#[test]
fn cluster3_survives_leader_kill_and_restarted_member_rejoins() {
    let start = Instant::now();
    let etcd = EtcdCluster::start(3).expect("start 3 members");
    eprintln!("3-member cluster healthy after {:?}", start.elapsed());
    let prefix = unique_prefix("cluster3_survives_leader_kill");

    let leader = etcd.leader().expect("a healthy cluster has a leader");
    etcdctl(
        &etcd.endpoints(),
        &["put", &format!("{prefix}/before"), "b"],
    )
    .expect("put");

    etcd.kill_member(leader);
    assert_eq!(etcd.member_pid(leader), None);
    let others: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| etcd.endpoint(i))
        .collect();
    let key = format!("{prefix}/after");
    let (_, took) = eventually(Duration::from_secs(5), || {
        etcdctl_within(Duration::from_millis(300), &others, &["put", &key, "a"])
    });
    eprintln!("write after leader SIGKILL succeeded after {took:?}");
    let (new_leader, _) = eventually(Duration::from_secs(3), || {
        etcd.leader().ok_or_else(|| "no leader".to_owned())
    });
    assert_ne!(new_leader, leader, "a killed member cannot be leader");

    let restart = Instant::now();
    etcd.restart_member(leader).expect("restart killed member");
    eprintln!("killed member healthy again after {:?}", restart.elapsed());
    assert!(etcd.member_pid(leader).is_some());
    // A serializable read is answered from the member's own copy: it has caught up.
    let (got, _) = eventually(Duration::from_secs(5), || {
        let got = etcdctl(
            &[etcd.endpoint(leader)],
            &["get", &key, "--consistency=s", "--print-value-only"],
        )?;
        if got == "a" {
            Ok(got)
        } else {
            Err(format!("restarted member has {got:?}"))
        }
    });
    assert_eq!(got, "a");

    let pids: Vec<u32> = (0..3).filter_map(|i| etcd.member_pid(i)).collect();
    assert_eq!(pids.len(), 3);
    let dir = etcd.data_dir().to_owned();
    let stop = Instant::now();
    drop(etcd);
    eprintln!("dropping 3 members took {:?}", stop.elapsed());
    assert_nothing_left("drop of a 3-member cluster", &pids, &dir);
}

#[test]
fn single_member_keeps_data_across_restart_and_drop_cleans_up() {
    let start = Instant::now();
    let etcd = EtcdCluster::start(1).expect("start 1 member");
    eprintln!("1-member cluster healthy after {:?}", start.elapsed());
    let key = format!("{}/k", unique_prefix("single_member_restart"));
    etcdctl(&etcd.endpoints(), &["put", &key, "kept"]).expect("put");
    let first_pid = etcd.member_pid(0).expect("running");

    let stop = Instant::now();
    etcd.stop_member(0);
    eprintln!("stop_member (SIGTERM) took {:?}", stop.elapsed());
    assert_eq!(etcd.member_pid(0), None);
    assert!(!process_running(first_pid));
    etcdctl(&etcd.endpoints(), &["get", &key]).expect_err("a stopped member does not answer");

    etcd.restart_member(0).expect("restart");
    let got = etcdctl(&etcd.endpoints(), &["get", &key, "--print-value-only"]).expect("get");
    assert_eq!(got, "kept", "restart reuses the data dir");

    // Drop must also cope with a member that is already dead.
    let pid = etcd.member_pid(0).expect("running");
    etcd.kill_member(0);
    let dir = etcd.data_dir().to_owned();
    drop(etcd);
    assert_nothing_left("drop of a 1-member cluster", &[first_pid, pid], &dir);
}

/// Runs this test binary again in `mode` (see `child_process_helper`) and returns the data dirs
/// and member PIDs it reported.
fn run_child(mode: &str) -> (std::process::Output, Vec<(String, Vec<u32>)>) {
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "child_process_helper",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_MODE_ENV, mode)
        .output()
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let clusters = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("TESTKIT_CLUSTER "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let dir = words.next().expect("dir").to_owned();
            let pids = words.map(|p| p.parse().expect("pid")).collect();
            (dir, pids)
        })
        .collect::<Vec<_>>();
    assert!(
        !clusters.is_empty(),
        "child ({mode}) reported no cluster: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out, clusters)
}

#[test]
fn shared_clusters_are_stopped_and_removed_at_exit() {
    let (out, clusters) = run_child("exit");
    assert!(out.status.success(), "child failed: {out:?}");
    assert_eq!(clusters.len(), 2, "shared_single and shared_cluster3");
    for (dir, pids) in clusters {
        assert_nothing_left("atexit", &pids, Path::new(&dir));
    }
}

#[test]
fn members_die_with_a_crashed_test_process() {
    let (out, clusters) = run_child("abort");
    assert!(!out.status.success(), "the child aborts");
    for (dir, pids) in clusters {
        // abort() skips atexit: only PDEATHSIG stops the members; the data dir stays behind
        // until the next start sweeps it, so remove it here.
        let dir = Path::new(&dir);
        assert!(dir.exists(), "abort() must not have run cleanup");
        wait_all_exited("PDEATHSIG", &pids);
        std::fs::remove_dir_all(dir).expect("remove orphaned data dir");
        assert_nothing_left("PDEATHSIG", &pids, dir);
    }
}

/// Not a test on its own: the two tests above run the binary again with `CHILD_MODE_ENV` set.
/// It starts the shared clusters from a short-lived thread (as libtest does), checks that they
/// outlive that thread, reports them, then returns normally ("exit") or aborts ("abort").
#[test]
#[ignore = "run by shared_clusters_are_stopped_and_removed_at_exit and members_die_with_a_crashed_test_process"]
fn child_process_helper() {
    let Ok(mode) = std::env::var(CHILD_MODE_ENV) else {
        return;
    };
    let clusters: Vec<&'static EtcdCluster> = if mode == "abort" {
        vec![std::thread::spawn(shared_single).join().expect("start")]
    } else {
        std::thread::spawn(|| vec![shared_single(), shared_cluster3()])
            .join()
            .expect("start")
    };
    // PDEATHSIG would fire when the spawning thread exits: the members must not care.
    std::thread::sleep(Duration::from_millis(300));
    for etcd in &clusters {
        let pids: Vec<u32> = (0..etcd.member_count())
            .map(|i| {
                etcd.member_pid(i)
                    .expect("member outlived the thread that started it")
            })
            .collect();
        etcdctl(&etcd.endpoints(), &["put", "/child", "alive"]).expect("put");
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        println!(
            "TESTKIT_CLUSTER {} {}",
            etcd.data_dir().display(),
            pids.join(" ")
        );
    }
    if mode == "abort" {
        std::process::abort();
    }
}
