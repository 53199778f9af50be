//! Podman, a container runtime we did not write, driving `hostnic-ipam` as a user's runtime
//! would: Podman 4.3 with its CNI backend runs real containers (runc, busybox) on a bridge network
//! whose `ipam` is `hostnic-ipam`, served by a real `hostnic-ipamd` on a real etcd. What is
//! checked is what a user sees: the container's `eth0`, `podman inspect`, Podman's error text,
//! `hostnic-ipamd list` and the keys left in etcd.
//!
//! Needs root, `podman`, `runc` and `busybox-static` (`scripts/install-deps.sh`; the tests say
//! `SKIPPED` without them), `etcd`, `etcdctl`, the reference plugins in `/usr/lib/cni`, and the
//! workspace binaries in `target/debug` (`cargo build --workspace` first).
//!
//! Nothing global is used or left behind. Every test has its own Podman (`--root`, `--runroot`,
//! `tmp_dir`, file locks, events file, image-copy dir, `CONTAINERS_CONF` and
//! `CONTAINERS_STORAGE_CONF` in a temp dir), its own runc state dir (a wrapper passes `--root`:
//! Podman's container-cleanup process does not forward `--runtime-flag`), its own cgroup parent,
//! bridge, network name, subnet, daemon socket and etcd prefix. Two things Podman 4.3 writes to
//! fixed places are dealt with: `podman import` records blobs in
//! `/var/lib/containers/cache/blob-info-cache-v1.boltdb`, so it runs in a private mount namespace
//! with a tmpfs over `/var/lib`; libcni caches results in `/var/lib/cni/results/<network>-...`
//! (and keeps them when a DEL fails), so the test removes its network's files, and the
//! directories if it created them. [`Podman`]'s `Drop` removes containers, mounts, namespaces,
//! cgroups and files even when a test fails.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use hostnic_ipamd::pool::pool_id;
use hostnic_ipamd::records::Keys;
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::netns::{
    temp_dir, CniPath, LinkGuard, SysctlGuard, NETNS_DIR, REFERENCE_PLUGINS_DIR,
};
use hostnic_testkit::{require_root, shared_single, skip_unless_ci, unique_prefix};
use serde_json::{json, Value};

/// How long one `podman` command may run before `timeout` kills it.
const PODMAN_TIMEOUT_SECONDS: u32 = 90;
/// The image every test imports into its own store.
const IMAGE: &str = "localhost/hostnic-busybox:test";
/// busybox applets the containers use.
const APPLETS: [&str; 6] = ["sh", "sleep", "ip", "cat", "ls", "true"];
/// libcni's result cache, which Podman 4.3 gives no way to move.
const LIBCNI_CACHE: &str = "/var/lib/cni";
/// The line the daemon logs for each attachment its network-namespace GC releases.
const NETNS_GC_RELEASE_LINE: &str = "released attachment whose network namespace is gone";
/// CNI error code for an address held by another attachment.
const CODE_ADDRESS_HELD: u64 = 101;

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// The binaries under test.
struct Binaries {
    daemon: PathBuf,
    plugin: PathBuf,
}

/// `None` (after a `SKIPPED` line) when not root or Podman, runc or busybox-static is missing.
/// Panics when something every test machine has is missing (etcd, the reference plugins, the
/// workspace binaries): that is a broken setup, not a reason to pass.
fn setup(what: &str) -> Option<Binaries> {
    if !require_root(what) {
        return None;
    }
    let missing: Vec<&str> = ["podman", "runc", "conmon", "unshare", "tar", "timeout"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .chain((!Path::new("/bin/busybox").is_file()).then_some("/bin/busybox"))
        .collect();
    if !missing.is_empty() {
        skip_unless_ci(
            what,
            &format!(
                "{} missing: run scripts/install-deps.sh (podman, runc, busybox-static)",
                missing.join(", ")
            ),
        );
        return None;
    }
    for tool in ["etcd", "etcdctl", "ip", "umount"] {
        assert!(
            on_path(tool),
            "`{tool}` is not on PATH: run scripts/install-deps.sh"
        );
    }
    let bridge = Path::new(REFERENCE_PLUGINS_DIR).join("bridge");
    assert!(
        bridge.is_file(),
        "{} is missing: run scripts/install-deps.sh (containernetworking-plugins)",
        bridge.display()
    );
    Some(Binaries {
        daemon: workspace_binary("hostnic-ipamd"),
        plugin: workspace_binary("hostnic-ipam"),
    })
}

/// `target/debug/<name>`: the test executable is `target/debug/deps/podman-<hash>`.
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build --workspace` before `cargo test -p hostnic-e2e`",
        bin.display()
    );
    bin
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|dir| dir.join(tool).is_file())
}

/// The tests run one at a time: each starts containers, a daemon and a Podman of its own, and
/// the machine has two cores.
fn run_alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: Mutex<()> = Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n  stdout: {}\n  stderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A string as a TOML basic string (paths here are plain ASCII).
fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

fn write_executable(path: &Path, content: &str) -> anyhow::Result<()> {
    fs::write(path, content)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A private Podman
// ---------------------------------------------------------------------------------------------

/// What Podman's CNI chain asked of `hostnic-ipam` and what it answered, as recorded by the shim
/// in front of the plugin (Podman prints an IPAM failure's message but not its CNI code).
#[derive(Debug, Clone)]
struct PluginCall {
    command: String,
    container_id: String,
    cni_args: String,
    exit_code: i32,
    reply: String,
}

/// A Podman whose every piece of state lives in one temp dir, with one CNI network: the
/// reference `bridge` plugin delegating to `hostnic-ipam` at the test daemon's socket.
struct Podman {
    network: String,
    subnet: String,
    cgroup_parent: String,
    root: PathBuf,
    runroot: PathBuf,
    conf: PathBuf,
    storage_conf: PathBuf,
    plugin_calls: PathBuf,
    /// Whether libcni's cache directories existed before this test, so that Drop removes only
    /// what the test created.
    libcni_cache_existed: (bool, bool),
    /// Network namespaces Podman made for our containers, deleted on drop if Podman did not.
    netns_seen: Mutex<Vec<PathBuf>>,
    // Dropped after `drop` below, in this order: the bridge once no container uses it, the
    // sysctl, the plugin directory, then the directory holding everything else.
    _bridge: LinkGuard,
    _forwarding: SysctlGuard,
    _cni_path: CniPath,
    dir: tempfile::TempDir,
}

impl Podman {
    /// A Podman with a network on `subnet` whose IPAM is the daemon at
    /// `socket`, and [`IMAGE`] imported into its store.
    fn new(binaries: &Binaries, subnet: &str, socket: &Path) -> anyhow::Result<Podman> {
        let dir = temp_dir("podman")?;
        let d = dir.path();
        let mkdir = |name: &str| -> anyhow::Result<PathBuf> {
            let p = d.join(name);
            fs::create_dir_all(&p)?;
            Ok(p)
        };
        let (root, runroot, tmp, netconf, runc_state, copy_tmp, shim_dir) = (
            mkdir("root")?,
            mkdir("runroot")?,
            mkdir("tmp")?,
            mkdir("net.d")?,
            mkdir("runc")?,
            mkdir("image-copy")?,
            mkdir("shim")?,
        );
        let bridge = LinkGuard::reserve("pm")?;
        // The bridge name is unique to this process and test: it names the network too, and
        // so libcni's cache files (`<network>-<container>-<ifname>`).
        let network = bridge.name().to_owned();
        let forwarding = SysctlGuard::save("net/ipv4/ip_forward")?;
        let libcni_cache_existed = (
            Path::new(LIBCNI_CACHE).exists(),
            Path::new(LIBCNI_CACHE).join("results").exists(),
        );

        // The shim records each call (command, container, CNI_ARGS, exit code, reply) and
        // passes stdin, stdout and the exit code through unchanged.
        let plugin_calls = d.join("plugin-calls.log");
        let shim = shim_dir.join("hostnic-ipam");
        write_executable(
            &shim,
            &format!(
                "#!/bin/sh\n\
                 reply=$('{plugin}')\n\
                 rc=$?\n\
                 printf '%s\\t%s\\t%s\\t%s\\t%s\\n' \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_ARGS\" \"$rc\" \"$(printf '%s' \"$reply\" | tr '\\n\\t' '  ')\" >> '{log}'\n\
                 printf '%s\\n' \"$reply\"\n\
                 exit $rc\n",
                plugin = binaries.plugin.display(),
                log = plugin_calls.display(),
            ),
        )?;
        let cni_path = CniPath::new(&[&shim])?;
        let runc = d.join("runc-private-root");
        write_executable(
            &runc,
            &format!(
                "#!/bin/sh\nexec runc --root '{}' \"$@\"\n",
                runc_state.display()
            ),
        )?;

        let conf = d.join("containers.conf");
        fs::write(
            &conf,
            format!(
                "[containers]\n\
                 # The default (1048576 open files, 4194304 processes) cannot be set here.\n\
                 default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                 \n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 cni_plugin_dirs = [{cni}]\n\
                 network_config_dir = {netconf}\n\
                 \n\
                 [engine]\n\
                 runtime = \"runc\"\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n\
                 events_logfile_path = {events}\n\
                 tmp_dir = {tmp}\n\
                 lock_type = \"file\"\n\
                 image_copy_tmp_dir = {copy_tmp}\n\
                 \n\
                 [engine.runtimes]\n\
                 runc = [{runc}]\n",
                cni = toml_str(&cni_path.path().to_string_lossy()),
                netconf = toml_str(&netconf.to_string_lossy()),
                events = toml_str(&d.join("events.log").to_string_lossy()),
                tmp = toml_str(&tmp.to_string_lossy()),
                copy_tmp = toml_str(&copy_tmp.to_string_lossy()),
                runc = toml_str(&runc.to_string_lossy()),
            ),
        )?;
        let storage_conf = d.join("storage.conf");
        fs::write(
            &storage_conf,
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = {}\nrunroot = {}\n",
                toml_str(&root.to_string_lossy()),
                toml_str(&runroot.to_string_lossy()),
            ),
        )?;
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge.name(),
                "isGateway": false,
                "ipMasq": false,
                "ipam": {"type": "hostnic-ipam", "subnet": subnet, "socket": socket},
            }],
        });
        fs::write(
            netconf.join(format!("{network}.conflist")),
            serde_json::to_vec_pretty(&conflist)?,
        )?;

        let podman = Podman {
            cgroup_parent: format!("/{network}"),
            network,
            subnet: subnet.to_owned(),
            root,
            runroot,
            conf,
            storage_conf,
            plugin_calls,
            libcni_cache_existed,
            netns_seen: Mutex::new(Vec::new()),
            _bridge: bridge,
            _forwarding: forwarding,
            _cni_path: cni_path,
            dir,
        };
        let backend = podman.ok(&["info", "--format", "{{.Host.NetworkBackend}}"]);
        anyhow::ensure!(backend == "cni", "podman's network backend is {backend:?}");
        podman.import_image()?;
        Ok(podman)
    }

    /// `podman import` of a directory holding busybox and its applets, in a mount namespace of
    /// its own whose `/var/lib` is an empty tmpfs: Podman 4.3 writes its blob-info cache to
    /// `/var/lib/containers/cache` whatever `--root` says.
    fn import_image(&self) -> anyhow::Result<()> {
        let rootfs = self.dir.path().join("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin)?;
        fs::copy("/bin/busybox", bin.join("busybox"))?;
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
        let tarball = self.dir.path().join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .output()?;
        anyhow::ensure!(out.status.success(), "tar: {}", describe(&out));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs hostnic-podman-import /var/lib && exec \"$@\"")
            .arg("sh")
            .args(self.podman_argv());
        cmd.arg("import").arg(&tarball).arg(IMAGE);
        let out = self.output(cmd)?;
        anyhow::ensure!(out.status.success(), "podman import: {}", describe(&out));
        Ok(())
    }

    /// `podman` with the global options that point it at this test's state, under `timeout`.
    fn podman_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = ["timeout", "--kill-after=5"]
            .into_iter()
            .map(OsString::from)
            .collect();
        argv.push(PODMAN_TIMEOUT_SECONDS.to_string().into());
        argv.push("podman".into());
        argv.push("--root".into());
        argv.push(self.root.clone().into());
        argv.push("--runroot".into());
        argv.push(self.runroot.clone().into());
        argv.push("--storage-driver".into());
        argv.push("vfs".into());
        argv
    }

    fn output(&self, mut cmd: Command) -> anyhow::Result<Output> {
        Ok(cmd
            .env("CONTAINERS_CONF", &self.conf)
            .env("CONTAINERS_STORAGE_CONF", &self.storage_conf)
            .env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION")
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs `podman ARGS` and returns its output, whatever its exit status.
    fn podman(&self, args: &[&str]) -> Output {
        let argv = self.podman_argv();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).args(args);
        self.output(cmd)
            .unwrap_or_else(|e| panic!("running podman {args:?}: {e}"))
    }

    /// `podman ARGS`, which must succeed; its trimmed stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(out.status.success(), "podman {args:?}: {}", describe(&out));
        text(&out.stdout)
    }

    /// `podman run -d` of a `sleep` container called `name` on the test network, with `extra`
    /// options (`--ip ...`).
    fn run(&self, name: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--cgroup-parent",
            &self.cgroup_parent,
            "--network",
            &self.network,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sleep", "600"]);
        self.podman(&args)
    }

    /// A container that must start; its id.
    fn run_ok(&self, name: &str, extra: &[&str]) -> String {
        let out = self.run(name, extra);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            describe(&out)
        );
        let id = text(&out.stdout);
        let netns = self.netns_path(name);
        self.netns_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(netns);
        id
    }

    fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", "--format", format, name])
    }

    fn id(&self, name: &str) -> String {
        self.inspect(name, "{{.Id}}")
    }

    /// The network namespace Podman made for the container (`/run/netns/netns-<uuid>`).
    fn netns_path(&self, name: &str) -> PathBuf {
        PathBuf::from(self.inspect(name, "{{.NetworkSettings.SandboxKey}}"))
    }

    /// The container's address on the test network, as `podman inspect` reports it.
    fn inspected_ip(&self, name: &str) -> String {
        self.inspect(
            name,
            &format!(
                "{{{{(index .NetworkSettings.Networks {:?}).IPAddress}}}}",
                self.network
            ),
        )
    }

    /// The IPv4 addresses (`a.b.c.d/len`) on the container's `eth0`, as `ip` inside it shows.
    fn eth0_addresses(&self, name: &str) -> Vec<String> {
        let shown = self.ok(&[
            "exec", name, "ip", "-o", "-4", "addr", "show", "dev", "eth0",
        ]);
        shown
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next().map(str::to_owned)
            })
            .collect()
    }

    fn exists(&self, name: &str) -> bool {
        self.podman(&["container", "exists", name]).status.success()
    }

    /// Every call Podman's CNI chain made to `hostnic-ipam` so far.
    fn plugin_calls(&self) -> Vec<PluginCall> {
        let log = fs::read_to_string(&self.plugin_calls).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let mut f = line.splitn(5, '\t');
                Some(PluginCall {
                    command: f.next()?.to_owned(),
                    container_id: f.next()?.to_owned(),
                    cni_args: f.next()?.to_owned(),
                    exit_code: f.next()?.parse().ok()?,
                    reply: f.next()?.trim().to_owned(),
                })
            })
            .collect()
    }

    fn calls_for(&self, container_id: &str) -> Vec<PluginCall> {
        self.plugin_calls()
            .into_iter()
            .filter(|c| c.container_id == container_id)
            .collect()
    }

    fn cleanup(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["system", "reset", "--force"][..],
        ] {
            let out = self.podman(args);
            if !out.status.success() {
                failures.push(format!("podman {args:?}: {}", describe(&out)));
            }
        }
        // Podman mounts each container's /dev/shm under the graph root; `rm` unmounts it, a
        // failed `rm` may not.
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&format!("{dir}/")))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let out = Command::new("umount").args(["-l", m]).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                failures.push(format!("umount -l {m}: {out:?}"));
            }
        }
        for netns in self
            .netns_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let named = netns.parent() == Some(Path::new(NETNS_DIR))
                || netns.parent() == Some(Path::new("/run/netns"));
            if named && netns.exists() {
                let name = netns.file_name().unwrap_or_default();
                let out = Command::new("ip")
                    .arg("netns")
                    .arg("del")
                    .arg(name)
                    .output();
                if !out.as_ref().is_ok_and(|o| o.status.success()) {
                    failures.push(format!("ip netns del {}: {out:?}", netns.display()));
                }
            }
        }
        failures.extend(remove_cgroup(&self.cgroup_parent));
        failures.extend(self.remove_libcni_cache());
        failures
    }

    /// libcni keeps `<network>-<container>-<ifname>` result files, and never removes one whose
    /// DEL failed.
    fn remove_libcni_cache(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let results = Path::new(LIBCNI_CACHE).join("results");
        if let Ok(entries) = fs::read_dir(&results) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-", self.network)) {
                    if let Err(e) = fs::remove_file(entry.path()) {
                        failures.push(format!("removing {}: {e}", entry.path().display()));
                    }
                }
            }
        }
        // Only if this test created them, and only if empty (another user may have written
        // since).
        let (top, res) = self.libcni_cache_existed;
        if !res {
            let _ = fs::remove_dir(&results);
        }
        if !top {
            let _ = fs::remove_dir(LIBCNI_CACHE);
        }
        failures
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for failure in self.cleanup() {
            eprintln!("podman test cleanup: {failure}");
        }
    }
}

/// Removes the cgroup `parent` (and the cgroups under it, deepest first) from every hierarchy:
/// with the cgroupfs manager, Podman creates `<parent>` and `<parent>/conmon` and leaves them.
fn remove_cgroup(parent: &str) -> Vec<String> {
    let name = parent.trim_start_matches('/');
    let mut candidates = vec![Path::new("/sys/fs/cgroup").join(name)];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        candidates.extend(entries.flatten().map(|e| e.path().join(name)));
    }
    let mut failures = Vec::new();
    for top in candidates.into_iter().filter(|p| p.is_dir()) {
        let mut dirs = vec![top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = fs::read_dir(&dirs[i]) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(dir) {
                failures.push(format!("removing cgroup {}: {e}", dir.display()));
            }
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// The daemon and etcd, as an operator sees them
// ---------------------------------------------------------------------------------------------

/// One test's daemon: its etcd prefix, node and socket.
struct Node {
    binaries: Binaries,
    endpoints: Vec<String>,
    prefix: String,
    node: String,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn new(binaries: Binaries, test: &str) -> Node {
        let dir = temp_dir("podman-ipamd").expect("creating the daemon's directory");
        Node {
            binaries,
            endpoints: shared_single().endpoints(),
            prefix: unique_prefix(test),
            node: format!("node-{test}"),
            socket: dir.path().join("ipamd.sock"),
            _dir: dir,
        }
    }

    fn start_daemon(&self, extra_args: &[&str]) -> IpamDaemon {
        IpamDaemon::start(
            &self.binaries.daemon,
            &self.endpoints,
            &self.node,
            &self.prefix,
            &self.socket,
            extra_args,
        )
        .expect("starting hostnic-ipamd")
    }

    /// `hostnic-ipamd list`: one row per allocation (pool, address, network, container,
    /// ifname, pod, node, kind). Works while the daemon is down: it reads etcd.
    fn list(&self) -> Vec<Vec<String>> {
        let out = Command::new(&self.binaries.daemon)
            .arg("list")
            .arg("--etcd-endpoints")
            .arg(self.endpoints.join(","))
            .args(["--etcd-prefix", &self.prefix, "--node-name", &self.node])
            .stdin(Stdio::null())
            .output()
            .expect("running hostnic-ipamd list");
        assert!(
            out.status.success(),
            "hostnic-ipamd list: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()
    }

    /// The `list` rows of `ip`.
    fn holders_of(&self, ip: &str) -> Vec<Vec<String>> {
        self.list().into_iter().filter(|r| r[1] == ip).collect()
    }

    fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .args(args)
            .output()
            .expect("running etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self) -> Vec<String> {
        self.etcdctl(&[
            "get",
            "--prefix",
            &format!("{}/", self.prefix),
            "--keys-only",
        ])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
    }

    /// Keys that say something is allocated (addresses, attachments, legacy handles). Pool,
    /// block, pool-index and release-marker keys may stay once everything is released.
    fn allocation_keys(&self) -> Vec<String> {
        let p = &self.prefix;
        let may_stay = |k: &str| {
            k == format!("{p}/pool-index")
                || (k.starts_with(&format!("{p}/pools/")) && !k.contains("/ips/"))
                || k.starts_with(&format!("{p}/released/"))
        };
        self.keys().into_iter().filter(|k| !may_stay(k)).collect()
    }

    /// The allocation record of `ip` in `subnet`.
    fn record(&self, subnet: &str, ip: &str) -> Value {
        let subnet = subnet.parse().expect("literal subnet");
        let ip = ip.parse().expect("literal address");
        let key = Keys::new(&self.prefix).address(&pool_id(&subnet), ip);
        let value = self.etcdctl(&["get", &key, "--print-value-only"]);
        serde_json::from_str(value.trim())
            .unwrap_or_else(|e| panic!("{key}: not a JSON record ({e}): {value:?}"))
    }
}

/// Lines of `log` that contain every one of `needles`.
fn log_lines(log: &Path, needles: &[&str]) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

fn address_only(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    let net = subnet.split('/').next().unwrap_or_default();
    let prefix = net.rsplit_once('.').map(|(p, _)| p).unwrap_or_default();
    subnet.ends_with("/24") && ip.rsplit_once('.').is_some_and(|(p, _)| p == prefix)
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[test]
fn podman_run_gets_an_address_from_the_daemon_and_rm_releases_it() {
    let what = "podman run and rm";
    let Some(binaries) = setup(what) else {
        return;
    };
    let _alone = run_alone();
    let started = Instant::now();
    let node = Node::new(binaries, "podman-run");
    let _daemon = node.start_daemon(&[]);
    let podman =
        Podman::new(&node.binaries, "10.226.1.0/24", &node.socket).expect("setting up podman");

    let id = podman.run_ok("web", &[]);
    let in_container = podman.eth0_addresses("web");
    let inspected = podman.inspected_ip("web");
    eprintln!("podman run: container {id}, eth0 {in_container:?}, inspect {inspected}");
    assert_eq!(in_container.len(), 1, "eth0 of web: {in_container:?}");
    let ip = address_only(&in_container[0]).to_owned();
    assert_eq!(in_container[0], format!("{ip}/24"), "prefix length on eth0");
    assert_eq!(inspected, ip, "podman inspect and eth0 disagree");
    assert!(
        in_subnet(&ip, &podman.subnet),
        "{ip} not in {}",
        podman.subnet
    );
    assert_ne!(ip, "10.226.1.1", "the container got the gateway address");

    let rows = node.list();
    eprintln!("hostnic-ipamd list: {rows:?}");
    assert_eq!(rows.len(), 1, "list: {rows:?}");
    let row = &rows[0];
    assert_eq!(row[1], ip, "list: {row:?}");
    assert_eq!(row[2], podman.network, "list: {row:?}");
    assert_eq!(row[3], id, "list: {row:?}");
    assert_eq!(row[4], "eth0", "list: {row:?}");
    // Podman passes K8S_POD_NAME (the container name) and no namespace.
    assert_eq!(row[5], "/web", "list: {row:?}");
    assert_eq!(row[6], node.node, "list: {row:?}");
    assert_eq!(row[7], "Dynamic", "list: {row:?}");
    let netns = podman.netns_path("web");
    assert!(netns.exists(), "{} does not exist", netns.display());

    podman.ok(&["rm", "--force", "--time", "0", "web"]);
    assert!(!podman.exists("web"), "web still exists after rm");
    assert!(
        !netns.exists(),
        "{} outlived the container",
        netns.display()
    );
    assert_eq!(
        node.list(),
        Vec::<Vec<String>>::new(),
        "allocations after rm"
    );
    assert_eq!(
        node.allocation_keys(),
        Vec::<String>::new(),
        "keys after rm"
    );
    let calls: Vec<(String, i32)> = podman
        .calls_for(&id)
        .into_iter()
        .map(|c| (c.command, c.exit_code))
        .collect();
    eprintln!("calls to hostnic-ipam for {id}: {calls:?}");
    assert_eq!(calls.first(), Some(&("ADD".to_owned(), 0)), "{calls:?}");
    assert_eq!(calls.last(), Some(&("DEL".to_owned(), 0)), "{calls:?}");
    eprintln!(
        "podman run/rm: {ip} allocated and released in {:?}",
        started.elapsed()
    );
}

#[test]
fn an_address_whose_del_failed_while_the_daemon_was_down_is_released_by_the_netns_gc() {
    let what = "podman rm while hostnic-ipamd is down";
    let Some(binaries) = setup(what) else {
        return;
    };
    let _alone = run_alone();
    let started = Instant::now();
    let node = Node::new(binaries, "podman-leak");
    let mut daemon = node.start_daemon(&[]);
    let podman =
        Podman::new(&node.binaries, "10.226.2.0/24", &node.socket).expect("setting up podman");

    let id = podman.run_ok("victim", &[]);
    let ip = podman.inspected_ip("victim");
    let netns = podman.netns_path("victim");
    eprintln!("victim {id}: {ip}, netns {}", netns.display());
    assert_eq!(node.holders_of(&ip).len(), 1, "list: {:?}", node.list());

    daemon.stop();
    let rm = podman.podman(&["rm", "--force", "--time", "0", "victim"]);
    eprintln!("podman rm -f with the daemon down: {}", describe(&rm));
    assert!(!podman.exists("victim"), "victim still exists after rm -f");
    assert!(
        !netns.exists(),
        "{} outlived the container",
        netns.display()
    );
    // The DEL is made by `podman rm` or by the container's cleanup process (conmon's exit
    // command), whichever tears the network down first; its failure reaches the user only in
    // the first case. The shim sees it either way.
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed_del = loop {
        let calls = podman.calls_for(&id);
        if let Some(del) = calls.iter().find(|c| c.command == "DEL") {
            break del.clone();
        }
        assert!(Instant::now() < deadline, "no DEL for {id}: {calls:#?}");
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!("the DEL Podman made with the daemon down: {failed_del:#?}");
    assert_ne!(failed_del.exit_code, 0, "{failed_del:?}");
    assert!(
        failed_del.reply.contains("hostnic-ipamd is not running"),
        "{failed_del:?}"
    );
    // Podman does not retry: the address is still held by a container that is gone.
    let held = node.holders_of(&ip);
    assert_eq!(held.len(), 1, "after the failed DEL: {held:?}");
    assert_eq!(held[0][3], id, "after the failed DEL: {held:?}");

    let gc_started = Instant::now();
    let daemon = node.start_daemon(&[
        "--netns-gc-interval-seconds",
        "1",
        "--gc-grace-seconds",
        "0",
    ]);
    let deadline = gc_started + Duration::from_secs(10);
    while !node.holders_of(&ip).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{ip} still held 10 s after the daemon came back: {:?}\n{}",
            node.list(),
            daemon.log_tail()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let released_after = gc_started.elapsed();
    let lines = log_lines(daemon.log_path(), &[NETNS_GC_RELEASE_LINE, &ip]);
    eprintln!("released {released_after:?} after the daemon started: {lines:#?}");
    assert_eq!(
        lines.len(),
        1,
        "{NETNS_GC_RELEASE_LINE} lines for {ip}: {lines:#?}"
    );
    assert!(
        lines[0].contains(&id) && lines[0].contains(&netns.to_string_lossy().into_owned()),
        "the release line names neither the container nor its netns: {}",
        lines[0]
    );
    assert_eq!(
        node.allocation_keys(),
        Vec::<String>::new(),
        "keys after GC"
    );

    // The address is usable again, even asked for by name.
    let new_id = podman.run_ok("successor", &["--ip", &ip]);
    assert_eq!(podman.eth0_addresses("successor"), vec![format!("{ip}/24")]);
    let held = node.holders_of(&ip);
    eprintln!("successor {new_id} asked for {ip}: list {held:?}");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0][3], new_id, "{held:?}");
    assert_eq!(held[0][7], "Exact", "{held:?}");
    podman.ok(&["rm", "--force", "--time", "0", "successor"]);
    assert_eq!(
        node.allocation_keys(),
        Vec::<String>::new(),
        "keys at the end"
    );
    eprintln!("podman leak repaired in {:?}", started.elapsed());
}

/// What `podman network reload` did to a running container's address and record.
struct Reload {
    ip: String,
    before: Value,
    after: Value,
    after_ip_on_eth0: Vec<String>,
    holders_after: Vec<Vec<String>>,
    calls: Vec<PluginCall>,
}

fn reload_a_running_container(test: &str, subnet: &str) -> Option<Reload> {
    let binaries = setup("podman network reload")?;
    let _alone = run_alone();
    let node = Node::new(binaries, test);
    let _daemon = node.start_daemon(&[]);
    let podman = Podman::new(&node.binaries, subnet, &node.socket).expect("setting up podman");
    let id = podman.run_ok("reloaded", &[]);
    let ip = podman.inspected_ip("reloaded");
    let before = node.record(subnet, &ip);
    // allocatedAt has a resolution of one second.
    thread::sleep(Duration::from_millis(1100));
    let calls_before = podman.calls_for(&id).len();
    let reload = podman.podman(&["network", "reload", "reloaded"]);
    assert!(
        reload.status.success(),
        "podman network reload: {}",
        describe(&reload)
    );
    let after_ip_on_eth0 = podman.eth0_addresses("reloaded");
    let holders_after = node.list();
    let after = node.record(subnet, &ip);
    let calls = podman.calls_for(&id).split_off(calls_before);
    eprintln!(
        "network reload of {id}: {ip}\n  before: {before}\n  after:  {after}\n  eth0 after: {after_ip_on_eth0:?}\n  list after: {holders_after:?}\n  plugin calls during reload: {calls:#?}"
    );
    podman.ok(&["rm", "--force", "--time", "0", "reloaded"]);
    assert_eq!(
        node.allocation_keys(),
        Vec::<String>::new(),
        "keys after rm"
    );
    Some(Reload {
        ip,
        before,
        after,
        after_ip_on_eth0,
        holders_after,
        calls,
    })
}

#[test]
fn podman_network_reload_keeps_the_address() {
    let Some(r) = reload_a_running_container("podman-reload", "10.226.3.0/24") else {
        return;
    };
    assert_eq!(r.after_ip_on_eth0, vec![format!("{}/24", r.ip)]);
    assert_eq!(r.holders_after.len(), 1, "{:?}", r.holders_after);
    assert_eq!(r.holders_after[0][1], r.ip, "{:?}", r.holders_after);
    assert_eq!(r.before["handle"], r.after["handle"]);
    // Podman 4.3's CNI backend reloads by tearing down (DEL) and setting up again (ADD) with
    // the old address asked for by name (IP=...).
    let commands: Vec<&str> = r.calls.iter().map(|c| c.command.as_str()).collect();
    assert_eq!(commands, ["DEL", "ADD"], "{:#?}", r.calls);
    assert!(
        r.calls[1].cni_args.contains(&format!("IP={}", r.ip)),
        "{:#?}",
        r.calls
    );
}

#[test]
fn podman_network_reload_keeps_the_record_kind_and_allocation_time() {
    let Some(r) = reload_a_running_container("podman-reload-kind", "10.226.4.0/24") else {
        return;
    };
    assert_eq!(r.before["kind"], json!("dynamic"), "{}", r.before);
    assert_eq!(
        r.after["kind"], r.before["kind"],
        "kind after reload: {}",
        r.after
    );
    assert_eq!(
        r.after["allocatedAt"], r.before["allocatedAt"],
        "allocatedAt after reload: {}",
        r.after
    );
}

#[test]
fn podman_run_with_an_address_another_container_holds_fails_naming_the_holder() {
    let what = "podman run --ip of a held address";
    let Some(binaries) = setup(what) else {
        return;
    };
    let _alone = run_alone();
    let node = Node::new(binaries, "podman-held");
    let _daemon = node.start_daemon(&[]);
    let podman =
        Podman::new(&node.binaries, "10.226.5.0/24", &node.socket).expect("setting up podman");
    let holder_id = podman.run_ok("holder", &[]);
    let ip = podman.inspected_ip("holder");

    let out = podman.run("intruder", &["--ip", &ip]);
    eprintln!(
        "podman run --ip {ip} while holder has it: {}",
        describe(&out)
    );
    assert!(!out.status.success(), "podman run --ip {ip} succeeded");
    let stderr = text(&out.stderr);
    for needle in [
        format!("address {ip} is held by container holder ("),
        holder_id.clone(),
        format!("of network {}", podman.network),
    ] {
        assert!(
            stderr.contains(&needle),
            "podman's error does not say {needle:?}: {stderr}"
        );
    }
    // Podman prints the message but not the CNI code; the shim saw the plugin's reply.
    let intruder_id = podman.id("intruder");
    let calls = podman.calls_for(&intruder_id);
    eprintln!("calls to hostnic-ipam for intruder {intruder_id}: {calls:#?}");
    let add = calls
        .iter()
        .find(|c| c.command == "ADD")
        .unwrap_or_else(|| panic!("no ADD for the intruder: {calls:#?}"));
    assert_ne!(add.exit_code, 0, "{add:?}");
    let reply: Value = serde_json::from_str(&add.reply)
        .unwrap_or_else(|e| panic!("ADD reply is not JSON ({e}): {add:?}"));
    assert_eq!(reply["code"], json!(CODE_ADDRESS_HELD), "{reply}");
    assert!(
        calls.iter().any(|c| c.command == "DEL" && c.exit_code == 0),
        "Podman's DEL after the failed ADD: {calls:#?}"
    );

    let held = node.holders_of(&ip);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0][3], holder_id, "{held:?}");
    let rows = node.list();
    assert_eq!(rows.len(), 1, "allocations besides the holder's: {rows:?}");
    assert!(
        !node
            .keys()
            .iter()
            .any(|k| k.contains(&intruder_id)
                && !k.starts_with(&format!("{}/released/", node.prefix))),
        "keys of the intruder: {:?}",
        node.keys()
    );
    podman.ok(&["rm", "--force", "--time", "0", "holder", "intruder"]);
    assert_eq!(
        node.allocation_keys(),
        Vec::<String>::new(),
        "keys at the end"
    );
}
