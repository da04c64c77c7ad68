//! Metrics the proxy emits through the `metrics` facade. The agent installs the exporter and
//! calls [`describe`] once at start.

use std::sync::Arc;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

pub const REQUESTS: &str = "interceptor_requests_total";
pub const REQUEST_DURATION: &str = "interceptor_request_duration_seconds";
pub const ACTIVE_STREAMS: &str = "interceptor_active_streams";
pub const UPSTREAM_CONNECTIONS: &str = "interceptor_upstream_connections";
pub const UPSTREAM_CONNECT_FAILURES: &str = "interceptor_upstream_connect_failures_total";
pub const REPLAYS: &str = "interceptor_replays_total";
pub const EJECTIONS: &str = "interceptor_ejections_total";
pub const DETECTIONS: &str = "interceptor_detections_total";
pub const OPAQUE_CONNECTIONS: &str = "interceptor_opaque_connections_total";
pub const UNAVAILABLE: &str = "interceptor_unavailable_total";
pub const ABUSIVE_CONNECTIONS: &str = "interceptor_abusive_connections_total";
pub const EJECTIONS_SUPPRESSED: &str = "interceptor_ejections_suppressed_total";
pub const REJECTED_CONNECTIONS: &str = "interceptor_rejected_connections_total";
pub const TIMEOUTS: &str = "interceptor_timeouts_total";

/// Registers descriptions and units; call once after installing a recorder.
pub fn describe() {
    describe_counter!(REQUESTS, Unit::Count, "HTTP/2 streams completed, by endpoint and status (grpc-status, or HTTP status for non-gRPC)");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Stream duration from request headers to end of response"
    );
    describe_gauge!(ACTIVE_STREAMS, Unit::Count, "HTTP/2 streams being relayed");
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        Unit::Count,
        "Pooled HTTP/2 connections to endpoints"
    );
    describe_counter!(
        UPSTREAM_CONNECT_FAILURES,
        Unit::Count,
        "Failed connects (TCP or HTTP/2 handshake) to endpoints"
    );
    describe_counter!(
        REPLAYS,
        Unit::Count,
        "Streams replayed on another endpoint after REFUSED_STREAM, GOAWAY or a failed connect"
    );
    describe_counter!(
        EJECTIONS,
        Unit::Count,
        "Endpoints ejected after repeated failures while their peers succeeded"
    );
    describe_counter!(
        EJECTIONS_SUPPRESSED,
        Unit::Count,
        "Ejections not made: the endpoint's peers failed too, or the ejection limit (max_ejected_percent) was reached"
    );
    describe_counter!(
        REJECTED_CONNECTIONS,
        Unit::Count,
        "Client connections closed at accept because max_client_connections were open"
    );
    describe_counter!(
        TIMEOUTS,
        Unit::Count,
        "Streams and connections ended by a proxy timeout, by kind"
    );
    describe_counter!(
        DETECTIONS,
        Unit::Count,
        "Accepted connections by detected protocol"
    );
    describe_counter!(
        OPAQUE_CONNECTIONS,
        Unit::Count,
        "Connections relayed as opaque TCP, by outcome"
    );
    describe_counter!(
        UNAVAILABLE,
        Unit::Count,
        "Streams answered UNAVAILABLE by the proxy itself, by reason"
    );
    describe_counter!(
        ABUSIVE_CONNECTIONS,
        Unit::Count,
        "Client connections closed for abuse, by reason"
    );
}

pub(crate) fn request(endpoint: &Arc<str>, status: &'static str, elapsed: Duration) {
    counter!(REQUESTS, "endpoint" => endpoint.clone(), "status" => status).increment(1);
    histogram!(REQUEST_DURATION).record(elapsed.as_secs_f64());
}

pub(crate) fn active_streams(delta: f64) {
    gauge!(ACTIVE_STREAMS).increment(delta);
}

pub(crate) fn upstream_connections(endpoint: &Arc<str>, delta: f64) {
    gauge!(UPSTREAM_CONNECTIONS, "endpoint" => endpoint.clone()).increment(delta);
}

pub(crate) fn connect_failure(endpoint: &Arc<str>) {
    counter!(UPSTREAM_CONNECT_FAILURES, "endpoint" => endpoint.clone()).increment(1);
}

pub(crate) fn replay(reason: &'static str) {
    counter!(REPLAYS, "reason" => reason).increment(1);
}

pub(crate) fn ejection(endpoint: &Arc<str>) {
    counter!(EJECTIONS, "endpoint" => endpoint.clone()).increment(1);
}

pub(crate) fn ejection_suppressed(endpoint: &Arc<str>) {
    counter!(EJECTIONS_SUPPRESSED, "endpoint" => endpoint.clone()).increment(1);
}

pub(crate) fn rejected_connection() {
    counter!(REJECTED_CONNECTIONS).increment(1);
}

pub(crate) fn timeout(kind: &'static str) {
    counter!(TIMEOUTS, "kind" => kind).increment(1);
}

pub(crate) fn detection(protocol: &'static str) {
    counter!(DETECTIONS, "protocol" => protocol).increment(1);
}

pub(crate) fn opaque(outcome: &'static str) {
    counter!(OPAQUE_CONNECTIONS, "outcome" => outcome).increment(1);
}

pub(crate) fn abusive_connection(reason: &'static str) {
    counter!(ABUSIVE_CONNECTIONS, "reason" => reason).increment(1);
}

pub(crate) fn unavailable(reason: &'static str) {
    counter!(UNAVAILABLE, "reason" => reason).increment(1);
}

/// Maps a grpc-status value to a static label without allocating.
pub(crate) fn grpc_status_label(code: &[u8]) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    std::str::from_utf8(code)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .and_then(|i| CODES.get(i).copied())
        .unwrap_or("unknown")
}

/// HTTP status class label for non-gRPC streams.
pub(crate) fn http_status_label(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
