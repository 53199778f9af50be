//! The daemon's configuration: a JSON file, overridden by environment variables, overridden by
//! flags. `resolve` is pure so the precedence is unit-tested.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::store::{StoreConfig, TlsFiles, DEFAULT_PREFIX};

/// Command-line flags; each also reads an environment variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "hostnic-ipamd",
    version,
    about = "hostnic-ipam node daemon: cluster-unique pod addresses in etcd"
)]
pub struct Flags {
    /// What to do; without a subcommand the daemon serves the plugins.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// JSON config file; flags and environment variables override its values.
    #[arg(long, global = true, env = "HOSTNIC_IPAMD_CONFIG")]
    pub config: Option<PathBuf>,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        global = true,
        env = "HOSTNIC_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key this daemon reads and writes in etcd.
    #[arg(long, global = true, env = "HOSTNIC_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    #[arg(long, global = true, env = "HOSTNIC_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    #[arg(long, global = true, env = "HOSTNIC_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    #[arg(long, global = true, env = "HOSTNIC_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    #[arg(long, global = true, env = "HOSTNIC_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(
        long,
        global = true,
        env = "HOSTNIC_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,
    /// This node's name, as Kubernetes knows it (spec.nodeName). Defaults to the hostname.
    #[arg(long, global = true, env = "HOSTNIC_NODE_NAME")]
    pub node_name: Option<String>,
    /// Unix socket the CNI plugins call.
    #[arg(long, global = true, env = "HOSTNIC_IPAMD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Attachments younger than this survive a CNI GC that does not list them.
    #[arg(long, global = true, env = "HOSTNIC_GC_GRACE_SECONDS")]
    pub gc_grace_seconds: Option<u64>,
    /// How often the daemon releases this node's attachments whose network namespace no longer
    /// exists (after the GC grace); 0 disables it.
    #[arg(long, global = true, env = "HOSTNIC_NETNS_GC_INTERVAL_SECONDS")]
    pub netns_gc_interval_seconds: Option<u64>,
    /// How long an etcd operation keeps retrying before the plugin is told to try again later.
    #[arg(long, global = true, env = "HOSTNIC_ETCD_RETRY_MS")]
    pub etcd_retry_ms: Option<u64>,
}

/// Operator commands, run against the same etcd as the daemon.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve the CNI plugins on the unix socket (the default).
    Serve,
    /// List every allocation: pool, address, attachment, pod, node, network, kind.
    List {
        /// Only this pool (its subnet, e.g. 10.0.0.0/24).
        #[arg(long)]
        pool: Option<String>,
    },
    /// Show each pool's usage: dynamic addresses, held addresses, claimed blocks.
    Usage,
    /// Release the addresses of an attachment, as a CNI DEL would: of every network with this
    /// container id and ifname, or of `--network` only.
    Release {
        container_id: String,
        ifname: String,
        /// Only the attachment of this CNI network.
        #[arg(long)]
        network: Option<String>,
    },
    /// Release whatever holds one address: its attachment, or the address record alone when no
    /// attachment lists it.
    ReleaseAddress {
        ip: std::net::IpAddr,
        /// Show what would be released, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a pool that holds no address: its record, its blocks, its pool-index entry.
    RemovePool {
        subnet: ipnet::IpNet,
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete one key that `audit` reports as unreadable or invalid, after printing it.
    DropKey {
        key: String,
        #[arg(long)]
        dry_run: bool,
    },
    /// Release this node's attachments whose network namespace no longer exists and that are
    /// older than --gc-grace-seconds, as the daemon does every --netns-gc-interval-seconds.
    GcNetns {
        /// Show what would be released, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Scan etcd and report every record that cannot be read or does not validate, any address
    /// held twice, and any attachment record that disagrees with its address records. Exits 1
    /// if it finds a problem.
    Audit,
}

/// The config file. Keys mirror kube-ipam's `etcdConfig` where one exists.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub etcd: FileEtcd,
    pub node_name: Option<String>,
    pub socket: Option<PathBuf>,
    pub gc_grace_seconds: Option<u64>,
    pub netns_gc_interval_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEtcd {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub retry_ms: Option<u64>,
}

/// Everything the daemon needs, resolved.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub store: StoreConfig,
    pub node_name: String,
    pub socket: PathBuf,
    pub gc_grace: Duration,
    /// How often the network-namespace GC runs; None when it is disabled.
    pub netns_gc_interval: Option<Duration>,
}

/// Default of `--gc-grace-seconds`.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(60);

/// Default of `--netns-gc-interval-seconds`.
pub const DEFAULT_NETNS_GC_INTERVAL: Duration = Duration::from_secs(60);

/// Longest `--netns-gc-interval-seconds`: a leak-repair pass less often than daily is a typo.
pub const MAX_NETNS_GC_INTERVAL_SECONDS: u64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no etcd endpoints: set --etcd-endpoints, HOSTNIC_ETCD_ENDPOINTS or etcd.endpoints in the config file")]
    NoEndpoints,
    #[error("no node name: set --node-name or HOSTNIC_NODE_NAME (the hostname could not be read)")]
    NoNodeName,
    #[error("network-namespace GC interval of {seconds} seconds is out of range: use 1 to {MAX_NETNS_GC_INTERVAL_SECONDS}, or 0 to disable it (--netns-gc-interval-seconds, HOSTNIC_NETNS_GC_INTERVAL_SECONDS or netnsGcIntervalSeconds)")]
    NetnsGcInterval { seconds: u64 },
}

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Flags (and their environment variables) win over the file, the file over defaults.
pub fn resolve(
    flags: Flags,
    file: FileConfig,
    hostname: Option<String>,
) -> Result<DaemonConfig, ConfigFileError> {
    let etcd = file.etcd;
    let endpoints = if flags.etcd_endpoints.is_empty() {
        etcd.endpoints
    } else {
        flags.etcd_endpoints
    };
    if endpoints.is_empty() {
        return Err(ConfigFileError::NoEndpoints);
    }
    let mut store = StoreConfig::new(endpoints);
    store.prefix = flags
        .etcd_prefix
        .or(etcd.prefix)
        .unwrap_or_else(|| DEFAULT_PREFIX.into());
    store.username = flags.etcd_username.or(etcd.username);
    store.password = flags.etcd_password.or(etcd.password);
    let tls = TlsFiles {
        ca: flags.etcd_ca_file.or(etcd.ca_file),
        cert: flags.etcd_cert_file.or(etcd.cert_file),
        key: flags.etcd_key_file.or(etcd.key_file),
    };
    if tls.ca.is_some() || tls.cert.is_some() {
        store.tls = Some(tls);
    }
    if let Some(ms) = flags.etcd_retry_ms.or(etcd.retry_ms) {
        store.retry_timeout = Duration::from_millis(ms);
    }
    let node_name = flags
        .node_name
        .or(file.node_name)
        .or(hostname)
        .filter(|n| !n.is_empty())
        .ok_or(ConfigFileError::NoNodeName)?;
    let socket = flags
        .socket
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from(hostnic_proto::DEFAULT_SOCKET));
    let gc_grace = flags
        .gc_grace_seconds
        .or(file.gc_grace_seconds)
        .map_or(DEFAULT_GC_GRACE, Duration::from_secs);
    let netns_gc_interval = match flags
        .netns_gc_interval_seconds
        .or(file.netns_gc_interval_seconds)
    {
        None => Some(DEFAULT_NETNS_GC_INTERVAL),
        Some(0) => None,
        Some(seconds) if seconds > MAX_NETNS_GC_INTERVAL_SECONDS => {
            return Err(ConfigFileError::NetnsGcInterval { seconds })
        }
        Some(seconds) => Some(Duration::from_secs(seconds)),
    };
    Ok(DaemonConfig {
        store,
        node_name,
        socket,
        gc_grace,
        netns_gc_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("hostnic-ipamd").chain(args.iter().copied()))
            .expect("flags parse")
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file: FileConfig = serde_json::from_str(
            r#"{"etcd": {"endpoints": ["http://10.0.0.1:2379"], "prefix": "/file"}, "nodeName": "file-node"}"#,
        )
        .expect("file parses");
        let c = resolve(
            flags(&["--node-name", "flag-node"]),
            file.clone(),
            Some("host".into()),
        )
        .expect("resolves");
        assert_eq!(c.node_name, "flag-node");
        assert_eq!(c.store.endpoints, vec!["http://10.0.0.1:2379"]);
        assert_eq!(c.store.prefix, "/file");
        assert_eq!(c.socket, PathBuf::from("/run/hostnic/ipamd.sock"));

        let c = resolve(
            flags(&["--etcd-endpoints", "http://a:1,http://b:2"]),
            file,
            None,
        )
        .expect("resolves");
        assert_eq!(c.store.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.node_name, "file-node");
    }

    #[test]
    fn missing_endpoints_and_node_name_are_named() {
        let e =
            resolve(flags(&[]), FileConfig::default(), Some("h".into())).expect_err("no endpoints");
        assert!(e.to_string().contains("--etcd-endpoints"));
        let e = resolve(
            flags(&["--etcd-endpoints", "http://a:1"]),
            FileConfig::default(),
            None,
        )
        .expect_err("no node");
        assert!(e.to_string().contains("--node-name"));
    }

    #[test]
    fn the_shipped_daemon_config_parses() {
        let file: FileConfig =
            serde_json::from_str(include_str!("../../etc/hostnic-ipamd.json")).expect("valid");
        let c = resolve(flags(&[]), file, Some("node-1".into())).expect("resolves");
        assert_eq!(c.node_name, "node-1");
        assert!(c.store.tls.is_some());
        assert_eq!(c.store.retry_timeout, Duration::from_millis(2200));
    }

    #[test]
    fn the_netns_gc_interval_defaults_to_a_minute_is_disabled_by_0_and_bounded() {
        let base = ["--etcd-endpoints", "http://a:1", "--node-name", "n"];
        let with = |extra: &[&str], file: &str| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let file: FileConfig = serde_json::from_str(file).expect("file parses");
            resolve(flags(&args), file, None)
        };
        let c = with(&[], "{}").expect("resolves");
        assert_eq!(c.netns_gc_interval, Some(DEFAULT_NETNS_GC_INTERVAL));
        let c = with(&[], r#"{"netnsGcIntervalSeconds": 5}"#).expect("resolves");
        assert_eq!(c.netns_gc_interval, Some(Duration::from_secs(5)));
        let c = with(
            &["--netns-gc-interval-seconds", "0"],
            r#"{"netnsGcIntervalSeconds": 5}"#,
        )
        .expect("resolves");
        assert_eq!(c.netns_gc_interval, None, "0 disables it");
        let e = with(&["--netns-gc-interval-seconds", "86401"], "{}").expect_err("absurd");
        assert!(
            e.to_string().contains("86401") && e.to_string().contains("0 to disable"),
            "{e}"
        );
    }

    #[test]
    fn gc_netns_takes_a_dry_run_flag() {
        let f = flags(&["gc-netns", "--dry-run", "--gc-grace-seconds", "0"]);
        assert!(matches!(
            f.command,
            Some(Command::GcNetns { dry_run: true })
        ));
        assert_eq!(f.gc_grace_seconds, Some(0));
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let e = serde_json::from_str::<FileConfig>(r#"{"nodeNmae": "x"}"#).expect_err("typo");
        assert!(e.to_string().contains("nodeNmae"));
    }
}
