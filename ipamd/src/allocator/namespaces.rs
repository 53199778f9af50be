//! Namespace restrictions in the allocator: dynamic picking inside a namespace's subnets
//! (never in another namespace's), and giving a namespace a block of its own
//! (`subnet-auto-assign: "on"`) with one compare-and-swap.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};
use ipnet::IpNet;

use super::{encode, Allocator, Inner, Pick, Picks};
use crate::addr::{merge_ranges, subtract_ranges, to_int, AddrRange, Family};
use crate::blocks::{Next, PoolState};
use crate::error::{IpamError, Result};
use crate::namespaces::{overlap, Restriction};
use crate::pool::{Pool, RangeSet};
use crate::records::{Kind, NamespaceBlockRecord, NamespaceRecord, RECORD_VERSION};

/// How many blocks one assignment tries before it gives up: each lost race takes one out.
const ASSIGN_ROUNDS: usize = 16;

/// Blocks no larger than this are assigned only if etcd holds no address in them, checked in
/// the assigning transaction (one compare per address; etcd allows 128 per transaction).
const GUARDED_BLOCK_LEN: u128 = 64;

/// The addresses of `pool` in `cidrs`, sorted and merged.
fn ranges_in(pool: &Pool, cidrs: &[IpNet]) -> Vec<AddrRange> {
    let subnet = AddrRange::new(
        to_int(pool.subnet.network()),
        to_int(pool.subnet.broadcast()),
    );
    let mut out: Vec<AddrRange> = cidrs
        .iter()
        .filter(|c| Family::of(c.addr()) == pool.family())
        .map(|c| AddrRange::new(to_int(c.network()), to_int(c.broadcast())))
        .filter(|r| r.overlaps(&subnet))
        .map(|r| AddrRange::new(r.first.max(subnet.first), r.last.min(subnet.last)))
        .collect();
    merge_ranges(&mut out);
    out
}

/// What `r` allows of `pool`: its CIDRs (or the whole pool) without the other namespaces'.
fn allowed_in(pool: &Pool, r: &Restriction) -> Vec<AddrRange> {
    let within = match &r.within {
        Some(w) => ranges_in(pool, w),
        None => ranges_in(pool, &[pool.subnet]),
    };
    subtract_ranges(&within, &ranges_in(pool, &r.outside))
}

fn subnets(set: &RangeSet) -> String {
    let subnets: Vec<String> = set.pools.iter().map(|p| p.subnet.to_string()).collect();
    subnets.join(", ")
}

impl Inner {
    /// Picks the next dynamic address of a range set as `restriction` allows; without one (or
    /// with one that restricts nothing), as [`Inner::pick_dynamic`] does.
    pub(super) async fn pick_for(
        self: &Arc<Self>,
        set: &RangeSet,
        picks: &mut Picks<'_>,
        network: &str,
        restriction: Option<&Restriction>,
    ) -> Result<()> {
        match restriction {
            Some(r) if !r.is_none() => self.pick_within(set, picks, network, r).await,
            _ => self.pick_dynamic(set, picks, network).await,
        }
    }

    async fn pick_within(
        &self,
        set: &RangeSet,
        picks: &mut Picks<'_>,
        network: &str,
        restriction: &Restriction,
    ) -> Result<()> {
        for pool in &set.pools {
            let allowed = allowed_in(pool, restriction);
            if allowed.is_empty() {
                continue;
            }
            loop {
                let (next, state_pool) = {
                    let mut pools = self.lock_pools();
                    let state = pools.state_of(pool);
                    (state.next_address_in(&allowed), Arc::clone(state.pool()))
                };
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
        Err(IpamError::Exhausted {
            pools: format!(
                "{} as the pod's namespace may use it: {}",
                subnets(set),
                restriction.describe()
            ),
            network: network.to_string(),
        })
    }

    /// The first block of a pool of `set` that `namespace` may be given: inside the
    /// restriction's space, meeting no other namespace's CIDRs, none of `skip`, and holding no
    /// address as this node sees it.
    fn empty_block(
        &self,
        set: &RangeSet,
        restriction: &Restriction,
        skip: &[IpNet],
    ) -> Option<(Arc<Pool>, IpNet)> {
        let pools = self.lock_pools();
        for pool in &set.pools {
            let space = match &restriction.auto_space {
                Some(Some(cidrs)) => ranges_in(pool, cidrs),
                _ => ranges_in(pool, &[pool.subnet]),
            };
            let taken: Vec<IpNet> = restriction.outside.iter().chain(skip).copied().collect();
            let space = subtract_ranges(&space, &ranges_in(pool, &taken));
            // A pool not registered yet holds nothing; it is not added to the cache here, so
            // that the ADD still registers it.
            let fresh;
            let state = match pools.get(&pool.id()) {
                Some(state) => state,
                None => {
                    fresh = PoolState::new(Arc::new(pool.clone()), &self.node);
                    &fresh
                }
            };
            if let Some(&index) = state.empty_blocks_in(&space, 1).first() {
                let pool = Arc::clone(state.pool());
                let block = pool.block_cidr(index);
                return Some((pool, block));
            }
        }
        None
    }
}

fn decode_namespace(kv: &KeyValue) -> Result<NamespaceRecord> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let record: NamespaceRecord =
        serde_json::from_slice(kv.value()).map_err(|e| IpamError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
    record
        .validate()
        .map_err(|reason| IpamError::Corrupt { key, reason })?;
    Ok(record)
}

impl Allocator {
    /// Whether `restriction` leaves a free dynamic address in a pool of `set`, as this node
    /// sees it: when not, a namespace with auto-assigned blocks needs another.
    pub fn has_free_within(&self, set: &RangeSet, restriction: &Restriction) -> bool {
        let pools = self.inner.lock_pools();
        set.pools.iter().any(|pool| {
            let allowed = allowed_in(pool, restriction);
            // A pool not registered yet holds nothing.
            !allowed.is_empty()
                && pools
                    .get(&pool.id())
                    .is_none_or(|state| state.has_free_in(&allowed))
        })
    }

    /// The blocks auto-assigned to `namespace`, as etcd has them now (none: empty).
    pub async fn namespace_blocks(&self, namespace: &str) -> Result<Vec<IpNet>> {
        let key = self.inner.keys.namespace(namespace);
        let resp = self
            .inner
            .store
            .get("read the namespace's blocks", &key, None)
            .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(decode_namespace(kv)?.blocks),
            None => Ok(Vec::new()),
        }
    }

    /// Gives `namespace` one more block of a pool of `set` (`subnet-auto-assign: "on"`): the
    /// first one inside the restriction's space that no namespace has and that holds no
    /// address. One transaction appends it to the namespace's record and writes the block's
    /// index record, guarded by: the namespace's record unchanged, the block assigned to no
    /// namespace, and (for blocks of up to 64 addresses) no address held in it. Returns the
    /// namespace's blocks; when another node gave the namespace a block of `set` meanwhile
    /// (one `restriction` does not know), those, without assigning another.
    pub async fn assign_namespace_block(
        &self,
        namespace: &str,
        set: &RangeSet,
        restriction: &Restriction,
        network: &str,
    ) -> Result<Vec<IpNet>> {
        let inner = &self.inner;
        inner.wait_synced().await?;
        let key = inner.keys.namespace(namespace);
        let known = restriction.within.clone().unwrap_or_default();
        let pools: Vec<IpNet> = set.pools.iter().map(|p| p.subnet).collect();
        let mut lost = Vec::new();
        for _ in 0..ASSIGN_ROUNDS {
            let resp = inner
                .store
                .get("read the namespace's blocks", &key, None)
                .await?;
            let (mut record, revision) = match resp.kvs().first() {
                Some(kv) => (decode_namespace(kv)?, kv.mod_revision()),
                None => (NamespaceRecord::default(), 0),
            };
            let news = record
                .blocks
                .iter()
                .any(|b| pools.iter().any(|p| overlap(p, b)) && !known.contains(b));
            if news {
                return Ok(record.blocks);
            }
            let skip: Vec<IpNet> = record.blocks.iter().chain(&lost).copied().collect();
            let Some((pool, block)) = inner.empty_block(set, restriction, &skip) else {
                return Err(IpamError::Exhausted {
                    pools: format!(
                        "{}: no block left that no namespace has and that holds no address, \
                         to assign to namespace {namespace}",
                        subnets(set)
                    ),
                    network: network.to_string(),
                });
            };
            let index_key = inner.keys.namespace_block(&block);
            let mut compares = vec![
                Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
                Compare::create_revision(index_key.as_str(), CompareOp::Equal, 0),
            ];
            if pool.block_len() <= GUARDED_BLOCK_LEN {
                let first = to_int(block.network());
                for n in first..first + pool.block_len() {
                    let address = inner.keys.address(&pool.id(), pool.addr(n));
                    compares.push(Compare::create_revision(address, CompareOp::Equal, 0));
                }
            }
            record.version = RECORD_VERSION;
            record.blocks.push(block);
            let index = NamespaceBlockRecord {
                version: RECORD_VERSION,
                namespace: namespace.to_string(),
            };
            let txn = Txn::new().when(compares).and_then([
                TxnOp::put(key.as_str(), encode(&record), None),
                TxnOp::put(index_key.as_str(), encode(&index), None),
            ]);
            let resp = inner
                .store
                .txn(
                    &format!("assign block {block} to namespace {namespace}"),
                    txn,
                )
                .await?;
            if resp.succeeded() {
                tracing::info!(namespace, %block, "block assigned to the namespace");
                return Ok(record.blocks);
            }
            lost.push(block);
        }
        Err(IpamError::Contention {
            op: format!("assign a block to namespace {namespace}"),
            attempts: ASSIGN_ROUNDS,
            last: format!(
                "blocks taken meanwhile: {}",
                lost.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}
