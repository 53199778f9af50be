//! What the README promises of the plugin and the daemon together, shown with the real
//! binaries: the built `hostnic-ipam` run as a runtime runs it (`CNI_*` variables, the network
//! config on stdin, the reply on stdout) against a real `hostnic-ipamd` on a temporary socket,
//! committing to a real etcd.
//!
//! Needs root (the plugin talks only to a socket owned by root whose daemon runs as root; the
//! tests skip with `SKIPPED ...` otherwise), `etcd`, and the workspace binaries in
//! `target/debug` (`cargo build --workspace` first: `cargo test -p hostnic-e2e` does not build
//! other packages' binaries; a binary older than its sources fails the test rather than being
//! run).

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use hostnic_ipamd::{Allocator, Attachment, StoreConfig};
use hostnic_testkit::daemon::IpamDaemon;
use hostnic_testkit::netns::temp_dir;
use hostnic_testkit::{require_root, shared_single, unique_prefix};
use serde_json::{json, Value};

const IFNAME: &str = "net1";
const POD_NAMESPACE: &str = "claims";

// ---------------------------------------------------------------------------------------------
// The binaries
// ---------------------------------------------------------------------------------------------

/// The workspace root: this file is `tests/tests/claims.rs` of the `hostnic-e2e` package.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The newest modification time of any file under `dir`.
fn newest_under(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let Ok(entries) = fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_under(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        newest = newest.max(time);
    }
    newest
}

/// `target/debug/<name>`, refused when it is missing or older than the sources it is built
/// from (`sources`, relative to the workspace root): a stale binary would test old code.
fn built_binary(name: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .join(name);
    let built = fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{} cannot be used ({e}): run `cargo build --workspace` before `cargo test -p hostnic-e2e`",
                bin.display()
            )
        });
    let root = workspace_root();
    for source in sources {
        let newest = newest_under(&root.join(source));
        assert!(
            newest <= built,
            "{} is older than {source}: run `cargo build --workspace` before `cargo test -p hostnic-e2e`",
            bin.display()
        );
    }
    bin
}

fn plugin_binary() -> PathBuf {
    built_binary("hostnic-ipam", &["cni/src", "proto/proto"])
}

fn daemon_binary() -> PathBuf {
    built_binary("hostnic-ipamd", &["ipamd/src", "cni/src", "proto/proto"])
}

// ---------------------------------------------------------------------------------------------
// A daemon on a socket of the test's own, and the plugin pointed at it
// ---------------------------------------------------------------------------------------------

/// A `hostnic-ipamd` for one test: its own key prefix and socket, GC grace 0 (so a CNI GC
/// releases at once) and no network-namespace GC (the tests' namespace paths do not exist).
/// Fields drop in order: the daemon stops before its directory is removed.
struct Node {
    daemon: IpamDaemon,
    plugin: PathBuf,
    prefix: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(tag: &str) -> Node {
        let plugin = plugin_binary();
        let dir = temp_dir(tag).expect("creating the socket directory");
        let prefix = unique_prefix(tag);
        let daemon = IpamDaemon::start(
            &daemon_binary(),
            &shared_single().endpoints(),
            "claims-node",
            &prefix,
            &dir.path().join("ipamd.sock"),
            &[
                "--gc-grace-seconds",
                "0",
                "--netns-gc-interval-seconds",
                "0",
            ],
        )
        .unwrap_or_else(|e| panic!("starting hostnic-ipamd: {e:#}"));
        Node {
            daemon,
            plugin,
            prefix,
            _dir: dir,
        }
    }

    /// A network config delegating to `hostnic-ipam` on this node's socket.
    fn conf(&self, version: &str, network: &str, subnet: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": network,
            "type": "macvlan",
            "ipam": {
                "type": "hostnic-ipam",
                "socket": self.daemon.socket,
                "subnet": subnet,
            },
        })
    }

    /// Runs the plugin for an attachment command (ADD, DEL, CHECK) of `container`.
    fn attachment_call(&self, command: &str, container: &str, conf: &Value) -> Reply {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME=pod-{container};\
             K8S_POD_INFRA_CONTAINER_ID={container}"
        );
        self.run(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", "/var/run/netns/hostnic-claims-none"),
                ("CNI_IFNAME", IFNAME),
                ("CNI_ARGS", &args),
            ],
            conf,
        )
    }

    /// Runs the plugin for a network command (GC, STATUS): no attachment variables.
    fn network_call(&self, command: &str, conf: &Value) -> Reply {
        self.run(&[("CNI_COMMAND", command)], conf)
    }

    fn run(&self, env: &[(&str, &str)], conf: &Value) -> Reply {
        let mut child = Command::new(&self.plugin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_PATH", "/opt/cni/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.plugin.display()));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(conf.to_string().as_bytes())
                .expect("writing the network config to the plugin");
        }
        let out = child.wait_with_output().expect("waiting for the plugin");
        Reply {
            what: format!("{env:?}"),
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// An allocator on this node's keys, to read what the daemon committed.
    async fn reader(&self) -> Allocator {
        let config = StoreConfig::new(shared_single().endpoints()).with_prefix(&self.prefix);
        let a = Allocator::start(&config, "claims-reader")
            .await
            .expect("allocator starts");
        a.ready().await.expect("pools load");
        a
    }

    /// Everything the daemon logged so far.
    fn log(&self) -> String {
        fs::read_to_string(self.daemon.log_path()).expect("reading the daemon's log")
    }
}

/// What one run of the plugin printed.
struct Reply {
    what: String,
    success: bool,
    stdout: String,
    stderr: String,
}

impl Reply {
    fn describe(&self) -> String {
        format!(
            "{}: success {}\n  stdout: {}\n  stderr: {}",
            self.what,
            self.success,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }

    /// The result of a successful ADD (or the empty output of DEL, CHECK, GC, STATUS).
    fn ok(&self) -> Value {
        assert!(self.success, "expected success: {}", self.describe());
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }

    /// The CNI error code of a failed call.
    fn code(&self) -> u64 {
        assert!(!self.success, "expected a failure: {}", self.describe());
        let reply: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not a CNI error ({e}): {}", self.describe()));
        reply["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without a code: {}", self.describe()))
    }
}

/// The address of an ADD result's first IP, without its prefix length.
fn first_ip(result: &Value) -> IpAddr {
    let cidr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("result without ips[0].address: {result}"));
    cidr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ips[0].address {cidr:?} is not an address"))
}

/// `conf` with `key` set to `value` at the top level.
fn with(mut conf: Value, key: &str, value: Value) -> Value {
    conf[key] = value;
    conf
}

fn container(tag: &str) -> String {
    format!("{tag}{}", std::process::id())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// One span per request
// ---------------------------------------------------------------------------------------------

/// One log line of a request: the fields of its span and the rest of the line.
#[derive(Debug)]
struct SpanLine {
    fields: String,
    rest: String,
}

/// Lines logged inside a span of `verb` (the fmt layer's `verb{field=value ...}: target: msg`).
fn span_lines(log: &str, verb: &str) -> Vec<SpanLine> {
    let open = format!(" {verb}{{");
    log.lines()
        .filter_map(|line| {
            let start = line.find(&open)? + open.len();
            let end = start + line[start..].find("}:")?;
            Some(SpanLine {
                fields: line[start..end].to_owned(),
                rest: line[end + 2..].to_owned(),
            })
        })
        .collect()
}

/// The lines of `verb`'s spans whose message is `message` and whose span has every field of
/// `fields` (`name=value`).
fn outcome_lines<'a>(lines: &'a [SpanLine], message: &str, fields: &[String]) -> Vec<&'a SpanLine> {
    lines
        .iter()
        .filter(|l| l.rest.contains(&format!(": {message}")))
        .filter(|l| {
            let have: Vec<&str> = l.fields.split(' ').collect();
            fields.iter().all(|f| have.contains(&f.as_str()))
        })
        .collect()
}

#[test]
fn every_request_runs_in_one_span_naming_network_attachment_and_pod_and_logs_its_outcome() {
    if !require_root("every_request_runs_in_one_span_naming_network_attachment_and_pod") {
        return;
    }
    let node = Node::start("spans");
    let network = "spans-net";
    let cid = container("spans");
    let conf = node.conf("1.1.0", network, "10.91.0.0/24");

    let added = node.attachment_call("ADD", &cid, &conf).ok();
    node.attachment_call(
        "CHECK",
        &cid,
        &with(conf.clone(), "prevResult", added.clone()),
    )
    .ok();
    let wrong = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.91.0.250/24"}]});
    assert_eq!(
        node.attachment_call("CHECK", &cid, &with(conf.clone(), "prevResult", wrong))
            .code(),
        102
    );
    node.network_call("STATUS", &conf).ok();
    let valid = json!([{"containerID": cid, "ifname": IFNAME}]);
    node.network_call(
        "GC",
        &with(conf.clone(), "cni.dev/valid-attachments", valid),
    )
    .ok();
    node.attachment_call("DEL", &cid, &conf).ok();

    let log = node.log();
    let net = format!("network={network}");
    let attachment = [
        net.clone(),
        format!("container={cid}"),
        format!("ifname={IFNAME}"),
    ];
    let pod = format!("pod={POD_NAMESPACE}/pod-{cid}");
    let with_pod: Vec<String> = attachment.iter().cloned().chain([pod.clone()]).collect();
    let context = || format!("daemon log:\n{log}");

    // Each verb: (span name, fields its outcome line must carry, outcome messages, how many).
    let allocate = span_lines(&log, "allocate");
    assert_eq!(
        outcome_lines(&allocate, "allocated", &with_pod).len(),
        1,
        "{}",
        context()
    );
    let check = span_lines(&log, "check");
    assert_eq!(
        outcome_lines(&check, "checked", &attachment).len(),
        1,
        "{}",
        context()
    );
    let refused = outcome_lines(&check, "request failed", &attachment);
    assert_eq!(refused.len(), 1, "{}", context());
    assert!(
        refused[0].rest.contains("code=FailedPrecondition"),
        "{refused:?}"
    );
    let status = span_lines(&log, "status");
    assert_eq!(
        outcome_lines(&status, "ready for ADD", std::slice::from_ref(&net)).len(),
        1,
        "{}",
        context()
    );
    let gc = span_lines(&log, "gc");
    assert_eq!(
        outcome_lines(&gc, "garbage collected", std::slice::from_ref(&net)).len(),
        1,
        "{}",
        context()
    );
    // DEL's request names no pod; the span learns it from the record it releases.
    let release = span_lines(&log, "release");
    assert_eq!(
        outcome_lines(&release, "released", &with_pod).len(),
        1,
        "{}",
        context()
    );

    // One outcome line per request, and nothing the service logs is outside a request's span.
    let outcomes = [
        "allocated",
        "checked",
        "released",
        "garbage collected",
        "ready for ADD",
        "request failed",
    ];
    let total: usize = ["allocate", "check", "status", "gc", "release"]
        .iter()
        .map(|verb| {
            span_lines(&log, verb)
                .iter()
                .filter(|l| outcomes.iter().any(|m| l.rest.contains(&format!(": {m}"))))
                .count()
        })
        .sum();
    assert_eq!(total, 6, "six requests, six outcome lines\n{}", context());
    for line in log
        .lines()
        .filter(|l| l.contains("hostnic_ipamd::service:"))
    {
        assert!(
            ["allocate{", "check{", "status{", "gc{", "release{"]
                .iter()
                .any(|span| line.contains(span)),
            "a service line outside any request span: {line}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CHECK, GC, STATUS and code 100 from the plugin to a real daemon
// ---------------------------------------------------------------------------------------------

#[test]
fn check_passes_with_the_add_result_and_fails_with_102_when_prev_result_differs() {
    if !require_root("check_passes_with_the_add_result_and_fails_with_102") {
        return;
    }
    let node = Node::start("check");
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let conf = node.conf(version, "check-net", "10.92.0.0/24");
        let cid = container(&format!("check{}", version.replace('.', "")));
        let added = node.attachment_call("ADD", &cid, &conf).ok();
        let held = first_ip(&added);

        node.attachment_call(
            "CHECK",
            &cid,
            &with(conf.clone(), "prevResult", added.clone()),
        )
        .ok();

        let mut other = added.clone();
        let elsewhere = if held.to_string() == "10.92.0.200" {
            "10.92.0.201/24"
        } else {
            "10.92.0.200/24"
        };
        other["ips"][0]["address"] = json!(elsewhere);
        let reply = node.attachment_call("CHECK", &cid, &with(conf.clone(), "prevResult", other));
        assert_eq!(reply.code(), 102, "{version}: {}", reply.describe());
        assert!(
            reply.stdout.contains(&held.to_string()) && reply.stdout.contains("10.92.0.20"),
            "{version}: the message names both addresses: {}",
            reply.describe()
        );

        // A CHECK after DEL does not pass either.
        node.attachment_call("DEL", &cid, &conf).ok();
        let reply = node.attachment_call("CHECK", &cid, &with(conf, "prevResult", added));
        assert!(
            !reply.success,
            "{version}: CHECK after DEL: {}",
            reply.describe()
        );
    }
}

#[test]
fn gc_releases_this_networks_attachments_missing_from_valid_attachments() {
    if !require_root("gc_releases_this_networks_attachments_missing_from_valid_attachments") {
        return;
    }
    let node = Node::start("gc");
    let conf = node.conf("1.1.0", "gc-net", "10.93.0.0/24");
    let other_conf = node.conf("1.1.0", "gc-other", "10.94.0.0/24");
    let (keep, drop1, drop2) = (
        container("gckeep"),
        container("gcdropa"),
        container("gcdropb"),
    );
    for cid in [&keep, &drop1, &drop2] {
        node.attachment_call("ADD", cid, &conf).ok();
    }
    // Same container ids on another network: a GC of gc-net must not touch them.
    for cid in [&drop1, &drop2] {
        node.attachment_call("ADD", cid, &other_conf).ok();
    }

    let valid = json!([{"containerID": keep, "ifname": IFNAME}]);
    node.network_call(
        "GC",
        &with(conf.clone(), "cni.dev/valid-attachments", valid),
    )
    .ok();

    let rt = runtime();
    rt.block_on(async {
        let reader = node.reader().await;
        let holds = |network: &str, cid: &str| {
            let attachment = Attachment::new(network, cid, IFNAME);
            let reader = &reader;
            async move {
                reader
                    .lookup(&attachment)
                    .await
                    .unwrap_or_else(|e| panic!("lookup of {attachment}: {e}"))
                    .is_some()
            }
        };
        assert!(holds("gc-net", &keep).await, "the listed attachment stays");
        for cid in [&drop1, &drop2] {
            assert!(!holds("gc-net", cid).await, "{cid} on gc-net is released");
            assert!(holds("gc-other", cid).await, "{cid} on gc-other stays");
        }
        let report = hostnic_ipamd::audit::audit(reader.store(), reader.keys())
            .await
            .expect("audit scan");
        assert_eq!(report.problems, Vec::<String>::new());
        assert_eq!(report.attachments.len(), 3, "keep + two on gc-other");
    });

    // An empty list releases the rest of the network.
    node.network_call(
        "GC",
        &with(conf.clone(), "cni.dev/valid-attachments", json!([])),
    )
    .ok();
    let reply = node.attachment_call(
        "CHECK",
        &keep,
        &with(
            conf,
            "prevResult",
            json!({"cniVersion": "1.1.0", "ips": [{"address": "10.93.0.2/24"}]}),
        ),
    );
    assert!(!reply.success, "{}", reply.describe());
}

#[test]
fn status_fails_with_50_and_add_answers_100_once_a_slash_30_pool_is_exhausted() {
    if !require_root("status_fails_with_50_and_add_answers_100_once_a_slash_30_pool_is_exhausted") {
        return;
    }
    let node = Node::start("exhaust");
    // A /30 has one address to hand out: .0 is the network, .1 the gateway, .3 the broadcast.
    let conf = node.conf("1.1.0", "exhaust-net", "10.95.0.0/30");
    node.network_call("STATUS", &conf).ok();

    let first = container("exhausta");
    let added = node.attachment_call("ADD", &first, &conf).ok();
    assert_eq!(first_ip(&added).to_string(), "10.95.0.2");

    let status = node.network_call("STATUS", &conf);
    assert_eq!(status.code(), 50, "{}", status.describe());
    assert!(
        status.stdout.contains("10.95.0.0/30"),
        "{}",
        status.describe()
    );

    let second = container("exhaustb");
    let reply = node.attachment_call("ADD", &second, &conf);
    assert_eq!(reply.code(), 100, "{}", reply.describe());
    assert!(
        reply.stdout.contains("10.95.0.0/30"),
        "{}",
        reply.describe()
    );
    // The holder's repeated ADD still gets its address.
    assert_eq!(
        first_ip(&node.attachment_call("ADD", &first, &conf).ok()),
        first_ip(&added)
    );

    node.attachment_call("DEL", &first, &conf).ok();
    node.network_call("STATUS", &conf).ok();
    let added = node.attachment_call("ADD", &second, &conf).ok();
    assert_eq!(first_ip(&added).to_string(), "10.95.0.2");
    node.attachment_call("DEL", &second, &conf).ok();
}
