//! Sticky StatefulSet addresses in etcd (see `crate::sticky`): the first ADD of an identity
//! creates its record with the addresses; a DEL of a sticky attachment moves its addresses to
//! the identity's reservation, and the next ADD moves them from the reservation to its
//! attachment, each in one transaction guarded by the revision of the holder it takes them
//! from, so that an address is never free in between and never held twice; the sticky GC
//! deletes an identity with what its reservation holds, and never an address a container
//! holds.

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};

use super::{check_attachment, decode, encode, got, AllocateRequest, Allocation, Allocator, Inner};
use crate::error::{IpamError, Result};
use crate::namespaces::Restriction;
use crate::records::{
    now_unix, AllocationRecord, Attachment, AttachmentRecord, HeldIp, Kind, StickyRecord,
    RECORD_VERSION,
};
use crate::sticky::{reservation, Identity, RESERVATION_NODE};

/// Rounds of one sticky operation before it gives up as contended.
const ROUNDS: usize = 8;

/// A sticky record as a listing found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldIdentity {
    pub key: String,
    pub record: StickyRecord,
    /// The record's mod revision: writes to it are guarded by it.
    pub revision: i64,
}

/// What [`Allocator::release_identity`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityRelease {
    /// The identity's record is deleted, and with it the addresses its reservation held.
    Released { ips: Vec<std::net::IpAddr> },
    /// A container's attachment holds an address of the identity: nothing was changed (its DEL,
    /// or a GC, moves it to the reservation first).
    HeldByContainer(Attachment),
    /// The record changed since it was listed: nothing was changed.
    Changed,
}

/// What the release of a sticky attachment did.
pub(super) enum Parked {
    /// The addresses moved to the identity's reservation; the attachment is gone.
    Done,
    /// Not an attachment of a sticky identity: release it as any other.
    NotSticky,
    /// Something changed meanwhile: read again.
    Changed,
}

/// Whether an attachment record holds sticky addresses.
pub(super) fn holds_sticky(record: &AttachmentRecord) -> bool {
    record.ips.iter().any(|h| h.kind == Some(Kind::Sticky))
}

impl Allocator {
    /// [`Allocator::allocate_within`], or for the StatefulSet pod `identity` when there is one
    /// ([`Allocator::allocate_sticky`]): its first dynamic addresses are picked within
    /// `restrictions` too.
    pub async fn allocate_as(
        &self,
        req: &AllocateRequest,
        restrictions: &[Restriction],
        identity: Option<&Identity>,
    ) -> Result<Allocation> {
        match identity {
            Some(identity) => self.allocate_sticky(req, identity, restrictions).await,
            None => self.allocate_within(req, restrictions).await,
        }
    }

    /// Allocates for `req` (which asks for no exact address) the addresses of the StatefulSet
    /// pod `identity`: on its first ADD dynamic ones, recorded with the identity in the same
    /// transaction; afterwards the identity's addresses, taken from its reservation in one
    /// transaction guarded by the reservation's revision, or asked for exactly (`Kind::Sticky`)
    /// when no reservation holds them. Fails with `AddressInUse` when another container's
    /// attachment holds them (the caller judges that container's pod and may release it: its
    /// release moves the addresses to the reservation, and a second call takes them).
    pub async fn allocate_sticky(
        &self,
        req: &AllocateRequest,
        identity: &Identity,
        restrictions: &[Restriction],
    ) -> Result<Allocation> {
        check_attachment(&req.attachment)?;
        let inner = &self.inner;
        let began = inner.store.seen_revision();
        inner.wait_synced().await?;
        let sticky_key = inner.sticky_key(identity);
        let parked = reservation(identity);
        let parked_key = inner.keys.attachment(&parked);
        let mut last = String::new();
        for _ in 0..ROUNDS {
            if let Some(held) = self.lookup(&req.attachment).await? {
                return Ok(held);
            }
            let reads = Txn::new().and_then([
                TxnOp::get(sticky_key.as_str(), None),
                TxnOp::get(parked_key.as_str(), None),
            ]);
            let resp = inner
                .store
                .txn(
                    &format!("read sticky identity {}", identity.describe()),
                    reads,
                )
                .await?;
            let Some(sticky_kv) = got(&resp, 0) else {
                match self.allocate_with(req, restrictions, Some(identity)).await {
                    Err(IpamError::Contention { last: why, .. }) => {
                        last = why;
                        continue;
                    }
                    other => return other,
                }
            };
            let record = inner.decode_sticky(&sticky_kv)?;
            let in_pools = |h: &HeldIp| {
                req.range_sets
                    .iter()
                    .flat_map(|set| &set.pools)
                    .any(|p| p.id() == h.pool)
            };
            if !record.ips.iter().all(in_pools) {
                // The network's pools changed since: the identity's addresses can never be
                // its again, so they go (if no container holds them) and new ones are taken.
                let held = HeldIdentity {
                    key: sticky_key.clone(),
                    record: record.clone(),
                    revision: sticky_kv.mod_revision(),
                };
                match self.release_identity(&held).await? {
                    IdentityRelease::Released { ips } => {
                        tracing::warn!(identity = %identity.describe(), released = ?ips, "the network's pools no longer contain the identity's sticky addresses: released them, taking new ones");
                        continue;
                    }
                    IdentityRelease::HeldByContainer(holder) => {
                        return Err(IpamError::Contention {
                            op: format!("sticky allocate for {}", req.attachment),
                            attempts: 1,
                            last: format!(
                                "{sticky_key} keeps addresses outside the network's pools, still \
                                 held by {holder}; they are released once its DEL comes"
                            ),
                        })
                    }
                    IdentityRelease::Changed => {
                        last = format!("{sticky_key} changed meanwhile");
                        continue;
                    }
                }
            }
            match got(&resp, 1) {
                Some(parked_kv) => {
                    let parked_record: AttachmentRecord = decode(&parked_kv)?;
                    if let Some(allocation) = inner
                        .take_reservation(
                            req,
                            began,
                            (&sticky_key, sticky_kv.mod_revision()),
                            &parked,
                            &parked_kv,
                            &parked_record,
                        )
                        .await?
                    {
                        tracing::info!(identity = %identity.describe(), ips = ?parked_record.ips.iter().map(|h| h.ip).collect::<Vec<_>>(), "sticky addresses taken from the reservation");
                        return Ok(allocation);
                    }
                    last = format!("{parked_key} changed while taking its addresses");
                }
                None => {
                    if let Some(other) = inner.taken_by_another_pod(identity, &record).await? {
                        // Freed by hand and taken by another pod since: the identity starts
                        // afresh rather than fail on an address that is no longer its own.
                        let forget = Txn::new()
                            .when([Compare::mod_revision(
                                sticky_key.as_str(),
                                CompareOp::Equal,
                                sticky_kv.mod_revision(),
                            )])
                            .and_then([TxnOp::delete(sticky_key.as_str(), None)]);
                        inner
                            .store
                            .txn(&format!("forget {sticky_key}"), forget)
                            .await?;
                        tracing::warn!(identity = %identity.describe(), holder = %other, "the identity's sticky address is held by another pod: taking a new one");
                        continue;
                    }
                    let exact = AllocateRequest {
                        requested: record.ips.iter().map(|h| h.ip).collect(),
                        requested_kind: Kind::Sticky,
                        ..req.clone()
                    };
                    return self.allocate(&exact).await;
                }
            }
        }
        Err(IpamError::Contention {
            op: format!("sticky allocate for {}", req.attachment),
            attempts: ROUNDS,
            last,
        })
    }

    /// Every valid sticky record; one that cannot be read or does not validate is skipped
    /// (logged once; `audit` names it).
    pub async fn sticky_identities(&self) -> Result<Vec<HeldIdentity>> {
        let inner = &self.inner;
        let prefix = inner.keys.sticky_all();
        let options = GetOptions::new().with_range(crate::store::prefix_end(prefix.as_bytes()));
        let resp = inner
            .store
            .get("list sticky identities", &prefix, Some(options))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = kv.key_str().ok()?.to_string();
                match inner.decode_sticky(kv) {
                    Ok(record) => Some(HeldIdentity {
                        key,
                        record,
                        revision: kv.mod_revision(),
                    }),
                    Err(e) => {
                        inner.skip_once(&key, &e.to_string());
                        None
                    }
                }
            })
            .collect())
    }

    /// Records (or, with None, clears) since when the sticky GC has seen the identity gone, if
    /// its record is still the one listed. Returns whether it was written.
    pub async fn set_orphaned_since(
        &self,
        held: &HeldIdentity,
        since: Option<u64>,
    ) -> Result<bool> {
        let record = StickyRecord {
            orphaned_since: since,
            ..held.record.clone()
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                held.key.as_str(),
                CompareOp::Equal,
                held.revision,
            )])
            .and_then([TxnOp::put(held.key.as_str(), encode(&record), None)]);
        let resp = self
            .inner
            .store
            .txn(&format!("mark {} orphaned", held.key), txn)
            .await?;
        Ok(resp.succeeded())
    }

    /// Deletes the identity's record and frees the addresses its reservation holds, in one
    /// transaction guarded by the revisions read, if its record is still the one listed and no
    /// container holds one of its addresses.
    pub async fn release_identity(&self, held: &HeldIdentity) -> Result<IdentityRelease> {
        let inner = &self.inner;
        let identity = Identity::of_record(&held.record);
        let parked = reservation(&identity);
        let parked_key = inner.keys.attachment(&parked);
        let ip_keys: Vec<String> = held
            .record
            .ips
            .iter()
            .map(|h| inner.keys.address(&h.pool, h.ip))
            .collect();
        let mut reads = vec![TxnOp::get(parked_key.as_str(), None)];
        reads.extend(ip_keys.iter().map(|k| TxnOp::get(k.as_str(), None)));
        let resp = inner
            .store
            .txn(
                &format!("read the reservation of {}", identity.describe()),
                Txn::new().and_then(reads),
            )
            .await?;
        let mut compares = vec![Compare::mod_revision(
            held.key.as_str(),
            CompareOp::Equal,
            held.revision,
        )];
        let mut ops = vec![TxnOp::delete(held.key.as_str(), None)];
        if let Some(kv) = got(&resp, 0) {
            compares.push(Compare::mod_revision(
                parked_key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            ));
            ops.push(TxnOp::delete(parked_key.as_str(), None));
            ops.push(TxnOp::delete(
                inner.keys.node_attachment(RESERVATION_NODE, &parked),
                None,
            ));
        }
        let mut freed = Vec::new();
        for (i, (key, h)) in ip_keys.iter().zip(&held.record.ips).enumerate() {
            let Some(kv) = got(&resp, i + 1) else {
                continue;
            };
            let holder: AllocationRecord = decode(&kv)?;
            if holder.attachment != parked {
                return Ok(IdentityRelease::HeldByContainer(holder.attachment));
            }
            compares.push(Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            ));
            ops.push(TxnOp::delete(key.as_str(), None));
            freed.push(h.ip);
        }
        let resp = inner
            .store
            .txn(
                &format!("release sticky identity {}", identity.describe()),
                Txn::new().when(compares).and_then(ops),
            )
            .await?;
        if !resp.succeeded() {
            return Ok(IdentityRelease::Changed);
        }
        let mut pools = inner.lock_pools();
        for h in &held.record.ips {
            if freed.contains(&h.ip) {
                pools.unmark(&h.pool, h.ip);
            }
        }
        Ok(IdentityRelease::Released { ips: freed })
    }
}

impl Inner {
    fn sticky_key(&self, identity: &Identity) -> String {
        self.keys.sticky(
            &identity.network,
            &identity.namespace,
            &identity.stateful_set,
            identity.ordinal,
        )
    }

    /// A sticky record, decoded and validated against its key.
    fn decode_sticky(&self, kv: &KeyValue) -> Result<StickyRecord> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let record: StickyRecord = decode(kv)?;
        let key_ref = self.keys.parse(&key).ok_or_else(|| IpamError::Corrupt {
            key: key.clone(),
            reason: "not a sticky key".into(),
        })?;
        record
            .validate(&key_ref)
            .map_err(|reason| IpamError::Corrupt { key, reason })?;
        Ok(record)
    }

    /// The holder of an address of `record` that is neither the identity's reservation nor an
    /// attachment of the identity's pod (`namespace/<statefulset>-<ordinal>`), if any: such an
    /// address was freed (by `release-address`) and taken by someone else.
    async fn taken_by_another_pod(
        &self,
        identity: &Identity,
        record: &StickyRecord,
    ) -> Result<Option<Attachment>> {
        let reads: Vec<TxnOp> = record
            .ips
            .iter()
            .map(|h| TxnOp::get(self.keys.address(&h.pool, h.ip), None))
            .collect();
        let resp = self
            .store
            .txn(
                &format!("read the sticky addresses of {}", identity.describe()),
                Txn::new().and_then(reads),
            )
            .await?;
        let name = format!("{}-{}", identity.stateful_set, identity.ordinal);
        for i in 0..record.ips.len() {
            let Some(kv) = got(&resp, i) else { continue };
            let Ok(holder) = decode::<AllocationRecord>(&kv) else {
                continue;
            };
            let own = holder.attachment == reservation(identity)
                || holder
                    .pod
                    .as_ref()
                    .is_some_and(|p| p.namespace == identity.namespace && p.name == name);
            if !own {
                return Ok(Some(holder.attachment));
            }
        }
        Ok(None)
    }

    /// The key and put of the sticky record a first ADD creates for `identity` with `ips`.
    pub(super) fn sticky_create(
        &self,
        identity: &Identity,
        ips: &[HeldIp],
        now: u64,
    ) -> (String, TxnOp) {
        let key = self.sticky_key(identity);
        let record = StickyRecord {
            version: RECORD_VERSION,
            network: identity.network.clone(),
            namespace: identity.namespace.clone(),
            stateful_set: identity.stateful_set.clone(),
            ordinal: identity.ordinal,
            stateful_set_uid: identity.stateful_set_uid.clone(),
            ips: ips.to_vec(),
            since: now,
            orphaned_since: None,
        };
        let put = TxnOp::put(key.as_str(), encode(&record), None);
        (key, put)
    }

    /// Moves the addresses of the reservation `parked` (its key-value and record) to the
    /// attachment of `req`, in one transaction guarded by: the identity's record and the
    /// reservation unchanged, every address record written with the reservation, the
    /// attachment absent and no release marker of it newer than `began`. None if it was refused.
    async fn take_reservation(
        &self,
        req: &AllocateRequest,
        began: i64,
        (sticky_key, sticky_revision): (&str, i64),
        parked: &Attachment,
        parked_kv: &KeyValue,
        parked_record: &AttachmentRecord,
    ) -> Result<Option<Allocation>> {
        let attachment = &req.attachment;
        let attachment_key = self.keys.attachment(attachment);
        let parked_key = self.keys.attachment(parked);
        let parked_revision = parked_kv.mod_revision();
        let now = now_unix();
        let mut compares = vec![
            Compare::mod_revision(sticky_key, CompareOp::Equal, sticky_revision),
            Compare::mod_revision(parked_key.as_str(), CompareOp::Equal, parked_revision),
            Compare::create_revision(attachment_key.as_str(), CompareOp::Equal, 0),
            Compare::mod_revision(self.keys.released(attachment), CompareOp::Less, began + 1),
        ];
        let mut ops = vec![
            TxnOp::delete(parked_key.as_str(), None),
            TxnOp::delete(self.keys.node_attachment(RESERVATION_NODE, parked), None),
        ];
        let mut ips = Vec::new();
        for h in &parked_record.ips {
            let key = self.keys.address(&h.pool, h.ip);
            // The reservation's transaction wrote each of its address records.
            compares.push(Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                parked_revision,
            ));
            let record = AllocationRecord {
                version: RECORD_VERSION,
                attachment: attachment.clone(),
                pod: req.pod.clone(),
                node: self.node.clone(),
                kind: Kind::Sticky,
                allocated_at: now,
            };
            ops.push(TxnOp::put(key.as_str(), encode(&record), None));
            ips.push(HeldIp {
                pool: h.pool.clone(),
                ip: h.ip,
                kind: Some(Kind::Sticky),
            });
        }
        let record = AttachmentRecord {
            version: RECORD_VERSION,
            network: attachment.network.clone(),
            node: self.node.clone(),
            pod: req.pod.clone(),
            ips,
            allocated_at: now,
            netns: req.netns.clone(),
        };
        ops.push(TxnOp::put(attachment_key.as_str(), encode(&record), None));
        ops.push(TxnOp::put(
            self.keys.node_attachment(&self.node, attachment),
            "",
            None,
        ));
        let resp = self
            .store
            .txn(
                &format!("take the sticky addresses of {parked} for {attachment}"),
                Txn::new().when(compares).and_then(ops),
            )
            .await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        self.allocation_of(attachment, &record).await.map(Some)
    }

    /// Releases `attachment` (its record `record` at `revision`) by moving its sticky
    /// addresses to its identity's reservation, with its release marker, in one transaction
    /// guarded by the record's revision and each address record's. [`Parked::NotSticky`] when
    /// the attachment holds no sticky address, names no pod, its identity has no record, the
    /// record does not list every address of the attachment, or a reservation exists already.
    pub(super) async fn park(
        &self,
        attachment: &Attachment,
        revision: i64,
        record: &AttachmentRecord,
    ) -> Result<Parked> {
        if !holds_sticky(record) {
            return Ok(Parked::NotSticky);
        }
        let Some(identity) = record
            .pod
            .as_ref()
            .and_then(|p| Identity::of_pod_name(&attachment.network, &p.namespace, &p.name))
        else {
            return Ok(Parked::NotSticky);
        };
        let sticky_key = self.sticky_key(&identity);
        let parked = reservation(&identity);
        let parked_key = self.keys.attachment(&parked);
        let ip_keys: Vec<String> = record
            .ips
            .iter()
            .map(|h| self.keys.address(&h.pool, h.ip))
            .collect();
        let mut read_keys = vec![sticky_key.clone(), parked_key.clone()];
        read_keys.extend(ip_keys.iter().cloned());
        let reads: Vec<TxnOp> = read_keys
            .iter()
            .map(|k| TxnOp::get(k.as_str(), None))
            .collect();
        let resp = self
            .store
            .txn_grouped(
                &format!("read sticky identity of {attachment}"),
                Txn::new().and_then(reads),
                read_keys,
            )
            .await?
            .response;
        let Some(sticky_kv) = got(&resp, 0) else {
            return Ok(Parked::NotSticky);
        };
        let Ok(sticky) = self.decode_sticky(&sticky_kv) else {
            return Ok(Parked::NotSticky);
        };
        let listed = |h: &HeldIp| sticky.ips.iter().any(|s| s.ip == h.ip && s.pool == h.pool);
        if !record.ips.iter().all(listed) || got(&resp, 1).is_some() {
            return Ok(Parked::NotSticky);
        }
        let mut compares = vec![
            Compare::mod_revision(self.keys.attachment(attachment), CompareOp::Equal, revision),
            Compare::mod_revision(
                sticky_key.as_str(),
                CompareOp::Equal,
                sticky_kv.mod_revision(),
            ),
            Compare::create_revision(parked_key.as_str(), CompareOp::Equal, 0),
        ];
        let mut moves = Vec::new();
        let mut ips = Vec::new();
        for (i, (key, h)) in ip_keys.iter().zip(&record.ips).enumerate() {
            let Some(kv) = got(&resp, i + 2) else {
                continue;
            };
            match decode::<AllocationRecord>(&kv) {
                Ok(holder) if holder.attachment == *attachment => {
                    compares.push(Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    ));
                    let moved = AllocationRecord {
                        version: RECORD_VERSION,
                        attachment: parked.clone(),
                        pod: None,
                        node: RESERVATION_NODE.to_string(),
                        kind: Kind::Sticky,
                        allocated_at: sticky.since,
                    };
                    moves.push(TxnOp::put(key.as_str(), encode(&moved), None));
                    ips.push(HeldIp {
                        pool: h.pool.clone(),
                        ip: h.ip,
                        kind: Some(Kind::Sticky),
                    });
                }
                // Another holder's, or unreadable: not ours to move.
                _ => {}
            }
        }
        if ips.is_empty() {
            return Ok(Parked::NotSticky);
        }
        let parked_record = AttachmentRecord {
            version: RECORD_VERSION,
            network: attachment.network.clone(),
            node: RESERVATION_NODE.to_string(),
            pod: None,
            ips,
            allocated_at: sticky.since,
            netns: String::new(),
        };
        let record_key = self.keys.attachment(attachment);
        let index_key = self.keys.node_attachment(&record.node, attachment);
        let parked_index_key = self.keys.node_attachment(RESERVATION_NODE, &parked);
        let mut touched = vec![
            record_key.clone(),
            index_key.clone(),
            sticky_key.clone(),
            parked_key.clone(),
            parked_index_key.clone(),
        ];
        touched.extend(ip_keys.iter().cloned());
        let resp = self
            .release_txn(attachment, Some(&touched), |lease| {
                let mut ops = vec![
                    TxnOp::delete(record_key.as_str(), None),
                    TxnOp::delete(index_key.as_str(), None),
                    TxnOp::put(parked_key.as_str(), encode(&parked_record), None),
                    TxnOp::put(parked_index_key.as_str(), "", None),
                ];
                ops.extend(moves.iter().cloned());
                ops.push(self.marker_put(attachment, lease, Some(record)));
                Txn::new().when(compares.clone()).and_then(ops)
            })
            .await?;
        if !resp.succeeded() {
            return Ok(Parked::Changed);
        }
        tracing::info!(%attachment, identity = %identity.describe(), "sticky addresses kept for the StatefulSet pod in its reservation");
        Ok(Parked::Done)
    }
}
