//! The benchmark's backend pods (`icp-pod h2serve`): a gRPC-shaped HTTP/2 responder at frame
//! level, on h2's codec (h2's framing and HPACK, no stream tasks). For every request it reads to
//! the request's end, then answers 200, a 7-byte message and `grpc-status: 0` trailers.
//!
//! Why frame level: the backends share CPU 0 with the load generator, and with h2's
//! high-level server (a task per stream, a wake-up per body) they were the most expensive part
//! of the whole setup, so the saturation phases measured the backends rather than the proxies
//! on CPU 1. This responder reads everything readable, answers it, and writes once per batch.
//!
//! Scope: what the bench's clients and proxies send. Stream windows of fewer than 7 bytes
//! (`SETTINGS_INITIAL_WINDOW_SIZE` < 7) are not supported: the connection is closed with a
//! message rather than answered out of window.

use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use h2::frame::{self, Frame, StreamId};
use h2::Codec;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The answer's one gRPC message: uncompressed, 2 bytes.
const MESSAGE: &[u8] = b"\0\0\0\0\x02ok";
/// What we let a client send before it hears from us: 1 MiB per stream, 4 MiB per connection.
const STREAM_WINDOW: u32 = 1 << 20;
const CONN_WINDOW: u32 = 1 << 22;
const DEFAULT_WINDOW: u32 = 65_535;

/// Serves on `listener` until it fails. `served` counts requests (at their HEADERS);
/// `first_unix_us` is stamped with the first one's wall-clock time.
pub async fn serve(listener: TcpListener, served: Arc<AtomicU64>, first_unix_us: Arc<AtomicU64>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let (served, first) = (served.clone(), first_unix_us.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, served, first).await {
                // The bench reads the backends' stderr when something fails.
                eprintln!("h2serve: connection ended: {e}");
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    served: Arc<AtomicU64>,
    first_unix_us: Arc<AtomicU64>,
) -> io::Result<()> {
    let mut preface = [0u8; 24];
    stream.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::other("not an HTTP/2 connection preface"));
    }
    let mut settings = frame::Settings::default();
    settings.set_initial_window_size(Some(STREAM_WINDOW));
    settings.set_max_concurrent_streams(Some(1000));
    let mut conn = Conn {
        codec: Codec::new(stream),
        out: VecDeque::new(),
        open: HashSet::new(),
        blocked: VecDeque::new(),
        send_window: i64::from(DEFAULT_WINDOW),
        unreleased: 0,
        peer_done: false,
        served,
        first_unix_us,
        content_type: HeaderMap::from_iter([(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        )]),
        status_ok: HeaderMap::from_iter([(
            http::HeaderName::from_static("grpc-status"),
            HeaderValue::from_static("0"),
        )]),
    };
    conn.out.push_back(settings.into());
    conn.out
        .push_back(frame::WindowUpdate::new(StreamId::zero(), CONN_WINDOW - DEFAULT_WINDOW).into());
    poll_fn(|cx| conn.drive(cx)).await
}

struct Conn {
    codec: Codec<TcpStream, Bytes>,
    /// Frames waiting for room in the codec's write buffer; reading pauses until it is empty.
    out: VecDeque<Frame<Bytes>>,
    /// Requests whose HEADERS came and whose end did not.
    open: HashSet<StreamId>,
    /// Answers waiting for connection window (the peer's WINDOW_UPDATE).
    blocked: VecDeque<StreamId>,
    /// What the peer lets us send on the connection.
    send_window: i64,
    /// Request bytes received and not yet given back with a WINDOW_UPDATE.
    unreleased: u32,
    /// The peer sent GOAWAY: finish writing, then close.
    peer_done: bool,
    served: Arc<AtomicU64>,
    first_unix_us: Arc<AtomicU64>,
    content_type: HeaderMap,
    status_ok: HeaderMap,
}

impl Conn {
    /// Reads every frame that is readable, queues the answers, and writes once per batch.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while let Some(f) = self.out.pop_front() {
                match self.codec.poll_ready(cx) {
                    Poll::Ready(Ok(())) => self.codec.buffer(f).map_err(io::Error::other)?,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.out.push_front(f);
                        return Poll::Pending;
                    }
                }
            }
            if self.peer_done {
                // Answers already queued went out above; no new stream will come.
                ready!(self.codec.flush(cx))?;
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.codec).poll_next(cx) {
                Poll::Ready(Some(Ok(f))) => self.on_frame(f)?,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(io::Error::other(format!("{e:?}"))))
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    ready!(self.codec.flush(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }

    fn on_frame(&mut self, f: Frame) -> io::Result<()> {
        match f {
            Frame::Headers(h) => {
                let id = h.stream_id();
                // A second HEADERS on an open stream is the request's trailers.
                if !self.open.remove(&id) {
                    if self.served.fetch_add(1, Ordering::Relaxed) == 0 {
                        self.first_unix_us
                            .store(crate::unix_micros(), Ordering::Relaxed);
                    }
                    if !h.is_end_stream() {
                        self.open.insert(id);
                        return Ok(());
                    }
                } else if !h.is_end_stream() {
                    return Err(io::Error::other("trailers without END_STREAM"));
                }
                self.answer(id);
            }
            Frame::Data(d) => {
                let (id, end, len) = (d.stream_id(), d.is_end_stream(), d.payload().len() as u32);
                self.unreleased += len;
                if self.unreleased >= CONN_WINDOW / 4 {
                    let n = std::mem::take(&mut self.unreleased);
                    self.out
                        .push_back(frame::WindowUpdate::new(StreamId::zero(), n).into());
                }
                if end {
                    if self.open.remove(&id) {
                        self.answer(id);
                    }
                } else if len > 0 && self.open.contains(&id) {
                    // Long request bodies keep flowing.
                    self.out.push_back(frame::WindowUpdate::new(id, len).into());
                }
            }
            Frame::Settings(s) if !s.is_ack() => {
                if s.initial_window_size()
                    .is_some_and(|w| (w as usize) < MESSAGE.len())
                {
                    return Err(io::Error::other(
                        "peer's initial stream window is smaller than the answer (unsupported)",
                    ));
                }
                ack_settings(&mut self.codec, &mut self.out, &s);
            }
            Frame::Ping(p) if !p.is_ack() => pong(&mut self.out, &p),
            Frame::WindowUpdate(w) if w.stream_id().is_zero() => {
                self.send_window += i64::from(w.size_increment());
                while self.send_window >= MESSAGE.len() as i64 {
                    let Some(id) = self.blocked.pop_front() else {
                        break;
                    };
                    self.send_body(id);
                }
            }
            Frame::Reset(r) => {
                self.open.remove(&r.stream_id());
                self.blocked.retain(|id| *id != r.stream_id());
            }
            Frame::GoAway(_) => self.peer_done = true,
            _ => {}
        }
        Ok(())
    }

    fn answer(&mut self, id: StreamId) {
        let head = frame::Headers::new(
            id,
            frame::Pseudo::response(StatusCode::OK),
            self.content_type.clone(),
        );
        self.out.push_back(head.into());
        if self.blocked.is_empty() && self.send_window >= MESSAGE.len() as i64 {
            self.send_body(id);
        } else {
            self.blocked.push_back(id);
        }
    }

    fn send_body(&mut self, id: StreamId) {
        self.send_window -= MESSAGE.len() as i64;
        self.out
            .push_back(frame::Data::new(id, Bytes::from_static(MESSAGE)).into());
        let mut trailers = frame::Headers::trailers(id, self.status_ok.clone());
        trailers.set_end_stream();
        self.out.push_back(trailers.into());
    }
}

/// What any HTTP/2 peer owes a SETTINGS frame (shared with the open-loop client): the peer's
/// header table size applied to our HPACK encoder, and the acknowledgement.
pub(crate) fn ack_settings<T>(
    codec: &mut Codec<T, Bytes>,
    out: &mut VecDeque<Frame<Bytes>>,
    s: &frame::Settings,
) {
    if let Some(size) = s.header_table_size() {
        codec.set_send_header_table_size(size as usize);
    }
    out.push_back(frame::Settings::ack().into());
}

/// A PING's answer.
pub(crate) fn pong(out: &mut VecDeque<Frame<Bytes>>, p: &frame::Ping) {
    out.push_back(frame::Ping::pong(*p.payload()).into());
}
