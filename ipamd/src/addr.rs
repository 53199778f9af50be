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

/// The address of `family` whose integer is `n`. An `n` too large for IPv4 (only an invalid
/// pool can produce one) gives 255.255.255.255, which no pool may hold, rather than wrapping
/// onto an address that some pool does hold.
pub fn from_int(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
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

    /// Number of addresses in the range: 0 when `last < first`, saturating at `u128::MAX` for
    /// the whole IPv6 line.
    pub fn len(&self) -> u128 {
        if self.last < self.first {
            0
        } else {
            (self.last - self.first).saturating_add(1)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }
}

/// Puts `ranges` in normal form: empty (inverted) ranges dropped, sorted by first address,
/// and ranges that overlap or touch merged, so that one set of addresses has one spelling.
pub fn merge_ranges(ranges: &mut Vec<AddrRange>) {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_unstable_by_key(|r| (r.first, r.last));
    let mut merged: Vec<AddrRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(prev) if r.first <= prev.last.saturating_add(1) => {
                prev.last = prev.last.max(r.last);
            }
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

/// The addresses of `from` that are not in `remove`; both in normal form (see
/// [`merge_ranges`]), and so is the result. Linear in the two lengths.
pub fn subtract_ranges(from: &[AddrRange], remove: &[AddrRange]) -> Vec<AddrRange> {
    let mut out = Vec::with_capacity(from.len());
    let mut k = 0;
    for r in from {
        let mut first = r.first;
        while k < remove.len() && remove[k].last < first {
            k += 1;
        }
        let mut j = k;
        let mut done = false;
        while j < remove.len() && remove[j].first <= r.last {
            let cut = remove[j];
            if cut.first > first {
                out.push(AddrRange::new(first, cut.first - 1));
            }
            match cut.last.checked_add(1) {
                Some(next) if next <= r.last => first = first.max(next),
                _ => {
                    done = true;
                    break;
                }
            }
            j += 1;
        }
        if !done {
            out.push(AddrRange::new(first, r.last));
        }
    }
    out
}

/// Whether `n` is in one of `ranges`, which are in normal form: a binary search.
pub fn sorted_contains(ranges: &[AddrRange], n: u128) -> bool {
    let i = ranges.partition_point(|r| r.last < n);
    ranges.get(i).is_some_and(|r| r.first <= n)
}

/// Number of addresses in `ranges`, saturating.
pub fn total_len(ranges: &[AddrRange]) -> u128 {
    ranges
        .iter()
        .fold(0u128, |acc, r| acc.saturating_add(r.len()))
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

    #[test]
    fn an_ipv4_integer_out_of_range_saturates_instead_of_wrapping() {
        assert_eq!(from_int(Family::V4, 1 << 32).to_string(), "255.255.255.255");
        assert_eq!(
            from_int(Family::V4, u128::MAX).to_string(),
            "255.255.255.255"
        );
    }

    #[test]
    fn lengths_never_overflow_or_underflow() {
        assert_eq!(AddrRange::new(5, 4).len(), 0);
        assert_eq!(AddrRange::new(0, u128::MAX).len(), u128::MAX);
        assert_eq!(AddrRange::new(7, 7).len(), 1);
        assert_eq!(
            total_len(&[AddrRange::new(0, u128::MAX), AddrRange::new(0, 0)]),
            u128::MAX
        );
    }

    #[test]
    fn merging_gives_one_spelling_for_one_set_of_addresses() {
        let mut a = vec![
            AddrRange::new(60, 60),
            AddrRange::new(50, 50),
            AddrRange::new(50, 50),
            AddrRange::new(51, 55),
            AddrRange::new(9, 3),
            AddrRange::new(u128::MAX, u128::MAX),
            AddrRange::new(u128::MAX - 1, u128::MAX),
        ];
        merge_ranges(&mut a);
        assert_eq!(
            a,
            vec![
                AddrRange::new(50, 55),
                AddrRange::new(60, 60),
                AddrRange::new(u128::MAX - 1, u128::MAX)
            ]
        );
        let once = a.clone();
        merge_ranges(&mut a);
        assert_eq!(a, once, "idempotent");
    }

    #[test]
    fn subtraction_matches_a_walk() {
        let from = vec![
            AddrRange::new(0, 20),
            AddrRange::new(30, 40),
            AddrRange::new(50, 60),
        ];
        let remove = vec![
            AddrRange::new(0, 0),
            AddrRange::new(5, 7),
            AddrRange::new(18, 32),
            AddrRange::new(40, 55),
            AddrRange::new(70, 80),
        ];
        let left = subtract_ranges(&from, &remove);
        let walked: Vec<u128> = (0..100)
            .filter(|&n| {
                from.iter().any(|r| r.contains(n)) && !remove.iter().any(|r| r.contains(n))
            })
            .collect();
        let got: Vec<u128> = (0..100).filter(|&n| sorted_contains(&left, n)).collect();
        assert_eq!(got, walked);
        assert_eq!(total_len(&left), walked.len() as u128);
        let whole = subtract_ranges(
            &[AddrRange::new(0, u128::MAX)],
            &[AddrRange::new(u128::MAX, u128::MAX)],
        );
        assert_eq!(whole, vec![AddrRange::new(0, u128::MAX - 1)]);
        assert!(subtract_ranges(&from, &[AddrRange::new(0, u128::MAX)]).is_empty());
    }
}
