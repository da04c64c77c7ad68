//! The HTTP/2 server side: one h2 server per client connection, one task per stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::conn_guard::ConnGuard;
use super::destination::Destination;
use super::metrics as m;
use super::Shared;

/// A client connection's receive window, sized to its open streams: each may hold one
/// stream window of request body its endpoint has not taken yet, and those bytes stay
/// unreleased in the connection window too, so with a fixed window a handful of streams to an
/// endpoint that stops reading would freeze every other stream of the connection.
pub(crate) struct ClientWindow {
    floor: u32,
    ceiling: u32,
    per_stream: u32,
    current: u32,
}

impl ClientWindow {
    pub(crate) fn new(cfg: &super::config::ProxyConfig) -> Self {
        let floor = cfg.connection_window.max(1);
        Self {
            floor,
            ceiling: cfg.max_client_connection_window.clamp(floor, MAX_WINDOW),
            per_stream: cfg.stream_window,
            current: floor,
        }
    }

    /// The window for `open` streams: room for each, and one more so a new stream can always
    /// send, in steps of the floor so that it changes once per many streams, not per stream.
    pub(crate) fn target(&self, open: u32) -> u32 {
        let want = (open as u64 + 1) * self.per_stream as u64;
        let floor = self.floor as u64;
        let stepped = want.div_ceil(floor) * floor;
        stepped.clamp(floor, self.ceiling as u64) as u32
    }

    /// The window it starts with.
    pub(crate) fn floor(&self) -> u32 {
        self.floor
    }

    fn fit<T, B>(&mut self, conn: &mut h2::server::Connection<T, B>, open: u32)
    where
        T: AsyncRead + AsyncWrite + Unpin,
        B: bytes::Buf,
    {
        let target = self.target(open);
        if target != self.current {
            // Lowering takes effect as capacity is released, never by taking back credit
            // the client was already given.
            conn.set_target_window_size(target);
            self.current = target;
        }
    }
}

/// RFC 9113 6.9.1: a flow-control window never exceeds 2^31 - 1.
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// How long a closed connection's stream tasks may take to settle before serve returns
/// without them (one still waiting on an endpoint after its client left, say).
const STREAMS_SETTLE_LIMIT: Duration = Duration::from_secs(1);

/// How long an idle client connection may take to close after its GOAWAY.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Serves HTTP/2 on `io` until the client closes it, it fails, or a drain that started with
/// `shutdown` completes. Errors end only this connection; its streams are reset by h2.
pub(crate) async fn serve<T>(
    inner: Arc<Shared>,
    dest: Arc<Destination>,
    io: T,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &inner.config;
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_concurrent_streams(cfg.max_concurrent_streams)
        // Oversized header lists get 431 from h2 itself and never reach an endpoint.
        .max_header_list_size(cfg.max_header_list_bytes)
        // Each buffered outbound byte was already released to the other side's window, so
        // cap what h2 may queue per stream to what one window can carry.
        .max_send_buffer_size(cfg.stream_window as usize);
    let handshake = builder.handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(cfg.connect_timeout, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            tracing::debug!("client HTTP/2 handshake timed out");
            return Ok(());
        }
    };
    let guard = Arc::new(ConnGuard::new(cfg.max_client_resets_per_second));
    let mut window = ClientWindow::new(cfg);
    let mut draining = *shutdown.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    // Checked lazily: re-armed for the rest of the period while streams come and go.
    let idle_timeout = cfg.client_idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // After the idle GOAWAY, h2 closes once the client acks its PING; one that never does
    // would keep its descriptor and connection slot forever.
    let mut idle_closing = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let open = guard.open_stream();
                    window.fit(&mut conn, guard.open_streams.load(Ordering::Relaxed));
                    // Boxed: the stream future is 2 KiB, and a task stores its future inline,
                    // so unboxed it is copied whole on spawn and at each change of the task's
                    // stage (finished, output taken).
                    let (head, body) = req.into_parts();
                    tokio::spawn(Box::pin(super::forward::forward(inner.clone(), dest.clone(), guard.clone(), open, head, body, respond)));
                }
                Some(Err(error)) => {
                    tracing::debug!(dest = %dest.addr(), %error, "client HTTP/2 connection failed");
                    return Err(error);
                }
                None => {
                    guard.streams_settled(STREAMS_SETTLE_LIMIT).await;
                    return Ok(());
                }
            },
            _ = guard.trip.notified() => {
                tracing::warn!(dest = %dest.addr(), limit = cfg.max_client_resets_per_second, "client cancels streams faster than the limit; closing its connection");
                m::abusive_connection(m::AbuseReason::RapidReset);
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            }
            _ = &mut idle, if idle_closing || (!idle_timeout.is_zero() && !draining) => {
                if idle_closing {
                    tracing::debug!(dest = %dest.addr(), "idle client connection did not close after GOAWAY; closing it");
                    return Ok(());
                }
                match guard.idle_for() {
                    Some(idle_for) if idle_for >= idle_timeout => {
                        tracing::debug!(dest = %dest.addr(), idle_s = idle_for.as_secs(), "client connection idle; sending GOAWAY");
                        m::timeout(m::TimeoutKind::ClientIdle);
                        draining = true;
                        idle_closing = true;
                        idle.as_mut().reset(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                        conn.graceful_shutdown();
                    }
                    Some(idle_for) => idle.as_mut().reset(tokio::time::Instant::now() + (idle_timeout - idle_for)),
                    None => idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout),
                }
            }
            // A dropped sender means the proxy itself is gone: drain as well.
            _ = shutdown.changed(), if !draining => {
                draining = true;
                tracing::debug!(dest = %dest.addr(), "draining client connection");
                conn.graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::ProxyConfig;

    #[test]
    fn client_window_has_room_for_every_open_stream_up_to_its_ceiling() {
        let cfg = ProxyConfig::default();
        let w = ClientWindow::new(&cfg);
        let (floor, per) = (cfg.connection_window, cfg.stream_window);
        assert_eq!(w.target(0), floor);
        assert_eq!(w.target(floor / per - 1), floor);
        // One stream more than the floor holds: the next step.
        assert_eq!(w.target(floor / per), 2 * floor);
        for open in [1, 17, 100, 250] {
            assert!(
                w.target(open) as u64 >= (open as u64 + 1) * per as u64,
                "{open}"
            );
        }
        assert_eq!(w.target(100_000), cfg.max_client_connection_window);
        let huge = ProxyConfig {
            max_client_connection_window: u32::MAX,
            ..ProxyConfig::default()
        };
        assert_eq!(ClientWindow::new(&huge).target(u32::MAX), MAX_WINDOW);
    }
}
