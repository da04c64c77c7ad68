//! Request framing checks hyper does not make: a request carrying both `Content-Length` and
//! `Transfer-Encoding` is the classic smuggling vector (RFC 9112 6.1, 11.2). hyper resolves it
//! the lenient way (Transfer-Encoding wins, Content-Length is dropped before the service sees
//! the request, the connection closes after), so the service cannot tell. The proxy rejects it
//! instead: 400 and the connection closed, nothing forwarded.
//!
//! [`Guarded`] watches the bytes the client sends as hyper reads them and follows the message
//! framing (head, fixed-length or chunked body, trailers), one verdict per request head, in
//! order; hyper calls the service for request k only after reading its head, so the verdict
//! is there when the service asks ([`Framing::next_request`]). Anything the scanner does not
//! understand stops it (hyper answers malformed input itself); so does an upgrade or CONNECT,
//! after which the bytes are no longer HTTP/1.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::lock;

/// What the framing check says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Fine,
    /// Rejected with 400, the connection closed, for this reason.
    Reject(&'static str),
}

/// The verdicts of one connection, shared by its IO and its service function.
#[derive(Clone)]
pub(crate) struct Framing(Arc<Mutex<Scanner>>);

impl Framing {
    pub(crate) fn new(max_head_bytes: usize) -> Self {
        Self(Arc::new(Mutex::new(Scanner::new(max_head_bytes))))
    }

    /// The verdict on the next request hyper hands to the service.
    pub(crate) fn next_request(&self) -> Verdict {
        lock(&self.0).verdicts.pop_front().unwrap_or(Verdict::Fine)
    }

    fn feed(&self, bytes: &[u8]) {
        lock(&self.0).feed(bytes)
    }
}

#[derive(Debug)]
enum Phase {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The line end after a chunk's data.
    ChunkEnd,
    Trailers(Vec<u8>),
    /// Not following any more (malformed input, an upgrade, a rejected request).
    Stopped,
}

struct Scanner {
    phase: Phase,
    max_head: usize,
    verdicts: VecDeque<Verdict>,
}

/// Longest chunk-size line taken (size, extensions): past it hyper rejects the body anyway.
const MAX_CHUNK_LINE: usize = 4096;

impl Scanner {
    fn new(max_head: usize) -> Self {
        Self {
            phase: Phase::Head(Vec::new()),
            max_head,
            verdicts: VecDeque::new(),
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let phase = std::mem::replace(&mut self.phase, Phase::Stopped);
            self.phase = match phase {
                Phase::Stopped => return,
                Phase::Head(mut buf) => {
                    // Empty lines before a request line are ignored (RFC 9112 2.2).
                    if buf.is_empty() {
                        let skip = bytes
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            self.phase = Phase::Head(buf);
                            return;
                        }
                    }
                    let (line_end, used) = find_blank_line(&buf, bytes);
                    if line_end && buf.is_empty() {
                        // The whole head in one read (the usual case): parsed where it lies.
                        let next = self.head(&bytes[..used]);
                        bytes = &bytes[used..];
                        self.phase = next;
                        continue;
                    }
                    buf.extend_from_slice(&bytes[..used]);
                    bytes = &bytes[used..];
                    if !line_end {
                        if buf.len() > self.max_head {
                            Phase::Stopped
                        } else {
                            Phase::Head(buf)
                        }
                    } else {
                        self.head(&buf)
                    }
                }
                Phase::Fixed(n) => {
                    let take = (bytes.len() as u64).min(n);
                    bytes = &bytes[take as usize..];
                    if take == n {
                        Phase::Head(Vec::new())
                    } else {
                        Phase::Fixed(n - take)
                    }
                }
                Phase::ChunkSize(mut line) => match bytes.iter().position(|b| *b == b'\n') {
                    None => {
                        line.extend_from_slice(bytes);
                        bytes = &[];
                        if line.len() > MAX_CHUNK_LINE {
                            Phase::Stopped
                        } else {
                            Phase::ChunkSize(line)
                        }
                    }
                    Some(i) => {
                        line.extend_from_slice(&bytes[..i]);
                        bytes = &bytes[i + 1..];
                        match chunk_size(&line) {
                            Some(0) => Phase::Trailers(Vec::new()),
                            Some(n) => Phase::ChunkData(n),
                            None => Phase::Stopped,
                        }
                    }
                },
                Phase::ChunkData(n) => {
                    let take = (bytes.len() as u64).min(n);
                    bytes = &bytes[take as usize..];
                    if take == n {
                        Phase::ChunkEnd
                    } else {
                        Phase::ChunkData(n - take)
                    }
                }
                Phase::ChunkEnd => match bytes.iter().position(|b| *b == b'\n') {
                    None => {
                        bytes = &[];
                        Phase::ChunkEnd
                    }
                    Some(i) => {
                        bytes = &bytes[i + 1..];
                        Phase::ChunkSize(Vec::new())
                    }
                },
                Phase::Trailers(mut buf) => {
                    // The trailer section ends with an empty line, as a head does; with no
                    // trailers that is the line right after the last chunk.
                    let mut probe = b"\n".to_vec();
                    probe.extend_from_slice(&buf);
                    let (done, used) = find_blank_line(&probe, bytes);
                    buf.extend_from_slice(&bytes[..used]);
                    bytes = &bytes[used..];
                    if done {
                        Phase::Head(Vec::new())
                    } else if buf.len() > self.max_head {
                        Phase::Stopped
                    } else {
                        Phase::Trailers(buf)
                    }
                }
            };
        }
    }

    /// A complete request head: its verdict, and what follows it.
    fn head(&mut self, buf: &[u8]) -> Phase {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(buf), Ok(httparse::Status::Complete(_))) {
            return Phase::Stopped;
        }
        let mut lengths: Vec<&[u8]> = Vec::new();
        let mut te: Option<&[u8]> = None;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if te.is_some() && !lengths.is_empty() {
            self.verdicts.push_back(Verdict::Reject(
                "both Content-Length and Transfer-Encoding (request smuggling)",
            ));
            return Phase::Stopped;
        }
        self.verdicts.push_back(Verdict::Fine);
        if upgrade {
            return Phase::Stopped;
        }
        if let Some(te) = te {
            let last = te.rsplit(|b| *b == b',').next().unwrap_or_default();
            return if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Phase::ChunkSize(Vec::new())
            } else {
                Phase::Stopped
            };
        }
        match lengths.first() {
            None => Phase::Head(Vec::new()),
            Some(v) => match std::str::from_utf8(v.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(0) => Phase::Head(Vec::new()),
                Some(n) => Phase::Fixed(n),
                None => Phase::Stopped,
            },
        }
    }
}

/// Whether `have` + `more` contains an empty line (`\n\r\n` or `\n\n`), and how many bytes of
/// `more` up to and including it.
fn find_blank_line(have: &[u8], more: &[u8]) -> (bool, usize) {
    // The last two bytes already held, then the new ones.
    let tail = &have[have.len().saturating_sub(2)..];
    let mut prev2 = if tail.len() == 2 { tail[0] } else { 0 };
    let mut prev1 = tail.last().copied().unwrap_or(0);
    for (i, &b) in more.iter().enumerate() {
        if b == b'\n' && (prev1 == b'\n' || (prev1 == b'\r' && prev2 == b'\n')) {
            return (true, i + 1);
        }
        prev2 = prev1;
        prev1 = b;
    }
    (false, more.len())
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|b| *b == b';').next()?.trim_ascii();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

/// The client connection as hyper reads it, with every byte shown to the framing check.
pub(crate) struct Guarded<T> {
    io: T,
    framing: Framing,
}

impl<T> Guarded<T> {
    pub(crate) fn new(io: T, framing: Framing) -> Self {
        Self { io, framing }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.framing.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[u8], split: usize) -> Vec<Verdict> {
        let f = Framing::new(64 * 1024);
        for part in input.chunks(split.max(1)) {
            f.feed(part);
        }
        let v: Vec<Verdict> = lock(&f.0).verdicts.iter().copied().collect();
        v
    }

    #[test]
    fn follows_pipelined_requests_with_bodies_in_any_read_sizes() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n\
\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                verdicts(input, split),
                vec![Verdict::Fine; 4],
                "split {split}"
            );
        }
    }

    #[test]
    fn content_length_with_transfer_encoding_is_rejected_wherever_it_comes() {
        let smuggle = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n";
        for split in [1, 5, 4096] {
            let v = verdicts(smuggle, split);
            assert_eq!(v.len(), 2, "the scan stops at the rejected request: {v:?}");
            assert_eq!(v[0], Verdict::Fine);
            assert!(matches!(v[1], Verdict::Reject(_)), "{v:?}");
        }
        let te_first =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(verdicts(te_first, 4096)[0], Verdict::Reject(_)));
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_not_read_as_one() {
        let body = b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(body);
        input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(verdicts(&input, 3), vec![Verdict::Fine, Verdict::Fine]);
    }

    #[test]
    fn upgrades_and_garbage_stop_the_scan() {
        let ws = b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(verdicts(ws, 4096), vec![Verdict::Fine]);
        assert!(verdicts(b"\x00\x01 nonsense\r\n\r\n", 4096).is_empty());
    }
}
