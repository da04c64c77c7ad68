//! The proxy instance the agent talks to: destinations, the shared upstream pool, and the
//! entry point for accepted connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::balancer::EjectPolicy;
use super::config::ProxyConfig;
use super::connector::Connector;
use super::detect::{detect, Prefixed, Protocol};
use super::endpoints::{Destination, EndpointsHandle};
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
    connections: AtomicUsize,
    max_connections: usize,
    last_reject_warning_ms: AtomicU64,
    started: Instant,
}

/// One client connection's place under `max_client_connections`.
struct ConnectionSlot<'a>(&'a AtomicUsize);

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Half the soft RLIMIT_NOFILE, less a reserve for listeners, pins and the admin server: a
/// client connection can need an upstream socket too (opaque relays, new pool connections).
fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and has no other effects.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !ok || lim.rlim_cur == libc::RLIM_INFINITY {
        return 1 << 20;
    }
    ((lim.rlim_cur as usize) / 2).saturating_sub(64).max(16)
}

impl Inner {
    pub(crate) fn eject_policy(&self) -> EjectPolicy {
        EjectPolicy {
            after_failures: self.config.eject_after_failures,
            base: self.config.eject_base,
            max: self.config.eject_max,
        }
    }

    fn connection_slot(&self) -> Result<ConnectionSlot<'_>, ProxyError> {
        let open = self.connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(&self.connections);
        if open < self.max_connections {
            return Ok(slot);
        }
        m::rejected_connection();
        // One warning a second at most: a flood of connections must not become a flood of logs.
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_reject_warning_ms.load(Ordering::Relaxed);
        // 0: never warned yet.
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last_reject_warning_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(max = self.max_connections, "client connection limit reached; closing new connections at accept (raise RLIMIT_NOFILE or max_client_connections)");
        }
        Err(ProxyError::TooManyConnections(self.max_connections))
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
        let max_connections = config
            .max_client_connections
            .unwrap_or_else(default_max_connections);
        tracing::debug!(max_client_connections = max_connections, "client connection limit");
        Self {
            inner: Arc::new(Inner {
                config,
                connector,
                pool,
                dests: Mutex::new(HashMap::new()),
                shutdown,
                connections: AtomicUsize::new(0),
                max_connections,
                last_reject_warning_ms: AtomicU64::new(0),
                started: Instant::now(),
            }),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.inner.config
    }

    /// Client connections being served now, and the most that may be.
    pub fn client_connections(&self) -> (usize, usize) {
        (
            self.inner.connections.load(Ordering::Relaxed),
            self.inner.max_connections,
        )
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
        let _slot = self.inner.connection_slot()?;
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let destination = self.inner.destination(dest);
        let (protocol, prefix) = detect(&mut stream, self.inner.config.detect_timeout)
            .await
            .map_err(ProxyError::Detect)?;
        m::detection(protocol.label());
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
