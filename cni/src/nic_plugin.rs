//! The `hostnic` main plugin: a pod gets a QingCloud NIC of its own, leased from the node
//! daemon's NIC pool (`hostnic-ipamd` in QingCloud mode), moved into the pod's namespace and
//! renamed to `CNI_IFNAME`, with the address etcd gave it and a default route via its vxnet's
//! gateway.
//!
//! - ADD: `LeaseNic`, then [`crate::links::plumb`]; a failure after the lease moves the link
//!   back and returns the NIC, so nothing stays leased. Prints the full result (`interfaces`,
//!   `ips`, `routes`).
//! - DEL: `GetNic`; the link goes back to the host under its host name
//!   ([`crate::links::unplumb`], best-effort: the namespace may be gone), then `ReturnNic`.
//!   DEL of an attachment holding no NIC succeeds.
//! - CHECK: `GetNic` (code 3 when none), then [`crate::links::verify`] (102 on a difference).
//! - STATUS fails (50) unless the daemon answers on its socket. GC succeeds without a call:
//!   NICs are returned by DEL, and the daemon's reconcile takes back those whose pod namespace
//!   is gone.
//!
//! The config accepts hostnic-cni's keys: `serviceCIDR` (routed through the node's own address
//! on the pod's vxnet, as qingagent's `"gw":"0.0.0.0"` routes did: `serviceGateway` when given,
//! else the address the daemon answers, attaching a gateway NIC to the node if it has none on
//! that vxnet), `hairpin` and `natMark` (accepted, no effect), and `socket`.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hostnic_proto::nics_v1::{LeaseNicRequest, NicAttachment, NicLease, ReturnNicReply};
use ipnet::IpNet;
use serde_json::{json, Map, Value};

use crate::env::Invocation;
use crate::error::{CniError, CODE_CHECK_MISMATCH};
use crate::grpc;
use crate::links::{plumb, unplumb, verify, PodNic};
use crate::plugin::{
    call_waiting, check_socket, daemon_error, error_reply_version, CallFailure, Outcome,
    CALL_DEADLINE, CONNECT_TIMEOUT, SOCKET_ENV,
};
use crate::types::{Attachment, CniVersion, Command};
use crate::version::version_reply;

/// The `hostnic` network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostnicConfig {
    pub cni_version: CniVersion,
    pub name: String,
    /// `serviceCIDR`.
    pub service_cidr: Option<IpNet>,
    /// `serviceGateway`: the node's own address on the pods' vxnet.
    pub service_gateway: Option<IpAddr>,
    /// `hairpin` (accepted; no effect).
    pub hairpin: bool,
    /// `natMark` (accepted; no effect).
    pub nat_mark: Option<String>,
    /// `socket`: the daemon's socket.
    pub socket: Option<PathBuf>,
}

fn invalid(field: &str, value: &Value, reason: impl Into<String>) -> CniError {
    CniError::InvalidConfig {
        field: field.to_owned(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn string<'a>(raw: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(key, v, "expected a string")),
    }
}

impl HostnicConfig {
    /// Parses the stdin bytes: malformed JSON 6, a missing or bad key 7 (naming it).
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let decode = |reason: String| CniError::Decode {
            what: "network config".to_owned(),
            reason,
        };
        let value: Value = serde_json::from_slice(stdin).map_err(|e| decode(e.to_string()))?;
        let Value::Object(raw) = value else {
            return Err(decode("expected a JSON object".to_owned()));
        };
        let version = string(&raw, "cniVersion")?.ok_or_else(|| CniError::MissingConfig {
            field: "cniVersion".to_owned(),
        })?;
        let cni_version: CniVersion = version.parse()?;
        let name = string(&raw, "name")?.ok_or_else(|| CniError::MissingConfig {
            field: "name".to_owned(),
        })?;
        crate::types::validate_network_name(name)
            .map_err(|reason| invalid("name", &raw["name"], reason))?;
        let service_cidr = string(&raw, "serviceCIDR")?
            .map(|s| {
                s.parse::<IpNet>()
                    .map_err(|e| invalid("serviceCIDR", &raw["serviceCIDR"], e.to_string()))
            })
            .transpose()?;
        let service_gateway = string(&raw, "serviceGateway")?
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|e| invalid("serviceGateway", &raw["serviceGateway"], e.to_string()))
            })
            .transpose()?;
        let hairpin = match raw.get("hairpin") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(invalid("hairpin", v, "expected true or false")),
        };
        let nat_mark = string(&raw, "natMark")?.map(str::to_owned);
        let socket = string(&raw, "socket")?.map(PathBuf::from);
        Ok(HostnicConfig {
            cni_version,
            name: name.to_owned(),
            service_cidr,
            service_gateway,
            hairpin,
            nat_mark,
            socket,
        })
    }

    /// The routes besides the default one: the service CIDR through the node's address.
    pub fn extra_routes(&self) -> Vec<(IpNet, IpAddr)> {
        match (self.service_cidr, self.service_gateway) {
            (Some(cidr), Some(gw)) => vec![(cidr, gw)],
            _ => Vec::new(),
        }
    }
}

/// The ADD result (pure): the interface in the sandbox, its address and gateway, the routes.
pub fn add_result(
    version: CniVersion,
    ifname: &str,
    mac: &str,
    netns: &Path,
    address: IpNet,
    gateway: IpAddr,
    extra_routes: &[(IpNet, IpAddr)],
) -> Value {
    let mut ip =
        json!({"address": address.to_string(), "gateway": gateway.to_string(), "interface": 0});
    if version.ip_has_version_field() {
        ip["version"] = json!(if address.addr().is_ipv4() { "4" } else { "6" });
    }
    let default_dst = if address.addr().is_ipv4() {
        "0.0.0.0/0"
    } else {
        "::/0"
    };
    let mut routes = vec![json!({"dst": default_dst, "gw": gateway.to_string()})];
    routes.extend(
        extra_routes
            .iter()
            .map(|(dst, gw)| json!({"dst": dst.to_string(), "gw": gw.to_string()})),
    );
    json!({
        "cniVersion": version.as_str(),
        "interfaces": [{"name": ifname, "mac": mac, "sandbox": netns.display().to_string()}],
        "ips": [ip],
        "routes": routes,
    })
}

/// Runs one invocation of the `hostnic` plugin.
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

fn nic_attachment(network: &str, a: &Attachment) -> NicAttachment {
    NicAttachment {
        network: network.to_owned(),
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
    }
}

fn execute<K, V>(vars: &[(K, V)], stdin: &[u8]) -> Result<Outcome, CniError>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let invocation = Invocation::from_env(vars.iter().map(|(k, v)| (k, v)))?;
    if invocation.command == Command::Version {
        let reply = version_reply(stdin)?;
        return Ok(Outcome::Reply(serde_json::to_string(&reply).map_err(
            |e| CniError::Internal {
                reason: e.to_string(),
            },
        )?));
    }
    let config = HostnicConfig::parse(stdin)?;
    config.cni_version.ensure_supports(invocation.command)?;
    let env_socket = vars
        .iter()
        .rev()
        .find(|(k, _)| k.as_ref() == SOCKET_ENV)
        .map(|(_, v)| PathBuf::from(v.as_ref()))
        .filter(|p| !p.as_os_str().is_empty());
    let socket = config
        .socket
        .clone()
        .or(env_socket)
        .unwrap_or_else(|| PathBuf::from(hostnic_proto::DEFAULT_SOCKET));
    if invocation.command == Command::Status {
        // Ready when the daemon answers on its socket (50 otherwise, naming why).
        let connected = check_socket(&socket)
            .and_then(|()| grpc::connect(&socket, CONNECT_TIMEOUT))
            .map_err(CallFailure::Connect);
        return match connected {
            Ok(_) => Ok(Outcome::Done),
            Err(f) => Err(daemon_error(Command::Status, &socket, None, &f)),
        };
    }
    let (Some(attachment), true) = (
        invocation.attachment.clone(),
        matches!(
            invocation.command,
            Command::Add | Command::Del | Command::Check
        ),
    ) else {
        return Ok(Outcome::Done); // GC: NICs come back on DEL and through the reconcile
    };
    let key = nic_attachment(&config.name, &attachment);
    let fail = |f: CallFailure| daemon_error(invocation.command, &socket, Some(&attachment), &f);
    match invocation.command {
        Command::Add => {
            let netns = invocation.netns.clone().ok_or(CniError::MissingEnv {
                vars: vec!["CNI_NETNS"],
            })?;
            let request = LeaseNicRequest {
                attachment: Some(key.clone()),
                pod_namespace: invocation.args.pod_namespace.clone().unwrap_or_default(),
                pod_name: invocation.args.pod_name.clone().unwrap_or_default(),
                pod_uid: invocation.args.pod_uid.clone().unwrap_or_default(),
                netns: netns.display().to_string(),
                service_gateway: config.service_cidr.is_some() && config.service_gateway.is_none(),
            };
            let lease = lease_nic(&socket, &request).map_err(fail)?;
            let (address, gateway) = lease_addresses(&lease)?;
            let routes = routes_of(&config, &lease);
            let nic = PodNic {
                mac: &lease.nic_id,
                netns: &netns,
                ifname: &attachment.ifname,
                address,
                gateway,
                routes: routes.clone(),
            };
            if let Err(reason) = plumb(&nic) {
                // Nothing stays leased: the link goes back and the NIC with it.
                let undone = unplumb(Some(&netns), &lease.nic_id, &lease.host_link);
                let returned = return_nic(&socket, &key);
                return Err(CniError::Plugin {
                    code: 999,
                    msg: format!(
                        "moving NIC {} into {}: {reason}",
                        lease.nic_id,
                        netns.display()
                    ),
                    details: Some(format!(
                        "moved back: {}; returned: {}",
                        undone.err().unwrap_or_else(|| "yes".into()),
                        returned
                            .err()
                            .map(|f| format!("{f:?}"))
                            .unwrap_or_else(|| "yes".into())
                    )),
                });
            }
            let result = add_result(
                config.cni_version,
                &attachment.ifname,
                &lease.nic_id,
                &netns,
                address,
                gateway,
                &routes,
            );
            Ok(Outcome::Reply(result.to_string()))
        }
        Command::Del => {
            let lease = match get_nic(&socket, &key) {
                Ok(lease) => lease,
                Err(CallFailure::Status(s)) if s.code() == tonic::Code::NotFound => {
                    return Ok(Outcome::Done)
                }
                Err(f) => return Err(fail(f)),
            };
            if let Err(reason) =
                unplumb(invocation.netns.as_deref(), &lease.nic_id, &lease.host_link)
            {
                // The daemon deletes a returned NIC whose link is not on the host.
                eprintln!("hostnic: DEL of {}: {reason}", attachment.container_id);
            }
            return_nic(&socket, &key).map_err(fail)?;
            Ok(Outcome::Done)
        }
        Command::Check => {
            let netns = invocation.netns.clone().ok_or(CniError::MissingEnv {
                vars: vec!["CNI_NETNS"],
            })?;
            let lease = get_nic(&socket, &key).map_err(fail)?;
            let (address, gateway) = lease_addresses(&lease)?;
            let nic = PodNic {
                mac: &lease.nic_id,
                netns: &netns,
                ifname: &attachment.ifname,
                address,
                gateway,
                routes: Vec::new(),
            };
            verify(&nic).map_err(|reason| CniError::Plugin {
                code: CODE_CHECK_MISMATCH,
                msg: format!("CHECK: the attachment does not match: {reason}"),
                details: None,
            })?;
            Ok(Outcome::Done)
        }
        _ => Ok(Outcome::Done),
    }
}

/// The routes besides the default one: the service CIDR through `serviceGateway`, else through
/// the node's address on the vxnet that the daemon answered.
fn routes_of(config: &HostnicConfig, lease: &NicLease) -> Vec<(IpNet, IpAddr)> {
    let from_daemon = lease.service_gateway.parse::<IpAddr>().ok();
    match (config.service_cidr, config.service_gateway.or(from_daemon)) {
        (Some(cidr), Some(gw)) => vec![(cidr, gw)],
        _ => Vec::new(),
    }
}

fn lease_addresses(lease: &NicLease) -> Result<(IpNet, IpAddr), CniError> {
    let bad = |what: &str, v: &str| CniError::Internal {
        reason: format!("hostnic-ipamd answered a NIC with {what} {v:?}"),
    };
    let address = lease
        .address
        .parse()
        .map_err(|_| bad("address", &lease.address))?;
    let gateway = lease
        .gateway
        .parse()
        .map_err(|_| bad("gateway", &lease.gateway))?;
    Ok((address, gateway))
}

/// A lease can take a whole NIC creation (CreateNics, AttachNics and its job, the link): far
/// longer than an address allocation.
const LEASE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(150);

/// How long a call waits for a daemon that may be restarting (no socket, a refused or broken
/// connection) before it answers code 11, as `hostnic-ipam` does by default. Every call is
/// idempotent for its attachment, so trying again is safe.
const DAEMON_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One call to the `Nics` service, `/hostnic.nics.v1.Nics/<method>`, tried again while the
/// daemon may be restarting.
fn nics<Req: prost::Message, Reply: prost::Message + Default>(
    socket: &Path,
    method: &str,
    request: &Req,
    deadline: std::time::Duration,
) -> Result<Reply, CallFailure> {
    let path = format!("/hostnic.nics.v1.Nics/{method}");
    call_waiting(socket, DAEMON_WAIT, |socket| {
        grpc::unary(socket, &path, request, CONNECT_TIMEOUT, deadline)
    })
}

fn lease_nic(socket: &Path, r: &LeaseNicRequest) -> Result<NicLease, CallFailure> {
    nics(socket, "LeaseNic", r, LEASE_DEADLINE)
}

fn get_nic(socket: &Path, a: &NicAttachment) -> Result<NicLease, CallFailure> {
    nics(socket, "GetNic", a, CALL_DEADLINE)
}

fn return_nic(socket: &Path, a: &NicAttachment) -> Result<(), CallFailure> {
    nics::<_, ReturnNicReply>(socket, "ReturnNic", a, LEASE_DEADLINE).map(drop)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn hostnic_cni_confs_are_accepted_and_bad_keys_named() {
        let c = HostnicConfig::parse(
            br#"{"cniVersion":"0.3.1","name":"hostnic","type":"hostnic","serviceCIDR":"10.96.0.0/12","hairpin":true,"natMark":"0x10000"}"#,
        )
        .unwrap();
        assert_eq!(c.service_cidr, Some("10.96.0.0/12".parse().unwrap()));
        assert!(c.hairpin);
        assert_eq!(c.nat_mark.as_deref(), Some("0x10000"));
        assert!(
            c.extra_routes().is_empty(),
            "no route without serviceGateway"
        );
        let cases: [(&[u8], &str); 5] = [
            (br#"{"name":"n"}"#, "cniVersion"),
            (br#"{"cniVersion":"1.0.0"}"#, "name"),
            (
                br#"{"cniVersion":"1.0.0","name":"n","serviceCIDR":"10.96.0.0"}"#,
                "serviceCIDR",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","hairpin":"yes"}"#,
                "hairpin",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","serviceGateway":"x"}"#,
                "serviceGateway",
            ),
        ];
        for (text, field) in cases {
            let e = HostnicConfig::parse(text).unwrap_err();
            assert_eq!(e.code(), 7, "{e}");
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
        assert_eq!(HostnicConfig::parse(b"{").unwrap_err().code(), 6);
    }

    #[test]
    fn the_add_result_names_the_interface_in_the_sandbox_for_each_version() {
        let r = add_result(
            CniVersion::V1_0_0,
            "eth0",
            "52:54:9e:12:34:56",
            Path::new("/run/netns/p"),
            "172.16.3.9/24".parse().unwrap(),
            "172.16.3.1".parse().unwrap(),
            &[(
                "10.96.0.0/12".parse().unwrap(),
                "172.16.3.2".parse().unwrap(),
            )],
        );
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "52:54:9e:12:34:56", "sandbox": "/run/netns/p"}],
                "ips": [{"address": "172.16.3.9/24", "gateway": "172.16.3.1", "interface": 0}],
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "172.16.3.1"},
                    {"dst": "10.96.0.0/12", "gw": "172.16.3.2"},
                ],
            })
        );
        let old = add_result(
            CniVersion::V0_3_1,
            "eth0",
            "52:54:9e:12:34:56",
            Path::new("/run/netns/p"),
            "172.16.3.9/24".parse().unwrap(),
            "172.16.3.1".parse().unwrap(),
            &[],
        );
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.3.1");
    }
}
