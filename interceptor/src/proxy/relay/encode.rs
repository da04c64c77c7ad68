//! What the relay sends, turned into bytes: frame headers, and header blocks in HPACK.
//!
//! h2's HPACK encoder indexed every field in a dynamic table and Huffman-coded every string:
//! 27% of the relay's user-space instructions per request went to encoding (callgrind, see
//! docs/benchmarks.md). Here a field is a static-table index where RFC 7541's static table
//! has it, else a literal that is never added to a table, and strings go out as they are, as
//! HAProxy does. Peers decode that with no table work at all; the price is header bytes on
//! the wire (the bench's gRPC request head is about 95 bytes, where a dynamic table gets each
//! repeated field down to a byte).
//!
//! The first header block on a connection starts with a dynamic table size update to 0, so
//! the peer's decoder never expects one later, whatever SETTINGS_HEADER_TABLE_SIZE it sends.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::frame::{self, Frame, StreamId};

use super::fields::HeaderList;
use super::read::{CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS};

/// RFC 9113 4.2: the largest frame payload a peer must accept before SETTINGS say more.
pub(crate) const DEFAULT_MAX_FRAME: usize = 16_384;

/// DATA payloads at most this long are copied behind their frame header; longer ones go out
/// as their own `Bytes` in a vectored write, without a copy.
const COPY_AT_MOST: usize = 256;

/// How many buffers one vectored write takes at most.
pub(crate) const MAX_IOVECS: usize = 64;

/// A connection's encoded bytes, waiting for its socket, in order.
pub(crate) struct Encoder {
    /// Bytes encoded since the last payload that went into `ready` as it is.
    buf: BytesMut,
    ready: VecDeque<Bytes>,
    /// The peer's SETTINGS_MAX_FRAME_SIZE.
    max_frame: usize,
    /// The dynamic table size update (to 0) went out.
    table_size_sent: bool,
    /// Bytes in `buf` and `ready`.
    pending: usize,
    /// Bytes of frames other than DATA encoded since nothing was last pending: answers
    /// (PING and SETTINGS acknowledgements, resets, window updates) and header blocks.
    answers: usize,
}

/// A frame the relay never sends (PUSH_PROMISE, PRIORITY).
#[derive(Debug)]
pub(crate) struct Unsendable;

impl Encoder {
    pub(crate) fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            ready: VecDeque::new(),
            max_frame: DEFAULT_MAX_FRAME,
            table_size_sent: false,
            pending: 0,
            answers: 0,
        }
    }

    pub(crate) fn set_max_frame(&mut self, size: usize) {
        self.max_frame = size;
    }

    /// Bytes encoded and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Bytes of frames other than DATA encoded since nothing was last pending. DATA is
    /// bounded by the peer's windows; these are not, but by how fast the peer reads.
    pub(crate) fn answers(&self) -> usize {
        self.answers
    }

    pub(crate) fn frame(&mut self, f: Frame<Bytes>) -> Result<(), Unsendable> {
        let before = self.buf.len();
        match f {
            Frame::Data(d) => {
                self.data(d);
                return Ok(());
            }
            Frame::Settings(s) => s.encode(&mut self.buf),
            Frame::WindowUpdate(w) => w.encode(&mut self.buf),
            Frame::Reset(r) => r.encode(&mut self.buf),
            Frame::Ping(p) => p.encode(&mut self.buf),
            Frame::GoAway(g) => g.encode(&mut self.buf),
            // Header blocks go through `headers`, from the relay's own `HeaderList`.
            Frame::Headers(_) | Frame::PushPromise(_) | Frame::Priority(_) => {
                return Err(Unsendable)
            }
        }
        self.count_answer(before);
        Ok(())
    }

    fn data(&mut self, d: frame::Data<Bytes>) {
        let id = d.stream_id();
        let eos = d.is_end_stream();
        let mut payload = d.into_payload();
        // Frames are relayed at the size they arrived in, which our SETTINGS keep within
        // what any peer accepts; split anyway rather than send one the peer must refuse.
        while payload.len() > self.max_frame {
            let part = payload.split_to(self.max_frame);
            self.data_frame(id, false, part);
        }
        self.data_frame(id, eos, payload);
    }

    fn data_frame(&mut self, id: StreamId, eos: bool, payload: Bytes) {
        let flags = if eos { END_STREAM } else { 0 };
        head(&mut self.buf, payload.len(), DATA, flags, id);
        self.pending += 9 + payload.len();
        if payload.len() <= COPY_AT_MOST {
            self.buf.extend_from_slice(&payload);
        } else {
            self.seal();
            self.ready.push_back(payload);
        }
    }

    /// A HEADERS frame (and CONTINUATION frames if the block needs them).
    pub(crate) fn headers(&mut self, id: StreamId, eos: bool, fields: &HeaderList) {
        let before = self.buf.len();
        self.header_frames(id, eos, fields);
        self.count_answer(before);
    }

    /// What `buf` grew by since `before` is pending, and counts as answers.
    fn count_answer(&mut self, before: usize) {
        let n = self.buf.len() - before;
        self.pending += n;
        self.answers += n;
    }

    fn header_frames(&mut self, id: StreamId, eos: bool, fields: &HeaderList) {
        // The block is encoded after a frame header whose length is filled in once known.
        let start = self.buf.len();
        self.buf.put_bytes(0, 9);
        if !self.table_size_sent {
            self.table_size_sent = true;
            int(&mut self.buf, 0x20, 5, 0);
        }
        block(&mut self.buf, fields);
        let len = self.buf.len() - start - 9;
        let flags = if eos { END_STREAM } else { 0 };
        if len <= self.max_frame {
            set_head(
                &mut self.buf[start..],
                len,
                HEADERS,
                flags | END_HEADERS,
                id,
            );
            return;
        }
        // Too long for one frame: HEADERS, then CONTINUATION frames (RFC 9113 6.10).
        let block = self.buf.split_off(start + 9).freeze();
        self.buf.truncate(start);
        let mut chunks = block.chunks(self.max_frame).peekable();
        let mut kind = HEADERS;
        let mut flags = flags;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let end = if last { END_HEADERS } else { 0 };
            head(&mut self.buf, chunk.len(), kind, flags | end, id);
            self.buf.extend_from_slice(chunk);
            kind = CONTINUATION;
            flags = 0;
        }
    }

    /// What `buf` holds goes behind everything ready, as one piece.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.ready.push_back(self.buf.split().freeze());
        }
    }

    /// Points `iov` at the pending bytes, for one vectored write; returns how many it used.
    pub(crate) fn slices<'a>(&'a mut self, iov: &mut [IoSlice<'a>; MAX_IOVECS]) -> usize {
        self.seal();
        let mut n = 0;
        for (slot, b) in iov.iter_mut().zip(self.ready.iter()) {
            *slot = IoSlice::new(b);
            n += 1;
        }
        n
    }

    /// Everything pending, as the socket would be given it (tests read what was encoded).
    #[cfg(test)]
    pub(crate) fn take_pending(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.pending() > 0 {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let used = self.slices(&mut iov);
            let before = out.len();
            for s in &iov[..used] {
                out.extend_from_slice(s);
            }
            let n = out.len() - before;
            self.advance(n);
        }
        out
    }

    /// `n` bytes of the pending ones were written.
    pub(crate) fn advance(&mut self, mut n: usize) {
        self.pending -= n;
        if self.pending == 0 {
            self.answers = 0;
        }
        while n > 0 {
            let Some(front) = self.ready.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.ready.pop_front();
        }
    }
}

/// A frame header (RFC 9113 4.1).
fn head(dst: &mut BytesMut, len: usize, kind: u8, flags: u8, id: StreamId) {
    dst.put_uint(len as u64, 3);
    dst.put_u8(kind);
    dst.put_u8(flags);
    dst.put_u32(u32::from(id));
}

fn set_head(dst: &mut [u8], len: usize, kind: u8, flags: u8, id: StreamId) {
    dst[..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    dst[3] = kind;
    dst[4] = flags;
    dst[5..9].copy_from_slice(&u32::from(id).to_be_bytes());
}

/// The header block, its fields in the order they came (pseudo-header fields first, as the
/// reader checked or the proxy built them).
fn block(dst: &mut BytesMut, fields: &HeaderList) {
    for f in fields.iter() {
        // A field that came never-indexed leaves the same way (RFC 7541 6.2.3), even where
        // the static table has it whole (`authorization` with an empty value).
        if let Some(i) = f.static_index().filter(|_| !f.sensitive) {
            indexed(dst, i as usize);
        } else if f.name_index > 0 {
            literal_indexed_name(dst, f.name_index as usize, f.value, f.sensitive);
        } else {
            literal_new_name(dst, f.name, f.value, f.sensitive);
        }
    }
}

/// An indexed header field (RFC 7541 6.1).
fn indexed(dst: &mut BytesMut, index: usize) {
    int(dst, 0x80, 7, index);
}

/// A literal field, never entered in a table (RFC 7541 6.2.2 and 6.2.3: a sensitive value
/// is marked so that intermediaries never index it either).
fn literal_indexed_name(dst: &mut BytesMut, index: usize, value: &[u8], sensitive: bool) {
    int(dst, if sensitive { 0x10 } else { 0x00 }, 4, index);
    string(dst, value);
}

fn literal_new_name(dst: &mut BytesMut, name: &[u8], value: &[u8], sensitive: bool) {
    dst.put_u8(if sensitive { 0x10 } else { 0x00 });
    string(dst, name);
    string(dst, value);
}

/// A string literal, not Huffman-coded (RFC 7541 5.2).
fn string(dst: &mut BytesMut, s: &[u8]) {
    int(dst, 0x00, 7, s.len());
    dst.extend_from_slice(s);
}

/// An integer with an N-bit prefix (RFC 7541 5.1); `flags` are the first byte's other bits.
fn int(dst: &mut BytesMut, flags: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        dst.put_u8(flags | v as u8);
        return;
    }
    dst.put_u8(flags | max as u8);
    v -= max;
    while v >= 128 {
        dst.put_u8((v % 128) as u8 | 0x80);
        v /= 128;
    }
    dst.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    //! Encoded here, decoded by h2's codec: a decoder that is not ours says the bytes are
    //! right.
    use super::*;
    use futures_util::StreamExt;
    use h2::Codec;
    use http::{HeaderMap, HeaderValue, Method, StatusCode};

    /// Decodes what `enc` holds with h2's codec, as the peer would.
    async fn decode(enc: &mut Encoder, max_frame: usize) -> Vec<Frame> {
        let bytes = enc.take_pending();
        assert_eq!(enc.pending(), 0);
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut ours, &bytes)
            .await
            .expect("write");
        drop(ours);
        let mut codec: Codec<_, Bytes> = Codec::with_max_recv_frame_size(theirs, max_frame);
        let mut frames = Vec::new();
        while let Some(f) = codec.next().await {
            frames.push(f.expect("h2 decodes what we encoded"));
        }
        frames
    }

    fn id(n: u32) -> StreamId {
        StreamId::from(n)
    }

    fn request(path: &str, fields: &HeaderMap) -> HeaderList {
        let mut l = HeaderList::new();
        l.push(b":method", b"POST", false);
        l.push(b":scheme", b"http", false);
        l.push(b":authority", b"svc.ns:50051", false);
        l.push(b":path", path.as_bytes(), false);
        for (n, v) in fields {
            l.push(n.as_str().as_bytes(), v.as_bytes(), v.is_sensitive());
        }
        l
    }

    #[tokio::test]
    async fn request_and_response_heads_decode_to_what_was_encoded() {
        let mut fields = HeaderMap::new();
        fields.insert("content-type", HeaderValue::from_static("application/grpc"));
        fields.insert("te", HeaderValue::from_static("trailers"));
        fields.append("x-many", HeaderValue::from_static("one"));
        fields.append("x-many", HeaderValue::from_static("two"));
        let mut secret = HeaderValue::from_static("Bearer t0ken");
        secret.set_sensitive(true);
        fields.insert("authorization", secret);
        fields.insert(
            "x-long",
            HeaderValue::from_str(&"v".repeat(300)).expect("value"),
        );
        let mut enc = Encoder::new();
        enc.headers(id(1), false, &request("/pkg.Svc/Call", &fields));
        enc.headers(
            id(3),
            true,
            &HeaderList::response(StatusCode::OK, &HeaderMap::new()),
        );
        let teapot = HeaderList::response(StatusCode::IM_A_TEAPOT, &HeaderMap::new());
        enc.headers(id(5), false, &teapot);
        let frames = decode(&mut enc, DEFAULT_MAX_FRAME).await;
        assert_eq!(frames.len(), 3);
        let mut heads = frames.into_iter().map(|f| match f {
            Frame::Headers(h) => (h.stream_id(), h.is_end_stream(), h.into_parts()),
            other => panic!("not HEADERS: {other:?}"),
        });
        let (sid, eos, (pseudo, got)) = heads.next().expect("request");
        assert_eq!((sid, eos), (id(1), false));
        assert_eq!(got, fields);
        assert_eq!(pseudo.method, Some(Method::POST));
        let text = |v: &Option<frame::BytesStr>| v.as_ref().map(|p| p.to_string());
        assert_eq!(text(&pseudo.path).as_deref(), Some("/pkg.Svc/Call"));
        assert_eq!(text(&pseudo.authority).as_deref(), Some("svc.ns:50051"));
        assert_eq!(text(&pseudo.scheme).as_deref(), Some("http"));
        let (_, eos, (pseudo, _)) = heads.next().expect("response");
        assert!(eos);
        assert_eq!(pseudo.status, Some(StatusCode::OK));
        let (_, _, (pseudo, _)) = heads.next().expect("response");
        assert_eq!(pseudo.status, Some(StatusCode::IM_A_TEAPOT));
    }

    #[tokio::test]
    async fn a_block_longer_than_a_frame_goes_on_in_continuation_frames() {
        let mut fields = HeaderMap::new();
        for i in 0..40 {
            let name =
                http::HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).expect("name");
            fields.insert(
                name,
                HeaderValue::from_str(&"a".repeat(1000)).expect("value"),
            );
        }
        let mut enc = Encoder::new();
        enc.headers(id(1), true, &request("/", &fields));
        // 40 kB of fields: HEADERS and two CONTINUATION frames of at most 16 KiB.
        let wire = enc.pending();
        assert!(wire > 2 * DEFAULT_MAX_FRAME, "{wire}");
        let frames = decode(&mut enc, DEFAULT_MAX_FRAME).await;
        assert_eq!(
            frames.len(),
            1,
            "h2 joins the CONTINUATION frames into one HEADERS"
        );
        let Some(Frame::Headers(h)) = frames.into_iter().next() else {
            panic!("not HEADERS");
        };
        assert!(h.is_end_stream());
        assert_eq!(h.into_fields(), fields);
    }

    #[tokio::test]
    async fn data_is_copied_when_small_passed_on_when_large_and_split_to_the_frame_limit() {
        let mut enc = Encoder::new();
        enc.set_max_frame(DEFAULT_MAX_FRAME);
        let small = Bytes::from_static(b"hello");
        let large = Bytes::from(vec![7u8; 40_000]);
        enc.frame(frame::Data::new(id(1), small.clone()).into())
            .expect("encode");
        let mut last = frame::Data::new(id(1), large.clone());
        last.set_end_stream(true);
        enc.frame(last.into()).expect("encode");
        assert_eq!(enc.pending(), 9 + 5 + 3 * 9 + 40_000);
        let frames = decode(&mut enc, DEFAULT_MAX_FRAME).await;
        let mut got = Vec::new();
        let mut ends = Vec::new();
        for f in frames {
            let Frame::Data(d) = f else {
                panic!("not DATA: {f:?}");
            };
            assert!(d.payload().len() <= DEFAULT_MAX_FRAME);
            ends.push(d.is_end_stream());
            got.extend_from_slice(d.payload());
        }
        assert_eq!(ends, [false, false, false, true]);
        assert_eq!(&got[..5], b"hello");
        assert_eq!(&got[5..], &large[..]);
    }

    #[tokio::test]
    async fn control_frames_and_partial_writes() {
        let mut enc = Encoder::new();
        let mut s = frame::Settings::default();
        s.set_initial_window_size(Some(1 << 20));
        enc.frame(s.into()).expect("encode");
        enc.frame(frame::WindowUpdate::new(StreamId::zero(), 1000).into())
            .expect("encode");
        enc.frame(frame::Reset::new(id(1), h2::Reason::CANCEL).into())
            .expect("encode");
        enc.frame(frame::Ping::new([1; 8]).into()).expect("encode");
        enc.frame(frame::GoAway::new(id(1), h2::Reason::NO_ERROR).into())
            .expect("encode");
        enc.frame(frame::Data::new(id(3), Bytes::from(vec![1u8; 1000])).into())
            .expect("encode");
        // A socket that takes a few bytes at a time.
        let total = enc.pending();
        let mut bytes = Vec::new();
        while enc.pending() > 0 {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            enc.slices(&mut iov);
            let first = iov[0].to_vec();
            let n = first.len().min(7);
            bytes.extend_from_slice(&first[..n]);
            enc.advance(n);
        }
        assert_eq!(bytes.len(), total);
        let mut again = Encoder::new();
        for b in bytes.chunks(1) {
            again.buf.extend_from_slice(b);
            again.pending += 1;
        }
        let frames = decode(&mut again, DEFAULT_MAX_FRAME).await;
        let kinds: Vec<&str> = frames
            .iter()
            .map(|f| match f {
                Frame::Settings(_) => "settings",
                Frame::WindowUpdate(_) => "window",
                Frame::Reset(_) => "reset",
                Frame::Ping(_) => "ping",
                Frame::GoAway(_) => "goaway",
                Frame::Data(_) => "data",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            ["settings", "window", "reset", "ping", "goaway", "data"]
        );
    }

    #[test]
    fn answers_count_every_frame_but_data_until_everything_is_written() {
        let mut enc = Encoder::new();
        enc.frame(frame::Data::new(id(1), Bytes::from(vec![0u8; 4000])).into())
            .expect("encode");
        assert_eq!(enc.answers(), 0, "DATA is bounded by windows, not counted");
        enc.frame(frame::Ping::pong([7; 8]).into()).expect("encode");
        enc.frame(frame::Reset::new(id(3), h2::Reason::CANCEL).into())
            .expect("encode");
        assert_eq!(enc.answers(), 17 + 13);
        // Part of the backlog written: the answers still wait.
        enc.advance(100);
        assert_eq!(enc.answers(), 30);
        let rest = enc.pending();
        enc.advance(rest);
        assert_eq!(enc.answers(), 0);
    }

    #[test]
    fn a_sensitive_value_is_marked_never_indexed() {
        let mut fields = HeaderMap::new();
        let mut secret = HeaderValue::from_static("Bearer t0ken");
        secret.set_sensitive(true);
        fields.insert("authorization", secret);
        fields.insert("x-plain", HeaderValue::from_static("v"));
        let mut b = BytesMut::new();
        block(&mut b, &HeaderList::from_map(&fields));
        // authorization is static index 23: 0x10 | 15, then 23 - 15; its value as it is.
        let mut want = vec![0x1f, 8, 12];
        want.extend_from_slice(b"Bearer t0ken");
        // x-plain: a literal with a new name, without indexing.
        want.extend_from_slice(&[0x00, 7]);
        want.extend_from_slice(b"x-plain");
        want.extend_from_slice(&[1, b'v']);
        assert_eq!(&b[..], &want[..]);
        // The static table holds `authorization` with an empty value whole; sensitive, it
        // is still a never-indexed literal, not that index.
        let mut l = HeaderList::new();
        l.push(b"authorization", b"", true);
        l.push(b"authorization", b"", false);
        let mut b = BytesMut::new();
        block(&mut b, &l);
        assert_eq!(&b[..], &[0x1f, 8, 0, 0x80 | 23]);
    }

    #[test]
    fn integers_past_their_prefix_take_continuation_bytes() {
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut b = BytesMut::new();
        int(&mut b, 0, 5, 1337);
        assert_eq!(&b[..], &[31, 154, 10]);
        let mut b = BytesMut::new();
        int(&mut b, 0x80, 7, 127);
        assert_eq!(&b[..], &[0xff, 0]);
    }
}
