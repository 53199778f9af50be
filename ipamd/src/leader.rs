//! Election of one daemon for a cluster-wide task (the deleted-node GC, and any later task
//! that must run on one node at a time), through an etcd lease.
//!
//! A candidate campaigns by writing `leader/<role>` under a lease of its own, guarded by
//! "the key does not exist" (`create_revision == 0`); the winner renews the lease every third
//! of its TTL. The key goes when the leader resigns (revokes its lease at shutdown) or stops
//! renewing (killed, cut off from etcd): then another candidate's next campaign wins.
//!
//! A leader stops acting as soon as it cannot be sure it still leads: at the end of the TTL
//! counted from the *sending* of the last renewal etcd answered (etcd counts it from later, so
//! the lease cannot have expired earlier), or when etcd says the lease is gone. It then
//! campaigns again. Leadership spreads work, it is not what keeps the data safe: every write
//! of a task is still a guarded transaction, so two daemons that briefly both believe they
//! lead only race for the same compare-and-swap.
//!
//! [`Leadership`] is the handle (is this daemon the leader now, and a channel of its term: the
//! lease it leads under, None while it does not lead); [`while_leader`] runs a task only while
//! leading, and stops it when the term ends even if a new one began at once.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Result;
use crate::records::{now_unix, LeaderRecord, RECORD_VERSION};
use crate::store::Store;

/// The role of the daemon that releases what deleted nodes left behind.
pub const CLEANER: &str = "cleaner";

/// How an election runs.
#[derive(Debug, Clone)]
pub struct Election {
    /// The key campaigned for (`Keys::leader`).
    pub key: String,
    /// This candidate's name, written in the key (the node name).
    pub node: String,
    /// The lease's TTL: how long a leader that stopped renewing keeps the role. etcd raises a
    /// TTL below its minimum (about 2 s by default).
    pub ttl: Duration,
}

/// The lease this daemon leads under; None while it does not lead. A new term is a new
/// lease, so a task that sees the term change knows that leadership was lost in between.
pub type Term = Option<i64>;

/// A future that completes when a task must stop.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// This daemon's part in an election. Dropping it stops campaigning without revoking the
/// lease (the role then passes on after the TTL); [`Leadership::resign`] passes it on at once.
#[derive(Debug)]
pub struct Leadership {
    leading: watch::Receiver<Term>,
    resign: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leadership {
    /// Starts campaigning in the background.
    pub fn start(store: Store, election: Election) -> Leadership {
        let (tx, leading) = watch::channel(None);
        let (resign, resigned) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(campaign(store, election, tx, resigned));
        Leadership {
            leading,
            resign: Some(resign),
            task,
        }
    }

    /// Whether this daemon leads now.
    pub fn is_leader(&self) -> bool {
        self.leading.borrow().is_some()
    }

    /// A receiver of this daemon's [`Term`]: it changes when leadership is won or lost.
    pub fn subscribe(&self) -> watch::Receiver<Term> {
        self.leading.clone()
    }

    /// Stops campaigning and, if leading, stops leading and revokes the lease, so that another
    /// candidate takes over at its next campaign rather than after the TTL.
    pub async fn resign(mut self) {
        if let Some(resign) = self.resign.take() {
            let _ = resign.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Runs `task` each time this daemon becomes leader, with a [`Stop`] that completes when that
/// term ends (or the election does), even if another term began at once; the task is dropped
/// at once when `shutdown` completes. A task that returns while still leading is started
/// again only in a later term. `what` names the task in the log.
pub async fn while_leader<F, Fut>(
    what: &str,
    mut leading: watch::Receiver<Term>,
    shutdown: impl Future<Output = ()>,
    mut task: F,
) where
    F: FnMut(Stop) -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let mut last: Term = None;
    loop {
        let term = tokio::select! {
            () = &mut shutdown => return,
            won = leading.wait_for(|t| t.is_some() && *t != last) => match won {
                Ok(term) => *term,
                Err(_) => return,
            },
        };
        last = term;
        tracing::info!(lease = ?term, "{what}: this daemon leads; starting");
        let mut lost = leading.clone();
        let stop: Stop = Box::pin(async move {
            let _ = lost.wait_for(|t| *t != term).await;
        });
        tokio::select! {
            () = &mut shutdown => return,
            () = task(stop) => {}
        }
        tokio::select! {
            () = &mut shutdown => return,
            lost = leading.wait_for(|t| *t != term) => if lost.is_err() { return },
        }
        tracing::info!(lease = ?term, "{what}: this daemon's term ended; stopped");
    }
}

/// How often a candidate that lost looks again, and a leader renews: a third of the TTL.
fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Campaigns until `resigned`, leading whenever the key is ours.
async fn campaign(
    store: Store,
    election: Election,
    leading: watch::Sender<Term>,
    mut resigned: tokio::sync::oneshot::Receiver<()>,
) {
    let period = period(election.ttl);
    loop {
        let attempt = tokio::select! {
            _ = &mut resigned => return,
            attempt = try_to_win(&store, &election) => attempt,
        };
        match attempt {
            Ok(Some((lease, until))) => {
                tracing::info!(key = %election.key, node = %election.node, lease, "elected");
                leading.send_replace(Some(lease));
                let resign = lead(&store, &election, lease, until, &mut resigned).await;
                leading.send_replace(None);
                if resign {
                    match store
                        .retry("revoke the leader lease", |mut c| async move {
                            c.lease_revoke(lease).await
                        })
                        .await
                    {
                        Ok(_) => tracing::info!(key = %election.key, "resigned"),
                        Err(e) => {
                            tracing::warn!(key = %election.key, error = %e, "could not revoke the leader lease; it expires by itself")
                        }
                    }
                    return;
                }
                // Lost: campaign again at once (the key may be gone already).
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(key = %election.key, error = %e, "campaign failed; trying again")
            }
        }
        tokio::select! {
            _ = &mut resigned => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// One campaign: None if someone else leads; the lease and until when this daemon may act if
/// it won.
async fn try_to_win(store: &Store, election: &Election) -> Result<Option<(i64, Instant)>> {
    let held = store
        .get("read the leader key", &election.key, None)
        .await?;
    if !held.kvs().is_empty() {
        return Ok(None);
    }
    let seconds = i64::try_from(election.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let sent = Instant::now();
    let grant = store
        .retry("grant the leader lease", |mut c| async move {
            c.lease_grant(seconds, None).await
        })
        .await?;
    let lease = grant.id();
    let record = LeaderRecord {
        version: RECORD_VERSION,
        node: election.node.clone(),
        since: now_unix(),
    };
    let value = serde_json::to_string(&record).expect("records serialise");
    let txn = Txn::new()
        .when([Compare::create_revision(
            election.key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            election.key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let won = store.txn("campaign for the leader key", txn).await?;
    if won.succeeded() {
        return Ok(Some((lease, sent + ttl_of(grant.ttl()))));
    }
    // Someone was faster: the unused lease would expire anyway.
    let _ = store
        .retry("revoke an unused lease", |mut c| async move {
            c.lease_revoke(lease).await
        })
        .await;
    Ok(None)
}

fn ttl_of(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// Leads until the lease may have expired or etcd says it has (false), or until `resigned`
/// (true).
async fn lead(
    store: &Store,
    election: &Election,
    lease: i64,
    mut until: Instant,
    resigned: &mut tokio::sync::oneshot::Receiver<()>,
) -> bool {
    let period = period(election.ttl);
    let mut keeper = None;
    loop {
        tokio::select! {
            _ = &mut *resigned => return true,
            () = tokio::time::sleep_until(until) => {
                tracing::warn!(key = %election.key, lease, "leader lease not renewed in time; no longer leading");
                return false;
            }
            () = tokio::time::sleep(period) => {}
        }
        let sent = Instant::now();
        let renewal = tokio::select! {
            _ = &mut *resigned => return true,
            () = tokio::time::sleep_until(until) => {
                tracing::warn!(key = %election.key, lease, "leader lease not renewed in time; no longer leading");
                return false;
            }
            renewal = renew(store, lease, &mut keeper) => renewal,
        };
        match renewal {
            Ok(ttl) if ttl > 0 => until = sent + ttl_of(ttl),
            Ok(_) => {
                tracing::warn!(key = %election.key, lease, "leader lease expired; no longer leading");
                return false;
            }
            Err(e) => {
                tracing::debug!(key = %election.key, error = %e, "renewing the leader lease failed; trying again");
                keeper = None;
            }
        }
    }
}

type Keeper = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// One renewal on the keep-alive stream (opened again after a failure); the TTL etcd answers,
/// 0 when the lease is gone.
async fn renew(
    store: &Store,
    lease: i64,
    keeper: &mut Option<Keeper>,
) -> std::result::Result<i64, etcd_client::Error> {
    if keeper.is_none() {
        match store.client().lease_keep_alive(lease).await {
            Ok(opened) => *keeper = Some(opened),
            // Opening the stream renews once, and fails so when etcd has no such lease: it is
            // gone (revoked, or expired while the daemon could not reach etcd).
            Err(etcd_client::Error::LeaseKeepAliveError(reason))
                if reason.contains("not found") =>
            {
                return Ok(0)
            }
            Err(e) => return Err(e),
        }
    }
    let (sender, stream) = keeper.as_mut().expect("opened above");
    sender.keep_alive().await?;
    match stream.message().await? {
        Some(answer) => Ok(answer.ttl()),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "the keep-alive stream ended".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_renews_three_times_per_ttl_and_never_spins() {
        assert_eq!(period(Duration::from_secs(15)), Duration::from_secs(5));
        assert_eq!(period(Duration::ZERO), Duration::from_millis(100));
    }
}
