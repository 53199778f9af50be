//! The fake Kubernetes API server, driven over plain HTTP as a client sees it, and once by the
//! real `kube` client and kube-runtime's watcher, which is the proof that the wire format is
//! the real one.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hostnic_testkit::kube::{self as fake, FakeKube, FakeKubeOptions, Fault, Kind};
use serde_json::{json, Value};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One request on its own connection; the whole answer (de-chunked) as JSON.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(stream);
    let (status, chunked) = read_head(&mut reader)?;
    let mut raw = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader)? {
            raw.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut raw)?;
    }
    let value = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "answer of {method} {path}: {}",
            String::from_utf8_lossy(&raw)
        )
    })?;
    Ok((status, value))
}

fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
    request(addr, "GET", path, "application/json", None)
}

fn read_head(reader: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            return Ok((status, chunked));
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
}

/// One chunk of a chunked body; `None` at its end.
fn read_chunk(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("connection closed inside a chunked body");
    }
    let size =
        usize::from_str_radix(line.trim(), 16).with_context(|| format!("chunk size {line:?}"))?;
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok((size > 0).then_some(chunk))
}

/// A watch stream read event by event.
struct Watch {
    reader: BufReader<TcpStream>,
    buffered: Vec<u8>,
    ended: bool,
}

impl Watch {
    fn open(addr: SocketAddr, path_and_query: &str) -> anyhow::Result<Watch> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        write!(
            stream,
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )?;
        let mut reader = BufReader::new(stream);
        let (status, chunked) = read_head(&mut reader)?;
        if status != 200 || !chunked {
            bail!("watch {path_and_query}: HTTP {status}, chunked {chunked}");
        }
        Ok(Watch {
            reader,
            buffered: Vec::new(),
            ended: false,
        })
    }

    /// The next event, or `None` once the server ended the stream.
    fn next(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            if let Some(i) = self.buffered.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=i).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            if self.ended {
                return Ok(None);
            }
            match read_chunk(&mut self.reader)? {
                Some(chunk) => self.buffered.extend(chunk),
                None => self.ended = true,
            }
        }
    }

    /// The next event that is not a bookmark.
    fn next_change(&mut self) -> anyhow::Result<Value> {
        loop {
            match self.next()? {
                Some(e) if e["type"] == "BOOKMARK" => continue,
                Some(e) => return Ok(e),
                None => bail!("the watch ended"),
            }
        }
    }
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

#[test]
fn get_returns_the_object_or_a_not_found_status() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let created = kube.create_pod(
        fake::pod("ns1", "web-0")
            .uid("uid-web-0")
            .node("n1")
            .annotation("kube-ipam.ip", "10.0.0.5"),
    )?;
    let (code, pod) = get(kube.addr(), "/api/v1/namespaces/ns1/pods/web-0")?;
    assert_eq!(code, 200);
    assert_eq!(pod, created);
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["apiVersion"], "v1");
    assert_eq!(pod["metadata"]["uid"], "uid-web-0");
    assert_eq!(pod["metadata"]["annotations"]["kube-ipam.ip"], "10.0.0.5");
    assert_eq!(pod["spec"]["nodeName"], "n1");

    let (code, status) = get(kube.addr(), "/api/v1/namespaces/ns1/pods/web-1")?;
    assert_eq!(code, 404);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["code"], 404);
    assert_eq!(status["details"]["name"], "web-1");
    // Another namespace does not see it.
    assert_eq!(
        get(kube.addr(), "/api/v1/namespaces/ns2/pods/web-0")?.0,
        404
    );

    kube.create(fake::node("n1"))?;
    let (code, node) = get(kube.addr(), "/api/v1/nodes/n1")?;
    assert_eq!((code, node["kind"].as_str()), (200, Some("Node")));
    assert!(node["metadata"].get("namespace").is_none());
    kube.create(fake::stateful_set("ns1", "web", "uid-sts", 3, &[]))?;
    let (code, sts) = get(kube.addr(), "/apis/apps/v1/namespaces/ns1/statefulsets/web")?;
    assert_eq!((code, sts["apiVersion"].as_str()), (200, Some("apps/v1")));
    let (code, _) = get(
        kube.addr(),
        "/api/v1/namespaces/kube-system/configmaps/hostnic-ipam-config",
    )?;
    assert_eq!(code, 404);
    Ok(())
}

#[test]
fn list_filters_by_field_and_label_selectors_and_pages() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    for (ns, name, node, app) in [
        ("ns1", "a", "n1", "web"),
        ("ns1", "b", "n2", "web"),
        ("ns2", "c", "n1", "db"),
        ("ns2", "d", "n1", "web"),
    ] {
        kube.create_pod(fake::pod(ns, name).node(node).label("app", app))?;
    }
    let (code, all) = get(kube.addr(), "/api/v1/pods")?;
    assert_eq!(code, 200);
    assert_eq!(all["kind"], "PodList");
    assert_eq!(names(&all), ["a", "b", "c", "d"]);
    assert_eq!(
        all["metadata"]["resourceVersion"],
        kube.resource_version().to_string()
    );
    // Items of a list carry no kind, as from the real API server.
    assert!(all["items"][0].get("kind").is_none());

    let on_n1 = get(kube.addr(), "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1")?.1;
    assert_eq!(names(&on_n1), ["a", "c", "d"]);
    let by_name = get(kube.addr(), "/api/v1/pods?fieldSelector=metadata.name%3Dc")?.1;
    assert_eq!(names(&by_name), ["c"]);
    let by_ns = get(
        kube.addr(),
        "/api/v1/pods?fieldSelector=metadata.namespace%3Dns2,spec.nodeName%3Dn1",
    )?
    .1;
    assert_eq!(names(&by_ns), ["c", "d"]);
    let ns1 = get(kube.addr(), "/api/v1/namespaces/ns1/pods")?.1;
    assert_eq!(names(&ns1), ["a", "b"]);
    let web_on_n1 = get(
        kube.addr(),
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&labelSelector=app%3Dweb",
    )?
    .1;
    assert_eq!(names(&web_on_n1), ["a", "d"]);
    let (code, bad) = get(kube.addr(), "/api/v1/pods?fieldSelector=spec.nodeName")?;
    assert_eq!((code, bad["reason"].as_str()), (400, Some("BadRequest")));

    let first = get(kube.addr(), "/api/v1/pods?limit=3")?.1;
    assert_eq!(names(&first), ["a", "b", "c"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 1);
    let token = first["metadata"]["continue"]
        .as_str()
        .context("continue token")?
        .to_string();
    kube.create_pod(fake::pod("ns3", "e"))?;
    let rest = get(
        kube.addr(),
        &format!("/api/v1/pods?limit=3&continue={token}"),
    )?
    .1;
    assert_eq!(names(&rest), ["d", "e"]);
    assert!(rest["metadata"].get("continue").is_none());
    // The pages belong to the first page's version.
    assert_eq!(
        rest["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );
    kube.compact();
    let (code, gone) = get(
        kube.addr(),
        &format!("/api/v1/pods?limit=3&continue={token}"),
    )?;
    assert_eq!((code, gone["reason"].as_str()), (410, Some("Expired")));
    Ok(())
}

#[test]
fn watch_from_a_version_sees_changes_in_order() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    kube.create_pod(fake::pod("ns1", "before").node("n1"))?;
    let from = kube.resource_version();
    // Changes made before the watch opens but after `from` are replayed.
    let added = kube.create_pod(fake::pod("ns1", "web-0").node("n1").uid("u0"))?;
    let mut watch = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={from}&fieldSelector=spec.nodeName%3Dn1"),
    )?;
    kube.wait_for_watches(1, IO_TIMEOUT)?;
    let modified = kube.merge_patch(
        Kind::Pod,
        "ns1",
        "web-0",
        json!({ "metadata": { "annotations": { "k": "v" } } }),
    )?;
    kube.create_pod(fake::pod("ns1", "elsewhere").node("n2"))?;
    let deleted = kube.delete(Kind::Pod, "ns1", "web-0")?;

    let e = watch.next_change()?;
    assert_eq!((e["type"].as_str(), &e["object"]), (Some("ADDED"), &added));
    let e = watch.next_change()?;
    assert_eq!(
        (e["type"].as_str(), &e["object"]),
        (Some("MODIFIED"), &modified)
    );
    let e = watch.next_change()?;
    assert_eq!(e["type"], "DELETED");
    assert_eq!(e["object"]["metadata"]["uid"], "u0");
    assert_eq!(rv(&e["object"]), rv(&deleted));
    assert!(rv(&added) < rv(&modified) && rv(&modified) < rv(&deleted));
    Ok(())
}

#[test]
fn watch_without_a_version_starts_with_the_current_state() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    kube.create(fake::config_map(
        "kube-system",
        "hostnic-ipam-config",
        &[("subnet-auto-assign", "off")],
    ))?;
    let mut watch = Watch::open(kube.addr(), "/api/v1/namespaces/kube-system/configmaps?watch=true&fieldSelector=metadata.name%3Dhostnic-ipam-config")?;
    let e = watch.next_change()?;
    assert_eq!(e["type"], "ADDED");
    assert_eq!(e["object"]["data"]["subnet-auto-assign"], "off");
    assert_eq!(e["object"]["kind"], "ConfigMap");
    Ok(())
}

#[test]
fn a_watch_sees_objects_enter_and_leave_its_selector() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    kube.create_pod(fake::pod("ns1", "p"))?;
    let from = kube.resource_version();
    let mut watch = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={from}&fieldSelector=spec.nodeName%3Dn1"),
    )?;
    // Scheduled onto n1: the watch of n1's pods sees it appear.
    kube.merge_patch(
        Kind::Pod,
        "ns1",
        "p",
        json!({ "spec": { "nodeName": "n1" } }),
    )?;
    assert_eq!(watch.next_change()?["type"], "ADDED");
    kube.merge_patch(
        Kind::Pod,
        "ns1",
        "p",
        json!({ "spec": { "nodeName": "n2" } }),
    )?;
    let e = watch.next_change()?;
    assert_eq!(e["type"], "DELETED");
    assert_eq!(e["object"]["spec"]["nodeName"], "n2");
    Ok(())
}

#[test]
fn bookmarks_come_periodically_and_on_demand() -> anyhow::Result<()> {
    let kube = FakeKube::start_with(FakeKubeOptions {
        bookmark_interval: Duration::from_millis(200),
    })?;
    let from = kube.resource_version();
    let mut with = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={from}&allowWatchBookmarks=true"),
    )?;
    let e = with.next()?.context("a periodic bookmark")?;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(e["object"]["kind"], "Pod");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], from.to_string());

    kube.create_pod(fake::pod("ns1", "p"))?;
    assert_eq!(with.next()?.context("ADDED")?["type"], "ADDED");
    let quiet = FakeKube::start_with(FakeKubeOptions {
        bookmark_interval: Duration::from_secs(3600),
    })?;
    let mut on_demand = Watch::open(
        quiet.addr(),
        "/api/v1/pods?watch=1&resourceVersion=1&allowWatchBookmarks=1",
    )?;
    quiet.create_pod(fake::pod("ns1", "q"))?;
    assert_eq!(on_demand.next()?.context("ADDED")?["type"], "ADDED");
    quiet.send_bookmarks();
    let e = on_demand.next()?.context("a bookmark on demand")?;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        quiet.resource_version().to_string()
    );

    // Without allowWatchBookmarks, none: the next event is the next change.
    let mut without = Watch::open(
        quiet.addr(),
        &format!(
            "/api/v1/pods?watch=1&resourceVersion={}",
            quiet.resource_version()
        ),
    )?;
    quiet.wait_for_watches(2, IO_TIMEOUT)?;
    quiet.send_bookmarks();
    quiet.create_pod(fake::pod("ns1", "r"))?;
    assert_eq!(without.next()?.context("ADDED")?["type"], "ADDED");
    Ok(())
}

#[test]
fn streaming_list_ends_with_the_initial_events_bookmark() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    kube.create_pod(fake::pod("ns1", "a"))?;
    kube.create_pod(fake::pod("ns1", "b"))?;
    let mut watch = Watch::open(kube.addr(), "/api/v1/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&resourceVersion=")?;
    assert_eq!(watch.next_change()?["object"]["metadata"]["name"], "a");
    assert_eq!(watch.next_change()?["object"]["metadata"]["name"], "b");
    let end = watch.next()?.context("the end bookmark")?;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    Ok(())
}

#[test]
fn a_compacted_version_gets_410_expired() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let old = kube.resource_version();
    kube.create_pod(fake::pod("ns1", "a"))?;
    kube.create_pod(fake::pod("ns1", "b"))?;
    // Before compaction the old version still replays.
    let mut replay = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={old}"),
    )?;
    assert_eq!(replay.next_change()?["object"]["metadata"]["name"], "a");
    kube.compact();

    let mut watch = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={old}"),
    )?;
    let e = watch.next()?.context("an ERROR event")?;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(watch.next()?.is_none(), "the stream ends after the error");
    // From the current version (or after it) a watch works.
    let now = kube.resource_version();
    let mut fresh = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={now}"),
    )?;
    kube.create_pod(fake::pod("ns1", "c"))?;
    assert_eq!(fresh.next_change()?["object"]["metadata"]["name"], "c");
    Ok(())
}

#[test]
fn patches_change_annotations_and_guard_with_the_resource_version() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let pod = kube.create_pod(
        fake::pod("ns1", "p")
            .annotation("keep", "1")
            .annotation("drop", "2"),
    )?;
    let path = "/api/v1/namespaces/ns1/pods/p";
    let patch = json!({ "metadata": { "annotations": { "new": "3", "drop": null } } });
    let (code, patched) = request(
        kube.addr(),
        "PATCH",
        path,
        "application/merge-patch+json",
        Some(&patch),
    )?;
    assert_eq!(code, 200);
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({ "keep": "1", "new": "3" })
    );
    assert!(rv(&patched) > rv(&pod));
    assert_eq!(patched["metadata"]["uid"], pod["metadata"]["uid"]);
    assert_eq!(kube.get(Kind::Pod, "ns1", "p"), Some(patched.clone()));

    let strategic = json!({ "metadata": { "labels": { "l": "v" } } });
    let (code, _) = request(
        kube.addr(),
        "PATCH",
        path,
        "application/strategic-merge-patch+json",
        Some(&strategic),
    )?;
    assert_eq!(code, 200);
    // A stale resourceVersion in the patch is a conflict; the object is untouched.
    let stale = json!({ "metadata": { "resourceVersion": rv(&pod).to_string(), "annotations": { "x": "y" } } });
    let (code, status) = request(
        kube.addr(),
        "PATCH",
        path,
        "application/merge-patch+json",
        Some(&stale),
    )?;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
    assert!(
        kube.get(Kind::Pod, "ns1", "p").context("pod")?["metadata"]["annotations"]
            .get("x")
            .is_none()
    );
    let json_patch = json!([
        { "op": "test", "path": "/metadata/annotations/keep", "value": "1" },
        { "op": "remove", "path": "/metadata/annotations/keep" },
    ]);
    let (code, p) = request(
        kube.addr(),
        "PATCH",
        path,
        "application/json-patch+json",
        Some(&json_patch),
    )?;
    assert_eq!(code, 200);
    assert_eq!(p["metadata"]["annotations"], json!({ "new": "3" }));
    // A patch that changes nothing does not bump the version.
    let before = kube.resource_version();
    let (code, _) = request(
        kube.addr(),
        "PATCH",
        path,
        "application/merge-patch+json",
        Some(&json!({ "metadata": { "annotations": { "new": "3" } } })),
    )?;
    assert_eq!((code, kube.resource_version()), (200, before));
    let (code, _) = request(
        kube.addr(),
        "PATCH",
        "/api/v1/namespaces/ns1/pods/nope",
        "application/merge-patch+json",
        Some(&patch),
    )?;
    assert_eq!(code, 404);
    Ok(())
}

#[test]
fn post_and_put_create_and_replace() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let cm = fake::config_map("ns1", "cfg", &[("a", "1")]);
    let (code, created) = request(
        kube.addr(),
        "POST",
        "/api/v1/namespaces/ns1/configmaps",
        "application/json",
        Some(&cm),
    )?;
    assert_eq!(code, 201);
    assert!(!created["metadata"]["uid"].as_str().unwrap_or("").is_empty());
    assert!(created["metadata"]["creationTimestamp"].is_string());
    let (code, dup) = request(
        kube.addr(),
        "POST",
        "/api/v1/namespaces/ns1/configmaps",
        "application/json",
        Some(&cm),
    )?;
    assert_eq!((code, dup["reason"].as_str()), (409, Some("AlreadyExists")));

    let mut update = created.clone();
    update["data"]["a"] = json!("2");
    let (code, replaced) = request(
        kube.addr(),
        "PUT",
        "/api/v1/namespaces/ns1/configmaps/cfg",
        "application/json",
        Some(&update),
    )?;
    assert_eq!((code, replaced["data"]["a"].as_str()), (200, Some("2")));
    // The same body again carries a stale version now.
    let (code, _) = request(
        kube.addr(),
        "PUT",
        "/api/v1/namespaces/ns1/configmaps/cfg",
        "application/json",
        Some(&update),
    )?;
    assert_eq!(code, 409);
    Ok(())
}

#[test]
fn graceful_delete_leaves_a_terminating_pod_until_it_is_finished() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    kube.create_pod(fake::pod("ns1", "web-1").node("n1").uid("old"))?;
    let from = kube.resource_version();
    let mut watch = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={from}"),
    )?;
    let path = "/api/v1/namespaces/ns1/pods/web-1";
    let wrong_uid =
        json!({ "kind": "DeleteOptions", "apiVersion": "v1", "preconditions": { "uid": "new" } });
    let (code, status) = request(
        kube.addr(),
        "DELETE",
        path,
        "application/json",
        Some(&wrong_uid),
    )?;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));

    let (code, terminating) = request(kube.addr(), "DELETE", path, "application/json", None)?;
    assert_eq!(code, 200);
    assert!(terminating["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(terminating["metadata"]["deletionGracePeriodSeconds"], 30);
    let (code, still) = get(kube.addr(), path)?;
    assert_eq!((code, &still), (200, &terminating));
    let e = watch.next_change()?;
    assert_eq!(e["type"], "MODIFIED");
    assert!(e["object"]["metadata"]["deletionTimestamp"].is_string());

    kube.finish_deletion("ns1", "web-1")?;
    assert_eq!(get(kube.addr(), path)?.0, 404);
    assert_eq!(watch.next_change()?["type"], "DELETED");

    // gracePeriodSeconds=0 removes at once; so does deleting a pod no node runs.
    kube.create_pod(fake::pod("ns1", "now").node("n1"))?;
    assert_eq!(
        request(
            kube.addr(),
            "DELETE",
            "/api/v1/namespaces/ns1/pods/now?gracePeriodSeconds=0",
            "application/json",
            None
        )?
        .0,
        200
    );
    assert!(kube.get(Kind::Pod, "ns1", "now").is_none());
    kube.create_pod(fake::pod("ns1", "pending"))?;
    request(
        kube.addr(),
        "DELETE",
        "/api/v1/namespaces/ns1/pods/pending",
        "application/json",
        None,
    )?;
    assert!(kube.get(Kind::Pod, "ns1", "pending").is_none());

    // Tests can make a pod terminating directly.
    kube.create_pod(fake::pod("ns1", "web-2").node("n1"))?;
    let t = kube.set_terminating("ns1", "web-2", Duration::from_secs(5))?;
    assert_eq!(t["metadata"]["deletionGracePeriodSeconds"], 5);
    kube.create(fake::node("n1"))?;
    kube.delete_node("n1")?;
    assert_eq!(get(kube.addr(), "/api/v1/nodes/n1")?.0, 404);
    Ok(())
}

#[test]
fn faults_fail_requests_for_a_while() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    kube.create_pod(fake::pod("ns1", "p"))?;
    let path = "/api/v1/namespaces/ns1/pods/p";

    kube.set_fault(Fault::Status(503));
    let (code, status) = get(kube.addr(), path)?;
    assert_eq!(
        (code, status["reason"].as_str()),
        (503, Some("ServiceUnavailable"))
    );
    kube.clear_fault();
    assert_eq!(get(kube.addr(), path)?.0, 200);

    kube.fail_next(Fault::Status(500), 2);
    assert_eq!(get(kube.addr(), path)?.0, 500);
    assert_eq!(get(kube.addr(), path)?.0, 500);
    assert_eq!(get(kube.addr(), path)?.0, 200);

    kube.set_fault(Fault::Drop);
    assert!(
        get(kube.addr(), path).is_err(),
        "a dropped connection is no answer"
    );
    kube.clear_fault();

    // A hanging server answers once the fault is over.
    kube.fail_for(Fault::Hang, Duration::from_millis(600));
    let start = Instant::now();
    assert_eq!(get(kube.addr(), path)?.0, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "answered after {:?}",
        start.elapsed()
    );

    // One hung request, released by clear_fault; the next one is answered at once.
    kube.fail_next(Fault::Hang, 1);
    let addr = kube.addr();
    let hung = std::thread::spawn(move || get(addr, "/api/v1/namespaces/ns1/pods/p"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!hung.is_finished(), "the request is held");
    assert_eq!(get(kube.addr(), path)?.0, 200);
    kube.clear_fault();
    let answer = hung
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    assert_eq!(answer.0, 200);

    // An open watch is cut while the server fails.
    let from = kube.resource_version();
    let mut watch = Watch::open(
        kube.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={from}"),
    )?;
    kube.wait_for_watches(1, IO_TIMEOUT)?;
    kube.set_fault(Fault::Status(500));
    assert!(watch.next().is_err(), "the watch connection is cut");
    kube.clear_fault();

    let log = kube.requests();
    assert!(log.iter().any(|r| r.method == "GET" && r.path == path));
    assert!(log.iter().any(|r| r.is_watch()));
    Ok(())
}

#[test]
fn close_watches_ends_streams_and_drop_stops_the_server() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let mut watch = Watch::open(kube.addr(), "/api/v1/pods?watch=1&resourceVersion=1")?;
    kube.wait_for_watches(1, IO_TIMEOUT)?;
    kube.close_watches();
    assert!(watch.next()?.is_none());
    let addr = kube.addr();
    let kubeconfig = kube.kubeconfig_path().to_path_buf();
    assert!(std::fs::read_to_string(&kubeconfig)?.contains(&format!("server: http://{addr}")));
    drop(kube);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
    assert!(!kubeconfig.exists());
    Ok(())
}

#[test]
fn discovery_documents_name_the_served_resources() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let (code, core) = get(kube.addr(), "/api/v1")?;
    assert_eq!(code, 200);
    let served: Vec<&str> = core["resources"]
        .as_array()
        .context("resources")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(served, ["pods", "configmaps", "nodes"]);
    assert_eq!(
        get(kube.addr(), "/apis/apps/v1")?.1["resources"][0]["kind"],
        "StatefulSet"
    );
    assert_eq!(get(kube.addr(), "/version")?.0, 200);
    assert_eq!(get(kube.addr(), "/apis/batch/v1/jobs")?.0, 404);
    Ok(())
}

/// hostnic's cluster-scoped custom resource: discovered, GET, LIST and WATCH like the others,
/// and no namespaced path.
#[test]
fn vxnetpools_are_served_cluster_scoped_with_get_list_and_watch() -> anyhow::Result<()> {
    let kube = FakeKube::start()?;
    let base = "/apis/network.qingcloud.com/v1alpha1";
    let (code, groups) = get(kube.addr(), "/apis")?;
    assert_eq!(code, 200);
    assert!(
        groups["groups"]
            .as_array()
            .context("groups")?
            .iter()
            .any(
                |g| g["preferredVersion"]["groupVersion"] == "network.qingcloud.com/v1alpha1"
                    && g["preferredVersion"]["version"] == "v1alpha1"
            ),
        "{groups}"
    );
    let (code, resources) = get(kube.addr(), base)?;
    assert_eq!(code, 200);
    assert_eq!(resources["resources"][0]["name"], "vxnetpools");
    assert_eq!(resources["resources"][0]["namespaced"], false);

    let pool = |name: &str, vxnet: &str| {
        json!({
            "apiVersion": "network.qingcloud.com/v1alpha1",
            "kind": "VxNetPool",
            "metadata": { "name": name },
            "spec": { "vxnets": [{ "name": vxnet }], "blockSize": 26 },
        })
    };
    kube.create(pool("v-pool", "vxnet-aaa"))?;
    let (code, one) = get(kube.addr(), &format!("{base}/vxnetpools/v-pool"))?;
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["spec"]["vxnets"][0]["name"], "vxnet-aaa");
    assert_eq!(one["apiVersion"], "network.qingcloud.com/v1alpha1");
    assert!(one["metadata"].get("namespace").is_none(), "{one}");
    assert_eq!(get(kube.addr(), &format!("{base}/vxnetpools/nope"))?.0, 404);
    assert_eq!(
        get(
            kube.addr(),
            &format!("{base}/namespaces/ns1/vxnetpools/v-pool")
        )?
        .0,
        404
    );
    let (code, list) = get(kube.addr(), &format!("{base}/vxnetpools"))?;
    assert_eq!(code, 200, "{list}");
    assert_eq!(names(&list), ["v-pool"]);

    let mut watch = Watch::open(
        kube.addr(),
        &format!("{base}/vxnetpools?watch=1&resourceVersion={}", rv(&list)),
    )?;
    kube.create(pool("second", "vxnet-bbb"))?;
    let event = watch.next_change()?;
    assert_eq!(event["type"], "ADDED", "{event}");
    assert_eq!(event["object"]["metadata"]["name"], "second");
    Ok(())
}

/// kube-runtime's watcher (paged list, then watch with bookmarks) through a kubeconfig.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_sees_a_pod_added_and_deleted() -> anyhow::Result<()> {
    use futures::{StreamExt as _, TryStreamExt as _};

    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher;

    let fake_api = FakeKube::start()?;
    fake_api.create_pod(fake::pod("ns1", "existing").node("n1").uid("u-existing"))?;
    fake_api.create_pod(fake::pod("ns1", "other-node").node("n2"))?;
    let kubeconfig = kube::config::Kubeconfig::read_from(fake_api.kubeconfig_path())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let pods: kube::Api<Pod> = kube::Api::all(client.clone());

    let fetched = kube::Api::<Pod>::namespaced(client.clone(), "ns1")
        .get("existing")
        .await?;
    assert_eq!(fetched.metadata.uid.as_deref(), Some("u-existing"));
    let missing = kube::Api::<Pod>::namespaced(client, "ns1")
        .get_opt("nope")
        .await?;
    assert!(missing.is_none());

    let mut events = watcher(pods, watcher::Config::default().fields("spec.nodeName=n1")).boxed();
    async fn next_event<S>(events: &mut S) -> anyhow::Result<watcher::Event<Pod>>
    where
        S: futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
    {
        tokio::time::timeout(IO_TIMEOUT, events.try_next())
            .await
            .context("no watcher event")?
            .context("watcher error")?
            .context("watcher ended")
    }
    assert!(matches!(
        next_event(&mut events).await?,
        watcher::Event::Init
    ));
    match next_event(&mut events).await? {
        watcher::Event::InitApply(p) => assert_eq!(p.metadata.name.as_deref(), Some("existing")),
        other => bail!("expected InitApply, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events).await?,
        watcher::Event::InitDone
    ));
    // The watcher opens its watch from the list's version when polled next: this pod is in it.
    fake_api.create_pod(fake::pod("ns1", "web-0").node("n1").uid("u-web-0"))?;
    fake_api.create_pod(fake::pod("ns1", "ignored").node("n2"))?;
    match next_event(&mut events).await? {
        watcher::Event::Apply(p) => assert_eq!(p.metadata.uid.as_deref(), Some("u-web-0")),
        other => bail!("expected Apply, got {other:?}"),
    }
    fake_api.delete(Kind::Pod, "ns1", "web-0")?;
    match next_event(&mut events).await? {
        watcher::Event::Delete(p) => assert_eq!(p.metadata.name.as_deref(), Some("web-0")),
        other => bail!("expected Delete, got {other:?}"),
    }
    // A watch that fell behind a compaction gets 410 Gone, and the watcher lists again.
    fake_api.set_fault(Fault::Hang);
    fake_api.create_pod(fake::pod("ns1", "web-1").node("n1"))?;
    fake_api.compact();
    fake_api.clear_fault();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match next_event(&mut events).await {
            Ok(watcher::Event::Init) => break,
            Err(e)
                if matches!(
                    e.downcast_ref::<watcher::Error>(),
                    Some(watcher::Error::WatchError(status)) if status.code == 410
                ) => {}
            other => bail!("expected a 410 error, then Init; got {other:?}"),
        }
        if Instant::now() > deadline {
            bail!("the watcher did not list again after 410");
        }
    }
    let mut relisted = Vec::new();
    loop {
        match next_event(&mut events).await? {
            watcher::Event::InitApply(p) => relisted.push(p.metadata.name.unwrap_or_default()),
            watcher::Event::InitDone => break,
            other => bail!("expected the re-list, got {other:?}"),
        }
    }
    assert_eq!(relisted, ["existing", "web-1"]);
    let requests = fake_api.requests();
    assert!(requests
        .iter()
        .any(|r| r.is_watch() && r.query.contains("allowWatchBookmarks=true")));
    Ok(())
}
