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
    let a = Allocator::start(&config(cluster, prefix), node)
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
