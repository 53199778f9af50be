//! Sticky addresses of StatefulSet pods without a fixed-IP annotation (pure).
//!
//! A pod owned by a StatefulSet is an identity: namespace, StatefulSet, ordinal (the name's
//! trailing `-N`), and on each network its own addresses. Its first ADD on a network gets a
//! dynamic address and creates the identity's [`StickyRecord`] in the same transaction; a
//! re-created pod (new container, new UID, maybe on another node) asks for those addresses
//! exactly (`Kind::Sticky`).
//!
//! Between a DEL and the next ADD nobody frees the addresses: the DEL (and every GC, which
//! release through the same path) moves them, in one transaction guarded by the attachment's
//! revision, to the identity's reservation, a pseudo-attachment ([`reservation`]) on the pseudo
//! node [`RESERVATION_NODE`], whose index no daemon's GC reads. The next ADD moves them from the
//! reservation to its attachment, in one transaction guarded by the reservation's revision.
//! Only the sticky GC (`sticky_gc`) frees them, once the ordinal (scale-down) or the
//! StatefulSet is gone for the grace period.
//!
//! The per-network switch is the ipam key `stickyStatefulSets` (a boolean, default true).

use std::time::Duration;

use crate::annotations::{ordinal_of, PodMeta};
use crate::records::{Attachment, StickyRecord};

/// The ipam config key that turns sticky StatefulSet addresses on or off for a network.
pub const SWITCH: &str = "stickyStatefulSets";

/// The pseudo node whose index lists the reservations: no daemon has this name (node names are
/// DNS subdomains, without `_`), so no node's GC lists them, and `audit` still finds every
/// reservation in the index of the node its record names.
pub const RESERVATION_NODE: &str = "_sticky";

/// The ifname of every reservation.
const RESERVATION_IFNAME: &str = "sticky";

/// Whether the network's ipam config asks for sticky StatefulSet addresses: `stickyStatefulSets`,
/// true when absent. Its type is checked with the other pool keys (a non-boolean is code 7).
pub fn enabled(ipam: &serde_json::Value) -> bool {
    ipam.get(SWITCH)
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true)
}

/// A StatefulSet pod identity on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub network: String,
    pub namespace: String,
    pub stateful_set: String,
    pub ordinal: u32,
    /// The StatefulSet's UID from the pod's owner reference (empty if it had none).
    pub stateful_set_uid: String,
}

impl Identity {
    /// The identity of `pod` on `network`: None unless a StatefulSet controls the pod and its
    /// name is `<statefulset>-<ordinal>`.
    pub fn of_pod(pod: &PodMeta, network: &str) -> Option<Identity> {
        let owner = pod.stateful_set()?;
        let ordinal = ordinal_of(&pod.name)?;
        if pod.name != format!("{}-{ordinal}", owner.name) {
            return None;
        }
        Some(Identity {
            network: network.to_string(),
            namespace: pod.namespace.clone(),
            stateful_set: owner.name.clone(),
            ordinal,
            stateful_set_uid: owner.uid.clone(),
        })
    }

    /// The identity a sticky record is kept for.
    pub fn of_record(record: &StickyRecord) -> Identity {
        Identity {
            network: record.network.clone(),
            namespace: record.namespace.clone(),
            stateful_set: record.stateful_set.clone(),
            ordinal: record.ordinal,
            stateful_set_uid: record.stateful_set_uid.clone(),
        }
    }

    /// The identity of the pod `namespace/name` on `network` whose addresses are sticky: a
    /// StatefulSet pod's name is always `<statefulset>-<ordinal>`.
    pub fn of_pod_name(network: &str, namespace: &str, name: &str) -> Option<Identity> {
        let ordinal = ordinal_of(name)?;
        let (stateful_set, _) = name.rsplit_once('-')?;
        Some(Identity {
            network: network.to_string(),
            namespace: namespace.to_string(),
            stateful_set: stateful_set.to_string(),
            ordinal,
            stateful_set_uid: String::new(),
        })
    }

    /// `namespace/statefulset-ordinal on network`, as logs and reports name it.
    pub fn describe(&self) -> String {
        format!(
            "{}/{}-{} on network {}",
            self.namespace, self.stateful_set, self.ordinal, self.network
        )
    }
}

/// The pseudo-attachment that holds an identity's addresses while no container does:
/// `(network, sticky_<namespace>_<statefulset>_<ordinal>, sticky)`. Namespaces and
/// StatefulSet names have no `_`, so two identities never share one; runtimes' container ids
/// are hex, so no container has one.
pub fn reservation(identity: &Identity) -> Attachment {
    Attachment::new(
        identity.network.clone(),
        format!(
            "sticky_{}_{}_{}",
            identity.namespace, identity.stateful_set, identity.ordinal
        ),
        RESERVATION_IFNAME,
    )
}

/// Whether `attachment` is an identity's reservation.
pub fn is_reservation(attachment: &Attachment) -> bool {
    attachment.ifname == RESERVATION_IFNAME && attachment.container_id.starts_with("sticky_")
}

/// What the API says of the StatefulSet an identity belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatefulSetView {
    pub uid: String,
    /// `spec.replicas` (1 when unset).
    pub replicas: u32,
    /// `spec.ordinals.start` (0 when unset).
    pub start: u32,
}

/// Whether an identity still has its pod's place in its StatefulSet: None when it does, else
/// why not (the StatefulSet is gone or another one, or the ordinal is outside its ordinals).
/// `found` is the API's answer for the StatefulSet's name (None: 404).
pub fn gone_reason(record: &StickyRecord, found: Option<&StatefulSetView>) -> Option<String> {
    let name = format!("StatefulSet {}/{}", record.namespace, record.stateful_set);
    let Some(found) = found else {
        return Some(format!("{name} no longer exists"));
    };
    if !record.stateful_set_uid.is_empty() && found.uid != record.stateful_set_uid {
        return Some(format!(
            "{name} uid {} was deleted and re-created with uid {}",
            record.stateful_set_uid, found.uid
        ));
    }
    let end = u64::from(found.start) + u64::from(found.replicas);
    let ordinal = u64::from(record.ordinal);
    if ordinal < u64::from(found.start) || ordinal >= end {
        return Some(format!(
            "ordinal {} is gone: {name} has {} replicas (ordinals {}..{end})",
            record.ordinal, found.replicas, found.start
        ));
    }
    None
}

/// What the sticky GC does with one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The ordinal exists, and no orphan time is recorded: nothing to do.
    Keep,
    /// The ordinal exists again: clear the recorded orphan time.
    Adopted,
    /// Gone, first seen now: record the orphan time (`reason` says why).
    Orphaned { reason: String },
    /// Gone since the recorded time, for less than the grace: `left` seconds to go.
    Waiting { reason: String, left: u64 },
    /// Gone for the grace period: release the identity and its addresses.
    Release { reason: String },
}

/// The rules for one identity at unix time `now`, given [`gone_reason`]'s answer: a gone
/// identity is released only once it has been seen gone for `grace` (the time is recorded in
/// the record, so a restarted daemon keeps counting); one whose ordinal exists again is kept
/// and its orphan time cleared.
pub fn decide(record: &StickyRecord, gone: Option<String>, now: u64, grace: Duration) -> Verdict {
    match (gone, record.orphaned_since) {
        (None, None) => Verdict::Keep,
        (None, Some(_)) => Verdict::Adopted,
        (Some(reason), None) if grace.is_zero() => Verdict::Release { reason },
        (Some(reason), None) => Verdict::Orphaned { reason },
        (Some(reason), Some(since)) => {
            let age = now.saturating_sub(since);
            if age >= grace.as_secs() {
                Verdict::Release { reason }
            } else {
                Verdict::Waiting {
                    reason,
                    left: grace.as_secs() - age,
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::annotations::Owner;
    use crate::records::{HeldIp, RECORD_VERSION};
    use serde_json::json;

    fn pod(name: &str, owner: Option<(&str, &str)>) -> PodMeta {
        PodMeta {
            namespace: "db".into(),
            name: name.into(),
            uid: "u".into(),
            controller: owner.map(|(kind, name)| Owner {
                api_version: "apps/v1".into(),
                kind: kind.into(),
                name: name.into(),
                uid: "uid-sts".into(),
            }),
            ..PodMeta::default()
        }
    }

    fn record(ordinal: u32, orphaned_since: Option<u64>) -> StickyRecord {
        StickyRecord {
            version: RECORD_VERSION,
            network: "net".into(),
            namespace: "db".into(),
            stateful_set: "web".into(),
            ordinal,
            stateful_set_uid: "uid-sts".into(),
            ips: vec![HeldIp {
                pool: "10.0.0.0_24".into(),
                ip: "10.0.0.5".parse().unwrap(),
                kind: None,
            }],
            since: 1,
            orphaned_since,
        }
    }

    #[test]
    fn the_switch_defaults_to_on() {
        assert!(enabled(&json!({"subnet": "10.0.0.0/24"})));
        assert!(enabled(&json!({"stickyStatefulSets": true})));
        assert!(!enabled(&json!({"stickyStatefulSets": false})));
    }

    #[test]
    fn only_a_statefulset_pod_named_after_its_set_and_ordinal_is_an_identity() {
        let id = Identity::of_pod(&pod("web-2", Some(("StatefulSet", "web"))), "net").unwrap();
        assert_eq!(
            (
                id.stateful_set.as_str(),
                id.ordinal,
                id.stateful_set_uid.as_str()
            ),
            ("web", 2, "uid-sts")
        );
        assert_eq!(id.describe(), "db/web-2 on network net");
        assert_eq!(
            Identity::of_pod_name("net", "db", "web-2").map(|i| (i.stateful_set, i.ordinal)),
            Some(("web".to_string(), 2))
        );
        assert_eq!(Identity::of_pod(&pod("web-2", None), "net"), None);
        assert_eq!(
            Identity::of_pod(&pod("web-2", Some(("ReplicaSet", "web"))), "net"),
            None
        );
        assert_eq!(
            Identity::of_pod(&pod("other-2", Some(("StatefulSet", "web"))), "net"),
            None
        );
        assert_eq!(
            Identity::of_pod(&pod("web", Some(("StatefulSet", "web"))), "net"),
            None
        );
    }

    #[test]
    fn a_reservation_is_a_valid_attachment_of_its_own() {
        let id = Identity::of_pod(&pod("web-2", Some(("StatefulSet", "web.v1"))), "net");
        assert_eq!(id, None, "web-2 is not a pod of web.v1");
        let id =
            Identity::of_pod(&pod("web.v1-2", Some(("StatefulSet", "web.v1"))), "net").unwrap();
        let r = reservation(&id);
        r.validate().unwrap();
        assert_eq!(r, Attachment::new("net", "sticky_db_web.v1_2", "sticky"));
        assert!(is_reservation(&r));
        assert!(!is_reservation(&Attachment::new("net", "abc", "eth0")));
    }

    #[test]
    fn an_identity_is_gone_with_its_statefulset_or_its_ordinal() {
        let view = |uid: &str, replicas: u32, start: u32| StatefulSetView {
            uid: uid.into(),
            replicas,
            start,
        };
        assert_eq!(
            gone_reason(&record(1, None), Some(&view("uid-sts", 2, 0))),
            None
        );
        assert_eq!(
            gone_reason(&record(1, None), None).unwrap(),
            "StatefulSet db/web no longer exists"
        );
        assert_eq!(
            gone_reason(&record(1, None), Some(&view("uid-other", 3, 0))).unwrap(),
            "StatefulSet db/web uid uid-sts was deleted and re-created with uid uid-other"
        );
        assert_eq!(
            gone_reason(&record(2, None), Some(&view("uid-sts", 2, 0))).unwrap(),
            "ordinal 2 is gone: StatefulSet db/web has 2 replicas (ordinals 0..2)"
        );
        assert!(gone_reason(&record(0, None), Some(&view("uid-sts", 0, 0))).is_some());
        // spec.ordinals.start moves the window.
        assert!(gone_reason(&record(1, None), Some(&view("uid-sts", 2, 2))).is_some());
        assert_eq!(
            gone_reason(&record(3, None), Some(&view("uid-sts", 2, 2))),
            None
        );
        assert!(gone_reason(&record(4, None), Some(&view("uid-sts", 2, 2))).is_some());
        // A record without a UID is judged by name and ordinal only.
        let mut no_uid = record(1, None);
        no_uid.stateful_set_uid.clear();
        assert_eq!(gone_reason(&no_uid, Some(&view("anything", 2, 0))), None);
    }

    #[test]
    fn a_gone_identity_is_released_only_after_the_grace_and_adopted_back_before() {
        const GRACE: Duration = Duration::from_secs(60);
        let gone = || Some("gone".to_string());
        assert_eq!(decide(&record(1, None), None, 100, GRACE), Verdict::Keep);
        assert_eq!(
            decide(&record(1, Some(90)), None, 100, GRACE),
            Verdict::Adopted
        );
        assert_eq!(
            decide(&record(1, None), gone(), 100, GRACE),
            Verdict::Orphaned {
                reason: "gone".into()
            }
        );
        assert_eq!(
            decide(&record(1, Some(90)), gone(), 100, GRACE),
            Verdict::Waiting {
                reason: "gone".into(),
                left: 50
            }
        );
        assert_eq!(
            decide(&record(1, Some(40)), gone(), 100, GRACE),
            Verdict::Release {
                reason: "gone".into()
            }
        );
        // Clock skew: an orphan time in the future waits the whole grace.
        assert!(matches!(
            decide(&record(1, Some(200)), gone(), 100, GRACE),
            Verdict::Waiting { left: 60, .. }
        ));
        assert_eq!(
            decide(&record(1, None), gone(), 100, Duration::ZERO),
            Verdict::Release {
                reason: "gone".into()
            }
        );
    }
}
