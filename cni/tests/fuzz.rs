//! Property tests of everything the plugin does before it talks to the daemon: the environment,
//! the network config, and `run` as a whole with a socket path that does not exist, so any input
//! that passes validation fails to connect at once. For any input: no panic, no hang, and every
//! failure is one CNI error object with a code from the spec's table or this plugin's, and a
//! message without raw control characters (messages reach runtimes' logs and `kubectl describe`).
//!
//! Bounded so a CI run stays fast: a few hundred cases per property, well under ten seconds.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::{Duration, Instant};

use hostnic_cni::plugin::{run, Outcome, SOCKET_ENV};
use hostnic_cni::{validate_container_id, validate_ifname, Invocation, NetworkConfig};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// A socket path that does not exist: validation passes, connecting fails at `stat`.
const MISSING_SOCKET: &str = "/nonexistent/hostnic-fuzz/ipamd.sock";

/// Codes a failure may have without a daemon: the spec's 1, 2 (unsupported field), 4, 5, 6, 7,
/// 11 (no daemon) and 50 (STATUS without a daemon). 3, 100-102 need a daemon's answer and 999
/// is a bug.
const CODES_WITHOUT_DAEMON: [u64; 8] = [1, 2, 4, 5, 6, 7, 11, 50];

const VARS: [&str; 5] = [
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A config that passes every check, with every part a command may read.
fn valid_config() -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "macvlan-net",
        "type": "macvlan",
        "ipam": {
            "type": "hostnic-ipam",
            "socket": MISSING_SOCKET,
            "daemonWaitSeconds": 0,
            "subnet": "10.0.0.0/24",
            "gateway": "10.0.0.1",
            "ranges": [[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10"}]],
            "exclude": ["10.0.0.5"],
            "blockSize": 28,
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}]
        },
        "runtimeConfig": {"ips": ["10.0.0.9/24"]},
        "args": {"cni": {"ips": ["10.0.0.7"]}},
        "prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}]},
        "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]
    })
}

/// Where mutations land: every key the plugin reads, and some it passes on.
const POINTERS: [&str; 27] = [
    "/cniVersion",
    "/name",
    "/ipam",
    "/ipam/type",
    "/ipam/subnet",
    "/ipam/gateway",
    "/ipam/rangeStart",
    "/ipam/ranges",
    "/ipam/ranges/0",
    "/ipam/ranges/0/0",
    "/ipam/ranges/0/0/subnet",
    "/ipam/exclude",
    "/ipam/exclude/0",
    "/ipam/blockSize",
    "/ipam/routes",
    "/ipam/routes/1/gw",
    "/ipam/routes/0/dst",
    "/ipam/resolvConf",
    "/runtimeConfig",
    "/runtimeConfig/ips/0",
    "/args/cni",
    "/args/cni/ips",
    "/prevResult",
    "/prevResult/ips/0/address",
    "/cni.dev~1valid-attachments",
    "/cni.dev~1valid-attachments/0/ifname",
    "/cni.dev~1attachments",
];

/// Strings that matter to the parsers, and arbitrary ones (control characters included).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("1.0.0".to_owned()),
        Just("0.4".to_owned()),
        Just("9.9.9".to_owned()),
        Just("10.0.0.0/24".to_owned()),
        Just("10.0.0.5".to_owned()),
        Just("fd00::5/64".to_owned()),
        Just("::ffff:10.0.0.1".to_owned()),
        Just("10.0.0.0/33".to_owned()),
        Just("/dev/zero".to_owned()),
        Just("/etc/resolv.conf".to_owned()),
        Just("eth0".to_owned()),
        Just("net\n1".to_owned()),
        "[a-z0-9./:_-]{0,20}",
        any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Sets (`Some`) or removes (`None`) the value at `pointer`, when its parent exists.
fn mutate(root: &mut Value, pointer: &str, value: Option<Value>) {
    let Some((parent, key)) = pointer.rsplit_once('/') else {
        return;
    };
    let key = key.replace("~1", "/").replace("~0", "~");
    let Some(parent) = root.pointer_mut(parent) else {
        return;
    };
    match (parent, value) {
        (Value::Object(object), Some(value)) => {
            object.insert(key, value);
        }
        (Value::Object(object), None) => {
            object.remove(&key);
        }
        (Value::Array(items), value) => {
            if let Ok(i) = key.parse::<usize>() {
                match value {
                    Some(value) if i < items.len() => items[i] = value,
                    None if i < items.len() => {
                        items.remove(i);
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// A valid config with a few keys replaced or removed, `ipam.socket` kept at the missing path
/// (a mutation must never point the plugin at a real daemon), serialized; or arbitrary bytes.
fn stdin() -> impl Strategy<Value = Vec<u8>> {
    let mutation = (
        prop::sample::select(&POINTERS[..]),
        prop::option::weighted(0.8, json_value()),
    );
    let mutated = prop::collection::vec(mutation, 0..4).prop_map(|mutations| {
        let mut conf = valid_config();
        for (pointer, value) in mutations {
            mutate(&mut conf, pointer, value);
        }
        if let Some(Value::Object(ipam)) = conf.get_mut("ipam") {
            ipam.insert("socket".to_owned(), Value::from(MISSING_SOCKET));
            // No waiting for the missing daemon: every run must end quickly.
            ipam.insert("daemonWaitSeconds".to_owned(), Value::from(0));
        }
        serde_json::to_vec(&conf).unwrap()
    });
    prop_oneof![
        4 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => text().prop_map(String::into_bytes),
    ]
}

/// An environment: the command, then each other `CNI_*` variable absent, valid or arbitrary.
fn env(command: &'static str) -> impl Strategy<Value = Vec<(String, String)>> {
    let valid = [
        "3f6940ab5ab43bc522569d15b23f8c1b",
        "/var/run/netns/cni-1",
        "net1",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IP=10.0.0.5",
        "/opt/cni/bin",
    ];
    let vars: Vec<_> = VARS
        .iter()
        .zip(valid)
        .map(|(var, valid)| {
            let value = prop_oneof![
                4 => Just(Some(valid.to_owned())),
                1 => Just(None),
                1 => text().prop_map(Some),
            ];
            value.prop_map(move |v| v.map(|v| ((*var).to_owned(), v)))
        })
        .collect();
    vars.prop_map(move |values| {
        let mut env = vec![
            ("CNI_COMMAND".to_owned(), command.to_owned()),
            (SOCKET_ENV.to_owned(), MISSING_SOCKET.to_owned()),
        ];
        // An environment cannot carry NUL.
        env.extend(
            values
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.contains('\0')),
        );
        env
    })
}

/// Runs the plugin in-process and checks the reply's shape; returns the outcome.
fn run_checked(env: &[(String, String)], stdin: &[u8]) -> Outcome {
    let started = Instant::now();
    let outcome = run(env, stdin);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    if let Some(text) = outcome.stdout() {
        let reply: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {text}"));
        assert!(reply.is_object(), "stdout is not an object: {text}");
        assert!(reply["cniVersion"].is_string(), "{text}");
    }
    if let Outcome::Failed(reply) = &outcome {
        assert!(
            CODES_WITHOUT_DAEMON.contains(&u64::from(reply.code)),
            "code {} without a daemon: {reply:?}",
            reply.code
        );
        assert!(!reply.msg.is_empty(), "{reply:?}");
        assert!(
            !reply.msg.chars().any(char::is_control),
            "raw control character in msg: {:?}",
            reply.msg
        );
        for dump in ["Os {", "Custom {", "Error {", "kind:"] {
            assert!(
                !reply.msg.contains(dump),
                "debug output in msg: {}",
                reply.msg
            );
        }
    }
    outcome
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn version_answers_any_stdin(stdin in stdin()) {
        let env = vec![("CNI_COMMAND".to_owned(), "VERSION".to_owned())];
        let outcome = run_checked(&env, &stdin);
        if let Outcome::Reply(text) = &outcome {
            let reply: Value = serde_json::from_str(text).unwrap();
            prop_assert!(reply["supportedVersions"].is_array(), "{}", text);
        } else {
            prop_assert!(matches!(outcome, Outcome::Failed(_)), "{:?}", outcome);
        }
    }

    #[test]
    fn commands_without_a_daemon_fail_with_a_cni_error(
        (env, stdin) in prop::sample::select(&["ADD", "DEL", "CHECK", "GC", "STATUS"][..])
            .prop_flat_map(|command| (env(command), stdin()))
    ) {
        let outcome = run_checked(&env, &stdin);
        // Nothing can succeed: every call that passes validation fails to connect.
        prop_assert!(matches!(outcome, Outcome::Failed(_)), "{:?}", outcome);
    }

    #[test]
    fn from_env_accepts_only_valid_attachments(
        env in prop::sample::select(&["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", ""][..])
            .prop_flat_map(env)
    ) {
        match Invocation::from_env(env.iter().map(|(k, v)| (k, v))) {
            Ok(invocation) => {
                if let Some(attachment) = &invocation.attachment {
                    prop_assert!(validate_container_id(&attachment.container_id).is_ok());
                    prop_assert!(validate_ifname(&attachment.ifname).is_ok());
                    prop_assert!(!attachment.ifname.chars().any(char::is_control));
                }
            }
            Err(err) => {
                prop_assert_eq!(err.code(), 4, "{}", err);
                prop_assert!(!err.to_string().chars().any(char::is_control), "{:?}", err.to_string());
            }
        }
    }

    #[test]
    fn parse_and_accessors_never_panic(stdin in stdin()) {
        match NetworkConfig::parse(&stdin) {
            Ok(conf) => {
                prop_assert!(validate_container_id(&conf.name).is_ok(), "name {:?}", conf.name);
                // The per-command accessors fail with code 7 or succeed.
                let codes = [
                    conf.runtime_config_ips().err().map(|e| e.code()),
                    conf.args_ips().err().map(|e| e.code()),
                    conf.prev_result().err().map(|e| e.code()),
                    conf.valid_attachments().err().map(|e| e.code()),
                ];
                for code in codes.into_iter().flatten() {
                    prop_assert_eq!(code, 7);
                }
            }
            Err(err) => {
                prop_assert!([1, 6, 7].contains(&err.code()), "{}", err);
                prop_assert!(!err.to_string().chars().any(char::is_control), "{:?}", err.to_string());
            }
        }
    }
}
