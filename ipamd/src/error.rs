//! Errors of the allocator. Each names what failed; `is_retryable` tells callers which ones
//! deserve "try again later" (CNI code 11) rather than a permanent failure.

use std::net::IpAddr;

use crate::annotations::AnnotationError;
use crate::kube::KubeError;
use crate::pool::ConfigError;
use crate::records::{AllocationRecord, Attachment};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("pool {subnet} is already defined differently in etcd: {}", differences.join("; "))]
    PoolConflict {
        subnet: String,
        differences: Vec<String>,
    },

    #[error("pool {subnet} overlaps pool {existing} already defined in etcd")]
    PoolOverlap { subnet: String, existing: String },

    #[error("pool exhausted: no free address in {pools} for network {network:?}")]
    Exhausted { pools: String, network: String },

    /// `record` is the holder's address record, where it could be read: with a Kubernetes
    /// client the daemon asks the API whether the holder's pod still exists.
    #[error("address {ip} is held by {holder}")]
    AddressInUse {
        ip: IpAddr,
        holder: String,
        record: Option<Box<AllocationRecord>>,
    },

    /// The holder's pod is being deleted: the kubelet's retry gets the address once it is gone.
    #[error("address {ip} is held by {holder}, which is terminating; retry: kubelet will once it is gone")]
    HolderTerminating { ip: IpAddr, holder: String },

    /// Whether the holder's pod still exists cannot be read from the API.
    #[error("address {ip} is held by {holder}; whether that pod still exists cannot be told: {source}; try again")]
    HolderUnknown {
        ip: IpAddr,
        holder: String,
        #[source]
        source: Box<KubeError>,
    },

    #[error("requested address {ip} for network {network:?}: {reason}")]
    InvalidRequest {
        ip: IpAddr,
        network: String,
        reason: String,
    },

    #[error("invalid attachment: {reason}")]
    InvalidAttachment { reason: String },

    #[error("attachment {attachment} was released (DEL) at revision {released} after this ADD began (revision {began}); the late ADD is not committed, so that nothing leaks; ADD again if the container still needs an address")]
    ReleasedMeanwhile {
        attachment: Attachment,
        released: i64,
        began: i64,
    },

    #[error("etcd refuses writes during {op}: {reason}; an operator must compact and defragment etcd, or raise its quota, then disarm the alarm (etcdctl alarm disarm)")]
    StoreFull { op: String, reason: String },

    /// `reason` is etcd's error in words (`store::describe`): a cause is stated once, here,
    /// not again as a `source`.
    #[error("etcd unavailable during {op}: {reason}")]
    Unavailable { op: String, reason: String },

    #[error("etcd {op} failed: {reason}")]
    Etcd { op: String, reason: String },

    #[error("etcd state not loaded yet: {0}")]
    NotSynced(String),

    #[error("{op} did not settle after {attempts} attempts: {last}")]
    Contention {
        op: String,
        attempts: usize,
        last: String,
    },

    #[error("refused: {reason}")]
    Refused { reason: String },

    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },

    /// A pod's fixed-IP annotations are refused.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),

    /// The pod an ADD needs cannot be read from the Kubernetes API.
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
}

impl IpamError {
    /// True when the same request may succeed later without any change by the caller.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            IpamError::Unavailable { .. }
                | IpamError::NotSynced(_)
                | IpamError::Contention { .. }
                | IpamError::ReleasedMeanwhile { .. }
                | IpamError::StoreFull { .. }
                | IpamError::HolderTerminating { .. }
                | IpamError::HolderUnknown { .. }
        ) || matches!(self, IpamError::Kubernetes(e) if e.is_retryable())
    }
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;
