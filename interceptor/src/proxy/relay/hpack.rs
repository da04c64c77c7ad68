//! HPACK decoding (RFC 7541) into a `HeaderList`: the names and values of a block, copied
//! once into one buffer, each field with the static-table index of its name so that
//! `encode` sends it on without looking the name up again.
//!
//! h2's decoder built a `HeaderMap` per block (a hashed insert and a checked `HeaderName`
//! per field) and wrapped every value in its own `Bytes`; with framing, that was half of the
//! relay's user-space instructions per request (callgrind, docs/benchmarks.md).

use std::collections::VecDeque;

use super::fields::{field_error, HeaderList};
use super::huffman;
use super::static_table::{static_name_index, static_name_index_of, STATIC};

/// RFC 7541 4.1: an entry's size is its name and value plus 32.
const ENTRY_OVERHEAD: usize = 32;

/// The header block cannot be decoded: a connection error (COMPRESSION_ERROR), since the
/// table it shares with the peer is no longer known.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CompressionError(pub(crate) &'static str);

struct Entry {
    /// The name, then the value.
    bytes: Box<[u8]>,
    name_len: usize,
    name_index: u8,
    /// Why the field is malformed in a message (RFC 9113 8.2), found once when it was
    /// decoded: every block that refers to it is malformed too.
    error: Option<&'static str>,
}

/// One connection's decoding side: the dynamic table the peer's encoder fills.
pub(crate) struct Decoder {
    /// Newest first (index 62).
    table: VecDeque<Entry>,
    size: usize,
    /// The table's size now, as the peer last set it.
    max_size: usize,
    /// The most it may set (our SETTINGS_HEADER_TABLE_SIZE, the protocol's default).
    limit: usize,
    /// The last block's decoded size: the next list is allocated at that size at once.
    last_bytes: usize,
    last_fields: usize,
}

/// What decoding a block found besides its fields.
pub(crate) struct Decoded {
    /// The header list passed the size limit: the fields after that point were decoded (the
    /// table must stay in step) but not kept.
    pub(crate) over_size: bool,
    /// Why the block is malformed (RFC 9113 8.2: a field no message may carry); the
    /// order of pseudo-header fields is checked by the reader.
    pub(crate) malformed: Option<&'static str>,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096,
            limit: 4096,
            last_bytes: 0,
            last_fields: 0,
        }
    }

    /// Decodes a whole header block into `out`, keeping fields while the list's size
    /// (RFC 9113 6.5.2) stays within `max_list`.
    pub(crate) fn decode(
        &mut self,
        src: &[u8],
        max_list: usize,
        out: &mut HeaderList,
    ) -> Result<Decoded, CompressionError> {
        let mut at = 0;
        let mut list_size = 0usize;
        let mut over_size = false;
        let mut malformed = None;
        let mut fields_seen = false;
        out.reserve(self.last_bytes, self.last_fields);
        while at < src.len() {
            let b = src[at];
            if b & 0x80 != 0 {
                let index = int(src, &mut at, 7)?;
                fields_seen = true;
                let (name, value, name_index, error) = self.get(index)?;
                malformed = malformed.or(error);
                list_size += name.len() + value.len() + ENTRY_OVERHEAD;
                over_size |= list_size > max_list;
                if !over_size {
                    out.push_decoded(name, value, name_index, false);
                }
                continue;
            }
            if b & 0xe0 == 0x20 {
                // Dynamic table size update: only before the block's first field.
                if fields_seen {
                    return Err(CompressionError("table size update after a field"));
                }
                let size = int(src, &mut at, 5)?;
                if size > self.limit {
                    return Err(CompressionError("table size update past the limit"));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            }
            fields_seen = true;
            let (prefix, indexing, sensitive) = match b & 0xf0 {
                0x40..=0x70 => (6, true, false),
                0x10 => (4, false, true),
                _ => (4, false, false),
            };
            let name_ref = int(src, &mut at, prefix)?;
            let mark = out.mark();
            let name_index;
            let name_len;
            if name_ref == 0 {
                name_len = string(src, &mut at, out.scratch())?;
                name_index = static_name_index(&out.bytes_from(mark)[..name_len]);
            } else {
                let (name, _, idx, _) = self.get(name_ref)?;
                name_len = name.len();
                name_index = idx;
                out.scratch().extend_from_slice(name);
            }
            let value_len = string(src, &mut at, out.scratch())?;
            list_size += name_len + value_len + ENTRY_OVERHEAD;
            over_size |= list_size > max_list;
            let (name, value) = out.bytes_from(mark).split_at(name_len);
            let error = field_error(name, value);
            malformed = malformed.or(error);
            if indexing {
                let bytes: Box<[u8]> = out.bytes_from(mark).into();
                self.insert(Entry {
                    bytes,
                    name_len,
                    name_index,
                    error,
                });
            }
            if over_size {
                out.truncate_to(mark);
            } else {
                out.commit(mark, name_len, value_len, name_index, sensitive);
            }
        }
        self.last_bytes = out.mark();
        self.last_fields = out.len();
        Ok(Decoded {
            over_size,
            malformed,
        })
    }

    /// Entry `index` (1-based, static first): name, value, the name's static index, and
    /// what makes the field malformed.
    #[allow(clippy::type_complexity)]
    fn get(
        &self,
        index: usize,
    ) -> Result<(&[u8], &[u8], u8, Option<&'static str>), CompressionError> {
        if index == 0 {
            return Err(CompressionError("index 0"));
        }
        if index <= STATIC.len() {
            let (n, v) = STATIC[index - 1];
            let name_index = static_name_index_of(index);
            return Ok((n, v, name_index, None));
        }
        let e = self
            .table
            .get(index - STATIC.len() - 1)
            .ok_or(CompressionError("index past the table"))?;
        let (n, v) = e.bytes.split_at(e.name_len);
        Ok((n, v, e.name_index, e.error))
    }

    fn insert(&mut self, e: Entry) {
        let size = e.bytes.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front(e);
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some(old) = self.table.pop_back() else {
                break;
            };
            self.size -= old.bytes.len() + ENTRY_OVERHEAD;
        }
    }
}

/// An integer with an N-bit prefix (RFC 7541 5.1). Values past 2^28 are refused: nothing
/// in a header block is that large.
fn int(src: &[u8], at: &mut usize, prefix_bits: u8) -> Result<usize, CompressionError> {
    let max = (1usize << prefix_bits) - 1;
    let first = *src.get(*at).ok_or(CompressionError("integer cut short"))? as usize & max;
    *at += 1;
    if first < max {
        return Ok(first);
    }
    let mut v = max;
    let mut shift = 0;
    loop {
        let b = *src.get(*at).ok_or(CompressionError("integer cut short"))?;
        *at += 1;
        v += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
        if shift > 21 {
            return Err(CompressionError("integer too large"));
        }
    }
}

/// A string literal (RFC 7541 5.2), appended to `dst`; returns its decoded length.
fn string(src: &[u8], at: &mut usize, dst: &mut Vec<u8>) -> Result<usize, CompressionError> {
    let huffman = src.get(*at).ok_or(CompressionError("string cut short"))? & 0x80 != 0;
    let len = int(src, at, 7)?;
    let end = at
        .checked_add(len)
        .filter(|&e| e <= src.len())
        .ok_or(CompressionError("string cut short"))?;
    let raw = &src[*at..end];
    *at = end;
    let before = dst.len();
    if huffman {
        huffman::decode(raw, dst).map_err(|_| CompressionError("bad Huffman code"))?;
    } else {
        dst.extend_from_slice(raw);
    }
    Ok(dst.len() - before)
}

#[cfg(test)]
mod tests {
    use super::super::huffman::tests::hex;
    use super::*;

    fn fields(l: &HeaderList) -> Vec<(String, String)> {
        l.iter()
            .map(|f| {
                (
                    String::from_utf8_lossy(f.name).into_owned(),
                    String::from_utf8_lossy(f.value).into_owned(),
                )
            })
            .collect()
    }

    /// A block that must decode (within a 64 KiB list).
    fn block(d: &mut Decoder, hex_block: &str) -> HeaderList {
        let mut l = HeaderList::new();
        d.decode(&hex(hex_block), 1 << 16, &mut l).expect("decodes");
        l
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rfc_7541_c3_requests_without_huffman_share_one_table() {
        let mut d = Decoder::new();
        let l = block(&mut d, "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d");
        assert_eq!(
            fields(&l),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let l = block(&mut d, "8286 84be 5808 6e6f 2d63 6163 6865");
        assert_eq!(
            fields(&l),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let l = block(
            &mut d,
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        );
        assert_eq!(
            fields(&l),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164);
        // Names keep their static index through the dynamic table; new names have none.
        let idx: Vec<u8> = l.iter().map(|f| f.name_index).collect();
        assert_eq!(idx, vec![2, 6, 4, 1, 0]);
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        let l = block(&mut d, "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            fields(&l)[3],
            (":authority".into(), "www.example.com".into())
        );
        let l = block(&mut d, "8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(fields(&l)[4], ("cache-control".into(), "no-cache".into()));
        let l = block(
            &mut d,
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        );
        assert_eq!(fields(&l)[4], ("custom-key".into(), "custom-value".into()));
    }

    #[test]
    fn rfc_7541_c5_responses_evict_from_a_small_table() {
        let mut d = Decoder::new();
        d.max_size = 256;
        let blocks = [
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
        ];
        for b in blocks {
            let mut l = HeaderList::new();
            d.decode(&hex(b), 1 << 16, &mut l).expect("decodes");
        }
        assert_eq!(d.size, 222);
        assert_eq!(d.table.len(), 4);
    }

    #[test]
    fn bad_blocks_are_compression_errors() {
        let mut d = Decoder::new();
        for (b, why) in [
            ("80", "index 0"),
            ("be", "index past the table"),
            ("3fe2 1f", "table size update past the limit"),
            ("82 20", "table size update after a field"),
            ("41 8c f1e3", "string cut short"),
            ("ff ff ff ff ff 0f", "integer too large"),
            ("40 81 00 00", "bad Huffman code"),
        ] {
            let mut l = HeaderList::new();
            assert_eq!(
                d.decode(&hex(b), 1 << 16, &mut l).err(),
                Some(CompressionError(why)),
                "{b}"
            );
        }
    }

    #[test]
    fn past_the_list_limit_fields_are_dropped_but_the_table_kept() {
        let mut d = Decoder::new();
        let mut l = HeaderList::new();
        // custom-key: custom-value, indexed, with a limit that only fits ":method: GET".
        let r = d
            .decode(
                &hex("82 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
                50,
                &mut l,
            )
            .expect("decodes");
        assert!(r.over_size);
        assert_eq!(fields(&l), pairs(&[(":method", "GET")]));
        let l = block(&mut d, "be");
        assert_eq!(fields(&l), pairs(&[("custom-key", "custom-value")]));
    }

    /// Blocks built from random representations (indexed, literal with and without
    /// indexing, size updates, Huffman flags over random bytes), some cut or flipped: each
    /// decodes or is a compression error, and the table's accounting holds either way.
    #[test]
    fn random_blocks_decode_or_fail_and_the_table_keeps_its_size() {
        let mut state = 0x243f_6a88_85a3_08d3u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut decoded, mut failed, mut filled) = (0, 0, 0);
        let mut d = Decoder::new();
        for _ in 0..30_000 {
            let mut block = Vec::new();
            if next() % 8 == 0 {
                // A size update, 0 to 4127 (past the 4096 limit now and then).
                let size = (next() % 4128) as usize;
                if size < 31 {
                    block.push(0x20 | size as u8);
                } else {
                    block.push(0x3f);
                    let mut rest = size - 31;
                    while rest >= 128 {
                        block.push(0x80 | (rest % 128) as u8);
                        rest /= 128;
                    }
                    block.push(rest as u8);
                }
            }
            // Indexes into the static table and the dynamic one as it is (one past its end
            // now and then); literals with a new name or an indexed one; Huffman now and then
            // (over random bytes, mostly not a valid code).
            let entries = 61 + d.table.len() as u64 + 1;
            for _ in 0..next() % 6 {
                match next() % 5 {
                    0 => block.push(0x80 | (1 + next() % entries) as u8),
                    kind => {
                        let first = match kind {
                            1 | 2 => 0x40,
                            3 => 0x00,
                            _ => 0x10,
                        };
                        let strings = if kind == 2 {
                            // The name by index, 6-bit prefix: static names only.
                            block.push(first | (1 + next() % 61) as u8);
                            1
                        } else {
                            block.push(first);
                            2
                        };
                        for _ in 0..strings {
                            let len = (next() % 40) as usize;
                            let huffman = next() % 10 == 0;
                            block.push(if huffman { 0x80 } else { 0 } | len as u8);
                            block.extend((0..len).map(|_| match next() % 4 {
                                0 => next() as u8,
                                _ => b'a' + (next() % 26) as u8,
                            }));
                        }
                    }
                }
            }
            match next() % 10 {
                0 if !block.is_empty() => block.truncate((next() as usize) % block.len()),
                1 if !block.is_empty() => {
                    let at = (next() as usize) % block.len();
                    block[at] ^= 1 << (next() % 8);
                }
                _ => {}
            }
            let mut l = HeaderList::new();
            let result = d.decode(&block, 256, &mut l);
            let held: usize = d.table.iter().map(|e| e.bytes.len() + ENTRY_OVERHEAD).sum();
            assert_eq!(held, d.size);
            assert!(d.size <= d.max_size && d.max_size <= d.limit);
            let kept: usize = l.iter().map(|f| f.name.len() + f.value.len() + 32).sum();
            assert!(kept <= 256);
            filled = filled.max(d.table.len());
            match result {
                Ok(_) => decoded += 1,
                Err(_) => {
                    failed += 1;
                    // A compression error ends the connection, and its table with it.
                    d = Decoder::new();
                }
            }
        }
        assert!(
            decoded > 5_000 && failed > 5_000,
            "{decoded} decoded, {failed} failed"
        );
        // The table filled and evicted, not only stayed empty.
        assert!(filled > 20, "at most {filled} entries");
    }
}
