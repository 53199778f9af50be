//! Group commit: the transactions that wait for etcd at the same moment go to it as one.
//!
//! Each waiting transaction is nested, unchanged, in one outer transaction that has no compares
//! of its own, so etcd evaluates each nested one's compares alone: one that fails takes only its
//! own `else` branch, and its neighbours still commit. Every caller gets the answer its own
//! transaction would have got. What the group saves is etcd's cost per request (the gRPC call,
//! the Raft proposal, the WAL entry, the apply step), paid once for the group.
//!
//! A transaction is sent alone when nothing else waits, so a quiet daemon pays only a channel
//! hop. One group is at etcd at a time, and the next gathers meanwhile: with 64 clients on one
//! daemon that gave a higher rate than two or four groups at once (BENCHMARKS.md).
//!
//! Members of a group touch disjoint keys ([`next_group`]): a transaction that compares, reads
//! or writes a key another member touches waits for the next group. etcd refuses a request that
//! writes one key twice; and it evaluates every nested compare before any nested write, so two
//! members where one compares a key the other writes would both see the state before the group,
//! which no order of the two alone could give (a DEL that finds no attachment and a late ADD of
//! it would both commit). With disjoint keys, the group's outcome is that of its members one
//! after the other, in any order.
//!
//! A group that etcd refuses for another reason than being unreachable or full (its
//! `--max-txn-ops` or `--max-request-bytes` is lower than [`MAX_GROUP`] needs, a lease one
//! member names is gone) is sent again as single transactions, so that each caller sees its own
//! error. A transaction whose caller went away while it waited (the plugin's connection closed)
//! is dropped unsent, as an ADD cancelled before its commit always was.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use etcd_client::{Txn, TxnOp, TxnOpResponse, TxnResponse};
use tokio::sync::{mpsc, oneshot};

use crate::error::{IpamError, Result};
use crate::metrics::{self, TxnResult};
use crate::store::Store;

/// At most this many transactions in one group. etcd's default `--max-txn-ops` (128) bounds the
/// outer transaction's operations plus each nested one's.
pub const MAX_GROUP: usize = 64;

/// One transaction's answer, and the revision etcd committed its group at.
#[derive(Debug)]
pub struct Answer {
    pub response: TxnResponse,
    /// The revision of the request that carried the transaction: the mod revision of every key
    /// it wrote, if it succeeded.
    pub revision: i64,
}

impl Answer {
    /// The answer to `txn` sent as a request of its own.
    pub(crate) async fn alone(store: &Store, op: &str, txn: Txn) -> Result<Answer> {
        let response = store.txn(op, txn).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(Answer { response, revision })
    }
}

/// A transaction waiting for its group.
pub(crate) struct Waiting {
    op: String,
    txn: Txn,
    keys: Vec<String>,
    reply: oneshot::Sender<Result<Answer>>,
}

/// The sending end: cheap to clone, one per [`Store`].
#[derive(Clone)]
pub(crate) struct Committer {
    waiting: mpsc::UnboundedSender<Waiting>,
}

impl Committer {
    /// Starts the task that commits the groups through `store` (which must have no committer of
    /// its own). It ends when every `Committer` is dropped.
    pub(crate) fn start(store: Store) -> Committer {
        let (waiting, rx) = mpsc::unbounded_channel();
        tokio::spawn(commit_groups(store, rx));
        Committer { waiting }
    }

    /// Commits `txn` in the next group; `keys` are all the keys it compares, reads or writes.
    pub(crate) async fn txn(&self, op: &str, txn: Txn, keys: Vec<String>) -> Result<Answer> {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            op: op.to_string(),
            txn,
            keys,
            reply,
        };
        let stopped = || IpamError::Unavailable {
            op: op.to_string(),
            reason: "the daemon's etcd committer has stopped".into(),
        };
        self.waiting.send(waiting).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Which of the waiting transactions, given by the keys each touches and in the order they
/// arrived, form the next group: each in turn that touches no key an earlier member touches, up
/// to `max`. The rest keep their order for the groups after.
pub fn next_group<'a>(touched: impl IntoIterator<Item = &'a [String]>, max: usize) -> Vec<usize> {
    let mut taken: HashSet<&str> = HashSet::new();
    let mut group = Vec::new();
    for (i, keys) in touched.into_iter().enumerate() {
        if group.len() == max {
            break;
        }
        if keys.iter().any(|k| taken.contains(k.as_str())) {
            continue;
        }
        taken.extend(keys.iter().map(String::as_str));
        group.push(i);
    }
    group
}

async fn commit_groups(store: Store, mut arrivals: mpsc::UnboundedReceiver<Waiting>) {
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match arrivals.recv().await {
                Some(w) => queue.push_back(w),
                None => return,
            }
        }
        while let Ok(w) = arrivals.try_recv() {
            queue.push_back(w);
        }
        queue.retain(|w| !w.reply.is_closed());
        let chosen = next_group(queue.iter().map(|w| w.keys.as_slice()), MAX_GROUP);
        let group = take(&mut queue, &chosen);
        if !group.is_empty() {
            commit(&store, group).await;
        }
    }
}

/// Removes the entries at `indices` (ascending) from `queue`, keeping the others' order.
fn take(queue: &mut VecDeque<Waiting>, indices: &[usize]) -> Vec<Waiting> {
    let mut taken = Vec::with_capacity(indices.len());
    let mut kept = VecDeque::with_capacity(queue.len() - indices.len());
    let mut next = indices.iter().peekable();
    for (i, w) in queue.drain(..).enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            taken.push(w);
        } else {
            kept.push_back(w);
        }
    }
    *queue = kept;
    taken
}

async fn commit(store: &Store, mut group: Vec<Waiting>) {
    if group.len() == 1 {
        alone(store, group.pop().expect("one member")).await;
        return;
    }
    let nested: Vec<TxnOp> = group.iter().map(|w| TxnOp::txn(w.txn.clone())).collect();
    let outer = Txn::new().and_then(nested);
    let op = format!("commit {} transactions as one", group.len());
    let started = Instant::now();
    match store.send(&op, outer).await {
        Ok(outer) => {
            metrics::etcd_grouped(group.len());
            let revision = outer.header().map_or(0, |h| h.revision());
            let answers = outer.op_responses().into_iter().map(|r| match r {
                TxnOpResponse::Txn(response) => {
                    metrics::etcd_txn(TxnResult::of(&response), started.elapsed());
                    Ok(Answer { response, revision })
                }
                other => Err(IpamError::Etcd {
                    op: op.clone(),
                    reason: format!("etcd answered a nested transaction with {other:?}"),
                }),
            });
            for (w, answer) in group.into_iter().zip(answers) {
                let _ = w.reply.send(answer);
            }
        }
        Err(e) => {
            let failures: Option<Vec<IpamError>> = group
                .iter()
                .map(|w| member_failure(&e, w.op.clone()))
                .collect();
            match failures {
                Some(failures) => {
                    for (w, failure) in group.into_iter().zip(failures) {
                        metrics::etcd_txn(TxnResult::Failed, started.elapsed());
                        let _ = w.reply.send(Err(failure));
                    }
                }
                None => {
                    tracing::debug!(error = %e, "etcd refused a group of transactions; sending each alone");
                    futures::future::join_all(group.into_iter().map(|w| alone(store, w))).await;
                }
            }
        }
    }
}

/// What a member of a group that failed with `e` is told: the same failure, naming the
/// member's own `op`, when etcd was unreachable or full; None when etcd refused the group
/// itself, whose members are then sent alone.
fn member_failure(e: &IpamError, op: String) -> Option<IpamError> {
    match e {
        IpamError::Unavailable { reason, .. } => Some(IpamError::Unavailable {
            op,
            reason: reason.clone(),
        }),
        IpamError::StoreFull { reason, .. } => Some(IpamError::StoreFull {
            op,
            reason: reason.clone(),
        }),
        _ => None,
    }
}

/// Commits one waiting transaction as a request of its own.
async fn alone(store: &Store, w: Waiting) {
    let _ = w.reply.send(Answer::alone(store, &w.op, w.txn).await);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_group_takes_the_waiting_in_order_and_skips_those_touching_a_key_already_in_it() {
        let waiting = [
            keys(&["a", "b"]),
            keys(&["b", "c"]),
            keys(&["c"]),
            keys(&[]),
            keys(&["a"]),
            keys(&["d"]),
        ];
        let group = next_group(waiting.iter().map(Vec::as_slice), MAX_GROUP);
        assert_eq!(group, [0, 2, 3, 5]);
    }

    #[test]
    fn a_group_stops_at_its_size() {
        let waiting: Vec<Vec<String>> = (0..10).map(|i| keys(&[&i.to_string()])).collect();
        assert_eq!(next_group(waiting.iter().map(Vec::as_slice), 3), [0, 1, 2]);
    }

    #[test]
    fn taking_a_group_keeps_the_rest_in_order() {
        let mut queue: VecDeque<Waiting> = (0..5)
            .map(|i| Waiting {
                op: i.to_string(),
                txn: Txn::new(),
                keys: Vec::new(),
                reply: oneshot::channel().0,
            })
            .collect();
        let taken = take(&mut queue, &[0, 2, 3]);
        let ops = |ws: &mut dyn Iterator<Item = &Waiting>| -> Vec<String> {
            ws.map(|w| w.op.clone()).collect()
        };
        assert_eq!(ops(&mut taken.iter()), ["0", "2", "3"]);
        assert_eq!(ops(&mut queue.iter()), ["1", "4"]);
    }
}
