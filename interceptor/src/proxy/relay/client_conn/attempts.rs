//! Where a client stream goes and how it ends: the endpoint picked for each attempt, a replay
//! when the endpoint never processed the stream, the answers the proxy gives itself, and what
//! the balancer and the metrics are told when the stream ends.

use std::sync::Arc;

use h2::frame::{self, StreamId};
use h2::Reason;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};

use super::super::super::endpoint_stats::EndpointStats;
use super::super::super::grpc;
use super::super::super::metrics::{self as m, ReplayReason, Status, UnavailableReason};
use super::super::fields::{Block, HeaderList};
use super::super::{RequestHead, ToUpstream, Unprocessed};
use super::{Attempt, CStream, ClientConn, DEADLINE_MARGIN, GRPC_TIMEOUT};

impl<T> ClientConn<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// The endpoint never saw the stream: another endpoint (or the same, anew) gets it while
    /// its request is still whole here.
    pub(super) fn on_unprocessed(
        &mut self,
        id: StreamId,
        why: Unprocessed,
        head: Option<RequestHead>,
    ) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(a) = s.attempt.take() else {
            return;
        };
        if let (Some(r), Some(head)) = (s.replay.as_mut(), head) {
            r.head = Some(head);
        }
        let addr = a.in_flight.stats().addr();
        drop(a);
        match why {
            Unprocessed::ConnectFailed => {
                s.tried.push(addr);
                // Nothing reached that endpoint, so an untried one costs no attempt: with
                // most endpoints refusing, a call still finds the one that answers.
                if self.dest.any_usable(&s.tried) {
                    s.attempts -= 1;
                }
            }
            Unprocessed::Refused => {
                s.tried.push(addr);
                m::replay(ReplayReason::RefusedStream);
            }
            Unprocessed::Closing => {
                s.tried.push(addr);
                m::replay(ReplayReason::ConnectionClosing);
            }
            // Waited for room on a full connection: picked again, at no cost.
            Unprocessed::Overflow => s.attempts -= 1,
        }
        if s.replay.as_ref().is_none_or(|r| r.head.is_none()) {
            // The body went on past what is kept (or trailers came): only the client can
            // retry.
            let mut s = match self.streams.remove(&id) {
                Some(s) => s,
                None => return,
            };
            s.out.clear();
            self.wire
                .emit(frame::Reset::new(id, Reason::REFUSED_STREAM).into());
            self.end_stream(s, Some(Status::RESET));
            return;
        }
        // Everything credited so far will be credited again by the next attempt.
        s.absorb = s.credited;
        if self.dest.pick(&s.tried).is_none() {
            s.tried.clear();
        }
        self.start_attempt(id);
    }

    /// Picks an endpoint and opens the stream there, or answers the client when none can.
    pub(super) fn start_attempt(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let max_attempts = self.inner.config.max_attempts;
        let per_connection = self.inner.config.streams_per_connection;
        // Connections found closing under us cost no attempt, but are bounded all the same.
        let mut closing_found = 0;
        loop {
            let Some(replay) = &mut s.replay else {
                return;
            };
            debug_assert!(
                replay.head.is_some(),
                "an attempt is made with the head at hand"
            );
            if s.attempts >= max_attempts {
                m::unavailable(UnavailableReason::AttemptsExhausted);
                let msg = format!(
                    "interceptor: no endpoint of {} could take the request",
                    self.dest.addr()
                );
                self.answer(id, grpc::UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE, &msg);
                return;
            }
            let Some(ep) = self.dest.pick(&s.tried) else {
                m::unavailable(UnavailableReason::NoEndpoint);
                let msg = format!("interceptor: no usable endpoint for {}", self.dest.addr());
                self.answer(id, grpc::UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE, &msg);
                return;
            };
            s.attempts += 1;
            let link = match self.links.iter().find(|(addr, l)| {
                *addr == ep.addr() && l.is_accepting() && l.is_ready() && l.has_room(per_connection)
            }) {
                Some((_, l)) => l.clone(),
                None => {
                    let l = self.inner.relay.pick(&self.inner, &self.dest, &ep);
                    self.links
                        .retain(|(addr, old)| *addr != ep.addr() && old.is_accepting());
                    self.links.push((ep.addr(), l.clone()));
                    l
                }
            };
            let body_follows = !replay.body.is_empty();
            let eos_on_headers = replay.whole && !body_follows;
            let Some(mut head) = replay.head.take() else {
                return;
            };
            if let Some(d) = s.deadline {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                let timeout = grpc::encode_grpc_timeout(left.saturating_sub(DEADLINE_MARGIN));
                head.set(GRPC_TIMEOUT, timeout.as_bytes());
            }
            let up_id = match link.open(head, eos_on_headers, &self.link, id) {
                Ok(up_id) => up_id,
                Err(head) => {
                    replay.head = Some(head);
                    // Closing under us: neither this connection's cache entry nor the pool
                    // (on its next pick) keeps it.
                    self.links.retain(|(_, l)| l.is_accepting());
                    closing_found += 1;
                    if closing_found <= max_attempts {
                        s.attempts -= 1;
                    }
                    continue;
                }
            };
            let n = replay.body.len();
            for (i, chunk) in replay.body.iter().enumerate() {
                let mut d = frame::Data::new(up_id, chunk.clone());
                d.set_end_stream(replay.whole && i + 1 == n);
                link.send(ToUpstream::Data(d));
            }
            s.attempt = Some(Attempt {
                link,
                id: up_id,
                in_flight: ep.start(),
                sent_at: self.now.into_std(),
            });
            return;
        }
    }

    /// Answers the stream here (no response headers were sent yet), or, if the response
    /// already started, ends it with a gRPC status in trailers or a reset.
    pub(super) fn answer(&mut self, id: StreamId, code: u32, http_status: StatusCode, msg: &str) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        // The upstream stream ends (a no-op where the endpoint ended it); the attempt stays,
        // so that the endpoint is charged or not when the stream is counted.
        if let Some(a) = &s.attempt {
            a.link.send(ToUpstream::Reset(a.id, Reason::CANCEL));
        }
        s.replay = None;
        s.local = true;
        let status = if s.grpc {
            Status::grpc_code(code)
        } else {
            Status::http(http_status.as_u16())
        };
        s.status = Some(status);
        if !s.resp_started {
            s.resp_started = true;
            s.resp_done = true;
            let (parts, ()) = grpc::local_response(s.grpc, code, http_status, msg).into_parts();
            let head = HeaderList::response(parts.status, &parts.headers);
            // Data the client sent for this stream goes nowhere now.
            let left = s.received - s.credited;
            s.credited = s.received;
            self.conn_credit += left as u32;
            self.wire.emit_headers(id, true, &head);
        } else if !s.resp_done && s.grpc {
            s.resp_done = true;
            let trailers = Block {
                id,
                eos: true,
                fields: HeaderList::from_map(&grpc::status_trailers(code, msg)),
            };
            self.send_frame(id, trailers.into());
        } else {
            let s = match self.streams.remove(&id) {
                Some(s) => s,
                None => return,
            };
            self.wire
                .emit(frame::Reset::new(id, Reason::INTERNAL_ERROR).into());
            self.end_stream(s, None);
            return;
        }
        self.finish_if_done(id);
    }

    /// Counts a stream that ended, tells the balancer what its endpoint did, and gives back
    /// the connection window its request body still held.
    pub(super) fn end_stream(&mut self, s: CStream, cause: Option<Status>) {
        let left = s.received - s.credited;
        self.conn_credit += left as u32;
        let now = self.now;
        self.last_end = now;
        let elapsed = now.into_std().saturating_duration_since(s.started);
        let status = cause.or(s.status).unwrap_or(Status::UNKNOWN);
        let complete = cause.is_none();
        match &s.attempt {
            Some(a) => {
                let ep: &Arc<EndpointStats> = a.in_flight.stats();
                m::request(&self.service, ep.requests(&self.service), status, elapsed);
                self.settle(ep, status, complete && !s.local, s.charge, s.pushback);
            }
            None => m::request(&self.service, self.service.no_endpoint(), status, elapsed),
        }
        self.fit_window();
    }

    fn settle(
        &self,
        ep: &Arc<EndpointStats>,
        status: Status,
        complete: bool,
        charge: Option<&'static str>,
        pushback: Option<std::time::Duration>,
    ) {
        let policy = self.inner.eject_policy();
        let max = self.inner.config.max_ejected_percent;
        if complete && status.is_endpoint_failure() {
            ep.observe_failure();
            // Asked for a pause: taken out for it (within the ejection bound), else charged.
            if !pushback.is_some_and(|d| self.dest.push_back(ep, max, d)) {
                self.dest
                    .record_failure(ep, &policy, max, status.failure_reason());
            }
        } else if let Some(why) = charge {
            self.dest.record_failure(ep, &policy, max, why);
        } else if complete {
            ep.record_success();
        }
    }
}
