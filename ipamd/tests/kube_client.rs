//! The daemon's Kubernetes client (`hostnic_ipamd::kube`, the production code) against a
//! minimal stand-in API server on loopback: plain HTTP/1.1 answering the LIST of pods, a WATCH
//! that stays open without events, and GETs of single pods. It checks what only a server can
//! show: the field selector on the node, the cache filled by the list, one GET on a miss, 404
//! as "not found", and an unreachable server as a retryable error naming the pod. The stateful
//! fake API server of the test harness covers watch events, bookmarks and 410 Gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostnic_ipamd::kube::{client, KubeError, KubeSource, PodCache};
use hostnic_ipamd::service::status_of;
use hostnic_ipamd::IpamError;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn pod(namespace: &str, name: &str, uid: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": namespace, "name": name, "uid": uid, "resourceVersion": "7",
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web",
                                 "uid": "sts", "controller": true}]
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox"}]}
    })
}

/// The stand-in: `listed` is what LIST returns, `objects` what GET returns (by
/// `namespace/name`); every request line is recorded.
struct StandIn {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    _server: tokio::task::JoinHandle<()>,
}

async fn stand_in(listed: Vec<Value>, objects: HashMap<String, Value>) -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    let listed = Arc::new(listed);
    let objects = Arc::new(objects);
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, listed, objects) =
                (Arc::clone(&seen), Arc::clone(&listed), Arc::clone(&objects));
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                loop {
                    let mut line = String::new();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut header = String::new();
                    while read.read_line(&mut header).await.unwrap_or(0) > 2 {
                        header.clear();
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    seen.lock().expect("lock").push(path.clone());
                    if path.starts_with("/api/v1/pods?") && path.contains("watch=true") {
                        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                        let _ = write.write_all(head.as_bytes()).await;
                        std::future::pending::<()>().await;
                    }
                    let (status, body) = if path.starts_with("/api/v1/pods?") {
                        (
                            "200 OK",
                            json!({"apiVersion": "v1", "kind": "PodList",
                            "metadata": {"resourceVersion": "10"}, "items": *listed}),
                        )
                    } else if let Some(rest) = path.strip_prefix("/api/v1/namespaces/") {
                        let key = rest
                            .split('?')
                            .next()
                            .unwrap_or("")
                            .replacen("/pods/", "/", 1);
                        match objects.get(&key) {
                            Some(object) => ("200 OK", object.clone()),
                            None => (
                                "404 Not Found",
                                json!({"apiVersion": "v1", "kind": "Status",
                                "status": "Failure", "reason": "NotFound", "code": 404,
                                "message": format!("pods \"{key}\" not found")}),
                            ),
                        }
                    } else {
                        ("404 Not Found", json!({"kind": "Status", "code": 404}))
                    };
                    let body = body.to_string();
                    let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
                    if write.write_all(head.as_bytes()).await.is_err()
                        || write.write_all(body.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    StandIn {
        url,
        requests,
        _server: server,
    }
}

/// A kubeconfig file naming `server`, as an operator would pass with `--kubeconfig`.
fn kubeconfig(dir: &tempfile::TempDir, server: &str) -> KubeSource {
    let path = dir.path().join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n\
         users:\n- name: u\n  user: {{}}\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    KubeSource::Kubeconfig(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_lists_this_nodes_pods_and_a_miss_costs_one_get() {
    let cached = pod(
        "db",
        "web-0",
        "u-0",
        json!({"kube-ipam.ip": "10.188.0.10,10.188.0.11"}),
    );
    let late = pod(
        "db",
        "web-1",
        "u-1",
        json!({"kube-ipam.ip": "10.188.0.10,10.188.0.11"}),
    );
    let api = stand_in(
        vec![cached.clone()],
        HashMap::from([
            ("db/web-0".to_string(), cached),
            ("db/web-1".to_string(), late),
        ]),
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pods = PodCache::start(
        client(&kubeconfig(&dir, &api.url)).await.expect("client"),
        "node-1",
    );
    assert!(
        pods.wait_synced(Duration::from_secs(10)).await,
        "first list loaded"
    );
    let list = api.requests.lock().expect("lock")[0].clone();
    assert!(
        list.contains("fieldSelector=spec.nodeName%3Dnode-1"),
        "{list}"
    );

    let web0 = pods.pod("db", "web-0", "").await.expect("cached pod");
    assert_eq!(web0.uid, "u-0");
    assert_eq!(web0.annotations["kube-ipam.ip"], "10.188.0.10,10.188.0.11");
    assert_eq!(web0.stateful_set().map(|o| o.name.as_str()), Some("web"));
    let gets = |api: &StandIn| {
        api.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|p| p.starts_with("/api/v1/namespaces/"))
            .count()
    };
    assert_eq!(gets(&api), 0, "a cached pod costs no request");

    let web1 = pods
        .pod("db", "web-1", "u-1")
        .await
        .expect("pod found by GET");
    assert_eq!(web1.uid, "u-1");
    assert_eq!(gets(&api), 1);

    let err = pods.pod("db", "web-9", "").await.expect_err("no such pod");
    assert!(matches!(err, KubeError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("db/web-9"), "{err}");

    // The runtime's UID is another incarnation than the API's: refused, retryable.
    let err = pods
        .pod("db", "web-0", "u-new")
        .await
        .expect_err("other UID");
    assert!(
        matches!(err, KubeError::OtherUid { .. }) && err.is_retryable(),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_fails_the_lookup_as_retryable_naming_the_pod() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let source = kubeconfig(&dir, &format!("http://127.0.0.1:{port}"));
    let pods = PodCache::start(client(&source).await.expect("client"), "node-1");
    assert!(!pods.is_synced());
    let err = pods.pod("db", "web-0", "").await.expect_err("unreachable");
    assert!(matches!(err, KubeError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("pod db/web-0"), "{err}");
    let status = status_of(&IpamError::from(err));
    assert_eq!(status.code(), tonic::Code::Unavailable, "CNI code 11");
}
