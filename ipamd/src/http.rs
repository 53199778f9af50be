//! The daemon's HTTP endpoint (`--metrics-addr`): `/metrics` (Prometheus text format, see
//! `metrics`), `/healthz` (the process serves) and `/readyz` (etcd answers, the pools are
//! loaded, and this node's pods are listed when the daemon reads Kubernetes).
//!
//! It is off unless asked for, and listens on loopback unless the operator says otherwise
//! ([`check_listen_addr`]): it has no authentication, and with the DaemonSet's host network a
//! wildcard address would expose it on the node's own addresses.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::allocator::Allocator;
use crate::kube::PodCache;
use crate::metrics::{NicGauges, PoolGauges, Scrape};
use crate::nics::NicPool;

/// How long `/readyz` waits for etcd's answer: below the kubelet's default probe timeout.
pub const ETCD_PROBE_TIMEOUT: Duration = Duration::from_millis(900);

/// Refuses a listen address that is not loopback unless `allow_remote`: the endpoint has no
/// authentication, and the pool, node and error counts it shows are the cluster's.
pub fn check_listen_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "--metrics-addr {addr} is not a loopback address: the metrics and health endpoint \
             has no authentication; give 127.0.0.1:PORT, or add --metrics-allow-remote to \
             serve it on {}",
            addr.ip()
        ))
    }
}

/// What the endpoint reads: the allocator, this node's pod cache when there is one, and its
/// NIC pool in QingCloud mode.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub allocator: Arc<Allocator>,
    pub pods: Option<Arc<PodCache>>,
    pub nics: Option<Arc<NicPool>>,
}

/// One readiness check's name and why it failed, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub failure: Option<String>,
}

/// The `/readyz` page for `checks`: 200 when every check passed, 503 otherwise; one line per
/// check, `ok NAME` or `failed NAME: REASON`.
pub fn readiness_page(checks: &[Check]) -> (StatusCode, String) {
    let mut ready = true;
    let mut body = String::new();
    for c in checks {
        match &c.failure {
            None => body.push_str(&format!("ok {}\n", c.name)),
            Some(reason) => {
                ready = false;
                body.push_str(&format!("failed {}: {reason}\n", c.name));
            }
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

impl Endpoint {
    /// The readiness checks, etcd's answered within [`ETCD_PROBE_TIMEOUT`].
    pub async fn checks(&self) -> Vec<Check> {
        let mut checks = vec![
            Check {
                name: "etcd",
                failure: self.etcd_failure().await,
            },
            Check {
                name: "pools",
                failure: (!self.allocator.is_synced())
                    .then(|| "the pools have not been loaded from etcd yet".to_string()),
            },
        ];
        if let Some(pods) = &self.pods {
            checks.push(Check {
                name: "pods",
                failure: (!pods.is_synced()).then(|| {
                    "this node's pods have not been listed from the Kubernetes API yet".to_string()
                }),
            });
        }
        checks
    }

    /// Why etcd is not usable now: one linearizable read of one key (the pool index), which a
    /// member without a leader refuses. One key, so a probe costs etcd the same whatever the
    /// number of addresses.
    async fn etcd_failure(&self) -> Option<String> {
        let mut client = self.allocator.store().client();
        let read = client.get(self.allocator.keys().pool_index(), None);
        match tokio::time::timeout(ETCD_PROBE_TIMEOUT, read).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(crate::store::describe(&e)),
            Err(_) => Some(format!("no answer within {ETCD_PROBE_TIMEOUT:?}")),
        }
    }

    /// The NIC gauges from the pool's etcd records; None (the gauges are left out of the
    /// scrape, not shown wrong) when there is no pool or its records cannot be read.
    async fn nic_gauges(&self) -> Option<NicGauges> {
        let pool = self.nics.as_ref()?;
        match tokio::time::timeout(ETCD_PROBE_TIMEOUT, pool.counts()).await {
            Ok(Ok(c)) => Some(NicGauges {
                attaching: c.attaching,
                ready: c.ready,
                leased: c.leased,
                max: pool.settings().max_nic,
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading this node's NIC records for /metrics failed");
                None
            }
            Err(_) => {
                tracing::warn!("reading this node's NIC records for /metrics took too long");
                None
            }
        }
    }

    /// The `/metrics` page.
    pub async fn metrics_page(&self) -> String {
        Scrape {
            nics: self.nic_gauges().await,
            pools: self
                .allocator
                .pool_usage()
                .into_iter()
                .map(|(subnet, usage)| PoolGauges { subnet, usage })
                .collect(),
        }
        .render()
    }

    async fn respond(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        }
        match request.uri().path() {
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.metrics_page().await);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                let (status, body) = readiness_page(&self.checks().await);
                text(status, body)
            }
            other => text(
                StatusCode::NOT_FOUND,
                format!("{other}: not found; try /metrics, /healthz or /readyz\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Binds `addr`; the error names the address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}"))
}

/// Serves `endpoint` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: impl Future<Output = ()>) {
    let endpoint = Arc::new(endpoint);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let endpoint = Arc::clone(&endpoint);
                async move { Ok::<_, Infallible>(endpoint.respond(request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics endpoint: connection ended");
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_served_unless_remote_is_allowed() {
        for ok in ["127.0.0.1:9153", "[::1]:9153", "127.0.0.2:1"] {
            check_listen_addr(ok.parse().unwrap(), false).unwrap();
        }
        for remote in ["0.0.0.0:9153", "[::]:9153", "10.0.0.5:9153"] {
            let e = check_listen_addr(remote.parse().unwrap(), false).unwrap_err();
            assert!(e.contains(remote), "{e}");
            assert!(e.contains("--metrics-allow-remote"), "{e}");
            check_listen_addr(remote.parse().unwrap(), true).unwrap();
        }
    }

    #[test]
    fn readiness_fails_when_any_check_fails_and_names_it() {
        let ok = |name| Check {
            name,
            failure: None,
        };
        let (status, body) = readiness_page(&[ok("etcd"), ok("pools")]);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "ok etcd\nok pools\n");
        let (status, body) = readiness_page(&[
            Check {
                name: "etcd",
                failure: Some("connection refused".into()),
            },
            ok("pools"),
        ]);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "failed etcd: connection refused\nok pools\n");
    }
}
