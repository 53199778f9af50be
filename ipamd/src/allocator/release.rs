//! Releasing an attachment (DEL, GC, the CLI): its addresses, its record and its index entry
//! go in one guarded transaction with a release marker; an unreadable record is released by
//! the address records that name it; a record of the earlier layout is found and released.

use std::time::Instant;

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnResponse};

use super::{decode, encode, got, Committed, HeldAttachment, Inner, MARKER_TTL};
use crate::error::{IpamError, Result};
use crate::records::{
    now_unix, AllocationRecord, Attachment, AttachmentRecord, HeldIp, KeyRef, ReleaseMarker,
    RECORD_VERSION,
};

impl Inner {
    /// The record of `attachment`, under its key or, from the earlier layout, under its
    /// container id and ifname when that record names the same network.
    pub(super) async fn read_attachment(&self, attachment: &Attachment) -> Result<Found> {
        let keys = [
            self.keys.attachment(attachment),
            self.keys.legacy_handle(attachment),
        ];
        let reads: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
        let resp = self
            .store
            .txn_grouped(
                &format!("read {attachment}"),
                Txn::new().and_then(reads),
                keys.to_vec(),
            )
            .await?
            .response;
        for (i, key) in keys.into_iter().enumerate() {
            let Some(kv) = got(&resp, i) else { continue };
            match decode::<AttachmentRecord>(&kv) {
                Ok(record) if i == 1 && record.network != attachment.network => continue,
                Ok(record) => return Ok(Found::Record { key, kv, record }),
                // An unreadable record of the earlier layout may be another network's: it is
                // this attachment's only if address records name this attachment.
                Err(_) if i == 1 && self.addresses_held_by(attachment).await?.is_empty() => {
                    continue
                }
                Err(e) => {
                    return Ok(Found::Unreadable {
                        key,
                        kv,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(Found::Nothing)
    }

    /// An attachment key-value of either layout, decoded; None (logged once) if it does not
    /// decode or validate.
    pub(super) fn attachment_of_kv(&self, kv: &KeyValue) -> Option<HeldAttachment> {
        let key = kv.key_str().ok()?;
        let attachment = match self.keys.parse(key)? {
            KeyRef::Attachment(attachment) => attachment,
            KeyRef::LegacyHandle {
                container_id,
                ifname,
            } => Attachment::new("", container_id, ifname),
            _ => return None,
        };
        match decode::<AttachmentRecord>(kv) {
            Ok(record) => {
                let attachment = Attachment {
                    network: record.network.clone(),
                    ..attachment
                };
                Some(HeldAttachment {
                    attachment,
                    record,
                    revision: kv.mod_revision(),
                })
            }
            Err(e) => {
                self.skip_once(key, &e.to_string());
                None
            }
        }
    }

    /// The lease release markers are written under; a new one when the current one is past
    /// half its life, so every marker lives between half the TTL and the TTL.
    pub(super) async fn marker_lease(&self, renew: bool) -> Result<i64> {
        let mut lease = self.marker_lease.lock().await;
        match *lease {
            Some((id, granted)) if !renew && granted.elapsed() < MARKER_TTL / 2 => Ok(id),
            _ => {
                let id = self.store.grant_lease(MARKER_TTL).await?;
                *lease = Some((id, Instant::now()));
                Ok(id)
            }
        }
    }

    /// The release marker of `attachment`, if a DEL left one that can be read.
    pub(super) async fn release_marker(
        &self,
        attachment: &Attachment,
    ) -> Result<Option<ReleaseMarker>> {
        let key = self.keys.released(attachment);
        let resp = self
            .store
            .get("read the release marker", &key, None)
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| decode::<ReleaseMarker>(kv).ok()))
    }

    /// The put of `attachment`'s release marker, remembering what `released` held.
    pub(super) fn marker_put(
        &self,
        attachment: &Attachment,
        lease: i64,
        released: Option<&AttachmentRecord>,
    ) -> TxnOp {
        let marker = ReleaseMarker {
            version: RECORD_VERSION,
            node: self.node.clone(),
            released_at: now_unix(),
            ips: released.map(|r| r.ips.clone()).unwrap_or_default(),
            allocated_at: released.map_or(0, |r| r.allocated_at),
        };
        TxnOp::put(
            self.keys.released(attachment),
            encode(&marker),
            Some(PutOptions::new().with_lease(lease)),
        )
    }

    /// Runs a release transaction built for a marker lease; once more with a new lease if etcd
    /// no longer knows the lease (it expired while this daemon was stopped, or etcd's data was
    /// restored). With `touched`, the keys it compares, reads or writes besides the marker, it
    /// is committed in a group (`group_commit`); without, alone.
    pub(super) async fn release_txn(
        &self,
        attachment: &Attachment,
        touched: Option<&[String]>,
        build: impl Fn(i64) -> Txn,
    ) -> Result<TxnResponse> {
        let op = &format!("release {attachment}");
        let build = &build;
        let send = |lease| async move {
            match touched {
                Some(keys) => {
                    let mut keys = keys.to_vec();
                    keys.push(self.keys.released(attachment));
                    let answer = self.store.txn_grouped(op, build(lease), keys).await?;
                    Ok(answer.response)
                }
                None => self.store.txn(op, build(lease)).await,
            }
        };
        let lease = self.marker_lease(false).await?;
        match send(lease).await {
            Err(IpamError::Etcd { reason, .. }) if reason.contains("lease not found") => {
                send(self.marker_lease(true).await?).await
            }
            other => other,
        }
    }

    /// Releases `attachment`; with `expected`, only if its record is at that revision.
    pub(super) async fn release(
        &self,
        attachment: &Attachment,
        expected: Option<i64>,
    ) -> Result<Option<AttachmentRecord>> {
        let cached = self
            .lock_committed()
            .remove(attachment)
            .filter(|c| expected.is_none_or(|e| e == c.revision))
            // Sticky addresses go to their identity's reservation, not back to the pool.
            .filter(|c| !super::sticky::holds_sticky(&c.record));
        // The revision whose keys a guarded release found changed: not tried again.
        let mut changed_since = None;
        if let Some(committed) = cached {
            // Fast path: nothing changed since this node's ADD wrote these keys.
            if let Some(record) = self.release_committed(attachment, &committed).await? {
                return Ok(Some(record));
            }
            changed_since = Some(committed.revision);
        }

        let mut last = String::new();
        for _ in 0..8 {
            let found = self.read_attachment(attachment).await?;
            let unchanged = match &found {
                Found::Record { kv, .. } | Found::Unreadable { kv, .. } => {
                    expected.is_none_or(|e| e == kv.mod_revision())
                }
                Found::Nothing => expected.is_none(),
            };
            if !unchanged {
                return Ok(None);
            }
            if let Found::Record { key, kv, record } = &found {
                match self.park(attachment, kv.mod_revision(), record).await? {
                    super::sticky::Parked::Done => return Ok(Some(record.clone())),
                    super::sticky::Parked::Changed => {
                        last = "attachment or address changed while moving it to its reservation"
                            .into();
                        continue;
                    }
                    super::sticky::Parked::NotSticky => {}
                }
                // Every writer of an attachment record writes the address records it lists and
                // its index entry in the same transaction. If all of them are still at the
                // record's revision, they go as on the fast path, without reading the addresses.
                // A record of the earlier layout (under its handle key) goes the way below.
                let revision = kv.mod_revision();
                if *key == self.keys.attachment(attachment) && changed_since != Some(revision) {
                    let committed = Committed {
                        revision,
                        keys: self.keys_written_with(attachment, record),
                        record: record.clone(),
                    };
                    if let Some(record) = self.release_committed(attachment, &committed).await? {
                        return Ok(Some(record));
                    }
                    changed_since = Some(revision);
                }
            }
            let (guard, record, ip_keys) = match found {
                Found::Nothing => {
                    // Nothing to free, but the marker still stops a late ADD; one that commits
                    // between the read and the marker is found in the next round.
                    let attachment_key = self.keys.attachment(attachment);
                    let resp = self
                        .release_txn(
                            attachment,
                            Some(std::slice::from_ref(&attachment_key)),
                            |lease| {
                                Txn::new()
                                    .when([Compare::create_revision(
                                        attachment_key.as_str(),
                                        CompareOp::Equal,
                                        0,
                                    )])
                                    .and_then([self.marker_put(attachment, lease, None)])
                            },
                        )
                        .await?;
                    if resp.succeeded() {
                        return Ok(None);
                    }
                    last = "the attachment was committed while releasing".into();
                    continue;
                }
                Found::Record { key, kv, record } => {
                    let ip_keys: Vec<String> = record
                        .ips
                        .iter()
                        .map(|h| self.keys.address(&h.pool, h.ip))
                        .collect();
                    ((key, kv.mod_revision()), Some(record), ip_keys)
                }
                Found::Unreadable { key, kv, reason } => {
                    // The address records name their holder: find them by that.
                    tracing::warn!(%attachment, key, reason, "attachment record unreadable; releasing the addresses whose records name it");
                    let ip_keys = self.addresses_held_by(attachment).await?;
                    ((key, kv.mod_revision()), None, ip_keys)
                }
            };
            let (held, deletes) = self.held_addresses(attachment, &ip_keys).await?;
            let (record_key, record_revision) = guard;
            let node = record
                .as_ref()
                .map_or(self.node.as_str(), |r| r.node.as_str());
            let index_key = self.keys.node_attachment(node, attachment);
            let mut touched = vec![record_key.clone(), index_key.clone()];
            touched.extend(ip_keys.iter().cloned());
            let resp = self
                .release_txn(attachment, Some(&touched), |lease| {
                    let mut compares = vec![Compare::mod_revision(
                        record_key.as_str(),
                        CompareOp::Equal,
                        record_revision,
                    )];
                    compares.extend(held.iter().cloned());
                    let mut ops = vec![
                        TxnOp::delete(record_key.as_str(), None),
                        TxnOp::delete(index_key.as_str(), None),
                    ];
                    ops.extend(deletes.iter().cloned());
                    ops.push(self.marker_put(attachment, lease, record.as_ref()));
                    Txn::new().when(compares).and_then(ops)
                })
                .await?;
            if resp.succeeded() {
                let record = record.unwrap_or_else(|| AttachmentRecord {
                    version: RECORD_VERSION,
                    network: attachment.network.clone(),
                    node: self.node.clone(),
                    pod: None,
                    ips: ip_keys
                        .iter()
                        .filter_map(|k| match self.keys.parse(k) {
                            Some(KeyRef::Address { pool, ip }) => Some(HeldIp {
                                pool,
                                ip,
                                kind: None,
                            }),
                            _ => None,
                        })
                        .collect(),
                    allocated_at: 0,
                    netns: String::new(),
                });
                self.forget(&record);
                return Ok(Some(record));
            }
            last = "attachment or address changed while releasing".into();
        }
        Err(IpamError::Contention {
            op: format!("release {attachment}"),
            attempts: 8,
            last,
        })
    }

    /// Releases what one transaction wrote at `committed.revision` (the attachment record, its
    /// address records and its index entry) if none of those keys changed since: one guarded
    /// transaction, no reads. The record released, or None if a key changed.
    async fn release_committed(
        &self,
        attachment: &Attachment,
        committed: &Committed,
    ) -> Result<Option<AttachmentRecord>> {
        let attachment_key = self.keys.attachment(attachment);
        let resp = self
            .release_txn(attachment, Some(&committed.keys), |lease| {
                let compares: Vec<Compare> = committed
                    .keys
                    .iter()
                    .map(|k| {
                        Compare::mod_revision(k.as_str(), CompareOp::Equal, committed.revision)
                    })
                    .collect();
                let mut ops = vec![TxnOp::get(attachment_key.as_str(), None)];
                ops.extend(
                    committed
                        .keys
                        .iter()
                        .map(|k| TxnOp::delete(k.as_str(), None)),
                );
                ops.push(self.marker_put(attachment, lease, Some(&committed.record)));
                Txn::new().when(compares).and_then(ops)
            })
            .await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let Some(Ok(record)) = got(&resp, 0).map(|kv| decode::<AttachmentRecord>(&kv)) else {
            return Ok(None);
        };
        self.forget(&record);
        Ok(Some(record))
    }

    /// The keys the transaction that wrote `record` for `attachment` wrote with it: the record,
    /// its address records and its index entry.
    fn keys_written_with(&self, attachment: &Attachment, record: &AttachmentRecord) -> Vec<String> {
        let mut keys = vec![self.keys.attachment(attachment)];
        keys.extend(record.ips.iter().map(|h| self.keys.address(&h.pool, h.ip)));
        keys.push(self.keys.node_attachment(&record.node, attachment));
        keys
    }

    /// Of `ip_keys`, the address records `attachment` holds: a compare that each is unchanged,
    /// and its delete. A record another attachment holds, or one that cannot be read, is left
    /// in place (and logged): it is not ours to free.
    pub(super) async fn held_addresses(
        &self,
        attachment: &Attachment,
        ip_keys: &[String],
    ) -> Result<(Vec<Compare>, Vec<TxnOp>)> {
        let reads = Txn::new().and_then(
            ip_keys
                .iter()
                .map(|k| TxnOp::get(k.as_str(), None))
                .collect::<Vec<_>>(),
        );
        let held = self
            .store
            .txn(&format!("read addresses of {attachment}"), reads)
            .await?;
        let mut compares = Vec::new();
        let mut deletes = Vec::new();
        for (i, key) in ip_keys.iter().enumerate() {
            let Some(kv) = got(&held, i) else { continue };
            match decode::<AllocationRecord>(&kv) {
                Ok(holder) if holder.attachment == *attachment => {
                    compares.push(Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    ));
                    deletes.push(TxnOp::delete(key.as_str(), None));
                }
                Ok(holder) => {
                    tracing::warn!(%attachment, key, holder = %holder.attachment, "address record names another attachment; leaving it");
                }
                Err(e) => {
                    self.skip_once(key, &e.to_string());
                }
            }
        }
        Ok((compares, deletes))
    }

    /// The keys of every address record that names `attachment`: a scan of the pools, done
    /// only when its attachment record cannot be read.
    pub(super) async fn addresses_held_by(&self, attachment: &Attachment) -> Result<Vec<String>> {
        let (_, kvs) = self.store.load_prefix(&self.keys.pools()).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let key = kv.key_str().ok()?;
                let Some(KeyRef::Address { .. }) = self.keys.parse(key) else {
                    return None;
                };
                let holder = decode::<AllocationRecord>(kv).ok()?;
                (holder.attachment == *attachment).then(|| key.to_string())
            })
            .collect())
    }

    /// Marks the addresses of a released attachment free without waiting for the watch.
    pub(super) fn forget(&self, record: &AttachmentRecord) {
        let mut pools = self.lock_pools();
        for h in &record.ips {
            pools.unmark(&h.pool, h.ip);
        }
    }
}

/// What etcd holds for one attachment.
#[derive(Debug)]
pub(super) enum Found {
    Record {
        key: String,
        kv: KeyValue,
        record: AttachmentRecord,
    },
    /// A record is there but does not decode: its addresses are found by their records.
    Unreadable {
        key: String,
        kv: KeyValue,
        reason: String,
    },
    Nothing,
}
