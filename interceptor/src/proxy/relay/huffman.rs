//! HPACK's Huffman code (RFC 7541 5.2 and Appendix B), decoding only: the relay never
//! Huffman-codes what it sends (see `encode`).
//!
//! The code is canonical: codes of one length are consecutive numbers, and every code of a
//! length sorts below every longer code once both are left-aligned. So a symbol's length is
//! the smallest length whose left-aligned limit lies above the next 32 bits of input, and the
//! symbol follows from its distance to the first code of that length. The tables come from
//! the code lengths alone, at compile time.

/// The length of each symbol's code, 0-255 and EOS (256), as RFC 7541 Appendix B lists it.
#[rustfmt::skip]
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];

const MAX_LEN: usize = 30;
const EOS: u16 = 256;

struct Tables {
    /// Symbols sorted by code length, then by value: the canonical order.
    sorted: [u16; 257],
    /// Per length: the first code of that length, where its symbols start in `sorted`, and
    /// the left-aligned (32-bit) limit below which every code is at most that long.
    first: [u32; MAX_LEN + 1],
    offset: [u16; MAX_LEN + 1],
    limit: [u64; MAX_LEN + 1],
    /// By the next 8 bits: the symbol and its length when its code is at most 8 bits long
    /// (most of what headers hold), else length 0.
    short: [(u8, u8); 256],
}

const TABLES: Tables = build();

const fn build() -> Tables {
    let mut t = Tables {
        sorted: [0; 257],
        first: [0; MAX_LEN + 1],
        offset: [0; MAX_LEN + 1],
        limit: [0; MAX_LEN + 1],
        short: [(0, 0); 256],
    };
    let mut n = 0;
    let mut code: u64 = 0;
    let mut len = 1;
    while len <= MAX_LEN {
        t.first[len] = code as u32;
        t.offset[len] = n as u16;
        let mut sym = 0;
        while sym < 257 {
            if CODE_LENGTHS[sym] as usize == len {
                t.sorted[n] = sym as u16;
                n += 1;
                code += 1;
            }
            sym += 1;
        }
        t.limit[len] = code << (32 - len);
        code <<= 1;
        len += 1;
    }
    let mut b = 0;
    while b < 256 {
        let window = (b as u64) << 24;
        let mut len = 5;
        while len <= 8 && window >= t.limit[len] {
            len += 1;
        }
        if len <= 8 {
            let code = (window >> (32 - len)) as u32;
            let sym = t.sorted[(t.offset[len] as u32 + (code - t.first[len])) as usize];
            t.short[b] = (sym as u8, len as u8);
        }
        b += 1;
    }
    t
}

/// The string is not valid Huffman code: a code cut short, padding that is longer than 7
/// bits or not all ones, or EOS inside the string.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadHuffman;

/// Appends the decoding of `src` to `dst`.
pub(crate) fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), BadHuffman> {
    let t = &TABLES;
    dst.reserve(src.len() * 8 / 5);
    // Bits not yet decoded, left-aligned.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut next = 0;
    loop {
        while bits <= 56 && next < src.len() {
            acc |= (src[next] as u64) << (56 - bits);
            bits += 8;
            next += 1;
        }
        if bits == 0 {
            return Ok(());
        }
        // What follows the input reads as ones, so that padding decodes as no code at all.
        let padded = if bits >= 64 {
            acc
        } else {
            acc | (u64::MAX >> bits)
        };
        let window = padded >> 32;
        if bits < 8 && next == src.len() && window == u32::MAX as u64 {
            // No code shorter than 30 bits is all ones: this is padding.
            return Ok(());
        }
        let (sym, short) = t.short[(window >> 24) as usize];
        if short > 0 && short as u32 <= bits {
            dst.push(sym);
            acc <<= short;
            bits -= short as u32;
            continue;
        }
        let mut len = 9;
        while window >= t.limit[len] {
            len += 1;
            if len > MAX_LEN {
                return Err(BadHuffman);
            }
        }
        if len as u32 > bits {
            return Err(BadHuffman);
        }
        let code = (window >> (32 - len)) as u32;
        let sym = t.sorted[(t.offset[len] as u32 + (code - t.first[len])) as usize];
        if sym == EOS {
            return Err(BadHuffman);
        }
        dst.push(sym as u8);
        acc <<= len;
        bits -= len as u32;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes from hex digits (spaces ignored), as RFC 7541's examples print them.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn decoded(s: &str) -> Result<Vec<u8>, BadHuffman> {
        let mut out = Vec::new();
        decode(&hex(s), &mut out).map(|()| out)
    }

    #[test]
    fn rfc_7541_appendix_c_examples_decode() {
        // C.4.1 to C.4.3 and C.6.1.
        assert_eq!(
            decoded("f1e3 c2e5 f23a 6ba0 ab90 f4ff").expect("decodes"),
            b"www.example.com"
        );
        assert_eq!(decoded("a8eb 1064 9cbf").expect("decodes"), b"no-cache");
        assert_eq!(
            decoded("25a8 49e9 5ba9 7d7f").expect("decodes"),
            b"custom-key"
        );
        assert_eq!(
            decoded("25a8 49e9 5bb8 e8b4 bf").expect("decodes"),
            b"custom-value"
        );
        assert_eq!(decoded("6402").expect("decodes"), b"302");
        assert_eq!(decoded("aec3 771a 4b").expect("decodes"), b"private");
        assert_eq!(
            decoded("d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff").expect("decodes"),
            b"Mon, 21 Oct 2013 20:13:21 GMT"
        );
        assert_eq!(
            decoded("9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3").expect("decodes"),
            b"https://www.example.com"
        );
        assert_eq!(decoded("").expect("decodes"), b"");
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        // "0" is 00000 (5 bits): padded with ones it is 0x07; with zeros it is not valid.
        assert_eq!(decoded("07").expect("decodes"), b"0");
        assert_eq!(decoded("00"), Err(BadHuffman));
        // A whole byte of padding after a code that ends on a byte boundary.
        assert_eq!(decoded("a8eb 1064 9cbf ff"), Err(BadHuffman));
        // EOS itself (30 ones) in the string.
        assert_eq!(decoded("ffff ffff"), Err(BadHuffman));
    }

    #[test]
    fn every_symbol_decodes_from_its_canonical_code() {
        // Encodes each byte value with the canonical code built from the lengths, then
        // decodes the lot: the tables and the decoder agree on all 256 symbols.
        let mut codes = [(0u32, 0u8); 257];
        let mut code = 0u32;
        let mut prev = 0u8;
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODE_LENGTHS[s], s));
        for (i, &s) in order.iter().enumerate() {
            let len = CODE_LENGTHS[s];
            if i > 0 {
                code = (code + 1) << (len - prev);
            }
            prev = len;
            codes[s] = (code, len);
        }
        let mut bits: Vec<bool> = Vec::new();
        for &(c, len) in &codes[..256] {
            for i in (0..len).rev() {
                bits.push(c >> i & 1 == 1);
            }
        }
        while !bits.len().is_multiple_of(8) {
            bits.push(true);
        }
        let bytes: Vec<u8> = bits
            .chunks(8)
            .map(|b| b.iter().fold(0u8, |a, &x| a << 1 | x as u8))
            .collect();
        let mut out = Vec::new();
        decode(&bytes, &mut out).expect("decodes");
        assert_eq!(out, (0..=255u8).collect::<Vec<_>>());
    }
}
