//! `etc/kubernetes/hostnic-ipam.yaml` and the `Dockerfile` agree with the software: every
//! document is a valid Kubernetes object of its kind (parsed into the typed k8s-openapi objects,
//! with no field they do not know), every flag and environment variable the DaemonSet gives the
//! daemon is one it reads, every path it passes is mounted, the socket directory is the one the
//! plugin looks in by default, the init container installs what the image holds, the ClusterRole
//! grants exactly what the daemon asks the API for, and the image holds every binary the
//! manifests run.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use hostnic_ipamd::config::{read_file, Command, Flags};
use hostnic_ipamd::install::PLUGINS;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::Value;

const MANIFEST: &str = "etc/kubernetes/hostnic-ipam.yaml";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The documents of the manifest, as JSON values.
fn documents() -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(MANIFEST))
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{MANIFEST}: not valid YAML: {e}"))
        })
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

/// The one document of `kind` named `name`, parsed into its typed object. Serialising the object
/// back must give the document again: a field the type does not know (a typo, a wrong level)
/// would be dropped by the parse and show up here.
fn typed<T: DeserializeOwned + serde::Serialize>(kind: &str, name: &str) -> T {
    let found: Vec<Value> = documents()
        .into_iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "{MANIFEST} has one {kind} {name}");
    let object: T = serde_json::from_value(found[0].clone())
        .unwrap_or_else(|e| panic!("{kind} {name} is not a valid {kind}: {e}"));
    let back = numbers_as_floats(serde_json::to_value(&object).expect("serialising"));
    if let Some(at) = difference(&numbers_as_floats(found[0].clone()), &back, "") {
        panic!("{kind} {name}: {at} is not a field of a {kind} (or its value has the wrong type)");
    }
    object
}

/// The first path at which `written` and `parsed` (the typed object serialised again) differ.
fn difference(written: &Value, parsed: &Value, at: &str) -> Option<String> {
    match (written, parsed) {
        (Value::Object(w), Value::Object(p)) => w.iter().find_map(|(k, v)| {
            let at = format!("{at}.{k}");
            match p.get(k) {
                Some(pv) => difference(v, pv, &at),
                None => Some(at),
            }
        }),
        (Value::Array(w), Value::Array(p)) if w.len() == p.len() => w
            .iter()
            .zip(p)
            .enumerate()
            .find_map(|(i, (w, p))| difference(w, p, &format!("{at}[{i}]"))),
        (w, p) if w == p => None,
        _ => Some(at.to_owned()),
    }
}

/// `value` with every number as a float: a schema's `minimum: 20` comes back as `20.0`.
fn numbers_as_floats(value: Value) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map_or(Value::Number(n), Value::from),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, numbers_as_floats(v)))
                .collect(),
        ),
        other => other,
    }
}

fn daemon_set() -> DaemonSet {
    typed("DaemonSet", "hostnic-ipamd")
}

fn pod_spec() -> PodSpec {
    daemon_set()
        .spec
        .template
        .spec
        .expect("the DaemonSet has a pod spec")
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn config_map_data(name: &str) -> BTreeMap<String, String> {
    let map: ConfigMap = typed("ConfigMap", name);
    map.data.unwrap_or_default()
}

/// The command line a container runs, parsed by the daemon's own flag parser.
fn parsed(c: &Container) -> Flags {
    let command = c.command.clone().unwrap_or_default();
    assert!(
        c.args.as_ref().is_none_or(|a| a.is_empty()),
        "{}: the whole command line is in `command`",
        c.name
    );
    Flags::try_parse_from(&command)
        .unwrap_or_else(|e| panic!("{}: hostnic-ipamd refuses {command:?}:\n{e}", c.name))
}

/// Whether `path` lies in (or is) a mount of `c`; the mount's volume.
fn mount_of<'a>(spec: &'a PodSpec, c: &Container, path: &Path) -> Option<&'a str> {
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    spec.volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .map(|v| v.name.as_str())
}

fn host_path_of(spec: &PodSpec, c: &Container, path: &Path) -> Option<String> {
    let volume = mount_of(spec, c, path)?;
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.name == volume)?;
    let host = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == volume)?
        .host_path
        .as_ref()?;
    let rest = path.strip_prefix(&mount.mount_path).ok()?;
    if rest.as_os_str().is_empty() {
        return Some(host.path.clone());
    }
    Some(Path::new(&host.path).join(rest).display().to_string())
}

/// The binaries the image holds, by the path the Dockerfile copies them to.
fn image_binaries() -> BTreeMap<String, String> {
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains("RUN scripts/build-release.sh"),
        "the image is built by scripts/build-release.sh"
    );
    let script = read("scripts/build-release.sh");
    let built: BTreeSet<&str> = script
        .lines()
        .filter(|l| l.contains("cargo build"))
        .flat_map(|l| l.split("--bin ").skip(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let mut binaries = BTreeMap::new();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build "))
    {
        let words: Vec<&str> = line.split_whitespace().skip(2).collect();
        let (dest, sources) = words.split_last().expect("COPY has a destination");
        assert!(dest.ends_with('/'), "{line}: copy into a directory");
        for source in sources {
            let name = Path::new(source)
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a file name");
            assert!(
                source.starts_with("/src/target/dist/") && built.contains(name),
                "{line}: {source} is not a binary the build stage builds ({built:?})"
            );
            binaries.insert(format!("{dest}{name}"), name.to_owned());
        }
    }
    binaries
}

/// The `[[bin]]` names of the workspace's crates.
fn workspace_binaries() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for krate in ["cni", "ipamd", "iaas"] {
        let manifest = read(&format!("{krate}/Cargo.toml"));
        let mut in_bin = false;
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if let Some(name) = line.strip_prefix("name = ").filter(|_| in_bin) {
                names.insert(name.trim_matches('"').to_owned());
            }
        }
    }
    names
}

#[test]
fn every_document_is_a_valid_object_of_its_kind() {
    let mut kinds: Vec<String> = Vec::new();
    for doc in documents() {
        let kind = doc["kind"].as_str().expect("every document has a kind");
        let name = doc["metadata"]["name"].as_str().expect("and a name");
        match kind {
            "ServiceAccount" => drop(typed::<ServiceAccount>(kind, name)),
            "ClusterRole" => drop(typed::<ClusterRole>(kind, name)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(kind, name)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(kind, name)),
            "ConfigMap" => drop(typed::<ConfigMap>(kind, name)),
            "DaemonSet" => drop(typed::<DaemonSet>(kind, name)),
            other => panic!("{MANIFEST}: a {other} this test does not check"),
        }
        kinds.push(format!("{kind}/{name}"));
    }
    eprintln!("checked: {kinds:?}");
}

#[test]
fn the_daemon_gets_flags_and_variables_it_reads_and_every_path_it_is_given_is_mounted() {
    let spec = pod_spec();
    let daemon = container(&spec.containers, "hostnic-ipamd");
    let flags = parsed(daemon);
    assert!(
        flags.command.is_none(),
        "the DaemonSet serves (no subcommand)"
    );

    let known: BTreeSet<String> = Flags::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .chain(["RUST_LOG".to_owned()])
        .collect();
    for var in daemon.env.as_deref().unwrap_or_default() {
        assert!(
            known.contains(&var.name),
            "the DaemonSet sets {}, which hostnic-ipamd does not read",
            var.name
        );
    }

    // The config file, read by the daemon's own reader, and every path in it.
    let config_path = flags.config.clone().expect("the daemon is given --config");
    let volume = mount_of(&spec, daemon, &config_path)
        .unwrap_or_else(|| panic!("{} is not mounted", config_path.display()));
    let mount = daemon
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.name == volume)
        .expect("the mount");
    let key = mount
        .sub_path
        .clone()
        .expect("the config file is mounted by subPath");
    let data = config_map_data("hostnic-ipamd");
    let text = data
        .get(&key)
        .unwrap_or_else(|| panic!("ConfigMap hostnic-ipamd has no key {key}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join(&key);
    fs::write(&copy, text).expect("writing the config");
    let file = read_file(&copy).unwrap_or_else(|e| panic!("hostnic-ipamd refuses {key}: {e}"));
    let etcd_files = [
        &file.etcd.ca_file,
        &file.etcd.cert_file,
        &file.etcd.key_file,
    ];
    let header = read(MANIFEST);
    for path in etcd_files.into_iter().flatten() {
        assert!(
            mount_of(&spec, daemon, path) == Some("etcd-client"),
            "{} is not in the etcd client certificate's mount",
            path.display()
        );
        let name = path.file_name().and_then(|n| n.to_str()).expect("a name");
        assert!(
            header.contains(&format!("--from-file={name}=")),
            "the Secret's creation command gives no {name}"
        );
    }
    assert!(!file.etcd.endpoints.is_empty(), "no etcd endpoints");

    // The socket: on the host, in the directory the plugin looks in by default.
    let socket = flags
        .socket
        .clone()
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from(hostnic_proto::DEFAULT_SOCKET));
    assert_eq!(
        socket,
        Path::new(hostnic_proto::DEFAULT_SOCKET),
        "the plugin's default socket"
    );
    let on_host = host_path_of(&spec, daemon, socket.parent().expect("a directory"))
        .expect("the socket directory is a hostPath mount");
    assert_eq!(
        Path::new(&on_host),
        Path::new(hostnic_proto::DEFAULT_SOCKET)
            .parent()
            .expect("a directory"),
        "the socket directory on the host is where the plugin looks"
    );
    // The namespace paths the runtimes give, as the host sees them.
    assert_eq!(
        host_path_of(&spec, daemon, Path::new("/run/netns")).as_deref(),
        Some("/run/netns")
    );
    assert_eq!(spec.host_pid, Some(true), "/proc/PID/ns/net paths");
    assert_eq!(
        spec.host_network,
        Some(true),
        "no dependency on the pod network"
    );
}

#[test]
fn the_init_container_installs_the_images_plugins_and_a_conflist_the_plugin_accepts() {
    let spec = pod_spec();
    let init = container(
        spec.init_containers.as_deref().unwrap_or_default(),
        "install-cni",
    );
    let flags = parsed(init);
    let Some(Command::InstallCni {
        bin_dir,
        conf_dir,
        conflist,
        from,
    }) = flags.command
    else {
        panic!("the init container does not run install-cni");
    };
    assert_eq!(
        host_path_of(&spec, init, &bin_dir).as_deref(),
        Some(hostnic_ipamd::install::DEFAULT_BIN_DIR),
        "--bin-dir is the host's plugin directory"
    );
    assert_eq!(
        host_path_of(&spec, init, &conf_dir).as_deref(),
        Some(hostnic_ipamd::install::DEFAULT_CONF_DIR),
        "--conf-dir is the host's network config directory"
    );

    // The plugins come from the program's own directory in the image.
    let program = init.command.as_deref().unwrap_or_default()[0].clone();
    let from = from.unwrap_or_else(|| Path::new(&program).parent().expect("a dir").into());
    let image = image_binaries();
    assert!(
        image.contains_key(&program),
        "{program} is not in the image"
    );
    for plugin in PLUGINS {
        let path = from.join(plugin).display().to_string();
        assert!(
            image.contains_key(&path),
            "{path} is not in the image: {image:?}"
        );
    }

    // The conflist: a key of the mounted ConfigMap, valid for the plugin and the daemon.
    let conflist = conflist.expect("--conflist");
    assert_eq!(mount_of(&spec, init, &conflist), Some("cni-conflist"));
    let key = conflist
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a name");
    let text = config_map_data("hostnic-ipam-cni")
        .remove(key)
        .unwrap_or_else(|| panic!("ConfigMap hostnic-ipam-cni has no key {key}"));
    let list: Value = serde_json::from_str(&text).expect("the conflist is JSON");
    let mut plugin = list["plugins"][0].clone();
    plugin["name"] = list["name"].clone();
    plugin["cniVersion"] = list["cniVersion"].clone();
    let config = hostnic_cni::NetworkConfig::parse(plugin.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("hostnic-ipam refuses {key}: {e}"));
    assert_eq!(config.ipam.ipam_type, "hostnic-ipam");
    hostnic_ipamd::parse_range_sets(&config.ipam.raw)
        .unwrap_or_else(|e| panic!("hostnic-ipamd refuses the pools of {key}: {e}"));
}

#[test]
fn the_cluster_role_grants_exactly_what_the_daemon_asks_the_api_for() {
    // (API group, resource, resource names, verbs): what kube.rs, node_gc.rs, the sticky GC
    // and the namespace mapping ask.
    let needed: BTreeSet<(String, String, Vec<String>, Vec<String>)> = [
        ("", "pods", vec![], vec!["get", "list", "watch"]),
        ("", "nodes", vec![], vec!["get", "list", "watch"]),
        (
            "",
            "configmaps",
            vec!["hostnic-ipam-config"],
            vec!["get", "list", "watch"],
        ),
        ("apps", "statefulsets", vec![], vec!["get"]),
        (
            "network.qingcloud.com",
            "vxnetpools",
            vec![],
            vec!["get", "list", "watch"],
        ),
    ]
    .into_iter()
    .map(|(g, r, n, v)| {
        (
            g.to_owned(),
            r.to_owned(),
            n.into_iter().map(str::to_owned).collect(),
            v.into_iter().map(str::to_owned).collect(),
        )
    })
    .collect();
    let role: ClusterRole = typed("ClusterRole", "hostnic-ipam");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                granted.insert((
                    group.clone(),
                    resource,
                    rule.resource_names.clone().unwrap_or_default(),
                    rule.verbs.clone(),
                ));
            }
        }
    }
    assert_eq!(granted, needed);

    let account = pod_spec()
        .service_account_name
        .expect("the DaemonSet names its service account");
    let _: ServiceAccount = typed("ServiceAccount", &account);
    let binding: ClusterRoleBinding = typed("ClusterRoleBinding", "hostnic-ipam");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "hostnic-ipam");
    let subjects = binding.subjects.unwrap_or_default();
    assert!(
        subjects
            .iter()
            .any(|s| s.kind == "ServiceAccount" && s.name == account),
        "the binding does not bind {account}: {subjects:?}"
    );
}

#[test]
fn the_vxnetpool_resource_is_hostnics() {
    let crd: CustomResourceDefinition = typed(
        "CustomResourceDefinition",
        "vxnetpools.network.qingcloud.com",
    );
    assert_eq!(crd.spec.group, "network.qingcloud.com");
    assert_eq!(crd.spec.names.kind, "VxNetPool");
    assert_eq!(crd.spec.names.plural, "vxnetpools");
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1alpha1")
        .expect("v1alpha1");
    let schema = serde_json::to_value(&version.schema).expect("schema");
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(
        spec["vxnets"]["items"]["properties"]["name"]["type"],
        "string"
    );
    assert_eq!(spec["blockSize"]["type"], "integer");
}

#[test]
fn the_image_holds_the_workspaces_daemon_and_plugins_and_the_daemon_set_runs_them() {
    let image = image_binaries();
    let binaries = workspace_binaries();
    for name in image.values() {
        assert!(
            binaries.contains(name),
            "the image holds {name}, which no crate builds ({binaries:?})"
        );
    }
    let spec = pod_spec();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.as_deref().unwrap_or_default())
    {
        let program = &c.command.as_deref().unwrap_or_default()[0];
        assert!(
            image.contains_key(program),
            "{} runs {program}, which the image does not hold ({image:?})",
            c.name
        );
    }
    for plugin in PLUGINS {
        assert!(
            image.values().any(|n| n == plugin),
            "the image lacks the plugin {plugin}"
        );
    }
}

#[test]
fn the_probes_ask_the_daemons_health_endpoints_where_it_listens() {
    let spec = pod_spec();
    let daemon = container(&spec.containers, "hostnic-ipamd");
    let flags = parsed(daemon);
    let addr = flags
        .metrics_addr
        .expect("the DaemonSet gives --metrics-addr, which the probes need");
    hostnic_ipamd::http::check_listen_addr(addr, flags.metrics_allow_remote)
        .unwrap_or_else(|e| panic!("the daemon would refuse its --metrics-addr: {e}"));
    for (probe, path) in [
        (&daemon.liveness_probe, "/healthz"),
        (&daemon.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe of {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(addr.port().into()),
            "{path}: the port the daemon listens on"
        );
        // With hostNetwork the kubelet's default host is the node's IP: a loopback listener
        // needs the probe to name loopback (a wildcard one answers on both).
        let host = get.host.as_deref().unwrap_or("");
        assert!(
            addr.ip().is_unspecified() || host.parse() == Ok(addr.ip()),
            "{path}: probe host {host:?} does not reach a daemon listening on {addr}"
        );
    }
}
