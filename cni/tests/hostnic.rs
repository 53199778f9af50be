//! The real `hostnic` binary, run as a runtime runs it, where no daemon or kernel work is
//! needed: bad input and an absent daemon must give one CNI error object with the right code
//! and a message naming the problem, and nothing else on stdout.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hostnic");

/// Runs the binary; (exit success, the reply on stdout as JSON if any).
fn run(command: &str, extra: &[(&str, &str)], stdin: &str) -> (bool, Option<Value>) {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/run/netns/does-not-matter")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(extra.iter().copied())
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
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        out.status.success(),
        (!stdout.trim().is_empty()).then(|| serde_json::from_str(&stdout).unwrap()),
    )
}

fn conf(socket: &str) -> String {
    format!(
        r#"{{"cniVersion":"0.3.1","name":"hostnic","type":"hostnic","serviceCIDR":"10.96.0.0/12","hairpin":false,"natMark":"0x10000","socket":"{socket}"}}"#
    )
}

#[test]
fn version_answers_without_a_daemon() {
    let (ok, reply) = run("VERSION", &[], r#"{"cniVersion":"1.0.0"}"#);
    assert!(ok);
    let reply = reply.unwrap();
    assert!(
        reply["supportedVersions"].as_array().unwrap().len() > 1,
        "{reply}"
    );
}

#[test]
fn bad_configs_are_code_6_or_7_naming_the_key() {
    let cases = [
        ("{", 6, "network config"),
        (r#"{"cniVersion":"1.0.0","type":"hostnic"}"#, 7, "name"),
        (
            r#"{"cniVersion":"1.0.0","name":"n","serviceCIDR":"10.96.0.0"}"#,
            7,
            "serviceCIDR",
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"n","hairpin":1}"#,
            7,
            "hairpin",
        ),
    ];
    for (stdin, code, word) in cases {
        let (ok, reply) = run("ADD", &[], stdin);
        assert!(!ok, "{stdin}");
        let reply = reply.unwrap();
        assert_eq!(reply["code"], code, "{stdin}: {reply}");
        assert!(
            reply["msg"].as_str().unwrap().contains(word),
            "{reply} should name {word}"
        );
    }
}

#[test]
fn without_a_daemon_add_del_and_check_are_code_11_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let socket = socket.to_str().unwrap();
    let v1 = conf(socket).replace("0.3.1", "1.0.0");
    for (command, config, version) in [
        ("ADD", conf(socket), "0.3.1"),
        ("DEL", conf(socket), "0.3.1"),
        ("CHECK", v1, "1.0.0"),
    ] {
        let (ok, reply) = run(command, &[], &config);
        assert!(!ok, "{command}");
        let reply = reply.unwrap();
        assert_eq!(reply["code"], 11, "{command}: {reply}");
        assert!(reply["msg"].as_str().unwrap().contains(socket), "{reply}");
        assert_eq!(reply["cniVersion"], version);
    }
    let status = conf(socket).replace("0.3.1", "1.1.0");
    let (ok, reply) = run("STATUS", &[], &status);
    assert!(!ok);
    let reply = reply.unwrap();
    assert_eq!(reply["code"], 50, "{reply}");
    assert!(reply["msg"].as_str().unwrap().contains(socket), "{reply}");
    // CHECK is a 0.4.0 command: a 0.3.1 config is refused before any call.
    let (ok, reply) = run("CHECK", &[], &conf(socket));
    assert!(!ok);
    assert_eq!(reply.unwrap()["code"], 1);
}

#[test]
fn missing_environment_is_code_4() {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf("/nonexistent").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["code"], 4, "{reply}");
    assert!(
        reply["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
        "{reply}"
    );
}
