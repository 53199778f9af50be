//! Registering pools: a new pool is written together with the pool index it was checked
//! against, so two nodes cannot both add overlapping pools, and only after the request is
//! known to succeed, so a refused request leaves no pool behind.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnet::IpNet;

use super::{decode, encode, got, AllocateRequest, Inner};
use crate::cache::decode_pool;
use crate::error::{IpamError, Result};
use crate::planner::{holder_of, holder_record};
use crate::pool::Pool;
use crate::records::{AllocationRecord, KeyRef, PoolIndex, PoolRecord, RECORD_VERSION};
use crate::store::PAGE;

impl Inner {
    /// Whether some of `pools` is unknown here, so that registering them writes to etcd.
    pub(super) fn defines_new_pool(&self, pools: &[&Pool]) -> bool {
        let states = self.lock_pools();
        pools.iter().any(|p| !states.contains(&p.id()))
    }

    /// What the commit of `req` would refuse, found before a new pool is written, so that the
    /// refusal leaves no pool behind: an exact address that another attachment holds, or a
    /// range set of known pools with no free address.
    pub(super) async fn refusal_before_registering(
        &self,
        req: &AllocateRequest,
        plan: &[Option<(Pool, IpAddr)>],
    ) -> Result<()> {
        {
            let mut states = self.lock_pools();
            for (set, exact) in req.range_sets.iter().zip(plan) {
                let full = exact.is_none()
                    && set.pools.iter().all(|p| {
                        states
                            .get_mut(&p.id())
                            .is_some_and(|state| !state.has_free())
                    });
                if full {
                    let subnets: Vec<String> =
                        set.pools.iter().map(|p| p.subnet.to_string()).collect();
                    return Err(IpamError::Exhausted {
                        pools: subnets.join(", "),
                        network: req.attachment.network.clone(),
                    });
                }
            }
        }
        let exact: Vec<(String, IpAddr)> = plan
            .iter()
            .flatten()
            .map(|(pool, ip)| (self.keys.address(&pool.id(), *ip), *ip))
            .collect();
        if exact.is_empty() {
            return Ok(());
        }
        let reads: Vec<TxnOp> = exact
            .iter()
            .map(|(key, _)| TxnOp::get(key.as_str(), None))
            .collect();
        let resp = self
            .store
            .txn(
                &format!("read the addresses requested for {}", req.attachment),
                Txn::new().and_then(reads),
            )
            .await?;
        for (i, (_, ip)) in exact.iter().enumerate() {
            let Some(kv) = got(&resp, i) else { continue };
            let own = decode::<AllocationRecord>(&kv).is_ok_and(|r| r.attachment == req.attachment);
            if !own {
                return Err(IpamError::AddressInUse {
                    ip: *ip,
                    holder: holder_of(kv.value()),
                    record: holder_record(kv.value()),
                });
            }
        }
        Ok(())
    }

    /// Makes sure etcd holds the definition of every pool: checks those it knows, and writes
    /// the new ones together with the pool index they were checked against, in one
    /// transaction, so two nodes cannot both add overlapping pools.
    pub(super) async fn register_pools(&self, pools: &[&Pool]) -> Result<()> {
        let mut new: Vec<&Pool> = Vec::new();
        {
            let states = self.lock_pools();
            for pool in pools {
                match states.get(&pool.id()) {
                    Some(state) => same_definition(state.pool(), pool)?,
                    None => new.push(pool),
                }
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        let index_key = self.keys.pool_index();
        let subnets: Vec<String> = new.iter().map(|p| p.subnet.to_string()).collect();
        let op = format!("register pool {}", subnets.join(", "));
        for _ in 0..8 {
            let mut reads = vec![TxnOp::get(index_key.as_str(), None)];
            reads.extend(
                new.iter()
                    .map(|p| TxnOp::get(self.keys.pool(&p.id()), None)),
            );
            let resp = self.store.txn(&op, Txn::new().and_then(reads)).await?;
            let mut missing: Vec<&Pool> = Vec::new();
            for (i, pool) in new.iter().enumerate() {
                match got(&resp, i + 1) {
                    Some(kv) => {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let stored = decode_pool(&self.keys, &key, kv.value())
                            .inspect_err(|reason| self.skip_once(&key, reason))
                            .map_err(|reason| IpamError::Corrupt { key, reason })?;
                        same_definition(&stored, pool)?;
                        self.remember_pool(stored);
                    }
                    None => missing.push(pool),
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            let (mut index, index_guard) = match got(&resp, 0) {
                Some(kv) => {
                    let guard = Compare::mod_revision(
                        index_key.as_str(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    );
                    match decode::<PoolIndex>(&kv) {
                        Ok(index) => (index, guard),
                        Err(e) => {
                            self.skip_once(&index_key, &e.to_string());
                            (self.rebuild_pool_index().await?, guard)
                        }
                    }
                }
                None => (
                    PoolIndex::default(),
                    Compare::create_revision(index_key.as_str(), CompareOp::Equal, 0),
                ),
            };
            for pool in &missing {
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
            }
            index.version = RECORD_VERSION;
            let mut guards = vec![index_guard];
            let mut writes = vec![TxnOp::put(index_key.as_str(), encode(&index), None)];
            for pool in &missing {
                let key = self.keys.pool(&pool.id());
                guards.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                writes.push(TxnOp::put(key, encode(&PoolRecord::from_pool(pool)), None));
            }
            let write = Txn::new().when(guards).and_then(writes);
            if self.store.txn(&op, write).await?.succeeded() {
                for pool in missing {
                    self.remember_pool(pool.clone());
                }
                return Ok(());
            }
        }
        Err(IpamError::Contention {
            op,
            attempts: 8,
            last: "the pool index kept changing".into(),
        })
    }

    /// The pool index as the pool records say it should be, for when the stored one cannot be
    /// read: a corrupt index must not stop every new pool of the cluster.
    pub(super) async fn rebuild_pool_index(&self) -> Result<PoolIndex> {
        // Keys only, in bounded pages: the prefix holds every address of the cluster.
        let mut subnets: Vec<IpNet> = Vec::new();
        let pools = |kvs: Vec<etcd_client::KeyValue>| {
            for kv in &kvs {
                let key = kv.key_str().ok().and_then(|k| self.keys.parse(k));
                if let Some(KeyRef::Pool { pool }) = key {
                    if let Ok(subnet) = crate::pool::cidr_of_id(&pool).parse::<IpNet>() {
                        subnets.push(subnet);
                    }
                }
            }
        };
        self.store
            .for_each_page(&self.keys.pools(), PAGE, |_, _| true, pools)
            .await?;
        // A cluster without pools has no index yet: nothing to say. An index that does not
        // decode was logged by whoever read it.
        if !subnets.is_empty() {
            tracing::warn!(
                key = self.keys.pool_index(),
                pools = subnets.len(),
                "rebuilt the missing or unreadable pool index from the pool records"
            );
        }
        Ok(PoolIndex {
            version: RECORD_VERSION,
            subnets,
        })
    }

    /// Reads the pool record at `key`, which the pool index does not name: remembers the pool
    /// if the record is valid, skips it (once, logged) if not.
    pub(super) async fn read_unindexed_pool(&self, key: &str) -> Result<()> {
        let resp = self.store.get("read a pool record", key, None).await?;
        if let Some(kv) = resp.kvs().first() {
            match decode_pool(&self.keys, key, kv.value()) {
                Ok(pool) => self.remember_pool(pool),
                Err(reason) => self.skip_once(key, &reason),
            }
        }
        Ok(())
    }

    /// Makes sure the in-memory state has `pool` (the watch may not have delivered it yet, or a
    /// reload may have replaced the state with a snapshot taken before it existed).
    pub(super) fn remember_pool(&self, pool: Pool) {
        self.lock_pools().state_of(&pool);
        // The watch reads and follows a pool it does not follow yet.
        self.follow_added.notify_one();
    }
}

pub(super) fn same_definition(stored: &Pool, requested: &Pool) -> Result<()> {
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
