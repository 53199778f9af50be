//! The production client against the simulator in-process: every action, paging, each error
//! code as the typed error, which failures are retried (counted at the simulator), the rate,
//! jobs that fail or outlast the wait, signatures and time stamps, and the secret kept out of
//! errors and logs.

mod common;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hostnic_iaas::error::code;
use hostnic_iaas::sign::{form_decode, Params};
use hostnic_iaas::sim::{auth, Control, Fault, FaultEffect};
use hostnic_iaas::types::{CreateNics, JobStatus, NicFilter, NicStatus};
use hostnic_iaas::{timefmt, Client, Config, Error, SecretKey};

fn params(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn every_action_round_trips_through_the_simulator() {
    let (sim, client) = sim_and_client().await;

    let keys = client
        .describe_access_keys(&[ACCESS_KEY_ID.to_string()])
        .await
        .expect("DescribeAccessKeys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].access_key_id, ACCESS_KEY_ID);
    assert_eq!(keys[0].owner, "usr-SimOwn01");

    let vxnets = client
        .describe_vxnets(&[
            "vxnet-full".into(),
            "vxnet-nodhcp".into(),
            "vxnet-novpc".into(),
        ])
        .await
        .expect("DescribeVxnets");
    assert_eq!(vxnets.len(), 3);
    let full = vxnets
        .iter()
        .find(|v| v.vxnet_id == "vxnet-full")
        .expect("full");
    let router = full.router.as_ref().expect("a router");
    assert_eq!(router.ip_network, "172.16.3.0/24");
    assert_eq!(router.manager_ip, "172.16.3.1");
    assert_eq!(
        (router.dyn_ip_start.as_str(), router.dyn_ip_end.as_str()),
        ("172.16.3.2", "172.16.3.254")
    );
    assert!(!full.vpc_router_id.is_empty());
    let nodhcp = vxnets
        .iter()
        .find(|v| v.vxnet_id == "vxnet-nodhcp")
        .expect("nodhcp");
    let router = nodhcp.router.as_ref().expect("a router");
    assert_eq!(
        (router.dyn_ip_start.as_str(), router.dyn_ip_end.as_str()),
        ("", "")
    );
    let novpc = vxnets
        .iter()
        .find(|v| v.vxnet_id == "vxnet-novpc")
        .expect("novpc");
    assert!(novpc.router.is_none());

    let name = format!("hostnic_{INSTANCE}");
    let created = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            nic_name: Some(name.clone()),
            private_ips: vec![Ipv4Addr::new(172, 16, 3, 10), Ipv4Addr::new(172, 16, 3, 11)],
            ..CreateNics::default()
        })
        .await
        .expect("CreateNics");
    assert_eq!(created.len(), 2);
    assert!(created.iter().all(|n| is_mac_id(&n.nic_id)), "{created:?}");
    assert_eq!(created[0].private_ip, "172.16.3.10");
    assert_eq!(created[1].private_ip, "172.16.3.11");
    let auto = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect("CreateNics without addresses");
    assert_eq!(
        auto[0].private_ip, "172.16.3.2",
        "the lowest free address of the DHCP range"
    );
    let ids: Vec<String> = created.iter().map(|n| n.nic_id.clone()).collect();

    let mine = client
        .describe_nics(&NicFilter {
            nic_name: Some(name.clone()),
            ..NicFilter::default()
        })
        .await
        .expect("DescribeNics by name");
    assert_eq!(mine.len(), 2);
    assert!(mine
        .iter()
        .all(|n| n.status == NicStatus::Available && n.instance_id.is_empty() && n.role == 0));

    let job = client
        .attach_nics(INSTANCE, &ids)
        .await
        .expect("AttachNics");
    assert!(job.starts_with("j-") && job.len() == 10, "{job}");
    let pending = client
        .describe_jobs(std::slice::from_ref(&job))
        .await
        .expect("DescribeJobs");
    assert!(matches!(
        pending[0].status,
        JobStatus::Pending | JobStatus::Working
    ));
    assert_eq!(pending[0].job_action, "AttachNics");
    let directive: serde_json::Value =
        serde_json::from_str(&pending[0].directive).expect("JSON directive");
    assert_eq!(directive["nics"], serde_json::json!(ids));
    let done = client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("attach job");
    assert_eq!(done.status, JobStatus::Successful);
    let attached = client
        .describe_nics(&NicFilter {
            instances: vec![INSTANCE.into()],
            status: Some(NicStatus::InUse),
            ..NicFilter::default()
        })
        .await
        .expect("DescribeNics by instance");
    assert_eq!(attached.len(), 2);
    assert!(attached
        .iter()
        .all(|n| n.instance_id == INSTANCE && n.sequence >= 1));

    let job = client.detach_nics(&ids).await.expect("DetachNics");
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("detach job");
    let detached = client
        .describe_nics(&NicFilter {
            nics: ids.clone(),
            ..NicFilter::default()
        })
        .await
        .expect("DescribeNics by id");
    assert!(detached
        .iter()
        .all(|n| n.status == NicStatus::Available && n.instance_id.is_empty()));

    client.delete_nics(&ids).await.expect("DeleteNics");
    let left: Vec<String> = sim.nics().into_iter().map(|n| n.nic_id).collect();
    assert_eq!(left, vec![auto[0].nic_id.clone()]);
    // The addresses are free again.
    let again = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            private_ips: vec![Ipv4Addr::new(172, 16, 3, 10)],
            ..CreateNics::default()
        })
        .await
        .expect("an address freed by DeleteNics");
    assert_eq!(again[0].private_ip, "172.16.3.10");
    let jobs = client.describe_jobs(&[]).await.expect("all jobs");
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j.status == JobStatus::Successful));
}

#[tokio::test]
async fn describe_pages_past_a_hundred_rows() {
    let (sim, client) = sim_and_client().await;
    for count in [100, 50] {
        client
            .create_nics(&CreateNics {
                vxnet: "vxnet-full".into(),
                count,
                disable_ip: true,
                ..CreateNics::default()
            })
            .await
            .expect("CreateNics");
    }
    let nics = client
        .describe_nics(&NicFilter::default())
        .await
        .expect("DescribeNics");
    assert_eq!(nics.len(), 150);
    let mut ids: Vec<&str> = nics.iter().map(|n| n.nic_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 150, "no row twice");
    assert!(
        nics.iter().all(|n| n.private_ip.is_empty()),
        "disable_ip NICs have no address"
    );
    assert_eq!(sim.calls("DescribeNics"), 2, "two pages of at most 100");
    // The simulator caps a larger limit at 100.
    let page = client
        .call("DescribeNics", &params(&[("limit", "252")]))
        .await
        .expect("one page");
    assert_eq!(page["nic_set"].as_array().map(Vec::len), Some(100));
    assert_eq!(page["total_count"], 150);
}

fn api_code(result: Result<impl std::fmt::Debug, Error>) -> (u32, String) {
    match result {
        Err(Error::Api { code, message, .. }) => (code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn each_error_code_surfaces_as_the_typed_error() {
    let mut config = sim_config();
    config.nic_limit_per_instance = 3;
    let sim = start(config).await;
    let client = Client::new(sim.client_config(), fast_options()).expect("client");

    // 2100: unknown NIC, unknown vxnet, unknown instance.
    let err = client
        .delete_nics(&["52:54:00:00:00:99".into()])
        .await
        .expect_err("unknown NIC");
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("ResourceNotFound"), "{err}");
    let (c, _) = api_code(
        client
            .create_nics(&CreateNics {
                vxnet: "vxnet-nope".into(),
                count: 1,
                ..CreateNics::default()
            })
            .await,
    );
    assert_eq!(c, code::RESOURCE_NOT_FOUND);

    // 1100: an address outside the vxnet, the gateway, a count that does not match.
    for ip in [
        Ipv4Addr::new(10, 0, 0, 5),
        Ipv4Addr::new(172, 16, 3, 1),
        Ipv4Addr::new(172, 16, 3, 255),
    ] {
        let (c, m) = api_code(
            client
                .create_nics(&CreateNics {
                    vxnet: "vxnet-full".into(),
                    private_ips: vec![ip],
                    ..CreateNics::default()
                })
                .await,
        );
        assert_eq!(c, code::MALFORMED, "{ip}: {m}");
    }
    let (c, _) = api_code(
        client
            .call(
                "CreateNics",
                &params(&[
                    ("vxnet", "vxnet-full"),
                    ("count", "2"),
                    ("private_ips.1", "172.16.3.9"),
                ]),
            )
            .await,
    );
    assert_eq!(c, code::MALFORMED);
    // 1101: an action the API does not have.
    let (c, _) = api_code(client.call("RunInstances", &Params::new()).await);
    assert_eq!(c, code::BAD_REQUEST);

    // 1400: an address in use; deleting or attaching an in-use NIC; detaching an available one;
    // a stopped instance; the per-instance NIC limit; a vxnet out of addresses.
    let nics = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 3,
            ..CreateNics::default()
        })
        .await
        .expect("three NICs");
    let ids: Vec<String> = nics.iter().map(|n| n.nic_id.clone()).collect();
    let (c, m) = api_code(
        client
            .create_nics(&CreateNics {
                vxnet: "vxnet-full".into(),
                private_ips: vec![nics[0].private_ip.parse().expect("ip")],
                ..CreateNics::default()
            })
            .await,
    );
    assert_eq!(c, code::PERMISSION_DENIED, "{m}");
    let (c, m) = api_code(client.detach_nics(&ids[..1]).await);
    assert_eq!(c, code::PERMISSION_DENIED, "{m}");
    sim.control(Control {
        stopped_instances: vec!["i-stopped1".into()],
        ..Control::default()
    });
    let (c, m) = api_code(client.attach_nics("i-stopped1", &ids[..1]).await);
    assert_eq!(c, code::PERMISSION_DENIED, "{m}");
    assert!(m.contains("not running"), "{m}");
    let (c, m) = api_code(client.attach_nics(INSTANCE, &ids).await);
    assert_eq!(c, code::PERMISSION_DENIED, "primary + 3 > 3: {m}");
    let job = client
        .attach_nics(INSTANCE, &ids[..2])
        .await
        .expect("primary + 2 fits");
    let (c, m) = api_code(client.attach_nics(INSTANCE, &ids[2..]).await);
    assert_eq!(c, code::PERMISSION_DENIED, "NICs being attached count: {m}");
    let (c, m) = api_code(client.delete_nics(&ids[..1]).await);
    assert_eq!(c, code::PERMISSION_DENIED, "busy with the job: {m}");
    assert!(m.contains("please try later"), "{m}");
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("attached");
    let (c, m) = api_code(client.delete_nics(&ids[..1]).await);
    assert_eq!(c, code::PERMISSION_DENIED, "in-use: {m}");
    let (c, _) = api_code(client.attach_nics(INSTANCE, &ids[..1]).await);
    assert_eq!(c, code::PERMISSION_DENIED);
    let (c, m) = api_code(
        client
            .create_nics(&CreateNics {
                vxnet: "vxnet-tiny".into(),
                count: 6,
                ..CreateNics::default()
            })
            .await,
    );
    assert_eq!(c, code::PERMISSION_DENIED, "a /29 holds 5: {m}");
    client
        .create_nics(&CreateNics {
            vxnet: "vxnet-tiny".into(),
            count: 5,
            ..CreateNics::default()
        })
        .await
        .expect("a /29 holds 5");

    // Injected 5000, 5100, 2500 and 1200 past the retries are the typed error too.
    for ret_code in [
        code::INTERNAL_ERROR,
        code::SERVER_BUSY,
        code::QUOTA_EXCEEDED,
        code::AUTH_FAILURE,
    ] {
        sim.inject(Fault::error("DescribeVxnets", ret_code, 10));
        let (c, _) = api_code(client.describe_vxnets(&[]).await);
        assert_eq!(c, ret_code);
        sim.clear_faults();
    }
    // A refused request changes nothing: 3 + 5 NICs.
    assert_eq!(sim.nics().len(), 8);
}

#[tokio::test]
async fn only_retryable_errors_are_retried_and_a_bounded_number_of_times() {
    let (sim, client) = sim_and_client().await;
    let mut expected = 0;
    for ret_code in [
        code::INTERNAL_ERROR,
        code::SERVER_BUSY,
        code::QUOTA_EXCEEDED,
    ] {
        sim.inject(Fault::error("DescribeVxnets", ret_code, 2));
        client
            .describe_vxnets(&[])
            .await
            .expect("succeeds on the third attempt");
        expected += 3;
        assert_eq!(sim.calls("DescribeVxnets"), expected, "ret_code {ret_code}");
    }
    for ret_code in [
        code::MALFORMED,
        code::AUTH_FAILURE,
        code::MESSAGE_EXPIRED,
        code::PERMISSION_DENIED,
        code::RESOURCE_NOT_FOUND,
    ] {
        sim.inject(Fault::error("DescribeVxnets", ret_code, 1));
        let (c, _) = api_code(client.describe_vxnets(&[]).await);
        assert_eq!(c, ret_code);
        expected += 1;
        assert_eq!(
            sim.calls("DescribeVxnets"),
            expected,
            "ret_code {ret_code} is not retried"
        );
    }
    // Bounded: 4 attempts, then the error.
    sim.inject(Fault::error("DescribeVxnets", code::SERVER_BUSY, 100));
    let (c, _) = api_code(client.describe_vxnets(&[]).await);
    assert_eq!(c, code::SERVER_BUSY);
    expected += 4;
    assert_eq!(sim.calls("DescribeVxnets"), expected);
    sim.clear_faults();
    // A mutating action is retried on 5100 too: the API did not carry it out.
    sim.inject(Fault::error("CreateNics", code::SERVER_BUSY, 1));
    client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect("retried");
    assert_eq!(sim.calls("CreateNics"), 2);
    assert_eq!(sim.nics().len(), 1);
}

#[tokio::test]
async fn a_lost_answer_is_retried_for_reads_but_not_for_a_mutation() {
    let (sim, client) = sim_and_client().await;
    sim.inject(Fault::drop_connection("DescribeNics", 2));
    client
        .describe_nics(&NicFilter::default())
        .await
        .expect("third attempt answers");
    assert_eq!(sim.calls("DescribeNics"), 3);

    sim.inject(Fault::drop_connection("CreateNics", 1));
    let err = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect_err("no answer");
    match &err {
        Error::Transport { before_sending, .. } => assert!(!before_sending, "{err}"),
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(err.is_retryable(), "the caller may look and try again");
    assert_eq!(sim.calls("CreateNics"), 1, "not sent twice");

    // Nobody listening: the connection is never made, so any action is retried, then fails.
    let addr = sim.addr();
    let config = sim.client_config();
    drop(sim);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let client = Client::new(config, fast_options()).expect("client");
    let err = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect_err("nobody listens");
    match &err {
        Error::Transport {
            before_sending,
            origin,
            ..
        } => {
            assert!(before_sending, "{err}");
            assert!(origin.contains(&addr.port().to_string()), "{err}");
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stopped_simulator_closes_the_connections_it_kept_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = start(sim_config()).await;
    let mut stream = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("connect");
    let request = "GET /_sim/calls HTTP/1.1\r\nHost: sim\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.expect("an answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(sim);
    // Either the write or the read sees the connection closed; nothing answers.
    let _ = stream.write_all(request.as_bytes()).await;
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "answered after stopping: {}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("the connection was left open"),
    }
}

#[tokio::test]
async fn the_token_bucket_holds_the_clients_rate_and_the_simulator_enforces_the_accounts() {
    // The client at 10 calls a second with a burst of 2: 7 calls need at least 0.5 s.
    let sim = start(sim_config()).await;
    let mut options = fast_options();
    options.calls_per_hour = 36_000;
    options.burst = 2;
    let client = Client::new(sim.client_config(), options).expect("client");
    let began = std::time::Instant::now();
    for _ in 0..7 {
        client.describe_vxnets(&[]).await.expect("paced call");
    }
    let elapsed = began.elapsed();
    assert!(elapsed >= Duration::from_millis(490), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(
        sim.calls("DescribeVxnets"),
        7,
        "pacing, not failing and retrying"
    );

    // An account allowed 5 calls an hour answers the sixth with 2500.
    let mut config = sim_config();
    config.calls_per_hour = 5;
    let sim = start(config).await;
    let mut options = fast_options();
    options.retry.max_attempts = 1;
    let client = Client::new(sim.client_config(), options).expect("client");
    for _ in 0..5 {
        client
            .describe_vxnets(&[])
            .await
            .expect("within the account's rate");
    }
    let (c, m) = api_code(client.describe_vxnets(&[]).await);
    assert_eq!(c, code::QUOTA_EXCEEDED, "{m}");

    // A client paced under the account's rate never sees 2500.
    sim.control(Control {
        calls_per_hour: Some(4),
        ..Control::default()
    });
    let mut options = fast_options();
    options.retry.max_attempts = 1;
    options.calls_per_hour = 3_600 * 20;
    options.burst = 4;
    let client = Client::new(sim.client_config(), options).expect("client");
    for _ in 0..4 {
        client.describe_vxnets(&[]).await.expect("under the rate");
    }
}

#[tokio::test]
async fn a_job_that_fails_outlasts_the_wait_or_is_unknown_is_an_error() {
    let (sim, client) = sim_and_client().await;
    let nics = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect("a NIC");
    let ids = vec![nics[0].nic_id.clone()];

    sim.control(Control {
        fail_next_jobs: Some(1),
        ..Control::default()
    });
    let job = client
        .attach_nics(INSTANCE, &ids)
        .await
        .expect("AttachNics");
    match client.wait_job(&job, Duration::from_secs(5)).await {
        Err(Error::JobFailed {
            job_id,
            job_action,
            status,
        }) => {
            assert_eq!(
                (job_id.as_str(), job_action.as_str(), status.as_str()),
                (job.as_str(), "AttachNics", "failed")
            );
        }
        other => panic!("expected a failed job, got {other:?}"),
    }
    assert_eq!(
        sim.nics()[0].status,
        NicStatus::Available,
        "a failed attach leaves the NIC available"
    );

    sim.control(Control {
        job_duration_ms: Some(60_000),
        ..Control::default()
    });
    let job = client
        .attach_nics(INSTANCE, &ids)
        .await
        .expect("AttachNics");
    let began = std::time::Instant::now();
    match client.wait_job(&job, Duration::from_millis(300)).await {
        Err(Error::JobTimeout { job_id, status, .. }) => {
            assert_eq!(job_id, job);
            assert!(status == "working" || status == "pending", "{status}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    match client.wait_job("j-notajob", Duration::from_secs(1)).await {
        Err(Error::JobNotFound { job_id }) => assert_eq!(job_id, "j-notajob"),
        other => panic!("expected an unknown job, got {other:?}"),
    }
    // A retryable failure while waiting only means asking again.
    sim.control(Control {
        job_duration_ms: Some(100),
        ..Control::default()
    });
    let nics = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect("a NIC");
    let job = client
        .attach_nics(INSTANCE, &[nics[0].nic_id.clone()])
        .await
        .expect("AttachNics");
    sim.inject(Fault {
        action: Some("DescribeJobs".into()),
        effect: FaultEffect::Error {
            ret_code: code::SERVER_BUSY,
            message: None,
        },
        times: 6,
    });
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("done despite 5100s");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_wrong_secret_is_1200_and_the_secret_is_in_no_error_debug_output_or_log_line() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = start(sim_config()).await;
    let mut wrong = sim.client_config();
    wrong.secret_access_key = SecretKey::new("WRONG-secret-also-never-printed");
    let client = Client::new(wrong, fast_options()).expect("client");
    let err = client
        .describe_vxnets(&[])
        .await
        .expect_err("bad signature");
    assert_eq!(err.code(), Some(code::AUTH_FAILURE), "{err}");
    assert!(
        err.to_string()
            .contains("AuthFailure, signature not matched"),
        "{err}"
    );
    assert_eq!(sim.calls("DescribeVxnets"), 1, "1200 is not retried");

    // With the right secret, through retries (logged as warnings) and a job.
    let client = Client::new(sim.client_config(), fast_options()).expect("client");
    sim.inject(Fault::error("CreateNics", code::SERVER_BUSY, 1));
    let nics = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 1,
            ..CreateNics::default()
        })
        .await
        .expect("a NIC");
    let job = client
        .attach_nics(INSTANCE, &[nics[0].nic_id.clone()])
        .await
        .expect("attach");
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("attached");

    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
    assert!(logs.contains("retrying"), "the retry was logged: {logs}");
    let shown = format!("{err} {err:?} {client:?} {:?} {logs}", client.config());
    for secret in [SECRET, "WRONG-secret-also-never-printed"] {
        assert!(
            !shown.contains(secret),
            "the secret {secret} leaked: {shown}"
        );
    }
}

#[tokio::test]
async fn a_stale_or_future_time_stamp_is_1300_and_a_fresh_one_on_either_path_and_method_works() {
    let sim = start(sim_config()).await;
    let client = Client::new(sim.client_config(), fast_options()).expect("client");
    let now = timefmt::now_unix();
    for (stamp, expected) in [
        ("2013-08-27T14:30:10Z".to_string(), 1300),
        (timefmt::format_utc(now - 120), 1300),
        (timefmt::format_utc(now + 120), 1300),
        (timefmt::format_utc(now), 0),
    ] {
        let signed = client.sign_request("DescribeVxnets", &Params::new(), &stamp);
        let (status, body) = raw_http(
            sim.addr(),
            "GET",
            &format!("{}?{}", signed.path, signed.query),
            "",
        )
        .await;
        assert!(status.contains("200"), "{status}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(answer["ret_code"], expected, "{stamp}: {answer}");
        if expected == 1300 {
            assert!(
                answer["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("MessageExpired")),
                "{answer}"
            );
        } else {
            assert_eq!(answer["action"], "DescribeVxnetsResponse");
        }
    }

    // `/iaas/` (the Python SDK's path) works when signed as sent.
    let mut config = sim.client_config();
    config.uri = "/iaas/".into();
    let slash = Client::new(config, fast_options()).expect("client");
    assert_eq!(slash.describe_vxnets(&[]).await.expect("/iaas/").len(), 4);

    // POST with a form body, signed with POST (the Python SDK's form encoding, `+` for space).
    let secret = SecretKey::new(SECRET);
    let mut p = params(&[
        ("action", "DescribeNics"),
        ("zone", ZONE),
        ("access_key_id", ACCESS_KEY_ID),
        ("time_stamp", &timefmt::format_utc(now)),
        ("signature_method", "HmacSHA1"),
        ("signature_version", "1"),
        ("version", "1"),
        ("nic_name", "no such name"),
    ]);
    let sig = hostnic_iaas::sign::signature(
        SECRET.as_bytes(),
        hostnic_iaas::sign::SignatureMethod::HmacSha1,
        "POST",
        "/iaas/",
        &p,
    );
    p.insert("signature".into(), sig);
    let body: Vec<String> = p
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                hostnic_iaas::sign::percent_encode(v).replace("%20", "+")
            )
        })
        .collect();
    let (_, answer) = raw_http(sim.addr(), "POST", "/iaas/", &body.join("&")).await;
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(answer["ret_code"], 0, "{answer}");
    assert_eq!(answer["total_count"], 0);
    // The same body sent to the other path does not verify.
    let (_, answer) = raw_http(sim.addr(), "POST", "/iaas", &body.join("&")).await;
    assert!(answer.contains("\"ret_code\":1200"), "{answer}");
    drop(secret);

    // Any other path is not the API.
    let (status, _) = raw_http(sim.addr(), "GET", "/iam/?action=DescribeNics", "").await;
    assert!(status.contains("404"), "{status}");
}

#[test]
fn the_client_signs_what_the_simulators_verifier_accepts_with_the_doc_vector_values() {
    let mut config = Config::new(
        "QYACCESSKEYIDEXAMPLE",
        SecretKey::new("SECRETACCESSKEY"),
        "pek3a",
    );
    config.uri = "/iaas".into();
    let client = Client::new(config, fast_options()).expect("client");
    let stamp = "2013-08-27T14:30:10Z";
    let signed = client.sign_request(
        "AttachNics",
        &params(&[
            ("instance", "i-abcd1234"),
            ("nics.1", "52:54:9e:12:34:56"),
            ("nics.2", "52:54:9e:ab:cd:ef"),
        ]),
        stamp,
    );
    assert_eq!(signed.method, "GET");
    assert_eq!(signed.path, "/iaas");
    assert_eq!(
        signed.query,
        "access_key_id=QYACCESSKEYIDEXAMPLE&action=AttachNics&instance=i-abcd1234&nics.1=52%3A54%3A9e%3A12%3A34%3A56&nics.2=52%3A54%3A9e%3Aab%3Acd%3Aef&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&zone=pek3a&signature=2F6pkGP%2Fg7ScvrMtfC%2B1rX6Q4EC7FoZejWDCcrH8YpY%3D"
    );
    let received: Params = form_decode(&signed.query)
        .expect("decodes")
        .into_iter()
        .collect();
    let secret = SecretKey::new("SECRETACCESSKEY");
    assert_eq!(
        auth::verify_signature("GET", "/iaas", &received, "QYACCESSKEYIDEXAMPLE", &secret),
        Ok(())
    );
    let at = timefmt::parse_utc(stamp).expect("parses");
    assert_eq!(
        auth::verify_time(&received, at + 30, Duration::from_secs(60)),
        Ok(())
    );
    assert_eq!(
        auth::verify_time(&received, at + 61, Duration::from_secs(60)).map_err(|e| e.code),
        Err(1300)
    );
    let wrong = SecretKey::new("SECRETACCESSKEY2");
    assert_eq!(
        auth::verify_signature("GET", "/iaas", &received, "QYACCESSKEYIDEXAMPLE", &wrong)
            .map_err(|e| e.code),
        Err(1200)
    );
}

/// The call observer sees every attempt with its result: the retried 5100, the dropped
/// connection, the success after them, and as many of each as the simulator received.
#[tokio::test]
async fn the_call_observer_sees_every_attempt_with_its_ret_code_or_transport_error() {
    let sim = start(sim_config()).await;
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let client = Client::new(sim.client_config(), fast_options())
        .expect("client")
        .with_call_observer({
            let seen = Arc::clone(&seen);
            Arc::new(move |action, result| {
                seen.lock()
                    .expect("observer lock")
                    .push((action.to_string(), result.label()));
            })
        });
    sim.inject(Fault::error("DescribeVxnets", code::SERVER_BUSY, 1));
    sim.inject(Fault::drop_connection("DescribeVxnets", 1));
    client
        .describe_vxnets(&["vxnet-full".to_string()])
        .await
        .expect("answered after the faults");
    let seen = seen.lock().expect("observer lock").clone();
    let results: Vec<&str> = seen.iter().map(|(_, r)| r.as_str()).collect();
    assert!(seen.iter().all(|(a, _)| a == "DescribeVxnets"), "{seen:?}");
    assert_eq!(
        results.len() as u64,
        sim.calls("DescribeVxnets"),
        "{seen:?}"
    );
    assert!(results.contains(&"5100"), "{seen:?}");
    assert!(results.contains(&"transport_error"), "{seen:?}");
    assert_eq!(results.last(), Some(&"0"), "{seen:?}");

    // An API that cannot be reached at all: each attempt is a transport error.
    let mut config = sim.client_config();
    drop(sim);
    config.port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let count = Arc::new(Mutex::new(Vec::new()));
    let unreachable = Client::new(config, fast_options())
        .expect("client")
        .with_call_observer({
            let count = Arc::clone(&count);
            Arc::new(move |_, result| count.lock().expect("lock").push(result))
        });
    unreachable
        .describe_vxnets(&[])
        .await
        .expect_err("nothing answers");
    let count = count.lock().expect("lock").clone();
    assert_eq!(
        count.len() as u32,
        fast_options().retry.max_attempts,
        "{count:?}"
    );
    assert!(
        count.iter().all(|r| r.label() == "transport_error"),
        "{count:?}"
    );
}
