//! The link work of the `hostnic` plugin: move a NIC's link from the host into a pod's network
//! namespace, rename, address and route it; move it back; check it.
//!
//! This shells out to iproute2's `ip` (and util-linux's `nsenter` to run it inside the pod's
//! namespace) rather than linking `rtnetlink`: the plugin is exec'd for every pod, and the
//! rtnetlink/netlink-packet stack would add its build and start-up cost to a binary that stays
//! small otherwise; `ip` is on every node, and each step is one short exec. Every command that
//! fails is named in the error with its stderr.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use ipnet::IpNet;

/// One `ip` invocation, in the host namespace (`netns` None) or inside `netns`.
fn ip(netns: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let output = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}{}: {}",
            args.join(" "),
            netns
                .map(|n| format!(" (in {})", n.display()))
                .unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Parses `ip -o link show` output into (name, MAC) pairs (pure).
pub fn parse_links(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.nth(1)?.trim_end_matches(':');
            let name = name.split('@').next()?.to_string();
            let mac = line
                .split("link/ether ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_ascii_lowercase();
            Some((name, mac))
        })
        .collect()
}

/// The links of a namespace (the host's when `netns` is None) with their MACs.
pub fn links(netns: Option<&Path>) -> Result<Vec<(String, String)>, String> {
    ip(netns, &["-o", "link", "show"]).map(|out| parse_links(&out))
}

/// The name of the link carrying `mac` in a namespace.
pub fn link_with_mac(netns: Option<&Path>, mac: &str) -> Result<Option<String>, String> {
    let mac = mac.to_ascii_lowercase();
    Ok(links(netns)?
        .into_iter()
        .find(|(_, m)| *m == mac)
        .map(|(n, _)| n))
}

/// What the pod's side of a NIC looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNic<'a> {
    pub mac: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub address: IpNet,
    pub gateway: IpAddr,
    /// Extra routes through the interface: (destination, next hop).
    pub routes: Vec<(IpNet, IpAddr)>,
}

/// Moves the host link carrying `nic.mac` into the pod's namespace, renames it, and sets its
/// address, the default route via the gateway and the extra routes.
pub fn plumb(nic: &PodNic<'_>) -> Result<(), String> {
    let ns = Some(nic.netns);
    let current = match link_with_mac(ns, nic.mac)? {
        Some(name) => name, // an earlier ADD got this far
        None => {
            let host = link_with_mac(None, nic.mac)?
                .ok_or_else(|| format!("no link with MAC {} on the host", nic.mac))?;
            ip(None, &["link", "set", "dev", &host, "down"])?;
            let target = nic.netns.display().to_string();
            ip(None, &["link", "set", "dev", &host, "netns", &target])?;
            host
        }
    };
    if current != nic.ifname {
        ip(ns, &["link", "set", "dev", &current, "down"])?;
        ip(ns, &["link", "set", "dev", &current, "name", nic.ifname])?;
    }
    let address = nic.address.to_string();
    let have = ip(ns, &["-o", "addr", "show", "dev", nic.ifname])?;
    if !have.contains(&format!(" {address} ")) {
        ip(ns, &["addr", "add", &address, "dev", nic.ifname])?;
    }
    ip(ns, &["link", "set", "dev", nic.ifname, "up"])?;
    let gw = nic.gateway.to_string();
    ip(
        ns,
        &["route", "replace", "default", "via", &gw, "dev", nic.ifname],
    )?;
    for (dst, via) in &nic.routes {
        ip(
            ns,
            &[
                "route",
                "replace",
                &dst.to_string(),
                "via",
                &via.to_string(),
                "dev",
                nic.ifname,
            ],
        )?;
    }
    Ok(())
}

/// Moves the link carrying `mac` out of the pod's namespace back to the host under
/// `host_name`, and sets it up there. Nothing to do when it is already on the host; an error
/// when it is in neither place (the namespace, and the link with it, may be gone).
pub fn unplumb(netns: Option<&Path>, mac: &str, host_name: &str) -> Result<(), String> {
    if let Some(ns) = netns.filter(|ns| ns.exists()) {
        if let Some(name) = link_with_mac(Some(ns), mac)? {
            ip(Some(ns), &["link", "set", "dev", &name, "down"])?;
            if !host_name.is_empty() && name != host_name {
                ip(Some(ns), &["link", "set", "dev", &name, "name", host_name])?;
            }
            let name = if host_name.is_empty() {
                name
            } else {
                host_name.to_string()
            };
            // PID 1's namespace: the host's, as the plugin runs in the host's PID namespace.
            ip(Some(ns), &["link", "set", "dev", &name, "netns", "1"])?;
        }
    }
    match link_with_mac(None, mac)? {
        Some(name) => ip(None, &["link", "set", "dev", &name, "up"]).map(drop),
        None => Err(format!(
            "the link with MAC {mac} is neither in the pod's namespace nor on the host"
        )),
    }
}

/// Checks the pod's side of a NIC: the link by name with the MAC, the address, the default
/// route; the first difference, named.
pub fn verify(nic: &PodNic<'_>) -> Result<(), String> {
    let ns = Some(nic.netns);
    match link_with_mac(ns, nic.mac)? {
        Some(name) if name == nic.ifname => {}
        Some(name) => {
            return Err(format!(
                "the NIC {} is named {name}, not {}",
                nic.mac, nic.ifname
            ))
        }
        None => {
            return Err(format!(
                "no link with MAC {} in {}",
                nic.mac,
                nic.netns.display()
            ))
        }
    }
    let addrs = ip(ns, &["-o", "addr", "show", "dev", nic.ifname])?;
    if !addrs.contains(&format!(" {} ", nic.address)) {
        return Err(format!(
            "{} does not have address {}",
            nic.ifname, nic.address
        ));
    }
    let routes = ip(ns, &["route", "show", "default"])?;
    let want = format!("default via {} dev {}", nic.gateway, nic.ifname);
    if !routes.lines().any(|l| l.starts_with(&want)) {
        return Err(format!("no route \"{want}\""));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn ip_link_output_is_read_into_names_and_macs() {
        let out = "1: lo: <LOOPBACK> mtu 65536 qdisc noop state DOWN\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
                   1056: tvx1@if1055: <BROADCAST> mtu 1500 qdisc noop\\    link/ether B2:2b:0b:a7:7a:19 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n\
                   7: eth0: <UP> mtu 1500\\    link/ether 52:54:9e:12:34:56 brd ff:ff:ff:ff:ff:ff\n";
        assert_eq!(
            parse_links(out),
            vec![
                ("tvx1".to_string(), "b2:2b:0b:a7:7a:19".to_string()),
                ("eth0".to_string(), "52:54:9e:12:34:56".to_string()),
            ]
        );
    }
}
