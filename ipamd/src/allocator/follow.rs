//! Following etcd: the first load of the pools, the watch that keeps the pool cache current,
//! and a reload whenever the watch fails or falls behind a compaction.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};

use super::Inner;
use crate::cache::{Change, PoolCache, Skipped};
use crate::error::{IpamError, Result};
use crate::records::Keys;
use crate::store::{prefix_end, PAGE};

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
                crate::metrics::watch_reload();
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Rebuilds the in-memory state from etcd, page by page into a fresh picture that replaces
    /// the current one once complete: requests use the old picture until then. Returns the
    /// revision it reflects.
    pub(super) async fn load(&self) -> Result<i64> {
        let mut fresh = PoolCache::new(self.keys.clone(), &self.node);
        let mut keys = 0;
        let revision = self
            .store
            .for_each_page(
                &self.keys.pools(),
                PAGE,
                |start, end| addresses_only(&self.keys, start, end),
                |kvs| {
                    keys += kvs.len();
                    for kv in &kvs {
                        if let Ok(key) = kv.key_str() {
                            fresh.apply(Change::Put {
                                key,
                                value: kv.value(),
                            });
                        }
                    }
                },
            )
            .await?;
        let (skipped, loaded) = {
            let mut cache = self.lock_pools();
            (cache.replace(fresh), cache.len())
        };
        skipped.into_iter().for_each(|s| log_skipped(Some(s)));
        tracing::info!(pools = loaded, keys, revision, "pools loaded from etcd");
        Ok(revision)
    }

    pub(super) async fn watch_from(&self, revision: i64) -> Result<()> {
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
                reason: crate::store::describe(&e),
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
            self.store.saw(resp.header());
            let mut skipped = Vec::new();
            {
                let mut cache = self.lock_pools();
                for event in resp.events() {
                    let Some((kv, key)) = event.kv().and_then(|kv| Some((kv, kv.key_str().ok()?)))
                    else {
                        continue;
                    };
                    let change = match event.event_type() {
                        EventType::Put => Change::Put {
                            key,
                            value: kv.value(),
                        },
                        EventType::Delete => Change::Delete { key },
                    };
                    skipped.extend(cache.apply(change));
                }
            }
            skipped.into_iter().for_each(|s| log_skipped(Some(s)));
        }
    }
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

/// Whether every key in `[start, end)` is an address record of one pool (`pools/<id>/ips/`):
/// the cache marks those by their keys, so their values need not be read.
fn addresses_only(keys: &Keys, start: &[u8], end: &[u8]) -> bool {
    let pools = keys.pools();
    let Some(id_len) = start
        .strip_prefix(pools.as_bytes())
        .and_then(|rest| rest.iter().position(|b| *b == b'/'))
    else {
        return false;
    };
    let addresses = [&start[..pools.len() + id_len], b"/ips/"].concat();
    start.starts_with(&addresses) && end <= prefix_end(&addresses).as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ranges_within_one_pools_addresses_are_addresses_only() {
        let keys = Keys::new("/p");
        let ip = "/p/pools/10.0.0.0_8/ips/10.0.3.17";
        let cases: [(&str, &[u8], bool); 7] = [
            (ip, b"/p/pools/10.0.0.0_8/ips/10.0.3.2", true),
            (ip, b"/p/pools/10.0.0.0_8/ips0", true),
            (
                "/p/pools/10.0.0.0_8/ips/",
                b"/p/pools/10.0.0.0_8/ips0",
                true,
            ),
            // Past the addresses: the next pool's definition, or other records of the pool.
            (ip, b"/p/pools/10.0.0.0_80", false),
            (ip, b"/p/pools0", false),
            (
                "/p/pools/10.0.0.0_8/blocks/10.0.0.0_26",
                b"/p/pools/10.0.0.0_8/blocks0",
                false,
            ),
            ("/p/pools/10.0.0.0_8", b"/p/pools/10.0.0.0_8/ips0", false),
        ];
        for (start, end, expected) in cases {
            assert_eq!(
                addresses_only(&keys, start.as_bytes(), end),
                expected,
                "{start} .. {}",
                String::from_utf8_lossy(end)
            );
        }
    }
}
