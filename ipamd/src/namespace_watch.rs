//! The daemon's namespace → subnet mapping at run time: the `kube-system/hostnic-ipam-config`
//! ConfigMap, followed by a kube-runtime watcher of that one object (field selector
//! `metadata.name`), the blocks auto-assigned to namespaces, followed by a watch of
//! `namespaces/` in etcd, and the ADD that applies both ([`Namespaces::allocate`]).
//!
//! A ConfigMap that does not parse is logged with what is wrong and the previous good mapping
//! stays in force (before any good one: no mapping). Until the first list of the ConfigMap is
//! in, an ADD that names a namespace waits briefly and then fails as retryable: a pod must not
//! get another tenant's address because the daemon has just started.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::Api;
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::Client;
use etcd_client::{EventType, WatchOptions};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use tokio::sync::watch;

use crate::allocator::{AllocateRequest, Allocation, Allocator};
use crate::annotations;
use crate::error::{IpamError, Result};
use crate::kube::GET_TIMEOUT;
use crate::namespaces::{
    config_map_name, NamespaceMapping, Restriction, CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE,
};
use crate::records::{Keys, Kind, NamespaceRecord};
use crate::sticky::Identity;
use crate::store::Store;

/// How many times an ADD gives its namespace another block and tries again, when other nodes
/// keep filling the blocks it was given.
const AUTO_ROUNDS: usize = 3;

/// The mapping as the watch last saw it: None until the first list is in.
type Published = Option<Option<Arc<NamespaceMapping>>>;

/// The `hostnic-ipam-config` ConfigMap's mapping, followed by a watch. Dropping it stops the
/// watch.
#[derive(Debug)]
pub struct ConfigMapWatch {
    mapping: watch::Receiver<Published>,
    /// Why the watch failed last, for the error of an ADD that cannot wait any longer.
    failure: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigMapWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConfigMapWatch {
    /// Starts watching the ConfigMap. Returns at once; watch failures are logged and retried
    /// with backoff.
    pub fn start(client: Client) -> ConfigMapWatch {
        let (publish, mapping) = watch::channel(None);
        let api: Api<ConfigMap> = Api::namespaced(client, CONFIG_MAP_NAMESPACE);
        let config = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP_NAME}"));
        let stream = watcher(api, config).default_backoff();
        let failure = Arc::new(Mutex::new(None));
        let failed = Arc::clone(&failure);
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            let mut current: Option<Arc<NamespaceMapping>> = None;
            let mut listing = false;
            let mut seen = false;
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => {
                        (listing, seen) = (true, false);
                    }
                    Ok(watcher::Event::InitApply(cm)) => {
                        seen = true;
                        read_config_map(&cm, &mut current);
                    }
                    Ok(watcher::Event::InitDone) => {
                        if !seen && current.take().is_some() {
                            tracing::info!(config_map = %config_map_name(), "gone: no namespace mapping");
                        }
                        listing = false;
                        publish.send_replace(Some(current.clone()));
                    }
                    Ok(watcher::Event::Apply(cm)) => {
                        read_config_map(&cm, &mut current);
                        if !listing {
                            publish.send_replace(Some(current.clone()));
                        }
                    }
                    Ok(watcher::Event::Delete(_)) => {
                        tracing::info!(config_map = %config_map_name(), "deleted: no namespace mapping");
                        current = None;
                        publish.send_replace(Some(None));
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(config_map = %config_map_name(), error = %e, "watching the namespace mapping failed; retrying");
                        }
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                        failing = true;
                        continue;
                    }
                }
                failing = false;
            }
        });
        ConfigMapWatch {
            mapping,
            failure,
            task,
        }
    }

    /// The mapping in force now, without waiting (None: no ConfigMap, or not read yet).
    pub fn current(&self) -> Option<Arc<NamespaceMapping>> {
        self.mapping.borrow().clone().flatten()
    }

    /// The mapping in force (None: no ConfigMap). Waits up to `timeout` for the first list;
    /// then fails as retryable.
    pub async fn mapping(&self, timeout: Duration) -> Result<Option<Arc<NamespaceMapping>>> {
        let mut rx = self.mapping.clone();
        let published = match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(published)) => Some(published.clone().flatten()),
            _ => None,
        };
        match published {
            Some(mapping) => Ok(mapping),
            None => {
                let cause = self
                    .failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "no answer yet".into());
                Err(IpamError::NotSynced(format!(
                    "{} not read from the Kubernetes API within {timeout:?} ({cause}); the \
                     namespace's subnets are not known yet (the daemon's service account needs \
                     get, list and watch on it)",
                    config_map_name()
                )))
            }
        }
    }
}

/// The mapping of the ConfigMap as the API server has it now (one GET; None: no ConfigMap),
/// for an operator command.
pub async fn read_mapping(client: Client) -> anyhow::Result<Option<NamespaceMapping>> {
    let api: Api<ConfigMap> = Api::namespaced(client, CONFIG_MAP_NAMESPACE);
    let found = tokio::time::timeout(GET_TIMEOUT, api.get_opt(CONFIG_MAP_NAME))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "reading {}: no answer within {GET_TIMEOUT:?}",
                config_map_name()
            )
        })?
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", config_map_name()))?;
    let Some(cm) = found else {
        return Ok(None);
    };
    NamespaceMapping::from_config_map(&cm.data.unwrap_or_default())
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{} is invalid: {e}", config_map_name()))
}

/// Reads the ConfigMap into `current`, or logs why not and keeps what was there.
fn read_config_map(cm: &ConfigMap, current: &mut Option<Arc<NamespaceMapping>>) {
    let data = cm.data.clone().unwrap_or_default();
    match NamespaceMapping::from_config_map(&data) {
        Ok(mapping) => {
            for (namespace, entry) in mapping.unmapped() {
                tracing::warn!(config_map = %config_map_name(), namespace, entry, "ignoring an entry that names no addresses (a vxnet is known only to the QingCloud API)");
            }
            tracing::info!(
                config_map = %config_map_name(),
                auto_assign = mapping.auto_assign,
                namespaces = mapping.namespaces.len(),
                default = mapping.default.is_some(),
                "namespace mapping in force"
            );
            *current = Some(Arc::new(mapping));
        }
        Err(error) => tracing::warn!(
            config_map = %config_map_name(),
            error,
            previous = if current.is_some() { "kept" } else { "none" },
            "refusing an invalid namespace mapping; the previous one stays in force"
        ),
    }
}

/// The blocks auto-assigned to each namespace, as etcd has them under `namespaces/`, kept
/// current by a watch. Dropping it stops the watch.
#[derive(Debug)]
pub struct AssignedBlocks {
    blocks: Arc<Mutex<BTreeMap<String, Vec<IpNet>>>>,
    synced: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AssignedBlocks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AssignedBlocks {
    /// Loads `namespaces/` and follows it; reloads after any watch failure.
    pub fn start(store: Store, keys: Keys) -> AssignedBlocks {
        let blocks = Arc::new(Mutex::new(BTreeMap::new()));
        let (synced_tx, synced) = watch::channel(false);
        let shared = Arc::clone(&blocks);
        let task = tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                match follow(&store, &keys, &shared, &synced_tx).await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "following the namespaces' blocks failed; reloading")
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
        AssignedBlocks {
            blocks,
            synced,
            task,
        }
    }

    /// Every namespace's blocks; waits up to `timeout` for the first load.
    pub async fn snapshot(&self, timeout: Duration) -> Result<BTreeMap<String, Vec<IpNet>>> {
        let mut rx = self.synced.clone();
        let synced = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        );
        if !synced {
            return Err(IpamError::NotSynced(format!(
                "the namespaces' blocks not loaded from etcd within {timeout:?}"
            )));
        }
        Ok(self.lock().clone())
    }

    /// Records what an assignment on this node wrote, without waiting for the watch.
    pub fn set(&self, namespace: &str, blocks: Vec<IpNet>) {
        self.lock().insert(namespace.to_string(), blocks);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<IpNet>>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The namespace of a key under `namespaces/`, and its blocks (None: unreadable, logged).
fn namespace_of(keys: &Keys, key: &str, value: Option<&[u8]>) -> Option<(String, Vec<IpNet>)> {
    let namespace = key.strip_prefix(&keys.namespaces())?.to_string();
    let Some(value) = value else {
        return Some((namespace, Vec::new()));
    };
    let record = serde_json::from_slice::<NamespaceRecord>(value)
        .map_err(|e| e.to_string())
        .and_then(|r| r.validate().map(|()| r));
    match record {
        Ok(r) => Some((namespace, r.blocks)),
        Err(reason) => {
            tracing::warn!(
                key,
                reason,
                "skipping a namespace record that does not validate; `hostnic-ipamd audit` lists it"
            );
            None
        }
    }
}

async fn follow(
    store: &Store,
    keys: &Keys,
    blocks: &Mutex<BTreeMap<String, Vec<IpNet>>>,
    synced: &watch::Sender<bool>,
) -> Result<()> {
    let prefix = keys.namespaces();
    let (revision, kvs) = store.load_prefix(&prefix).await?;
    let loaded: BTreeMap<String, Vec<IpNet>> = kvs
        .iter()
        .filter_map(|kv| namespace_of(keys, kv.key_str().ok()?, Some(kv.value())))
        .collect();
    *blocks.lock().unwrap_or_else(|e| e.into_inner()) = loaded;
    synced.send_replace(true);
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = store
        .retry("watch namespaces", |mut c| {
            let (prefix, options) = (prefix.clone(), options.clone());
            async move { c.watch(prefix, Some(options)).await }
        })
        .await?;
    loop {
        let msg = stream.message().await.map_err(|e| IpamError::Unavailable {
            op: "watch namespaces".into(),
            reason: crate::store::describe(&e),
        })?;
        let Some(resp) = msg else {
            return Err(IpamError::NotSynced("watch stream closed".into()));
        };
        if resp.canceled() {
            return Err(IpamError::NotSynced(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        let mut map = blocks.lock().unwrap_or_else(|e| e.into_inner());
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let value = (event.event_type() == EventType::Put).then(|| kv.value());
            if let Some((namespace, list)) = namespace_of(keys, key, value) {
                if list.is_empty() {
                    map.remove(&namespace);
                } else {
                    map.insert(namespace, list);
                }
            }
        }
    }
}

/// The namespace mapping a daemon with a Kubernetes client applies to every ADD that names its
/// pod's namespace.
#[derive(Debug)]
pub struct Namespaces {
    config: ConfigMapWatch,
    assigned: AssignedBlocks,
    wait: Duration,
}

impl Namespaces {
    /// Starts following the ConfigMap (with `client`) and the auto-assigned blocks (in the
    /// allocator's etcd).
    pub fn start(client: Client, allocator: &Allocator) -> Namespaces {
        Namespaces {
            config: ConfigMapWatch::start(client),
            assigned: AssignedBlocks::start(allocator.store().clone(), allocator.keys().clone()),
            wait: GET_TIMEOUT,
        }
    }

    /// The ConfigMap's entries for `namespace` as written (its own, else `Default`'s): CIDRs
    /// and vxnet ids, for the NIC pool's placement. None when it has none, or no mapping has
    /// been read.
    pub fn entries_of(&self, namespace: &str) -> Option<Vec<String>> {
        let mapping = self.config.current()?;
        let entries = mapping
            .namespaces
            .get(namespace)
            .or(mapping.default.as_ref())?;
        Some(
            entries
                .cidrs
                .iter()
                .map(ToString::to_string)
                .chain(entries.unmapped.iter().cloned())
                .collect(),
        )
    }

    /// Allocates for `req` as its pod's namespace may: dynamic addresses only from its
    /// subnets (giving it a block first when it has auto-assigned blocks and they are full),
    /// exact ones refused (code 7) when outside them. A request without a pod namespace, or a
    /// cluster without the ConfigMap, is not restricted.
    pub async fn allocate(
        &self,
        allocator: &Allocator,
        req: &AllocateRequest,
        identity: Option<&Identity>,
    ) -> Result<Allocation> {
        let namespace = req
            .pod
            .as_ref()
            .map(|p| p.namespace.as_str())
            .filter(|n| !n.is_empty());
        let Some(namespace) = namespace else {
            return allocator.allocate_as(req, &[], identity).await;
        };
        let Some(mapping) = self.config.mapping(self.wait).await? else {
            return allocator.allocate_as(req, &[], identity).await;
        };
        allocator.ready().await?;
        let mut assigned = self.assigned.snapshot(self.wait).await?;
        for round in 0..=AUTO_ROUNDS {
            let restrictions = restrictions(&mapping, namespace, req, &assigned)?;
            if round == 0 {
                check_exact(req, &restrictions, namespace)?;
            }
            let full = req
                .range_sets
                .iter()
                .zip(&restrictions)
                .any(|(set, r)| r.auto_space.is_some() && !allocator.has_free_within(set, r));
            // A repeated ADD gets what it holds: its namespace needs no new block for it.
            if full && round == 0 && allocator.lookup(&req.attachment).await?.is_some() {
                return allocator.allocate_as(req, &restrictions, identity).await;
            }
            let mut extended = false;
            for (set, r) in req.range_sets.iter().zip(&restrictions) {
                if r.auto_space.is_some()
                    && round < AUTO_ROUNDS
                    && !allocator.has_free_within(set, r)
                {
                    let blocks = allocator
                        .assign_namespace_block(namespace, set, r, &req.attachment.network)
                        .await?;
                    self.assigned.set(namespace, blocks.clone());
                    assigned.insert(namespace.to_string(), blocks);
                    extended = true;
                }
            }
            if extended {
                continue;
            }
            match allocator.allocate_as(req, &restrictions, identity).await {
                Err(IpamError::Exhausted { .. })
                    if round < AUTO_ROUNDS
                        && restrictions.iter().any(|r| r.auto_space.is_some()) =>
                {
                    continue
                }
                other => return other,
            }
        }
        let restrictions = restrictions(&mapping, namespace, req, &assigned)?;
        allocator.allocate_as(req, &restrictions, identity).await
    }
}

/// The restriction of each range set of `req` for `namespace`; refused (code 7) when the
/// ConfigMap maps the namespace to nothing usable.
fn restrictions(
    mapping: &NamespaceMapping,
    namespace: &str,
    req: &AllocateRequest,
    assigned: &BTreeMap<String, Vec<IpNet>>,
) -> Result<Vec<Restriction>> {
    req.range_sets
        .iter()
        .map(|set| {
            let pools: Vec<IpNet> = set.pools.iter().map(|p| p.subnet).collect();
            mapping
                .restriction(namespace, &pools, assigned)
                .map_err(|reason| IpamError::Refused {
                    reason: format!("pod {}: namespace {namespace}: {reason}", pod_name(req)),
                })
        })
        .collect()
}

fn pod_name(req: &AllocateRequest) -> String {
    req.pod
        .as_ref()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_default()
}

/// Refuses an exact address outside what the namespace may use: a tenant cannot take another
/// namespace's address by annotation or by `IP=`.
fn check_exact(req: &AllocateRequest, restrictions: &[Restriction], namespace: &str) -> Result<()> {
    for &ip in &req.requested {
        let set = req
            .range_sets
            .iter()
            .position(|s| s.pools.iter().any(|p| p.subnet.contains(&ip)));
        let Some(r) = set.and_then(|i| restrictions.get(i)) else {
            continue;
        };
        if r.admits(ip) {
            continue;
        }
        let asked = match req.requested_kind {
            Kind::Fixed => format!("annotation {} of pod {}", annotations::IP, pod_name(req)),
            _ => format!(
                "the runtime's request (CNI_ARGS IP=, runtimeConfig.ips) for pod {}",
                pod_name(req)
            ),
        };
        return Err(IpamError::InvalidRequest {
            ip,
            network: req.attachment.network.clone(),
            reason: format!(
                "{asked} asks for {ip}, which namespace {namespace} may not use; it may use {}",
                r.describe()
            ),
        });
    }
    Ok(())
}
