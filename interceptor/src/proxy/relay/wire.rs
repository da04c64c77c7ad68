//! One connection's side of the socket: `read` splits and decodes the frames the peer sends,
//! `encode` turns ours into bytes, written here. Both kinds of connection task go through one
//! of these.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::frame::{self, Frame, StreamId};
use tokio::io::{AsyncRead, AsyncWrite};

use super::encode::{Encoder, MAX_IOVECS};
use super::fields::{Block, HeaderList};
use super::flow::{Out, SendWindows, StreamOut};
use super::read::{In, ReadError, Reader};

/// Past this many bytes of answers (PING and SETTINGS acknowledgements, resets, header
/// blocks) encoded while the socket never emptied, a client connection's frames are not read:
/// a client that keeps asking without reading holds at most about this much of ours. DATA does
/// not count: the client's own windows bound it, and a client reading a large response slowly
/// must still be read. An upstream connection is not paused so: it carries many clients'
/// streams, and a server that reads only after it wrote would deadlock with us (one that
/// goes on asking for answers without reading them is closed: `upstream_conn`'s OWED_LIMIT).
const BACKLOG_LIMIT: usize = 1 << 20;

pub(crate) struct Wire<T> {
    io: T,
    reader: Reader,
    /// Frames `SendWindows::drain` released, encoded before anything sent after them.
    pub(crate) out: VecDeque<Out>,
    enc: Encoder,
    /// A frame could not be encoded: the connection ends.
    failed: bool,
}

impl<T> Wire<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// `first` goes out before anything else (our SETTINGS); `max_list` is the header list
    /// size our SETTINGS announce.
    pub(crate) fn new(io: T, max_list: usize, first: Vec<Frame<Bytes>>) -> Self {
        let mut wire = Self {
            io,
            reader: Reader::new(max_list),
            out: VecDeque::new(),
            enc: Encoder::new(),
            failed: false,
        };
        for f in first {
            wire.encode(f);
        }
        wire
    }

    /// The next frame the peer sent.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<In, ReadError>>> {
        self.reader.poll_next(&mut self.io, cx)
    }

    /// Encodes `f` behind everything sent before it; it reaches the socket with the next
    /// `write`.
    pub(crate) fn emit(&mut self, f: Frame<Bytes>) {
        self.encode_released();
        self.encode(f);
    }

    /// A HEADERS frame (with CONTINUATION frames if it needs them).
    pub(crate) fn emit_headers(&mut self, id: StreamId, eos: bool, fields: &HeaderList) {
        self.encode_released();
        self.enc.headers(id, eos, fields);
    }

    pub(crate) fn emit_block(&mut self, b: &Block) {
        self.emit_headers(b.id, b.eos, &b.fields);
    }

    fn emit_out(&mut self, f: Out) {
        match f {
            Out::Data(d) => self.emit(d.into()),
            Out::Headers(b) => self.emit_block(&b),
        }
    }

    fn encode(&mut self, f: Frame<Bytes>) {
        if self.enc.frame(f).is_err() {
            tracing::debug!("a frame the relay never sends (PUSH_PROMISE or PRIORITY)");
            self.failed = true;
        }
    }

    fn encode_released(&mut self) {
        while let Some(f) = self.out.pop_front() {
            match f {
                Out::Data(d) => self.encode(d.into()),
                Out::Headers(b) => self.enc.headers(b.id, b.eos, &b.fields),
            }
        }
    }

    /// The peer's SETTINGS that concern what we send (frame size), and the ACK. Its header
    /// table size needs nothing: our encoder keeps no table.
    pub(crate) fn apply_settings(&mut self, s: &frame::Settings) {
        if let Some(size) = s.max_frame_size() {
            self.enc.set_max_frame(size as usize);
        }
        self.emit(frame::Settings::ack().into());
    }

    /// Sends a frame of stream `id` within the peer's windows: at once when nothing of the
    /// stream waits, else behind what waits. Returns the DATA bytes sent.
    pub(crate) fn send(
        &mut self,
        windows: &mut SendWindows,
        id: StreamId,
        s: &mut StreamOut,
        f: Out,
    ) -> u32 {
        match windows.admit(s, f) {
            Some((f, n)) => {
                self.emit_out(f);
                n
            }
            None => windows.drain(id, s, &mut self.out),
        }
    }

    /// Nothing waits to be written.
    pub(crate) fn is_idle(&self) -> bool {
        self.out.is_empty() && self.enc.pending() == 0
    }

    /// Reading more frames would only add answers to a backlog the peer is not taking.
    pub(crate) fn is_backed_up(&self) -> bool {
        self.enc.answers() > BACKLOG_LIMIT
    }

    /// Writes what is pending; true once all of it reached the socket.
    pub(crate) fn write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        self.encode_released();
        if self.failed {
            return Err(io::Error::other("a frame the relay never sends"));
        }
        while self.enc.pending() > 0 {
            let io = &mut self.io;
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let used = self.enc.slices(&mut iov);
            match Pin::new(io).poll_write_vectored(cx, &iov[..used]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.enc.advance(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Closes the write side (after `write` returned true).
    pub(crate) fn shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
