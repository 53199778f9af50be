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

/// One `ip` command on the host; its stdout, or an error naming it.
async fn ip(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Parses `ip -o -4 addr show` into (link, address with prefix) pairs (pure).
pub fn parse_ipv4_addresses(output: &str) -> Vec<(String, ipnet::Ipv4Net)> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let link = fields.nth(1)?.to_string();
            let mut rest = fields.skip_while(|f| *f != "inet");
            rest.next()?;
            Some((link, rest.next()?.parse().ok()?))
        })
        .collect()
}

/// The host's IPv4 addresses, by link.
pub async fn host_ipv4_addresses() -> Result<Vec<(String, ipnet::Ipv4Net)>, String> {
    ip(&["-o", "-4", "addr", "show"])
        .await
        .map(|out| parse_ipv4_addresses(&out))
}

/// Gives `link` the address `address` (idempotent) and sets it up.
pub async fn set_host_address(link: &str, address: ipnet::Ipv4Net) -> Result<(), String> {
    ip(&["addr", "replace", &address.to_string(), "dev", link]).await?;
    ip(&["link", "set", "dev", link, "up"]).await.map(drop)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn ip_addr_output_is_read_into_links_and_addresses() {
        let out = concat!(
            "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n",
            "2: eth0    inet 172.16.3.5/24 brd 172.16.3.255 scope global eth0\\       valid_lft forever\n",
        );
        assert_eq!(
            parse_ipv4_addresses(out),
            vec![
                ("lo".to_string(), "127.0.0.1/8".parse().unwrap()),
                ("eth0".to_string(), "172.16.3.5/24".parse().unwrap()),
            ]
        );
    }
}
