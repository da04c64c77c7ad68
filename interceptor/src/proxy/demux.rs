//! The HTTP/2 server side: one h2 server per client connection, one task per stream.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::endpoints::Destination;
use super::server::Inner;

/// Serves HTTP/2 on `io` until the client closes it, it fails, or a drain that started with
/// `shutdown` completes. Errors end only this connection; its streams are reset by h2.
pub(crate) async fn serve<T>(
    inner: Arc<Inner>,
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
    let mut draining = *shutdown.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    tokio::spawn(super::stream::forward(inner.clone(), dest.clone(), req, respond));
                }
                Some(Err(error)) => {
                    tracing::debug!(dest = %dest.addr(), %error, "client HTTP/2 connection failed");
                    return Err(error);
                }
                None => return Ok(()),
            },
            // A dropped sender means the proxy itself is gone: drain as well.
            _ = shutdown.changed(), if !draining => {
                draining = true;
                tracing::debug!(dest = %dest.addr(), "draining client connection");
                conn.graceful_shutdown();
            }
        }
    }
}
