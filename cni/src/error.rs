//! The one error type of the CNI side, and its mapping to the spec's error object.
//!
//! Every failure the plugin can report is a [`CniError`] variant that names what failed (the
//! variable, the field, the value). [`CniError::code`] is the only place that knows the numeric
//! codes; [`CniError::reply`] renders the object the plugin prints on stdout before exiting
//! non-zero. Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#error>.

use std::path::PathBuf;

use serde::Serialize;

use crate::types::{CniVersion, Command};

/// Everything that can go wrong between exec and reply.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// Code 1: the network config's `cniVersion` is well formed but not implemented here.
    #[error(
        "cniVersion {version:?} is not supported (supported: {})",
        supported_versions()
    )]
    IncompatibleVersion {
        /// The version as the config spelled it.
        version: String,
    },

    /// Code 1: the command exists only in a newer spec than the config's `cniVersion`
    /// (CHECK before 0.4.0, GC and STATUS before 1.1.0).
    #[error("{command} needs cniVersion {} or later, the network config has {version}", command.min_version())]
    CommandNotSupported {
        /// The command that was asked for.
        command: Command,
        /// The config's version.
        version: CniVersion,
    },

    /// Code 2: a config field this plugin knows but will not honour. The spec requires the
    /// message to contain the key and the value.
    #[error("unsupported field in network config: {field} = {value}")]
    UnsupportedField {
        /// JSON path of the field, e.g. `ipam.dataDir`.
        field: String,
        /// The value as JSON.
        value: String,
    },

    /// Code 3: the container is unknown. The spec says this tells the runtime it need not clean up
    /// (no DEL), so use it only when there is truly nothing to release.
    #[error("container {container_id:?} is unknown: {reason}")]
    ContainerUnknown {
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// Who does not know it and how they said so, e.g. the daemon's message.
        reason: String,
    },

    /// Code 4: required environment variables are missing (or empty) for the command.
    #[error("missing required environment variable(s): {}", vars.join(", "))]
    MissingEnv {
        /// Every missing variable, in the spec's order.
        vars: Vec<&'static str>,
    },

    /// Code 4: an environment variable is present but its value is not acceptable.
    #[error("invalid environment variable {var}={value:?}: {reason}")]
    InvalidEnv {
        /// The variable, e.g. `CNI_IFNAME`.
        var: &'static str,
        /// The offending value (for `CNI_ARGS`, the offending pair).
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Code 5: reading or writing failed (stdin, a file the config names). The cause is kept.
    #[error("I/O error: {what}")]
    Io {
        /// What was being done, e.g. `read resolvConf /etc/resolv.conf`.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Code 5: a file the network config names cannot be used: missing, unreadable, not a
    /// regular file, too large or not text. The reason is plain words, not the OS's text:
    /// "No such file or directory" in a message makes Podman report a missing command.
    #[error("cannot read {field} {}: {reason}", path.display())]
    UnreadableFile {
        /// JSON path of the field naming the file, e.g. `ipam.resolvConf`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Code 6: bytes or a string could not be decoded (malformed JSON, a malformed version).
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded, e.g. `network config`.
        what: String,
        /// The decoder's message.
        reason: String,
    },

    /// Code 7: a field the network config must have is absent.
    #[error("invalid network config: missing required field {field}")]
    MissingConfig {
        /// JSON path of the field, e.g. `ipam.type`.
        field: String,
    },

    /// Code 7: a network config field has a value this plugin cannot accept.
    #[error("invalid network config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// JSON path of the field, e.g. `ipam.routes[0].dst`.
        field: String,
        /// The value as JSON.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Code 7: whoever validates the rest of the config (the node daemon validates pools and
    /// requested addresses) refused the request; `reason` is their message, which names the
    /// field or address.
    #[error("{by} rejected the request as invalid: {reason}")]
    Rejected {
        /// Who refused, e.g. `hostnic-ipamd at /run/hostnic/ipamd.sock`.
        by: String,
        /// Their message.
        reason: String,
    },

    /// Code 5: the plugin may not use the daemon's socket: the socket refused it (`EACCES`) or
    /// the daemon refused its credentials. Both mean the plugin is not running as root, which
    /// retrying cannot fix, so this is not code 11; it is the spec's I/O failure rather than 999
    /// because nothing is broken but the way the plugin was started.
    #[error("{what}: {reason}; hostnic-ipam must run as root")]
    NotRoot {
        /// Who refused, e.g. `hostnic-ipamd at /run/hostnic/ipamd.sock`.
        what: String,
        /// How, e.g. the daemon's message.
        reason: String,
    },

    /// Code 5: the file at the daemon's socket path is not one the plugin may send a pod's
    /// details to (not a socket, or not owned by root: another user may have planted it).
    /// Not transient: someone has to look at the file.
    #[error("refusing to use {}: {reason}", socket.display())]
    UntrustedSocket {
        /// The socket path.
        socket: PathBuf,
        /// What is wrong with the file, naming its owner or kind.
        reason: String,
    },

    /// Code 11: a transient condition (the node daemon is not running or restarting, etcd has
    /// no leader); the runtime should retry the same request later.
    #[error("{message}; try again later")]
    TryAgainLater {
        /// What happened, naming the daemon's socket, e.g.
        /// `hostnic-ipamd is not running (no socket at /run/hostnic/ipamd.sock)`.
        message: String,
    },

    /// Code 50: the reply to STATUS when the plugin cannot serve ADD right now.
    #[error("plugin not available: {reason}")]
    Unavailable {
        /// Why, e.g. the daemon's socket is missing.
        reason: String,
    },

    /// A plugin-specific error with a code of 100 or more (the spec reserves 0-99): this plugin
    /// uses [`CODE_POOL_EXHAUSTED`] (100), [`CODE_ADDRESS_HELD`] (101) and
    /// [`CODE_CHECK_MISMATCH`] (102), as the README's table lists them. A code below 100 is a
    /// programming error and is reported as 999.
    #[error("{msg}")]
    Plugin {
        /// The code, 100 or more.
        code: u32,
        /// Short characterization.
        msg: String,
        /// Longer description, if any.
        details: Option<String>,
    },

    /// Code 999: a bug or an impossible state; libcni uses 999 for internal errors.
    #[error("internal error: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

fn supported_versions() -> String {
    CniVersion::ALL.map(CniVersion::as_str).join(", ")
}

/// Code 100: no free address in the network's pools (the daemon's `ResourceExhausted`).
pub const CODE_POOL_EXHAUSTED: u32 = 100;
/// Code 101: a requested address is held by another pod, which the message names (the daemon's
/// `AlreadyExists`).
pub const CODE_ADDRESS_HELD: u32 = 101;
/// Code 102: CHECK found that the attachment does not match `prevResult` (the daemon's
/// `FailedPrecondition`).
pub const CODE_CHECK_MISMATCH: u32 = 102;

/// Code libcni uses for internal errors, and ours for a malformed [`CniError::Plugin`].
const CODE_INTERNAL: u32 = 999;

impl CniError {
    /// The spec's numeric code for this error.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } | CniError::CommandNotSupported { .. } => 1,
            CniError::UnsupportedField { .. } => 2,
            CniError::ContainerUnknown { .. } => 3,
            CniError::MissingEnv { .. } | CniError::InvalidEnv { .. } => 4,
            CniError::Io { .. }
            | CniError::UnreadableFile { .. }
            | CniError::NotRoot { .. }
            | CniError::UntrustedSocket { .. } => 5,
            CniError::Decode { .. } => 6,
            CniError::MissingConfig { .. }
            | CniError::InvalidConfig { .. }
            | CniError::Rejected { .. } => 7,
            CniError::TryAgainLater { .. } => 11,
            CniError::Unavailable { .. } => 50,
            CniError::Plugin { code, .. } if *code >= 100 => *code,
            CniError::Plugin { .. } | CniError::Internal { .. } => CODE_INTERNAL,
        }
    }

    /// The error object to print on stdout. `cni_version` is the config's version when it was
    /// read, otherwise the requested string or [`CniVersion::LATEST`].
    ///
    /// `msg` is the full one-line message (it names the variable, field or value); `details`
    /// carries the underlying cause, or a plugin error's own details.
    pub fn reply(&self, cni_version: &str) -> ErrorReply {
        let details = match self {
            CniError::Plugin { details, .. } => details.clone(),
            _ => causes_not_in_message(self),
        };
        ErrorReply {
            cni_version: cni_version.to_owned(),
            code: self.code(),
            msg: self.to_string(),
            details,
        }
    }
}

/// The part of [`error_chain`] after `err`'s own message: its causes, or none when the message
/// already shows them all.
fn causes_not_in_message(err: &CniError) -> Option<String> {
    let message = err.to_string();
    let chain = error_chain(err);
    let causes = chain.strip_prefix(&message).unwrap_or(&chain);
    let causes = causes.strip_prefix(": ").unwrap_or(causes);
    (!causes.is_empty()).then(|| causes.to_owned())
}

/// `text`, then each cause from `source` on, `: `-separated and each shown once: a cause whose
/// text is already shown (wrappers often repeat their source's text) or is empty is skipped.
///
/// The one formatter of a cause chain in this crate: it gives an error reply its `details`, and
/// the plugin its words for an I/O, transport or broken-call failure.
pub fn with_causes(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `err`'s message and its causes, as [`with_causes`] shows them.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    with_causes(err.to_string(), err.source())
}

/// The spec's error object: `{"cniVersion", "code", "msg", "details"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorReply {
    /// Version of the reply format.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// [`CniError::code`].
    pub code: u32,
    /// Short characterization.
    pub msg: String,
    /// Longer description; omitted when there is nothing to add (as libcni does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &str) -> String {
        v.to_owned()
    }

    /// One of each variant with the code the spec assigns it.
    fn every_variant() -> Vec<(CniError, u32)> {
        vec![
            (
                CniError::IncompatibleVersion {
                    version: s("0.2.0"),
                },
                1,
            ),
            (
                CniError::CommandNotSupported {
                    command: Command::Check,
                    version: CniVersion::V0_3_1,
                },
                1,
            ),
            (
                CniError::UnsupportedField {
                    field: s("ipam.dataDir"),
                    value: s("\"/var/lib\""),
                },
                2,
            ),
            (
                CniError::ContainerUnknown {
                    container_id: s("abc"),
                    reason: s("no such attachment"),
                },
                3,
            ),
            (
                CniError::MissingEnv {
                    vars: vec!["CNI_IFNAME"],
                },
                4,
            ),
            (
                CniError::InvalidEnv {
                    var: "CNI_IFNAME",
                    value: s("a/b"),
                    reason: s("contains '/'"),
                },
                4,
            ),
            (
                CniError::Io {
                    what: s("read stdin"),
                    source: std::io::Error::other("broken pipe"),
                },
                5,
            ),
            (
                CniError::Decode {
                    what: s("network config"),
                    reason: s("EOF"),
                },
                6,
            ),
            (CniError::MissingConfig { field: s("name") }, 7),
            (
                CniError::InvalidConfig {
                    field: s("ipam.routes[0].dst"),
                    value: s("\"x\""),
                    reason: s("not a CIDR"),
                },
                7,
            ),
            (
                CniError::Rejected {
                    by: s("hostnic-ipamd"),
                    reason: s("ipam.subnet: not a CIDR"),
                },
                7,
            ),
            (
                CniError::NotRoot {
                    what: s("hostnic-ipamd at /run/hostnic/ipamd.sock"),
                    reason: s("caller uid 1000 is not root"),
                },
                5,
            ),
            (
                CniError::UnreadableFile {
                    field: "ipam.resolvConf",
                    path: PathBuf::from("/dev/zero"),
                    reason: s("it is a device, not a regular file"),
                },
                5,
            ),
            (
                CniError::UntrustedSocket {
                    socket: PathBuf::from("/run/hostnic/ipamd.sock"),
                    reason: s("owned by uid 1000, not root"),
                },
                5,
            ),
            (
                CniError::TryAgainLater {
                    message: s("hostnic-ipamd is not running (no socket at /x.sock)"),
                },
                11,
            ),
            (
                CniError::Unavailable {
                    reason: s("no socket"),
                },
                50,
            ),
            (
                CniError::Plugin {
                    code: CODE_POOL_EXHAUSTED,
                    msg: s("pool exhausted: no free address in 10.0.0.0/24"),
                    details: None,
                },
                100,
            ),
            (
                CniError::Plugin {
                    code: CODE_ADDRESS_HELD,
                    msg: s("address 10.0.0.5 is held by default/web-1"),
                    details: None,
                },
                101,
            ),
            (
                CniError::Plugin {
                    code: CODE_CHECK_MISMATCH,
                    msg: s("CHECK: the attachment does not match: 10.0.0.6 is not held"),
                    details: None,
                },
                102,
            ),
            (CniError::Internal { reason: s("bug") }, 999),
        ]
    }

    #[test]
    fn every_variant_has_its_spec_code() {
        for (err, code) in every_variant() {
            assert_eq!(err.code(), code, "{err:?}");
            assert_eq!(err.reply("1.0.0").code, code, "{err:?}");
        }
    }

    #[test]
    fn plugin_codes_below_100_are_reported_as_internal() {
        let err = CniError::Plugin {
            code: 7,
            msg: s("reserved range"),
            details: None,
        };
        assert_eq!(err.code(), 999);
    }

    #[test]
    fn reply_renders_the_spec_error_object() {
        let err = CniError::MissingEnv {
            vars: vec!["CNI_CONTAINERID", "CNI_NETNS"],
        };
        assert_eq!(
            serde_json::to_value(err.reply("1.1.0")).unwrap(),
            json!({
                "cniVersion": "1.1.0",
                "code": 4,
                "msg": "missing required environment variable(s): CNI_CONTAINERID, CNI_NETNS"
            })
        );
    }

    #[test]
    fn reply_details_carry_the_cause() {
        let err = CniError::Io {
            what: s("read the network config from stdin"),
            source: std::io::Error::other("broken pipe"),
        };
        let reply = err.reply("0.4.0");
        assert_eq!(reply.code, 5);
        assert_eq!(reply.msg, "I/O error: read the network config from stdin");
        assert_eq!(reply.details.as_deref(), Some("broken pipe"));

        let err = CniError::Plugin {
            code: CODE_ADDRESS_HELD,
            msg: s("requested address 10.0.0.5 is held by default/web-1"),
            details: Some(s("pool 10.0.0.0/24")),
        };
        assert_eq!(
            serde_json::to_value(err.reply("0.3.1")).unwrap(),
            json!({
                "cniVersion": "0.3.1",
                "code": 101,
                "msg": "requested address 10.0.0.5 is held by default/web-1",
                "details": "pool 10.0.0.0/24"
            })
        );
    }

    #[test]
    fn messages_name_the_problem() {
        let err = CniError::InvalidEnv {
            var: "CNI_IFNAME",
            value: s("a/b"),
            reason: s("must not contain '/'"),
        };
        assert_eq!(
            err.to_string(),
            "invalid environment variable CNI_IFNAME=\"a/b\": must not contain '/'"
        );
        let err = CniError::InvalidConfig {
            field: s("ipam.routes[1].dst"),
            value: s("\"10.0.0.0/33\""),
            reason: s("invalid IP address syntax"),
        };
        assert_eq!(
            err.to_string(),
            "invalid network config: ipam.routes[1].dst = \"10.0.0.0/33\": invalid IP address syntax"
        );
        let err = CniError::UnsupportedField {
            field: s("ipam.dataDir"),
            value: s("\"/var/lib/cni\""),
        };
        assert!(err.to_string().contains("ipam.dataDir = \"/var/lib/cni\""));
        let err = CniError::IncompatibleVersion {
            version: s("0.2.0"),
        };
        assert_eq!(
            err.to_string(),
            "cniVersion \"0.2.0\" is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)"
        );
        let err = CniError::TryAgainLater {
            message: s("hostnic-ipamd is not running (no socket at /run/hostnic/ipamd.sock)"),
        };
        assert_eq!(
            err.to_string(),
            "hostnic-ipamd is not running (no socket at /run/hostnic/ipamd.sock); try again later"
        );
    }

    /// An error and its causes, for the chain formatter.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    fn layers(texts: &[&'static str]) -> Layer {
        let (last, rest) = texts.split_last().unwrap();
        rest.iter().rev().fold(Layer(last, None), |inner, text| {
            Layer(text, Some(Box::new(inner)))
        })
    }

    #[test]
    fn a_chain_shows_each_cause_once() {
        let err = layers(&[
            "transport error",
            "transport error",
            "connection error",
            "",
            "connection error",
            "broken pipe",
        ]);
        assert_eq!(
            error_chain(&err),
            "transport error: connection error: broken pipe"
        );
        assert_eq!(
            with_causes("call failed".to_owned(), err.1.as_deref().map(|l| l as _)),
            "call failed: transport error: connection error: broken pipe"
        );
        assert_eq!(with_causes(String::new(), Some(&err)), error_chain(&err));
    }

    /// `details` is the chain after the message: what the message already says is not repeated,
    /// and an error whose message says it all has no details.
    #[test]
    fn reply_details_are_the_causes_the_message_does_not_show() {
        let err = CniError::Io {
            what: s("read stdin"),
            source: std::io::Error::other(layers(&["read stdin", "broken pipe"])),
        };
        assert_eq!(err.reply("1.0.0").details.as_deref(), Some("broken pipe"));
        let err = CniError::Io {
            what: s("read stdin: broken pipe"),
            source: std::io::Error::other("broken pipe"),
        };
        assert_eq!(err.reply("1.0.0").details, None);
        let err = CniError::Internal { reason: s("bug") };
        assert_eq!(err.reply("1.0.0").details, None);
    }
}
