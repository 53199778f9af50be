//! Throwaway etcd for tests.
//!
//! Every crate's tests run against a real etcd (see `docs/environment.md`): a fake would not show
//! the behaviour the allocator must survive (a failed compare that is still `Ok`, a leader that
//! dies, a client that keeps talking to a dead endpoint). This crate starts 1- or 3-member
//! clusters on loopback, on free ports, with data on `/dev/shm`, and makes sure they go away:
//! on `Drop`, at process exit for the shared clusters, and through `PR_SET_PDEATHSIG` if the test
//! process dies without running either.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

pub mod bins;
pub mod certs;
pub mod daemon;
pub mod kube;
pub mod netns;

/// How long `start` and `restart_member` wait for a member to report healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a member gets to exit after SIGTERM before it is killed (etcd can ignore SIGTERM
/// for more than 3 s while it tries to hand over leadership).
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Whole-cluster start attempts when a port picked as free was taken before etcd bound it.
const START_ATTEMPTS: usize = 3;
/// Data directories are named `hostnic-etcd-<pid>-<random>` so that leftovers of a dead test
/// process can be recognised and removed.
const DIR_PREFIX: &str = "hostnic-etcd-";
const LOG_TAIL_LINES: usize = 25;
/// Read timeout of `/health` and `/metrics` requests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// A throwaway etcd cluster of one or more members on 127.0.0.1.
///
/// Members run with `--heartbeat-interval 25 --election-timeout 250` so a test that kills the
/// leader sees writes resume within about a second. Dropping the cluster stops every member
/// (SIGTERM, then SIGKILL after 3 s) and removes its data directory, also when the test panicked.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    etcd: PathBuf,
    token: String,
    initial_cluster: String,
    members: Vec<Member>,
    tls: Option<ServerTls>,
    /// Flags passed to every member after the testkit's own (`start_with_flags`).
    extra_flags: Vec<OsString>,
    shut_down: AtomicBool,
}

/// PEM files that make a cluster serve its clients over TLS and require client certificates.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, also when clients need TLS.
    metrics_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
}

impl EtcdCluster {
    /// Starts `members` etcd processes forming one cluster and blocks until every one of them
    /// answers `GET /health` with `{"health":"true"}` (at most ~15 s).
    ///
    /// Ports are picked free by binding `127.0.0.1:0`; if one was taken before etcd bound it, the
    /// whole start is retried (3 attempts). Fails with the tail of the member's log if a member
    /// exits or stays unhealthy, and with a pointer to `scripts/install-deps.sh` if there is no
    /// `etcd` binary.
    pub fn start(members: usize) -> anyhow::Result<EtcdCluster> {
        Self::start_with(members, None, &[])
    }

    /// Like `start`, with `flags` added to every member's command line (and kept for
    /// restarts), e.g. `["--quota-backend-bytes", "..."]`.
    pub fn start_with_flags(members: usize, flags: &[&str]) -> anyhow::Result<EtcdCluster> {
        let flags: Vec<OsString> = flags.iter().map(OsString::from).collect();
        Self::start_with(members, None, &flags)
    }

    /// Like `start`, with client URLs on https that require a client certificate signed by
    /// `tls.ca`.
    pub fn start_tls(members: usize, tls: ServerTls) -> anyhow::Result<EtcdCluster> {
        Self::start_with(members, Some(tls), &[])
    }

    fn start_with(
        members: usize,
        tls: Option<ServerTls>,
        flags: &[OsString],
    ) -> anyhow::Result<EtcdCluster> {
        if members == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let etcd = find_etcd(std::env::var_os("PATH"))?;
        sweep_stale_dirs();
        let mut attempt = 1;
        loop {
            match Self::try_start(&etcd, members, tls.clone(), flags) {
                Ok(cluster) => return Ok(cluster),
                Err(e) if attempt < START_ATTEMPTS && is_port_conflict(&e) => attempt += 1,
                Err(e) => {
                    return Err(e.context(format!(
                        "starting a {members}-member etcd cluster (attempt {attempt} of {START_ATTEMPTS})"
                    )))
                }
            }
        }
    }

    fn try_start(
        etcd: &Path,
        count: usize,
        tls: Option<ServerTls>,
        flags: &[OsString],
    ) -> anyhow::Result<EtcdCluster> {
        let dir = make_data_dir()?;
        let ports = free_ports(3 * count)?;
        let members: Vec<Member> = (0..count)
            .map(|i| Member {
                name: format!("n{i}"),
                client_port: ports[3 * i],
                peer_port: ports[3 * i + 1],
                metrics_port: ports[3 * i + 2],
                data_dir: dir.join(format!("n{i}")),
                log_path: dir.join(format!("etcd-{i}.log")),
                child: Mutex::new(None),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "hostnic-test".to_owned());
        // From here on, Drop cleans up whatever was started if a step fails.
        let cluster = EtcdCluster {
            dir,
            etcd: etcd.to_owned(),
            token,
            initial_cluster,
            members,
            tls,
            extra_flags: flags.to_vec(),
            shut_down: AtomicBool::new(false),
        };
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        for i in 0..count {
            // A new member first asks its peers whether the cluster already exists (1 s timeout
            // per peer), before it serves its own peer port. Started together, members wait on
            // each other: about one start in four stalled 1-2 s. Starting each member once the
            // previous one serves its peer port avoids that.
            if i > 0 {
                cluster.wait_until(&[i - 1], "serving peers", deadline, |m| {
                    match http_get(m.peer_port, "/members", HTTP_TIMEOUT) {
                        Ok(r) if r.status == 200 => Ok(()),
                        Ok(r) => Err(format!("GET /members on the peer port: {}", r.status)),
                        Err(e) => Err(format!("GET /members on the peer port: {e}")),
                    }
                })?;
            }
            cluster.spawn_member(i, "new")?;
        }
        cluster.wait_healthy(&(0..count).collect::<Vec<_>>(), deadline)?;
        Ok(cluster)
    }

    /// Client URLs (`http://127.0.0.1:PORT`), one per member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`, for tests that must talk to one member only.
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// Number of members the cluster was started with (running or not).
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The cluster's data directory (member data and logs), removed on drop.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// PID of member `i` while it runs, so tests can check that nothing outlives the cluster.
    pub fn member_pid(&self, i: usize) -> Option<u32> {
        let mut child = lock(&self.members[i].child);
        match child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => child.as_ref().map(Child::id),
            _ => None,
        }
    }

    /// Kills member `i` with SIGKILL (a crash, for fault tests). No-op if it is not running.
    ///
    /// Panics if `i >= member_count()`.
    pub fn kill_member(&self, i: usize) {
        if let Some(mut child) = lock(&self.members[i].child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops member `i` cleanly: SIGTERM, up to 3 s to exit, then SIGKILL. No-op if it is not
    /// running.
    ///
    /// Panics if `i >= member_count()`.
    pub fn stop_member(&self, i: usize) {
        let child = lock(&self.members[i].child).take();
        terminate_all(child.into_iter().collect());
    }

    /// Freezes member `i` with SIGSTOP: it keeps its sockets but answers nothing, as a member
    /// stalled by a long GC pause, a full disk or a hung VM does. No-op if it is not running.
    /// `resume_member` undoes it; dropping the cluster resumes paused members before stopping
    /// them.
    ///
    /// Panics if `i >= member_count()`.
    pub fn pause_member(&self, i: usize) {
        if let Some(child) = lock(&self.members[i].child).as_ref() {
            let _ = sys::signal(child.id(), libc::SIGSTOP);
            // The signal is asynchronous: on a busy machine the member may still answer a
            // request sent right after kill(2) returns. Wait until every thread is stopped.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !is_stopped(child.id()) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Lets a member frozen by `pause_member` run again (SIGCONT). No-op if it is not running.
    ///
    /// Panics if `i >= member_count()`.
    pub fn resume_member(&self, i: usize) {
        if let Some(child) = lock(&self.members[i].child).as_ref() {
            let _ = sys::signal(child.id(), libc::SIGCONT);
        }
    }

    /// Starts member `i` again with its old name, ports and data directory, and waits until it
    /// is healthy (in a 3-member cluster that needs a quorum). A running member is stopped first.
    pub fn restart_member(&self, i: usize) -> anyhow::Result<()> {
        self.stop_member(i);
        // The member's WAL makes etcd ignore the initial-cluster flags; `existing` covers a
        // member killed before it wrote one, which must join rather than bootstrap.
        let state = if self.members.len() > 1 {
            "existing"
        } else {
            "new"
        };
        self.spawn_member(i, state)?;
        self.wait_healthy(&[i], Instant::now() + HEALTHY_TIMEOUT)
            .with_context(|| format!("restarting etcd member {}", self.members[i].name))
    }

    /// Index of the member that currently says it is leader (`etcd_server_is_leader 1` in its
    /// `/metrics`), or `None` while there is none (election in progress, no quorum).
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.member_pid(i).is_some()
                && http_get(self.members[i].metrics_port, "/metrics", HTTP_TIMEOUT).is_ok_and(
                    |resp| {
                        resp.body
                            .lines()
                            .any(|l| l.trim_end() == "etcd_server_is_leader 1")
                    },
                )
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn spawn_member(&self, i: usize, state: &str) -> anyhow::Result<()> {
        let m = &self.members[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .with_context(|| format!("opening {}", m.log_path.display()))?;
        let client = self.endpoint(i);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let mut args: Vec<OsString> = [
            "--name",
            &m.name,
            "--data-dir",
            &m.data_dir.to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            &self.token,
            "--heartbeat-interval",
            "25",
            "--election-timeout",
            "250",
            "--listen-metrics-urls",
            &metrics,
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        if let Some(tls) = &self.tls {
            args.extend(
                [
                    ("--trusted-ca-file", &tls.ca),
                    ("--cert-file", &tls.cert),
                    ("--key-file", &tls.key),
                ]
                .iter()
                .flat_map(|(flag, path)| [OsString::from(flag), path.as_os_str().to_owned()]),
            );
            args.push("--client-cert-auth".into());
        }
        args.extend(self.extra_flags.iter().cloned());
        let child = spawn_on_long_lived_thread(SpawnRequest {
            program: self.etcd.clone(),
            args,
            log,
        })
        .with_context(|| format!("spawning {} for member {}", self.etcd.display(), m.name))?;
        *lock(&m.child) = Some(child);
        Ok(())
    }

    /// Waits until every given member answers `GET /health` with `{"health":"true"}` (which
    /// etcd only does once it has a leader and has published itself to the cluster).
    fn wait_healthy(&self, members: &[usize], deadline: Instant) -> anyhow::Result<()> {
        self.wait_until(members, "healthy", deadline, |m| {
            match http_get(m.metrics_port, "/health", HTTP_TIMEOUT) {
                Ok(r) if r.status == 200 && r.body.contains(r#""health":"true""#) => Ok(()),
                Ok(r) => Err(format!("GET /health: {} {}", r.status, r.body.trim())),
                Err(e) => Err(format!("GET /health: {e}")),
            }
        })
    }

    /// Polls `ready` for the given members until all are, one exits, or `deadline` passes; the
    /// error names the member and quotes the tail of its log.
    fn wait_until(
        &self,
        members: &[usize],
        state: &str,
        deadline: Instant,
        ready: impl Fn(&Member) -> Result<(), String>,
    ) -> anyhow::Result<()> {
        let mut pending = members.to_vec();
        let mut last_reason = String::new();
        loop {
            let mut still = Vec::new();
            for &i in &pending {
                let m = &self.members[i];
                let exited = match lock(&m.child).as_mut() {
                    None => Some("is not running".to_owned()),
                    Some(c) => match c.try_wait() {
                        Ok(Some(status)) => Some(format!("exited ({status})")),
                        Ok(None) => None,
                        Err(e) => Some(format!("cannot be waited for ({e})")),
                    },
                };
                if let Some(why) = exited {
                    bail!(
                        "etcd member {} (client {}) {why} before it was {state}\n{}",
                        m.name,
                        self.endpoint(i),
                        m.log_tail()
                    );
                }
                if let Err(why) = ready(m) {
                    if still.is_empty() {
                        last_reason = why;
                    }
                    still.push(i);
                }
            }
            pending = still;
            let Some(&first) = pending.first() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                let m = &self.members[first];
                bail!(
                    "etcd member {} (client {}) not {state} after {:?} (last check: {last_reason})\n{}",
                    m.name,
                    self.endpoint(first),
                    HEALTHY_TIMEOUT,
                    m.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every member and removes the data directory; idempotent.
    fn shut_down(&self) {
        shut_down_all(&[self]);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Member {
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = format!("last lines of {}:", self.log_path.display());
        for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
            let _ = write!(out, "\n  {line}");
        }
        out
    }
}

/// Stops the members of several clusters at once (SIGTERM to all, one shared grace period) and
/// removes their data directories. Clusters already shut down are skipped.
fn shut_down_all(clusters: &[&EtcdCluster]) {
    let clusters: Vec<&EtcdCluster> = clusters
        .iter()
        .copied()
        .filter(|c| !c.shut_down.swap(true, Ordering::SeqCst))
        .collect();
    // A leader that gets SIGTERM while its followers are up first hands leadership over; if the
    // followers are stopping too, that handover hangs for seconds. Followers first, then
    // leaders (which, alone, exit at once).
    let leaders: Vec<Option<usize>> = clusters.iter().map(|c| c.leader()).collect();
    let mut followers = Vec::new();
    let mut last = Vec::new();
    for (c, leader) in clusters.iter().zip(&leaders) {
        for (i, m) in c.members.iter().enumerate() {
            if let Some(child) = lock(&m.child).take() {
                if Some(i) == *leader {
                    last.push(child);
                } else {
                    followers.push(child);
                }
            }
        }
    }
    terminate_all(followers);
    // ...but a leader notices a dead follower only when a send to it fails (within a few
    // heartbeats); until then it would still try to hand over to it.
    let deadline = Instant::now() + Duration::from_secs(1);
    for (c, leader) in clusters.iter().zip(&leaders) {
        let Some(port) = leader.map(|i| c.members[i].metrics_port) else {
            continue;
        };
        while Instant::now() < deadline && has_active_peers(port) {
            thread::sleep(Duration::from_millis(10));
        }
    }
    terminate_all(last);
    for c in clusters {
        if let Err(e) = fs::remove_dir_all(&c.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("hostnic-testkit: removing {}: {e}", c.dir.display());
            }
        }
    }
}

/// True if the member at client `port` still counts a peer as reachable (its
/// `etcd_network_active_peers` gauge); false also when it cannot be asked.
fn has_active_peers(port: u16) -> bool {
    http_get(port, "/metrics", Duration::from_millis(500)).is_ok_and(|r| {
        r.body
            .lines()
            .any(|l| l.starts_with("etcd_network_active_peers{") && l.ends_with(" 1"))
    })
}

/// SIGTERM to every child, up to `STOP_GRACE` for all of them to exit, then SIGKILL; reaps all.
fn terminate_all(mut children: Vec<Child>) {
    children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    for c in &children {
        // The child is not reaped yet, so its PID cannot have been reused. A paused member
        // handles SIGTERM only once it runs again.
        let _ = sys::signal(c.id(), libc::SIGCONT);
        let _ = sys::signal(c.id(), libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !children.is_empty() && Instant::now() < deadline {
        children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        thread::sleep(Duration::from_millis(10));
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_port_conflict(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("address already in use")
}

/// Looks `etcd` up on `path_var` (the `PATH` value) so that a missing binary is reported as a
/// setup step rather than as a spawn error.
fn find_etcd(path_var: Option<OsString>) -> anyhow::Result<PathBuf> {
    path_var
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no `etcd` binary on PATH: run scripts/install-deps.sh \
                 (installs Debian's etcd-server and etcd-client)"
            )
        })
}

/// Picks `n` distinct free loopback ports by holding `n` listeners on port 0 at once.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .context("binding 127.0.0.1:0 to find free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A fresh `hostnic-etcd-<pid>-XXXXXX` directory on `/dev/shm` (etcd 3.4 fsyncs every write and
/// has no flag to stop it; tmpfs makes fsync free), or in the temp dir if `/dev/shm` is unusable.
fn make_data_dir() -> anyhow::Result<PathBuf> {
    let prefix = format!("{DIR_PREFIX}{}-", std::process::id());
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix);
        b
    };
    let dir = builder
        .tempdir_in("/dev/shm")
        .or_else(|_| builder.tempdir())
        .context("creating an etcd data directory in /dev/shm or the temp dir")?;
    // Removal is ours (Drop, atexit), not TempDir's: shared clusters are never dropped.
    Ok(dir.keep())
}

/// Removes data directories left by test processes that died without cleaning up (SIGKILL,
/// abort): their etcd members died with them through PDEATHSIG, only the files remain.
fn sweep_stale_dirs() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| {
        if !Path::new("/proc/self").exists() {
            return;
        }
        for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
            let Ok(entries) = fs::read_dir(&base) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(DIR_PREFIX))
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    body: String,
}

/// A minimal HTTP/1.0 GET: enough for etcd's `/health`, `/metrics` and peer `/members` without
/// an HTTP crate.
///
/// Reads up to `Content-Length` rather than to EOF: etcd's peer port answers at once but can keep
/// the connection open for seconds (reading to EOF made a healthy member look unresponsive).
/// Without `Content-Length` (the large `/metrics`), the body ends at EOF.
fn http_get(port: u16, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    // One write, so the request leaves in one segment (`write!` writes piece by piece).
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // (end of headers, Content-Length) once the headers are in.
    let mut framing: Option<(usize, Option<usize>)> = None;
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if framing.is_none() {
            if let Some(pos) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..pos]);
                let length = head.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                });
                framing = Some((pos + 4, length));
            }
        }
        if let Some((body_start, Some(length))) = framing {
            if raw.len() >= body_start + length {
                raw.truncate(body_start + length);
                break;
            }
        }
    }
    let (body_start, _) = framing.ok_or_else(|| invalid("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..body_start]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no HTTP status"))?;
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&raw[body_start..]).into_owned(),
    })
}

#[derive(Debug)]
struct SpawnRequest {
    program: PathBuf,
    args: Vec<OsString>,
    log: File,
}

type SpawnReply = mpsc::Sender<io::Result<Child>>;

/// Spawns on a thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and libtest runs
/// every test on a thread of its own, so a member spawned by the test thread would be killed as
/// soon as the test that first touched a shared cluster returned.
fn spawn_on_long_lived_thread(req: SpawnRequest) -> anyhow::Result<Child> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<(SpawnRequest, SpawnReply)>, String>> =
        OnceLock::new();
    let spawner = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<(SpawnRequest, SpawnReply)>();
            thread::Builder::new()
                .name("etcd-spawner".to_owned())
                .spawn(move || {
                    // Never ends: the static sender is never dropped.
                    for (req, reply) in rx {
                        let _ = reply.send(spawn_member_process(req));
                    }
                })
                .map(|_| tx)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| anyhow!("starting the etcd spawner thread: {e}"))?;
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((req, reply_tx))
        .map_err(|_| anyhow!("the etcd spawner thread is gone"))?;
    let spawned = reply_rx
        .recv()
        .map_err(|_| anyhow!("the etcd spawner thread did not answer"))?;
    Ok(spawned?)
}

fn spawn_member_process(req: SpawnRequest) -> io::Result<Child> {
    let stderr = req.log.try_clone()?;
    let mut cmd = Command::new(&req.program);
    cmd.args(&req.args)
        .stdin(Stdio::null())
        .stdout(req.log)
        .stderr(stderr);
    sys::spawn_with_pdeathsig(&mut cmd)
}

static SHARED_SINGLE: OnceLock<EtcdCluster> = OnceLock::new();
static SHARED_CLUSTER3: OnceLock<EtcdCluster> = OnceLock::new();

/// One single-member etcd per test binary, started on first use and stopped at process exit.
///
/// Starting etcd costs 0.2–1 s, so tests share it and keep apart with [`unique_prefix`]. Do not
/// kill or restart its member: use [`EtcdCluster::start`] for fault tests. Panics if etcd cannot
/// start (tests cannot proceed without it).
pub fn shared_single() -> &'static EtcdCluster {
    shared(&SHARED_SINGLE, 1)
}

/// One 3-member cluster per test binary, started on first use and stopped at process exit.
///
/// Same sharing rules as [`shared_single`].
pub fn shared_cluster3() -> &'static EtcdCluster {
    shared(&SHARED_CLUSTER3, 3)
}

fn shared(cell: &'static OnceLock<EtcdCluster>, members: usize) -> &'static EtcdCluster {
    cell.get_or_init(|| {
        static AT_EXIT: Once = Once::new();
        AT_EXIT.call_once(|| {
            if let Err(e) = sys::at_exit(stop_shared_clusters) {
                eprintln!("hostnic-testkit: atexit registration failed ({e}); shared etcd members still die with the process");
            }
        });
        EtcdCluster::start(members)
            .unwrap_or_else(|e| panic!("starting the shared {members}-member etcd: {e:#}"))
    })
}

/// Statics are never dropped, so the shared clusters are stopped here, at `exit()`.
extern "C" fn stop_shared_clusters() {
    // A panic must not unwind into libc.
    let _ = std::panic::catch_unwind(|| {
        let shared: Vec<&EtcdCluster> = [&SHARED_SINGLE, &SHARED_CLUSTER3]
            .into_iter()
            .filter_map(OnceLock::get)
            .collect();
        shut_down_all(&shared);
    });
}

/// A key prefix no other test (in this or a concurrent test process) uses:
/// `/t/<test_name>-<pid>-<counter>`. Tests sharing one etcd put all their keys under it.
pub fn unique_prefix(test_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("/t/{test_name}-{}-{n}", std::process::id())
}

/// True when running as root. Otherwise prints `SKIPPED <what>: needs root` to stderr and
/// returns false, so a test that needs namespaces or links skips loudly instead of failing.
pub fn require_root(what: &str) -> bool {
    if sys::is_root() {
        true
    } else {
        skip_unless_ci(what, "needs root");
        false
    }
}

/// Environment variable naming a file to which every skip is also appended, one line each, so
/// that `scripts/test.sh` can count skips exactly instead of reading them out of interleaved
/// test output. Unset (a plain `cargo test`), skips are only printed.
pub const SKIP_LOG_ENV: &str = "HOSTNIC_TEST_SKIP_LOG";

/// Says that a test is skipped: it returns without checking what it is about. Printed as
/// `SKIPPED <what>: <why>` on the real stderr (libtest captures `eprintln!` of passing tests, and
/// a skip nobody sees is a pass nobody earned), and recorded in [`SKIP_LOG_ENV`]'s file.
pub fn report_skip(what: &str, why: &str) {
    record_skip(SkipKind::Test, what, why);
}

/// Says that one part of a test is not run (a CNI version a reference plugin does not speak)
/// while the test goes on and checks the rest: `SKIPPED part of <test>: <what>: <why>`. Counted
/// apart from skipped tests, since the test still passes or fails on what it checked.
pub fn report_skipped_part(what: &str, why: &str) {
    record_skip(SkipKind::Part, what, why);
}

#[derive(Debug, Clone, Copy)]
enum SkipKind {
    Test,
    Part,
}

fn record_skip(kind: SkipKind, what: &str, why: &str) {
    let what = one_line(what);
    let why = one_line(why);
    // libtest names each test's thread after the test; the executable tells crates apart.
    let test = thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_owned();
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // One write each: a line written piecemeal to unbuffered stderr can be split by another
    // thread's output.
    let line = match kind {
        SkipKind::Test => format!("SKIPPED {what}: {why}\n"),
        SkipKind::Part => format!("SKIPPED part of {test}: {what}: {why}\n"),
    };
    let _ = io::stderr().lock().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
        let kind = match kind {
            SkipKind::Test => "test",
            SkipKind::Part => "part",
        };
        let record = format!("{kind}\t{exe}\t{}\t{what}: {why}\n", one_line(&test));
        // O_APPEND and one write: records of concurrent tests and processes do not interleave.
        let _ = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut f| f.write_all(record.as_bytes()));
    }
}

/// Tabs and newlines would break the skip log's one-record-per-line format.
fn one_line(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// A missing prerequisite that CI always has (root, network namespaces) fails the test under
/// CI (`CI` set), where it means the machine is broken; elsewhere the test is skipped.
pub fn skip_unless_ci(what: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{what} cannot run in CI: {why}");
    }
    report_skip(what, why);
}

/// Spawns `cmd` so that the kernel SIGKILLs it if the test process dies without unwinding, for
/// processes [`daemon::IpamDaemon`] does not fit (one expected to fail, or to wait its turn).
pub fn spawn_with_pdeathsig(cmd: &mut Command) -> io::Result<Child> {
    sys::spawn_with_pdeathsig(cmd)
}

/// Sends SIGTERM to `pid`; pass only PIDs of children not yet reaped.
pub fn sigterm(pid: u32) -> io::Result<()> {
    sys::sigterm(pid)
}

#[allow(unsafe_code)] // libc calls std has no safe wrapper for: prctl in pre_exec, kill (SIGTERM, SIGSTOP, SIGCONT), geteuid, atexit
mod sys {
    use std::io;
    use std::os::unix::process::CommandExt as _;
    use std::process::{Child, Command};

    /// Spawns `cmd` so that the kernel SIGKILLs it when the spawning thread (and so, when
    /// spawned from the long-lived spawner thread, the process) dies.
    pub(crate) fn spawn_with_pdeathsig(cmd: &mut Command) -> io::Result<Child> {
        let parent = std::process::id();
        // SAFETY: runs between fork and exec; it only makes async-signal-safe syscalls and
        // neither allocates nor takes locks (last_os_error/from_raw_os_error do not allocate).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect: then nobody would kill us.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        cmd.spawn()
    }

    /// Sends `sig` to `pid`; callers pass only PIDs of children not yet reaped.
    pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn sigterm(pid: u32) -> io::Result<()> {
        signal(pid, libc::SIGTERM)
    }

    pub(crate) fn is_root() -> bool {
        // SAFETY: geteuid cannot fail and has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    pub(crate) fn at_exit(f: extern "C" fn()) -> io::Result<()> {
        // SAFETY: `f` is a plain function that never unwinds (it catches panics).
        if unsafe { libc::atexit(f) } != 0 {
            return Err(io::Error::other("atexit failed"));
        }
        Ok(())
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn is_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_etcd_points_at_install_script() {
        let err = find_etcd(Some(OsString::new())).expect_err("empty PATH has no etcd");
        assert!(err.to_string().contains("scripts/install-deps.sh"), "{err}");
        let err = find_etcd(None).expect_err("no PATH has no etcd");
        assert!(err.to_string().contains("scripts/install-deps.sh"));
    }

    #[test]
    fn unique_prefixes_differ_and_name_the_test() {
        let a = unique_prefix("alpha");
        let b = unique_prefix("alpha");
        assert_ne!(a, b);
        assert!(
            a.starts_with(&format!("/t/alpha-{}-", std::process::id())),
            "{a}"
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(6).expect("free ports");
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
    }
}
