//! HPACK (RFC 7541), the header compression of HTTP/2, as much as a client making one call
//! needs. The header blocks it sends are literals without indexing, so the daemon's decoder
//! table stays empty; it decodes everything a server may send: indexed fields from the static
//! and dynamic tables, literals with and without indexing, Huffman-coded strings and table size
//! updates. Pure: bytes in, fields out.

use std::collections::VecDeque;

/// A header field: name and value as sent (HTTP/2 names are lower case).
pub type Field = (Vec<u8>, Vec<u8>);

/// Why a header block could not be decoded: the peer broke RFC 7541, which HTTP/2 treats as a
/// connection error (`COMPRESSION_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer longer than any index or length this decoder accepts.
    #[error("integer too large in header block")]
    IntegerTooLarge,
    /// Index 0, or past the end of the static and dynamic tables.
    #[error("header index {0} is not in the table")]
    BadIndex(usize),
    /// A Huffman string with an invalid code, the end-of-string symbol, or bad padding.
    #[error("invalid Huffman-coded string")]
    BadHuffman,
    /// A table size update above the size this side allows.
    #[error("table size update to {0} above the limit")]
    TableTooLarge(usize),
    /// The decoded fields add up to more than [`MAX_LIST_SIZE`].
    #[error("header list above {MAX_LIST_SIZE} bytes")]
    ListTooLarge,
}

/// The most a header block may decode to, counted as HTTP/2 counts a header list (each field's
/// name and value plus 32): a few indexed references to a large table entry must not make a
/// small block expand without bound.
pub const MAX_LIST_SIZE: usize = 64 << 10;

/// The static table (RFC 7541, Appendix A): index 1 is the first entry.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The bit length of each symbol's Huffman code, symbols 0–255 and end-of-string (256)
/// (RFC 7541, Appendix B). The code is canonical: codes of one length are consecutive in symbol
/// order and follow all shorter codes, so the lengths alone define it.
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const MAX_CODE_LENGTH: usize = 30;
const END_OF_STRING: u16 = 256;

/// Appends `fields` to `out` as a header block of literals without indexing, names and values
/// as plain (not Huffman-coded) strings.
pub fn encode(fields: &[(&str, &str)], out: &mut Vec<u8>) {
    for (name, value) in fields {
        out.push(0);
        encode_string(name.as_bytes(), out);
        encode_string(value.as_bytes(), out);
    }
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// An integer with an N-bit prefix (RFC 7541, 5.1); `flags` are the first byte's high bits.
fn encode_integer(mut value: usize, prefix_bits: u32, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Decodes the header blocks of one connection, in order: the dynamic table carries over from
/// block to block.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first: index 62 is `dynamic[0]`.
    dynamic: VecDeque<Field>,
    size: usize,
    max_size: usize,
    /// The largest size the peer may set: `SETTINGS_HEADER_TABLE_SIZE` as this side sent it.
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_TABLE_SIZE)
    }
}

/// HTTP/2's initial `SETTINGS_HEADER_TABLE_SIZE`.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

impl Decoder {
    /// A decoder whose peer may use a dynamic table of up to `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Decoder {
            dynamic: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// The fields of one complete header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut input = Input(block);
        let mut fields = Vec::new();
        let mut list_size = 0;
        while let Some(&first) = input.0.first() {
            let field = if first & 0x80 != 0 {
                let index = input.integer(7)?;
                self.entry(index)?
            } else if first & 0x40 != 0 {
                let field = self.literal(&mut input, 6)?;
                self.insert(field.clone());
                field
            } else if first & 0x20 != 0 {
                let size = input.integer(5)?;
                if size > self.limit {
                    return Err(HpackError::TableTooLarge(size));
                }
                self.max_size = size;
                self.evict_to(size);
                continue;
            } else {
                // Without indexing (0000) or never indexed (0001): not added to the table.
                self.literal(&mut input, 4)?
            };
            list_size += entry_size(&field);
            if list_size > MAX_LIST_SIZE {
                return Err(HpackError::ListTooLarge);
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(&self, input: &mut Input, prefix_bits: u32) -> Result<Field, HpackError> {
        let index = input.integer(prefix_bits)?;
        let name = if index == 0 {
            input.string()?
        } else {
            self.entry(index)?.0
        };
        Ok((name, input.string()?))
    }

    fn entry(&self, index: usize) -> Result<Field, HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(0));
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        self.dynamic
            .get(index - 1 - STATIC_TABLE.len())
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    fn insert(&mut self, field: Field) {
        let size = entry_size(&field);
        if size > self.max_size {
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.dynamic.push_front(field);
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            match self.dynamic.pop_back() {
                Some(field) => self.size -= entry_size(&field),
                None => break,
            }
        }
    }
}

/// An entry's size in the table: its octets plus 32 (RFC 7541, 4.1).
fn entry_size((name, value): &Field) -> usize {
    name.len() + value.len() + 32
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Result<u8, HpackError> {
        let (&b, rest) = self.0.split_first().ok_or(HpackError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    /// An integer with an N-bit prefix (RFC 7541, 5.1).
    fn integer(&mut self, prefix_bits: u32) -> Result<usize, HpackError> {
        let max = (1usize << prefix_bits) - 1;
        let mut value = usize::from(self.byte()?) & max;
        if value < max {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            // Four continuation bytes reach 2^28: more than any length or index here.
            if shift > 21 {
                return Err(HpackError::IntegerTooLarge);
            }
            value += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
    }

    /// A string literal (RFC 7541, 5.2), Huffman-coded or not.
    fn string(&mut self) -> Result<Vec<u8>, HpackError> {
        let huffman = self.0.first().is_some_and(|b| b & 0x80 != 0);
        let len = self.integer(7)?;
        if self.0.len() < len {
            return Err(HpackError::Truncated);
        }
        let (raw, rest) = self.0.split_at(len);
        self.0 = rest;
        if huffman {
            huffman_decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

/// The canonical code of [`HUFFMAN_LENGTHS`], built at compile time: how many codes each length
/// has, and the symbols in the order of their codes (by length, then by symbol).
struct Canonical {
    count: [u16; MAX_CODE_LENGTH + 1],
    sorted: [u16; 257],
}

const CANONICAL: Canonical = {
    let mut count = [0u16; MAX_CODE_LENGTH + 1];
    let mut symbol = 0;
    while symbol < 257 {
        count[HUFFMAN_LENGTHS[symbol] as usize] += 1;
        symbol += 1;
    }
    // Where each length's symbols start in `sorted`.
    let mut next = [0u16; MAX_CODE_LENGTH + 1];
    let mut len = 1;
    while len < MAX_CODE_LENGTH {
        next[len + 1] = next[len] + count[len];
        len += 1;
    }
    let mut sorted = [0u16; 257];
    symbol = 0;
    while symbol < 257 {
        let len = HUFFMAN_LENGTHS[symbol] as usize;
        sorted[next[len] as usize] = symbol as u16;
        next[len] += 1;
        symbol += 1;
    }
    Canonical { count, sorted }
};

/// Decodes a Huffman-coded string with the canonical code [`HUFFMAN_LENGTHS`] defines: reading
/// bit by bit, a code of length L is the symbol at `index + (code - first)` when it falls among
/// the L-bit codes, which start at `first`.
pub fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, HpackError> {
    let Canonical { count, sorted } = &CANONICAL;
    let mut out = Vec::with_capacity(input.len() * 8 / 5);
    let (mut code, mut first, mut index, mut len) = (0u32, 0u32, 0u32, 0usize);
    for byte in input {
        for shift in (0..8).rev() {
            code |= u32::from(byte >> shift & 1);
            len += 1;
            let n = u32::from(count[len]);
            if code < first + n {
                let symbol = sorted[(index + code - first) as usize];
                if symbol == END_OF_STRING {
                    return Err(HpackError::BadHuffman);
                }
                out.push(symbol as u8);
                (code, first, index, len) = (0, 0, 0, 0);
                continue;
            }
            if len == MAX_CODE_LENGTH {
                return Err(HpackError::BadHuffman);
            }
            index += n;
            first = (first + n) << 1;
            code <<= 1;
        }
    }
    // Padding: fewer than 8 bits, all ones (the start of the end-of-string code).
    let padding_ones = len == 0 || code >> 1 == (1u32 << len) - 1;
    if len >= 8 || !padding_ones {
        return Err(HpackError::BadHuffman);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn text(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.clone()).unwrap(),
                    String::from_utf8(v.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 7541, C.4: three requests on one connection, Huffman-coded, the dynamic table
    /// carrying over.
    #[test]
    fn decodes_the_rfc_request_examples_with_huffman_and_the_dynamic_table() {
        let authority = (":authority", "www.example.com");
        let requests: [(&str, &[(&str, &str)]); 3] = [
            (
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                &[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    authority,
                ],
            ),
            (
                "8286 84be 5886 a8eb 1064 9cbf",
                &[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    authority,
                    ("cache-control", "no-cache"),
                ],
            ),
            (
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                &[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    authority,
                    ("custom-key", "custom-value"),
                ],
            ),
        ];
        let mut decoder = Decoder::default();
        for (block, fields) in requests {
            assert_eq!(text(&decoder.decode(&hex(block)).unwrap()), pairs(fields));
        }
        assert_eq!(decoder.size, 164);
    }

    /// RFC 7541, C.5.1–C.5.2: a 256-byte table evicts the oldest entry to make room.
    #[test]
    fn a_full_dynamic_table_evicts_its_oldest_entries() {
        let mut decoder = Decoder::new(256);
        decoder
            .decode(&hex(
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 \
                 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 \
                 7861 6d70 6c65 2e63 6f6d",
            ))
            .unwrap();
        assert_eq!(decoder.size, 222);
        let second = decoder.decode(&hex("4803 3330 37c1 c0bf")).unwrap();
        assert_eq!(second[0], (b":status".to_vec(), b"307".to_vec()));
        assert_eq!(second[3].1, b"https://www.example.com".to_vec());
        assert_eq!(decoder.size, 222);
        assert_eq!(decoder.dynamic.len(), 4);
    }

    #[test]
    fn what_encode_writes_decodes_to_the_same_fields() {
        let long = "x".repeat(300);
        let fields = [
            (":path", "/hostnic.ipam.v1.Ipam/Allocate"),
            ("te", "trailers"),
            ("x-long", long.as_str()),
        ];
        let mut block = Vec::new();
        encode(&fields, &mut block);
        let decoded = Decoder::default().decode(&block).unwrap();
        assert_eq!(text(&decoded), pairs(&fields));
    }

    #[test]
    fn every_byte_value_round_trips_through_a_huffman_code_built_from_the_lengths() {
        // Encode with the canonical codes the lengths imply, then decode.
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (HUFFMAN_LENGTHS[s], s));
        let mut codes = [0u32; 257];
        let (mut code, mut prev) = (0u32, HUFFMAN_LENGTHS[order[0]]);
        for (i, &s) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (HUFFMAN_LENGTHS[s] - prev);
                prev = HUFFMAN_LENGTHS[s];
            }
            codes[s] = code;
        }
        assert_eq!(codes[usize::from(b'a')], 0x3, "RFC 7541: 'a' is 00011");
        assert_eq!(codes[256], 0x3fff_ffff, "RFC 7541: EOS is thirty ones");
        let input: Vec<u8> = (0..=255).collect();
        let (mut bits, mut nbits, mut out) = (0u64, 0u32, Vec::new());
        for &b in &input {
            let len = u32::from(HUFFMAN_LENGTHS[usize::from(b)]);
            bits = bits << len | u64::from(codes[usize::from(b)]);
            nbits += len;
            while nbits >= 8 {
                out.push((bits >> (nbits - 8)) as u8);
                nbits -= 8;
            }
        }
        if nbits > 0 {
            out.push((bits << (8 - nbits)) as u8 | (0xff >> nbits));
        }
        assert_eq!(huffman_decode(&out).unwrap(), input);
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut decoder = Decoder::default();
        assert_eq!(decoder.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(decoder.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(
            decoder.decode(&[0x00, 0x05, b'a']),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            decoder.decode(&[0x3f, 0xe2, 0x1f]),
            Err(HpackError::TableTooLarge(4097))
        );
        assert_eq!(
            decoder.decode(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::IntegerTooLarge)
        );
        // Padding of zeros, and a full end-of-string code.
        assert_eq!(huffman_decode(&[0x00]), Err(HpackError::BadHuffman));
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::BadHuffman)
        );
        // Eight bits of padding.
        assert_eq!(huffman_decode(&[0x1f, 0xff]), Err(HpackError::BadHuffman));
        // A 4,000-byte table entry referenced again and again.
        let mut decoder = Decoder::default();
        let mut block = Vec::new();
        encode(&[("x", &"v".repeat(4000))], &mut block);
        block[0] = 0x40; // with incremental indexing
        block.extend(std::iter::repeat_n(0xbe, 20)); // index 62, the entry just added
        assert_eq!(decoder.decode(&block), Err(HpackError::ListTooLarge));
    }
}
