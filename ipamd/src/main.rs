//! hostnic-ipamd: serve the plugins until SIGTERM, or run one operator command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hostnic_ipamd::config::{read_file, resolve, Command, DaemonConfig, FileConfig, Flags};
use hostnic_ipamd::namespace_watch::Namespaces;
use hostnic_ipamd::service::IpamService;
use hostnic_ipamd::{
    cli, gc, http, install, kube, leader, logging, namespace_watch, netns_gc, nics, node_gc,
    pod_gc, server, sticky_gc, Allocator,
};
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let flags = Flags::parse();
    let _ = OUTPUT.set(flags.output);
    logging::init(flags.log_format);
    let metrics_addr = flags.metrics_addr;
    if let Some(addr) = metrics_addr {
        http::check_listen_addr(addr, flags.metrics_allow_remote).map_err(anyhow::Error::msg)?;
    }
    let file = match &flags.config {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string());
    let command = flags.command.clone().unwrap_or(Command::Serve);
    if let Command::InstallCni {
        bin_dir,
        conf_dir,
        conflist,
        from,
    } = command
    {
        return install_cni(bin_dir, conf_dir, conflist, from);
    }
    let nic_flags = flags.nics.clone();
    let config = resolve(flags, file, hostname)?;
    let store = &config.store;
    let exit = match command {
        Command::Serve => {
            serve(config, metrics_addr, nic_flags).await?;
            ExitCode::SUCCESS
        }
        Command::List { pool } => {
            let pool = pool
                .as_deref()
                .map(str::parse::<ipnet::IpNet>)
                .transpose()
                .context("--pool must be a subnet such as 10.0.0.0/24")?;
            print(cli::list(store, pool.as_ref()).await?)?
        }
        Command::Usage => print(cli::usage(store).await?)?,
        Command::Release {
            container_id,
            ifname,
            network,
        } => print(cli::release(store, network.as_deref(), &container_id, &ifname).await?)?,
        Command::ReleaseAddress { ip, dry_run } => {
            print(cli::release_address(store, ip, dry_run).await?)?
        }
        Command::RemovePool { subnet, dry_run } => {
            print(cli::remove_pool(store, &subnet, dry_run).await?)?
        }
        Command::DropKey { key, dry_run } => print(cli::drop_key(store, &key, dry_run).await?)?,
        Command::GcNetns { dry_run } => {
            let allocator = Allocator::start(store, &config.node_name)
                .await
                .context("starting the allocator")?;
            print(netns_gc::pass(&allocator, config.gc_grace, dry_run).await?)?
        }
        Command::GcPods { dry_run } => {
            let Some(source) = kube::source_of(config.kubeconfig.clone(), in_cluster()) else {
                anyhow::bail!(
                    "gc-pods asks the Kubernetes API which pods exist: give --kubeconfig (or \
                     KUBECONFIG, or the file key kubeconfig), or run it in a pod with a service \
                     account"
                );
            };
            let client = kube::client(&source)
                .await
                .with_context(|| format!("Kubernetes client from {source:?}"))?;
            let pods = kube::PodCache::get_only(client);
            let allocator = Allocator::start(store, &config.node_name)
                .await
                .context("starting the allocator")?;
            print(pod_gc::pass(&allocator, &pods, config.gc_grace, dry_run).await?)?
        }
        Command::GcNodes { dry_run } => {
            let Some(source) = kube::source_of(config.kubeconfig.clone(), in_cluster()) else {
                anyhow::bail!(
                    "gc-nodes asks the Kubernetes API which nodes exist: give --kubeconfig (or \
                     KUBECONFIG, or the file key kubeconfig), or run it in a pod with a service \
                     account"
                );
            };
            let client = kube::client(&source)
                .await
                .with_context(|| format!("Kubernetes client from {source:?}"))?;
            let allocator = Allocator::start(store, &config.node_name)
                .await
                .context("starting the allocator")?;
            // One LIST judges: the operator's command does not wait for the grace.
            print(
                node_gc::pass(
                    &allocator,
                    || kube::node_names(&client),
                    &mut node_gc::Absences::default(),
                    std::time::Duration::ZERO,
                    dry_run,
                )
                .await?,
            )?
        }
        Command::GcSticky { dry_run } => {
            let Some(source) = kube::source_of(config.kubeconfig.clone(), in_cluster()) else {
                anyhow::bail!(
                    "gc-sticky asks the Kubernetes API which StatefulSets and ordinals exist: \
                     give --kubeconfig (or KUBECONFIG, or the file key kubeconfig), or run it in \
                     a pod with a service account"
                );
            };
            let client = kube::client(&source)
                .await
                .with_context(|| format!("Kubernetes client from {source:?}"))?;
            let allocator = Allocator::start(store, &config.node_name)
                .await
                .context("starting the allocator")?;
            print(sticky_gc::pass(&allocator, &client, config.gc_grace, dry_run).await?)?
        }
        Command::Audit => print(cli::audit(store).await?)?,
        Command::InstallCni { .. } => unreachable!("handled before the config is resolved"),
        Command::Namespaces => {
            let mapping = match kube::source_of(config.kubeconfig.clone(), in_cluster()) {
                Some(source) => {
                    let client = kube::client(&source)
                        .await
                        .with_context(|| format!("Kubernetes client from {source:?}"))?;
                    namespace_watch::read_mapping(client).await?
                }
                None => {
                    eprintln!(
                        "no kubeconfig and not in a pod: the ConfigMap's entries are not shown, \
                         only the blocks auto-assigned in etcd"
                    );
                    None
                }
            };
            print(cli::namespaces(store, mapping.as_ref()).await?)?
        }
        Command::UnassignNamespace { namespace, dry_run } => {
            print(cli::unassign_namespace(store, &namespace, dry_run).await?)?
        }
        Command::Show { pod } => print(cli::show(store, &pod).await?)?,
    };
    Ok(exit)
}

/// `install-cni`: the plugins from `from` (default: this program's directory), and `conflist`.
fn install_cni(
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    conflist: Option<PathBuf>,
    from: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let from = match from {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("finding this program's directory (give --from)")?
            .parent()
            .map(Path::to_path_buf)
            .context("this program has no directory (give --from)")?,
    };
    let plan = install::InstallPlan {
        from,
        bin_dir,
        conf_dir,
        conflist,
    };
    for installed in install::install(&plan)? {
        println!("{installed}");
    }
    Ok(ExitCode::SUCCESS)
}

/// How operator commands print (`--output`), set once from the flags.
static OUTPUT: std::sync::OnceLock<cli::OutputFormat> = std::sync::OnceLock::new();

/// Prints what an operator command found or did (its lines, or one JSON document with
/// `--output json`); then its exit status, or the error that stopped it partway.
fn print(outcome: impl cli::Outcome + cli::Json) -> anyhow::Result<ExitCode> {
    match OUTPUT.get().copied().unwrap_or_default() {
        cli::OutputFormat::Table => {
            for line in outcome.lines() {
                println!("{line}");
            }
        }
        cli::OutputFormat::Json => {
            println!(
                "{}",
                outcome.json().context("rendering the outcome as JSON")?
            )
        }
    }
    Ok(if outcome.finish()? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Whether this process runs in a pod: the kubelet sets `KUBERNETES_SERVICE_HOST`.
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// Serves the plugins on the socket, and `/metrics`, `/healthz`, `/readyz` on `metrics_addr`;
/// in QingCloud mode (`nic_flags`), the hostnic plugin's NICs too.
async fn serve(
    config: DaemonConfig,
    metrics_addr: Option<SocketAddr>,
    nic_flags: nics::NicFlags,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // The background tasks stop when the sender is used or dropped: at shutdown, or when
    // serving fails.
    let (stop_gc, gc_stopped) = tokio::sync::watch::channel(());
    let mut shutdown = Box::pin(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop_gc.send(());
    });
    // The socket's lock first: a second daemon waits here without touching etcd, and a bad
    // socket path is refused before anything else happens.
    let lock = tokio::select! {
        lock = server::SocketLock::acquire(&config.socket, config.socket_wait) => lock?,
        () = &mut shutdown => return Ok(()),
    };
    let allocator = Arc::new(
        Allocator::start(&config.store, &config.node_name)
            .await
            .context("starting the allocator")?,
    );
    let kube_source = kube::source_of(config.kubeconfig.clone(), in_cluster());
    let nic_pool = nics::start_with_kubernetes(&nic_flags, Arc::clone(&allocator), kube_source)
        .await
        .context("starting QingCloud mode (NICs for the hostnic plugin)")?;
    let mut background = Background::new(gc_stopped);
    let schedule = |interval| gc::Schedule {
        interval,
        grace: config.gc_grace,
    };
    let nic_maintenance = nic_pool
        .as_ref()
        .map(|pool| tokio::spawn(Arc::clone(pool).maintain(background.shutdown())));
    if let Some(interval) = config.netns_gc_interval {
        background.spawn(
            "network-namespace GC",
            netns_gc::run(
                Arc::clone(&allocator),
                schedule(interval),
                background.shutdown(),
            ),
        );
    }
    let mut service = IpamService::new(Arc::clone(&allocator), config.gc_grace);
    let mut leadership = None;
    let mut probe_pods = None;
    let mut nic_namespaces = None;
    match kube::source_of(config.kubeconfig.clone(), in_cluster()) {
        Some(source) => {
            let client = kube::client(&source)
                .await
                .with_context(|| format!("Kubernetes client from {source:?}"))?;
            tracing::info!(?source, node = %config.node_name, "watching this node's pods");
            let namespaces = Arc::new(Namespaces::start(client.clone(), &allocator));
            service = service.with_namespaces(Arc::clone(&namespaces));
            nic_namespaces = Some(namespaces);
            let pods = Arc::new(kube::PodCache::start(client.clone(), &config.node_name));
            if let Some(interval) = config.pod_gc_interval {
                background.spawn(
                    "pod GC",
                    pod_gc::run(
                        Arc::clone(&allocator),
                        Arc::clone(&pods),
                        schedule(interval),
                        background.shutdown(),
                    ),
                );
            }
            probe_pods = Some(Arc::clone(&pods));
            service = service.with_pods(pods);
            // One daemon of the cluster, elected, runs the cluster-wide GCs while it leads.
            let cluster_wide =
                config.node_gc_interval.is_some() || config.sticky_gc_interval.is_some();
            leadership = cluster_wide.then(|| {
                leader::Leadership::start(
                    allocator.store().clone(),
                    leader::Election {
                        key: allocator.keys().leader(leader::CLEANER),
                        node: config.node_name.clone(),
                        ttl: config.leader_lease,
                    },
                )
            });
            if let (Some(interval), Some(leadership)) = (config.node_gc_interval, &leadership) {
                let (allocator, client, schedule) =
                    (Arc::clone(&allocator), client.clone(), schedule(interval));
                background.spawn(
                    "deleted-node GC",
                    leader::while_leader(
                        "deleted-node GC",
                        leadership.subscribe(),
                        background.shutdown(),
                        move |stop| {
                            node_gc::run(Arc::clone(&allocator), client.clone(), schedule, stop)
                        },
                    ),
                );
            }
            if let (Some(interval), Some(leadership)) = (config.sticky_gc_interval, &leadership) {
                let (allocator, client, schedule) =
                    (Arc::clone(&allocator), client.clone(), schedule(interval));
                background.spawn(
                    "sticky GC",
                    leader::while_leader(
                        "sticky GC",
                        leadership.subscribe(),
                        background.shutdown(),
                        move |stop| {
                            sticky_gc::run(Arc::clone(&allocator), client.clone(), schedule, stop)
                        },
                    ),
                );
            }
        }
        None => tracing::info!(
            "no kubeconfig and not in a pod: Kubernetes is not used (pod annotations are not read)"
        ),
    }
    // After the socket's lock: a new daemon waiting for the old one to stop does not take the
    // old one's port.
    let endpoint = match metrics_addr {
        Some(addr) => {
            let listener = http::bind(addr).await?;
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            let endpoint = http::Endpoint {
                allocator: Arc::clone(&allocator),
                pods: probe_pods,
                nics: nic_pool.clone(),
            };
            Some(tokio::spawn(http::serve(
                listener,
                endpoint,
                background.shutdown(),
            )))
        }
        None => None,
    };
    let nic_service = nic_pool.map(|pool| {
        let service = nics::service::NicService::new(pool);
        match nic_namespaces {
            // A namespace's ConfigMap entries (vxnets, blocks) place its pods' NICs.
            Some(namespaces) => service.with_namespaces(Arc::new(move |namespace: &str| {
                namespaces.entries_of(namespace)
            })),
            None => service,
        }
    });
    // On a worker thread, not on this one (the runtime's `block_on`): the listener's readiness
    // is then handled where the I/O driver saw it, without waking this thread per connection.
    let served = tokio::spawn(server::serve_with_nics(
        lock,
        service,
        nic_service,
        shutdown,
    ))
    .await
    .context("the gRPC server's task")
    .and_then(|served| served);
    if let Some(endpoint) = endpoint {
        endpoint.abort();
    }
    if let Some(task) = nic_maintenance {
        task.abort();
    }
    background.join().await;
    if let Some(leadership) = leadership {
        leadership.resign().await;
    }
    served
}

/// The daemon's background tasks (the GCs, elected or per node): each ends when
/// `stopped` says the daemon is shutting down, and is awaited before the daemon exits.
struct Background {
    stopped: tokio::sync::watch::Receiver<()>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Background {
    fn new(stopped: tokio::sync::watch::Receiver<()>) -> Self {
        Background {
            stopped,
            tasks: Vec::new(),
        }
    }

    /// A future that completes when the daemon shuts down.
    fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopped = self.stopped.clone();
        async move {
            let _ = stopped.changed().await;
        }
    }

    fn spawn(
        &mut self,
        what: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.push((what, tokio::spawn(task)));
    }

    /// Waits for every task to end; one that panicked is logged.
    async fn join(self) {
        for (what, task) in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "{what} task ended abnormally");
            }
        }
    }
}
