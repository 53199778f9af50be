//! The NIC records in etcd: `<prefix>/nodes/<node>/nics/<nic-id>`, one per QingCloud NIC this
//! node created, from the moment the API named it until it is deleted. Validated on read like
//! every other record; one that does not validate is skipped and named, never acted on.
//!
//! A NIC's address is held in the pool like any pod's, by an attachment of the network
//! [`NIC_NETWORK`] whose container id is the NIC's [`NicRecord::holder`] token: it is committed
//! before `CreateNics` asks for it and released only after the NIC is deleted, so no address
//! is ever on a NIC without being held in etcd. A pod leases the NIC (and so its address)
//! through [`NicRecord::lease`].

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::records::{Attachment, PodRef};

/// The layout version of [`NicRecord`].
pub const NIC_RECORD_VERSION: u32 = 1;

/// The network name of the attachments that hold NIC addresses.
pub const NIC_NETWORK: &str = "hostnic-nic";

/// The ifname of those attachments.
pub const NIC_HOLDER_IFNAME: &str = "nic0";

/// Where a NIC is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicState {
    /// Created; `AttachNics` asked for or about to be.
    Attaching,
    /// Attached and its link seen in the host namespace; in the warm pool.
    Ready,
    /// Leased to a pod's attachment.
    Leased,
}

/// A pod attachment's lease of a NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicLeaseRecord {
    pub attachment: Attachment,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// `CNI_NETNS` of the ADD.
    #[serde(default)]
    pub netns: String,
}

/// One NIC of this node, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRecord {
    pub version: u32,
    /// The NIC id: its MAC address, lower-case.
    pub nic_id: String,
    pub vxnet: String,
    pub address: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The container id of the [`NIC_NETWORK`] attachment holding the address.
    pub holder: String,
    pub state: NicState,
    /// The link's name in the host namespace once attached.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_link: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<NicLeaseRecord>,
    pub created_at: u64,
}

impl NicRecord {
    /// The attachment holding this NIC's address.
    pub fn holder_attachment(&self) -> Attachment {
        holder_attachment(&self.holder)
    }

    /// Decodes and validates a stored value; the reason names what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let record: NicRecord =
            serde_json::from_slice(bytes).map_err(|e| format!("not a NIC record: {e}"))?;
        record.validate()?;
        Ok(record)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a NIC record serialises")
    }

    /// The rules every stored record obeys.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != NIC_RECORD_VERSION {
            return Err(format!(
                "version {} is not {NIC_RECORD_VERSION}",
                self.version
            ));
        }
        if !is_nic_id(&self.nic_id) {
            return Err(format!("nic_id {:?} is not a lower-case MAC", self.nic_id));
        }
        if !self.subnet.contains(&self.address) {
            return Err(format!(
                "address {} is outside subnet {}",
                self.address, self.subnet
            ));
        }
        if !self.subnet.contains(&self.gateway) {
            return Err(format!(
                "gateway {} is outside subnet {}",
                self.gateway, self.subnet
            ));
        }
        self.holder_attachment()
            .validate()
            .map_err(|e| format!("holder: {e}"))?;
        match (&self.state, &self.lease) {
            (NicState::Leased, None) => Err("state leased without a lease".into()),
            (NicState::Attaching | NicState::Ready, Some(_)) => {
                Err(format!("state {:?} with a lease", self.state))
            }
            (NicState::Leased, Some(lease)) => lease
                .attachment
                .validate()
                .map_err(|e| format!("lease: {e}")),
            _ => Ok(()),
        }
    }

    /// The address with the vxnet's prefix length.
    pub fn address_cidr(&self) -> String {
        format!("{}/{}", self.address, self.subnet.prefix_len())
    }
}

/// The attachment of network [`NIC_NETWORK`] whose container id is `holder`.
pub fn holder_attachment(holder: &str) -> Attachment {
    Attachment::new(NIC_NETWORK, holder, NIC_HOLDER_IFNAME)
}

/// Whether `id` is a NIC id as the API writes them: a lower-case colon-separated MAC.
pub fn is_nic_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The prefix of this node's NIC records.
pub fn node_nics_prefix(prefix: &str, node: &str) -> String {
    format!("{}/nodes/{node}/nics/", prefix.trim_end_matches('/'))
}

/// Whether `key` is a NIC record's key (`<prefix>/nodes/<node>/nics/<nic-id>`).
pub fn is_nic_key(prefix: &str, key: &str) -> bool {
    let Some(rest) = key
        .strip_prefix(prefix.trim_end_matches('/'))
        .and_then(|r| r.strip_prefix("/nodes/"))
    else {
        return false;
    };
    matches!(
        rest.split('/').collect::<Vec<_>>().as_slice(),
        [_, "nics", _]
    )
}

/// The key of one NIC record.
pub fn nic_key(prefix: &str, node: &str, nic_id: &str) -> String {
    format!("{}{nic_id}", node_nics_prefix(prefix, node))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn record() -> NicRecord {
        NicRecord {
            version: 1,
            nic_id: "52:54:9e:12:34:56".into(),
            vxnet: "vxnet-abc1234".into(),
            address: "172.16.3.9".parse().unwrap(),
            subnet: "172.16.3.0/24".parse().unwrap(),
            gateway: "172.16.3.1".parse().unwrap(),
            holder: "nic-0123456789abcdef".into(),
            state: NicState::Ready,
            host_link: "eth3".into(),
            lease: None,
            created_at: 1,
        }
    }

    #[test]
    fn a_record_reads_back_and_bad_ones_are_refused_naming_the_problem() {
        let r = record();
        assert_eq!(NicRecord::decode(r.encode().as_bytes()).unwrap(), r);
        let lease = NicLeaseRecord {
            attachment: Attachment::new("hostnic", "c1", "eth0"),
            pod: None,
            netns: "/run/netns/x".into(),
        };
        let mut leased = record();
        leased.state = NicState::Leased;
        leased.lease = Some(lease.clone());
        assert_eq!(
            NicRecord::decode(leased.encode().as_bytes()).unwrap(),
            leased
        );

        type Change = Box<dyn Fn(&mut NicRecord)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|r| r.version = 2), "version 2"),
            (
                Box::new(|r| r.nic_id = "52:54:9E:12:34:56".into()),
                "nic_id",
            ),
            (Box::new(|r| r.nic_id = "eth0".into()), "nic_id"),
            (
                Box::new(|r| r.address = "10.0.0.1".parse().unwrap()),
                "outside subnet",
            ),
            (
                Box::new(|r| r.gateway = "10.0.0.1".parse().unwrap()),
                "gateway",
            ),
            (Box::new(|r| r.holder = "a/b".into()), "holder"),
            (Box::new(|r| r.state = NicState::Leased), "without a lease"),
            (
                Box::new(move |r| r.lease = Some(lease.clone())),
                "with a lease",
            ),
        ];
        for (change, reason) in cases {
            let mut r = record();
            change(&mut r);
            let e = NicRecord::decode(r.encode().as_bytes()).unwrap_err();
            assert!(e.contains(reason), "{e:?} should say {reason:?}");
        }
        assert!(NicRecord::decode(b"{}")
            .unwrap_err()
            .contains("not a NIC record"));
    }

    #[test]
    fn keys_are_under_the_node() {
        assert_eq!(
            nic_key("/hostnic/ipam/v1/", "n1", "52:54:9e:12:34:56"),
            "/hostnic/ipam/v1/nodes/n1/nics/52:54:9e:12:34:56"
        );
        assert!(is_nic_key("/p", "/p/nodes/n1/nics/52:54:9e:12:34:56"));
        assert!(!is_nic_key("/p", "/p/nodes/n1/attachments/net/c/eth0"));
        assert!(!is_nic_key("/p", "/q/nodes/n1/nics/x"));
    }
}
