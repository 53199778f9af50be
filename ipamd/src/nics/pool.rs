//! The node's pool of QingCloud NICs: leases to pods, the warm pool between its marks, and the
//! repairs of [`super::reconcile`].
//!
//! The order of every step keeps the invariants whatever fails or is killed in between:
//! 1. the address is committed in etcd (a [`NIC_NETWORK`] holder attachment) before
//!    `CreateNics` asks for it, and released only after the NIC is deleted;
//! 2. the NIC's record is written (state `attaching`) as soon as the API has named it, before
//!    `AttachNics`; it becomes `ready` once the link is seen on the host, `leased` by a CAS that
//!    names the pod's attachment;
//! 3. a NIC is detached and deleted before its record is deleted.
//!
//! Every etcd write is a transaction guarded by the record's revision (or its absence), and
//! the pool's own operations run one at a time on a node, so two leases never take one NIC.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use hostnic_iaas::error::code;
use hostnic_iaas::types::{CreateNics, Nic, NicFilter, NicStatus};
use hostnic_iaas::Client;
use tokio::sync::Notify;

use super::links::{link_of, links_by_mac};
use super::reconcile::{plan, Observed, Repair};
use super::record::{
    holder_attachment, nic_key, node_nics_prefix, NicLeaseRecord, NicRecord, NicState, NIC_NETWORK,
    NIC_RECORD_VERSION,
};
use super::settings::{nic_name, PoolSettings};
use super::vxnet::{Rotation, VxnetPool};
use super::NicError;
use crate::allocator::{AllocateRequest, Allocator};
use crate::pool::{parse_range_sets, RangeSet};
use crate::records::{now_unix, Attachment, Kind, PodRef};

/// How long a NIC's link may take to appear once its attach job succeeded.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the warm pool is checked without being asked to.
pub const MAINTAIN_INTERVAL: Duration = Duration::from_secs(10);
/// How often the pool reconciles with the API while running (one `DescribeNics`, far below the
/// account's 2,000 calls an hour).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(300);

/// What a pod's attachment is told about its NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedNic {
    pub nic_id: String,
    pub host_link: String,
    /// Address with the vxnet's prefix length.
    pub address: String,
    pub gateway: Ipv4Addr,
    pub vxnet: String,
}

impl LeasedNic {
    fn of(r: &NicRecord) -> Self {
        LeasedNic {
            nic_id: r.nic_id.clone(),
            host_link: r.host_link.clone(),
            address: r.address_cidr(),
            gateway: r.gateway,
            vxnet: r.vxnet.clone(),
        }
    }
}

/// Counts of this node's NICs by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub attaching: usize,
    pub ready: usize,
    pub leased: usize,
}

/// Where a QingCloud-mode daemon finds what it needs besides etcd.
#[derive(Debug, Clone)]
pub struct NicPoolConfig {
    pub instance: String,
    pub settings: PoolSettings,
    /// The primary NIC's name (`--iface`).
    pub primary_iface: String,
    /// Normally `/sys/class/net`.
    pub sys_class_net: PathBuf,
    pub link_timeout: Duration,
}

/// This node's NIC pool.
#[derive(Debug)]
pub struct NicPool {
    allocator: Arc<Allocator>,
    client: Client,
    config: NicPoolConfig,
    vxnets: Vec<(VxnetPool, Vec<RangeSet>)>,
    rotation: Mutex<Rotation>,
    /// One pool operation at a time on this node.
    ops: tokio::sync::Mutex<()>,
    wake: Notify,
    /// An operation failed partway: the maintenance loop reconciles before anything else.
    needs_repair: AtomicBool,
}

type Stored = (NicRecord, i64);

impl NicPool {
    /// Checks the account and the vxnets with the API, then reconciles before serving (repairs
    /// that fail for a reason that may pass are left to the maintenance loop). Fails, naming
    /// the problem, on a key the API refuses, a vxnet it does not know or one hostnic would
    /// refuse.
    pub async fn start(
        allocator: Arc<Allocator>,
        client: Client,
        config: NicPoolConfig,
    ) -> Result<NicPool, NicError> {
        let key = client.config().access_key_id.clone();
        let keys = client
            .describe_access_keys(std::slice::from_ref(&key))
            .await
            .map_err(|e| NicError::api("checking the access key", e))?;
        if keys.is_empty() {
            return Err(NicError::Config(format!(
                "the API does not know access key {key}"
            )));
        }
        let found = client
            .describe_vxnets(&config.settings.vxnets)
            .await
            .map_err(|e| NicError::api("describing the vxnets", e))?;
        let mut vxnets = Vec::new();
        for id in &config.settings.vxnets {
            let vxnet = found.iter().find(|v| &v.vxnet_id == id).ok_or_else(|| {
                NicError::Config(format!(
                    "{} names vxnet {id}, which the API does not know in zone {}",
                    config.settings.vxnets_source,
                    client.config().zone
                ))
            })?;
            let pool = VxnetPool::from_vxnet(vxnet).map_err(NicError::Config)?;
            let mut ipam = pool.ipam();
            if let Some(b) = config.settings.block_size {
                ipam["blockSize"] = serde_json::json!(b);
            }
            let sets = parse_range_sets(&ipam)
                .map_err(|e| NicError::Config(format!("vxnet {id}'s pool: {e}")))?;
            vxnets.push((pool, sets));
        }
        let rotation = Mutex::new(Rotation::new(config.settings.policy, vxnets.len()));
        let pool = NicPool {
            allocator,
            client,
            config,
            vxnets,
            rotation,
            ops: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            needs_repair: AtomicBool::new(false),
        };
        match pool.reconcile().await {
            Ok(_) => {}
            // Some repair failed (the API busy, a job that failed): the pool serves what is
            // sound and the maintenance loop repairs again first thing.
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "reconciling this node's NICs at start left repairs to do");
                pool.needs_repair.store(true, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
        Ok(pool)
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.config.settings
    }

    fn prefix(&self) -> &str {
        self.allocator.keys().prefix()
    }

    fn key(&self, nic_id: &str) -> String {
        nic_key(self.prefix(), self.allocator.node(), nic_id)
    }

    fn sys(&self) -> &Path {
        &self.config.sys_class_net
    }

    /// This node's valid records with their revisions; invalid ones are named in the log and
    /// left alone (`audit` names them too).
    async fn records(&self) -> Result<Vec<Stored>, NicError> {
        let prefix = node_nics_prefix(self.prefix(), self.allocator.node());
        let resp = self
            .allocator
            .store()
            .get(
                "read this node's NIC records",
                &prefix,
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            match NicRecord::decode(kv.value()) {
                Ok(r) => out.push((r, kv.mod_revision())),
                Err(reason) => tracing::warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    reason,
                    "skipping an invalid NIC record"
                ),
            }
        }
        Ok(out)
    }

    /// Counts of this node's NICs by state.
    pub async fn counts(&self) -> Result<PoolCounts, NicError> {
        let mut c = PoolCounts::default();
        for (r, _) in self.records().await? {
            match r.state {
                NicState::Attaching => c.attaching += 1,
                NicState::Ready => c.ready += 1,
                NicState::Leased => c.leased += 1,
            }
        }
        Ok(c)
    }

    /// Writes `record` if its key is unchanged since `revision` (0: absent).
    async fn put(&self, record: &NicRecord, revision: i64) -> Result<(), NicError> {
        let key = self.key(&record.nic_id);
        let guard = if revision == 0 {
            Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)
        };
        let txn =
            Txn::new()
                .when([guard])
                .and_then([TxnOp::put(key.as_str(), record.encode(), None)]);
        let resp = self
            .allocator
            .store()
            .txn("write a NIC record", txn)
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(NicError::Changed { key })
        }
    }

    /// Deletes the record of `nic_id` if unchanged since `revision`, then releases its address.
    async fn forget(&self, record: &NicRecord, revision: i64) -> Result<(), NicError> {
        let key = self.key(&record.nic_id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let resp = self
            .allocator
            .store()
            .txn("delete a NIC record", txn)
            .await?;
        if !resp.succeeded() {
            return Err(NicError::Changed { key });
        }
        self.allocator.release(&record.holder_attachment()).await?;
        tracing::info!(nic_id = record.nic_id, address = %record.address, "NIC record deleted and its address released");
        Ok(())
    }

    /// The NIC leased to `attachment`, if any.
    pub async fn get(&self, attachment: &Attachment) -> Result<Option<LeasedNic>, NicError> {
        Ok(self
            .records()
            .await?
            .iter()
            .find(|(r, _)| {
                r.lease
                    .as_ref()
                    .is_some_and(|l| &l.attachment == attachment)
            })
            .map(|(r, _)| LeasedNic::of(r)))
    }

    /// Leases a NIC to `attachment`: the one it holds already, a warm one, or a new one.
    pub async fn lease(
        &self,
        attachment: &Attachment,
        pod: Option<PodRef>,
        netns: &str,
    ) -> Result<LeasedNic, NicError> {
        self.lease_within(attachment, pod, netns, &[]).await
    }

    /// [`NicPool::lease`] of a NIC whose address lies in one of `within` (a namespace's vxnets
    /// or blocks, see [`NicPool::placement`]); anywhere when empty. A new NIC for a block gets
    /// an address of that block; one for a whole vxnet, the vxnet's next free address.
    pub async fn lease_within(
        &self,
        attachment: &Attachment,
        pod: Option<PodRef>,
        netns: &str,
        within: &[ipnet::Ipv4Net],
    ) -> Result<LeasedNic, NicError> {
        attachment.validate().map_err(NicError::InvalidRequest)?;
        if attachment.network == NIC_NETWORK {
            return Err(NicError::InvalidRequest(format!(
                "network name {NIC_NETWORK} is the daemon's own"
            )));
        }
        self.lease_any(attachment, pod, netns, within).await
    }

    /// The node's own address on `vxnet`, through which pods route the service CIDR to the
    /// host (kube-proxy): an address the host already has in the vxnet's subnet, else that of
    /// a gateway NIC leased to the node itself (attachment `gateway-<vxnet>` of network
    /// `hostnic-nic`, no namespace, so never taken back) and addressed on the host.
    pub async fn service_gateway(&self, vxnet: &str) -> Result<Ipv4Addr, NicError> {
        let Some((pool, _)) = self.vxnets.iter().find(|(v, _)| v.id == vxnet) else {
            return Err(NicError::InvalidRequest(format!(
                "vxnet {vxnet} is not one of the daemon's"
            )));
        };
        let host = super::links::host_ipv4_addresses()
            .await
            .map_err(|reason| NicError::Api {
                what: "reading the host's addresses".into(),
                reason,
                retryable: true,
            })?;
        if let Some((_, net)) = host
            .iter()
            .find(|(_, net)| pool.subnet.contains(&net.addr()))
        {
            return Ok(net.addr());
        }
        let gateway = Attachment::new(NIC_NETWORK, format!("gateway-{vxnet}"), "gw0");
        let nic = self.lease_any(&gateway, None, "", &[pool.subnet]).await?;
        let link =
            link_of(self.sys(), &nic.nic_id).ok_or_else(|| NicError::NoLink(nic.nic_id.clone()))?;
        let address: ipnet::Ipv4Net = nic.address.parse().map_err(|_| NicError::Api {
            what: "addressing the gateway NIC".into(),
            reason: format!("address {:?}", nic.address),
            retryable: false,
        })?;
        super::links::set_host_address(&link, address)
            .await
            .map_err(|reason| NicError::Api {
                what: "addressing the gateway NIC".into(),
                reason,
                retryable: true,
            })?;
        tracing::info!(vxnet, nic_id = nic.nic_id, link, %address, "gateway NIC for the service CIDR");
        Ok(address.addr())
    }

    async fn lease_any(
        &self,
        attachment: &Attachment,
        pod: Option<PodRef>,
        netns: &str,
        within: &[ipnet::Ipv4Net],
    ) -> Result<LeasedNic, NicError> {
        let fits =
            |r: &NicRecord| within.is_empty() || within.iter().any(|n| n.contains(&r.address));
        let _ops = self.ops.lock().await;
        let mut records = self.records().await?;
        if let Some((r, _)) = records.iter().find(|(r, _)| {
            r.lease
                .as_ref()
                .is_some_and(|l| &l.attachment == attachment)
        }) {
            return Ok(LeasedNic::of(r));
        }
        if !records.iter().any(|(r, _)| self.is_warm(r) && fits(r)) {
            let total = records.len() as u32;
            let max = self.config.settings.max_nic;
            if total >= max {
                return Err(NicError::Exhausted(format!(
                    "this node has {total} NICs, maxNic is {max}, and none is free"
                )));
            }
            let count = self.config.settings.high.max(1).min(max - total);
            let created = match within.first() {
                None => self.create(count).await,
                Some(_) => self.create_within(within).await,
            };
            if let Err(e) = created {
                self.needs_repair.store(true, Ordering::Relaxed);
                self.wake.notify_one();
                return Err(e);
            }
            records = self.records().await?;
        }
        let (record, revision) = records
            .into_iter()
            .find(|(r, _)| self.is_warm(r) && fits(r))
            .ok_or_else(|| NicError::Exhausted("no NIC became ready".into()))?;
        let mut leased = record.clone();
        leased.state = NicState::Leased;
        leased.host_link = link_of(self.sys(), &record.nic_id).unwrap_or(record.host_link);
        leased.lease = Some(NicLeaseRecord {
            attachment: attachment.clone(),
            pod,
            netns: netns.to_string(),
        });
        self.put(&leased, revision).await?;
        tracing::info!(nic_id = leased.nic_id, %attachment, address = %leased.address, "NIC leased");
        self.wake.notify_one();
        Ok(LeasedNic::of(&leased))
    }

    /// A ready NIC whose link is on the host and is not the primary NIC.
    fn is_warm(&self, r: &NicRecord) -> bool {
        r.state == NicState::Ready
            && link_of(self.sys(), &r.nic_id).is_some_and(|l| l != self.config.primary_iface)
    }

    /// Returns the NIC leased to `attachment` to the warm pool; the NIC id, or None if it held
    /// none. A NIC whose link did not come back to the host is detached and deleted instead.
    pub async fn give_back(&self, attachment: &Attachment) -> Result<Option<String>, NicError> {
        let _ops = self.ops.lock().await;
        let records = self.records().await?;
        let Some((record, revision)) = records.into_iter().find(|(r, _)| {
            r.lease
                .as_ref()
                .is_some_and(|l| &l.attachment == attachment)
        }) else {
            return Ok(None);
        };
        let nic_id = record.nic_id.clone();
        match link_of(self.sys(), &nic_id) {
            Some(link) => {
                let mut ready = record;
                ready.state = NicState::Ready;
                ready.lease = None;
                ready.host_link = link;
                self.put(&ready, revision).await?;
                tracing::info!(nic_id, %attachment, "NIC returned to the warm pool");
            }
            None => {
                tracing::warn!(nic_id, %attachment, "the returned NIC's link is not on the host: deleting the NIC");
                if let Err(e) = self.dispose(vec![(record, revision)]).await {
                    self.needs_repair.store(true, Ordering::Relaxed);
                    self.wake.notify_one();
                    return Err(e);
                }
            }
        }
        self.wake.notify_one();
        Ok(Some(nic_id))
    }

    /// Creates one NIC for a lease restricted to `within`: on the first of them that has room.
    async fn create_within(&self, within: &[ipnet::Ipv4Net]) -> Result<(), NicError> {
        let mut last = None;
        for net in within {
            let Some(index) = self.vxnets.iter().position(|(v, _)| v.subnet.contains(net)) else {
                continue;
            };
            let whole = self.vxnets[index].0.subnet == *net;
            let held = match self.hold(index, 1, (!whole).then_some(*net)).await {
                Ok(held) => held,
                Err(e) if !e.is_retryable() => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            return self.create_held(index, held).await;
        }
        Err(last.unwrap_or_else(|| {
            NicError::Config(format!(
                "none of {} lies in a configured vxnet",
                within
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }))
    }

    /// Where a namespace's pods may get NICs, from its `hostnic-ipam-config` entries: a vxnet
    /// id (`vxnet-…`) means anywhere in that vxnet, a block name (`4100-172-16-3-0-26`) that
    /// block. An entry naming no configured vxnet, or a block outside every one, is refused.
    pub fn placement(&self, entries: &[String]) -> Result<Vec<ipnet::Ipv4Net>, NicError> {
        let pools: Vec<&VxnetPool> = self.vxnets.iter().map(|(v, _)| v).collect();
        super::vxnet::placement(&pools, entries).map_err(NicError::InvalidRequest)
    }

    /// Creates `count` NICs on the vxnet the policy picks (the next ones if it fails),
    /// attaches them and waits for their links.
    async fn create(&self, count: u32) -> Result<(), NicError> {
        let mut last = None;
        for _ in 0..self.vxnets.len() {
            let index = {
                let mut rotation = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
                rotation.pick(random_u64())
            };
            let Some(index) = index else { break };
            match self.create_on(index, count).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::warn!(vxnet = self.vxnets[index].0.id, error = %e, "creating NICs failed; trying the next vxnet");
                    self.rotation
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failed(index);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| NicError::Config("no vxnet configured".into())))
    }

    async fn create_on(&self, index: usize, count: u32) -> Result<(), NicError> {
        let held = self.hold(index, count, None).await?;
        self.create_held(index, held).await
    }

    /// Commits `count` addresses of vxnet `index` in etcd, each under a new holder: the next
    /// free ones, or, with `block`, free ones inside that block (tried in order: a block is at
    /// most a few dozen addresses, and only a namespace mapped to a block asks for one).
    async fn hold(
        &self,
        index: usize,
        count: u32,
        block: Option<ipnet::Ipv4Net>,
    ) -> Result<Vec<(String, Ipv4Addr)>, NicError> {
        let (vxnet, sets) = &self.vxnets[index];
        let mut candidates = block.map(|b| {
            b.hosts()
                .filter(|ip| *ip >= vxnet.first && *ip <= vxnet.last && *ip != vxnet.gateway)
                .collect::<Vec<_>>()
                .into_iter()
        });
        let mut held: Vec<(String, Ipv4Addr)> = Vec::new();
        while held.len() < count as usize {
            let holder = format!("nic-{:016x}", random_u64());
            let requested = match candidates.as_mut() {
                None => Vec::new(),
                Some(c) => match c.next() {
                    Some(ip) => vec![IpAddr::V4(ip)],
                    None => {
                        self.release_holders(&held).await;
                        return Err(NicError::Exhausted(format!(
                            "block {} of vxnet {} has no free address",
                            block.map(|b| b.to_string()).unwrap_or_default(),
                            vxnet.id
                        )));
                    }
                },
            };
            let request = AllocateRequest {
                attachment: holder_attachment(&holder),
                pod: None,
                netns: String::new(),
                range_sets: sets.clone(),
                requested,
                requested_kind: Kind::Exact,
            };
            match self.allocator.allocate(&request).await {
                Err(crate::error::IpamError::AddressInUse { .. }) if candidates.is_some() => {
                    continue
                }
                Ok(a) => match a.ips.first().map(|x| x.ip) {
                    Some(IpAddr::V4(ip)) => held.push((holder, ip)),
                    _ => {
                        self.release_holders(&[(holder, Ipv4Addr::UNSPECIFIED)])
                            .await;
                        self.release_holders(&held).await;
                        return Err(NicError::Config(format!(
                            "vxnet {} gave no IPv4 address",
                            vxnet.id
                        )));
                    }
                },
                Err(e) => {
                    self.release_holders(&held).await;
                    return Err(e.into());
                }
            }
        }
        Ok(held)
    }

    /// Creates NICs on vxnet `index` with exactly the `held` addresses, records them, attaches
    /// them and waits for their links.
    async fn create_held(
        &self,
        index: usize,
        held: Vec<(String, Ipv4Addr)>,
    ) -> Result<(), NicError> {
        let (vxnet, _) = &self.vxnets[index];
        let count = held.len() as u32;
        // 2. The NICs, with exactly those addresses.
        let request = CreateNics {
            vxnet: vxnet.id.clone(),
            nic_name: Some(nic_name(&self.config.instance)),
            count,
            private_ips: held.iter().map(|(_, ip)| *ip).collect(),
            disable_ip: false,
        };
        let created = match self.client.create_nics(&request).await {
            Ok(created) => created,
            Err(e @ hostnic_iaas::Error::Api { .. }) => {
                self.release_holders(&held).await;
                return Err(NicError::api("CreateNics", e));
            }
            Err(e) => {
                // The NICs may exist: the next reconcile adopts or deletes them.
                return Err(NicError::api("CreateNics", e));
            }
        };
        // 3. Their records, before anything else happens to them.
        let now = now_unix();
        let mut records = Vec::new();
        for nic in &created {
            let ip: Option<Ipv4Addr> = nic.private_ip.parse().ok();
            let Some((holder, address)) = held.iter().find(|(_, a)| Some(*a) == ip) else {
                tracing::warn!(nic_id = nic.nic_id, ip = nic.private_ip, "CreateNics answered an address not asked for; the next reconcile deletes the NIC");
                continue;
            };
            let record = NicRecord {
                version: NIC_RECORD_VERSION,
                nic_id: nic.nic_id.to_ascii_lowercase(),
                vxnet: vxnet.id.clone(),
                address: *address,
                subnet: vxnet.subnet,
                gateway: vxnet.gateway,
                holder: holder.clone(),
                state: NicState::Attaching,
                host_link: String::new(),
                lease: None,
                created_at: now,
            };
            self.put(&record, 0).await?;
            records.push(record);
        }
        tracing::info!(vxnet = vxnet.id, count = records.len(), "NICs created");
        // 4. Attached, and their links seen.
        let ids: Vec<String> = records.iter().map(|r| r.nic_id.clone()).collect();
        self.attach(&ids, false).await?;
        Ok(())
    }

    /// Attaches `ids` (unless `attached`), waits for the job and the links, and marks their
    /// records ready. A NIC whose attach the API refuses outright is deleted.
    async fn attach(&self, ids: &[String], attached: bool) -> Result<(), NicError> {
        if ids.is_empty() {
            return Ok(());
        }
        if !attached {
            match self.client.attach_nics(&self.config.instance, ids).await {
                Ok(job) => {
                    self.client
                        .wait_job(&job, self.config.settings.attach_timeout)
                        .await
                        .map_err(|e| NicError::api("waiting for AttachNics", e))?;
                }
                Err(e) if e.code() == Some(code::PERMISSION_DENIED) => {
                    // Busy under a job of an earlier run, or attached meanwhile: wait for the
                    // API to say in-use.
                    self.wait_in_use(ids).await?;
                }
                Err(e) => return Err(NicError::api("AttachNics", e)),
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.link_timeout;
        let mut links: Vec<Option<String>> = vec![None; ids.len()];
        loop {
            for (id, link) in ids.iter().zip(links.iter_mut()) {
                if link.is_none() {
                    *link = link_of(self.sys(), id);
                }
            }
            if links.iter().all(Option::is_some) || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let records = self.records().await?;
        let mut missing = Vec::new();
        for (id, link) in ids.iter().zip(links) {
            let Some((record, revision)) = records.iter().find(|(r, _)| &r.nic_id == id) else {
                continue;
            };
            match link {
                Some(link) if link != self.config.primary_iface => {
                    let mut ready = record.clone();
                    ready.state = NicState::Ready;
                    ready.host_link = link;
                    self.put(&ready, *revision).await?;
                }
                _ => missing.push(id.clone()),
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(NicError::NoLink(missing.join(", ")))
        }
    }

    /// Polls the API until every NIC of `ids` is in-use (within the attach timeout).
    async fn wait_in_use(&self, ids: &[String]) -> Result<(), NicError> {
        let deadline = tokio::time::Instant::now() + self.config.settings.attach_timeout;
        loop {
            let nics = self
                .client
                .describe_nics(&NicFilter {
                    nics: ids.to_vec(),
                    ..NicFilter::default()
                })
                .await
                .map_err(|e| NicError::api("DescribeNics", e))?;
            if ids.iter().all(|id| {
                nics.iter().any(|n| {
                    &n.nic_id == id
                        && n.status == NicStatus::InUse
                        && n.instance_id == self.config.instance
                })
            }) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NicError::Api {
                    what: "waiting for NICs to be attached".into(),
                    reason: format!("{} not in-use in time", ids.join(", ")),
                    retryable: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Detaches (where attached) and deletes these NICs in batches, then forgets their records
    /// and releases their addresses. 2100 counts as done.
    async fn dispose(&self, nics: Vec<Stored>) -> Result<(), NicError> {
        if nics.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = nics.iter().map(|(r, _)| r.nic_id.clone()).collect();
        self.delete_nics(&ids).await?;
        let mut failures = Vec::new();
        for (record, revision) in &nics {
            if let Err(e) = self.forget(record, *revision).await {
                failures.push(format!("{}: {e}", record.nic_id));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NicError::Api {
                what: "forgetting deleted NICs".into(),
                reason: failures.join("; "),
                retryable: true,
            })
        }
    }

    /// Detaches those of `ids` attached here and deletes them all; NICs already gone are done.
    async fn delete_nics(&self, ids: &[String]) -> Result<(), NicError> {
        let api = self
            .client
            .describe_nics(&NicFilter {
                nics: ids.to_vec(),
                ..NicFilter::default()
            })
            .await
            .map_err(|e| NicError::api("DescribeNics", e))?;
        let attached: Vec<String> = api
            .iter()
            .filter(|n| n.status == NicStatus::InUse && n.instance_id == self.config.instance)
            .map(|n| n.nic_id.clone())
            .collect();
        if attached
            .iter()
            .any(|id| Some(id) == self.primary_mac().as_ref())
        {
            return Err(NicError::Config(
                "refusing to detach the primary NIC".into(),
            ));
        }
        if !attached.is_empty() {
            match self.client.detach_nics(&attached).await {
                Ok(job) => {
                    self.client
                        .wait_job(&job, self.config.settings.attach_timeout)
                        .await
                        .map_err(|e| NicError::api("waiting for DetachNics", e))?;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(NicError::api("DetachNics", e)),
            }
        }
        let present: Vec<String> = api.iter().map(|n| n.nic_id.clone()).collect();
        if !present.is_empty() {
            match self.client.delete_nics(&present).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(NicError::api("DeleteNics", e)),
            }
        }
        tracing::info!(nics = %ids.join(", "), "NICs detached and deleted");
        Ok(())
    }

    async fn release_holders(&self, held: &[(String, Ipv4Addr)]) {
        for (holder, _) in held {
            if let Err(e) = self.allocator.release(&holder_attachment(holder)).await {
                tracing::warn!(holder, error = %e, "releasing a NIC address failed; the next reconcile releases it");
            }
        }
    }

    fn primary_mac(&self) -> Option<String> {
        links_by_mac(self.sys())
            .into_iter()
            .find(|(name, _)| *name == self.config.primary_iface)
            .map(|(_, mac)| mac)
    }

    /// One reconcile pass (see [`super::reconcile`]); every repair is tried, every failure
    /// reported.
    pub async fn reconcile(&self) -> Result<Vec<Repair>, NicError> {
        let _ops = self.ops.lock().await;
        let stored = self.records().await?;
        let name = nic_name(&self.config.instance);
        let api: Vec<Nic> = self
            .client
            .describe_nics(&NicFilter {
                nic_name: Some(name.clone()),
                ..NicFilter::default()
            })
            .await
            .map_err(|e| NicError::api("DescribeNics", e))?
            .into_iter()
            .filter(|n| n.nic_name == name && n.role == 0)
            .collect();
        let holders: Vec<(String, IpAddr)> = self
            .allocator
            .node_attachments(Some(NIC_NETWORK))
            .await?
            .into_iter()
            .filter_map(|h| {
                let ip = h.record.ips.first()?.ip;
                Some((h.attachment.container_id, ip))
            })
            .collect();
        let host_macs: BTreeSet<String> = links_by_mac(self.sys())
            .into_iter()
            .map(|(_, mac)| mac)
            .collect();
        let primary = self.primary_mac();
        let records: Vec<NicRecord> = stored.iter().map(|(r, _)| r.clone()).collect();
        let repairs = plan(
            &Observed {
                instance: &self.config.instance,
                now: now_unix(),
                records: &records,
                api: &api,
                holders: &holders,
                host_macs: &host_macs,
                primary_mac: primary.as_deref(),
            },
            |netns| Path::new(netns).exists(),
        );
        let mut failures = Vec::new();
        let find = |id: &str| stored.iter().find(|(r, _)| r.nic_id == id).cloned();
        // NICs to attach (false) or only to wait for (true), in one batch each at the end.
        let mut to_attach: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        for repair in &repairs {
            tracing::info!(?repair, "NIC reconcile");
            let result = match repair {
                Repair::Skip { .. } => Ok(()),
                Repair::Adopt {
                    nic_id,
                    holder,
                    attached,
                } => match self.adopt(&api, nic_id, holder).await {
                    Ok(true) => {
                        to_attach[usize::from(*attached)].push(nic_id.clone());
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
                Repair::Attach { nic_id, attached } => {
                    to_attach[usize::from(*attached)].push(nic_id.clone());
                    Ok(())
                }
                Repair::Unlease { nic_id } => match find(nic_id) {
                    Some((mut r, rev)) => {
                        r.state = NicState::Ready;
                        r.lease = None;
                        r.host_link = link_of(self.sys(), nic_id).unwrap_or_default();
                        self.put(&r, rev).await
                    }
                    None => Ok(()),
                },
                Repair::Dispose { nic_id, .. } => match find(nic_id) {
                    Some(stored) => self.dispose(vec![stored]).await,
                    None => self.delete_nics(std::slice::from_ref(nic_id)).await,
                },
                Repair::Forget { nic_id } => match find(nic_id) {
                    Some((r, rev)) => self.forget(&r, rev).await,
                    None => Ok(()),
                },
                Repair::ReleaseHolder { holder } => self
                    .allocator
                    .release(&holder_attachment(holder))
                    .await
                    .map(drop)
                    .map_err(NicError::from),
            };
            if let Err(e) = result {
                failures.push(format!("{repair:?}: {e}"));
            }
        }
        for (attached, ids) in [(false, &to_attach[0]), (true, &to_attach[1])] {
            if let Err(e) = self.attach(ids, attached).await {
                failures.push(format!("attaching {}: {e}", ids.join(", ")));
            }
        }
        if failures.is_empty() {
            Ok(repairs)
        } else {
            Err(NicError::Api {
                what: "reconciling this node's NICs".into(),
                reason: failures.join("; "),
                retryable: true,
            })
        }
    }

    /// Records an unrecorded NIC whose address `holder` holds (state attaching); true when it
    /// is recorded and is to be attached, false when it was not ours to keep.
    async fn adopt(&self, api: &[Nic], nic_id: &str, holder: &str) -> Result<bool, NicError> {
        let Some(nic) = api.iter().find(|n| n.nic_id == nic_id) else {
            return Ok(false);
        };
        let Some((vxnet, _)) = self.vxnets.iter().find(|(v, _)| v.id == nic.vxnet_id) else {
            // Not one of the configured vxnets: no record can describe it; delete the NIC and
            // let the holder go.
            self.delete_nics(&[nic_id.to_string()]).await?;
            self.allocator.release(&holder_attachment(holder)).await?;
            return Ok(false);
        };
        let address: Ipv4Addr = nic.private_ip.parse().map_err(|_| NicError::Api {
            what: "adopting a NIC".into(),
            reason: format!("NIC {nic_id} has address {:?}", nic.private_ip),
            retryable: false,
        })?;
        let record = NicRecord {
            version: NIC_RECORD_VERSION,
            nic_id: nic_id.to_string(),
            vxnet: vxnet.id.clone(),
            address,
            subnet: vxnet.subnet,
            gateway: vxnet.gateway,
            holder: holder.to_string(),
            state: NicState::Attaching,
            host_link: String::new(),
            lease: None,
            created_at: now_unix(),
        };
        self.put(&record, 0).await?;
        Ok(true)
    }

    /// Brings the warm pool within its marks once: creates NICs (in one batch) up to the high
    /// mark when fewer than the low mark are ready, releases those above the high mark.
    pub async fn maintain_once(&self) -> Result<(), NicError> {
        let _ops = self.ops.lock().await;
        let records = self.records().await?;
        let s = &self.config.settings;
        let total = records.len() as u32;
        let ready: Vec<Stored> = records
            .into_iter()
            .filter(|(r, _)| r.state == NicState::Ready)
            .collect();
        let warm = ready.len() as u32;
        if warm < s.low && total < s.max_nic {
            let count = (s.high - warm).min(s.max_nic - total);
            if count > 0 {
                tracing::info!(warm, count, "refilling the warm NIC pool");
                self.create(count).await?;
            }
        } else if warm > s.high {
            let excess: Vec<Stored> = ready.into_iter().take((warm - s.high) as usize).collect();
            tracing::info!(warm, releasing = excess.len(), "trimming the warm NIC pool");
            self.dispose(excess).await?;
        }
        Ok(())
    }

    /// Keeps the warm pool within its marks until `stop` completes: after every lease and
    /// return, and every [`MAINTAIN_INTERVAL`].
    pub async fn maintain(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut last_reconcile = tokio::time::Instant::now();
        loop {
            let failed = self.needs_repair.swap(false, Ordering::Relaxed);
            // After a failure (a job that failed or timed out, a link that did not appear), and
            // every RECONCILE_INTERVAL: repair, and take back NICs whose pod namespace is gone.
            if failed || last_reconcile.elapsed() >= RECONCILE_INTERVAL {
                if let Err(e) = self.reconcile().await {
                    tracing::warn!(error = %e, "reconciling this node's NICs failed");
                    self.needs_repair.store(true, Ordering::Relaxed);
                }
                last_reconcile = tokio::time::Instant::now();
            }
            if let Err(e) = self.maintain_once().await {
                tracing::warn!(error = %e, "keeping the warm NIC pool within its marks failed");
                self.needs_repair.store(true, Ordering::Relaxed);
            }
            tokio::select! {
                () = &mut stop => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(MAINTAIN_INTERVAL) => {}
            }
        }
    }
}

/// A random number from the standard library's per-process hasher seeds.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
