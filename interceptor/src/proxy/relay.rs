//! The frame-level HTTP/2 relay (`--h2-engine relay`, the default).
//!
//! `read` splits and decodes what every connection sends (framing, HPACK decoding into
//! `fields::HeaderList`) and `encode` writes what we send (framing, HPACK from the static
//! table and plain literals); what h2's server and client would add on top (a state machine
//! per stream on each side, a task per stream, requests rebuilt as `http` types and queued
//! again) is replaced by two kinds of task that pass frames to each other:
//!
//! ```text
//! client_conn   one per client connection: reads its frames, maps each stream to a stream
//!    |  ^       on an upstream connection, answers locally when no endpoint can
//!    v  |       (outbox: frames and window credit, taken once per turn of the other's loop)
//! upstream_conn one per pooled connection to an endpoint (upstreams: the pool)
//! ```
//!
//! A DATA frame's payload crosses as the same `Bytes`; each side keeps the peer's send
//! windows (`flow`) and gives window back to the sender once the bytes were sent on, so
//! the proxy holds at most one granted window per stream. Every frame a connection sends in
//! one turn leaves in one write.

pub(crate) mod client_conn;
pub(crate) mod coalesce;
pub(crate) mod encode;
pub(crate) mod fields;
pub(crate) mod flow;
pub(crate) mod hpack;
pub(crate) mod huffman;
pub(crate) mod outbox;
pub(crate) mod read;
pub(crate) mod static_table;
pub(crate) mod upstream_conn;
pub(crate) mod upstreams;
pub(crate) mod wire;

#[cfg(test)]
mod against_h2;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::frame::{self, StreamId};
use h2::Reason;

pub(crate) use client_conn::serve;
use fields::{Block, HeaderList};
use outbox::Outbox;

/// The client connection preface (RFC 9113 3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What an upstream connection tells a client connection about one of its streams; every
/// stream id here is the client's.
// Headers cross once or twice per stream: boxing them would cost an allocation each, more
// than copying the larger message through the queue.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ToClient {
    /// Response headers or trailers.
    Headers(Block),
    Data(frame::Data<Bytes>),
    /// The endpoint reset the stream.
    Reset(StreamId, Reason),
    /// This many request body bytes went on to the endpoint: the client may send as many.
    Credit(StreamId, u32),
    /// The endpoint never saw the stream (the connection failed before it was sent, or a
    /// GOAWAY put it past the last stream processed): it may go to another endpoint. The
    /// request head comes back with it.
    Unprocessed(StreamId, Unprocessed, Option<RequestHead>),
    /// The connection to the endpoint broke with the stream on it.
    Broken(StreamId),
    /// The endpoint's response was malformed (its headers, or DATA that contradicts its
    /// content-length) or its headers over the size limit.
    BadResponse(StreamId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unprocessed {
    /// Connecting failed; the endpoint was charged if that was its fault.
    ConnectFailed,
    /// GOAWAY or REFUSED_STREAM.
    Refused,
    /// The connection was closing when the stream was queued on it.
    Closing,
    /// Past the endpoint's concurrency limit on this connection while the pool may open
    /// another: the stream is picked again (not an attempt; the endpoint is fine).
    Overflow,
}

/// A request's head, what a replay sends again. It goes with the stream to the upstream
/// connection, which keeps it until the endpoint answers and hands it back if the endpoint
/// never processed the stream: the client connection keeps no copy.
pub(crate) type RequestHead = HeaderList;

/// What a client connection tells an upstream connection; stream ids are the upstream's.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ToUpstream {
    Open {
        id: StreamId,
        head: RequestHead,
        /// END_STREAM on the HEADERS.
        eos: bool,
        client: ClientLink,
        client_id: StreamId,
    },
    Data(frame::Data<Bytes>),
    /// Request trailers.
    Trailers(Block),
    Reset(StreamId, Reason),
    /// This many response body bytes went on to the client.
    Credit(StreamId, u32),
}

/// Where upstream connections send a client connection's frames.
pub(crate) type ClientLink = Arc<Outbox<ToClient>>;

/// Which pool a connection belongs to: one per worker thread, Service port and endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) worker: usize,
    pub(crate) dest: SocketAddr,
    pub(crate) endpoint: SocketAddr,
}

/// A pooled connection to one endpoint, as the client connections see it.
pub(crate) struct UpLink {
    outbox: Outbox<ToUpstream, IdAllocator>,
    /// Streams open on it (queued ones included).
    active: AtomicUsize,
    /// The endpoint's SETTINGS_MAX_CONCURRENT_STREAMS.
    peer_max_streams: AtomicU32,
    /// Takes new streams (not closing, not failed).
    accepting: AtomicBool,
    /// The handshake finished.
    ready: AtomicBool,
}

/// Client-initiated stream ids in the order their HEADERS are queued.
pub(crate) struct IdAllocator {
    next: u32,
}

impl UpLink {
    fn new() -> Self {
        Self {
            outbox: Outbox::new(IdAllocator { next: 1 }),
            active: AtomicUsize::new(0),
            peer_max_streams: AtomicU32::new(u32::MAX),
            accepting: AtomicBool::new(true),
            ready: AtomicBool::new(false),
        }
    }

    /// Queues a new stream's HEADERS; its upstream id, or the head back if the connection
    /// takes no new streams.
    // The head comes back by value, as it went in: boxing it would cost an allocation per
    // stream to save a move on a path taken only when a connection is closing.
    #[allow(clippy::result_large_err)]
    pub(crate) fn open(
        &self,
        head: RequestHead,
        eos: bool,
        client: &ClientLink,
        client_id: StreamId,
    ) -> Result<StreamId, RequestHead> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(head);
        }
        #[allow(clippy::result_large_err)]
        let queued = self.outbox.push_with(head, |ids, head| {
            if ids.next > u32::from(StreamId::MAX) {
                return Err(head);
            }
            let id = StreamId::from(ids.next);
            ids.next += 2;
            let open = ToUpstream::Open {
                id,
                head,
                eos,
                client: client.clone(),
                client_id,
            };
            Ok((open, id))
        });
        match queued {
            Ok(id) => {
                self.active.fetch_add(1, Ordering::Relaxed);
                Ok(id)
            }
            Err(head) => {
                // Gone, or out of stream ids: either way it takes no new stream.
                self.accepting.store(false, Ordering::Release);
                Err(head)
            }
        }
    }

    /// Queues a frame of an open stream. Lost only if the connection is gone, and then its
    /// task has told the client connection about every stream it had.
    pub(crate) fn send(&self, m: ToUpstream) {
        let _ = self.outbox.push(m);
    }

    pub(crate) fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Streams it may take before another connection is worth opening.
    pub(crate) fn has_room(&self, per_connection: usize) -> bool {
        self.load() < per_connection.min(self.peer_max())
    }

    /// A new stream would not wait for the endpoint's concurrency limit.
    pub(crate) fn below_peer_limit(&self) -> bool {
        self.load() < self.peer_max()
    }

    fn peer_max(&self) -> usize {
        self.peer_max_streams.load(Ordering::Relaxed) as usize
    }

    pub(crate) fn load(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Stream maps are keyed by stream id, which peers choose but only ever as increasing odd
/// numbers: a multiplicative hash spreads them, and SipHash's resistance to chosen keys buys
/// nothing here.
pub(crate) type IdHash = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Folded multiply: the table indexes by the low bits and tags by the high ones, and
        // both must vary with the id.
        let x = (n as u128) * 0x9E37_79B9_7F4A_7C15u128;
        self.0 = (x as u64) ^ ((x >> 64) as u64);
    }
}
