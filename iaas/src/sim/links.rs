//! Real links for attached NICs (`--real-links`, root only): when an attach job succeeds, the
//! NIC appears in the host's network namespace as one end of a veth pair carrying the NIC's
//! MAC address, named `qcs` + the MAC's last four bytes (`qcs9e123456`; the other end is
//! `qcp…`), as a hot-plugged NIC appears in a QingCloud VM; when a detach job succeeds it goes
//! away. Links still present when the simulator stops are deleted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::cloud::NicEvent;

/// The link name of a NIC id (MAC): `qcs` and the last four bytes in hex.
pub fn link_name(nic_id: &str) -> String {
    let hex: String = nic_id.chars().filter(|c| *c != ':').collect();
    format!("qcs{}", hex.get(4..).unwrap_or(&hex))
}

fn peer_name(nic_id: &str) -> String {
    link_name(nic_id).replacen("qcs", "qcp", 1)
}

/// Whether this process runs with effective uid 0 (from `/proc/self/status`).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

async fn ip(args: &[&str]) -> Result<(), String> {
    let output = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The links made for attached NICs, and the task making them.
#[derive(Debug)]
pub struct Links {
    sender: mpsc::UnboundedSender<NicEvent>,
    made: Arc<Mutex<BTreeMap<String, String>>>,
    task: JoinHandle<()>,
}

impl Links {
    /// Starts the task; refuses when not root.
    pub fn start() -> Result<Self, String> {
        if !running_as_root() {
            return Err("real links need root (CAP_NET_ADMIN in the host namespace)".into());
        }
        let (sender, mut events) = mpsc::unbounded_channel::<NicEvent>();
        let made: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let links = made.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    NicEvent::Attached { nic_id, .. } => {
                        let (name, peer) = (link_name(&nic_id), peer_name(&nic_id));
                        let result = async {
                            ip(&[
                                "link", "add", &name, "address", &nic_id, "type", "veth", "peer",
                                "name", &peer,
                            ])
                            .await?;
                            ip(&["link", "set", &peer, "up"]).await?;
                            ip(&["link", "set", &name, "up"]).await
                        }
                        .await;
                        match result {
                            Ok(()) => {
                                tracing::info!(
                                    nic_id,
                                    link = name,
                                    "attached NIC plugged as a link"
                                );
                                if let Ok(mut made) = links.lock() {
                                    made.insert(nic_id, name);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(nic_id, error = e, "cannot plug the NIC as a link")
                            }
                        }
                    }
                    NicEvent::Detached { nic_id } => {
                        let name = links.lock().ok().and_then(|mut made| made.remove(&nic_id));
                        if let Some(name) = name {
                            match ip(&["link", "del", &name]).await {
                                Ok(()) => {
                                    tracing::info!(nic_id, link = name, "detached NIC unplugged")
                                }
                                Err(e) => tracing::warn!(
                                    nic_id,
                                    error = e,
                                    "cannot unplug the NIC's link"
                                ),
                            }
                        }
                    }
                }
            }
        });
        Ok(Self { sender, made, task })
    }

    /// A sender of attachment changes to the task.
    pub fn sender(&self) -> mpsc::UnboundedSender<NicEvent> {
        self.sender.clone()
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.task.abort();
        let made = match self.made.lock() {
            Ok(mut made) => std::mem::take(&mut *made),
            Err(_) => return,
        };
        for name in made.values() {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", name])
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_the_kernels_limit() {
        assert_eq!(link_name("52:54:9e:12:34:56"), "qcs9e123456");
        assert_eq!(peer_name("52:54:9e:12:34:56"), "qcp9e123456");
        assert!(link_name("52:54:ff:ff:ff:ff").len() <= 15);
    }
}
