//! The real `hostnic-ipamd` binary's command line against a real etcd: environment variables
//! override the config file and flags override both, and `list --pool` filters by pool and
//! refuses what is not a subnet.
//!
//! Each run starts from an empty environment, so that the test's own `HOSTNIC_*` variables
//! cannot leak into it.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hostnic_ipamd::{parse_range_sets, AllocateRequest, Allocator, Attachment, Kind, StoreConfig};
use hostnic_testkit::{shared_single, unique_prefix};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_hostnic-ipamd");
const NETWORK: &str = "cli-net";

/// Runs the binary with only `env` (and `PATH`) in its environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {BIN}: {e}"));
    (out, started.elapsed())
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n  stdout: {}\n  stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "expected success: {}", describe(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Commits an attachment `container` of `node` under `prefix`, recorded with `netns`.
async fn attach(prefix: &str, node: &str, container: &str, subnet: &str, netns: &str) {
    let config = StoreConfig::new(shared_single().endpoints()).with_prefix(prefix);
    let allocator = Allocator::start(&config, node)
        .await
        .expect("allocator starts");
    allocator.ready().await.expect("pools load");
    let request = AllocateRequest {
        attachment: Attachment::new(NETWORK, container, "eth0"),
        pod: None,
        netns: netns.to_owned(),
        range_sets: parse_range_sets(&json!({ "subnet": subnet })).expect("valid pool"),
        requested: Vec::new(),
        requested_kind: Kind::Exact,
    };
    allocator.allocate(&request).await.expect("add");
}

/// A URL where nothing listens: a config value that must not be the one used.
fn dead_endpoint() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("http://127.0.0.1:{port}")
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The attachments a `gc-netns --dry-run` would release, by container id.
fn would_release(out: &Output) -> Vec<String> {
    stdout_of(out)
        .lines()
        .filter_map(|l| l.strip_prefix("would release "))
        .filter(|rest| rest.contains(" of network "))
        .filter_map(|rest| rest.split('/').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_override_the_config_file_and_flags_override_both() {
    let etcd = shared_single().endpoints().join(",");
    let dir = tempfile::tempdir().expect("temp dir");
    // Recorded at ADD, gone now: the network-namespace GC would release every attachment.
    let gone = dir.path().join("gone");
    let gone = gone.to_str().expect("utf-8 temp path");
    // One key prefix and one node name per source; every (prefix, node) holds an attachment
    // named after both, so what `gc-netns` lists shows which prefix and node it used.
    let sources = ["file", "env", "flag"];
    let prefixes: Vec<String> = sources
        .iter()
        .map(|s| unique_prefix(&format!("precedence-{s}")))
        .collect();
    for (p, prefix) in prefixes.iter().enumerate() {
        for (n, node) in sources.iter().enumerate() {
            let subnet = format!("10.8{p}.{n}.0/24");
            let container = format!("p{}-n{}", sources[p], node);
            attach(prefix, &format!("{node}-node"), &container, &subnet, gone).await;
        }
    }
    let write_config = |name: &str, value: serde_json::Value| {
        let path = dir.path().join(name);
        fs::write(&path, value.to_string()).expect("writing the config file");
        path
    };
    let gc = ["gc-netns", "--dry-run", "--gc-grace-seconds", "0"];
    let with_config = |config: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = gc.iter().map(|s| s.to_string()).collect();
        args.push("--config".into());
        args.push(config.to_str().expect("utf-8 temp path").into());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // The file alone.
    let file_only = write_config(
        "file-only.json",
        json!({"etcd": {"endpoints": [etcd], "prefix": prefixes[0]}, "nodeName": "file-node"}),
    );
    let (out, _) = run(&as_refs(&with_config(&file_only, &[])), &[]);
    assert_eq!(would_release(&out), ["pfile-nfile"], "{}", describe(&out));

    // The environment over the file: the file's endpoint is dead, its prefix and node are not
    // the ones used.
    let file_dead = write_config(
        "file-dead.json",
        json!({"etcd": {"endpoints": [dead_endpoint()], "prefix": prefixes[0]}, "nodeName": "file-node"}),
    );
    let env = [
        ("HOSTNIC_ETCD_ENDPOINTS", etcd.as_str()),
        ("HOSTNIC_ETCD_PREFIX", prefixes[1].as_str()),
        ("HOSTNIC_NODE_NAME", "env-node"),
    ];
    let (out, _) = run(&as_refs(&with_config(&file_dead, &[])), &env);
    assert_eq!(would_release(&out), ["penv-nenv"], "{}", describe(&out));

    // Flags over both.
    let dead = dead_endpoint();
    let env_dead = [
        ("HOSTNIC_ETCD_ENDPOINTS", dead.as_str()),
        ("HOSTNIC_ETCD_PREFIX", prefixes[1].as_str()),
        ("HOSTNIC_NODE_NAME", "env-node"),
    ];
    let flags = [
        "--etcd-endpoints",
        etcd.as_str(),
        "--etcd-prefix",
        prefixes[2].as_str(),
        "--node-name",
        "flag-node",
    ];
    let (out, _) = run(&as_refs(&with_config(&file_dead, &flags)), &env_dead);
    assert_eq!(would_release(&out), ["pflag-nflag"], "{}", describe(&out));

    // The retry budget, seen in how long `list` takes to give up on an etcd that accepts
    // connections and never answers, and in the budget its error names.
    let silent = TcpListener::bind("127.0.0.1:0").expect("binding a silent endpoint");
    let silent = format!("http://{}", silent.local_addr().expect("address"));
    let budget_file = write_config(
        "budget.json",
        json!({"etcd": {"endpoints": [silent], "retryMs": 1500}, "nodeName": "file-node"}),
    );
    let list = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["list", "--config", budget_file.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        let (out, took) = run(&args, env);
        assert!(!out.status.success(), "nothing answers: {}", describe(&out));
        (String::from_utf8_lossy(&out.stderr).into_owned(), took)
    };
    let (stderr, took) = list(&[], &[]);
    // Past the 1 s request timeout: the attempt that ends it is the one the budget cut.
    assert!(stderr.contains("1.5s retry budget"), "{stderr}");
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    let (stderr, took) = list(&[], &[("HOSTNIC_ETCD_RETRY_MS", "300")]);
    assert!(stderr.contains("300ms retry budget"), "{stderr}");
    assert!(took < Duration::from_millis(900), "{took:?}");
    let (stderr, took) = list(
        &["--etcd-retry-ms", "200"],
        &[("HOSTNIC_ETCD_RETRY_MS", "2000")],
    );
    assert!(stderr.contains("200ms retry budget"), "{stderr}");
    assert!(took < Duration::from_millis(900), "{took:?}");

    // A bad value is refused naming where it came from.
    let (out, _) = run(
        &["list", "--config", budget_file.to_str().expect("utf-8")],
        &[("HOSTNIC_ETCD_RETRY_MS", "5")],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HOSTNIC_ETCD_RETRY_MS is 5"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pool_shows_only_that_pools_allocations_and_refuses_what_is_not_a_subnet() {
    let prefix = unique_prefix("list-pool");
    for (container, subnet) in [
        ("a1", "10.88.0.0/24"),
        ("a2", "10.88.0.0/24"),
        ("b1", "10.89.0.0/24"),
        ("c1", "fd00:88::/120"),
    ] {
        attach(&prefix, "list-node", container, subnet, "").await;
    }
    let etcd = shared_single().endpoints().join(",");
    let base = [
        "list",
        "--etcd-endpoints",
        etcd.as_str(),
        "--etcd-prefix",
        prefix.as_str(),
        "--node-name",
        "list-node",
    ];
    let rows = |pool: Option<&str>| -> Vec<(String, String)> {
        let mut args = base.to_vec();
        if let Some(pool) = pool {
            args.extend(["--pool", pool]);
        }
        let out = stdout_of(&run(&args, &[]).0);
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some("POOL\tADDRESS\tNETWORK\tCONTAINER\tIFNAME\tPOD\tNODE\tKIND"),
            "{out}"
        );
        lines
            .map(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                (cols[0].to_owned(), cols[3].to_owned())
            })
            .collect()
    };
    let pair = |pool: &str, cid: &str| (pool.to_owned(), cid.to_owned());
    assert_eq!(rows(None).len(), 4);
    assert_eq!(
        rows(Some("10.88.0.0/24")),
        [pair("10.88.0.0/24", "a1"), pair("10.88.0.0/24", "a2")]
    );
    assert_eq!(rows(Some("10.89.0.0/24")), [pair("10.89.0.0/24", "b1")]);
    // Another spelling of the same subnet is the same pool.
    assert_eq!(
        rows(Some("fd00:0088:0::/120")),
        [pair("fd00:88::/120", "c1")]
    );
    assert_eq!(rows(Some("10.90.0.0/24")), [], "a pool with nothing in it");

    // Refused before etcd is asked: the endpoint here is dead, the error is about --pool.
    let dead = dead_endpoint();
    for (junk, says) in [
        ("junk", "\"junk\" is not a subnet"),
        ("10.88.0.7/24", "the pool's subnet is 10.88.0.0/24"),
        ("10.88.0.0", "is not a subnet"),
    ] {
        let (out, took) = run(
            &[
                "list",
                "--etcd-endpoints",
                dead.as_str(),
                "--node-name",
                "n",
                "--pool",
                junk,
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{junk}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--pool") && stderr.contains(says),
            "{junk}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{junk}: nothing listed");
        assert!(
            took < Duration::from_secs(2),
            "{junk}: refused at once ({took:?})"
        );
    }
}
