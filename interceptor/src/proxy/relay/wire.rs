//! One connection's side of the socket: h2's codec reads and decodes its frames; what we send
//! is encoded by `encode` and written to the socket here, past the codec (whose own write
//! buffer is never touched). Both kinds of connection task go through one of these.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::frame::{self, Frame, StreamId};
use h2::Codec;
use tokio::io::{AsyncRead, AsyncWrite};

use super::encode::{Encoder, MAX_IOVECS};
use super::flow::{SendWindows, StreamOut};
use super::RequestHead;

/// Past this many bytes of answers (PING and SETTINGS acknowledgements, resets, header
/// blocks) encoded while the socket never emptied, a client connection's frames are not read:
/// a client that keeps asking without reading holds at most about this much of ours. DATA does
/// not count: the client's own windows bound it, and a client reading a large response slowly
/// must still be read. An upstream connection is not paused so: it carries many clients'
/// streams, and a server that reads only after it wrote would deadlock with us.
const BACKLOG_LIMIT: usize = 1 << 20;

pub(crate) struct Wire<T> {
    pub(crate) codec: Codec<T, Bytes>,
    /// Frames `SendWindows::drain` released, encoded before anything sent after them.
    pub(crate) out: VecDeque<Frame<Bytes>>,
    enc: Encoder,
    /// A frame could not be encoded: the connection ends.
    failed: bool,
}

impl<T> Wire<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// `first` goes out before anything else (our SETTINGS).
    pub(crate) fn new(codec: Codec<T, Bytes>, first: VecDeque<Frame<Bytes>>) -> Self {
        let mut wire = Self {
            codec,
            out: first,
            enc: Encoder::new(),
            failed: false,
        };
        wire.encode_released();
        wire
    }

    /// Encodes `f` behind everything sent before it; it reaches the socket with the next
    /// `write`.
    pub(crate) fn emit(&mut self, f: Frame<Bytes>) {
        self.encode_released();
        self.encode(f);
    }

    /// A request's HEADERS, encoded from the head the stream keeps (for a replay).
    pub(crate) fn emit_head(&mut self, id: StreamId, eos: bool, head: &RequestHead) {
        self.encode_released();
        self.enc.headers(id, eos, &head.pseudo, &head.fields);
    }

    fn encode(&mut self, f: Frame<Bytes>) {
        if self.enc.frame(f).is_err() {
            tracing::debug!("a frame the relay never sends (PUSH_PROMISE or PRIORITY)");
            self.failed = true;
        }
    }

    fn encode_released(&mut self) {
        while let Some(f) = self.out.pop_front() {
            self.encode(f);
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
        f: Frame<Bytes>,
    ) -> u32 {
        match windows.admit(s, f) {
            Some((f, n)) => {
                self.emit(f);
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
            let io = self.codec.get_mut();
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let used = self.enc.slices(&mut iov);
            match Pin::new(io).poll_write_vectored(cx, &iov[..used]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.enc.advance(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        match Pin::new(self.codec.get_mut()).poll_flush(cx) {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Closes the write side (after `write` returned true).
    pub(crate) fn shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.codec.get_mut()).poll_shutdown(cx)
    }
}
