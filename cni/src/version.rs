//! CNI spec versions this plugin speaks: reading `cniVersion`, refusing a command the config's
//! version does not have, and the VERSION reply. The versions themselves, and what each allows,
//! are [`CniVersion`] in [`types`](crate::types).
//!
//! The runtime names the version in the network config's `cniVersion`; the plugin must answer in
//! that version's format or refuse with code 1.
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#version-considerations>
//! and <https://github.com/containernetworking/cni/blob/main/SPEC.md#version-probe-plugin-version-support>.

use std::str::FromStr;

use serde::Serialize;

use crate::error::CniError;
use crate::types::{CniVersion, Command};

impl CniVersion {
    /// [`supports`](Self::supports) as a `Result`, with the spec's code 1 when refused (as libcni's
    /// skeleton answers a CHECK against an older config).
    pub fn ensure_supports(self, command: Command) -> Result<(), CniError> {
        if self.supports(command) {
            Ok(())
        } else {
            Err(CniError::CommandNotSupported {
                command,
                version: self,
            })
        }
    }
}

impl FromStr for CniVersion {
    type Err = CniError;

    /// A malformed string is a decode failure (code 6); a well-formed version this plugin does not
    /// implement is an incompatible version (code 1). Like libcni, `1.0` means `1.0.0`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let triple = parse_triple(s)?;
        CniVersion::ALL
            .into_iter()
            .find(|v| v.triple() == triple)
            .ok_or_else(|| CniError::IncompatibleVersion {
                version: s.to_owned(),
            })
    }
}

/// `MAJOR[.MINOR[.PATCH]]`, decimal digits only, as libcni's `version.ParseVersion` reads it.
fn parse_triple(s: &str) -> Result<(u64, u64, u64), CniError> {
    let malformed = |why: &str| CniError::Decode {
        what: "cniVersion".to_owned(),
        reason: format!("{s:?} is not a version ({why}; expected MAJOR.MINOR.PATCH)"),
    };
    let mut parts = [0u64; 3];
    for (i, part) in s.split('.').enumerate() {
        let slot = parts
            .get_mut(i)
            .ok_or_else(|| malformed("too many parts"))?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("not a number"));
        }
        *slot = part.parse().map_err(|_| malformed("number too large"))?;
    }
    Ok((parts[0], parts[1], parts[2]))
}

/// The reply to `CNI_COMMAND=VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionReply {
    /// The version the runtime asked about, or [`CniVersion::LATEST`] when it did not ask.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// [`CniVersion::ALL`].
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<&'static str>,
}

/// Answers VERSION from the stdin bytes, which carry at most `{"cniVersion": "..."}`.
///
/// Empty stdin or a missing `cniVersion` gets the latest version. The requested version is echoed
/// even when unsupported (the runtime picks from `supportedVersions`), but it must be a version.
pub fn version_reply(stdin: &[u8]) -> Result<VersionReply, CniError> {
    let requested = requested_version(stdin)?;
    Ok(VersionReply {
        cni_version: requested.unwrap_or_else(|| CniVersion::LATEST.as_str().to_owned()),
        supported_versions: CniVersion::ALL.iter().map(|v| v.as_str()).collect(),
    })
}

fn requested_version(stdin: &[u8]) -> Result<Option<String>, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let decode = |reason: String| CniError::Decode {
        what: "VERSION request".to_owned(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(stdin).map_err(|e| decode(e.to_string()))?;
    let serde_json::Value::Object(object) = value else {
        return Err(decode(format!("expected a JSON object, found {value}")));
    };
    match object.get("cniVersion") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(v)) if v.is_empty() => Ok(None),
        Some(serde_json::Value::String(v)) => {
            parse_triple(v)?;
            Ok(Some(v.clone()))
        }
        Some(other) => Err(decode(format!(
            "cniVersion must be a string, found {other}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_supported_version() {
        for v in CniVersion::ALL {
            assert_eq!(v.as_str().parse::<CniVersion>().unwrap(), v);
            assert_eq!(v.to_string(), v.as_str());
        }
    }

    #[test]
    fn short_forms_mean_zero_patch_like_libcni() {
        assert_eq!("1.0".parse::<CniVersion>().unwrap(), CniVersion::V1_0_0);
        assert_eq!("0.4".parse::<CniVersion>().unwrap(), CniVersion::V0_4_0);
        assert_eq!("1".parse::<CniVersion>().unwrap(), CniVersion::V1_0_0);
    }

    #[test]
    fn well_formed_unsupported_version_is_code_1() {
        for s in ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "3"] {
            let err = s.parse::<CniVersion>().unwrap_err();
            assert!(
                matches!(&err, CniError::IncompatibleVersion { version } if version == s),
                "{s}: {err:?}"
            );
            assert_eq!(err.code(), 1);
            assert!(err.to_string().contains(s), "{err}");
            assert!(err.to_string().contains("1.1.0"), "lists supported: {err}");
        }
    }

    #[test]
    fn malformed_version_is_code_6() {
        for s in [
            "",
            "abc",
            "1.0.0.0",
            "1..0",
            "v1.0.0",
            "1.0.0-rc1",
            "+1.0.0",
            " 1.0.0",
        ] {
            let err = s.parse::<CniVersion>().unwrap_err();
            assert!(matches!(err, CniError::Decode { .. }), "{s:?}: {err:?}");
            assert_eq!(err.code(), 6);
        }
    }

    #[test]
    fn versions_are_ordered() {
        assert!(CniVersion::V0_3_0 < CniVersion::V0_3_1);
        assert!(CniVersion::V0_3_1 < CniVersion::V0_4_0);
        assert!(CniVersion::V0_4_0 < CniVersion::V1_0_0);
        assert!(CniVersion::V1_0_0 < CniVersion::V1_1_0);
        assert_eq!(CniVersion::LATEST, *CniVersion::ALL.last().unwrap());
    }

    #[test]
    fn features_per_version() {
        use CniVersion::*;
        let check: Vec<_> = CniVersion::ALL
            .into_iter()
            .filter(|v| v.supports(Command::Check))
            .collect();
        assert_eq!(check, [V0_4_0, V1_0_0, V1_1_0]);
        for cmd in [Command::Gc, Command::Status] {
            let ok: Vec<_> = CniVersion::ALL
                .into_iter()
                .filter(|v| v.supports(cmd))
                .collect();
            assert_eq!(ok, [V1_1_0], "{cmd}");
        }
        for cmd in [Command::Add, Command::Del, Command::Version] {
            assert!(
                CniVersion::ALL.into_iter().all(|v| v.supports(cmd)),
                "{cmd}"
            );
        }
        let with_version: Vec<_> = CniVersion::ALL
            .into_iter()
            .filter(|v| v.ip_has_version_field())
            .collect();
        assert_eq!(with_version, [V0_3_0, V0_3_1, V0_4_0]);
    }

    #[test]
    fn command_too_new_for_config_is_code_1() {
        let err = CniVersion::V0_3_1
            .ensure_supports(Command::Check)
            .unwrap_err();
        assert_eq!(err.code(), 1);
        assert_eq!(
            err.to_string(),
            "CHECK needs cniVersion 0.4.0 or later, the network config has 0.3.1"
        );
        let err = CniVersion::V1_0_0.ensure_supports(Command::Gc).unwrap_err();
        assert_eq!(err.code(), 1);
        assert!(err.to_string().contains("1.1.0"), "{err}");
        CniVersion::V1_1_0.ensure_supports(Command::Status).unwrap();
    }

    #[test]
    fn version_reply_echoes_the_request() {
        let reply = version_reply(br#"{"cniVersion":"0.4.0"}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&reply).unwrap(),
            json!({
                "cniVersion": "0.4.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            })
        );
        // An unsupported but well-formed request is still answered: the runtime chooses.
        let reply = version_reply(br#"{"cniVersion":"0.2.0"}"#).unwrap();
        assert_eq!(reply.cni_version, "0.2.0");
    }

    #[test]
    fn version_reply_defaults_to_latest() {
        for stdin in [
            &b""[..],
            b"  \n",
            b"{}",
            br#"{"cniVersion":""}"#,
            br#"{"cniVersion":null}"#,
        ] {
            let reply = version_reply(stdin).unwrap();
            assert_eq!(
                reply.cni_version,
                "1.1.0",
                "{:?}",
                String::from_utf8_lossy(stdin)
            );
        }
    }

    #[test]
    fn version_reply_rejects_garbage_with_code_6() {
        for stdin in [
            &b"{"[..],
            b"[]",
            br#"{"cniVersion":1}"#,
            br#"{"cniVersion":"one"}"#,
        ] {
            let err = version_reply(stdin).unwrap_err();
            assert_eq!(err.code(), 6, "{:?}: {err}", String::from_utf8_lossy(stdin));
        }
    }
}
