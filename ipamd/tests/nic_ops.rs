//! Operating QingCloud mode: the NIC pool's gauges and the API calls by action and result on
//! `/metrics` (checked by `promtool` and against the simulator's own count), and the vxnets
//! taken from the cluster's VxNetPool resource served by the fake Kubernetes API server.

mod common;

use common::{simulator, ACTIONS, KEY, SECRET, ZONE};
mod scrape;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostnic_iaas::sim::{Fault, Simulator};
use hostnic_ipamd::kube::KubeSource;
use hostnic_ipamd::nics::settings::nic_name;
use hostnic_ipamd::nics::{self, NicFlags};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{FakeKube, Fault as ApiFault, Kind};
use hostnic_testkit::netns::{require_netns, run_cni, CniCall, NetNs};
use hostnic_testkit::{shared_single, unique_prefix};
use scrape::{free_port, http_get, promtool_problems, sample};

/// The files of QingCloud mode in `dir`: the SDK config for `sim`, hostnic's pool config
/// (`pool` is its `pool` object) and the instance id file; the daemon's flags for them.
fn qingcloud_files(dir: &Path, sim: &Simulator, instance: &str, pool: &str) -> Vec<String> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("writing a file");
        path.display().to_string()
    };
    let sdk = write(
        "config.yaml",
        format!(
            "qy_access_key_id: '{KEY}'\nqy_secret_access_key: '{SECRET}'\nzone: '{ZONE}'\nhost: '{}'\nport: {}\nprotocol: 'http'\nuri: '/iaas'\nconnection_retries: 4\n",
            sim.addr().ip(),
            sim.addr().port()
        ),
    );
    let pool_conf = write("hostnic.json", format!(r#"{{"pool":{pool}}}"#));
    let id_file = write("instance-id", format!("{instance}\n"));
    vec![
        "--qingcloud-config".into(),
        sdk,
        "--nic-pool-config".into(),
        pool_conf,
        "--instance-id-file".into(),
        id_file,
        "--iface".into(),
        "eth0".into(),
    ]
}

/// `hostnic_ipamd_qingcloud_api_calls_total` summed over results, by action.
fn api_calls_by_action(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("hostnic_ipamd_qingcloud_api_calls_total{action=\"")
        else {
            continue;
        };
        let (action, rest) = rest.split_once('"').expect("action label closed");
        let value: u64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no value in {line}"));
        *calls.entry(action.to_string()).or_default() += value;
    }
    calls
}

/// Scrapes until `done` holds for the page, for up to `within`; the page.
fn scrape_until(
    metrics: SocketAddr,
    daemon: &IpamDaemon,
    within: Duration,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, page) = http_get(metrics, "/metrics");
        assert_eq!(status, 200, "{page}");
        if done(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n{page}\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The series of the NIC gauge for `state`.
fn nics(state: &str) -> String {
    format!("hostnic_ipamd_nics{{state=\"{state}\"}}")
}

/// A warm pool of two, a 5100 answered to the first CreateNics, then a pod's NIC through the
/// `hostnic` plugin and back: the gauges follow the pool's states, every request the
/// simulator received is counted by action (and the 5100 under its ret_code), and the page
/// passes promtool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_gauges_follow_the_pool_and_api_calls_match_what_the_simulator_received() {
    let what = "NIC metrics, with the simulator's real links";
    if !require_netns(what) {
        return;
    }
    let daemon_bin =
        hostnic_testkit::bins::workspace_binary("hostnic-ipamd").expect("daemon built");
    let plugin = hostnic_testkit::bins::workspace_binary("hostnic").expect("hostnic plugin built");
    let instance = "i-metnic01";
    let sim = simulator(instance, &["vxnet-metnic1=172.31.80.0/24"], true).await;
    sim.inject(Fault::error("CreateNics", 5100, 1));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = qingcloud_files(
        dir.path(),
        &sim,
        instance,
        r#"{"maxNic":8,"poolLow":2,"poolHigh":2,"vxNets":["vxnet-metnic1"]}"#,
    );
    let metrics = free_port();
    args.extend(["--metrics-addr".to_string(), metrics.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let socket = dir.path().join("run/ipamd.sock");
    let mut daemon = IpamDaemon::start(
        &daemon_bin,
        &shared_single().endpoints(),
        "node-nic-metrics",
        &unique_prefix("nic-metrics"),
        &socket,
        &args,
    )
    .expect("daemon starts");

    let page = scrape_until(
        metrics,
        &daemon,
        Duration::from_secs(30),
        "two warm NICs",
        |p| sample(p, &nics("ready")) == Some(2.0),
    );
    assert_eq!(sample(&page, &nics("leased")), Some(0.0), "{page}");
    assert_eq!(sample(&page, "hostnic_ipamd_nics_max"), Some(8.0), "{page}");

    // A pod's NIC, leased from the warm pool, which is refilled.
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "qc", "type": "hostnic", "socket": socket})
        .to_string();
    let ns = NetNs::new("met").expect("netns");
    let cni = |command: &'static str| {
        let (plugin, conf, netns) = (plugin.clone(), conf.clone(), ns.path());
        tokio::task::spawn_blocking(move || {
            run_cni(
                &plugin,
                &CniCall {
                    command,
                    container_id: "metricspod",
                    netns: &netns,
                    ifname: "eth0",
                    cni_path: Path::new("/nonexistent"),
                    args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=metricspod",
                },
                &conf,
            )
            .expect("plugin runs")
        })
    };
    let out = cni("ADD").await.expect("join");
    assert!(out.success(), "ADD: {} {}", out.stdout, daemon.log_tail());
    scrape_until(
        metrics,
        &daemon,
        Duration::from_secs(30),
        "one leased NIC and the warm pool refilled",
        |p| sample(p, &nics("leased")) == Some(1.0) && sample(p, &nics("ready")) == Some(2.0),
    );
    let out = cni("DEL").await.expect("join");
    assert!(out.success(), "DEL: {} {}", out.stdout, daemon.log_tail());

    // Once the pool is quiet, the counts equal what the simulator received, action by action.
    let mut received = BTreeMap::new();
    let page = scrape_until(
        metrics,
        &daemon,
        Duration::from_secs(30),
        "the API calls counted as the simulator received them",
        |p| {
            received = ACTIONS
                .iter()
                .map(|a| (a.to_string(), sim.calls(a)))
                .filter(|(_, n)| *n > 0)
                .collect();
            sample(p, &nics("leased")) == Some(0.0) && api_calls_by_action(p) == received
        },
    );
    for action in [
        "DescribeAccessKeys",
        "CreateNics",
        "AttachNics",
        "DescribeJobs",
    ] {
        assert!(received.contains_key(action), "{action}: {received:?}");
    }
    assert_eq!(
        sample(
            &page,
            "hostnic_ipamd_qingcloud_api_calls_total{action=\"CreateNics\",result=\"5100\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "hostnic_ipamd_qingcloud_api_calls_total{action=\"CreateNics\",result=\"0\"}"
        ),
        Some(received["CreateNics"] as f64 - 1.0),
        "{page}"
    );
    assert_eq!(sample(&page, &nics("attaching")), Some(0.0), "{page}");
    if let Some(problems) = promtool_problems(&page) {
        panic!("{problems}\n{page}");
    }
    daemon.stop();
}

/// The cluster's VxNetPool object, as hostnic's CRD defines it.
fn vxnet_pool(name: &str, vxnets: &[&str], block_size: u8) -> serde_json::Value {
    let vxnets: Vec<serde_json::Value> = vxnets
        .iter()
        .map(|v| serde_json::json!({ "name": v }))
        .collect();
    serde_json::json!({
        "apiVersion": "network.qingcloud.com/v1alpha1",
        "kind": "VxNetPool",
        "metadata": { "name": name },
        "spec": { "vxnets": vxnets, "blockSize": block_size },
    })
}

/// The daemon binary reading Kubernetes takes its vxnets from the VxNetPool object, not the
/// pool config's `vxNets`: its warm NIC is created in the VxNetPool's vxnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_creates_its_nics_in_the_vxnets_of_the_clusters_vxnetpool() {
    let what = "VxNetPool from the API, with the simulator's real links";
    if !require_netns(what) {
        return;
    }
    let daemon_bin =
        hostnic_testkit::bins::workspace_binary("hostnic-ipamd").expect("daemon built");
    let instance = "i-vxpool01";
    let sim = simulator(
        instance,
        &[
            "vxnet-vxcfg01=172.31.81.0/24",
            "vxnet-vxapi01=172.31.82.0/24",
        ],
        true,
    )
    .await;
    let fake = FakeKube::start().expect("fake API server");
    fake.create(vxnet_pool("v-pool", &["vxnet-vxapi01"], 26))
        .expect("VxNetPool created");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = qingcloud_files(
        dir.path(),
        &sim,
        instance,
        r#"{"maxNic":4,"poolLow":1,"poolHigh":1,"vxNets":["vxnet-vxcfg01"]}"#,
    );
    let kubeconfig = fake.kubeconfig_path().display().to_string();
    args.extend(["--kubeconfig".to_string(), kubeconfig]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = IpamDaemon::start(
        &daemon_bin,
        &shared_single().endpoints(),
        "node-nic-vxpool",
        &unique_prefix("nic-vxpool"),
        &dir.path().join("run/ipamd.sock"),
        &args,
    )
    .expect("daemon starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let warm = loop {
        let mine: Vec<_> = sim
            .nics()
            .into_iter()
            .filter(|n| n.nic_name == nic_name(instance))
            .collect();
        if !mine.is_empty() {
            break mine;
        }
        assert!(
            Instant::now() < deadline,
            "no warm NIC created: {}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for nic in &warm {
        assert_eq!(nic.vxnet_id, "vxnet-vxapi01", "{nic:?}");
        assert!(nic.private_ip.starts_with("172.31.82."), "{nic:?}");
    }
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.path == "/apis/network.qingcloud.com/v1alpha1/vxnetpools"),
        "the daemon listed the VxNetPools"
    );
    daemon.stop();
}

/// NIC flags for `sim`'s files in `dir`, with `vxnet_pool` as `--vxnet-pool`.
fn flags(dir: &Path, sim: &Simulator, instance: &str, vxnet_pool: Option<PathBuf>) -> NicFlags {
    let args = qingcloud_files(
        dir,
        sim,
        instance,
        r#"{"maxNic":4,"vxNets":["vxnet-vxcfg02"]}"#,
    );
    NicFlags {
        qingcloud_config: Some(PathBuf::from(&args[1])),
        nic_pool_config: Some(PathBuf::from(&args[3])),
        instance_id_file: Some(PathBuf::from(&args[5])),
        vxnet_pool,
        iface: "eth0".into(),
    }
}

/// Which vxnets apply: `--vxnet-pool FILE` over the API's VxNetPool, the API's over the pool
/// config's `vxNets`, the config's when the cluster has none; two VxNetPools are refused,
/// naming both, so is one naming no vxnet, and an API server that cannot be reached fails the
/// start as retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxnets_come_from_the_file_then_the_apis_vxnetpool_then_the_pool_config() {
    let instance = "i-vxpool02";
    let sim = simulator(
        instance,
        &[
            "vxnet-vxcfg02=172.31.83.0/24",
            "vxnet-vxapi02=172.31.84.0/24",
            "vxnet-vxfile2=172.31.85.0/24",
        ],
        false,
    )
    .await;
    let prefix = unique_prefix("nic-vxsource");
    let allocator =
        Arc::new(common::allocator(shared_single(), &prefix, "node-nic-vxsource").await);
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeKube::start().expect("fake API server");
    let api = || Some(KubeSource::Kubeconfig(fake.kubeconfig_path().to_path_buf()));
    let vxnets_of = |pool: Option<Arc<nics::NicPool>>| {
        let pool = pool.expect("QingCloud mode on");
        (
            pool.settings().vxnets.clone(),
            pool.settings().block_size,
            pool.settings().vxnets_source.clone(),
        )
    };

    // No VxNetPool in the cluster: the pool config's.
    let pool = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect("starts");
    assert_eq!(
        vxnets_of(pool),
        (
            vec!["vxnet-vxcfg02".to_string()],
            None,
            "pool.vxNets".to_string()
        )
    );

    fake.create(vxnet_pool("v-pool", &["vxnet-vxapi02"], 27))
        .expect("VxNetPool created");
    let pool = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect("starts");
    let (vxnets, block_size, source) = vxnets_of(pool);
    assert_eq!(
        (vxnets, block_size),
        (vec!["vxnet-vxapi02".to_string()], Some(27))
    );
    assert!(source.contains("VxNetPool v-pool"), "{source}");

    // An API server without the CRD answers 404: the pool config's, as with no VxNetPool.
    fake.fail_next(ApiFault::Status(404), 1);
    let pool = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect("starts");
    assert_eq!(vxnets_of(pool).0, vec!["vxnet-vxcfg02".to_string()]);
    // An API server failing otherwise: no guess, a retryable failure.
    fake.set_fault(ApiFault::Status(500));
    let e = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect_err("an API server answering 500 fails the start");
    fake.clear_fault();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("listing the VxNetPools"), "{e}");

    let file = dir.path().join("vxnetpool.json");
    std::fs::write(
        &file,
        vxnet_pool("from-file", &["vxnet-vxfile2"], 28).to_string(),
    )
    .expect("VxNetPool file written");
    let pool = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, Some(file)),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect("starts");
    let (vxnets, block_size, _) = vxnets_of(pool);
    assert_eq!(
        (vxnets, block_size),
        (vec!["vxnet-vxfile2".to_string()], Some(28))
    );

    fake.create(vxnet_pool("second", &["vxnet-vxcfg02"], 26))
        .expect("second VxNetPool created");
    let e = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect_err("two VxNetPools are refused");
    let text = e.to_string();
    assert!(
        text.contains("2 VxNetPools (second, v-pool)")
            || text.contains("2 VxNetPools (v-pool, second)"),
        "{e}"
    );
    assert!(!e.is_retryable(), "{e}");

    // One VxNetPool left, naming no vxnet: refused, naming where it came from.
    fake.delete(Kind::VxNetPool, "", "second")
        .expect("second VxNetPool deleted");
    fake.replace(vxnet_pool("v-pool", &[], 26))
        .expect("VxNetPool replaced");
    let e = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        api(),
    )
    .await
    .expect_err("a VxNetPool without vxnets is refused");
    assert!(
        e.to_string()
            .contains("the Kubernetes API: spec.vxnets names no vxnet"),
        "{e}"
    );

    let kubeconfig = fake.kubeconfig_path().to_path_buf();
    let gone = dir.path().join("gone-kubeconfig");
    std::fs::copy(&kubeconfig, &gone).expect("kubeconfig copied");
    drop(fake);
    let e = nics::start_with_kubernetes(
        &flags(dir.path(), &sim, instance, None),
        Arc::clone(&allocator),
        Some(KubeSource::Kubeconfig(gone)),
    )
    .await
    .expect_err("an API server away fails the start");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("VxNetPools"), "{e}");
}
