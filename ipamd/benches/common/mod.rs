//! What the benches that exec plugins or start release daemons share.
#![allow(dead_code)] // each bench uses its part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `target/release`, where `cargo build --release --bins` put the binaries under measurement
/// (the bench runs as `target/release/deps/<bench>-<hash>`).
pub fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/release")
        .to_path_buf()
}

/// The release daemon, `target/release/hostnic-ipamd`.
pub fn release_daemon() -> PathBuf {
    let path = release_dir().join("hostnic-ipamd");
    assert!(
        path.exists(),
        "{} missing: run `scripts/build-release.sh` first",
        path.display()
    );
    path
}

/// Compacts etcd's history up to its revision now, physically.
pub async fn compact(client: &etcd_client::Client) {
    let mut client = client.clone();
    let revision = client
        .get("/", None)
        .await
        .expect("read the revision")
        .header()
        .expect("header")
        .revision();
    client
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
}

/// A binary as shipped, from `target/dist` (`scripts/build-release.sh`): the plugins are
/// linked statically there.
pub fn shipped(name: &str) -> PathBuf {
    let path = release_dir()
        .parent()
        .expect("target")
        .join("dist")
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run `scripts/build-release.sh` first",
        path.display()
    );
    path
}

/// Execs an IPAM plugin once, as a main plugin would: CNI environment (`CNI_ARGS` as kubelet
/// sends them), config on stdin. Returns how long it took and what it printed; panics if it
/// failed.
pub fn exec_output(
    plugin: &Path,
    command: &str,
    container: &str,
    config: &str,
) -> (Duration, Vec<u8>) {
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin starts");
    // `/bin/true` (the floor) may exit before reading its stdin.
    match child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.as_bytes())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("config written: {e}"),
        _ => {}
    }
    let out = child.wait_with_output().expect("plugin runs");
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "{} {command} {container}: {}{}",
        plugin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (elapsed, out.stdout)
}

/// [`exec_output`], the time only.
pub fn exec(plugin: &Path, command: &str, container: &str, config: &str) -> Duration {
    exec_output(plugin, command, container, config).0
}
