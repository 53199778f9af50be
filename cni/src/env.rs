//! The execution parameters: the `CNI_*` environment variables, read from a list of pairs so that
//! nothing here touches the process environment.
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#parameters> and, per
//! command, the "Required environment parameters" of
//! <https://github.com/containernetworking/cni/blob/main/SPEC.md#cni-operations>.
//! `CNI_ARGS` keys: <https://github.com/containernetworking/cni/blob/main/CONVENTIONS.md#cni_args>.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::CniError;
use crate::types::{validate_container_id, validate_ifname, Attachment, Command, RequestedIp};

/// `CNI_COMMAND`: the operation.
pub const CNI_COMMAND: &str = "CNI_COMMAND";
/// `CNI_CONTAINERID`: the container (attachment) id.
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
/// `CNI_NETNS`: path of the container's network namespace.
pub const CNI_NETNS: &str = "CNI_NETNS";
/// `CNI_IFNAME`: interface name inside the container.
pub const CNI_IFNAME: &str = "CNI_IFNAME";
/// `CNI_ARGS`: extra `KEY=VALUE;KEY=VALUE` arguments.
pub const CNI_ARGS: &str = "CNI_ARGS";
/// `CNI_PATH`: `:`-separated directories holding plugin executables.
pub const CNI_PATH: &str = "CNI_PATH";

// What the environment must carry for each command: the spec ties it to the command.
impl Command {
    /// The spec's "Required environment parameters" besides `CNI_COMMAND`.
    const fn required_env(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &[CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME],
            Command::Del => &[CNI_CONTAINERID, CNI_IFNAME],
            Command::Gc => &[CNI_PATH],
            Command::Version | Command::Status => &[],
        }
    }

    /// Whether the command concerns one attachment (container id + ifname).
    const fn has_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl FromStr for Command {
    type Err = CniError;

    /// Exact, upper-case match; anything else is code 4 naming `CNI_COMMAND`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Command::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| CniError::InvalidEnv {
                var: CNI_COMMAND,
                value: s.to_owned(),
                reason: format!(
                    "unknown command, expected one of {}",
                    Command::ALL.map(Command::as_str).join(", ")
                ),
            })
    }
}

/// Everything the environment says about this execution, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` and `CNI_IFNAME`, both validated. Always `Some` for ADD, DEL and CHECK
    /// (the spec requires them); `None` for VERSION, GC and STATUS, which concern no container.
    pub attachment: Option<Attachment>,
    /// `CNI_NETNS`. Always `Some` for ADD and CHECK; optional for DEL (the namespace may be
    /// gone); `None` for the other commands.
    pub netns: Option<PathBuf>,
    /// `CNI_PATH`, split on `:`, empty entries dropped. Required (non-empty) for GC only.
    pub path: Vec<PathBuf>,
    /// `CNI_ARGS` for ADD, DEL and CHECK; empty for the other commands.
    pub args: CniArgs,
}

impl Invocation {
    /// Reads the execution parameters from `(name, value)` pairs, e.g. `std::env::vars_os()`
    /// (which, unlike `vars()`, does not panic on a non-UTF-8 variable elsewhere in the
    /// environment). Variables other than `CNI_*` are ignored; an empty value counts as missing,
    /// as in libcni.
    ///
    /// Errors are code 4: a missing `CNI_COMMAND`, an unknown command, every missing variable the
    /// spec requires for the command, an invalid container id or interface name, or a malformed
    /// `CNI_ARGS`.
    pub fn from_env<I, K, V>(vars: I) -> Result<Self, CniError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let env = RawEnv::collect(vars)?;
        let command: Command = env
            .command
            .as_deref()
            .ok_or_else(|| CniError::MissingEnv {
                vars: vec![CNI_COMMAND],
            })?
            .parse()?;

        let missing: Vec<&'static str> = command
            .required_env()
            .iter()
            .copied()
            .filter(|var| env.get(var).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::MissingEnv { vars: missing });
        }

        let path = env
            .path
            .as_deref()
            .map(|p| {
                p.split(':')
                    .filter(|dir| !dir.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();

        if !command.has_attachment() {
            return Ok(Invocation {
                command,
                attachment: None,
                netns: None,
                path,
                args: CniArgs::default(),
            });
        }

        let (Some(container_id), Some(ifname)) = (env.container_id, env.ifname) else {
            return Err(CniError::Internal {
                reason: format!(
                    "{command} passed the required-variable check without an attachment"
                ),
            });
        };
        validate_container_id(&container_id).map_err(|reason| CniError::InvalidEnv {
            var: CNI_CONTAINERID,
            value: container_id.clone(),
            reason,
        })?;
        validate_ifname(&ifname).map_err(|reason| CniError::InvalidEnv {
            var: CNI_IFNAME,
            value: ifname.clone(),
            reason,
        })?;
        let args = env.args.as_deref().map(CniArgs::parse).transpose()?;

        Ok(Invocation {
            command,
            attachment: Some(Attachment {
                container_id,
                ifname,
            }),
            netns: env.netns.map(PathBuf::from),
            path,
            args: args.unwrap_or_default(),
        })
    }
}

/// The `CNI_*` variables present and non-empty.
#[derive(Debug, Default)]
struct RawEnv {
    command: Option<String>,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    args: Option<String>,
    path: Option<String>,
}

impl RawEnv {
    fn collect<I, K, V>(vars: I) -> Result<Self, CniError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut env = RawEnv::default();
        for (key, value) in vars {
            let Some(key) = key.as_ref().to_str() else {
                continue;
            };
            let (var, slot) = match key {
                CNI_COMMAND => (CNI_COMMAND, &mut env.command),
                CNI_CONTAINERID => (CNI_CONTAINERID, &mut env.container_id),
                CNI_NETNS => (CNI_NETNS, &mut env.netns),
                CNI_IFNAME => (CNI_IFNAME, &mut env.ifname),
                CNI_ARGS => (CNI_ARGS, &mut env.args),
                CNI_PATH => (CNI_PATH, &mut env.path),
                _ => continue,
            };
            let value = value.as_ref();
            let value = value.to_str().ok_or_else(|| CniError::InvalidEnv {
                var,
                value: value.to_string_lossy().into_owned(),
                reason: "not valid UTF-8".to_owned(),
            })?;
            *slot = (!value.is_empty()).then(|| value.to_owned());
        }
        Ok(env)
    }

    fn get(&self, var: &str) -> Option<&str> {
        match var {
            CNI_COMMAND => self.command.as_deref(),
            CNI_CONTAINERID => self.container_id.as_deref(),
            CNI_NETNS => self.netns.as_deref(),
            CNI_IFNAME => self.ifname.as_deref(),
            CNI_ARGS => self.args.as_deref(),
            CNI_PATH => self.path.as_deref(),
            _ => None,
        }
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`, with the keys Kubernetes runtimes send.
///
/// Unknown keys are kept in [`other`](Self::other) whatever `IgnoreUnknown` says: runtimes add
/// keys over time, and an IPAM plugin that refused them would break pods for no gain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`.
    pub pod_infra_container_id: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
    /// `IP`, unparsed: see [`ips`](Self::ips). Kept raw so that DEL, which does not use it, is not
    /// refused because of it.
    pub ip: Option<String>,
    /// `IgnoreUnknown` (`1`, `true` or `True`, as libcni reads it).
    pub ignore_unknown: bool,
    /// Every other pair, in order.
    pub other: Vec<(String, String)>,
}

impl CniArgs {
    /// Splits `KEY=VALUE;KEY=VALUE`. Empty segments (a trailing `;`) are skipped; a segment
    /// without `=` or with an empty key is code 4. A value may contain `=`; the last of repeated
    /// keys wins. Empty values count as absent.
    ///
    /// A control character anywhere is code 4 naming the pair: no runtime sends one (pod names
    /// and namespaces are DNS labels), and the pod's name and namespace go into the daemon's
    /// records, logs and `list` output, where a newline would forge a line.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            if let Some(bad) = pair.chars().find(|c| c.is_control()) {
                return Err(CniError::InvalidEnv {
                    var: CNI_ARGS,
                    value: pair.to_owned(),
                    reason: format!("contains the control character {bad:?}"),
                });
            }
            let (key, value) = match pair.split_once('=') {
                Some((key, value)) if !key.is_empty() => (key, value),
                _ => {
                    return Err(CniError::InvalidEnv {
                        var: CNI_ARGS,
                        value: pair.to_owned(),
                        reason: "expected KEY=VALUE pairs separated by ';'".to_owned(),
                    });
                }
            };
            let value = (!value.is_empty()).then(|| value.to_owned());
            match key {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value,
                "K8S_POD_NAME" => args.pod_name = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.pod_infra_container_id = value,
                "K8S_POD_UID" => args.pod_uid = value,
                "IP" => args.ip = value,
                "IgnoreUnknown" => {
                    args.ignore_unknown = matches!(value.as_deref(), Some("1" | "true" | "True"));
                }
                _ => args.other.push((key.to_owned(), value.unwrap_or_default())),
            }
        }
        Ok(args)
    }

    /// The addresses requested by `IP=` (comma-separated, each an address or address/prefix).
    /// Code 4 naming the entry when one does not parse.
    pub fn ips(&self) -> Result<Vec<RequestedIp>, CniError> {
        let Some(raw) = self.ip.as_deref() else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry.parse().map_err(|reason| CniError::InvalidEnv {
                    var: CNI_ARGS,
                    value: format!("IP={raw}"),
                    reason: format!("{entry:?}: {reason}"),
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    const CID: &str = "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755";

    fn add_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("PATH", "/usr/bin"),
            (CNI_COMMAND, "ADD"),
            (CNI_CONTAINERID, CID),
            (CNI_NETNS, "/var/run/netns/cni-1234"),
            (CNI_IFNAME, "net1"),
            (CNI_PATH, "/opt/cni/bin::/usr/libexec/cni"),
            (
                CNI_ARGS,
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                 K8S_POD_INFRA_CONTAINER_ID=3f6940ab;K8S_POD_UID=9b2c5e4e-1f0a-4c8e-9d55-0e1f2a3b4c5d",
            ),
        ]
    }

    /// `env` with `key` set to `value` (replacing any earlier value).
    fn with(
        env: &[(&'static str, &'static str)],
        key: &'static str,
        value: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut env: Vec<_> = env.iter().copied().filter(|(k, _)| *k != key).collect();
        env.push((key, value));
        env
    }

    fn without(
        env: &[(&'static str, &'static str)],
        keys: &[&str],
    ) -> Vec<(&'static str, &'static str)> {
        env.iter()
            .copied()
            .filter(|(k, _)| !keys.contains(k))
            .collect()
    }

    fn missing_vars(err: CniError) -> Vec<&'static str> {
        assert_eq!(err.code(), 4);
        match err {
            CniError::MissingEnv { vars } => vars,
            other => panic!("expected MissingEnv, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_kubelet_add() {
        let inv = Invocation::from_env(add_env()).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(
            inv.attachment,
            Some(Attachment {
                container_id: CID.to_owned(),
                ifname: "net1".to_owned()
            })
        );
        assert_eq!(inv.netns, Some(PathBuf::from("/var/run/netns/cni-1234")));
        assert_eq!(
            inv.path,
            [
                PathBuf::from("/opt/cni/bin"),
                PathBuf::from("/usr/libexec/cni")
            ]
        );
        assert_eq!(inv.args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(inv.args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(inv.args.pod_infra_container_id.as_deref(), Some("3f6940ab"));
        assert_eq!(
            inv.args.pod_uid.as_deref(),
            Some("9b2c5e4e-1f0a-4c8e-9d55-0e1f2a3b4c5d")
        );
        assert!(inv.args.ignore_unknown);
    }

    #[test]
    fn every_command_is_recognised() {
        for cmd in Command::ALL {
            assert_eq!(cmd.as_str().parse::<Command>().unwrap(), cmd);
        }
    }

    #[test]
    fn missing_command_is_code_4() {
        let err = Invocation::from_env(without(&add_env(), &[CNI_COMMAND])).unwrap_err();
        assert_eq!(missing_vars(err), [CNI_COMMAND]);
        let err = Invocation::from_env(with(&add_env(), CNI_COMMAND, "")).unwrap_err();
        assert_eq!(missing_vars(err), [CNI_COMMAND]);
    }

    #[test]
    fn unknown_command_is_code_4_naming_it() {
        for value in ["add", "GET", "INIT", "DELETE"] {
            let err = Invocation::from_env(with(&add_env(), CNI_COMMAND, value)).unwrap_err();
            assert_eq!(err.code(), 4, "{value}");
            assert!(
                matches!(&err, CniError::InvalidEnv { var: CNI_COMMAND, value: v, .. } if v == value),
                "{err:?}"
            );
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn add_and_check_require_containerid_netns_ifname() {
        for cmd in ["ADD", "CHECK"] {
            let env = with(&add_env(), CNI_COMMAND, cmd);
            for var in [CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME] {
                let err = Invocation::from_env(without(&env, &[var])).unwrap_err();
                let msg = err.to_string();
                assert_eq!(missing_vars(err), [var], "{cmd}");
                assert!(msg.contains(var), "{msg}");
                // Empty is missing, as in libcni.
                let err = Invocation::from_env(with(&env, var, "")).unwrap_err();
                assert_eq!(missing_vars(err), [var], "{cmd}");
            }
            let err =
                Invocation::from_env(without(&env, &[CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME]))
                    .unwrap_err();
            assert_eq!(missing_vars(err), [CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME]);
            // CNI_PATH and CNI_ARGS are optional.
            let inv = Invocation::from_env(without(&env, &[CNI_PATH, CNI_ARGS])).unwrap();
            assert!(inv.path.is_empty());
            assert_eq!(inv.args, CniArgs::default());
        }
    }

    #[test]
    fn del_requires_containerid_ifname_but_not_netns() {
        let env = with(&add_env(), CNI_COMMAND, "DEL");
        let inv = Invocation::from_env(without(&env, &[CNI_NETNS, CNI_PATH])).unwrap();
        assert_eq!(inv.command, Command::Del);
        assert_eq!(inv.netns, None);
        assert!(inv.attachment.is_some());
        // Present netns is kept.
        assert!(Invocation::from_env(env.clone()).unwrap().netns.is_some());
        for var in [CNI_CONTAINERID, CNI_IFNAME] {
            let err = Invocation::from_env(without(&env, &[var])).unwrap_err();
            assert_eq!(missing_vars(err), [var]);
        }
    }

    #[test]
    fn version_and_status_require_nothing_else() {
        for cmd in ["VERSION", "STATUS"] {
            let inv = Invocation::from_env([(CNI_COMMAND, cmd)]).unwrap();
            assert_eq!(inv.attachment, None);
            assert_eq!(inv.netns, None);
            assert!(inv.path.is_empty());
        }
    }

    #[test]
    fn gc_requires_cni_path_only() {
        let err = Invocation::from_env([(CNI_COMMAND, "GC")]).unwrap_err();
        assert_eq!(missing_vars(err), [CNI_PATH]);
        let inv = Invocation::from_env([(CNI_COMMAND, "GC"), (CNI_PATH, "/opt/cni/bin")]).unwrap();
        assert_eq!(inv.command, Command::Gc);
        assert_eq!(inv.path, [PathBuf::from("/opt/cni/bin")]);
        assert_eq!(inv.attachment, None);
    }

    #[test]
    fn commands_without_a_container_ignore_its_variables() {
        // A leftover bad container id or CNI_ARGS does not break VERSION, STATUS or GC.
        let env = with(
            &with(&add_env(), CNI_CONTAINERID, "-bad"),
            CNI_ARGS,
            "garbage",
        );
        for cmd in ["VERSION", "STATUS", "GC"] {
            let inv = Invocation::from_env(with(&env, CNI_COMMAND, cmd)).unwrap();
            assert_eq!(inv.attachment, None, "{cmd}");
            assert_eq!(inv.args, CniArgs::default(), "{cmd}");
        }
    }

    #[test]
    fn non_utf8_cni_variable_is_code_4_and_others_are_ignored() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![b'e', b't', 0xff]);
        let mut env: Vec<(OsString, OsString)> = add_env()
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        env.push(("UNRELATED".into(), bad.clone()));
        env.push((OsString::from_vec(vec![0xfe]), "x".into()));
        Invocation::from_env(env.clone()).unwrap();

        env.retain(|(k, _)| k != CNI_IFNAME);
        env.push((CNI_IFNAME.into(), bad));
        let err = Invocation::from_env(env).unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(
            matches!(&err, CniError::InvalidEnv { var: CNI_IFNAME, reason, .. } if reason.contains("UTF-8")),
            "{err:?}"
        );
    }

    #[test]
    fn container_id_validation() {
        for ok in [CID, "a", "0", "pod_1.2-3", "A-b_C.d"] {
            validate_container_id(ok).unwrap();
        }
        for bad in [
            "", "-abc", "_abc", ".abc", "a b", "a/b", "a:b", "ä", "abc\n", "a;b",
        ] {
            let reason = validate_container_id(bad).unwrap_err();
            assert!(!reason.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn invalid_container_id_in_env_is_code_4_naming_it() {
        let err = Invocation::from_env(with(&add_env(), CNI_CONTAINERID, "../etc")).unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(
            matches!(&err, CniError::InvalidEnv { var: CNI_CONTAINERID, value, .. } if value == "../etc"),
            "{err:?}"
        );
        assert!(err.to_string().contains("CNI_CONTAINERID"), "{err}");
    }

    #[test]
    fn ifname_validation() {
        for ok in [
            "eth0",
            "net1",
            "a",
            "123456789012345",
            "eth0.100",
            "veth-x_y",
        ] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "1234567890123456",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\u{a0}b",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        let err = Invocation::from_env(with(&add_env(), CNI_IFNAME, "eth0:1")).unwrap_err();
        assert!(
            matches!(&err, CniError::InvalidEnv { var: CNI_IFNAME, value, .. } if value == "eth0:1"),
            "{err:?}"
        );
    }

    /// Control characters would reach the daemon's records, its logs and `list` raw; they are
    /// refused here, as code 4 naming the variable, with the character escaped in the message.
    #[test]
    fn control_characters_in_ifname_or_container_id_are_code_4_naming_the_variable() {
        for bad in [
            "eth\u{1}",
            "\u{1b}[2J",
            "net\u{7f}",
            "a\u{0}b",
            "eth0\n",
            "\u{85}x",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
            let env: Vec<(String, String)> = with(&add_env(), CNI_IFNAME, "x")
                .into_iter()
                .map(|(k, v)| {
                    let v = if k == CNI_IFNAME { bad } else { v };
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            if bad.contains('\0') {
                continue; // an environment cannot carry NUL; the validator alone is checked
            }
            let err = Invocation::from_env(env).unwrap_err();
            assert_eq!(err.code(), 4, "{err}");
            assert!(
                matches!(
                    &err,
                    CniError::InvalidEnv {
                        var: CNI_IFNAME,
                        ..
                    }
                ),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(CNI_IFNAME), "{msg}");
            assert!(!msg.chars().any(char::is_control), "escaped: {msg:?}");
        }
        for bad in ["abc\u{1}", "abc\n", "abc\u{1b}"] {
            let env: Vec<(String, String)> = add_env()
                .into_iter()
                .map(|(k, v)| {
                    let v = if k == CNI_CONTAINERID { bad } else { v };
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            let err = Invocation::from_env(env).unwrap_err();
            assert_eq!(err.code(), 4, "{err}");
            assert!(
                matches!(
                    &err,
                    CniError::InvalidEnv {
                        var: CNI_CONTAINERID,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
        }
    }

    #[test]
    fn control_characters_in_cni_args_are_code_4_naming_the_pair() {
        for bad in [
            "K8S_POD_NAME=web-0\nINFO forged",
            "K8S_POD_NAMESPACE=a\u{1b}[2J",
            "X\u{7}=1",
        ] {
            let err = CniArgs::parse(&format!("IgnoreUnknown=1;{bad}")).unwrap_err();
            assert_eq!(err.code(), 4, "{err}");
            assert!(
                matches!(&err, CniError::InvalidEnv { var: CNI_ARGS, value, .. } if value == bad),
                "{err:?}"
            );
            assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
        }
    }

    #[test]
    fn cni_args_keeps_unknown_keys_and_values_with_equals() {
        let args = CniArgs::parse("FOO=BAR;K8S_POD_NAME=web-1;;ABC=1=2;EMPTY=;").unwrap();
        assert_eq!(args.pod_name.as_deref(), Some("web-1"));
        assert!(!args.ignore_unknown);
        assert_eq!(
            args.other,
            [
                ("FOO".to_owned(), "BAR".to_owned()),
                ("ABC".to_owned(), "1=2".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    #[test]
    fn cni_args_ignore_unknown_values() {
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("True", true),
            ("0", false),
            ("false", false),
            ("", false),
        ] {
            let args = CniArgs::parse(&format!("IgnoreUnknown={v}")).unwrap();
            assert_eq!(args.ignore_unknown, want, "{v:?}");
        }
    }

    #[test]
    fn cni_args_empty_pod_fields_are_absent_and_last_wins() {
        let args = CniArgs::parse("K8S_POD_NAMESPACE=;K8S_POD_NAME=a;K8S_POD_NAME=b").unwrap();
        assert_eq!(args.pod_namespace, None);
        assert_eq!(args.pod_name.as_deref(), Some("b"));
    }

    #[test]
    fn malformed_cni_args_is_code_4_naming_the_pair() {
        for bad in ["FOO", "K8S_POD_NAME=a;garbage", "=value"] {
            let err = CniArgs::parse(bad).unwrap_err();
            assert_eq!(err.code(), 4, "{bad}");
            assert!(
                matches!(err, CniError::InvalidEnv { var: CNI_ARGS, .. }),
                "{bad}"
            );
        }
        let err =
            Invocation::from_env(with(&add_env(), CNI_ARGS, "IgnoreUnknown=1;oops")).unwrap_err();
        assert!(
            matches!(&err, CniError::InvalidEnv { var: CNI_ARGS, value, .. } if value == "oops"),
            "{err:?}"
        );
    }

    #[test]
    fn cni_args_ip_list() {
        let args = CniArgs::parse("IP=10.1.0.5, 10.1.0.6/24,fd00::5/64,fd00::6").unwrap();
        let ips: Vec<String> = args
            .ips()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["10.1.0.5", "10.1.0.6/24", "fd00::5/64", "fd00::6"]);
        assert_eq!(CniArgs::parse("K8S_POD_NAME=a").unwrap().ips().unwrap(), []);
        assert_eq!(CniArgs::parse("IP=").unwrap().ips().unwrap(), []);
    }

    #[test]
    fn bad_ip_in_cni_args_is_code_4_naming_the_entry() {
        for bad in [
            "IP=10.1.0.300",
            "IP=10.1.0.5/33",
            "IP=10.1.0.5,nope",
            "IP=fd00::/129",
        ] {
            let args = CniArgs::parse(bad).unwrap();
            let err = args.ips().unwrap_err();
            assert_eq!(err.code(), 4, "{bad}");
            assert!(err.to_string().contains("CNI_ARGS"), "{err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn a_bad_ip_does_not_break_del() {
        let env = with(
            &with(&add_env(), CNI_COMMAND, "DEL"),
            CNI_ARGS,
            "IP=nonsense;K8S_POD_NAME=a",
        );
        let inv = Invocation::from_env(env).unwrap();
        assert_eq!(inv.args.ip.as_deref(), Some("nonsense"));
    }

    #[test]
    fn attachment_json_shape_matches_gc_input() {
        let a: Attachment =
            serde_json::from_str(r#"{"containerID":"abc","ifname":"eth0"}"#).unwrap();
        assert_eq!(a.container_id, "abc");
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"containerID":"abc","ifname":"eth0"}"#
        );
    }
}
