//! Following etcd: the first load of the pools, the watch that keeps the pool cache current,
//! and a reload whenever the watch fails or falls behind a compaction.
//!
//! A daemon follows only what it needs to allocate: the pool index, each pool's definition and
//! block claims, and the addresses of the blocks it follows (its own, and those it borrowed
//! from; every address of a pool followed whole). An address taken or freed in another node's
//! block costs it nothing. Each of these is a key range, read at some revision and then watched
//! from the next one, all on one watch stream; a block followed later (claimed, or needed to
//! borrow from) is read and added to the stream the same way.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    EventType, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};

use super::{decode, Inner};
use crate::blocks::Next;
use crate::cache::{Change, PoolCache, Skipped};
use crate::error::{IpamError, Result};
use crate::pool::{pool_id, Pool};
use crate::records::{KeyRef, PoolIndex};
use crate::store::PAGE;

/// Range reads per transaction when blocks are read together (etcd allows 128 operations).
const BLOCK_READS: usize = 100;

/// How long the watch may be quiet before it asks etcd for its current revision.
const IDLE_PROGRESS: Duration = Duration::from_secs(1);

/// A key range the watch follows (`end` empty: one key), from revision `from` on.
#[derive(Debug, Clone)]
pub(super) struct Unit {
    start: Vec<u8>,
    end: Vec<u8>,
    from: i64,
}

/// What a load read: the pools whose definitions and claims it read, those whose every address
/// it read, and the ranges to watch.
pub(super) struct Loaded {
    pools: HashSet<String>,
    whole: HashSet<String>,
    units: Vec<Unit>,
}

impl Inner {
    pub(super) async fn wait_synced(&self) -> Result<()> {
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

    /// Loads every pool, then follows the watch; reloads after any watch failure.
    pub(super) async fn follow(self: Arc<Self>) {
        let mut delay = Duration::from_millis(50);
        loop {
            let loaded = match self.load().await {
                Ok(loaded) => loaded,
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
            if let Err(e) = self.watch(loaded).await {
                tracing::warn!(error = %e, "watch on pools ended; reloading");
                crate::metrics::watch_reload();
                self.watch_reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Rebuilds the in-memory state from etcd into a fresh picture that replaces the current
    /// one once complete: requests use the old picture until then. Reads the pool index, each
    /// pool's definition and claims, and the addresses of this node's blocks (of every block
    /// of a pool followed whole).
    pub(super) async fn load(&self) -> Result<Loaded> {
        let mut fresh = PoolCache::new(self.keys.clone(), &self.node);
        let index_key = self.keys.pool_index();
        let resp = self
            .store
            .get("load the pool index", &index_key, None)
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut units = vec![Unit {
            start: index_key.clone().into_bytes(),
            end: Vec::new(),
            from: revision + 1,
        }];
        let subnets = match resp.kvs().first() {
            // No pool yet, or an index deleted by hand: the pool records say.
            None => self.rebuild_pool_index().await?.subnets,
            Some(kv) => match decode::<PoolIndex>(kv) {
                Ok(index) => index.subnets,
                Err(e) => {
                    self.skip_once(&index_key, &e.to_string());
                    self.rebuild_pool_index().await?.subnets
                }
            },
        };
        // Records skipped here are reported by `replace`, once.
        let mut pools = HashSet::new();
        for subnet in &subnets {
            let id = pool_id(subnet);
            units.push(
                self.read_definition_and_blocks(&id, |kvs| drop(apply_all(&mut fresh, kvs)))
                    .await?,
            );
            pools.insert(id);
        }
        let whole: HashSet<String> = fresh.followed_whole().into_iter().collect();
        for id in &whole {
            units.push(
                self.read_addresses(id, |kvs| drop(apply_all(&mut fresh, kvs)))
                    .await?,
            );
        }
        let own = fresh.own_unfollowed();
        for ((pool, index), (revision, held)) in own.iter().zip(self.read_blocks(&own).await?) {
            fresh.follow(pool, *index, held, revision);
        }
        let (skipped, loaded) = {
            let mut cache = self.lock_pools();
            (cache.replace(fresh), cache.len())
        };
        log_all(skipped);
        tracing::info!(
            pools = loaded,
            own_blocks = own.len(),
            revision,
            "pools loaded from etcd"
        );
        Ok(Loaded {
            pools,
            whole,
            units,
        })
    }

    /// Reads the definition and block claims of pool `id`, giving them to `apply` page by
    /// page. Returns the range to watch.
    async fn read_definition_and_blocks(
        &self,
        id: &str,
        apply: impl FnMut(Vec<KeyValue>),
    ) -> Result<Unit> {
        self.read_unit(self.keys.definition_and_blocks(id), false, apply)
            .await
    }

    /// Reads every address of pool `id` (keys only), giving them to `apply` page by page.
    /// Returns the range to watch.
    async fn read_addresses(&self, id: &str, apply: impl FnMut(Vec<KeyValue>)) -> Result<Unit> {
        self.read_unit(self.keys.all_addresses(id), true, apply)
            .await
    }

    /// Reads the key range `[start, end)` at one revision, giving it to `apply` page by page.
    async fn read_unit(
        &self,
        (start, end): (Vec<u8>, Vec<u8>),
        keys_only: bool,
        apply: impl FnMut(Vec<KeyValue>),
    ) -> Result<Unit> {
        let revision = self
            .store
            .for_each_page_in((&start, &end), PAGE, |_, _| keys_only, apply)
            .await?;
        Ok(Unit {
            start,
            end,
            from: revision + 1,
        })
    }

    /// The addresses etcd holds in each of `blocks`, and the revision each was read at:
    /// keys-only range reads, as many blocks to a transaction as fit in [`BLOCK_READS`].
    async fn read_blocks(&self, blocks: &[(Arc<Pool>, u128)]) -> Result<Vec<(i64, Vec<IpAddr>)>> {
        let mut read = Vec::with_capacity(blocks.len());
        let mut next = 0;
        while next < blocks.len() {
            let first = next;
            let mut reads = Vec::new();
            // For each read, the block of this transaction it is for.
            let mut block_of = Vec::new();
            while let Some((pool, index)) = blocks.get(next) {
                let Some(ranges) = self.block_reads(pool, *index) else {
                    return Err(IpamError::NotSynced(format!(
                        "block {} cannot be followed alone",
                        pool.block_cidr(*index)
                    )));
                };
                if !reads.is_empty() && reads.len() + ranges.len() > BLOCK_READS {
                    break;
                }
                block_of.extend(std::iter::repeat_n(next - first, ranges.len()));
                reads.extend(ranges);
                next += 1;
            }
            let op = format!("read the addresses of {} blocks", next - first);
            let resp = self.store.txn(&op, Txn::new().and_then(reads)).await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            let mut held = vec![Vec::new(); next - first];
            for (op, &block) in resp.op_responses().iter().zip(&block_of) {
                held[block].extend(self.addresses_read(op));
            }
            read.extend(held.into_iter().map(|held| (revision, held)));
        }
        Ok(read)
    }

    /// Follows what picking asked for ([`Next::Follow`], [`Next::FollowAll`]): reads the
    /// addresses, then the watch delivers what changes after them.
    pub(super) async fn follow_for(&self, pool: &Arc<Pool>, next: Next) -> Result<()> {
        let followed = match next {
            Next::Follow(index) => {
                let block = [(Arc::clone(pool), index)];
                let Some((revision, held)) = self.read_blocks(&block).await?.pop() else {
                    return Ok(());
                };
                self.lock_pools().follow(pool, index, held, revision)
            }
            _ => {
                let mut held = Vec::new();
                let unit = self
                    .read_addresses(&pool.id(), |kvs| {
                        held.extend(kvs.iter().filter_map(|kv| self.address_of(kv)))
                    })
                    .await?;
                let followed = self.lock_pools().follow_whole(pool, held, unit.from - 1);
                if followed {
                    tracing::info!(pool = %pool.subnet, "borrowing: following every address of the pool");
                }
                followed
            }
        };
        if followed {
            self.follow_added.notify_one();
        }
        Ok(())
    }

    /// The keys-only range reads of block `index`'s addresses; None for a block that cannot be
    /// followed alone (see [`crate::records::Keys::block_addresses`]).
    pub(super) fn block_reads(&self, pool: &Pool, index: u128) -> Option<Vec<TxnOp>> {
        let ranges = self
            .keys
            .block_addresses(&pool.id(), &pool.block_cidr(index))?;
        let read = |(start, end)| {
            let options = GetOptions::new().with_range(end).with_keys_only();
            TxnOp::get(start, Some(options))
        };
        Some(ranges.into_iter().map(read).collect())
    }

    /// The addresses one of [`Inner::block_reads`]'s reads found.
    pub(super) fn addresses_read<'a>(
        &'a self,
        op: &'a TxnOpResponse,
    ) -> impl Iterator<Item = IpAddr> + 'a {
        let kvs = match op {
            TxnOpResponse::Get(get) => get.kvs(),
            _ => &[],
        };
        kvs.iter().filter_map(|kv| self.address_of(kv))
    }

    /// The address an address record's key names.
    fn address_of(&self, kv: &KeyValue) -> Option<IpAddr> {
        match self.keys.parse(kv.key_str().ok()?)? {
            KeyRef::Address { ip, .. } => Some(ip),
            _ => None,
        }
    }

    /// Watches what `loaded` names, and everything followed since, applying each change to
    /// the cache. A pool that appears in the pool index, or in the cache by another way (a
    /// record the index does not name), is read and added.
    pub(super) async fn watch(&self, loaded: Loaded) -> Result<()> {
        let Loaded {
            mut pools,
            mut whole,
            units,
        } = loaded;
        let index_key = self.keys.pool_index();
        let first = units[0].clone();
        let mut stream = self
            .store
            .retry("watch pools", |mut c| {
                let first = first.clone();
                async move {
                    c.watch(first.start.clone(), Some(watch_options(&first)))
                        .await
                }
            })
            .await?;
        for unit in &units[1..] {
            add(&mut stream, unit).await?;
        }
        // A request notes the revision it arrives at (`Store::seen_revision`), and a DEL made
        // through another daemon is newer than an ADD that notes an old one: a daemon whose
        // watch is quiet asks etcd for its revision now and then.
        let mut idle =
            tokio::time::interval_at(tokio::time::Instant::now() + IDLE_PROGRESS, IDLE_PROGRESS);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.watch_followed(Vec::new(), &mut pools, &mut whole, &mut stream)
            .await?;
        loop {
            let resp = tokio::select! {
                msg = stream.message() => msg.map_err(watch_failed)?,
                () = self.follow_added.notified() => {
                    self.watch_followed(Vec::new(), &mut pools, &mut whole, &mut stream)
                        .await?;
                    continue;
                }
                _ = idle.tick() => {
                    stream.request_progress().await.map_err(watch_failed)?;
                    continue;
                }
            };
            idle.reset();
            let Some(resp) = resp else {
                return Err(IpamError::NotSynced("watch stream closed".into()));
            };
            if resp.canceled() {
                return Err(IpamError::NotSynced(format!(
                    "watch canceled (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            self.store.saw(resp.header());
            let events = resp.events().len();
            self.watch_events
                .fetch_add(events as u64, std::sync::atomic::Ordering::Relaxed);
            crate::metrics::watch_events(events);
            let mut skipped = Vec::new();
            let mut index = None;
            {
                let mut cache = self.lock_pools();
                for event in resp.events() {
                    let Some((kv, key)) = event.kv().and_then(|kv| Some((kv, kv.key_str().ok()?)))
                    else {
                        continue;
                    };
                    let change = match event.event_type() {
                        EventType::Put if key == index_key => {
                            index = Some(kv.clone());
                            continue;
                        }
                        EventType::Put => Change::Put {
                            key,
                            value: kv.value(),
                        },
                        EventType::Delete => Change::Delete { key },
                    };
                    skipped.extend(cache.apply(change));
                }
            }
            log_all(skipped);
            if let Some(kv) = index {
                let listed = self.listed_pools(&kv);
                self.watch_followed(listed, &mut pools, &mut whole, &mut stream)
                    .await?;
            }
        }
    }

    /// Adds to the stream what was followed since it last looked: blocks, then pools (those of
    /// the cache and `listed`) whose definitions and claims are not watched yet, then pools
    /// followed whole. Called at the start, when a follow is added, and when the pool index
    /// changes: nothing else adds to what is followed.
    async fn watch_followed(
        &self,
        listed: Vec<String>,
        pools: &mut HashSet<String>,
        whole: &mut HashSet<String>,
        stream: &mut WatchStream,
    ) -> Result<()> {
        let (unwatched, mut known) = {
            let mut cache = self.lock_pools();
            (cache.take_unwatched(), cache.pool_ids())
        };
        known.extend(listed);
        for (id, index, revision) in unwatched {
            let from = revision + 1;
            let ranges = match index {
                None if whole.insert(id.clone()) => vec![self.keys.all_addresses(&id)],
                None => Vec::new(),
                Some(index) => {
                    let Some(pool) = self.lock_pools().get(&id).map(|s| Arc::clone(s.pool()))
                    else {
                        continue;
                    };
                    let cidr = pool.block_cidr(index);
                    self.keys.block_addresses(&id, &cidr).unwrap_or_default()
                }
            };
            for (start, end) in ranges {
                add(stream, &Unit { start, end, from }).await?;
            }
        }
        let live = |kvs| log_all(apply_all(&mut self.lock_pools(), kvs));
        for id in known {
            if pools.insert(id.clone()) {
                add(stream, &self.read_definition_and_blocks(&id, live).await?).await?;
            }
        }
        // After the definitions: an IPv6 pool just read is followed whole.
        let followed_whole = self.lock_pools().followed_whole();
        for id in followed_whole {
            if whole.insert(id.clone()) {
                add(stream, &self.read_addresses(&id, live).await?).await?;
            }
        }
        Ok(())
    }

    /// The pools the pool index in `kv` lists; none if it does not decode (skipped, logged
    /// once).
    fn listed_pools(&self, kv: &KeyValue) -> Vec<String> {
        match decode::<PoolIndex>(kv) {
            Ok(index) => index.subnets.iter().map(pool_id).collect(),
            Err(e) => {
                self.skip_once(&self.keys.pool_index(), &e.to_string());
                Vec::new()
            }
        }
    }
}

fn watch_options(unit: &Unit) -> WatchOptions {
    let options = WatchOptions::new()
        .with_start_revision(unit.from)
        .with_progress_notify();
    if unit.end.is_empty() {
        options
    } else {
        options.with_range(unit.end.clone())
    }
}

/// A failure of the watch stream: retryable.
fn watch_failed(e: etcd_client::Error) -> IpamError {
    IpamError::Unavailable {
        op: "watch pools".into(),
        reason: crate::store::describe(&e),
    }
}

/// Adds a watch of `unit` to the stream.
async fn add(stream: &mut WatchStream, unit: &Unit) -> Result<()> {
    stream
        .watch(unit.start.clone(), Some(watch_options(unit)))
        .await
        .map_err(watch_failed)
}

/// Applies every key-value read to `cache` as a put. Returns the records skipped for the
/// first time.
fn apply_all(cache: &mut PoolCache, kvs: Vec<KeyValue>) -> Vec<Skipped> {
    kvs.iter()
        .filter_map(|kv| {
            cache.apply(Change::Put {
                key: kv.key_str().ok()?,
                value: kv.value(),
            })
        })
        .collect()
}

fn log_all(skipped: Vec<Skipped>) {
    skipped.into_iter().for_each(|s| log_skipped(Some(s)));
}

/// Logs a record skipped for the first time.
pub(super) fn log_skipped(skipped: Option<Skipped>) {
    if let Some(Skipped { key, reason }) = skipped {
        tracing::warn!(
            key,
            reason,
            "skipping a record that does not validate; `hostnic-ipamd audit` lists it"
        );
    }
}
