//! A header block as the relay holds it: its fields in order, names and values in one buffer.
//! What the relay asks of a block (a pseudo-header, grpc-status, content-type) it finds by
//! scanning a handful of fields; nothing is hashed, and a block is two allocations.

use h2::frame::StreamId;
use http::{HeaderMap, StatusCode};

use super::static_table::{static_field_index, static_name_index};

#[derive(Clone, Copy)]
struct Field {
    start: u32,
    name_len: u32,
    value_len: u32,
    /// The name's index in HPACK's static table, 0 if it has none.
    name_index: u8,
    /// Never to be indexed by a compressor (RFC 7541 6.2.3).
    sensitive: bool,
}

/// One field of a `HeaderList`.
pub(crate) struct FieldRef<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) value: &'a [u8],
    pub(crate) name_index: u8,
    pub(crate) sensitive: bool,
}

impl FieldRef<'_> {
    /// Its index in the static table if the whole field is there (`:method: GET`).
    pub(crate) fn static_index(&self) -> Option<u8> {
        static_field_index(self.name_index, self.value)
    }
}

#[derive(Default)]
pub(crate) struct HeaderList {
    bytes: Vec<u8>,
    fields: Vec<Field>,
}

/// A HEADERS frame's content, from a peer or for one: a request or response head, or
/// trailers.
pub(crate) struct Block {
    pub(crate) id: StreamId,
    /// END_STREAM.
    pub(crate) eos: bool,
    pub(crate) fields: HeaderList,
}

impl HeaderList {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A response head the proxy writes itself: `:status`, then `headers`.
    pub(crate) fn response(status: StatusCode, headers: &HeaderMap) -> Self {
        let mut l = Self::new();
        l.push(b":status", status.as_str().as_bytes(), false);
        l.extend(headers);
        l
    }

    pub(crate) fn from_map(headers: &HeaderMap) -> Self {
        let mut l = Self::new();
        l.extend(headers);
        l
    }

    fn extend(&mut self, headers: &HeaderMap) {
        for (n, v) in headers {
            self.push(n.as_str().as_bytes(), v.as_bytes(), v.is_sensitive());
        }
    }

    pub(crate) fn push(&mut self, name: &[u8], value: &[u8], sensitive: bool) {
        self.push_decoded(name, value, static_name_index(name), sensitive);
    }

    pub(crate) fn push_decoded(
        &mut self,
        name: &[u8],
        value: &[u8],
        name_index: u8,
        sensitive: bool,
    ) {
        let mark = self.mark();
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
        self.commit(mark, name.len(), value.len(), name_index, sensitive);
    }

    /// Where the next field's bytes start: the decoder writes a field's name and value to
    /// `scratch`, then commits or drops them.
    pub(crate) fn mark(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn scratch(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    pub(crate) fn bytes_from(&self, mark: usize) -> &[u8] {
        &self.bytes[mark..]
    }

    pub(crate) fn truncate_to(&mut self, mark: usize) {
        self.bytes.truncate(mark);
    }

    /// The bytes since `mark` are a field: a name `name_len` long, then its value.
    pub(crate) fn commit(
        &mut self,
        mark: usize,
        name_len: usize,
        value_len: usize,
        name_index: u8,
        sensitive: bool,
    ) {
        self.fields.push(Field {
            start: mark as u32,
            name_len: name_len as u32,
            value_len: value_len as u32,
            name_index,
            sensitive,
        });
    }

    fn field(&self, f: &Field) -> FieldRef<'_> {
        let start = f.start as usize;
        let mid = start + f.name_len as usize;
        FieldRef {
            name: &self.bytes[start..mid],
            value: &self.bytes[mid..mid + f.value_len as usize],
            name_index: f.name_index,
            sensitive: f.sensitive,
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = FieldRef<'_>> {
        self.fields.iter().map(|f| self.field(f))
    }

    pub(crate) fn reserve(&mut self, bytes: usize, fields: usize) {
        self.bytes.reserve(bytes);
        self.fields.reserve(fields);
    }

    pub(crate) fn len(&self) -> usize {
        self.fields.len()
    }

    /// The value of the first field named `name` (pseudo-header fields included).
    pub(crate) fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| {
                f.name_len as usize == name.len()
                    && &self.bytes[f.start as usize..f.start as usize + name.len()] == name
            })
            .map(|f| self.field(f).value)
    }

    pub(crate) fn status(&self) -> Option<u16> {
        let v = self.get(b":status")?;
        std::str::from_utf8(v).ok()?.parse().ok()
    }

    /// Replaces every field named `name` with one field (at the end).
    pub(crate) fn set(&mut self, name: &[u8], value: &[u8]) {
        let bytes = &self.bytes;
        self.fields.retain(|f| {
            let start = f.start as usize;
            !(f.name_len as usize == name.len() && &bytes[start..start + name.len()] == name)
        });
        self.push(name, value, false);
    }
}

/// RFC 9113 8.2 and 8.3: why a field makes a message malformed, if it does. The order of
/// pseudo-header fields is a matter of the block, checked by the reader.
pub(crate) fn field_error(name: &[u8], value: &[u8]) -> Option<&'static str> {
    if name.first() == Some(&b':') {
        match name {
            b":method" => {
                if value.is_empty() || !value.iter().all(|&b| is_token(b)) {
                    return Some("bad :method");
                }
            }
            b":status" => {
                if value.len() != 3 || !value.iter().all(u8::is_ascii_digit) || value[0] == b'0' {
                    return Some("bad :status");
                }
            }
            b":scheme" | b":authority" | b":path" | b":protocol" => {}
            _ => return Some("unknown pseudo-header field"),
        }
    } else {
        if name.is_empty() || !name.iter().all(|&b| is_token(b) && !b.is_ascii_uppercase()) {
            return Some("bad field name");
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Some("connection-specific field"),
            b"te" if value != b"trailers" => return Some("te other than trailers"),
            _ => {}
        }
    }
    // RFC 9110 5.5: no control characters but tab, and no DEL.
    if !value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
    {
        return Some("bad field value");
    }
    None
}

/// RFC 9110 5.6.2 tchar.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A content-length value: digits only (RFC 9110 8.6), no list, no sign, no overflow.
pub(crate) fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether `so_far` DATA bytes contradict an announced content-length (RFC 9113 8.1.1): more
/// than announced, or, where the message `ends` here, fewer.
pub(crate) fn contradicts_length(announced: Option<u64>, so_far: u64, ends: bool) -> bool {
    announced.is_some_and(|n| so_far > n || (ends && so_far != n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn fields_keep_their_order_and_are_found_by_name() {
        let mut m = HeaderMap::new();
        m.insert("content-type", HeaderValue::from_static("application/grpc"));
        let mut secret = HeaderValue::from_static("s3cret");
        secret.set_sensitive(true);
        m.insert("authorization", secret);
        m.insert("x-custom", HeaderValue::from_static("1"));
        let mut l = HeaderList::response(StatusCode::OK, &m);
        assert_eq!(l.status(), Some(200));
        assert_eq!(l.get(b"content-type"), Some(&b"application/grpc"[..]));
        assert_eq!(l.get(b"content"), None);
        let f: Vec<(Vec<u8>, u8, bool)> = l
            .iter()
            .map(|f| (f.name.to_vec(), f.name_index, f.sensitive))
            .collect();
        assert_eq!(f[0], (b":status".to_vec(), 8, false));
        assert!(f.contains(&(b"authorization".to_vec(), 23, true)));
        assert!(f.contains(&(b"x-custom".to_vec(), 0, false)));
        assert_eq!(l.iter().next().and_then(|f| f.static_index()), Some(8));
        l.set(b"x-custom", b"2");
        assert_eq!(l.get(b"x-custom"), Some(&b"2"[..]));
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"1024"), Some(1024));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1,1",
            b" 1",
            b"1x",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_content_length(bad), None, "{:?}", bad);
        }
    }
}
