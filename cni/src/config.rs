//! The network configuration the runtime writes to stdin.
//!
//! [`NetworkConfig::parse`] checks the static part, the one an administrator wrote (`cniVersion`,
//! `name`, `ipam` and its `routes`), for every command. The parts a runtime adds per invocation
//! (`runtimeConfig.ips`, `args.cni.ips`, `prevResult`, `cni.dev/valid-attachments`) are read by
//! accessors, called by the command that uses them: a DEL must not be refused because of an input
//! it does not need, or the pod could never be torn down.
//!
//! The raw `ipam` object is kept whole: the values of the pool keys (`subnet`, `ranges`,
//! `rangeStart`, `gateway`, `exclude`, `blockSize`, ...) are the daemon's to validate. Their JSON
//! types are checked here, so that a wrong type names its path (`ipam.ranges[0][0].subnet`).
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md#section-1-network-configuration-format>;
//! `runtimeConfig` and `args`: <https://github.com/containernetworking/cni/blob/main/CONVENTIONS.md>.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::error::CniError;
use crate::result::{IpConfig, Route};
use crate::types::{validate_network_name, Attachment, CniVersion, RequestedIp};

/// The network configuration, with its static part checked.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// `cniVersion`: the version every reply must be written in.
    pub cni_version: CniVersion,
    /// `name`: the network; part of the key of every allocation.
    pub name: String,
    /// `ipam`.
    pub ipam: IpamConfig,
    /// The whole config, for the per-invocation accessors.
    raw: Map<String, Value>,
}

/// How long a call waits for a restarting daemon unless `ipam.daemonWaitSeconds` says otherwise:
/// long enough for a DaemonSet's rolling update to replace the daemon (the old one ends within a
/// second of SIGTERM, the new one serves within a second or two of starting), short against the
/// minutes a runtime gives a CNI call.
pub const DEFAULT_DAEMON_WAIT: Duration = Duration::from_secs(5);
/// The most `ipam.daemonWaitSeconds` may ask for.
pub const MAX_DAEMON_WAIT: Duration = Duration::from_secs(60);

/// The `ipam` section.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamConfig {
    /// `ipam.type`: the IPAM plugin's executable name.
    pub ipam_type: String,
    /// `ipam.socket`: the daemon's unix socket, if the config overrides the default.
    pub socket: Option<PathBuf>,
    /// `ipam.resolvConf`: a resolv.conf to report as the result's `dns`.
    pub resolv_conf: Option<PathBuf>,
    /// `ipam.routes`: routes to return with every allocation.
    pub routes: Vec<Route>,
    /// `ipam.daemonWaitSeconds`: how long a call waits for a daemon that is restarting (no
    /// socket, a refused connection, a connection that broke before the answer) before it
    /// answers "try again later"; [`DEFAULT_DAEMON_WAIT`] when absent.
    pub daemon_wait: Duration,
    /// `ipam.logFile`: an absolute path the plugin appends one line per call to (see
    /// `call_log`); none when absent.
    pub log_file: Option<PathBuf>,
    /// The whole `ipam` object, unknown keys included, for the daemon.
    pub raw: Value,
}

/// What this plugin reads of a `prevResult` (the result of the preceding ADD, given to CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevResult {
    /// `ips[].address` and `ips[].gateway`, in order.
    pub ips: Vec<IpConfig>,
}

impl NetworkConfig {
    /// Parses the stdin bytes. Errors, in the order they are checked:
    /// malformed JSON or a non-object (6, with serde's message), `cniVersion` missing (7),
    /// malformed (6) or unsupported (1), `name` missing or invalid (7), `ipam` missing or not an
    /// object (7), `ipam.type` missing (7), `ipam.socket`/`ipam.resolvConf`/`ipam.routes` invalid
    /// (7), a pool key of the wrong JSON type (7, naming its path). Unknown keys are ignored.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let decode = |reason: String| CniError::Decode {
            what: "network config".to_owned(),
            reason,
        };
        let value: Value = serde_json::from_slice(stdin).map_err(|e| decode(e.to_string()))?;
        let Value::Object(raw) = value else {
            return Err(decode(format!(
                "expected a JSON object, found {}",
                json_type(&value)
            )));
        };

        let version = required_str(&raw, "cniVersion", "cniVersion")?;
        let cni_version: CniVersion = version.parse()?;

        let name = required_str(&raw, "name", "name")?;
        validate_network_name(name).map_err(|reason| invalid("name", &raw["name"], reason))?;
        let name = name.to_owned();

        let ipam_value = optional(&raw, "ipam").ok_or_else(|| CniError::MissingConfig {
            field: "ipam".to_owned(),
        })?;
        let ipam = IpamConfig::parse(ipam_value)?;

        Ok(NetworkConfig {
            cni_version,
            name,
            ipam,
            raw,
        })
    }

    /// `runtimeConfig.ips`: addresses the runtime requests through the `ips` capability
    /// (Multus fills it from the pod's network selection). Empty when absent.
    pub fn runtime_config_ips(&self) -> Result<Vec<RequestedIp>, CniError> {
        let runtime_config = optional_object(&self.raw, "runtimeConfig", "runtimeConfig")?;
        match runtime_config {
            Some(rc) => requested_ips(rc, "runtimeConfig.ips"),
            None => Ok(Vec::new()),
        }
    }

    /// `args.cni.ips`: addresses requested through the `args` convention. Empty when absent.
    pub fn args_ips(&self) -> Result<Vec<RequestedIp>, CniError> {
        let Some(args) = optional_object(&self.raw, "args", "args")? else {
            return Ok(Vec::new());
        };
        match optional_object(args, "cni", "args.cni")? {
            Some(cni) => requested_ips(cni, "args.cni.ips"),
            None => Ok(Vec::new()),
        }
    }

    /// `prevResult`, which CHECK must have (code 7 when absent). Accepts the 0.3.x, 0.4.0 and 1.x
    /// result shapes: only `ips[].address` (CIDR) and `ips[].gateway` are read.
    pub fn prev_result(&self) -> Result<PrevResult, CniError> {
        let prev = optional_object(&self.raw, "prevResult", "prevResult")?.ok_or_else(|| {
            CniError::MissingConfig {
                field: "prevResult".to_owned(),
            }
        })?;
        let mut ips = Vec::new();
        for (i, entry) in optional_array(prev, "ips", "prevResult.ips")?
            .iter()
            .enumerate()
        {
            let path = format!("prevResult.ips[{i}]");
            let Value::Object(entry) = entry else {
                return Err(invalid(&path, entry, "expected an object".to_owned()));
            };
            let address = required_str(entry, "address", &format!("{path}.address"))?;
            let address: IpNet = address.parse().map_err(|e| {
                invalid(
                    &format!("{path}.address"),
                    &entry["address"],
                    format!("not an address/prefix: {e}"),
                )
            })?;
            let gateway = optional_ip(entry, "gateway", &format!("{path}.gateway"))?;
            ips.push(IpConfig { address, gateway });
        }
        Ok(PrevResult { ips })
    }

    /// The attachments GC must keep: `cni.dev/valid-attachments`, or `cni.dev/attachments`, the
    /// name an earlier draft of the spec used (libcni sends both). Code 7 when both are absent:
    /// an absent list must never be read as "nothing is valid" and free every address.
    pub fn valid_attachments(&self) -> Result<Vec<Attachment>, CniError> {
        const KEYS: [&str; 2] = ["cni.dev/valid-attachments", "cni.dev/attachments"];
        let Some((key, list)) = KEYS
            .into_iter()
            .find_map(|key| optional(&self.raw, key).map(|list| (key, list)))
        else {
            return Err(CniError::MissingConfig {
                field: KEYS[0].to_owned(),
            });
        };
        let Value::Array(list) = list else {
            return Err(invalid(key, list, "expected an array".to_owned()));
        };
        list.iter()
            .enumerate()
            .map(|(i, entry)| {
                let path = format!("{key}[{i}]");
                let Value::Object(entry) = entry else {
                    return Err(invalid(&path, entry, "expected an object".to_owned()));
                };
                Ok(Attachment {
                    container_id: required_str(
                        entry,
                        "containerID",
                        &format!("{path}.containerID"),
                    )?
                    .to_owned(),
                    ifname: required_str(entry, "ifname", &format!("{path}.ifname"))?.to_owned(),
                })
            })
            .collect()
    }
}

impl IpamConfig {
    fn parse(value: &Value) -> Result<Self, CniError> {
        let Value::Object(ipam) = value else {
            return Err(invalid("ipam", value, "expected an object".to_owned()));
        };
        let ipam_type = required_str(ipam, "type", "ipam.type")?.to_owned();
        let socket = optional_path(ipam, "socket", "ipam.socket")?;
        let resolv_conf = optional_path(ipam, "resolvConf", "ipam.resolvConf")?;
        let routes = optional_array(ipam, "routes", "ipam.routes")?
            .iter()
            .enumerate()
            .map(|(i, route)| parse_route(route, &format!("ipam.routes[{i}]")))
            .collect::<Result<_, _>>()?;
        let daemon_wait = optional_seconds(
            ipam,
            "daemonWaitSeconds",
            "ipam.daemonWaitSeconds",
            MAX_DAEMON_WAIT,
        )?
        .unwrap_or(DEFAULT_DAEMON_WAIT);
        let log_file = optional_path(ipam, "logFile", "ipam.logFile")?;
        if let Some(path) = log_file.as_ref().filter(|p| !p.is_absolute()) {
            return Err(invalid(
                "ipam.logFile",
                &Value::String(path.display().to_string()),
                "expected an absolute path".to_owned(),
            ));
        }
        check_pool_keys(ipam)?;
        Ok(IpamConfig {
            ipam_type,
            socket,
            resolv_conf,
            routes,
            daemon_wait,
            log_file,
            raw: value.clone(),
        })
    }
}

/// The keys of one range (`ipam` itself, or an entry of `ipam.ranges`), all strings.
const RANGE_KEYS: [&str; 4] = ["subnet", "rangeStart", "rangeEnd", "gateway"];

/// Checks the JSON types of the pool keys the daemon reads (`subnet`, `rangeStart`, `rangeEnd`,
/// `gateway`, `ranges`, `exclude`, `fixedStart`, `fixedEnd`, `blockSize`) in an `ipam` object,
/// so a wrong type is code 7 naming its JSON path here, e.g.
/// `ipam.ranges[0][0].subnet = 5: expected a string, found a number`. Their values (CIDRs,
/// addresses, sizes) are the daemon's to judge: it owns the pool rules, and checking them twice
/// would let the two drift.
///
/// [`NetworkConfig::parse`] runs it; the daemon runs it too, before decoding the pools, so that
/// a wrong type reads the same from either side. The error is always
/// [`CniError::InvalidConfig`], whose `field`, `value` and `reason` the daemon reuses.
pub fn check_pool_key_types(ipam: &Value) -> Result<(), CniError> {
    let Value::Object(ipam) = ipam else {
        return Err(invalid(
            "ipam",
            ipam,
            format!("expected an object, found {}", json_type(ipam)),
        ));
    };
    check_pool_keys(ipam)
}

fn check_pool_keys(ipam: &Map<String, Value>) -> Result<(), CniError> {
    check_range_types(ipam, "ipam")?;
    for key in ["fixedStart", "fixedEnd"] {
        optional_str(ipam, key, &format!("ipam.{key}"))?;
    }
    for (i, set) in optional_array(ipam, "ranges", "ipam.ranges")?
        .iter()
        .enumerate()
    {
        let set_path = format!("ipam.ranges[{i}]");
        let Value::Array(set) = set else {
            return Err(invalid(
                &set_path,
                set,
                format!(
                    "expected an array of ranges (ranges is an array of range sets), found {}",
                    json_type(set)
                ),
            ));
        };
        for (j, range) in set.iter().enumerate() {
            let range_path = format!("{set_path}[{j}]");
            let Value::Object(range) = range else {
                return Err(invalid(
                    &range_path,
                    range,
                    format!("expected an object, found {}", json_type(range)),
                ));
            };
            check_range_types(range, &range_path)?;
        }
    }
    // The daemon reads `exclude` as a list with no null form, so null is refused here too.
    if let Some(exclude) = ipam.get("exclude") {
        let Value::Array(entries) = exclude else {
            return Err(invalid(
                "ipam.exclude",
                exclude,
                format!(
                    "expected an array of addresses or CIDRs, found {}",
                    json_type(exclude)
                ),
            ));
        };
        for (i, entry) in entries.iter().enumerate() {
            if !entry.is_string() {
                return Err(invalid(
                    &format!("ipam.exclude[{i}]"),
                    entry,
                    format!("expected a string, found {}", json_type(entry)),
                ));
            }
        }
    }
    // The daemon's per-network switch for sticky StatefulSet addresses (default true).
    if let Some(sticky) = optional(ipam, "stickyStatefulSets") {
        if !sticky.is_boolean() {
            return Err(invalid(
                "ipam.stickyStatefulSets",
                sticky,
                format!("expected true or false, found {}", json_type(sticky)),
            ));
        }
    }
    if let Some(size) = optional(ipam, "blockSize") {
        if size.as_u64().is_none_or(|n| n > u64::from(u8::MAX)) {
            return Err(invalid(
                "ipam.blockSize",
                size,
                "expected a prefix length, an integer from 0 to 255".to_owned(),
            ));
        }
    }
    Ok(())
}

fn check_range_types(range: &Map<String, Value>, path: &str) -> Result<(), CniError> {
    for key in RANGE_KEYS {
        optional_str(range, key, &format!("{path}.{key}"))?;
    }
    Ok(())
}

/// `{"dst": CIDR, "gw": IP?}`. Host bits in `dst` are refused (the kernel refuses such a route
/// later, with a far less helpful message); `gw` must be of `dst`'s family.
fn parse_route(value: &Value, path: &str) -> Result<Route, CniError> {
    let Value::Object(route) = value else {
        return Err(invalid(path, value, "expected an object".to_owned()));
    };
    let dst_path = format!("{path}.dst");
    let dst_str = required_str(route, "dst", &dst_path)?;
    let dst: IpNet = dst_str
        .parse()
        .map_err(|e| invalid(&dst_path, &route["dst"], format!("not a CIDR: {e}")))?;
    if dst.trunc() != dst {
        return Err(invalid(
            &dst_path,
            &route["dst"],
            format!("host bits are set; the network is {}", dst.trunc()),
        ));
    }
    let gw_path = format!("{path}.gw");
    let gw = optional_ip(route, "gw", &gw_path)?;
    if let Some(gw) = gw {
        if gw.is_ipv4() != dst.addr().is_ipv4() {
            return Err(invalid(
                &gw_path,
                &route["gw"],
                format!("gateway family differs from dst {dst}"),
            ));
        }
    }
    Ok(Route { dst, gw })
}

/// The entries of `<object>.ips`, each an address or address/prefix.
fn requested_ips(object: &Map<String, Value>, path: &str) -> Result<Vec<RequestedIp>, CniError> {
    optional_array(object, "ips", path)?
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let entry_path = format!("{path}[{i}]");
            let Value::String(s) = entry else {
                return Err(invalid(&entry_path, entry, "expected a string".to_owned()));
            };
            s.parse()
                .map_err(|reason| invalid(&entry_path, entry, reason))
        })
        .collect()
}

fn invalid(field: &str, value: &Value, reason: String) -> CniError {
    CniError::InvalidConfig {
        field: field.to_owned(),
        value: value.to_string(),
        reason,
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value of `key`, `null` counting as absent.
fn optional<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|v| !v.is_null())
}

fn optional_str<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, CniError> {
    match optional(object, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(
            path,
            other,
            format!("expected a string, found {}", json_type(other)),
        )),
    }
}

/// A non-empty string (empty counts as missing, as in the Go plugins whose configs we accept).
fn required_str<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, CniError> {
    optional_str(object, key, path)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CniError::MissingConfig {
            field: path.to_owned(),
        })
}

fn optional_path(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<PathBuf>, CniError> {
    Ok(optional_str(object, key, path)?
        .filter(|s| !s.is_empty())
        .map(PathBuf::from))
}

/// A whole number of seconds from 0 to `max`.
fn optional_seconds(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
    max: Duration,
) -> Result<Option<Duration>, CniError> {
    let Some(value) = optional(object, key) else {
        return Ok(None);
    };
    match value.as_u64() {
        Some(n) if n <= max.as_secs() => Ok(Some(Duration::from_secs(n))),
        _ => Err(invalid(
            path,
            value,
            format!(
                "expected a whole number of seconds from 0 to {}",
                max.as_secs()
            ),
        )),
    }
}

fn optional_ip(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<IpAddr>, CniError> {
    optional_str(object, key, path)?
        .map(|s| {
            s.parse()
                .map_err(|e| invalid(path, &object[key], format!("not an IP address: {e}")))
        })
        .transpose()
}

fn optional_array<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a [Value], CniError> {
    match optional(object, key) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(invalid(
            path,
            other,
            format!("expected an array, found {}", json_type(other)),
        )),
    }
}

fn optional_object<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, CniError> {
    match optional(object, key) {
        None => Ok(None),
        Some(Value::Object(inner)) => Ok(Some(inner)),
        Some(other) => Err(invalid(
            path,
            other,
            format!("expected an object, found {}", json_type(other)),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetworkConfig, CniError> {
        NetworkConfig::parse(v.to_string().as_bytes())
    }

    fn minimal() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "macvlan-conf",
            "type": "macvlan",
            "ipam": { "type": "hostnic-ipam" }
        })
    }

    fn with(mut v: Value, pointer: &str, new: Value) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = if parent.is_empty() {
            &mut v
        } else {
            v.pointer_mut(parent).unwrap()
        };
        parent.as_object_mut().unwrap().insert(key.to_owned(), new);
        v
    }

    fn without(mut v: Value, pointer: &str) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = if parent.is_empty() {
            &mut v
        } else {
            v.pointer_mut(parent).unwrap()
        };
        parent.as_object_mut().unwrap().remove(key);
        v
    }

    fn assert_invalid(err: CniError, want_field: &str) {
        assert_eq!(err.code(), 7, "{err:?}");
        match &err {
            CniError::InvalidConfig { field, .. } | CniError::MissingConfig { field } => {
                assert_eq!(field, want_field, "{err}");
            }
            other => panic!("expected a config error for {want_field}, got {other:?}"),
        }
        assert!(err.to_string().contains(want_field), "{err}");
    }

    #[test]
    fn parses_a_kube_ipam_style_config_and_keeps_unknown_keys() {
        let conf = parse(json!({
            "cniVersion": "0.3.1",
            "name": "k8s-pod-network",
            "type": "macvlan",
            "master": "eth0",
            "ipam": {
                "type": "hostnic-ipam",
                "socket": "/run/hostnic/ipamd.sock",
                "kubeConfig": "/etc/kubernetes/kubelet.conf",
                "etcdConfig": {
                    "etcdURL": "https://192.168.1.50:2379",
                    "etcdCertFile": "/etc/etcd/ssl/etcd.pem",
                    "etcdKeyFile": "/etc/etcd/ssl/etcd-key.pem",
                    "etcdTrustedCAFileFile": "/etc/etcd/ssl/etcd-root-ca.pem"
                },
                "subnet": "10.188.0.0/16",
                "fixedStart": "10.188.0.10",
                "fixedEnd": "10.188.0.255",
                "gateway": "10.188.0.1",
                "ranges": [[{"subnet": "10.189.0.0/24"}]],
                "dataDir": "/var/lib/cni",
                "resolvConf": "/etc/resolv.conf",
                "routes": [
                    { "dst": "0.0.0.0/0" },
                    { "dst": "192.168.0.0/16", "gw": "10.188.0.254" },
                    { "dst": "fd00::/8", "gw": "fd00::1" }
                ]
            }
        }))
        .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V0_3_1);
        assert_eq!(conf.name, "k8s-pod-network");
        assert_eq!(conf.ipam.ipam_type, "hostnic-ipam");
        assert_eq!(
            conf.ipam.socket,
            Some(PathBuf::from("/run/hostnic/ipamd.sock"))
        );
        assert_eq!(
            conf.ipam.resolv_conf,
            Some(PathBuf::from("/etc/resolv.conf"))
        );
        assert_eq!(
            conf.ipam.routes,
            [
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: None
                },
                Route {
                    dst: "192.168.0.0/16".parse().unwrap(),
                    gw: Some("10.188.0.254".parse().unwrap())
                },
                Route {
                    dst: "fd00::/8".parse().unwrap(),
                    gw: Some("fd00::1".parse().unwrap())
                },
            ]
        );
        assert_eq!(conf.ipam.raw["subnet"], "10.188.0.0/16");
        assert_eq!(
            conf.ipam.raw["etcdConfig"]["etcdURL"],
            "https://192.168.1.50:2379"
        );
        assert_eq!(conf.ipam.raw["ranges"][0][0]["subnet"], "10.189.0.0/24");
        assert_eq!(conf.ipam.raw["dataDir"], "/var/lib/cni");
    }

    #[test]
    fn minimal_config_has_no_optional_parts() {
        let conf = parse(minimal()).unwrap();
        assert_eq!(conf.ipam.socket, None);
        assert_eq!(conf.ipam.resolv_conf, None);
        assert!(conf.ipam.routes.is_empty());
        assert_eq!(conf.runtime_config_ips().unwrap(), []);
        assert_eq!(conf.args_ips().unwrap(), []);
        // null and "" mean unset, as in the Go plugins.
        let conf = parse(with(
            with(minimal(), "/ipam/socket", json!(null)),
            "/ipam/resolvConf",
            json!(""),
        ))
        .unwrap();
        assert_eq!(conf.ipam.socket, None);
        assert_eq!(conf.ipam.resolv_conf, None);
    }

    #[test]
    fn malformed_json_is_code_6_with_serdes_message() {
        for bytes in [
            &b""[..],
            b"{",
            b"{\"cniVersion\": }",
            b"not json",
            b"{\"a\":1}}",
        ] {
            let err = NetworkConfig::parse(bytes).unwrap_err();
            assert_eq!(err.code(), 6, "{:?}", String::from_utf8_lossy(bytes));
            assert!(
                matches!(&err, CniError::Decode { what, reason } if what == "network config" && reason.contains("line")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn non_object_config_is_code_6() {
        for v in [json!([]), json!("x"), json!(1), json!(null)] {
            let err = parse(v).unwrap_err();
            assert_eq!(err.code(), 6, "{err}");
        }
    }

    #[test]
    fn cni_version_errors() {
        let err = parse(without(minimal(), "/cniVersion")).unwrap_err();
        assert_invalid(err, "cniVersion");
        let err = parse(with(minimal(), "/cniVersion", json!(1))).unwrap_err();
        assert_invalid(err, "cniVersion");
        let err = parse(with(minimal(), "/cniVersion", json!("0.2.0"))).unwrap_err();
        assert_eq!(err.code(), 1);
        assert!(err.to_string().contains("0.2.0"), "{err}");
        let err = parse(with(minimal(), "/cniVersion", json!("latest"))).unwrap_err();
        assert_eq!(err.code(), 6);
    }

    #[test]
    fn unsupported_version_is_reported_before_other_problems() {
        let err = parse(json!({"cniVersion": "0.2.0"})).unwrap_err();
        assert_eq!(err.code(), 1);
    }

    #[test]
    fn every_supported_version_parses() {
        for v in CniVersion::ALL {
            let conf = parse(with(minimal(), "/cniVersion", json!(v.as_str()))).unwrap();
            assert_eq!(conf.cni_version, v);
        }
    }

    #[test]
    fn name_is_required_and_validated() {
        assert_invalid(parse(without(minimal(), "/name")).unwrap_err(), "name");
        assert_invalid(
            parse(with(minimal(), "/name", json!(""))).unwrap_err(),
            "name",
        );
        assert_invalid(
            parse(with(minimal(), "/name", json!(7))).unwrap_err(),
            "name",
        );
        let err = parse(with(minimal(), "/name", json!("my net"))).unwrap_err();
        assert_invalid(err, "name");
        let err = parse(with(minimal(), "/name", json!("-net"))).unwrap_err();
        assert!(err.to_string().contains("\"-net\""), "{err}");
    }

    /// The daemon keys attachments by network name in etcd keys: the name follows the CNI
    /// spec's rule (libcni's `ValidateNetworkName`), and anything else is code 7 naming `name`.
    #[test]
    fn network_name_follows_the_spec_rule() {
        for ok in ["a", "net1", "macvlan-conf", "k8s.pod_network-2", "0net"] {
            assert_eq!(parse(with(minimal(), "/name", json!(ok))).unwrap().name, ok);
        }
        for bad in [
            "net\n", "net\u{1}", "a/b", "../x", "net work", "-net", ".net", "_net", "ä", "a:b",
            "a%2Fb",
        ] {
            let err = parse(with(minimal(), "/name", json!(bad))).unwrap_err();
            assert_invalid(err, "name");
        }
        let err = parse(with(minimal(), "/name", json!("net\u{1b}[2J"))).unwrap_err();
        assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
    }

    #[test]
    fn wrong_types_in_pool_keys_are_code_7_naming_the_json_path() {
        let ipam = |extra: Value| {
            let mut conf = minimal();
            for (k, v) in extra.as_object().unwrap() {
                conf = with(conf, &format!("/ipam/{k}"), v.clone());
            }
            parse(conf)
        };
        let cases = [
            (
                json!({"subnet": 5}),
                "invalid network config: ipam.subnet = 5: expected a string, found a number",
            ),
            (
                json!({"gateway": ["10.0.0.1"]}),
                "invalid network config: ipam.gateway = [\"10.0.0.1\"]: expected a string, found an array",
            ),
            (
                json!({"rangeStart": true}),
                "invalid network config: ipam.rangeStart = true: expected a string, found a boolean",
            ),
            (
                json!({"fixedEnd": {}}),
                "invalid network config: ipam.fixedEnd = {}: expected a string, found an object",
            ),
            (
                json!({"ranges": [[{"subnet": 5}]]}),
                "invalid network config: ipam.ranges[0][0].subnet = 5: expected a string, found a number",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64", "rangeEnd": 7}]]}),
                "invalid network config: ipam.ranges[1][0].rangeEnd = 7: expected a string, found a number",
            ),
            (
                json!({"ranges": [{"subnet": "10.0.0.0/24"}]}),
                "invalid network config: ipam.ranges[0] = {\"subnet\":\"10.0.0.0/24\"}: expected an array of ranges (ranges is an array of range sets), found an object",
            ),
            (
                json!({"ranges": [["10.0.0.0/24"]]}),
                "invalid network config: ipam.ranges[0][0] = \"10.0.0.0/24\": expected an object, found a string",
            ),
            (
                json!({"ranges": {"subnet": "10.0.0.0/24"}}),
                "invalid network config: ipam.ranges = {\"subnet\":\"10.0.0.0/24\"}: expected an array, found an object",
            ),
            (
                json!({"exclude": "10.0.0.5"}),
                "invalid network config: ipam.exclude = \"10.0.0.5\": expected an array of addresses or CIDRs, found a string",
            ),
            (
                json!({"exclude": ["10.0.0.5", 6]}),
                "invalid network config: ipam.exclude[1] = 6: expected a string, found a number",
            ),
            (
                json!({"blockSize": "26"}),
                "invalid network config: ipam.blockSize = \"26\": expected a prefix length, an integer from 0 to 255",
            ),
            (
                json!({"blockSize": 26.5}),
                "invalid network config: ipam.blockSize = 26.5: expected a prefix length, an integer from 0 to 255",
            ),
            (
                json!({"blockSize": 256}),
                "invalid network config: ipam.blockSize = 256: expected a prefix length, an integer from 0 to 255",
            ),
            (
                json!({"stickyStatefulSets": "yes"}),
                "invalid network config: ipam.stickyStatefulSets = \"yes\": expected true or false, found a string",
            ),
        ];
        for (extra, want) in cases {
            let err = ipam(extra.clone()).unwrap_err();
            assert_eq!(err.code(), 7, "{extra}");
            assert_eq!(err.to_string(), want, "{extra}");
            // The exported check, which the daemon runs, says the same of the `ipam` object.
            let mut object = minimal()["ipam"].clone();
            object
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let exported = check_pool_key_types(&object).unwrap_err();
            assert_eq!(exported.to_string(), want, "{extra}");
        }
        // Right types pass; their values are the daemon's to judge.
        let conf = ipam(json!({
            "subnet": "not a cidr", "gateway": null, "blockSize": 26,
            "ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "extra": 1}]],
            "exclude": ["10.0.0.5", "10.0.0.64/26"], "fixedStart": "10.0.0.20"
        }))
        .unwrap();
        assert_eq!(conf.ipam.raw["subnet"], "not a cidr");
    }

    #[test]
    fn undecodable_config_is_code_6_and_wrong_type_is_code_7() {
        let err =
            NetworkConfig::parse(br#"{"cniVersion": "1.0.0", "ipam": {"subnet": 5"#).unwrap_err();
        assert_eq!(err.code(), 6, "{err}");
        assert!(err.to_string().contains("line 1 column"), "{err}");
        let err = parse(with(minimal(), "/ipam/subnet", json!(5))).unwrap_err();
        assert_eq!(err.code(), 7, "{err}");
    }

    #[test]
    fn ipam_is_required() {
        let err = parse(without(minimal(), "/ipam")).unwrap_err();
        assert_invalid(err, "ipam");
        assert_invalid(
            parse(with(minimal(), "/ipam", json!(null))).unwrap_err(),
            "ipam",
        );
        assert_invalid(
            parse(with(minimal(), "/ipam", json!("hostnic-ipam"))).unwrap_err(),
            "ipam",
        );
        assert_invalid(
            parse(without(minimal(), "/ipam/type")).unwrap_err(),
            "ipam.type",
        );
    }

    #[test]
    fn log_file_is_an_absolute_path_or_absent() {
        assert_eq!(parse(minimal()).unwrap().ipam.log_file, None);
        let log = |v: Value| parse(with(minimal(), "/ipam/logFile", v));
        assert_eq!(
            log(json!("/var/log/kube-ipam.log")).unwrap().ipam.log_file,
            Some(PathBuf::from("/var/log/kube-ipam.log"))
        );
        assert_eq!(log(json!("")).unwrap().ipam.log_file, None);
        for bad in [json!("kube-ipam.log"), json!(5), json!(["/x"])] {
            assert_invalid(log(bad).unwrap_err(), "ipam.logFile");
        }
    }

    #[test]
    fn daemon_wait_is_whole_seconds_up_to_the_maximum_and_defaults() {
        assert_eq!(
            parse(minimal()).unwrap().ipam.daemon_wait,
            DEFAULT_DAEMON_WAIT
        );
        let wait = |v: Value| parse(with(minimal(), "/ipam/daemonWaitSeconds", v));
        assert_eq!(wait(json!(0)).unwrap().ipam.daemon_wait, Duration::ZERO);
        assert_eq!(
            wait(json!(60)).unwrap().ipam.daemon_wait,
            Duration::from_secs(60)
        );
        for bad in [json!(61), json!(-1), json!(1.5), json!("5")] {
            assert_invalid(wait(bad).unwrap_err(), "ipam.daemonWaitSeconds");
        }
    }

    #[test]
    fn ipam_paths_must_be_strings() {
        assert_invalid(
            parse(with(minimal(), "/ipam/socket", json!(1))).unwrap_err(),
            "ipam.socket",
        );
        assert_invalid(
            parse(with(
                minimal(),
                "/ipam/resolvConf",
                json!(["/etc/resolv.conf"]),
            ))
            .unwrap_err(),
            "ipam.resolvConf",
        );
    }

    #[test]
    fn route_errors_name_the_field_and_value() {
        let cases = [
            (json!({"dst": "10.0.0.0/33"}), "ipam.routes[1].dst"),
            (json!({"dst": "10.0.0.0"}), "ipam.routes[1].dst"),
            (json!({"dst": "10.0.0.1/8"}), "ipam.routes[1].dst"),
            (json!({"gw": "10.0.0.1"}), "ipam.routes[1].dst"),
            (json!({"dst": 10}), "ipam.routes[1].dst"),
            (
                json!({"dst": "10.0.0.0/8", "gw": "10.0.0.256"}),
                "ipam.routes[1].gw",
            ),
            (
                json!({"dst": "10.0.0.0/8", "gw": "fd00::1"}),
                "ipam.routes[1].gw",
            ),
            (json!("0.0.0.0/0"), "ipam.routes[1]"),
        ];
        for (route, field) in cases {
            let conf = with(
                minimal(),
                "/ipam/routes",
                json!([{"dst": "0.0.0.0/0"}, route.clone()]),
            );
            let err = parse(conf).unwrap_err();
            assert_invalid(err, field);
        }
        let err = parse(with(
            minimal(),
            "/ipam/routes",
            json!([{"dst": "10.0.0.1/8"}]),
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid network config: ipam.routes[0].dst = \"10.0.0.1/8\": host bits are set; the network is 10.0.0.0/8"
        );
        let err = parse(with(minimal(), "/ipam/routes", json!({"dst": "0.0.0.0/0"}))).unwrap_err();
        assert_invalid(err, "ipam.routes");
    }

    #[test]
    fn runtime_config_ips_accept_cidr_and_plain_ip() {
        let conf = parse(with(
            minimal(),
            "/runtimeConfig",
            json!({"ips": ["10.1.1.11/24", "10.1.1.12", "fd00::11/64"], "mac": "c2:11:22:33:44:55"}),
        ))
        .unwrap();
        let ips = conf.runtime_config_ips().unwrap();
        assert_eq!(
            ips,
            [
                RequestedIp {
                    address: "10.1.1.11".parse().unwrap(),
                    prefix_len: Some(24)
                },
                RequestedIp {
                    address: "10.1.1.12".parse().unwrap(),
                    prefix_len: None
                },
                RequestedIp {
                    address: "fd00::11".parse().unwrap(),
                    prefix_len: Some(64)
                },
            ]
        );
        assert_eq!(ips[0].to_ipnet(), Some("10.1.1.11/24".parse().unwrap()));
        assert_eq!(ips[1].to_ipnet(), None);
        // runtimeConfig without ips.
        let conf = parse(with(
            minimal(),
            "/runtimeConfig",
            json!({"mac": "c2:11:22:33:44:55"}),
        ))
        .unwrap();
        assert_eq!(conf.runtime_config_ips().unwrap(), []);
    }

    #[test]
    fn runtime_config_ip_errors_are_code_7_naming_the_entry() {
        let cases = [
            (
                json!({"ips": ["10.1.1.11/24", "10.1.1.300"]}),
                "runtimeConfig.ips[1]",
            ),
            (json!({"ips": [5]}), "runtimeConfig.ips[0]"),
            (json!({"ips": "10.1.1.11"}), "runtimeConfig.ips"),
            (json!(["10.1.1.11"]), "runtimeConfig"),
        ];
        for (rc, field) in cases {
            let conf = parse(with(minimal(), "/runtimeConfig", rc)).unwrap();
            assert_invalid(conf.runtime_config_ips().unwrap_err(), field);
        }
    }

    #[test]
    fn a_bad_runtime_config_does_not_fail_parse() {
        // DEL parses the config too; it must not be refused for an input only ADD uses.
        let conf = with(minimal(), "/runtimeConfig", json!({"ips": ["bogus"]}));
        let conf = with(conf, "/prevResult", json!("bogus"));
        let conf = with(conf, "/args", json!({"cni": {"ips": 1}}));
        parse(conf).unwrap();
    }

    #[test]
    fn args_cni_ips() {
        let conf = parse(with(
            minimal(),
            "/args",
            json!({"cni": {"ips": ["10.10.0.1/24", "3ffe:ffff:0:01ff::1/64"]}, "k8s": {}}),
        ))
        .unwrap();
        let ips: Vec<String> = conf
            .args_ips()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["10.10.0.1/24", "3ffe:ffff:0:1ff::1/64"]);

        let conf = parse(with(minimal(), "/args", json!({"k8s": {}}))).unwrap();
        assert_eq!(conf.args_ips().unwrap(), []);
        let conf = parse(with(minimal(), "/args", json!({"cni": {"ips": ["x"]}}))).unwrap();
        assert_invalid(conf.args_ips().unwrap_err(), "args.cni.ips[0]");
        let conf = parse(with(minimal(), "/args", json!({"cni": []}))).unwrap();
        assert_invalid(conf.args_ips().unwrap_err(), "args.cni");
    }

    fn prev(result: Value) -> Result<PrevResult, CniError> {
        parse(with(minimal(), "/prevResult", result))
            .unwrap()
            .prev_result()
    }

    #[test]
    fn prev_result_0_3_1_shape() {
        // Spec 0.3.1 result, as a main plugin returns it (with interfaces).
        let got = prev(json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "mac": "c2:11:22:33:44:55", "sandbox": "/var/run/netns/x"}],
            "ips": [
                {"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                {"version": "6", "address": "fd00::5/64", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        }))
        .unwrap();
        assert_eq!(
            got.ips,
            [
                IpConfig {
                    address: "10.1.0.5/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap())
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None
                },
            ]
        );
    }

    #[test]
    fn prev_result_0_4_0_ipam_shape() {
        let got = prev(json!({
            "cniVersion": "0.4.0",
            "ips": [{"version": "4", "address": "10.1.0.7/16", "gateway": "10.1.0.1"}]
        }))
        .unwrap();
        assert_eq!(got.ips.len(), 1);
        assert_eq!(got.ips[0].address.to_string(), "10.1.0.7/16");
    }

    #[test]
    fn prev_result_1_0_0_shape() {
        let got = prev(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "net1", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.1.0.9/24", "gateway": "10.1.0.1", "interface": 0}],
            "dns": {"nameservers": ["10.96.0.10"]}
        }))
        .unwrap();
        assert_eq!(got.ips[0].address.to_string(), "10.1.0.9/24");
        assert_eq!(got.ips[0].gateway, Some("10.1.0.1".parse().unwrap()));
        // No ips at all is a valid (empty) result.
        assert_eq!(prev(json!({"cniVersion": "1.0.0"})).unwrap().ips, []);
    }

    #[test]
    fn prev_result_errors() {
        let conf = parse(minimal()).unwrap();
        assert_invalid(conf.prev_result().unwrap_err(), "prevResult");
        assert_invalid(prev(json!([])).unwrap_err(), "prevResult");
        assert_invalid(prev(json!({"ips": {}})).unwrap_err(), "prevResult.ips");
        assert_invalid(prev(json!({"ips": [1]})).unwrap_err(), "prevResult.ips[0]");
        assert_invalid(
            prev(json!({"ips": [{"version": "4"}]})).unwrap_err(),
            "prevResult.ips[0].address",
        );
        assert_invalid(
            prev(json!({"ips": [{"address": "10.1.0.9"}]})).unwrap_err(),
            "prevResult.ips[0].address",
        );
        assert_invalid(
            prev(json!({"ips": [{"address": "10.1.0.9/24", "gateway": "x"}]})).unwrap_err(),
            "prevResult.ips[0].gateway",
        );
    }

    #[test]
    fn valid_attachments_for_gc() {
        let got = gc_conf(
            "cni.dev/valid-attachments",
            json!([
                {"containerID": "3f6940ab", "ifname": "eth0"},
                {"containerID": "3f6940ab", "ifname": "net1"}
            ]),
        )
        .valid_attachments()
        .unwrap();
        assert_eq!(
            got,
            [
                Attachment {
                    container_id: "3f6940ab".to_owned(),
                    ifname: "eth0".to_owned()
                },
                Attachment {
                    container_id: "3f6940ab".to_owned(),
                    ifname: "net1".to_owned()
                },
            ]
        );
    }

    fn gc_conf(key: &str, list: Value) -> NetworkConfig {
        let mut v = with(minimal(), "/cniVersion", json!("1.1.0"));
        v.as_object_mut().unwrap().insert(key.to_owned(), list);
        parse(v).unwrap()
    }

    #[test]
    fn valid_attachments_accepts_the_old_key_and_an_empty_list() {
        let got = gc_conf(
            "cni.dev/attachments",
            json!([{"containerID": "a", "ifname": "eth0"}]),
        )
        .valid_attachments()
        .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            gc_conf("cni.dev/valid-attachments", json!([]))
                .valid_attachments()
                .unwrap(),
            []
        );
    }

    #[test]
    fn missing_valid_attachments_is_an_error_not_an_empty_list() {
        let err = parse(minimal()).unwrap().valid_attachments().unwrap_err();
        assert_invalid(err, "cni.dev/valid-attachments");
        let err = gc_conf("cni.dev/valid-attachments", json!(null))
            .valid_attachments()
            .unwrap_err();
        assert_invalid(err, "cni.dev/valid-attachments");
    }

    #[test]
    fn malformed_valid_attachments_name_the_entry() {
        let key = "cni.dev/valid-attachments";
        assert_invalid(
            gc_conf(key, json!({})).valid_attachments().unwrap_err(),
            key,
        );
        assert_invalid(
            gc_conf(key, json!(["a"])).valid_attachments().unwrap_err(),
            "cni.dev/valid-attachments[0]",
        );
        assert_invalid(
            gc_conf(
                key,
                json!([{"containerID": "a", "ifname": "eth0"}, {"containerID": "b"}]),
            )
            .valid_attachments()
            .unwrap_err(),
            "cni.dev/valid-attachments[1].ifname",
        );
        assert_invalid(
            gc_conf(key, json!([{"ifname": "eth0"}]))
                .valid_attachments()
                .unwrap_err(),
            "cni.dev/valid-attachments[0].containerID",
        );
    }

    #[test]
    fn requested_ip_parsing() {
        assert_eq!(
            "10.0.0.1".parse::<RequestedIp>().unwrap().to_string(),
            "10.0.0.1"
        );
        assert_eq!(
            "10.0.0.1/24".parse::<RequestedIp>().unwrap().to_string(),
            "10.0.0.1/24"
        );
        assert_eq!(
            "fd00::1".parse::<RequestedIp>().unwrap().to_string(),
            "fd00::1"
        );
        for bad in [
            "",
            "10.0.0",
            "10.0.0.1/",
            "10.0.0.1/33",
            "fd00::1/129",
            "host",
            "10.0.0.1 ",
        ] {
            assert!(bad.parse::<RequestedIp>().is_err(), "{bad:?}");
        }
    }
}
