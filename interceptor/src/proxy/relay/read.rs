//! What a peer sends, read off the socket and split into frames (RFC 9113 4 and 6): header
//! blocks are decoded by `hpack` into `HeaderList`s and checked (RFC 9113 8.2 and 8.3);
//! DATA payloads are slices of the read buffer, passed on without a copy; control frames are
//! parsed by h2's `frame` types.
//!
//! Errors are the protocol's: a malformed message resets its stream, anything that breaks the
//! connection's framing or its HPACK state ends the connection with the RFC's code.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use h2::frame::{self, StreamId};
use h2::Reason;
use tokio::io::AsyncRead;

use super::fields::{Block, HeaderList};
use super::hpack::Decoder;

/// RFC 9113 4.2: SETTINGS_MAX_FRAME_SIZE's default, which our SETTINGS keep.
pub(crate) const MAX_FRAME: usize = 16_384;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8 * 1024;

const HEAD_LEN: usize = 9;

/// Frame types and flags (RFC 9113 6), shared with `encode`.
pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// A frame read, in the shape the relay uses it.
pub(crate) enum In {
    Headers {
        block: Block,
        /// The header list passed our SETTINGS_MAX_HEADER_LIST_SIZE: fields past it were
        /// dropped (a request gets 431, as from h2's server).
        over_size: bool,
    },
    Data {
        data: frame::Data<bytes::Bytes>,
        /// The padding stripped (with its length byte): it counts against the flow-control
        /// windows like the payload (RFC 9113 6.1), and is given back at once.
        padding: u32,
    },
    Reset(frame::Reset),
    WindowUpdate(frame::WindowUpdate),
    Settings(frame::Settings),
    Ping(frame::Ping),
    GoAway(frame::GoAway),
    PushPromise,
    Priority,
}

#[derive(Debug)]
pub(crate) enum ReadError {
    /// A stream error: that stream is reset with this code, the connection goes on.
    Stream(StreamId, Reason),
    /// A connection error: GOAWAY with this code, then close.
    Conn(Reason),
    Io(io::Error),
}

/// A HEADERS frame whose block goes on in CONTINUATION frames.
struct Partial {
    id: StreamId,
    eos: bool,
    block: Vec<u8>,
    self_dependent: bool,
}

thread_local! {
    /// An emptied read buffer, left by the last connection on this worker that had nothing
    /// more to read: the next one to read takes it, so that idle connections hold none.
    static SPARE: Cell<BytesMut> = Cell::new(BytesMut::new());
}

pub(crate) struct Reader {
    buf: BytesMut,
    hpack: Decoder,
    max_list: usize,
    /// The most a header block may take on the wire, CONTINUATION frames included, before
    /// the connection is told to go away.
    max_block: usize,
    partial: Option<Partial>,
    /// A connection error was returned: what follows is read and dropped, and the end of the
    /// stream is `None` (a connection that is closing reads until the peer closes).
    failed: bool,
}

impl Reader {
    /// `max_list`: our SETTINGS_MAX_HEADER_LIST_SIZE.
    pub(crate) fn new(max_list: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            hpack: Decoder::new(),
            max_list,
            // HPACK rarely makes a list larger on the wire than decoded: twice the list's
            // limit leaves room for an over-size list to be decoded (and answered with 431)
            // and bounds what a block that never ends can hold.
            max_block: max_list.saturating_mul(2).max(MAX_FRAME),
            partial: None,
            failed: false,
        }
    }

    /// The next frame, `None` once the peer closed between frames.
    pub(crate) fn poll_next<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<In, ReadError>>> {
        let r = self.poll_frame(io, cx);
        if let Poll::Ready(Some(Err(ReadError::Conn(_) | ReadError::Io(_)))) = &r {
            self.failed = true;
            self.partial = None;
        }
        r
    }

    fn poll_frame<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<In, ReadError>>> {
        loop {
            if self.failed {
                self.buf.clear();
            }
            let want = match self.next_frame_len() {
                Ok(Some(len)) => {
                    let f = self.buf.split_to(HEAD_LEN + len);
                    match self.parse(f) {
                        Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                        Ok(None) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                Ok(None) => self.bytes_missing(),
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            if self.buf.capacity() == 0 {
                self.buf = SPARE.with(|s| s.take());
            }
            self.buf.reserve(want.max(READ_SIZE));
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut self.buf) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    self.release_if_empty();
                    return Poll::Pending;
                }
            };
            match n {
                Ok(0) => {
                    let clean = self.buf.is_empty() && self.partial.is_none();
                    self.buf.clear();
                    return Poll::Ready(if clean || self.failed {
                        None
                    } else {
                        Some(Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())))
                    });
                }
                Ok(_) => crate::proxy::busy_poll::read_done(),
                Err(e) => return Poll::Ready(Some(Err(ReadError::Io(e)))),
            }
        }
    }

    /// Nothing is left to parse: the buffer goes to the worker's spare.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            let buf = std::mem::take(&mut self.buf);
            SPARE.with(|s| {
                let old = s.take();
                // Keep the larger: it is the one more likely to be reused without growing.
                s.set(if old.capacity() >= buf.capacity() {
                    old
                } else {
                    buf
                });
            });
        }
    }

    /// The payload length of the frame at the front, once all of it is buffered.
    fn next_frame_len(&self) -> Result<Option<usize>, ReadError> {
        if self.buf.len() < HEAD_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
        if len > MAX_FRAME {
            return Err(ReadError::Conn(Reason::FRAME_SIZE_ERROR));
        }
        Ok((self.buf.len() >= HEAD_LEN + len).then_some(len))
    }

    /// Bytes still to come of the frame at the front.
    fn bytes_missing(&self) -> usize {
        if self.buf.len() < HEAD_LEN {
            return HEAD_LEN - self.buf.len();
        }
        let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
        HEAD_LEN + len - self.buf.len()
    }

    fn parse(&mut self, mut f: BytesMut) -> Result<Option<In>, ReadError> {
        let kind = f[3];
        let flags = f[4];
        let id = StreamId::from(u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff);
        if self.partial.is_some() && kind != CONTINUATION {
            return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
        }
        let head = frame::Head::parse(&f[..HEAD_LEN]);
        let conn_err = |e| ReadError::Conn(load_error(kind, &f[HEAD_LEN..], e));
        let frame = match kind {
            DATA => {
                if id.is_zero() {
                    return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
                }
                f.advance(HEAD_LEN);
                let len = f.len();
                if flags & PADDED != 0 {
                    strip_padding(&mut f)?;
                }
                let padding = (len - f.len()) as u32;
                let mut data = frame::Data::new(id, f.freeze());
                data.set_end_stream(flags & END_STREAM != 0);
                In::Data { data, padding }
            }
            HEADERS => return self.headers(id, flags, f),
            CONTINUATION => return self.continuation(id, flags, &f[HEAD_LEN..]),
            PRIORITY => {
                if id.is_zero() {
                    return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
                }
                // RFC 9113 6.3 and 5.3.1: a bad PRIORITY is that stream's error.
                match frame::Priority::load(head, &f[HEAD_LEN..]) {
                    Ok(_) => In::Priority,
                    Err(frame::Error::InvalidDependencyId) => {
                        return Err(ReadError::Stream(id, Reason::PROTOCOL_ERROR))
                    }
                    Err(_) => return Err(ReadError::Stream(id, Reason::FRAME_SIZE_ERROR)),
                }
            }
            RST_STREAM => {
                if id.is_zero() {
                    return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
                }
                In::Reset(frame::Reset::load(head, &f[HEAD_LEN..]).map_err(conn_err)?)
            }
            SETTINGS => {
                In::Settings(frame::Settings::load(head, &f[HEAD_LEN..]).map_err(conn_err)?)
            }
            PING => In::Ping(frame::Ping::load(head, &f[HEAD_LEN..]).map_err(conn_err)?),
            GOAWAY => In::GoAway(frame::GoAway::load(head, &f[HEAD_LEN..]).map_err(conn_err)?),
            WINDOW_UPDATE => match frame::WindowUpdate::load(head, &f[HEAD_LEN..]) {
                Ok(w) => In::WindowUpdate(w),
                // RFC 9113 6.9: an increment of 0 is a stream error on a stream.
                Err(frame::Error::InvalidWindowUpdateValue) if !id.is_zero() => {
                    return Err(ReadError::Stream(id, Reason::PROTOCOL_ERROR))
                }
                Err(e) => return Err(conn_err(e)),
            },
            PUSH_PROMISE => In::PushPromise,
            // Unknown frame types are ignored (RFC 9113 4.1).
            _ => return Ok(None),
        };
        Ok(Some(frame))
    }

    fn headers(
        &mut self,
        id: StreamId,
        flags: u8,
        mut f: BytesMut,
    ) -> Result<Option<In>, ReadError> {
        if id.is_zero() {
            return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
        }
        f.advance(HEAD_LEN);
        if flags & PADDED != 0 {
            strip_padding(&mut f)?;
        }
        let mut self_dependent = false;
        if flags & PRIORITY_FLAG != 0 {
            if f.len() < 5 {
                return Err(ReadError::Conn(Reason::FRAME_SIZE_ERROR));
            }
            let dep = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) & 0x7fff_ffff;
            self_dependent = dep == u32::from(id);
            f.advance(5);
        }
        let eos = flags & END_STREAM != 0;
        if flags & END_HEADERS == 0 {
            if f.len() > self.max_block {
                return Err(ReadError::Conn(Reason::ENHANCE_YOUR_CALM));
            }
            self.partial = Some(Partial {
                id,
                eos,
                block: f.to_vec(),
                self_dependent,
            });
            return Ok(None);
        }
        self.block(id, eos, &f, self_dependent).map(Some)
    }

    fn continuation(
        &mut self,
        id: StreamId,
        flags: u8,
        fragment: &[u8],
    ) -> Result<Option<In>, ReadError> {
        let Some(p) = &mut self.partial else {
            return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
        };
        if p.id != id {
            return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
        }
        if p.block.len() + fragment.len() > self.max_block {
            return Err(ReadError::Conn(Reason::ENHANCE_YOUR_CALM));
        }
        p.block.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        self.block(p.id, p.eos, &p.block, p.self_dependent)
            .map(Some)
    }

    /// A whole header block: decoded (always, to keep the table in step), then checked.
    fn block(
        &mut self,
        id: StreamId,
        eos: bool,
        src: &[u8],
        self_dependent: bool,
    ) -> Result<In, ReadError> {
        let mut fields = HeaderList::new();
        let decoded = self
            .hpack
            .decode(src, self.max_list, &mut fields)
            .map_err(|e| {
                tracing::debug!(why = e.0, "undecodable header block");
                ReadError::Conn(Reason::COMPRESSION_ERROR)
            })?;
        if self_dependent {
            return Err(ReadError::Stream(id, Reason::PROTOCOL_ERROR));
        }
        if !decoded.over_size {
            if let Err(why) = decoded.malformed.map_or_else(|| check_order(&fields), Err) {
                tracing::debug!(why, "malformed header block");
                return Err(ReadError::Stream(id, Reason::PROTOCOL_ERROR));
            }
        }
        Ok(In::Headers {
            block: Block { id, eos, fields },
            over_size: decoded.over_size,
        })
    }
}

/// The RFC's code for a control frame h2's `frame` types refused (RFC 9113 6): a length
/// the frame cannot have is FRAME_SIZE_ERROR, SETTINGS_INITIAL_WINDOW_SIZE past 2^31-1 is
/// FLOW_CONTROL_ERROR (6.5.2), the rest PROTOCOL_ERROR.
fn load_error(kind: u8, payload: &[u8], e: frame::Error) -> Reason {
    match e {
        frame::Error::BadFrameSize
        | frame::Error::InvalidPayloadLength
        | frame::Error::InvalidPayloadAckSettings => Reason::FRAME_SIZE_ERROR,
        frame::Error::InvalidSettingValue
            if kind == SETTINGS
                && payload.chunks_exact(6).any(|s| {
                    u16::from_be_bytes([s[0], s[1]]) == 0x4
                        && u32::from_be_bytes([s[2], s[3], s[4], s[5]]) > 0x7fff_ffff
                }) =>
        {
            Reason::FLOW_CONTROL_ERROR
        }
        _ => Reason::PROTOCOL_ERROR,
    }
}

/// A frame's padding (RFC 9113 6.1): the length byte and the padding go, the rest stays.
fn strip_padding(f: &mut BytesMut) -> Result<(), ReadError> {
    let Some(&pad) = f.first() else {
        return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
    };
    if pad as usize >= f.len() {
        return Err(ReadError::Conn(Reason::PROTOCOL_ERROR));
    }
    f.advance(1);
    f.truncate(f.len() - pad as usize);
    Ok(())
}

/// RFC 9113 8.3: pseudo-header fields come first, each at most once. (What makes a single
/// field malformed the decoder found, see `fields::field_error`.)
fn check_order(fields: &HeaderList) -> Result<(), &'static str> {
    let mut regular = false;
    let mut seen = 0u8;
    for f in fields.iter() {
        if f.name.first() != Some(&b':') {
            regular = true;
            continue;
        }
        if regular {
            return Err("pseudo-header field after a regular one");
        }
        // By static index: :authority 1, :method 2, :path 4, :scheme 6, :status 8; only
        // :protocol has none.
        let bit = match f.name_index {
            0 => 1 << 7,
            i => 1 << (i / 2),
        };
        if seen & bit != 0 {
            return Err("repeated pseudo-header field");
        }
        seen |= bit;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Reads every frame of `bytes` (delivered in pieces of `step` bytes).
    async fn read_all(bytes: Vec<u8>, step: usize) -> Vec<Result<In, ReadError>> {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            for chunk in bytes.chunks(step) {
                // The reader stops at a connection error, with bytes unread.
                if tokio::io::AsyncWriteExt::write_all(&mut tx, chunk)
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        let mut r = Reader::new(1 << 16);
        let mut out = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| r.poll_next(&mut rx, cx)).await {
            let stop = matches!(f, Err(ReadError::Conn(_)) | Err(ReadError::Io(_)));
            out.push(f);
            if stop {
                break;
            }
        }
        out
    }

    const GET: &[u8] = &[0x82, 0x86, 0x84, 0x41, 0x03, b'a', b'.', b'b'];

    #[tokio::test]
    async fn frames_come_whole_however_the_bytes_arrive() {
        let mut bytes = frame(HEADERS, END_HEADERS, 1, GET);
        bytes.extend(frame(DATA, END_STREAM | PADDED, 1, &[2, b'h', b'i', 0, 0]));
        bytes.extend(frame(0xfa, 0, 0, b"unknown"));
        bytes.extend(frame(PING, 0, 0, b"12345678"));
        for step in [1, 7, 1000] {
            let got = read_all(bytes.clone(), step).await;
            assert_eq!(got.len(), 3, "step {step}");
            let Ok(In::Headers { block, over_size }) = &got[0] else {
                panic!("headers first");
            };
            assert!(!over_size && !block.eos);
            assert_eq!(block.fields.get(b":authority"), Some(&b"a.b"[..]));
            let Ok(In::Data { data: d, padding }) = &got[1] else {
                panic!("data second")
            };
            assert_eq!(&d.payload()[..], b"hi");
            assert_eq!(*padding, 3, "the length byte and two bytes of padding");
            assert!(d.is_end_stream());
            assert!(matches!(&got[2], Ok(In::Ping(p)) if p.payload() == b"12345678"));
        }
    }

    #[tokio::test]
    async fn continuation_frames_complete_a_block() {
        let mut bytes = frame(HEADERS, END_STREAM, 3, &GET[..3]);
        bytes.extend(frame(CONTINUATION, 0, 3, &GET[3..5]));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 3, &GET[5..]));
        let got = read_all(bytes, 4).await;
        let Ok(In::Headers { block, .. }) = &got[0] else {
            panic!("{:?}", got[0].as_ref().err());
        };
        assert!(block.eos);
        assert_eq!(block.fields.len(), 4);
    }

    #[tokio::test]
    async fn protocol_errors_have_the_rfc_codes() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(DATA, 0, 0, b"x"), "conn 1"),
            (frame(HEADERS, END_HEADERS, 0, GET), "conn 1"),
            (
                [frame(HEADERS, 0, 1, GET), frame(PING, 0, 0, b"12345678")].concat(),
                "conn 1",
            ),
            (frame(CONTINUATION, END_HEADERS, 1, GET), "conn 1"),
            (frame(DATA, PADDED, 1, &[5, 1]), "conn 1"),
            (frame(HEADERS, END_HEADERS, 1, &[0x80]), "conn 9"),
            (frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0]), "conn 1"),
            // RFC 9113 6.9: on a stream, an increment of 0 is that stream's error.
            (frame(WINDOW_UPDATE, 0, 1, &[0, 0, 0, 0]), "stream 1 1"),
            (frame(WINDOW_UPDATE, 0, 1, &[0, 0, 1]), "conn 6"),
            // 6.5.2: an initial window past 2^31-1; 6.5: a length not a multiple of 6, an
            // acknowledgement with a payload; a value outside its range.
            (frame(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]), "conn 3"),
            (frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0]), "conn 6"),
            (frame(SETTINGS, 1, 0, &[0, 4, 0, 0, 0, 1]), "conn 6"),
            (frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2]), "conn 1"),
            // 6.7, 6.4, 6.8: lengths these frames cannot have; 6.4: RST_STREAM on stream 0.
            (frame(PING, 0, 0, b"1234567"), "conn 6"),
            (frame(RST_STREAM, 0, 1, &[0, 0, 8]), "conn 6"),
            (frame(RST_STREAM, 0, 0, &[0, 0, 0, 8]), "conn 1"),
            (frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0]), "conn 6"),
            // 6.3: a PRIORITY of the wrong length is its stream's error.
            (frame(PRIORITY, 0, 1, &[0, 0, 0, 3]), "stream 1 6"),
            (
                [vec![0, 0x40, 1, DATA, 0, 0, 0, 0, 1], vec![0; 0x4001]].concat(),
                "conn 6",
            ),
            (
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[GET, &[0x00, 1, b'X', 1, b'y']].concat(),
                ),
                "stream 1 1",
            ),
            (
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[GET, &[0x00, 2, b't', b'e', 1, b'x']].concat(),
                ),
                "stream 1 1",
            ),
            (
                frame(HEADERS, END_HEADERS, 1, &[GET, &[0x82]].concat()),
                "stream 1 1",
            ),
            (
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[&[0x5a, 1, b'1'][..], GET].concat(),
                ),
                "stream 1 1",
            ),
            (
                frame(
                    HEADERS,
                    END_HEADERS | PRIORITY_FLAG,
                    1,
                    &[&[0, 0, 0, 1, 16][..], GET].concat(),
                ),
                "stream 1 1",
            ),
        ];
        for (bytes, want) in cases {
            let got = read_all(bytes.clone(), 1000).await;
            let desc = match got.last() {
                Some(Err(ReadError::Conn(r))) => format!("conn {}", u32::from(*r)),
                Some(Err(ReadError::Stream(id, r))) => {
                    format!("stream {} {}", u32::from(*id), u32::from(*r))
                }
                _ => "no error".into(),
            };
            assert_eq!(desc, want, "{bytes:02x?}");
        }
    }

    #[tokio::test]
    async fn a_block_that_never_ends_is_cut_off() {
        let mut bytes = frame(HEADERS, 0, 1, GET);
        for _ in 0..20 {
            bytes.extend(frame(CONTINUATION, 0, 1, &[b'a'; 16_000]));
        }
        let got = read_all(bytes, 4096).await;
        assert!(matches!(
            got.last(),
            Some(Err(ReadError::Conn(Reason::ENHANCE_YOUR_CALM)))
        ));
    }

    #[tokio::test]
    async fn after_a_connection_error_the_rest_is_dropped_until_the_peer_closes() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        let mut bytes = vec![0, 0x40, 1, DATA, 0, 0, 0, 0, 1];
        bytes.extend(frame(PING, 0, 0, b"12345678"));
        bytes.extend_from_slice(&[0, 0, 8, PING]);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &bytes)
            .await
            .expect("write");
        drop(tx);
        let mut r = Reader::new(1 << 16);
        let first = std::future::poll_fn(|cx| r.poll_next(&mut rx, cx)).await;
        assert!(matches!(
            first,
            Some(Err(ReadError::Conn(Reason::FRAME_SIZE_ERROR)))
        ));
        // Neither the same error again nor frames after it, and the close ends the stream.
        let next = std::future::poll_fn(|cx| r.poll_next(&mut rx, cx)).await;
        assert!(next.is_none());
    }

    #[tokio::test]
    async fn the_buffer_of_a_connection_with_nothing_to_read_is_left_for_others() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &frame(PING, 0, 0, b"12345678"))
            .await
            .expect("write");
        let mut r = Reader::new(1 << 16);
        let f = std::future::poll_fn(|cx| r.poll_next(&mut rx, cx)).await;
        assert!(matches!(f, Some(Ok(In::Ping(_)))));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(r.poll_next(&mut rx, &mut cx).is_pending());
        assert_eq!(
            r.buf.capacity(),
            0,
            "an idle connection holds no read buffer"
        );
        assert!(SPARE.with(|s| {
            let b = s.take();
            let cap = b.capacity();
            s.set(b);
            cap >= READ_SIZE
        }));
    }
}
