//! The `qingcloud-sim` binary, started with the command line the issue gives, serving the
//! production client; its admin endpoint injecting faults and counting calls; and its refusal
//! of a bad command line.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use hostnic_iaas::error::code;
use hostnic_iaas::types::{CreateNics, NicFilter, NicStatus};
use hostnic_iaas::{Client, Config, Error, SecretKey};

const BIN: &str = env!("CARGO_BIN_EXE_qingcloud-sim");

/// The simulator process; killed and reaped when dropped, so a failing test leaves nothing.
struct SimProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(extra: &[&str]) -> SimProcess {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--access-key-id",
            ACCESS_KEY_ID,
            "--secret-access-key",
            SECRET,
            "--zone",
            ZONE,
            "--instance",
            INSTANCE,
            "--instance",
            "i-second01",
            "--vxnet",
            "vxnet-abc1234=172.16.3.0/24",
            "--vxnet",
            "vxnet-nodhcp1=172.16.4.0/26,no-dhcp",
            "--job-duration-ms",
            "100",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qingcloud-sim starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("a line");
    let mut process = SimProcess {
        child,
        addr: "127.0.0.1:1".parse().expect("addr"),
    };
    let url = line
        .trim()
        .strip_prefix("qingcloud-sim listening on http://")
        .and_then(|rest| rest.strip_suffix("/iaas"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    process.addr = url.parse().expect("an address");
    process
}

fn client_for(addr: SocketAddr) -> Client {
    let yaml = format!(
        "qy_access_key_id: '{ACCESS_KEY_ID}'\nqy_secret_access_key: '{SECRET}'\nzone: {ZONE}\nhost: '{}'\nport: {}\nprotocol: 'http'\nuri: '/iaas'\nconnection_retries: 3\n",
        addr.ip(),
        addr.port()
    );
    let config = Config::from_yaml(&yaml).expect("config.yaml");
    Client::new(config, fast_options()).expect("client")
}

#[tokio::test]
async fn the_binary_serves_the_command_line_of_the_issue_to_the_production_client() {
    let sim = spawn(&[]);
    let client = client_for(sim.addr);

    let keys = client
        .describe_access_keys(&[ACCESS_KEY_ID.to_string()])
        .await
        .expect("DescribeAccessKeys");
    assert_eq!(keys[0].owner, "usr-SimOwn01");
    let vxnets = client.describe_vxnets(&[]).await.expect("DescribeVxnets");
    let ids: Vec<&str> = vxnets.iter().map(|v| v.vxnet_id.as_str()).collect();
    assert_eq!(ids, ["vxnet-abc1234", "vxnet-nodhcp1"]);
    let nodhcp = vxnets[1].router.as_ref().expect("router");
    assert_eq!(
        (nodhcp.ip_network.as_str(), nodhcp.dyn_ip_start.as_str()),
        ("172.16.4.0/26", "")
    );

    let nics = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-abc1234".into(),
            nic_name: Some(format!("hostnic_{INSTANCE}")),
            count: 2,
            ..CreateNics::default()
        })
        .await
        .expect("CreateNics");
    assert!(nics.iter().all(|n| is_mac_id(&n.nic_id)), "{nics:?}");
    let ids: Vec<String> = nics.iter().map(|n| n.nic_id.clone()).collect();
    let job = client
        .attach_nics("i-second01", &ids)
        .await
        .expect("AttachNics");
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("attached");
    let attached = client
        .describe_nics(&NicFilter {
            instances: vec!["i-second01".into()],
            ..NicFilter::default()
        })
        .await
        .expect("DescribeNics");
    assert_eq!(attached.len(), 2);
    assert!(attached.iter().all(|n| n.status == NicStatus::InUse));

    // Faults through the admin endpoint: two 5100s on DescribeVxnets are retried.
    let (status, _) = raw_http(
        sim.addr,
        "POST",
        "/_sim/faults",
        r#"{"faults":[{"action":"DescribeVxnets","effect":{"error":{"ret_code":5100}},"times":2}]}"#,
    )
    .await;
    assert!(status.contains("200"), "{status}");
    client
        .describe_vxnets(&[])
        .await
        .expect("succeeds after two 5100s");
    let (_, calls) = raw_http(sim.addr, "GET", "/_sim/calls", "").await;
    let calls: serde_json::Value = serde_json::from_str(&calls).expect("JSON");
    assert_eq!(calls["DescribeVxnets"], 4, "1 + 3: {calls}");
    assert_eq!(calls["AttachNics"], 1, "{calls}");

    // A failing job, set at run time.
    let (status, _) = raw_http(sim.addr, "POST", "/_sim/faults", r#"{"fail_next_jobs":1}"#).await;
    assert!(status.contains("200"), "{status}");
    let job = client.detach_nics(&ids).await.expect("DetachNics");
    assert!(matches!(
        client.wait_job(&job, Duration::from_secs(5)).await,
        Err(Error::JobFailed { .. })
    ));
    // A bad control body is refused, naming the problem.
    let (status, body) = raw_http(sim.addr, "POST", "/_sim/faults", r#"{"fail_jobs":1}"#).await;
    assert!(
        status.contains("400") && body.contains("fail_jobs"),
        "{status} {body}"
    );

    // A wrong secret is 1200.
    let mut config = client.config().clone();
    config.secret_access_key = SecretKey::new("not-the-secret");
    let wrong = Client::new(config, fast_options()).expect("client");
    assert_eq!(
        wrong.describe_vxnets(&[]).await.expect_err("1200").code(),
        Some(code::AUTH_FAILURE)
    );
}

#[test]
fn a_bad_command_line_is_refused_with_a_message_and_a_non_zero_exit() {
    for (args, needle) in [
        (vec!["--vxnet", "vxnet-x=172.16.0.0"], "CIDR"),
        (
            vec!["--vxnet", "vxnet-x=172.16.0.0/24,no-such-flag"],
            "no-such-flag",
        ),
        (vec!["--vxnet", "vxnet-x"], "ID=CIDR"),
    ] {
        let output = Command::new(BIN)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--access-key-id",
                "AK",
                "--zone",
                "pek3a",
            ])
            .args(&args)
            .env("QINGCLOUD_SIM_SECRET_ACCESS_KEY", "S")
            .output()
            .expect("runs");
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let output = Command::new(BIN)
        .args([
            "--listen",
            "10.0.0.1:0",
            "--access-key-id",
            "AK",
            "--zone",
            "pek3a",
        ])
        .env("QINGCLOUD_SIM_SECRET_ACCESS_KEY", "S")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a loopback address"));
}
