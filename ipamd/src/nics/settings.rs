//! QingCloud mode's settings: the daemon flags that turn it on, hostnic's pool config file
//! (`hostnic-cfg-cm`'s `hostnic.json`, `{"pool":{"maxNic":60,...}}`), and the instance id file.
//! Everything is read and checked at start; a bad value stops the daemon with a message naming
//! the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::vxnet::Policy;

/// hostnic's limit of NICs per VM besides the primary one (a VM takes 64 NICs in all).
pub const MAX_NIC_LIMIT: u32 = 63;
/// hostnic's default `maxNic`.
pub const DEFAULT_MAX_NIC: u32 = 60;
/// Where QingCloud VMs keep their instance id.
pub const DEFAULT_INSTANCE_ID_FILE: &str = "/etc/qingcloud/instance-id";
/// hostnic's pool config file in its DaemonSet.
pub const DEFAULT_POOL_CONFIG: &str = "/etc/hostnic/hostnic.json";

/// The flags of QingCloud mode. Without `--qingcloud-config` the daemon leases no NICs and the
/// other flags are ignored.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NicFlags {
    /// The QingCloud SDK `config.yaml` (hostnic's `qcsecret`): turns on QingCloud mode, in which
    /// the daemon leases QingCloud NICs to the `hostnic` plugin.
    #[arg(long, global = true, env = "HOSTNIC_QINGCLOUD_CONFIG")]
    pub qingcloud_config: Option<PathBuf>,
    /// hostnic's pool config (`hostnic-cfg-cm`'s `hostnic.json`).
    #[arg(long, global = true, env = "HOSTNIC_NIC_POOL_CONFIG")]
    pub nic_pool_config: Option<PathBuf>,
    /// The file holding this VM's instance id.
    #[arg(long, global = true, env = "HOSTNIC_INSTANCE_ID_FILE")]
    pub instance_id_file: Option<PathBuf>,
    /// A `VxNetPool` resource (`network.qingcloud.com/v1alpha1`) as JSON: its `spec.vxnets`
    /// and `spec.blockSize` replace the pool config's `vxNets` and `blockSize`. Without it, the
    /// cluster's VxNetPool does when the daemon reads Kubernetes.
    #[arg(long, global = true, env = "HOSTNIC_VXNET_POOL")]
    pub vxnet_pool: Option<PathBuf>,
    /// The primary NIC, never leased, detached or deleted.
    #[arg(long, global = true, env = "HOSTNIC_IFACE", default_value = "eth0")]
    pub iface: String,
}

/// The `pool` object of hostnic's config, with the keys this daemon reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPool {
    #[serde(default)]
    max_nic: Option<u32>,
    /// hostnic's older keys, which its current code ignores: the warm pool's marks here.
    #[serde(default)]
    pool_low: Option<u32>,
    #[serde(default)]
    pool_high: Option<u32>,
    #[serde(default)]
    vx_nets: Vec<String>,
    #[serde(default)]
    policy: Option<String>,
    /// Seconds an attach job may take.
    #[serde(default)]
    attach_timeout: Option<u64>,
    #[serde(default)]
    block_size: Option<u8>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default)]
    pool: Option<RawPool>,
}

/// The NIC pool's checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// At most this many NICs of this node (hostnic's `maxNic`, ≤ [`MAX_NIC_LIMIT`]).
    pub max_nic: u32,
    /// Refill the warm pool when fewer NICs than this are ready.
    pub low: u32,
    /// Release ready NICs above this many.
    pub high: u32,
    /// The vxnets NICs are created in (`vxNets`).
    pub vxnets: Vec<String>,
    pub policy: Policy,
    pub attach_timeout: Duration,
    /// The prefix length of the vxnets' blocks (`blockSize`), when set.
    pub block_size: Option<u8>,
    /// Where `vxnets` came from, for messages: `pool.vxNets` or a VxNetPool.
    pub vxnets_source: String,
}

impl PoolSettings {
    /// Parses hostnic's config text; `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| format!("{source}: not hostnic's pool config: {e}"))?;
        let pool = raw
            .pool
            .ok_or_else(|| format!("{source}: no \"pool\" object"))?;
        let max_nic = pool.max_nic.unwrap_or(DEFAULT_MAX_NIC);
        if max_nic == 0 || max_nic > MAX_NIC_LIMIT {
            return Err(format!(
                "{source}: pool.maxNic {max_nic} must be from 1 to {MAX_NIC_LIMIT} (a VM takes \
                 64 NICs, its primary one included)"
            ));
        }
        let low = pool.pool_low.unwrap_or(0);
        let high = pool.pool_high.unwrap_or(low);
        if low > high {
            return Err(format!(
                "{source}: pool.poolLow {low} is above pool.poolHigh {high}"
            ));
        }
        if high > max_nic {
            return Err(format!(
                "{source}: pool.poolHigh {high} is above pool.maxNic {max_nic}"
            ));
        }
        if pool.vx_nets.is_empty() {
            return Err(format!(
                "{source}: pool.vxNets names no vxnet for the pods' NICs"
            ));
        }
        for v in &pool.vx_nets {
            if !v.starts_with("vxnet-")
                || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(format!("{source}: pool.vxNets: {v:?} is not a vxnet id"));
            }
        }
        let policy = match &pool.policy {
            Some(p) => p
                .parse()
                .map_err(|e| format!("{source}: pool.policy: {e}"))?,
            None => Policy::default(),
        };
        if let Some(b) = pool.block_size {
            check_block_size(b).map_err(|e| format!("{source}: pool.blockSize: {e}"))?;
        }
        Ok(PoolSettings {
            max_nic,
            low,
            high,
            vxnets: pool.vx_nets,
            policy,
            attach_timeout: Duration::from_secs(pool.attach_timeout.unwrap_or(120).max(1)),
            block_size: pool.block_size,
            vxnets_source: "pool.vxNets".into(),
        })
    }

    /// Takes the vxnets and block size of a `VxNetPool` resource (JSON text; `source` names the
    /// file in errors).
    pub fn with_vxnet_pool(mut self, text: &str, source: &str) -> Result<Self, String> {
        let pool = VxNetPool::parse(text).map_err(|e| format!("{source}: {e}"))?;
        self.vxnets = pool.vxnets;
        if pool.block_size.is_some() {
            self.block_size = pool.block_size;
        }
        self.vxnets_source = format!("VxNetPool {} ({source})", pool.name);
        Ok(self)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the NIC pool config {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }
}

fn check_block_size(b: u8) -> Result<(), String> {
    if crate::pool::BLOCK_PREFIX_V4.contains(&b) {
        Ok(())
    } else {
        Err(format!(
            "{b} is not a block prefix length from {} to {}",
            crate::pool::BLOCK_PREFIX_V4.start(),
            crate::pool::BLOCK_PREFIX_V4.end()
        ))
    }
}

/// hostnic's `VxNetPool` resource (`network.qingcloud.com/v1alpha1`): the vxnets pod NICs are
/// created in, and the block size their subnets are cut into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxNetPool {
    pub name: String,
    pub vxnets: Vec<String>,
    pub block_size: Option<u8>,
}

impl VxNetPool {
    /// Parses the resource as JSON; every error names the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Spec {
            #[serde(default)]
            vxnets: Vec<Named>,
            #[serde(default)]
            block_size: Option<u8>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Resource {
            api_version: String,
            kind: String,
            #[serde(default)]
            metadata: Option<serde_json::Value>,
            spec: Spec,
        }
        let r: Resource =
            serde_json::from_str(text).map_err(|e| format!("not a VxNetPool resource: {e}"))?;
        if r.api_version != "network.qingcloud.com/v1alpha1" || r.kind != "VxNetPool" {
            return Err(format!(
                "apiVersion/kind {}/{} is not network.qingcloud.com/v1alpha1/VxNetPool",
                r.api_version, r.kind
            ));
        }
        if r.spec.vxnets.is_empty() {
            return Err("spec.vxnets names no vxnet".into());
        }
        let vxnets: Vec<String> = r.spec.vxnets.into_iter().map(|v| v.name).collect();
        for v in &vxnets {
            if !v.starts_with("vxnet-") {
                return Err(format!("spec.vxnets: {v:?} is not a vxnet id"));
            }
        }
        if let Some(b) = r.spec.block_size {
            check_block_size(b).map_err(|e| format!("spec.blockSize: {e}"))?;
        }
        let name = r
            .metadata
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        Ok(VxNetPool {
            name,
            vxnets,
            block_size: r.spec.block_size,
        })
    }
}

/// Reads this VM's instance id from `path` (whitespace trimmed).
pub fn read_instance_id(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "reading the instance id file {} (give --instance-id-file): {e}",
            path.display()
        )
    })?;
    let id = text.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(format!(
            "the instance id file {} holds {id:?}, not an instance id such as i-ets7af6q",
            path.display()
        ));
    }
    Ok(id.to_string())
}

/// The name every NIC of this VM gets, as hostnic names them.
pub fn nic_name(instance: &str) -> String {
    format!("hostnic_{instance}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn hostnics_pool_config_is_read_and_bad_values_are_named() {
        let s = PoolSettings::parse(
            r#"{"pool":{"maxNic":60,"poolLow":2,"poolHigh":4,"vxNets":["vxnet-abc1234"]},"server":{"networkPolicy":"calico"}}"#,
            "f",
        )
        .unwrap();
        assert_eq!((s.max_nic, s.low, s.high), (60, 2, 4));
        assert_eq!(s.vxnets, ["vxnet-abc1234"]);
        assert_eq!(s.policy, Policy::FailRotate);
        let d = PoolSettings::parse(r#"{"pool":{"vxNets":["vxnet-a"]}}"#, "f").unwrap();
        assert_eq!((d.max_nic, d.low, d.high), (DEFAULT_MAX_NIC, 0, 0));
        let cases = [
            (
                r#"{"pool":{"maxNic":64,"vxNets":["vxnet-a"]}}"#,
                "pool.maxNic 64 must be from 1 to 63",
            ),
            (
                r#"{"pool":{"maxNic":0,"vxNets":["vxnet-a"]}}"#,
                "pool.maxNic 0",
            ),
            (
                r#"{"pool":{"poolLow":5,"poolHigh":3,"vxNets":["vxnet-a"]}}"#,
                "poolLow 5 is above",
            ),
            (
                r#"{"pool":{"maxNic":3,"poolHigh":4,"vxNets":["vxnet-a"]}}"#,
                "poolHigh 4 is above pool.maxNic 3",
            ),
            (r#"{"pool":{"maxNic":3}}"#, "names no vxnet"),
            (
                r#"{"pool":{"vxNets":["eth0"]}}"#,
                "\"eth0\" is not a vxnet id",
            ),
            (
                r#"{"pool":{"vxNets":["vxnet-a"],"policy":"Sticky"}}"#,
                "pool.policy",
            ),
            (r#"{"server":{}}"#, "no \"pool\" object"),
            (r#"{"pool":{"maxNic":"60"}}"#, "not hostnic's pool config"),
        ];
        for (text, reason) in cases {
            let e = PoolSettings::parse(text, "hostnic.json").unwrap_err();
            assert!(e.starts_with("hostnic.json: "), "{e}");
            assert!(e.contains(reason), "{e:?} should say {reason:?}");
        }
    }

    #[test]
    fn a_vxnet_pool_resource_gives_the_vxnets_and_the_block_size() {
        let base = PoolSettings::parse(r#"{"pool":{"vxNets":["vxnet-old0001"]}}"#, "f").unwrap();
        let s = base
            .clone()
            .with_vxnet_pool(
                r#"{"apiVersion":"network.qingcloud.com/v1alpha1","kind":"VxNetPool","metadata":{"name":"v-pool"},"spec":{"vxnets":[{"name":"vxnet-a"},{"name":"vxnet-b"}],"blockSize":26}}"#,
                "vp.json",
            )
            .unwrap();
        assert_eq!(s.vxnets, ["vxnet-a", "vxnet-b"]);
        assert_eq!(s.block_size, Some(26));
        assert!(s.vxnets_source.contains("VxNetPool v-pool"));
        let cases = [
            (
                r#"{"apiVersion":"v1","kind":"ConfigMap","spec":{}}"#,
                "is not network.qingcloud.com",
            ),
            (
                r#"{"apiVersion":"network.qingcloud.com/v1alpha1","kind":"VxNetPool","spec":{"vxnets":[]}}"#,
                "names no vxnet",
            ),
            (
                r#"{"apiVersion":"network.qingcloud.com/v1alpha1","kind":"VxNetPool","spec":{"vxnets":[{"name":"eth0"}]}}"#,
                "not a vxnet id",
            ),
            (
                r#"{"apiVersion":"network.qingcloud.com/v1alpha1","kind":"VxNetPool","spec":{"vxnets":[{"name":"vxnet-a"}],"blockSize":8}}"#,
                "spec.blockSize: 8",
            ),
            ("{", "not a VxNetPool resource"),
        ];
        for (text, reason) in cases {
            let e = base.clone().with_vxnet_pool(text, "vp.json").unwrap_err();
            assert!(
                e.starts_with("vp.json: ") && e.contains(reason),
                "{e:?} should say {reason:?}"
            );
        }
    }

    #[test]
    fn the_instance_id_is_read_trimmed_and_a_missing_or_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance-id");
        std::fs::write(&path, "i-ets7af6q\n").unwrap();
        assert_eq!(read_instance_id(&path).unwrap(), "i-ets7af6q");
        std::fs::write(&path, "i-a b").unwrap();
        assert!(read_instance_id(&path)
            .unwrap_err()
            .contains("not an instance id"));
        let missing = dir.path().join("nope");
        let e = read_instance_id(&missing).unwrap_err();
        assert!(e.contains("instance id file") && e.contains("nope"), "{e}");
        assert_eq!(nic_name("i-ets7af6q"), "hostnic_i-ets7af6q");
    }
}
