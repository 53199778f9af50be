//! The real hostnic-ipamd binary against a real etcd, called over its unix socket with the
//! same gRPC client code the plugins use.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hostnic_cni::grpc::{frame, opening, put_frame, CallFailure, Frames, ONE_CALL};
use hostnic_proto::v1::ipam_client::IpamClient;
use hostnic_proto::v1::{
    AllocateReply, AllocateRequest, Attachment, CheckRequest, GcRequest, Network, Pod,
    ReleaseRequest, StatusReply, StatusRequest,
};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::{shared_single, unique_prefix};
use prost::Message;
use tonic::Code;

/// The daemon binary of this crate on a socket in a temp dir of its own.
struct Daemon {
    // Declared first: stopped before its directory is removed.
    process: IpamDaemon,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(node: &str, prefix: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/ipamd.sock");
        let process = IpamDaemon::start(
            Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
            &shared_single().endpoints(),
            node,
            prefix,
            &socket,
            &["--gc-grace-seconds", "0"],
        )
        .expect("daemon starts");
        Daemon {
            process,
            socket,
            dir,
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.stop().expect("the daemon was running").0
    }
}

async fn client(socket: &Path) -> IpamClient<tonic::transport::Channel> {
    IpamClient::new(
        hostnic_proto::connect(socket, Duration::from_secs(1))
            .await
            .expect("connects"),
    )
}

fn network(ipam: serde_json::Value) -> Option<Network> {
    Some(Network {
        name: "daemon-test".into(),
        ipam_json: ipam.to_string(),
    })
}

fn attachment(id: &str) -> Option<Attachment> {
    Some(Attachment {
        container_id: id.into(),
        ifname: "eth0".into(),
    })
}

/// Why the tests that talk to a serving daemon need root: it serves only from a socket
/// directory owned by root, and answers only root callers.
const SERVING_NEEDS_ROOT: &str = "the daemon serves only from a root-owned socket directory";

#[test]
fn its_socket_is_private_and_removed_when_sigterm_stops_it() {
    if !hostnic_testkit::require_root(&format!("daemon socket mode test ({SERVING_NEEDS_ROOT})")) {
        return;
    }
    let prefix = unique_prefix("daemon-socket");
    let mut daemon = Daemon::start("node-s", &prefix);
    let mode = std::fs::metadata(&daemon.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    let status = daemon.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(!daemon.socket.exists(), "socket removed on shutdown");
}

/// What a run without root can check of the daemon's socket: a daemon that may not serve from
/// its directory (not root's when not root; writable by others when root) says why, exits with
/// an error and leaves no socket behind.
#[test]
fn a_daemon_that_may_not_serve_from_its_socket_directory_exits_and_leaves_no_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    // As root the directory is root's: opening it to everyone is what makes it unsafe.
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let socket = run.join("ipamd.sock");
    let err = IpamDaemon::start(
        Path::new(env!("CARGO_BIN_EXE_hostnic-ipamd")),
        &shared_single().endpoints(),
        "node-u",
        &unique_prefix("daemon-unsafe-dir"),
        &socket,
        &[],
    )
    .expect_err("the daemon refuses an unsafe socket directory");
    let err = format!("{err:#}");
    assert!(err.contains("exited before it was ready"), "{err}");
    assert!(
        err.contains(&format!(
            "refusing to serve from socket directory {}",
            run.display()
        )),
        "{err}"
    );
    assert!(!socket.exists(), "nothing bound at {}", socket.display());
}

#[tokio::test]
async fn serves_allocate_check_release_gc_and_status_over_its_socket() {
    if !hostnic_testkit::require_root(&format!(
        "daemon gRPC test ({SERVING_NEEDS_ROOT}, to root callers only)"
    )) {
        return;
    }
    let prefix = unique_prefix("daemon");
    let mut daemon = Daemon::start("node-d", &prefix);
    let mut c = client(&daemon.socket).await;
    let ipam = serde_json::json!({"type": "hostnic-ipam", "subnet": "10.90.0.0/24"});

    let add = |id: &str, ips: Vec<String>| AllocateRequest {
        attachment: attachment(id),
        network: network(ipam.clone()),
        pod: Some(Pod {
            namespace: "ns".into(),
            name: format!("pod-{id}"),
            ..Default::default()
        }),
        requested_ips: ips,
        netns: String::new(),
    };
    let a = c
        .allocate(add("d1", vec![]))
        .await
        .expect("allocate")
        .into_inner();
    assert_eq!(a.ips.len(), 1);
    assert_eq!(a.ips[0].gateway, "10.90.0.1");
    // A cluster without pools yet (this prefix) is nothing to warn about.
    let log = std::fs::read_to_string(daemon.process.log_path()).expect("daemon log");
    assert!(
        !log.contains("WARN"),
        "a daemon on a cluster without pools warned:\n{log}"
    );
    let address = a.ips[0].address.clone();
    assert!(
        address.starts_with("10.90.0.") && address.ends_with("/24"),
        "{address}"
    );

    let fixed = c
        .allocate(add("d2", vec!["10.90.0.50".into()]))
        .await
        .expect("exact")
        .into_inner();
    assert_eq!(fixed.ips[0].address, "10.90.0.50/24");
    let held = c
        .allocate(add("d3", vec!["10.90.0.50".into()]))
        .await
        .expect_err("held");
    assert_eq!(held.code(), Code::AlreadyExists);
    assert!(
        held.message().contains("pod ns/pod-d2"),
        "{}",
        held.message()
    );

    let bad = c
        .allocate(AllocateRequest {
            network: network(
                serde_json::json!({"subnet": "10.0.0.0/24", "rangeStart": "10.9.9.9"}),
            ),
            ..add("d4", vec![])
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("rangeStart"), "{}", bad.message());
    // The plugin sends requested addresses plain; a prefix is refused, naming the field, rather
    // than silently dropped. (CHECK's addresses below are CIDRs, and pass.)
    let cidr = c
        .allocate(add("d5", vec!["10.90.0.51/24".into()]))
        .await
        .expect_err("a requested CIDR is refused");
    assert_eq!(cidr.code(), Code::InvalidArgument);
    assert!(
        cidr.message().contains("requested_ips") && cidr.message().contains("10.90.0.51/24"),
        "{}",
        cidr.message()
    );

    c.check(CheckRequest {
        attachment: attachment("d1"),
        network: network(ipam.clone()),
        addresses: vec![address.clone()],
    })
    .await
    .expect("check passes");
    let mismatch = c
        .check(CheckRequest {
            attachment: attachment("d1"),
            network: network(ipam.clone()),
            addresses: vec!["10.90.0.200/24".into()],
        })
        .await
        .expect_err("check fails");
    assert_eq!(mismatch.code(), Code::FailedPrecondition);

    c.status(StatusRequest {
        network: network(ipam.clone()),
    })
    .await
    .expect("status ok");

    // GC keeps d1 (valid) and releases d2.
    let gc = c
        .gc(GcRequest {
            network: network(ipam.clone()),
            valid_attachments: vec![attachment("d1").expect("some")],
        })
        .await
        .expect("gc")
        .into_inner();
    let released: Vec<&str> = gc
        .released
        .iter()
        .map(|a| a.container_id.as_str())
        .collect();
    assert_eq!(released, vec!["d2"]);

    let r = c
        .release(ReleaseRequest {
            attachment: attachment("d1"),
            network: network(ipam.clone()),
        })
        .await
        .expect("release")
        .into_inner();
    assert_eq!(
        r.released,
        vec![address.trim_end_matches("/24").to_string()]
    );
    let r = c
        .release(ReleaseRequest {
            attachment: attachment("d1"),
            network: network(ipam.clone()),
        })
        .await
        .expect("release twice")
        .into_inner();
    assert!(r.released.is_empty());

    drop(c);
    let status = daemon.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(!daemon.socket.exists(), "socket removed on shutdown");
}

/// Runs an operator command of the daemon binary against the shared etcd.
fn operator(prefix: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hostnic-ipamd"))
        .args(args)
        .args([
            "--etcd-endpoints",
            &shared_single().endpoints().join(","),
            "--etcd-prefix",
            prefix,
        ])
        .args(["--node-name", "operator"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn operator_commands_list_usage_audit_and_release() {
    let prefix = unique_prefix("operator");
    let config = hostnic_ipamd::StoreConfig::new(shared_single().endpoints()).with_prefix(&prefix);
    let allocator = hostnic_ipamd::Allocator::start(&config, "node-op")
        .await
        .expect("start");
    allocator.ready().await.expect("ready");
    let sets = hostnic_ipamd::parse_range_sets(
        &serde_json::json!({"subnet": "10.91.0.0/24", "exclude": ["10.91.0.128/25"]}),
    )
    .expect("valid");
    let request = hostnic_ipamd::AllocateRequest {
        attachment: hostnic_ipamd::Attachment::new("op-net", "op1", "eth0"),
        netns: String::new(),
        pod: Some(hostnic_ipamd::PodRef {
            namespace: "prod".into(),
            name: "db-0".into(),
            uid: String::new(),
        }),
        range_sets: sets,
        requested: vec!["10.91.0.7".parse().expect("literal")],
        requested_kind: hostnic_ipamd::Kind::Exact,
    };
    allocator.allocate(&request).await.expect("allocate");

    let (ok, out) = operator(&prefix, &["list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("10.91.0.0/24\t10.91.0.7\top-net\top1\teth0\tprod/db-0\tnode-op\tExact"),
        "{out}"
    );

    let (ok, out) = operator(&prefix, &["usage"]);
    assert!(ok, "{out}");
    // 128 addresses minus network and gateway are dynamic; one is held.
    assert!(out.contains("10.91.0.0/24\t126\t1\t"), "{out}");

    let (ok, out) = operator(&prefix, &["audit"]);
    assert!(
        ok && out.contains("1 pools, 1 allocations, 1 attachments, 0 problems"),
        "{out}"
    );

    // Break the attachment record by hand: audit must notice and fail.
    let mut client = allocator.store().client();
    client
        .delete(allocator.keys().attachment(&request.attachment), None)
        .await
        .expect("delete");
    let (ok, out) = operator(&prefix, &["audit"]);
    assert!(
        !ok && out.contains("ips/10.91.0.7: held by op1/eth0 of network op-net whose attachment record does not list it"),
        "{out}"
    );
    client
        .put(allocator.keys().attachment(&request.attachment), serde_json::json!({"version": 1, "network": "op-net", "node": "node-op", "ips": [{"pool": "10.91.0.0_24", "ip": "10.91.0.7"}]}).to_string(), None)
        .await
        .expect("restore");

    let (ok, out) = operator(&prefix, &["release", "op1", "eth0"]);
    assert!(
        ok && out
            .contains("released 10.91.0.7 of pool 10.91.0.0/24 from op1/eth0 of network op-net"),
        "{out}"
    );
    let (ok, out) = operator(&prefix, &["list"]);
    assert!(ok && !out.contains("10.91.0.7"), "{out}");
}

/// Set in the re-executed child of `callers_that_are_not_root_are_refused`: the socket to call.
const CLIENT_SOCKET_ENV: &str = "HOSTNIC_TEST_UNPRIVILEGED_CLIENT_SOCKET";

#[tokio::test]
async fn callers_that_are_not_root_are_refused() {
    if let Ok(socket) = std::env::var(CLIENT_SOCKET_ENV) {
        // The child, running as nobody: call the daemon and report what it answered.
        let mut c = client(Path::new(&socket)).await;
        let ipam = serde_json::json!({"subnet": "10.92.0.0/24"});
        let request = StatusRequest {
            network: network(ipam),
        };
        // The plugins' client, whose call the daemon answers without its HTTP/2 server.
        let one_call = hostnic_cni::grpc::unary::<_, StatusReply>(
            Path::new(&socket),
            "/hostnic.ipam.v1.Ipam/Status",
            &request,
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        match one_call {
            Err(CallFailure::Status(s)) => println!("ONE-CALL {:?} {}", s.code(), s.message()),
            other => println!("ONE-CALL {other:?}"),
        }
        let answer = c.status(request).await;
        println!(
            "ANSWER {:?} {}",
            answer.as_ref().err().map(|s| s.code()),
            answer
                .err()
                .map(|s| s.message().to_string())
                .unwrap_or_default()
        );
        return;
    }
    if !hostnic_testkit::require_root("unprivileged caller test (needs root to switch uid)") {
        return;
    }
    let prefix = unique_prefix("nonroot");
    let daemon = Daemon::start("node-nr", &prefix);
    // Open the socket and its directory to everyone, so only the credential check stands.
    for path in [
        daemon.socket.parent().expect("dir"),
        daemon.dir.path(),
        &daemon.socket,
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    // The child runs a copy of this binary from a directory everybody can traverse, whatever
    // the permissions of the directories above the clone.
    let bin_dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let bin = bin_dir.path().join("daemon-test");
    std::fs::copy(std::env::current_exe().expect("test binary"), &bin).expect("copy test binary");
    let run_child = || {
        std::process::Command::new(&bin)
            .args([
                "--exact",
                "callers_that_are_not_root_are_refused",
                "--nocapture",
            ])
            .env(CLIENT_SOCKET_ENV, &daemon.socket)
            .uid(65534)
            .gid(65534)
            .output()
    };
    // A process forked by another test thread while the copy was being written holds the
    // write descriptor until it execs: exec fails with ETXTBSY for that moment.
    let mut out = run_child();
    for _ in 0..50 {
        match &out {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                out = run_child();
            }
            _ => break,
        }
    }
    let out = out.expect("child runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ONE-CALL PermissionDenied caller uid 65534 is not root"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ANSWER Some(PermissionDenied) caller uid 65534 is not root"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A first write as the plugins make it (`hostnic_cni::grpc`): the opening, and `request` in
/// one DATA frame; with the [`ONE_CALL`] field when `one_call`.
fn whole_call(method: &str, request: &impl Message, one_call: bool) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", "hostnic-ipamd"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    if one_call {
        fields.push(ONE_CALL);
    }
    let mut out = opening(&fields);
    let message = request.encode_to_vec();
    let mut data = vec![0];
    data.extend_from_slice(&(message.len() as u32).to_be_bytes());
    data.extend_from_slice(&message);
    put_frame(&mut out, frame::DATA, frame::END_STREAM, 1, &data);
    out
}

/// Sends `first` in one write on a new connection to `socket`, then reads until the response
/// stream has ended. Returns the frames read by then as (type, flags, payload).
fn exchange(socket: &Path, first: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(first).expect("one write");
    let (mut received, mut frames) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 16384];
    loop {
        let n = stream.read(&mut buf).expect("reads");
        assert!(n > 0, "closed before the stream ended: {frames:?}");
        received.extend_from_slice(&buf[..n]);
        let mut whole = Frames::new(&received);
        frames.extend(whole.by_ref().map(|(h, p)| (h.kind, h.flags, p.to_vec())));
        received = whole.rest().to_vec();
        let ended = |f: &(u8, u8, Vec<u8>)| f.0 == frame::HEADERS && f.1 & frame::END_STREAM != 0;
        if frames.iter().any(ended) {
            return frames;
        }
    }
}

/// The reply in a response's DATA frames.
fn reply_of<M: Message + Default>(frames: &[(u8, u8, Vec<u8>)]) -> M {
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == frame::DATA)
        .flat_map(|f| f.2.clone())
        .collect();
    M::decode(&body[5..]).expect("a reply")
}

#[test]
fn a_plugins_whole_call_is_answered_in_one_write_and_any_other_by_the_http2_server() {
    if !hostnic_testkit::require_root(&format!("one-call test ({SERVING_NEEDS_ROOT})")) {
        return;
    }
    let prefix = unique_prefix("daemon-one-call");
    let daemon = Daemon::start("node-oc", &prefix);
    let ipam = serde_json::json!({"type": "hostnic-ipam", "subnet": "10.93.0.0/24"});
    let add = |id: &str| AllocateRequest {
        attachment: attachment(id),
        network: network(ipam.clone()),
        ..Default::default()
    };
    let allocate = "/hostnic.ipam.v1.Ipam/Allocate";

    let frames = exchange(&daemon.socket, &whole_call(allocate, &add("oc-1"), true));
    let kinds: Vec<(u8, u8)> = frames.iter().map(|f| (f.0, f.1)).collect();
    assert_eq!(
        kinds,
        [
            (frame::SETTINGS, 0),
            (frame::SETTINGS, frame::ACK),
            (frame::HEADERS, frame::END_HEADERS),
            (frame::DATA, 0),
            (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM),
            (frame::GOAWAY, 0),
        ],
        "one write, ending with a GOAWAY"
    );
    let reply: AllocateReply = reply_of(&frames);
    assert!(reply.ips[0].address.starts_with("10.93.0."), "{reply:?}");

    // The same call without the field: the HTTP/2 server reads it, replayed, and answers.
    let frames = exchange(&daemon.socket, &whole_call(allocate, &add("oc-2"), false));
    assert!(
        frames[0].0 == frame::SETTINGS && !frames[0].2.is_empty(),
        "the HTTP/2 server's own SETTINGS first: {frames:?}"
    );
    assert!(!frames.iter().any(|f| f.0 == frame::GOAWAY), "{frames:?}");
    let other: AllocateReply = reply_of(&frames);
    assert!(other.ips[0].address.starts_with("10.93.0."), "{other:?}");
    assert_ne!(other.ips, reply.ips, "two attachments, two addresses");
}
