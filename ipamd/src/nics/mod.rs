//! QingCloud NICs for pods (QingCloud mode, off unless `--qingcloud-config` is given).
//!
//! In a QingCloud VPC the SDN delivers traffic only to addresses bound to a NIC, so a pod on
//! the `hostnic` main plugin gets a NIC of its own, carrying the address etcd gave it:
//! - [`settings`]: the daemon flags, hostnic's pool config (`maxNic` ≤ 63, warm marks,
//!   vxnets, policy) and the instance id file, checked at start;
//! - [`vxnet`]: vxnets as pools (hostnic's refusals), block names, the vxnet policies (pure);
//! - [`record`]: the NIC records under `nodes/<node>/nics/<nic-id>` (validated on read);
//! - [`reconcile`]: what to repair so that etcd, the API and the links agree (pure);
//! - [`pool`]: the node's NIC pool: lease, return, warm pool, repairs;
//! - [`links`]: the host's links by MAC;
//! - [`service`]: the `Nics` gRPC service the plugin calls;
//! - [`vxnetpool`]: hostnic's VxNetPool resource read from the Kubernetes API.

pub mod links;
pub mod pool;
pub mod reconcile;
pub mod record;
pub mod service;
pub mod settings;
pub mod vxnet;
pub mod vxnetpool;

use std::path::PathBuf;
use std::sync::Arc;

pub use pool::{LeasedNic, NicPool, NicPoolConfig, PoolCounts};
pub use settings::{NicFlags, PoolSettings};

use crate::allocator::Allocator;
use crate::error::IpamError;
use crate::kube::KubeSource;

/// What went wrong with a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// Bad configuration: the daemon does not start.
    #[error("QingCloud NIC configuration: {0}")]
    Config(String),
    #[error("invalid NIC request: {0}")]
    InvalidRequest(String),
    #[error("no NIC available: {0}")]
    Exhausted(String),
    #[error("{what}: {reason}")]
    Api {
        what: String,
        reason: String,
        retryable: bool,
    },
    #[error("NIC record {key} changed meanwhile")]
    Changed { key: String },
    #[error("attached NICs whose link did not appear on the host in time: {0}")]
    NoLink(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
}

impl NicError {
    fn api(what: &str, e: hostnic_iaas::Error) -> Self {
        NicError::Api {
            what: what.to_string(),
            retryable: e.is_retryable(),
            reason: e.to_string(),
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            NicError::Api { retryable, .. } => *retryable,
            NicError::Changed { .. } | NicError::NoLink(_) => true,
            NicError::Ipam(e) => crate::service::status_of(e).code() == tonic::Code::Unavailable,
            _ => false,
        }
    }
}

/// Starts QingCloud mode from its flags: reads the SDK config, the pool config and the instance
/// id, checks them with the API and reconciles. None when `--qingcloud-config` is not given.
pub async fn start(
    flags: &NicFlags,
    allocator: Arc<Allocator>,
) -> Result<Option<Arc<NicPool>>, NicError> {
    start_with_kubernetes(flags, allocator, None).await
}

/// [`start`], with the vxnets of the cluster's VxNetPool ([`vxnetpool`]) when the daemon
/// reads Kubernetes (`kube`) and `--vxnet-pool FILE` is not given: the file, then the API's
/// VxNetPool, then the pool config's `vxNets`.
pub async fn start_with_kubernetes(
    flags: &NicFlags,
    allocator: Arc<Allocator>,
    kube: Option<KubeSource>,
) -> Result<Option<Arc<NicPool>>, NicError> {
    let Some(sdk) = &flags.qingcloud_config else {
        return Ok(None);
    };
    let config = hostnic_iaas::Config::load(sdk).map_err(|e| NicError::Config(e.to_string()))?;
    let pool_config = flags
        .nic_pool_config
        .clone()
        .unwrap_or_else(|| PathBuf::from(settings::DEFAULT_POOL_CONFIG));
    let mut settings = PoolSettings::load(&pool_config).map_err(NicError::Config)?;
    if let Some(path) = &flags.vxnet_pool {
        let text = std::fs::read_to_string(path).map_err(|e| {
            NicError::Config(format!("reading the VxNetPool {}: {e}", path.display()))
        })?;
        settings = settings
            .with_vxnet_pool(&text, &path.display().to_string())
            .map_err(NicError::Config)?;
    } else if let Some(source) = &kube {
        let client = crate::kube::client(source)
            .await
            .map_err(|e| NicError::Config(e.to_string()))?;
        if let Some(text) = vxnetpool::read(client).await? {
            settings = settings
                .with_vxnet_pool(&text, "the Kubernetes API")
                .map_err(NicError::Config)?;
        }
    }
    tracing::info!(vxnets = ?settings.vxnets, source = %settings.vxnets_source, "NIC vxnets");
    let id_file = flags
        .instance_id_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(settings::DEFAULT_INSTANCE_ID_FILE));
    let instance = settings::read_instance_id(&id_file).map_err(NicError::Config)?;
    let client = hostnic_iaas::Client::from_config(config)
        .map_err(|e| NicError::Config(e.to_string()))?
        .with_call_observer(Arc::new(|action, result| {
            crate::metrics::qingcloud_call(action, result.label())
        }));
    let pool = NicPool::start(
        allocator,
        client,
        NicPoolConfig {
            instance,
            settings,
            primary_iface: flags.iface.clone(),
            sys_class_net: PathBuf::from("/sys/class/net"),
            link_timeout: pool::LINK_TIMEOUT,
        },
    )
    .await?;
    Ok(Some(Arc::new(pool)))
}
