//! Moves one direction of a stream (DATA then optional trailers) from an h2 `RecvStream` to
//! an h2 `SendStream`, with end-to-end flow control: receive window is released to the sender
//! only once the bytes were handed to the other side within its window, so memory per stream
//! stays bounded by the windows.
//!
//! `step` is cancel-safe (all progress lives in the struct), so it can sit in a `select!`
//! next to the other direction, resets and deadlines.
//!
//! A request body can keep a replay log: up to `limit` bytes of everything read, so that a
//! stream the endpoint refused can be sent again elsewhere.

use std::future::poll_fn;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue};

#[derive(Debug)]
pub enum PumpError {
    /// Reading from the source failed (it was reset, or its connection failed).
    Recv(h2::Error),
    /// The sink was reset by its peer with this reason, or failed.
    Send(Option<Reason>, Option<h2::Error>),
}

#[derive(Debug, Clone)]
enum Event {
    Data(Bytes),
    End(Option<HeaderMap>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Data,
    Trailers,
    Ended,
}

/// Bytes read but not yet sent.
struct Pending {
    chunk: Bytes,
    /// How many of them still have their window to be released to the source (the ones the
    /// replay log did not take).
    unreleased: usize,
    /// Nothing follows them (no trailers): the last part carries END_STREAM, so a body
    /// costs no empty DATA frame of its own.
    last: bool,
}

pub struct Pump {
    recv: RecvStream,
    source: Source,
    pending: Option<Pending>,
    /// A chunk read while joining small ones that was too big to join: the next one to take.
    held: Option<Bytes>,
    /// Bytes of a chunk handed to h2 before the sink had window for them (`send_pending`),
    /// whose receive window is released once it has.
    owed: usize,
    sent_end: bool,
    log: Vec<Event>,
    log_bytes: usize,
    limit: usize,
    replayable: bool,
    cursor: usize,
    /// Trailer fields to note before the trailers are handed on (`keep_end_fields`).
    end_names: &'static [HeaderName],
    /// Those of `end_names` the trailers that ended the stream had.
    end_fields: Vec<(HeaderName, HeaderValue)>,
}

impl Pump {
    /// A pump without replay log.
    pub fn new(recv: RecvStream) -> Self {
        Self::with_replay(recv, 0)
    }

    /// A pump that keeps up to `limit` bytes for replay.
    pub fn with_replay(recv: RecvStream, limit: usize) -> Self {
        let ended = recv.is_end_stream();
        Self {
            recv,
            source: if ended { Source::Ended } else { Source::Data },
            pending: None,
            held: None,
            owed: 0,
            sent_end: false,
            log: Vec::new(),
            log_bytes: 0,
            limit,
            replayable: limit > 0,
            cursor: 0,
            end_names: &[],
            end_fields: Vec::new(),
        }
    }

    /// Notes these fields of the trailers that end the stream (`end_field`), for status
    /// accounting: the trailers themselves are handed on, not copied.
    pub fn keep_end_fields(mut self, names: &'static [HeaderName]) -> Self {
        self.end_names = names;
        self
    }

    /// True when the source had nothing but END_STREAM: send the headers with END_STREAM.
    pub fn empty(&self) -> bool {
        self.source == Source::Ended && self.log.is_empty() && self.pending.is_none()
    }

    /// Marks the end as already sent (with the headers).
    pub fn mark_sent_end(&mut self) {
        self.sent_end = true;
    }

    /// Everything, END_STREAM included, has been handed to the sink.
    pub fn done(&self) -> bool {
        self.sent_end
    }

    /// Whether what was read so far is all in the replay log.
    pub fn can_replay(&self) -> bool {
        self.replayable
    }

    /// A field named in `keep_end_fields`, if the trailers that ended the stream had it.
    pub fn end_field(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.end_fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Starts sending from the beginning of the log again (to a new sink). Only valid when
    /// `can_replay()`.
    pub fn rewind(&mut self) {
        self.cursor = 0;
        self.pending = None;
        self.sent_end = false;
    }

    /// Moves one event (a DATA chunk or part of one, or the end) to `tx`.
    pub async fn step(&mut self, tx: &mut SendStream<Bytes>) -> Result<(), PumpError> {
        if self.pending.is_none() {
            if self.cursor < self.log.len() {
                let ev = self.log[self.cursor].clone();
                self.cursor += 1;
                match ev {
                    Event::Data(chunk) => {
                        let chunk = self.join_logged(chunk);
                        self.pending = Some(Pending {
                            chunk,
                            unreleased: 0,
                            last: false,
                        })
                    }
                    Event::End(t) => return self.send_end(tx, t),
                }
            } else {
                // The end of the DATA and the trailers after it in one step: whatever ends the
                // stream is usually there already.
                if let Some(b) = self.held.take() {
                    self.take_joined(b).await.map_err(PumpError::Recv)?;
                } else if self.source == Source::Data {
                    // Watch the sink for a reset while waiting: a peer that gives up must
                    // not wait for the other side's next byte to be noticed.
                    let next = poll_fn(|cx| {
                        if let Poll::Ready(r) = tx.poll_reset(cx) {
                            return Poll::Ready(Err(r));
                        }
                        self.recv.poll_data(cx).map(Ok)
                    })
                    .await;
                    match next {
                        Err(Ok(reason)) => return Err(PumpError::Send(Some(reason), None)),
                        Err(Err(e)) => return Err(PumpError::Send(e.reason(), Some(e))),
                        Ok(Some(Ok(b))) => self.take_joined(b).await.map_err(PumpError::Recv)?,
                        Ok(Some(Err(e))) => return Err(PumpError::Recv(e)),
                        Ok(None) => self.source = Source::Trailers,
                    }
                }
                if self.pending.is_none() {
                    match self.source {
                        Source::Data => return Ok(()),
                        Source::Trailers => {
                            let t = poll_fn(|cx| self.recv.poll_trailers(cx))
                                .await
                                .map_err(PumpError::Recv)?;
                            self.source = Source::Ended;
                            if self.replayable {
                                self.record(Event::End(t.clone()), 0);
                            }
                            return self.send_end(tx, t);
                        }
                        Source::Ended => {
                            self.record(Event::End(None), 0);
                            return self.send_end(tx, None);
                        }
                    }
                }
            }
        }
        self.send_pending(tx).await
    }

    /// Takes a chunk read from the source, with the small ones already there behind it.
    async fn take_joined(&mut self, b: Bytes) -> Result<(), h2::Error> {
        self.take(b)?;
        poll_fn(|cx| Poll::Ready(self.join_small(cx))).await
    }

    fn take(&mut self, b: Bytes) -> Result<(), h2::Error> {
        if b.is_empty() {
            return Ok(());
        }
        let (unreleased, last) = self.account(&b)?;
        self.pending = Some(Pending {
            chunk: b,
            unreleased,
            last,
        });
        Ok(())
    }

    /// Logs a chunk just read (when replayable) and settles its window: released at once if
    /// the log took it. Returns the bytes whose window is still owed to the source, and
    /// whether the chunk ended the stream.
    fn account(&mut self, b: &Bytes) -> Result<(usize, bool), h2::Error> {
        let len = b.len();
        let logged = self.record(Event::Data(b.clone()), len);
        if logged {
            // The log holds it now: the sender's window can reopen at once.
            self.recv.flow_control().release_capacity(len)?;
        }
        // END_STREAM came on this DATA frame: no trailers follow.
        let last = self.recv.is_end_stream();
        if last {
            self.source = Source::Ended;
            self.record(Event::End(None), 0);
        }
        Ok((if logged { 0 } else { len }, last))
    }

    /// Joins to a small pending chunk the small chunks that are already there to read, so a
    /// burst of tiny DATA frames leaves as one frame. Why: h2 endpoints close a connection
    /// whose unread small frames exceed a budget (GOAWAY ENHANCE_YOUR_CALM), and an upstream
    /// connection carries other clients' calls (the relay does the same, relay/coalesce.rs).
    /// Never waits: it takes only what h2 has buffered (`cx` only registers the task). Not
    /// async, so nothing can stop it between reading a chunk and joining it.
    fn join_small(&mut self, cx: &mut Context<'_>) -> Result<(), h2::Error> {
        let Some(first) = self.pending.as_ref() else {
            return Ok(());
        };
        if first.last || first.chunk.len() >= SMALL {
            return Ok(());
        }
        let mut joined = Joined::new(first.chunk.clone());
        let (mut unreleased, mut last) = (0, false);
        let result = loop {
            if last || self.source != Source::Data {
                break Ok(());
            }
            let b = match self.recv.poll_data(cx) {
                Poll::Pending => break Ok(()),
                Poll::Ready(None) => {
                    self.source = Source::Trailers;
                    break Ok(());
                }
                Poll::Ready(Some(Err(e))) => break Err(e),
                Poll::Ready(Some(Ok(b))) => b,
            };
            if b.is_empty() {
                // An empty frame: END_STREAM, if it had it, is the next poll's None.
                continue;
            }
            if !joined.fits(&b) {
                self.held = Some(b);
                break Ok(());
            }
            match self.account(&b) {
                Ok((owed, ended)) => (unreleased, last) = (unreleased + owed, ended),
                Err(e) => break Err(e),
            }
            joined.push(&b);
        };
        if let Some(p) = self.pending.as_mut() {
            p.chunk = joined.into_bytes();
            p.unreleased += unreleased;
            p.last = last;
        }
        result
    }

    /// On replay, the small chunks the log holds in a row go as one, as they were joined the
    /// first time.
    fn join_logged(&mut self, chunk: Bytes) -> Bytes {
        if chunk.len() >= SMALL {
            return chunk;
        }
        let mut joined = Joined::new(chunk);
        while let Some(Event::Data(b)) = self.log.get(self.cursor) {
            if !joined.fits(b) {
                break;
            }
            joined.push(b);
            self.cursor += 1;
        }
        joined.into_bytes()
    }

    /// Appends to the replay log; returns false (and stops logging) when over the limit.
    fn record(&mut self, ev: Event, len: usize) -> bool {
        if !self.replayable {
            return false;
        }
        if self.log_bytes + len > self.limit {
            self.replayable = false;
            self.log = Vec::new();
            self.cursor = 0;
            return false;
        }
        self.log_bytes += len;
        self.log.push(ev);
        self.cursor = self.log.len();
        true
    }

    fn send_end(
        &mut self,
        tx: &mut SendStream<Bytes>,
        t: Option<HeaderMap>,
    ) -> Result<(), PumpError> {
        // The stream ends here: the source sends nothing more on it, so its window can go.
        self.settle_owed().map_err(PumpError::Recv)?;
        let r = match t {
            Some(t) => {
                self.end_fields = self
                    .end_names
                    .iter()
                    .filter_map(|n| t.get(n).map(|v| (n.clone(), v.clone())))
                    .collect();
                tx.send_trailers(t)
            }
            None => tx.send_data(Bytes::new(), true),
        };
        r.map_err(|e| PumpError::Send(e.reason(), Some(e)))?;
        self.sent_end = true;
        Ok(())
    }

    async fn send_pending(&mut self, tx: &mut SendStream<Bytes>) -> Result<(), PumpError> {
        let Some(want) = self.pending.as_ref().map(|p| p.chunk.len()) else {
            return Ok(());
        };
        // A new stream has no send window until the connection task assigns it, so waiting
        // for it here would send this stream's HEADERS in one write and its DATA in the next.
        // h2 buffers a chunk sent ahead of its window and sends it with the HEADERS once the
        // window is assigned; the source's window for it is released only then (next step,
        // or the end), so one small chunk per stream at most sits in memory outside the
        // windows.
        let ahead = tx.capacity() == 0 && self.owed == 0 && want <= AHEAD_OF_WINDOW;
        let cap = if ahead {
            want
        } else {
            tx.reserve_capacity(want);
            let cap = loop {
                let c = tx.capacity();
                if c > 0 {
                    break c.min(want);
                }
                match poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(PumpError::Send(e.reason(), Some(e))),
                    None => return Err(PumpError::Send(None, None)),
                }
            };
            // The sink has window again, so the chunk sent ahead of it has been given some.
            self.settle_owed().map_err(PumpError::Recv)?;
            cap
        };
        let Some(p) = self.pending.as_mut() else {
            return Ok(());
        };
        // The bytes whose window is owed are the chunk's tail (joining puts what the replay
        // log took first): release those of them that go now.
        let release = cap.saturating_sub(p.chunk.len() - p.unreleased);
        p.unreleased -= release;
        let part = p.chunk.split_to(cap);
        let end = p.chunk.is_empty() && p.last;
        if p.chunk.is_empty() {
            self.pending = None;
        }
        tx.send_data(part, end)
            .map_err(|e| PumpError::Send(e.reason(), Some(e)))?;
        if release > 0 {
            if ahead {
                self.owed = release;
            } else {
                self.recv
                    .flow_control()
                    .release_capacity(release)
                    .map_err(PumpError::Recv)?;
            }
        }
        if end {
            self.sent_end = true;
            // Nothing follows on this stream: its window can go.
            self.settle_owed().map_err(PumpError::Recv)?;
        }
        Ok(())
    }

    fn settle_owed(&mut self) -> Result<(), h2::Error> {
        if self.owed > 0 {
            let owed = std::mem::take(&mut self.owed);
            self.recv.flow_control().release_capacity(owed)?;
        }
        Ok(())
    }
}

/// The largest chunk sent before its stream has send window (one default-sized frame).
const AHEAD_OF_WINDOW: usize = 16 * 1024;

/// A small chunk and the small chunks joined to it. Copies only once something is joined.
struct Joined {
    first: Bytes,
    buf: Option<BytesMut>,
}

impl Joined {
    fn new(first: Bytes) -> Self {
        Self { first, buf: None }
    }

    fn len(&self) -> usize {
        self.buf.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    /// Whether `b` may join: small, and the whole stays within `MAX_JOINED`.
    fn fits(&self, b: &Bytes) -> bool {
        b.len() < SMALL && self.len() + b.len() <= MAX_JOINED
    }

    fn push(&mut self, b: &Bytes) {
        let first = &self.first;
        self.buf
            .get_or_insert_with(|| {
                let mut buf = BytesMut::with_capacity(4 * SMALL);
                buf.extend_from_slice(first);
                buf
            })
            .extend_from_slice(b);
    }

    fn into_bytes(self) -> Bytes {
        self.buf.map_or(self.first, BytesMut::freeze)
    }
}

/// Chunks under this many bytes are joined to a small chunk before them (h2's threshold for
/// the small-frame budget).
const SMALL: usize = 256;
/// A joined chunk stays within one default-sized frame.
const MAX_JOINED: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use http::Request;
    use tokio::task::JoinHandle;

    /// An h2 connection over an in-memory pipe: the client's request handle and the server,
    /// whose small-DATA-frame budget is h2's default unless `budget` says otherwise.
    async fn pair(
        budget: Option<usize>,
    ) -> (
        h2::client::SendRequest<Bytes>,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (c, s) = tokio::io::duplex(1 << 20);
        let (client, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = h2::server::Builder::new();
        if let Some(b) = budget {
            builder.data_frame_budget(b);
        }
        let server = builder.handshake(s).await.expect("server handshake");
        (client, server)
    }

    fn post() -> Request<()> {
        Request::post("http://test/pump").body(()).expect("request")
    }

    /// A request body sent as `sizes.len()` DATA frames in one go, as the pump's source.
    async fn source(sizes: Vec<usize>) -> RecvStream {
        // The flood arrives before the pump reads: the source's own budget must not be what
        // ends it (the sink, standing for the endpoint, keeps h2's default).
        let (client, mut server) = pair(Some(1 << 20)).await;
        tokio::spawn(async move {
            let mut client = client.ready().await.expect("ready");
            let (_resp, mut tx) = client.send_request(post(), false).expect("send");
            for (i, size) in sizes.into_iter().enumerate() {
                tx.send_data(Bytes::from(vec![(i % 251) as u8; size]), false)
                    .expect("data");
            }
            tx.send_data(Bytes::new(), true).expect("end");
            // Keep the connection up until the test ends.
            std::future::pending::<()>().await
        });
        let (req, _respond) = server.accept().await.expect("a request").expect("accepted");
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        req.into_body()
    }

    /// A stream to a fresh h2 server: what the pump sends to, and a task that returns the
    /// non-empty DATA frames and bytes that arrived (reading gives the window back).
    async fn sink() -> (SendStream<Bytes>, JoinHandle<(usize, Vec<u8>)>) {
        let (client, mut server) = pair(None).await;
        let mut client = client.ready().await.expect("ready");
        let (_resp, tx) = client.send_request(post(), false).expect("send");
        let seen = tokio::spawn(async move {
            let _client = client;
            let (req, _respond) = server.accept().await.expect("a request").expect("accepted");
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let mut body = req.into_body();
            let (mut frames, mut bytes) = (0, Vec::new());
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("data");
                body.flow_control()
                    .release_capacity(chunk.len())
                    .expect("release");
                if !chunk.is_empty() {
                    frames += 1;
                    bytes.extend_from_slice(&chunk);
                }
            }
            (frames, bytes)
        });
        (tx, seen)
    }

    /// Pumps everything to a new sink; the body is larger than the 64 KiB windows, so it only
    /// gets through if every byte's window is given back.
    async fn pump_to_new_sink(pump: &mut Pump) -> (usize, Vec<u8>) {
        let (mut tx, seen) = sink().await;
        let drive = async {
            while !pump.done() {
                pump.step(&mut tx).await.expect("step");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), drive)
            .await
            .expect("the body got through (flow control released)");
        tokio::time::timeout(Duration::from_secs(10), seen)
            .await
            .expect("the sink saw END_STREAM")
            .expect("sink")
    }

    fn expected(sizes: &[usize]) -> Vec<u8> {
        sizes
            .iter()
            .enumerate()
            .flat_map(|(i, &size)| std::iter::repeat_n((i % 251) as u8, size))
            .collect()
    }

    /// 600 x 200 bytes (117 KiB, past both 64 KiB windows) through a pump with a replay log of
    /// `replay_limit` bytes: every byte arrives, in order, in joined frames.
    async fn six_hundred_small_frames_arrive_joined(replay_limit: usize) {
        let sizes = vec![200; 600];
        let mut pump = Pump::with_replay(source(sizes.clone()).await, replay_limit);
        let (frames, bytes) = pump_to_new_sink(&mut pump).await;
        assert_eq!(bytes, expected(&sizes));
        assert!(frames < 600 / 4, "{frames} frames for 600 small ones");
    }

    #[tokio::test]
    async fn tiny_frames_are_joined_and_their_window_given_back() {
        six_hundred_small_frames_arrive_joined(0).await;
    }

    #[tokio::test]
    async fn joining_keeps_the_replay_log_and_its_window_accounting() {
        // The replay log takes the first 20 KiB (released at once), the rest is released as
        // it is sent: both kinds end up in joined chunks.
        six_hundred_small_frames_arrive_joined(20 * 1024).await;
    }

    #[tokio::test]
    async fn a_replay_sends_the_logged_tiny_frames_joined() {
        let sizes = vec![100; 300];
        let mut pump = Pump::with_replay(source(sizes.clone()).await, 64 * 1024);
        let (_, first) = pump_to_new_sink(&mut pump).await;
        assert!(pump.can_replay(), "30 KB fits the replay log");
        pump.rewind();
        let (frames, again) = pump_to_new_sink(&mut pump).await;
        assert_eq!(first, expected(&sizes));
        assert_eq!(again, first);
        assert!(
            frames < 300 / 4,
            "{frames} frames for 300 small ones replayed"
        );
    }

    #[tokio::test]
    async fn large_frames_pass_unjoined_and_keep_their_order_after_a_small_one() {
        // A small chunk, then large ones: the first large one is read while joining and held.
        let mut sizes = vec![10];
        sizes.extend([4096; 20]);
        let mut pump = Pump::new(source(sizes.clone()).await);
        let (frames, bytes) = pump_to_new_sink(&mut pump).await;
        assert_eq!(bytes, expected(&sizes));
        assert!(frames > 20, "{frames} frames for 21");
    }
}
