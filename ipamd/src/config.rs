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
    /// QingCloud mode: NICs for the `hostnic` plugin (see `nics::settings`).
    #[command(flatten)]
    pub nics: crate::nics::NicFlags,
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
    /// Unix socket the CNI plugins call. Its directory must be owned by root and writable by
    /// nobody else; missing directories are created 0755.
    #[arg(long, global = true, env = "HOSTNIC_IPAMD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// How long to wait for another daemon holding the socket's lock to stop before giving up
    /// (0: give up at once). Lets a rolling update start the new daemon before the old one ends.
    #[arg(long, global = true, env = "HOSTNIC_IPAMD_SOCKET_WAIT_SECONDS")]
    pub socket_wait_seconds: Option<u64>,
    /// Attachments younger than this survive a CNI GC that does not list them.
    #[arg(long, global = true, env = "HOSTNIC_GC_GRACE_SECONDS")]
    pub gc_grace_seconds: Option<u64>,
    /// How often the daemon releases this node's attachments whose network namespace no longer
    /// exists (after the GC grace); 0 disables it.
    #[arg(long, global = true, env = "HOSTNIC_NETNS_GC_INTERVAL_SECONDS")]
    pub netns_gc_interval_seconds: Option<u64>,
    /// How often the daemon releases this node's attachments whose pod no longer exists in the
    /// Kubernetes API or has another UID (after the GC grace); 0 disables it. Only with a
    /// Kubernetes client.
    #[arg(long, global = true, env = "HOSTNIC_POD_GC_INTERVAL_SECONDS")]
    pub pod_gc_interval_seconds: Option<u64>,
    /// How often the elected daemon releases what nodes deleted from the Kubernetes API left
    /// behind (after they were absent for the GC grace); 0 disables it. Only with a Kubernetes
    /// client.
    #[arg(long, global = true, env = "HOSTNIC_NODE_GC_INTERVAL_SECONDS")]
    pub node_gc_interval_seconds: Option<u64>,
    /// TTL of the etcd lease of the elected daemon: how long a daemon that stopped renewing
    /// (killed, cut off) keeps the role.
    #[arg(long, global = true, env = "HOSTNIC_LEADER_LEASE_SECONDS")]
    pub leader_lease_seconds: Option<u64>,
    /// How often the daemon releases the sticky addresses of StatefulSet pod identities whose
    /// ordinal or StatefulSet has been gone for --gc-grace-seconds; 0 disables it. Only with a
    /// Kubernetes client.
    #[arg(long, global = true, env = "HOSTNIC_STICKY_GC_INTERVAL_SECONDS")]
    pub sticky_gc_interval_seconds: Option<u64>,
    /// How long an etcd operation keeps retrying before the plugin is told to try again later.
    #[arg(long, global = true, env = "HOSTNIC_ETCD_RETRY_MS")]
    pub etcd_retry_ms: Option<u64>,
    /// Kubeconfig file of the Kubernetes API the daemon reads pods from (its current context;
    /// one path, not a list). Without it the daemon uses its service account when it runs in a
    /// pod (KUBERNETES_SERVICE_HOST is set), and otherwise knows no Kubernetes.
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// How operator commands print what they found or did: a table, or one JSON document.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub output: crate::cli::OutputFormat,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` over HTTP on this address (e.g.
    /// 127.0.0.1:9153); off when absent. Only a loopback address, unless
    /// --metrics-allow-remote.
    #[arg(long, global = true, env = "HOSTNIC_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Allow a --metrics-addr that is not loopback (the endpoint has no authentication). The
    /// variable takes true/false, 1/0, yes/no, on/off.
    #[arg(
        long,
        global = true,
        env = "HOSTNIC_METRICS_ALLOW_REMOTE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub metrics_allow_remote: bool,
    /// How log lines on stderr are written: text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "HOSTNIC_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: crate::logging::LogFormat,
}

/// Operator commands, run against the same etcd as the daemon.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve the CNI plugins on the unix socket (the default).
    Serve,
    /// List every allocation: pool, address, attachment, pod, node, network, kind.
    List {
        /// Only this pool (its subnet, e.g. 10.0.0.0/24).
        #[arg(long, value_parser = parse_pool_subnet)]
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
    /// Release this node's attachments whose pod no longer exists in the Kubernetes API or has
    /// another UID and that are older than --gc-grace-seconds, as the daemon does every
    /// --pod-gc-interval-seconds. Needs --kubeconfig, or to run in a pod.
    GcPods {
        /// Show what would be released, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Release the attachments of nodes the Kubernetes API does not list, and give back their
    /// empty blocks, as the elected daemon does every --node-gc-interval-seconds; judged by one
    /// LIST, without waiting for the grace and without an election. Needs --kubeconfig, or to
    /// run in a pod, and a --node-name the API lists.
    GcNodes {
        /// Show what would be released, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// One pass of the sticky GC, as the daemon runs every --sticky-gc-interval-seconds: mark
    /// StatefulSet pod identities whose ordinal or StatefulSet is gone, and release the sticky
    /// addresses of those gone for --gc-grace-seconds. Needs --kubeconfig, or to run in a pod.
    GcSticky {
        /// Show what would be marked and released, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Install the CNI plugin binaries and a network config where the container runtime finds
    /// them, each file atomically (the DaemonSet's init container runs this). Needs no etcd.
    InstallCni {
        /// The runtime's plugin directory.
        #[arg(long, default_value = crate::install::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        /// The runtime's network config directory.
        #[arg(long, default_value = crate::install::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// A network config (.conf or .conflist) to install into --conf-dir under its own name.
        #[arg(long)]
        conflist: Option<PathBuf>,
        /// Where the plugin binaries are; defaults to this program's own directory.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Scan etcd and report every record that cannot be read or does not validate, any address
    /// held twice, and any attachment record that disagrees with its address records. Exits 1
    /// if it finds a problem.
    Audit,
    /// Show which subnets each namespace may use: the kube-system/hostnic-ipam-config
    /// ConfigMap's entries (with --kubeconfig, or in a pod) and the blocks auto-assigned in etcd.
    Namespaces,
    /// Take every auto-assigned block from a namespace (one that was deleted), so that the
    /// blocks can be given to others once they hold no address.
    UnassignNamespace {
        namespace: String,
        /// Show what would be taken, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show everything one pod holds: the addresses of its attachments on every network and
    /// node, its StatefulSet identity's sticky addresses, and its namespace's blocks.
    Show {
        /// The pod, as NAMESPACE/POD.
        #[arg(value_parser = crate::cli::parse_pod_name)]
        pod: crate::cli::PodName,
    },
}

/// The config file (`etc/hostnic-ipamd.json`). Its `etcd` keys are the daemon's own; a CNI config's
/// `etcdConfig` (kube-ipam) is not read: the plugin never talks to etcd.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub etcd: FileEtcd,
    pub node_name: Option<String>,
    pub socket: Option<PathBuf>,
    pub socket_wait_seconds: Option<u64>,
    pub gc_grace_seconds: Option<u64>,
    pub netns_gc_interval_seconds: Option<u64>,
    pub pod_gc_interval_seconds: Option<u64>,
    pub node_gc_interval_seconds: Option<u64>,
    pub leader_lease_seconds: Option<u64>,
    pub sticky_gc_interval_seconds: Option<u64>,
    pub kubeconfig: Option<PathBuf>,
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
    /// How long to wait for a daemon already serving `socket` to stop.
    pub socket_wait: Duration,
    pub gc_grace: Duration,
    /// How often the network-namespace GC runs; None when it is disabled.
    pub netns_gc_interval: Option<Duration>,
    /// How often the pod GC runs (when there is a Kubernetes client); None when it is
    /// disabled.
    pub pod_gc_interval: Option<Duration>,
    /// How often the deleted-node GC runs on the elected daemon (when there is a Kubernetes
    /// client); None when it is disabled.
    pub node_gc_interval: Option<Duration>,
    /// TTL of the elected daemon's lease.
    pub leader_lease: Duration,
    /// How often the sticky GC runs on the elected daemon (when there is a Kubernetes client);
    /// None when it is disabled.
    pub sticky_gc_interval: Option<Duration>,
    /// The kubeconfig file, if one is given; see [`crate::kube::source_of`] for what applies
    /// without one.
    pub kubeconfig: Option<PathBuf>,
}

/// Default of `--gc-grace-seconds`.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(60);

/// Largest `--gc-grace-seconds`: the grace only has to cover an ADD that races the runtime's
/// GC listing; a longer one keeps leaked addresses held for days.
pub const MAX_GC_GRACE_SECONDS: u64 = 24 * 60 * 60;

/// Smallest `--etcd-retry-ms`: below this not even one retry fits, and a leader election
/// (about 2 s on a loopback cluster) turns every call into "try again later".
pub const MIN_ETCD_RETRY_MS: u64 = 100;

/// Largest `--etcd-retry-ms`: the plugin waits at most 10 s for the daemon (its
/// `CALL_DEADLINE`); a budget near that makes the plugin give up first, while the daemon's
/// work may still commit.
pub const MAX_ETCD_RETRY_MS: u64 = 8_000;

/// Default of `--socket-wait-seconds`: longer than Kubernetes' default 30 s termination grace,
/// so that a new daemon of a rolling update outlasts an old one that has to be killed.
pub const DEFAULT_SOCKET_WAIT: Duration = Duration::from_secs(60);

/// Largest `--socket-wait-seconds`.
pub const MAX_SOCKET_WAIT_SECONDS: u64 = 3600;

/// Longest node name Kubernetes accepts (a DNS subdomain, RFC 1123).
const MAX_NODE_NAME: usize = 253;

/// Default of `--netns-gc-interval-seconds`.
pub const DEFAULT_NETNS_GC_INTERVAL: Duration = Duration::from_secs(60);

/// Longest `--netns-gc-interval-seconds`: a leak-repair pass less often than daily is a typo.
pub const MAX_NETNS_GC_INTERVAL_SECONDS: u64 = 86_400;

/// Default of `--node-gc-interval-seconds`.
pub const DEFAULT_NODE_GC_INTERVAL: Duration = Duration::from_secs(60);

/// Longest `--node-gc-interval-seconds`: a leak-repair pass less often than daily is a typo.
pub const MAX_NODE_GC_INTERVAL_SECONDS: u64 = 86_400;

/// Default of `--leader-lease-seconds`.
pub const DEFAULT_LEADER_LEASE: Duration = Duration::from_secs(15);

/// Shortest `--leader-lease-seconds`: etcd's own minimum TTL (about 2 s).
pub const MIN_LEADER_LEASE_SECONDS: u64 = 2;

/// Longest `--leader-lease-seconds`.
pub const MAX_LEADER_LEASE_SECONDS: u64 = 600;

/// Default of `--pod-gc-interval-seconds`.
pub const DEFAULT_POD_GC_INTERVAL: Duration = Duration::from_secs(60);

/// Longest `--pod-gc-interval-seconds`: a leak-repair pass less often than daily is a typo.
pub const MAX_POD_GC_INTERVAL_SECONDS: u64 = 86_400;

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
    /// Node names are written into etcd records and must match `spec.nodeName`, which
    /// Kubernetes only accepts as an RFC 1123 subdomain.
    #[error("node name {name:?} from {source_name} is not valid: {reason}; Kubernetes node names are lower-case RFC 1123 subdomains (a-z, 0-9, '-', '.', starting and ending with a letter or digit, at most 253 characters)")]
    InvalidNodeName {
        name: String,
        source_name: &'static str,
        reason: &'static str,
    },
    #[error("{source_name} is {value}: {reason}")]
    OutOfRange {
        value: u64,
        source_name: &'static str,
        reason: String,
    },
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

/// `list --pool`: a subnet in its canonical spelling (the one pool ids are made of), so that a
/// typo is refused instead of listing nothing.
fn parse_pool_subnet(text: &str) -> Result<String, String> {
    let net: ipnet::IpNet = text
        .parse()
        .map_err(|e| format!("{text:?} is not a subnet such as 10.0.0.0/24 ({e})"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text} has host bits set; the pool's subnet is {}",
            net.trunc()
        ));
    }
    Ok(net.to_string())
}

/// Why `name` is not a lower-case RFC 1123 subdomain, as Kubernetes checks `spec.nodeName`
/// (`IsDNS1123Subdomain`: the whole name at most 253 characters, dot-separated labels of
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`).
fn node_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > MAX_NODE_NAME {
        return Some("it is longer than 253 characters");
    }
    if name.chars().any(char::is_control) {
        return Some("it contains a control character");
    }
    if name.chars().any(char::is_whitespace) {
        return Some("it contains white space");
    }
    if name.contains('/') {
        return Some("it contains '/'");
    }
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        return Some("it contains upper-case letters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("it has an empty label (a leading, trailing or doubled '.')");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Some("it contains a character other than a-z, 0-9, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label starts or ends with '-'");
        }
    }
    None
}

/// A number of seconds as [`pick`] chose it: `default` when unset, refused above `max` with
/// `reason`, naming where the value came from.
fn bounded_seconds(
    picked: Option<(u64, &'static str)>,
    default: Duration,
    max: u64,
    reason: impl FnOnce() -> String,
) -> Result<Duration, ConfigFileError> {
    match picked {
        None => Ok(default),
        Some((value, source_name)) if value > max => Err(ConfigFileError::OutOfRange {
            value,
            source_name,
            reason: reason(),
        }),
        Some((value, _)) => Ok(Duration::from_secs(value)),
    }
}

/// The interval of the GC named `gc`: as [`bounded_seconds`], and 0 disables it (None).
fn gc_interval(
    picked: Option<(u64, &'static str)>,
    default: Duration,
    max: u64,
    gc: &str,
) -> Result<Option<Duration>, ConfigFileError> {
    if matches!(picked, Some((0, _))) {
        return Ok(None);
    }
    bounded_seconds(picked, default, max, || {
        format!(
            "use 1 to {max} s, or 0 to disable the {gc}; a leak-repair pass less often than \
             daily is a typo"
        )
    })
    .map(Some)
}

/// Default of `--sticky-gc-interval-seconds`.
pub const DEFAULT_STICKY_GC_INTERVAL: Duration = Duration::from_secs(60);

/// Longest `--sticky-gc-interval-seconds`: a leak-repair pass less often than daily is a typo.
pub const MAX_STICKY_GC_INTERVAL_SECONDS: u64 = 86_400;

/// Flags (and their environment variables) win over the file, the file over defaults. Every
/// value is checked here, so that a daemon never starts on one that cannot work.
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
    if let Some((ms, source_name)) = pick(
        flags.etcd_retry_ms,
        etcd.retry_ms,
        "--etcd-retry-ms / HOSTNIC_ETCD_RETRY_MS",
        "etcd.retryMs in the config file",
    ) {
        if !(MIN_ETCD_RETRY_MS..=MAX_ETCD_RETRY_MS).contains(&ms) {
            return Err(ConfigFileError::OutOfRange {
                value: ms,
                source_name,
                reason: format!(
                    "the etcd retry budget must be {MIN_ETCD_RETRY_MS}..={MAX_ETCD_RETRY_MS} ms: \
                     below {MIN_ETCD_RETRY_MS} ms no retry fits and an etcd leader election fails \
                     every call; above {MAX_ETCD_RETRY_MS} ms the plugin (which waits 10 s) gives \
                     up before the daemon answers"
                ),
            });
        }
        store.retry_timeout = Duration::from_millis(ms);
    }
    let node_name = match (flags.node_name, file.node_name) {
        (Some(name), _) => (name, "--node-name / HOSTNIC_NODE_NAME"),
        (None, Some(name)) => (name, "nodeName in the config file"),
        // The kubelet lower-cases the hostname when it names the node after it.
        (None, None) => (
            hostname
                .map(|h| h.to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .ok_or(ConfigFileError::NoNodeName)?,
            "the hostname (set --node-name to override)",
        ),
    };
    if let Some(reason) = node_name_problem(&node_name.0) {
        return Err(ConfigFileError::InvalidNodeName {
            name: node_name.0,
            source_name: node_name.1,
            reason,
        });
    }
    let socket = flags
        .socket
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from(hostnic_proto::DEFAULT_SOCKET));
    let socket_wait = bounded_seconds(
        pick(
            flags.socket_wait_seconds,
            file.socket_wait_seconds,
            "--socket-wait-seconds / HOSTNIC_IPAMD_SOCKET_WAIT_SECONDS",
            "socketWaitSeconds in the config file",
        ),
        DEFAULT_SOCKET_WAIT,
        MAX_SOCKET_WAIT_SECONDS,
        || {
            format!(
                "waiting more than {MAX_SOCKET_WAIT_SECONDS} s for another daemon to stop \
                 hides a stuck rollout; stop the other daemon instead"
            )
        },
    )?;
    let gc_grace = bounded_seconds(
        pick(
            flags.gc_grace_seconds,
            file.gc_grace_seconds,
            "--gc-grace-seconds / HOSTNIC_GC_GRACE_SECONDS",
            "gcGraceSeconds in the config file",
        ),
        DEFAULT_GC_GRACE,
        MAX_GC_GRACE_SECONDS,
        || {
            format!(
                "the GC grace must be at most {MAX_GC_GRACE_SECONDS} s (a day): it only has \
                 to cover an ADD racing the runtime's GC, and a longer one keeps leaked \
                 addresses held"
            )
        },
    )?;
    let netns_gc_interval = gc_interval(
        pick(
            flags.netns_gc_interval_seconds,
            file.netns_gc_interval_seconds,
            "--netns-gc-interval-seconds / HOSTNIC_NETNS_GC_INTERVAL_SECONDS",
            "netnsGcIntervalSeconds in the config file",
        ),
        DEFAULT_NETNS_GC_INTERVAL,
        MAX_NETNS_GC_INTERVAL_SECONDS,
        "network-namespace GC",
    )?;
    let pod_gc_interval = gc_interval(
        pick(
            flags.pod_gc_interval_seconds,
            file.pod_gc_interval_seconds,
            "--pod-gc-interval-seconds / HOSTNIC_POD_GC_INTERVAL_SECONDS",
            "podGcIntervalSeconds in the config file",
        ),
        DEFAULT_POD_GC_INTERVAL,
        MAX_POD_GC_INTERVAL_SECONDS,
        "pod GC",
    )?;
    let node_gc_interval = gc_interval(
        pick(
            flags.node_gc_interval_seconds,
            file.node_gc_interval_seconds,
            "--node-gc-interval-seconds / HOSTNIC_NODE_GC_INTERVAL_SECONDS",
            "nodeGcIntervalSeconds in the config file",
        ),
        DEFAULT_NODE_GC_INTERVAL,
        MAX_NODE_GC_INTERVAL_SECONDS,
        "deleted-node GC",
    )?;
    let lease = pick(
        flags.leader_lease_seconds,
        file.leader_lease_seconds,
        "--leader-lease-seconds / HOSTNIC_LEADER_LEASE_SECONDS",
        "leaderLeaseSeconds in the config file",
    );
    if let Some((value, source_name)) = lease.filter(|(v, _)| *v < MIN_LEADER_LEASE_SECONDS) {
        return Err(ConfigFileError::OutOfRange {
            value,
            source_name,
            reason: format!(
                "the leader lease must be {MIN_LEADER_LEASE_SECONDS}..={MAX_LEADER_LEASE_SECONDS} s: \
                 etcd refuses a shorter TTL"
            ),
        });
    }
    let leader_lease = bounded_seconds(
        lease,
        DEFAULT_LEADER_LEASE,
        MAX_LEADER_LEASE_SECONDS,
        || {
            format!(
                "the leader lease must be {MIN_LEADER_LEASE_SECONDS}..={MAX_LEADER_LEASE_SECONDS} s: \
                 a longer one leaves the deleted-node GC without a leader that long after the \
                 leader's node fails"
            )
        },
    )?;
    let sticky_gc_interval = gc_interval(
        pick(
            flags.sticky_gc_interval_seconds,
            file.sticky_gc_interval_seconds,
            "--sticky-gc-interval-seconds / HOSTNIC_STICKY_GC_INTERVAL_SECONDS",
            "stickyGcIntervalSeconds in the config file",
        ),
        DEFAULT_STICKY_GC_INTERVAL,
        MAX_STICKY_GC_INTERVAL_SECONDS,
        "sticky GC",
    )?;
    Ok(DaemonConfig {
        store,
        node_name: node_name.0,
        socket,
        socket_wait,
        gc_grace,
        netns_gc_interval,
        pod_gc_interval,
        node_gc_interval,
        leader_lease,
        sticky_gc_interval,
        kubeconfig: flags.kubeconfig.or(file.kubeconfig),
    })
}

/// The flag's value if set, else the file's, each with the name an error should give it.
fn pick<T>(
    flag: Option<T>,
    file: Option<T>,
    flag_name: &'static str,
    file_name: &'static str,
) -> Option<(T, &'static str)> {
    flag.map(|v| (v, flag_name))
        .or_else(|| file.map(|v| (v, file_name)))
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
    fn the_pod_gc_interval_defaults_to_a_minute_is_disabled_by_0_and_bounded_naming_the_flag() {
        let base = ["--etcd-endpoints", "http://a:1", "--node-name", "n"];
        let with = |extra: &[&str], file: &str| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let file: FileConfig = serde_json::from_str(file).expect("file parses");
            resolve(flags(&args), file, None)
        };
        let c = with(&[], "{}").expect("resolves");
        assert_eq!(c.pod_gc_interval, Some(DEFAULT_POD_GC_INTERVAL));
        let c = with(&[], r#"{"podGcIntervalSeconds": 5}"#).expect("resolves");
        assert_eq!(c.pod_gc_interval, Some(Duration::from_secs(5)));
        let c = with(
            &["--pod-gc-interval-seconds", "0"],
            r#"{"podGcIntervalSeconds": 5}"#,
        )
        .expect("resolves");
        assert_eq!(c.pod_gc_interval, None, "0 disables it");
        let e = with(&["--pod-gc-interval-seconds", "86401"], "{}")
            .expect_err("absurd")
            .to_string();
        assert!(
            e.contains("86401")
                && e.contains("--pod-gc-interval-seconds / HOSTNIC_POD_GC_INTERVAL_SECONDS")
                && e.contains("0 to disable the pod GC"),
            "{e}"
        );
        let e = with(&[], r#"{"podGcIntervalSeconds": 90000}"#)
            .expect_err("absurd")
            .to_string();
        assert!(e.contains("podGcIntervalSeconds in the config file"), "{e}");
    }

    #[test]
    fn the_node_gc_interval_and_the_leader_lease_have_defaults_and_bounds_naming_the_flag() {
        let base = ["--etcd-endpoints", "http://a:1", "--node-name", "n"];
        let with = |extra: &[&str], file: &str| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let file: FileConfig = serde_json::from_str(file).expect("file parses");
            resolve(flags(&args), file, None)
        };
        let c = with(&[], "{}").expect("resolves");
        assert_eq!(c.node_gc_interval, Some(DEFAULT_NODE_GC_INTERVAL));
        assert_eq!(c.leader_lease, DEFAULT_LEADER_LEASE);
        let c = with(
            &["--leader-lease-seconds", "3"],
            r#"{"nodeGcIntervalSeconds": 5, "leaderLeaseSeconds": 9}"#,
        )
        .expect("resolves");
        assert_eq!(c.node_gc_interval, Some(Duration::from_secs(5)));
        assert_eq!(c.leader_lease, Duration::from_secs(3));
        let c = with(&["--node-gc-interval-seconds", "0"], "{}").expect("resolves");
        assert_eq!(c.node_gc_interval, None, "0 disables it");
        let e = with(&["--node-gc-interval-seconds", "86401"], "{}")
            .expect_err("absurd")
            .to_string();
        assert!(
            e.contains("--node-gc-interval-seconds / HOSTNIC_NODE_GC_INTERVAL_SECONDS")
                && e.contains("0 to disable the deleted-node GC"),
            "{e}"
        );
        for (args, file, named) in [
            (
                &["--leader-lease-seconds", "1"][..],
                "{}",
                "--leader-lease-seconds",
            ),
            (
                &[][..],
                r#"{"leaderLeaseSeconds": 601}"#,
                "leaderLeaseSeconds in the config file",
            ),
        ] {
            let e = with(args, file).expect_err("out of range").to_string();
            assert!(e.contains(named) && e.contains("leader lease"), "{e}");
        }
    }

    #[test]
    fn gc_nodes_takes_a_dry_run_flag() {
        let f = flags(&["gc-nodes", "--dry-run"]);
        assert!(matches!(
            f.command,
            Some(Command::GcNodes { dry_run: true })
        ));
    }

    #[test]
    fn the_sticky_gc_interval_defaults_to_a_minute_is_disabled_by_0_and_bounded_naming_the_flag() {
        let base = ["--etcd-endpoints", "http://a:1", "--node-name", "n"];
        let with = |extra: &[&str], file: &str| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let file: FileConfig = serde_json::from_str(file).expect("file parses");
            resolve(flags(&args), file, None)
        };
        let c = with(&[], "{}").expect("resolves");
        assert_eq!(c.sticky_gc_interval, Some(DEFAULT_STICKY_GC_INTERVAL));
        let c = with(&[], r#"{"stickyGcIntervalSeconds": 5}"#).expect("resolves");
        assert_eq!(c.sticky_gc_interval, Some(Duration::from_secs(5)));
        let c = with(&["--sticky-gc-interval-seconds", "0"], "{}").expect("resolves");
        assert_eq!(c.sticky_gc_interval, None, "0 disables it");
        let e = with(&["--sticky-gc-interval-seconds", "86401"], "{}")
            .expect_err("absurd")
            .to_string();
        assert!(
            e.contains("--sticky-gc-interval-seconds") && e.contains("0 to disable the sticky GC"),
            "{e}"
        );
        let f = flags(&["gc-sticky", "--dry-run"]);
        assert!(matches!(
            f.command,
            Some(Command::GcSticky { dry_run: true })
        ));
    }

    #[test]
    fn gc_pods_takes_a_dry_run_flag() {
        let f = flags(&["gc-pods", "--dry-run"]);
        assert!(matches!(f.command, Some(Command::GcPods { dry_run: true })));
        let f = flags(&["gc-pods"]);
        assert!(matches!(
            f.command,
            Some(Command::GcPods { dry_run: false })
        ));
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
    fn the_kubeconfig_flag_overrides_the_file_key() {
        let file: FileConfig =
            serde_json::from_str(r#"{"kubeconfig": "/etc/file.conf"}"#).expect("valid");
        let c = resolve(with_endpoint(&[]), file.clone(), Some("h".into())).expect("resolves");
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/file.conf")));
        let c = resolve(
            with_endpoint(&["--kubeconfig", "/etc/flag.conf"]),
            file,
            Some("h".into()),
        )
        .expect("resolves");
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/flag.conf")));
        let c =
            resolve(with_endpoint(&[]), FileConfig::default(), Some("h".into())).expect("resolves");
        assert_eq!(c.kubeconfig, None);
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let e = serde_json::from_str::<FileConfig>(r#"{"nodeNmae": "x"}"#).expect_err("typo");
        assert!(e.to_string().contains("nodeNmae"));
    }

    #[test]
    fn metrics_address_and_log_format_are_read_and_checked() {
        let f = flags(&[]);
        assert_eq!(f.metrics_addr, None, "off by default");
        assert!(!f.metrics_allow_remote);
        assert_eq!(f.log_format, crate::logging::LogFormat::Text);
        let f = flags(&[
            "--metrics-addr",
            "127.0.0.1:9471",
            "--log-format",
            "json",
            "--metrics-allow-remote",
        ]);
        assert_eq!(
            f.metrics_addr,
            Some("127.0.0.1:9471".parse().expect("an address"))
        );
        assert!(f.metrics_allow_remote);
        assert_eq!(f.log_format, crate::logging::LogFormat::Json);
        for bad in [
            ["--metrics-addr", "localhost:9471"],
            ["--metrics-addr", "127.0.0.1"],
            ["--log-format", "yaml"],
        ] {
            let e = Flags::try_parse_from(std::iter::once("hostnic-ipamd").chain(bad))
                .expect_err("refused");
            assert!(e.to_string().contains(bad[0]), "{e}");
        }
    }

    fn with_endpoint(args: &[&str]) -> Flags {
        let mut all = vec!["--etcd-endpoints", "http://a:1"];
        all.extend_from_slice(args);
        flags(&all)
    }

    fn refusal(flags: Flags, file: &str, hostname: Option<&str>) -> String {
        let file: FileConfig = serde_json::from_str(file).expect("file parses");
        resolve(flags, file, hostname.map(str::to_owned))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn node_names_that_are_not_rfc1123_subdomains_are_refused_naming_their_source() {
        for (name, why) in [
            ("", "empty"),
            ("   ", "white space"),
            ("a/b", "'/'"),
            ("node\n1", "control character"),
            ("Node-1", "upper-case"),
            ("node_1", "other than a-z"),
            ("-node", "starts or ends with '-'"),
            ("node..1", "empty label"),
            (&"a".repeat(254), "longer than 253"),
        ] {
            let arg = format!("--node-name={name}");
            let e = refusal(with_endpoint(&[&arg]), "{}", Some("h"));
            assert!(
                e.contains("--node-name / HOSTNIC_NODE_NAME"),
                "{name:?}: {e}"
            );
            assert!(e.contains(why), "{name:?}: {e}");
            let file = serde_json::json!({ "nodeName": name }).to_string();
            let e = refusal(with_endpoint(&[]), &file, Some("h"));
            assert!(e.contains("nodeName in the config file"), "{name:?}: {e}");
        }
        let e = refusal(with_endpoint(&[]), "{}", Some("bad host"));
        assert!(e.contains("the hostname"), "{e}");
        for name in ["node-1", "ip-10-0-0-1.ec2.internal", "1", &"a".repeat(253)] {
            let c = resolve(
                with_endpoint(&["--node-name", name]),
                FileConfig::default(),
                None,
            )
            .expect("valid name");
            assert_eq!(c.node_name, name);
        }
    }

    #[test]
    fn the_hostname_is_lower_cased_as_the_kubelet_does() {
        let c = resolve(
            with_endpoint(&[]),
            FileConfig::default(),
            Some("Node-A".into()),
        )
        .expect("resolves");
        assert_eq!(c.node_name, "node-a");
    }

    #[test]
    fn etcd_retry_budgets_out_of_range_are_refused_naming_their_source() {
        for ms in ["0", "99", "8001", "18446744073709551615"] {
            let e = refusal(with_endpoint(&["--etcd-retry-ms", ms]), "{}", Some("h"));
            assert!(e.contains("--etcd-retry-ms / HOSTNIC_ETCD_RETRY_MS"), "{e}");
            assert!(
                e.contains(&format!("HOSTNIC_ETCD_RETRY_MS is {ms}:")),
                "{e}"
            );
            assert!(e.contains("100..=8000 ms"), "{e}");
        }
        let e = refusal(with_endpoint(&[]), r#"{"etcd": {"retryMs": 0}}"#, Some("h"));
        assert!(e.contains("etcd.retryMs in the config file"), "{e}");
        for ms in [100, 8000] {
            let c = resolve(
                with_endpoint(&["--etcd-retry-ms", &ms.to_string()]),
                FileConfig::default(),
                Some("h".into()),
            )
            .expect("in range");
            assert_eq!(c.store.retry_timeout, Duration::from_millis(ms));
        }
    }

    #[test]
    fn gc_grace_beyond_a_day_is_refused_naming_its_source() {
        let e = refusal(
            with_endpoint(&["--gc-grace-seconds", "86401"]),
            "{}",
            Some("h"),
        );
        assert!(
            e.contains("--gc-grace-seconds / HOSTNIC_GC_GRACE_SECONDS"),
            "{e}"
        );
        assert!(e.contains("at most 86400 s"), "{e}");
        let e = refusal(
            with_endpoint(&[]),
            r#"{"gcGraceSeconds": 18446744073709551615}"#,
            Some("h"),
        );
        assert!(e.contains("gcGraceSeconds in the config file"), "{e}");
        // 0 is allowed: tests collect at once.
        let c = resolve(
            with_endpoint(&["--gc-grace-seconds", "0"]),
            FileConfig::default(),
            Some("h".into()),
        )
        .expect("zero grace");
        assert_eq!(c.gc_grace, Duration::ZERO);
    }

    #[test]
    fn socket_wait_has_a_default_and_a_bound() {
        let c =
            resolve(with_endpoint(&[]), FileConfig::default(), Some("h".into())).expect("resolves");
        assert_eq!(c.socket_wait, DEFAULT_SOCKET_WAIT);
        let c = resolve(
            with_endpoint(&[]),
            serde_json::from_str(r#"{"socketWaitSeconds": 0}"#).expect("file parses"),
            Some("h".into()),
        )
        .expect("resolves");
        assert_eq!(c.socket_wait, Duration::ZERO);
        let e = refusal(
            with_endpoint(&["--socket-wait-seconds", "3601"]),
            "{}",
            Some("h"),
        );
        assert!(
            e.contains("--socket-wait-seconds / HOSTNIC_IPAMD_SOCKET_WAIT_SECONDS"),
            "{e}"
        );
    }

    #[test]
    fn list_pool_must_be_a_subnet_and_is_given_in_its_canonical_spelling() {
        let parse = |pool: &str| {
            Flags::try_parse_from(["hostnic-ipamd", "list", "--pool", pool]).map(|f| f.command)
        };
        let e = parse("junk").expect_err("junk refused").to_string();
        assert!(e.contains("--pool"), "{e}");
        assert!(e.contains("\"junk\" is not a subnet"), "{e}");
        let e = parse("10.0.0.5/24")
            .expect_err("host bits refused")
            .to_string();
        assert!(e.contains("the pool's subnet is 10.0.0.0/24"), "{e}");
        let Ok(Some(Command::List { pool })) = parse("fd00:0::/120") else {
            panic!("an IPv6 subnet parses");
        };
        assert_eq!(pool.as_deref(), Some("fd00::/120"));
    }
}
