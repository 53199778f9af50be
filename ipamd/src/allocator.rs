//! The allocator: cluster-unique addresses committed to etcd with compare-and-swap.
//!
//! One ADD is one etcd transaction: it creates the address record of every range set and the
//! handle index together, guarded by "none of these keys exists". If the handle already exists
//! the transaction returns it instead, which makes ADD idempotent and makes retrying a
//! transaction of unknown outcome safe. Free-address state lives in memory (`blocks`), loaded
//! at start and kept current by a watch, so choosing an address never scans etcd.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions,
};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::addr::to_int;
use crate::blocks::{Next, PoolState};
use crate::error::{IpamError, Result};
use crate::pool::{Pool, RangeSet};
use crate::records::{
    now_unix, AllocationRecord, BlockRecord, Handle, HandleIp, HandleRecord, KeyRef, Keys, Kind,
    PodRef, PoolIndex, PoolRecord, RECORD_VERSION,
};
use crate::store::{Store, StoreConfig};

/// Upper bound on CAS rounds of one request; each lost round marks an address held, so this
/// is only reached under pathological churn.
const MAX_ROUNDS: usize = 256;

/// What an ADD asks for.
#[derive(Debug, Clone)]
pub struct AllocateRequest {
    pub handle: Handle,
    /// The CNI network name, recorded for GC and operators.
    pub network: String,
    pub pod: Option<PodRef>,
    /// One address is allocated from each range set.
    pub range_sets: Vec<RangeSet>,
    /// Exact addresses, at most one per range set; range sets without one get a dynamic address.
    pub requested: Vec<IpAddr>,
    /// The kind recorded for requested addresses (`Exact`, `Fixed` or `Sticky`).
    pub requested_kind: Kind,
}

/// One address of an allocation, with what a CNI result needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedIp {
    pub ip: IpAddr,
    pub subnet: IpNet,
    pub gateway: IpAddr,
}

impl AllocatedIp {
    /// The address with its subnet's prefix length, as CNI results carry it.
    pub fn address(&self) -> IpNet {
        IpNet::new(self.ip, self.subnet.prefix_len()).expect("address is inside its subnet")
    }
}

/// The addresses a handle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub handle: Handle,
    pub network: String,
    pub ips: Vec<AllocatedIp>,
}

/// A handle's commit revision: the revision of every key its ADD wrote, so that a DEL on this
/// node deletes them in one guarded transaction without reading them first.
#[derive(Debug, Clone)]
struct Committed {
    revision: i64,
    keys: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    keys: Keys,
    node: String,
    pools: Mutex<HashMap<String, PoolState>>,
    committed: Mutex<HashMap<Handle, Committed>>,
    synced: watch::Sender<bool>,
    /// Why the last load from etcd failed, for the error of requests that wait on it.
    load_error: Mutex<Option<String>>,
    retry_timeout: Duration,
}

/// A node's allocator. Dropping it stops its watch.
#[derive(Debug)]
pub struct Allocator {
    inner: Arc<Inner>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Allocator {
    /// Connects to etcd and starts loading and watching the pools in the background.
    /// Requests wait (up to the retry timeout) for the first load.
    pub async fn start(config: &StoreConfig, node: &str) -> Result<Allocator> {
        let store = Store::connect(config).await?;
        let (synced, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            store,
            keys: Keys::new(&config.prefix),
            node: node.to_string(),
            pools: Mutex::new(HashMap::new()),
            committed: Mutex::new(HashMap::new()),
            synced,
            load_error: Mutex::new(None),
            retry_timeout: config.retry_timeout,
        });
        let watcher = tokio::spawn(Arc::clone(&inner).follow());
        Ok(Allocator { inner, watcher })
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Waits until the pools have been loaded from etcd.
    pub async fn ready(&self) -> Result<()> {
        self.inner.wait_synced().await
    }

    /// Allocates one address per range set for `req.handle`, or returns what the handle
    /// already holds.
    pub async fn allocate(&self, req: &AllocateRequest) -> Result<Allocation> {
        let inner = &self.inner;
        check_handle(&req.handle)?;
        inner.wait_synced().await?;
        for pool in req.range_sets.iter().flat_map(|s| s.pools.iter()) {
            inner.register_pool(pool).await?;
        }
        let plan = plan(req)?;
        let mut last = String::new();
        for _ in 0..MAX_ROUNDS {
            let mut picks = Picks::new(inner);
            for (set, exact) in req.range_sets.iter().zip(&plan) {
                match exact {
                    Some((pool, ip)) => picks.exact(pool, *ip, req.requested_kind),
                    None => match inner.pick_dynamic(set, &mut picks, &req.network).await {
                        Ok(()) => {}
                        // A full pool does not stop a repeated ADD from getting its address.
                        Err(e @ IpamError::Exhausted { .. }) => {
                            return match self.lookup(&req.handle).await? {
                                Some(existing) => already_held(req, existing),
                                None => Err(e),
                            };
                        }
                        Err(e) => return Err(e),
                    },
                }
            }
            match inner.commit(req, &mut picks).await? {
                Outcome::Done(allocation) => return Ok(allocation),
                Outcome::Lost(why) => last = why,
            }
        }
        Err(IpamError::Contention {
            op: format!("allocate for {}", req.handle),
            attempts: MAX_ROUNDS,
            last,
        })
    }

    /// Releases every address of `handle`. Returns what was released; None if the handle held
    /// nothing (DEL is idempotent).
    pub async fn release(&self, handle: &Handle) -> Result<Option<HandleRecord>> {
        check_handle(handle)?;
        self.inner.release(handle).await
    }

    /// Releases this node's handles of `network` that are not in `valid` (CNI GC). Keeps going
    /// past failures and reports them all.
    ///
    /// Attachments younger than `grace` are kept: the runtime built `valid` before calling, so
    /// an ADD that committed meanwhile is missing from it but alive.
    pub async fn gc(
        &self,
        network: &str,
        valid: &HashSet<Handle>,
        grace: Duration,
    ) -> Result<Vec<Handle>> {
        let now = now_unix();
        let (_, kvs) = self
            .inner
            .store
            .load_prefix(&self.inner.keys.handles())
            .await?;
        let mut released = Vec::new();
        let mut failures = Vec::new();
        for kv in &kvs {
            let Ok(key) = kv.key_str() else { continue };
            let Some(KeyRef::Handle(handle)) = self.inner.keys.parse(key) else {
                continue;
            };
            let record: HandleRecord = match decode(kv) {
                Ok(r) => r,
                Err(e) => {
                    // Possibly another node's; `audit` reports it. Not a reason to stop.
                    tracing::warn!(error = %e, "gc skips an unreadable handle record");
                    continue;
                }
            };
            let young = now.saturating_sub(record.allocated_at) < grace.as_secs();
            if record.node != self.inner.node
                || record.network != network
                || valid.contains(&handle)
                || young
            {
                continue;
            }
            match self.inner.release(&handle).await {
                Ok(_) => {
                    tracing::info!(%handle, network, "garbage-collected attachment");
                    released.push(handle);
                }
                Err(e) => failures.push(format!("{handle}: {e}")),
            }
        }
        if failures.is_empty() {
            Ok(released)
        } else {
            Err(IpamError::Contention {
                op: format!("gc of network {network:?}"),
                attempts: 1,
                last: failures.join("; "),
            })
        }
    }

    /// Succeeds when an ADD for these range sets could succeed now: etcd answers, the pools
    /// are loaded, and no range set is exhausted (CNI STATUS).
    pub async fn status(&self, range_sets: &[RangeSet], network: &str) -> Result<()> {
        self.inner.wait_synced().await?;
        let probe = GetOptions::new().with_count_only();
        self.inner
            .store
            .get("status probe", &self.inner.keys.pools(), Some(probe))
            .await?;
        let mut pools = self.inner.lock_pools();
        for set in range_sets {
            let has_free = set.pools.iter().any(|p| match pools.get_mut(&p.id()) {
                Some(state) => state.has_free(),
                None => true,
            });
            if !has_free {
                let subnets: Vec<String> = set.pools.iter().map(|p| p.subnet.to_string()).collect();
                return Err(IpamError::Exhausted {
                    pools: subnets.join(", "),
                    network: network.to_string(),
                });
            }
        }
        Ok(())
    }

    /// What `handle` holds, read from etcd.
    pub async fn lookup(&self, handle: &Handle) -> Result<Option<Allocation>> {
        check_handle(handle)?;
        self.inner.wait_synced().await?;
        let key = self.inner.keys.handle(handle);
        let resp = self.inner.store.get("lookup handle", &key, None).await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                let record: HandleRecord = decode(kv)?;
                Ok(Some(self.inner.allocation_of(handle, &record)?))
            }
        }
    }
}

/// The answer to an ADD whose attachment already holds `allocation`: the same addresses, but
/// never a different address than one the request asks for exactly.
fn already_held(req: &AllocateRequest, allocation: Allocation) -> Result<Allocation> {
    let held = |ip: &IpAddr| allocation.ips.iter().any(|x| x.ip == *ip);
    match req.requested.iter().find(|ip| !held(ip)) {
        None => Ok(allocation),
        Some(ip) => {
            let held: Vec<String> = allocation.ips.iter().map(|x| x.ip.to_string()).collect();
            Err(IpamError::InvalidRequest {
                ip: *ip,
                network: req.network.clone(),
                reason: format!(
                    "attachment {} already holds {}; DEL it before asking for another address",
                    req.handle,
                    held.join(", ")
                ),
            })
        }
    }
}

fn check_handle(handle: &Handle) -> Result<()> {
    let bad = |s: &str| s.is_empty() || s.contains('/') || s.chars().any(char::is_control);
    if bad(&handle.container_id) || bad(&handle.ifname) {
        return Err(IpamError::InvalidHandle {
            handle: handle.clone(),
            reason: "container id and ifname must be non-empty and contain no '/'".into(),
        });
    }
    Ok(())
}

/// Matches each requested address to its range set: `Some((pool, ip))` for exact, None for
/// dynamic.
fn plan(req: &AllocateRequest) -> Result<Vec<Option<(Pool, IpAddr)>>> {
    let mut plan: Vec<Option<(Pool, IpAddr)>> = vec![None; req.range_sets.len()];
    for &ip in &req.requested {
        let invalid = |reason: String| IpamError::InvalidRequest {
            ip,
            network: req.network.clone(),
            reason,
        };
        let (i, pool) = req
            .range_sets
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.pool_for(ip).map(|p| (i, p)))
            .ok_or_else(|| invalid("outside every subnet of the network".into()))?;
        pool.check_exact(ip).map_err(invalid)?;
        if let Some((_, other)) = &plan[i] {
            return Err(invalid(format!(
                "{other} is also requested from the same range set"
            )));
        }
        plan[i] = Some((pool.clone(), ip));
    }
    Ok(plan)
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(kv.value()).map_err(|e| IpamError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialise")
}

/// The key-value of the `i`-th operation of a transaction, if it was a get that found one.
fn got(resp: &TxnResponse, i: usize) -> Option<KeyValue> {
    match resp.op_responses().into_iter().nth(i) {
        Some(TxnOpResponse::Get(get)) => first_kv(get),
        _ => None,
    }
}

fn first_kv(mut get: GetResponse) -> Option<KeyValue> {
    get.take_kvs().into_iter().next()
}

/// One address chosen for the transaction being built.
#[derive(Debug)]
struct Pick {
    pool: Arc<Pool>,
    ip: IpAddr,
    kind: Kind,
    /// Whether this pick marked the address in memory (and so must unmark it if it fails).
    marked: bool,
}

/// The addresses chosen for one CAS round. Whatever is still here when it is dropped is
/// unmarked, so an error, a lost race or a cancelled request never leaves an address marked
/// that nobody holds.
struct Picks<'a> {
    inner: &'a Inner,
    picks: Vec<Pick>,
}

impl<'a> Picks<'a> {
    fn new(inner: &'a Inner) -> Self {
        Picks {
            inner,
            picks: Vec::new(),
        }
    }

    fn exact(&mut self, pool: &Pool, ip: IpAddr, kind: Kind) {
        let mut pools = self.inner.lock_pools();
        let state = pools
            .entry(pool.id())
            .or_insert_with(|| PoolState::new(Arc::new(pool.clone()), &self.inner.node));
        let marked = state.mark(to_int(ip));
        self.picks.push(Pick {
            pool: Arc::clone(state.pool()),
            ip,
            kind,
            marked,
        });
    }

    /// Forgets the picks: they are now held in etcd (or already marked by someone else).
    fn keep_all(&mut self) {
        self.picks.clear();
    }

    /// Keeps the mark of pick `i` (its address is held by someone).
    fn keep(&mut self, i: usize) {
        self.picks[i].marked = false;
    }
}

impl Drop for Picks<'_> {
    fn drop(&mut self) {
        let mut pools = self.inner.lock_pools();
        for pick in self.picks.iter().filter(|p| p.marked) {
            if let Some(state) = pools.get_mut(&pick.pool.id()) {
                state.unmark(to_int(pick.ip));
            }
        }
    }
}

enum Outcome {
    Done(Allocation),
    /// The round lost a race; try again with the state it taught us.
    Lost(String),
}

impl Inner {
    fn lock_pools(&self) -> MutexGuard<'_, HashMap<String, PoolState>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_committed(&self) -> MutexGuard<'_, HashMap<Handle, Committed>> {
        self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn wait_synced(&self) -> Result<()> {
        let mut rx = self.synced.subscribe();
        let synced = tokio::time::timeout(self.retry_timeout, rx.wait_for(|synced| *synced))
            .await
            .is_ok_and(|r| r.is_ok());
        if synced {
            return Ok(());
        }
        let cause = self
            .load_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "no answer yet".into());
        Err(IpamError::NotSynced(format!(
            "pools not loaded from etcd within {:?}: {cause}",
            self.retry_timeout
        )))
    }

    /// Makes sure etcd holds this pool's definition: creates it, or checks that the stored one
    /// is the same and that it overlaps no other pool.
    async fn register_pool(&self, pool: &Pool) -> Result<()> {
        let id = pool.id();
        if let Some(state) = self.lock_pools().get(&id) {
            return same_definition(state.pool(), pool);
        }
        // Every subnet is listed in one index key, and a new pool is written together with the
        // index it was checked against: two nodes cannot both add overlapping pools.
        let index_key = self.keys.pool_index();
        let pool_key = self.keys.pool(&id);
        let op = format!("register pool {}", pool.subnet);
        for _ in 0..8 {
            let read = Txn::new().and_then([
                TxnOp::get(index_key.as_str(), None),
                TxnOp::get(pool_key.as_str(), None),
            ]);
            let resp = self.store.txn(&op, read).await?;
            if let Some(kv) = got(&resp, 1) {
                let stored = decode::<PoolRecord>(&kv)?.to_pool();
                same_definition(&stored, pool)?;
                self.remember_pool(stored);
                return Ok(());
            }
            let (mut index, index_guard) = match got(&resp, 0) {
                Some(kv) => (
                    decode::<PoolIndex>(&kv)?,
                    Compare::mod_revision(index_key.as_str(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    PoolIndex::default(),
                    Compare::create_revision(index_key.as_str(), CompareOp::Equal, 0),
                ),
            };
            let overlapping = index.subnets.iter().find(|s| {
                **s != pool.subnet && (s.contains(&pool.subnet) || pool.subnet.contains(*s))
            });
            if let Some(existing) = overlapping {
                return Err(IpamError::PoolOverlap {
                    subnet: pool.subnet.to_string(),
                    existing: existing.to_string(),
                });
            }
            if !index.subnets.contains(&pool.subnet) {
                index.subnets.push(pool.subnet);
            }
            index.version = RECORD_VERSION;
            let write = Txn::new()
                .when([
                    index_guard,
                    Compare::create_revision(pool_key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(index_key.as_str(), encode(&index), None),
                    TxnOp::put(
                        pool_key.as_str(),
                        encode(&PoolRecord::from_pool(pool)),
                        None,
                    ),
                ]);
            if self.store.txn(&op, write).await?.succeeded() {
                self.remember_pool(pool.clone());
                return Ok(());
            }
        }
        Err(IpamError::Contention {
            op,
            attempts: 8,
            last: "the pool index kept changing".into(),
        })
    }

    /// Makes sure the in-memory state has `pool` (the watch may not have delivered it yet, or a
    /// reload may have replaced the state with a snapshot taken before it existed).
    fn remember_pool(&self, pool: Pool) -> Arc<Pool> {
        let mut pools = self.lock_pools();
        let state = pools
            .entry(pool.id())
            .or_insert_with(|| PoolState::new(Arc::new(pool), &self.node));
        Arc::clone(state.pool())
    }

    /// Picks the next dynamic address of a range set, claiming blocks as needed.
    async fn pick_dynamic(
        &self,
        set: &RangeSet,
        picks: &mut Picks<'_>,
        network: &str,
    ) -> Result<()> {
        for pool in &set.pools {
            let id = pool.id();
            loop {
                let (next, state_pool) = {
                    let mut pools = self.lock_pools();
                    let state = pools
                        .entry(id.clone())
                        .or_insert_with(|| PoolState::new(Arc::new(pool.clone()), &self.node));
                    (state.next_address(), Arc::clone(state.pool()))
                };
                match next {
                    Next::Address(n) | Next::Borrow(n) => {
                        picks.picks.push(Pick {
                            ip: state_pool.addr(n),
                            pool: state_pool,
                            kind: Kind::Dynamic,
                            marked: true,
                        });
                        return Ok(());
                    }
                    Next::Claim(block) => self.claim_block(&state_pool, block).await?,
                    Next::Exhausted => break,
                }
            }
        }
        let subnets: Vec<String> = set.pools.iter().map(|p| p.subnet.to_string()).collect();
        Err(IpamError::Exhausted {
            pools: subnets.join(", "),
            network: network.to_string(),
        })
    }

    /// Claims block `index` of `pool` for this node with one CAS. Losing the race is not an
    /// error: the block is then recorded as the winner's.
    async fn claim_block(&self, pool: &Arc<Pool>, index: u128) -> Result<()> {
        let cidr = pool.block_cidr(index);
        let key = self.keys.block(&pool.id(), &cidr);
        let record = BlockRecord {
            version: RECORD_VERSION,
            node: self.node.clone(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(&record), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.store.txn(&format!("claim block {cidr}"), txn).await?;
        let owner = match got(&resp, 0) {
            Some(kv) if !resp.succeeded() => decode::<BlockRecord>(&kv)?.node,
            _ => self.node.clone(),
        };
        tracing::debug!(block = %cidr, %owner, "block claimed");
        let mut pools = self.lock_pools();
        if let Some(state) = pools.get_mut(&pool.id()) {
            state.set_owner(index, Some(&owner));
        }
        Ok(())
    }

    /// One CAS round: writes every picked address and the handle, or learns why not.
    async fn commit(&self, req: &AllocateRequest, picks: &mut Picks<'_>) -> Result<Outcome> {
        let handle_key = self.keys.handle(&req.handle);
        let now = now_unix();
        let mut compares = vec![Compare::create_revision(
            handle_key.as_str(),
            CompareOp::Equal,
            0,
        )];
        let mut puts = Vec::new();
        let mut gets = vec![TxnOp::get(handle_key.as_str(), None)];
        let mut handle_ips = Vec::new();
        let mut keys = vec![handle_key.clone()];
        for pick in &picks.picks {
            let key = self.keys.address(&pick.pool.id(), pick.ip);
            let record = AllocationRecord {
                version: RECORD_VERSION,
                handle: req.handle.clone(),
                pod: req.pod.clone(),
                node: self.node.clone(),
                network: req.network.clone(),
                kind: pick.kind,
                allocated_at: now,
            };
            compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(key.as_str(), encode(&record), None));
            gets.push(TxnOp::get(key.as_str(), None));
            handle_ips.push(HandleIp {
                pool: pick.pool.id(),
                ip: pick.ip,
            });
            keys.push(key);
        }
        let handle_record = HandleRecord {
            version: RECORD_VERSION,
            network: req.network.clone(),
            node: self.node.clone(),
            pod: req.pod.clone(),
            ips: handle_ips,
            allocated_at: now,
        };
        puts.push(TxnOp::put(
            handle_key.as_str(),
            encode(&handle_record),
            None,
        ));
        let txn = Txn::new().when(compares).and_then(puts).or_else(gets);
        let resp = self
            .store
            .txn(&format!("allocate for {}", req.handle), txn)
            .await?;

        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            picks.keep_all();
            self.lock_committed()
                .insert(req.handle.clone(), Committed { revision, keys });
            return Ok(Outcome::Done(
                self.allocation_of(&req.handle, &handle_record)?,
            ));
        }

        // The handle exists: this ADD already happened (a retry, or the runtime calling twice).
        if let Some(kv) = got(&resp, 0) {
            let existing: HandleRecord = decode(&kv)?;
            for pick in picks.picks.iter_mut() {
                if existing
                    .ips
                    .iter()
                    .any(|h| h.ip == pick.ip && h.pool == pick.pool.id())
                {
                    pick.marked = false;
                }
            }
            let allocation = self.allocation_of(&req.handle, &existing)?;
            return already_held(req, allocation).map(Outcome::Done);
        }

        let mut lost = Vec::new();
        for i in 0..picks.picks.len() {
            let Some(kv) = got(&resp, i + 1) else {
                continue;
            };
            let holder: AllocationRecord = decode(&kv)?;
            picks.keep(i);
            let pick = &picks.picks[i];
            if pick.kind != Kind::Dynamic {
                let who = match &holder.pod {
                    Some(pod) => format!("pod {}/{} ({})", pod.namespace, pod.name, holder.handle),
                    None => format!("container {}", holder.handle),
                };
                return Err(IpamError::AddressInUse {
                    ip: pick.ip,
                    holder: format!("{who} on node {}", holder.node),
                });
            }
            lost.push(pick.ip.to_string());
        }
        Ok(Outcome::Lost(format!(
            "addresses taken meanwhile: {}",
            lost.join(", ")
        )))
    }

    fn allocation_of(&self, handle: &Handle, record: &HandleRecord) -> Result<Allocation> {
        let pools = self.lock_pools();
        let ips = record
            .ips
            .iter()
            .map(|h| {
                let pool =
                    pools
                        .get(&h.pool)
                        .map(|s| s.pool())
                        .ok_or_else(|| IpamError::Corrupt {
                            key: self.keys.handle(handle),
                            reason: format!("refers to unknown pool {}", h.pool),
                        })?;
                Ok(AllocatedIp {
                    ip: h.ip,
                    subnet: pool.subnet,
                    gateway: pool.gateway,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Allocation {
            handle: handle.clone(),
            network: record.network.clone(),
            ips,
        })
    }

    async fn release(&self, handle: &Handle) -> Result<Option<HandleRecord>> {
        let handle_key = self.keys.handle(handle);
        let cached = self.lock_committed().get(handle).cloned();
        if let Some(committed) = cached {
            let compares: Vec<Compare> = committed
                .keys
                .iter()
                .map(|k| Compare::mod_revision(k.as_str(), CompareOp::Equal, committed.revision))
                .collect();
            let mut deletes = vec![TxnOp::get(handle_key.as_str(), None)];
            deletes.extend(
                committed
                    .keys
                    .iter()
                    .map(|k| TxnOp::delete(k.as_str(), None)),
            );
            let txn = Txn::new().when(compares).and_then(deletes);
            let resp = self.store.txn(&format!("release {handle}"), txn).await?;
            self.lock_committed().remove(handle);
            if resp.succeeded() {
                if let Some(kv) = got(&resp, 0) {
                    let record: HandleRecord = decode(&kv)?;
                    self.forget(&record);
                    return Ok(Some(record));
                }
            }
        }

        let mut last = String::new();
        for _ in 0..8 {
            let resp = self
                .store
                .get(&format!("read handle {handle}"), &handle_key, None)
                .await?;
            let Some(handle_kv) = first_kv(resp) else {
                return Ok(None);
            };
            let record: HandleRecord = match decode(&handle_kv) {
                Ok(record) => record,
                Err(e) => {
                    // A DEL that fails forever leaves the pod stuck terminating: drop the
                    // unreadable index (its addresses, if any, show up in `audit`).
                    tracing::warn!(%handle, error = %e, "deleting an unreadable handle record");
                    let guard = Compare::mod_revision(
                        handle_key.as_str(),
                        CompareOp::Equal,
                        handle_kv.mod_revision(),
                    );
                    let txn = Txn::new()
                        .when([guard])
                        .and_then([TxnOp::delete(handle_key.as_str(), None)]);
                    self.store.txn(&format!("release {handle}"), txn).await?;
                    return Ok(None);
                }
            };
            let ip_keys: Vec<String> = record
                .ips
                .iter()
                .map(|h| self.keys.address(&h.pool, h.ip))
                .collect();
            let reads = Txn::new().and_then(
                ip_keys
                    .iter()
                    .map(|k| TxnOp::get(k.as_str(), None))
                    .collect::<Vec<_>>(),
            );
            let held = self
                .store
                .txn(&format!("read addresses of {handle}"), reads)
                .await?;
            let mut compares = vec![Compare::mod_revision(
                handle_key.as_str(),
                CompareOp::Equal,
                handle_kv.mod_revision(),
            )];
            let mut deletes = vec![TxnOp::delete(handle_key.as_str(), None)];
            for (i, key) in ip_keys.iter().enumerate() {
                let Some(kv) = got(&held, i) else { continue };
                let Ok(holder) = decode::<AllocationRecord>(&kv) else {
                    tracing::warn!(%handle, key, "leaving an unreadable address record");
                    continue;
                };
                if holder.handle != *handle {
                    tracing::warn!(%handle, key, holder = %holder.handle, "address index points at an address another handle holds; leaving the address");
                    continue;
                }
                compares.push(Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                deletes.push(TxnOp::delete(key.as_str(), None));
            }
            let txn = Txn::new().when(compares).and_then(deletes);
            if self
                .store
                .txn(&format!("release {handle}"), txn)
                .await?
                .succeeded()
            {
                self.forget(&record);
                return Ok(Some(record));
            }
            last = "handle or address changed while releasing".into();
        }
        Err(IpamError::Contention {
            op: format!("release {handle}"),
            attempts: 8,
            last,
        })
    }

    /// Marks the addresses of a released handle free without waiting for the watch.
    fn forget(&self, record: &HandleRecord) {
        let mut pools = self.lock_pools();
        for h in &record.ips {
            if let Some(state) = pools.get_mut(&h.pool) {
                state.unmark(to_int(h.ip));
            }
        }
    }

    /// Loads every pool, then follows the watch; reloads after any watch failure.
    async fn follow(self: Arc<Self>) {
        let mut delay = Duration::from_millis(50);
        loop {
            let revision = match self.load().await {
                Ok(revision) => revision,
                Err(e) => {
                    tracing::warn!(error = %e, "loading pools from etcd failed; retrying");
                    *self.load_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(e.to_string());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            self.synced.send_replace(true);
            delay = Duration::from_millis(50);
            if let Err(e) = self.watch_from(revision + 1).await {
                tracing::warn!(error = %e, "watch on pools ended; reloading");
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Rebuilds the in-memory state from etcd. Returns the revision it reflects.
    async fn load(&self) -> Result<i64> {
        let (revision, kvs) = self.store.load_prefix(&self.keys.pools()).await?;
        let mut states: HashMap<String, PoolState> = HashMap::new();
        for kv in &kvs {
            self.apply(&mut states, kv, EventType::Put);
        }
        let loaded = states.len();
        *self.lock_pools() = states;
        tracing::info!(
            pools = loaded,
            keys = kvs.len(),
            revision,
            "pools loaded from etcd"
        );
        Ok(revision)
    }

    async fn watch_from(&self, revision: i64) -> Result<()> {
        let prefix = self.keys.pools();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision)
            .with_progress_notify();
        let mut stream = self
            .store
            .retry("watch pools", |mut c| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { c.watch(prefix, Some(options)).await }
            })
            .await?;
        loop {
            let msg = stream.message().await.map_err(|e| IpamError::Unavailable {
                op: "watch pools".into(),
                source: e,
            })?;
            let Some(resp) = msg else {
                return Err(IpamError::NotSynced("watch stream closed".into()));
            };
            if resp.canceled() {
                return Err(IpamError::NotSynced(format!(
                    "watch canceled (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            let mut pools = self.lock_pools();
            for event in resp.events() {
                if let Some(kv) = event.kv() {
                    self.apply(&mut pools, kv, event.event_type());
                }
            }
        }
    }

    /// Applies one key's put or delete to the in-memory state.
    fn apply(&self, states: &mut HashMap<String, PoolState>, kv: &KeyValue, event: EventType) {
        let Ok(key) = kv.key_str() else { return };
        let put = event == EventType::Put;
        match self.keys.parse(key) {
            Some(KeyRef::Pool { pool }) if put => match decode::<PoolRecord>(kv) {
                Ok(record) => {
                    let def = record.to_pool();
                    if states.get(&pool).is_none_or(|s| **s.pool() != def) {
                        states.insert(pool, PoolState::new(Arc::new(def), &self.node));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring pool record"),
            },
            Some(KeyRef::Pool { pool }) => {
                states.remove(&pool);
            }
            Some(KeyRef::Address { pool, ip }) => {
                if let Some(state) = states.get_mut(&pool) {
                    if state.pool().subnet.contains(&ip) {
                        if put {
                            state.mark(to_int(ip));
                        } else {
                            state.unmark(to_int(ip));
                        }
                    }
                }
            }
            Some(KeyRef::Block { pool, block }) => {
                if let Some(state) = states.get_mut(&pool) {
                    let Some(index) = state.pool().block_index(&block) else {
                        return;
                    };
                    let owner = if put {
                        decode::<BlockRecord>(kv).ok().map(|r| r.node)
                    } else {
                        None
                    };
                    state.set_owner(index, owner.as_deref());
                }
            }
            _ => {}
        }
    }
}

fn same_definition(stored: &Pool, requested: &Pool) -> Result<()> {
    // Every ADD comes here: only a real difference is worth describing.
    if stored == requested {
        return Ok(());
    }
    let differences = stored.differences(requested);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(IpamError::PoolConflict {
            subnet: stored.subnet.to_string(),
            differences,
        })
    }
}
