//! The actions' requests and answers, typed. Answers are read leniently where the API may send
//! `null` or leave a field out (a missing string is `""`); the ids a caller acts on are
//! required.

use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize};

/// The API actions this crate speaks.
pub mod action {
    /// Create NICs in a vxnet (synchronous).
    pub const CREATE_NICS: &str = "CreateNics";
    /// Attach available NICs to a running instance (a job).
    pub const ATTACH_NICS: &str = "AttachNics";
    /// Detach in-use NICs (a job).
    pub const DETACH_NICS: &str = "DetachNics";
    /// Delete available NICs (synchronous).
    pub const DELETE_NICS: &str = "DeleteNics";
    /// List NICs.
    pub const DESCRIBE_NICS: &str = "DescribeNics";
    /// List vxnets with their router and DHCP range.
    pub const DESCRIBE_VXNETS: &str = "DescribeVxnets";
    /// List jobs.
    pub const DESCRIBE_JOBS: &str = "DescribeJobs";
    /// List access keys (hostnic's start-up check of its key).
    pub const DESCRIBE_ACCESS_KEYS: &str = "DescribeAccessKeys";

    /// Whether the action only reads, so that sending it twice is harmless.
    pub fn is_read_only(action: &str) -> bool {
        action.starts_with("Describe")
    }
}

/// The most rows one `Describe*` page holds, whatever `limit` asks.
pub const PAGE_LIMIT: usize = 100;

fn nullable_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A NIC's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NicStatus {
    /// Not attached.
    #[serde(rename = "available")]
    Available,
    /// Attached to an instance.
    #[serde(rename = "in-use")]
    InUse,
    /// A status this client does not know.
    #[serde(other, rename = "unknown")]
    Unknown,
}

impl NicStatus {
    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::InUse => "in-use",
            Self::Unknown => "unknown",
        }
    }
}

/// One row of `DescribeNics`' `nic_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The NIC id, which is its MAC address (`52:54:…`, lowercase).
    pub nic_id: String,
    /// `nic_name` (hostnic names its NICs `hostnic_<instance id>`).
    #[serde(default, deserialize_with = "nullable_string")]
    pub nic_name: String,
    /// `available` or `in-use`.
    pub status: NicStatus,
    /// The instance it is attached to, `""` when available.
    #[serde(default, deserialize_with = "nullable_string")]
    pub instance_id: String,
    /// The vxnet it belongs to.
    pub vxnet_id: String,
    /// Its address, `""` when created with `disable_ip`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub private_ip: String,
    /// 1 for an instance's primary NIC, 0 for a secondary one.
    #[serde(default)]
    pub role: u32,
    /// Its index on the instance.
    #[serde(default)]
    pub sequence: u32,
    /// `create_time`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub create_time: String,
    /// `status_time`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub status_time: String,
}

/// One NIC of a `CreateNics` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicIp {
    /// The new NIC's id (its MAC address).
    pub nic_id: String,
    /// Its address (`""` with `disable_ip`).
    #[serde(default, deserialize_with = "nullable_string")]
    pub private_ip: String,
}

/// A vxnet's router: the gateway, the subnet and the DHCP range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Router {
    /// `router_id`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub router_id: String,
    /// `router_name`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub router_name: String,
    /// The gateway address.
    #[serde(default, deserialize_with = "nullable_string")]
    pub manager_ip: String,
    /// The subnet, e.g. `172.16.3.0/24`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub ip_network: String,
    /// First address of the DHCP range; `""` when DHCP is off.
    #[serde(default, deserialize_with = "nullable_string")]
    pub dyn_ip_start: String,
    /// Last address of the DHCP range; `""` when DHCP is off.
    #[serde(default, deserialize_with = "nullable_string")]
    pub dyn_ip_end: String,
    /// `mode`.
    #[serde(default)]
    pub mode: i64,
}

/// One row of `DescribeVxnets`' `vxnet_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vxnet {
    /// `vxnet_id`.
    pub vxnet_id: String,
    /// `vxnet_name`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub vxnet_name: String,
    /// `vxnet_type` (0 self-managed, 1 managed, 2 base network).
    #[serde(default)]
    pub vxnet_type: Option<i64>,
    /// The router, `None` for a vxnet not bound to a VPC.
    #[serde(default)]
    pub router: Option<Router>,
    /// `vpc_router_id`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub vpc_router_id: String,
    /// `tunnel_type` (`vxlan`, `vlan`).
    #[serde(default, deserialize_with = "nullable_string")]
    pub tunnel_type: String,
    /// `create_time`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub create_time: String,
}

/// A job's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// Queued.
    #[serde(rename = "pending")]
    Pending,
    /// Running.
    #[serde(rename = "working")]
    Working,
    /// Done.
    #[serde(rename = "successful")]
    Successful,
    /// Failed.
    #[serde(rename = "failed")]
    Failed,
    /// Finished, partly failed (Go SDK enum).
    #[serde(rename = "done with failure")]
    DoneWithFailure,
    /// A status this client does not know.
    #[serde(other, rename = "unknown")]
    Unknown,
}

impl JobStatus {
    /// The status as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Working => "working",
            Self::Successful => "successful",
            Self::Failed => "failed",
            Self::DoneWithFailure => "done with failure",
            Self::Unknown => "unknown",
        }
    }
}

/// One row of `DescribeJobs`' `job_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// `job_id` (`j-xxxxxxxx`).
    pub job_id: String,
    /// The action that started it, e.g. `AttachNics`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub job_action: String,
    /// `status`.
    pub status: JobStatus,
    /// The original request as a JSON string (at least `{"nics":[…]}` for NIC jobs).
    #[serde(default, deserialize_with = "nullable_string")]
    pub directive: String,
    /// Space-separated resource ids.
    #[serde(default, deserialize_with = "nullable_string")]
    pub resource_ids: String,
    /// `create_time`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub create_time: String,
    /// `status_time`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub status_time: String,
    /// `owner`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub owner: String,
}

/// One row of `DescribeAccessKeys`' `access_key_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    /// `access_key_id`.
    pub access_key_id: String,
    /// `access_key_name`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub access_key_name: String,
    /// The user id (`usr-…`) that owns the key.
    #[serde(default, deserialize_with = "nullable_string")]
    pub owner: String,
    /// `status`, e.g. `active`.
    #[serde(default, deserialize_with = "nullable_string")]
    pub status: String,
}

/// A `CreateNics` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateNics {
    /// The vxnet to create them in.
    pub vxnet: String,
    /// `nic_name` for all of them.
    pub nic_name: Option<String>,
    /// How many; ignored when `private_ips` is not empty (then one per address).
    pub count: u32,
    /// One address per NIC (`private_ips.N`); empty to let the API choose.
    pub private_ips: Vec<Ipv4Addr>,
    /// `disable_ip=1`: NICs without an address (what hostnic sends).
    pub disable_ip: bool,
}

/// What `DescribeNics` should list; every field left empty does not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicFilter {
    /// `nics.N`.
    pub nics: Vec<String>,
    /// `nic_name` (exact).
    pub nic_name: Option<String>,
    /// `status`.
    pub status: Option<NicStatus>,
    /// `vxnets.N`.
    pub vxnets: Vec<String>,
    /// `instances.N` (the Go SDK's filter hostnic uses with `status=in-use`).
    pub instances: Vec<String>,
}
