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
use std::task::Poll;

use bytes::Bytes;
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
    /// Their window is still to be released to the source.
    release: bool,
    /// Nothing follows them (no trailers): the last part carries END_STREAM, so a body
    /// costs no empty DATA frame of its own.
    last: bool,
}

pub struct Pump {
    recv: RecvStream,
    source: Source,
    pending: Option<Pending>,
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
                        self.pending = Some(Pending {
                            chunk,
                            release: false,
                            last: false,
                        })
                    }
                    Event::End(t) => return self.send_end(tx, t),
                }
            } else {
                // The end of the DATA and the trailers after it in one step: whatever ends the
                // stream is usually there already.
                if self.source == Source::Data {
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
                        Ok(Some(Ok(b))) => self.take(b).map_err(PumpError::Recv)?,
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

    fn take(&mut self, b: Bytes) -> Result<(), h2::Error> {
        if b.is_empty() {
            return Ok(());
        }
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
        self.pending = Some(Pending {
            chunk: b,
            release: !logged,
            last,
        });
        Ok(())
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
        let part = p.chunk.split_to(cap);
        let (release, end) = (p.release, p.chunk.is_empty() && p.last);
        if p.chunk.is_empty() {
            self.pending = None;
        }
        tx.send_data(part, end)
            .map_err(|e| PumpError::Send(e.reason(), Some(e)))?;
        if release {
            if ahead {
                self.owed = cap;
            } else {
                self.recv
                    .flow_control()
                    .release_capacity(cap)
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
