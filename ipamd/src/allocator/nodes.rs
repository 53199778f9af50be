//! What other nodes hold, for the GC of deleted nodes (`node_gc`): the nodes etcd knows (by
//! their attachment index and their block claims), one node's attachments, and giving back a
//! block claim whose block holds no address.

use std::collections::BTreeSet;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};
use ipnet::IpNet;

use super::{decode, got, Allocator, HeldAttachment, Inner};
use crate::addr::{from_int, to_int, Family};
use crate::cache::block_owner;
use crate::error::Result;
use crate::pool::pool_id;
use crate::records::{KeyRef, PoolIndex};
use crate::store::prefix_end;

/// A block claim as a listing found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockClaim {
    pub pool: String,
    pub block: IpNet,
    /// The node the claim names.
    pub node: String,
    /// The claim's mod revision: [`Allocator::give_back_block`] deletes only this one.
    pub revision: i64,
}

/// What became of a block claim given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveBack {
    /// Deleted: the block is free for any node to claim.
    Deleted,
    /// Kept: `held` addresses of the block are held.
    Holds { held: usize },
    /// The claim, or an address of its pool, changed since it was read: left for the next
    /// pass.
    Changed,
}

impl Allocator {
    /// Every node that has a key under `nodes/` (its attachment index, its NIC records): the
    /// keys alone, in bounded pages ([`crate::store::Store::for_each_page`]). Reading the next
    /// node's first key with a limit of one would be fewer keys, but etcd (3.4) walks the whole
    /// rest of the range to count each such read: nodes × keys in all.
    pub async fn indexed_nodes(&self) -> Result<BTreeSet<String>> {
        let inner = &self.inner;
        let prefix = format!("{}/nodes/", inner.keys.prefix());
        let mut nodes = BTreeSet::new();
        inner
            .store
            .for_each_page(
                &prefix,
                crate::store::PAGE,
                |_, _| true,
                |kvs| {
                    nodes.extend(kvs.iter().filter_map(|kv| {
                        let node = kv
                            .key()
                            .strip_prefix(prefix.as_bytes())?
                            .split(|b| *b == b'/')
                            .next()?;
                        (!node.is_empty()).then(|| String::from_utf8_lossy(node).into_owned())
                    }));
                },
            )
            .await?;
        Ok(nodes)
    }

    /// Every readable block claim of every pool in the pool index. A claim that does not
    /// decode names no node and is left out (`audit` names it).
    pub async fn block_claims(&self) -> Result<Vec<BlockClaim>> {
        let inner = &self.inner;
        let index_key = inner.keys.pool_index();
        let resp = inner
            .store
            .get("read the pool index", &index_key, None)
            .await?;
        let subnets = match resp.kvs().first() {
            Some(kv) => decode::<PoolIndex>(kv)?.subnets,
            None => Vec::new(),
        };
        let mut claims = Vec::new();
        for subnet in subnets {
            let pool = pool_id(&subnet);
            let prefix = format!("{}/pools/{pool}/blocks/", inner.keys.prefix());
            let (_, kvs) = inner.store.load_prefix(&prefix).await?;
            for kv in &kvs {
                let Some(KeyRef::Block { pool, block }) =
                    kv.key_str().ok().and_then(|k| inner.keys.parse(k))
                else {
                    continue;
                };
                if let Ok(node) = block_owner(kv.value()) {
                    claims.push(BlockClaim {
                        pool,
                        block,
                        node,
                        revision: kv.mod_revision(),
                    });
                }
            }
        }
        Ok(claims)
    }

    /// The attachments whose record names `node`, found through its index (and among the
    /// records of the earlier layout, which have none). Unreadable records are skipped:
    /// `audit` names them.
    pub async fn attachments_of(&self, node: &str) -> Result<Vec<HeldAttachment>> {
        self.inner.attachments_of(node, None).await
    }

    /// Deletes `claim` if its block holds no address: guarded by the claim being at the
    /// revision listed and by no address record of its pool having been written since the
    /// block was first read (so an address taken in the block meanwhile keeps the claim).
    pub async fn give_back_block(&self, claim: &BlockClaim) -> Result<GiveBack> {
        let inner = &self.inner;
        let family = Family::of(claim.block.network());
        let (first, last) = (
            to_int(claim.block.network()),
            to_int(claim.block.broadcast()),
        );
        // The block's own address keys, read by key: no scan of the pool.
        let keys: Vec<String> = (first..=last)
            .map(|n| inner.keys.address(&claim.pool, from_int(family, n)))
            .collect();
        let mut read_at = None;
        let mut held = 0;
        for chunk in keys.chunks(100) {
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::get(k.as_str(), Some(GetOptions::new().with_keys_only())))
                .collect();
            let resp = inner
                .store
                .txn(
                    &format!("read the addresses of block {}", claim.block),
                    Txn::new().and_then(reads),
                )
                .await?;
            read_at.get_or_insert(resp.header().map(|h| h.revision()).unwrap_or_default());
            held += (0..chunk.len())
                .filter(|&i| got(&resp, i).is_some())
                .count();
        }
        if held > 0 {
            return Ok(GiveBack::Holds { held });
        }
        let ips = format!("{}/pools/{}/ips/", inner.keys.prefix(), claim.pool);
        let ips_end = prefix_end(ips.as_bytes());
        let key = inner.keys.block(&claim.pool, &claim.block);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.as_str(), CompareOp::Equal, claim.revision),
                Compare::mod_revision(
                    ips.as_str(),
                    CompareOp::Less,
                    read_at.unwrap_or_default() + 1,
                )
                .with_range(ips_end),
            ])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let resp = inner
            .store
            .txn(&format!("give back block {}", claim.block), txn)
            .await?;
        Ok(if resp.succeeded() {
            GiveBack::Deleted
        } else {
            GiveBack::Changed
        })
    }
}

impl Inner {
    /// The attachments whose record names `node` (of `network` only, when given): the records
    /// its index lists, plus those of the earlier layout that name it. Costs `node`'s
    /// attachments, and one read of at most one key while no record of the earlier layout
    /// remains. Unreadable records are skipped: `audit` names them.
    pub(super) async fn attachments_of(
        &self,
        node: &str,
        network: Option<&str>,
    ) -> Result<Vec<HeldAttachment>> {
        let index = self.keys.node_attachments(node, network);
        let options = GetOptions::new()
            .with_range(prefix_end(index.as_bytes()))
            .with_keys_only();
        let listed = self
            .store
            .get(
                &format!("list the attachments of node {node}"),
                &index,
                Some(options),
            )
            .await?;
        let keys: Vec<String> = listed
            .kvs()
            .iter()
            .filter_map(|kv| match self.keys.parse(kv.key_str().ok()?) {
                Some(KeyRef::NodeAttachment { attachment, .. }) => {
                    Some(self.keys.attachment(&attachment))
                }
                _ => None,
            })
            .collect();
        let mut kvs = Vec::new();
        for chunk in keys.chunks(100) {
            let reads: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
            let resp = self
                .store
                .txn(
                    &format!("read the attachments of node {node}"),
                    Txn::new().and_then(reads),
                )
                .await?;
            kvs.extend((0..chunk.len()).filter_map(|i| got(&resp, i)));
        }
        kvs.extend(self.legacy_records().await?);
        Ok(kvs
            .iter()
            .filter_map(|kv| self.attachment_of_kv(kv))
            .filter(|h| h.record.node == node && network.is_none_or(|n| h.attachment.network == n))
            .collect())
    }

    /// Every record of the earlier layout. They name their node in the value only, so finding
    /// one node's means reading them all; but an upgraded cluster has none left, and then this
    /// is one read that finds no key.
    async fn legacy_records(&self) -> Result<Vec<KeyValue>> {
        let prefix = self.keys.legacy_handles();
        let first = GetOptions::new()
            .with_range(prefix_end(prefix.as_bytes()))
            .with_limit(1);
        let mut resp = self
            .store
            .get(
                "look for attachment records of the earlier layout",
                &prefix,
                Some(first),
            )
            .await?;
        if !resp.more() {
            return Ok(resp.take_kvs());
        }
        let (_, kvs) = self.store.load_prefix(&prefix).await?;
        Ok(kvs)
    }
}
