//! The real hostnic-ipamd binary and its socket: a directory others could write is refused,
//! directories are created 0755 whatever the umask, one daemon serves a socket at a time, and
//! nothing but a socket of its own is ever removed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{Network, StatusRequest};
use hostnic_testkit::{shared_single, unique_prefix};

const BINARY: &str = env!("CARGO_BIN_EXE_hostnic-ipamd");
/// How long a daemon may take to serve, or to exit when it must refuse.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A hostnic-ipamd process of a test, its output in a log file; SIGKILLed when dropped (and by
/// the kernel if the test process dies).
struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts the daemon on `socket` with keys under `prefix`; under `sh -c 'umask U; exec ...'`
    /// when `umask` is given.
    fn start(log: &Path, socket: &Path, prefix: &str, umask: Option<&str>) -> Process {
        let mut cmd = match umask {
            Some(u) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("umask {u}; exec \"$0\" \"$@\""), BINARY]);
                c
            }
            None => Command::new(BINARY),
        };
        let out = fs::File::create(log).expect("log file");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .arg("--etcd-endpoints")
            .arg(shared_single().endpoints().join(","))
            .args(["--node-name", "node-s", "--etcd-prefix", prefix])
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out);
        let child = hostnic_testkit::spawn_with_pdeathsig(&mut cmd).expect("spawns");
        Process {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("not yet stopped")
    }

    /// Its exit status once it exits, None if it still runs after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `socket` accepts connections; panics with the log if the daemon exits or
    /// does not get there in time.
    fn wait_serving(&mut self, socket: &Path) {
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                panic!("daemon exited ({status}) before serving:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "not serving {} after {TIMEOUT:?}:\n{}",
                socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status; SIGKILL if it does not exit in time.
    fn stop(&mut self) -> ExitStatus {
        let pid = self.child().id();
        hostnic_testkit::sigterm(pid).expect("SIGTERM");
        match self.wait_exit(TIMEOUT) {
            Some(status) => {
                self.child = None;
                status
            }
            None => panic!("ignored SIGTERM for {TIMEOUT:?}:\n{}", self.log()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("log {}:\n{}", self.log.display(), self.log());
            }
        }
    }
}

fn require_root(what: &str) -> bool {
    hostnic_testkit::require_root(what)
}

/// A temp dir for one test, removed when dropped (after the processes, declared later).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Which socket file is at a path: its device, inode and change time. The inode number alone
/// does not tell: a file created after another was removed may be given the same one.
fn socket_file(path: &Path) -> (u64, u64, i64, i64) {
    let m = fs::symlink_metadata(path).expect("socket exists");
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

/// One STATUS call answered over `socket`: a daemon is serving there, not just a listener.
async fn answers_status(socket: &Path) {
    let channel = hostnic_proto::connect(socket, Duration::from_secs(2))
        .await
        .expect("connects");
    let ipam = serde_json::json!({"type": "hostnic-ipam", "subnet": "10.93.0.0/24"});
    IpamClient::new(channel)
        .status(StatusRequest {
            network: Some(Network {
                name: "socket-test".into(),
                ipam_json: ipam.to_string(),
            }),
        })
        .await
        .expect("STATUS answered");
}

#[test]
fn a_socket_directory_others_can_write_or_not_owned_by_root_is_refused() {
    if !require_root("socket directory test (needs root to chown)") {
        return;
    }
    let dir = scratch();
    let run = dir.path().join("run");
    let socket = run.join("ipamd.sock");
    fs::create_dir(&run).expect("mkdir");
    let prefix = unique_prefix("socket-dir");

    fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut p = Process::start(&dir.path().join("a.log"), &socket, &prefix, None);
    let status = p.wait_exit(TIMEOUT).expect("refuses and exits");
    assert!(!status.success(), "{status}");
    let log = p.log();
    assert!(
        log.contains(&format!(
            "refusing to serve from socket directory {}: {} (mode 0777, owner uid 0) is writable \
             by group or others, so another user could put their own socket in the daemon's \
             place; make it owned by root and writable only by root",
            run.display(),
            run.display()
        )),
        "{log}"
    );
    assert!(!socket.exists(), "nothing bound");

    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).expect("chown");
    let mut p = Process::start(&dir.path().join("b.log"), &socket, &prefix, None);
    let status = p.wait_exit(TIMEOUT).expect("refuses and exits");
    assert!(!status.success(), "{status}");
    let log = p.log();
    assert!(
        log.contains("(mode 0755, owner uid 65534) is not owned by root"),
        "{log}"
    );
}

#[test]
fn directories_created_under_umask_000_are_0755() {
    if !require_root("socket directory creation test (the daemon serves only as root)") {
        return;
    }
    let dir = scratch();
    let top = dir.path().join("a");
    let socket = top.join("b/ipamd.sock");
    let mut p = Process::start(
        &dir.path().join("d.log"),
        &socket,
        &unique_prefix("socket-umask"),
        Some("000"),
    );
    p.wait_serving(&socket);
    for d in [&top, &top.join("b")] {
        let mode = fs::metadata(d).expect("created").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{}", d.display());
    }
    let mode = fs::metadata(&socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    assert!(p.stop().success());
    assert!(!socket.exists(), "its own socket removed on stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_socket_waits_for_the_first_then_takes_over() {
    if !require_root("second daemon test (the daemon serves only as root)") {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("run/ipamd.sock");
    let prefix = unique_prefix("socket-second");
    let mut first = Process::start(&dir.path().join("first.log"), &socket, &prefix, None);
    first.wait_serving(&socket);
    let bound_by_first = socket_file(&socket);

    let mut second = Process::start(&dir.path().join("second.log"), &socket, &prefix, None);
    let deadline = Instant::now() + TIMEOUT;
    while !second
        .log()
        .contains("another hostnic-ipamd holds the socket's lock")
    {
        assert!(
            second.child().try_wait().expect("try_wait").is_none(),
            "the second daemon exited instead of waiting:\n{}",
            second.log()
        );
        assert!(
            Instant::now() < deadline,
            "no waiting message:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = first.child().id();
    assert!(
        second.log().contains(&format!("holder=\"PID {pid}\"")),
        "names the first daemon's PID {pid}:\n{}",
        second.log()
    );
    // The first keeps its socket and answers on it.
    answers_status(&socket).await;
    assert_eq!(
        socket_file(&socket),
        bound_by_first,
        "the socket is still the first's"
    );
    assert!(
        !second.log().contains("server: serving"),
        "{}",
        second.log()
    );

    assert!(first.stop().success(), "{}", first.log());
    second.wait_serving(&socket);
    assert_ne!(
        socket_file(&socket),
        bound_by_first,
        "the second bound its own"
    );
    answers_status(&socket).await;
    assert!(second.log().contains("taking over"), "{}", second.log());
    assert!(second.stop().success(), "{}", second.log());
    assert!(!socket.exists(), "the second removed its socket on stop");
}

#[test]
fn a_stopping_daemon_leaves_a_socket_that_is_not_its_own() {
    if !require_root("socket removal test (the daemon serves only as root)") {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("run/ipamd.sock");
    let mut p = Process::start(
        &dir.path().join("d.log"),
        &socket,
        &unique_prefix("socket-other"),
        None,
    );
    p.wait_serving(&socket);
    // Someone else's socket put in its place.
    let other = dir.path().join("run/other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).expect("bind");
    fs::rename(&other, &socket).expect("rename");
    let theirs = socket_file(&socket);

    assert!(p.stop().success());
    assert_eq!(socket_file(&socket), theirs, "the other socket stays");
    assert!(
        p.log()
            .contains("the socket was replaced by another process: left in place"),
        "{}",
        p.log()
    );
}

#[test]
fn a_stale_socket_of_a_killed_daemon_is_replaced() {
    if !require_root("stale socket test (the daemon serves only as root)") {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("run/ipamd.sock");
    let prefix = unique_prefix("socket-stale");
    let mut killed = Process::start(&dir.path().join("a.log"), &socket, &prefix, None);
    killed.wait_serving(&socket);
    killed.child().kill().expect("SIGKILL");
    killed.child().wait().expect("reaped");
    assert!(socket.exists(), "SIGKILL leaves the socket");

    let mut next = Process::start(&dir.path().join("b.log"), &socket, &prefix, None);
    next.wait_serving(&socket);
    assert!(
        next.log().contains("replacing a stale socket"),
        "{}",
        next.log()
    );
    assert!(next.stop().success());
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_left_untouched() {
    if !require_root("socket path test (the daemon serves only as root)") {
        return;
    }
    let dir = scratch();
    let prefix = unique_prefix("socket-file");
    let file = dir.path().join("precious.txt");
    fs::write(&file, "keep me").expect("write");
    let sub = dir.path().join("a-directory");
    fs::create_dir(&sub).expect("mkdir");

    for (path, kind) in [(&file, "a regular file"), (&sub, "a directory")] {
        let mut p = Process::start(&dir.path().join("d.log"), path, &prefix, None);
        let status = p.wait_exit(TIMEOUT).expect("refuses and exits");
        assert!(!status.success(), "{status}");
        let log = p.log();
        assert!(
            log.contains(&format!(
                "{} exists and is {kind}, not a socket: hostnic-ipamd only ever replaces a stale \
                 socket; remove it yourself or choose another --socket",
                path.display()
            )),
            "{log}"
        );
    }
    assert_eq!(fs::read_to_string(&file).expect("still there"), "keep me");
    assert!(sub.is_dir());
}
