//! The userspace data path: pod-local listeners, protocol detection, relaying.
//!
//! How a connection flows, file by file:
//!
//! ```text
//! pod_listener    accept in the pod's netns, find the original destination
//!   |  (no endpoints known: original_destination, relayed to where the app dialled)
//! Proxy::serve_connection (here)
//!   -> detect         HTTP/2 preface, or anything else (appProtocol skips the wait)
//!   -> h2_server      one h2 server per client connection (conn_guard: its abuse and idle
//!      |              accounting), one task per stream
//!      -> forward     one stream: pick an endpoint, send upstream, relay both ways
//!         |           (body_pump: one direction of DATA and trailers; grpc: header rules)
//!         -> destination   the Service port's endpoint set and settings
//!            -> balancer   p2c / round robin, affinity, slow start
//!               (endpoint_stats: latency, in flight, failures, ejection)
//!         -> pool     pooled HTTP/2 connections per endpoint (connector: from the pod's netns)
//!   -> http1_server   HTTP/1.x, per request (http1_guard: framing checks hyper does not make)
//!      -> http1_forward   one request: pick, send on a pooled connection, stream back
//!         |               (http1_upgrade: WebSocket, h2c, CONNECT become an opaque relay)
//!         -> http1_pool   pooled HTTP/1.1 connections per endpoint (http1_body: what is sent)
//!   -> opaque_relay   anything else: TCP to one balanced endpoint
//! ```
//!
//! Around them: `config` (tunables), `limit` (client connection cap, accept rate), `metrics`,
//! `workers` (single-threaded runtimes serving connections). The inputs every stage shares
//! live here: [`Proxy`] and its [`Shared`] state, and the endpoint inputs discovery gives
//! ([`EndpointSpec`], [`EndpointState`]).

pub mod balancer;
pub mod body_pump;
pub(crate) mod busy_poll;
pub mod config;
pub mod conn_guard;
pub mod connector;
pub mod destination;
pub mod detect;
pub mod endpoint_stats;
pub mod forward;
pub mod grpc;
pub mod h2_server;
pub mod http1_body;
pub mod http1_forward;
pub mod http1_guard;
pub mod http1_pool;
pub mod http1_server;
pub mod http1_upgrade;
pub mod limit;
pub mod metrics;
pub mod opaque_relay;
pub mod original_destination;
pub mod pod_listener;
pub mod pool;
pub(crate) mod relay;
pub mod workers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::Instrument;

use config::{H2Engine, ProxyConfig};
use connector::Connector;
use destination::{Destination, EndpointsHandle};
use detect::{detect, Http1Mode, OpaqueKind, Prefixed, Protocol, ProtocolHint};
use endpoint_stats::EjectPolicy;
use http1_pool::Http1Pool;
use limit::ConnectionLimit;
use metrics as m;
use pool::{Pool, PoolConfig};

/// A mutex's guard even if a thread panicked while holding it: the proxy's maps stay
/// usable (each critical section leaves them consistent), so one bad stream cannot wedge
/// every later one.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Readiness of an endpoint, as EndpointSlice conditions give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointState {
    /// `ready`: takes new streams.
    Ready,
    /// `serving` and `terminating`: takes new streams only when no endpoint is ready.
    Terminating,
    /// Takes no new streams.
    NotReady,
}

/// One endpoint as discovery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub state: EndpointState,
}

impl EndpointSpec {
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: EndpointState::Ready,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("reading the first bytes of the client connection failed: {0}")]
    Detect(#[source] std::io::Error),
    #[error("HTTP/2 connection with the client failed: {0}")]
    Http2(#[source] h2::Error),
    #[error("HTTP/1.x connection with the client failed: {0}")]
    Http1(#[source] hyper::Error),
    #[error("{0} client connections are open (max_client_connections); closed this one at accept")]
    TooManyConnections(usize),
}

/// One proxy: destinations by original destination address, and one upstream pool shared
/// by all client connections. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Shared>,
}

/// What every connection of one [`Proxy`] shares: configuration, the upstream connector and
/// pool, the destinations and the connection limit.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) pool: Pool,
    pub(crate) http1_pool: Http1Pool,
    /// The relay engine's upstream connections (`relay`).
    pub(crate) relay: relay::upstreams::Upstreams,
    dests: Mutex<HashMap<SocketAddr, Arc<Destination>>>,
    shutdown: watch::Sender<bool>,
    limit: Arc<ConnectionLimit>,
}

impl Shared {
    pub(crate) fn eject_policy(&self) -> EjectPolicy {
        EjectPolicy {
            after_failures: self.config.eject_after_failures,
            base: self.config.eject_base,
            max: self.config.eject_max,
        }
    }

    fn destination(&self, dest: SocketAddr) -> Arc<Destination> {
        let mut dests = match self.dests.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        dests
            .entry(dest)
            .or_insert_with(|| {
                Arc::new(
                    Destination::new(
                        dest,
                        self.config.balancer,
                        self.config.ewma_decay,
                        self.config.default_rtt,
                    )
                    .with_pool(self.pool.clone())
                    .with_http1_pool(self.http1_pool.clone()),
                )
            })
            .clone()
    }
}

impl Proxy {
    /// Creates a proxy; upstream sockets are opened through `connector`. Call inside a tokio
    /// runtime (the pool starts its idle reaper there).
    pub fn new(config: ProxyConfig, connector: Arc<dyn Connector>) -> Self {
        let limit = ConnectionLimit::new(config.max_client_connections);
        Self::with_connection_limit(config, connector, limit)
    }

    /// A proxy whose client connections count against `limit`, shared with others (the
    /// agent's per-pod proxies); `config.max_client_connections` is then not used.
    pub fn with_connection_limit(
        config: ProxyConfig,
        connector: Arc<dyn Connector>,
        limit: Arc<ConnectionLimit>,
    ) -> Self {
        let pool = Pool::new(
            connector.clone(),
            PoolConfig {
                connect_timeout: config.connect_timeout,
                stream_window: config.stream_window,
                connection_window: config.connection_window,
                streams_per_connection: config.streams_per_connection,
                max_connections_per_endpoint: config.max_connections_per_endpoint,
                idle_timeout: config.idle_timeout,
                keepalive_interval: config.keepalive_interval,
                keepalive_timeout: config.keepalive_timeout,
                max_header_list_bytes: config.max_header_list_bytes,
            },
        );
        let http1_pool = Http1Pool::new(
            connector.clone(),
            config.connect_timeout,
            config.idle_timeout,
            config.max_header_list_bytes as usize,
        );
        let (shutdown, _) = watch::channel(false);
        Self {
            inner: Arc::new(Shared {
                config,
                connector,
                pool,
                http1_pool,
                relay: Default::default(),
                dests: Mutex::new(HashMap::new()),
                shutdown,
                limit,
            }),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.inner.config
    }

    /// Client connections being served now, and the most that may be.
    pub fn client_connections(&self) -> (usize, usize) {
        (self.inner.limit.open(), self.inner.limit.max())
    }

    /// The handle to update the endpoints of `dest` (the original ClusterIP:port). Created
    /// empty on first use; connections to a destination without endpoints get UNAVAILABLE.
    pub fn endpoints(&self, dest: SocketAddr) -> EndpointsHandle {
        EndpointsHandle(self.inner.destination(dest))
    }

    /// Forgets a destination (its Service is gone). Connections already served keep their
    /// endpoint set until they close.
    pub fn remove_destination(&self, dest: SocketAddr) {
        match self.inner.dests.lock() {
            Ok(mut d) => d.remove(&dest),
            Err(p) => p.into_inner().remove(&dest),
        };
    }

    /// Live pooled upstream connections to an endpoint.
    pub fn upstream_connections(&self, endpoint: SocketAddr) -> usize {
        self.inner.pool.connections(endpoint) + self.inner.relay.connections(endpoint)
    }

    /// Idle pooled HTTP/1.1 connections to an endpoint.
    pub fn idle_http1_connections(&self, endpoint: SocketAddr) -> usize {
        self.inner.http1_pool.idle(endpoint)
    }

    /// Starts a graceful drain: HTTP/2 clients get GOAWAY, in-flight streams finish, and
    /// `serve_connection` calls return once their connection is done.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Serves one accepted client connection whose original destination was `dest`, until
    /// it closes. Spawn one task per connection. Everything it logs carries a `connection`
    /// span with the destination and, once detected, the protocol (the caller's span, e.g.
    /// the agent's `pod`, encloses it).
    pub async fn serve_connection(
        &self,
        stream: TcpStream,
        dest: SocketAddr,
    ) -> Result<(), ProxyError> {
        let span = tracing::debug_span!("connection", %dest, protocol = tracing::field::Empty);
        self.serve_classified(stream, dest, span.clone())
            .instrument(span)
            .await
    }

    async fn serve_classified(
        &self,
        stream: TcpStream,
        dest: SocketAddr,
        span: tracing::Span,
    ) -> Result<(), ProxyError> {
        let Some(_slot) = self.inner.limit.try_acquire() else {
            return Err(ProxyError::TooManyConnections(self.inner.limit.max()));
        };
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let destination = self.inner.destination(dest);
        let hint = destination.protocol();
        let (mut protocol, prefix) = match hint {
            // The Service said what it carries: no byte is read or waited for here.
            ProtocolHint::Http2 => (Protocol::Http2, bytes::BytesMut::new()),
            ProtocolHint::Opaque => (
                Protocol::Opaque(OpaqueKind::Declared),
                bytes::BytesMut::new(),
            ),
            ProtocolHint::Detect => detect(&mut stream, self.inner.config.detect_timeout)
                .await
                .map_err(ProxyError::Detect)?,
        };
        if protocol == Protocol::Http1 && destination.http1_mode() == Http1Mode::Opaque {
            protocol = Protocol::Opaque(OpaqueKind::Http1);
        }
        m::detection(if hint == ProtocolHint::Http2 {
            "declared_h2"
        } else {
            protocol.label()
        });
        span.record("protocol", protocol.label());
        tracing::debug!("connection classified");
        match protocol {
            Protocol::Http2 => {
                let io = Prefixed::new(prefix, stream);
                let shutdown = self.inner.shutdown.subscribe();
                match self.inner.config.h2_engine {
                    H2Engine::Streams => {
                        h2_server::serve(self.inner.clone(), destination, io, shutdown).await
                    }
                    H2Engine::Relay => {
                        relay::serve(self.inner.clone(), destination, io, shutdown).await
                    }
                }
                .map_err(ProxyError::Http2)
            }
            Protocol::Http1 => {
                let io = Prefixed::new(prefix, stream);
                http1_server::serve(
                    self.inner.clone(),
                    destination,
                    io,
                    self.inner.shutdown.subscribe(),
                )
                .await
                .map_err(|e| {
                    if e.is_parse() || e.is_parse_too_large() {
                        m::abusive_connection(m::AbuseReason::MalformedHttp1);
                    }
                    ProxyError::Http1(e)
                })
            }
            Protocol::Opaque(_) => {
                opaque_relay::relay(&self.inner, &destination, stream, prefix).await;
                Ok(())
            }
        }
    }
}
