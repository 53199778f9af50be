//! The CNI protocol, as the `hostnic-ipam` and `hostnic` plugins speak it: pure functions from the
//! environment and stdin bytes to checked types, and from results and errors to the replies the
//! plugin prints. No I/O happens in the protocol modules; the binaries read the process
//! environment and stdin, and pass them in. [`plugin`] is the exception: it is the
//! `hostnic-ipam` plugin itself, which reads `ipam.resolvConf` and calls the node daemon.
//!
//! A plugin's life, in this crate's terms:
//!
//! 1. [`Invocation::from_env`] reads `CNI_*` (code 4 on any problem).
//! 2. VERSION: [`version_reply`] from stdin, print, done.
//! 3. [`NetworkConfig::parse`] reads stdin (codes 6, 1, 7), then
//!    [`CniVersion::ensure_supports`] refuses a command newer than the config (code 1).
//! 4. The command reads what it needs: [`CniArgs::ips`], [`NetworkConfig::runtime_config_ips`],
//!    [`NetworkConfig::args_ips`] (ADD), [`NetworkConfig::prev_result`] (CHECK),
//!    [`NetworkConfig::valid_attachments`] (GC).
//! 5. ADD prints [`IpamResult::reply`]; DEL, CHECK, GC and STATUS print nothing.
//!    Any failure prints [`CniError::reply`] and exits non-zero.
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md>.

pub mod config;
pub mod env;
pub mod error;
pub mod plugin;
pub mod result;
pub mod version;

pub use config::{IpamConfig, NetworkConfig, PrevResult, RequestedIp};
pub use env::{validate_container_id, validate_ifname, Attachment, CniArgs, Command, Invocation};
pub use error::{CniError, ErrorReply};
pub use result::{parse_resolv_conf, Dns, IpConfig, IpamResult, ResultReply, Route};
pub use version::{version_reply, CniVersion, VersionReply};
