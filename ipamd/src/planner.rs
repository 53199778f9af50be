//! The decisions of an ADD that need no etcd, apart from the I/O that feeds them: which range
//! set each requested address belongs to ([`plan`]), what to answer when the attachment
//! already holds addresses ([`already_held`]), and what a commit transaction that etcd refused
//! means ([`read_refusal`]). The allocator builds the transaction, sends it, and acts on the
//! [`Verdict`]; these functions are table-tested here.

use std::net::IpAddr;

use crate::allocator::{AllocateRequest, Allocation};
use crate::error::{IpamError, Result};
use crate::pool::Pool;
use crate::records::{AllocationRecord, Attachment, AttachmentRecord, Kind};

/// Matches each requested address to its range set: `Some((pool, ip))` for an exact address,
/// None for a range set that gets a dynamic one. Refuses an address outside every subnet of the
/// network, one that may not be requested (reserved; outside the ranges and the fixed window,
/// or for a `Kind::Fixed` request see [`Pool::check_fixed`]), and two addresses for one range
/// set.
pub fn plan(req: &AllocateRequest) -> Result<Vec<Option<(Pool, IpAddr)>>> {
    let mut plan: Vec<Option<(Pool, IpAddr)>> = vec![None; req.range_sets.len()];
    for &ip in &req.requested {
        let invalid = |reason: String| IpamError::InvalidRequest {
            ip,
            network: req.attachment.network.clone(),
            reason,
        };
        let (i, pool) = req
            .range_sets
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.pool_for(ip).map(|p| (i, p)))
            .ok_or_else(|| invalid("outside every subnet of the network".into()))?;
        // An annotation's fixed address may lie outside the ranges where the pool has no
        // fixed window (kube-ipam's rule); a runtime's exact request may not.
        match req.requested_kind {
            Kind::Fixed => pool.check_fixed(ip),
            _ => pool.check_exact(ip),
        }
        .map_err(invalid)?;
        if let Some((_, other)) = &plan[i] {
            return Err(invalid(format!(
                "{other} is also requested from the same range set"
            )));
        }
        plan[i] = Some((pool.clone(), ip));
    }
    Ok(plan)
}

/// The answer to an ADD whose attachment already holds `allocation`: the same addresses, but
/// never a different address than one the request asks for exactly.
pub fn already_held(req: &AllocateRequest, allocation: Allocation) -> Result<Allocation> {
    let held = |ip: &IpAddr| allocation.ips.iter().any(|x| x.ip == *ip);
    match req.requested.iter().find(|ip| !held(ip)) {
        None => Ok(allocation),
        Some(ip) => {
            let held: Vec<String> = allocation.ips.iter().map(|x| x.ip.to_string()).collect();
            Err(IpamError::InvalidRequest {
                ip: *ip,
                network: req.attachment.network.clone(),
                reason: format!(
                    "attachment {} already holds {}; DEL it before asking for another address",
                    req.attachment,
                    held.join(", ")
                ),
            })
        }
    }
}

/// Who an address record names, for an `AddressInUse` error.
pub fn holder_of(value: &[u8]) -> String {
    match serde_json::from_slice::<AllocationRecord>(value) {
        Ok(holder) => {
            // Runtimes outside Kubernetes (Podman) send a name without a namespace.
            let who = match &holder.pod {
                Some(pod) if pod.namespace.is_empty() => {
                    format!("container {} ({})", pod.name, holder.attachment)
                }
                Some(pod) => format!("pod {}/{} ({})", pod.namespace, pod.name, holder.attachment),
                None => format!("container {}", holder.attachment),
            };
            format!("{who} on node {}", holder.node)
        }
        Err(e) => format!("an unreadable record ({e})"),
    }
}

/// The holder's address record, boxed for an `AddressInUse` error; None if it cannot be read.
pub fn holder_record(value: &[u8]) -> Option<Box<AllocationRecord>> {
    serde_json::from_slice::<AllocationRecord>(value)
        .ok()
        .map(Box::new)
}

/// One key the refused transaction read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// What the or-else branch of a refused commit read: the attachment's record, its release
/// marker, each picked address's record (in pick order), and the record of the earlier layout
/// for the container id and ifname. None where the key does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusal {
    pub attachment: Option<Read>,
    pub marker: Option<Read>,
    pub addresses: Vec<Option<Read>>,
    pub legacy: Option<Read>,
}

/// What a refused commit means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The attachment already holds these addresses (a retry, or the runtime calling twice):
    /// answer with them.
    Held(AttachmentRecord),
    /// A DEL of the attachment came after this ADD arrived: the ADD must not commit.
    ReleasedMeanwhile { released: i64 },
    /// The earlier layout holds the container id and ifname for another network: commit
    /// again without guarding that key.
    OtherNetworksLegacy,
    /// These picks (indices) are held by others. If one of them was asked for exactly, the
    /// request fails naming its holder (and carrying its record); otherwise pick again.
    Taken {
        picks: Vec<usize>,
        exact: Option<(IpAddr, String, Option<Box<AllocationRecord>>)>,
    },
}

/// Reads a refused commit. `picks` are the picked addresses and their kinds, in the order of
/// `refusal.addresses`; `began` is the revision the ADD arrived at; `guard_legacy` whether the
/// transaction guarded the earlier layout's key.
pub fn read_refusal(
    refusal: &Refusal,
    attachment: &Attachment,
    picks: &[(IpAddr, Kind)],
    began: i64,
    guard_legacy: bool,
) -> Result<Verdict> {
    let decode = |read: &Read| {
        serde_json::from_slice::<AttachmentRecord>(&read.value).map_err(|e| IpamError::Corrupt {
            key: read.key.clone(),
            reason: e.to_string(),
        })
    };
    if let Some(read) = &refusal.attachment {
        return decode(read).map(Verdict::Held);
    }
    if let Some(marker) = refusal.marker.as_ref().filter(|m| m.mod_revision > began) {
        return Ok(Verdict::ReleasedMeanwhile {
            released: marker.mod_revision,
        });
    }
    if let Some(read) = refusal.legacy.as_ref().filter(|_| guard_legacy) {
        let record = decode(read)?;
        return Ok(if record.network == attachment.network {
            Verdict::Held(record)
        } else {
            Verdict::OtherNetworksLegacy
        });
    }
    let taken: Vec<usize> = (0..picks.len())
        .filter(|&i| refusal.addresses.get(i).is_some_and(Option::is_some))
        .collect();
    let exact = taken.iter().find_map(|&i| {
        let (ip, kind) = picks[i];
        let read = refusal.addresses[i].as_ref()?;
        (kind != Kind::Dynamic).then(|| (ip, holder_of(&read.value), holder_record(&read.value)))
    });
    Ok(Verdict::Taken {
        picks: taken,
        exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::AllocatedIp;
    use crate::pool::{parse_range_sets, RangeSet};
    use crate::records::{HeldIp, PodRef, RECORD_VERSION};
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    fn sets(ipam: serde_json::Value) -> Vec<RangeSet> {
        parse_range_sets(&ipam).expect("valid")
    }

    fn request(range_sets: Vec<RangeSet>, requested: &[&str]) -> AllocateRequest {
        AllocateRequest {
            attachment: Attachment::new("net", "c1", "eth0"),
            pod: None,
            netns: String::new(),
            range_sets,
            requested: requested.iter().map(|s| ip(s)).collect(),
            requested_kind: Kind::Exact,
        }
    }

    #[test]
    fn plan_puts_each_requested_address_in_its_range_set_or_says_why_not() {
        let dual = || {
            sets(
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/120"}]],
                "exclude": ["10.0.0.9"]}),
            )
        };
        /// Requested addresses; the planned address of each range set, or why not.
        type Case<'a> = (&'a [&'a str], Result<[Option<&'a str>; 2], &'a str>);
        let cases: [Case; 7] = [
            (&[], Ok([None, None])),
            (&["10.0.0.5"], Ok([Some("10.0.0.5"), None])),
            (
                &["fd00::7", "10.0.0.5"],
                Ok([Some("10.0.0.5"), Some("fd00::7")]),
            ),
            (&["10.1.0.5"], Err("outside every subnet")),
            (&["10.0.0.1"], Err("gateway")),
            (&["10.0.0.9"], Err("excluded")),
            (&["10.0.0.5", "10.0.0.6"], Err("also requested")),
        ];
        for (requested, expected) in cases {
            let got = plan(&request(dual(), requested));
            match (got, expected) {
                (Ok(plan), Ok(expected)) => {
                    let got: Vec<Option<IpAddr>> =
                        plan.iter().map(|p| p.as_ref().map(|x| x.1)).collect();
                    let expected: Vec<Option<IpAddr>> =
                        expected.iter().map(|e| e.map(ip)).collect();
                    assert_eq!(got, expected, "{requested:?}");
                }
                (Err(e), Err(why)) => assert!(e.to_string().contains(why), "{requested:?}: {e}"),
                (got, expected) => panic!("{requested:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn already_held_answers_the_held_addresses_but_never_another_than_one_asked_for() {
        let held = Allocation {
            attachment: Attachment::new("net", "c1", "eth0"),
            ips: vec![AllocatedIp {
                ip: ip("10.0.0.5"),
                subnet: "10.0.0.0/24".parse().expect("literal"),
                gateway: ip("10.0.0.1"),
            }],
        };
        let pool = sets(json!({"subnet": "10.0.0.0/24"}));
        for (requested, ok) in [
            (&[][..], true),
            (&["10.0.0.5"][..], true),
            (&["10.0.0.6"][..], false),
        ] {
            let got = already_held(&request(pool.clone(), requested), held.clone());
            assert_eq!(got.is_ok(), ok, "{requested:?}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("already holds 10.0.0.5"), "{e}");
            }
        }
    }

    fn read(value: serde_json::Value, mod_revision: i64) -> Option<Read> {
        Some(Read {
            key: "/k".into(),
            value: value.to_string().into_bytes(),
            mod_revision,
        })
    }

    fn attachment_record(network: &str) -> AttachmentRecord {
        AttachmentRecord {
            version: RECORD_VERSION,
            network: network.into(),
            node: "n1".into(),
            pod: None,
            ips: vec![HeldIp {
                pool: "10.0.0.0_24".into(),
                ip: ip("10.0.0.5"),
                kind: Some(Kind::Dynamic),
            }],
            allocated_at: 7,
            netns: String::new(),
        }
    }

    fn address_record(name: &str, namespace: &str) -> serde_json::Value {
        serde_json::to_value(AllocationRecord {
            version: RECORD_VERSION,
            attachment: Attachment::new("net", "other", "eth0"),
            pod: Some(PodRef {
                namespace: namespace.into(),
                name: name.into(),
                uid: String::new(),
            }),
            node: "n2".into(),
            kind: Kind::Dynamic,
            allocated_at: 1,
        })
        .expect("encodes")
    }

    #[test]
    fn a_refused_commit_is_read_in_the_order_that_decides_it() {
        let mine = Attachment::new("net", "c1", "eth0");
        let held = serde_json::to_value(attachment_record("net")).expect("encodes");
        let other_network = serde_json::to_value(attachment_record("other")).expect("encodes");
        let dynamic = [
            (ip("10.0.0.5"), Kind::Dynamic),
            (ip("fd00::5"), Kind::Dynamic),
        ];
        let exact = [
            (ip("10.0.0.5"), Kind::Dynamic),
            (ip("fd00::5"), Kind::Exact),
        ];
        let began = 100;
        let both_taken = vec![
            read(address_record("a", "ns"), 5),
            read(address_record("b", ""), 6),
        ];
        /// What the case shows, what etcd read, the picks, the verdict.
        type Case<'a> = (&'a str, Refusal, &'a [(IpAddr, Kind)], Verdict);
        let cases: Vec<Case> = vec![
            (
                "the attachment exists: whatever else is read, it holds its addresses",
                Refusal {
                    attachment: read(held.clone(), 90),
                    marker: read(json!({}), 150),
                    addresses: both_taken.clone(),
                    legacy: None,
                },
                &dynamic,
                Verdict::Held(attachment_record("net")),
            ),
            (
                "a marker newer than the ADD's arrival refuses it",
                Refusal {
                    marker: read(json!({}), 101),
                    addresses: vec![None, None],
                    ..Refusal::default()
                },
                &dynamic,
                Verdict::ReleasedMeanwhile { released: 101 },
            ),
            (
                "a marker from before the ADD arrived does not",
                Refusal {
                    marker: read(json!({}), 100),
                    addresses: both_taken.clone(),
                    ..Refusal::default()
                },
                &dynamic,
                Verdict::Taken {
                    picks: vec![0, 1],
                    exact: None,
                },
            ),
            (
                "the earlier layout holds this attachment",
                Refusal {
                    legacy: read(held, 3),
                    addresses: vec![None, None],
                    ..Refusal::default()
                },
                &dynamic,
                Verdict::Held(attachment_record("net")),
            ),
            (
                "the earlier layout holds another network's",
                Refusal {
                    legacy: read(other_network, 3),
                    addresses: vec![None, None],
                    ..Refusal::default()
                },
                &dynamic,
                Verdict::OtherNetworksLegacy,
            ),
            (
                "an exact address held by a container is named",
                Refusal {
                    addresses: both_taken,
                    ..Refusal::default()
                },
                &exact,
                Verdict::Taken {
                    picks: vec![0, 1],
                    exact: Some((
                        ip("fd00::5"),
                        "container b (other/eth0 of network net) on node n2".into(),
                        serde_json::from_value(address_record("b", "")).ok(),
                    )),
                },
            ),
            (
                "nothing explains it: pick again",
                Refusal {
                    addresses: vec![None, None],
                    ..Refusal::default()
                },
                &dynamic,
                Verdict::Taken {
                    picks: vec![],
                    exact: None,
                },
            ),
        ];
        for (what, refusal, picks, expected) in cases {
            let got = read_refusal(&refusal, &mine, picks, began, true).expect(what);
            assert_eq!(got, expected, "{what}");
        }
        // Without the guard on the earlier layout, its record does not decide anything.
        let refusal = Refusal {
            legacy: read(json!("garbage"), 3),
            addresses: vec![None, None],
            ..Refusal::default()
        };
        assert!(matches!(
            read_refusal(&refusal, &mine, &dynamic, began, false),
            Ok(Verdict::Taken { .. })
        ));
        assert!(matches!(
            read_refusal(&refusal, &mine, &dynamic, began, true),
            Err(IpamError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_holder_is_named_as_a_pod_or_a_container() {
        let cases = [
            (
                address_record("db-0", "prod"),
                "pod prod/db-0 (other/eth0 of network net) on node n2",
            ),
            (
                address_record("web", ""),
                "container web (other/eth0 of network net) on node n2",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(holder_of(value.to_string().as_bytes()), expected);
        }
        assert!(holder_of(b"garbage").starts_with("an unreadable record"));
    }
}
