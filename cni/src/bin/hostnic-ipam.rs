//! `hostnic-ipam`: the CNI IPAM plugin. A main plugin (macvlan, bridge, ...) execs it once per
//! attachment; it validates the invocation, makes one call to `hostnic-ipamd` over its unix
//! socket, prints the CNI reply on stdout and exits. See [`hostnic_cni::plugin`].
//!
//! stdout carries only the reply; a failure is also logged, in one line, on stderr, and every
//! call in one line in `ipam.logFile` when the config names one.

use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use hostnic_cni::call_log;
use hostnic_cni::plugin::{self, Outcome};

fn main() -> ExitCode {
    let (at, started) = (SystemTime::now(), Instant::now());
    let (vars, stdin, outcome) = Outcome::of_process(plugin::run);
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
    outcome.exit("hostnic-ipam")
}
