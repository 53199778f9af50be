//! Address arithmetic on a single integer line per family, so that IPv4 and IPv6
//! pools share one implementation of ranges, blocks and bitmaps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address family of a pool. Every address of a pool has the pool's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Number of bits in an address of this family.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The address as an integer.
pub fn to_int(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of `family` whose integer is `n`. `n` must fit the family.
pub fn from_int(family: Family, n: u128) -> IpAddr {
    match family {
        // Truncation cannot happen for values produced inside an IPv4 subnet.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// An inclusive range of addresses of one family, as integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    pub first: u128,
    pub last: u128,
}

impl AddrRange {
    pub fn new(first: u128, last: u128) -> Self {
        AddrRange { first, last }
    }

    pub fn contains(&self, n: u128) -> bool {
        self.first <= n && n <= self.last
    }

    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_round_trips_through_integers() {
        let ip: IpAddr = "10.1.2.3".parse().expect("literal");
        assert_eq!(to_int(ip), 0x0a01_0203);
        assert_eq!(from_int(Family::V4, 0x0a01_0203), ip);
    }

    #[test]
    fn ipv6_round_trips_through_integers() {
        let ip: IpAddr = "fd00::1:2".parse().expect("literal");
        assert_eq!(from_int(Family::V6, to_int(ip)), ip);
    }

    #[test]
    fn ranges_overlap_only_when_they_share_an_address() {
        let a = AddrRange::new(10, 20);
        assert!(a.overlaps(&AddrRange::new(20, 30)));
        assert!(!a.overlaps(&AddrRange::new(21, 30)));
        assert!(a.contains(10) && a.contains(20) && !a.contains(21));
    }
}
