//! Protocol detection on an accepted connection.
//!
//! Bytes are read (not peeked) so that waiting for a partial preface does not spin on a
//! readable socket; what was read is handed on and replayed first ([`Prefixed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 with prior knowledge: demultiplexed per stream.
    Http2,
    /// HTTP/1.x: balanced per request (unless its Service opts out).
    Http1,
    /// Anything else: relayed as opaque TCP.
    Opaque(OpaqueKind),
}

/// Why a connection is relayed opaquely (a metrics label, nothing depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpaqueKind {
    /// HTTP/1.x to a Service that opted out of per-request balancing.
    Http1,
    Tls,
    /// No bytes within the detection wait: a server-first protocol, or an idle client.
    ServerFirst,
    /// The client closed its side before sending anything.
    Empty,
    Other,
    /// The Service port's appProtocol says what it carries: relayed at once, undetected.
    Declared,
}

/// How a destination's HTTP/1.x connections are served (annotation `interceptor.io/http1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http1Mode {
    /// Each request balanced on its own (`per-request`, the default).
    #[default]
    PerRequest,
    /// Relayed as opaque TCP to one endpoint per connection (`opaque`), as kube-proxy does.
    Opaque,
}

impl Http1Mode {
    /// The mode an annotation value asks for; `Err` names the accepted values.
    pub fn parse(v: &str) -> Result<Self, &'static str> {
        match v.trim().to_ascii_lowercase().as_str() {
            "per-request" | "" => Ok(Self::PerRequest),
            "opaque" => Ok(Self::Opaque),
            _ => Err("per-request or opaque"),
        }
    }
}

/// What a Service port's `appProtocol` tells the proxy before any byte arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolHint {
    /// Nothing (or a value we do not know): detect from the first bytes.
    #[default]
    Detect,
    /// Plaintext HTTP/2 (`kubernetes.io/h2c`, `grpc`): served by the demultiplexer at once.
    Http2,
    /// Not HTTP/2 (`kubernetes.io/http`, TLS, server-first protocols such as `mysql`): relayed
    /// opaquely at once, so a server-first protocol's greeting does not wait for detection.
    Opaque,
}

impl ProtocolHint {
    /// The hint for an `appProtocol` value (case-insensitive).
    pub fn from_app_protocol(value: Option<&str>) -> Self {
        let Some(v) = value else {
            return Self::Detect;
        };
        match v.trim().to_ascii_lowercase().as_str() {
            // `grpc` is gRPC over plaintext HTTP/2 (with TLS a Service says grpcs, https or tls).
            "kubernetes.io/h2c" | "h2c" | "grpc" => Self::Http2,
            // HTTP/1.1 is found by detection (at once: its client speaks first), so a port
            // that says `http` but carries h2c with prior knowledge is still demultiplexed.
            "kubernetes.io/http" | "http" => Self::Detect,
            "kubernetes.io/ws" | "kubernetes.io/wss" | "https" | "tls" | "grpcs"
            | "kubernetes.io/https"
            // Server-first protocols: the server speaks first, the client waits for it.
            | "mysql" | "smtp" | "ftp" | "imap" | "pop3" | "ssh" | "nats" | "tcp" => Self::Opaque,
            _ => Self::Detect,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Detect => "detect",
            Self::Http2 => "h2c",
            Self::Opaque => "opaque",
        }
    }
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http2 => "h2",
            Protocol::Http1 => "http1",
            Protocol::Opaque(OpaqueKind::Http1) => "http1_opaque",
            Protocol::Opaque(OpaqueKind::Tls) => "tls",
            Protocol::Opaque(OpaqueKind::ServerFirst) => "server_first",
            Protocol::Opaque(OpaqueKind::Empty) => "empty",
            Protocol::Opaque(OpaqueKind::Other) => "other",
            Protocol::Opaque(OpaqueKind::Declared) => "declared_opaque",
        }
    }
}

/// Not the HTTP/2 preface: HTTP/1.x if it starts like a request line, else opaque.
fn classify(buf: &[u8]) -> Protocol {
    match classify_opaque(buf) {
        OpaqueKind::Http1 => Protocol::Http1,
        kind => Protocol::Opaque(kind),
    }
}

fn classify_opaque(buf: &[u8]) -> OpaqueKind {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    if buf.first() == Some(&0x16) {
        OpaqueKind::Tls
    } else if METHODS
        .iter()
        .any(|m| buf.starts_with(m) || m.starts_with(buf))
    {
        OpaqueKind::Http1
    } else {
        OpaqueKind::Other
    }
}

/// Reads until the bytes either are the full HTTP/2 preface or cannot be, or until `wait`
/// passes. Returns the protocol and every byte read, which the caller must forward first.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    wait: Duration,
) -> io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len().max(512));
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        let n = tokio::select! {
            r = io.read_buf(&mut buf) => r?,
            _ = &mut deadline => {
                // A partial preface that stalls is not HTTP/2 we can serve: relay it as sent.
                let protocol = if buf.is_empty() { Protocol::Opaque(OpaqueKind::ServerFirst) } else { classify(&buf) };
                return Ok((protocol, buf));
            }
        };
        let have = buf.len().min(H2_PREFACE.len());
        if buf[..have] != H2_PREFACE[..have] {
            return Ok((classify(&buf), buf));
        }
        if buf.len() >= H2_PREFACE.len() {
            return Ok((Protocol::Http2, buf));
        }
        if n == 0 {
            let kind = if buf.is_empty() {
                OpaqueKind::Empty
            } else {
                OpaqueKind::Other
            };
            return Ok((Protocol::Opaque(kind), buf));
        }
    }
}

/// An IO that yields `prefix` before reading from `inner`; writes go straight to `inner`.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: BytesMut,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: BytesMut, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn run(input: &'static [u8], close: bool) -> (Protocol, BytesMut) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(input).await.expect("write");
        if close {
            client.shutdown().await.expect("shutdown");
        }
        let r = detect(&mut server, Duration::from_millis(100))
            .await
            .expect("detect");
        drop(client);
        r
    }

    #[tokio::test]
    async fn classifies_first_bytes() {
        assert_eq!(run(H2_PREFACE, false).await.0, Protocol::Http2);
        assert_eq!(run(b"GET / HTTP/1.1\r\n", false).await.0, Protocol::Http1);
        assert_eq!(
            run(b"\x16\x03\x01\x02\x00", false).await.0,
            Protocol::Opaque(OpaqueKind::Tls)
        );
        assert_eq!(
            run(b"", false).await.0,
            Protocol::Opaque(OpaqueKind::ServerFirst)
        );
        assert_eq!(run(b"", true).await.0, Protocol::Opaque(OpaqueKind::Empty));
        // A stalled partial preface is relayed, with the bytes read so far.
        let (p, buf) = run(b"PRI * HT", false).await;
        assert_eq!(p, Protocol::Opaque(OpaqueKind::Other));
        assert_eq!(&buf[..], b"PRI * HT");
    }
}

#[cfg(test)]
mod hint_tests {
    use super::ProtocolHint;

    #[test]
    fn app_protocol_values_map_to_hints_and_unknown_ones_keep_detection() {
        for (v, want) in [
            (None, ProtocolHint::Detect),
            (Some("kubernetes.io/h2c"), ProtocolHint::Http2),
            (Some("GRPC"), ProtocolHint::Http2),
            (Some("kubernetes.io/http"), ProtocolHint::Detect),
            (Some("kubernetes.io/ws"), ProtocolHint::Opaque),
            (Some("mysql"), ProtocolHint::Opaque),
            (Some("https"), ProtocolHint::Opaque),
            (Some("example.com/custom"), ProtocolHint::Detect),
            (Some(""), ProtocolHint::Detect),
        ] {
            assert_eq!(ProtocolHint::from_app_protocol(v), want, "{v:?}");
        }
    }
}
