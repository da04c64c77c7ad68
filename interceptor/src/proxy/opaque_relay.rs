//! Opaque TCP relay for everything that is not HTTP/2 prior knowledge.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::destination::Destination;
use super::metrics::{self as m, OpaqueOutcome, TimeoutKind, UnavailableReason};
use super::Shared;

/// Relays `client` to one endpoint, byte for byte, after writing `prefix` (bytes already read
/// by detection). Each direction's EOF is passed on as a half-close, so request/response
/// protocols that shut down their write side keep working.
pub(crate) async fn relay(inner: &Shared, dest: &Destination, client: TcpStream, prefix: BytesMut) {
    let service = dest.metrics().clone();
    let _active = service.opaque_started();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let (mut upstream, in_flight) = loop {
        let Some(ep) = dest.pick(&tried) else {
            service.opaque(OpaqueOutcome::NoEndpoint);
            m::unavailable(UnavailableReason::NoEndpoint);
            tracing::warn!(dest = %dest.addr(), tried = tried.len(), "no usable endpoint for an opaque connection; closing it");
            return;
        };
        let in_flight = ep.start();
        let connect = inner.connector.connect(ep.addr());
        match tokio::time::timeout(inner.config.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                ep.record_success();
                break (s, in_flight);
            }
            Ok(Err(error)) if super::pool::is_local_error(&error) => {
                tracing::warn!(dest = %dest.addr(), %error, "cannot open an upstream connection: this process or node is out of resources");
                service.opaque(OpaqueOutcome::LocalResources);
                m::unavailable(UnavailableReason::LocalResources);
                return;
            }
            Ok(Err(error)) => {
                tracing::debug!(endpoint = %ep.addr(), %error, "opaque connect failed; trying another endpoint");
            }
            Err(_) => {
                tracing::debug!(endpoint = %ep.addr(), "opaque connect timed out; trying another endpoint");
            }
        }
        m::connect_failure(&ep.label());
        let why = "connecting failed";
        dest.record_failure(
            &ep,
            &inner.eject_policy(),
            inner.config.max_ejected_percent,
            why,
        );
        tried.push(ep.addr());
        if tried.len() >= inner.config.max_attempts {
            service.opaque(OpaqueOutcome::ConnectFailed);
            return;
        }
    };
    if !prefix.is_empty() {
        if let Err(error) = upstream.write_all(&prefix).await {
            tracing::debug!(%error, "writing detected bytes to the endpoint failed");
            service.opaque(OpaqueOutcome::UpstreamError);
            return;
        }
    }
    let activity = Arc::new(AtomicU64::new(0));
    let (sent, received) = service.opaque_bytes();
    sent.increment(prefix.len() as u64);
    let mut client = Active::new(client, activity.clone(), sent);
    let mut upstream = Active::new(upstream, activity.clone(), received);
    let relay = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let result = tokio::select! {
        r = relay => r,
        _ = idle_expired(&activity, inner.config.opaque_idle_timeout) => {
            service.opaque(OpaqueOutcome::IdleTimeout);
            m::timeout(TimeoutKind::OpaqueIdle);
            tracing::debug!(endpoint = %in_flight.stats().addr(), "opaque relay idle; closing it");
            return;
        }
    };
    match result {
        Ok((up, down)) => {
            service.opaque(OpaqueOutcome::Closed);
            tracing::debug!(endpoint = %in_flight.stats().addr(), bytes_up = up + prefix.len() as u64, bytes_down = down, "opaque relay finished");
        }
        Err(error) => {
            service.opaque(OpaqueOutcome::Reset);
            tracing::debug!(endpoint = %in_flight.stats().addr(), %error, "opaque relay ended with an error");
        }
    }
}

/// Resolves once no byte moved for `period` (never, for a zero period). Lazy like the stream
/// idle timer: wakes once per period and compares the activity counter.
pub(crate) async fn idle_expired(activity: &AtomicU64, period: Duration) {
    if period.is_zero() {
        return std::future::pending().await;
    }
    let mut seen = activity.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(period).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// A socket that counts the reads that returned bytes, so the relay can tell idle from busy,
/// and the bytes read, for its Service's byte counter (counted as they move, so a connection
/// that lives for days shows its traffic before it closes).
struct Active {
    io: TcpStream,
    activity: Arc<AtomicU64>,
    bytes: metrics::Counter,
}

impl Active {
    fn new(io: TcpStream, activity: Arc<AtomicU64>, bytes: metrics::Counter) -> Self {
        Self {
            io,
            activity,
            bytes,
        }
    }
}

impl AsyncRead for Active {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.fetch_add(1, Ordering::Relaxed);
            self.bytes.increment(n as u64);
        }
        r
    }
}

impl AsyncWrite for Active {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
