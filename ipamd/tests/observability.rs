//! What an operator sees of a running hostnic-ipamd: its `/metrics` after real requests over its
//! socket (checked by Prometheus's own `promtool`), `/healthz` and `/readyz` through an etcd
//! outage, and one log line per request in text and in JSON.

mod scrape;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{
    AllocateRequest, Attachment, CheckRequest, GcRequest, Network, Pod, ReleaseRequest,
    StatusRequest,
};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::kube::{FakeKube, Fault};
use hostnic_testkit::{shared_single, unique_prefix, EtcdCluster};
use scrape::{free_port, http_get, promtool_problems, sample};
use tonic::Code;

/// Why these tests need root: the daemon serves only from a root-owned socket directory, and
/// answers only root callers.
const SERVING_NEEDS_ROOT: &str = "the daemon serves only from a root-owned socket directory";

/// The daemon binary of this crate with its HTTP endpoint on a free loopback port.
struct Daemon {
    // Declared first: stopped before its directory is removed.
    process: IpamDaemon,
    socket: PathBuf,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(endpoints: &[String], node: &str, prefix: &str, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/ipamd.sock");
        // The port is free when asked for; another process may take it before the daemon
        // binds it, so a few tries.
        let mut last = None;
        for _ in 0..3 {
            let metrics = free_port();
            let addr = metrics.to_string();
            let mut args = vec!["--gc-grace-seconds", "0", "--metrics-addr", addr.as_str()];
            args.extend_from_slice(extra);
            match IpamDaemon::start(
                Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
                endpoints,
                node,
                prefix,
                &socket,
                &args,
            ) {
                Ok(process) => {
                    return Daemon {
                        process,
                        socket,
                        metrics,
                        _dir: dir,
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        panic!("the daemon starts: {:#}", last.expect("tried"));
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    /// Asks `/readyz` until it answers `want`, for up to `within`; its body.
    fn readyz_until(&self, want: u16, within: Duration, what: &str) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.get("/readyz");
            if status == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz still {status} ({body:?}), not {want}, {what}\n{}",
                self.process.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).expect("daemon log")
    }
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

async fn client(socket: &Path) -> IpamClient<tonic::transport::Channel> {
    IpamClient::new(
        hostnic_proto::connect(socket, Duration::from_secs(1))
            .await
            .expect("connects"),
    )
}

fn network(name: &str, subnet: &str) -> Option<Network> {
    Some(Network {
        name: name.into(),
        ipam_json: serde_json::json!({"type": "hostnic-ipam", "subnet": subnet}).to_string(),
    })
}

fn attachment(id: &str) -> Option<Attachment> {
    Some(Attachment {
        container_id: id.into(),
        ifname: "eth0".into(),
    })
}

fn add(net: &str, subnet: &str, id: &str) -> AllocateRequest {
    AllocateRequest {
        attachment: attachment(id),
        network: network(net, subnet),
        pod: Some(Pod {
            namespace: "ns".into(),
            name: format!("pod-{id}"),
            ..Default::default()
        }),
        requested_ips: Vec::new(),
        netns: String::new(),
    }
}

fn del(net: &str, subnet: &str, id: &str) -> ReleaseRequest {
    ReleaseRequest {
        attachment: attachment(id),
        network: network(net, subnet),
    }
}

#[tokio::test]
async fn metrics_after_real_requests_pass_promtool_and_count_what_the_requests_did() {
    if !hostnic_testkit::require_root(&format!("metrics test ({SERVING_NEEDS_ROOT})")) {
        return;
    }
    let prefix = unique_prefix("metrics");
    let daemon = Daemon::start(&shared_single().endpoints(), "node-metrics", &prefix, &[]);
    let (status, before) = daemon.get("/metrics");
    assert_eq!(status, 200, "{before}");
    assert_eq!(
        sample(
            &before,
            r#"hostnic_ipamd_requests_total{verb="allocate",code="Ok"}"#
        ),
        None,
        "a fresh daemon has served nothing"
    );

    let (net, subnet) = ("metrics-test", "10.91.0.0/24");
    let mut c = client(&daemon.socket).await;
    let mut held = Vec::new();
    for id in ["m1", "m2", "m3"] {
        let reply = c.allocate(add(net, subnet, id)).await.expect("allocate");
        held.push(reply.into_inner().ips[0].address.clone());
    }
    let refused = c
        .allocate(AllocateRequest {
            network: network(net, "10.91.0.0/33"),
            ..add(net, subnet, "m4")
        })
        .await
        .expect_err("an invalid subnet is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    for id in ["m1", "m2"] {
        c.release(del(net, subnet, id)).await.expect("release");
    }
    c.check(CheckRequest {
        attachment: attachment("m3"),
        network: network(net, subnet),
        addresses: vec![held[2].clone()],
    })
    .await
    .expect("check");
    c.status(StatusRequest {
        network: network(net, subnet),
    })
    .await
    .expect("status");
    // A CNI GC that lists only m3 releases m5 (the daemon's grace is 0).
    c.allocate(add(net, subnet, "m5")).await.expect("allocate");
    let gc = c
        .gc(GcRequest {
            network: network(net, subnet),
            valid_attachments: attachment("m3").into_iter().collect(),
        })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!(gc.released.len(), 1, "{gc:?}");

    let (status, text) = daemon.get("/metrics");
    assert_eq!(status, 200, "{text}");
    if let Some(problems) = promtool_problems(&text) {
        panic!("{problems}\nscrape:\n{text}");
    }
    let requests = |verb: &str, code: &str| {
        value(
            &text,
            &format!(r#"hostnic_ipamd_requests_total{{verb="{verb}",code="{code}"}}"#),
        )
    };
    assert_eq!(requests("allocate", "Ok"), 4.0);
    assert_eq!(requests("allocate", "InvalidArgument"), 1.0);
    assert_eq!(requests("release", "Ok"), 2.0);
    assert_eq!(requests("check", "Ok"), 1.0);
    assert_eq!(requests("status", "Ok"), 1.0);
    assert_eq!(requests("gc", "Ok"), 1.0);
    assert_eq!(
        value(
            &text,
            r#"hostnic_ipamd_gc_released_total{gc="cni",reason="not_in_valid_attachments"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"hostnic_ipamd_request_duration_seconds_count{verb="allocate",code="Ok"}"#
        ),
        4.0
    );
    assert_eq!(
        value(
            &text,
            r#"hostnic_ipamd_request_duration_seconds_bucket{verb="allocate",code="Ok",le="+Inf"}"#
        ),
        4.0
    );
    // Four commits and three releases at least, each one transaction.
    let committed = value(
        &text,
        r#"hostnic_ipamd_etcd_transaction_duration_seconds_count{result="committed"}"#,
    );
    assert!(committed >= 7.0, "{committed} committed transactions");
    // The pool as the allocator's cache has it: a /24 without network, gateway, broadcast;
    // one address still held (m3).
    let pool = |gauge: &str| value(&text, &format!(r#"{gauge}{{pool="{subnet}"}}"#));
    assert_eq!(pool("hostnic_ipamd_pool_size"), 253.0);
    assert_eq!(pool("hostnic_ipamd_pool_held"), 1.0);
    assert_eq!(pool("hostnic_ipamd_pool_free"), 252.0);
    let blocks = value(
        &text,
        &format!(r#"hostnic_ipamd_pool_blocks{{pool="{subnet}",node="node-metrics"}}"#),
    );
    assert!(blocks >= 1.0, "this node claimed a block: {blocks}");
    assert!(sample(&text, "hostnic_ipamd_etcd_retries_total").is_some());
    assert!(sample(&text, "hostnic_ipamd_pool_watch_reloads_total").is_some());

    let (status, body) = daemon.get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "ok etcd\nok pools\n");
    let (status, _) = daemon.get("/nowhere");
    assert_eq!(status, 404);

    // The text log: one line per request, with the attachment, the pod, the addresses, the
    // duration and the result.
    let log = daemon.log();
    let lines = |verb: &str, id: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| l.contains(&format!("{verb}{{")) && l.contains(&format!("container={id} ")))
            .collect()
    };
    let added = lines("allocate", "m1");
    assert_eq!(added.len(), 1, "one line for the ADD of m1:\n{log}");
    for part in [
        format!("network={net}"),
        "ifname=eth0".into(),
        "pod=ns/pod-m1".into(),
        format!("ips=[\"{}\"]", held[0]),
        ": allocated".into(),
        "duration_ms=".into(),
        "code=Ok".into(),
    ] {
        assert!(added[0].contains(&part), "{part} not in {}", added[0]);
    }
    let released = lines("release", "m1");
    assert_eq!(released.len(), 1, "one line for the DEL of m1:\n{log}");
    assert!(released[0].contains("code=Ok"), "{}", released[0]);
    let failed = lines("allocate", "m4");
    assert_eq!(failed.len(), 1, "one line for the refused ADD:\n{log}");
    for part in ["request failed", "code=InvalidArgument", "10.91.0.0/33"] {
        assert!(failed[0].contains(part), "{part} not in {}", failed[0]);
    }

    for id in ["m3"] {
        c.release(del(net, subnet, id)).await.expect("release");
    }
}

#[tokio::test]
async fn readyz_fails_while_etcd_is_down_and_recovers_after_while_healthz_stays_ok() {
    if !hostnic_testkit::require_root(&format!("readiness test ({SERVING_NEEDS_ROOT})")) {
        return;
    }
    let etcd = EtcdCluster::start(1).expect("a dedicated etcd");
    let daemon = Daemon::start(
        &etcd.endpoints(),
        "node-ready",
        &unique_prefix("readyz"),
        &[],
    );
    let wait_for = |want, what| daemon.readyz_until(want, Duration::from_secs(20), what);
    wait_for(200, "with etcd up");

    etcd.stop_member(0);
    let body = wait_for(503, "with etcd stopped");
    assert!(body.contains("failed etcd: "), "{body}");
    let (status, _) = daemon.get("/healthz");
    assert_eq!(status, 200, "the process still serves");
    // An ADD in the meantime is retryable, as /readyz says.
    let mut c = client(&daemon.socket).await;
    let down = c
        .allocate(add("readyz-test", "10.92.0.0/24", "r1"))
        .await
        .expect_err("etcd is down");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");

    etcd.restart_member(0).expect("etcd back");
    let body = wait_for(200, "after etcd came back");
    assert_eq!(body, "ok etcd\nok pools\n");
    c.allocate(add("readyz-test", "10.92.0.0/24", "r2"))
        .await
        .expect("an ADD works again");
    let (_, text) = daemon.get("/metrics");
    assert!(
        value(&text, "hostnic_ipamd_etcd_retries_total") > 0.0,
        "requests during the outage were retried:\n{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"hostnic_ipamd_requests_total{verb="allocate",code="Unavailable"}"#
        ),
        1.0
    );
    assert!(
        value(&text, "hostnic_ipamd_pool_watch_reloads_total") >= 1.0,
        "the pool watch ended with etcd and was reloaded:\n{text}"
    );
}

#[test]
fn readyz_waits_for_this_nodes_pods_to_be_listed_from_the_kubernetes_api() {
    if !hostnic_testkit::require_root(&format!("readiness test ({SERVING_NEEDS_ROOT})")) {
        return;
    }
    let fake = FakeKube::start().expect("fake API server starts");
    // The API answers nothing useful at first: the pod cache cannot list.
    fake.set_fault(Fault::Status(503));
    let kubeconfig = fake.kubeconfig_path().to_str().expect("utf-8").to_owned();
    let daemon = Daemon::start(
        &shared_single().endpoints(),
        "node-kube-ready",
        &unique_prefix("readyz-kube"),
        &["--kubeconfig", &kubeconfig],
    );
    // The pools load; the pods do not.
    let body = daemon.readyz_until(503, Duration::from_secs(10), "with the API failing");
    std::thread::sleep(Duration::from_secs(1));
    let (status, body_later) = daemon.get("/readyz");
    assert_eq!(status, 503, "{body_later}");
    assert!(
        body_later.contains("ok etcd\n")
            && body_later.contains("ok pools\n")
            && body_later.contains("failed pods: "),
        "{body} / {body_later}"
    );

    fake.clear_fault();
    let body = daemon.readyz_until(200, Duration::from_secs(60), "after the API came back");
    assert_eq!(body, "ok etcd\nok pools\nok pods\n");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_one_line_per_request() {
    if !hostnic_testkit::require_root(&format!("JSON log test ({SERVING_NEEDS_ROOT})")) {
        return;
    }
    let daemon = Daemon::start(
        &shared_single().endpoints(),
        "node-json",
        &unique_prefix("json-log"),
        &["--log-format", "json"],
    );
    let (net, subnet) = ("json-log-test", "10.93.0.0/24");
    let mut c = client(&daemon.socket).await;
    let ip = c
        .allocate(add(net, subnet, "j1"))
        .await
        .expect("allocate")
        .into_inner()
        .ips[0]
        .address
        .clone();
    c.release(del(net, subnet, "j1")).await.expect("release");

    let log = daemon.log();
    let objects: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of = |verb: &str| -> Vec<&serde_json::Value> {
        objects
            .iter()
            .filter(|o| o["span"]["name"] == verb && o["span"]["container"] == "j1")
            .collect()
    };
    let added = of("allocate");
    assert_eq!(added.len(), 1, "one line for the ADD:\n{log}");
    let line = added[0];
    assert_eq!(line["message"], "allocated", "{line}");
    assert_eq!(line["code"], "Ok", "{line}");
    assert!(
        line["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "{line}"
    );
    assert_eq!(line["span"]["network"], net, "{line}");
    assert_eq!(line["span"]["ifname"], "eth0", "{line}");
    assert_eq!(line["span"]["pod"], "ns/pod-j1", "{line}");
    assert!(
        line["span"]["ips"]
            .as_str()
            .is_some_and(|ips| ips.contains(&ip)),
        "{line}"
    );
    assert_eq!(of("release").len(), 1, "one line for the DEL:\n{log}");
}

#[test]
fn a_non_loopback_metrics_address_is_refused_unless_allowed() {
    let out = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"))
        .args([
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--metrics-addr",
            "0.0.0.0:9153",
        ])
        .env_clear()
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--metrics-addr 0.0.0.0:9153 is not a loopback address")
            && stderr.contains("--metrics-allow-remote"),
        "{stderr}"
    );
}
