//! The daemon's Kubernetes client: a cache of this node's pods, so that an ADD reads a pod's
//! annotations and owner without waiting on the API server.
//!
//! The cache is kube-runtime's reflector fed by a watcher of the pods whose `spec.nodeName` is
//! this node (LIST, then WATCH from its resourceVersion; a stale resourceVersion (410 Gone)
//! makes the watcher list again). A pod scheduled a moment ago may not have reached the cache
//! yet: a miss costs one GET. When neither the cache nor the API server can say what the pod
//! is, the ADD fails as retryable ([`KubeError::is_retryable`]): a pod whose annotations ask
//! for a fixed address must never get a dynamic one because the API was briefly away.
//!
//! Where the client comes from ([`KubeSource`]): a kubeconfig file, else the in-cluster
//! service account, else none at all, and then nothing here runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::Api;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::reflector::{self, ObjectRef, Store};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::{Client, Config, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;

use crate::annotations::{Owner, PodMeta};

/// How long an ADD waits for the GET of a pod the cache does not have. The plugin waits 10 s
/// for the whole ADD, and the etcd transaction still has to fit after this.
pub const GET_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the daemon's Kubernetes client comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    /// A kubeconfig file (`--kubeconfig`, `KUBECONFIG`, file key `kubeconfig`): its current
    /// context.
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` is set).
    InCluster,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: ::kube::config::KubeconfigError,
    },
    #[error("in-cluster Kubernetes config (service account): {0}")]
    InCluster(#[source] ::kube::config::InClusterError),
    #[error("Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
    /// The API server did not answer the GET of a pod the cache does not have.
    #[error("pod {pod}: not in this node's pod cache, and the Kubernetes API server cannot be reached ({reason}); the ADD needs the pod's annotations, so it fails rather than allocate an address the pod may not want: try again")]
    Unreachable { pod: String, reason: String },
    /// The API server says there is no such pod (deleted meanwhile, or a name the runtime made
    /// up).
    #[error("pod {pod} does not exist in the Kubernetes API")]
    NotFound { pod: String },
    /// The API server did not answer the GET of the pod that holds an address asked for.
    #[error("pod {pod} cannot be read from the Kubernetes API server ({reason})")]
    HolderUnreachable { pod: String, reason: String },
    /// The pod of that name in the API is another incarnation than the runtime's.
    #[error("pod {pod}: the runtime sends UID {runtime}, the Kubernetes API has UID {api} (the pod was re-created, or the API is behind)")]
    OtherUid {
        pod: String,
        runtime: String,
        api: String,
    },
}

impl KubeError {
    /// True when the same ADD may succeed later: the API server may come back, catch up, or
    /// show the pod.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KubeError::Unreachable { .. }
                | KubeError::HolderUnreachable { .. }
                | KubeError::NotFound { .. }
                | KubeError::OtherUid { .. }
        )
    }
}

/// Which source applies: the kubeconfig if one is given, else in-cluster when the kubelet set
/// `KUBERNETES_SERVICE_HOST` (`in_cluster`), else none.
pub fn source_of(kubeconfig: Option<PathBuf>, in_cluster: bool) -> Option<KubeSource> {
    match kubeconfig {
        Some(path) => Some(KubeSource::Kubeconfig(path)),
        None if in_cluster => Some(KubeSource::InCluster),
        None => None,
    }
}

/// A client for `source`. Reads the files it names; makes no request.
pub async fn client(source: &KubeSource) -> Result<Client, KubeError> {
    let config = match source {
        KubeSource::Kubeconfig(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        KubeSource::InCluster => Config::incluster().map_err(KubeError::InCluster)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Whether the pod that holds an address is still the pod its address record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The pod exists with the record's UID and is not being deleted.
    Alive,
    /// The pod is being deleted (`metadata.deletionTimestamp`): its address is free once the
    /// kubelet confirms the deletion.
    Terminating,
    /// No pod of that UID exists any more: `reason` says why (deleted, or re-created under
    /// the same name, as a StatefulSet does).
    Gone { reason: String },
}

/// Judges the holder `namespace/name` of UID `uid` (from its address record) by what the API
/// answered for that name (`found`, None for 404).
pub fn judge_holder(namespace: &str, name: &str, uid: &str, found: Option<&Pod>) -> Holder {
    let pod = format!("pod {namespace}/{name} uid {uid}");
    let Some(found) = found else {
        return Holder::Gone {
            reason: format!("{pod} no longer exists"),
        };
    };
    let api_uid = found.uid().unwrap_or_default();
    if api_uid != uid {
        return Holder::Gone {
            reason: format!("{pod} was re-created with uid {api_uid}"),
        };
    }
    if found.metadata.deletion_timestamp.is_some() {
        return Holder::Terminating;
    }
    Holder::Alive
}

/// What the allocator needs of a pod object.
pub fn pod_meta(pod: &Pod) -> PodMeta {
    let controller = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| Owner {
            api_version: o.api_version.clone(),
            kind: o.kind.clone(),
            name: o.name.clone(),
            uid: o.uid.clone(),
        });
    PodMeta {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        annotations: pod.annotations().clone(),
        controller,
    }
}

/// This node's pods, as the API server has them. Dropping it stops the watch.
pub struct PodCache {
    client: Client,
    store: Store<Pod>,
    synced: Arc<AtomicBool>,
    get_timeout: Duration,
    /// The watch feeding `store`; None for a cache that only GETs ([`PodCache::get_only`]).
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PodCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCache")
            .field("pods", &self.store.len())
            .field("synced", &self.is_synced())
            .finish_non_exhaustive()
    }
}

impl Drop for PodCache {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.abort();
        }
    }
}

impl PodCache {
    /// Starts watching the pods scheduled to `node`. Returns at once; [`PodCache::is_synced`]
    /// tells when the first list is in. Watch failures are logged and retried with backoff.
    pub fn start(client: Client, node: &str) -> PodCache {
        let (store, writer) = reflector::store();
        let synced = Arc::new(AtomicBool::new(false));
        let api: Api<Pod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let flag = Arc::clone(&synced);
        let node = node.to_string();
        let stream = watcher(api, config)
            .default_backoff()
            // Only the metadata is read: the spec and status of every pod of the node would
            // be most of the cache's memory.
            .modify(|pod: &mut Pod| {
                pod.managed_fields_mut().clear();
                pod.spec = None;
                pod.status = None;
            })
            .reflect(writer);
        let watch = tokio::spawn(async move {
            futures::pin_mut!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if !flag.swap(true, Ordering::SeqCst) {
                            tracing::info!(%node, "pod cache synced");
                        }
                        failing = false;
                    }
                    Ok(_) => failing = false,
                    Err(e) => {
                        // Once per outage at warn; the backoff retries.
                        if !failing {
                            tracing::warn!(%node, error = %e, "watching this node's pods failed; retrying");
                        } else {
                            tracing::debug!(%node, error = %e, "watching this node's pods failed");
                        }
                        failing = true;
                    }
                }
            }
        });
        PodCache {
            client,
            store,
            synced,
            get_timeout: GET_TIMEOUT,
            watch: Some(watch),
        }
    }

    /// A cache that never holds a pod, so that every question is one GET: for a one-shot
    /// operator command, where listing and watching the node's pods would cost more than it
    /// saves.
    pub fn get_only(client: Client) -> PodCache {
        let (store, _writer) = reflector::store();
        PodCache {
            client,
            store,
            synced: Arc::new(AtomicBool::new(false)),
            get_timeout: GET_TIMEOUT,
            watch: None,
        }
    }

    /// Whether the first list of this node's pods has been loaded (a readiness signal).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Waits until the first list is in, or `timeout` passes. Returns whether it is.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        // The store is ready when the first list is applied to it, a moment before the watch
        // task sees the same event and sets the flag.
        matches!(
            tokio::time::timeout(timeout, self.store.wait_until_ready()).await,
            Ok(Ok(()))
        )
    }

    /// The pod `namespace/name`: from the cache, else by one GET. When the runtime sent the
    /// pod's UID (`uid`, empty if not), a cached pod of another UID is read again by GET, and
    /// refused if the API still has another.
    pub async fn pod(&self, namespace: &str, name: &str, uid: &str) -> Result<PodMeta, KubeError> {
        let key = ObjectRef::<Pod>::new(name).within(namespace);
        if let Some(pod) = self.store.get(&key) {
            let meta = pod_meta(&pod);
            if uid.is_empty() || meta.uid == uid {
                return Ok(meta);
            }
        }
        let meta = self.get(namespace, name).await?;
        if !uid.is_empty() && meta.uid != uid {
            return Err(KubeError::OtherUid {
                pod: meta.key(),
                runtime: uid.to_string(),
                api: meta.uid,
            });
        }
        Ok(meta)
    }

    /// Whether the pod `namespace/name` of UID `uid`, which an address record names as its
    /// holder, still exists. Always asks the API server (one GET): the holder may be another
    /// node's pod, which this node's cache does not have.
    pub async fn holder(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Holder, KubeError> {
        let found =
            self.get_opt(namespace, name)
                .await
                .map_err(|reason| KubeError::HolderUnreachable {
                    pod: format!("{namespace}/{name}"),
                    reason,
                })?;
        Ok(judge_holder(namespace, name, uid, found.as_ref()))
    }

    /// Whether this node's pod `namespace/name` of UID `uid`, which one of the node's
    /// attachment records names, still exists (the pod GC's question). A cached pod of that UID
    /// answers without a request: it is alive or terminating. Anything else (no such pod in the
    /// cache, one of another UID, a cache whose first list is not in yet) is asked of the API
    /// server by one GET, so only the API's own answer ever says [`Holder::Gone`]: a cache that
    /// is behind or not synced can keep an attachment one pass longer, never release it.
    pub async fn node_holder(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Holder, KubeError> {
        let key = ObjectRef::<Pod>::new(name).within(namespace);
        if let Some(pod) = self.store.get(&key) {
            if pod.uid().as_deref() == Some(uid) {
                return Ok(judge_holder(namespace, name, uid, Some(&pod)));
            }
        }
        self.holder(namespace, name, uid).await
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<PodMeta, KubeError> {
        let pod = format!("{namespace}/{name}");
        let answer =
            self.get_opt(namespace, name)
                .await
                .map_err(|reason| KubeError::Unreachable {
                    pod: pod.clone(),
                    reason,
                })?;
        match answer {
            Some(found) => Ok(pod_meta(&found)),
            None => Err(KubeError::NotFound { pod }),
        }
    }

    /// One GET of the pod, within the timeout; Err says why the API server gave no answer.
    async fn get_opt(&self, namespace: &str, name: &str) -> Result<Option<Pod>, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        tokio::time::timeout(self.get_timeout, api.get_opt(name))
            .await
            .map_err(|_| format!("no answer to GET within {:?}", self.get_timeout))?
            .map_err(|e| e.to_string())
    }
}

/// How long one LIST of the cluster's nodes may take.
pub const NODE_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The names of every Node object of the cluster, from one LIST served by the API server (not
/// a cache). Err with the reason when the API server cannot be asked or does not answer within
/// [`NODE_LIST_TIMEOUT`]: the caller then judges no node.
pub async fn node_names(client: &Client) -> Result<std::collections::BTreeSet<String>, String> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    match tokio::time::timeout(
        NODE_LIST_TIMEOUT,
        nodes.list(&::kube::api::ListParams::default()),
    )
    .await
    {
        Ok(Ok(list)) => Ok(list.items.iter().map(ResourceExt::name_any).collect()),
        Ok(Err(e)) => Err(format!("listing the nodes of the Kubernetes API: {e}")),
        Err(_) => Err(format!(
            "listing the nodes of the Kubernetes API: no answer within {NODE_LIST_TIMEOUT:?}"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    #[test]
    fn the_kubeconfig_wins_then_in_cluster_then_none() {
        let path = PathBuf::from("/etc/k.conf");
        assert_eq!(
            source_of(Some(path.clone()), true),
            Some(KubeSource::Kubeconfig(path))
        );
        assert_eq!(source_of(None, true), Some(KubeSource::InCluster));
        assert_eq!(source_of(None, false), None);
    }

    #[test]
    fn a_holder_is_gone_when_deleted_or_re_created_terminating_while_deleted_else_alive() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let pod = |uid: &str, deleting: bool| Pod {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some("web-1".into()),
                uid: Some(uid.into()),
                deletion_timestamp: deleting.then(|| Time(k8s_openapi::jiff::Timestamp::now())),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let judge = |found: Option<&Pod>| judge_holder("default", "web-1", "u-old", found);
        assert_eq!(
            judge(None),
            Holder::Gone {
                reason: "pod default/web-1 uid u-old no longer exists".into()
            }
        );
        assert_eq!(
            judge(Some(&pod("u-new", false))),
            Holder::Gone {
                reason: "pod default/web-1 uid u-old was re-created with uid u-new".into()
            }
        );
        // A re-created pod that is itself terminating is still not the holder.
        assert!(matches!(
            judge(Some(&pod("u-new", true))),
            Holder::Gone { .. }
        ));
        assert_eq!(judge(Some(&pod("u-old", true))), Holder::Terminating);
        assert_eq!(judge(Some(&pod("u-old", false))), Holder::Alive);
    }

    #[test]
    fn pod_meta_takes_the_controller_owner_and_the_annotations() {
        let owner = |kind: &str, name: &str, controller: Option<bool>| OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "o".into(),
            controller,
            block_owner_deletion: None,
        };
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("db".into()),
                name: Some("web-2".into()),
                uid: Some("u-2".into()),
                annotations: Some([("kube-ipam.ip".to_string(), "10.0.0.5".to_string())].into()),
                owner_references: Some(vec![
                    owner("ConfigMap", "x", None),
                    owner("StatefulSet", "web", Some(true)),
                ]),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let meta = pod_meta(&pod);
        assert_eq!(meta.key(), "db/web-2");
        assert_eq!(meta.uid, "u-2");
        assert_eq!(meta.annotations["kube-ipam.ip"], "10.0.0.5");
        assert_eq!(meta.stateful_set().map(|o| o.name.as_str()), Some("web"));
    }
}
