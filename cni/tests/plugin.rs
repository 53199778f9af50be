//! The real `hostnic-ipam` binary, run as a runtime runs it: a clean environment, the config on
//! stdin, the reply on stdout. Errors must be one CNI error object with the right code and a
//! message naming the problem; the daemon is either absent or an in-process fake served over a
//! temporary unix socket.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostnic_proto::v1;
use hostnic_proto::v1::ipam_server::{Ipam, IpamServer};
use serde_json::{json, Value};
use tonic::{Code, Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_hostnic-ipam");
const CID: &str = "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755";
const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=3f6940ab;K8S_POD_UID=9b2c5e4e";

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn run(env: &[(&str, &str)], stdin: &str) -> Run {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    Run {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
        took: started.elapsed(),
    }
}

/// The environment of an attachment command, plus `extra`.
fn attachment_env<'a>(command: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", CID),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "net1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    env.extend_from_slice(extra);
    env
}

fn conf(version: &str, socket: &Path, extra: Value) -> String {
    let mut conf = json!({
        "cniVersion": version,
        "name": "macvlan-net",
        "type": "macvlan",
        "ipam": {
            "type": "hostnic-ipam",
            "socket": socket,
            "subnet": "10.0.0.0/24",
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}],
            // Fail at once without a daemon; the tests of the wait for a restarting daemon
            // set their own.
            "daemonWaitSeconds": 0,
        },
    });
    merge(&mut conf, extra);
    conf.to_string()
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                merge(into.entry(key).or_insert(Value::Null), value);
            }
        }
        (into, from) => *into = from,
    }
}

/// Asserts that the run failed with one error object of `code` whose `msg` contains every one of
/// `names`, and returns the object.
fn assert_error(run: &Run, code: u64, names: &[&str]) -> Value {
    assert!(!run.success, "exit status must be non-zero: {run:?}");
    let reply: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {run:?}"));
    let object = reply.as_object().unwrap();
    for key in object.keys() {
        assert!(
            ["cniVersion", "code", "msg", "details"].contains(&key.as_str()),
            "unexpected key {key}: {reply}"
        );
    }
    assert_eq!(reply["code"], code, "{reply}");
    assert!(reply["cniVersion"].is_string(), "{reply}");
    let msg = reply["msg"].as_str().unwrap();
    for name in names {
        assert!(msg.contains(name), "msg must name {name:?}: {reply}");
    }
    reply
}

fn missing_socket() -> PathBuf {
    PathBuf::from("/nonexistent/hostnic/ipamd.sock")
}

// ---- without a daemon ----

#[test]
fn malformed_json_is_code_6() {
    let run = run(&attachment_env("ADD", &[]), r#"{"cniVersion": "1.0.0", "#);
    assert_error(&run, 6, &["network config"]);
}

#[test]
fn missing_cni_command_is_code_4() {
    let conf = conf("1.0.0", &missing_socket(), json!({}));
    let run = run(&[("CNI_CONTAINERID", CID), ("CNI_IFNAME", "eth0")], &conf);
    let reply = assert_error(&run, 4, &["CNI_COMMAND"]);
    assert_eq!(reply["cniVersion"], "1.0.0", "the config's version");
}

#[test]
fn missing_container_id_or_ifname_is_code_4_naming_it() {
    let conf = conf("1.0.0", &missing_socket(), json!({}));
    for var in ["CNI_CONTAINERID", "CNI_IFNAME"] {
        let env: Vec<_> = attachment_env("ADD", &[])
            .into_iter()
            .filter(|(k, _)| *k != var)
            .collect();
        assert_error(&run(&env, &conf), 4, &[var]);
    }
    let env: Vec<_> = attachment_env("DEL", &[])
        .into_iter()
        .filter(|(k, _)| *k != "CNI_IFNAME")
        .collect();
    assert_error(&run(&env, &conf), 4, &["CNI_IFNAME"]);
}

#[test]
fn unknown_cni_version_is_code_1() {
    let conf = conf("9.9.9", &missing_socket(), json!({}));
    let run = run(&attachment_env("ADD", &[]), &conf);
    assert_error(&run, 1, &["9.9.9"]);
}

#[test]
fn invalid_route_cidr_is_code_7() {
    let conf = conf(
        "1.0.0",
        &missing_socket(),
        json!({"ipam": {"routes": [{"dst": "10.0.0.0/33"}]}}),
    );
    let run = run(&attachment_env("ADD", &[]), &conf);
    assert_error(&run, 7, &["ipam.routes[0].dst", "10.0.0.0/33"]);
}

#[test]
fn wrong_json_type_names_the_field() {
    for (ipam, field) in [
        (json!({"subnet": 5}), "ipam.subnet = 5"),
        (
            json!({"ranges": [[{"subnet": 5}]]}),
            "ipam.ranges[0][0].subnet = 5",
        ),
    ] {
        let conf = conf("1.0.0", &missing_socket(), json!({ "ipam": ipam }));
        let run = run(&attachment_env("ADD", &[]), &conf);
        assert_error(&run, 7, &[field, "expected a string, found a number"]);
    }
}

#[test]
fn version_lists_the_five_versions() {
    let run = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    assert!(run.success, "{run:?}");
    let reply: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        reply,
        json!({
            "cniVersion": "0.4.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        })
    );
    assert!(run.stderr.is_empty(), "{run:?}");
}

#[test]
fn missing_socket_is_try_again_later_at_once() {
    let socket = missing_socket();
    let socket_text = socket.to_str().unwrap();
    for command in ["ADD", "DEL", "CHECK"] {
        let conf = conf(
            "1.1.0",
            &socket,
            json!({"prevResult": {"ips": [{"address": "10.0.0.5/24"}]}}),
        );
        let run = run(&attachment_env(command, &[]), &conf);
        assert_error(&run, 11, &[socket_text, "try again later"]);
        // The plugin promises code 11 once CONNECT_TIMEOUT passes without a connection, and a
        // missing socket does not even wait for that. The slack is for exec and scheduling on
        // a loaded 2-core machine (a run takes ~2 ms idle): far above noise, far below a hang.
        const SLACK: Duration = Duration::from_secs(2);
        let bound = hostnic_cni::plugin::CONNECT_TIMEOUT + SLACK;
        assert!(
            run.took < bound,
            "{command} took {:?} (bound: connect timeout {:?} + slack {SLACK:?})",
            run.took,
            hostnic_cni::plugin::CONNECT_TIMEOUT
        );
    }
}

/// Podman exits 127 ("command not found") when an error says "No such file or directory": the
/// message says what is wrong instead.
#[test]
fn missing_socket_says_the_daemon_is_not_running() {
    let socket = missing_socket();
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &socket, json!({})),
    );
    let reply = assert_error(&run, 11, &[]);
    assert_eq!(
        reply["msg"],
        "hostnic-ipamd is not running (no socket at /nonexistent/hostnic/ipamd.sock); \
         try again later"
    );
    assert!(!run.stdout.contains("No such file"), "{run:?}");
    assert!(!run.stdout.contains("os error"), "{run:?}");
}

#[test]
fn socket_path_that_is_not_a_socket_is_refused_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ipamd.sock");
    std::fs::write(&file, b"").unwrap();
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &file, json!({})),
    );
    assert_error(
        &run,
        5,
        &[file.to_str().unwrap(), "regular file, not a socket"],
    );
}

/// A socket another user put where the daemon's should be receives nothing: the plugin names
/// the path and the owner, and does not ask to be retried.
#[test]
fn socket_planted_by_a_non_root_user_is_refused() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    std::os::unix::fs::chown(&daemon.socket, Some(65534), Some(65534)).unwrap();
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &daemon.socket, json!({})),
    );
    assert_error(
        &run,
        5,
        &[
            daemon.socket.to_str().unwrap(),
            "owned by uid 65534, not root",
        ],
    );
    assert_eq!(daemon.received(), [], "nothing may be sent to it");
}

#[test]
fn refused_socket_is_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipamd.sock");
    // A stale socket file, as a crashed daemon leaves it: connect(2) is refused.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &socket, json!({})),
    );
    let reply = assert_error(&run, 11, &[socket.to_str().unwrap(), "refuses connections"]);
    assert!(
        reply["msg"]
            .as_str()
            .unwrap()
            .starts_with("hostnic-ipamd is not running"),
        "{reply}"
    );
    assert!(!run.stdout.contains("os error"), "{run:?}");
    assert!(run.took < Duration::from_secs(1), "took {:?}", run.took);
}

/// A daemon that is restarting (DaemonSet rolling update, crash loop) is waited for, up to
/// `ipam.daemonWaitSeconds`, and only then is the call answered "try again later".
#[test]
fn a_missing_daemon_is_waited_for_up_to_daemon_wait_seconds_then_try_again_later() {
    let socket = missing_socket();
    for command in ["ADD", "DEL"] {
        let run = run(
            &attachment_env(command, &[]),
            &conf("1.0.0", &socket, json!({"ipam": {"daemonWaitSeconds": 1}})),
        );
        assert_error(&run, 11, &[socket.to_str().unwrap(), "try again later"]);
        assert!(
            run.took >= Duration::from_secs(1),
            "{command} gave up after {:?}, before the 1 s wait",
            run.took
        );
        // Slack for exec and scheduling on a loaded 2-core machine.
        assert!(
            run.took < Duration::from_secs(3),
            "{command} took {:?} for a 1 s wait",
            run.took
        );
    }
}

#[test]
fn a_daemon_that_starts_during_the_wait_answers_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipamd.sock");
    let conf = conf("1.0.0", &socket, json!({"ipam": {"daemonWaitSeconds": 10}}));
    let env = attachment_env("ADD", &[("CNI_ARGS", POD_ARGS)]);
    let plugin = std::thread::spawn(move || run(&env, &conf));
    std::thread::sleep(Duration::from_millis(400));
    let Some(daemon) = FakeDaemon::start_in(dir, Answers::default()) else {
        let _ = plugin.join();
        return;
    };
    let run = plugin.join().unwrap();
    assert!(run.success, "{run:?}");
    assert!(
        run.took >= Duration::from_millis(400),
        "answered in {:?}, before the daemon existed",
        run.took
    );
    assert_eq!(daemon.received().len(), 1, "{:?}", daemon.received());
}

#[test]
fn status_without_daemon_is_code_50() {
    let socket = missing_socket();
    // STATUS asks whether the plugin is ready now: it does not wait for a daemon.
    let run = run(
        &[("CNI_COMMAND", "STATUS")],
        &conf("1.1.0", &socket, json!({"ipam": {"daemonWaitSeconds": 5}})),
    );
    assert_error(&run, 50, &[socket.to_str().unwrap()]);
    assert!(run.took < Duration::from_secs(1), "took {:?}", run.took);
}

#[test]
fn socket_from_environment_when_config_has_none() {
    let mut conf: Value =
        serde_json::from_str(&conf("1.0.0", &missing_socket(), json!({}))).unwrap();
    conf["ipam"].as_object_mut().unwrap().remove("socket");
    let env = attachment_env("ADD", &[("HOSTNIC_IPAMD_SOCKET", "/nonexistent/env.sock")]);
    let run = run(&env, &conf.to_string());
    assert_error(&run, 11, &["/nonexistent/env.sock"]);
}

#[test]
fn gc_needs_cni_version_1_1_0() {
    let conf = conf(
        "0.4.0",
        &missing_socket(),
        json!({"cni.dev/valid-attachments": []}),
    );
    let run = run(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf,
    );
    let reply = assert_error(&run, 1, &["GC", "1.1.0", "0.4.0"]);
    assert_eq!(reply["cniVersion"], "0.4.0");
}

// ---- against a fake daemon ----

/// What the fake daemon answers.
#[derive(Debug, Clone)]
struct Answers {
    allocate: Result<v1::AllocateReply, (Code, &'static str)>,
    other: Result<(), (Code, &'static str)>,
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            allocate: Ok(v1::AllocateReply {
                ips: vec![v1::IpAllocation {
                    address: "10.0.0.5/24".to_owned(),
                    gateway: "10.0.0.1".to_owned(),
                }],
            }),
            other: Ok(()),
        }
    }
}

/// A request the fake daemon received.
#[derive(Debug, Clone, PartialEq)]
enum Received {
    Allocate(v1::AllocateRequest),
    Release(v1::ReleaseRequest),
    Check(v1::CheckRequest),
    Gc(v1::GcRequest),
    Status(v1::StatusRequest),
}

#[derive(Debug)]
struct FakeIpam {
    answers: Answers,
    received: Mutex<Vec<Received>>,
}

impl FakeIpam {
    fn answer<T: Default>(&self, received: Received) -> Result<Response<T>, Status> {
        self.received.lock().unwrap().push(received);
        match self.answers.other {
            Ok(()) => Ok(Response::new(T::default())),
            Err((code, message)) => Err(Status::new(code, message)),
        }
    }
}

#[tonic::async_trait]
impl Ipam for FakeIpam {
    async fn allocate(
        &self,
        request: Request<v1::AllocateRequest>,
    ) -> Result<Response<v1::AllocateReply>, Status> {
        self.received
            .lock()
            .unwrap()
            .push(Received::Allocate(request.into_inner()));
        match &self.answers.allocate {
            Ok(reply) => Ok(Response::new(reply.clone())),
            Err((code, message)) => Err(Status::new(*code, *message)),
        }
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseReply>, Status> {
        self.answer(Received::Release(request.into_inner()))
    }

    async fn check(
        &self,
        request: Request<v1::CheckRequest>,
    ) -> Result<Response<v1::CheckReply>, Status> {
        self.answer(Received::Check(request.into_inner()))
    }

    async fn gc(&self, request: Request<v1::GcRequest>) -> Result<Response<v1::GcReply>, Status> {
        self.answer(Received::Gc(request.into_inner()))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        self.answer(Received::Status(request.into_inner()))
    }
}

/// The fake served on a temporary socket by its own thread; stopped and removed on drop.
#[derive(Debug)]
struct FakeDaemon {
    socket: PathBuf,
    ipam: Arc<FakeIpam>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Whether this process creates files as root: the plugin talks only to a root-owned socket,
/// so a fake daemon started by anyone else would be refused (a new file's owner is its creator).
fn creates_as_root(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = dir.join("uid-probe");
    std::fs::write(&probe, b"").unwrap();
    std::fs::metadata(&probe).unwrap().uid() == 0
}

impl FakeDaemon {
    /// `None`, after a SKIPPED line, when not root: the plugin would refuse the fake's socket.
    fn start(answers: Answers) -> Option<Self> {
        Self::start_in(tempfile::tempdir().unwrap(), answers)
    }

    /// Serves on `ipamd.sock` in `dir`, which it removes when dropped.
    fn start_in(dir: tempfile::TempDir, answers: Answers) -> Option<Self> {
        if !creates_as_root(dir.path()) {
            eprintln!("SKIPPED: a fake hostnic-ipamd needs root (the plugin trusts root-owned sockets only)");
            return None;
        }
        let socket = dir.path().join("ipamd.sock");
        // Bound before the thread starts, so the socket accepts as soon as `start` returns.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let ipam = Arc::new(FakeIpam {
            answers,
            received: Mutex::new(Vec::new()),
        });
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let service = IpamServer::from_arc(Arc::clone(&ipam));
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stop.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        Some(FakeDaemon {
            socket,
            ipam,
            shutdown: Some(shutdown),
            thread: Some(thread),
            _dir: dir,
        })
    }

    fn received(&self) -> Vec<Received> {
        self.ipam.received.lock().unwrap().clone()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn add_reply(version: &str) -> Option<(Value, Vec<Received>)> {
    let daemon = FakeDaemon::start(Answers::default())?;
    let env = attachment_env("ADD", &[("CNI_ARGS", POD_ARGS)]);
    let run = run(&env, &conf(version, &daemon.socket, json!({})));
    assert!(run.success, "{version}: {run:?}");
    Some((
        serde_json::from_str(run.stdout.trim()).unwrap(),
        daemon.received(),
    ))
}

#[test]
fn add_result_has_ip_version_before_1_0_0() {
    for version in ["0.3.1", "0.4.0"] {
        let Some((reply, _)) = add_reply(version) else {
            return;
        };
        assert_eq!(
            reply,
            json!({
                "cniVersion": version,
                "ips": [{"version": "4", "address": "10.0.0.5/24", "gateway": "10.0.0.1"}],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}]
            }),
            "{version}"
        );
    }
}

#[test]
fn add_result_has_no_ip_version_from_1_0_0() {
    let Some((reply, _)) = add_reply("1.0.0") else {
        return;
    };
    assert_eq!(
        reply["ips"],
        json!([{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}])
    );
    assert_eq!(reply["cniVersion"], "1.0.0");
}

#[test]
fn add_sends_requested_ips_pod_and_network() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let args = format!("{POD_ARGS};IP=10.0.0.5,10.0.0.9");
    let env = attachment_env("ADD", &[("CNI_ARGS", &args)]);
    let conf = conf(
        "1.1.0",
        &daemon.socket,
        json!({
            "runtimeConfig": {"ips": ["10.0.0.9/24", "10.0.0.10/24"]},
            "args": {"cni": {"ips": ["10.0.0.5"]}},
        }),
    );
    let run = run(&env, &conf);
    assert!(run.success, "{run:?}");
    let received = daemon.received();
    let [Received::Allocate(request)] = received.as_slice() else {
        panic!("{received:?}");
    };
    assert_eq!(request.requested_ips, ["10.0.0.5", "10.0.0.9", "10.0.0.10"]);
    assert_eq!(
        request.pod,
        Some(v1::Pod {
            namespace: "default".to_owned(),
            name: "web-0".to_owned(),
            uid: "9b2c5e4e".to_owned(),
            infra_container_id: "3f6940ab".to_owned(),
        })
    );
    assert_eq!(
        request.attachment,
        Some(v1::Attachment {
            container_id: CID.to_owned(),
            ifname: "net1".to_owned(),
        })
    );
    assert_eq!(request.netns, "/var/run/netns/cni-1");
    let network = request.network.clone().unwrap();
    assert_eq!(network.name, "macvlan-net");
    let ipam: Value = serde_json::from_str(&network.ipam_json).unwrap();
    assert_eq!(ipam["subnet"], "10.0.0.0/24");
}

/// The plugin's HTTP/2 client sends what the daemon's windows allow and waits for its
/// WINDOW_UPDATEs for the rest: a request four times HTTP/2's initial 64 KiB window arrives
/// whole, and so does the answer.
#[test]
fn a_request_larger_than_the_initial_http2_window_arrives_whole() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let padding = "p".repeat(256 * 1024);
    let env = attachment_env("ADD", &[("CNI_ARGS", POD_ARGS)]);
    let conf = conf(
        "1.0.0",
        &daemon.socket,
        json!({"ipam": {"x-padding": padding}}),
    );
    let run = run(&env, &conf);
    assert!(run.success, "{run:?}");
    let received = daemon.received();
    let [Received::Allocate(request)] = received.as_slice() else {
        panic!("{received:?}");
    };
    let ipam: Value = serde_json::from_str(&request.network.as_ref().unwrap().ipam_json).unwrap();
    assert_eq!(ipam["x-padding"].as_str().unwrap().len(), padding.len());
    let reply: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(reply["ips"][0]["address"], "10.0.0.5/24");
}

#[test]
fn add_reports_dns_from_resolv_conf() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let resolv = daemon._dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.96.0.10\nsearch svc.cluster.local\n").unwrap();
    let conf = conf(
        "1.0.0",
        &daemon.socket,
        json!({"ipam": {"resolvConf": resolv}}),
    );
    let run = run(&attachment_env("ADD", &[]), &conf);
    assert!(run.success, "{run:?}");
    let reply: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        reply["dns"],
        json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]})
    );
}

#[test]
fn unreadable_resolv_conf_fails_before_allocating() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let conf = conf(
        "1.0.0",
        &daemon.socket,
        json!({"ipam": {"resolvConf": "/nonexistent/resolv.conf"}}),
    );
    let run = run(&attachment_env("ADD", &[]), &conf);
    assert_error(&run, 5, &["/nonexistent/resolv.conf"]);
    assert_eq!(daemon.received(), [], "nothing may be allocated");
}

#[test]
fn resolv_conf_on_dev_zero_is_refused_at_once() {
    let conf = conf(
        "1.0.0",
        &missing_socket(),
        json!({"ipam": {"resolvConf": "/dev/zero"}}),
    );
    let run = run(&attachment_env("ADD", &[]), &conf);
    let reply = assert_error(&run, 5, &[]);
    assert_eq!(
        reply["msg"],
        "cannot read ipam.resolvConf /dev/zero: it is a device, not a regular file"
    );
    assert!(run.took < Duration::from_secs(1), "took {:?}", run.took);
}

#[test]
fn address_held_by_another_pod_is_code_101() {
    let Some(daemon) = FakeDaemon::start(Answers {
        allocate: Err((Code::AlreadyExists, "10.0.0.5 is held by default/web-1")),
        ..Answers::default()
    }) else {
        return;
    };
    let env = attachment_env("ADD", &[("CNI_ARGS", "IP=10.0.0.5")]);
    let run = run(&env, &conf("1.0.0", &daemon.socket, json!({})));
    let reply = assert_error(&run, 101, &["10.0.0.5 is held by default/web-1"]);
    assert!(
        reply["details"]
            .as_str()
            .unwrap()
            .contains(daemon.socket.to_str().unwrap()),
        "{reply}"
    );
}

#[test]
fn pool_exhausted_is_code_100() {
    let Some(daemon) = FakeDaemon::start(Answers {
        allocate: Err((
            Code::ResourceExhausted,
            "pool 10.0.0.0/24 has no free address",
        )),
        ..Answers::default()
    }) else {
        return;
    };
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &daemon.socket, json!({})),
    );
    assert_error(&run, 100, &["pool exhausted", "10.0.0.0/24"]);
}

/// The daemon's own wording names the condition; the plugin does not say it twice.
#[test]
fn daemon_exhaustion_message_is_not_doubled() {
    let Some(daemon) = FakeDaemon::start(Answers {
        allocate: Err((
            Code::ResourceExhausted,
            "pool exhausted: no free address in 10.0.0.0/24 for network \"macvlan-net\"",
        )),
        ..Answers::default()
    }) else {
        return;
    };
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &daemon.socket, json!({})),
    );
    let reply = assert_error(&run, 100, &[]);
    assert_eq!(
        reply["msg"],
        "pool exhausted: no free address in 10.0.0.0/24 for network \"macvlan-net\""
    );
}

#[test]
fn daemon_unavailable_is_code_11() {
    let Some(daemon) = FakeDaemon::start(Answers {
        allocate: Err((Code::Unavailable, "etcd: no leader")),
        other: Err((Code::Unavailable, "etcd: no leader")),
    }) else {
        return;
    };
    let conf = conf("1.1.0", &daemon.socket, json!({}));
    let run_add = run(&attachment_env("ADD", &[]), &conf);
    assert_error(&run_add, 11, &["etcd: no leader", "try again later"]);
    let run_del = run(&attachment_env("DEL", &[]), &conf);
    assert_error(&run_del, 11, &["etcd: no leader"]);
    let status = run(&[("CNI_COMMAND", "STATUS")], &conf);
    assert_error(&status, 50, &["etcd: no leader"]);
}

#[test]
fn del_releases_and_ignores_malformed_requested_ips() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let env = attachment_env("DEL", &[("CNI_ARGS", "IP=not-an-address")]);
    let conf = conf(
        "1.0.0",
        &daemon.socket,
        json!({"runtimeConfig": {"ips": ["bogus"]}}),
    );
    let run = run(&env, &conf);
    assert!(run.success, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    let received = daemon.received();
    let [Received::Release(request)] = received.as_slice() else {
        panic!("{received:?}");
    };
    assert_eq!(request.attachment.as_ref().unwrap().container_id, CID);
}

#[test]
fn check_sends_prev_result_and_maps_unknown_attachment_to_3() {
    let prev = json!({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24"}]}});
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let run_ok = run(
        &attachment_env("CHECK", &[]),
        &conf("1.0.0", &daemon.socket, prev.clone()),
    );
    assert!(run_ok.success && run_ok.stdout.is_empty(), "{run_ok:?}");
    let received = daemon.received();
    let [Received::Check(request)] = received.as_slice() else {
        panic!("{received:?}");
    };
    assert_eq!(request.addresses, ["10.0.0.5/24"]);

    let Some(daemon) = FakeDaemon::start(Answers {
        other: Err((Code::NotFound, "no attachment net1")),
        ..Answers::default()
    }) else {
        return;
    };
    let unknown = run(
        &attachment_env("CHECK", &[]),
        &conf("1.0.0", &daemon.socket, prev.clone()),
    );
    assert_error(&unknown, 3, &[CID, "no attachment net1"]);

    let Some(daemon) = FakeDaemon::start(Answers {
        other: Err((Code::FailedPrecondition, "10.0.0.5/24 is not held")),
        ..Answers::default()
    }) else {
        return;
    };
    let run = run(
        &attachment_env("CHECK", &[]),
        &conf("1.0.0", &daemon.socket, prev),
    );
    assert_error(&run, 102, &["10.0.0.5/24 is not held"]);
}

#[test]
fn gc_and_status_succeed_silently() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let conf = conf(
        "1.1.0",
        &daemon.socket,
        json!({"cni.dev/valid-attachments": [{"containerID": CID, "ifname": "net1"}]}),
    );
    let gc = run(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf,
    );
    assert!(gc.success && gc.stdout.is_empty(), "{gc:?}");
    let status = run(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(status.success && status.stdout.is_empty(), "{status:?}");
    let received = daemon.received();
    let [Received::Gc(gc), Received::Status(_)] = received.as_slice() else {
        panic!("{received:?}");
    };
    assert_eq!(
        gc.valid_attachments,
        [v1::Attachment {
            container_id: CID.to_owned(),
            ifname: "net1".to_owned(),
        }]
    );
}

#[test]
fn permission_denied_says_root() {
    let Some(daemon) = FakeDaemon::start(Answers {
        allocate: Err((Code::PermissionDenied, "caller uid 1000")),
        ..Answers::default()
    }) else {
        return;
    };
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &daemon.socket, json!({})),
    );
    let reply = assert_error(&run, 5, &["must run as root", "caller uid 1000"]);
    assert_eq!(reply["details"], Value::Null, "{reply}");
}

// ---- a daemon that dies during the call ----

/// An `Ipam` whose `allocate` reports that it was called and then never answers; every other
/// call is refused.
#[derive(Debug)]
struct Hangs(std::sync::mpsc::Sender<()>);

#[tonic::async_trait]
impl Ipam for Hangs {
    async fn allocate(
        &self,
        _: Request<v1::AllocateRequest>,
    ) -> Result<Response<v1::AllocateReply>, Status> {
        let _ = self.0.send(());
        std::future::pending::<()>().await;
        Err(Status::internal("unreachable"))
    }

    async fn release(
        &self,
        _: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseReply>, Status> {
        Err(Status::unimplemented("release"))
    }

    async fn check(
        &self,
        _: Request<v1::CheckRequest>,
    ) -> Result<Response<v1::CheckReply>, Status> {
        Err(Status::unimplemented("check"))
    }

    async fn gc(&self, _: Request<v1::GcRequest>) -> Result<Response<v1::GcReply>, Status> {
        Err(Status::unimplemented("gc"))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        Err(Status::unimplemented("status"))
    }
}

/// A daemon served by its own thread and runtime that is torn down, connections and all, as
/// soon as a call reaches `allocate`: what a SIGKILL of hostnic-ipamd does to a call in flight.
/// `None` (after a SKIPPED line) when not root.
fn daemon_that_dies_mid_call() -> Option<(tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>)>
{
    let dir = tempfile::tempdir().unwrap();
    if !creates_as_root(dir.path()) {
        eprintln!(
            "SKIPPED: a fake hostnic-ipamd needs root (the plugin trusts root-owned sockets only)"
        );
        return None;
    }
    let socket = dir.path().join("ipamd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (called, on_call) = std::sync::mpsc::channel();
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let serve = tonic::transport::Server::builder()
                .add_service(IpamServer::new(Hangs(called)))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener));
            tokio::select! {
                _ = serve => {}
                _ = killed => {}
            }
        });
        // Dropping the runtime drops every connection task: the peer sees the socket close.
        drop(runtime);
    });
    let killer = std::thread::spawn(move || {
        if on_call.recv_timeout(Duration::from_secs(10)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kill.send(());
        server.join().unwrap();
    });
    Some((dir, socket, killer))
}

/// Which status tonic makes of a connection torn down mid-call: `Unknown` "transport error"
/// with the transport error as its source. The plugin reads the source, not the code.
#[test]
fn a_call_cut_by_the_daemon_dying_is_unknown_with_a_transport_source() {
    let Some((_dir, socket, killer)) = daemon_that_dies_mid_call() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        let channel = hostnic_proto::connect(&socket, Duration::from_secs(1))
            .await
            .unwrap();
        v1::ipam_client::IpamClient::new(channel)
            .allocate(v1::AllocateRequest::default())
            .await
            .unwrap_err()
    });
    killer.join().unwrap();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(status.message(), "transport error");
    assert!(std::error::Error::source(&status).is_some(), "{status:?}");
}

#[test]
fn daemon_dying_mid_call_is_try_again_later() {
    let Some((_dir, socket, killer)) = daemon_that_dies_mid_call() else {
        return;
    };
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &socket, json!({})),
    );
    killer.join().unwrap();
    let reply = assert_error(
        &run,
        11,
        &[
            socket.to_str().unwrap(),
            "went away during ADD",
            "try again later",
        ],
    );
    let msg = reply["msg"].as_str().unwrap();
    for dump in ["Custom {", "kind:", "Error(", "source:"] {
        assert!(!msg.contains(dump), "no debug output: {msg}");
    }
    assert!(run.took < Duration::from_secs(5), "took {:?}", run.took);
}

/// A listener run by another user behind a socket file that root owns (what a swap of the file
/// after the plugin's check would give): the plugin reads the listener's credentials on the
/// connection and sends nothing.
#[test]
fn listener_not_running_as_root_is_refused_even_behind_a_root_owned_file() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    if !creates_as_root(dir.path()) {
        eprintln!("SKIPPED: needs root to run a listener as uid 65534");
        return;
    }
    if !Path::new("/usr/bin/perl").exists() {
        eprintln!("SKIPPED: /usr/bin/perl (perl-base) is missing");
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("ipamd.sock");
    let mut child = Command::new("/usr/bin/perl")
        .args([
            "-MIO::Socket::UNIX",
            "-e",
            "my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0], \
             Listen => 5) or die \"listen: $!\"; sleep 30;",
        ])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let chowned = std::os::unix::fs::chown(&socket, Some(0), Some(0));
    let run = run(
        &attachment_env("ADD", &[]),
        &conf("1.0.0", &socket, json!({})),
    );
    let _ = child.kill();
    let _ = child.wait();
    chowned.unwrap();
    assert_error(
        &run,
        5,
        &[
            socket.to_str().unwrap(),
            "the process listening on the socket runs as uid 65534, not root",
        ],
    );
}

// ---- the log file ----

#[test]
fn the_log_file_gets_one_line_per_call_and_one_it_cannot_write_fails_nothing() {
    let Some(daemon) = FakeDaemon::start(Answers::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("kube-ipam.log");
    let with_log = |log: &Path, extra: Value| {
        let mut extra = extra;
        merge(&mut extra, json!({"ipam": {"logFile": log}}));
        conf("1.0.0", &daemon.socket, extra)
    };
    let add = attachment_env("ADD", &[("CNI_ARGS", POD_ARGS)]);
    let added = run(&add, &with_log(&log, json!({})));
    assert!(added.success, "{added:?}");
    let deleted = run(&attachment_env("DEL", &[]), &with_log(&log, json!({})));
    assert!(deleted.success, "{deleted:?}");
    let refused = run(
        &add,
        &with_log(&log, json!({"ipam": {"routes": [{"dst": "10.0.0.0/33"}]}})),
    );
    assert_error(&refused, 7, &["ipam.routes[0].dst"]);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "one line per call:\n{text}");
    let expect = [
        format!(
            " hostnic-ipam ADD network=macvlan-net container={CID} ifname=net1 pod=default/web-0 \
             result=ok ips=10.0.0.5/24 duration_ms="
        ),
        format!(" hostnic-ipam DEL network=macvlan-net container={CID} ifname=net1 result=ok duration_ms="),
        format!(
            " hostnic-ipam ADD network=macvlan-net container={CID} ifname=net1 pod=default/web-0 \
             result=error code=7 msg="
        ),
    ];
    for (line, expect) in lines.iter().zip(&expect) {
        assert!(line.contains(expect.as_str()), "{line:?} lacks {expect:?}");
        // An RFC 3339 UTC time first.
        assert!(
            line.as_bytes()[4] == b'-' && line.contains("Z hostnic-ipam "),
            "{line}"
        );
    }
    assert!(lines[2].contains("ipam.routes[0].dst"), "{}", lines[2]);

    // A log file that cannot be written: the same reply, and a word on stderr.
    let unwritable = dir.path().join("no-such-dir/kube-ipam.log");
    let again = run(&add, &with_log(&unwritable, json!({})));
    assert!(again.success, "{again:?}");
    assert_eq!(again.stdout, added.stdout);
    assert!(
        again.stderr.contains("cannot append to the log file")
            && again.stderr.contains("no-such-dir/kube-ipam.log"),
        "{again:?}"
    );
    assert!(!unwritable.exists());
}
