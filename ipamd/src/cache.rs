//! The node's picture of the pools: every pool definition, which node claimed each block, and
//! which addresses are held in the blocks this node follows (its own, those it borrows from;
//! every block of a pool followed whole), built from etcd in the style of kube-runtime's
//! reflector. A load and each watch event go in through [`PoolCache::replace`],
//! [`PoolCache::apply`] and [`PoolCache::follow`], which are pure: the watch loop in
//! `allocator` only feeds them.
//!
//! A record that does not decode or validate is skipped and reported once (the caller logs
//! it): a bad pool record makes that pool unusable until it is fixed, a bad block claim counts
//! as claimed by nobody this node can use, and nothing else is affected.

use std::collections::HashMap;
use std::sync::Arc;

use crate::addr::to_int;
use crate::blocks::PoolState;
use crate::pool::Pool;
use crate::records::{BlockRecord, KeyRef, Keys, PoolRecord};
use ipnet::IpNet;

/// The owner recorded for a block whose claim record cannot be read. Not a valid node name, so
/// it matches no node: the block is neither claimed again nor treated as free.
pub const UNREADABLE_OWNER: &str = "<unreadable block record>";

/// One change of a key under `pools/`, as a load or the watch delivers it.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Put { key: &'a str, value: &'a [u8] },
    Delete { key: &'a str },
}

/// A record skipped for the first time: what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

/// Free-address state of every pool this node knows, and the records it skipped.
#[derive(Debug)]
pub struct PoolCache {
    keys: Keys,
    node: String,
    pools: HashMap<String, PoolState>,
    /// Keys of records that do not decode or validate, with why. Kept across loads, so a
    /// reload does not report them again.
    skipped: HashMap<String, String>,
    /// What was followed since the watch last took it: pool id, block index (None: every
    /// address of the pool), and the revision the addresses were read at.
    unwatched: Vec<(String, Option<u128>, i64)>,
}

/// The state of a pool as this node follows it: block by block, or whole when its address keys
/// have no block order (IPv6).
fn new_state(pool: Arc<Pool>, node: &str) -> PoolState {
    match pool.subnet {
        IpNet::V4(_) => PoolState::new(pool, node),
        IpNet::V6(_) => PoolState::following_all(pool, node),
    }
}

impl PoolCache {
    pub fn new(keys: Keys, node: &str) -> Self {
        PoolCache {
            keys,
            node: node.to_string(),
            pools: HashMap::new(),
            skipped: HashMap::new(),
            unwatched: Vec::new(),
        }
    }

    /// Replaces the pools with those of `loaded`, a picture built afresh from a snapshot of
    /// every key under `pools/` applied in key order (a pool's definition sorts before its
    /// blocks and addresses). A record under `pools/` skipped before but not in the snapshot's
    /// skipped ones was fixed or deleted meanwhile, and is forgotten. Returns the records
    /// skipped for the first time.
    pub fn replace(&mut self, loaded: PoolCache) -> Vec<Skipped> {
        let pools = self.keys.pools();
        self.skipped
            .retain(|key, _| !key.starts_with(&pools) || loaded.skipped.contains_key(key));
        self.pools = loaded.pools;
        self.unwatched = loaded.unwatched;
        loaded
            .skipped
            .into_iter()
            .filter_map(|(key, reason)| self.skip(&key, reason))
            .collect()
    }

    /// Applies one change. Returns the record skipped, if this change made a record be skipped
    /// for the first time.
    pub fn apply(&mut self, change: Change<'_>) -> Option<Skipped> {
        let (key, value) = match change {
            Change::Put { key, value } => (key, Some(value)),
            Change::Delete { key } => (key, None),
        };
        match (self.keys.parse(key)?, value) {
            (KeyRef::Pool { pool }, Some(value)) => match decode_pool(&self.keys, key, value) {
                Ok(def) => {
                    self.skipped.remove(key);
                    if self.pools.get(&pool).is_none_or(|s| **s.pool() != def) {
                        self.pools
                            .insert(pool, new_state(Arc::new(def), &self.node));
                    }
                    None
                }
                Err(reason) => {
                    self.pools.remove(&pool);
                    self.skip(key, reason)
                }
            },
            (KeyRef::Pool { pool }, None) => {
                self.skipped.remove(key);
                self.pools.remove(&pool);
                None
            }
            (KeyRef::Address { pool, ip }, value) => {
                let state = self.pools.get_mut(&pool)?;
                if state.pool().subnet.contains(&ip) {
                    if value.is_some() {
                        state.mark(to_int(ip));
                    } else {
                        state.unmark(to_int(ip));
                    }
                }
                None
            }
            (KeyRef::Block { pool, block }, value) => {
                let index = self.pools.get(&pool)?.pool().block_index(&block)?;
                let (owner, skipped) = match value.map(block_owner) {
                    None => (None, None),
                    Some(Ok(node)) => (Some(node), None),
                    Some(Err(reason)) => {
                        (Some(UNREADABLE_OWNER.to_string()), self.skip(key, reason))
                    }
                };
                if let Some(state) = self.pools.get_mut(&pool) {
                    state.set_owner(index, owner.as_deref());
                }
                skipped
            }
            _ => None,
        }
    }

    /// Records that the record at `key` was skipped; Some the first time.
    pub fn skip(&mut self, key: &str, reason: String) -> Option<Skipped> {
        if self.skipped.contains_key(key) {
            return None;
        }
        self.skipped.insert(key.to_string(), reason.clone());
        Some(Skipped {
            key: key.to_string(),
            reason,
        })
    }

    /// Why the record at `key` is skipped, if it is.
    pub fn skipped(&self, key: &str) -> Option<&str> {
        self.skipped.get(key).map(String::as_str)
    }

    pub fn contains(&self, pool_id: &str) -> bool {
        self.pools.contains_key(pool_id)
    }

    pub fn get(&self, pool_id: &str) -> Option<&PoolState> {
        self.pools.get(pool_id)
    }

    pub fn get_mut(&mut self, pool_id: &str) -> Option<&mut PoolState> {
        self.pools.get_mut(pool_id)
    }

    /// The state of `pool`, made from its definition if the cache does not have it yet (the
    /// watch may not have delivered it, or a reload replaced the picture with a snapshot taken
    /// before it existed).
    pub fn state_of(&mut self, pool: &Pool) -> &mut PoolState {
        self.pools
            .entry(pool.id())
            .or_insert_with(|| new_state(Arc::new(pool.clone()), &self.node))
    }

    /// Starts following block `index` of `pool`, whose addresses etcd held as `held` at
    /// `revision`; the watch is to deliver what changes after it ([`PoolCache::take_unwatched`]).
    /// Returns false, and changes nothing, if the block was followed already.
    pub fn follow(
        &mut self,
        pool: &Pool,
        index: u128,
        held: impl IntoIterator<Item = std::net::IpAddr>,
        revision: i64,
    ) -> bool {
        let state = self.state_of(pool);
        if state.follows(index) {
            return false;
        }
        state.follow(index, held.into_iter().map(to_int));
        self.unwatched.push((pool.id(), Some(index), revision));
        true
    }

    /// Starts following every address of `pool`, of which etcd held `held` at `revision`.
    /// Returns false, and changes nothing, if the pool was followed whole already.
    pub fn follow_whole(
        &mut self,
        pool: &Pool,
        held: impl IntoIterator<Item = std::net::IpAddr>,
        revision: i64,
    ) -> bool {
        let state = self.state_of(pool);
        if state.follows_all() {
            return false;
        }
        state.follow_all(held.into_iter().map(to_int));
        self.unwatched.push((pool.id(), None, revision));
        true
    }

    /// What was followed since the last call, with the revision each was read at.
    pub fn take_unwatched(&mut self) -> Vec<(String, Option<u128>, i64)> {
        std::mem::take(&mut self.unwatched)
    }

    /// The id of every pool.
    pub fn pool_ids(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// This node's blocks whose addresses it does not follow yet.
    pub fn own_unfollowed(&self) -> Vec<(Arc<Pool>, u128)> {
        self.pools
            .values()
            .flat_map(|state| {
                state
                    .own_blocks()
                    .filter(|&b| !state.follows(b))
                    .map(|b| (Arc::clone(state.pool()), b))
            })
            .collect()
    }

    /// The pools followed whole.
    pub fn followed_whole(&self) -> Vec<String> {
        self.pools
            .iter()
            .filter(|(_, state)| state.follows_all())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Unmarks an address released here, without waiting for the watch.
    pub fn unmark(&mut self, pool_id: &str, ip: std::net::IpAddr) {
        if let Some(state) = self.pools.get_mut(pool_id) {
            state.unmark(to_int(ip));
        }
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Each pool's subnet and usage, ordered by subnet.
    pub fn usage(&self) -> Vec<(String, crate::blocks::Usage)> {
        let mut all: Vec<_> = self
            .pools
            .values()
            .map(|state| (state.pool().subnet.to_string(), state.usage()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

/// The pool a record at `key` defines: decoded, checked with the rules of a config, and
/// defining the subnet its key names.
pub fn decode_pool(keys: &Keys, key: &str, value: &[u8]) -> Result<Pool, String> {
    let record: PoolRecord = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let pool = record.to_pool()?;
    if key != keys.pool(&pool.id()) {
        return Err(format!(
            "defines subnet {} under another subnet's key",
            pool.subnet
        ));
    }
    Ok(pool)
}

/// The node a block claim names.
pub fn block_owner(value: &[u8]) -> Result<String, String> {
    serde_json::from_slice::<BlockRecord>(value)
        .map(|r| r.node)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::Next;
    use crate::pool::parse_range_sets;
    use crate::records::RECORD_VERSION;
    use serde_json::json;

    const PREFIX: &str = "/p";

    fn keys() -> Keys {
        Keys::new(PREFIX)
    }

    fn pool(subnet: &str) -> Pool {
        let sets = parse_range_sets(&json!({"subnet": subnet, "blockSize": 28})).expect("valid");
        sets[0].pools[0].clone()
    }

    fn pool_value(pool: &Pool) -> Vec<u8> {
        serde_json::to_vec(&PoolRecord::from_pool(pool)).expect("encodes")
    }

    fn block_value(node: &str) -> Vec<u8> {
        serde_json::to_vec(&BlockRecord {
            version: RECORD_VERSION,
            node: node.into(),
        })
        .expect("encodes")
    }

    /// Loads a snapshot into `cache` as `allocator` does: definitions and claims applied to a
    /// fresh picture in key order (etcd's order), then this node's blocks followed with their
    /// addresses; the picture then replaces the pools.
    fn load(cache: &mut PoolCache, snapshot: &[(&str, &[u8])]) -> Vec<Skipped> {
        let mut snapshot = snapshot.to_vec();
        snapshot.sort();
        let mut fresh = PoolCache::new(keys(), "node-a");
        let mut held = Vec::new();
        for &(key, value) in &snapshot {
            match keys().parse(key) {
                Some(KeyRef::Address { ip, .. }) => held.push(ip),
                _ => {
                    fresh.apply(Change::Put { key, value });
                }
            }
        }
        for (pool, block) in fresh.own_unfollowed() {
            fresh.follow(&pool, block, held.clone(), 1);
        }
        cache.replace(fresh)
    }

    /// The claim of block 10.0.0.0/28 (10.0.0.0–15) by this node.
    fn own_claim() -> (String, Vec<u8>) {
        let block = "10.0.0.0/28".parse().expect("literal");
        (keys().block("10.0.0.0_24", &block), block_value("node-a"))
    }

    /// A cache loaded with one /24 pool of /28 blocks.
    fn loaded(extra: &[(&str, &[u8])]) -> (PoolCache, Pool, Vec<Skipped>) {
        let p = pool("10.0.0.0/24");
        let def = pool_value(&p);
        let pool_key = keys().pool(&p.id());
        let mut snapshot: Vec<(&str, &[u8])> = extra.to_vec();
        snapshot.push((pool_key.as_str(), def.as_slice()));
        let mut cache = PoolCache::new(keys(), "node-a");
        let skipped = load(&mut cache, &snapshot);
        (cache, p, skipped)
    }

    #[test]
    fn a_load_marks_held_addresses_and_claimed_blocks() {
        let block_key = keys().block("10.0.0.0_24", &"10.0.0.0/28".parse().expect("literal"));
        let ip_key = keys().address("10.0.0.0_24", "10.0.0.2".parse().expect("literal"));
        let owner = block_value("node-a");
        let (mut cache, p, skipped) =
            loaded(&[(&block_key, &owner), (&ip_key, b"held, value not read")]);
        assert_eq!(skipped, vec![]);
        let state = cache.get_mut(&p.id()).expect("pool loaded");
        assert_eq!(
            state.next_address(),
            Next::Address(to_int("10.0.0.3".parse().expect("literal"))),
            "10.0.0.2 is held and block 0 is this node's"
        );
    }

    #[test]
    fn a_pools_definition_sorts_before_its_blocks_and_addresses() {
        // A load applies keys in etcd's order: a pool must be known before its records.
        let (pool, block) = ("10.0.0.0_24", "10.0.0.0/28".parse().expect("literal"));
        let def = keys().pool(pool);
        assert!(def < keys().block(pool, &block));
        assert!(def < keys().address(pool, "10.0.0.2".parse().expect("literal")));
    }

    #[test]
    fn a_reload_replaces_the_picture() {
        let ip_key = keys().address("10.0.0.0_24", "10.0.0.2".parse().expect("literal"));
        let (claim, owner) = own_claim();
        let (mut cache, p, _) = loaded(&[(&ip_key, b"held"), (&claim, &owner)]);
        let def = pool_value(&p);
        assert_eq!(
            load(
                &mut cache,
                &[(&keys().pool(&p.id()), &def), (&claim, &owner)]
            ),
            vec![]
        );
        let state = cache.get_mut(&p.id()).expect("pool loaded");
        assert!(
            state.mark(to_int("10.0.0.2".parse().expect("literal"))),
            "10.0.0.2 is free in the new snapshot"
        );
    }

    #[test]
    fn a_reload_forgets_a_bad_record_deleted_meanwhile_and_reports_a_kept_one_once() {
        let bad_pool = keys().pool("10.9.0.0_24");
        let (mut cache, p, skipped) = loaded(&[(&bad_pool, b"not json")]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        let def = pool_value(&p);
        let good = keys().pool(&p.id());
        assert_eq!(
            load(&mut cache, &[(&good, &def), (&bad_pool, b"not json")]),
            vec![],
            "still bad: not reported again"
        );
        assert!(cache.skipped(&bad_pool).is_some());
        assert_eq!(load(&mut cache, &[(&good, &def)]), vec![]);
        assert_eq!(cache.skipped(&bad_pool), None, "deleted while not watched");
    }

    #[test]
    fn addresses_of_blocks_not_followed_are_ignored_until_followed() {
        let other = "10.0.0.16/28".parse().expect("literal");
        let claim = keys().block("10.0.0.0_24", &other);
        let theirs = block_value("node-b");
        let (mut cache, p, _) = loaded(&[(&claim, &theirs)]);
        let ip: std::net::IpAddr = "10.0.0.20".parse().expect("literal");
        let ip_key = keys().address(&p.id(), ip);
        cache.apply(Change::Put {
            key: &ip_key,
            value: b"{}",
        });
        let held = |c: &PoolCache| c.get(&p.id()).expect("pool").usage().held;
        assert_eq!(held(&cache), 0, "another node's block is not followed");
        assert_eq!(cache.take_unwatched(), vec![]);
        assert!(cache.follow(&p, 1, [ip], 7));
        assert!(!cache.follow(&p, 1, [ip], 8), "followed once");
        assert_eq!(held(&cache), 1);
        assert_eq!(cache.take_unwatched(), vec![(p.id(), Some(1), 7)]);
        assert!(cache.follow_whole(&p, [ip], 9));
        assert!(!cache.follow_whole(&p, [], 10), "followed whole once");
        assert_eq!(cache.take_unwatched(), vec![(p.id(), None, 9)]);
        cache.apply(Change::Delete { key: &ip_key });
        assert_eq!(held(&cache), 0, "the watch now changes it");
    }

    #[test]
    fn each_change_is_applied_and_a_delete_undoes_a_put() {
        let (claim, owner) = own_claim();
        let (mut cache, p, _) = loaded(&[(&claim, &owner)]);
        let ip_key = keys().address(&p.id(), "10.0.0.9".parse().expect("literal"));
        let n = to_int("10.0.0.9".parse().expect("literal"));
        let cases: [(Change, bool); 3] = [
            (
                Change::Put {
                    key: &ip_key,
                    value: b"{}",
                },
                false,
            ),
            (Change::Delete { key: &ip_key }, true),
            (
                Change::Put {
                    key: &ip_key,
                    value: b"{}",
                },
                false,
            ),
        ];
        for (change, free_after) in cases {
            assert_eq!(cache.apply(change), None);
            let state = cache.get_mut(&p.id()).expect("pool");
            // A free address can be marked (true); a held one cannot (false).
            let was_free = state.mark(n);
            if was_free {
                state.unmark(n);
            }
            assert_eq!(was_free, free_after, "{change:?}");
        }
        assert_eq!(
            cache.apply(Change::Delete {
                key: &keys().pool(&p.id())
            }),
            None
        );
        assert!(cache.is_empty(), "deleting the definition forgets the pool");
    }

    #[test]
    fn an_invalid_pool_record_is_skipped_once_and_affects_only_its_pool() {
        let bad_key = keys().pool("10.1.0.0_24");
        let bad = json!({"version": 1, "subnet": "10.1.0.0/24", "gateway": "10.1.0.1",
            "ranges": [["10.1.0.2", "10.1.0.254"]], "blockSize": 40})
        .to_string();
        let (mut cache, p, skipped) = loaded(&[(&bad_key, bad.as_bytes())]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].key, bad_key);
        assert!(skipped[0].reason.contains("blockSize"), "{skipped:?}");
        assert!(cache.contains(&p.id()) && !cache.contains("10.1.0.0_24"));
        assert!(cache.skipped(&bad_key).is_some());
        let again = load(&mut cache, &[(bad_key.as_str(), bad.as_bytes())]);
        assert_eq!(again, vec![], "a reload does not report it again");
        // Fixed: usable, no longer skipped.
        let fixed = pool_value(&pool("10.1.0.0/24"));
        assert_eq!(
            cache.apply(Change::Put {
                key: &bad_key,
                value: &fixed
            }),
            None
        );
        assert!(cache.contains("10.1.0.0_24") && cache.skipped(&bad_key).is_none());
    }

    #[test]
    fn a_pool_record_under_another_subnets_key_is_skipped() {
        let wrong_key = keys().pool("10.2.0.0_24");
        let value = pool_value(&pool("10.3.0.0/24"));
        let mut cache = PoolCache::new(keys(), "node-a");
        let skipped = load(&mut cache, &[(wrong_key.as_str(), value.as_slice())]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].reason.contains("another subnet's key"));
        assert!(cache.is_empty());
    }

    #[test]
    fn an_unreadable_block_claim_is_nobody_s_and_never_free() {
        let b0 = keys().block("10.0.0.0_24", &"10.0.0.0/28".parse().expect("literal"));
        let (mut cache, p, skipped) = loaded(&[(&b0, b"garbage")]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].key, b0);
        let state = cache.get_mut(&p.id()).expect("pool");
        assert_eq!(
            state.next_address(),
            Next::Claim(1),
            "block 0 is not offered for claiming"
        );
    }

    #[test]
    fn keys_of_unknown_pools_and_foreign_keys_change_nothing() {
        let (mut cache, _, _) = loaded(&[]);
        let other = keys().address("10.9.0.0_24", "10.9.0.5".parse().expect("literal"));
        for key in [other.as_str(), "/p/pools/x/unknown/y", "/elsewhere/pools/z"] {
            assert_eq!(cache.apply(Change::Put { key, value: b"{}" }), None);
        }
        assert_eq!(cache.len(), 1);
    }
}
