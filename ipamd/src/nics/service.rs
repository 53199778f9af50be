//! The `Nics` gRPC service (`proto/nics.proto`): the `hostnic` plugin's calls in, the NIC pool's
//! answers out, errors as gRPC codes the plugin maps to CNI codes (as `service::status_of`
//! does for the Ipam service).

use std::sync::Arc;

use hostnic_proto::nics_v1::nics_server::Nics;
use hostnic_proto::nics_v1::{LeaseNicRequest, NicAttachment, NicLease, ReturnNicReply};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Response, Status};

use super::{LeasedNic, NicError, NicPool};
use crate::records::{Attachment, PodRef};

/// Maps a NIC error to the status the plugin turns into a CNI error: bad requests and
/// configuration 7, no NIC left 100 (`ResourceExhausted`), what may pass 11.
pub fn nic_status(e: &NicError) -> Status {
    let code = match e {
        NicError::Config(_) | NicError::InvalidRequest(_) => Code::InvalidArgument,
        NicError::Exhausted(_) => Code::ResourceExhausted,
        NicError::Ipam(e) => return crate::service::status_of(e),
        e if e.is_retryable() => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// A namespace's entries in `hostnic-ipam-config` (vxnet ids, block names), None when it has
/// none. Supplied by whoever watches that ConfigMap.
pub type NamespaceEntries = Arc<dyn Fn(&str) -> Option<Vec<String>> + Send + Sync>;

/// The daemon's side of the `hostnic` plugin's protocol.
#[derive(Clone)]
pub struct NicService {
    pool: Arc<NicPool>,
    namespaces: Option<NamespaceEntries>,
}

impl std::fmt::Debug for NicService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NicService")
            .field("pool", &self.pool)
            .field("namespaces", &self.namespaces.is_some())
            .finish()
    }
}

impl NicService {
    pub fn new(pool: Arc<NicPool>) -> Self {
        NicService {
            pool,
            namespaces: None,
        }
    }

    /// Pods of a namespace with entries get NICs only in those vxnets or blocks.
    pub fn with_namespaces(mut self, entries: NamespaceEntries) -> Self {
        self.namespaces = Some(entries);
        self
    }
}

fn require_root<T>(request: &Request<T>) -> Result<(), Status> {
    let uid = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid());
    match uid {
        Some(0) | None => Ok(()),
        Some(uid) => Err(Status::permission_denied(format!(
            "only root may lease NICs; the caller runs as uid {uid}"
        ))),
    }
}

fn attachment(a: Option<NicAttachment>) -> Result<Attachment, Status> {
    let a = a.ok_or_else(|| Status::invalid_argument("the request names no attachment"))?;
    let attachment = Attachment::new(a.network, a.container_id, a.ifname);
    attachment
        .validate()
        .map_err(|e| Status::invalid_argument(format!("attachment: {e}")))?;
    if attachment.network == super::record::NIC_NETWORK {
        return Err(Status::invalid_argument(format!(
            "network name {} is the daemon's own",
            super::record::NIC_NETWORK
        )));
    }
    Ok(attachment)
}

fn lease_reply(nic: LeasedNic) -> NicLease {
    NicLease {
        nic_id: nic.nic_id,
        host_link: nic.host_link,
        address: nic.address,
        gateway: nic.gateway.to_string(),
        vxnet: nic.vxnet,
        service_gateway: String::new(),
    }
}

#[tonic::async_trait]
impl Nics for NicService {
    async fn lease_nic(
        &self,
        request: Request<LeaseNicRequest>,
    ) -> Result<Response<NicLease>, Status> {
        require_root(&request)?;
        let r = request.into_inner();
        let attachment = attachment(r.attachment)?;
        let pod = (!r.pod_name.is_empty()).then_some(PodRef {
            namespace: r.pod_namespace,
            name: r.pod_name,
            uid: r.pod_uid,
        });
        let entries = match (&self.namespaces, &pod) {
            (Some(lookup), Some(pod)) if !pod.namespace.is_empty() => lookup(&pod.namespace),
            _ => None,
        };
        let within = match entries {
            Some(entries) => self.pool.placement(&entries).map_err(|e| nic_status(&e))?,
            None => Vec::new(),
        };
        let nic = self
            .pool
            .lease_within(&attachment, pod, &r.netns, &within)
            .await
            .map_err(|e| nic_status(&e))?;
        let vxnet = nic.vxnet.clone();
        let mut reply = lease_reply(nic);
        if r.service_gateway {
            reply.service_gateway = self
                .pool
                .service_gateway(&vxnet)
                .await
                .map_err(|e| nic_status(&e))?
                .to_string();
        }
        Ok(Response::new(reply))
    }

    async fn get_nic(&self, request: Request<NicAttachment>) -> Result<Response<NicLease>, Status> {
        require_root(&request)?;
        let attachment = attachment(Some(request.into_inner()))?;
        match self.pool.get(&attachment).await {
            Ok(Some(nic)) => Ok(Response::new(lease_reply(nic))),
            Ok(None) => Err(Status::not_found(format!("{attachment} holds no NIC"))),
            Err(e) => Err(nic_status(&e)),
        }
    }

    async fn return_nic(
        &self,
        request: Request<NicAttachment>,
    ) -> Result<Response<ReturnNicReply>, Status> {
        require_root(&request)?;
        let attachment = attachment(Some(request.into_inner()))?;
        let nic_id = self
            .pool
            .give_back(&attachment)
            .await
            .map_err(|e| nic_status(&e))?;
        Ok(Response::new(ReturnNicReply {
            nic_id: nic_id.unwrap_or_default(),
        }))
    }
}
