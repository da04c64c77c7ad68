//! Tunables of the proxy. Every window and limit is explicit so memory per connection is
//! bounded and known.

use std::time::Duration;

/// How a destination's endpoints are chosen for each stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BalancerKind {
    /// Power of two choices over peak-EWMA latency weighted by in-flight requests.
    #[default]
    P2c,
    /// Strict rotation over the usable endpoints.
    RoundRobin,
}

/// Which HTTP/2 implementation serves client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Engine {
    /// The frame-level relay (`relay`): framing and HPACK our own (h2's `frame` types parse
    /// the control frames), frames passed from one connection to the other with the stream
    /// mapping and flow control done here.
    Relay,
    /// h2's server and client: a task per stream, each stream a request rebuilt as `http`
    /// types and sent again (`h2_server`, `forward`). About 1.6x the relay's CPU per request;
    /// kept as a fallback an operator can switch to (`--h2-engine streams`).
    Streams,
}

impl Default for H2Engine {
    /// `relay`; a build with the `streams-default` feature runs the streams engine instead,
    /// which is how the whole proxy test suite runs against it too (`cargo test -p
    /// interceptor --features streams-default`).
    fn default() -> Self {
        if cfg!(feature = "streams-default") {
            H2Engine::Streams
        } else {
            H2Engine::Relay
        }
    }
}

/// Proxy configuration. `Default` gives production values.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub balancer: BalancerKind,
    /// How HTTP/2 client connections are served.
    pub h2_engine: H2Engine,
    /// How long to wait for a client's first bytes before treating the connection as a
    /// server-first protocol and relaying it opaquely.
    pub detect_timeout: Duration,
    /// Bound on connecting (TCP + HTTP/2 handshake) to one endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 per-stream receive window, both towards clients and towards endpoints.
    pub stream_window: u32,
    /// HTTP/2 per-connection receive window (for client connections, the window they start
    /// with; it grows with their open streams up to `max_client_connection_window`).
    pub connection_window: u32,
    /// Ceiling of a client connection's receive window. A stream whose endpoint does not read
    /// its body holds up to `stream_window` unreleased, so a client connection's window grows
    /// by one stream window per open stream: a stalled stream then stalls only itself (up to
    /// this ceiling / `stream_window` stalled streams per connection, 256 by default), and
    /// what one client connection can pin in the proxy stays at most this much.
    pub max_client_connection_window: u32,
    /// Streams a client connection may have open at once.
    pub max_concurrent_streams: u32,
    /// A new upstream connection is opened once every connection to an endpoint carries this
    /// many streams (or the peer's own limit, if lower).
    pub streams_per_connection: usize,
    /// Upper bound on pooled connections per endpoint.
    pub max_connections_per_endpoint: usize,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout: Duration,
    /// A PING on an upstream connection that carries streams and has heard nothing from its
    /// endpoint for this long (zero: off; the `streams` engine PINGs every pooled connection
    /// this often)...
    pub keepalive_interval: Duration,
    /// ...and a connection whose PING is not answered within this is closed: a black-holed
    /// endpoint (node gone, conntrack lost) would otherwise hold new streams until they time out.
    pub keepalive_timeout: Duration,
    /// Request body bytes kept per stream so that a refused stream can be replayed elsewhere.
    pub replay_buffer_bytes: usize,
    /// Attempts per stream (first try included) on refused streams and failed connects; a
    /// failed connect with an untried endpoint left costs no attempt (nothing was sent).
    pub max_attempts: usize,
    /// Consecutive connection failures before an endpoint is ejected.
    pub eject_after_failures: u32,
    /// First ejection period; doubled on each repeated ejection, up to `eject_max`.
    pub eject_base: Duration,
    pub eject_max: Duration,
    /// Time constant of the peak-EWMA latency estimate.
    pub ewma_decay: Duration,
    /// Latency estimate used before any endpoint of a destination has been measured.
    pub default_rtt: Duration,
    /// A client connection that cancels more streams than this within one second is closed
    /// with GOAWAY ENHANCE_YOUR_CALM (rapid-reset abuse, CVE-2023-44487): each cancelled
    /// stream costs an upstream stream too.
    pub max_client_resets_per_second: u32,
    /// Largest decoded header list (RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE) taken from a client
    /// or an endpoint. A bigger request gets 431 and never reaches an endpoint; an unfinished
    /// CONTINUATION block can hold no more than about this much per connection. h2's own default
    /// is 16 MiB, which let 16 idle connections hold 318 MiB.
    pub max_header_list_bytes: u32,
    /// A stream on which nothing moved in either direction for this long is ended: UNAVAILABLE
    /// to the client, and the endpoint charged with a failure if it never answered (zero:
    /// off). Calls with a grpc-timeout end at their deadline anyway; this bounds the rest, like
    /// Envoy's stream_idle_timeout (same default).
    pub stream_idle_timeout: Duration,
    /// A client HTTP/2 connection with no open stream for this long gets GOAWAY (zero: off);
    /// gRPC clients reconnect on their next call.
    pub client_idle_timeout: Duration,
    /// An opaque relay on which no byte moved either way for this long is closed (zero: off).
    pub opaque_idle_timeout: Duration,
    /// At most this share of a destination's endpoints is ejected at once (Envoy's
    /// max_ejection_percent); a lone endpoint is never ejected, nor one whose peers all fail
    /// too (then the failure is not the endpoint's).
    pub max_ejected_percent: u32,
    /// Client connections served at once; past it new ones are closed at accept with a
    /// warning. None: derived from RLIMIT_NOFILE at start (half of it, each client connection
    /// may need an upstream socket too), so running out of descriptors never looks like an
    /// endpoint failure.
    pub max_client_connections: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            balancer: BalancerKind::P2c,
            h2_engine: H2Engine::default(),
            detect_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(1),
            // Within a node the round trip is tens of microseconds, so 256 KiB per stream
            // still moves gigabytes a second; what a stalled stream can pin is one window.
            stream_window: 256 * 1024,
            connection_window: 4 * 1024 * 1024,
            max_client_connection_window: 64 * 1024 * 1024,
            max_concurrent_streams: 1000,
            streams_per_connection: 100,
            max_connections_per_endpoint: 4,
            idle_timeout: Duration::from_secs(60),
            // grpc-go servers close connections PINGed more often than this by default
            // (keepalive EnforcementPolicy.MinTime, GOAWAY "too_many_pings").
            keepalive_interval: Duration::from_secs(300),
            keepalive_timeout: Duration::from_secs(10),
            replay_buffer_bytes: 64 * 1024,
            max_attempts: 3,
            eject_after_failures: 3,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            ewma_decay: Duration::from_millis(250),
            default_rtt: Duration::from_millis(1),
            max_client_resets_per_second: 1000,
            max_header_list_bytes: 64 * 1024,
            stream_idle_timeout: Duration::from_secs(300),
            client_idle_timeout: Duration::from_secs(3600),
            opaque_idle_timeout: Duration::from_secs(3600),
            max_ejected_percent: 50,
            max_client_connections: None,
        }
    }
}
