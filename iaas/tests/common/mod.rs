//! What the simulator tests share: a simulator in-process and a production client pointed at
//! it, paced and retrying fast enough for tests.

#![allow(dead_code)]

use std::time::Duration;

use hostnic_iaas::limit::RetryPolicy;
use hostnic_iaas::sim::cloud::VxnetSpec;
use hostnic_iaas::sim::{SimConfig, Simulator};
use hostnic_iaas::{Client, ClientOptions, SecretKey};

pub const ACCESS_KEY_ID: &str = "QYACCESSKEYIDEXAMPLE";
pub const SECRET: &str = "SIMSECRET-never-printed-7f3a";
pub const ZONE: &str = "pek3a";
pub const INSTANCE: &str = "i-abcd1234";

/// A simulator with one running instance and vxnets: `vxnet-full` 172.16.3.0/24 (router and
/// DHCP), `vxnet-nodhcp` 172.16.4.0/24 (router, no DHCP), `vxnet-novpc` 172.16.5.0/24 (no
/// router), `vxnet-tiny` 172.16.6.0/29 (5 usable addresses); jobs take 100 ms.
pub fn sim_config() -> SimConfig {
    let mut config = SimConfig::new(ACCESS_KEY_ID, SecretKey::new(SECRET), ZONE);
    config.instances = vec![INSTANCE.to_string(), "i-stopped1".to_string()];
    config.vxnets = [
        "vxnet-full=172.16.3.0/24",
        "vxnet-nodhcp=172.16.4.0/24,no-dhcp",
        "vxnet-novpc=172.16.5.0/24,no-router",
        "vxnet-tiny=172.16.6.0/29",
    ]
    .iter()
    .map(|s| s.parse::<VxnetSpec>().expect("valid vxnet"))
    .collect();
    config.job_duration = Duration::from_millis(100);
    config
}

/// Options for tests: no pacing to speak of, 4 attempts 10 ms apart, jobs polled every 20 ms.
pub fn fast_options() -> ClientOptions {
    ClientOptions {
        calls_per_hour: 3_600_000,
        burst: 1_000,
        retry: RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        },
        request_timeout: Duration::from_secs(10),
        job_poll_interval: Duration::from_millis(20),
    }
}

pub async fn start(config: SimConfig) -> Simulator {
    Simulator::start("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("simulator starts")
}

pub async fn sim_and_client() -> (Simulator, Client) {
    let sim = start(sim_config()).await;
    let client = Client::new(sim.client_config(), fast_options()).expect("client");
    (sim, client)
}

/// Whether `id` is a NIC id in MAC form, `52:54:xx:xx:xx:xx` in lowercase hex.
pub fn is_mac_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split(':').collect();
    parts.len() == 6
        && parts[0] == "52"
        && parts[1] == "54"
        && parts.iter().all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// One raw HTTP/1.1 request to `addr`; the status line and the body.
pub async fn raw_http(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    body: &str,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
