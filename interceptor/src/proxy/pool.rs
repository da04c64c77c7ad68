//! Pooled HTTP/2 client connections per endpoint (and proxy worker thread), shared by every
//! client connection of one `Proxy`.
//!
//! A connection is reused until it carries `streams_per_connection` streams (or the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS, if lower); then another is opened, up to
//! `max_connections_per_endpoint`, because one h2 connection is driven by one task and more
//! than one lets an endpoint's traffic use more than one core. Past that cap streams queue
//! inside h2 on the least-loaded connection.
//!
//! Growing the pool never holds up a stream that a live connection could carry (under the
//! peer's own limit): that stream goes on the least-loaded connection at once and the new
//! connection is opened beside it. Under overload the proxy's own slowness would otherwise
//! show up as handshake timeouts, charged to endpoints that are answering fine on the
//! connections they have. For the same reason a connect that times out while the endpoint
//! has live connections is not charged: the streams on those connections speak for it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;

use super::connector::Connector;
use super::endpoint_stats::EndpointStats;
use super::lock;
use super::metrics as m;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to endpoint {addr} failed: {source}; check that the endpoint listens and is reachable from the pod's network namespace")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to endpoint {addr} timed out after {timeout:?}; the endpoint is down or filtered (raise connect_timeout if it is only slow)")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP/2 handshake with endpoint {addr} failed: {source}; the endpoint must accept HTTP/2 with prior knowledge (h2c)")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("HTTP/1.1 handshake with endpoint {addr} failed: {source}")]
    Http1Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("connecting to endpoint {addr} was abandoned: the proxy is shutting down")]
    Abandoned { addr: SocketAddr },
}

impl PoolError {
    /// The failure is this process's or this node's (out of descriptors, memory or ports),
    /// not the endpoint's: it must not count towards ejecting the endpoint.
    pub fn is_local(&self) -> bool {
        match self {
            PoolError::Connect { source, .. } => is_local_error(source),
            _ => false,
        }
    }
}

/// A socket error that says this process or node ran out of something (descriptors, memory,
/// ephemeral ports), whatever the endpoint.
pub fn is_local_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Pool limits and HTTP/2 client settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub streams_per_connection: usize,
    pub max_connections_per_endpoint: usize,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_list_bytes: u32,
}

/// The pool of upstream connections, keyed by endpoint address.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: usize = self
            .inner
            .shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum();
        f.debug_struct("Pool")
            .field("endpoints", &endpoints)
            .finish()
    }
}

struct PoolInner {
    connector: Arc<dyn Connector>,
    cfg: PoolConfig,
    /// By endpoint and proxy worker (`workers::current_index`): each worker thread drives its
    /// own connections, so a stream and its connection never wake each other across threads.
    /// Sharded by worker so that workers never wait for each other's lookups (one per
    /// stream); `SHARDS` shards, worker `i` in shard `i % SHARDS`.
    shards: Box<[Mutex<EndpointMap>]>,
}

type EndpointMap = HashMap<(SocketAddr, usize), Arc<EndpointPool>>;

/// More shards than worker threads a node runs in practice; past that workers share shards
/// (correct, only no longer free of each other's locks).
const SHARDS: usize = 64;

struct EndpointPool {
    conns: Mutex<Vec<Arc<Conn>>>,
    // Serialises connects to one endpoint so a burst of streams opens one connection, not
    // one per stream. Held by the connect task, not by the stream waiting for it.
    connect_lock: Arc<tokio::sync::Mutex<()>>,
    /// Milliseconds since `epoch()` before which no background growth is tried: one failed,
    /// and the endpoint is not to be asked for a connection per stream while it is busy.
    grow_after_ms: AtomicU64,
}

/// Which live connection may take one more stream.
#[derive(Clone, Copy)]
enum Room {
    /// Under `streams_per_connection` and the peer's limit.
    UnderPoolLimit,
    /// Under the peer's SETTINGS_MAX_CONCURRENT_STREAMS (h2 would not queue it).
    UnderPeerLimit,
    /// Any (past the pool's connection cap streams queue inside h2).
    Any,
}

struct Conn {
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    // Shared with the task driving the connection; the task must not hold the SendRequest, or
    // the connection could never close when the pool lets go of it.
    closed: Arc<AtomicBool>,
    last_used_ms: AtomicU64,
    /// Its endpoint was charged for the connection breaking: once, however many streams
    /// the break cut.
    break_charged: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Conn {
    fn limit(&self, soft: usize) -> usize {
        soft.min(self.send.current_max_send_streams()).max(1)
    }

    /// Still usable: not closed, and not idle for longer than `idle_timeout`. `now` is asked
    /// only about a connection without streams, so a busy pool costs no clock read.
    fn keep(&self, now: &mut impl FnMut() -> u64, idle_timeout: Duration) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        self.active.load(Ordering::Relaxed) > 0 || self.idle_for(now()) <= idle_timeout
    }

    fn idle_for(&self, now: u64) -> Duration {
        Duration::from_millis(now.saturating_sub(self.last_used_ms.load(Ordering::Relaxed)))
    }
}

/// One stream's claim on a pooled connection.
pub struct Lease {
    conn: Arc<Conn>,
    send: SendRequest<Bytes>,
}

impl Lease {
    pub fn sender(&mut self) -> &mut SendRequest<Bytes> {
        &mut self.send
    }

    /// Takes the connection out of rotation (it refused new streams or went away).
    pub fn retire(&self) {
        self.conn.closed.store(true, Ordering::Relaxed);
    }

    /// The connection broke under this stream: true for the first stream to say so, whose
    /// attempt charges the endpoint (one break is one failure).
    pub fn first_to_break(&self) -> bool {
        !self.conn.break_charged.swap(true, Ordering::Relaxed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The time matters only once the connection has no streams (`keep`). A reaper that
        // reads the old time between these two lines closes a connection idle for a moment
        // only: harmless, and cheaper than a clock read per stream.
        if self.conn.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn.last_used_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

/// A clock read at most once, when first asked.
fn lazy_now_ms() -> impl FnMut() -> u64 {
    let mut now = None;
    move || *now.get_or_insert_with(now_ms)
}

impl EndpointPool {
    fn new() -> Self {
        Self {
            conns: Mutex::new(Vec::new()),
            connect_lock: Arc::new(tokio::sync::Mutex::new(())),
            grow_after_ms: AtomicU64::new(0),
        }
    }

    fn push(&self, conn: Arc<Conn>) {
        lock(&self.conns).push(conn);
    }

    /// A lease on the least-loaded live connection with `room`, and how many are live.
    fn try_lease(&self, cfg: &PoolConfig, room: Room) -> (Option<Lease>, usize) {
        let mut conns = lock(&self.conns);
        let mut now = lazy_now_ms();
        conns.retain(|c| c.keep(&mut now, cfg.idle_timeout));
        let best = conns
            .iter()
            .filter(|c| {
                let active = c.active.load(Ordering::Relaxed);
                match room {
                    Room::UnderPoolLimit => active < c.limit(cfg.streams_per_connection),
                    Room::UnderPeerLimit => active < c.send.current_max_send_streams(),
                    Room::Any => true,
                }
            })
            .min_by_key(|c| c.active.load(Ordering::Relaxed))
            .cloned();
        let live = conns.len();
        drop(conns);
        (best.map(lease), live)
    }
}

fn lease(conn: Arc<Conn>) -> Lease {
    // No time stamp: a connection with a stream is never idle, and the last lease to end
    // stamps it (`Lease::drop`).
    conn.active.fetch_add(1, Ordering::Relaxed);
    let send = conn.send.clone();
    Lease { conn, send }
}

impl Pool {
    pub fn new(connector: Arc<dyn Connector>, cfg: PoolConfig) -> Self {
        let inner = Arc::new(PoolInner {
            connector,
            cfg,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// A stream slot on a connection to `ep`, connecting if needed.
    ///
    /// A connect runs in its own task and ends on its own terms (connected, refused or timed
    /// out) even when every stream waiting for it gave up at its deadline; `charge` is called
    /// with the failure then. Otherwise an endpoint that accepts TCP and never completes the
    /// HTTP/2 handshake would go uncharged for as long as callers' deadlines are shorter than
    /// `connect_timeout`, and keep its share of calls. A connection nobody waits for any more
    /// stays in the pool for the next stream.
    pub async fn acquire(
        &self,
        ep: &EndpointStats,
        charge: impl FnOnce(&PoolError) + Send + 'static,
    ) -> Result<Lease, PoolError> {
        let addr = ep.addr();
        let cfg = &self.inner.cfg;
        let worker = super::workers::current_index();
        let epool = lock(&self.inner.shards[worker % SHARDS])
            .entry((addr, worker))
            .or_insert_with(|| Arc::new(EndpointPool::new()))
            .clone();
        if let (Some(l), _) = self.lease_without_waiting(&epool, ep) {
            return Ok(l);
        }
        // No live connection could take the stream without h2 queueing it: wait for one.
        let connecting = epool.connect_lock.clone().lock_owned().await;
        // The connect this stream waited behind may have made room (then the pool grows on
        // the next stream's turn, this one holds the lock that growth takes).
        let (found, live) = self.lease_without_waiting(&epool, ep);
        if let Some(l) = found {
            return Ok(l);
        }
        if live >= cfg.max_connections_per_endpoint {
            if let (Some(l), _) = epool.try_lease(cfg, Room::Any) {
                return Ok(l);
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        let label = ep.label();
        tokio::spawn(async move {
            let _connecting = connecting;
            let outcome = pool.connect(addr, label.clone()).await.map(|conn| {
                epool.push(conn.clone());
                lease(conn)
            });
            match &outcome {
                Err(error @ PoolError::Timeout { .. }) if live > 0 => {
                    m::connect_failure(&label);
                    tracing::debug!(endpoint = %addr, %error, "one more connection to a busy endpoint timed out; not charged, its live connections still answer");
                }
                Err(error) => charge(error),
                Ok(_) => {}
            }
            let _ = tx.send(outcome);
        });
        rx.await.unwrap_or(Err(PoolError::Abandoned { addr }))
    }

    /// A lease on a live connection under the pool's limit, else (growing the pool beside
    /// it) on one under the peer's, and how many are live.
    fn lease_without_waiting(
        &self,
        epool: &Arc<EndpointPool>,
        ep: &EndpointStats,
    ) -> (Option<Lease>, usize) {
        let cfg = &self.inner.cfg;
        let (found, live) = epool.try_lease(cfg, Room::UnderPoolLimit);
        if found.is_some() || live == 0 {
            return (found, live);
        }
        if live < cfg.max_connections_per_endpoint {
            self.grow(epool, ep.addr(), ep.label());
        }
        (epool.try_lease(cfg, Room::UnderPeerLimit).0, live)
    }

    /// Opens one more connection to a busy endpoint in the background, unless one is being
    /// opened already or the last such attempt failed within `connect_timeout`. A failure is
    /// not charged (see the module comment) and only delays the next attempt.
    fn grow(&self, epool: &Arc<EndpointPool>, addr: SocketAddr, label: Arc<str>) {
        // No clock read for an endpoint whose growth never failed (asked on every busy stream).
        let after = epool.grow_after_ms.load(Ordering::Relaxed);
        if after != 0 && after > now_ms() {
            return;
        }
        let Ok(connecting) = epool.connect_lock.clone().try_lock_owned() else {
            return;
        };
        let (pool, epool) = (self.clone(), epool.clone());
        tokio::spawn(async move {
            let _connecting = connecting;
            match pool.connect(addr, label.clone()).await {
                Ok(conn) => epool.push(conn),
                Err(error) => {
                    m::connect_failure(&label);
                    let pause = pool.inner.cfg.connect_timeout.as_millis() as u64;
                    epool
                        .grow_after_ms
                        .store(now_ms() + pause.max(1), Ordering::Relaxed);
                    tracing::debug!(endpoint = %addr, %error, "one more connection to a busy endpoint failed; its streams stay on the connections it has");
                }
            }
        });
    }

    async fn connect(&self, addr: SocketAddr, label: Arc<str>) -> Result<Arc<Conn>, PoolError> {
        let cfg = &self.inner.cfg;
        let started = Instant::now();
        let tcp =
            match tokio::time::timeout(cfg.connect_timeout, self.inner.connector.connect(addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(PoolError::Connect { addr, source }),
                Err(_) => {
                    return Err(PoolError::Timeout {
                        addr,
                        timeout: cfg.connect_timeout,
                    })
                }
            };
        let remaining = cfg.connect_timeout.saturating_sub(started.elapsed());
        let handshake = h2::client::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(upstream_connection_window(cfg))
            .max_header_list_size(cfg.max_header_list_bytes)
            .enable_push(false)
            .handshake::<_, Bytes>(tcp);
        let (send, connection) = match tokio::time::timeout(remaining, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(source)) => return Err(PoolError::Handshake { addr, source }),
            Err(_) => {
                return Err(PoolError::Timeout {
                    addr,
                    timeout: cfg.connect_timeout,
                })
            }
        };
        let (send, mut connection) = (send, connection);
        let ping = connection.ping_pong();
        let closed = Arc::new(AtomicBool::new(false));
        let task_closed = closed.clone();
        m::upstream_connections(&label, 1.0);
        let driver = tokio::spawn(async move {
            // Runs also when keepalive aborts this task.
            let _closed = MarkClosed(task_closed, label.clone());
            if let Err(error) = connection.await {
                tracing::debug!(endpoint = %addr, %error, "upstream connection ended with an error");
                if error.is_go_away() && error.is_remote() {
                    if let Some(reason) = error.reason().filter(|r| *r != h2::Reason::NO_ERROR) {
                        m::upstream_goaway(&label, reason);
                    }
                }
            }
        });
        // One PING round trip: the peer's SETTINGS precede its PING ack, so afterwards
        // `current_max_send_streams` is the peer's real limit instead of h2's optimistic
        // default, and a burst of streams spreads over connections instead of queueing.
        let mut ping = ping;
        if let Some(ping) = ping.as_mut() {
            let remaining = cfg.connect_timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(remaining, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(source)) => return Err(PoolError::Handshake { addr, source }),
                Err(_) => {
                    return Err(PoolError::Timeout {
                        addr,
                        timeout: cfg.connect_timeout,
                    })
                }
            }
        }
        if let Some(ping) = ping {
            if !cfg.keepalive_interval.is_zero() {
                tokio::spawn(keepalive(
                    ping,
                    addr,
                    closed.clone(),
                    driver.abort_handle(),
                    cfg.keepalive_interval,
                    cfg.keepalive_timeout,
                ));
            }
        }
        tracing::debug!(endpoint = %addr, "upstream connection established");
        Ok(Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            closed,
            last_used_ms: AtomicU64::new(now_ms()),
            break_charged: AtomicBool::new(false),
        }))
    }

    /// Forgets every pooled connection to `addr` (the endpoint was removed). Streams holding
    /// a lease finish; each connection closes once its last stream is done.
    pub fn retire_endpoint(&self, addr: SocketAddr) {
        let mut removed = false;
        for shard in self.inner.shards.iter() {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|(a, _), _| *a != addr);
            removed |= map.len() != before;
        }
        if removed {
            tracing::debug!(endpoint = %addr, "endpoint removed; its pooled connections drain and close");
        }
    }

    /// Live pooled connections to `addr` (for tests and the admin API).
    pub fn connections(&self, addr: SocketAddr) -> usize {
        let pools: Vec<Arc<EndpointPool>> = self
            .inner
            .shards
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .iter()
                    .filter(|((a, _), _)| *a == addr)
                    .map(|(_, e)| e.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        pools
            .iter()
            .map(|e| match e.conns.lock() {
                Ok(c) => c
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Relaxed))
                    .count(),
                Err(_) => 0,
            })
            .sum()
    }
}

/// The receive window of a pooled connection: room for every stream it carries to hold a
/// full stream window. A response is read from the endpoint only as fast as its client takes
/// it, so the bytes of a client that stops reading stay unreleased in the connection window;
/// with less room, a dozen stalled clients would freeze every stream sharing the connection.
/// The price: what stalled readers can pin grows from one connection window to one stream
/// window per stalled stream (256 KiB by default; 25 MiB per connection, 100 MiB per endpoint
/// and pod at worst), released when their streams end or hit the stream idle timeout. (The
/// guarantee holds up to `streams_per_connection` streams per connection; past
/// `max_connections_per_endpoint` connections the pool oversubscribes them.)
fn upstream_connection_window(cfg: &PoolConfig) -> u32 {
    const MAX_WINDOW: u64 = (1 << 31) - 1;
    let room = cfg.stream_window as u64 * cfg.streams_per_connection.max(1) as u64;
    room.max(cfg.connection_window as u64).min(MAX_WINDOW) as u32
}

/// Closes idle connections (including those to endpoints no destination uses any more).
async fn reap(pool: Weak<PoolInner>) {
    let period = match pool.upgrade() {
        Some(p) => (p.cfg.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(p) = pool.upgrade() else { return };
        for shard in p.shards.iter() {
            lock(shard).retain(|_, e| e.prune(&p.cfg) > 0 || e.connect_lock.try_lock().is_err());
        }
    }
}

impl EndpointPool {
    /// Drops closed and long-idle connections; returns how many remain.
    fn prune(&self, cfg: &PoolConfig) -> usize {
        let mut conns = lock(&self.conns);
        let mut now = lazy_now_ms();
        conns.retain(|c| c.keep(&mut now, cfg.idle_timeout));
        conns.len()
    }
}

/// Marks a pooled connection closed and updates the gauge when its driver task ends.
struct MarkClosed(Arc<AtomicBool>, Arc<str>);

impl Drop for MarkClosed {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        m::upstream_connections(&self.1, -1.0);
    }
}

/// PINGs an upstream connection every `interval`; when one is not answered within `timeout`
/// the connection leaves the pool and is closed (streams still on it fail), so new streams
/// stop queueing on a peer that went silent. Ends with the connection.
async fn keepalive(
    mut ping: h2::PingPong,
    addr: SocketAddr,
    closed: Arc<AtomicBool>,
    driver: tokio::task::AbortHandle,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        if closed.load(Ordering::Relaxed) || driver.is_finished() {
            return;
        }
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection is gone or closing: its driver task handles that.
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!(endpoint = %addr, timeout_ms = timeout.as_millis() as u64, "endpoint did not answer a keepalive PING; closing the connection");
                closed.store(true, Ordering::Relaxed);
                driver.abort();
                return;
            }
        }
    }
}
