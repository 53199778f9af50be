//! The etcd key ranges that hold the address records of one block.
//!
//! An address record is stored at the key `<pool prefix><dotted address>`, for example
//! `/hostnic/ipam/v1/pools/10.0.0.0_16/ips/10.0.1.17`. etcd orders keys as byte strings, so the
//! addresses of a CIDR block are not one contiguous key range: `10.0.1.100` sorts before
//! `10.0.1.64`, and `10.0.1.7` sorts between `10.0.1.69` and `10.0.1.70`. A daemon that watches
//! the addresses of one block opens one range watch per range returned by [`block_key_ranges`].
//!
//! The ranges are exact for address keys and as few as possible: keys that are not the dotted
//! form of an address (such as `10.0.1.300` or `10.0.01.5`) are never written, so a range may
//! cover them, which lets every run of block addresses that are adjacent in key order share one
//! range.

use ipnet::Ipv4Net;

/// The key ranges `[start, end)`, in key order and disjoint, that together hold the address
/// key `prefix + <dotted address>` of every address of `block` and of no other IPv4 address.
///
/// `block` is taken as its network (`block.trunc()`). The octets fixed by the prefix length form
/// a fixed string; the first octet that is not fully fixed contributes one range per run of its
/// allowed values that are adjacent in key order; the octets after it are free, so each run is a
/// prefix range. An octet-aligned block (`/8`, `/16`, `/24`) and a `/32` give one range.
pub fn block_key_ranges(prefix: &str, block: Ipv4Net) -> Vec<(Vec<u8>, Vec<u8>)> {
    let block = block.trunc();
    let octets = block.network().octets();
    let fixed = usize::from(block.prefix_len() / 8);

    // The key up to and including the fixed octets, each followed by its dot.
    let mut stem = prefix.as_bytes().to_vec();
    for octet in &octets[..fixed.min(3)] {
        stem.extend_from_slice(format!("{octet}.").as_bytes());
    }

    if fixed == 4 {
        // One address: its key, up to the key's immediate successor (the key followed by a
        // zero byte).
        let mut start = stem;
        start.extend_from_slice(octets[3].to_string().as_bytes());
        let mut end = start.clone();
        end.push(0);
        return vec![(start, end)];
    }

    let free_bits = 8 - u32::from(block.prefix_len() % 8);
    if free_bits == 8 && fixed > 0 {
        // Every value of the next octet is allowed: all keys that start with the stem, which
        // ends with a dot. The end replaces that dot with '/', the byte after '.'.
        let mut end = stem.clone();
        end.pop();
        end.push(b'/');
        return vec![(stem, end)];
    }

    // The values the partially fixed octet may take.
    let low = u32::from(octets[fixed]);
    let high = low + (1 << free_bits) - 1;
    let allowed = |value: u8| (low..=high).contains(&u32::from(value));
    let last_octet = fixed == 3;

    // All values of an octet in key order. '.' sorts before every digit, so the strings
    // "<v>." sort in the same order as the strings "<v>".
    let mut values: Vec<u8> = (0..=255).collect();
    values.sort_by_key(|value| value.to_string());

    let mut ranges = Vec::new();
    let mut run: Option<(u8, u8)> = None;
    for &value in &values {
        if allowed(value) {
            run = Some(run.map_or((value, value), |(first, _)| (first, value)));
        } else if let Some((first, last)) = run.take() {
            ranges.push(run_range(&stem, first, last, last_octet));
        }
    }
    if let Some((first, last)) = run {
        ranges.push(run_range(&stem, first, last, last_octet));
    }
    ranges
}

/// The key range of a run of values `first..=last` (adjacent in key order) of the octet that
/// follows `stem`.
///
/// For the last octet the range runs from the key of `first` to just after the key of `last`
/// (that key followed by a zero byte). For an earlier octet the later octets are free, so the
/// range runs from `<first>.` to `<last>/`, which covers every key that starts with `<v>.` for
/// a value `v` of the run and no key of another value.
fn run_range(stem: &[u8], first: u8, last: u8, last_octet: bool) -> (Vec<u8>, Vec<u8>) {
    let mut start = stem.to_vec();
    let mut end = stem.to_vec();
    start.extend_from_slice(first.to_string().as_bytes());
    end.extend_from_slice(last.to_string().as_bytes());
    if last_octet {
        end.push(0);
    } else {
        start.push(b'.');
        end.push(b'/');
    }
    (start, end)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    const PREFIX: &str = "/hostnic/ipam/v1/pools/10.7.0.0_16/ips/";

    fn key(addr: Ipv4Addr) -> Vec<u8> {
        format!("{PREFIX}{addr}").into_bytes()
    }

    fn net(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    fn in_ranges(ranges: &[(Vec<u8>, Vec<u8>)], key: &[u8]) -> bool {
        ranges
            .iter()
            .any(|(start, end)| start.as_slice() <= key && key < end.as_slice())
    }

    fn assert_sorted_and_disjoint(ranges: &[(Vec<u8>, Vec<u8>)]) {
        assert!(!ranges.is_empty());
        for (start, end) in ranges {
            assert!(start < end, "empty range {start:?}..{end:?}");
        }
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "overlap: {pair:?}");
        }
    }

    /// Every address of 10.7.0.0/16 and addresses just outside it, checked against blocks of
    /// every length from /16 to /32 at several positions.
    #[test]
    fn exhaustive_over_one_slash_16() {
        let outside = [
            "10.6.255.255",
            "10.8.0.0",
            "10.70.0.1",
            "10.70.0.0",
            "10.71.1.64",
            "10.79.255.255",
            "10.75.4.0",
            "10.0.7.0",
            "10.1.7.64",
            "1.0.7.0",
            "100.7.0.0",
            "10.255.7.1",
            "10.6.0.0",
            "10.8.255.255",
        ];
        // Sorted once: the addresses of each range are then one slice found by binary search.
        let mut keys: Vec<(Vec<u8>, Ipv4Addr)> = (0..=u16::MAX)
            .map(|low| Ipv4Addr::from(0x0a07_0000 | u32::from(low)))
            .chain(outside.iter().map(|text| text.parse().unwrap()))
            .map(|addr| (key(addr), addr))
            .collect();
        keys.sort();

        let bases = [
            "10.7.0.0",
            "10.7.1.64",
            "10.7.1.128",
            "10.7.1.192",
            "10.7.4.0",
            "10.7.128.0",
            "10.7.99.99",
            "10.7.200.250",
            "10.7.255.255",
        ];
        let mut blocks: Vec<Ipv4Net> = bases
            .iter()
            .flat_map(|base| {
                (16..=32).map(move |len| Ipv4Net::new(base.parse().unwrap(), len).unwrap().trunc())
            })
            .chain(["10.7.4.0/22", "10.7.0.0/17", "10.7.128.0/17"].map(net))
            .collect();
        blocks.sort();
        blocks.dedup();

        let mut covered = vec![false; keys.len()];
        for block in blocks {
            let ranges = block_key_ranges(PREFIX, block);
            assert_sorted_and_disjoint(&ranges);
            covered.fill(false);
            for (start, end) in &ranges {
                let from = keys.partition_point(|(key, _)| key < start);
                let to = keys.partition_point(|(key, _)| key < end);
                covered[from..to].fill(true);
            }
            for ((key, addr), covered) in keys.iter().zip(&covered) {
                assert_eq!(
                    *covered,
                    block.contains(addr),
                    "{block}: {}",
                    String::from_utf8_lossy(key)
                );
            }
            // As few ranges as possible: one per run of members among the sorted keys. Any
            // address key between two member keys starts with "10.7." and so is in `keys`.
            let runs = covered
                .iter()
                .zip(std::iter::once(&false).chain(&covered))
                .filter(|(this, previous)| **this && !**previous)
                .count();
            assert_eq!(ranges.len(), runs, "{block}");
        }
    }

    #[test]
    fn range_counts() {
        let count = |text: &str| block_key_ranges(PREFIX, net(text)).len();
        assert_eq!(count("10.7.1.0/24"), 1);
        assert_eq!(count("10.7.0.0/16"), 1);
        assert_eq!(count("10.0.0.0/8"), 1);
        assert_eq!(count("10.7.1.17/32"), 1);
        assert_eq!(count("10.7.1.64/26"), 7);
        // 0-10, 11, ..., 19, 2-20, 21, ..., 25, 26-63, 7, 8, 9.
        assert_eq!(count("10.7.1.0/26"), 20);
        assert_eq!(count("10.7.1.128/26"), 8);
        assert_eq!(count("10.7.1.192/26"), 7);
        assert_eq!(count("10.7.1.0/28"), 14);
        // 10.7.40.x sorts between 10.7.4.x and 10.7.5.x.
        assert_eq!(count("10.7.4.0/22"), 4);
    }

    #[test]
    fn octet_aligned_block_is_one_prefix_range() {
        let ranges = block_key_ranges(PREFIX, net("10.7.1.0/24"));
        assert_eq!(
            ranges,
            vec![(
                format!("{PREFIX}10.7.1.").into_bytes(),
                format!("{PREFIX}10.7.1/").into_bytes()
            )]
        );
        // The network is used: host bits of the block are ignored.
        assert_eq!(block_key_ranges(PREFIX, net("10.7.1.99/24")), ranges);
    }

    #[test]
    fn slash_26_runs_in_key_order() {
        let ranges = block_key_ranges(PREFIX, net("10.7.1.64/26"));
        let runs: Vec<(String, String)> = ranges
            .iter()
            .map(|(start, end)| {
                let text = |bytes: &[u8]| {
                    String::from_utf8(bytes[PREFIX.len()..].to_vec())
                        .unwrap()
                        .trim_end_matches('\0')
                        .to_string()
                };
                (text(start), text(end))
            })
            .collect();
        let expected = [
            ("100", "109"),
            ("110", "119"),
            ("120", "127"),
            ("64", "69"),
            ("70", "79"),
            ("80", "89"),
            ("90", "99"),
        ]
        .map(|(first, last)| (format!("10.7.1.{first}"), format!("10.7.1.{last}")));
        assert_eq!(runs, expected);
    }

    #[test]
    fn whole_address_space() {
        let ranges = block_key_ranges(PREFIX, net("0.0.0.0/0"));
        assert_eq!(ranges.len(), 1);
        for addr in [
            "0.0.0.0",
            "9.9.9.9",
            "99.255.0.1",
            "255.255.255.255",
            "100.0.0.0",
        ] {
            assert!(in_ranges(&ranges, &key(addr.parse().unwrap())), "{addr}");
        }
    }

    fn block_and_addresses() -> impl Strategy<Value = (Ipv4Net, Vec<Ipv4Addr>)> {
        (any::<u32>(), 8u8..=32).prop_flat_map(|(base, len)| {
            let block = Ipv4Net::new(Ipv4Addr::from(base), len).unwrap().trunc();
            let network = u32::from(block.network());
            let broadcast = u32::from(block.broadcast());
            let size = u64::from(broadcast - network) + 1;
            let edges = [
                network,
                broadcast,
                network.wrapping_sub(1),
                broadcast.wrapping_add(1),
            ];
            let inside = (0..size).prop_map(move |offset| network + offset as u32);
            let addresses = prop::collection::vec(prop_oneof![any::<u32>(), inside], 1..32)
                .prop_map(move |mut addresses| {
                    addresses.extend(edges);
                    addresses.into_iter().map(Ipv4Addr::from).collect()
                });
            (Just(block), addresses)
        })
    }

    proptest! {
        #[test]
        fn membership_matches_block((block, addresses) in block_and_addresses()) {
            let ranges = block_key_ranges(PREFIX, block);
            assert_sorted_and_disjoint(&ranges);
            for addr in addresses {
                prop_assert_eq!(
                    in_ranges(&ranges, &key(addr)),
                    block.contains(&addr),
                    "{} {}", block, addr
                );
            }
        }
    }
}
