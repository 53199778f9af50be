//! The protocol's vocabulary: the commands, the spec versions, an attachment, a requested address,
//! and the rules for the identifiers the runtime passes in. Every other module of this crate
//! builds on these; this one imports nothing from the crate, so the module graph has a bottom
//! and no circle (`lib.rs` has the test that checks it).
//!
//! What can fail here fails with a plain-words reason (`String`); the module that knows where a
//! value came from (the environment variable, the config field) turns it into a [`CniError`].
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md>.
//!
//! [`CniError`]: crate::CniError

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The CNI operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach: allocate addresses.
    Add,
    /// Detach: release addresses; idempotent and best-effort.
    Del,
    /// Verify an attachment against `prevResult` (spec 0.4.0+).
    Check,
    /// Report supported spec versions.
    Version,
    /// Release everything not in `cni.dev/valid-attachments` (spec 1.1.0+).
    Gc,
    /// Report whether ADD can be served (spec 1.1.0+).
    Status,
}

impl Command {
    /// Every command, in the order the spec lists them.
    pub const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Status,
        Command::Version,
        Command::Gc,
    ];

    /// The value of `CNI_COMMAND`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// The oldest spec version that has this command, among the supported ones.
    pub const fn min_version(self) -> CniVersion {
        match self {
            Command::Add | Command::Del | Command::Version => CniVersion::V0_3_0,
            Command::Check => CniVersion::V0_4_0,
            Command::Gc | Command::Status => CniVersion::V1_1_0,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CNI spec version that this plugin implements.
///
/// Ordered, so feature checks are comparisons (`v >= CniVersion::V0_4_0`). Versions before 0.3.0
/// (the `ip4`/`ip6` result shape) are not supported. Parsing one, and refusing a command it does
/// not have, are in [`version`](crate::version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0: rich result (`interfaces`, `ips`), plugin chaining.
    V0_3_0,
    /// 0.3.1: typo fixes only.
    V0_3_1,
    /// 0.4.0: `CHECK`, `prevResult` on `DEL`.
    V0_4_0,
    /// 1.0.0: `version` removed from `ips` entries.
    V1_0_0,
    /// 1.1.0: `GC`, `STATUS`, `cniVersions`.
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first: the `supportedVersions` of the VERSION reply.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest supported version: used when the runtime does not say which one it wants.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The canonical spelling, as it appears in `cniVersion`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// `(major, minor, patch)`, which parsing compares against.
    pub(crate) const fn triple(self) -> (u64, u64, u64) {
        match self {
            CniVersion::V0_3_0 => (0, 3, 0),
            CniVersion::V0_3_1 => (0, 3, 1),
            CniVersion::V0_4_0 => (0, 4, 0),
            CniVersion::V1_0_0 => (1, 0, 0),
            CniVersion::V1_1_0 => (1, 1, 0),
        }
    }

    /// Whether a network config of this version may be run with `command`
    /// (CHECK needs 0.4.0, GC and STATUS need 1.1.0).
    pub fn supports(self, command: Command) -> bool {
        self >= command.min_version()
    }

    /// Whether `ips` entries of a result carry `"version": "4"|"6"` (dropped in 1.0.0).
    pub fn ip_has_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One attachment of a container to a network: the key a plugin stores its state under
/// (together with the network name). The JSON shape is that of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// An address a pod asks for: a bare IP, or an IP with the prefix length of its subnet.
///
/// The form of Multus' `ips` capability, the `args.cni.ips` convention and `CNI_ARGS` `IP=`;
/// its [`FromStr`] is the one grammar of an address in this project. The plugin sends the daemon
/// only [`address`](Self::address); [`parse_plain_ip`] is what the daemon reads it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestedIp {
    /// The address itself (host bits included).
    pub address: IpAddr,
    /// The prefix length, when the request gave one.
    pub prefix_len: Option<u8>,
}

impl RequestedIp {
    /// The address with its prefix, when it has one.
    pub fn to_ipnet(&self) -> Option<IpNet> {
        self.prefix_len
            .and_then(|len| IpNet::new(self.address, len).ok())
    }
}

impl FromStr for RequestedIp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('/') {
            let net: IpNet = s
                .parse()
                .map_err(|e| format!("not an IP address with prefix: {e}"))?;
            Ok(RequestedIp {
                address: net.addr(),
                prefix_len: Some(net.prefix_len()),
            })
        } else {
            let address: IpAddr = s.parse().map_err(|e| format!("not an IP address: {e}"))?;
            Ok(RequestedIp {
                address,
                prefix_len: None,
            })
        }
    }
}

impl fmt::Display for RequestedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len {
            Some(len) => write!(f, "{}/{len}", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

/// Reads an address as the plugin sends it to the daemon (`AllocateRequest.requested_ips`): a
/// plain IP address. A prefix length (`10.0.0.5/24`) is refused rather than dropped: the plugin
/// sends only the address of a `runtimeConfig.ips` CIDR, because the pool's subnet decides the
/// prefix, so a prefix here means a caller that is not this plugin and expects it to count.
pub fn parse_plain_ip(text: &str) -> Result<IpAddr, String> {
    let ip: RequestedIp = text.parse()?;
    match ip.prefix_len {
        None => Ok(ip.address),
        Some(len) => Err(format!(
            "has a prefix length (/{len}); expected a plain IP address such as {}, the pool's \
             subnet decides the prefix",
            ip.address
        )),
    }
}

/// The spec's identifier rule, `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, for container ids and network
/// names. The error says what is wrong.
fn check_identifier(s: &str) -> Result<(), String> {
    let mut bytes = s.bytes();
    match bytes.next() {
        None => return Err("must not be empty".to_owned()),
        Some(first) if !first.is_ascii_alphanumeric() => {
            return Err("must start with an ASCII letter or digit".to_owned());
        }
        Some(_) => {}
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "contains {bad:?}; only ASCII letters, digits, '_', '.' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Validates a container id (`CNI_CONTAINERID`) as the spec defines it: not empty, starting with
/// an ASCII letter or digit, followed by letters, digits, `_`, `.` or `-`. The error says what is
/// wrong. Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#parameters>.
pub fn validate_container_id(id: &str) -> Result<(), String> {
    check_identifier(id)
}

/// Validates a network name (the config's `name`) as the spec defines it: the same rule as a
/// container id. The error says what is wrong.
/// Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#configuration-format>.
pub fn validate_network_name(name: &str) -> Result<(), String> {
    check_identifier(name)
}

/// Linux's `IFNAMSIZ` minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

/// Validates an interface name (`CNI_IFNAME`) as the spec (and libcni's
/// `ValidateInterfaceName`) defines it: not empty, not `.` or `..`, at most 15 bytes, no `/`, `:`
/// or whitespace; and no control character, which the kernel would take but which would reach
/// the daemon's records, its logs and `list` raw. The error says what is wrong, with the
/// character escaped.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name == "." || name == ".." {
        return Err("must not be '.' or '..'".to_owned());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!(
            "is {} bytes long, the limit is {MAX_IFNAME_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Err(format!("must not contain {bad:?}"));
    }
    if let Some(bad) = name.chars().find(|c| c.is_control()) {
        return Err(format!("must not contain the control character {bad:?}"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    /// Container ids and network names follow one rule, the spec's regular expression.
    #[test]
    fn container_ids_and_network_names_share_the_spec_rule() {
        for ok in ["a", "0", "macvlan-conf", "pod_1.2-3", "A-b_C.d"] {
            validate_container_id(ok).unwrap();
            validate_network_name(ok).unwrap();
        }
        for bad in [
            "", "-abc", "_abc", ".abc", "a b", "a/b", "a:b", "ä", "abc\n", "a;b",
        ] {
            let as_id = validate_container_id(bad).unwrap_err();
            let as_name = validate_network_name(bad).unwrap_err();
            assert_eq!(as_id, as_name, "{bad:?}");
            assert!(!as_id.is_empty(), "{bad:?}");
        }
    }

    /// An ifname is not an identifier: it may start with `_` or contain `+`, but not `:`.
    #[test]
    fn interface_names_have_their_own_rule() {
        for name in ["_x", "eth0+"] {
            validate_ifname(name).unwrap();
            assert!(validate_container_id(name).is_err(), "{name:?}");
        }
        for name in ["1234567890123456", "a-very-long-ifname"] {
            assert!(validate_ifname(name).is_err(), "{name:?}");
            validate_container_id(name).unwrap();
        }
    }

    #[test]
    fn plain_ip_is_what_the_plugin_sends() {
        for ok in ["10.0.0.5", "fd00::5", "0.0.0.0"] {
            assert_eq!(parse_plain_ip(ok).unwrap().to_string(), ok);
        }
        // What the plugin sends for a CIDR request is its address, and that parses back.
        let requested: RequestedIp = "10.0.0.5/24".parse().unwrap();
        assert_eq!(
            parse_plain_ip(&requested.address.to_string()).unwrap(),
            requested.address
        );
    }

    #[test]
    fn plain_ip_refuses_a_prefix_and_says_so() {
        for cidr in ["10.0.0.5/24", "fd00::5/64", "10.0.0.0/32"] {
            let reason = parse_plain_ip(cidr).unwrap_err();
            assert!(reason.contains("prefix length"), "{cidr}: {reason}");
        }
        for bad in ["", "nope", "10.0.0.300", "10.0.0.5/33"] {
            assert!(parse_plain_ip(bad).is_err(), "{bad:?}");
        }
    }
}
