//! A stateful fake Kubernetes API server for tests.
//!
//! There is no kube-apiserver on the test machines (see `docs/environment.md`), so the daemon's
//! Kubernetes client (the production code, unchanged) is pointed at this server instead. It
//! speaks the real JSON wire format of the
//! [API concepts](https://kubernetes.io/docs/reference/using-api/api-concepts/) for core/v1
//! Pods, ConfigMaps and Nodes, apps/v1 StatefulSets and the cluster-scoped custom resource
//! VxNetPool (`network.qingcloud.com/v1alpha1`, hostnic's) over plain HTTP on 127.0.0.1:
//!
//! - GET of one object, with a `Status` body (`reason: NotFound`) for a missing one;
//! - LIST with `fieldSelector` (any dotted field path, `=`, `==`, `!=`), `labelSelector`
//!   (equality and set-based), `limit`/`continue` paging and the list's `resourceVersion`;
//! - WATCH (`watch=1|true`) from a `resourceVersion`, as newline-delimited `ADDED`, `MODIFIED`,
//!   `DELETED`, `BOOKMARK` and `ERROR` events. A watch with a field or label selector sees an
//!   object that starts to match as `ADDED` and one that stops matching as `DELETED`, as the real
//!   watch cache does. A version older than the kept history gets an `ERROR` event with a 410
//!   `Status` (`reason: Expired`); [`FakeKube::compact`] forces that. `allowWatchBookmarks`,
//!   `sendInitialEvents` (streaming lists, ending with the `k8s.io/initial-events-end` bookmark)
//!   and `timeoutSeconds` are honoured;
//! - POST, PUT (with the `resourceVersion` precondition), PATCH (JSON merge patch, strategic
//!   merge treated as merge, apply treated as merge, JSON patch) and DELETE (with `uid` and
//!   `resourceVersion` preconditions, and graceful deletion of scheduled pods, which stay
//!   "terminating" with a `deletionTimestamp` until [`FakeKube::finish_deletion`] or a DELETE
//!   with `gracePeriodSeconds=0`, as if their kubelet confirmed). Every write bumps one global
//!   `resourceVersion` and is seen by the open watches;
//! - the discovery documents (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/apps/v1`,
//!   `/apis/network.qingcloud.com/v1alpha1`).
//!
//! Tests change the state directly through [`FakeKube`]'s methods (objects are
//! `serde_json::Value`, so every field round-trips; [`PodBuilder`] and friends make typical
//! ones), inject faults ([`Fault`]) to check how a client handles an API server that fails or
//! does not answer, and read the request log.
//!
//! What it does not do: authentication, admission, defaulting of specs, schema validation,
//! finalizers, owner-reference garbage collection (deleting a StatefulSet leaves its pods),
//! scheduling, protobuf, server-side apply field ownership, DELETE of collections, and a
//! consistent snapshot across list pages (later pages come from the current state; the list's
//! `resourceVersion` is the first page's, so a watch from it may replay a change the pages
//! already showed, which a watcher absorbs).
//!
//! The server runs on a thread of its own with its own tokio runtime, so sync and async tests
//! use it alike; dropping the [`FakeKube`] stops it, ends every open connection and removes its
//! kubeconfig.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

/// How often an open watch that asked for bookmarks gets one, unless set otherwise.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a watch without `timeoutSeconds` stays open.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often a waiting request or watch looks again at a fault that expires by time.
const FAULT_POLL: Duration = Duration::from_millis(25);
/// Grace period of a pod deleted without one, as the API server defaults it.
const DEFAULT_POD_GRACE_SECONDS: i64 = 30;
/// Version reported by `/version`: the API the fake's wire format follows.
const SERVED_VERSION: (&str, &str) = ("1", "32");

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    ConfigMap,
    Node,
    StatefulSet,
    /// hostnic's custom resource: cluster-scoped, served as if its CRD were installed.
    VxNetPool,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::ConfigMap,
        Kind::Node,
        Kind::StatefulSet,
        Kind::VxNetPool,
    ];

    /// The `kind` field of an object.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::ConfigMap => "ConfigMap",
            Kind::Node => "Node",
            Kind::StatefulSet => "StatefulSet",
            Kind::VxNetPool => "VxNetPool",
        }
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::ConfigMap => "configmaps",
            Kind::Node => "nodes",
            Kind::StatefulSet => "statefulsets",
            Kind::VxNetPool => "vxnetpools",
        }
    }

    /// The `apiVersion` field of an object.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::StatefulSet => "apps/v1",
            Kind::VxNetPool => "network.qingcloud.com/v1alpha1",
            _ => "v1",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::StatefulSet => "apps",
            Kind::VxNetPool => "network.qingcloud.com",
            _ => "",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::VxNetPool)
    }

    fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["po"],
            Kind::ConfigMap => &["cm"],
            Kind::Node => &["no"],
            Kind::StatefulSet => &["sts"],
            Kind::VxNetPool => &[],
        }
    }

    fn from_kind_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }

    fn from_route(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}

/// How the fake fails while a fault is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every request is answered with this HTTP status and a matching `Status` body
    /// (500 `InternalError`, 503 `ServiceUnavailable`, 429 `TooManyRequests`, ...); open watches
    /// are cut.
    Status(u16),
    /// Every request's connection is closed without an answer; open watches are cut.
    Drop,
    /// Requests are held unanswered, and open watches deliver nothing, until the fault ends;
    /// then they go on as if the server had been slow. A client sees its own timeouts.
    Hang,
}

#[derive(Debug, Clone)]
struct FaultRule {
    fault: Fault,
    until: Option<Instant>,
    remaining: Option<u32>,
}

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string, empty if none.
    pub query: String,
}

impl RecordedRequest {
    /// Whether the request was a watch (`watch=1` or `watch=true`).
    pub fn is_watch(&self) -> bool {
        parse_query(&self.query)
            .get("watch")
            .is_some_and(|v| v == "1" || v == "true")
    }
}

/// Settings of a [`FakeKube`].
#[derive(Debug, Clone)]
pub struct FakeKubeOptions {
    /// How often a watch with `allowWatchBookmarks=true` gets a `BOOKMARK`.
    pub bookmark_interval: Duration,
}

impl Default for FakeKubeOptions {
    fn default() -> Self {
        FakeKubeOptions {
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as watches replay it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    event: EventType,
    /// The object after the write (for `Deleted`, its last state with the deletion's version).
    object: Value,
    /// The object before the write, so a selector watch can tell "starts/stops matching".
    previous: Option<Value>,
}

type Key = (Kind, String, String);

#[derive(Debug)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Changes up to this version are forgotten: a watch or continue token older gets 410.
    compacted: u64,
    fault: Option<FaultRule>,
    requests: Vec<RecordedRequest>,
    /// Bumped by `send_bookmarks` and `close_watches`; watches act when they see it move.
    bookmark_epoch: u64,
    close_epoch: u64,
    /// Bumped by `clear_fault`: releases the requests a `Hang` holds.
    release_epoch: u64,
    open_watches: usize,
    uid_counter: u64,
    uid_seed: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes watches and held requests after any change of `state`.
    changed: watch::Sender<u64>,
    options: FakeKubeOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held (a test assertion inside a closure) leaves consistent
        // state behind: every mutation is completed before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The fault in force now, counting this request against a `fail_next` budget, and
    /// whether it came from such a budget.
    fn take_fault(&self) -> Option<(Fault, bool)> {
        let mut st = self.lock();
        let rule = st.fault.as_mut()?;
        if rule.until.is_some_and(|u| Instant::now() >= u) {
            st.fault = None;
            return None;
        }
        let (fault, counted) = (rule.fault, rule.remaining.is_some());
        if let Some(n) = rule.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.fault = None;
            }
        }
        Some((fault, counted))
    }

    fn current_fault(&self) -> Option<Fault> {
        let mut st = self.lock();
        let rule = st.fault.as_ref()?;
        if rule.until.is_some_and(|u| Instant::now() >= u) {
            st.fault = None;
            return None;
        }
        Some(rule.fault)
    }
}

/// A running fake API server; stopped when dropped.
#[derive(Debug)]
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// Holds the kubeconfig; removed on drop.
    _kubeconfig_dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl FakeKube {
    /// Starts an empty server on a free port of 127.0.0.1.
    pub fn start() -> anyhow::Result<FakeKube> {
        Self::start_with(FakeKubeOptions::default())
    }

    pub fn start_with(options: FakeKubeOptions) -> anyhow::Result<FakeKube> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("binding a free port on 127.0.0.1 for the fake API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32)
            ^ u64::from(addr.port());
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 1,
                fault: None,
                requests: Vec::new(),
                bookmark_epoch: 0,
                close_epoch: 0,
                release_epoch: 0,
                open_watches: 0,
                uid_counter: 0,
                uid_seed: seed | 1,
            }),
            changed,
            options,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fake API server's runtime")?;
        let (shutdown, shutdown_rx) = oneshot::channel();
        let server_shared = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("fake-kube-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            tokio::spawn(accept_loop(listener, server_shared));
                        }
                        Err(e) => eprintln!("fake API server: cannot listen: {e}"),
                    }
                    let _ = shutdown_rx.await;
                });
                // Dropping the runtime cancels every connection task: open watches end.
                drop(runtime);
            })
            .context("spawning the fake API server's thread")?;
        let kubeconfig_dir = tempfile::Builder::new()
            .prefix("hostnic-fake-kube-")
            .tempdir()
            .context("creating a directory for the fake API server's kubeconfig")?;
        let kubeconfig = kubeconfig_dir.path().join("kubeconfig");
        let fake = FakeKube {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
            _kubeconfig_dir: kubeconfig_dir,
            kubeconfig,
        };
        fake.write_kubeconfig(&fake.kubeconfig)?;
        Ok(fake)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the `server` of a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (no auth, namespace `default`) for this server, removed with it.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for this server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        fs::write(path, kubeconfig_yaml(&self.url()))
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// The global resourceVersion: that of the last write.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    // ---- objects -------------------------------------------------------------------------

    /// Creates `object` (its `kind` says which resource; `metadata.uid` is kept if given, else
    /// generated) and returns it as stored.
    pub fn create(&self, object: Value) -> anyhow::Result<Value> {
        let kind = kind_of(&object)?;
        let ns = object_namespace(&object);
        self.write(|st| create_object(st, kind, &ns, object, true))
    }

    /// Replaces an existing object unconditionally (its `resourceVersion` is ignored).
    pub fn replace(&self, mut object: Value) -> anyhow::Result<Value> {
        let kind = kind_of(&object)?;
        let (ns, name) = (object_namespace(&object), object_name(&object)?);
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        self.write(|st| replace_object(st, kind, &ns, &name, object))
    }

    /// Creates or replaces `object`.
    pub fn apply(&self, object: Value) -> anyhow::Result<Value> {
        let kind = kind_of(&object)?;
        let (ns, name) = (object_namespace(&object), object_name(&object)?);
        if self.get(kind, &ns, &name).is_some() {
            self.replace(object)
        } else {
            self.create(object)
        }
    }

    /// Applies a JSON merge patch (RFC 7386) to an object.
    pub fn merge_patch(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        patch: Value,
    ) -> anyhow::Result<Value> {
        let ns = scope_ns(kind, ns);
        self.write(|st| patch_object(st, kind, &ns, name, PatchKind::Merge, &patch))
    }

    /// Removes an object now, whatever its grace period, and returns its last state.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> anyhow::Result<Value> {
        let ns = scope_ns(kind, ns);
        self.write(|st| remove_object(st, kind, &ns, name))
    }

    /// Removes a terminating pod, as its kubelet does once the containers are gone.
    pub fn finish_deletion(&self, ns: &str, name: &str) -> anyhow::Result<Value> {
        self.delete(Kind::Pod, ns, name)
    }

    /// Marks a pod terminating (`deletionTimestamp` = now + `grace`), as a graceful DELETE does.
    pub fn set_terminating(&self, ns: &str, name: &str, grace: Duration) -> anyhow::Result<Value> {
        self.write(|st| mark_terminating(st, ns, name, grace.as_secs() as i64))
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let key = (kind, scope_ns(kind, ns), name.to_string());
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Every object of `kind`, in namespace/name order; `ns` `None` for all namespaces.
    pub fn list(&self, kind: Kind, ns: Option<&str>) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn create_pod(&self, pod: PodBuilder) -> anyhow::Result<Value> {
        self.create(pod.build())
    }

    pub fn delete_node(&self, name: &str) -> anyhow::Result<Value> {
        self.delete(Kind::Node, "", name)
    }

    fn write<F>(&self, f: F) -> anyhow::Result<Value>
    where
        F: FnOnce(&mut State) -> Result<Value, ApiError>,
    {
        let result = f(&mut self.shared.lock());
        self.shared.notify();
        result.map_err(|e| anyhow!("fake API server: {} ({})", e.message, e.reason))
    }

    // ---- watches -------------------------------------------------------------------------

    /// Forgets the history up to now: a watch or a continue token from an older version gets
    /// 410 Gone, as after an etcd compaction.
    pub fn compact(&self) {
        let rv = self.resource_version();
        self.compact_to(rv);
    }

    /// Forgets the changes up to and including `rv`.
    pub fn compact_to(&self, rv: u64) {
        let mut st = self.shared.lock();
        st.compacted = st.compacted.max(rv.min(st.rv));
        let compacted = st.compacted;
        st.history.retain(|c| c.rv > compacted);
        drop(st);
        self.shared.notify();
    }

    /// Sends a `BOOKMARK` now to every open watch that allows them.
    pub fn send_bookmarks(&self) {
        self.shared.lock().bookmark_epoch += 1;
        self.shared.notify();
    }

    /// Ends every open watch cleanly, as an API server does at a watch's timeout.
    pub fn close_watches(&self) {
        self.shared.lock().close_epoch += 1;
        self.shared.notify();
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    /// Blocks until at least `n` watches are open. In a current-thread async test, use
    /// [`FakeKube::wait_for_watches_async`], which does not block the runtime.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.open_watches() < n {
            if Instant::now() >= deadline {
                bail!(
                    "{} watches open after {timeout:?}, expected {n}",
                    self.open_watches()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub async fn wait_for_watches_async(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.open_watches() < n {
            if Instant::now() >= deadline {
                bail!(
                    "{} watches open after {timeout:?}, expected {n}",
                    self.open_watches()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    // ---- faults and the request log --------------------------------------------------------

    /// Fails every request until [`FakeKube::clear_fault`].
    pub fn set_fault(&self, fault: Fault) {
        self.install_fault(FaultRule {
            fault,
            until: None,
            remaining: None,
        });
    }

    /// Fails every request for `duration`.
    pub fn fail_for(&self, fault: Fault, duration: Duration) {
        self.install_fault(FaultRule {
            fault,
            until: Some(Instant::now() + duration),
            remaining: None,
        });
    }

    /// Fails the next `n` requests. Requests held by a [`Fault::Hang`] this way wait for
    /// [`FakeKube::clear_fault`] (or the server's end).
    pub fn fail_next(&self, fault: Fault, n: u32) {
        if n == 0 {
            return;
        }
        self.install_fault(FaultRule {
            fault,
            until: None,
            remaining: Some(n),
        });
    }

    /// Ends the fault and releases every request a [`Fault::Hang`] holds.
    pub fn clear_fault(&self) {
        let mut st = self.shared.lock();
        st.fault = None;
        st.release_epoch += 1;
        drop(st);
        self.shared.notify();
    }

    fn install_fault(&self, rule: FaultRule) {
        self.shared.lock().fault = Some(rule);
        self.shared.notify();
    }

    /// Every request received so far, in order (also those a fault failed).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
"
    )
}

// ---- object builders ---------------------------------------------------------------------------

/// A Pod as tests need them: identity, node, annotations, labels, owner, phase.
#[derive(Debug, Clone)]
pub struct PodBuilder {
    ns: String,
    name: String,
    uid: Option<String>,
    node: Option<String>,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    owner: Option<Value>,
    phase: String,
    pod_ip: Option<String>,
}

/// Starts a Pod `ns/name`, phase Running, with one container `app`.
pub fn pod(ns: &str, name: &str) -> PodBuilder {
    PodBuilder {
        ns: ns.to_string(),
        name: name.to_string(),
        uid: None,
        node: None,
        annotations: BTreeMap::new(),
        labels: BTreeMap::new(),
        owner: None,
        phase: "Running".to_string(),
        pod_ip: None,
    }
}

impl PodBuilder {
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_string());
        self
    }

    /// `spec.nodeName`.
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// A controller ownerReference to the StatefulSet `name` with `uid`, as its controller
    /// sets it (the pod's name should be `<name>-<ordinal>`).
    pub fn owned_by_statefulset(mut self, name: &str, uid: &str) -> Self {
        self.owner = Some(json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "name": name,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }));
        self
    }

    /// A controller ownerReference of any kind (a ReplicaSet of a Deployment, ...).
    pub fn owned_by(mut self, api_version: &str, kind: &str, name: &str, uid: &str) -> Self {
        self.owner = Some(json!({
            "apiVersion": api_version,
            "kind": kind,
            "name": name,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }));
        self
    }

    /// `status.phase` (default `Running`).
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_string();
        self
    }

    pub fn pod_ip(mut self, ip: &str) -> Self {
        self.pod_ip = Some(ip.to_string());
        self
    }

    pub fn build(self) -> Value {
        let mut meta = json!({ "name": self.name, "namespace": self.ns });
        if let Some(uid) = self.uid {
            meta["uid"] = json!(uid);
        }
        if !self.annotations.is_empty() {
            meta["annotations"] = json!(self.annotations);
        }
        if !self.labels.is_empty() {
            meta["labels"] = json!(self.labels);
        }
        if let Some(owner) = self.owner {
            meta["ownerReferences"] = json!([owner]);
        }
        let mut spec = json!({
            "containers": [{ "name": "app", "image": "busybox" }],
            "terminationGracePeriodSeconds": DEFAULT_POD_GRACE_SECONDS,
        });
        if let Some(node) = self.node {
            spec["nodeName"] = json!(node);
        }
        let mut status = json!({ "phase": self.phase });
        if let Some(ip) = self.pod_ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{ "ip": ip }]);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": spec,
            "status": status,
        })
    }
}

/// A Node `name`, Ready.
pub fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        "status": { "conditions": [{ "type": "Ready", "status": "True" }] },
    })
}

/// A ConfigMap `ns/name` holding `data`.
pub fn config_map(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let data: BTreeMap<&str, &str> = data.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": ns },
        "data": data,
    })
}

/// A StatefulSet `ns/name` with `replicas` and uid `uid`, whose pod template carries
/// `annotations` (e.g. `kube-ipam.ip`).
pub fn stateful_set(
    ns: &str,
    name: &str,
    uid: &str,
    replicas: u32,
    annotations: &[(&str, &str)],
) -> Value {
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": name, "namespace": ns, "uid": uid },
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name }, "annotations": annotations },
                "spec": { "containers": [{ "name": "app", "image": "busybox" }] },
            },
        },
        "status": { "replicas": replicas },
    })
}

// ---- state transitions ---------------------------------------------------------------------

/// An answer other than success, carried to the client as a `Status` object.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn not_found(kind: Kind, name: &str) -> Self {
        ApiError {
            details: Some(json!({ "name": name, "kind": kind.plural() })),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural()),
            )
        }
    }

    fn conflict(kind: Kind, name: &str, why: &str) -> Self {
        ApiError {
            details: Some(json!({ "name": name, "kind": kind.plural() })),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    kind.plural()
                ),
            )
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    fn expired(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }

    fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn scope_ns(kind: Kind, ns: &str) -> String {
    if kind.namespaced() {
        ns.to_string()
    } else {
        String::new()
    }
}

fn kind_of(object: &Value) -> anyhow::Result<Kind> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("object has no kind: {object}"))?;
    Kind::from_kind_name(kind).ok_or_else(|| anyhow!("the fake does not serve kind {kind}"))
}

fn object_namespace(object: &Value) -> String {
    object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn object_name(object: &Value) -> anyhow::Result<String> {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("object has no metadata.name: {object}"))
}

fn meta_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    let meta = object
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
    match meta.and_then(Value::as_object_mut) {
        Some(m) => Ok(m),
        None => Err(ApiError::bad_request("metadata is not an object")),
    }
}

fn new_uid(st: &mut State) -> String {
    st.uid_counter += 1;
    // splitmix64 over a per-server seed: distinct, random-looking v4 UUIDs without a crate.
    let mut next = || {
        st.uid_seed = st.uid_seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = st.uid_seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

fn record(st: &mut State, kind: Kind, event: EventType, object: Value, previous: Option<Value>) {
    st.history.push_back(Change {
        rv: st.rv,
        kind,
        event,
        object,
        previous,
    });
}

fn bump(st: &mut State, object: &mut Value) -> Result<(), ApiError> {
    st.rv += 1;
    meta_mut(object)?.insert("resourceVersion".into(), json!(st.rv.to_string()));
    Ok(())
}

/// Creates an object in `ns` (ignored for cluster-scoped kinds). `keep_uid`: tests may choose
/// the UID; a client's POST gets a new one, as from the real API server.
fn create_object(
    st: &mut State,
    kind: Kind,
    ns: &str,
    mut object: Value,
    keep_uid: bool,
) -> Result<Value, ApiError> {
    let ns = scope_ns(kind, ns);
    if kind.namespaced() && ns.is_empty() {
        return Err(ApiError::bad_request(
            "an empty namespace may not be set during creation",
        ));
    }
    if let Some(k) = object.get("kind").and_then(Value::as_str) {
        if k != kind.name() {
            return Err(ApiError::bad_request(format!(
                "the body's kind {k} does not match the URL's {}",
                kind.plural()
            )));
        }
    }
    let uid = match object.pointer("/metadata/uid").and_then(Value::as_str) {
        Some(u) if keep_uid && !u.is_empty() => u.to_string(),
        _ => new_uid(st),
    };
    let mut name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        let Some(prefix) = object
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        else {
            return Err(ApiError::bad_request("name or generateName is required"));
        };
        name = format!("{prefix}{}", &uid[..5]);
    }
    let key = (kind, ns.clone(), name.clone());
    if st.objects.contains_key(&key) {
        return Err(ApiError {
            details: Some(json!({ "name": name, "kind": kind.plural() })),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.plural()),
            )
        });
    }
    object["kind"] = json!(kind.name());
    object["apiVersion"] = json!(kind.api_version());
    let meta = meta_mut(&mut object)?;
    meta.insert("name".into(), json!(name));
    if kind.namespaced() {
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.remove("namespace");
    }
    meta.insert("uid".into(), json!(uid));
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    meta.entry("creationTimestamp")
        .or_insert_with(|| json!(rfc3339(SystemTime::now())));
    bump(st, &mut object)?;
    st.objects.insert(key, object.clone());
    record(st, kind, EventType::Added, object.clone(), None);
    Ok(object)
}

/// Replaces an object; a non-empty `metadata.resourceVersion` in `object` must match.
fn replace_object(
    st: &mut State,
    kind: Kind,
    ns: &str,
    name: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    let key = (kind, scope_ns(kind, ns), name.to_string());
    let Some(current) = st.objects.get(&key).cloned() else {
        return Err(ApiError::not_found(kind, name));
    };
    let body_name = object.pointer("/metadata/name").and_then(Value::as_str);
    if body_name.is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            body_name.unwrap_or_default()
        )));
    }
    let wanted_rv = object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !wanted_rv.is_empty() && Some(wanted_rv) != current_rv(&current) {
        return Err(ApiError::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    object["kind"] = json!(kind.name());
    object["apiVersion"] = json!(kind.api_version());
    // What clients cannot change.
    let meta = meta_mut(&mut object)?;
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "resourceVersion",
    ] {
        match current.pointer(&format!("/metadata/{field}")) {
            Some(v) => meta.insert(field.into(), v.clone()),
            None => meta.remove(field),
        };
    }
    if object == current {
        // A no-op write: the API server neither bumps the version nor tells watchers.
        return Ok(current);
    }
    bump(st, &mut object)?;
    st.objects.insert(key, object.clone());
    record(st, kind, EventType::Modified, object.clone(), Some(current));
    Ok(object)
}

fn current_rv(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatchKind {
    Merge,
    Json,
}

fn patch_object(
    st: &mut State,
    kind: Kind,
    ns: &str,
    name: &str,
    how: PatchKind,
    patch: &Value,
) -> Result<Value, ApiError> {
    let key = (kind, scope_ns(kind, ns), name.to_string());
    let Some(current) = st.objects.get(&key).cloned() else {
        return Err(ApiError::not_found(kind, name));
    };
    let mut object = current.clone();
    match how {
        PatchKind::Merge => merge_patch(&mut object, patch),
        PatchKind::Json => json_patch(&mut object, patch)?,
    }
    // A resourceVersion in a patch is a precondition, as on the real API server.
    let wanted = object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !wanted.is_empty() && Some(wanted.as_str()) != current_rv(&current) {
        return Err(ApiError::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    let uid_changed = object.pointer("/metadata/uid") != current.pointer("/metadata/uid");
    if uid_changed && object.pointer("/metadata/uid").is_some() {
        return Err(ApiError::conflict(
            kind,
            name,
            "Precondition failed: UID mismatch",
        ));
    }
    replace_object(st, kind, ns, name, object)
}

fn mark_terminating(st: &mut State, ns: &str, name: &str, grace: i64) -> Result<Value, ApiError> {
    let key = (Kind::Pod, ns.to_string(), name.to_string());
    let Some(current) = st.objects.get(&key).cloned() else {
        return Err(ApiError::not_found(Kind::Pod, name));
    };
    if current.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(current);
    }
    let mut object = current.clone();
    let at = SystemTime::now() + Duration::from_secs(grace.max(0) as u64);
    let meta = meta_mut(&mut object)?;
    meta.insert("deletionTimestamp".into(), json!(rfc3339(at)));
    meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
    bump(st, &mut object)?;
    st.objects.insert(key, object.clone());
    record(
        st,
        Kind::Pod,
        EventType::Modified,
        object.clone(),
        Some(current),
    );
    Ok(object)
}

fn remove_object(st: &mut State, kind: Kind, ns: &str, name: &str) -> Result<Value, ApiError> {
    let key = (kind, scope_ns(kind, ns), name.to_string());
    let Some(mut object) = st.objects.remove(&key) else {
        return Err(ApiError::not_found(kind, name));
    };
    let previous = object.clone();
    bump(st, &mut object)?;
    record(st, kind, EventType::Deleted, object.clone(), Some(previous));
    Ok(object)
}

/// A DELETE from a client: preconditions, then graceful deletion for scheduled pods.
fn delete_request(
    st: &mut State,
    kind: Kind,
    ns: &str,
    name: &str,
    grace_query: Option<i64>,
    options: &Value,
) -> Result<Value, ApiError> {
    let key = (kind, scope_ns(kind, ns), name.to_string());
    let Some(current) = st.objects.get(&key) else {
        return Err(ApiError::not_found(kind, name));
    };
    if let Some(uid) = options
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
    {
        let actual = current
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        if uid != actual {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                ),
            ));
        }
    }
    if let Some(rv) = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
    {
        let actual = current_rv(current).unwrap_or("");
        if rv != actual {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"),
            ));
        }
    }
    if kind != Kind::Pod {
        return remove_object(st, kind, ns, name);
    }
    let grace = grace_query
        .or_else(|| options.get("gracePeriodSeconds").and_then(Value::as_i64))
        .or_else(|| {
            current
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(DEFAULT_POD_GRACE_SECONDS);
    let scheduled = current
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if grace <= 0 || !scheduled {
        return remove_object(st, kind, ns, name);
    }
    mark_terminating(st, ns, name, grace)
}

// ---- patches -------------------------------------------------------------------------------

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// RFC 6902 JSON patch: `add`, `remove`, `replace`, `test`.
fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array"))?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("a JSON patch operation needs a path"))?;
        let value = op.get("value").cloned();
        let invalid = |why: &str| ApiError::new(422, "Invalid", format!("{name} {path}: {why}"));
        match name {
            "test" => {
                if target.pointer(path) != value.as_ref() {
                    return Err(invalid("test failed"));
                }
            }
            "remove" => {
                let (parent, last) = split_pointer(path);
                let removed = match target.pointer_mut(&parent) {
                    Some(Value::Object(m)) => m.remove(&last).is_some(),
                    Some(Value::Array(a)) => match last.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !removed {
                    return Err(invalid("no such path"));
                }
            }
            "add" | "replace" => {
                let value = value.ok_or_else(|| invalid("no value"))?;
                if path.is_empty() {
                    *target = value;
                    continue;
                }
                let (parent, last) = split_pointer(path);
                match target.pointer_mut(&parent) {
                    Some(Value::Object(m)) => {
                        if name == "replace" && !m.contains_key(&last) {
                            return Err(invalid("no such path"));
                        }
                        m.insert(last, value);
                    }
                    Some(Value::Array(a)) => {
                        let i = if last == "-" {
                            Ok(a.len())
                        } else {
                            last.parse()
                        };
                        match (name, i) {
                            ("add", Ok(i)) if i <= a.len() => a.insert(i, value),
                            ("replace", Ok(i)) if i < a.len() => a[i] = value,
                            _ => return Err(invalid("bad array index")),
                        }
                    }
                    _ => return Err(invalid("no such path")),
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "the fake does not implement JSON patch op {other:?}"
                )))
            }
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> (String, String) {
    match path.rfind('/') {
        Some(i) => (
            path[..i].to_string(),
            path[i + 1..].replace("~1", "/").replace("~0", "~"),
        ),
        None => (String::new(), path.to_string()),
    }
}

// ---- selectors -----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum FieldReq {
    Eq(String, String),
    Ne(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default)]
struct Selector {
    fields: Vec<FieldReq>,
    labels: Vec<LabelReq>,
    /// The namespace of a namespaced URL.
    namespace: Option<String>,
}

impl Selector {
    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if object_namespace(object) != *ns {
                return false;
            }
        }
        self.fields.iter().all(|r| match r {
            FieldReq::Eq(p, v) => field_value(object, p) == *v,
            FieldReq::Ne(p, v) => field_value(object, p) != *v,
        }) && self.labels.iter().all(|r| {
            let label = |k: &str| {
                object
                    .pointer("/metadata/labels")
                    .and_then(|l| l.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            match r {
                LabelReq::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
                LabelReq::Ne(k, v) => label(k).as_deref() != Some(v.as_str()),
                LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.contains(&l)),
                LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.contains(&l)),
                LabelReq::Exists(k) => label(k).is_some(),
                LabelReq::NotExists(k) => label(k).is_none(),
            }
        })
    }
}

/// The value of a dotted field path as a field selector compares it; a missing field is "".
fn field_value(object: &Value, path: &str) -> String {
    let mut v = object;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut reqs = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            FieldReq::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            FieldReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            FieldReq::Eq(k.trim().into(), v.trim().into())
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid field selector {s:?}: {term:?} is not key=value"
            )));
        };
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid label selector {s:?}: {why}"));
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut reqs = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let set = |rest: &str| -> Result<Vec<String>, ApiError> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| bad("a set needs parentheses"))?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let req = if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(k.trim().into())
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            LabelReq::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            LabelReq::In(k.trim().into(), set(rest)?)
        } else if term.contains(|c: char| c.is_whitespace() || c == '(') {
            return Err(bad(&format!("cannot parse {term:?}")));
        } else {
            LabelReq::Exists(term.into())
        };
        reqs.push(req);
    }
    Ok(reqs)
}

// ---- HTTP --------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("fake API server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            // Errors here are clients going away or faults cutting a connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    shared.lock().requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
    });
    match shared.take_fault() {
        Some((Fault::Status(code), _)) => {
            let e = ApiError::new(
                code,
                reason_for(code),
                format!("injected fault: HTTP {code}"),
            );
            return Ok(error_response(&e));
        }
        Some((Fault::Drop, _)) => {
            return Err(io::Error::other("injected fault: connection dropped"))
        }
        Some((Fault::Hang, counted)) => wait_while_hanging(&shared, counted).await,
        None => {}
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    let query = parse_query(&query);
    Ok(
        match route(&shared, &method, &path, &query, &content_type, &body) {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        },
    )
}

/// Holds a request until `clear_fault`, or, unless it was one of `fail_next`'s, until the
/// server stops hanging (`fail_for` expired, another fault set).
async fn wait_while_hanging(shared: &Shared, counted: bool) {
    let mut changed = shared.changed.subscribe();
    let release = shared.lock().release_epoch;
    loop {
        if shared.lock().release_epoch != release
            || (!counted && shared.current_fault() != Some(Fault::Hang))
        {
            return;
        }
        let _ = tokio::time::timeout(FAULT_POLL, changed.changed()).await;
    }
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a URL names.
#[derive(Debug)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    if method == Method::GET {
        if let Some(doc) = discovery(path) {
            return Ok(json_response(200, &doc));
        }
    }
    let target = parse_target(path)?;
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
    };
    let ns = target.namespace.clone().unwrap_or_default();
    let kind = target.kind;
    let watch = query.get("watch").is_some_and(|v| v == "1" || v == "true");
    let result = match (method.clone(), target.name.as_deref()) {
        (Method::GET, Some(name)) => {
            let key = (kind, scope_ns(kind, &ns), name.to_string());
            shared
                .lock()
                .objects
                .get(&key)
                .cloned()
                .map(|o| (200, o))
                .ok_or_else(|| ApiError::not_found(kind, name))
        }
        (Method::GET, None) if watch => return start_watch(shared, &target, query),
        (Method::GET, None) => list(&shared.lock(), &target, query).map(|o| (200, o)),
        (Method::POST, None) => {
            let object = parse_body()?;
            let body_ns = object_namespace(&object);
            if kind.namespaced() && !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                )));
            }
            create_object(&mut shared.lock(), kind, &ns, object, false).map(|o| (201, o))
        }
        (Method::PUT, Some(name)) => {
            let object = parse_body()?;
            replace_object(&mut shared.lock(), kind, &ns, name, object).map(|o| (200, o))
        }
        (Method::PATCH, Some(name)) => {
            let patch = parse_body()?;
            let how = match content_type.split(';').next().unwrap_or("").trim() {
                "application/json-patch+json" => PatchKind::Json,
                "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/apply-patch+yaml" => PatchKind::Merge,
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
                    ))
                }
            };
            patch_object(&mut shared.lock(), kind, &ns, name, how, &patch).map(|o| (200, o))
        }
        (Method::DELETE, Some(name)) => {
            let options = if body.is_empty() {
                json!({})
            } else {
                parse_body()?
            };
            let grace = query
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse::<i64>().ok());
            delete_request(&mut shared.lock(), kind, &ns, name, grace, &options).map(|o| (200, o))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({method} {path})"
            ),
        )),
    };
    shared.notify();
    result.map(|(code, o)| json_response(code, &o))
}

fn parse_target(path: &str) -> Result<Target, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "apps", "v1", rest @ ..] => ("apps", rest),
        ["apis", "network.qingcloud.com", "v1alpha1", rest @ ..] => ("network.qingcloud.com", rest),
        _ => return Err(not_found()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(name.to_string())),
        // The status subresource reads and writes the whole object here.
        [plural, name, "status"] => (*plural, Some(name.to_string())),
        _ => return Err(not_found()),
    };
    let kind = Kind::from_route(group, plural).ok_or_else(not_found)?;
    match (kind.namespaced(), &namespace, &name) {
        (false, Some(_), _) | (true, None, Some(_)) => Err(not_found()),
        _ => Ok(Target {
            kind,
            namespace,
            name,
        }),
    }
}

fn discovery(path: &str) -> Option<Value> {
    let resources = |group: &str| -> Vec<Value> {
        Kind::ALL
            .into_iter()
            .filter(|k| k.group() == group)
            .map(|k| {
                json!({
                    "name": k.plural(),
                    "singularName": k.name().to_lowercase(),
                    "namespaced": k.namespaced(),
                    "kind": k.name(),
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    "shortNames": k.short_names(),
                })
            })
            .collect()
    };
    let group_version = |gv: &str| {
        let version = gv.rsplit('/').next().unwrap_or(gv);
        json!({ "groupVersion": gv, "version": version })
    };
    Some(match path.trim_end_matches('/') {
        "/version" => json!({
            "major": SERVED_VERSION.0,
            "minor": SERVED_VERSION.1,
            "gitVersion": format!("v{}.{}.0-hostnic-fake", SERVED_VERSION.0, SERVED_VERSION.1),
            "platform": "linux/amd64",
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1" }],
        }),
        "/api/v1" => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": resources(""),
        }),
        "/apis" => json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{
                "name": "apps",
                "versions": [group_version("apps/v1")],
                "preferredVersion": group_version("apps/v1"),
            }, {
                "name": "network.qingcloud.com",
                "versions": [group_version("network.qingcloud.com/v1alpha1")],
                "preferredVersion": group_version("network.qingcloud.com/v1alpha1"),
            }],
        }),
        "/apis/apps/v1" => json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "apps/v1",
            "resources": resources("apps"),
        }),
        "/apis/network.qingcloud.com/v1alpha1" => json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "network.qingcloud.com/v1alpha1",
            "resources": resources("network.qingcloud.com"),
        }),
        _ => return None,
    })
}

fn selector_for(target: &Target, query: &BTreeMap<String, String>) -> Result<Selector, ApiError> {
    Ok(Selector {
        fields: match query.get("fieldSelector") {
            Some(s) => parse_field_selector(s)?,
            None => Vec::new(),
        },
        labels: match query.get("labelSelector") {
            Some(s) => parse_label_selector(s)?,
            None => Vec::new(),
        },
        namespace: target.namespace.clone(),
    })
}

/// Items of a list go without `kind` and `apiVersion`, as the API server sends them.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(o) = item.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    item
}

fn list(st: &State, target: &Target, query: &BTreeMap<String, String>) -> Result<Value, ApiError> {
    let kind = target.kind;
    let selector = selector_for(target, query)?;
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return Err(ApiError::bad_request("limit is not a number")),
    };
    // A continue token is "<list version>/<namespace>/<name>" of the last item sent.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None),
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let rv = parts.next().and_then(|r| r.parse::<u64>().ok());
            let (Some(rv), Some(ns), Some(name)) = (rv, parts.next(), parts.next()) else {
                return Err(ApiError::bad_request(format!(
                    "invalid continue token {token:?}"
                )));
            };
            if rv < st.compacted {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
    };
    let matching: Vec<(&Key, &Value)> = st
        .objects
        .iter()
        .filter(|((k, ns, name), _)| {
            *k == kind
                && after
                    .as_ref()
                    .is_none_or(|(ans, aname)| (ns, name) > (ans, aname))
        })
        .filter(|(_, v)| selector.matches(v))
        .collect();
    let take = limit.unwrap_or(matching.len()).min(matching.len());
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if take < matching.len() {
        let (_, ns, name) = matching[take - 1].0;
        metadata["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
        metadata["remainingItemCount"] = json!(matching.len() - take);
    }
    Ok(json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": matching[..take].iter().map(|(_, v)| list_item(v)).collect::<Vec<_>>(),
    }))
}

fn watch_event(kind: &str, object: &Value) -> Frame<Bytes> {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Frame::data(Bytes::from(line))
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Frame<Bytes> {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    watch_event(
        "BOOKMARK",
        &json!({ "kind": kind.name(), "apiVersion": kind.api_version(), "metadata": meta }),
    )
}

fn expired_event(rv: u64, oldest: u64) -> Frame<Bytes> {
    let status = ApiError::expired(format!("too old resource version: {rv} ({oldest})"));
    watch_event("ERROR", &status.to_status())
}

/// How one change looks to a watch with `selector`, if it sees it at all.
fn visible(change: &Change, selector: &Selector) -> Option<(EventType, Value)> {
    let now = selector.matches(&change.object);
    let before = change
        .previous
        .as_ref()
        .is_some_and(|p| selector.matches(p));
    let event = match (change.event, before, now) {
        (EventType::Deleted, true, _) => EventType::Deleted,
        (EventType::Deleted, false, _) => return None,
        (_, false, true) => EventType::Added,
        (_, true, true) => EventType::Modified,
        (_, true, false) => EventType::Deleted,
        (_, false, false) => return None,
    };
    Some((event, change.object.clone()))
}

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

/// Counts an open watch while it lives.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.lock().open_watches -= 1;
        self.0.notify();
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let selector = selector_for(target, query)?;
    let kind = target.kind;
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "1" || v == "true");
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial = flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None | Some(Ok(0)) => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(t)) => Duration::from_secs(t),
        Some(Err(_)) => return Err(ApiError::bad_request("timeoutSeconds is not a number")),
    };
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    if send_initial && !bookmarks {
        return Err(ApiError::new(
            422,
            "Invalid",
            "sendInitialEvents requires allowWatchBookmarks=true",
        ));
    }

    let (tx, rx) = mpsc::channel(64);
    let mut initial = Vec::new();
    let cursor;
    let epochs;
    {
        let mut st = shared.lock();
        if from.is_empty() || from == "0" {
            // "Any" or "most recent": the current state as ADDED events, then changes.
            initial.extend(
                st.objects
                    .iter()
                    .filter(|((k, _, _), v)| *k == kind && selector.matches(v))
                    .map(|(_, v)| watch_event("ADDED", v)),
            );
            if send_initial {
                initial.push(bookmark(kind, st.rv, true));
            }
            cursor = st.rv;
        } else {
            let rv = from
                .parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {from:?}")))?;
            if rv < st.compacted {
                // The API server answers 200 and sends the error as the stream's one event.
                // The channel has room: the one event is queued and the stream ends with `tx`.
                let _ = tx.try_send(Ok(expired_event(rv, st.compacted)));
                return Ok(stream_response(
                    StreamBody::new(ReceiverStream::new(rx)).boxed(),
                ));
            }
            cursor = rv;
        }
        st.open_watches += 1;
        epochs = (st.bookmark_epoch, st.close_epoch);
    }
    shared.notify();
    let watch = WatchStream {
        shared: shared.clone(),
        kind,
        selector,
        bookmarks,
        deadline: tokio::time::Instant::now() + timeout,
        cursor,
        tx,
    };
    tokio::spawn(watch.run(initial, epochs, OpenWatch(shared.clone())));
    Ok(stream_response(
        StreamBody::new(ReceiverStream::new(rx)).boxed(),
    ))
}

fn stream_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

struct WatchStream {
    shared: Arc<Shared>,
    kind: Kind,
    selector: Selector,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    /// Every change up to this version has been looked at.
    cursor: u64,
    tx: FrameTx,
}

enum Step {
    Send(Vec<Frame<Bytes>>),
    /// End the stream cleanly, after sending these.
    End(Vec<Frame<Bytes>>),
    /// Cut the connection, as a failing server does.
    Cut,
}

impl WatchStream {
    /// `epochs`: the bookmark and close epochs when the watch was opened.
    async fn run(mut self, initial: Vec<Frame<Bytes>>, epochs: (u64, u64), _open: OpenWatch) {
        let mut changed = self.shared.changed.subscribe();
        let (mut bookmark_epoch, close_epoch) = epochs;
        for frame in initial {
            if self.tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        let interval = self.shared.options.bookmark_interval;
        let mut next_bookmark = tokio::time::Instant::now() + interval;
        loop {
            let step = self.step(&mut bookmark_epoch, close_epoch);
            let (frames, end) = match step {
                Step::Send(f) => (f, false),
                Step::End(f) => (f, true),
                Step::Cut => {
                    let _ = self
                        .tx
                        .send(Err(io::Error::other("injected fault: watch cut")))
                        .await;
                    return;
                }
            };
            for frame in frames {
                if self.tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= self.deadline {
                return;
            }
            if now >= next_bookmark {
                next_bookmark = now + interval;
                if self.bookmarks && self.shared.current_fault().is_none() {
                    let frame = bookmark(self.kind, self.cursor, false);
                    if self.tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
            }
            let wake = self.deadline.min(next_bookmark).min(now + FAULT_POLL * 4);
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.tx.closed() => return,
            }
        }
    }

    fn step(&mut self, bookmark_epoch: &mut u64, close_epoch: u64) -> Step {
        match self.shared.current_fault() {
            Some(Fault::Hang) => return Step::Send(Vec::new()),
            Some(Fault::Status(_) | Fault::Drop) => return Step::Cut,
            None => {}
        }
        let st = self.shared.lock();
        if st.close_epoch != close_epoch {
            return Step::End(Vec::new());
        }
        if self.cursor < st.compacted {
            return Step::End(vec![expired_event(self.cursor, st.compacted)]);
        }
        let mut frames: Vec<Frame<Bytes>> = st
            .history
            .iter()
            .filter(|c| c.rv > self.cursor && c.kind == self.kind)
            .filter_map(|c| visible(c, &self.selector))
            .map(|(event, object)| watch_event(event.as_str(), &object))
            .collect();
        self.cursor = self.cursor.max(st.rv);
        if st.bookmark_epoch != *bookmark_epoch {
            *bookmark_epoch = st.bookmark_epoch;
            if self.bookmarks {
                frames.push(bookmark(self.kind, self.cursor, false));
            }
        }
        Step::Send(frames)
    }
}

/// `2006-01-02T15:04:05Z`, the timestamp format of object metadata.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn label_selectors_parse_equality_and_sets() {
        let reqs = parse_label_selector("app=web,tier!=db,env in (a, b),!legacy,zone notin (x)")
            .expect("parses");
        assert_eq!(
            reqs,
            vec![
                LabelReq::Eq("app".into(), "web".into()),
                LabelReq::Ne("tier".into(), "db".into()),
                LabelReq::In("env".into(), vec!["a".into(), "b".into()]),
                LabelReq::NotExists("legacy".into()),
                LabelReq::NotIn("zone".into(), vec!["x".into()]),
            ]
        );
        let sel = Selector {
            labels: reqs,
            ..Selector::default()
        };
        let obj = |labels: Value| json!({ "metadata": { "labels": labels } });
        assert!(sel.matches(&obj(json!({ "app": "web", "env": "b" }))));
        assert!(!sel.matches(&obj(json!({ "app": "web", "env": "c" }))));
        assert!(!sel.matches(&obj(json!({ "app": "web", "env": "a", "legacy": "1" }))));
        assert!(parse_label_selector("env in a").is_err());
    }

    #[test]
    fn field_selectors_compare_dotted_paths_and_missing_fields_as_empty() {
        let sel = Selector {
            fields: parse_field_selector("spec.nodeName=n1,metadata.name!=x").expect("parses"),
            ..Selector::default()
        };
        assert!(sel.matches(&json!({ "metadata": { "name": "a" }, "spec": { "nodeName": "n1" } })));
        assert!(!sel.matches(&json!({ "metadata": { "name": "x" }, "spec": { "nodeName": "n1" } })));
        let unscheduled = Selector {
            fields: parse_field_selector("spec.nodeName=").expect("parses"),
            ..Selector::default()
        };
        assert!(unscheduled.matches(&json!({ "metadata": { "name": "a" }, "spec": {} })));
        assert!(parse_field_selector("spec.nodeName").is_err());
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({ "a": "b", "c": { "d": "e", "f": "g" } });
        merge_patch(&mut target, &json!({ "a": "z", "c": { "f": null } }));
        assert_eq!(target, json!({ "a": "z", "c": { "d": "e" } }));
    }

    #[test]
    fn json_patch_tests_then_replaces() {
        let mut target =
            json!({ "metadata": { "annotations": { "k": "v" }, "resourceVersion": "3" } });
        let patch = json!([
            { "op": "test", "path": "/metadata/resourceVersion", "value": "3" },
            { "op": "replace", "path": "/metadata/annotations/k", "value": "w" },
            { "op": "add", "path": "/metadata/annotations/a~1b", "value": "x" },
        ]);
        json_patch(&mut target, &patch).expect("applies");
        assert_eq!(
            target["metadata"]["annotations"],
            json!({ "k": "w", "a/b": "x" })
        );
        let failing = json!([{ "op": "test", "path": "/metadata/resourceVersion", "value": "2" }]);
        assert_eq!(
            json_patch(&mut target, &failing).map_err(|e| e.code).err(),
            Some(422)
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let q = parse_query("fieldSelector=spec.nodeName%3Dn%2D1&watch=true&x=a+b&bad=%zz");
        assert_eq!(q["fieldSelector"], "spec.nodeName=n-1");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["bad"], "%zz");
    }

    #[test]
    fn urls_name_resources_by_scope() {
        let t = parse_target("/api/v1/namespaces/ns1/pods/p1/status").expect("pod status");
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Pod, Some("ns1"), Some("p1"))
        );
        let t = parse_target("/apis/apps/v1/statefulsets").expect("all statefulsets");
        assert_eq!(
            (t.kind, t.namespace, t.name),
            (Kind::StatefulSet, None, None)
        );
        assert!(parse_target("/api/v1/namespaces/ns1/nodes/n1").is_err());
        assert!(parse_target("/api/v1/pods/p1").is_err());
        assert!(parse_target("/api/v1/namespaces/ns1").is_err());
        assert!(parse_target("/apis/apps/v1/pods").is_err());
    }
}
