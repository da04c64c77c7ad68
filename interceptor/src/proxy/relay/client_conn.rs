//! One client HTTP/2 connection on the relay: each new stream gets an endpoint and a stream
//! on a pooled connection to it, and its frames go there as they arrive; what comes back is
//! written to the client, within the client's windows.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use h2::frame::{self, StreamId};
use h2::Reason;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use super::super::destination::Destination;
use super::super::endpoint_stats::InFlight;
use super::super::grpc;
use super::super::h2_server::ClientWindow;
use super::super::metrics::{
    self as m, AbuseReason, ActiveStream, ServiceMetrics, Status, UnavailableReason,
};
use super::super::Shared;
use super::fields::{contradicts_length, parse_content_length, Block, HeaderList};
use super::flow::{Out, SendWindows, StreamOut, DEFAULT_WINDOW};
use super::outbox::Outbox;
use super::read::{In, ReadError};
use super::wire::Wire;
use super::{ClientLink, IdHash, RequestHead, ToClient, ToUpstream, UpLink, PREFACE};

mod attempts;

/// Frames read per turn before the task yields to others on its worker.
const READ_BUDGET: usize = 128;

/// The PING of a graceful close, and how long the client has to answer it.
const DRAIN_PING: [u8; 8] = *b"icp-bye!";
/// The PING after the final GOAWAY: once answered, the client has read the GOAWAY, and opens
/// no stream the connection could no longer refuse.
const FINAL_PING: [u8; 8] = *b"icp-end!";
const DRAIN_PING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a closed connection's last bytes from the client are waited for.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    No,
    /// GOAWAY with the largest id and a PING sent.
    Announced,
    /// GOAWAY with the last stream taken sent: the connection ends with its last stream.
    Final,
    /// Our side closed; reading what the client still sends until it closes.
    WriteClosed,
}

const GRPC_STATUS: &[u8] = grpc::GRPC_STATUS.as_bytes();
const GRPC_TIMEOUT: &[u8] = b"grpc-timeout";
const GRPC_RETRY_PUSHBACK_MS: &[u8] = grpc::GRPC_RETRY_PUSHBACK_MS.as_bytes();

/// A cancel this close to the call's deadline counts as the deadline passing.
const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_millis(20);

/// Taken off the time left that the endpoint is told (grpc-timeout), so that an endpoint that
/// honours deadlines answers DEADLINE_EXCEEDED itself before the proxy's timer fires: then
/// only an endpoint that ignores the deadline is charged with a failure.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(10);

/// Serves HTTP/2 on `io` with the relay until the client closes it, it fails, or a drain that
/// started with `shutdown` completes.
pub(crate) async fn serve<T>(
    inner: Arc<Shared>,
    dest: Arc<Destination>,
    mut io: T,
    shutdown: watch::Receiver<bool>,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut preface = [0u8; PREFACE.len()];
    match tokio::time::timeout(inner.config.connect_timeout, io.read_exact(&mut preface)).await {
        Err(_) => {
            tracing::debug!("client HTTP/2 preface timed out");
            return Ok(());
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Ok(Err(e)) => return Err(h2::proto::Error::from(e).into()),
        Ok(Ok(_)) => {}
    }
    if &preface != PREFACE {
        tracing::debug!("client sent no valid HTTP/2 preface");
        return Err(Reason::PROTOCOL_ERROR.into());
    }
    let mut conn = ClientConn::new(inner, dest, io, shutdown);
    let end = poll_fn(|cx| conn.poll(cx)).await;
    conn.close();
    end
}

/// The request as first received, kept until the response starts so that a stream the
/// endpoint never processed can go to another one.
struct Replay {
    /// `None` while an attempt carries it (the upstream connection hands it back if the
    /// endpoint never processed the stream).
    head: Option<RequestHead>,
    body: Vec<bytes::Bytes>,
    bytes: usize,
    /// The request ended (END_STREAM received).
    whole: bool,
}

/// The upstream stream currently carrying a client stream.
struct Attempt {
    link: Arc<UpLink>,
    id: StreamId,
    in_flight: InFlight,
    sent_at: Instant,
}

struct CStream {
    /// Response frames waiting for the client's window.
    out: StreamOut,
    attempt: Option<Attempt>,
    replay: Option<Replay>,
    tried: Vec<SocketAddr>,
    attempts: usize,
    grpc: bool,
    req_done: bool,
    resp_started: bool,
    resp_done: bool,
    status: Option<Status>,
    /// Request body bytes received, and credited back to the client so far.
    received: u64,
    /// The request's content-length: its DATA must add up to it (RFC 9113 8.1.1).
    content_length: Option<u64>,
    credited: u64,
    /// Credit the next attempt will give for bytes already credited by an earlier one.
    absorb: u64,
    /// Stream-level credit not yet announced.
    credit: u32,
    /// What the client may still send on the stream: our initial window and the credit
    /// announced, less what it sent.
    recv_window: i64,
    started: Instant,
    /// The endpoint answered in a way that counts against it, and how (for the ejection log).
    charge: Option<&'static str>,
    /// Answered here, not by the endpoint: its status says nothing of the endpoint.
    local: bool,
    /// The call's grpc-timeout, as an instant.
    deadline: Option<tokio::time::Instant>,
    /// The endpoint's grpc-retry-pushback-ms, with a failing status.
    pushback: Option<std::time::Duration>,
    /// The last turn anything moved on the stream (for the stream idle timeout).
    last_move: tokio::time::Instant,
    _active: ActiveStream,
}

impl CStream {
    /// Adds `n` to the stream's unannounced credit; once that reaches `at`, returns it to be
    /// announced (WINDOW_UPDATE), counted in what the client may send.
    fn add_credit(&mut self, n: u32, at: u32) -> Option<u32> {
        self.credit += n;
        if n == 0 || self.credit < at {
            return None;
        }
        let credit = std::mem::take(&mut self.credit);
        self.recv_window += credit as i64;
        Some(credit)
    }
}

struct ClientConn<T> {
    inner: Arc<Shared>,
    dest: Arc<Destination>,
    service: Arc<ServiceMetrics>,
    wire: Wire<T>,
    link: ClientLink,
    inbox: Vec<ToClient>,
    send: SendWindows,
    streams: HashMap<StreamId, CStream, IdHash>,
    /// Highest stream id the client opened.
    last_id: StreamId,
    /// Connection-level credit not yet announced.
    conn_credit: u32,
    /// What the client may still send on the connection as it sees it. Credit is announced
    /// once this falls to half the window, not once credit piles up: streams whose endpoint
    /// does not read hold their share of the window indefinitely, and the rest must still
    /// get theirs back.
    peer_window: i64,
    /// The connection's receive window: sized to the streams open (see `ClientWindow`).
    window: ClientWindow,
    window_now: u32,
    /// Credit to hold back after the window shrank: lowering takes back nothing the client
    /// was given, it releases less.
    window_owed: u32,
    /// The window grew: announce at once.
    window_grew: bool,
    stream_window: u32,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// A connection with no stream for `client_idle_timeout` gets GOAWAY.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: std::time::Duration,
    /// When a stream last ended.
    last_end: tokio::time::Instant,
    /// The time of this turn of the loop: one clock read serves every frame of the turn.
    now: tokio::time::Instant,
    /// Deadlines and the stream idle timeout: one timer for the connection, armed at the
    /// earliest instant a stream may need attention, and swept then.
    sweep: Pin<Box<tokio::time::Sleep>>,
    sweep_at: Option<tokio::time::Instant>,
    stream_idle_timeout: std::time::Duration,
    /// Where a graceful close is.
    drain: Drain,
    /// The client answered the PING sent after the final GOAWAY (or did not in time).
    final_seen: bool,
    /// A connection error: close once the GOAWAY is written.
    closing: Option<Reason>,
    resets: ResetRate,
    /// The upstream connection last used per endpoint: while it is up and has room, a stream
    /// takes it without asking the pool (a lock and a map lookup).
    links: Vec<(SocketAddr, Arc<UpLink>)>,
}

/// Client cancels per second (rapid reset, CVE-2023-44487).
struct ResetRate {
    since: Instant,
    count: u32,
    limit: u32,
}

impl ResetRate {
    fn exceeded(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.since).as_secs() >= 1 {
            self.since = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > self.limit
    }
}

impl<T> ClientConn<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    fn new(
        inner: Arc<Shared>,
        dest: Arc<Destination>,
        io: T,
        mut shutdown: watch::Receiver<bool>,
    ) -> Self {
        let cfg = &inner.config;
        let max_list = cfg.max_header_list_bytes as usize;
        let mut settings = frame::Settings::default();
        settings.set_initial_window_size(Some(cfg.stream_window));
        settings.set_max_concurrent_streams(Some(cfg.max_concurrent_streams));
        settings.set_max_header_list_size(Some(cfg.max_header_list_bytes));
        let mut out = vec![settings.into()];
        let window = ClientWindow::new(cfg);
        let window_now = window.floor().max(DEFAULT_WINDOW);
        if window_now > DEFAULT_WINDOW {
            out.push(
                frame::WindowUpdate::new(StreamId::zero(), window_now - DEFAULT_WINDOW).into(),
            );
        }
        let idle_timeout = cfg.client_idle_timeout;
        let stream_idle_timeout = cfg.stream_idle_timeout;
        let now = tokio::time::Instant::now();
        let resets = ResetRate {
            since: Instant::now(),
            count: 0,
            limit: cfg.max_client_resets_per_second,
        };
        let stream_window = cfg.stream_window;
        Self {
            service: dest.metrics().clone(),
            inner,
            dest,
            wire: Wire::new(io, max_list, out),
            link: Arc::new(Outbox::new(())),
            inbox: Vec::new(),
            send: SendWindows::new(),
            streams: HashMap::default(),
            last_id: StreamId::zero(),
            conn_credit: 0,
            peer_window: window_now as i64,
            window,
            window_now,
            window_owed: 0,
            window_grew: false,
            stream_window,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            idle_timeout,
            last_end: now,
            now,
            sweep: Box::pin(tokio::time::sleep_until(now)),
            sweep_at: None,
            stream_idle_timeout,
            // A dropped sender means the proxy itself is gone: drain as well.
            shutdown: Box::pin(async move {
                let _ = shutdown.wait_for(|v| *v).await;
            }),
            drain: Drain::No,
            final_seen: false,
            closing: None,
            resets,
            links: Vec::new(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        self.now = tokio::time::Instant::now();
        if self.sweep_at.is_some() && self.sweep.as_mut().poll(cx).is_ready() {
            self.sweep_streams(cx);
        }
        if self.drain == Drain::No && self.shutdown.as_mut().poll(cx).is_ready() {
            tracing::debug!(dest = %self.dest.addr(), "draining client connection");
            self.drain();
        }
        let timed = self.drain != Drain::No || !self.idle_timeout.is_zero();
        if timed && self.idle.as_mut().poll(cx).is_ready() {
            match self.drain {
                Drain::No => self.check_idle(cx),
                // The client never answered the PING: the GOAWAY with the last stream anyway.
                Drain::Announced => self.final_goaway(),
                // The client never answered the second PING: close anyway.
                Drain::Final => self.final_seen = true,
                Drain::WriteClosed => return Poll::Ready(Ok(())),
            }
        }
        let mut read_all = self.closing.is_some();
        let mut paused = false;
        for _ in 0..READ_BUDGET {
            if self.closing.is_some() {
                break;
            }
            if self.wire.is_backed_up() {
                // Read again once the socket took the backlog (woken by the write, or below).
                (paused, read_all) = (true, true);
                break;
            }
            match self.wire.poll_frame(cx) {
                // After our side closed, what the client still sends is read and dropped.
                Poll::Ready(Some(_)) if self.drain == Drain::WriteClosed => {}
                Poll::Ready(Some(Ok(f))) => self.on_frame(f),
                Poll::Ready(Some(Err(e))) => self.on_read_error(e)?,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    read_all = true;
                    break;
                }
            }
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        loop {
            self.link.take(&mut inbox, cx);
            if inbox.is_empty() {
                break;
            }
            for m in inbox.drain(..) {
                self.on_msg(m);
            }
        }
        self.inbox = inbox;
        self.announce_conn_credit();
        let flushed = self
            .wire
            .write(cx)
            .map_err(|e| h2::Error::from(h2::proto::Error::from(e)))?;
        if paused && flushed {
            cx.waker().wake_by_ref();
        }
        if let Some(reason) = self.closing {
            if flushed {
                return Poll::Ready(match reason {
                    Reason::NO_ERROR => Ok(()),
                    r => Err(r.into()),
                });
            }
            return Poll::Pending;
        }
        // Not before the client read the final GOAWAY: a stream it opened until then is refused
        // (REFUSED_STREAM, safe to retry), which a closed write side could not do.
        if self.drain == Drain::Final && self.final_seen && self.streams.is_empty() && flushed {
            match self.wire.shutdown(cx) {
                Poll::Ready(Ok(())) => {
                    // Closing now, with the client's last bytes unread, would reset the
                    // connection: read until it closes too, for a little while.
                    self.drain = Drain::WriteClosed;
                    self.idle.as_mut().reset(self.now + CLOSE_LINGER);
                    if self.idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {}
            }
        }
        // Armed (or re-armed) during this turn: register it with this task.
        if self.sweep_at.is_some() && self.sweep.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        if !read_all {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Checked lazily: the timer is re-armed for the rest of the period while streams come
    /// and go.
    fn check_idle(&mut self, cx: &mut Context<'_>) {
        let now = tokio::time::Instant::now();
        if self.streams.is_empty() && now >= self.last_end + self.idle_timeout {
            tracing::debug!(dest = %self.dest.addr(), idle_s = self.idle_timeout.as_secs(), "client connection idle; sending GOAWAY");
            m::timeout(m::TimeoutKind::ClientIdle);
            self.drain();
            return;
        }
        let next = if self.streams.is_empty() {
            self.last_end + self.idle_timeout
        } else {
            now + self.idle_timeout
        };
        self.idle.as_mut().reset(next);
        // Registers the timer with this task again.
        let _ = self.idle.as_mut().poll(cx);
    }

    /// Arms the sweep for `at` unless it fires earlier anyway.
    fn arm_sweep(&mut self, at: tokio::time::Instant) {
        if self.sweep_at.is_some_and(|t| t <= at) {
            return;
        }
        self.sweep_at = Some(at);
        self.sweep.as_mut().reset(at);
    }

    /// When a stream next needs attention: its deadline, or the end of its idle period.
    fn due(&self, s: &CStream) -> Option<tokio::time::Instant> {
        let idle = (!self.stream_idle_timeout.is_zero() && !s.resp_done)
            .then(|| s.last_move + self.stream_idle_timeout);
        match (s.deadline.filter(|_| !s.resp_done), idle) {
            (Some(d), Some(i)) => Some(d.min(i)),
            (d, i) => d.or(i),
        }
    }

    /// Ends the streams whose deadline passed or on which nothing moved for the stream idle
    /// timeout, and arms the sweep for the next.
    fn sweep_streams(&mut self, cx: &mut Context<'_>) {
        self.sweep_at = None;
        let now = self.now;
        let mut expired = Vec::new();
        let mut next: Option<tokio::time::Instant> = None;
        for (id, s) in &self.streams {
            let Some(due) = self.due(s) else { continue };
            if due <= now {
                expired.push(*id);
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        for id in expired {
            let Some(s) = self.streams.get(&id) else {
                continue;
            };
            if s.deadline.is_some_and(|d| d <= now) {
                self.deadline_passed(id);
            } else {
                self.idle_expired(id);
            }
            if let Some(due) = self.streams.get(&id).and_then(|s| self.due(s)) {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        if let Some(at) = next {
            self.arm_sweep(at);
            // Registers the timer with this task.
            let _ = self.sweep.as_mut().poll(cx);
        }
    }

    fn deadline_passed(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let connecting = !s.resp_started && s.attempt.as_ref().is_some_and(|a| !a.link.is_ready());
        let (kind, msg) = if connecting {
            // A connect queued behind others must not outlive the call; the connection
            // charges its endpoint itself if it fails.
            (
                m::TimeoutKind::DeadlineConnecting,
                "interceptor: deadline exceeded while connecting to an endpoint",
            )
        } else {
            (m::TimeoutKind::Deadline, "interceptor: deadline exceeded")
        };
        if !s.resp_started && !connecting {
            // An endpoint that had the whole request and did not answer in time is charged,
            // so one that accepts and never answers gets ejected.
            s.charge = (s.req_done && s.attempt.is_some()).then_some("no answer by the deadline");
        }
        m::timeout(kind);
        self.answer(
            id,
            grpc::DEADLINE_EXCEEDED,
            StatusCode::GATEWAY_TIMEOUT,
            msg,
        );
    }

    fn idle_expired(&mut self, id: StreamId) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        m::timeout(m::TimeoutKind::StreamIdle);
        // Not charged: servers may send the headers of a quiet stream (a watch) only with its
        // first message, and after the headers a stall may as well be the client's.
        if s.resp_started {
            self.answer(
                id,
                grpc::UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
                "interceptor: nothing moved on the stream (stream idle timeout)",
            );
        } else {
            let msg = format!(
                "interceptor: nothing moved on the stream for {:?} (stream idle timeout)",
                self.stream_idle_timeout
            );
            self.answer(id, grpc::UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT, &msg);
        }
    }

    /// Resizes the connection window to the streams open now.
    fn fit_window(&mut self) {
        let target = self
            .window
            .target(self.streams.len() as u32)
            .max(DEFAULT_WINDOW);
        if target > self.window_now {
            let grow = target - self.window_now;
            let paid = grow.min(self.window_owed);
            self.window_owed -= paid;
            self.conn_credit += grow - paid;
            self.window_grew = true;
        } else {
            self.window_owed += self.window_now - target;
        }
        self.window_now = target;
    }

    fn announce_conn_credit(&mut self) {
        let withheld = self.window_owed.min(self.conn_credit);
        self.window_owed -= withheld;
        self.conn_credit -= withheld;
        if self.conn_credit > 0
            && (std::mem::take(&mut self.window_grew)
                || self.peer_window <= (self.window_now / 2) as i64)
        {
            let credit = std::mem::take(&mut self.conn_credit);
            self.peer_window += credit as i64;
            self.wire
                .emit(frame::WindowUpdate::new(StreamId::zero(), credit).into());
        }
    }

    /// Starts a graceful close (RFC 9113 6.8): GOAWAY with the largest id and a PING. Streams
    /// the client opens until it acknowledges the PING are still served; then GOAWAY with the
    /// last one taken, so nothing the client sent in flight is refused.
    fn drain(&mut self) {
        if self.drain != Drain::No {
            return;
        }
        self.drain = Drain::Announced;
        self.wire
            .emit(frame::GoAway::new(StreamId::MAX, Reason::NO_ERROR).into());
        self.wire.emit(frame::Ping::new(DRAIN_PING).into());
        self.idle.as_mut().reset(self.now + DRAIN_PING_WAIT);
    }

    fn final_goaway(&mut self) {
        if self.drain != Drain::Announced {
            return;
        }
        self.drain = Drain::Final;
        self.wire
            .emit(frame::GoAway::new(self.last_id, Reason::NO_ERROR).into());
        self.wire.emit(frame::Ping::new(FINAL_PING).into());
        self.idle.as_mut().reset(self.now + DRAIN_PING_WAIT);
    }

    /// A connection error: GOAWAY, then close.
    fn fail(&mut self, reason: Reason) {
        self.wire
            .emit(frame::GoAway::new(self.last_id, reason).into());
        self.closing = Some(reason);
    }

    fn on_frame(&mut self, f: In) {
        match f {
            In::Headers { block, over_size } => self.on_headers(block, over_size),
            In::Data { data, padding } => self.on_data(data, padding),
            In::Reset(r) => self.on_reset(r.stream_id(), r.reason()),
            In::WindowUpdate(w) => self.on_window_update(w),
            In::Settings(s) => self.on_settings(s),
            In::Ping(p) => {
                if !p.is_ack() {
                    self.wire.emit(frame::Ping::pong(p.into_payload()).into());
                } else if *p.payload() == DRAIN_PING {
                    self.final_goaway();
                } else if *p.payload() == FINAL_PING {
                    self.final_seen = true;
                }
            }
            // The client opens no more streams; those open finish, then it closes.
            In::GoAway(_) => {}
            In::PushPromise => self.fail(Reason::PROTOCOL_ERROR),
            In::Priority => {}
        }
    }

    fn on_read_error(&mut self, e: ReadError) -> Result<(), h2::Error> {
        match e {
            ReadError::Stream(id, reason) => {
                // A malformed frame on one stream (a bad header block, a PRIORITY on itself):
                // that stream only, here and at the endpoint, which would otherwise keep it
                // open on a shared connection, holding a concurrency slot and its window.
                if id > self.last_id {
                    self.last_id = id;
                }
                if self.streams.contains_key(&id) {
                    self.reset_stream(id, reason);
                } else {
                    self.wire.emit(frame::Reset::new(id, reason).into());
                }
                Ok(())
            }
            ReadError::Conn(reason) => {
                tracing::debug!(dest = %self.dest.addr(), ?reason, "client broke the HTTP/2 protocol");
                self.fail(reason);
                Ok(())
            }
            ReadError::Io(e) => Err(h2::proto::Error::from(e).into()),
        }
    }

    fn on_headers(&mut self, h: Block, over_size: bool) {
        let id = h.id;
        if let Some(s) = self.streams.get_mut(&id) {
            // Request trailers (RFC 9113 8.1: they end the stream and carry no pseudo-header
            // field).
            if s.req_done
                || !h.eos
                || over_size
                || has_pseudo_header(&h.fields)
                || contradicts_length(s.content_length, s.received, true)
            {
                self.reset_stream(id, Reason::PROTOCOL_ERROR);
                return;
            }
            s.req_done = true;
            // Not kept for a replay: a replayed stream would lack them.
            s.replay = None;
            if let Some(a) = &s.attempt {
                a.link.send(ToUpstream::Trailers(Block { id: a.id, ..h }));
            }
            return;
        }
        if !id.is_client_initiated() {
            self.fail(Reason::PROTOCOL_ERROR);
            return;
        }
        if id <= self.last_id {
            // A stream that ended here. Trailers the client sent before our RST_STREAM reached
            // it (refused, answered early, reset) must not end its connection (RFC 9113 5.1);
            // the block was decoded, so the HPACK table stays in step. STREAM_CLOSED tells a
            // client that reused an id that nothing will answer, where silence would hang it.
            self.wire
                .emit(frame::Reset::new(id, Reason::STREAM_CLOSED).into());
            return;
        }
        self.last_id = id;
        if matches!(self.drain, Drain::Final | Drain::WriteClosed) {
            self.wire
                .emit(frame::Reset::new(id, Reason::REFUSED_STREAM).into());
            return;
        }
        if self.streams.len() >= self.inner.config.max_concurrent_streams as usize {
            self.wire
                .emit(frame::Reset::new(id, Reason::REFUSED_STREAM).into());
            return;
        }
        let eos = h.eos;
        let fields = h.fields;
        let grpc = fields
            .get(b"content-type")
            .is_some_and(grpc::is_grpc_content_type);
        let mut s = CStream {
            out: self.send.stream(),
            attempt: None,
            replay: None,
            tried: Vec::new(),
            attempts: 0,
            grpc,
            req_done: eos,
            resp_started: false,
            resp_done: false,
            status: None,
            received: 0,
            content_length: None,
            credited: 0,
            absorb: 0,
            credit: 0,
            recv_window: self.stream_window as i64,
            started: self.now.into_std(),
            charge: None,
            local: false,
            deadline: None,
            pushback: None,
            last_move: self.now,
            _active: self.service.stream_started(),
        };
        if over_size {
            // As h2's server does: 431, and the request never reaches an endpoint.
            s.grpc = false;
            self.streams.insert(id, s);
            self.answer(id, 0, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "");
            return;
        }
        s.content_length = match fields.get(b"content-length").map(parse_content_length) {
            None => None,
            Some(Some(n)) => Some(n),
            Some(None) => {
                self.wire
                    .emit(frame::Reset::new(id, Reason::PROTOCOL_ERROR).into());
                return;
            }
        };
        if !is_valid_request(&fields) || (eos && s.content_length.is_some_and(|n| n != 0)) {
            self.wire
                .emit(frame::Reset::new(id, Reason::PROTOCOL_ERROR).into());
            return;
        }
        s.deadline = fields
            .get(GRPC_TIMEOUT)
            .and_then(grpc::parse_grpc_timeout)
            .map(|d| self.now + d);
        s.replay = Some(Replay {
            head: Some(fields),
            body: Vec::new(),
            bytes: 0,
            whole: eos,
        });
        if let Some(due) = self.due(&s) {
            self.arm_sweep(due);
        }
        self.streams.insert(id, s);
        self.fit_window();
        self.start_attempt(id);
    }

    fn on_data(&mut self, d: frame::Data<bytes::Bytes>, padding: u32) {
        let id = d.stream_id();
        let len = d.payload().len();
        self.peer_window -= len as i64 + padding as i64;
        if self.peer_window < 0 {
            // Past the window we granted (RFC 9113 6.9.1): what it sends beyond would pile up
            // here for an endpoint that does not read.
            tracing::debug!(dest = %self.dest.addr(), "client sent past the connection window");
            self.fail(Reason::FLOW_CONTROL_ERROR);
            return;
        }
        // Padding goes nowhere: its window is given back at once.
        self.conn_credit += padding;
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream already ended here: give the bytes back to the connection.
            self.conn_credit += len as u32;
            if id > self.last_id {
                self.fail(Reason::PROTOCOL_ERROR);
            }
            return;
        };
        if s.req_done {
            self.conn_credit += len as u32;
            self.reset_stream(id, Reason::STREAM_CLOSED);
            return;
        }
        s.recv_window -= len as i64 + padding as i64;
        if s.recv_window < 0 {
            self.conn_credit += len as u32;
            self.reset_stream(id, Reason::FLOW_CONTROL_ERROR);
            return;
        }
        let eos = d.is_end_stream();
        let total = s.received + len as u64;
        if contradicts_length(s.content_length, total, eos) {
            // A malformed request is not passed on (RFC 9113 8.1.1). The endpoint would reset
            // it, and that reset would count against a healthy endpoint.
            self.conn_credit += len as u32;
            self.reset_stream(id, Reason::PROTOCOL_ERROR);
            return;
        }
        let payload = d.into_payload();
        if !eos {
            if let Some(credit) = s.add_credit(padding, self.stream_window / 2) {
                self.wire.emit(frame::WindowUpdate::new(id, credit).into());
            }
        }
        s.last_move = self.now;
        s.received += len as u64;
        s.req_done = eos;
        let limit = self.inner.config.replay_buffer_bytes;
        if let Some(r) = &mut s.replay {
            r.bytes += len;
            if r.bytes > limit {
                s.replay = None;
            } else {
                if len > 0 {
                    r.body.push(payload.clone());
                }
                r.whole = eos;
            }
        }
        if len == 0 && !eos {
            // Carries nothing, and h2 endpoints (tonic, hyper) close a connection once it has
            // brought them 100 of these: on a shared upstream connection, one client's empty
            // frames would end every client's calls there.
            return;
        }
        match &s.attempt {
            Some(a) => {
                let mut fwd = frame::Data::new(a.id, payload);
                fwd.set_end_stream(eos);
                a.link.send(ToUpstream::Data(fwd));
            }
            // Answered locally, the response not yet written: nothing goes upstream.
            None => {
                s.credited += len as u64;
                self.conn_credit += len as u32;
            }
        }
    }

    fn on_reset(&mut self, id: StreamId, reason: Reason) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        if let Some(a) = &s.attempt {
            a.link.send(ToUpstream::Reset(a.id, reason));
        }
        let mut s = s;
        // Clients cancel at their own deadline, usually a hair before ours fires: that is the
        // endpoint not answering in time, charged as if our timer had fired.
        if !s.resp_started
            && s.req_done
            && s.deadline.is_some_and(|d| self.now + DEADLINE_SLACK >= d)
        {
            s.charge = Some("no answer by the client's deadline");
            s.local = true;
        }
        let done = s.resp_done && s.out.is_empty();
        self.end_stream(s, if done { None } else { Some(Status::CANCELLED) });
        if self.resets.exceeded() {
            tracing::warn!(dest = %self.dest.addr(), limit = self.resets.limit, "client cancels streams faster than the limit; closing its connection");
            m::abusive_connection(AbuseReason::RapidReset);
            self.fail(Reason::ENHANCE_YOUR_CALM);
        }
    }

    fn on_window_update(&mut self, w: frame::WindowUpdate) {
        let id = w.stream_id();
        if id.is_zero() {
            if self.send.grow_conn(w.size_increment()).is_err() {
                self.fail(Reason::FLOW_CONTROL_ERROR);
                return;
            }
            while let Some(id) = self.send.next_unblocked() {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.out.unblock();
                    self.pump(id);
                }
            }
            return;
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.out.grow(w.size_increment() as i64).is_err() {
            self.reset_stream(id, Reason::FLOW_CONTROL_ERROR);
            return;
        }
        self.pump(id);
    }

    fn on_settings(&mut self, s: frame::Settings) {
        if s.is_ack() {
            return;
        }
        if let Some(size) = s.initial_window_size() {
            let streams = self.streams.iter_mut().map(|(id, st)| (*id, &mut st.out));
            if !self.send.resize(size, streams).is_empty() {
                self.fail(Reason::FLOW_CONTROL_ERROR);
                return;
            }
            let ids: Vec<StreamId> = self.streams.keys().copied().collect();
            for id in ids {
                self.pump(id);
            }
        }
        self.wire.apply_settings(&s);
    }

    fn on_msg(&mut self, msg: ToClient) {
        match msg {
            ToClient::Headers(h) => self.on_response_headers(h),
            ToClient::Data(d) => {
                let id = d.stream_id();
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                if d.is_end_stream() {
                    s.resp_done = true;
                }
                s.last_move = self.now;
                self.send_frame(id, d.into());
            }
            ToClient::Reset(id, reason) => {
                let Some(mut s) = self.streams.remove(&id) else {
                    return;
                };
                s.out.clear();
                self.wire.emit(frame::Reset::new(id, reason).into());
                s.charge = charged_reset(reason).then_some("the endpoint reset the stream");
                self.end_stream(s, Some(Status::RESET));
            }
            ToClient::Credit(id, n) => self.on_credit(id, n),
            ToClient::Unprocessed(id, why, head) => self.on_unprocessed(id, why, head),
            ToClient::Broken(id) => {
                if !self.streams.contains_key(&id) {
                    return;
                }
                // Not charged here: the upstream connection charged its endpoint once for the
                // break, however many streams it carried.
                m::unavailable(UnavailableReason::ConnectionFailed);
                self.answer(
                    id,
                    grpc::UNAVAILABLE,
                    StatusCode::BAD_GATEWAY,
                    "interceptor: connection to the endpoint failed",
                );
            }
            ToClient::BadResponse(id) => {
                if !self.streams.contains_key(&id) {
                    return;
                }
                self.answer(
                    id,
                    grpc::INTERNAL,
                    StatusCode::BAD_GATEWAY,
                    "interceptor: the endpoint's response was malformed or its headers too large",
                );
            }
        }
    }

    fn on_response_headers(&mut self, h: Block) {
        let id = h.id;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let eos = h.eos;
        s.last_move = self.now;
        if !s.resp_started {
            let status = h.fields.status();
            if status.is_some_and(|st| (100..200).contains(&st)) && !eos {
                // 1xx: another HEADERS follows.
                self.wire.emit_block(&h);
                return;
            }
            s.resp_started = true;
            s.replay = None;
            if let Some(a) = &s.attempt {
                // The turn's clock: the response arrived this turn.
                let rtt = self.now.into_std().saturating_duration_since(a.sent_at);
                a.in_flight.stats().observe_rtt(rtt);
            }
            s.status = if s.grpc {
                h.fields.get(GRPC_STATUS).map(Status::grpc)
            } else {
                status.map(Status::http)
            };
            s.resp_done = eos;
            // Nothing of this stream can be waiting yet: its headers go first.
            self.wire.emit_block(&h);
        } else {
            if s.grpc {
                if let Some(v) = h.fields.get(GRPC_STATUS) {
                    s.status = Some(Status::grpc(v));
                }
                if let Some(p) = h.fields.get(GRPC_RETRY_PUSHBACK_MS) {
                    s.pushback = grpc::parse_retry_pushback(p);
                }
            }
            s.resp_done = true;
            self.send_frame(id, h.into());
        }
        self.finish_if_done(id);
    }

    fn on_credit(&mut self, id: StreamId, n: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            // Ended here: what was not credited then was given back at the end.
            return;
        };
        s.last_move = self.now;
        let absorbed = s.absorb.min(n as u64);
        s.absorb -= absorbed;
        let give = (n as u64 - absorbed).min(s.received - s.credited) as u32;
        s.credited += give as u64;
        self.conn_credit += give;
        if !s.req_done {
            if let Some(credit) = s.add_credit(give, self.stream_window / 2) {
                self.wire.emit(frame::WindowUpdate::new(id, credit).into());
            }
        }
    }

    /// Resets one client stream (and its upstream stream).
    fn reset_stream(&mut self, id: StreamId, reason: Reason) {
        let Some(mut s) = self.streams.remove(&id) else {
            return;
        };
        // The attempt stays: the request is counted under its endpoint, not charged to it.
        if let Some(a) = &s.attempt {
            a.link.send(ToUpstream::Reset(a.id, Reason::CANCEL));
        }
        s.out.clear();
        self.wire.emit(frame::Reset::new(id, reason).into());
        self.end_stream(s, Some(Status::RESET));
        // Each of these resets the endpoint's stream too, as a cancel does: counted with the
        // client's cancels, or a client could reset streams at the endpoint at any rate
        // through us, by breaking them (MadeYouReset, CVE-2025-8671).
        if self.resets.exceeded() {
            tracing::warn!(dest = %self.dest.addr(), limit = self.resets.limit, "client breaks streams faster than the reset limit; closing its connection");
            m::abusive_connection(AbuseReason::StreamErrors);
            self.fail(Reason::ENHANCE_YOUR_CALM);
        }
    }

    /// Sends a response frame within the client's windows (or queues it behind the stream's
    /// waiting frames); the bytes sent are credited to the endpoint.
    fn send_frame(&mut self, id: StreamId, f: Out) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = self.wire.send(&mut self.send, id, &mut s.out, f);
        self.sent(id, n);
    }

    /// Writes what the client's windows allow of a stream's waiting response frames.
    fn pump(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = self.send.drain(id, &mut s.out, &mut self.wire.out);
        self.sent(id, n);
    }

    /// `n` response bytes of stream `id` went to the client: the endpoint may send as many.
    fn sent(&mut self, id: StreamId, n: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if n > 0 {
            if let Some(a) = &s.attempt {
                a.link.send(ToUpstream::Credit(a.id, n));
            }
        }
        self.finish_if_done(id);
    }

    /// A stream whose response was written whole is over here.
    fn finish_if_done(&mut self, id: StreamId) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if !(s.resp_done && s.out.is_empty()) {
            return;
        }
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        if !s.req_done {
            // RFC 9113 8.1: the response is complete, the request body is not wanted.
            self.wire
                .emit(frame::Reset::new(id, Reason::NO_ERROR).into());
            if let Some(a) = &s.attempt {
                a.link.send(ToUpstream::Reset(a.id, Reason::NO_ERROR));
            }
        }
        self.end_stream(s, None);
    }

    /// The client connection is gone: every stream still open upstream is cancelled.
    fn close(&mut self) {
        self.link.close();
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.streams.remove(&id) {
                if let Some(a) = &s.attempt {
                    a.link.send(ToUpstream::Reset(a.id, Reason::CANCEL));
                }
                self.end_stream(s, Some(Status::CANCELLED));
            }
        }
    }
}

/// RFC 9113 8.3.1: a request has :method, and :scheme and :path unless it is a CONNECT. It
/// has no :status (a response's), and no :protocol: RFC 8441 allows that only to a client
/// told SETTINGS_ENABLE_CONNECT_PROTOCOL, which the proxy does not send. An endpoint resets
/// a request with either, and that reset would count against it.
fn is_valid_request(h: &HeaderList) -> bool {
    let (mut method, mut scheme, mut authority, mut path) = (None, false, false, None);
    // One pass over the pseudo-header fields, which the reader checked come first.
    for f in h.iter() {
        match f.name {
            b":method" => method = Some(f.value),
            b":scheme" => scheme = true,
            b":authority" => authority = true,
            b":path" => path = Some(f.value),
            n if n.first() == Some(&b':') => return false,
            _ => break,
        }
    }
    match method {
        None => false,
        Some(b"CONNECT") => authority && !scheme && path.is_none(),
        Some(_) => scheme && path.is_some_and(|p| !p.is_empty()),
    }
}

fn has_pseudo_header(h: &HeaderList) -> bool {
    h.iter().any(|f| f.name.first() == Some(&b':'))
}

/// Whether a reset from the endpoint counts against it: NO_ERROR and CANCEL are a peer's
/// ordinary ways to stop a stream and REFUSED_STREAM says it was not processed.
fn charged_reset(reason: Reason) -> bool {
    !matches!(
        reason,
        Reason::NO_ERROR | Reason::CANCEL | Reason::REFUSED_STREAM
    )
}
