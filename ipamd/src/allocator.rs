//! The allocator: cluster-unique addresses committed to etcd with compare-and-swap.
//!
//! One ADD is one etcd transaction: it creates the address record of every range set and the
//! attachment record together, guarded by "none of these keys exists". If the attachment
//! already exists the transaction returns it instead, which makes ADD idempotent and makes
//! retrying a transaction of unknown outcome safe. Free-address state lives in memory
//! (`blocks`), loaded at start and kept current by a watch, so choosing an address never scans
//! etcd.
//!
//! A DEL leaves a release marker for its attachment (under a lease, so it expires), and an
//! ADD's transaction requires that no marker is newer than the revision at which the ADD
//! arrived: an ADD that the runtime gave up on, and whose transaction etcd commits late, cannot
//! commit after the DEL that followed it, while a fresh ADD after the DEL (a restarted
//! container keeps its id) still works.
//!
//! Records read from etcd are input like any other: one that does not validate is skipped and
//! logged once with its key, and affects nothing but its own key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::addr::to_int;
use crate::blocks::Next;
use crate::cache::{block_owner, decode_pool, PoolCache, UNREADABLE_OWNER};
use crate::error::{IpamError, Result};
use crate::planner::{already_held, plan, read_refusal, Read, Refusal, Verdict};

mod follow;
mod namespaces;
mod nodes;
mod pools;
mod release;
mod sticky;

pub use sticky::{HeldIdentity, IdentityRelease};

pub use nodes::{BlockClaim, GiveBack};

use crate::group_commit::Answer;
use crate::namespaces::Restriction;
use crate::pool::{Pool, RangeSet};
use crate::records::{
    now_unix, AllocationRecord, Attachment, AttachmentRecord, BlockRecord, HeldIp, Keys, Kind,
    PodRef, ReleaseMarker, RECORD_VERSION,
};
use crate::store::{Store, StoreConfig};
use follow::log_skipped;
use release::Found;

/// Upper bound on CAS rounds of one request; each lost round marks an address held, so this
/// is only reached under pathological churn.
const MAX_ROUNDS: usize = 256;

/// How long a release marker outlives its DEL: far longer than any transaction can stay
/// pending in etcd (a leader election takes seconds).
const MARKER_TTL: Duration = Duration::from_secs(600);

/// What an ADD asks for.
#[derive(Debug, Clone)]
pub struct AllocateRequest {
    pub attachment: Attachment,
    pub pod: Option<PodRef>,
    /// The attachment's network namespace (`CNI_NETNS`), recorded for the namespace GC.
    pub netns: String,
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

/// The addresses an attachment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub attachment: Attachment,
    pub ips: Vec<AllocatedIp>,
}

/// An attachment's commit revision: the revision of every key its ADD wrote, so that a DEL on
/// this node deletes them in one guarded transaction without reading them first.
#[derive(Debug, Clone)]
struct Committed {
    revision: i64,
    keys: Vec<String>,
    record: AttachmentRecord,
}

/// Attachments whose commit [`Inner::committed`] remembers at most, dropping the oldest: many
/// more than the pods of a node, so that in practice only entries whose DEL never comes here
/// (the attachment released by another node, or by a node-wide clean-up) are dropped. A node
/// holding more attachments than this still works: the DEL of an attachment not remembered
/// reads its records first, as after a restart.
const COMMITTED_CAP: usize = 2048;

/// A map that keeps only the `cap` entries inserted last. Each operation costs O(1), amortised.
#[derive(Debug)]
struct Recent<K, V> {
    cap: usize,
    /// Each entry with when it was inserted.
    entries: HashMap<K, (u64, V)>,
    /// Keys in the order they were inserted, with when: a pair whose key was removed or
    /// inserted again since is stale, skipped when it comes first and purged when stale pairs
    /// outnumber the entries.
    order: VecDeque<(u64, K)>,
    inserted: u64,
}

impl<K: std::hash::Hash + Eq + Clone, V> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Recent {
            cap,
            entries: HashMap::new(),
            order: VecDeque::new(),
            inserted: 0,
        }
    }

    fn is_current(&self, (at, key): &(u64, K)) -> bool {
        self.entries.get(key).is_some_and(|(x, _)| x == at)
    }

    /// Inserts an entry; drops the oldest when that would exceed the cap.
    fn insert(&mut self, key: K, value: V) {
        if self.entries.len() >= self.cap && !self.entries.contains_key(&key) {
            while let Some(pair) = self.order.pop_front() {
                if self.is_current(&pair) {
                    self.entries.remove(&pair.1);
                    break;
                }
            }
        }
        self.inserted += 1;
        self.entries.insert(key.clone(), (self.inserted, value));
        self.order.push_back((self.inserted, key));
        if self.order.len() > 2 * self.entries.len().max(self.cap) {
            let order = std::mem::take(&mut self.order);
            self.order = order.into_iter().filter(|p| self.is_current(p)).collect();
        }
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key).map(|(_, v)| v)
    }
}

#[derive(Debug)]
struct Inner {
    store: Store,
    keys: Keys,
    node: String,
    cache: Mutex<PoolCache>,
    committed: Mutex<Recent<Attachment, Committed>>,
    /// The lease release markers are written under, and when it was granted.
    marker_lease: tokio::sync::Mutex<Option<(i64, Instant)>>,
    synced: watch::Sender<bool>,
    /// Why the last load from etcd failed, for the error of requests that wait on it.
    load_error: Mutex<Option<String>>,
    retry_timeout: Duration,
    /// Test hook, see [`Allocator::hold_commits_at`].
    commit_gate: Mutex<Option<Arc<tokio::sync::Barrier>>>,
    /// Told when a block is followed, so that the watch adds it.
    follow_added: tokio::sync::Notify,
    /// Changes the watch delivered.
    watch_events: std::sync::atomic::AtomicU64,
    /// Held while a block claim is sent: requests that need a block at the same moment wait
    /// for one claim instead of each sending its own.
    claiming: tokio::sync::Mutex<()>,
    /// Block claims sent to etcd, won or lost.
    claims_sent: std::sync::atomic::AtomicU64,
    /// Reloads after the watch ended.
    watch_reloads: std::sync::atomic::AtomicU64,
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
            cache: Mutex::new(PoolCache::new(Keys::new(&config.prefix), node)),
            committed: Mutex::new(Recent::new(COMMITTED_CAP)),
            marker_lease: tokio::sync::Mutex::new(None),
            synced,
            load_error: Mutex::new(None),
            retry_timeout: config.retry_timeout,
            commit_gate: Mutex::new(None),
            follow_added: tokio::sync::Notify::new(),
            watch_events: std::sync::atomic::AtomicU64::new(0),
            claiming: tokio::sync::Mutex::new(()),
            claims_sent: std::sync::atomic::AtomicU64::new(0),
            watch_reloads: std::sync::atomic::AtomicU64::new(0),
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

    /// Test hook: while a gate is set, every ADD's commit transaction meets it twice before it
    /// is sent (once on arrival, once to go on), so that a test can act in between, e.g. DEL
    /// the attachment of an ADD that has noted its arrival revision but not yet committed.
    #[doc(hidden)]
    pub fn hold_commits_at(&self, gate: Option<Arc<tokio::sync::Barrier>>) {
        *self
            .inner
            .commit_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = gate;
    }

    /// Waits until the pools have been loaded from etcd.
    pub async fn ready(&self) -> Result<()> {
        self.inner.wait_synced().await
    }

    /// How many changes this allocator's watch has delivered: the pool index, pool
    /// definitions, block claims, and the addresses of the blocks it follows.
    pub fn watch_events(&self) -> u64 {
        self.inner
            .watch_events
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many block claims this allocator sent to etcd, won or lost.
    pub fn claims_sent(&self) -> u64 {
        self.inner
            .claims_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many times this allocator reloaded its pools because its watch ended (a
    /// compaction passed it, etcd or the connection failed).
    pub fn watch_reloads(&self) -> u64 {
        self.inner
            .watch_reloads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the pools have been loaded from etcd (the readiness probe).
    pub fn is_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Each pool's subnet and usage as this node's cache sees it (the metrics).
    pub fn pool_usage(&self) -> Vec<(String, crate::blocks::Usage)> {
        self.inner.lock_pools().usage()
    }

    /// Allocates one address per range set for `req.attachment`, or returns what the
    /// attachment already holds. The whole request is validated before anything is written,
    /// so a refused request leaves nothing behind.
    pub async fn allocate(&self, req: &AllocateRequest) -> Result<Allocation> {
        self.allocate_with(req, &[], None).await
    }

    /// [`Allocator::allocate`], with the dynamic address of range set `i` picked as
    /// `restrictions[i]` allows (a pod namespace's subnets, see `namespaces`); a range set
    /// without an entry is unrestricted. Exact addresses are not checked here.
    pub async fn allocate_within(
        &self,
        req: &AllocateRequest,
        restrictions: &[Restriction],
    ) -> Result<Allocation> {
        self.allocate_with(req, restrictions, None).await
    }

    /// [`Allocator::allocate_within`]; with `sticky`, the commit also creates the identity's
    /// sticky record (guarded: absent), recording the addresses as `Kind::Sticky`.
    async fn allocate_with(
        &self,
        req: &AllocateRequest,
        restrictions: &[Restriction],
        sticky: Option<&crate::sticky::Identity>,
    ) -> Result<Allocation> {
        let inner = &self.inner;
        // Noted on arrival: a DEL of this attachment after this point has a higher revision.
        let began = inner.store.seen_revision();
        check_attachment(&req.attachment)?;
        let plan = plan(req)?;
        inner.wait_synced().await?;
        let pools: Vec<&Pool> = req.range_sets.iter().flat_map(|s| s.pools.iter()).collect();
        if inner.defines_new_pool(&pools) {
            // Registering is a write: first refuse what the commit would refuse anyway.
            match inner.refusal_before_registering(req, &plan).await {
                Ok(()) => {}
                Err(e @ IpamError::Exhausted { .. }) => return self.held_or(req, e).await,
                Err(e) => return Err(e),
            }
        }
        inner.register_pools(&pools).await?;
        // One read, for exact requests only: the address may be one its DEL just released.
        let released = if req.requested.is_empty() {
            None
        } else {
            inner.release_marker(&req.attachment).await?
        };
        let mut last = String::new();
        let mut guard_legacy = true;
        for _ in 0..MAX_ROUNDS {
            let mut picks = Picks::new(inner);
            for (i, (set, exact)) in req.range_sets.iter().zip(&plan).enumerate() {
                match exact {
                    Some((pool, ip)) => {
                        picks.exact(pool, *ip, req.requested_kind, released.as_ref())
                    }
                    None => match inner
                        .pick_for(
                            set,
                            &mut picks,
                            &req.attachment.network,
                            restrictions.get(i),
                        )
                        .await
                    {
                        Ok(()) => {}
                        // A full pool does not stop a repeated ADD from getting its address,
                        // nor does an etcd that refuses the block claim a full block needs.
                        Err(e @ (IpamError::Exhausted { .. } | IpamError::StoreFull { .. })) => {
                            return self.held_or(req, e).await
                        }
                        Err(e) => return Err(e),
                    },
                }
            }
            match inner
                .commit(req, &mut picks, began, guard_legacy, sticky)
                .await
            {
                Ok(Outcome::Done(allocation)) => return Ok(allocation),
                Ok(Outcome::Lost(why)) => last = why,
                Ok(Outcome::OtherNetworksLegacy) => guard_legacy = false,
                // Nor does an etcd that refuses writes.
                Err(e @ IpamError::StoreFull { .. }) => return self.held_or(req, e).await,
                Err(e) => return Err(e),
            }
        }
        Err(IpamError::Contention {
            op: format!("allocate for {}", req.attachment),
            attempts: MAX_ROUNDS,
            last,
        })
    }

    /// What the attachment of `req` already holds, or `err` if it holds nothing.
    async fn held_or(&self, req: &AllocateRequest, err: IpamError) -> Result<Allocation> {
        match self.lookup(&req.attachment).await? {
            Some(existing) => already_held(req, existing),
            None => Err(err),
        }
    }

    /// Releases every address of `attachment` and leaves a release marker. Returns what was
    /// released; None if the attachment held nothing (DEL is idempotent).
    pub async fn release(&self, attachment: &Attachment) -> Result<Option<AttachmentRecord>> {
        check_attachment(attachment)?;
        self.inner.release(attachment, None).await
    }

    /// Releases `held` only if its record is still the one listed (same revision): a GC must
    /// not release an attachment that was released and added again since it looked. Returns
    /// None, and changes nothing, if the record changed or is gone.
    pub async fn release_if_unchanged(
        &self,
        held: &HeldAttachment,
    ) -> Result<Option<AttachmentRecord>> {
        check_attachment(&held.attachment)?;
        self.inner
            .release(&held.attachment, Some(held.revision))
            .await
    }

    /// Releases this node's attachments of `network` that are not in `valid` (CNI GC). Keeps
    /// going past failures and reports them all.
    ///
    /// Attachments younger than `grace` are kept: the runtime built `valid` before calling, so
    /// an ADD that committed meanwhile is missing from it but alive.
    pub async fn gc(
        &self,
        network: &str,
        valid: &HashSet<Attachment>,
        grace: Duration,
    ) -> Result<Vec<Attachment>> {
        let stale = self
            .node_attachments(Some(network))
            .await?
            .into_iter()
            .filter(|h| !valid.contains(&h.attachment) && is_older(&h.record, grace));
        let mut released = Vec::new();
        let mut failures = Vec::new();
        for held in stale {
            match self.release_if_unchanged(&held).await {
                Ok(Some(_)) => {
                    tracing::info!(attachment = %held.attachment, reason = "not in the runtime's valid attachments", "garbage-collected attachment");
                    released.push(held.attachment);
                }
                Ok(None) => {}
                Err(e) => failures.push(format!("{}: {e}", held.attachment)),
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

    /// This node's attachments (of `network` only, when given), from both key layouts, with
    /// their records. Reads this node's index and records, not the cluster's (the earlier
    /// layout, which has no index, is read whole only while some record of it remains).
    /// Unreadable records are skipped: `audit` names them.
    pub async fn node_attachments(&self, network: Option<&str>) -> Result<Vec<HeldAttachment>> {
        self.inner.attachments_of(&self.inner.node, network).await
    }

    /// Succeeds when an ADD for these range sets could succeed now: etcd answers and accepts
    /// writes, the pools are loaded, and no range set is exhausted (CNI STATUS).
    pub async fn status(&self, range_sets: &[RangeSet], network: &str) -> Result<()> {
        self.inner.wait_synced().await?;
        self.inner.store.check_alarms().await?;
        for pool in range_sets.iter().flat_map(|s| &s.pools) {
            let key = self.inner.keys.pool(&pool.id());
            let unknown = {
                let cache = self.inner.lock_pools();
                !cache.contains(&pool.id()) && cache.skipped(&key).is_none()
            };
            if unknown {
                // Not in the pool index, so not loaded: its record may still exist.
                self.inner.read_unindexed_pool(&key).await?;
            }
            if self.inner.lock_pools().skipped(&key).is_some() {
                return Err(IpamError::Corrupt {
                    key,
                    reason:
                        "the pool record does not validate; `hostnic-ipamd audit` names the problem"
                            .into(),
                });
            }
        }
        // Blocks not followed may have room: follow them, as an ADD would, until an address is
        // known free or none can be.
        for pool in range_sets.iter().flat_map(|s| &s.pools) {
            loop {
                let unknown = {
                    let mut pools = self.inner.lock_pools();
                    pools
                        .get_mut(&pool.id())
                        .and_then(|s| Some((s.to_follow()?, Arc::clone(s.pool()))))
                };
                match unknown {
                    Some((next, pool)) => self.inner.follow_for(&pool, next).await?,
                    None => break,
                }
            }
        }
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

    /// What `attachment` holds, read from etcd (either key layout).
    pub async fn lookup(&self, attachment: &Attachment) -> Result<Option<Allocation>> {
        check_attachment(attachment)?;
        self.inner.wait_synced().await?;
        match self.inner.read_attachment(attachment).await? {
            Found::Record { record, .. } => {
                Ok(Some(self.inner.allocation_of(attachment, &record).await?))
            }
            Found::Unreadable { key, reason, .. } => Err(IpamError::Corrupt { key, reason }),
            Found::Nothing => Ok(None),
        }
    }
}

/// An attachment record as a listing found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAttachment {
    pub attachment: Attachment,
    pub record: AttachmentRecord,
    /// The record's mod revision: [`Allocator::release_if_unchanged`] releases only this one.
    pub revision: i64,
}

fn is_older(record: &AttachmentRecord, grace: Duration) -> bool {
    now_unix().saturating_sub(record.allocated_at) >= grace.as_secs()
}

fn check_attachment(attachment: &Attachment) -> Result<()> {
    attachment
        .validate()
        .map_err(|reason| IpamError::InvalidAttachment { reason })
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
    /// Since when the attachment held this address before a DEL that is being undone (see
    /// [`ReleaseMarker::ips`]); None for a new allocation.
    since: Option<u64>,
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

    /// Picks `ip` of `pool`; as it was held before `released`, if that DEL released it.
    fn exact(&mut self, pool: &Pool, ip: IpAddr, kind: Kind, released: Option<&ReleaseMarker>) {
        let mut pools = self.inner.lock_pools();
        let state = pools.state_of(pool);
        let marked = state.mark(to_int(ip));
        let earlier = released.and_then(|m| {
            let held = m.ips.iter().find(|h| h.ip == ip && h.pool == pool.id())?;
            Some((held.kind?, m.allocated_at))
        });
        self.picks.push(Pick {
            pool: Arc::clone(state.pool()),
            ip,
            kind: earlier.map_or(kind, |(kind, _)| kind),
            since: earlier.map(|(_, since)| since),
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
            pools.unmark(&pick.pool.id(), pick.ip);
        }
    }
}

enum Outcome {
    Done(Allocation),
    /// The earlier layout holds a record for the container id and ifname, of another network.
    OtherNetworksLegacy,
    /// The round lost a race; try again with the state it taught us.
    Lost(String),
}

impl Inner {
    fn lock_pools(&self) -> MutexGuard<'_, PoolCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_committed(&self) -> MutexGuard<'_, Recent<Attachment, Committed>> {
        self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a record that does not validate, once per key.
    fn skip_once(&self, key: &str, reason: &str) {
        let first = self.lock_pools().skip(key, reason.to_string());
        log_skipped(first);
    }

    /// Picks the next dynamic address of a range set, claiming blocks as needed.
    async fn pick_dynamic(
        self: &Arc<Self>,
        set: &RangeSet,
        picks: &mut Picks<'_>,
        network: &str,
    ) -> Result<()> {
        for pool in &set.pools {
            loop {
                let (next, state_pool, ahead) = {
                    let mut pools = self.lock_pools();
                    let state = pools.state_of(pool);
                    let next = state.next_address();
                    let ahead = match next {
                        Next::Address(_) => state.claim_ahead(),
                        _ => None,
                    };
                    (next, Arc::clone(state.pool()), ahead)
                };
                if let Some(index) = ahead {
                    self.claim_ahead(Arc::clone(&state_pool), index);
                }
                match next {
                    Next::Address(n) | Next::Borrow(n) => {
                        picks.picks.push(Pick {
                            ip: state_pool.addr(n),
                            pool: state_pool,
                            kind: Kind::Dynamic,
                            since: None,
                            marked: true,
                        });
                        return Ok(());
                    }
                    Next::Claim(block) => self.claim_block(&state_pool, block).await?,
                    next @ (Next::Follow(_) | Next::FollowAll) => {
                        self.follow_for(&state_pool, next).await?
                    }
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

    /// Claims block `index` of `pool` in the background
    /// ([`crate::blocks::PoolState::claim_ahead`]). A claim that fails is left to the ADD that
    /// needs the block.
    fn claim_ahead(self: &Arc<Self>, pool: Arc<Pool>, index: u128) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = inner.claim_block(&pool, index).await {
                let block = pool.block_cidr(index);
                tracing::warn!(%block, error = %e, "claiming a block ahead failed");
            }
            if let Some(state) = inner.lock_pools().get_mut(&pool.id()) {
                state.claimed_ahead(index);
            }
        });
    }

    /// Claims block `index` of `pool` for this node with one CAS, which also reads the block's
    /// addresses so that it is followed from the claim on (a block that can be followed alone;
    /// another is followed as picking asks). Losing the race is not an error: the block is
    /// then recorded as the winner's. One claim at a time: a block claimed while this one
    /// waited is not claimed again.
    async fn claim_block(&self, pool: &Arc<Pool>, index: u128) -> Result<()> {
        let _one = self.claiming.lock().await;
        if self
            .lock_pools()
            .get(&pool.id())
            .is_none_or(|state| state.owner(index).is_some())
        {
            return Ok(());
        }
        self.claims_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cidr = pool.block_cidr(index);
        let key = self.keys.block(&pool.id(), &cidr);
        let record = BlockRecord {
            version: RECORD_VERSION,
            node: self.node.clone(),
        };
        let reads = self.block_reads(pool, index);
        let follows = reads.is_some();
        let claim = TxnOp::put(key.as_str(), encode(&record), None);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then(
                std::iter::once(claim)
                    .chain(reads.into_iter().flatten())
                    .collect::<Vec<_>>(),
            )
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.store.txn(&format!("claim block {cidr}"), txn).await?;
        let owner = match got(&resp, 0) {
            Some(kv) if !resp.succeeded() => block_owner(kv.value()).unwrap_or_else(|reason| {
                self.skip_once(&key, &reason);
                UNREADABLE_OWNER.to_string()
            }),
            _ => self.node.clone(),
        };
        tracing::debug!(block = %cidr, %owner, "block claimed");
        let mut pools = self.lock_pools();
        let Some(state) = pools.get_mut(&pool.id()) else {
            return Ok(());
        };
        state.set_owner(index, Some(&owner));
        if resp.succeeded() && follows {
            let held: Vec<IpAddr> = resp.op_responses()[1..]
                .iter()
                .flat_map(|op| self.addresses_read(op))
                .collect();
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            if pools.follow(pool, index, held, revision) {
                self.follow_added.notify_one();
            }
        }
        Ok(())
    }

    /// One CAS round: writes every picked address and the attachment record, or learns why
    /// not. `began` is the revision the request arrived at (see the module documentation).
    ///
    /// With `guard_legacy`, the transaction also requires that no record of the earlier layout
    /// exists for the container id and ifname: a repeated ADD of an attachment made before the
    /// upgrade must return its address, not take a second one. A record there of another
    /// network turns the guard off for the next round ([`Outcome::OtherNetworksLegacy`]).
    async fn commit(
        &self,
        req: &AllocateRequest,
        picks: &mut Picks<'_>,
        began: i64,
        guard_legacy: bool,
        sticky: Option<&crate::sticky::Identity>,
    ) -> Result<Outcome> {
        let attachment = &req.attachment;
        let attachment_key = self.keys.attachment(attachment);
        let marker_key = self.keys.released(attachment);
        let now = now_unix();
        let mut compares = vec![
            Compare::create_revision(attachment_key.as_str(), CompareOp::Equal, 0),
            Compare::mod_revision(marker_key.as_str(), CompareOp::Less, began + 1),
        ];
        let mut puts = Vec::new();
        let mut gets = vec![
            TxnOp::get(attachment_key.as_str(), None),
            TxnOp::get(marker_key.as_str(), None),
        ];
        let mut held = Vec::new();
        let mut keys = vec![attachment_key.clone()];
        for pick in &picks.picks {
            let key = self.keys.address(&pick.pool.id(), pick.ip);
            let record = AllocationRecord {
                version: RECORD_VERSION,
                attachment: attachment.clone(),
                pod: req.pod.clone(),
                node: self.node.clone(),
                kind: if sticky.is_some() {
                    Kind::Sticky
                } else {
                    pick.kind
                },
                allocated_at: pick.since.unwrap_or(now),
            };
            compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(key.as_str(), encode(&record), None));
            gets.push(TxnOp::get(key.as_str(), None));
            held.push(HeldIp {
                pool: pick.pool.id(),
                ip: pick.ip,
                kind: Some(record.kind),
            });
            keys.push(key);
        }
        let record = AttachmentRecord {
            version: RECORD_VERSION,
            network: attachment.network.clone(),
            node: self.node.clone(),
            pod: req.pod.clone(),
            ips: held,
            allocated_at: picks
                .picks
                .iter()
                .filter_map(|p| p.since)
                .min()
                .unwrap_or(now),
            netns: req.netns.clone(),
        };
        puts.push(TxnOp::put(attachment_key.as_str(), encode(&record), None));
        let index_key = self.keys.node_attachment(&self.node, attachment);
        puts.push(TxnOp::put(index_key.as_str(), "", None));
        keys.push(index_key);
        let legacy_key = self.keys.legacy_handle(attachment);
        if guard_legacy {
            compares.push(Compare::create_revision(
                legacy_key.as_str(),
                CompareOp::Equal,
                0,
            ));
        }
        let legacy_index = gets.len();
        gets.push(TxnOp::get(legacy_key.as_str(), None));
        let sticky_key = sticky.map(|identity| {
            let (key, put) = self.sticky_create(identity, &record.ips, now);
            compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            puts.push(put);
            gets.push(TxnOp::get(key.as_str(), None));
            key
        });
        let gets_len = gets.len();
        let txn = Txn::new().when(compares).and_then(puts).or_else(gets);
        let gate = self
            .commit_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(gate) = gate {
            gate.wait().await;
            gate.wait().await;
        }
        let mut touched = keys.clone();
        touched.extend([marker_key, legacy_key]);
        touched.extend(sticky_key.clone());
        let Answer {
            response: resp,
            revision,
        } = self
            .store
            .txn_grouped(&format!("allocate for {attachment}"), txn, touched)
            .await?;

        if resp.succeeded() {
            picks.keep_all();
            self.lock_committed().insert(
                attachment.clone(),
                Committed {
                    revision,
                    keys,
                    record: record.clone(),
                },
            );
            return Ok(Outcome::Done(
                self.allocation_of(attachment, &record).await?,
            ));
        }

        if let Some(key) = sticky_key {
            if got(&resp, gets_len - 1).is_some() {
                return Err(IpamError::Contention {
                    op: format!("allocate for {attachment}"),
                    attempts: 1,
                    last: format!("{key} was created meanwhile by another ADD"),
                });
            }
        }
        let read = |i: usize| {
            got(&resp, i).map(|kv| Read {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
        };
        let refusal = Refusal {
            attachment: read(0),
            marker: read(1),
            addresses: (0..picks.picks.len()).map(|i| read(i + 2)).collect(),
            legacy: read(legacy_index),
        };
        let picked: Vec<(IpAddr, Kind)> = picks.picks.iter().map(|p| (p.ip, p.kind)).collect();
        match read_refusal(&refusal, attachment, &picked, began, guard_legacy)? {
            Verdict::Held(existing) => {
                // Picks of addresses the attachment holds stay marked: they are held.
                for pick in picks.picks.iter_mut() {
                    if existing
                        .ips
                        .iter()
                        .any(|h| h.ip == pick.ip && h.pool == pick.pool.id())
                    {
                        pick.marked = false;
                    }
                }
                let allocation = self.allocation_of(attachment, &existing).await?;
                already_held(req, allocation).map(Outcome::Done)
            }
            Verdict::ReleasedMeanwhile { released } => Err(IpamError::ReleasedMeanwhile {
                attachment: attachment.clone(),
                released,
                began,
            }),
            Verdict::OtherNetworksLegacy => Ok(Outcome::OtherNetworksLegacy),
            Verdict::Taken {
                picks: taken,
                exact,
            } => {
                for &i in &taken {
                    picks.keep(i);
                }
                if let Some((ip, holder, record)) = exact {
                    return Err(IpamError::AddressInUse { ip, holder, record });
                }
                let lost: Vec<String> = taken
                    .iter()
                    .map(|&i| picks.picks[i].ip.to_string())
                    .collect();
                Ok(Outcome::Lost(format!(
                    "addresses taken meanwhile: {}",
                    lost.join(", ")
                )))
            }
        }
    }

    /// The allocation an attachment record describes. A pool this node's cache does not know
    /// yet (another node registered it a moment ago, and the watch has not delivered it) is
    /// read from etcd.
    async fn allocation_of(
        &self,
        attachment: &Attachment,
        record: &AttachmentRecord,
    ) -> Result<Allocation> {
        let mut ips = Vec::with_capacity(record.ips.len());
        for h in &record.ips {
            let cached = self.lock_pools().get(&h.pool).map(|s| Arc::clone(s.pool()));
            let pool = match cached {
                Some(pool) => pool,
                None => self.read_pool(attachment, &h.pool).await?,
            };
            ips.push(AllocatedIp {
                ip: h.ip,
                subnet: pool.subnet,
                gateway: pool.gateway,
            });
        }
        Ok(Allocation {
            attachment: attachment.clone(),
            ips,
        })
    }

    /// Pool `id` as etcd has it, for the record of `attachment` that refers to it: corrupt if
    /// there is no such pool or its record does not validate.
    async fn read_pool(&self, attachment: &Attachment, id: &str) -> Result<Arc<Pool>> {
        let key = self.keys.pool(id);
        let resp = self.store.get("read a pool", &key, None).await?;
        let corrupt = |reason| IpamError::Corrupt {
            key: self.keys.attachment(attachment),
            reason,
        };
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| corrupt(format!("refers to unknown pool {id}")))?;
        decode_pool(&self.keys, &key, kv.value())
            .map(Arc::new)
            .map_err(|e| {
                corrupt(format!(
                    "refers to pool {id}, whose record does not validate: {e}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keeps_only_the_entries_inserted_last() {
        let mut recent = Recent::new(3);
        for i in 0..5 {
            recent.insert(i, i * 10);
        }
        // Inserting a key already there refreshes it without dropping another.
        recent.insert(2, 21);
        recent.insert(5, 50);
        assert_eq!(recent.entries.len(), 3);
        assert_eq!(
            [0, 1, 3].map(|k| recent.remove(&k)),
            [None, None, None],
            "the oldest were dropped"
        );
        assert_eq!(
            [2, 4, 5].map(|k| recent.remove(&k)),
            [Some(21), Some(40), Some(50)]
        );
        assert_eq!(recent.remove(&5), None, "removed once");
    }

    #[test]
    fn recent_stays_bounded_when_entries_come_and_go() {
        let mut recent = Recent::new(4);
        for i in 0..10_000 {
            recent.insert(i, i);
            if i % 3 != 0 {
                assert_eq!(recent.remove(&i), Some(i));
            }
        }
        assert_eq!(recent.entries.len(), 4);
        assert!(recent.order.len() <= 8, "{} pairs kept", recent.order.len());
        assert_eq!(
            [9993, 9996, 9999].map(|k| recent.remove(&k)),
            [Some(9993), Some(9996), Some(9999)]
        );
    }
}
