//! The proxy instance the agent talks to: destinations, the shared upstream pool, and the
//! entry point for accepted connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::balancer::EjectPolicy;
use super::config::ProxyConfig;
use super::connector::Connector;
use super::detect::{detect, OpaqueKind, Prefixed, Protocol, ProtocolHint};
use super::endpoints::{Destination, EndpointsHandle};
use super::limit::ConnectionLimit;
use super::metrics as m;
use super::pool::{Pool, PoolConfig};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("reading the first bytes of the client connection failed: {0}")]
    Detect(#[source] std::io::Error),
    #[error("HTTP/2 connection with the client failed: {0}")]
    Http2(#[source] h2::Error),
    #[error("{0} client connections are open (max_client_connections); closed this one at accept")]
    TooManyConnections(usize),
}

/// One proxy: destinations by original destination address, and one upstream pool shared
/// by all client connections. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ProxyConfig,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) pool: Pool,
    dests: Mutex<HashMap<SocketAddr, Arc<Destination>>>,
    shutdown: watch::Sender<bool>,
    limit: Arc<ConnectionLimit>,
}

impl Inner {
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
                    .with_pool(self.pool.clone()),
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
        let (shutdown, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                config,
                connector,
                pool,
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
        self.inner.pool.connections(endpoint)
    }

    /// Starts a graceful drain: HTTP/2 clients get GOAWAY, in-flight streams finish, and
    /// `serve_connection` calls return once their connection is done.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Serves one accepted client connection whose original destination was `dest`, until
    /// it closes. Spawn one task per connection.
    pub async fn serve_connection(
        &self,
        stream: TcpStream,
        dest: SocketAddr,
    ) -> Result<(), ProxyError> {
        let Some(_slot) = self.inner.limit.try_acquire() else {
            return Err(ProxyError::TooManyConnections(self.inner.limit.max()));
        };
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let destination = self.inner.destination(dest);
        let hint = destination.protocol();
        let (protocol, prefix) = match hint {
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
        m::detection(if hint == ProtocolHint::Http2 {
            "declared_h2"
        } else {
            protocol.label()
        });
        tracing::debug!(dest = %dest, protocol = protocol.label(), "connection classified");
        match protocol {
            Protocol::Http2 => {
                let io = Prefixed::new(prefix, stream);
                super::demux::serve(
                    self.inner.clone(),
                    destination,
                    io,
                    self.inner.shutdown.subscribe(),
                )
                .await
                .map_err(ProxyError::Http2)
            }
            Protocol::Opaque(_) => {
                super::opaque::relay(&self.inner, &destination, stream, prefix).await;
                Ok(())
            }
        }
    }
}
