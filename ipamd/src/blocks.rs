//! In-memory free-address state of one pool, as seen by one node.
//!
//! A pool is cut into blocks (`blockSize`). Each block has a bitmap of the addresses that are
//! held (or being committed by this node), a count of the dynamic addresses still free, and the
//! node that claimed it. Choosing the next address costs a lookup in ordered sets of blocks
//! with free addresses plus a scan of one block's bitmap, whatever the size of the subnet or
//! the number of allocations.
//!
//! This state is a hint: etcd's compare-and-swap decides. An address marked free here that
//! another node took fails its CAS and gets marked; an address marked held that was released
//! comes back when the watch delivers the delete.
//!
//! A node follows (reads, then watches) the addresses of only some blocks: its own, and those
//! it borrows from. The bits of any other block say nothing, so such a block is never handed
//! out from: picking asks to follow it first ([`Next::Follow`]). A pool that cannot be followed
//! block by block (IPv6, whose address keys have no block order) is followed whole.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use crate::addr::AddrRange;
use crate::pool::Pool;

#[derive(Debug)]
struct Block {
    owner: Option<String>,
    /// Whether this node follows the block's addresses; if not, `held` is all clear and `free`
    /// counts every dynamic address: nothing is known.
    followed: bool,
    held: Vec<u64>,
    /// Dynamic addresses in this block that are not held.
    free: u32,
}

/// What the allocator should do next to hand out a dynamic address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// This address, in a block of this node; it is now marked held.
    Address(u128),
    /// This node has no free address in its blocks: claim this unclaimed block first.
    Claim(u128),
    /// No unclaimed block is left: this address of another node's block is free; it is now
    /// marked held.
    Borrow(u128),
    /// The addresses of this node's block must be followed before it can be picked from.
    Follow(u128),
    /// No unclaimed block is left, and another node's block this node does not follow may have
    /// a free address: follow the whole pool ([`PoolState::follow_all`]) to borrow from it.
    FollowAll,
    /// Every dynamic address of the pool is held.
    Exhausted,
}

/// Free-address state of one pool for one node.
///
/// Invariants, restored by [`PoolState::refresh`] after every change of a block's bits, owner
/// or following:
/// - `blocks[b].free` is the number of dynamic addresses of block `b` whose bit is clear, and
///   no bit is set in a block that is not followed;
/// - `any_free` is exactly the followed blocks with `free > 0`;
/// - `own_free` is exactly the blocks of `any_free` whose owner is this node;
/// - `own_unfollowed` is exactly this node's blocks that are not followed, and `others_unfollowed`
///   the blocks claimed by another node that are not followed and have a dynamic address;
/// - `claimed` is the number of blocks with an owner;
/// - every block below `claim_cursor` is claimed, or has no free dynamic address (a block that
///   loses its claim while it has a free address moves the cursor back to it).
///
/// A block is materialised (given a bitmap) when it is claimed or one of its addresses is
/// marked; blocks nobody touched cost nothing, so a /8 costs what a /24 does.
#[derive(Debug)]
pub struct PoolState {
    pool: Arc<Pool>,
    node: String,
    blocks: BTreeMap<u128, Block>,
    /// Blocks claimed by this node that have a free dynamic address.
    own_free: BTreeSet<u128>,
    /// Followed blocks that have a free dynamic address.
    any_free: BTreeSet<u128>,
    /// Blocks of this node whose addresses are not followed yet.
    own_unfollowed: BTreeSet<u128>,
    /// Blocks of other nodes whose addresses are not followed, that have a dynamic address.
    others_unfollowed: BTreeSet<u128>,
    /// Whether every block is followed (a pool followed whole).
    follows_all: bool,
    /// The last address handed out: dynamic allocation continues after it, as host-local does,
    /// so a released address is not handed out again at once.
    cursor: Option<u128>,
    /// See the invariants: where the search for a block to claim starts.
    claim_cursor: u128,
    /// The block being claimed ahead ([`PoolState::claim_ahead`]), until the claim is done.
    claiming_ahead: Option<u128>,
    /// How many blocks have an owner.
    claimed: u128,
}

impl PoolState {
    /// The state of a pool whose blocks are followed one by one, as [`PoolState::follow`]
    /// adds them.
    pub fn new(pool: Arc<Pool>, node: &str) -> Self {
        PoolState {
            pool,
            node: node.to_string(),
            blocks: BTreeMap::new(),
            own_free: BTreeSet::new(),
            any_free: BTreeSet::new(),
            own_unfollowed: BTreeSet::new(),
            others_unfollowed: BTreeSet::new(),
            follows_all: false,
            cursor: None,
            claim_cursor: 0,
            claiming_ahead: None,
            claimed: 0,
        }
    }

    /// The state of a pool whose every address is followed.
    pub fn following_all(pool: Arc<Pool>, node: &str) -> Self {
        PoolState {
            follows_all: true,
            ..PoolState::new(pool, node)
        }
    }

    pub fn follows_all(&self) -> bool {
        self.follows_all
    }

    /// Whether the addresses of block `index` are followed.
    pub fn follows(&self, index: u128) -> bool {
        self.follows_all || self.blocks.get(&index).is_some_and(|b| b.followed)
    }

    /// This node's blocks.
    pub fn own_blocks(&self) -> impl Iterator<Item = u128> + '_ {
        let node = Some(self.node.as_str());
        self.blocks
            .iter()
            .filter(move |(_, b)| b.owner.as_deref() == node)
            .map(|(&index, _)| index)
    }

    /// Starts following block `index`: `held` (addresses of the block, others are ignored) is
    /// what etcd holds of it now, and the watch will deliver what changes.
    pub fn follow(&mut self, index: u128, held: impl IntoIterator<Item = u128>) {
        let first = self.pool.block_first(index);
        let len = self.pool.block_len();
        let words = self.words();
        let mut bits = vec![0u64; words];
        let mut held_dynamic = 0;
        for n in held {
            if n < first || n - first >= len {
                continue;
            }
            let (word, bit) = word_bit(n - first);
            if bits[word] & bit == 0 {
                bits[word] |= bit;
                held_dynamic += u32::from(self.pool.is_dynamic(n));
            }
        }
        let free = self.count_dynamic(index) - held_dynamic;
        let block = self.block_mut(index);
        block.held = bits;
        block.free = free;
        block.followed = true;
        self.refresh(index);
    }

    /// Starts following every block: `held` is every address etcd holds in the pool now, and
    /// the watch will deliver what changes. What a node does once it must borrow: one read of
    /// the pool instead of one per block it looks into.
    pub fn follow_all(&mut self, held: impl IntoIterator<Item = u128>) {
        self.follows_all = true;
        let mut by_block: BTreeMap<u128, Vec<u128>> = BTreeMap::new();
        for n in held {
            by_block.entry(self.pool.block_of(n)).or_default().push(n);
        }
        let materialised: Vec<u128> = self.blocks.keys().copied().collect();
        for index in materialised {
            let held = by_block.remove(&index).unwrap_or_default();
            self.follow(index, held);
        }
        for (index, held) in by_block {
            self.follow(index, held);
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn words(&self) -> usize {
        self.pool.block_len().div_ceil(64) as usize
    }

    fn count_dynamic(&self, index: u128) -> u32 {
        let first = self.pool.block_first(index);
        (0..self.pool.block_len())
            .filter(|&o| self.pool.is_dynamic(first + o))
            .count() as u32
    }

    fn block_mut(&mut self, index: u128) -> &mut Block {
        if !self.blocks.contains_key(&index) {
            let free = self.count_dynamic(index);
            let block = Block {
                owner: None,
                followed: self.follows_all,
                held: vec![0; self.words()],
                free,
            };
            self.blocks.insert(index, block);
            self.refresh(index);
        }
        self.blocks.get_mut(&index).expect("inserted above")
    }

    /// Keeps the free-block sets in step with one block.
    fn refresh(&mut self, index: u128) {
        let Some(block) = self.blocks.get(&index) else {
            return;
        };
        let own = block.owner.as_deref() == Some(self.node.as_str());
        // Unfollowed, `free` counts every dynamic address: it may be free.
        let maybe_free = block.free > 0;
        let has_free = maybe_free && block.followed;
        let unclaimed = block.owner.is_none();
        let unfollowed = !block.followed;
        set_member(&mut self.any_free, index, has_free);
        set_member(&mut self.own_free, index, has_free && own);
        set_member(&mut self.own_unfollowed, index, unfollowed && own);
        set_member(
            &mut self.others_unfollowed,
            index,
            unfollowed && maybe_free && !own && !unclaimed,
        );
        if maybe_free && unclaimed && index < self.claim_cursor {
            self.claim_cursor = index;
        }
    }

    /// Records that `n` is held. Returns false if it already was, or if its block is not
    /// followed (nothing is recorded of such a block).
    pub fn mark(&mut self, n: u128) -> bool {
        let index = self.pool.block_of(n);
        let offset = n - self.pool.block_first(index);
        let dynamic = self.pool.is_dynamic(n);
        let block = self.block_mut(index);
        let (word, bit) = word_bit(offset);
        if !block.followed || block.held[word] & bit != 0 {
            return false;
        }
        block.held[word] |= bit;
        if dynamic {
            block.free -= 1;
        }
        self.refresh(index);
        true
    }

    /// Records that `n` is free. Returns false if it already was.
    pub fn unmark(&mut self, n: u128) -> bool {
        let index = self.pool.block_of(n);
        let offset = n - self.pool.block_first(index);
        let dynamic = self.pool.is_dynamic(n);
        let Some(block) = self.blocks.get_mut(&index) else {
            return false;
        };
        let (word, bit) = word_bit(offset);
        if block.held[word] & bit == 0 {
            return false;
        }
        block.held[word] &= !bit;
        if dynamic {
            block.free += 1;
        }
        self.refresh(index);
        true
    }

    #[cfg(test)]
    fn is_marked(&self, n: u128) -> bool {
        let index = self.pool.block_of(n);
        let offset = n - self.pool.block_first(index);
        self.blocks
            .get(&index)
            .is_some_and(|b| is_held(&b.held, offset))
    }

    /// The node that claimed block `index`, as far as this node knows.
    pub fn owner(&self, index: u128) -> Option<&str> {
        self.blocks.get(&index)?.owner.as_deref()
    }

    /// Records which node claimed block `index` (None: the claim was removed).
    pub fn set_owner(&mut self, index: u128, owner: Option<&str>) {
        let block = self.block_mut(index);
        let was_claimed = block.owner.is_some();
        block.owner = owner.map(str::to_string);
        self.claimed = self.claimed + u128::from(owner.is_some()) - u128::from(was_claimed);
        self.refresh(index);
    }

    /// First free dynamic address of block `index` at offset `from` or later.
    fn free_in(&self, index: u128, from: u128) -> Option<u128> {
        let block = self.blocks.get(&index)?;
        let first = self.pool.block_first(index);
        (from..self.pool.block_len()).find_map(|o| {
            (!is_held(&block.held, o) && self.pool.is_dynamic(first + o)).then_some(first + o)
        })
    }

    fn take(&mut self, n: u128) -> u128 {
        self.mark(n);
        self.cursor = Some(n);
        n
    }

    /// Chooses the next dynamic address: after the cursor in this node's blocks (once they are
    /// followed), else a block to claim, else an address to borrow from another node's block
    /// (once it is followed).
    pub fn next_address(&mut self) -> Next {
        if let Some(n) = self.next_own() {
            return Next::Address(self.take(n));
        }
        if let Some(&index) = self.own_unfollowed.first() {
            return Next::Follow(index);
        }
        if let Some(index) = self.next_unclaimed() {
            return Next::Claim(index);
        }
        if let Some(n) = self.any_free.iter().find_map(|&b| self.free_in(b, 0)) {
            return Next::Borrow(self.take(n));
        }
        if !self.others_unfollowed.is_empty() {
            return Next::FollowAll;
        }
        Next::Exhausted
    }

    /// The block to claim before this node's blocks fill, so that no ADD waits for a claim;
    /// once per block, until [`PoolState::claimed_ahead`]. Only while fewer than a quarter of a
    /// block's addresses are free in this node's blocks, none of them waits to be followed, and
    /// fewer than half of the pool's blocks are claimed: past half, blocks go only to the nodes
    /// that need them now, claimed by the ADD that finds no free address.
    pub fn claim_ahead(&mut self) -> Option<u128> {
        if self.claiming_ahead.is_some() || !self.own_unfollowed.is_empty() {
            return None;
        }
        // Every block of `own_free` has a free address, so the sum stops after at most a quarter
        // of a block's length of them, however many blocks this node owns.
        let mut free = 0;
        let enough_free = self.own_free.iter().any(|b| {
            free += u128::from(self.blocks[b].free);
            free * 4 >= self.pool.block_len()
        });
        if enough_free {
            return None;
        }
        let blocks: u128 = self
            .pool
            .dynamic_block_spans()
            .map(|(first, last)| (last - first).saturating_add(1))
            .sum();
        if self.claimed * 2 >= blocks {
            return None;
        }
        self.claiming_ahead = self.next_unclaimed();
        self.claiming_ahead
    }

    /// The claim ahead of block `index` is done, won, lost or failed.
    pub fn claimed_ahead(&mut self, index: u128) {
        if self.claiming_ahead == Some(index) {
            self.claiming_ahead = None;
        }
    }

    /// The first free dynamic address of this node's blocks after the cursor, wrapping around.
    /// Every block of `own_free` has one, so only the cursor's own block (free only before the
    /// cursor) can come up empty, and at most two blocks are looked at.
    fn next_own(&self) -> Option<u128> {
        let (block, offset) = match self.cursor {
            Some(c) => {
                let b = self.pool.block_of(c);
                (b, c - self.pool.block_first(b) + 1)
            }
            None => (0, 0),
        };
        if self.own_free.contains(&block) {
            if let Some(n) = self.free_in(block, offset) {
                return Some(n);
            }
        }
        let later = self
            .own_free
            .range((Bound::Excluded(block), Bound::Unbounded))
            .next();
        let next = later.or_else(|| self.own_free.first())?;
        self.free_in(*next, 0)
    }

    /// Whether a dynamic address may be free anywhere in the pool: one is free in a followed
    /// block, or some block that may have one is not followed.
    pub fn has_free(&mut self) -> bool {
        !self.any_free.is_empty()
            || !self.own_unfollowed.is_empty()
            || !self.others_unfollowed.is_empty()
            || self.next_unclaimed().is_some()
    }

    /// What to follow before this node can tell whether a dynamic address is free
    /// ([`Next::Follow`] or [`Next::FollowAll`]): None when one is known to be (in a followed
    /// block, or an unclaimed one) or every block that may have one is followed.
    pub fn to_follow(&mut self) -> Option<Next> {
        if !self.any_free.is_empty() || self.next_unclaimed().is_some() {
            return None;
        }
        match self.own_unfollowed.first() {
            Some(&index) => Some(Next::Follow(index)),
            None => (!self.others_unfollowed.is_empty()).then_some(Next::FollowAll),
        }
    }

    /// The first block at or after the claim cursor that nobody claimed and that has a free
    /// dynamic address.
    fn next_unclaimed(&mut self) -> Option<u128> {
        let spans: Vec<(u128, u128)> = self.pool.dynamic_block_spans().collect();
        for (first, last) in spans {
            let mut index = self.pool.skip_excluded_blocks(first.max(self.claim_cursor));
            while index <= last {
                let usable = match self.blocks.get(&index) {
                    Some(b) => b.owner.is_none() && b.free > 0,
                    None => self.count_dynamic(index) > 0,
                };
                if usable {
                    self.claim_cursor = index;
                    return Some(index);
                }
                let Some(next) = index.checked_add(1) else {
                    break;
                };
                index = self.pool.skip_excluded_blocks(next);
            }
            self.claim_cursor = self.claim_cursor.max(last.saturating_add(1));
        }
        None
    }
}

/// A pool's usage as one node's state shows it: what its metrics report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Addresses dynamic allocation may hand out ([`Pool::dynamic_size`]).
    pub size: u128,
    /// Addresses held in the blocks this node follows: dynamic ones and exact ones (fixed
    /// window, requested addresses).
    pub held: u128,
    /// Dynamic addresses known to be free: not held in the blocks this node follows, or in
    /// blocks nobody claimed. Another node's block that this node does not follow counts as
    /// not free.
    pub free: u128,
    /// Claimed blocks by the node that claimed them.
    pub blocks: BTreeMap<String, u64>,
}

impl PoolState {
    /// The pool's usage as far as this node follows it. Costs a walk over the blocks that are
    /// materialised (claimed, or holding an address), never over the subnet: for a scrape, not
    /// for the hot path.
    pub fn usage(&self) -> Usage {
        let mut usage = Usage {
            size: self.pool.dynamic_size(),
            ..Usage::default()
        };
        let mut held_dynamic: u128 = 0;
        for (&index, block) in &self.blocks {
            usage.held += block
                .held
                .iter()
                .map(|w| u128::from(w.count_ones()))
                .sum::<u128>();
            let unknown = !block.followed && block.owner.is_some();
            let free = if unknown { 0 } else { block.free };
            held_dynamic += u128::from(self.count_dynamic(index).saturating_sub(free));
            if let Some(owner) = &block.owner {
                *usage.blocks.entry(owner.clone()).or_default() += 1;
            }
        }
        usage.free = usage.size.saturating_sub(held_dynamic);
        usage
    }
}

/// Picking restricted to some addresses of the pool: a namespace's CIDRs without other
/// namespaces' (see `namespaces`). It looks up the free-block sets by the blocks that meet the
/// allowed addresses, so it costs what [`PoolState::next_address`] does plus a lookup per
/// allowed range; only a search for a block to claim walks the allowed blocks, from the pool's
/// first unclaimed one.
impl PoolState {
    /// Chooses the next dynamic address among `allowed` (sorted, merged, inside the pool): a
    /// free one of this node's blocks, else a block to claim, else one to borrow.
    pub fn next_address_in(&mut self, allowed: &[AddrRange]) -> Next {
        let own = meeting(&self.pool, &self.own_free, allowed)
            .find_map(|b| self.free_allowed(b, allowed));
        if let Some(n) = own {
            return Next::Address(self.take(n));
        }
        if let Some(b) = meeting(&self.pool, &self.own_unfollowed, allowed).next() {
            return Next::Follow(b);
        }
        // Every block before the pool's first unclaimed one is claimed or full.
        if let Some(floor) = self.next_unclaimed() {
            let unclaimed = self.blocks_meeting(allowed, floor).find(|&b| {
                self.blocks.get(&b).is_none_or(|x| x.owner.is_none())
                    && self.free_allowed(b, allowed).is_some()
            });
            if let Some(b) = unclaimed {
                return Next::Claim(b);
            }
        }
        let any = meeting(&self.pool, &self.any_free, allowed)
            .find_map(|b| self.free_allowed(b, allowed));
        if let Some(n) = any {
            return Next::Borrow(self.take(n));
        }
        if meeting(&self.pool, &self.others_unfollowed, allowed)
            .next()
            .is_some()
        {
            return Next::FollowAll;
        }
        Next::Exhausted
    }

    /// Whether a dynamic address among `allowed` may be free (blocks not followed may). A
    /// followed block with a free address is in `any_free`, so only when none is allowed are
    /// the allowed blocks walked, for one not followed.
    pub fn has_free_in(&self, allowed: &[AddrRange]) -> bool {
        meeting(&self.pool, &self.any_free, allowed)
            .any(|b| self.free_allowed(b, allowed).is_some())
            || self.blocks_meeting(allowed, 0).any(|b| {
                self.blocks.get(&b).is_none_or(|x| !x.followed)
                    && self.free_allowed(b, allowed).is_some()
            })
    }

    /// Blocks wholly inside `space` (sorted, merged, inside the pool) in which no address is
    /// known to be held and some is dynamic, in order: what a namespace may be given. At most
    /// `limit`. A block nobody claimed counts as empty unless this node follows it; one that
    /// another node claimed and this node does not follow is left out.
    pub fn empty_blocks_in(&self, space: &[AddrRange], limit: usize) -> Vec<u128> {
        self.blocks_meeting(space, 0)
            .filter(|&b| {
                let span = self.block_span(b);
                space
                    .iter()
                    .any(|r| r.first <= span.first && span.last <= r.last)
                    && self.blocks.get(&b).is_none_or(|x| {
                        // Another node's block this node does not follow: not known empty.
                        let unknown = !x.followed && x.owner.is_some();
                        !unknown && x.held.iter().all(|w| *w == 0)
                    })
                    && self.count_dynamic(b) > 0
            })
            .take(limit)
            .collect()
    }

    fn block_span(&self, index: u128) -> AddrRange {
        let first = self.pool.block_first(index);
        AddrRange::new(first, first.saturating_add(self.pool.block_len() - 1))
    }

    /// The blocks from `from` on that meet `allowed`, in order (a block two ranges share comes
    /// twice).
    fn blocks_meeting<'a>(
        &'a self,
        allowed: &'a [AddrRange],
        from: u128,
    ) -> impl Iterator<Item = u128> + 'a {
        allowed
            .iter()
            .flat_map(move |r| self.pool.block_of(r.first).max(from)..=self.pool.block_of(r.last))
    }

    /// The first dynamic address of block `index` in `allowed` that is not held.
    fn free_allowed(&self, index: u128, allowed: &[AddrRange]) -> Option<u128> {
        let span = self.block_span(index);
        let held = self.blocks.get(&index).map(|b| &b.held);
        allowed
            .iter()
            .filter(|r| r.overlaps(&span))
            .flat_map(|r| r.first.max(span.first)..=r.last.min(span.last))
            .find(|&n| self.pool.is_dynamic(n) && !held.is_some_and(|h| is_held(h, n - span.first)))
    }
}

/// The blocks of `set` that meet `allowed` (sorted, merged, inside `pool`), in order (a block
/// two ranges share comes twice).
fn meeting<'a>(
    pool: &'a Pool,
    set: &'a BTreeSet<u128>,
    allowed: &'a [AddrRange],
) -> impl Iterator<Item = u128> + 'a {
    allowed
        .iter()
        .flat_map(move |r| set.range(pool.block_of(r.first)..=pool.block_of(r.last)))
        .copied()
}

/// The word of a block's bitmap that holds `offset`, and the bit within it.
fn word_bit(offset: u128) -> (usize, u64) {
    ((offset / 64) as usize, 1u64 << (offset % 64))
}

fn is_held(held: &[u64], offset: u128) -> bool {
    let (word, bit) = word_bit(offset);
    held[word] & bit != 0
}

fn set_member(set: &mut BTreeSet<u128>, index: u128, member: bool) {
    if member {
        set.insert(index);
    } else {
        set.remove(&index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::to_int;
    use crate::pool::parse_range_sets;
    use serde_json::json;

    fn pool(config: serde_json::Value) -> Arc<Pool> {
        let sets = parse_range_sets(&config).expect("valid config");
        Arc::new(sets[0].pools[0].clone())
    }

    /// A pool followed whole, as a node that sees every address.
    fn state(config: serde_json::Value, node: &str) -> PoolState {
        PoolState::following_all(pool(config), node)
    }

    /// A pool followed block by block.
    fn by_blocks(config: serde_json::Value, node: &str) -> PoolState {
        PoolState::new(pool(config), node)
    }

    fn own_count(s: &PoolState) -> usize {
        s.own_blocks().count()
    }

    fn n(s: &str) -> u128 {
        to_int(s.parse().expect("literal"))
    }

    /// Drives `next` the way the allocator does, with every claim succeeding and every block
    /// followed found empty.
    fn allocate(s: &mut PoolState) -> Option<u128> {
        loop {
            match s.next_address() {
                Next::Address(a) | Next::Borrow(a) => return Some(a),
                Next::Claim(b) => {
                    let node = s.node.clone();
                    s.set_owner(b, Some(&node));
                }
                Next::Follow(b) => s.follow(b, []),
                Next::FollowAll => s.follow_all([]),
                Next::Exhausted => return None,
            }
        }
    }

    #[test]
    fn claims_a_block_then_hands_out_its_addresses_in_order() {
        let mut s = state(json!({"subnet": "10.0.0.0/24", "blockSize": 28}), "a");
        assert_eq!(s.next_address(), Next::Claim(0));
        s.set_owner(0, Some("a"));
        assert_eq!(
            s.next_address(),
            Next::Address(n("10.0.0.2")),
            "network and gateway are skipped"
        );
        assert_eq!(s.next_address(), Next::Address(n("10.0.0.3")));
    }

    #[test]
    fn the_next_block_is_claimed_ahead_once_a_quarter_of_a_block_is_left_free() {
        // /26 blocks: 64 addresses, 62 dynamic in the first (network and gateway).
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/22", "blockSize": 26}), "a");
        let mut asked = Vec::new();
        for i in 1..=62 {
            allocate(&mut s).expect("free");
            asked.extend(s.claim_ahead().map(|block| (i, block)));
        }
        assert_eq!(
            asked,
            [(47, 1)],
            "once, for the next block, when 62 − 47 = 15 are free (fewer than 64 / 4)"
        );
        s.claimed_ahead(1);
        assert_eq!(
            s.claim_ahead(),
            Some(1),
            "a claim that failed is asked again"
        );
        s.set_owner(1, Some("a"));
        s.follow(1, []);
        s.claimed_ahead(1);
        assert_eq!(s.claim_ahead(), None, "a whole free block is enough");
        assert_eq!(allocate(&mut s).map(|a| s.pool.block_of(a)), Some(1));
    }

    #[test]
    fn no_block_is_claimed_ahead_once_half_the_pool_is_claimed_or_a_block_waits_to_be_followed() {
        // Four /26 blocks, two claimed by other nodes.
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        s.set_owner(0, Some("b"));
        s.set_owner(1, Some("c"));
        for _ in 0..64 {
            allocate(&mut s).expect("free");
            assert_eq!(s.claim_ahead(), None, "half of the pool is claimed");
        }
        assert_eq!(allocate(&mut s).map(|a| s.pool.block_of(a)), Some(3));

        let mut t = by_blocks(json!({"subnet": "10.0.0.0/22", "blockSize": 26}), "a");
        for _ in 0..50 {
            allocate(&mut t).expect("free");
        }
        t.set_owner(5, Some("a"));
        assert_eq!(
            t.claim_ahead(),
            None,
            "an own block not followed yet may be free"
        );
        t.follow(5, []);
        assert_eq!(t.claim_ahead(), None, "it is");
    }

    #[test]
    fn a_claim_that_moves_or_is_removed_counts_once_toward_half_the_pool() {
        // Four /26 blocks: this node's first, then another node's.
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        for _ in 0..50 {
            allocate(&mut s).expect("free");
        }
        s.set_owner(1, Some("b"));
        assert_eq!(s.claim_ahead(), None, "two of four blocks are claimed");
        s.set_owner(1, Some("c"));
        assert_eq!(s.claim_ahead(), None, "still two: the claim moved");
        s.set_owner(1, None);
        s.set_owner(1, None);
        assert_eq!(
            s.claim_ahead(),
            Some(1),
            "one of four, however often the removal is seen"
        );
    }

    #[test]
    fn usage_counts_held_dynamic_and_fixed_addresses_and_blocks_by_node() {
        let mut s = state(
            json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.2", "rangeEnd": "10.0.0.199",
                   "fixedStart": "10.0.0.200", "fixedEnd": "10.0.0.250", "blockSize": 28}),
            "a",
        );
        assert_eq!(
            s.usage(),
            Usage {
                size: 198,
                held: 0,
                free: 198,
                blocks: BTreeMap::new()
            }
        );
        for _ in 0..3 {
            allocate(&mut s).expect("free");
        }
        assert!(s.mark(n("10.0.0.210")), "a fixed address");
        s.set_owner(5, Some("b"));
        let usage = s.usage();
        assert_eq!((usage.size, usage.held, usage.free), (198, 4, 195));
        assert_eq!(
            usage.blocks,
            BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 1)])
        );
        s.unmark(n("10.0.0.2"));
        assert_eq!((s.usage().held, s.usage().free), (3, 196));

        // A /8 costs what its materialised blocks cost.
        let mut big = state(json!({"subnet": "10.0.0.0/8", "blockSize": 24}), "a");
        allocate(&mut big).expect("free");
        let usage = big.usage();
        assert_eq!(usage.size, (1 << 24) - 3);
        assert_eq!((usage.held, usage.free), (1, (1 << 24) - 4));
    }

    #[test]
    fn a_released_address_is_not_reused_at_once() {
        let mut s = state(json!({"subnet": "10.0.0.0/24", "blockSize": 28}), "a");
        let first = allocate(&mut s).expect("free");
        let second = allocate(&mut s).expect("free");
        s.unmark(first);
        assert_eq!(allocate(&mut s), Some(second + 1));
    }

    #[test]
    fn hands_out_every_dynamic_address_once_then_reports_exhaustion() {
        let mut s = state(
            json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.64/28"], "blockSize": 27}),
            "a",
        );
        let mut seen = std::collections::HashSet::new();
        while let Some(a) = allocate(&mut s) {
            assert!(s.pool().is_dynamic(a));
            assert!(seen.insert(a), "{a} handed out twice");
        }
        assert_eq!(seen.len(), 256 - 3 - 16);
        assert_eq!(s.next_address(), Next::Exhausted);
        assert!(!s.has_free());
        s.unmark(n("10.0.0.200"));
        assert!(s.has_free());
        assert_eq!(allocate(&mut s), Some(n("10.0.0.200")));
    }

    #[test]
    fn wraps_around_to_free_addresses_before_the_cursor() {
        let mut s = state(json!({"subnet": "10.0.0.0/28", "blockSize": 28}), "a");
        while allocate(&mut s).is_some() {}
        s.unmark(n("10.0.0.5"));
        assert_eq!(allocate(&mut s), Some(n("10.0.0.5")));
    }

    #[test]
    fn skips_blocks_claimed_by_other_nodes_and_borrows_only_when_none_is_left() {
        let mut s = state(json!({"subnet": "10.0.0.0/26", "blockSize": 28}), "a");
        for b in 0..4 {
            s.set_owner(b, Some("b"));
        }
        s.set_owner(2, None);
        assert_eq!(s.next_address(), Next::Claim(2));
        s.set_owner(2, Some("b"));
        assert_eq!(s.next_address(), Next::Borrow(n("10.0.0.2")));
    }

    #[test]
    fn marks_from_other_nodes_are_skipped_and_fixed_addresses_do_not_count_as_free() {
        let mut s = state(
            json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.16", "fixedStart": "10.0.0.2",
                   "fixedEnd": "10.0.0.15", "blockSize": 28}),
            "a",
        );
        assert!(s.mark(n("10.0.0.5")), "fixed address marked");
        assert!(!s.mark(n("10.0.0.5")), "marking twice changes nothing");
        assert_eq!(
            s.next_address(),
            Next::Claim(1),
            "block 0 is all fixed window"
        );
        s.set_owner(1, Some("a"));
        s.mark(n("10.0.0.16"));
        assert_eq!(s.next_address(), Next::Address(n("10.0.0.17")));
        assert!(s.is_marked(n("10.0.0.17")));
    }

    /// kube-ipam's layout: no fixed window, a fixed address below the range, in a block it
    /// shares with dynamic addresses. Marking and unmarking it leaves the dynamic count alone,
    /// and dynamic allocation never hands it out.
    #[test]
    fn a_fixed_address_outside_the_ranges_is_held_without_touching_the_free_count() {
        let mut s = state(
            json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.20",
                   "blockSize": 28}),
            "a",
        );
        assert!(s.mark(n("10.0.0.5")));
        assert_eq!(s.blocks[&0].free, 6, "10.0.0.10-15 still free");
        assert_invariants(&s);
        let mut handed = Vec::new();
        while let Some(a) = allocate(&mut s) {
            handed.push(a);
        }
        assert_eq!(handed.len(), 11);
        assert!(!handed.contains(&n("10.0.0.5")));
        assert!(s.unmark(n("10.0.0.5")));
        assert_eq!(s.blocks[&0].free, 0);
        assert_eq!(s.next_address(), Next::Exhausted);
        assert_invariants(&s);
    }

    #[test]
    fn a_slash_eight_pool_materialises_only_the_blocks_it_uses() {
        let mut s = state(json!({"subnet": "10.0.0.0/8"}), "a");
        for _ in 0..200 {
            allocate(&mut s).expect("free");
        }
        assert_eq!(own_count(&s), 4);
        assert!(s.blocks.len() <= 5);
    }

    fn ranges(list: &[(&str, &str)]) -> Vec<AddrRange> {
        list.iter()
            .map(|(a, b)| AddrRange::new(n(a), n(b)))
            .collect()
    }

    /// Drives `next_address_in` the way the allocator does, with every claim succeeding.
    fn allocate_in(s: &mut PoolState, allowed: &[AddrRange]) -> Option<u128> {
        loop {
            match s.next_address_in(allowed) {
                Next::Address(a) | Next::Borrow(a) => return Some(a),
                Next::Claim(b) => {
                    let node = s.node.clone();
                    s.set_owner(b, Some(&node));
                }
                Next::Follow(b) => s.follow(b, []),
                Next::FollowAll => s.follow_all([]),
                Next::Exhausted => return None,
            }
        }
    }

    #[test]
    fn restricted_picking_hands_out_only_allowed_addresses_own_blocks_first_then_borrows() {
        let mut s = state(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        // Block 1 (10.0.0.64/26) without 10.0.0.96/28, which another namespace has.
        let allowed = ranges(&[("10.0.0.64", "10.0.0.95"), ("10.0.0.112", "10.0.0.127")]);
        let mut seen = Vec::new();
        while let Some(a) = allocate_in(&mut s, &allowed) {
            assert!(allowed.iter().any(|r| r.contains(a)), "{a} not allowed");
            assert!(!seen.contains(&a), "{a} twice");
            seen.push(a);
        }
        assert_eq!(seen.len(), 48);
        assert_eq!(own_count(&s), 1, "claimed only the block it was allowed");
        assert_invariants(&s);
        // Another node's block: borrowed only when nothing else is allowed and free.
        let mut s = state(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        s.set_owner(2, Some("b"));
        let allowed = ranges(&[("10.0.0.128", "10.0.0.191")]);
        assert_eq!(s.next_address_in(&allowed), Next::Borrow(n("10.0.0.128")));
        assert_eq!(s.next_address_in(&[]), Next::Exhausted);
        assert_invariants(&s);
    }

    #[test]
    fn empty_blocks_are_wholly_inside_the_space_and_hold_nothing() {
        let mut s = state(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        s.mark(n("10.0.0.70"));
        let space = ranges(&[("10.0.0.0", "10.0.0.191"), ("10.0.0.200", "10.0.0.255")]);
        assert_eq!(s.empty_blocks_in(&space, 10), vec![0, 2]);
        assert_eq!(s.empty_blocks_in(&space, 1), vec![0]);
        s.unmark(n("10.0.0.70"));
        assert_eq!(s.empty_blocks_in(&space, 10), vec![0, 1, 2]);
    }

    /// The invariants written on [`PoolState`], checked from scratch.
    fn assert_invariants(s: &PoolState) {
        let claimed = s.blocks.values().filter(|b| b.owner.is_some()).count();
        assert_eq!(s.claimed, claimed as u128, "claimed blocks");
        for (&b, block) in &s.blocks {
            let first = s.pool.block_first(b);
            let free = (0..s.pool.block_len())
                .filter(|&o| s.pool.is_dynamic(first + o) && !is_held(&block.held, o))
                .count() as u32;
            assert_eq!(block.free, free, "free count of block {b}");
            let followed = block.followed;
            assert!(
                followed || block.held.iter().all(|w| *w == 0),
                "bits in unfollowed block {b}"
            );
            assert_eq!(
                s.any_free.contains(&b),
                free > 0 && followed,
                "any_free of block {b}"
            );
            let own = block.owner.as_deref() == Some(s.node.as_str());
            assert_eq!(
                s.own_free.contains(&b),
                free > 0 && own && followed,
                "own_free of block {b}"
            );
            assert_eq!(
                s.own_unfollowed.contains(&b),
                own && !followed,
                "own_unfollowed of block {b}"
            );
            assert_eq!(
                s.others_unfollowed.contains(&b),
                !own && block.owner.is_some() && !followed && free > 0,
                "others_unfollowed of block {b}"
            );
            if b < s.claim_cursor {
                assert!(
                    block.owner.is_some() || free == 0,
                    "block {b} below the claim cursor"
                );
            }
        }
    }

    #[test]
    fn a_node_hands_out_from_its_block_only_once_it_follows_it() {
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        assert_eq!(s.next_address(), Next::Claim(0));
        s.set_owner(0, Some("a"));
        assert_eq!(s.next_address(), Next::Follow(0));
        assert!(
            !s.mark(n("10.0.0.9")),
            "nothing is recorded before the block is followed"
        );
        s.follow(0, [n("10.0.0.2"), n("10.0.0.3"), n("10.0.0.70")]);
        assert!(s.follows(0) && !s.follows(1));
        assert_eq!(s.next_address(), Next::Address(n("10.0.0.4")));
        assert_invariants(&s);
    }

    #[test]
    fn blocks_of_other_nodes_are_not_followed_and_count_as_not_free() {
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/24", "blockSize": 26}), "a");
        s.set_owner(1, Some("b"));
        assert!(
            !s.mark(n("10.0.0.70")),
            "the watch delivers nothing of it; a mark is ignored"
        );
        let usage = s.usage();
        assert_eq!((usage.held, usage.free), (0, 253 - 64));
        assert_eq!(
            s.next_address(),
            Next::Claim(0),
            "unclaimed blocks come first"
        );
        assert_invariants(&s);
    }

    #[test]
    fn borrowing_follows_the_whole_pool_once() {
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/26", "blockSize": 28}), "a");
        for b in 0..3 {
            s.set_owner(b, Some("b"));
        }
        s.set_owner(3, Some("a"));
        assert!(s.has_free(), "blocks not followed may have a free address");
        assert_eq!(s.to_follow(), Some(Next::Follow(3)), "its own block first");
        s.follow(3, (48..64).map(|o| n("10.0.0.0") + o));
        assert_eq!(s.to_follow(), Some(Next::FollowAll));
        assert_eq!(s.next_address(), Next::FollowAll);
        let held = (0..17).chain(48..64).map(|o| n("10.0.0.0") + o);
        s.follow_all(held);
        assert_eq!(s.next_address(), Next::Borrow(n("10.0.0.17")));
        assert_eq!(s.to_follow(), None, "a followed block has room");
        for o in 18..48 {
            s.mark(n("10.0.0.0") + o);
        }
        assert_eq!(s.next_address(), Next::Exhausted);
        assert!(!s.has_free());
        assert_eq!(s.to_follow(), None, "every block is followed");
        assert_invariants(&s);
    }

    #[test]
    fn following_the_whole_pool_knows_every_block_at_once() {
        let mut s = by_blocks(json!({"subnet": "10.0.0.0/26", "blockSize": 28}), "a");
        for b in 0..4 {
            s.set_owner(b, Some("b"));
        }
        let space = ranges(&[("10.0.0.0", "10.0.0.63")]);
        assert_eq!(
            s.empty_blocks_in(&space, 4),
            vec![],
            "claimed blocks not followed"
        );
        s.follow_all((2..48).map(|o| n("10.0.0.0") + o));
        assert!(s.follows_all() && (0..4).all(|b| s.follows(b)));
        assert_eq!(s.next_address(), Next::Borrow(n("10.0.0.48")));
        assert_eq!(
            s.empty_blocks_in(&space, 4),
            vec![],
            "block 3 holds 10.0.0.48"
        );
        assert!(s.unmark(n("10.0.0.48")));
        assert_eq!(s.empty_blocks_in(&space, 4), vec![3]);
        assert_invariants(&s);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashSet;

        #[derive(Debug, Clone)]
        enum Op {
            /// Next address, claiming and following blocks for this node as asked.
            Allocate,
            /// The same, restricted to `len` addresses from offset `o` of the pool (a
            /// namespace's space).
            AllocateIn(u8, u8),
            /// Another node claims block `b` (or the claim is removed).
            Owner(u8, Option<bool>),
            /// Another node takes or frees the address at offset `o` of the pool; the watch
            /// tells this node if it follows the block.
            Mark(u8, bool),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Allocate),
                2 => (any::<u8>(), any::<u8>()).prop_map(|(o, len)| Op::AllocateIn(o, len)),
                1 => (0u8..4, prop::option::of(any::<bool>())).prop_map(|(b, o)| Op::Owner(b, o)),
                2 => (any::<u8>(), any::<bool>()).prop_map(|(o, m)| Op::Mark(o, m)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Whatever the watch and other nodes do, followed whole or block by block: the
            /// invariants hold, an address handed out was free in etcd (and allowed, when
            /// picking is restricted), the pool is exhausted only when no dynamic address
            /// (allowed) is free in etcd, and `has_free_in` says whether an allowed one may be.
            #[test]
            fn the_invariants_hold_and_only_free_addresses_are_handed_out(
                ops in prop::collection::vec(op(), 1..120),
                whole in any::<bool>(),
            ) {
                let config = json!({"subnet": "10.0.0.0/24", "exclude": ["10.0.0.64/29", "10.0.0.200"], "blockSize": 26});
                let mut s = if whole { state(config, "a") } else { by_blocks(config, "a") };
                let base = n("10.0.0.0");
                // What etcd holds.
                let mut held: HashSet<u128> = HashSet::new();
                for op in ops {
                    match op {
                        Op::Allocate | Op::AllocateIn(..) => {
                            // The allowed addresses, and whether picking is restricted to them.
                            let (first, last, restricted) = match op {
                                Op::AllocateIn(o, len) => {
                                    let first = base + u128::from(o);
                                    (first, (first + u128::from(len)).min(base + 255), true)
                                }
                                _ => (base, base + 255, false),
                            };
                            let allowed = [AddrRange::new(first, last)];
                            if restricted {
                                let may_be_free = (first..=last).any(|a| {
                                    s.pool().is_dynamic(a)
                                        && (!s.follows(s.pool().block_of(a)) || !held.contains(&a))
                                });
                                prop_assert_eq!(s.has_free_in(&allowed), may_be_free);
                            }
                            loop {
                                let next = if restricted {
                                    s.next_address_in(&allowed)
                                } else {
                                    s.next_address()
                                };
                                match next {
                                    Next::Address(a) | Next::Borrow(a) => {
                                        prop_assert!(allowed[0].contains(a), "{a} not allowed");
                                        prop_assert!(s.pool().is_dynamic(a));
                                        prop_assert!(s.is_marked(a));
                                        prop_assert!(held.insert(a), "{a} handed out while held");
                                        break;
                                    }
                                    Next::Claim(b) => {
                                        prop_assert!(s.blocks.get(&b).is_none_or(|x| x.owner.is_none()));
                                        s.set_owner(b, Some("a"));
                                    }
                                    Next::Follow(b) => {
                                        prop_assert!(!s.follows(b));
                                        s.follow(b, held.iter().copied());
                                    }
                                    Next::FollowAll => {
                                        prop_assert!(!s.follows_all());
                                        s.follow_all(held.iter().copied());
                                    }
                                    Next::Exhausted => {
                                        let free = (first..=last)
                                            .any(|a| s.pool().is_dynamic(a) && !held.contains(&a));
                                        prop_assert!(!free, "exhausted with a free address");
                                        break;
                                    }
                                }
                            }
                        }
                        Op::Owner(b, owner) => {
                            let owner = owner.map(|mine| if mine { "a" } else { "b" });
                            s.set_owner(u128::from(b), owner);
                        }
                        Op::Mark(o, true) => {
                            held.insert(base + u128::from(o));
                            s.mark(base + u128::from(o));
                        }
                        Op::Mark(o, false) => {
                            held.remove(&(base + u128::from(o)));
                            s.unmark(base + u128::from(o));
                        }
                    }
                    assert_invariants(&s);
                }
            }
        }
    }
}
