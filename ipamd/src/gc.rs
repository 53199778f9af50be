//! What the daemon's garbage collectors share: when they run, the loop that runs them until
//! shutdown, and how they print addresses. The network-namespace GC (`netns_gc`) and the pod
//! GC (`pod_gc`) each judge attachments their own way.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

/// When to run passes inside the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub interval: Duration,
    /// Attachments younger than this are not judged.
    pub grace: Duration,
}

/// Runs `pass` every `schedule.interval` (the first right after start) until `shutdown`
/// completes, giving each report to `report`; a pass in progress is abandoned at shutdown
/// (each release is one transaction, so none is left half done). `what` names the GC in the
/// log.
pub async fn run_every<R, E, P, Fut>(
    what: &str,
    schedule: Schedule,
    shutdown: impl Future<Output = ()>,
    mut pass: P,
    mut report: impl FnMut(R),
) where
    E: std::fmt::Display,
    P: FnMut() -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(schedule.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(interval = ?schedule.interval, grace = ?schedule.grace, "{what} running");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = &mut shutdown => break,
            result = pass() => match result {
                Ok(r) => report(r),
                Err(e) => tracing::warn!(error = %e, "{what} pass failed; trying again at the next interval"),
            },
        }
    }
    tracing::info!("{what} stopped");
}

/// Addresses as a list for a log or report line.
pub fn join_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
