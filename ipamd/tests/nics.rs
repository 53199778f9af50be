//! QingCloud NICs for pods: the daemon's NIC pool against real etcd and the QingCloud
//! simulator, and the `hostnic` plugin moving real links (the simulator's `real_links`) into
//! real network namespaces.

mod common;

use common::{simulator, ACTIONS, KEY, SECRET, ZONE};

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hostnic_iaas::limit::RetryPolicy;
use hostnic_iaas::sim::{Fault, Simulator};
use hostnic_iaas::types::{CreateNics, NicStatus};
use hostnic_iaas::{Client, ClientOptions};
use hostnic_ipamd::nics::record::{holder_attachment, NicRecord, NicState, NIC_NETWORK};
use hostnic_ipamd::nics::settings::nic_name;
use hostnic_ipamd::nics::vxnet::Policy;
use hostnic_ipamd::nics::{self, NicFlags, NicPool, NicPoolConfig, PoolSettings};
use hostnic_ipamd::records::now_unix;
use hostnic_ipamd::{AllocateRequest, Allocator, Kind};
use hostnic_testkit::netns::{require_netns, run_cni, CniCall, NetNs};
use hostnic_testkit::{require_root, shared_single, unique_prefix};

/// A production client for `sim`, retrying and polling jobs fast enough for tests.
fn client(sim: &Simulator) -> Client {
    Client::new(
        sim.client_config(),
        ClientOptions {
            calls_per_hour: 3_600_000,
            burst: 1000,
            retry: RetryPolicy {
                max_attempts: 6,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
            },
            request_timeout: Duration::from_secs(10),
            job_poll_interval: Duration::from_millis(20),
        },
    )
    .expect("client")
}

fn settings(vxnets: &[&str], max_nic: u32, low: u32, high: u32) -> PoolSettings {
    PoolSettings {
        max_nic,
        low,
        high,
        vxnets: vxnets.iter().map(|s| s.to_string()).collect(),
        policy: Policy::FailRotate,
        attach_timeout: Duration::from_secs(20),
        block_size: None,
        vxnets_source: "pool.vxNets".into(),
    }
}

fn pool_config(instance: &str, settings: PoolSettings) -> NicPoolConfig {
    NicPoolConfig {
        instance: instance.to_string(),
        settings,
        primary_iface: "eth0".into(),
        sys_class_net: PathBuf::from("/sys/class/net"),
        link_timeout: Duration::from_secs(10),
    }
}

/// This node's NIC records, straight from etcd.
async fn records(allocator: &Allocator) -> Vec<NicRecord> {
    let prefix = format!(
        "{}/nodes/{}/nics/",
        allocator.keys().prefix(),
        allocator.node()
    );
    let (_, kvs) = allocator
        .store()
        .load_prefix(&prefix)
        .await
        .expect("reading NIC records");
    kvs.iter()
        .map(|kv| NicRecord::decode(kv.value()).expect("valid NIC record"))
        .collect()
}

/// The addresses this node's NIC holders hold in etcd.
async fn held(allocator: &Allocator) -> BTreeSet<IpAddr> {
    allocator
        .node_attachments(Some(NIC_NETWORK))
        .await
        .expect("listing holders")
        .iter()
        .flat_map(|h| h.record.ips.iter().map(|x| x.ip))
        .collect()
}

/// No leak: every NIC of ours in the simulator has a record that matches it (address, vxnet,
/// attached to this instance unless still attaching); every record has its NIC; the holders
/// hold exactly the recorded addresses. Returns the records.
async fn assert_agreement(
    sim: &Simulator,
    allocator: &Allocator,
    instance: &str,
) -> Vec<NicRecord> {
    let records = records(allocator).await;
    let ours: Vec<_> = sim
        .nics()
        .into_iter()
        .filter(|n| n.nic_name == nic_name(instance))
        .collect();
    for nic in &ours {
        let r = records
            .iter()
            .find(|r| r.nic_id == nic.nic_id)
            .unwrap_or_else(|| {
                panic!("NIC {} in the simulator has no record: {nic:?}", nic.nic_id)
            });
        assert_eq!(r.address.to_string(), nic.private_ip, "{r:?} vs {nic:?}");
        assert_eq!(r.vxnet, nic.vxnet_id);
        if r.state != NicState::Attaching {
            assert_eq!(nic.status, NicStatus::InUse, "{r:?} vs {nic:?}");
            assert_eq!(nic.instance_id, instance);
        }
    }
    for r in &records {
        assert!(
            ours.iter().any(|n| n.nic_id == r.nic_id),
            "record {r:?} has no NIC in the simulator"
        );
    }
    let recorded: BTreeSet<IpAddr> = records.iter().map(|r| IpAddr::V4(r.address)).collect();
    assert_eq!(
        held(allocator).await,
        recorded,
        "held addresses vs recorded NICs"
    );
    records
}

fn count(records: &[NicRecord], state: NicState) -> usize {
    records.iter().filter(|r| r.state == state).count()
}

/// A daemon socket serving `Ipam` and `Nics` in-process, as `hostnic-ipamd` serves them.
struct NicServer {
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl NicServer {
    /// Serves `allocator` and `nics` on a socket of a new temporary directory, once it exists.
    async fn start(allocator: &Arc<Allocator>, nics: nics::service::NicService) -> NicServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("ipamd.sock");
        let lock = hostnic_ipamd::server::SocketLock::acquire(&socket, Duration::ZERO)
            .await
            .expect("socket lock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(hostnic_ipamd::server::serve_with_nics(
            lock,
            hostnic_ipamd::service::IpamService::new(
                Arc::clone(allocator),
                Duration::from_secs(60),
            ),
            Some(nics),
            async move {
                let _ = stopped.await;
            },
        ));
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        NicServer {
            socket,
            _dir: dir,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The simulator's NIC links (`qcs…`) and its peers are removed when it stops; a NIC link
/// left in a namespace goes with the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_get_nics_whose_mac_and_etcd_address_show_in_their_namespaces_and_del_returns_them(
) {
    let what = "hostnic e2e with the simulator's real links";
    if !require_netns(what) {
        return;
    }
    let plugin = hostnic_testkit::bins::workspace_binary("hostnic").expect("hostnic plugin built");
    let instance = "i-e2enic01";
    let vxnet = "vxnet-e2enic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.71.0/24")], true).await;
    let prefix = unique_prefix("nics-e2e");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-e2e").await);
    let pool = Arc::new(
        NicPool::start(
            Arc::clone(&allocator),
            client(&sim),
            pool_config(instance, settings(&[vxnet], 8, 1, 2)),
        )
        .await
        .expect("NIC pool starts"),
    );
    let server = NicServer::start(
        &allocator,
        nics::service::NicService::new(Arc::clone(&pool)),
    )
    .await;
    let socket = server.socket.clone();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "qc", "type": "hostnic",
        "serviceCIDR": "10.96.0.0/12", "hairpin": false, "natMark": "0x10000",
        "socket": socket,
    })
    .to_string();
    let namespaces: Vec<NetNs> = (0..3)
        .map(|i| NetNs::new(&format!("nic{i}")).expect("netns"))
        .collect();
    let cni = |command: &'static str, i: usize| {
        let plugin = plugin.clone();
        let conf = conf.clone();
        let netns = namespaces[i].path();
        let container = format!("nicpod{i}");
        async move {
            tokio::task::spawn_blocking(move || {
                run_cni(
                    &plugin,
                    &CniCall {
                        command,
                        container_id: &container,
                        netns: &netns,
                        ifname: "eth0",
                        cni_path: Path::new("/nonexistent"),
                        args: &format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod{i}"),
                    },
                    &conf,
                )
                .expect("plugin runs")
            })
            .await
            .expect("plugin task")
        }
    };

    // ADD: each pod gets its own NIC, its link inside with the etcd address and routes.
    let mut macs = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let out = cni("ADD", i).await;
        assert!(out.success(), "ADD {i}: {} {}", out.stdout, out.stderr);
        let result: serde_json::Value = serde_json::from_str(&out.stdout).expect("result JSON");
        let mac = result["interfaces"][0]["mac"]
            .as_str()
            .expect("mac")
            .to_string();
        let address = result["ips"][0]["address"]
            .as_str()
            .expect("address")
            .to_string();
        let gateway = result["ips"][0]["gateway"]
            .as_str()
            .expect("gateway")
            .to_string();
        assert_eq!(result["interfaces"][0]["name"], "eth0");
        assert_eq!(
            result["interfaces"][0]["sandbox"],
            ns.path().display().to_string()
        );
        let link = ns
            .exec(["ip", "-o", "link", "show", "dev", "eth0"])
            .expect("link in pod");
        assert!(link.contains(&mac), "{link}");
        let addrs = ns
            .exec(["ip", "-o", "addr", "show", "dev", "eth0"])
            .expect("addresses");
        assert!(addrs.contains(&format!(" {address} ")), "{addrs}");
        let routes = ns.exec(["ip", "route", "show", "default"]).expect("routes");
        assert!(
            routes.contains(&format!("default via {gateway} dev eth0")),
            "{routes}"
        );
        // The service CIDR goes to the node's own address on the vxnet: a gateway NIC's.
        let service = result["routes"][1]["gw"]
            .as_str()
            .expect("service route")
            .to_string();
        assert_eq!(result["routes"][1]["dst"], "10.96.0.0/12");
        let routes = ns
            .exec(["ip", "route", "show", "10.96.0.0/12"])
            .expect("routes");
        assert!(
            routes.contains(&format!("via {service} dev eth0")),
            "{routes}"
        );
        let host = std::process::Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .expect("ip addr");
        assert!(
            String::from_utf8_lossy(&host.stdout).contains(&format!(" {service}/24 ")),
            "the host has the service gateway {service}"
        );
        let ip: IpAddr = address
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .expect("ip");
        assert!(held(&allocator).await.contains(&ip), "{ip} is held in etcd");
        let nic = sim
            .nics()
            .into_iter()
            .find(|n| n.nic_id == mac)
            .expect("NIC in the sim");
        assert_eq!(nic.private_ip, ip.to_string());
        assert_eq!(nic.status, NicStatus::InUse);
        assert!(
            hostnic_ipamd::nics::links::link_of(Path::new("/sys/class/net"), &mac).is_none(),
            "the link left the host"
        );
        macs.push(mac);
    }
    assert_eq!(
        macs.iter().collect::<BTreeSet<_>>().len(),
        3,
        "three distinct NICs"
    );
    let out = cni("CHECK", 1).await;
    // CHECK needs prevResult only from 0.4.0 on for IPAM; the main plugin checks the link.
    assert!(out.success(), "CHECK: {} {}", out.stdout, out.stderr);
    let records_now = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(
        count(&records_now, NicState::Leased),
        4,
        "three pods and the gateway NIC: {records_now:?}"
    );

    // The warm pool refills within its marks.
    pool.maintain_once().await.expect("maintain");
    let records_now = assert_agreement(&sim, &allocator, instance).await;
    let ready = count(&records_now, NicState::Ready);
    assert!((1..=2).contains(&ready), "warm {ready} within 1..=2");
    assert!(records_now.len() <= 8);

    // DEL returns each NIC: its link back on the host, the NIC ready again.
    for (i, mac) in macs.iter().enumerate() {
        let out = cni("DEL", i).await;
        assert!(out.success(), "DEL {i}: {} {}", out.stdout, out.stderr);
        assert!(namespaces[i]
            .exec(["ip", "-o", "link", "show"])
            .expect("links")
            .find(mac.as_str())
            .is_none());
        assert!(hostnic_ipamd::nics::links::link_of(Path::new("/sys/class/net"), mac).is_some());
        let out = cni("DEL", i).await;
        assert!(out.success(), "a second DEL succeeds: {}", out.stdout);
    }
    let records_now = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(
        count(&records_now, NicState::Leased),
        1,
        "the gateway NIC stays"
    );
    // Above the high mark now: trimmed back to it, the excess NICs deleted and their addresses
    // released.
    pool.maintain_once().await.expect("maintain");
    let records_now = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&records_now, NicState::Ready), 2, "{records_now:?}");

    server.stop().await;
}

/// Half-done states a crash can leave are repaired by the reconcile on start: an address held
/// before `CreateNics` (released), a NIC created with a held address but no record (adopted,
/// attached), a NIC whose address is not held (deleted), a recorded NIC never attached
/// (attached). Afterwards etcd and the simulator agree and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_on_start_adopts_repairs_and_releases_what_a_crash_left() {
    let what = "NIC reconcile with real links";
    if !require_root(what) {
        return;
    }
    let instance = "i-recnic01";
    let vxnet = "vxnet-recnic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.72.0/24")], true).await;
    let prefix = unique_prefix("nics-reconcile");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-rec").await);
    let api = client(&sim);
    let sets = common::sets(serde_json::json!({
        "type": "hostnic-ipam", "subnet": "172.31.72.0/24",
        "rangeStart": "172.31.72.2", "rangeEnd": "172.31.72.242", "gateway": "172.31.72.1",
    }));
    let hold = |holder: &str| AllocateRequest {
        attachment: holder_attachment(holder),
        pod: None,
        netns: String::new(),
        range_sets: sets.clone(),
        requested: Vec::new(),
        requested_kind: Kind::Exact,
    };
    // Crashed before CreateNics.
    let orphan = allocator.allocate(&hold("nic-orphan")).await.expect("hold");
    // Crashed after CreateNics, before the record.
    let adopted = allocator
        .allocate(&hold("nic-adopted"))
        .await
        .expect("hold");
    let adopted_ip = match adopted.ips[0].ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => unreachable!("IPv4 pool"),
    };
    let created = api
        .create_nics(&CreateNics {
            vxnet: vxnet.into(),
            nic_name: Some(nic_name(instance)),
            count: 2,
            private_ips: vec![adopted_ip, "172.31.72.200".parse().expect("ip")],
            disable_ip: false,
        })
        .await
        .expect("CreateNics");
    assert_eq!(created.len(), 2);
    let adopted_id = created[0].nic_id.clone();
    let unheld_id = created[1].nic_id.clone();
    // A recorded NIC never attached: made by a pool that is then dropped mid-way is hard to
    // time, so its record is written as the pool writes it.
    let recorded = allocator
        .allocate(&hold("nic-recorded"))
        .await
        .expect("hold");
    let recorded_ip = match recorded.ips[0].ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => unreachable!("IPv4 pool"),
    };
    let nic = api
        .create_nics(&CreateNics {
            vxnet: vxnet.into(),
            nic_name: Some(nic_name(instance)),
            count: 1,
            private_ips: vec![recorded_ip],
            disable_ip: false,
        })
        .await
        .expect("CreateNics")
        .remove(0);
    let record = NicRecord {
        version: 1,
        nic_id: nic.nic_id.clone(),
        vxnet: vxnet.into(),
        address: recorded_ip,
        subnet: "172.31.72.0/24".parse().expect("net"),
        gateway: "172.31.72.1".parse().expect("gw"),
        holder: "nic-recorded".into(),
        state: NicState::Attaching,
        host_link: String::new(),
        lease: None,
        created_at: now_unix(),
    };
    let key = format!(
        "{}/nodes/node-nic-rec/nics/{}",
        allocator.keys().prefix(),
        nic.nic_id
    );
    allocator
        .store()
        .client()
        .put(key, record.encode(), None)
        .await
        .expect("writing a record");

    let pool = NicPool::start(
        Arc::clone(&allocator),
        client(&sim),
        pool_config(instance, settings(&[vxnet], 8, 0, 0)),
    )
    .await
    .expect("NIC pool starts and reconciles");
    let records_now = assert_agreement(&sim, &allocator, instance).await;
    let ids: BTreeSet<&str> = records_now.iter().map(|r| r.nic_id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([adopted_id.as_str(), nic.nic_id.as_str()])
    );
    assert!(
        records_now.iter().all(|r| r.state == NicState::Ready),
        "{records_now:?}"
    );
    assert!(
        !sim.nics().iter().any(|n| n.nic_id == unheld_id),
        "the unheld NIC is deleted"
    );
    assert!(
        !held(&allocator).await.contains(&orphan.ips[0].ip),
        "the orphan is released"
    );
    // A second pass finds nothing to repair.
    let repairs = pool.reconcile().await.expect("reconcile");
    assert!(repairs.is_empty(), "{repairs:?}");
    // Low mark 0, high 0: the warm pool is trimmed to nothing, every NIC deleted.
    pool.maintain_once().await.expect("maintain");
    assert!(assert_agreement(&sim, &allocator, instance)
        .await
        .is_empty());
    assert!(sim.nics().iter().all(|n| n.nic_name != nic_name(instance)));
}

/// Faults on the way do not leak: 5100s and 2500s are retried, a failed attach job leaves the
/// created NICs to the next reconcile, which deletes or finishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_and_failed_jobs_leave_nothing_behind_after_a_reconcile() {
    let what = "NIC pool under API faults";
    if !require_root(what) {
        return;
    }
    let instance = "i-fltnic01";
    let vxnet = "vxnet-fltnic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.73.0/24")], true).await;
    let prefix = unique_prefix("nics-faults");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-flt").await);
    let pool = NicPool::start(
        Arc::clone(&allocator),
        client(&sim),
        pool_config(instance, settings(&[vxnet], 10, 2, 4)),
    )
    .await
    .expect("NIC pool starts");
    sim.inject(Fault::error("CreateNics", 5100, 2));
    sim.inject(Fault::error("AttachNics", 2500, 1));
    sim.inject(Fault::error("DescribeJobs", 5000, 2));
    pool.maintain_once()
        .await
        .expect("refill through retried faults");
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Ready), 4, "{r:?}");
    // A failed attach job: the NICs stay recorded (attaching) until a reconcile attaches them.
    sim.control(hostnic_iaas::sim::Control {
        fail_next_jobs: Some(1),
        ..Default::default()
    });
    let a = hostnic_ipamd::Attachment::new("qc", "faulty", "eth0");
    for i in 0..4 {
        pool.lease(
            &hostnic_ipamd::Attachment::new("qc", format!("c{i}"), "eth0"),
            None,
            "",
        )
        .await
        .expect("lease from the warm pool");
    }
    let failed = pool.lease(&a, None, "").await;
    assert!(failed.is_err(), "the attach job failed: {failed:?}");
    pool.reconcile().await.expect("reconcile repairs");
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Attaching), 0, "{r:?}");
    let leased = pool.lease(&a, None, "").await.expect("lease after repair");
    assert!(!leased.nic_id.is_empty());
    assert_agreement(&sim, &allocator, instance).await;
    for i in 0..4 {
        pool.give_back(&hostnic_ipamd::Attachment::new(
            "qc",
            format!("c{i}"),
            "eth0",
        ))
        .await
        .expect("return");
    }
    pool.give_back(&a).await.expect("return");
    pool.maintain_once().await.expect("trim");
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(
        count(&r, NicState::Ready),
        4,
        "trimmed to the high mark: {r:?}"
    );
}

/// Bad configuration stops QingCloud mode at start with a message naming the problem.
#[tokio::test]
async fn bad_configuration_is_refused_at_start_naming_the_problem() {
    let instance = "i-badcfg01";
    let sim = simulator(
        instance,
        &[
            "vxnet-good001=172.31.74.0/24",
            "vxnet-novpc01=172.31.75.0/24,no-router",
            "vxnet-nodhcp1=172.31.76.0/24,no-dhcp",
        ],
        false,
    )
    .await;
    let prefix = unique_prefix("nics-badcfg");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-bad").await);
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = sim.addr();
    let good_yaml = format!(
        "qy_access_key_id: '{KEY}'\nqy_secret_access_key: '{SECRET}'\nzone: '{ZONE}'\nhost: '{}'\nport: {}\nprotocol: 'http'\nuri: '/iaas'\nconnection_retries: 1\n",
        addr.ip(),
        addr.port()
    );
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing a file");
        path
    };
    let sdk = write("config.yaml", &good_yaml);
    let no_zone = write(
        "nozone.yaml",
        &good_yaml.replace(&format!("zone: '{ZONE}'\n"), ""),
    );
    let id_file = write("instance-id", &format!("{instance}\n"));
    let cases_written = std::cell::Cell::new(0);
    let pool_json = |body: &str| {
        // One file per case: the cases are built before any is run.
        cases_written.set(cases_written.get() + 1);
        let name = format!("hostnic-{}.json", cases_written.get());
        write(&name, &format!("{{\"pool\":{body}}}"))
    };
    let flags = |sdk: &Path, pool: PathBuf, id: PathBuf| NicFlags {
        qingcloud_config: Some(sdk.to_path_buf()),
        nic_pool_config: Some(pool),
        instance_id_file: Some(id),
        vxnet_pool: None,
        iface: "eth0".into(),
    };
    let cases: Vec<(NicFlags, &str)> = vec![
        (
            flags(
                &no_zone,
                pool_json(r#"{"vxNets":["vxnet-good001"]}"#),
                id_file.clone(),
            ),
            "zone",
        ),
        (
            flags(
                &sdk,
                pool_json(r#"{"vxNets":["vxnet-good001"]}"#),
                dir.path().join("missing-id"),
            ),
            "missing-id",
        ),
        (
            flags(
                &sdk,
                pool_json(r#"{"maxNic":64,"vxNets":["vxnet-good001"]}"#),
                id_file.clone(),
            ),
            "pool.maxNic 64",
        ),
        (
            flags(
                &sdk,
                pool_json(r#"{"vxNets":["vxnet-novpc01"]}"#),
                id_file.clone(),
            ),
            "vxnet vxnet-novpc01 should bind to vpc",
        ),
        (
            flags(
                &sdk,
                pool_json(r#"{"vxNets":["vxnet-nodhcp1"]}"#),
                id_file.clone(),
            ),
            "vxnet vxnet-nodhcp1 should open DHCP",
        ),
        (
            flags(
                &sdk,
                pool_json(r#"{"vxNets":["vxnet-unknown"]}"#),
                id_file.clone(),
            ),
            "pool.vxNets names vxnet vxnet-unknown, which the API does not know",
        ),
        (
            NicFlags {
                vxnet_pool: Some(write(
                    "vxnetpool.json",
                    r#"{"apiVersion":"network.qingcloud.com/v1alpha1","kind":"VxNetPool","metadata":{"name":"v-pool"},"spec":{"vxnets":[{"name":"vxnet-nosuch1"}],"blockSize":26}}"#,
                )),
                ..flags(
                    &sdk,
                    pool_json(r#"{"vxNets":["vxnet-good001"]}"#),
                    id_file.clone(),
                )
            },
            "VxNetPool v-pool",
        ),
    ];
    for (flags, reason) in cases {
        let e = nics::start(&flags, Arc::clone(&allocator))
            .await
            .expect_err("refused");
        assert!(e.to_string().contains(reason), "{e} should say {reason:?}");
    }
    assert_eq!(
        nics::start(&NicFlags::default(), Arc::clone(&allocator))
            .await
            .expect("off")
            .map(|_| ()),
        None,
        "without --qingcloud-config QingCloud mode is off"
    );
    // Nothing was created by the refused starts.
    assert!(sim.nics().iter().all(|n| n.nic_name != nic_name(instance)));
    assert!(records(&allocator).await.is_empty());
}

/// The calls `sim` received of every action the NIC pool makes: what a run spent.
fn api_calls(sim: &Simulator) -> u64 {
    ACTIONS.iter().map(|a| sim.calls(a)).sum()
}

/// The API calls 100 pod starts and stops cost, counted by the simulator: pods come and go
/// three at a time through the `hostnic` plugin, the warm pool (low 2, high 4) is kept by the
/// maintenance pass after every DEL. Batching and the warm pool keep the steady state at no
/// call at all; the figure (printed) is what the first fills cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_pod_starts_and_stops_cost_far_fewer_api_calls_than_pods() {
    let what = "API calls per 100 pods with the simulator's real links";
    if !require_netns(what) {
        return;
    }
    let plugin = hostnic_testkit::bins::workspace_binary("hostnic").expect("hostnic plugin built");
    let instance = "i-cntnic01";
    let vxnet = "vxnet-cntnic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.77.0/24")], true).await;
    let prefix = unique_prefix("nics-count");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-cnt").await);
    let pool = Arc::new(
        NicPool::start(
            Arc::clone(&allocator),
            client(&sim),
            pool_config(instance, settings(&[vxnet], 16, 2, 4)),
        )
        .await
        .expect("NIC pool starts"),
    );
    let at_start = api_calls(&sim);
    let server = NicServer::start(
        &allocator,
        nics::service::NicService::new(Arc::clone(&pool)),
    )
    .await;
    let socket = server.socket.clone();
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "qc", "type": "hostnic", "socket": socket})
        .to_string();
    let namespaces: Vec<NetNs> = (0..3)
        .map(|i| NetNs::new(&format!("cnt{i}")).expect("netns"))
        .collect();
    let cni = |command: &'static str, pod: usize| {
        let plugin = plugin.clone();
        let conf = conf.clone();
        let netns = namespaces[pod % 3].path();
        async move {
            tokio::task::spawn_blocking(move || {
                let container = format!("cntpod{pod}");
                run_cni(
                    &plugin,
                    &CniCall {
                        command,
                        container_id: &container,
                        netns: &netns,
                        ifname: "eth0",
                        cni_path: Path::new("/nonexistent"),
                        args: "",
                    },
                    &conf,
                )
                .expect("plugin runs")
            })
            .await
            .expect("plugin task")
        }
    };
    for pod in 0..100 {
        if pod >= 3 {
            let out = cni("DEL", pod - 3).await;
            assert!(out.success(), "DEL {}: {}", pod - 3, out.stdout);
            pool.maintain_once().await.expect("maintain");
        }
        let out = cni("ADD", pod).await;
        assert!(out.success(), "ADD {pod}: {} {}", out.stdout, out.stderr);
    }
    for pod in 97..100 {
        let out = cni("DEL", pod).await;
        assert!(out.success(), "DEL {pod}: {}", out.stdout);
    }
    pool.maintain_once().await.expect("maintain");
    let spent = api_calls(&sim) - at_start;
    let by_action: Vec<String> = ACTIONS
        .iter()
        .map(|a| format!("{a} {}", sim.calls(a)))
        .collect();
    eprintln!(
        "API calls for 100 pod starts and stops: {spent} (after {at_start} at start; totals: {})",
        by_action.join(", ")
    );
    assert!(
        spent < 100,
        "{spent} calls for 100 pods: {}",
        by_action.join(", ")
    );
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Leased), 0);
    assert!(count(&r, NicState::Ready) <= 4);
    server.stop().await;
}

/// The daemon SIGKILLed while an attach job is in flight, under 5100s, 2500s and a 5000, and
/// started again: its reconcile finishes the half-attached NICs, the pod's retried ADD gets
/// one, DEL returns it, and every NIC in the simulator is recorded and agrees with etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_attach_and_restarted_leaks_nothing() {
    let what = "daemon killed mid-attach, with the simulator's real links";
    if !require_netns(what) {
        return;
    }
    let daemon_bin =
        hostnic_testkit::bins::workspace_binary("hostnic-ipamd").expect("daemon built");
    let plugin = hostnic_testkit::bins::workspace_binary("hostnic").expect("hostnic plugin built");
    let instance = "i-kilnic01";
    let vxnet = "vxnet-kilnic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.78.0/24")], true).await;
    let cluster = shared_single();
    let prefix = unique_prefix("nics-kill");
    let node = "node-nic-kill";
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing a file");
        path.display().to_string()
    };
    let sdk = write(
        "config.yaml",
        format!(
            "qy_access_key_id: '{KEY}'\nqy_secret_access_key: '{SECRET}'\nzone: '{ZONE}'\nhost: '{}'\nport: {}\nprotocol: 'http'\nuri: '/iaas'\nconnection_retries: 4\n",
            sim.addr().ip(),
            sim.addr().port()
        ),
    );
    let pool_conf = write(
        "hostnic.json",
        format!(r#"{{"pool":{{"maxNic":8,"poolLow":0,"poolHigh":2,"vxNets":["{vxnet}"]}}}}"#),
    );
    let id_file = write("instance-id", format!("{instance}\n"));
    let socket = dir.path().join("run/ipamd.sock");
    let args = [
        "--qingcloud-config",
        sdk.as_str(),
        "--nic-pool-config",
        pool_conf.as_str(),
        "--instance-id-file",
        id_file.as_str(),
        "--iface",
        "eth0",
    ];
    let start = || {
        hostnic_testkit::daemon::IpamDaemon::start(
            &daemon_bin,
            &cluster.endpoints(),
            node,
            &prefix,
            &socket,
            &args,
        )
        .expect("daemon starts")
    };
    let mut daemon = start();
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "qc", "type": "hostnic", "socket": socket})
        .to_string();
    let ns = NetNs::new("kil").expect("netns");
    let cni = |command: &'static str| {
        let plugin = plugin.clone();
        let conf = conf.clone();
        let netns = ns.path();
        std::thread::spawn(move || {
            run_cni(
                &plugin,
                &CniCall {
                    command,
                    container_id: "killpod",
                    netns: &netns,
                    ifname: "eth0",
                    cni_path: Path::new("/nonexistent"),
                    args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=killpod",
                },
                &conf,
            )
            .expect("plugin runs")
        })
    };
    sim.inject(Fault::error("CreateNics", 5100, 2));
    sim.inject(Fault::error("AttachNics", 2500, 2));
    sim.inject(Fault::error("DescribeJobs", 5000, 1));
    sim.control(hostnic_iaas::sim::Control {
        job_duration_ms: Some(4000),
        ..Default::default()
    });
    let add = cni("ADD");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sim.jobs().iter().any(|j| {
        j.job_action == "AttachNics"
            && matches!(
                j.status,
                hostnic_iaas::types::JobStatus::Pending | hostnic_iaas::types::JobStatus::Working
            )
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no attach job started: {}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill();
    let out = tokio::task::spawn_blocking(move || add.join().expect("plugin thread"))
        .await
        .expect("join");
    assert!(
        !out.success(),
        "the ADD whose daemon died fails: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("\"code\":11"),
        "retryable: {}",
        out.stdout
    );

    sim.control(hostnic_iaas::sim::Control {
        job_duration_ms: Some(100),
        ..Default::default()
    });
    let daemon2 = start();
    daemon = daemon2;
    let out = tokio::task::spawn_blocking({
        let add = cni("ADD");
        move || add.join().expect("plugin thread")
    })
    .await
    .expect("join");
    assert!(
        out.success(),
        "the retried ADD: {} {}",
        out.stdout,
        daemon.log_tail()
    );
    let result: serde_json::Value = serde_json::from_str(&out.stdout).expect("result");
    let mac = result["interfaces"][0]["mac"]
        .as_str()
        .expect("mac")
        .to_string();
    assert!(ns
        .exec(["ip", "-o", "link", "show", "dev", "eth0"])
        .expect("link")
        .contains(&mac));

    let allocator = common::allocator(cluster, &prefix, node).await;
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Leased), 1, "{r:?}");
    assert_eq!(count(&r, NicState::Attaching), 0, "{r:?}");
    let out = tokio::task::spawn_blocking({
        let del = cni("DEL");
        move || del.join().expect("plugin thread")
    })
    .await
    .expect("join");
    assert!(out.success(), "DEL: {}", out.stdout);
    daemon.stop();
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Leased), 0);
    assert!(r.len() <= 2, "within the high mark: {r:?}");
    assert!(
        sim.nics()
            .iter()
            .filter(|n| n.nic_name == nic_name(instance))
            .all(|n| n.status == NicStatus::InUse),
        "every NIC left is attached and ready in the warm pool"
    );
}

/// A namespace mapped to a block (`hostnic-ipam-config`'s `"test": ["4100-172-31-79-64-26"]`)
/// gets NICs with addresses of that block only, never a warm NIC from elsewhere; a namespace
/// without entries gets the vxnet's next free address; an entry naming an unknown vxnet is
/// refused (code 7) and leases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_mapped_to_a_block_gets_addresses_from_that_block_only() {
    let what = "block-mapped namespaces with the simulator's real links";
    if !require_netns(what) {
        return;
    }
    let plugin = hostnic_testkit::bins::workspace_binary("hostnic").expect("hostnic plugin built");
    let instance = "i-blknic01";
    let vxnet = "vxnet-blknic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.79.0/24")], true).await;
    let prefix = unique_prefix("nics-block");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-blk").await);
    let pool = Arc::new(
        NicPool::start(
            Arc::clone(&allocator),
            client(&sim),
            pool_config(instance, settings(&[vxnet], 8, 0, 2)),
        )
        .await
        .expect("NIC pool starts"),
    );
    let entries: nics::service::NamespaceEntries = Arc::new(|namespace: &str| match namespace {
        "test" => Some(vec!["4100-172-31-79-64-26".to_string()]),
        "broken" => Some(vec!["vxnet-unknown1".to_string()]),
        _ => None,
    });
    let server = NicServer::start(
        &allocator,
        nics::service::NicService::new(Arc::clone(&pool)).with_namespaces(entries),
    )
    .await;
    let socket = server.socket.clone();
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "qc", "type": "hostnic", "socket": socket})
        .to_string();
    let namespaces: Vec<NetNs> = (0..4)
        .map(|i| NetNs::new(&format!("blk{i}")).expect("netns"))
        .collect();
    let cni = |command: &'static str, i: usize, k8s_namespace: &'static str| {
        let plugin = plugin.clone();
        let conf = conf.clone();
        let netns = namespaces[i].path();
        async move {
            tokio::task::spawn_blocking(move || {
                run_cni(
                    &plugin,
                    &CniCall {
                        command,
                        container_id: &format!("blkpod{i}"),
                        netns: &netns,
                        ifname: "eth0",
                        cni_path: Path::new("/nonexistent"),
                        args: &format!("K8S_POD_NAMESPACE={k8s_namespace};K8S_POD_NAME=pod{i}"),
                    },
                    &conf,
                )
                .expect("plugin runs")
            })
            .await
            .expect("plugin task")
        }
    };
    let address_of = |out: &hostnic_testkit::netns::CniOutput| -> ipnet::Ipv4Net {
        let result: serde_json::Value = serde_json::from_str(&out.stdout).expect("result");
        result["ips"][0]["address"]
            .as_str()
            .expect("address")
            .parse()
            .expect("IPv4 address")
    };
    let block: ipnet::Ipv4Net = "172.31.79.64/26".parse().expect("block");
    // A pod of an unmapped namespace first: its batch leaves warm NICs outside the block.
    let out = cni("ADD", 0, "default").await;
    assert!(out.success(), "{} {}", out.stdout, out.stderr);
    assert!(!block.contains(&address_of(&out).addr()));
    assert!(records(&allocator)
        .await
        .iter()
        .any(|r| r.state == NicState::Ready));
    for (i, ns) in namespaces.iter().enumerate().take(3).skip(1) {
        let out = cni("ADD", i, "test").await;
        assert!(out.success(), "{} {}", out.stdout, out.stderr);
        let address = address_of(&out);
        assert!(block.contains(&address.addr()), "{address} in {block}");
        let inside = ns
            .exec(["ip", "-o", "addr", "show", "dev", "eth0"])
            .expect("addresses");
        assert!(inside.contains(&format!(" {address} ")), "{inside}");
    }
    let out = cni("ADD", 3, "broken").await;
    assert!(!out.success());
    assert!(
        out.stdout.contains("\"code\":7") && out.stdout.contains("vxnet-unknown1"),
        "{}",
        out.stdout
    );
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Leased), 3, "{r:?}");
    for (i, ns) in [(0, "default"), (1, "test"), (2, "test")] {
        let out = cni("DEL", i, ns).await;
        assert!(out.success(), "{}", out.stdout);
    }
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Leased), 0);
    server.stop().await;
}

/// Answers about 30 % of the simulator's calls with 5100 until `stop` is set: after every call
/// it sees, it injects a one-shot 5100 for the next call with probability 0.3.
async fn chaos(sim: &Simulator, stop: Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let mut seen = api_calls(sim);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut injected = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let now = api_calls(sim);
        for _ in seen..now {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            if (seed >> 33) % 10 < 3 {
                sim.inject(Fault {
                    action: None,
                    effect: hostnic_iaas::sim::FaultEffect::Error {
                        ret_code: 5100,
                        message: None,
                    },
                    times: 1,
                });
                injected += 1;
            }
        }
        seen = now;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    injected
}

/// Churn under about 30 % of calls answered 5100, slow jobs (1 s) and 2500 bursts: leases and
/// returns may fail, and are tried again after a reconcile, as the daemon's maintenance loop
/// does; at the end every NIC in the simulator is leased, warm within the marks, or deleted,
/// and etcd agrees with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_5100s_slow_jobs_and_2500_bursts_leak_nothing() {
    let what = "NIC churn under API faults with the simulator's real links";
    if !require_root(what) {
        return;
    }
    let instance = "i-chsnic01";
    let vxnet = "vxnet-chsnic1";
    let sim = simulator(instance, &[&format!("{vxnet}=172.31.80.0/24")], true).await;
    let prefix = unique_prefix("nics-chaos");
    let allocator = Arc::new(common::allocator(shared_single(), &prefix, "node-nic-chs").await);
    let pool = NicPool::start(
        Arc::clone(&allocator),
        client(&sim),
        pool_config(instance, settings(&[vxnet], 12, 2, 4)),
    )
    .await
    .expect("NIC pool starts");
    sim.control(hostnic_iaas::sim::Control {
        job_duration_ms: Some(1000),
        ..Default::default()
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos_stop = Arc::clone(&stop);
    let attachment = |i: usize| hostnic_ipamd::Attachment::new("qc", format!("chaos{i}"), "eth0");
    let work = async {
        let mut failures = 0;
        for round in 0..24 {
            if round % 6 == 0 {
                sim.inject(Fault::error("AttachNics", 2500, 2));
                sim.inject(Fault::error("DescribeNics", 2500, 2));
            }
            let i = round % 8;
            let result = if round < 8 || round % 2 == 0 {
                pool.lease(&attachment(i), None, "").await.map(drop)
            } else {
                pool.give_back(&attachment(i)).await.map(drop)
            };
            if let Err(e) = result {
                failures += 1;
                eprintln!("round {round}: {e}; reconciling");
                let _ = pool.reconcile().await;
            }
            if let Err(e) = pool.maintain_once().await {
                failures += 1;
                eprintln!("round {round} maintenance: {e}; reconciling");
                let _ = pool.reconcile().await;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        failures
    };
    let (failures, injected) = tokio::join!(work, chaos(&sim, chaos_stop));
    eprintln!(
        "{injected} of {} calls answered 5100 by the chaos, {failures} operations failed",
        api_calls(&sim)
    );
    assert!(injected > 0, "the chaos injected faults");
    sim.clear_faults();
    sim.control(hostnic_iaas::sim::Control {
        job_duration_ms: Some(100),
        ..Default::default()
    });
    pool.reconcile().await.expect("a clean reconcile");
    pool.maintain_once()
        .await
        .expect("a clean maintenance pass");
    let r = assert_agreement(&sim, &allocator, instance).await;
    assert_eq!(count(&r, NicState::Attaching), 0, "{r:?}");
    let ready = count(&r, NicState::Ready);
    assert!((2..=4).contains(&ready), "warm {ready} within 2..=4: {r:?}");
    assert!(r.len() <= 12);
    // Every NIC of ours in the simulator is recorded (assert_agreement) and attached here.
    assert!(sim
        .nics()
        .iter()
        .filter(|n| n.nic_name == nic_name(instance))
        .all(|n| n.status == NicStatus::InUse && n.instance_id == instance));
}
