//! The host's links by MAC address, read from sysfs: a NIC attached to the VM shows up as a
//! link carrying the NIC id (its MAC).

use std::path::Path;

/// The links of the host namespace with their MAC addresses (lower-case), from `sys_class_net`
/// (normally `/sys/class/net`).
pub fn links_by_mac(sys_class_net: &Path) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut links: Vec<(String, String)> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let mac = std::fs::read_to_string(entry.path().join("address")).ok()?;
            Some((name, mac.trim().to_ascii_lowercase()))
        })
        .collect();
    links.sort();
    links
}

/// The name of the host link carrying `mac`, if any.
pub fn link_of(sys_class_net: &Path, mac: &str) -> Option<String> {
    let mac = mac.to_ascii_lowercase();
    links_by_mac(sys_class_net)
        .into_iter()
        .find(|(_, m)| *m == mac)
        .map(|(name, _)| name)
}
