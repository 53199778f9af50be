//! The `hostnic-ipam` plugin: one CNI invocation turned into one gRPC call to the node daemon
//! `hostnic-ipamd`, and the daemon's answer turned into the CNI reply.
//!
//! Unlike the rest of this crate, this module does I/O: it reads the file `ipam.resolvConf`
//! names and talks to the daemon's unix socket. The steps in between are pure and public so they
//! can be tested without a daemon: [`prepare`] validates everything the command needs and builds
//! the request (nothing is sent when it fails), [`ipam_result`] shapes an allocation, and
//! [`daemon_error`] maps a failed call to a CNI error.
//!
//! # Which socket
//!
//! `ipam.socket` from the network config, else the environment variable [`SOCKET_ENV`], else
//! [`hostnic_proto::DEFAULT_SOCKET`]. Connecting gives up after [`CONNECT_TIMEOUT`]; a call
//! gives up after [`CALL_DEADLINE`], which is also sent to the daemon as the gRPC deadline.
//!
//! # A restarting daemon
//!
//! While the daemon may be restarting (no socket, a refused or reset connection, a connection that
//! broke before the answer: [`CallFailure::daemon_may_be_restarting`]), every command but STATUS tries
//! again every 100 ms for up to `ipam.daemonWaitSeconds`
//! ([`crate::config::DEFAULT_DAEMON_WAIT`] unless set, 0 to fail at once), and only then
//! answers code 11. A DaemonSet rolling update or a crash-looping daemon so fails no pod.
//!
//! # Daemon failures as CNI errors
//!
//! Before connecting, [`check_socket`] looks at the socket file: the plugin sends a pod's
//! details only to a socket owned by root. Once connected, before sending anything,
//! [`grpc::connect`] checks that the process listening on it runs as root,
//! which no swap of the file between the two steps can fake.
//!
//! [`daemon_error`] is the one place where a failed call becomes a CNI error:
//!
//! | failure                                            | CNI code | message says                                        |
//! |----------------------------------------------------|----------|-----------------------------------------------------|
//! | any failure, for STATUS                            | 50       | plugin not available, with the reason below         |
//! | no socket file (`ENOENT`)                          | 11       | hostnic-ipamd is not running (no socket at PATH)    |
//! | socket refuses connections (`ECONNREFUSED`)        | 11       | hostnic-ipamd is not running (socket PATH refuses connections) |
//! | no connection within [`CONNECT_TIMEOUT`]           | 11       | the daemon accepted no connection in time           |
//! | connection reset before it was served (stopping)   | 11       | the daemon dropped the connection                   |
//! | connection broke during the call (daemon died)     | 11       | the daemon went away during the command, and why    |
//! | `Unavailable`, `DeadlineExceeded`, `Cancelled`     | 11       | the daemon's message (etcd down, daemon busy)       |
//! | socket denies access (`EACCES`), `PermissionDenied`| 5        | the plugin must run as root                         |
//! | not a socket, not owned by root, listener not root | 5        | refusing to use PATH, naming its kind or owner      |
//! | `InvalidArgument`                                  | 7        | the daemon rejected the request, and why            |
//! | `NotFound`, for CHECK                              | 3        | the container is unknown                            |
//! | `ResourceExhausted`                                | 100      | address pool exhausted                              |
//! | `AlreadyExists`                                    | 101      | the requested address is held, and by whom          |
//! | `FailedPrecondition`                               | 102      | the attachment does not match (CHECK)               |
//! | anything else (`Internal`, `NotFound` outside CHECK)| 999     | the command failed in the daemon, and why           |
//!
//! Permission failures are code 5 (the spec's I/O failure), not 11: the socket is 0600 root and
//! the daemon serves only root callers, so a plugin not running as root fails the same way every
//! time, and a runtime told to retry would retry forever. They are not 999 either: nothing is
//! broken but the way the plugin was started, and the message says so. An untrusted socket is
//! code 5 for the same reason: retrying does not make it trustworthy.
//!
//! A connection that breaks during a call (the daemon was killed or restarted) is told apart
//! from the daemon's answer by [`grpc::unary`], which reads the HTTP/2 stream itself: a
//! status comes only from the daemon's `grpc-status` (or an expired deadline), and a reset,
//! close or protocol error after the daemon started serving is [`CallFailure::Broken`].
//!
//! Messages are plain text: no Rust debug output, each cause once, and no phrase the daemon's
//! message already says ("pool exhausted: ..." is not prefixed with "address pool exhausted").
//! The message is the daemon's status message, which names the address, pool or attachment;
//! plugin-specific codes (100 and up) carry the socket in `details`.
//!
//! DEL is not made to succeed when the daemon is unreachable: kubelet retries a failed DEL,
//! whereas a DEL reported as done would leak the address for good. Runtimes that never retry
//! (Podman) are covered by the daemon's network-namespace GC, which releases an attachment
//! whose namespace is gone.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hostnic_proto::v1;
use ipnet::IpNet;
use serde_json::Value;
use tonic::Code;

use crate::config::{IpamConfig, NetworkConfig};
use crate::env::{CniArgs, Invocation};
use crate::error::{
    error_chain, CniError, ErrorReply, CODE_ADDRESS_HELD, CODE_CHECK_MISMATCH, CODE_POOL_EXHAUSTED,
};
use crate::grpc;
pub use crate::grpc::{CallFailure, ConnectFailure};
use crate::result::{parse_resolv_conf, Dns, IpConfig, IpamResult, Route};
use crate::types::{Attachment, CniVersion, Command};
use crate::version::version_reply;

/// Environment variable naming the daemon's socket when the config does not.
pub const SOCKET_ENV: &str = "HOSTNIC_IPAMD_SOCKET";

/// How long to wait for the daemon to accept a connection. Short: a node whose daemon is down
/// must get "try again later" quickly, not hang the runtime.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one call may take. The daemon itself answers `Unavailable` within about 3 s when
/// etcd is unreachable; this bounds a daemon that is stuck.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// What the plugin prints, and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success with a reply to print (ADD, VERSION): the JSON text.
    Reply(String),
    /// Success with nothing to print (DEL, CHECK, GC, STATUS).
    Done,
    /// Failure: print the error object, exit non-zero.
    Failed(ErrorReply),
}

impl Outcome {
    /// The failure reply for `err`, in `cni_version`.
    pub fn failed(err: &CniError, cni_version: &str) -> Self {
        Outcome::Failed(err.reply(cni_version))
    }

    /// Whether the plugin should exit 0.
    pub fn is_success(&self) -> bool {
        !matches!(self, Outcome::Failed(_))
    }

    /// Runs a plugin binary's one invocation: reads the config from stdin and passes it with
    /// the process environment to `run`; a stdin that cannot be read is a failure. Returns the
    /// environment and stdin read, for the caller's own use, with the outcome.
    pub fn of_process(
        run: impl FnOnce(&[(OsString, OsString)], &[u8]) -> Outcome,
    ) -> (Vec<(OsString, OsString)>, Vec<u8>, Outcome) {
        let vars: Vec<_> = std::env::vars_os().collect();
        let mut stdin = Vec::new();
        let outcome = match std::io::stdin().lock().read_to_end(&mut stdin) {
            Ok(_) => run(&vars, &stdin),
            Err(source) => Outcome::failed(
                &CniError::Io {
                    what: "read the network config from stdin".to_owned(),
                    source,
                },
                CniVersion::LATEST.as_str(),
            ),
        };
        (vars, stdin, outcome)
    }

    /// Ends a plugin binary: a failure is logged in one line on stderr, the reply (if any)
    /// goes to stdout, and the exit code says whether it succeeded. `plugin` names the binary
    /// in the stderr lines.
    pub fn exit(&self, plugin: &str) -> std::process::ExitCode {
        use std::io::Write;
        if let Outcome::Failed(reply) = self {
            eprintln!("{plugin}: error {}: {}", reply.code, reply.msg);
        }
        if let Some(text) = self.stdout() {
            let mut stdout = std::io::stdout().lock();
            if let Err(err) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
                eprintln!("{plugin}: cannot write the reply to stdout: {err}");
                return std::process::ExitCode::FAILURE;
            }
        }
        if self.is_success() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }

    /// The text for stdout, if any.
    pub fn stdout(&self) -> Option<String> {
        match self {
            Outcome::Reply(text) => Some(text.clone()),
            Outcome::Done => None,
            Outcome::Failed(reply) => Some(serde_json::to_string(reply).unwrap_or_else(|_| {
                r#"{"cniVersion":"1.1.0","code":999,"msg":"cannot encode the error reply"}"#
                    .to_owned()
            })),
        }
    }
}

/// Runs one invocation: `vars` is the process environment, `stdin` the bytes the runtime wrote.
/// Never panics; every failure is an [`Outcome::Failed`] in the config's version when it could
/// be read (see [`error_reply_version`]).
pub fn run<K, V>(vars: &[(K, V)], stdin: &[u8]) -> Outcome
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    match execute(vars, stdin) {
        Ok(outcome) => outcome,
        Err(err) => Outcome::failed(&err, &error_reply_version(stdin)),
    }
}

fn execute<K, V>(vars: &[(K, V)], stdin: &[u8]) -> Result<Outcome, CniError>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let invocation = Invocation::from_env(vars.iter().map(|(k, v)| (k, v)))?;
    if invocation.command == Command::Version {
        return to_json(&version_reply(stdin)?).map(Outcome::Reply);
    }
    let config = NetworkConfig::parse(stdin)?;
    config.cni_version.ensure_supports(invocation.command)?;
    let call = prepare(&invocation, &config)?;
    let socket = socket_path(&config.ipam, env_value(vars, SOCKET_ENV));

    // STATUS answers at once: a runtime asks it to learn whether the plugin is ready now.
    let wait = if invocation.command == Command::Status {
        Duration::ZERO
    } else {
        config.ipam.daemon_wait
    };
    let answer = call_waiting(&socket, wait, |socket| send(&call, socket)).map_err(|failure| {
        daemon_error(
            invocation.command,
            &socket,
            invocation.attachment.as_ref(),
            &failure,
        )
    })?;
    match answer {
        Answer::Allocated { reply, routes, dns } => {
            let result = ipam_result(reply, routes, dns, &socket)?;
            to_json(&result.reply(config.cni_version)).map(Outcome::Reply)
        }
        Answer::Done => Ok(Outcome::Done),
    }
}

/// The `cniVersion` an error reply is written in: the config's, when stdin has a supported one
/// (canonical spelling); the requested string, when it is a well-formed version this plugin does
/// not implement (the runtime asked in it); [`CniVersion::LATEST`] otherwise.
pub fn error_reply_version(stdin: &[u8]) -> String {
    let latest = || CniVersion::LATEST.as_str().to_owned();
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(stdin) else {
        return latest();
    };
    let Some(Value::String(requested)) = object.get("cniVersion") else {
        return latest();
    };
    match requested.parse::<CniVersion>() {
        Ok(version) => version.as_str().to_owned(),
        Err(CniError::IncompatibleVersion { .. }) => requested.clone(),
        Err(_) => latest(),
    }
}

/// The daemon's socket: `ipam.socket`, else `env_socket` (the value of [`SOCKET_ENV`]; empty
/// counts as unset), else [`hostnic_proto::DEFAULT_SOCKET`].
pub fn socket_path(ipam: &IpamConfig, env_socket: Option<&OsStr>) -> PathBuf {
    ipam.socket
        .clone()
        .or_else(|| env_socket.filter(|s| !s.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(hostnic_proto::DEFAULT_SOCKET))
}

fn env_value<'a, K, V>(vars: &'a [(K, V)], name: &str) -> Option<&'a OsStr>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    vars.iter()
        .rev()
        .find(|(k, _)| k.as_ref() == name)
        .map(|(_, v)| v.as_ref())
}

/// One request to the daemon, fully validated, with what the reply needs from the config.
#[derive(Debug, Clone, PartialEq)]
pub enum DaemonCall {
    /// ADD.
    Allocate(Box<Allocation>),
    /// DEL.
    Release(v1::ReleaseRequest),
    /// CHECK.
    Check(v1::CheckRequest),
    /// GC.
    Gc(v1::GcRequest),
    /// STATUS.
    Status(v1::StatusRequest),
}

/// An ADD: the request, and what the result needs from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// The request.
    pub request: v1::AllocateRequest,
    /// `ipam.routes`, for the result.
    pub routes: Vec<Route>,
    /// `ipam.resolvConf`, already read, for the result.
    pub dns: Dns,
}

/// Validates what `invocation.command` needs and builds its request, before anything is sent:
/// a bad requested address (4 or 7), an unreadable `ipam.resolvConf` (5), a missing `prevResult`
/// (7) or valid-attachments list (7) fail here, so nothing is allocated or released.
///
/// Each command reads only its own inputs: DEL never looks at requested addresses, so a
/// malformed `IP=` cannot keep a pod from being torn down.
pub fn prepare(invocation: &Invocation, config: &NetworkConfig) -> Result<DaemonCall, CniError> {
    match invocation.command {
        Command::Add => Ok(DaemonCall::Allocate(Box::new(Allocation {
            request: allocate_request(invocation, config)?,
            routes: config.ipam.routes.clone(),
            dns: read_dns(&config.ipam)?,
        }))),
        Command::Del => Ok(DaemonCall::Release(v1::ReleaseRequest {
            attachment: Some(attachment(invocation)?),
            network: Some(network(config)),
        })),
        Command::Check => Ok(DaemonCall::Check(v1::CheckRequest {
            attachment: Some(attachment(invocation)?),
            network: Some(network(config)),
            addresses: config
                .prev_result()?
                .ips
                .iter()
                .map(|ip| ip.address.to_string())
                .collect(),
        })),
        Command::Gc => Ok(DaemonCall::Gc(v1::GcRequest {
            network: Some(network(config)),
            valid_attachments: config
                .valid_attachments()?
                .into_iter()
                .map(|a| v1::Attachment {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect(),
        })),
        Command::Status => Ok(DaemonCall::Status(v1::StatusRequest {
            network: Some(network(config)),
        })),
        Command::Version => Err(CniError::Internal {
            reason: "VERSION needs no daemon call".to_owned(),
        }),
    }
}

/// The ADD request: attachment, network, pod, requested addresses and netns.
pub fn allocate_request(
    invocation: &Invocation,
    config: &NetworkConfig,
) -> Result<v1::AllocateRequest, CniError> {
    Ok(v1::AllocateRequest {
        attachment: Some(attachment(invocation)?),
        network: Some(network(config)),
        pod: Some(pod(&invocation.args)),
        requested_ips: requested_ips(invocation, config)?,
        netns: invocation
            .netns
            .as_deref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

/// The addresses the pod asks for: `CNI_ARGS` `IP=`, then `runtimeConfig.ips`, then
/// `args.cni.ips`, each address once, in the order first seen, as plain addresses (`10.0.0.5`):
/// a prefix length in the request adds nothing, the pool's subnet decides it.
pub fn requested_ips(
    invocation: &Invocation,
    config: &NetworkConfig,
) -> Result<Vec<String>, CniError> {
    let mut addresses: Vec<IpAddr> = Vec::new();
    let sources = [
        invocation.args.ips()?,
        config.runtime_config_ips()?,
        config.args_ips()?,
    ];
    for ip in sources.into_iter().flatten() {
        if !addresses.contains(&ip.address) {
            addresses.push(ip.address);
        }
    }
    Ok(addresses.iter().map(ToString::to_string).collect())
}

/// The pod from `K8S_POD_*`; empty fields when the runtime is not Kubernetes.
pub fn pod(args: &CniArgs) -> v1::Pod {
    let field = |v: &Option<String>| v.clone().unwrap_or_default();
    v1::Pod {
        namespace: field(&args.pod_namespace),
        name: field(&args.pod_name),
        uid: field(&args.pod_uid),
        infra_container_id: field(&args.pod_infra_container_id),
    }
}

/// The network: its name and the raw `ipam` object, which the daemon validates.
pub fn network(config: &NetworkConfig) -> v1::Network {
    v1::Network {
        name: config.name.clone(),
        ipam_json: config.ipam.raw.to_string(),
    }
}

fn attachment(invocation: &Invocation) -> Result<v1::Attachment, CniError> {
    let Attachment {
        container_id,
        ifname,
    } = invocation
        .attachment
        .clone()
        .ok_or_else(|| CniError::Internal {
            reason: format!("{} has no attachment", invocation.command),
        })?;
    Ok(v1::Attachment {
        container_id,
        ifname,
    })
}

/// The most of `ipam.resolvConf` the plugin reads. A real resolv.conf is a few hundred bytes
/// (glibc reads at most 6 search domains and 3 name servers); the bound keeps a config naming
/// a huge file, or `/dev/zero`, from eating the node's memory.
pub const RESOLV_CONF_LIMIT: u64 = 64 * 1024;

/// Reads `ipam.resolvConf` when set; code 5 naming the path and why when it cannot be used.
///
/// Only a regular file of at most [`RESOLV_CONF_LIMIT`] bytes is read. It is opened with
/// `O_NONBLOCK`, so a FIFO with no writer cannot hang the plugin in `open`, and then checked on
/// the opened descriptor (not the path, which could be swapped in between), so a FIFO, a device
/// or a directory is refused before any read.
pub fn read_dns(ipam: &IpamConfig) -> Result<Dns, CniError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let Some(path) = &ipam.resolv_conf else {
        return Ok(Dns::default());
    };
    let unreadable = |reason: String| CniError::UnreadableFile {
        field: "ipam.resolvConf",
        path: path.clone(),
        reason,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| unreadable(io_reason(&e)))?;
    let metadata = file.metadata().map_err(|e| unreadable(io_reason(&e)))?;
    let kind = FileKind::of(metadata.file_type());
    if kind != FileKind::Regular {
        return Err(unreadable(format!(
            "it is {}, not a regular file",
            kind.describe()
        )));
    }
    let too_large = || {
        unreadable(format!(
            "it is larger than {} KiB, which no resolv.conf is",
            RESOLV_CONF_LIMIT / 1024
        ))
    };
    if metadata.len() > RESOLV_CONF_LIMIT {
        return Err(too_large());
    }
    // Bounded again while reading: the file may have grown since `fstat`.
    let mut bytes = Vec::new();
    file.take(RESOLV_CONF_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(io_reason(&e)))?;
    if bytes.len() as u64 > RESOLV_CONF_LIMIT {
        return Err(too_large());
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        unreadable(format!(
            "it is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(parse_resolv_conf(&text))
}

/// Plain words for a failed open or read: the OS's "No such file or directory" would make Podman
/// report a missing command.
fn io_reason(err: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::NotFound => "it does not exist".to_owned(),
        ErrorKind::NotADirectory => "a component of the path is not a directory".to_owned(),
        ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => error_chain(err),
    }
}

/// The ADD result from the daemon's reply. A reply without addresses, or with one that does not
/// parse, is a daemon bug (999) and is reported as such rather than printed.
pub fn ipam_result(
    reply: v1::AllocateReply,
    routes: Vec<Route>,
    dns: Dns,
    socket: &Path,
) -> Result<IpamResult, CniError> {
    let bad_reply = |reason: String| CniError::Internal {
        reason: format!("{} answered ADD with {reason}", daemon(socket)),
    };
    if reply.ips.is_empty() {
        return Err(bad_reply("no address".to_owned()));
    }
    let ips = reply
        .ips
        .into_iter()
        .map(|ip| {
            let address: IpNet = ip
                .address
                .parse()
                .map_err(|e| bad_reply(format!("address {:?}: {e}", ip.address)))?;
            let gateway = match ip.gateway.as_str() {
                "" => None,
                gw => Some(
                    gw.parse::<IpAddr>()
                        .map_err(|e| bad_reply(format!("gateway {gw:?}: {e}")))?,
                ),
            };
            Ok(IpConfig { address, gateway })
        })
        .collect::<Result<_, CniError>>()?;
    Ok(IpamResult { ips, routes, dns })
}

/// What kind of file is at the socket path, for [`check_socket_owner`] and its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A unix socket: the only kind the plugin connects to.
    Socket,
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A FIFO.
    Fifo,
    /// A character or block device.
    Device,
    /// A symbolic link (only seen when links are not followed).
    Symlink,
}

impl FileKind {
    /// The kind of `file_type`.
    pub fn of(file_type: std::fs::FileType) -> Self {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_socket() {
            FileKind::Socket
        } else if file_type.is_dir() {
            FileKind::Directory
        } else if file_type.is_fifo() {
            FileKind::Fifo
        } else if file_type.is_char_device() || file_type.is_block_device() {
            FileKind::Device
        } else if file_type.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Regular
        }
    }

    fn describe(self) -> &'static str {
        match self {
            FileKind::Socket => "a socket",
            FileKind::Regular => "a regular file",
            FileKind::Directory => "a directory",
            FileKind::Fifo => "a FIFO",
            FileKind::Device => "a device",
            FileKind::Symlink => "a symbolic link",
        }
    }
}

/// Whether the plugin may send a pod's details to a file of `kind` owned by `owner_uid`: only to
/// a socket that root owns. The daemon runs as root and its socket is created by it, so a socket
/// owned by anyone else was put there by someone else (a user who could write the socket's
/// directory), who would receive every pod's details and could answer with any address. The
/// error is the reason, naming the kind or the owner.
pub fn check_socket_owner(kind: FileKind, owner_uid: u32) -> Result<(), String> {
    if kind != FileKind::Socket {
        return Err(format!("it is {}, not a socket", kind.describe()));
    }
    if owner_uid != 0 {
        return Err(format!(
            "the socket is owned by uid {owner_uid}, not root; a non-root user may have put it \
             there, so the plugin will not send it a request"
        ));
    }
    Ok(())
}

/// Looks at `socket` before connecting: it must exist and pass [`check_socket_owner`]. The path
/// is followed if it is a symbolic link, as `connect(2)` follows it: what is checked is what the
/// plugin would talk to. A missing socket is [`ConnectFailure::NoSocket`], so the message is
/// the same whether `stat` or `connect` finds it missing.
pub fn check_socket(socket: &Path) -> Result<(), ConnectFailure> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(socket).map_err(|e| ConnectFailure::from_io(&e))?;
    check_socket_owner(FileKind::of(metadata.file_type()), metadata.uid())
        .map_err(ConnectFailure::Untrusted)
}

/// The CNI error for a failed call: the table in the [module documentation](self).
///
/// `command` decides STATUS (always 50) and CHECK (`NotFound` is 3); `socket` is named in the
/// message or details; `attachment` names the container for code 3.
pub fn daemon_error(
    command: Command,
    socket: &Path,
    attachment: Option<&Attachment>,
    failure: &CallFailure,
) -> CniError {
    let daemon = daemon(socket);
    let err = match failure {
        CallFailure::Connect(failure) => connect_error(socket, failure),
        CallFailure::Broken(cause) => CniError::TryAgainLater {
            message: format!("{daemon} went away during {command}: {cause}"),
        },
        CallFailure::Status(status) => status_error(command, socket, attachment, status),
    };
    if command != Command::Status {
        return err;
    }
    // STATUS reports every failure as "not available", with the reason the other commands give.
    let reason = match err {
        CniError::TryAgainLater { message } => message,
        other => other.to_string(),
    };
    if reason.contains(&socket.display().to_string()) {
        CniError::Unavailable { reason }
    } else {
        CniError::Unavailable {
            reason: format!("{daemon}: {reason}"),
        }
    }
}

fn connect_error(socket: &Path, failure: &ConnectFailure) -> CniError {
    let path = socket.display();
    match failure {
        ConnectFailure::NoSocket => CniError::TryAgainLater {
            message: format!("hostnic-ipamd is not running (no socket at {path})"),
        },
        ConnectFailure::Refused => CniError::TryAgainLater {
            message: format!("hostnic-ipamd is not running (socket {path} refuses connections)"),
        },
        ConnectFailure::PermissionDenied => CniError::NotRoot {
            what: daemon(socket),
            reason: "permission denied on the socket".to_owned(),
        },
        ConnectFailure::Untrusted(reason) => CniError::UntrustedSocket {
            socket: socket.to_path_buf(),
            reason: reason.clone(),
        },
        ConnectFailure::TimedOut => CniError::TryAgainLater {
            message: format!(
                "{} accepted no connection within {} ms",
                daemon(socket),
                CONNECT_TIMEOUT.as_millis()
            ),
        },
        ConnectFailure::Dropped => CniError::TryAgainLater {
            message: format!(
                "{} dropped the connection before serving it (stopping or restarting)",
                daemon(socket)
            ),
        },
        ConnectFailure::Other(cause) => CniError::TryAgainLater {
            message: format!("cannot connect to {}: {cause}", daemon(socket)),
        },
    }
}

fn status_error(
    command: Command,
    socket: &Path,
    attachment: Option<&Attachment>,
    status: &tonic::Status,
) -> CniError {
    let daemon = daemon(socket);
    let message = status_message(status);
    let plugin = |code: u32, msg: String| CniError::Plugin {
        code,
        msg,
        details: Some(daemon.clone()),
    };
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => CniError::TryAgainLater {
            message: format!("{daemon}: {message}"),
        },
        Code::InvalidArgument => CniError::Rejected {
            by: daemon,
            reason: message,
        },
        Code::NotFound if command == Command::Check => CniError::ContainerUnknown {
            container_id: attachment
                .map(|a| a.container_id.clone())
                .unwrap_or_default(),
            reason: message,
        },
        Code::ResourceExhausted => plugin(
            CODE_POOL_EXHAUSTED,
            unless_said("address pool exhausted", "exhausted", message),
        ),
        Code::AlreadyExists => plugin(
            CODE_ADDRESS_HELD,
            unless_said(
                "requested address is held by another pod",
                "held by",
                message,
            ),
        ),
        Code::FailedPrecondition => plugin(
            CODE_CHECK_MISMATCH,
            format!("{command}: the attachment does not match: {message}"),
        ),
        Code::PermissionDenied => CniError::NotRoot {
            what: daemon,
            reason: message,
        },
        other => plugin(
            999,
            format!(
                "{command} failed in hostnic-ipamd: {message} (gRPC status: {})",
                other.description()
            ),
        ),
    }
}

/// `message` with `prefix: ` in front, unless it already says `phrase` (case-insensitive): the
/// daemon's messages usually name the condition ("pool exhausted: ..."), and saying it twice
/// reads as two failures.
fn unless_said(prefix: &str, phrase: &str, message: String) -> String {
    if message.to_lowercase().contains(phrase) {
        message
    } else {
        format!("{prefix}: {message}")
    }
}

fn daemon(socket: &Path) -> String {
    format!("hostnic-ipamd at {}", socket.display())
}

/// The status message, or the code's description when the daemon sent none.
fn status_message(status: &tonic::Status) -> String {
    match status.message() {
        "" => status.code().description().to_owned(),
        message => message.to_owned(),
    }
}

/// A successful call, with what ADD needs to build its result.
#[derive(Debug)]
enum Answer {
    Allocated {
        reply: v1::AllocateReply,
        routes: Vec<Route>,
        dns: Dns,
    },
    Done,
}

/// How often a call looks again for a daemon that is restarting.
const RESTART_POLL: Duration = Duration::from_millis(100);

/// `call`, tried again every [`RESTART_POLL`] for up to `wait` while the daemon may be
/// restarting (a rolling update, a crash loop), so that a restart fails no call.
pub fn call_waiting<T>(
    socket: &Path,
    wait: Duration,
    call: impl Fn(&Path) -> Result<T, CallFailure>,
) -> Result<T, CallFailure> {
    let give_up = Instant::now() + wait;
    loop {
        let failure = match check_socket(socket)
            .map_err(CallFailure::Connect)
            .and_then(|()| call(socket))
        {
            Ok(answer) => return Ok(answer),
            Err(failure) => failure,
        };
        let now = Instant::now();
        if !failure.daemon_may_be_restarting() || now >= give_up {
            return Err(failure);
        }
        std::thread::sleep(RESTART_POLL.min(give_up - now));
    }
}

/// One call to the `Ipam` service: `/hostnic.ipam.v1.Ipam/<method>`.
fn ipam<Req: prost::Message, Reply: prost::Message + Default>(
    socket: &Path,
    method: &str,
    request: &Req,
) -> Result<Reply, CallFailure> {
    grpc::unary(
        socket,
        &format!("/hostnic.ipam.v1.Ipam/{method}"),
        request,
        CONNECT_TIMEOUT,
        CALL_DEADLINE,
    )
}

fn send(call: &DaemonCall, socket: &Path) -> Result<Answer, CallFailure> {
    match call {
        DaemonCall::Allocate(allocation) => {
            let reply: v1::AllocateReply = ipam(socket, "Allocate", &allocation.request)?;
            Ok(Answer::Allocated {
                reply,
                routes: allocation.routes.clone(),
                dns: allocation.dns.clone(),
            })
        }
        DaemonCall::Release(request) => {
            ipam::<_, v1::ReleaseReply>(socket, "Release", request).map(|_| Answer::Done)
        }
        DaemonCall::Check(request) => {
            ipam::<_, v1::CheckReply>(socket, "Check", request).map(|_| Answer::Done)
        }
        DaemonCall::Gc(request) => {
            ipam::<_, v1::GcReply>(socket, "Gc", request).map(|_| Answer::Done)
        }
        DaemonCall::Status(request) => {
            ipam::<_, v1::StatusReply>(socket, "Status", request).map(|_| Answer::Done)
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CniError> {
    serde_json::to_string(value).map_err(|e| CniError::Internal {
        reason: format!("cannot encode the reply: {e}"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::grpc::tests::creates_as_root;
    use serde_json::json;

    const CID: &str = "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755";
    const SOCKET: &str = "/run/test/ipamd.sock";

    fn invocation(command: &str, cni_args: &str) -> Invocation {
        Invocation::from_env([
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", CID),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", cni_args),
        ])
        .unwrap()
    }

    fn config(extra: Value) -> NetworkConfig {
        let mut conf = json!({
            "cniVersion": "1.1.0",
            "name": "macvlan-net",
            "type": "macvlan",
            "ipam": {
                "type": "hostnic-ipam",
                "subnet": "10.0.0.0/24",
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        });
        if let (Value::Object(conf), Value::Object(extra)) = (&mut conf, extra) {
            conf.extend(extra);
        }
        NetworkConfig::parse(conf.to_string().as_bytes()).unwrap()
    }

    fn check_attachment() -> Attachment {
        Attachment {
            container_id: CID.to_owned(),
            ifname: "net1".to_owned(),
        }
    }

    fn map(command: Command, status: tonic::Status) -> CniError {
        daemon_error(
            command,
            Path::new(SOCKET),
            Some(&check_attachment()),
            &CallFailure::Status(status),
        )
    }

    #[test]
    fn requested_ips_are_the_deduplicated_union_of_the_three_sources() {
        let inv = invocation(
            "ADD",
            "K8S_POD_NAMESPACE=default;IP=10.0.0.5,fd00::5/64;K8S_POD_NAME=web-0",
        );
        let conf = config(json!({
            "runtimeConfig": {"ips": ["10.0.0.6/24", "10.0.0.5/24"]},
            "args": {"cni": {"ips": ["fd00::5", "10.0.0.7", "10.0.0.6"]}},
        }));
        assert_eq!(
            requested_ips(&inv, &conf).unwrap(),
            ["10.0.0.5", "fd00::5", "10.0.0.6", "10.0.0.7"]
        );
        assert!(requested_ips(&invocation("ADD", ""), &config(json!({})))
            .unwrap()
            .is_empty());
    }

    /// The daemon reads `requested_ips` with [`crate::parse_plain_ip`], which refuses a prefix:
    /// every address the plugin sends, CIDR requests included, must pass it unchanged.
    #[test]
    fn requested_ips_sent_are_plain_addresses_the_daemon_accepts() {
        let inv = invocation("ADD", "IP=10.0.0.5/24,fd00::5/64");
        let conf = config(json!({
            "runtimeConfig": {"ips": ["10.0.0.6/24", "fd00::6"]},
            "args": {"cni": {"ips": ["10.0.0.7/32"]}},
        }));
        let DaemonCall::Allocate(call) = prepare(&inv, &conf).unwrap() else {
            panic!("ADD allocates");
        };
        let sent = call.request.requested_ips;
        assert_eq!(sent.len(), 5, "{sent:?}");
        for address in &sent {
            let ip = crate::parse_plain_ip(address).unwrap();
            assert_eq!(&ip.to_string(), address);
        }
    }

    #[test]
    fn malformed_requested_ip_fails_add_before_any_call() {
        let err = prepare(&invocation("ADD", "IP=10.0.0.300"), &config(json!({}))).unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("10.0.0.300"), "{err}");
        let conf = config(json!({"runtimeConfig": {"ips": ["bogus"]}}));
        let err = prepare(&invocation("ADD", ""), &conf).unwrap_err();
        assert_eq!(err.code(), 7);
        assert!(err.to_string().contains("runtimeConfig.ips[0]"), "{err}");
    }

    #[test]
    fn del_ignores_malformed_requested_ips() {
        let conf = config(json!({
            "runtimeConfig": {"ips": ["bogus"]},
            "args": {"cni": {"ips": [42]}},
        }));
        let call = prepare(&invocation("DEL", "IP=not-an-ip"), &conf).unwrap();
        let DaemonCall::Release(request) = call else {
            panic!("{call:?}");
        };
        assert_eq!(request.attachment.unwrap().container_id, CID);
        assert_eq!(request.network.unwrap().name, "macvlan-net");
    }

    #[test]
    fn allocate_request_carries_pod_attachment_network_and_netns() {
        let inv = invocation(
            "ADD",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=3f6940ab;K8S_POD_UID=9b2c5e4e",
        );
        let conf = config(json!({}));
        let request = allocate_request(&inv, &conf).unwrap();
        assert_eq!(
            request.pod.unwrap(),
            v1::Pod {
                namespace: "default".to_owned(),
                name: "web-0".to_owned(),
                uid: "9b2c5e4e".to_owned(),
                infra_container_id: "3f6940ab".to_owned(),
            }
        );
        assert_eq!(
            request.attachment.unwrap(),
            v1::Attachment {
                container_id: CID.to_owned(),
                ifname: "net1".to_owned(),
            }
        );
        assert_eq!(request.netns, "/var/run/netns/cni-1");
        let network = request.network.unwrap();
        assert_eq!(network.name, "macvlan-net");
        let ipam: Value = serde_json::from_str(&network.ipam_json).unwrap();
        assert_eq!(ipam["subnet"], "10.0.0.0/24");
        assert_eq!(ipam["type"], "hostnic-ipam");
    }

    #[test]
    fn pod_fields_are_empty_outside_kubernetes() {
        let request = allocate_request(&invocation("ADD", ""), &config(json!({}))).unwrap();
        assert_eq!(request.pod.unwrap(), v1::Pod::default());
    }

    #[test]
    fn add_reads_resolv_conf_and_keeps_routes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 10.96.0.10\nsearch svc.cluster.local\n").unwrap();
        let mut conf = config(json!({}));
        conf.ipam.resolv_conf = Some(path);
        let DaemonCall::Allocate(allocation) = prepare(&invocation("ADD", ""), &conf).unwrap()
        else {
            panic!("not an allocation");
        };
        assert_eq!(allocation.dns.nameservers, ["10.96.0.10"]);
        assert_eq!(allocation.routes, conf.ipam.routes);
    }

    #[test]
    fn unreadable_resolv_conf_is_code_5_naming_the_path() {
        let mut conf = config(json!({}));
        conf.ipam.resolv_conf = Some(PathBuf::from("/nonexistent/resolv.conf"));
        let err = prepare(&invocation("ADD", ""), &conf).unwrap_err();
        assert_eq!(err.code(), 5);
        assert_eq!(
            err.to_string(),
            "cannot read ipam.resolvConf /nonexistent/resolv.conf: it does not exist"
        );
        // DEL does not need it.
        prepare(&invocation("DEL", ""), &conf).unwrap();
    }

    /// `read_dns` on `path`, in a thread that must finish within 5 s: a hang is a failure,
    /// not a stuck test run.
    fn read_dns_within_5s(path: &Path) -> Result<Dns, CniError> {
        let mut conf = config(json!({}));
        conf.ipam.resolv_conf = Some(path.to_path_buf());
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(read_dns(&conf.ipam));
        });
        result
            .recv_timeout(Duration::from_secs(5))
            .expect("read_dns hung")
    }

    fn assert_unreadable(path: &Path, why: &str) {
        let err = read_dns_within_5s(path).unwrap_err();
        assert_eq!(err.code(), 5, "{err}");
        assert_eq!(
            err.to_string(),
            format!("cannot read ipam.resolvConf {}: {why}", path.display())
        );
    }

    #[test]
    fn resolv_conf_that_is_not_a_regular_file_is_refused_at_once() {
        assert_unreadable(Path::new("/dev/zero"), "it is a device, not a regular file");
        let dir = tempfile::tempdir().unwrap();
        assert_unreadable(dir.path(), "it is a directory, not a regular file");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", fifo.display());
        // Nobody writes to it: a blocking open would wait forever.
        assert_unreadable(&fifo, "it is a FIFO, not a regular file");
        assert_unreadable(&dir.path().join("missing"), "it does not exist");
    }

    #[test]
    fn resolv_conf_is_read_up_to_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'#'; 1024 * 1024]).unwrap();
        assert_unreadable(&big, "it is larger than 64 KiB, which no resolv.conf is");
        let limit = dir.path().join("limit");
        let mut text = b"nameserver 10.96.0.10\n".to_vec();
        text.resize(RESOLV_CONF_LIMIT as usize, b'#');
        std::fs::write(&limit, text).unwrap();
        assert_eq!(
            read_dns_within_5s(&limit).unwrap().nameservers,
            ["10.96.0.10"]
        );
        let binary = dir.path().join("binary");
        std::fs::write(&binary, b"nameserver \xff").unwrap();
        assert_unreadable(&binary, "it is not UTF-8 text (invalid byte at offset 11)");
    }

    #[test]
    fn check_sends_the_previous_addresses() {
        let conf = config(json!({"prevResult": {
            "cniVersion": "1.1.0",
            "ips": [
                {"address": "10.0.0.5/24", "gateway": "10.0.0.1"},
                {"address": "fd00::5/64"}
            ]
        }}));
        let DaemonCall::Check(request) = prepare(&invocation("CHECK", ""), &conf).unwrap() else {
            panic!("not a check");
        };
        assert_eq!(request.addresses, ["10.0.0.5/24", "fd00::5/64"]);
        let err = prepare(&invocation("CHECK", ""), &config(json!({}))).unwrap_err();
        assert_eq!(err.code(), 7);
        assert!(err.to_string().contains("prevResult"), "{err}");
    }

    #[test]
    fn gc_sends_the_valid_attachments_and_refuses_without_them() {
        let gc =
            Invocation::from_env([("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]).unwrap();
        let conf = config(json!({"cni.dev/valid-attachments": [
            {"containerID": "a", "ifname": "eth0"}
        ]}));
        let DaemonCall::Gc(request) = prepare(&gc, &conf).unwrap() else {
            panic!("not a gc");
        };
        assert_eq!(
            request.valid_attachments,
            [v1::Attachment {
                container_id: "a".to_owned(),
                ifname: "eth0".to_owned()
            }]
        );
        assert_eq!(prepare(&gc, &config(json!({}))).unwrap_err().code(), 7);
    }

    #[test]
    fn socket_precedence_config_then_env_then_default() {
        let mut conf = config(json!({}));
        let env = Some(OsStr::new("/env/ipamd.sock"));
        assert_eq!(
            socket_path(&conf.ipam, None),
            Path::new(hostnic_proto::DEFAULT_SOCKET)
        );
        assert_eq!(
            socket_path(&conf.ipam, Some(OsStr::new(""))),
            Path::new(hostnic_proto::DEFAULT_SOCKET)
        );
        assert_eq!(socket_path(&conf.ipam, env), Path::new("/env/ipamd.sock"));
        conf.ipam.socket = Some(PathBuf::from("/conf/ipamd.sock"));
        assert_eq!(socket_path(&conf.ipam, env), Path::new("/conf/ipamd.sock"));
    }

    #[test]
    fn status_mapping_table() {
        use Command::*;
        let cases = [
            (Add, tonic::Status::unavailable("etcd: no leader"), 11),
            (Del, tonic::Status::unavailable("etcd: no leader"), 11),
            (Add, tonic::Status::deadline_exceeded("etcd slow"), 11),
            (Del, tonic::Status::cancelled("Timeout expired"), 11),
            (Add, tonic::Status::invalid_argument("ipam.subnet: bad"), 7),
            (Add, tonic::Status::resource_exhausted("pool p1 full"), 100),
            (Add, tonic::Status::already_exists("10.0.0.5 held"), 101),
            (
                Check,
                tonic::Status::failed_precondition("10.0.0.5 not held"),
                102,
            ),
            (Check, tonic::Status::not_found("no attachment"), 3),
            (Add, tonic::Status::not_found("no such pool"), 999),
            (Del, tonic::Status::not_found("no such network"), 999),
            (Add, tonic::Status::permission_denied("uid 1000"), 5),
            (Add, tonic::Status::internal("bug"), 999),
            (Gc, tonic::Status::unknown("?"), 999),
            (Gc, tonic::Status::unavailable("etcd"), 11),
        ];
        for (command, status, code) in cases {
            let message = status.message().to_owned();
            let err = map(command, status);
            assert_eq!(err.code(), code, "{command} {err:?}");
            assert!(err.to_string().contains(&message), "{command}: {err}");
        }
    }

    #[test]
    fn status_command_maps_every_failure_to_50() {
        for status in [
            tonic::Status::unavailable("etcd unreachable"),
            tonic::Status::resource_exhausted("pool p1 full"),
            tonic::Status::permission_denied("uid 1000"),
            tonic::Status::internal("bug"),
        ] {
            let message = status.message().to_owned();
            let err = map(Command::Status, status);
            assert_eq!(err.code(), 50, "{err:?}");
            assert!(err.to_string().contains(&message), "{err}");
            assert!(err.to_string().contains(SOCKET), "{err}");
        }
        let err = daemon_error(
            Command::Status,
            Path::new(SOCKET),
            None,
            &CallFailure::Connect(ConnectFailure::NoSocket),
        );
        assert_eq!(err.code(), 50);
        assert_eq!(
            err.to_string(),
            "plugin not available: hostnic-ipamd is not running (no socket at /run/test/ipamd.sock)"
        );
        let err = daemon_error(
            Command::Status,
            Path::new(SOCKET),
            None,
            &CallFailure::Broken("transport error".to_owned()),
        );
        assert_eq!(err.code(), 50);
        assert!(err.to_string().contains("went away during STATUS"), "{err}");
    }

    fn connect_error_for(command: Command, failure: ConnectFailure) -> ErrorReply {
        connect_error_at(Path::new(SOCKET), command, failure)
    }

    fn connect_error_at(socket: &Path, command: Command, failure: ConnectFailure) -> ErrorReply {
        daemon_error(command, socket, None, &CallFailure::Connect(failure)).reply("1.1.0")
    }

    #[test]
    fn connect_failures_say_what_happened_with_their_codes() {
        let cases = [
            (
                ConnectFailure::NoSocket,
                11,
                "hostnic-ipamd is not running (no socket at /run/test/ipamd.sock); try again later",
            ),
            (
                ConnectFailure::Refused,
                11,
                "hostnic-ipamd is not running (socket /run/test/ipamd.sock refuses connections); \
                 try again later",
            ),
            (
                ConnectFailure::TimedOut,
                11,
                "hostnic-ipamd at /run/test/ipamd.sock accepted no connection within 500 ms; \
                 try again later",
            ),
            (
                ConnectFailure::Dropped,
                11,
                "hostnic-ipamd at /run/test/ipamd.sock dropped the connection before serving it \
                 (stopping or restarting); try again later",
            ),
            (
                ConnectFailure::PermissionDenied,
                5,
                "hostnic-ipamd at /run/test/ipamd.sock: permission denied on the socket; \
                 hostnic-ipam must run as root",
            ),
            (
                ConnectFailure::Untrusted("the socket is owned by uid 1000, not root".to_owned()),
                5,
                "refusing to use /run/test/ipamd.sock: the socket is owned by uid 1000, not root",
            ),
        ];
        for command in [Command::Add, Command::Del, Command::Check, Command::Gc] {
            for (failure, code, msg) in &cases {
                let reply = connect_error_for(command, failure.clone());
                assert_eq!(reply.code, *code, "{command} {failure:?}");
                assert_eq!(reply.msg, *msg, "{command}");
                assert_eq!(reply.details, None, "{command}");
            }
        }
    }

    #[test]
    fn connect_failures_are_classified_by_errno() {
        use std::io::{Error, ErrorKind};
        let cases = [
            (ErrorKind::NotFound, ConnectFailure::NoSocket),
            (ErrorKind::NotADirectory, ConnectFailure::NoSocket),
            (ErrorKind::ConnectionRefused, ConnectFailure::Refused),
            (
                ErrorKind::PermissionDenied,
                ConnectFailure::PermissionDenied,
            ),
            (ErrorKind::TimedOut, ConnectFailure::TimedOut),
            (ErrorKind::ConnectionReset, ConnectFailure::Dropped),
            (ErrorKind::ConnectionAborted, ConnectFailure::Dropped),
            (ErrorKind::BrokenPipe, ConnectFailure::Dropped),
        ];
        for (kind, want) in cases {
            assert_eq!(ConnectFailure::from_io(&Error::from(kind)), want, "{kind}");
        }
        let other = ConnectFailure::from_io(&Error::from_raw_os_error(libc::EMFILE));
        let ConnectFailure::Other(text) = &other else {
            panic!("{other:?}");
        };
        assert!(!text.contains("Os {"), "{text}");
    }

    /// The real connect errors: the errno decides, and the OS's "No such file or directory"
    /// (which makes Podman exit 127) never reaches the message.
    #[test]
    fn real_connect_errors_are_classified_and_not_dumped() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        for (socket, want) in [
            (&missing, ConnectFailure::NoSocket),
            (&stale, ConnectFailure::Refused),
        ] {
            let failure = crate::grpc::connect(socket, CONNECT_TIMEOUT).unwrap_err();
            assert_eq!(failure, want);
            let reply = connect_error_at(socket, Command::Add, want);
            assert!(
                reply.msg.contains(socket.to_str().unwrap()),
                "{}",
                reply.msg
            );
            for dump in ["No such file", "os error", "Os {", "Errno", "Error("] {
                assert!(!reply.msg.contains(dump), "{}", reply.msg);
            }
        }
    }

    #[test]
    fn a_listener_that_is_not_root_is_untrusted() {
        let failure = ConnectFailure::Untrusted(
            "the process listening on the socket runs as uid 65534, not root".to_owned(),
        );
        let reply = connect_error_for(Command::Add, failure);
        assert_eq!(reply.code, 5);
        assert_eq!(
            reply.msg,
            "refusing to use /run/test/ipamd.sock: the process listening on the socket runs as \
             uid 65534, not root"
        );
    }

    #[test]
    fn broken_call_is_try_again_later_naming_the_command_and_cause() {
        let reply = daemon_error(
            Command::Add,
            Path::new(SOCKET),
            None,
            &CallFailure::Broken(
                "transport error: connection error: stream closed because of a broken pipe"
                    .to_owned(),
            ),
        )
        .reply("1.1.0");
        assert_eq!(reply.code, 11);
        assert_eq!(
            reply.msg,
            "hostnic-ipamd at /run/test/ipamd.sock went away during ADD: transport error: \
             connection error: stream closed because of a broken pipe; try again later"
        );
    }

    #[test]
    fn daemon_messages_are_not_prefixed_with_what_they_already_say() {
        let exhausted = "pool exhausted: no free address in 10.0.0.0/24 for network \"n\"";
        let reply = map(Command::Add, tonic::Status::resource_exhausted(exhausted)).reply("1.0.0");
        assert_eq!((reply.code, reply.msg.as_str()), (100, exhausted));
        let reply = map(Command::Add, tonic::Status::resource_exhausted("pool p1")).reply("1.0.0");
        assert_eq!(reply.msg, "address pool exhausted: pool p1");
        let held = "address 10.0.0.5 is held by default/web-1";
        let reply = map(Command::Add, tonic::Status::already_exists(held)).reply("1.0.0");
        assert_eq!((reply.code, reply.msg.as_str()), (101, held));
        let reply =
            map(Command::Add, tonic::Status::internal("corrupt record at k")).reply("1.0.0");
        assert_eq!(
            reply.msg,
            "ADD failed in hostnic-ipamd: corrupt record at k (gRPC status: Internal error)"
        );
    }

    #[test]
    fn socket_owner_rule() {
        assert_eq!(check_socket_owner(FileKind::Socket, 0), Ok(()));
        let err = check_socket_owner(FileKind::Socket, 65534).unwrap_err();
        assert!(
            err.contains("uid 65534") && err.contains("not root"),
            "{err}"
        );
        for (kind, name) in [
            (FileKind::Regular, "a regular file"),
            (FileKind::Directory, "a directory"),
            (FileKind::Fifo, "a FIFO"),
            (FileKind::Device, "a device"),
            (FileKind::Symlink, "a symbolic link"),
        ] {
            let err = check_socket_owner(kind, 0).unwrap_err();
            assert_eq!(err, format!("it is {name}, not a socket"));
        }
    }

    #[test]
    fn check_socket_accepts_a_root_socket_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        if !creates_as_root(dir.path()) {
            eprintln!("SKIPPED check_socket test: needs root to create a root-owned socket");
            return;
        }
        let socket = dir.path().join("ipamd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(check_socket(&socket), Ok(()));
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&socket, &link).unwrap();
        assert_eq!(
            check_socket(&link),
            Ok(()),
            "a link is followed, as connect follows it"
        );

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            check_socket(&file),
            Err(ConnectFailure::Untrusted(
                "it is a regular file, not a socket".to_owned()
            ))
        );
        assert_eq!(
            check_socket(dir.path()),
            Err(ConnectFailure::Untrusted(
                "it is a directory, not a socket".to_owned()
            ))
        );
        assert_eq!(
            check_socket(&dir.path().join("missing.sock")),
            Err(ConnectFailure::NoSocket)
        );
    }

    #[test]
    fn check_socket_refuses_a_socket_planted_by_another_user() {
        let dir = tempfile::tempdir().unwrap();
        if !creates_as_root(dir.path()) {
            eprintln!("SKIPPED planted-socket test: needs root to chown a socket to uid 65534");
            return;
        }
        let socket = dir.path().join("ipamd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::os::unix::fs::chown(&socket, Some(65534), Some(65534)).unwrap();
        let failure = check_socket(&socket).unwrap_err();
        let reply = connect_error_at(&socket, Command::Add, failure);
        assert_eq!(reply.code, 5);
        assert!(
            reply.msg.contains(socket.to_str().unwrap()),
            "{}",
            reply.msg
        );
        assert!(reply.msg.contains("owned by uid 65534"), "{}", reply.msg);
    }

    #[test]
    fn plugin_codes_say_what_happened_and_where() {
        let reply = map(Command::Add, tonic::Status::resource_exhausted("pool p1")).reply("1.0.0");
        assert!(reply.msg.contains("pool exhausted"), "{}", reply.msg);
        assert_eq!(
            reply.details.as_deref(),
            Some("hostnic-ipamd at /run/test/ipamd.sock")
        );
        let reply = map(Command::Add, tonic::Status::permission_denied("uid 1000")).reply("1.0.0");
        assert!(reply.msg.contains("must run as root"), "{}", reply.msg);
        let reply = map(Command::Check, tonic::Status::not_found("unknown")).reply("1.0.0");
        assert!(reply.msg.contains(CID), "{}", reply.msg);
        // An empty daemon message still says something.
        let err = map(Command::Add, tonic::Status::new(Code::Unavailable, ""));
        assert!(err.to_string().contains("unavailable"), "{err}");
    }

    #[test]
    fn ipam_result_from_reply() {
        let reply = v1::AllocateReply {
            ips: vec![
                v1::IpAllocation {
                    address: "10.0.0.5/24".to_owned(),
                    gateway: "10.0.0.1".to_owned(),
                },
                v1::IpAllocation {
                    address: "fd00::5/64".to_owned(),
                    gateway: String::new(),
                },
            ],
        };
        let result = ipam_result(reply, Vec::new(), Dns::default(), Path::new(SOCKET)).unwrap();
        assert_eq!(
            serde_json::to_value(result.reply(CniVersion::V0_4_0)).unwrap(),
            json!({"cniVersion": "0.4.0", "ips": [
                {"version": "4", "address": "10.0.0.5/24", "gateway": "10.0.0.1"},
                {"version": "6", "address": "fd00::5/64"}
            ]})
        );
    }

    #[test]
    fn bad_daemon_reply_is_internal_not_printed() {
        for ips in [
            vec![],
            vec![v1::IpAllocation {
                address: "10.0.0.5".to_owned(),
                gateway: String::new(),
            }],
            vec![v1::IpAllocation {
                address: "10.0.0.5/24".to_owned(),
                gateway: "gw".to_owned(),
            }],
        ] {
            let err = ipam_result(
                v1::AllocateReply { ips },
                Vec::new(),
                Dns::default(),
                Path::new(SOCKET),
            )
            .unwrap_err();
            assert_eq!(err.code(), 999, "{err}");
        }
    }

    #[test]
    fn error_reply_version_prefers_the_config() {
        assert_eq!(error_reply_version(br#"{"cniVersion":"0.4"}"#), "0.4.0");
        assert_eq!(error_reply_version(br#"{"cniVersion":"9.9.9"}"#), "9.9.9");
        assert_eq!(error_reply_version(br#"{"cniVersion":"abc"}"#), "1.1.0");
        assert_eq!(error_reply_version(b"{"), "1.1.0");
        assert_eq!(error_reply_version(b""), "1.1.0");
    }

    #[test]
    fn version_needs_no_config_and_no_daemon() {
        let outcome = run(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
        let Outcome::Reply(text) = outcome else {
            panic!("{outcome:?}");
        };
        let reply: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["cniVersion"], "1.0.0");
    }

    #[test]
    fn errors_are_replies_not_panics() {
        let outcome = run(&[("CNI_COMMAND", "ADD")], b"\xff\xfe");
        let Outcome::Failed(reply) = &outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(reply.code, 4);
        assert!(!outcome.is_success());
        let parsed: Value = serde_json::from_str(&outcome.stdout().unwrap()).unwrap();
        assert_eq!(parsed["code"], 4);
    }
}
