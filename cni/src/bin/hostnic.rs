//! `hostnic`: the CNI main plugin giving each pod a QingCloud NIC of its own, leased from
//! `hostnic-ipamd` over its unix socket; it moves the link into the pod, prints the CNI
//! reply on stdout and exits. See [`hostnic_cni::nic_plugin`].
//!
//! stdout carries only the reply; a failure is also logged, in one line, on stderr.

use std::io::{Read, Write};
use std::process::ExitCode;

use hostnic_cni::nic_plugin;
use hostnic_cni::plugin::Outcome;
use hostnic_cni::{CniError, CniVersion};

fn main() -> ExitCode {
    let vars: Vec<_> = std::env::vars_os().collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().lock().read_to_end(&mut stdin) {
        Ok(_) => nic_plugin::run(&vars, &stdin),
        Err(source) => Outcome::failed(
            &CniError::Io {
                what: "read the network config from stdin".to_owned(),
                source,
            },
            CniVersion::LATEST.as_str(),
        ),
    };
    if let Outcome::Failed(reply) = &outcome {
        eprintln!("hostnic: error {}: {}", reply.code, reply.msg);
    }
    if let Some(text) = outcome.stdout() {
        let mut stdout = std::io::stdout().lock();
        if let Err(err) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
            eprintln!("hostnic: cannot write the reply to stdout: {err}");
            return ExitCode::FAILURE;
        }
    }
    if outcome.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
