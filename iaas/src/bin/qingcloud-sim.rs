//! `qingcloud-sim`: the QingCloud IaaS API simulator on a loopback port, for pointing any
//! client (hostnic, the SDKs, `hostnic-ipamd`) at it.
//!
//! `qingcloud-sim --listen 127.0.0.1:PORT --access-key-id ID --secret-access-key SECRET
//! --zone ZONE --instance INSTANCE_ID --vxnet VXNET_ID=CIDR` (the last two repeatable). It
//! prints `qingcloud-sim listening on http://ADDR/iaas` once ready and serves until SIGINT or
//! SIGTERM. With `--real-links` (root), an attached NIC appears as a link carrying its MAC.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hostnic_iaas::sim::cloud::VxnetSpec;
use hostnic_iaas::sim::{SimConfig, Simulator};
use hostnic_iaas::SecretKey;

/// A local simulator of the QingCloud IaaS API (NICs, vxnets, jobs, access keys).
#[derive(Parser, Debug)]
#[command(name = "qingcloud-sim", version)]
struct Args {
    /// Address to listen on (loopback; port 0 picks a free one).
    #[arg(long)]
    listen: SocketAddr,
    /// The access key id requests must be signed with.
    #[arg(long)]
    access_key_id: String,
    /// Its secret (or the environment variable, to keep it out of `ps`).
    #[arg(long, env = "QINGCLOUD_SIM_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_access_key: String,
    /// The zone requests must name.
    #[arg(long)]
    zone: String,
    /// A running instance (repeatable).
    #[arg(long = "instance")]
    instances: Vec<String>,
    /// A vxnet: ID=CIDR, optionally ,no-router or ,no-dhcp (repeatable).
    #[arg(long = "vxnet")]
    vxnets: Vec<VxnetSpec>,
    /// The owner (user id) of the key and of everything.
    #[arg(long, default_value = "usr-SimOwn01")]
    owner: String,
    /// How far time_stamp may be from the clock, in seconds.
    #[arg(long, default_value_t = 60)]
    time_window_secs: u64,
    /// The account's API rate, calls per hour.
    #[arg(long, default_value_t = 2000)]
    calls_per_hour: u32,
    /// How long an attach or detach job takes, in milliseconds.
    #[arg(long, default_value_t = 300)]
    job_duration_ms: u64,
    /// Plug each attached NIC in as a veth end with the NIC's MAC in the host namespace, and
    /// remove it on detach (root only).
    #[arg(long)]
    real_links: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "qingcloud-sim: --listen {} is not a loopback address",
            args.listen
        );
        return ExitCode::from(2);
    }
    let mut config = SimConfig::new(
        &args.access_key_id,
        SecretKey::new(args.secret_access_key),
        &args.zone,
    );
    config.owner = args.owner;
    config.instances = args.instances;
    config.vxnets = args.vxnets;
    config.time_window = Duration::from_secs(args.time_window_secs);
    config.calls_per_hour = args.calls_per_hour;
    config.job_duration = Duration::from_millis(args.job_duration_ms);
    config.real_links = args.real_links;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qingcloud-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let sim = match Simulator::start(args.listen, config).await {
            Ok(sim) => sim,
            Err(e) => {
                eprintln!("qingcloud-sim: cannot start on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        println!("qingcloud-sim listening on http://{}/iaas", sim.addr());
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("qingcloud-sim: cannot watch SIGTERM: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(sim);
        ExitCode::SUCCESS
    })
}
