//! The gRPC service the CNI plugins call: proto messages in, allocator calls, proto out.
//! `status_of` is the one mapping from allocator errors to gRPC status codes; the plugin maps
//! those codes to CNI error codes.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hostnic_proto::v1::ipam_server::Ipam;
use hostnic_proto::v1::{
    self, AllocateReply, AllocateRequest, CheckReply, CheckRequest, GcReply, GcRequest,
    IpAllocation, Network, ReleaseReply, ReleaseRequest, StatusReply, StatusRequest,
};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Response, Status};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::allocator::{self, Allocator};
use crate::annotations::{self, FixedRequest};
use crate::error::IpamError;
use crate::kube::{Holder, PodCache};
use crate::namespace_watch::Namespaces;
use crate::pool::{parse_range_sets, RangeSet};
use crate::records::{AllocationRecord, Attachment, Kind, PodRef};
use crate::sticky::{self, Identity};

/// Maps an allocator error to the gRPC status the plugin turns into a CNI error.
pub fn status_of(e: &IpamError) -> Status {
    let code = match e {
        IpamError::Config(_)
        | IpamError::Annotation(_)
        | IpamError::InvalidRequest { .. }
        | IpamError::InvalidAttachment { .. }
        | IpamError::Refused { .. }
        | IpamError::PoolConflict { .. }
        | IpamError::PoolOverlap { .. } => Code::InvalidArgument,
        IpamError::Exhausted { .. } => Code::ResourceExhausted,
        IpamError::AddressInUse { .. } => Code::AlreadyExists,
        IpamError::Unavailable { .. }
        | IpamError::NotSynced(_)
        | IpamError::Contention { .. }
        | IpamError::ReleasedMeanwhile { .. }
        | IpamError::StoreFull { .. }
        | IpamError::HolderTerminating { .. }
        | IpamError::HolderUnknown { .. } => Code::Unavailable,
        IpamError::Kubernetes(k) if k.is_retryable() => Code::Unavailable,
        IpamError::Etcd { .. } | IpamError::Corrupt { .. } | IpamError::Kubernetes(_) => {
            Code::Internal
        }
    };
    Status::new(code, e.to_string())
}

/// The daemon's side of the plugin protocol.
#[derive(Debug, Clone)]
pub struct IpamService {
    allocator: Arc<Allocator>,
    gc_grace: Duration,
    /// This node's pods, when the daemon has a Kubernetes client.
    pods: Option<Arc<PodCache>>,
    /// The namespace → subnet mapping, when the daemon has a Kubernetes client.
    namespaces: Option<Arc<Namespaces>>,
}

impl IpamService {
    /// `gc_grace`: attachments younger than this survive a CNI GC that does not list them.
    /// Without [`IpamService::with_pods`] the daemon knows no Kubernetes: pods are what the
    /// runtime says, and annotations are not read.
    pub fn new(allocator: Arc<Allocator>, gc_grace: Duration) -> Self {
        IpamService {
            allocator,
            gc_grace,
            pods: None,
            namespaces: None,
        }
    }

    /// Allocates for every ADD as its pod's namespace may (`namespaces`).
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = Some(namespaces);
        self
    }

    /// Allocates `request`, within its pod namespace's subnets when there is a mapping.
    async fn allocate_for_pod(
        &self,
        request: &allocator::AllocateRequest,
        identity: Option<&Identity>,
    ) -> Result<allocator::Allocation, IpamError> {
        match &self.namespaces {
            Some(namespaces) => {
                namespaces
                    .allocate(&self.allocator, request, identity)
                    .await
            }
            None => self.allocator.allocate_as(request, &[], identity).await,
        }
    }

    /// Reads the pod of every ADD that names one (`K8S_POD_NAMESPACE` and `K8S_POD_NAME`) from
    /// `pods`, for its fixed-IP annotations and its UID.
    pub fn with_pods(mut self, pods: Arc<PodCache>) -> Self {
        self.pods = Some(pods);
        self
    }

    pub fn node(&self) -> &str {
        self.allocator.node()
    }

    pub fn has_pods(&self) -> bool {
        self.pods.is_some()
    }

    /// The addresses an ADD asks for on its network, and their kind: the runtime's exact
    /// addresses (`Kind::Exact`), or the pod's annotated fixed address (`Kind::Fixed`). Reads
    /// the pod from the API when the daemon has a client and the request names a pod with its
    /// namespace; fills in the pod's UID from the API when the runtime did not send it.
    ///
    /// With `sticky` (the network's `stickyStatefulSets`), a StatefulSet pod that asks for no
    /// address (no `kube-ipam.ip`, nothing from the runtime) also gets its identity, whose
    /// sticky addresses it is to get.
    async fn requested(
        &self,
        pod: Option<&mut PodRef>,
        network: &str,
        range_sets: &[RangeSet],
        requested: Vec<IpAddr>,
        sticky: bool,
    ) -> Result<(Vec<IpAddr>, Kind, Option<Identity>), IpamError> {
        let (Some(pods), Some(pod)) = (&self.pods, pod) else {
            return Ok((requested, Kind::Exact, None));
        };
        if pod.namespace.is_empty() {
            return Ok((requested, Kind::Exact, None));
        }
        let meta = pods.pod(&pod.namespace, &pod.name, &pod.uid).await?;
        if pod.uid.is_empty() {
            pod.uid = meta.uid.clone();
        }
        let fixed = match FixedRequest::from_pod(&meta)? {
            Some(request) => request.for_network(network, range_sets)?,
            None => None,
        };
        let identity =
            (sticky && requested.is_empty() && !meta.annotations.contains_key(annotations::IP))
                .then(|| Identity::of_pod(&meta, network))
                .flatten();
        let (ips, kind) = combine(fixed, requested, network)?;
        Ok((ips, kind, identity))
    }

    /// An ADD was refused because `ip` is held by `holder` (its address record `record`): asks
    /// the API whether the holder's pod still exists and, if it is gone (deleted, or
    /// re-created with another UID, as a StatefulSet pod is), releases the holder's attachment
    /// so that the ADD can be tried again. Otherwise the error the ADD fails with: the holder
    /// is alive (101), terminating or cannot be judged (11). Without a client, or a holder
    /// whose record names no pod UID and namespace (Podman), its liveness is unknown and the
    /// address stays held.
    async fn take_over(
        &self,
        ip: IpAddr,
        holder: String,
        record: Box<AllocationRecord>,
    ) -> Result<(), IpamError> {
        let pod = record
            .pod
            .as_ref()
            .filter(|p| !p.namespace.is_empty() && !p.uid.is_empty());
        let (Some(pods), Some(pod)) = (&self.pods, pod) else {
            return Err(IpamError::AddressInUse {
                ip,
                holder,
                record: Some(record),
            });
        };
        match pods.holder(&pod.namespace, &pod.name, &pod.uid).await {
            Err(source) => Err(IpamError::HolderUnknown {
                ip,
                holder,
                source: Box::new(source),
            }),
            Ok(Holder::Terminating) => Err(IpamError::HolderTerminating { ip, holder }),
            Ok(Holder::Alive) => Err(IpamError::AddressInUse {
                ip,
                holder,
                record: Some(record),
            }),
            Ok(Holder::Gone { reason }) => {
                self.allocator.release(&record.attachment).await?;
                crate::metrics::gc_released("takeover", "holder_pod_gone", 1);
                tracing::info!(%ip, %holder, %reason, "released the attachment of a pod that is gone, to take its address over");
                Ok(())
            }
        }
    }
}

/// The request of an ADD given the pod's annotated fixed address for this network (`fixed`)
/// and the runtime's exact addresses (`CNI_ARGS IP=`, `runtimeConfig.ips`). Both may be given
/// only if they agree (the runtime asks for exactly the annotated address); otherwise the ADD is
/// refused (code 7): which of two requests the pod meant is not ours to guess.
fn combine(
    fixed: Option<IpAddr>,
    requested: Vec<IpAddr>,
    network: &str,
) -> Result<(Vec<IpAddr>, Kind), IpamError> {
    match fixed {
        None => Ok((requested, Kind::Exact)),
        Some(ip) if requested.is_empty() || requested == [ip] => Ok((vec![ip], Kind::Fixed)),
        Some(ip) => Err(IpamError::InvalidRequest {
            ip,
            network: network.to_string(),
            reason: format!(
                "annotation {} asks for {ip}, the runtime (CNI_ARGS IP=, runtimeConfig.ips) \
                 asks for {}; they must agree",
                annotations::IP,
                requested
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Only root may allocate: the socket is 0600, and this checks the caller's credentials too.
fn require_root<T>(request: &Request<T>) -> Result<(), Status> {
    let uid = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid());
    match uid {
        Some(0) => Ok(()),
        Some(uid) => Err(Status::permission_denied(format!(
            "caller uid {uid} is not root; only root may call hostnic-ipamd"
        ))),
        None => Err(Status::permission_denied(
            "caller credentials unknown; only root over the unix socket may call hostnic-ipamd",
        )),
    }
}

/// The attachment a request names: its network and its container id and ifname.
fn attachment_of(
    network: Option<&Network>,
    attachment: Option<&v1::Attachment>,
) -> Result<Attachment, Status> {
    let n = network.ok_or_else(|| Status::invalid_argument("network is required"))?;
    let a = attachment.ok_or_else(|| Status::invalid_argument("attachment is required"))?;
    Ok(Attachment::new(&n.name, &a.container_id, &a.ifname))
}

/// The network's `ipam` object, parsed once per request.
fn ipam_of(network: Option<&Network>) -> Result<serde_json::Value, Status> {
    let n = network.ok_or_else(|| Status::invalid_argument("network is required"))?;
    serde_json::from_str(&n.ipam_json)
        .map_err(|e| Status::invalid_argument(format!("ipam config is not JSON: {e}")))
}

fn range_sets_in(ipam: &serde_json::Value) -> Result<Vec<RangeSet>, Status> {
    parse_range_sets(ipam).map_err(|e| status_of(&IpamError::Config(e)))
}

fn range_sets_of(network: Option<&Network>) -> Result<Vec<RangeSet>, Status> {
    range_sets_in(&ipam_of(network)?)
}

fn parse_ips(values: &[String], what: &str) -> Result<Vec<IpAddr>, Status> {
    // `requested_ips` carries plain addresses, as the plugin sends them, so a prefix there is
    // refused naming the field; CHECK's previous-result addresses are CIDRs, of which only the
    // address is compared. Both are read with the plugin's grammar.
    let plain_only = what == "requested address";
    values
        .iter()
        .map(|v| {
            let text = v.trim();
            if plain_only {
                return hostnic_cni::parse_plain_ip(text).map_err(|reason| {
                    Status::invalid_argument(format!("requested_ips: {what} {v:?}: {reason}"))
                });
            }
            text.parse::<hostnic_cni::RequestedIp>()
                .map(|ip| ip.address)
                .map_err(|_| Status::invalid_argument(format!("{what} {v:?} is not an IP address")))
        })
        .collect()
}

fn reply_ips(allocation: &allocator::Allocation) -> Vec<IpAllocation> {
    allocation
        .ips
        .iter()
        .map(|x| IpAllocation {
            address: x.address().to_string(),
            gateway: x.gateway.to_string(),
        })
        .collect()
}

/// The verb of a request and the span it runs in, named after the verb. The fields are filled
/// in as the request is read (`record_*`) and answered (`ips`, `note`), so that every line it
/// logs, here or in the allocator, names the network, the attachment and the pod where the
/// request says them, and its one line of outcome (`traced`) says what it got.
macro_rules! request_span {
    ($verb:literal) => {
        (
            $verb,
            tracing::info_span!(
                $verb,
                network = Empty,
                container = Empty,
                ifname = Empty,
                pod = Empty,
                ips = Empty,
                note = Empty
            ),
        )
    };
}

/// Records the addresses a request got, released or checked.
fn record_ips<T: std::fmt::Debug>(ips: T) {
    Span::current().record("ips", tracing::field::debug(ips));
}

fn record_network(network: Option<&Network>) {
    if let Some(n) = network {
        Span::current().record("network", tracing::field::display(&n.name));
    }
}

fn record_attachment(network: Option<&Network>, attachment: Option<&v1::Attachment>) {
    record_network(network);
    if let Some(a) = attachment {
        let span = Span::current();
        span.record("container", tracing::field::display(&a.container_id));
        span.record("ifname", tracing::field::display(&a.ifname));
    }
}

fn record_pod(pod: Option<&PodRef>) {
    if let Some(p) = pod {
        Span::current().record(
            "pod",
            tracing::field::display(format_args!("{}/{}", p.namespace, p.name)),
        );
    }
}

/// Runs one request of `verb` in `span`, counts it in the metrics and logs its outcome in one
/// line with its duration and result (`code`, the gRPC code): `body` records what it did in the
/// span's fields, a refusal or failure is logged here with its message.
async fn traced<T>(
    (verb, span): (&'static str, Span),
    body: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let started = std::time::Instant::now();
    async move {
        let result = body.await;
        let elapsed = started.elapsed();
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        crate::metrics::request(verb, code, elapsed);
        let duration_ms = elapsed.as_micros() as f64 / 1000.0;
        // The result is the gRPC code, named as the metrics name it.
        let code = crate::metrics::code_name(code);
        match &result {
            Ok(_) => tracing::info!(duration_ms, %code, "{}", done_message(verb)),
            Err(status) => tracing::warn!(
                duration_ms,
                %code,
                error = %status.message(),
                "request failed"
            ),
        }
        result
    }
    .instrument(span)
    .await
}

/// The message of a request of `verb` that succeeded.
fn done_message(verb: &str) -> &'static str {
    match verb {
        "allocate" => "allocated",
        "release" => "released",
        "check" => "checked",
        "gc" => "garbage collected",
        "status" => "ready for ADD",
        _ => "done",
    }
}

#[tonic::async_trait]
impl Ipam for IpamService {
    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateReply>, Status> {
        traced(request_span!("allocate"), async {
            record_attachment(
                request.get_ref().network.as_ref(),
                request.get_ref().attachment.as_ref(),
            );
            require_root(&request)?;
            let req = request.into_inner();
            let attachment = attachment_of(req.network.as_ref(), req.attachment.as_ref())?;
            let mut pod = req.pod.filter(|p| !p.name.is_empty()).map(|p| PodRef {
                namespace: p.namespace,
                name: p.name,
                uid: p.uid,
            });
            record_pod(pod.as_ref());
            let ipam = ipam_of(req.network.as_ref())?;
            let range_sets = range_sets_in(&ipam)?;
            let requested = parse_ips(&req.requested_ips, "requested address")?;
            // The switch's type is checked with the pool keys (see [`sticky::enabled`]).
            let sticky = sticky::enabled(&ipam);
            let (requested, requested_kind, identity) = match self
                .requested(
                    pod.as_mut(),
                    &attachment.network,
                    &range_sets,
                    requested,
                    sticky,
                )
                .await
            {
                Ok(request) => request,
                // The API is away: an attachment that already holds its addresses (a repeated
                // ADD) still gets them, as the ADD that allocated them read the pod.
                Err(e) if e.is_retryable() => {
                    return match self.allocator.lookup(&attachment).await {
                        Ok(Some(held)) => {
                            let ips = reply_ips(&held);
                            record_ips(ips.iter().map(|i| &i.address).collect::<Vec<_>>());
                            Span::current().record(
                                "note",
                                tracing::field::debug(format!(
                                    "already held; the pod could not be read: {e}"
                                )),
                            );
                            Ok(Response::new(AllocateReply { ips }))
                        }
                        _ => Err(status_of(&e)),
                    };
                }
                Err(e) => return Err(status_of(&e)),
            };
            let request = allocator::AllocateRequest {
                attachment,
                netns: req.netns,
                pod,
                range_sets,
                requested,
                requested_kind,
            };
            let allocation = match self.allocate_for_pod(&request, identity.as_ref()).await {
                // Held by a pod that may be gone: once, take it over and ADD again.
                Err(IpamError::AddressInUse {
                    ip,
                    holder,
                    record: Some(record),
                }) => {
                    self.take_over(ip, holder, record)
                        .await
                        .map_err(|e| status_of(&e))?;
                    self.allocate_for_pod(&request, identity.as_ref()).await
                }
                other => other,
            }
            .map_err(|e| status_of(&e))?;
            let ips = reply_ips(&allocation);
            record_ips(ips.iter().map(|i| &i.address).collect::<Vec<_>>());
            Ok(Response::new(AllocateReply { ips }))
        })
        .await
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        traced(request_span!("release"), async {
            let req = request.get_ref();
            record_attachment(req.network.as_ref(), req.attachment.as_ref());
            require_root(&request)?;
            let attachment = attachment_of(req.network.as_ref(), req.attachment.as_ref())?;
            let released = self
                .allocator
                .release(&attachment)
                .await
                .map_err(|e| status_of(&e))?;
            record_pod(released.as_ref().and_then(|r| r.pod.as_ref()));
            let released: Vec<String> = released
                .map(|r| r.ips.iter().map(|x| x.ip.to_string()).collect())
                .unwrap_or_default();
            record_ips(&released);
            Ok(Response::new(ReleaseReply { released }))
        })
        .await
    }

    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckReply>, Status> {
        traced(request_span!("check"), async {
            record_attachment(
                request.get_ref().network.as_ref(),
                request.get_ref().attachment.as_ref(),
            );
            require_root(&request)?;
            let req = request.into_inner();
            let attachment = attachment_of(req.network.as_ref(), req.attachment.as_ref())?;
            let expected: HashSet<IpAddr> = parse_ips(&req.addresses, "previous result address")?
                .into_iter()
                .collect();
            let held = self
                .allocator
                .lookup(&attachment)
                .await
                .map_err(|e| status_of(&e))?
                .ok_or_else(|| {
                    Status::not_found(format!("attachment {attachment} holds no address"))
                })?;
            let held: HashSet<IpAddr> = held.ips.iter().map(|x| x.ip).collect();
            if held != expected {
                return Err(Status::failed_precondition(format!(
                    "attachment {attachment} holds {held:?}, the previous result says {expected:?}"
                )));
            }
            record_ips(&held);
            Ok(Response::new(CheckReply {}))
        })
        .await
    }

    async fn gc(&self, request: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        traced(request_span!("gc"), async {
            record_network(request.get_ref().network.as_ref());
            require_root(&request)?;
            let req = request.into_inner();
            let network = req
                .network
                .as_ref()
                .map(|n| n.name.clone())
                .ok_or_else(|| Status::invalid_argument("network is required"))?;
            let valid: HashSet<Attachment> = req
                .valid_attachments
                .iter()
                .map(|a| Attachment::new(&network, &a.container_id, &a.ifname))
                .collect();
            let released = self
                .allocator
                .gc(&network, &valid, self.gc_grace)
                .await
                .map_err(|e| status_of(&e))?;
            crate::metrics::gc_released("cni", "not_in_valid_attachments", released.len());
            Span::current().record(
                "note",
                tracing::field::debug(format!(
                    "{} valid attachments, released {:?}",
                    valid.len(),
                    released.iter().map(ToString::to_string).collect::<Vec<_>>()
                )),
            );
            Ok(Response::new(GcReply {
                released: released
                    .into_iter()
                    .map(|a| v1::Attachment {
                        container_id: a.container_id,
                        ifname: a.ifname,
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        traced(request_span!("status"), async {
            record_network(request.get_ref().network.as_ref());
            require_root(&request)?;
            let network = request.get_ref().network.as_ref();
            let range_sets = range_sets_of(network)?;
            let name = network.map(|n| n.name.as_str()).unwrap_or_default();
            self.allocator
                .status(&range_sets, name)
                .await
                .map_err(|e| status_of(&e))?;
            Ok(Response::new(StatusReply {}))
        })
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn an_annotation_and_a_runtime_request_must_agree() {
        let fixed = Some(ips(&["10.0.0.5"])[0]);
        assert_eq!(
            combine(None, ips(&["10.0.0.7"]), "n").unwrap(),
            (ips(&["10.0.0.7"]), Kind::Exact)
        );
        assert_eq!(combine(None, vec![], "n").unwrap(), (vec![], Kind::Exact));
        assert_eq!(
            combine(fixed, vec![], "n").unwrap(),
            (ips(&["10.0.0.5"]), Kind::Fixed)
        );
        assert_eq!(
            combine(fixed, ips(&["10.0.0.5"]), "n").unwrap(),
            (ips(&["10.0.0.5"]), Kind::Fixed)
        );
        for other in [ips(&["10.0.0.6"]), ips(&["10.0.0.5", "fd00::5"])] {
            let e = combine(fixed, other, "n").unwrap_err();
            assert_eq!(status_of(&e).code(), Code::InvalidArgument);
            assert!(
                e.to_string().contains("kube-ipam.ip asks for 10.0.0.5"),
                "{e}"
            );
        }
    }
}
