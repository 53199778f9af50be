//! `--real-links`: an attached NIC becomes a link with the NIC's MAC in the host namespace, and
//! goes away on detach and when the simulator stops. Needs root and veth; skips otherwise.

mod common;

use std::time::Duration;

use common::*;
use hostnic_iaas::sim::links::{link_name, running_as_root};
use hostnic_iaas::types::CreateNics;
use hostnic_iaas::Client;

fn link_mac(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .ok()
        .map(|s| s.trim().to_string())
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 2 s");
}

/// Whether this kernel lets us make a veth pair (it does here; some sandboxes do not).
fn veth_works() -> bool {
    let name = format!("qct{}", std::process::id() % 100_000);
    let made = std::process::Command::new("ip")
        .args([
            "link",
            "add",
            &name,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{name}p"),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status();
    }
    made
}

#[tokio::test]
async fn an_attached_nic_is_a_link_with_its_mac_until_it_is_detached_or_the_simulator_stops() {
    if !running_as_root() || !veth_works() {
        println!("SKIPPED: real links need root and veth support");
        return;
    }
    let mut config = sim_config();
    config.real_links = true;
    let sim = start(config).await;
    let client = Client::new(sim.client_config(), fast_options()).expect("client");
    let nics = client
        .create_nics(&CreateNics {
            vxnet: "vxnet-full".into(),
            count: 2,
            ..CreateNics::default()
        })
        .await
        .expect("CreateNics");
    let ids: Vec<String> = nics.iter().map(|n| n.nic_id.clone()).collect();
    let names: Vec<String> = ids.iter().map(|id| link_name(id)).collect();
    assert!(
        names.iter().all(|n| link_mac(n).is_none()),
        "no link before the attach"
    );

    let job = client
        .attach_nics(INSTANCE, &ids)
        .await
        .expect("AttachNics");
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("attached");
    for (id, name) in ids.iter().zip(&names) {
        wait_for("the link appearing", || {
            link_mac(name).as_deref() == Some(id.as_str())
        })
        .await;
    }

    let job = client.detach_nics(&ids[..1]).await.expect("DetachNics");
    client
        .wait_job(&job, Duration::from_secs(5))
        .await
        .expect("detached");
    wait_for("the link going away", || link_mac(&names[0]).is_none()).await;
    assert_eq!(
        link_mac(&names[1]).as_deref(),
        Some(ids[1].as_str()),
        "the other NIC stays"
    );

    drop(sim);
    assert!(
        link_mac(&names[1]).is_none(),
        "the simulator removes its links when it stops"
    );
}
