//! Helpers shared by the allocator's test binaries: an allocator on a test etcd, pools from
//! JSON, requests, and literals.

// Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use hostnic_ipamd::{
    parse_range_sets, AllocateRequest, Allocation, Allocator, Attachment, Kind, PodRef, RangeSet,
    StoreConfig,
};
use hostnic_testkit::EtcdCluster;
use ipnet::IpNet;

pub fn config(cluster: &EtcdCluster, prefix: &str) -> StoreConfig {
    StoreConfig::new(cluster.endpoints()).with_prefix(prefix)
}

/// An allocator for `node` whose pools are loaded.
pub async fn allocator(cluster: &EtcdCluster, prefix: &str, node: &str) -> Allocator {
    allocator_with(&config(cluster, prefix), node).await
}

/// [`allocator`] with a config of the test's own.
pub async fn allocator_with(config: &StoreConfig, node: &str) -> Allocator {
    let a = Allocator::start(config, node)
        .await
        .expect("allocator starts");
    a.ready().await.expect("pools load");
    a
}

pub fn sets(ipam: serde_json::Value) -> Vec<RangeSet> {
    parse_range_sets(&ipam).expect("valid pool config")
}

/// An ADD for `attachment` of pod `default/pod-<container id>`, asking for `requested`
/// exactly (nothing: dynamic addresses).
pub fn request(
    attachment: &Attachment,
    range_sets: &[RangeSet],
    requested: &[&str],
) -> AllocateRequest {
    AllocateRequest {
        attachment: attachment.clone(),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: format!("pod-{}", attachment.container_id),
            uid: String::new(),
        }),
        netns: String::new(),
        range_sets: range_sets.to_vec(),
        requested: requested.iter().map(|s| ip(s)).collect(),
        requested_kind: Kind::Exact,
    }
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal address")
}

pub fn net(text: &str) -> IpNet {
    text.parse().expect("literal subnet")
}

pub fn ips(a: &Allocation) -> Vec<IpAddr> {
    a.ips.iter().map(|x| x.ip).collect()
}

/// Every key under the allocator's prefix with its mod revision, but the elected daemons'
/// leader keys: equal snapshots mean no request wrote anything.
pub async fn snapshot(a: &Allocator) -> BTreeMap<String, i64> {
    let (_, kvs) = a
        .store()
        .load_prefix(a.keys().prefix())
        .await
        .expect("scan");
    let leader = a.keys().leader("");
    kvs.iter()
        .map(|kv| {
            (
                kv.key_str().expect("utf-8 key").to_string(),
                kv.mod_revision(),
            )
        })
        // A daemon campaigns for its elected roles on its own schedule, not because of a request.
        .filter(|(key, _)| !key.starts_with(&leader))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// QingCloud mode: the simulator the NIC tests run against
// ---------------------------------------------------------------------------------------------

pub const KEY: &str = "QYACCESSKEYIDEXAMPLE";
pub const SECRET: &str = "SIMSECRET-nics-test";
pub const ZONE: &str = "pek3a";

/// Every action the NIC pool calls.
pub const ACTIONS: [&str; 8] = [
    "DescribeAccessKeys",
    "DescribeVxnets",
    "DescribeNics",
    "CreateNics",
    "AttachNics",
    "DetachNics",
    "DeleteNics",
    "DescribeJobs",
];

/// A simulator with `instance` running and `vxnets`; jobs take 100 ms.
pub async fn simulator(
    instance: &str,
    vxnets: &[&str],
    real_links: bool,
) -> hostnic_iaas::sim::Simulator {
    use hostnic_iaas::sim::{SimConfig, Simulator, VxnetSpec};
    let mut config = SimConfig::new(KEY, hostnic_iaas::SecretKey::new(SECRET), ZONE);
    config.instances = vec![instance.to_string()];
    config.vxnets = vxnets
        .iter()
        .map(|s| s.parse::<VxnetSpec>().expect("valid vxnet"))
        .collect();
    config.job_duration = std::time::Duration::from_millis(100);
    config.real_links = real_links;
    Simulator::start("127.0.0.1:0".parse().expect("address"), config)
        .await
        .expect("simulator starts")
}
