//! One pooled HTTP/2 connection to an endpoint: connects, then relays the frames of the
//! streams client connections open on it, both ways.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::frame::{self, StreamId};
use h2::Reason;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::super::destination::Destination;
use super::super::endpoint_stats::EndpointStats;
use super::super::metrics as m;
use super::super::pool::is_local_error;
use super::super::Shared;
use super::fields::{contradicts_length, parse_content_length, Block};
use super::flow::{Out, SendWindows, StreamOut, DEFAULT_WINDOW, MAX_WINDOW};
use super::read::{In, ReadError};
use super::wire::Wire;
use super::{
    ClientLink, IdHash, Key, RequestHead, ToClient, ToUpstream, Unprocessed, UpLink, PREFACE,
};

/// Frames read per turn before the task yields to others on its worker.
const READ_BUDGET: usize = 128;

/// After a failed write, how long what the endpoint sent before it closed may take to be read.
const LAST_WORDS_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) fn spawn(
    shared: Arc<Shared>,
    dest: Arc<Destination>,
    ep: Arc<EndpointStats>,
    link: Arc<UpLink>,
    key: Key,
    growth: bool,
) {
    tokio::spawn(async move {
        run(&shared, &dest, &ep, &link, key, growth).await;
        shared.relay.remove(key, &link);
    });
}

async fn run(
    shared: &Arc<Shared>,
    dest: &Arc<Destination>,
    ep: &Arc<EndpointStats>,
    link: &Arc<UpLink>,
    key: Key,
    growth: bool,
) {
    let cfg = &shared.config;
    let addr = ep.addr();
    let started = tokio::time::Instant::now();
    let connect = async {
        let mut io = shared.connector.connect(addr).await?;
        io.write_all(PREFACE).await?;
        Ok::<_, std::io::Error>(io)
    };
    let io = match tokio::time::timeout(cfg.connect_timeout, connect).await {
        Ok(Ok(io)) => io,
        failed => {
            let local = matches!(&failed, Ok(Err(e)) if is_local_error(e));
            match &failed {
                Ok(Err(error)) => {
                    tracing::debug!(endpoint = %addr, %error, growth, "connecting to the endpoint failed")
                }
                _ => {
                    tracing::debug!(endpoint = %addr, growth, "connecting to the endpoint timed out")
                }
            }
            // A connection opened only to add room, to an endpoint that answers on the others,
            // is not charged: under load the failure may be this proxy's own slowness.
            if !local && !growth {
                m::connect_failure(&ep.label());
                let why = "connecting failed or timed out";
                dest.record_failure(ep, &shared.eject_policy(), cfg.max_ejected_percent, why);
            }
            link.accepting.store(false, Ordering::Release);
            refuse_queued(link, Unprocessed::ConnectFailed);
            return;
        }
    };
    let handshake_by = started + cfg.connect_timeout;
    let label = ep.label();
    let mut conn = UpConn::new(shared, link.clone(), key, label.clone(), io, handshake_by);
    m::upstream_connections(&label, 1.0);
    let end = poll_fn(|cx| conn.poll(cx)).await;
    m::upstream_connections(&label, -1.0);
    link.accepting.store(false, Ordering::Release);
    match end {
        Ok(()) => tracing::debug!(endpoint = %addr, "upstream connection closed"),
        Err(ConnError::Handshake) => {
            tracing::debug!(endpoint = %addr, growth, "the endpoint did not complete the HTTP/2 handshake in time");
            if !growth {
                m::connect_failure(&label);
                let why = "no HTTP/2 handshake in time";
                dest.record_failure(ep, &shared.eject_policy(), cfg.max_ejected_percent, why);
            }
            // Without the endpoint's SETTINGS nothing was processed.
            conn.fail_streams(Unprocessed::ConnectFailed);
            refuse_queued(link, Unprocessed::ConnectFailed);
            return;
        }
        Err(error) => tracing::debug!(endpoint = %addr, %error, "upstream connection failed"),
    }
    // One break is one failure of the endpoint, however many streams it cut: charged per
    // stream, a connection carrying a few calls would eject a healthy endpoint at once (three
    // in a row) for one event, e.g. its server closing the connection for a burst of resets
    // that one client's cancels made.
    if conn.fail_streams(Unprocessed::Closing) > 0 {
        let why = "the connection broke with streams on it";
        dest.record_failure(ep, &shared.eject_policy(), cfg.max_ejected_percent, why);
    }
    refuse_queued(link, Unprocessed::Closing);
}

/// The connection is gone: streams still queued for it never reached the endpoint.
fn refuse_queued(link: &UpLink, why: Unprocessed) {
    for m in link.outbox.close() {
        if let ToUpstream::Open {
            head,
            client,
            client_id,
            ..
        } = m
        {
            let _ = client.push(ToClient::Unprocessed(client_id, why, Some(head)));
        }
    }
}

/// One stream as this connection carries it.
struct UStream {
    client: ClientLink,
    client_id: StreamId,
    /// The request's head: sent when the stream starts, and kept until the endpoint answers,
    /// to go back to the client connection if the endpoint never processed the stream.
    head: Option<RequestHead>,
    /// END_STREAM on the HEADERS.
    head_ends: bool,
    /// Request frames waiting for the endpoint's window.
    out: StreamOut,
    /// Its HEADERS went out (a stream past the endpoint's concurrency limit waits).
    started: bool,
    req_done: bool,
    resp_done: bool,
    /// Response bytes passed to the client connection and not yet credited back by it.
    unacked: u32,
    /// Response bytes credited back and not yet announced to the endpoint.
    credit: u32,
    /// A HEAD request: its response's content-length describes a body that is not sent.
    head_request: bool,
    /// The final (non-1xx) response headers arrived: HEADERS after them are trailers.
    resp_head: bool,
    /// Informational (1xx) heads so far: each goes to the client, outside any window.
    informational: u8,
    /// The response's content-length where it binds the DATA, and the DATA bytes so far.
    resp_length: Option<u64>,
    resp_received: u64,
}

impl UStream {
    /// Adds `n` to the stream's unannounced credit; once that reaches `at`, returns it to be
    /// announced (WINDOW_UPDATE).
    fn add_credit(&mut self, n: u32, at: u32) -> Option<u32> {
        self.credit += n;
        if n == 0 || self.credit < at {
            return None;
        }
        Some(std::mem::take(&mut self.credit))
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 error from or towards the endpoint: {0}")]
    Protocol(h2::Error),
    #[error("the endpoint closed the connection")]
    Closed,
    #[error("no SETTINGS from the endpoint within the connect timeout")]
    Handshake,
    #[error("no answer to PING within the keepalive timeout")]
    Keepalive,
}

struct UpConn {
    wire: Wire<TcpStream>,
    shared: Arc<Shared>,
    key: Key,
    /// The endpoint's metrics label.
    label: Arc<str>,
    link: Arc<UpLink>,
    inbox: Vec<ToUpstream>,
    send: SendWindows,
    streams: HashMap<StreamId, UStream, IdHash>,
    /// Streams queued past the endpoint's concurrency limit, in id order.
    waiting: VecDeque<StreamId>,
    started: usize,
    peer_max: usize,
    stream_window: u32,
    conn_window: u32,
    /// Connection-level receive credit not yet announced.
    conn_credit: u32,
    /// What the endpoint may still send as it sees it; credit is announced once it falls to
    /// half the window (streams whose client stopped reading hold their share meanwhile).
    peer_window: i64,
    /// The endpoint's GOAWAY, or ours: no new streams.
    goaway: bool,
    /// The endpoint's first SETTINGS arrived: the handshake is complete.
    settings_seen: bool,
    handshake_by: tokio::time::Instant,
    /// One timer for the handshake deadline, keepalive PINGs and the idle close.
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: tokio::time::Instant,
    keepalive_interval: std::time::Duration,
    keepalive_timeout: std::time::Duration,
    /// When the timer next looks at whether a keepalive PING is due. It is moved only when the
    /// timer fires, so reading a frame costs no timer reset.
    next_ping: tokio::time::Instant,
    ping_sent: Option<tokio::time::Instant>,
    /// When a frame last came from the endpoint: a connection that hears from its endpoint is
    /// alive and is not PINGed.
    last_read: tokio::time::Instant,
    idle_timeout: std::time::Duration,
    /// When the last stream ended (the connection has none since).
    idle_since: tokio::time::Instant,
    now: tokio::time::Instant,
    /// A write failed: only what the endpoint sent before is read, then the connection ends.
    write_failed: Option<std::io::Error>,
    /// Frames read after that.
    last_words: usize,
    /// The connection is failing: no more stream starts.
    ending: bool,
    /// An error GOAWAY from the endpoint was counted.
    goaway_counted: bool,
    /// Bytes of answers the endpoint asked for (PONGs, SETTINGS acknowledgements, resets of
    /// streams it does not have) since the socket last took everything we had.
    owed: usize,
}

/// Our keepalive PING's payload.
const KEEPALIVE_PING: [u8; 8] = *b"icp-keep";

impl UpConn {
    fn new(
        shared: &Arc<Shared>,
        link: Arc<UpLink>,
        key: Key,
        label: Arc<str>,
        io: TcpStream,
        handshake_by: tokio::time::Instant,
    ) -> Self {
        let cfg = &shared.config;
        let max_list = cfg.max_header_list_bytes as usize;
        let mut settings = frame::Settings::default();
        settings.set_enable_push(false);
        settings.set_initial_window_size(Some(cfg.stream_window));
        settings.set_max_header_list_size(Some(cfg.max_header_list_bytes));
        let mut out = vec![settings.into()];
        // Room for every stream it carries to hold a full stream window: a response is read
        // from the endpoint only as fast as its client takes it, so a client that stops
        // reading pins its stream's window, and must not pin the others'.
        let room = cfg.stream_window as u64 * cfg.streams_per_connection.max(1) as u64;
        let conn_window = room
            .max(cfg.connection_window as u64)
            .clamp(DEFAULT_WINDOW as u64, MAX_WINDOW as u64) as u32;
        if conn_window > DEFAULT_WINDOW {
            out.push(
                frame::WindowUpdate::new(StreamId::zero(), conn_window - DEFAULT_WINDOW).into(),
            );
        }
        Self {
            wire: Wire::new(io, max_list, out),
            shared: shared.clone(),
            key,
            label,
            link,
            inbox: Vec::new(),
            send: SendWindows::new(),
            streams: HashMap::default(),
            waiting: VecDeque::new(),
            started: 0,
            peer_max: usize::MAX,
            stream_window: cfg.stream_window,
            conn_window,
            conn_credit: 0,
            peer_window: conn_window as i64,
            goaway: false,
            settings_seen: false,
            handshake_by,
            timer: Box::pin(tokio::time::sleep_until(handshake_by)),
            timer_at: handshake_by,
            keepalive_interval: cfg.keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
            next_ping: handshake_by,
            ping_sent: None,
            last_read: handshake_by,
            idle_timeout: cfg.idle_timeout,
            idle_since: handshake_by,
            now: handshake_by,
            write_failed: None,
            last_words: 0,
            ending: false,
            goaway_counted: false,
            owed: 0,
        }
    }

    /// When the timer must next fire.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        if !self.settings_seen {
            return Some(self.handshake_by);
        }
        let ping = if let Some(sent) = self.ping_sent {
            Some(sent + self.keepalive_timeout)
        } else if !self.keepalive_interval.is_zero() {
            Some(self.next_ping)
        } else {
            None
        };
        let idle = (self.streams.is_empty() && !self.idle_timeout.is_zero() && !self.goaway)
            .then(|| self.idle_since + self.idle_timeout);
        match (ping, idle) {
            (Some(p), Some(i)) => Some(p.min(i)),
            (p, i) => p.or(i),
        }
    }

    fn on_timer(&mut self) -> Result<(), ConnError> {
        let now = self.now;
        if !self.settings_seen {
            return if now >= self.handshake_by {
                Err(ConnError::Handshake)
            } else {
                Ok(())
            };
        }
        match self.ping_sent {
            Some(sent) if now >= sent + self.keepalive_timeout => {
                return Err(ConnError::Keepalive);
            }
            None if !self.keepalive_interval.is_zero() && now >= self.next_ping => {
                // Only a connection that carries streams and has been silent for the whole
                // interval is PINGed. grpc-go servers count PINGs that come sooner than 5
                // minutes after the previous one, or on a connection without streams, and
                // close the connection with GOAWAY "too_many_pings" at the third: PINGing
                // busy or idle connections would get them closed for nothing.
                let quiet_until = self.last_read + self.keepalive_interval;
                if !self.streams.is_empty() && now >= quiet_until {
                    self.wire.emit(frame::Ping::new(KEEPALIVE_PING).into());
                    self.ping_sent = Some(now);
                } else {
                    self.next_ping = if quiet_until > now {
                        quiet_until
                    } else {
                        now + self.keepalive_interval
                    };
                }
            }
            _ => {}
        }
        if self.streams.is_empty()
            && !self.goaway
            && !self.idle_timeout.is_zero()
            && now >= self.idle_since + self.idle_timeout
        {
            tracing::debug!("closing an idle upstream connection");
            self.goaway = true;
            self.link.accepting.store(false, Ordering::Release);
            self.wire
                .emit(frame::GoAway::new(StreamId::zero(), Reason::NO_ERROR).into());
        }
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        if self.write_failed.is_some() {
            return self.poll_last_words(cx);
        }
        self.now = tokio::time::Instant::now();
        if self.timer.as_mut().poll(cx).is_ready() {
            self.on_timer()?;
        }
        let mut read_all = false;
        for _ in 0..READ_BUDGET {
            match self.wire.poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    self.last_read = self.now;
                    self.on_frame(f)?
                }
                Poll::Ready(Some(Err(e))) => self.on_read_error(e)?,
                Poll::Ready(None) => {
                    // Flush what can be: a GOAWAY answer, resets.
                    let _ = self.wire.write(cx);
                    return Poll::Ready(if self.streams.is_empty() {
                        Ok(())
                    } else {
                        Err(ConnError::Closed)
                    });
                }
                Poll::Pending => {
                    read_all = true;
                    break;
                }
            }
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        loop {
            self.link.outbox.take(&mut inbox, cx);
            if inbox.is_empty() {
                break;
            }
            super::coalesce::small_data(&mut inbox);
            for m in inbox.drain(..) {
                self.on_msg(m);
            }
        }
        self.inbox = inbox;
        if self.conn_credit > 0 && self.peer_window <= (self.conn_window / 2) as i64 {
            let credit = std::mem::take(&mut self.conn_credit);
            self.peer_window += credit as i64;
            self.wire
                .emit(frame::WindowUpdate::new(StreamId::zero(), credit).into());
        }
        let written = self.wire.write(cx);
        if let Ok(true) = written {
            self.owed = 0;
        }
        if let Err(e) = written {
            self.write_failed = Some(e);
            self.ending = true;
            self.link.accepting.store(false, Ordering::Release);
            self.timer_at = self.now + LAST_WORDS_WAIT;
            self.timer.as_mut().reset(self.timer_at);
            return self.poll_last_words(cx);
        }
        if self.goaway && self.streams.is_empty() && self.wire.is_idle() {
            return Poll::Ready(Ok(()));
        }
        if let Some(due) = self.next_due() {
            if due != self.timer_at {
                self.timer_at = due;
                self.timer.as_mut().reset(due);
                // Registers the timer with this task.
                if self.timer.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
            }
        }
        if !read_all {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Writing failed: the endpoint may have closed the connection right after a GOAWAY (a
    /// server does, e.g., for a burst of resets), and a write that crossed its close fails
    /// before the GOAWAY is read. What it sent before closing is still in the socket's receive
    /// queue: read to its end, the GOAWAY sends the streams it never processed elsewhere
    /// rather than failing them, and responses that arrived whole are delivered. Then the
    /// connection ends with the write's error.
    fn poll_last_words(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        for _ in 0..READ_BUDGET {
            match self.wire.poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    self.last_words += 1;
                    if self.on_frame(f).is_err() {
                        return self.end_last_words();
                    }
                }
                // One malformed response ends that stream only; what follows is still read.
                Poll::Ready(Some(Err(e @ ReadError::Stream(..)))) => {
                    let _ = self.on_read_error(e);
                }
                Poll::Ready(Some(Err(_)) | None) => return self.end_last_words(),
                // A peer that reset the connection makes the socket readable at once; the
                // timer bounds the wait for one that did not.
                Poll::Pending if self.timer.as_mut().poll(cx).is_pending() => return Poll::Pending,
                Poll::Pending => return self.end_last_words(),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn end_last_words(&mut self) -> Poll<Result<(), ConnError>> {
        let e = self.write_failed.take().expect("only after a failed write");
        tracing::debug!(endpoint = %self.key.endpoint, error = %e, frames = self.last_words, goaway = self.goaway, "writing to the endpoint failed; read what it sent before");
        Poll::Ready(Err(e.into()))
    }

    fn on_frame(&mut self, f: In) -> Result<(), ConnError> {
        match f {
            In::Headers { block, over_size } => self.on_headers(block, over_size)?,
            In::Data { data, padding } => self.on_data(data, padding)?,
            In::Reset(r) => {
                let id = r.stream_id();
                if let Some(s) = self.remove(id) {
                    let msg = if r.reason() == Reason::REFUSED_STREAM {
                        ToClient::Unprocessed(s.client_id, Unprocessed::Refused, s.head)
                    } else {
                        ToClient::Reset(s.client_id, r.reason())
                    };
                    let _ = s.client.push(msg);
                }
            }
            In::WindowUpdate(w) => self.on_window_update(w)?,
            In::Settings(s) => self.on_settings(s)?,
            In::Ping(p) => {
                if !p.is_ack() {
                    self.wire.emit(frame::Ping::pong(p.into_payload()).into());
                    self.owe(17)?;
                } else if *p.payload() == KEEPALIVE_PING {
                    self.ping_sent = None;
                    self.next_ping = self.now + self.keepalive_interval;
                }
            }
            In::GoAway(g) => self.on_goaway(g.last_stream_id(), g.reason(), g.debug_data()),
            In::PushPromise => {
                // Push was disabled in our SETTINGS.
                self.wire
                    .emit(frame::GoAway::new(StreamId::zero(), Reason::PROTOCOL_ERROR).into());
                return Err(ConnError::Protocol(Reason::PROTOCOL_ERROR.into()));
            }
            In::Priority => {}
        }
        Ok(())
    }

    /// An answer the endpoint asked for (a PONG, a SETTINGS acknowledgement, a reset of a
    /// stream it does not have), `bytes` long, was queued.
    fn owe(&mut self, bytes: usize) -> Result<(), ConnError> {
        self.owed += bytes;
        if self.owed <= OWED_LIMIT {
            return Ok(());
        }
        // Answers asked for faster than the endpoint reads them would pile up here without
        // bound; its streams fail, as on any broken connection. A healthy endpoint waits for
        // a PONG before its next PING (grpc-go's BDP estimate does), so this stays near 0
        // even while a long upload keeps the socket full.
        tracing::debug!(endpoint = %self.key.endpoint, owed = self.owed, "endpoint asks for answers and does not read them");
        self.wire
            .emit(frame::GoAway::new(StreamId::zero(), Reason::ENHANCE_YOUR_CALM).into());
        Err(ConnError::Protocol(Reason::ENHANCE_YOUR_CALM.into()))
    }

    fn on_headers(&mut self, h: Block, over_size: bool) -> Result<(), ConnError> {
        let id = h.id;
        let Some(s) = self.streams.get_mut(&id) else {
            self.wire
                .emit(frame::Reset::new(id, Reason::STREAM_CLOSED).into());
            return self.owe(13);
        };
        // The endpoint processed it: no replay from here on.
        s.head = None;
        if s.resp_done {
            // RFC 9113 5.1: the response ended; the client has it whole.
            self.reset(id, Reason::STREAM_CLOSED);
            return Ok(());
        }
        if over_size {
            self.bad_response(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if let Err(why) = check_response_block(s, &h) {
            tracing::debug!(endpoint = %self.key.endpoint, why, "malformed response");
            self.bad_response(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if h.eos {
            s.resp_done = true;
        }
        let _ = s.client.push(ToClient::Headers(Block {
            id: s.client_id,
            ..h
        }));
        if s.resp_done && s.req_done {
            self.remove(id);
        }
        Ok(())
    }

    fn on_data(&mut self, d: frame::Data<Bytes>, padding: u32) -> Result<(), ConnError> {
        let id = d.stream_id();
        let len = d.payload().len() as u32;
        self.peer_window -= (len + padding) as i64;
        if self.peer_window < 0 {
            // Past the window we granted: what it sends beyond would pile up here.
            self.wire
                .emit(frame::GoAway::new(StreamId::zero(), Reason::FLOW_CONTROL_ERROR).into());
            return Err(ConnError::Protocol(Reason::FLOW_CONTROL_ERROR.into()));
        }
        // Padding goes nowhere: its window is given back at once.
        self.conn_credit += padding;
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream already ended here: nobody will pass these bytes on.
            self.conn_credit += len;
            return Ok(());
        };
        if s.resp_done || !s.resp_head {
            // After the response ended (RFC 9113 5.1), or before its head (8.1): passed on,
            // the client would take the second for a protocol error on its connection, and a
            // stream refused later would be replayed behind bytes already sent.
            s.head = None;
            self.conn_credit += len;
            if s.resp_done {
                self.reset(id, Reason::STREAM_CLOSED);
            } else {
                tracing::debug!(endpoint = %self.key.endpoint, "response DATA before its head");
                self.bad_response(id, Reason::PROTOCOL_ERROR);
            }
            return Ok(());
        }
        let eos = d.is_end_stream();
        if !eos {
            if let Some(credit) = s.add_credit(padding, self.stream_window / 2) {
                self.wire.emit(frame::WindowUpdate::new(id, credit).into());
            }
        }
        if len == 0 && !eos {
            // Carries nothing, and an h2 client closes its connection once it has brought it
            // 100 of these: one endpoint's empty frames would end the client's calls to others.
            return Ok(());
        }
        s.resp_received += len as u64;
        if contradicts_length(s.resp_length, s.resp_received, eos) {
            tracing::debug!(endpoint = %self.key.endpoint, "response DATA contradicts its content-length");
            self.conn_credit += len;
            self.bad_response(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let mut fwd = frame::Data::new(s.client_id, d.into_payload());
        fwd.set_end_stream(eos);
        if s.client.push(ToClient::Data(fwd)).is_err() {
            self.conn_credit += len;
            self.reset(id, Reason::CANCEL);
            return Ok(());
        }
        s.unacked += len;
        if eos {
            s.resp_done = true;
            if s.req_done {
                self.remove(id);
            }
        }
        Ok(())
    }

    fn on_window_update(&mut self, w: frame::WindowUpdate) -> Result<(), ConnError> {
        let id = w.stream_id();
        if id.is_zero() {
            if self.send.grow_conn(w.size_increment()).is_err() {
                self.wire
                    .emit(frame::GoAway::new(StreamId::zero(), Reason::FLOW_CONTROL_ERROR).into());
                return Err(ConnError::Protocol(Reason::FLOW_CONTROL_ERROR.into()));
            }
            while let Some(id) = self.send.next_unblocked() {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.out.unblock();
                    self.drain(id);
                }
            }
            return Ok(());
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if s.out.grow(w.size_increment() as i64).is_err() {
            let (client, client_id) = (s.client.clone(), s.client_id);
            self.reset(id, Reason::FLOW_CONTROL_ERROR);
            let _ = client.push(ToClient::Reset(client_id, Reason::INTERNAL_ERROR));
            return Ok(());
        }
        self.drain(id);
        Ok(())
    }

    fn on_settings(&mut self, s: frame::Settings) -> Result<(), ConnError> {
        if s.is_ack() {
            return Ok(());
        }
        if !self.settings_seen {
            self.settings_seen = true;
            self.next_ping = self.now + self.keepalive_interval;
            self.idle_since = self.now;
            self.link.ready.store(true, Ordering::Release);
        }
        if let Some(size) = s.initial_window_size() {
            let streams = self.streams.iter_mut().map(|(id, st)| (*id, &mut st.out));
            if !self.send.resize(size, streams).is_empty() {
                // RFC 9113 6.9.2: a stream window past 2^31-1 is a connection error.
                self.wire
                    .emit(frame::GoAway::new(StreamId::zero(), Reason::FLOW_CONTROL_ERROR).into());
                return Err(ConnError::Protocol(Reason::FLOW_CONTROL_ERROR.into()));
            }
            let ids: Vec<StreamId> = self.streams.keys().copied().collect();
            for id in ids {
                self.drain(id);
            }
        }
        if let Some(max) = s.max_concurrent_streams() {
            self.peer_max = max as usize;
            self.link.peer_max_streams.store(max, Ordering::Relaxed);
        }
        self.wire.apply_settings(&s);
        self.start_waiting();
        // apply_settings queued the acknowledgement.
        self.owe(9)
    }

    /// GOAWAY: streams past `last` were not processed and may go elsewhere; the rest finish.
    fn on_goaway(&mut self, last: StreamId, reason: Reason, debug_data: &[u8]) {
        if reason != Reason::NO_ERROR {
            // The debug data names the server's cause, e.g. h2's "too_many_resets".
            let said = String::from_utf8_lossy(&debug_data[..debug_data.len().min(128)]);
            tracing::debug!(endpoint = %self.key.endpoint, ?reason, %said, last_stream = u32::from(last), streams = self.streams.len(), "endpoint sent GOAWAY with an error");
            if !self.goaway_counted {
                self.goaway_counted = true;
                m::upstream_goaway(&self.label, reason);
            }
        }
        self.goaway = true;
        self.link.accepting.store(false, Ordering::Release);
        let refused: Vec<StreamId> = self
            .streams
            .keys()
            .filter(|id| **id > last)
            .copied()
            .collect();
        for id in refused {
            if let Some(s) = self.remove(id) {
                let _ = s.client.push(ToClient::Unprocessed(
                    s.client_id,
                    Unprocessed::Refused,
                    s.head,
                ));
            }
        }
    }

    /// The endpoint's response on `id` goes no further (malformed, RFC 9113 8.1.1, or its
    /// head over the size limit): the endpoint's stream is reset with `reason` and the
    /// client's call ends with an error rather than a response cut short or run long. False
    /// if no such stream is open.
    fn bad_response(&mut self, id: StreamId, reason: Reason) -> bool {
        let Some(s) = self.streams.get(&id) else {
            return false;
        };
        let (client, client_id) = (s.client.clone(), s.client_id);
        self.reset(id, reason);
        let _ = client.push(ToClient::BadResponse(client_id));
        true
    }

    fn on_read_error(&mut self, e: ReadError) -> Result<(), ConnError> {
        match e {
            ReadError::Stream(id, reason) => {
                // One malformed response: that stream only.
                if !self.bad_response(id, reason) {
                    self.wire.emit(frame::Reset::new(id, reason).into());
                }
                Ok(())
            }
            ReadError::Conn(reason) => {
                self.wire
                    .emit(frame::GoAway::new(StreamId::zero(), reason).into());
                Err(ConnError::Protocol(reason.into()))
            }
            ReadError::Io(e) => Err(ConnError::Io(e)),
        }
    }

    fn on_msg(&mut self, m: ToUpstream) {
        match m {
            ToUpstream::Open {
                id,
                head,
                eos,
                client,
                client_id,
            } => {
                if self.goaway {
                    self.link.active.fetch_sub(1, Ordering::Relaxed);
                    let _ = client.push(ToClient::Unprocessed(
                        client_id,
                        Unprocessed::Closing,
                        Some(head),
                    ));
                    return;
                }
                let req_done = eos;
                let head_request = head.get(b":method") == Some(&b"HEAD"[..]);
                self.streams.insert(
                    id,
                    UStream {
                        client,
                        client_id,
                        head: Some(head),
                        head_ends: eos,
                        out: self.send.stream(),
                        started: false,
                        req_done,
                        resp_done: false,
                        unacked: 0,
                        credit: 0,
                        head_request,
                        resp_head: false,
                        informational: 0,
                        resp_length: None,
                        resp_received: 0,
                    },
                );
                self.waiting.push_back(id);
                self.start_waiting();
            }
            ToUpstream::Data(d) => {
                let id = d.stream_id();
                let eos = d.is_end_stream();
                if let Some(s) = self.streams.get_mut(&id) {
                    s.req_done |= eos;
                    if s.started {
                        self.send_frame(id, d.into());
                    } else {
                        s.out.push(d.into());
                    }
                }
            }
            ToUpstream::Trailers(h) => {
                let id = h.id;
                if let Some(s) = self.streams.get_mut(&id) {
                    s.req_done = true;
                    if s.started {
                        self.send_frame(id, h.into());
                    } else {
                        s.out.push(h.into());
                    }
                }
            }
            ToUpstream::Reset(id, reason) => {
                self.reset(id, reason);
            }
            ToUpstream::Credit(id, n) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.unacked = s.unacked.saturating_sub(n);
                    self.conn_credit += n;
                    if !s.resp_done {
                        if let Some(credit) = s.add_credit(n, self.stream_window / 2) {
                            self.wire.emit(frame::WindowUpdate::new(id, credit).into());
                        }
                    }
                }
            }
        }
    }

    /// Sends the HEADERS of queued streams while the endpoint's concurrency limit allows;
    /// the rest go back to be picked again while the pool may open another connection.
    fn start_waiting(&mut self) {
        // Not before the endpoint's SETTINGS: its concurrency limit is not known until then,
        // and streams past it would be refused. Nor once the connection is ending: a stream
        // started then never reaches the endpoint, and would be failed as broken instead of
        // going elsewhere.
        if !self.settings_seen || self.ending {
            return;
        }
        while self.started < self.peer_max {
            let Some(id) = self.waiting.pop_front() else {
                return;
            };
            if let Some(s) = self.streams.get_mut(&id) {
                s.started = true;
                self.started += 1;
                if let Some(head) = &s.head {
                    self.wire.emit_headers(id, s.head_ends, head);
                }
                self.drain(id);
            }
        }
        if self.waiting.is_empty()
            || !self
                .shared
                .relay
                .may_grow(self.key, self.shared.config.max_connections_per_endpoint)
        {
            return;
        }
        for id in std::mem::take(&mut self.waiting) {
            if let Some(s) = self.remove(id) {
                let _ = s.client.push(ToClient::Unprocessed(
                    s.client_id,
                    Unprocessed::Overflow,
                    s.head,
                ));
            }
        }
    }

    /// Sends a request frame of a started stream within the endpoint's windows (or queues
    /// it behind the stream's waiting frames), and credits the client connection.
    fn send_frame(&mut self, id: StreamId, f: Out) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = self.wire.send(&mut self.send, id, &mut s.out, f);
        self.sent(id, n);
    }

    /// Moves what a stream may send to the write queue and credits the client connection.
    fn drain(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        // A waiting stream's HEADERS go out in id order, when it starts.
        if !s.started {
            return;
        }
        let n = self.send.drain(id, &mut s.out, &mut self.wire.out);
        self.sent(id, n);
    }

    fn sent(&mut self, id: StreamId, n: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if n > 0 {
            let _ = s.client.push(ToClient::Credit(s.client_id, n));
        }
        if s.resp_done && s.req_done && s.out.is_empty() {
            self.remove(id);
        }
    }

    /// Ends a stream here and tells the endpoint, if it ever saw it.
    fn reset(&mut self, id: StreamId, reason: Reason) {
        if let Some(s) = self.remove(id) {
            if s.started {
                self.wire.emit(frame::Reset::new(id, reason).into());
            }
        }
    }

    fn remove(&mut self, id: StreamId) -> Option<UStream> {
        let mut s = self.streams.remove(&id)?;
        s.out.clear();
        // Response bytes the client connection never credited back will not be now.
        self.conn_credit += s.unacked;
        if s.started {
            self.started -= 1;
            self.start_waiting();
        } else {
            self.waiting.retain(|w| *w != id);
        }
        self.link.active.fetch_sub(1, Ordering::Relaxed);
        if self.streams.is_empty() {
            self.idle_since = self.now;
        }
        Some(s)
    }

    /// The connection ended: every stream on it is told; those never sent (or all, when the
    /// handshake never completed) as `unsent`.
    /// The connection is gone: streams the endpoint had are broken, the others go back to be
    /// sent elsewhere. Returns how many were broken.
    fn fail_streams(&mut self, unsent: Unprocessed) -> usize {
        self.ending = true;
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        let mut broken = 0;
        for id in ids {
            if let Some(s) = self.remove(id) {
                let msg = if s.started && self.settings_seen {
                    broken += 1;
                    ToClient::Broken(s.client_id)
                } else {
                    ToClient::Unprocessed(s.client_id, unsent, s.head)
                };
                let _ = s.client.push(msg);
            }
        }
        broken
    }
}

/// Answers an endpoint may have asked for and left unread before its connection is closed.
const OWED_LIMIT: usize = 1 << 20;

/// Informational heads one response may have (100 Continue, 103 Early Hints: one or two in
/// practice); more is an endpoint filling the client's connection with frames no window
/// bounds.
const MAX_INFORMATIONAL: u8 = 8;

/// Why a response header block is malformed (RFC 9113 8.1 and 8.3.2), if it is; the final
/// head's content-length is kept to check the DATA against.
fn check_response_block(s: &mut UStream, h: &Block) -> Result<(), &'static str> {
    if s.resp_head {
        if !h.eos {
            return Err("trailers without END_STREAM");
        }
        if h.fields.iter().any(|f| f.name.first() == Some(&b':')) {
            return Err("a pseudo-header field in trailers");
        }
        if contradicts_length(s.resp_length, s.resp_received, true) {
            return Err("fewer DATA bytes than the content-length");
        }
        return Ok(());
    }
    // Pseudo-header fields come first (the reader checked): one short pass.
    if h.fields
        .iter()
        .take_while(|f| f.name.first() == Some(&b':'))
        .any(|f| f.name != b":status")
    {
        return Err("a request pseudo-header field in a response");
    }
    let Some(status) = h.fields.status() else {
        return Err("no :status");
    };
    if (100..200).contains(&status) {
        // Informational: the final head is still to come.
        s.informational = s.informational.saturating_add(1);
        return match (status, h.eos) {
            (101, _) => Err("101 (Switching Protocols) in HTTP/2"),
            (_, true) => Err("an informational response that ends the stream"),
            _ if s.informational > MAX_INFORMATIONAL => Err("too many informational responses"),
            _ => Ok(()),
        };
    }
    s.resp_head = true;
    let Some(v) = h.fields.get(b"content-length") else {
        return Ok(());
    };
    let Some(n) = parse_content_length(v) else {
        return Err("a content-length that is not a number");
    };
    if s.head_request || matches!(status, 204 | 304) {
        return Ok(());
    }
    s.resp_length = Some(n);
    if h.eos && n != 0 {
        return Err("END_STREAM on a head whose content-length is not 0");
    }
    Ok(())
}
