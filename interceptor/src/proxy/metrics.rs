//! Metrics the proxy emits through the `metrics` facade. The agent installs the exporter and
//! calls [`describe`] once at start.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

pub const REQUESTS: &str = "interceptor_requests_total";
pub const REQUEST_DURATION: &str = "interceptor_request_duration_seconds";
pub const ACTIVE_STREAMS: &str = "interceptor_active_streams";
pub const UPSTREAM_CONNECTIONS: &str = "interceptor_upstream_connections";
pub const UPSTREAM_CONNECT_FAILURES: &str = "interceptor_upstream_connect_failures_total";
pub const UPSTREAM_GOAWAYS: &str = "interceptor_upstream_goaways_total";
pub const REPLAYS: &str = "interceptor_replays_total";
pub const EJECTIONS: &str = "interceptor_ejections_total";
pub const DETECTIONS: &str = "interceptor_detections_total";
pub const OPAQUE_CONNECTIONS: &str = "interceptor_opaque_connections_total";
pub const UNAVAILABLE: &str = "interceptor_unavailable_total";
pub const ABUSIVE_CONNECTIONS: &str = "interceptor_abusive_connections_total";
pub const EJECTIONS_SUPPRESSED: &str = "interceptor_ejections_suppressed_total";
pub const REJECTED_CONNECTIONS: &str = "interceptor_rejected_connections_total";
pub const TIMEOUTS: &str = "interceptor_timeouts_total";
pub const OPAQUE_BYTES: &str = "interceptor_opaque_bytes_total";
pub const OPAQUE_ACTIVE: &str = "interceptor_opaque_active_connections";

/// Registers descriptions and units; call once after installing a recorder.
pub fn describe() {
    describe_counter!(REQUESTS, Unit::Count, "HTTP/2 streams and HTTP/1.1 requests completed, by Service (namespace, service, port), endpoint, protocol (h2, http1) and status (grpc-status, the HTTP status class for non-gRPC, cancelled or reset)");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Stream duration from request headers to end of response, by Service"
    );
    describe_gauge!(
        ACTIVE_STREAMS,
        Unit::Count,
        "HTTP/2 streams and HTTP/1.1 requests being relayed (in flight), by Service"
    );
    describe_counter!(
        OPAQUE_BYTES,
        Unit::Bytes,
        "Bytes relayed on opaque TCP connections, by Service and direction (sent: client to endpoint)"
    );
    describe_gauge!(
        OPAQUE_ACTIVE,
        Unit::Count,
        "Opaque TCP connections being relayed, by Service"
    );
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        Unit::Count,
        "Pooled connections to endpoints, by protocol (h2, http1)"
    );
    describe_counter!(
        UPSTREAM_CONNECT_FAILURES,
        Unit::Count,
        "Failed connects (TCP, or the HTTP/2 or HTTP/1.1 handshake) to endpoints"
    );
    describe_counter!(
        UPSTREAM_GOAWAYS,
        Unit::Count,
        "Upstream connections an endpoint closed with GOAWAY and an error code, by endpoint and code (enhance_your_calm: the server defended itself, e.g. against streams reset before it accepted them)"
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
        "Connections relayed as opaque TCP, by Service and outcome"
    );
    describe_counter!(
        UNAVAILABLE,
        Unit::Count,
        "Streams answered UNAVAILABLE by the proxy itself, by reason"
    );
    describe_counter!(
        ABUSIVE_CONNECTIONS,
        Unit::Count,
        "Client connections closed for abuse or a malformed request, by reason"
    );
}

/// The Service a destination belongs to, as the labels of its metrics. Bounded: one set per
/// Service port, so cardinality follows the cluster's Services, never its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    /// The Service port's name, or its number when it has none.
    pub port: Arc<str>,
}

impl ServiceLabels {
    pub fn new(namespace: &str, service: &str, port: &str) -> Self {
        Self {
            namespace: Arc::from(namespace),
            service: Arc::from(service),
            port: Arc::from(port),
        }
    }

    /// For a destination no Service names (standalone proxy, static source without one):
    /// the address stands in for the Service.
    pub fn unnamed(dest: SocketAddr) -> Self {
        Self::new("", &dest.to_string(), &dest.port().to_string())
    }
}

/// Every status label a request can end with, so per-endpoint counters sit in a fixed array
/// resolved on first use instead of being looked up by label on every request.
const STATUSES: [&str; 23] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "unknown", "1xx", "2xx", "3xx", "4xx", "5xx",
];
const CANCELLED: usize = STATUSES.len();
const RESET: usize = STATUSES.len() + 1;
const STATUS_SLOTS: usize = STATUSES.len() + 2;

/// An enum whose variants are the values of one metric label.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub(crate) fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label),+
                }
            }
        }
    };
}

label_enum! {
    /// Why a stream went to another endpoint: the one tried did not process it.
    ReplayReason {
        /// GOAWAY(NO_ERROR) before the stream was taken.
        Goaway => "goaway",
        RefusedStream => "refused_stream",
        /// The pooled connection would not open a new stream (it is closing).
        ConnectionClosing => "connection_closing",
    }
}

label_enum! {
    /// Which timer ended a stream or connection.
    TimeoutKind {
        /// The call's grpc-timeout.
        Deadline => "deadline",
        /// The call's deadline passed while its upstream connection was being opened.
        DeadlineConnecting => "deadline_connecting",
        /// Nothing moved on a stream for the stream idle timeout.
        StreamIdle => "stream_idle",
        ClientIdle => "client_idle",
        OpaqueIdle => "opaque_idle",
    }
}

label_enum! {
    /// Why the proxy itself answered UNAVAILABLE.
    UnavailableReason {
        NoEndpoint => "no_endpoint",
        /// This process or node is out of file descriptors, memory or ports.
        LocalResources => "local_resources",
        AttemptsExhausted => "attempts_exhausted",
        ConnectionFailed => "connection_failed",
    }
}

label_enum! {
    /// How an opaque relay ended.
    OpaqueOutcome {
        NoEndpoint => "no_endpoint",
        LocalResources => "local_resources",
        ConnectFailed => "connect_failed",
        UpstreamError => "upstream_error",
        IdleTimeout => "idle_timeout",
        Closed => "closed",
        Reset => "reset",
    }
}

label_enum! {
    /// The protocol of a request, and of the pooled connection it went on.
    RequestProtocol {
        Http2 => "h2",
        Http1 => "http1",
    }
}

label_enum! {
    /// Why a client connection was closed for abuse.
    AbuseReason {
        RapidReset => "rapid_reset",
        /// Stream errors (a malformed frame on an open stream) faster than the reset limit:
        /// each makes the proxy reset the endpoint's stream (MadeYouReset, CVE-2025-8671).
        StreamErrors => "stream_errors",
        /// An HTTP/1.1 request with both Content-Length and Transfer-Encoding (smuggling).
        AmbiguousFraming => "ambiguous_framing",
        /// An HTTP/1.x request hyper could not parse (answered 400 or 431 by it).
        MalformedHttp1 => "malformed_http1",
    }
}

/// How a stream ended, as its metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status(usize);

impl Status {
    pub(crate) const CANCELLED: Status = Status(CANCELLED);
    pub(crate) const RESET: Status = Status(RESET);
    pub(crate) const UNKNOWN: Status = Status(17);

    /// A grpc-status value ("unknown" if it is not one).
    pub(crate) fn grpc(code: &[u8]) -> Status {
        let i = std::str::from_utf8(code)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|i| *i <= 16)
            .unwrap_or(17);
        Status(i)
    }

    pub(crate) fn grpc_code(code: u32) -> Status {
        Status(if code <= 16 { code as usize } else { 17 })
    }

    /// The class of an HTTP status, for non-gRPC streams.
    pub(crate) fn http(status: u16) -> Status {
        Status(match status {
            100..=199 => 18,
            200..=299 => 19,
            300..=399 => 20,
            400..=499 => 21,
            _ => 22,
        })
    }

    /// An answer that says the endpoint failed (not the request): gRPC RESOURCE_EXHAUSTED,
    /// INTERNAL, UNAVAILABLE, or HTTP 5xx. It counts against the endpoint like a broken
    /// connection, so an endpoint that fails fast does not look fast.
    pub(crate) fn is_endpoint_failure(self) -> bool {
        matches!(self.0, 8 | 13 | 14 | 22)
    }

    /// What an endpoint failure says, for the ejection log line.
    pub(crate) fn failure_reason(self) -> &'static str {
        match self.0 {
            8 => "the endpoint answered RESOURCE_EXHAUSTED",
            13 => "the endpoint answered INTERNAL",
            14 => "the endpoint answered UNAVAILABLE",
            22 => "the endpoint answered HTTP 5xx",
            _ => "the endpoint's answer",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self.0 {
            CANCELLED => "cancelled",
            RESET => "reset",
            i => STATUSES[i],
        }
    }
}

/// A destination's metric handles, resolved once per Service port.
pub(crate) struct ServiceMetrics {
    labels: ServiceLabels,
    duration: Histogram,
    active: Gauge,
    opaque_active: Gauge,
    opaque_sent: Counter,
    opaque_received: Counter,
    /// Requests answered without an endpoint (none usable, attempts exhausted), by protocol.
    no_endpoint: EndpointRequests,
    no_endpoint_http1: EndpointRequests,
}

impl ServiceMetrics {
    pub(crate) fn new(labels: ServiceLabels) -> Self {
        let (ns, svc, port) = (&labels.namespace, &labels.service, &labels.port);
        Self {
            duration: histogram!(REQUEST_DURATION, "namespace" => ns.clone(), "service" => svc.clone(), "port" => port.clone()),
            active: gauge!(ACTIVE_STREAMS, "namespace" => ns.clone(), "service" => svc.clone(), "port" => port.clone()),
            opaque_active: gauge!(OPAQUE_ACTIVE, "namespace" => ns.clone(), "service" => svc.clone(), "port" => port.clone()),
            opaque_sent: counter!(OPAQUE_BYTES, "namespace" => ns.clone(), "service" => svc.clone(), "port" => port.clone(), "direction" => "sent"),
            opaque_received: counter!(OPAQUE_BYTES, "namespace" => ns.clone(), "service" => svc.clone(), "port" => port.clone(), "direction" => "received"),
            no_endpoint: EndpointRequests::new(&labels, Arc::from("none"), RequestProtocol::Http2),
            no_endpoint_http1: EndpointRequests::new(
                &labels,
                Arc::from("none"),
                RequestProtocol::Http1,
            ),
            labels,
        }
    }

    pub(crate) fn labels(&self) -> &ServiceLabels {
        &self.labels
    }

    /// Counts a stream in flight until the guard drops.
    pub(crate) fn stream_started(self: &Arc<Self>) -> ActiveStream {
        self.active.increment(1.0);
        ActiveStream(self.clone())
    }

    pub(crate) fn no_endpoint(&self) -> &EndpointRequests {
        &self.no_endpoint
    }

    pub(crate) fn no_endpoint_http1(&self) -> &EndpointRequests {
        &self.no_endpoint_http1
    }

    pub(crate) fn opaque_started(self: &Arc<Self>) -> OpaqueActive {
        self.opaque_active.increment(1.0);
        OpaqueActive(self.clone())
    }

    /// Counters of bytes relayed opaquely: (client to endpoint, endpoint to client).
    pub(crate) fn opaque_bytes(&self) -> (Counter, Counter) {
        (self.opaque_sent.clone(), self.opaque_received.clone())
    }

    pub(crate) fn opaque(&self, outcome: OpaqueOutcome) {
        let l = &self.labels;
        counter!(OPAQUE_CONNECTIONS, "namespace" => l.namespace.clone(), "service" => l.service.clone(), "port" => l.port.clone(), "outcome" => outcome.label()).increment(1);
    }

    fn record(&self, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
    }
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics")
            .field("labels", &self.labels)
            .finish()
    }
}

/// One stream in flight for its Service's gauge.
pub(crate) struct ActiveStream(Arc<ServiceMetrics>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.active.decrement(1.0);
    }
}

/// One opaque connection being relayed.
pub(crate) struct OpaqueActive(Arc<ServiceMetrics>);

impl Drop for OpaqueActive {
    fn drop(&mut self) {
        self.0.opaque_active.decrement(1.0);
    }
}

/// Request counters of one endpoint of one Service and one protocol, one per status, each
/// resolved on first use.
pub(crate) struct EndpointRequests {
    /// namespace, service, port, endpoint.
    labels: [Arc<str>; 4],
    protocol: RequestProtocol,
    by_status: [OnceLock<Counter>; STATUS_SLOTS],
}

impl std::fmt::Debug for EndpointRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRequests")
            .field("endpoint", &self.labels[3])
            .finish()
    }
}

impl EndpointRequests {
    pub(crate) fn new(
        service: &ServiceLabels,
        endpoint: Arc<str>,
        protocol: RequestProtocol,
    ) -> Self {
        Self {
            protocol,
            labels: [
                service.namespace.clone(),
                service.service.clone(),
                service.port.clone(),
                endpoint,
            ],
            by_status: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn count(&self, status: Status) {
        self.by_status[status.0]
            .get_or_init(|| {
                let [ns, svc, port, ep] = &self.labels;
                counter!(REQUESTS, "namespace" => ns.clone(), "service" => svc.clone(), "port" => port.clone(), "endpoint" => ep.clone(), "protocol" => self.protocol.label(), "status" => status.label())
            })
            .increment(1);
    }
}

/// Counts one finished stream: its status on the endpoint, its duration on the Service.
pub(crate) fn request(
    service: &ServiceMetrics,
    endpoint: &EndpointRequests,
    status: Status,
    elapsed: Duration,
) {
    endpoint.count(status);
    service.record(elapsed);
}

pub(crate) fn upstream_connections(endpoint: &Arc<str>, delta: f64) {
    upstream_connections_of(endpoint, RequestProtocol::Http2, delta)
}

pub(crate) fn upstream_connections_of(endpoint: &Arc<str>, protocol: RequestProtocol, delta: f64) {
    gauge!(UPSTREAM_CONNECTIONS, "endpoint" => endpoint.clone(), "protocol" => protocol.label())
        .increment(delta);
}

pub(crate) fn connect_failure(endpoint: &Arc<str>) {
    counter!(UPSTREAM_CONNECT_FAILURES, "endpoint" => endpoint.clone()).increment(1);
}

/// An endpoint closed an upstream connection with GOAWAY and an error code.
pub(crate) fn upstream_goaway(endpoint: &Arc<str>, reason: h2::Reason) {
    counter!(UPSTREAM_GOAWAYS, "endpoint" => endpoint.clone(), "reason" => goaway_label(reason))
        .increment(1);
}

/// RFC 9113 section 7's error codes, as label values.
fn goaway_label(reason: h2::Reason) -> &'static str {
    match u32::from(reason) {
        0x0 => "no_error",
        0x1 => "protocol_error",
        0x2 => "internal_error",
        0x3 => "flow_control_error",
        0x4 => "settings_timeout",
        0x5 => "stream_closed",
        0x6 => "frame_size_error",
        0x7 => "refused_stream",
        0x8 => "cancel",
        0x9 => "compression_error",
        0xa => "connect_error",
        0xb => "enhance_your_calm",
        0xc => "inadequate_security",
        0xd => "http_1_1_required",
        _ => "unknown",
    }
}

pub(crate) fn replay(reason: ReplayReason) {
    counter!(REPLAYS, "reason" => reason.label()).increment(1);
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

pub(crate) fn timeout(kind: TimeoutKind) {
    counter!(TIMEOUTS, "kind" => kind.label()).increment(1);
}

pub(crate) fn detection(protocol: &'static str) {
    counter!(DETECTIONS, "protocol" => protocol).increment(1);
}

pub(crate) fn abusive_connection(reason: AbuseReason) {
    counter!(ABUSIVE_CONNECTIONS, "reason" => reason.label()).increment(1);
}

pub(crate) fn unavailable(reason: UnavailableReason) {
    counter!(UNAVAILABLE, "reason" => reason.label()).increment(1);
}
