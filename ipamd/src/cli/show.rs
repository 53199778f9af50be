//! `show NAMESPACE/POD`: everything one pod holds, on every network and every node: the
//! addresses of each attachment whose record names the pod, the sticky addresses its
//! StatefulSet identity keeps, and the blocks auto-assigned to its namespace.
//!
//! Found by a full scan of the prefix (one revision, as `list` and `audit` read it) plus one
//! range read of the sticky records: an operator command, never on the allocation path.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use etcd_client::GetOptions;
use ipnet::IpNet;
use serde::Serialize;

use super::output::Json;
use super::{escaped, scan, Outcome};
use crate::audit::AuditReport;
use crate::pool::cidr_of_id;
use crate::records::{Attachment, HeldIp, Keys, StickyRecord};
use crate::store::prefix_end;
use crate::{IpamError, Kind, StoreConfig};

/// A pod named `namespace/name` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Parses `NAMESPACE/POD`: a namespace that is an RFC 1123 label and a pod name that is an
/// RFC 1123 subdomain, as Kubernetes requires of them. The error names what is wrong.
pub fn parse_pod_name(text: &str) -> Result<PodName, String> {
    let Some((namespace, name)) = text.split_once('/') else {
        return Err(format!(
            "{text:?} is not NAMESPACE/POD (such as default/web-0): it has no '/'"
        ));
    };
    if name.contains('/') {
        return Err(format!(
            "{text:?} is not NAMESPACE/POD (such as default/web-0): it has more than one '/'"
        ));
    }
    if let Some(problem) = rfc1123_problem(namespace, 63, false) {
        return Err(format!("namespace {namespace:?} is not valid: {problem}"));
    }
    if let Some(problem) = rfc1123_problem(name, 253, true) {
        return Err(format!("pod name {name:?} is not valid: {problem}"));
    }
    Ok(PodName {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Why `text` is not a lower-case RFC 1123 label (or, with `dots`, subdomain) of at most `max`
/// characters.
fn rfc1123_problem(text: &str, max: usize, dots: bool) -> Option<String> {
    if text.is_empty() {
        return Some("it is empty".into());
    }
    if text.len() > max {
        return Some(format!("it is longer than {max} characters"));
    }
    let labels: Vec<&str> = match dots {
        true => text.split('.').collect(),
        false => vec![text],
    };
    let allowed = if dots {
        "a-z, 0-9, '-' and '.'"
    } else {
        "a-z, 0-9 and '-'"
    };
    for label in labels {
        if label.is_empty() {
            return Some("it has an empty label (a leading, trailing or doubled '.')".into());
        }
        if !(label.bytes()).all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Some(format!("it contains a character other than {allowed}"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("it starts or ends with '-'".into());
        }
    }
    None
}

/// One address a pod holds through one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAddress {
    #[serde(flatten, serialize_with = "attachment_fields")]
    pub attachment: Attachment,
    pub ip: IpAddr,
    /// The pool's subnet.
    pub pool: String,
    /// How it was chosen, when a record says.
    pub kind: Option<Kind>,
    pub node: String,
    /// The pod UID the record names (empty when the runtime sent none): a pod re-created with
    /// the same name has another.
    pub uid: String,
    /// Whether an attachment record lists the address; false for an address record alone,
    /// which `audit` reports and `release-address` frees.
    pub attachment_record: bool,
}

fn attachment_fields<S: serde::Serializer>(a: &Attachment, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(3))?;
    map.serialize_entry("network", &a.network)?;
    map.serialize_entry("containerId", &a.container_id)?;
    map.serialize_entry("ifname", &a.ifname)?;
    map.end()
}

/// The sticky addresses one StatefulSet identity of the pod keeps on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSticky {
    pub network: String,
    pub stateful_set: String,
    pub ordinal: u32,
    pub ips: Vec<IpAddr>,
    /// The pools' subnets, one per address.
    pub pools: Vec<String>,
    /// Seconds since the Unix epoch since when the sticky GC has seen the identity gone.
    pub orphaned_since: Option<u64>,
}

/// Everything `show` found for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodHoldings {
    pub namespace: String,
    pub name: String,
    /// Sorted by network, container id, ifname and address.
    pub addresses: Vec<PodAddress>,
    pub sticky: Vec<PodSticky>,
    /// Blocks auto-assigned to the pod's namespace (shared by every pod of it).
    pub namespace_blocks: Vec<IpNet>,
}

impl PodHoldings {
    /// The column names of the address rows, tab-separated as the rows are.
    pub const HEADER: &'static str =
        "NETWORK\tCONTAINER\tIFNAME\tADDRESS\tPOOL\tKIND\tNODE\tPOD UID\tRECORD";
    /// The column names of the sticky rows.
    pub const STICKY_HEADER: &'static str =
        "STICKY NETWORK\tSTATEFULSET\tORDINAL\tADDRESSES\tORPHANED SINCE";

    /// Whether the pod holds nothing that `show` looks at.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.sticky.is_empty() && self.namespace_blocks.is_empty()
    }
}

impl Outcome for PodHoldings {
    fn lines(&self) -> Vec<String> {
        let pod = format!("{}/{}", self.namespace, self.name);
        if self.is_empty() {
            return vec![format!(
                "{} holds no address, no sticky address and its namespace no block",
                escaped(&pod)
            )];
        }
        let dash = |s: &str| if s.is_empty() { "-".into() } else { escaped(s) };
        let mut lines = Vec::new();
        if !self.addresses.is_empty() {
            lines.push(Self::HEADER.to_string());
        }
        lines.extend(self.addresses.iter().map(|a| {
            let kind = a.kind.map_or("-".into(), |k| format!("{k:?}"));
            let record = match a.attachment_record {
                true => "attachment",
                false => "address only",
            };
            format!(
                "{}\t{}\t{}\t{}\t{}\t{kind}\t{}\t{}\t{record}",
                escaped(&a.attachment.network),
                escaped(&a.attachment.container_id),
                escaped(&a.attachment.ifname),
                a.ip,
                escaped(&a.pool),
                escaped(&a.node),
                dash(&a.uid),
            )
        }));
        if !self.sticky.is_empty() {
            lines.push(Self::STICKY_HEADER.to_string());
        }
        lines.extend(self.sticky.iter().map(|s| {
            let ips: Vec<String> = s.ips.iter().map(ToString::to_string).collect();
            let orphaned = s.orphaned_since.map_or("-".into(), |t| t.to_string());
            format!(
                "{}\t{}\t{}\t{}\t{orphaned}",
                escaped(&s.network),
                escaped(&s.stateful_set),
                s.ordinal,
                ips.join(",")
            )
        }));
        if !self.namespace_blocks.is_empty() {
            let blocks: Vec<String> = self
                .namespace_blocks
                .iter()
                .map(ToString::to_string)
                .collect();
            lines.push(format!(
                "namespace {} has block(s) {}",
                escaped(&self.namespace),
                blocks.join(",")
            ));
        }
        lines
    }
}

impl Json for PodHoldings {
    fn json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

/// What the scan `report` and the sticky records `sticky` hold for `pod`: every attachment
/// record naming it (by namespace and name, whatever its UID), every address record naming it
/// that no such attachment record lists, its StatefulSet identity's sticky records (a
/// StatefulSet pod is named `<statefulset>-<ordinal>`), and its namespace's blocks.
pub fn pod_holdings(report: &AuditReport, sticky: &[StickyRecord], pod: &PodName) -> PodHoldings {
    let names_pod = |p: &Option<crate::PodRef>| {
        p.as_ref()
            .is_some_and(|p| p.namespace == pod.namespace && p.name == pod.name)
    };
    let mut addresses = Vec::new();
    let mut listed: BTreeSet<(String, IpAddr)> = BTreeSet::new();
    for (attachment, (_, record)) in &report.attachments {
        if !names_pod(&record.pod) {
            continue;
        }
        for HeldIp { pool, ip, kind } in &record.ips {
            listed.insert((pool.clone(), *ip));
            let by_address = report.allocations.get(&(pool.clone(), *ip));
            addresses.push(PodAddress {
                attachment: attachment.clone(),
                ip: *ip,
                pool: cidr_of_id(pool),
                kind: by_address.map(|r| r.kind).or(*kind),
                node: record.node.clone(),
                uid: record
                    .pod
                    .as_ref()
                    .map(|p| p.uid.clone())
                    .unwrap_or_default(),
                attachment_record: true,
            });
        }
    }
    for ((pool, ip), record) in &report.allocations {
        if !names_pod(&record.pod) || listed.contains(&(pool.clone(), *ip)) {
            continue;
        }
        addresses.push(PodAddress {
            attachment: record.attachment.clone(),
            ip: *ip,
            pool: cidr_of_id(pool),
            kind: Some(record.kind),
            node: record.node.clone(),
            uid: record
                .pod
                .as_ref()
                .map(|p| p.uid.clone())
                .unwrap_or_default(),
            attachment_record: false,
        });
    }
    addresses.sort_by(|a, b| (&a.attachment, a.ip).cmp(&(&b.attachment, b.ip)));
    let mut sticky: Vec<PodSticky> = (sticky.iter())
        .filter(|s| {
            s.namespace == pod.namespace && format!("{}-{}", s.stateful_set, s.ordinal) == pod.name
        })
        .map(|s| PodSticky {
            network: s.network.clone(),
            stateful_set: s.stateful_set.clone(),
            ordinal: s.ordinal,
            ips: s.ips.iter().map(|h| h.ip).collect(),
            pools: s.ips.iter().map(|h| cidr_of_id(&h.pool)).collect(),
            orphaned_since: s.orphaned_since,
        })
        .collect();
    sticky.sort_by(|a, b| (&a.network, &a.stateful_set).cmp(&(&b.network, &b.stateful_set)));
    PodHoldings {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        addresses,
        sticky,
        namespace_blocks: (report.namespaces.get(&pod.namespace).cloned()).unwrap_or_default(),
    }
}

/// Everything `pod` holds: a full scan of the prefix, then the valid sticky records (one that
/// cannot be read or does not validate is skipped; `audit` names it).
pub async fn show(config: &StoreConfig, pod: &PodName) -> Result<PodHoldings, IpamError> {
    let (store, keys, report) = scan(config).await?;
    let sticky = sticky_records(&store, &keys).await?;
    Ok(pod_holdings(&report, &sticky, pod))
}

async fn sticky_records(
    store: &crate::store::Store,
    keys: &Keys,
) -> Result<Vec<StickyRecord>, IpamError> {
    let prefix = keys.sticky_all();
    let options = GetOptions::new().with_range(prefix_end(prefix.as_bytes()));
    let resp = store
        .get("list sticky identities", &prefix, Some(options))
        .await?;
    Ok((resp.kvs().iter())
        .filter_map(|kv| {
            let key = keys.parse(kv.key_str().ok()?)?;
            let record: StickyRecord = serde_json::from_slice(kv.value()).ok()?;
            record.validate(&key).ok()?;
            Some(record)
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::pool::pool_id;
    use crate::records::{AllocationRecord, AttachmentRecord, RECORD_VERSION};
    use crate::PodRef;

    fn pod_ref(namespace: &str, name: &str, uid: &str) -> Option<PodRef> {
        Some(PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        })
    }

    /// `report` with `attachment` of `pod` on `node` holding `ip` of 10.0.0.0/24: its
    /// attachment record (when `listed`) and its address record.
    fn hold(
        report: &mut AuditReport,
        attachment: &Attachment,
        pod: Option<PodRef>,
        ip: &str,
        listed: bool,
    ) {
        let pool = pool_id(&"10.0.0.0/24".parse().unwrap());
        let ip: IpAddr = ip.parse().unwrap();
        if listed {
            let record = AttachmentRecord {
                version: RECORD_VERSION,
                network: attachment.network.clone(),
                node: "node-a".into(),
                pod: pod.clone(),
                ips: vec![HeldIp {
                    pool: pool.clone(),
                    ip,
                    kind: None,
                }],
                allocated_at: 0,
                netns: String::new(),
            };
            report
                .attachments
                .insert(attachment.clone(), ("key".into(), record));
        }
        let record = AllocationRecord {
            version: RECORD_VERSION,
            attachment: attachment.clone(),
            pod,
            node: "node-a".into(),
            kind: Kind::Fixed,
            allocated_at: 0,
        };
        report.allocations.insert((pool, ip), record);
    }

    fn sticky(stateful_set: &str, ordinal: u32) -> StickyRecord {
        StickyRecord {
            version: RECORD_VERSION,
            network: "net".into(),
            namespace: "prod".into(),
            stateful_set: stateful_set.into(),
            ordinal,
            stateful_set_uid: String::new(),
            ips: vec![HeldIp {
                pool: "10.0.0.0_24".into(),
                ip: "10.0.0.9".parse().unwrap(),
                kind: None,
            }],
            since: 1,
            orphaned_since: Some(5),
        }
    }

    #[test]
    fn a_pod_name_must_be_namespace_slash_pod_each_valid_for_kubernetes() {
        let web = parse_pod_name("prod/web-0.a").unwrap();
        assert_eq!(
            (web.namespace.as_str(), web.name.as_str()),
            ("prod", "web-0.a")
        );
        assert_eq!(web.to_string(), "prod/web-0.a");
        for (text, why) in [
            ("web-0", "it has no '/'"),
            ("a/b/c", "more than one '/'"),
            ("/web", "namespace \"\" is not valid: it is empty"),
            ("a.b/web", "namespace \"a.b\" is not valid: it contains a character other than a-z, 0-9 and '-'"),
            ("prod/-web", "pod name \"-web\" is not valid: it starts or ends with '-'"),
            ("prod/web..0", "pod name \"web..0\" is not valid: it has an empty label"),
            ("prod/Web", "pod name \"Web\" is not valid"),
            ("prod/web\n", "pod name \"web\\n\" is not valid"),
        ] {
            let error = parse_pod_name(text).unwrap_err();
            assert!(error.contains(why), "{text:?}: {error}");
        }
        assert!(parse_pod_name(&format!("{}/web", "n".repeat(64))).is_err());
        assert!(parse_pod_name(&format!("prod/{}", "w".repeat(254))).is_err());
        assert!(parse_pod_name(&format!("{}/{}", "n".repeat(63), "w".repeat(63))).is_ok());
    }

    #[test]
    fn holdings_are_every_record_naming_the_pod_whatever_its_uid_and_no_other() {
        let mut report = AuditReport::default();
        let old = Attachment::new("net", "old", "eth0");
        let new = Attachment::new("net", "new", "eth0");
        let orphan = Attachment::new("other", "gone", "net1");
        hold(
            &mut report,
            &old,
            pod_ref("prod", "web-1", "u-old"),
            "10.0.0.3",
            true,
        );
        hold(
            &mut report,
            &new,
            pod_ref("prod", "web-1", "u-new"),
            "10.0.0.4",
            true,
        );
        hold(
            &mut report,
            &orphan,
            pod_ref("prod", "web-1", "u-old"),
            "10.0.0.5",
            false,
        );
        let same_name = Attachment::new("net", "dev", "eth0");
        hold(
            &mut report,
            &same_name,
            pod_ref("dev", "web-1", "u"),
            "10.0.0.6",
            true,
        );
        let no_pod = Attachment::new("net", "anon", "eth0");
        hold(&mut report, &no_pod, None, "10.0.0.7", true);
        report
            .namespaces
            .insert("prod".into(), vec!["10.1.0.0/26".parse().unwrap()]);
        let records = [sticky("web", 1), sticky("web", 10), sticky("we", 11)];
        let pod = parse_pod_name("prod/web-1").unwrap();

        let held = pod_holdings(&report, &records, &pod);
        let rows: Vec<(&str, String, &str, bool, Option<Kind>)> = (held.addresses.iter())
            .map(|a| {
                let (c, ip) = (a.attachment.container_id.as_str(), a.ip.to_string());
                (c, ip, a.uid.as_str(), a.attachment_record, a.kind)
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("new", "10.0.0.4".into(), "u-new", true, Some(Kind::Fixed)),
                ("old", "10.0.0.3".into(), "u-old", true, Some(Kind::Fixed)),
                ("gone", "10.0.0.5".into(), "u-old", false, Some(Kind::Fixed)),
            ]
        );
        assert_eq!(held.addresses[0].pool, "10.0.0.0/24");
        let sticky: Vec<(&str, u32)> = (held.sticky.iter())
            .map(|s| (s.stateful_set.as_str(), s.ordinal))
            .collect();
        assert_eq!(sticky, vec![("web", 1)], "web-10 and we-11 are other pods");
        assert_eq!(held.sticky[0].orphaned_since, Some(5));
        assert_eq!(held.namespace_blocks.len(), 1);
        let lines = held.lines();
        assert_eq!(lines[0], PodHoldings::HEADER);
        assert_eq!(
            lines[3],
            "other\tgone\tnet1\t10.0.0.5\t10.0.0.0/24\tFixed\tnode-a\tu-old\taddress only"
        );
        assert_eq!(lines[4], PodHoldings::STICKY_HEADER);
        assert_eq!(lines[5], "net\tweb\t1\t10.0.0.9\t5");
        assert_eq!(lines[6], "namespace prod has block(s) 10.1.0.0/26");
        assert_eq!(lines.len(), 7);

        let nothing = pod_holdings(&report, &records, &parse_pod_name("apps/db-0").unwrap());
        assert!(nothing.is_empty());
        assert_eq!(
            nothing.lines(),
            vec!["apps/db-0 holds no address, no sticky address and its namespace no block"]
        );
    }

    #[test]
    fn a_container_id_with_a_newline_is_escaped_in_the_table_and_raw_in_the_json() {
        let mut report = AuditReport::default();
        let odd = Attachment::new("net", "c\n1", "eth0");
        hold(
            &mut report,
            &odd,
            pod_ref("prod", "web-1", ""),
            "10.0.0.3",
            true,
        );
        let held = pod_holdings(&report, &[], &parse_pod_name("prod/web-1").unwrap());
        let lines = held.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].starts_with(r"net	c\n1	eth0	"), "{lines:?}");
        assert!(lines[1].contains("\t-\tattachment"), "no uid: {lines:?}");
        let doc: serde_json::Value = serde_json::from_str(&held.json().unwrap()).unwrap();
        assert_eq!(doc["addresses"][0]["containerId"], "c\n1");
        assert_eq!(doc["addresses"][0]["uid"], "");
    }
}
