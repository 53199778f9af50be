//! Network namespaces, links and CNI plugin runs for kernel tests, through iproute2's `ip`.
//!
//! Every object here is created with a name unique to the test process (its PID and a counter)
//! and removed on `Drop`, also when the test panics. Names follow one pattern so that objects
//! left by a test process that died without unwinding (SIGKILL, abort) can be recognised and are
//! removed by the next process that creates a namespace:
//!
//! - namespaces: `hnt-<tag>-<pid>-<n>` under `/var/run/netns`;
//! - links: `hn<tag>-<pid hex>-<n hex>`, at most 15 bytes (`IFNAMSIZ` - 1);
//! - temp dirs ([`temp_dir`], [`CniPath`]): `hostnic-tmp-<tag>-<pid>-<random>`.
//!
//! Tests that use this module must first call [`require_netns`], which skips them loudly when
//! the process is not root or the kernel has no network namespaces.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// Where `ip netns add` mounts named namespaces; CNI runtimes pass these paths as `CNI_NETNS`.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Directory of the reference CNI plugins (Debian's `containernetworking-plugins`).
pub const REFERENCE_PLUGINS_DIR: &str = "/usr/lib/cni";
/// Longest interface name the kernel accepts (`IFNAMSIZ` is 16 with the trailing NUL).
pub const MAX_IFNAME_LEN: usize = 15;

const NETNS_MARK: &str = "hnt-";
const LINK_MARK: &str = "hn";
const DIR_MARK: &str = "hostnic-tmp-";
/// How long a CNI plugin may run before [`run_cni`] kills it.
const CNI_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn next_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// True when the process is root and can create a network namespace. Otherwise prints
/// `SKIPPED <what>: ...` to stderr and returns false, so that the caller returns early.
pub fn require_netns(what: &str) -> bool {
    if !crate::require_root(what) {
        return false;
    }
    match NetNs::new("probe") {
        Ok(_) => true,
        Err(e) => {
            crate::skip_unless_ci(what, &format!("cannot create a network namespace ({e:#})"));
            false
        }
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `hnt-<tag>-<pid>-<n>`, with loopback up (as a container runtime leaves it).
    pub fn new(tag: &str) -> anyhow::Result<NetNs> {
        sweep_stale();
        let name = format!("{NETNS_MARK}{tag}-{}-{}", std::process::id(), next_id());
        ip(["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec(["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs a command inside the namespace; fails unless it exits with status 0.
    pub fn exec<I, S>(&self, cmd: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = exec_in(self, cmd)?;
        check(&out, &format!("in netns {}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(["netns", "del", &self.name]) {
            eprintln!("hostnic-testkit: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Runs `cmd` inside `ns` (`ip netns exec`) and returns its output, whatever its exit status.
pub fn exec_in<I, S>(ns: &NetNs, cmd: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip netns exec {}`", ns.name))
}

/// One echo request from `from` to `addr`, waiting at most a second for the reply.
pub fn ping(from: &NetNs, addr: IpAddr) -> bool {
    let addr = addr.to_string();
    exec_in(from, ["ping", "-c1", "-W1", "-n", "-q", &addr]).is_ok_and(|o| o.status.success())
}

/// The global-scope addresses of `ifname` in `ns`, as `address/prefix` (`10.0.0.5/24`).
/// Fails if the interface does not exist.
pub fn addresses(ns: &NetNs, ifname: &str) -> anyhow::Result<Vec<String>> {
    let text = ns.exec(["ip", "-o", "addr", "show", "dev", ifname, "scope", "global"])?;
    Ok(parse_addresses(&text))
}

/// True if `ns` (or the host namespace, for `None`) has a link called `ifname`.
pub fn link_exists(ns: Option<&NetNs>, ifname: &str) -> bool {
    let out = match ns {
        Some(ns) => exec_in(ns, ["ip", "link", "show", "dev", ifname]),
        None => Command::new("ip")
            .args(["link", "show", "dev", ifname])
            .stdin(Stdio::null())
            .output()
            .context("running ip link show"),
    };
    out.is_ok_and(|o| o.status.success())
}

/// `inet`/`inet6` addresses from `ip -o addr show` lines.
fn parse_addresses(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_owned)
        })
        .collect()
}

/// A link name `hn<tag>-<pid hex>-<n hex>` unique to this process, at most 15 bytes.
///
/// `tag` is one or two lower-case ASCII letters.
pub fn unique_ifname(tag: &str) -> anyhow::Result<String> {
    if tag.is_empty() || tag.len() > 2 || !tag.bytes().all(|b| b.is_ascii_lowercase()) {
        bail!("link tag {tag:?} must be one or two lower-case letters");
    }
    let name = format!("{LINK_MARK}{tag}-{:x}-{:x}", std::process::id(), next_id());
    if name.len() > MAX_IFNAME_LEN {
        bail!("link name {name:?} is longer than {MAX_IFNAME_LEN} bytes");
    }
    Ok(name)
}

/// A veth pair in the host namespace with both ends up: a parent for macvlan or ipvlan links,
/// since this kernel has no `dummy`. Deleting one end deletes both, on drop.
#[derive(Debug)]
pub struct VethPair {
    master: String,
    peer: String,
}

impl VethPair {
    /// Creates `hn<tag>-...` and its peer `hnp-...`, both up.
    pub fn new(tag: &str) -> anyhow::Result<VethPair> {
        sweep_stale();
        let master = unique_ifname(tag)?;
        let peer = unique_ifname("p")?;
        ip([
            "link", "add", &master, "type", "veth", "peer", "name", &peer,
        ])?;
        let pair = VethPair { master, peer };
        ip(["link", "set", &pair.master, "up"])?;
        ip(["link", "set", &pair.peer, "up"])?;
        Ok(pair)
    }

    /// The end to use as `master` of macvlan/ipvlan links.
    pub fn master(&self) -> &str {
        &self.master
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Err(e) = ip(["link", "del", &self.master]) {
            eprintln!("hostnic-testkit: deleting veth {}: {e:#}", self.master);
        }
    }
}

/// A host link that something else creates (the `bridge` plugin's bridge, which it never
/// deletes): deleted on drop if it exists by then.
#[derive(Debug)]
pub struct LinkGuard {
    name: String,
}

impl LinkGuard {
    /// Reserves a unique name (see [`unique_ifname`]) for a link another program will create.
    pub fn reserve(tag: &str) -> anyhow::Result<LinkGuard> {
        sweep_stale();
        Ok(LinkGuard {
            name: unique_ifname(tag)?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if link_exists(None, &self.name) {
            if let Err(e) = ip(["link", "del", &self.name]) {
                eprintln!("hostnic-testkit: deleting link {}: {e:#}", self.name);
            }
        }
    }
}

/// Restores a sysctl (e.g. `net/ipv4/ip_forward`) to the value it had when the guard was made.
/// Plugins such as `ptp` and `bridge` (with `isGateway`) change host sysctls.
#[derive(Debug)]
pub struct SysctlGuard {
    path: PathBuf,
    saved: String,
}

impl SysctlGuard {
    /// `key` is relative to `/proc/sys`, with `/` separators.
    pub fn save(key: &str) -> anyhow::Result<SysctlGuard> {
        let path = Path::new("/proc/sys").join(key);
        let saved = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        Ok(SysctlGuard { path, saved })
    }

    pub fn saved(&self) -> &str {
        &self.saved
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let now = fs::read_to_string(&self.path).unwrap_or_default();
        if now.trim() != self.saved {
            if let Err(e) = fs::write(&self.path, format!("{}\n", self.saved)) {
                eprintln!(
                    "hostnic-testkit: restoring {} to {}: {e}",
                    self.path.display(),
                    self.saved
                );
            }
        }
    }
}

/// A `CNI_PATH` directory: symlinks to every reference plugin in `/usr/lib/cni` plus the given
/// plugin binaries (which win over a reference plugin of the same name). Removed on drop.
#[derive(Debug)]
pub struct CniPath {
    dir: tempfile::TempDir,
}

impl CniPath {
    pub fn new(plugins: &[&Path]) -> anyhow::Result<CniPath> {
        let dir = temp_dir("cni-path")?;
        let mut links: Vec<(String, PathBuf)> = Vec::new();
        if let Ok(entries) = fs::read_dir(REFERENCE_PLUGINS_DIR) {
            for entry in entries.flatten() {
                links.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ));
            }
        }
        for plugin in plugins {
            let name = plugin
                .file_name()
                .ok_or_else(|| anyhow!("plugin path {} has no file name", plugin.display()))?;
            let name = name.to_string_lossy().into_owned();
            links.retain(|(n, _)| *n != name);
            links.push((name, plugin.to_path_buf()));
        }
        for (name, target) in links {
            let link = dir.path().join(&name);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        }
        Ok(CniPath { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The plugin called `name` in this directory.
    pub fn plugin(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A temp dir `hostnic-tmp-<tag>-<pid>-<random>` (sockets, logs, configs), removed on drop, or
/// by the next test process if this one dies without unwinding.
pub fn temp_dir(tag: &str) -> anyhow::Result<tempfile::TempDir> {
    sweep_stale();
    tempfile::Builder::new()
        .prefix(&format!("{DIR_MARK}{tag}-{}-", std::process::id()))
        .tempdir()
        .with_context(|| format!("creating a {tag} temp dir"))
}

/// The per-invocation parameters a runtime passes to a CNI plugin in `CNI_*` variables.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    /// `CNI_COMMAND`: ADD, DEL, CHECK, VERSION, ...
    pub command: &'a str,
    pub container_id: &'a str,
    /// `CNI_NETNS`: the namespace's path under [`NETNS_DIR`].
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// `CNI_PATH`: where the plugin looks for delegates (its IPAM plugin).
    pub cni_path: &'a Path,
    /// `CNI_ARGS`, `KEY=VALUE;...`.
    pub args: &'a str,
}

/// What a plugin run produced.
#[derive(Debug)]
pub struct CniOutput {
    pub status: ExitStatus,
    /// The protocol channel: a result or an error JSON.
    pub stdout: String,
    /// Logs.
    pub stderr: String,
    pub elapsed: Duration,
}

impl CniOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Execs `plugin` as a runtime does: `CNI_*` from `call`, `config` on stdin, the result read
/// from stdout. The plugin is killed after 30 s; a non-zero exit is an `Ok` output (its error
/// JSON is on stdout), only failing to run it is an `Err`.
pub fn run_cni(plugin: &Path, call: &CniCall<'_>, config: &str) -> anyhow::Result<CniOutput> {
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", call.cni_path)
        .env("CNI_ARGS", call.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", plugin.display()))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that fails early may exit without reading stdin: EPIPE is not our error.
        let _ = stdin.write_all(config.as_bytes());
    }
    let status = wait_with_timeout(&mut child, CNI_TIMEOUT).with_context(|| {
        format!(
            "{} {} {}",
            plugin.display(),
            call.command,
            call.container_id
        )
    })?;
    let elapsed = start.elapsed();
    Ok(CniOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for the plugin")? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {timeout:?}: killed");
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `ip ARGS` in the host namespace; fails with its stderr unless it exits with 0.
fn ip<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let shown = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip {shown}` (is iproute2 installed?)"))?;
    check(&out, &format!("`ip {shown}`"))
}

fn check(out: &Output, what: &str) -> anyhow::Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Removes namespaces and links that carry the mark of a test process that no longer runs.
fn sweep_stale() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| {
        let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
        if let Ok(entries) = fs::read_dir(NETNS_DIR) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if stale_netns_pid(&name).is_some_and(|pid| !alive(pid)) {
                    let _ = ip(["netns", "del", &name]);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if stale_dir_pid(&name).is_some_and(|pid| !alive(pid)) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        if let Ok(text) = ip(["-o", "link", "show"]) {
            for line in text.lines() {
                let Some(name) = line.split(": ").nth(1) else {
                    continue;
                };
                let name = name.split('@').next().unwrap_or(name);
                if stale_link_pid(name).is_some_and(|pid| !alive(pid)) {
                    let _ = ip(["link", "del", name]);
                }
            }
        }
    });
}

/// The PID in `hnt-<tag>-<pid>-<n>`.
fn stale_netns_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_MARK)?;
    let mut parts = rest.rsplitn(3, '-');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// The PID in `hostnic-tmp-<tag>-<pid>-<random>`.
fn stale_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(DIR_MARK)?;
    let mut parts = rest.rsplitn(3, '-');
    parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// The PID in `hn<tag>-<pid hex>-<n hex>`.
fn stale_link_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(LINK_MARK)?;
    let mut parts = rest.split('-');
    let tag = parts.next()?;
    let pid = parts.next()?;
    let n = parts.next()?;
    if parts.next().is_some()
        || tag.is_empty()
        || tag.len() > 2
        || !tag.bytes().all(|b| b.is_ascii_lowercase())
    {
        return None;
    }
    u64::from_str_radix(n, 16).ok()?;
    u32::from_str_radix(pid, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_ifnamsiz_and_carry_the_pid() {
        let a = unique_ifname("ab").expect("valid tag");
        let b = unique_ifname("ab").expect("valid tag");
        assert_ne!(a, b);
        assert!(a.len() <= MAX_IFNAME_LEN, "{a}");
        assert_eq!(stale_link_pid(&a), Some(std::process::id()));
        // The longest PID (pid_max is at most 2^22) with a 3-digit counter still fits.
        assert!(format!("hnab-{:x}-{:x}", 1u32 << 22, 0xfffu32).len() <= MAX_IFNAME_LEN);
        assert!(unique_ifname("abc").is_err());
        assert!(unique_ifname("A").is_err());
    }

    #[test]
    fn only_marked_names_are_stale_candidates() {
        assert_eq!(stale_netns_pid("hnt-pod-1234-7"), Some(1234));
        assert_eq!(stale_netns_pid("hnt-a-b-1234-7"), Some(1234));
        assert_eq!(stale_netns_pid("cni-1234-7"), None);
        assert_eq!(stale_dir_pid("hostnic-tmp-cni-path-1234-Ab9x"), Some(1234));
        assert_eq!(stale_dir_pid("hostnic-etcd-1234-Ab9x"), None);
        assert_eq!(stale_link_pid("hnv-4d2-0"), Some(0x4d2));
        assert_eq!(stale_link_pid("eth0"), None);
        assert_eq!(stale_link_pid("hnv-4d2"), None);
        assert_eq!(stale_link_pid("br-0a1b2c3d4e5f"), None);
    }

    #[test]
    fn parses_ip_o_addr_lines() {
        let text = "2: eth0    inet 10.1.2.3/24 brd 10.1.2.255 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                    2: eth0    inet6 fd00::5/64 scope global \\       valid_lft forever preferred_lft forever\n";
        assert_eq!(parse_addresses(text), vec!["10.1.2.3/24", "fd00::5/64"]);
    }
}
