//! `hostnic`: the CNI main plugin giving each pod a QingCloud NIC of its own, leased from
//! `hostnic-ipamd` over its unix socket; it moves the link into the pod, prints the CNI
//! reply on stdout and exits. See [`hostnic_cni::nic_plugin`].
//!
//! stdout carries only the reply; a failure is also logged, in one line, on stderr.

use std::process::ExitCode;

use hostnic_cni::nic_plugin;
use hostnic_cni::plugin::Outcome;

fn main() -> ExitCode {
    let (_, _, outcome) = Outcome::of_process(nic_plugin::run);
    outcome.exit("hostnic")
}
