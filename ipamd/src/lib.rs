//! hostnic-ipamd: the node daemon of hostnic-ipam.
//!
//! The allocation core keeps every pod address of the cluster in etcd, written with
//! compare-and-swap transactions so that no address is ever held twice, and keeps the
//! free-address state in memory so that choosing an address never scans etcd.

pub mod addr;
pub mod allocator;
pub mod annotations;
pub mod audit;
pub mod blocks;
pub mod cache;
pub mod cli;
pub mod error;
pub mod gc;
pub mod group_commit;
pub mod install;
pub mod key_ranges;
pub mod kube;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod namespace_watch;
pub mod namespaces;
pub mod netns_gc;
pub mod nics;
pub mod node_gc;
pub mod one_call;
pub mod planner;
pub mod pod_gc;
pub mod pool;
pub mod records;
pub mod sticky;
pub mod sticky_gc;
pub mod store;

pub use allocator::{AllocateRequest, AllocatedIp, Allocation, Allocator};
pub use error::IpamError;
pub use pool::{parse_range_sets, ConfigError, Pool, RangeSet};
pub use records::{Attachment, Kind, PodRef};
pub use store::StoreConfig;
pub mod config;
pub mod http;
pub mod server;
pub mod service;
