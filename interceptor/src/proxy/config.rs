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

/// Proxy configuration. `Default` gives production values.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub balancer: BalancerKind,
    /// How long to wait for a client's first bytes before treating the connection as a
    /// server-first protocol and relaying it opaquely.
    pub detect_timeout: Duration,
    /// Bound on connecting (TCP + HTTP/2 handshake) to one endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 per-stream receive window, both towards clients and towards endpoints.
    pub stream_window: u32,
    /// HTTP/2 per-connection receive window.
    pub connection_window: u32,
    /// Streams a client connection may have open at once.
    pub max_concurrent_streams: u32,
    /// A new upstream connection is opened once every connection to an endpoint carries this
    /// many streams (or the peer's own limit, if lower).
    pub streams_per_connection: usize,
    /// Upper bound on pooled connections per endpoint.
    pub max_connections_per_endpoint: usize,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout: Duration,
    /// A PING on every pooled upstream connection this often (zero: off)...
    pub keepalive_interval: Duration,
    /// ...and a connection whose PING is not answered within this is closed: a black-holed
    /// endpoint (node gone, conntrack lost) would otherwise hold new streams until they time out.
    pub keepalive_timeout: Duration,
    /// Request body bytes kept per stream so that a refused stream can be replayed elsewhere.
    pub replay_buffer_bytes: usize,
    /// Attempts per stream (first try included) on refused streams and failed connects.
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            balancer: BalancerKind::P2c,
            detect_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(1),
            stream_window: 1024 * 1024,
            connection_window: 4 * 1024 * 1024,
            max_concurrent_streams: 1000,
            streams_per_connection: 100,
            max_connections_per_endpoint: 4,
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            replay_buffer_bytes: 64 * 1024,
            max_attempts: 3,
            eject_after_failures: 3,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            ewma_decay: Duration::from_millis(250),
            default_rtt: Duration::from_millis(1),
            max_client_resets_per_second: 1000,
        }
    }
}
