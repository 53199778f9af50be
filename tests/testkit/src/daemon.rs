//! A `hostnic-ipamd` process for tests and benchmarks: started on a socket of the test's own,
//! ready once the socket accepts a connection, stopped (SIGTERM, then SIGKILL) when dropped.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a daemon may take to serve its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running daemon; its log (stdout and stderr) goes to a file beside its socket.
#[derive(Debug)]
pub struct IpamDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub node: String,
    log: PathBuf,
}

impl IpamDaemon {
    /// Starts `binary` for `node` on `socket`, with keys under `prefix` of `endpoints`, plus
    /// `extra_args`. The kernel kills it if the test process dies without unwinding.
    pub fn start(
        binary: &Path,
        endpoints: &[String],
        node: &str,
        prefix: &str,
        socket: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<IpamDaemon> {
        if let Some(dir) = socket.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = socket.with_extension(format!("{node}.log"));
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .arg("--etcd-endpoints")
            .arg(endpoints.join(","))
            .args(["--node-name", node, "--etcd-prefix", prefix])
            .arg("--socket")
            .arg(socket)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = crate::sys::spawn_with_pdeathsig(&mut cmd)
            .with_context(|| format!("spawning {}", binary.display()))?;
        let mut daemon = IpamDaemon {
            child: Some(child),
            socket: socket.to_owned(),
            node: node.to_owned(),
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "hostnic-ipamd ({node}) exited before it was ready: {status}\n{}",
                    daemon.log_tail()
                );
            }
            if UnixStream::connect(&daemon.socket).is_ok() {
                return Ok(daemon);
            }
            if Instant::now() >= deadline {
                bail!(
                    "hostnic-ipamd ({node}) not serving {} after {READY_TIMEOUT:?}\n{}",
                    daemon.socket.display(),
                    daemon.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL. Returns how it ended and how long
    /// it took; None if it was already stopped.
    pub fn stop(&mut self) -> Option<(ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        let start = Instant::now();
        if matches!(child.try_wait(), Ok(None)) {
            // Not reaped yet, so the PID is still ours.
            let _ = crate::sys::sigterm(child.id());
            while start.elapsed() < STOP_GRACE {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some((status, start.elapsed()));
                }
                thread::sleep(Duration::from_millis(10));
            }
            eprintln!(
                "hostnic-ipamd ({}) ignored SIGTERM for {STOP_GRACE:?}: SIGKILL",
                self.node
            );
            let _ = child.kill();
        }
        child.wait().ok().map(|s| (s, start.elapsed()))
    }

    /// SIGKILL, as a crash or an OOM kill ends a daemon: no shutdown, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The daemon's process id while it runs (for `/proc/<pid>/status` in benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's log file (stdout and stderr). A daemon started again for the same node on
    /// the same socket appends to it.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log's last lines once `logged` holds for them, waiting up to `within`; the last
    /// lines as they are if it never does. For what a daemon logs after the change a test
    /// observes (a GC pass logs its releases once the pass is over).
    pub fn log_tail_once(&self, logged: impl Fn(&str) -> bool, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let tail = self.log_tail();
            if logged(&tail) || Instant::now() >= deadline {
                return tail;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n  ");
        format!(
            "last lines of hostnic-ipamd ({}) log {}:\n  {tail}",
            self.node,
            self.log.display()
        )
    }
}

impl Drop for IpamDaemon {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}
