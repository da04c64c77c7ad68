//! Send-side flow control of one connection (RFC 9113 6.9): what the peer lets us send on the
//! connection and on each stream, and the frames of a stream that wait for window.
//!
//! Receive windows need no state of their own here: a DATA frame is passed on as it arrives
//! and its bytes are given back to the sender (WINDOW_UPDATE) once the other connection has
//! sent them on, so what the proxy holds for a stream never exceeds the window it granted.

use std::collections::VecDeque;

use bytes::Bytes;
use h2::frame::{Data, StreamId};

use super::fields::Block;

/// RFC 9113 6.5.2: the initial window before SETTINGS say otherwise.
pub(crate) const DEFAULT_WINDOW: u32 = 65_535;
/// RFC 9113 6.9.1: a window never exceeds 2^31 - 1.
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A frame of a stream that may wait for window: DATA, or the header block behind it
/// (trailers; response headers are never behind anything).
pub(crate) enum Out {
    Data(Data<Bytes>),
    Headers(Block),
}

impl From<Data<Bytes>> for Out {
    fn from(d: Data<Bytes>) -> Self {
        Out::Data(d)
    }
}

impl From<Block> for Out {
    fn from(b: Block) -> Self {
        Out::Headers(b)
    }
}

/// The peer's windows on one connection.
pub(crate) struct SendWindows {
    conn: i64,
    initial: i64,
    /// Streams with DATA waiting for connection window, oldest first.
    blocked: VecDeque<StreamId>,
}

/// What one stream may send and what waits to be sent.
pub(crate) struct StreamOut {
    window: i64,
    queue: VecDeque<Out>,
    blocked: bool,
}

/// A window update the peer may not send (RFC 9113 6.9.1): past 2^31 - 1.
#[derive(Debug)]
pub(crate) struct WindowOverflow;

impl SendWindows {
    pub(crate) fn new() -> Self {
        Self {
            conn: DEFAULT_WINDOW as i64,
            initial: DEFAULT_WINDOW as i64,
            blocked: VecDeque::new(),
        }
    }

    pub(crate) fn stream(&self) -> StreamOut {
        StreamOut {
            window: self.initial,
            queue: VecDeque::new(),
            blocked: false,
        }
    }

    /// SETTINGS_INITIAL_WINDOW_SIZE changed: returns the change every open stream's window
    /// takes (RFC 9113 6.9.2).
    pub(crate) fn set_initial(&mut self, size: u32) -> i64 {
        let delta = size as i64 - self.initial;
        self.initial = size as i64;
        delta
    }

    /// `set_initial`, applied to every open stream's window. Returns the streams whose window
    /// went past the protocol's limit.
    pub(crate) fn resize<'a>(
        &mut self,
        size: u32,
        streams: impl Iterator<Item = (StreamId, &'a mut StreamOut)>,
    ) -> Vec<StreamId> {
        let delta = self.set_initial(size);
        streams
            .filter_map(|(id, s)| s.grow(delta).is_err().then_some(id))
            .collect()
    }

    pub(crate) fn grow_conn(&mut self, inc: u32) -> Result<(), WindowOverflow> {
        self.conn += inc as i64;
        if self.conn > MAX_WINDOW {
            return Err(WindowOverflow);
        }
        Ok(())
    }

    /// The next stream that waited for connection window, while there is some.
    pub(crate) fn next_unblocked(&mut self) -> Option<StreamId> {
        if self.conn <= 0 {
            return None;
        }
        self.blocked.pop_front()
    }

    /// Admits `f` to be sent now when nothing of its stream waits and the windows allow
    /// (the common case, which then touches no queue of the stream's): returns it with its
    /// DATA bytes, already counted. Otherwise queues it behind what waits (`drain` sends it).
    pub(crate) fn admit(&mut self, s: &mut StreamOut, f: Out) -> Option<(Out, u32)> {
        if s.queue.is_empty() {
            let len = match &f {
                Out::Data(d) => d.payload().len() as i64,
                _ => 0,
            };
            if len == 0 || len <= s.window.min(self.conn) {
                s.window -= len;
                self.conn -= len;
                return Some((f, len as u32));
            }
        }
        s.push(f);
        None
    }

    /// `admit`, then what may be sent goes to `out`. Returns the DATA bytes moved.
    #[cfg(test)]
    fn send(&mut self, id: StreamId, s: &mut StreamOut, f: Out, out: &mut VecDeque<Out>) -> u32 {
        match self.admit(s, f) {
            Some((f, n)) => {
                out.push_back(f);
                n
            }
            None => self.drain(id, s, out),
        }
    }

    /// Moves what `s` may send now to `out`, in order. Returns the DATA bytes moved.
    pub(crate) fn drain(
        &mut self,
        id: StreamId,
        s: &mut StreamOut,
        out: &mut VecDeque<Out>,
    ) -> u32 {
        let mut sent = 0i64;
        while let Some(front) = s.queue.front_mut() {
            let Out::Data(d) = front else {
                if let Some(f) = s.queue.pop_front() {
                    out.push_back(f);
                }
                continue;
            };
            let len = d.payload().len() as i64;
            if len == 0 {
                // An empty DATA frame (END_STREAM alone) takes no window.
                if let Some(f) = s.queue.pop_front() {
                    out.push_back(f);
                }
                continue;
            }
            let avail = s.window.min(self.conn);
            if avail <= 0 {
                if self.conn <= 0 && s.window > 0 && !s.blocked {
                    s.blocked = true;
                    self.blocked.push_back(id);
                }
                break;
            }
            if len <= avail {
                if let Some(f) = s.queue.pop_front() {
                    out.push_back(f);
                }
                s.window -= len;
                self.conn -= len;
                sent += len;
            } else {
                // Zero-copy: the part that fits shares the payload's buffer.
                let part = d.payload_mut().split_to(avail as usize);
                out.push_back(Data::new(id, part).into());
                s.window -= avail;
                self.conn -= avail;
                sent += avail;
            }
        }
        sent as u32
    }
}

impl StreamOut {
    /// Queues a frame of this stream (DATA, trailers, the end) behind those that wait.
    pub(crate) fn push(&mut self, f: Out) {
        self.queue.push_back(f);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Drops what waits (the stream was reset): returns the DATA bytes dropped.
    pub(crate) fn clear(&mut self) -> u32 {
        let mut n = 0;
        for f in self.queue.drain(..) {
            if let Out::Data(d) = f {
                n += d.payload().len() as u32;
            }
        }
        n
    }

    pub(crate) fn grow(&mut self, inc: i64) -> Result<(), WindowOverflow> {
        self.window += inc;
        if self.window > MAX_WINDOW {
            return Err(WindowOverflow);
        }
        Ok(())
    }

    /// Unblocked by a connection window update: it is no longer in the blocked list.
    pub(crate) fn unblock(&mut self) {
        self.blocked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u32, n: usize, eos: bool) -> Out {
        let mut d = Data::new(StreamId::from(id), Bytes::from(vec![7u8; n]));
        d.set_end_stream(eos);
        d.into()
    }

    fn data_len(f: &Out) -> usize {
        match f {
            Out::Data(d) => d.payload().len(),
            _ => usize::MAX,
        }
    }

    #[test]
    fn a_frame_larger_than_the_window_is_split_and_the_rest_waits() {
        let mut w = SendWindows::new();
        let mut s = w.stream();
        let mut out = VecDeque::new();
        s.push(data(1, 70_000, true));
        assert_eq!(w.drain(StreamId::from(1), &mut s, &mut out), 65_535);
        assert_eq!(out.len(), 1);
        assert_eq!(data_len(&out[0]), 65_535);
        assert!(!s.is_empty());
        // The stream window opens, the connection's does not: blocked on the connection.
        s.grow(10_000).expect("in range");
        assert_eq!(w.drain(StreamId::from(1), &mut s, &mut out), 0);
        assert_eq!(w.next_unblocked(), None);
        w.grow_conn(100).expect("in range");
        assert_eq!(w.next_unblocked(), Some(StreamId::from(1)));
        s.unblock();
        assert_eq!(w.drain(StreamId::from(1), &mut s, &mut out), 100);
        w.grow_conn(10_000).expect("in range");
        assert_eq!(
            w.drain(StreamId::from(1), &mut s, &mut out),
            70_000 - 65_535 - 100
        );
        assert!(s.is_empty());
        let Out::Data(last) = out.back().expect("sent") else {
            panic!("not data")
        };
        assert!(last.is_end_stream(), "the end rides the last part");
    }

    #[test]
    fn trailers_wait_behind_data_and_a_reset_drops_what_waits() {
        let mut w = SendWindows::new();
        w.set_initial(10);
        let mut s = w.stream();
        let mut out = VecDeque::new();
        s.push(data(3, 20, false));
        s.push(
            Block {
                id: StreamId::from(3),
                eos: true,
                fields: Default::default(),
            }
            .into(),
        );
        assert_eq!(w.drain(StreamId::from(3), &mut s, &mut out), 10);
        assert_eq!(out.len(), 1);
        assert_eq!(s.clear(), 10);
        assert!(s.is_empty());
    }

    #[test]
    fn an_empty_end_of_stream_goes_out_even_on_a_window_below_zero() {
        let mut w = SendWindows::new();
        let mut s = w.stream();
        let mut out = VecDeque::new();
        assert_eq!(
            w.send(StreamId::from(5), &mut s, data(5, 65_535, false), &mut out),
            65_535
        );
        // SETTINGS lowered the initial window after the bytes were sent (RFC 9113 6.9.2).
        let delta = w.set_initial(0);
        s.grow(delta - 65_535).expect("in range");
        assert_eq!(
            w.send(StreamId::from(5), &mut s, data(5, 0, true), &mut out),
            0
        );
        assert_eq!(out.len(), 2);
        assert!(s.is_empty());
        // Data does wait.
        assert_eq!(
            w.send(StreamId::from(5), &mut s, data(5, 1, true), &mut out),
            0
        );
        assert!(!s.is_empty());
    }

    #[test]
    fn a_window_past_the_protocol_limit_is_refused() {
        let mut w = SendWindows::new();
        assert!(w.grow_conn(u32::MAX >> 1).is_err());
        let mut s = w.stream();
        assert!(s.grow(MAX_WINDOW).is_err());
    }
}
