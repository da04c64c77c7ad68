//! One HTTP/1.1 request: pick an endpoint with the destination's balancer, send the request
//! on a pooled connection from the pod's netns, stream the response back.
//!
//! Retries: a request that never reached an endpoint goes to another one. That is a failed
//! connect (no byte was sent), a pooled connection hyper found closed before writing anything,
//! and, for idempotent requests without a body, a connection that closed before any byte of
//! the response came back (RFC 9110 9.2.2: those may be repeated). Anything else that fails
//! after the request left is answered 502 and not repeated.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::destination::Destination;
use super::endpoint_stats::{EndpointStats, InFlight};
use super::http1_body::{Counted, UpstreamBody};
use super::http1_pool::Checkout;
use super::metrics::{
    self as m, AbuseReason, ActiveStream, EndpointRequests, ReplayReason, Status,
};
use super::metrics::{ServiceMetrics, TimeoutKind, UnavailableReason};
use super::opaque_relay::idle_expired;
use super::{grpc, Shared};

/// What the client gets: the endpoint's response body as it arrives, or one of ours.
pub(crate) type ClientBody = Either<Tracked, Full<Bytes>>;

/// The request's accounting: its Service's in-flight gauge and duration.
pub(crate) struct Ctx {
    pub(crate) service: Arc<ServiceMetrics>,
    pub(crate) started: Instant,
    pub(crate) _active: ActiveStream,
}

impl Ctx {
    /// Starts the accounting of one request to `dest`.
    pub(crate) fn new(dest: &Destination) -> Self {
        let service = dest.metrics().clone();
        Self {
            _active: service.stream_started(),
            service,
            started: Instant::now(),
        }
    }

    /// A request the framing check refused: 400, and the connection closed after it.
    pub(crate) fn reject(&self, dest: &Destination, why: &str) -> Response<ClientBody> {
        m::abusive_connection(AbuseReason::AmbiguousFraming);
        tracing::debug!(dest = %dest.addr(), why, "malformed HTTP/1.1 request rejected");
        let mut resp = self.no_endpoint(
            StatusCode::BAD_REQUEST,
            &format!("interceptor: malformed request: {why}"),
        );
        // hyper closes the connection after a response that says so.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        resp
    }

    /// Answers the client ourselves.
    pub(crate) fn local(
        &self,
        status: StatusCode,
        msg: &str,
        reqs: &EndpointRequests,
    ) -> Response<ClientBody> {
        m::request(
            &self.service,
            reqs,
            Status::http(status.as_u16()),
            self.started.elapsed(),
        );
        local_response(status, msg)
    }

    pub(crate) fn no_endpoint(&self, status: StatusCode, msg: &str) -> Response<ClientBody> {
        self.local(status, msg, self.service.no_endpoint_http1())
    }
}

/// A response of the proxy's own, in plain text, naming itself so that an operator reading
/// it knows it was not the app's.
pub(crate) fn local_response(status: StatusCode, msg: &str) -> Response<ClientBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!("{msg}\n")))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// An endpoint that took a connection, for one request.
pub(crate) struct Reached {
    pub(crate) ep: Arc<EndpointStats>,
    pub(crate) in_flight: InFlight,
    pub(crate) conn: Checkout,
}

/// Where the connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dial {
    /// An idle pooled one, or a new one that goes back to the pool.
    Pooled,
    /// A new one of its own (an upgrade keeps it).
    Fresh,
}

/// Picks endpoints (skipping `tried`) until one takes a connection. A failed connect sends
/// nothing, so it costs no attempt: it is charged to its endpoint and the next one is tried,
/// until none is left. `Err` is the proxy's own answer (no endpoint, out of resources).
pub(crate) async fn reach(
    inner: &Shared,
    dest: &Destination,
    ctx: &Ctx,
    tried: &mut Vec<SocketAddr>,
    dial: Dial,
) -> Result<Reached, Response<ClientBody>> {
    let policy = inner.eject_policy();
    loop {
        let Some(ep) = dest.pick(tried) else {
            m::unavailable(UnavailableReason::NoEndpoint);
            return Err(ctx.no_endpoint(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("interceptor: no usable endpoint for {}", dest.addr()),
            ));
        };
        let in_flight = ep.start();
        let conn = match dial {
            Dial::Pooled => inner.http1_pool.checkout(ep.addr(), &ep.label()).await,
            Dial::Fresh => inner.http1_pool.connect(ep.addr(), ep.label()).await,
        };
        match conn {
            Ok(conn) => {
                return Ok(Reached {
                    ep,
                    in_flight,
                    conn,
                })
            }
            Err(e) if e.is_local() => {
                tracing::warn!(dest = %dest.addr(), error = %e, "cannot open an upstream connection: this process or node is out of resources");
                m::unavailable(UnavailableReason::LocalResources);
                return Err(ctx.local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "interceptor: out of local resources",
                    ep.http1_requests(&ctx.service),
                ));
            }
            Err(error) => {
                tracing::debug!(dest = %dest.addr(), %error, "connect failed; trying another endpoint");
                m::connect_failure(&ep.label());
                let max = inner.config.max_ejected_percent;
                dest.record_failure(&ep, &policy, max, "connecting failed");
                tried.push(ep.addr());
            }
        }
    }
}

/// RFC 9110 9.2.2.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// One request (not an upgrade): see the module doc.
pub(crate) async fn forward_request(
    inner: &Arc<Shared>,
    dest: &Arc<Destination>,
    ctx: Ctx,
    req: Request<Incoming>,
) -> Response<ClientBody> {
    let (mut head, body) = req.into_parts();
    grpc::strip_hop_by_hop(&mut head.headers);
    // The proxy speaks HTTP/1.1 upstream whatever the client spoke (RFC 9110 7.6.3).
    head.version = Version::HTTP_11;
    // A copy of the head, only for requests that may be sent again after they left.
    let replayable = (is_idempotent(&head.method) && body.is_end_stream()).then(|| {
        let mut copy = Request::new(());
        *copy.method_mut() = head.method.clone();
        *copy.uri_mut() = head.uri.clone();
        *copy.version_mut() = head.version;
        *copy.headers_mut() = head.headers.clone();
        copy
    });
    let activity = Arc::new(AtomicU64::new(0));
    let body = Counted::new(body, activity.clone());
    let mut pending = Some(Request::from_parts(head, Either::Left(body)));
    let mut tried: Vec<SocketAddr> = Vec::new();
    let policy = inner.eject_policy();
    let max_ejected = inner.config.max_ejected_percent;
    let wait = inner.config.stream_idle_timeout;

    for attempt in 1..=inner.config.max_attempts {
        let Reached {
            ep,
            in_flight,
            mut conn,
        } = match reach(inner, dest, &ctx, &mut tried, Dial::Pooled).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let reqs = ep.http1_requests(&ctx.service);
        let Some(req) = pending.take() else {
            break;
        };
        let sent_at = Instant::now();
        // Bounded by the stream idle timeout: nothing sent (the upload stalled) and nothing
        // answered for that long. Not charged to the endpoint, as for HTTP/2: a long poll
        // may rightly say nothing for minutes.
        let result = tokio::select! {
            r = conn.send().try_send_request(req) => Some(r),
            _ = idle_expired(&activity, wait) => None,
        };
        let mut failed = match result {
            Some(Ok(resp)) => {
                ep.observe_rtt(sent_at.elapsed());
                return respond(inner, dest, ctx, ep, in_flight, conn, resp);
            }
            Some(Err(e)) => e,
            None => {
                m::timeout(TimeoutKind::StreamIdle);
                return ctx.local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "interceptor: the endpoint did not answer in time",
                    reqs,
                );
            }
        };
        if let Some(unsent) = failed.take_message() {
            // hyper found the pooled connection closed before writing a byte of it.
            m::replay(ReplayReason::ConnectionClosing);
            tracing::debug!(endpoint = %ep.addr(), attempt, "pooled connection closed before the request was written; sending it on another");
            pending = Some(unsent);
        } else {
            let error = failed.into_error();
            let unanswered = error.is_incomplete_message() || error.is_canceled();
            match (&replayable, unanswered) {
                (Some(copy), true) => {
                    m::replay(ReplayReason::ConnectionClosing);
                    tracing::debug!(endpoint = %ep.addr(), %error, attempt, "connection closed before any byte of the response; repeating the idempotent request on another endpoint");
                    // A fresh connection that closes unanswered is the endpoint's failure; a
                    // reused one may just have met the endpoint's keep-alive timeout.
                    if !conn.reused {
                        let why = "a fresh connection closed unanswered";
                        dest.record_failure(&ep, &policy, max_ejected, why);
                    }
                    pending = Some(rebuild(copy));
                }
                _ => {
                    tracing::debug!(endpoint = %ep.addr(), %error, "upstream HTTP/1.1 request failed after it was sent");
                    m::unavailable(UnavailableReason::ConnectionFailed);
                    let why = "the connection failed after the request was sent";
                    dest.record_failure(&ep, &policy, max_ejected, why);
                    return ctx.local(
                        StatusCode::BAD_GATEWAY,
                        "interceptor: connection to the endpoint failed",
                        reqs,
                    );
                }
            }
        }
        tried.push(ep.addr());
        if dest.pick(&tried).is_none() {
            tried.clear();
        }
    }
    m::unavailable(UnavailableReason::AttemptsExhausted);
    ctx.no_endpoint(
        StatusCode::BAD_GATEWAY,
        &format!(
            "interceptor: no endpoint of {} could take the request",
            dest.addr()
        ),
    )
}

fn rebuild(copy: &Request<()>) -> Request<UpstreamBody> {
    let mut req = Request::new(Either::Right(Empty::new()));
    *req.method_mut() = copy.method().clone();
    *req.uri_mut() = copy.uri().clone();
    *req.version_mut() = copy.version();
    *req.headers_mut() = copy.headers().clone();
    req
}

/// Passes the endpoint's response on; its body reports the end (metrics, the balancer, the
/// connection back to the pool).
pub(crate) fn respond(
    inner: &Arc<Shared>,
    dest: &Arc<Destination>,
    ctx: Ctx,
    ep: Arc<EndpointStats>,
    in_flight: InFlight,
    conn: Checkout,
    resp: Response<Incoming>,
) -> Response<ClientBody> {
    let (mut head, body) = resp.into_parts();
    let keep_length = head.headers.get(CONTENT_LENGTH).cloned();
    grpc::strip_hop_by_hop(&mut head.headers);
    if let Some(len) = keep_length {
        head.headers.insert(CONTENT_LENGTH, len);
    }
    // hyper tells the client whether the connection stays open; the endpoint's own
    // `Connection: close` concerned the upstream connection only.
    head.headers.remove(CONNECTION);
    let status = Status::http(head.status.as_u16());
    let tracked = Tracked {
        body,
        end: Some(End {
            inner: inner.clone(),
            dest: dest.clone(),
            ep,
            _in_flight: in_flight,
            conn,
            ctx,
            status,
        }),
    };
    Response::from_parts(head, Either::Left(tracked))
}

/// The endpoint's response body, passed through frame by frame (bounded: hyper reads the next
/// frame only when the client connection took the last one).
pub(crate) struct Tracked {
    body: Incoming,
    end: Option<End>,
}

struct End {
    inner: Arc<Shared>,
    dest: Arc<Destination>,
    ep: Arc<EndpointStats>,
    _in_flight: InFlight,
    conn: Checkout,
    ctx: Ctx,
    status: Status,
}

impl End {
    fn finish(self, how: Finish) {
        let reqs = self.ep.http1_requests(&self.ctx.service);
        let elapsed = self.ctx.started.elapsed();
        match how {
            Finish::Complete => {
                m::request(&self.ctx.service, reqs, self.status, elapsed);
                if self.status.is_endpoint_failure() {
                    self.ep.observe_failure();
                    self.dest.record_failure(
                        &self.ep,
                        &self.inner.eject_policy(),
                        self.inner.config.max_ejected_percent,
                        self.status.failure_reason(),
                    );
                } else {
                    self.ep.record_success();
                }
                self.inner.http1_pool.give_back(self.conn);
            }
            // The connection is dropped with its unread rest.
            Finish::Broken => m::request(&self.ctx.service, reqs, Status::RESET, elapsed),
            Finish::ClientGone => m::request(&self.ctx.service, reqs, Status::CANCELLED, elapsed),
        }
    }
}

enum Finish {
    Complete,
    /// The endpoint's connection broke mid-body.
    Broken,
    /// The client went away before the end.
    ClientGone,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(end) = self.end.take() {
                    end.finish(Finish::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(end) = self.end.take() {
                    end.finish(Finish::Broken);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            // hyper does not poll a body that is known to be empty (HEAD, 204, 304, length 0).
            if self.body.is_end_stream() {
                end.finish(Finish::Complete);
            } else {
                end.finish(Finish::ClientGone);
            }
        }
    }
}
