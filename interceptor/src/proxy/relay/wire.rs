//! One connection's side of the socket: h2's codec, and the frames waiting for it to take
//! them. Both kinds of connection task write through one of these.

use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::frame::{self, Frame, StreamId};
use h2::Codec;
use tokio::io::{AsyncRead, AsyncWrite};

use super::flow::{SendWindows, StreamOut};

pub(crate) struct Wire<T> {
    pub(crate) codec: Codec<T, Bytes>,
    /// Frames the codec could not take yet, in order.
    pub(crate) out: VecDeque<Frame<Bytes>>,
    /// The codec refused a frame: the connection ends.
    failed: bool,
}

impl<T> Wire<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// `first` goes out before anything else (our SETTINGS).
    pub(crate) fn new(codec: Codec<T, Bytes>, first: VecDeque<Frame<Bytes>>) -> Self {
        Self {
            codec,
            out: first,
            failed: false,
        }
    }

    /// Hands a frame to the codec at once when nothing is queued before it (one move less
    /// per frame than the queue, and frames are large values), else queues it.
    pub(crate) fn emit(&mut self, f: Frame<Bytes>) {
        if self.out.is_empty() {
            // A no-op waker: if the codec cannot take the frame now, it is queued, and the
            // write at the end of the turn polls with the task's own waker.
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(Ok(())) = self.codec.poll_ready(&mut cx) {
                if let Err(error) = self.codec.buffer(f) {
                    tracing::debug!(?error, "frame refused by the codec");
                    self.failed = true;
                }
                return;
            }
        }
        self.out.push_back(f);
    }

    /// The peer's SETTINGS that concern the codec (frame size, HPACK table), and the ACK.
    pub(crate) fn apply_settings(&mut self, s: &frame::Settings) {
        if let Some(size) = s.max_frame_size() {
            self.codec.set_max_send_frame_size(size as usize);
        }
        if let Some(size) = s.header_table_size() {
            self.codec.set_send_header_table_size(size as usize);
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

    /// Writes what is queued; true once all of it reached the socket.
    pub(crate) fn write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        if self.failed {
            return Err(io::Error::other("a frame was refused by the HTTP/2 codec"));
        }
        while let Some(f) = self.out.pop_front() {
            match self.codec.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Err(error) = self.codec.buffer(f) {
                        tracing::debug!(?error, "frame refused by the codec");
                        return Err(io::Error::other("a frame was refused by the HTTP/2 codec"));
                    }
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    self.out.push_front(f);
                    return Ok(false);
                }
            }
        }
        match self.codec.flush(cx) {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }
}
