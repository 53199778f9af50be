//! `hostnic-ipam`: the CNI IPAM plugin. A main plugin (macvlan, bridge, ...) execs it once per
//! attachment; it validates the invocation, makes one call to `hostnic-ipamd` over its unix
//! socket, prints the CNI reply on stdout and exits. See [`hostnic_cni::plugin`].
//!
//! stdout carries only the reply; a failure is also logged, in one line, on stderr, and every
//! call in one line in `ipam.logFile` when the config names one.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use hostnic_cni::call_log;
use hostnic_cni::plugin::{self, Outcome};
use hostnic_cni::{CniError, CniVersion};

fn main() -> ExitCode {
    let (at, started) = (SystemTime::now(), Instant::now());
    let vars: Vec<_> = std::env::vars_os().collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().lock().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&vars, &stdin),
        Err(source) => Outcome::failed(
            &CniError::Io {
                what: "read the network config from stdin".to_owned(),
                source,
            },
            CniVersion::LATEST.as_str(),
        ),
    };
    if let Outcome::Failed(reply) = &outcome {
        eprintln!("hostnic-ipam: error {}: {}", reply.code, reply.msg);
    }
    if let Some(path) = call_log::configured(&stdin) {
        let failed = match &outcome {
            Outcome::Failed(reply) => Some(reply),
            _ => None,
        };
        let reply = match &outcome {
            Outcome::Reply(text) => Some(text.as_str()),
            _ => None,
        };
        let result = call_log::result_of(reply, failed);
        let line = call_log::line(&vars, &stdin, &result, at, started.elapsed());
        // The log is the operator's aid, never a reason to fail the pod.
        if let Err(e) = call_log::append(&path, &line) {
            eprintln!("hostnic-ipam: {e}");
        }
    }
    if let Some(text) = outcome.stdout() {
        let mut stdout = std::io::stdout().lock();
        if let Err(err) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
            eprintln!("hostnic-ipam: cannot write the reply to stdout: {err}");
            return ExitCode::FAILURE;
        }
    }
    if outcome.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
