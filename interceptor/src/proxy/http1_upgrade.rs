//! HTTP/1.1 upgrades (WebSocket, h2c) and CONNECT: the request goes to one balanced endpoint
//! on a connection of its own, and if the endpoint switches protocols the client connection
//! becomes an opaque relay to that endpoint for the rest of its life, as it would be without
//! the proxy. An endpoint that declines (any other status) just answers the request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderMap, CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::destination::Destination;
use super::http1_body::Counted;
use super::http1_forward::{reach, respond, ClientBody, Ctx, Dial, Reached};
use super::metrics::{self as m, OpaqueOutcome, Status, UnavailableReason};
use super::Shared;

/// CONNECT, or a request that asks to upgrade (`Connection: upgrade` with `Upgrade`).
pub(crate) fn wants_tunnel<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.headers().contains_key(UPGRADE) && connection_has(req.headers(), "upgrade"))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub(crate) async fn tunnel(
    inner: &Arc<Shared>,
    dest: &Arc<Destination>,
    ctx: Ctx,
    mut req: Request<Incoming>,
) -> Response<ClientBody> {
    let client_side = hyper::upgrade::on(&mut req);
    let connect = req.method() == Method::CONNECT;
    // The endpoint needs `Connection`, `Upgrade` and what they name (HTTP2-Settings, the
    // Sec-WebSocket-* fields) as the client sent them; only the proxy-era leftovers go.
    for n in ["keep-alive", "proxy-connection"] {
        req.headers_mut().remove(n);
    }
    let policy = inner.eject_policy();
    let max_ejected = inner.config.max_ejected_percent;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let Reached {
        ep,
        in_flight,
        mut conn,
    } = match reach(inner, dest, &ctx, &mut tried, Dial::Fresh).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let sent_at = Instant::now();
    let (head, body) = req.into_parts();
    let body = Counted::new(body, Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let mut resp = match conn
        .send()
        .send_request(Request::from_parts(head, Either::Left(body)))
        .await
    {
        Ok(r) => r,
        Err(error) => {
            tracing::debug!(endpoint = %ep.addr(), %error, "upgrade request failed");
            m::unavailable(UnavailableReason::ConnectionFailed);
            let why = "the upgrade request failed";
            dest.record_failure(&ep, &policy, max_ejected, why);
            return ctx.local(
                StatusCode::BAD_GATEWAY,
                "interceptor: connection to the endpoint failed",
                ep.http1_requests(&ctx.service),
            );
        }
    };
    ep.observe_rtt(sent_at.elapsed());
    let switched =
        resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
    if !switched {
        // Declined: an ordinary response on an ordinary connection (which may be pooled).
        return respond(inner, dest, ctx, ep, in_flight, conn, resp);
    }
    ep.record_success();
    m::request(
        &ctx.service,
        ep.http1_requests(&ctx.service),
        Status::http(resp.status().as_u16()),
        ctx.started.elapsed(),
    );
    let upstream_side = hyper::upgrade::on(&mut resp);
    let service = ctx.service.clone();
    let endpoint = ep.addr();
    tokio::spawn(async move {
        let _active = service.opaque_started();
        let _in_flight = in_flight;
        let _conn = conn;
        match tokio::try_join!(client_side, upstream_side) {
            Ok((client, upstream)) => {
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((up, down)) => {
                        service.opaque(OpaqueOutcome::Closed);
                        tracing::debug!(%endpoint, bytes_up = up, bytes_down = down, "upgraded connection finished");
                    }
                    Err(error) => {
                        service.opaque(OpaqueOutcome::Reset);
                        tracing::debug!(%endpoint, %error, "upgraded connection ended with an error");
                    }
                }
            }
            Err(error) => {
                service.opaque(OpaqueOutcome::UpstreamError);
                tracing::debug!(%endpoint, %error, "upgrade did not complete");
            }
        }
    });
    let (head, _) = resp.into_parts();
    Response::from_parts(head, Either::Right(Full::default()))
}
