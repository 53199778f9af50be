//! The CNI protocol, as the `hostnic-ipam` and `hostnic` plugins speak it: pure functions from the
//! environment and stdin bytes to checked types, and from results and errors to the replies the
//! plugin prints. No I/O happens in the protocol modules; the binaries read the process
//! environment and stdin, and pass them in. [`plugin`] is the exception: it is the
//! `hostnic-ipam` plugin itself, which reads `ipam.resolvConf` and calls the node daemon through
//! [`grpc`], one blocking gRPC call over the daemon's unix socket.
//!
//! A plugin's life, in this crate's terms:
//!
//! 1. [`Invocation::from_env`] reads `CNI_*` (code 4 on any problem).
//! 2. VERSION: [`version_reply`] from stdin, print, done.
//! 3. [`NetworkConfig::parse`] reads stdin (codes 6, 1, 7), then
//!    [`CniVersion::ensure_supports`] refuses a command newer than the config (code 1).
//! 4. The command reads what it needs: [`CniArgs::ips`], [`NetworkConfig::runtime_config_ips`],
//!    [`NetworkConfig::args_ips`] (ADD), [`NetworkConfig::prev_result`] (CHECK),
//!    [`NetworkConfig::valid_attachments`] (GC).
//! 5. ADD prints [`IpamResult::reply`]; DEL, CHECK, GC and STATUS print nothing.
//!    Any failure prints [`CniError::reply`] and exits non-zero.
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md>.

pub mod call_log;
pub mod config;
pub mod env;
pub mod error;
pub mod grpc;
pub mod hpack;
pub mod links;
pub mod nic_plugin;
pub mod plugin;
pub mod result;
pub mod types;
pub mod version;

pub use config::{check_pool_key_types, IpamConfig, NetworkConfig, PrevResult};
pub use env::{CniArgs, Invocation};
pub use error::{CniError, ErrorReply};
pub use result::{parse_resolv_conf, Dns, IpConfig, IpamResult, ResultReply, Route};
pub use types::{
    parse_plain_ip, validate_container_id, validate_ifname, validate_network_name, Attachment,
    CniVersion, Command, RequestedIp,
};
pub use version::{version_reply, VersionReply};

/// The modules import one another without a circle: `types` at the bottom, then `error`, then
/// `version`, `env` and `result`, then `config`, then `plugin` (its call to the daemon, `grpc`
/// with `hpack`, sits beside `error`). Read from the sources, so that a
/// new `use crate::...` that closes a circle fails here, naming it.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod module_graph {
    use std::collections::BTreeMap;

    /// Every module file, by name. `every_module_is_listed` keeps this in step with `pub mod`.
    const SOURCES: [(&str, &str); 12] = [
        ("call_log", include_str!("call_log.rs")),
        ("config", include_str!("config.rs")),
        ("env", include_str!("env.rs")),
        ("error", include_str!("error.rs")),
        ("grpc", include_str!("grpc.rs")),
        ("hpack", include_str!("hpack.rs")),
        ("links", include_str!("links.rs")),
        ("nic_plugin", include_str!("nic_plugin.rs")),
        ("plugin", include_str!("plugin.rs")),
        ("result", include_str!("result.rs")),
        ("types", include_str!("types.rs")),
        ("version", include_str!("version.rs")),
    ];

    /// The sibling modules `source` names as `crate::m` or `super::m`, outside comments. A
    /// grouped `use crate::{a, b}` is refused rather than parsed: write one path per module.
    fn imports<'a>(source: &str, modules: &[&'a str]) -> Vec<&'a str> {
        let mut found = Vec::new();
        for line in source.lines().map(str::trim) {
            if line.starts_with("//") {
                continue;
            }
            assert!(
                !line.contains("crate::{"),
                "grouped crate import, not read by this check: {line}"
            );
            for prefix in ["crate::", "super::"] {
                for (at, _) in line.match_indices(prefix) {
                    let rest = &line[at + prefix.len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if let Some(m) = modules.iter().find(|m| **m == name) {
                        if !found.contains(m) {
                            found.push(*m);
                        }
                    }
                }
            }
        }
        found
    }

    /// The modules Kahn's sort cannot order (those on a circle and those above one); empty
    /// when `graph` is acyclic.
    fn unordered<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> Vec<&'a str> {
        let mut remaining = graph.clone();
        loop {
            let ready: Vec<&str> = remaining
                .iter()
                .filter(|(_, deps)| deps.iter().all(|d| !remaining.contains_key(d)))
                .map(|(m, _)| *m)
                .collect();
            if ready.is_empty() {
                return remaining.into_keys().collect();
            }
            for m in ready {
                remaining.remove(m);
            }
        }
    }

    fn graph() -> BTreeMap<&'static str, Vec<&'static str>> {
        let modules: Vec<&str> = SOURCES.iter().map(|(m, _)| *m).collect();
        SOURCES
            .iter()
            .map(|(m, source)| {
                let deps = imports(source, &modules)
                    .into_iter()
                    .filter(|d| d != m)
                    .collect();
                (*m, deps)
            })
            .collect()
    }

    #[test]
    fn every_module_is_listed() {
        let declared: Vec<&str> = include_str!("lib.rs")
            .lines()
            .filter_map(|l| {
                l.strip_prefix("pub mod ")
                    .or_else(|| l.strip_prefix("mod "))
            })
            .filter_map(|l| l.strip_suffix(';'))
            .collect();
        let listed: Vec<&str> = SOURCES.iter().map(|(m, _)| *m).collect();
        assert_eq!(declared, listed);
    }

    #[test]
    fn the_modules_import_one_another_without_a_circle() {
        let graph = graph();
        assert_eq!(unordered(&graph), Vec::<&str>::new(), "{graph:?}");
        assert_eq!(
            graph["types"],
            Vec::<&str>::new(),
            "types is the bottom layer"
        );
        assert_eq!(graph["error"], ["types"]);
    }

    /// The check itself: it sees each kind of path, and finds a circle when there is one.
    #[test]
    fn the_check_finds_imports_and_circles() {
        let modules = ["a", "b", "c"];
        let source = "use crate::a::X;\n// use crate::c::Y;\nfn f() { super::b::g() }\n";
        assert_eq!(imports(source, &modules), ["a", "b"]);
        let circle: BTreeMap<&str, Vec<&str>> = [
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["a"]),
            ("d", vec!["a"]),
        ]
        .into_iter()
        .collect();
        assert_eq!(unordered(&circle), ["a", "b", "c", "d"]);
        let chain: BTreeMap<&str, Vec<&str>> = [("a", vec!["b"]), ("b", vec![]), ("c", vec!["a"])]
            .into_iter()
            .collect();
        assert!(unordered(&chain).is_empty());
    }
}
