//! What the NIC pool does on start (and after a failure it cannot judge) to bring etcd, the
//! QingCloud API and the host's links back into agreement: adopt what is ours, repair what is
//! half-done, release what no pod uses. [`plan`] is pure; [`super::pool`] carries it out.
//!
//! The rules, per NIC named `hostnic_<instance-id>` (the API's view) and per record of this
//! node (etcd's view):
//!
//! | API NIC | etcd record | other | repair |
//! |---|---|---|---|
//! | the primary NIC, or attached to another VM | any | | none, named in the log |
//! | present | none | its address held by an unrecorded NIC holder of this node | [`Repair::Adopt`], then attach |
//! | present | none | its address not held | [`Repair::Dispose`]: no address may be on a NIC without being held |
//! | available | attaching or ready | | [`Repair::Attach`] |
//! | in-use here | attaching | | [`Repair::Attach`] (waits for the link), then ready |
//! | any | attaching for [`ATTACH_GIVE_UP_SECS`] | | [`Repair::Dispose`] |
//! | in-use here | ready | no link | [`Repair::Dispose`] |
//! | in-use here | leased | its netns gone, link back on the host | [`Repair::Unlease`] |
//! | in-use here | leased | its netns gone, no link | [`Repair::Dispose`] |
//! | absent | any | | [`Repair::Forget`]: delete the record, release the address |
//! | absent | none | a NIC holder of this node | [`Repair::ReleaseHolder`] (crashed before `CreateNics`) |

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use hostnic_iaas::types::{Nic, NicStatus};

use super::record::{NicRecord, NicState};

/// How long a NIC may stay `attaching` (its attach retried by every reconcile) before it is
/// given up, detached and deleted: a NIC whose link never appears must not hold a slot of
/// `maxNic` for good.
pub const ATTACH_GIVE_UP_SECS: u64 = 600;

/// What the pool observed, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub instance: &'a str,
    /// Seconds since the Unix epoch.
    pub now: u64,
    /// This node's valid NIC records.
    pub records: &'a [NicRecord],
    /// The API's NICs named `hostnic_<instance>`, secondary ones (role 0).
    pub api: &'a [Nic],
    /// This node's NIC holder attachments: container id and address.
    pub holders: &'a [(String, IpAddr)],
    /// MACs of the host namespace's links.
    pub host_macs: &'a BTreeSet<String>,
    /// The primary NIC's MAC, never touched.
    pub primary_mac: Option<&'a str>,
}

/// One repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Record an unrecorded NIC whose address `holder` holds; then attach it.
    Adopt {
        nic_id: String,
        holder: String,
        attached: bool,
    },
    /// Attach the NIC if it is not (`attached` false) and wait for its link; then ready.
    Attach { nic_id: String, attached: bool },
    /// A leased NIC whose pod's namespace is gone and whose link is back on the host: ready.
    Unlease { nic_id: String },
    /// Detach (when `attached`) and delete the NIC, then forget its record if it has one.
    Dispose {
        nic_id: String,
        attached: bool,
        reason: String,
    },
    /// The NIC is gone from the API: delete its record and release its address.
    Forget { nic_id: String },
    /// A holder without NIC or record: release its address.
    ReleaseHolder { holder: String },
    /// Left alone, and why.
    Skip { nic_id: String, reason: String },
}

/// The repairs that bring `o` into agreement. `netns_exists` says whether a lease's network
/// namespace path still exists.
pub fn plan(o: &Observed<'_>, netns_exists: impl Fn(&str) -> bool) -> Vec<Repair> {
    let mut repairs = Vec::new();
    let recorded_holders: HashSet<&str> = o.records.iter().map(|r| r.holder.as_str()).collect();
    let mut used_holders: HashSet<&str> = HashSet::new();
    let api_ids: HashSet<&str> = o.api.iter().map(|n| n.nic_id.as_str()).collect();
    for nic in o.api {
        let id = nic.nic_id.clone();
        if o.primary_mac == Some(nic.nic_id.as_str()) {
            repairs.push(Repair::Skip {
                nic_id: id,
                reason: "it is the primary NIC".into(),
            });
            continue;
        }
        let attached = nic.status == NicStatus::InUse;
        if attached && nic.instance_id != o.instance {
            repairs.push(Repair::Skip {
                nic_id: id,
                reason: format!("attached to instance {}", nic.instance_id),
            });
            continue;
        }
        let link = o.host_macs.contains(&nic.nic_id);
        match o.records.iter().find(|r| r.nic_id == nic.nic_id) {
            Some(r) => match r.state {
                NicState::Attaching
                    if o.now.saturating_sub(r.created_at) >= ATTACH_GIVE_UP_SECS =>
                {
                    repairs.push(Repair::Dispose {
                        nic_id: id,
                        attached,
                        reason: format!(
                            "still attaching {} s after it was created",
                            o.now.saturating_sub(r.created_at)
                        ),
                    })
                }
                NicState::Attaching => repairs.push(Repair::Attach {
                    nic_id: id,
                    attached,
                }),
                NicState::Ready if !attached => repairs.push(Repair::Attach {
                    nic_id: id,
                    attached,
                }),
                NicState::Ready if !link => repairs.push(Repair::Dispose {
                    nic_id: id,
                    attached,
                    reason: "ready but its link is not on the host".into(),
                }),
                NicState::Ready => {}
                NicState::Leased => {
                    let netns = r.lease.as_ref().map(|l| l.netns.as_str()).unwrap_or("");
                    if !netns.is_empty() && !netns_exists(netns) {
                        if link && attached {
                            repairs.push(Repair::Unlease { nic_id: id });
                        } else {
                            repairs.push(Repair::Dispose {
                                nic_id: id,
                                attached,
                                reason: format!(
                                    "its pod's namespace {netns} is gone and its link with it"
                                ),
                            });
                        }
                    }
                }
            },
            None => {
                let ip: Option<IpAddr> = nic.private_ip.parse().ok();
                let holder = o.holders.iter().find(|(h, held)| {
                    Some(*held) == ip
                        && !recorded_holders.contains(h.as_str())
                        && !used_holders.contains(h.as_str())
                });
                match holder {
                    Some((h, _)) => {
                        used_holders.insert(h.as_str());
                        repairs.push(Repair::Adopt {
                            nic_id: id,
                            holder: h.clone(),
                            attached,
                        });
                    }
                    None => repairs.push(Repair::Dispose {
                        nic_id: id,
                        attached,
                        reason: format!("its address {} is not held in etcd", nic.private_ip),
                    }),
                }
            }
        }
    }
    for r in o.records {
        if !api_ids.contains(r.nic_id.as_str()) {
            repairs.push(Repair::Forget {
                nic_id: r.nic_id.clone(),
            });
        }
    }
    for (h, _) in o.holders {
        if !recorded_holders.contains(h.as_str()) && !used_holders.contains(h.as_str()) {
            repairs.push(Repair::ReleaseHolder { holder: h.clone() });
        }
    }
    repairs
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::nics::record::NicLeaseRecord;
    use crate::records::Attachment;

    const ME: &str = "i-me000001";

    fn nic(id: &str, ip: &str, status: NicStatus, instance: &str) -> Nic {
        serde_json::from_value(serde_json::json!({
            "nic_id": id, "nic_name": "hostnic_i-me000001", "status": status.as_str(),
            "instance_id": instance, "vxnet_id": "vxnet-a", "private_ip": ip, "role": 0,
        }))
        .unwrap()
    }

    fn record(id: &str, ip: &str, holder: &str, state: NicState, netns: &str) -> NicRecord {
        NicRecord {
            version: 1,
            nic_id: id.into(),
            vxnet: "vxnet-a".into(),
            address: ip.parse().unwrap(),
            subnet: "172.16.0.0/24".parse().unwrap(),
            gateway: "172.16.0.1".parse().unwrap(),
            holder: holder.into(),
            state,
            host_link: String::new(),
            lease: (state == NicState::Leased).then(|| NicLeaseRecord {
                attachment: Attachment::new("hostnic", "c", "eth0"),
                pod: None,
                netns: netns.into(),
            }),
            created_at: 0,
        }
    }

    fn held(h: &str, ip: &str) -> (String, IpAddr) {
        (h.into(), ip.parse().unwrap())
    }

    #[test]
    fn every_row_of_the_table_gets_its_repair() {
        use NicStatus::{Available, InUse};
        let api = vec![
            nic("52:54:00:00:00:01", "172.16.0.2", InUse, ME), // primary
            nic("52:54:00:00:00:02", "172.16.0.3", InUse, "i-other001"),
            nic("52:54:00:00:00:03", "172.16.0.4", Available, ""), // adopt
            nic("52:54:00:00:00:04", "172.16.0.5", InUse, ME),     // unheld: dispose
            nic("52:54:00:00:00:05", "172.16.0.6", Available, ""), // attaching: attach
            nic("52:54:00:00:00:06", "172.16.0.7", InUse, ME),     // attaching in-use
            nic("52:54:00:00:00:07", "172.16.0.8", InUse, ME),     // ready no link
            nic("52:54:00:00:00:08", "172.16.0.9", InUse, ME),     // ready fine
            nic("52:54:00:00:00:09", "172.16.0.10", InUse, ME),    // leased netns gone, link
            nic("52:54:00:00:00:0a", "172.16.0.11", InUse, ME),    // leased netns gone, no link
            nic("52:54:00:00:00:0b", "172.16.0.12", InUse, ME),    // leased alive
            nic("52:54:00:00:00:0c", "172.16.0.13", Available, ""), // ready but detached
        ];
        let records = vec![
            record(
                "52:54:00:00:00:05",
                "172.16.0.6",
                "h5",
                NicState::Attaching,
                "",
            ),
            record(
                "52:54:00:00:00:06",
                "172.16.0.7",
                "h6",
                NicState::Attaching,
                "",
            ),
            record("52:54:00:00:00:07", "172.16.0.8", "h7", NicState::Ready, ""),
            record("52:54:00:00:00:08", "172.16.0.9", "h8", NicState::Ready, ""),
            record(
                "52:54:00:00:00:09",
                "172.16.0.10",
                "h9",
                NicState::Leased,
                "/gone",
            ),
            record(
                "52:54:00:00:00:0a",
                "172.16.0.11",
                "ha",
                NicState::Leased,
                "/gone",
            ),
            record(
                "52:54:00:00:00:0b",
                "172.16.0.12",
                "hb",
                NicState::Leased,
                "/alive",
            ),
            record(
                "52:54:00:00:00:0c",
                "172.16.0.13",
                "hc",
                NicState::Ready,
                "",
            ),
            record(
                "52:54:00:00:00:0d",
                "172.16.0.14",
                "hd",
                NicState::Ready,
                "",
            ), // gone
        ];
        let holders = vec![
            held("h3", "172.16.0.4"),
            held("h5", "172.16.0.6"),
            held("hz", "172.16.0.99"), // crashed before CreateNics
        ];
        let macs: BTreeSet<String> = [
            "52:54:00:00:00:01",
            "52:54:00:00:00:08",
            "52:54:00:00:00:09",
        ]
        .map(String::from)
        .into();
        let o = Observed {
            instance: ME,
            now: 100,
            records: &records,
            api: &api,
            holders: &holders,
            host_macs: &macs,
            primary_mac: Some("52:54:00:00:00:01"),
        };
        let repairs = plan(&o, |p| p == "/alive");
        let id = |n: u8| format!("52:54:00:00:00:{n:02x}");
        let kinds: Vec<String> = repairs
            .iter()
            .map(|r| match r {
                Repair::Adopt {
                    nic_id,
                    holder,
                    attached,
                } => format!("adopt {nic_id} {holder} {attached}"),
                Repair::Attach { nic_id, attached } => format!("attach {nic_id} {attached}"),
                Repair::Unlease { nic_id } => format!("unlease {nic_id}"),
                Repair::Dispose {
                    nic_id, attached, ..
                } => format!("dispose {nic_id} {attached}"),
                Repair::Forget { nic_id } => format!("forget {nic_id}"),
                Repair::ReleaseHolder { holder } => format!("release {holder}"),
                Repair::Skip { nic_id, .. } => format!("skip {nic_id}"),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                format!("skip {}", id(1)),
                format!("skip {}", id(2)),
                format!("adopt {} h3 false", id(3)),
                format!("dispose {} true", id(4)),
                format!("attach {} false", id(5)),
                format!("attach {} true", id(6)),
                format!("dispose {} true", id(7)),
                format!("unlease {}", id(9)),
                format!("dispose {} true", id(10)),
                format!("attach {} false", id(12)),
                format!("forget {}", id(13)),
                "release hz".to_string(),
            ]
        );
    }

    #[test]
    fn agreement_needs_no_repair() {
        let api = vec![nic("52:54:00:00:00:08", "172.16.0.9", NicStatus::InUse, ME)];
        let records = vec![record(
            "52:54:00:00:00:08",
            "172.16.0.9",
            "h8",
            NicState::Ready,
            "",
        )];
        let holders = vec![held("h8", "172.16.0.9")];
        let macs: BTreeSet<String> = ["52:54:00:00:00:08".to_string()].into();
        let o = Observed {
            instance: ME,
            now: 100,
            records: &records,
            api: &api,
            holders: &holders,
            host_macs: &macs,
            primary_mac: None,
        };
        assert_eq!(plan(&o, |_| true), vec![]);
    }

    #[test]
    fn a_nic_attaching_for_too_long_is_given_up() {
        let api = vec![nic("52:54:00:00:00:05", "172.16.0.6", NicStatus::InUse, ME)];
        let records = vec![record(
            "52:54:00:00:00:05",
            "172.16.0.6",
            "h5",
            NicState::Attaching,
            "",
        )];
        let holders = vec![held("h5", "172.16.0.6")];
        let macs = BTreeSet::new();
        let at = |now: u64| {
            let o = Observed {
                instance: ME,
                now,
                records: &records,
                api: &api,
                holders: &holders,
                host_macs: &macs,
                primary_mac: None,
            };
            plan(&o, |_| true)
        };
        assert!(matches!(
            at(ATTACH_GIVE_UP_SECS - 1)[..],
            [Repair::Attach { .. }]
        ));
        assert!(matches!(
            at(ATTACH_GIVE_UP_SECS)[..],
            [Repair::Dispose { attached: true, .. }]
        ));
    }
}
