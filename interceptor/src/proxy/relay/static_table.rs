//! HPACK's static table (RFC 7541 Appendix A): the decoder resolves indices with it, and
//! every field the relay holds keeps its name's index, so that the encoder refers to it.

/// RFC 7541 Appendix A: the static table, index 1 first.
#[rustfmt::skip]
pub(crate) const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"),
    (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""),
    (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
];

/// The first static-table index with this name (0: none).
pub(crate) fn static_name_index(name: &[u8]) -> u8 {
    // The table is small and names rarely miss it once a connection's dynamic table holds
    // them (their entries keep the index): a scan by length first is enough.
    for (i, (n, _)) in STATIC.iter().enumerate() {
        if n.len() == name.len() && *n == name {
            return i as u8 + 1;
        }
    }
    0
}

/// The static-table index of this exact field, for fields whose name is at `name_index`.
pub(crate) fn static_field_index(name_index: u8, value: &[u8]) -> Option<u8> {
    if name_index == 0 {
        return None;
    }
    let name = STATIC[name_index as usize - 1].0;
    STATIC[name_index as usize - 1..]
        .iter()
        .take_while(|(n, _)| *n == name)
        .position(|(_, v)| *v == value)
        .map(|i| name_index + i as u8)
}

/// The first index of the name of static entry `index`: entries with equal names are
/// adjacent, and the encoder refers to the name by its first.
pub(crate) fn static_name_index_of(index: usize) -> u8 {
    let name = STATIC[index - 1].0;
    let mut i = index;
    while i > 1 && STATIC[i - 2].0 == name {
        i -= 1;
    }
    i as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_indices() {
        assert_eq!(static_name_index(b"content-type"), 31);
        assert_eq!(static_name_index(b":status"), 8);
        assert_eq!(static_name_index(b"x-custom"), 0);
        assert_eq!(static_field_index(2, b"POST"), Some(3));
        assert_eq!(static_field_index(8, b"404"), Some(13));
        assert_eq!(static_field_index(8, b"201"), None);
        assert_eq!(static_field_index(16, b"gzip, deflate"), Some(16));
        assert_eq!(static_name_index_of(14), 8);
    }
}
