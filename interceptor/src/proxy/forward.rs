//! One client stream: choose an endpoint, send the request on a pooled connection, relay both
//! directions, and map failures (replay, reset propagation, local UNAVAILABLE/deadline).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::request::Parts;
use http::{HeaderName, Request, Response, StatusCode};

use super::body_pump::{Pump, PumpError};
use super::conn_guard::{ConnGuard, OpenStream};
use super::destination::Destination;
use super::endpoint_stats::{EndpointStats, InFlight};
use super::grpc;
use super::metrics::{
    self as m, EndpointRequests, ReplayReason, ServiceMetrics, Status, TimeoutKind,
    UnavailableReason,
};
use super::pool::{Lease, PoolError};
use super::Shared;

/// A cancel this close to the call's deadline counts as the deadline passing.
const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_millis(20);

/// Sleeps until the deadline, or forever without one.
async fn deadline_sleep(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Taken off the time left that the endpoint is told (grpc-timeout), so that an endpoint that
/// honours deadlines answers DEADLINE_EXCEEDED itself before the proxy's timer fires: then
/// only an endpoint that ignores the deadline is charged with a failure.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(10);

fn upstream_request(head: &Parts, deadline: Option<tokio::time::Instant>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = head.method.clone();
    *r.uri_mut() = head.uri.clone();
    *r.headers_mut() = head.headers.clone();
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(tokio::time::Instant::now());
        r.headers_mut().insert(
            "grpc-timeout",
            grpc::encode_grpc_timeout(left.saturating_sub(DEADLINE_MARGIN)),
        );
    }
    r
}

struct Ctx {
    guard: Arc<ConnGuard>,
    service: Arc<ServiceMetrics>,
    grpc: bool,
    started: Instant,
    idle_timeout: std::time::Duration,
}

impl Ctx {
    /// The client cancelled the stream.
    fn cancelled(&self, ep: &EndpointRequests) {
        self.guard.client_reset();
        m::request(&self.service, ep, Status::CANCELLED, self.started.elapsed());
    }

    /// Answers UNAVAILABLE ourselves: no endpoint could take the stream.
    fn no_endpoint(&self, respond: &mut SendResponse<Bytes>, msg: &str) {
        self.local(
            respond,
            grpc::UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            msg,
            self.service.no_endpoint(),
        );
    }

    /// Answers the client ourselves (no response headers were sent yet).
    fn local(
        &self,
        respond: &mut SendResponse<Bytes>,
        code: u32,
        http: StatusCode,
        msg: &str,
        ep: &EndpointRequests,
    ) {
        let resp = grpc::local_response(self.grpc, code, http, msg);
        if let Err(error) = respond.send_response(resp, true) {
            tracing::debug!(%error, "client went away before the local response");
        }
        let status = if self.grpc {
            Status::grpc_code(code)
        } else {
            Status::http(http.as_u16())
        };
        m::request(&self.service, ep, status, self.started.elapsed());
    }
}

/// What one attempt on one endpoint came to.
enum Attempt {
    /// Finished (successfully or not); nothing more to do.
    Done,
    /// Not processed by the endpoint: try another.
    Replay(ReplayReason),
    /// The endpoint failed the stream (its connection broke, it sent garbage, it never
    /// answered a complete request in time, it answered UNAVAILABLE, INTERNAL,
    /// RESOURCE_EXHAUSTED or 5xx); the client was answered and the failure counts towards
    /// ejecting the endpoint.
    Failed,
    /// As `Failed`, and the endpoint asked not to be sent more for this long
    /// (grpc-retry-pushback-ms).
    PushedBack(std::time::Duration),
}

#[allow(clippy::manual_async_fn)] // why: see the comment on the async block below
pub(crate) fn forward(
    inner: Arc<Shared>,
    dest: Arc<Destination>,
    guard: Arc<ConnGuard>,
    _open: OpenStream,
    head: Parts,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
) -> impl std::future::Future<Output = ()> + Send {
    // An async block, not an async fn: an async fn copies each argument into a local of
    // its own and keeps both in its state: 280 bytes more per stream in flight (2328 -> 2048).
    async move {
        // Named, so the block takes it and the stream counts as open until it ends.
        let _open = _open;
        let service = dest.metrics().clone();
        let _active = service.stream_started();
        let ctx = Ctx {
            guard,
            service,
            grpc: grpc::is_grpc(&head.headers),
            started: Instant::now(),
            idle_timeout: inner.config.stream_idle_timeout,
        };
        // No hop-by-hop fields to strip: h2 rejects a request with any (RFC 9113 8.2.2) before
        // it gets here, and the same holds for the endpoint's responses.
        let deadline = grpc::grpc_timeout(&head.headers).map(|d| tokio::time::Instant::now() + d);
        let mut body = Pump::with_replay(body, inner.config.replay_buffer_bytes);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let policy = inner.eject_policy();
        let max_ejected = inner.config.max_ejected_percent;

        let mut attempt = 0;
        while attempt < inner.config.max_attempts {
            attempt += 1;
            let Some(ep) = dest.pick(&tried) else {
                m::unavailable(UnavailableReason::NoEndpoint);
                let msg = format!("interceptor: no usable endpoint for {}", dest.addr());
                ctx.no_endpoint(&mut respond, &msg);
                return;
            };
            let in_flight = ep.start();
            let lease = match connect(&ctx, &inner, &dest, &ep, &mut respond, deadline).await {
                Connect::Ready(lease) => lease,
                Connect::Finished => return,
                Connect::Unreachable(error) => {
                    // The connect task has charged the endpoint already.
                    tracing::debug!(dest = %dest.addr(), %error, attempt, "connect failed; trying another endpoint");
                    tried.push(ep.addr());
                    // Nothing reached that endpoint, so an untried one costs no attempt: with
                    // most endpoints refusing, a call still finds the one that answers.
                    if dest.any_usable(&tried) {
                        attempt -= 1;
                    } else if dest.pick(&tried).is_none() {
                        // Every endpoint failed to connect once: they are tried again, within
                        // the attempts left (one endpoint that closed a connection it had
                        // just accepted is likely to take the next), as the relay does.
                        tried.clear();
                    }
                    continue;
                }
            };
            match try_endpoint(
                &ctx,
                &head,
                &mut body,
                &mut respond,
                lease,
                in_flight,
                deadline,
            )
            .await
            {
                Attempt::Done => return,
                Attempt::Replay(reason) => {
                    m::replay(reason);
                    tracing::debug!(endpoint = %ep.addr(), reason = reason.label(), attempt, "stream not processed; replaying on another endpoint");
                    tried.push(ep.addr());
                }
                Attempt::Failed => {
                    dest.record_failure(&ep, &policy, max_ejected, "the request failed");
                    return;
                }
                Attempt::PushedBack(d) => {
                    if !dest.push_back(&ep, max_ejected, d) {
                        dest.record_failure(
                            &ep,
                            &policy,
                            max_ejected,
                            "the endpoint failed the request",
                        );
                    }
                    return;
                }
            }
            // With every endpoint tried, allow the set again (a refused stream may well succeed
            // on a fresh connection to the same endpoint).
            if dest.pick(&tried).is_none() {
                tried.clear();
            }
        }
        m::unavailable(UnavailableReason::AttemptsExhausted);
        let msg = format!(
            "interceptor: no endpoint of {} could take the request",
            dest.addr()
        );
        ctx.no_endpoint(&mut respond, &msg);
    }
}

/// What getting a pooled connection to the picked endpoint came to.
enum Connect {
    Ready(Lease),
    /// The stream is over: the client cancelled, or was answered here (its deadline passed,
    /// this process is out of resources).
    Finished,
    /// The endpoint could not be reached (already charged): try another.
    Unreachable(PoolError),
}

async fn connect(
    ctx: &Ctx,
    inner: &Shared,
    dest: &Arc<Destination>,
    ep: &Arc<EndpointStats>,
    respond: &mut SendResponse<Bytes>,
    deadline: Option<tokio::time::Instant>,
) -> Connect {
    let policy = inner.eject_policy();
    let max_ejected = inner.config.max_ejected_percent;
    let charge = {
        let (dest, ep) = (dest.clone(), ep.clone());
        move |error: &PoolError| {
            if !error.is_local() {
                m::connect_failure(&ep.label());
                dest.record_failure(&ep, &policy, max_ejected, "connecting failed");
            }
        }
    };
    let acquired = tokio::select! {
        biased;
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            ctx.cancelled(ep.requests(&ctx.service));
            return Connect::Finished;
        }
        // A connect queued behind others must not outlive the call.
        _ = deadline_sleep(deadline) => {
            m::timeout(TimeoutKind::DeadlineConnecting);
            ctx.local(respond, grpc::DEADLINE_EXCEEDED, StatusCode::GATEWAY_TIMEOUT, "interceptor: deadline exceeded while connecting to an endpoint", ep.requests(&ctx.service));
            return Connect::Finished;
        }
        l = inner.pool.acquire(ep, charge) => l,
    };
    match acquired {
        Ok(l) => Connect::Ready(l),
        Err(error) if error.is_local() => {
            // Not the endpoint's fault, and another endpoint would fail the same way.
            tracing::warn!(dest = %dest.addr(), %error, "cannot open an upstream connection: this process or node is out of resources");
            m::unavailable(UnavailableReason::LocalResources);
            ctx.local(
                respond,
                grpc::UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
                "interceptor: proxy out of local resources (file descriptors, memory or ports)",
                ep.requests(&ctx.service),
            );
            Connect::Finished
        }
        Err(error) => Connect::Unreachable(error),
    }
}

async fn try_endpoint(
    ctx: &Ctx,
    head: &Parts,
    body: &mut Pump,
    respond: &mut SendResponse<Bytes>,
    mut lease: Lease,
    in_flight: InFlight,
    deadline: Option<tokio::time::Instant>,
) -> Attempt {
    let ep = in_flight.stats().clone();
    let reqs = ep.requests(&ctx.service);
    body.rewind();
    let eos = body.empty();
    let sent_at = Instant::now();
    let (resp_fut, up_tx) = match lease
        .sender()
        .send_request(upstream_request(head, deadline), eos)
    {
        Ok(pair) => pair,
        Err(error) => {
            // The connection is going away or gone; the stream never left this process.
            tracing::debug!(endpoint = %ep.addr(), %error, "pooled connection refused a new stream");
            lease.retire();
            return Attempt::Replay(ReplayReason::ConnectionClosing);
        }
    };
    if eos {
        body.mark_sent_end();
    }
    tokio::pin!(resp_fut);
    let sleep = deadline_sleep(deadline);
    tokio::pin!(sleep);
    // No idle timer when the deadline comes first anyway.
    let idle_timeout = match deadline {
        Some(d) if d <= tokio::time::Instant::now() + ctx.idle_timeout => std::time::Duration::ZERO,
        _ => ctx.idle_timeout,
    };
    let idle_sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle_sleep);
    let mut timers = Timers {
        deadline,
        deadline_sleep: sleep.as_mut(),
        idle_sleep: idle_sleep.as_mut(),
        idle: IdleTimer::new(idle_timeout),
    };
    let mut up = Upstream {
        tx: up_tx,
        req_failed: false,
    };

    let resp = match await_response(ctx, reqs, body, respond, &mut up, resp_fut, &mut timers).await
    {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return response_error(ctx, e, ep.addr(), body, respond, &mut lease, reqs),
        Err(attempt) => return attempt,
    };
    ep.observe_rtt(sent_at.elapsed());

    let Some(started) = start_response(ctx, resp, respond) else {
        up.tx.send_reset(Reason::CANCEL);
        ctx.cancelled(reqs);
        return Attempt::Done;
    };
    timers.idle.progress();
    let mut end = relay_response(ctx, ep.addr(), body, &mut up, started, &mut timers).await;
    if end.broke && !lease.first_to_break() {
        end.charge = false;
    }
    drop(lease);
    drop(in_flight);
    settle(ctx, &ep, reqs, end)
}

/// The timers of one attempt: the call's deadline and the stream idle timeout.
struct Timers<'a, D> {
    deadline: Option<tokio::time::Instant>,
    deadline_sleep: std::pin::Pin<&'a mut D>,
    idle_sleep: std::pin::Pin<&'a mut tokio::time::Sleep>,
    idle: IdleTimer,
}

/// The upstream half of the stream: where the request body goes, and whether the endpoint
/// stopped taking it.
struct Upstream {
    tx: SendStream<Bytes>,
    req_failed: bool,
}

/// Phase 1: the request body flows while waiting for the response headers. `Err` is how the
/// attempt ended without them (the client cancelled, a timer fired, the client's body broke).
async fn await_response<D: std::future::Future<Output = ()>>(
    ctx: &Ctx,
    reqs: &EndpointRequests,
    body: &mut Pump,
    respond: &mut SendResponse<Bytes>,
    up: &mut Upstream,
    mut resp_fut: std::pin::Pin<&mut h2::client::ResponseFuture>,
    timers: &mut Timers<'_, D>,
) -> Result<Result<Response<RecvStream>, h2::Error>, Attempt> {
    let deadline = timers.deadline;
    loop {
        tokio::select! {
            biased;
            r = poll_fn(|cx| respond.poll_reset(cx)) => {
                let reason = r.unwrap_or(Reason::CANCEL);
                up.tx.send_reset(reason);
                ctx.cancelled(reqs);
                // Clients cancel at their own deadline, usually a hair before ours fires: that
                // is the endpoint not answering in time, as below.
                let at_deadline = deadline.is_some_and(|d| tokio::time::Instant::now() + DEADLINE_SLACK >= d);
                return Err(if at_deadline && (body.done() || up.req_failed) { Attempt::Failed } else { Attempt::Done });
            }
            _ = timers.deadline_sleep.as_mut() => {
                up.tx.send_reset(Reason::CANCEL);
                m::timeout(TimeoutKind::Deadline);
                ctx.local(respond, grpc::DEADLINE_EXCEEDED, StatusCode::GATEWAY_TIMEOUT, "interceptor: deadline exceeded", reqs);
                // An endpoint that had the whole request and did not answer in time is
                // charged, so one that accepts and never answers gets ejected.
                return Err(if body.done() || up.req_failed { Attempt::Failed } else { Attempt::Done });
            }
            _ = timers.idle_sleep.as_mut(), if timers.idle.on() => {
                if timers.idle.rearm(timers.idle_sleep.as_mut()) {
                    continue;
                }
                up.tx.send_reset(Reason::CANCEL);
                m::timeout(TimeoutKind::StreamIdle);
                let msg = format!("interceptor: nothing moved on the stream for {:?} (stream idle timeout)", timers.idle.period);
                ctx.local(respond, grpc::UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT, &msg, reqs);
                // Not charged: servers may send the headers of a quiet stream (a watch) only
                // with its first message.
                return Err(Attempt::Done);
            }
            r = &mut resp_fut => return Ok(r),
            s = body.step(&mut up.tx), if !body.done() && !up.req_failed => match s {
                Ok(()) => timers.idle.progress(),
                Err(PumpError::Recv(e)) => {
                    let reason = e.reason().unwrap_or(Reason::CANCEL);
                    up.tx.send_reset(reason);
                    respond.send_reset(reason);
                    ctx.cancelled(reqs);
                    return Err(Attempt::Done);
                }
                // The response future says why the endpoint stopped taking the body.
                Err(PumpError::Send(..)) => up.req_failed = true,
            },
        }
    }
}

/// Phase 2: after the response headers, both directions until both ended.
async fn relay_response<D: std::future::Future<Output = ()>>(
    ctx: &Ctx,
    endpoint: SocketAddr,
    body: &mut Pump,
    up: &mut Upstream,
    started: ResponseStarted,
    timers: &mut Timers<'_, D>,
) -> Ended {
    let ResponseStarted {
        mut resp_body,
        mut client_tx,
        trailers_only_status,
        header_pushback,
    } = started;
    let mut charge = false;
    let mut broke = false;
    let mut complete = false;
    let mut pushback = None;
    let status = loop {
        if resp_body.done() && (body.done() || up.req_failed) {
            complete = true;
            pushback = resp_body
                .end_field(&GRPC_RETRY_PUSHBACK_MS)
                .and_then(grpc::retry_pushback)
                .or(header_pushback);
            let from_trailers = resp_body
                .end_field(&GRPC_STATUS)
                .map(|v| Status::grpc(v.as_bytes()));
            break from_trailers
                .or(trailers_only_status)
                .unwrap_or(Status::UNKNOWN);
        }
        tokio::select! {
            biased;
            _ = timers.deadline_sleep.as_mut(), if !resp_body.done() => {
                up.tx.send_reset(Reason::CANCEL);
                m::timeout(TimeoutKind::Deadline);
                end_with_status(ctx, &mut client_tx, grpc::DEADLINE_EXCEEDED, "interceptor: deadline exceeded");
                break Status::grpc_code(grpc::DEADLINE_EXCEEDED);
            }
            // Not charged to the endpoint: after the response headers a stall may as well be
            // the client's (a zero window).
            _ = timers.idle_sleep.as_mut(), if timers.idle.on() => {
                if timers.idle.rearm(timers.idle_sleep.as_mut()) {
                    continue;
                }
                up.tx.send_reset(Reason::CANCEL);
                m::timeout(TimeoutKind::StreamIdle);
                end_with_status(ctx, &mut client_tx, grpc::UNAVAILABLE, "interceptor: nothing moved on the stream (stream idle timeout)");
                break Status::grpc_code(grpc::UNAVAILABLE);
            }
            s = resp_body.step(&mut client_tx), if !resp_body.done() => match s {
                // The step that ends the stream needs no clock read for the idle timer.
                Ok(()) if resp_body.done() && (body.done() || up.req_failed) => {}
                Ok(()) => timers.idle.progress(),
                Err(PumpError::Send(reason, _)) => {
                    // The client reset the stream or its connection failed.
                    up.tx.send_reset(reason.unwrap_or(Reason::CANCEL));
                    break Status::CANCELLED;
                }
                Err(PumpError::Recv(e)) if e.is_reset() && e.is_remote() => {
                    let reason = e.reason().unwrap_or(Reason::INTERNAL_ERROR);
                    client_tx.send_reset(reason);
                    charge = charged_reset(reason);
                    break Status::RESET;
                }
                Err(PumpError::Recv(e)) if e.is_reset() => {
                    tracing::debug!(%endpoint, error = %e, "endpoint's trailers rejected");
                    end_with_status(ctx, &mut client_tx, grpc::INTERNAL, "interceptor: the endpoint's trailers were malformed or too large");
                    break Status::grpc_code(grpc::INTERNAL);
                }
                Err(PumpError::Recv(e)) => {
                    tracing::debug!(%endpoint, error = %e, "upstream connection failed during the response");
                    end_with_status(ctx, &mut client_tx, grpc::UNAVAILABLE, "interceptor: connection to the endpoint failed");
                    charge = true;
                    broke = true;
                    break Status::grpc_code(grpc::UNAVAILABLE);
                }
            },
            s = body.step(&mut up.tx), if !body.done() && !up.req_failed => match s {
                Ok(()) => timers.idle.progress(),
                Err(PumpError::Recv(e)) => {
                    let reason = e.reason().unwrap_or(Reason::CANCEL);
                    up.tx.send_reset(reason);
                    client_tx.send_reset(reason);
                    break Status::CANCELLED;
                }
                // The endpoint stopped taking the request body: after a complete response
                // that is RST_STREAM(NO_ERROR) (RFC 9113 8.1), before one the response
                // future or body says why. Either way the client is told by dropping the
                // stream handles, never by an explicit reset here: h2's send_reset discards
                // frames still queued for the client, the response's trailers among them,
                // while the implicit reset h2 sends on drop (NO_ERROR once the response is
                // complete) goes out after them.
                Err(PumpError::Send(..)) => up.req_failed = true,
            },
        }
    };
    Ended {
        status,
        complete,
        charge,
        broke,
        pushback,
    }
}

/// How a stream that reached its response ended.
struct Ended {
    status: Status,
    /// Both directions ended normally (the response is whole).
    complete: bool,
    /// The endpoint broke the stream (a charged reset, a broken connection).
    charge: bool,
    /// Its connection broke: charged by the first stream it cut only.
    broke: bool,
    /// grpc-retry-pushback-ms of the response.
    pushback: Option<std::time::Duration>,
}

/// Counts the stream and turns its end into what the balancer learns of the endpoint.
fn settle(ctx: &Ctx, ep: &EndpointStats, reqs: &EndpointRequests, end: Ended) -> Attempt {
    if end.status == Status::CANCELLED {
        ctx.guard.client_reset();
    }
    m::request(&ctx.service, reqs, end.status, ctx.started.elapsed());
    if end.complete && end.status.is_endpoint_failure() {
        ep.observe_failure();
        return match end.pushback {
            Some(d) => Attempt::PushedBack(d),
            None => Attempt::Failed,
        };
    }
    if end.charge {
        return Attempt::Failed;
    }
    // Only a whole response is a success: one that broke after its headers must not clear
    // the failures that lead to ejection.
    if end.complete {
        ep.record_success();
    }
    Attempt::Done
}

/// The endpoint's response headers, sent on to the client.
struct ResponseStarted {
    resp_body: Pump,
    client_tx: SendStream<Bytes>,
    /// The call's status if the headers carry it (a trailers-only gRPC response, or HTTP).
    trailers_only_status: Option<Status>,
    header_pushback: Option<std::time::Duration>,
}

/// Passes the response headers on (hop-by-hop fields stripped); `None` when the client
/// went away meanwhile.
fn start_response(
    ctx: &Ctx,
    resp: Response<RecvStream>,
    respond: &mut SendResponse<Bytes>,
) -> Option<ResponseStarted> {
    let (parts, up_body) = resp.into_parts();
    let trailers_only_status = if ctx.grpc {
        parts
            .headers
            .get(grpc::GRPC_STATUS)
            .map(|v| Status::grpc(v.as_bytes()))
    } else {
        Some(Status::http(parts.status.as_u16()))
    };
    let header_pushback = pushback_of(&parts.headers);
    let mut resp_body = Pump::new(up_body).keep_end_fields(&END_FIELDS);
    let eos = resp_body.empty();
    let client_tx = match respond.send_response(Response::from_parts(parts, ()), eos) {
        Ok(tx) => tx,
        Err(error) => {
            tracing::debug!(%error, "client went away before the response headers");
            return None;
        }
    };
    if eos {
        resp_body.mark_sent_end();
    }
    Some(ResponseStarted {
        resp_body,
        client_tx,
        trailers_only_status,
        header_pushback,
    })
}

/// The endpoint failed the stream before its response headers: a refused stream is
/// replayed (while the body can be), a reset is passed on, a broken connection answered
/// locally and charged.
fn response_error(
    ctx: &Ctx,
    e: h2::Error,
    endpoint: SocketAddr,
    body: &Pump,
    respond: &mut SendResponse<Bytes>,
    lease: &mut Lease,
    reqs: &EndpointRequests,
) -> Attempt {
    let refused = e.is_remote()
        && ((e.is_reset() && e.reason() == Some(Reason::REFUSED_STREAM))
            || (e.is_go_away() && e.reason() == Some(Reason::NO_ERROR)));
    if e.is_go_away() {
        lease.retire();
    }
    if refused {
        if body.can_replay() {
            return Attempt::Replay(if e.is_go_away() {
                ReplayReason::Goaway
            } else {
                ReplayReason::RefusedStream
            });
        }
        // The body was streamed past the replay buffer: only the client can retry.
        respond.send_reset(Reason::REFUSED_STREAM);
        m::request(&ctx.service, reqs, Status::RESET, ctx.started.elapsed());
        return Attempt::Done;
    }
    if e.is_reset() && e.is_remote() {
        let reason = e.reason().unwrap_or(Reason::INTERNAL_ERROR);
        respond.send_reset(reason);
        m::request(&ctx.service, reqs, Status::RESET, ctx.started.elapsed());
        return if charged_reset(reason) {
            Attempt::Failed
        } else {
            Attempt::Done
        };
    }
    if e.is_reset() {
        // h2 itself refused the response (headers over max_header_list_bytes, a
        // malformed message): that stream only, the connection is fine.
        tracing::debug!(endpoint = %endpoint, error = %e, "endpoint's response rejected");
        ctx.local(
            respond,
            grpc::INTERNAL,
            StatusCode::BAD_GATEWAY,
            "interceptor: the endpoint's response headers were malformed or too large",
            reqs,
        );
        return Attempt::Done;
    }
    // The connection broke with the request in flight: it may have been processed,
    // so it is not replayed.
    tracing::debug!(endpoint = %endpoint, error = %e, "upstream connection failed before the response");
    lease.retire();
    m::unavailable(UnavailableReason::ConnectionFailed);
    ctx.local(
        respond,
        grpc::UNAVAILABLE,
        StatusCode::BAD_GATEWAY,
        "interceptor: connection to the endpoint failed",
        reqs,
    );
    if lease.first_to_break() {
        Attempt::Failed
    } else {
        Attempt::Done
    }
}

fn pushback_of(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get(GRPC_RETRY_PUSHBACK_MS)
        .and_then(grpc::retry_pushback)
}

const GRPC_STATUS: HeaderName = HeaderName::from_static(grpc::GRPC_STATUS);
const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static(grpc::GRPC_RETRY_PUSHBACK_MS);
/// What the response's trailers are read for: the call's status and the endpoint's pushback.
static END_FIELDS: [HeaderName; 2] = [GRPC_STATUS, GRPC_RETRY_PUSHBACK_MS];

/// The stream idle timeout, checked lazily: progress only notes the time, and when the timer
/// fires early because the stream moved it is re-armed for a period after the last move. So
/// a frame costs a clock read, not a timer update.
struct IdleTimer {
    period: std::time::Duration,
    last: tokio::time::Instant,
}

impl IdleTimer {
    fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            last: tokio::time::Instant::now(),
        }
    }

    fn on(&self) -> bool {
        !self.period.is_zero()
    }

    fn progress(&mut self) {
        if self.on() {
            self.last = tokio::time::Instant::now();
        }
    }

    /// On expiry: true (and re-armed for a period after the last progress) if the stream
    /// moved since the timer was armed.
    fn rearm(&mut self, sleep: std::pin::Pin<&mut tokio::time::Sleep>) -> bool {
        let due = self.last + self.period;
        if due <= tokio::time::Instant::now() {
            return false;
        }
        sleep.reset(due);
        true
    }
}

/// Whether a reset from the endpoint counts against it: NO_ERROR and CANCEL are a peer's
/// ordinary ways to stop a stream and REFUSED_STREAM says it was not processed; anything
/// else (INTERNAL_ERROR, PROTOCOL_ERROR, ...) means the endpoint broke the stream.
fn charged_reset(reason: Reason) -> bool {
    !matches!(
        reason,
        Reason::NO_ERROR | Reason::CANCEL | Reason::REFUSED_STREAM
    )
}

/// Ends a stream whose response headers were already sent: gRPC gets a status in trailers,
/// anything else a reset.
fn end_with_status(ctx: &Ctx, tx: &mut SendStream<Bytes>, code: u32, msg: &str) {
    if ctx.grpc && tx.send_trailers(grpc::status_trailers(code, msg)).is_ok() {
        return;
    }
    tx.send_reset(Reason::INTERNAL_ERROR);
}
