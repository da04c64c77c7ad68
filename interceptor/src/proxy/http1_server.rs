//! One HTTP/1.x client connection, served per request by hyper: keep-alive, pipelined
//! requests answered in order, chunked bodies and trailers, `Expect: 100-continue` (hyper
//! sends the 100 once the request body is first read, that is once the endpoint takes it),
//! `Connection: close` from the client, and malformed requests answered 400 (431 for headers
//! over the limit) with the connection closed, and a connection idle for the client idle
//! timeout closed. Each request goes through `http1_forward` (upgrades `http1_upgrade`).

use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::destination::Destination;
use super::http1_forward::{self, Ctx};
use super::http1_guard::{Framing, Guarded, Verdict};
use super::http1_upgrade;
use super::Shared;

/// Serves the connection until the client closes it, or until shutdown: then the request in
/// flight finishes and the connection closes (an idle one closes at once).
pub(crate) async fn serve<T>(
    inner: Arc<Shared>,
    dest: Arc<Destination>,
    io: T,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let framing = Framing::new(inner.config.max_header_list_bytes as usize);
    let io = Guarded::new(io, framing.clone());
    let svc = {
        let inner = inner.clone();
        service_fn(move |req| {
            let verdict = framing.next_request();
            let (inner, dest) = (inner.clone(), dest.clone());
            async move {
                let ctx = Ctx::new(&dest);
                let resp = match verdict {
                    Verdict::Reject(why) => ctx.reject(&dest, why),
                    Verdict::Fine if http1_upgrade::wants_tunnel(&req) => {
                        http1_upgrade::tunnel(&inner, &dest, ctx, req).await
                    }
                    Verdict::Fine => http1_forward::forward_request(&inner, &dest, ctx, req).await,
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let mut builder = http1::Builder::new();
    let idle = inner.config.client_idle_timeout;
    if !idle.is_zero() {
        // hyper's header timer runs from the moment it waits for a request head, so it also
        // closes a keep-alive connection idle that long (HTTP/2 clients get GOAWAY instead).
        builder.timer(TokioTimer::new()).header_read_timeout(idle);
    }
    let conn = builder
        .keep_alive(true)
        // A client that half-closes after its request still gets the response.
        .half_close(true)
        // Not `pipeline_flush`: with it hyper skips the flush while unread bytes are buffered,
        // so the 400 it writes for a malformed request never left before the close.
        .max_buf_size((inner.config.max_header_list_bytes as usize).max(8192))
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = shutdown.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
