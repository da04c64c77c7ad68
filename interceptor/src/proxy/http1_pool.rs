//! Pooled HTTP/1.1 connections per endpoint (and proxy worker thread), shared by every client
//! connection of one `Proxy`.
//!
//! An HTTP/1.1 connection carries one request at a time, so the pool holds idle connections
//! only: a request takes one (or opens one) and gives it back when its response has been read
//! to the end. A connection the endpoint closed, or one idle past `idle_timeout`, is dropped
//! on the next checkout or by the reaper. The number of connections to an endpoint follows
//! the requests in flight to it; what bounds them is the client connections, each of which
//! has at most one request in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::connector::Connector;
use super::http1_body::UpstreamBody;
use super::lock;
use super::metrics as m;
use super::pool::PoolError;

/// Idle connections kept per endpoint and worker; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// The HTTP/1.1 pool of one proxy. Cheap to clone.
#[derive(Clone)]
pub struct Http1Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints = lock(&self.inner.idle).len();
        f.debug_struct("Http1Pool")
            .field("endpoints", &endpoints)
            .finish()
    }
}

struct Inner {
    connector: Arc<dyn Connector>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    /// By endpoint and proxy worker (see `Pool`): a request and its connection are driven by
    /// the same thread.
    idle: Mutex<HashMap<(SocketAddr, usize), Vec<Idle>>>,
}

struct Idle {
    send: SendRequest<UpstreamBody>,
    since: Instant,
}

/// A connection checked out for one request. Give it back with [`Http1Pool::give_back`] once
/// the response has been read to its end; dropping it closes the connection.
pub struct Checkout {
    send: SendRequest<UpstreamBody>,
    /// Taken from the pool (the endpoint may have closed it meanwhile), not new.
    pub reused: bool,
    addr: SocketAddr,
    worker: usize,
}

impl Checkout {
    pub fn send(&mut self) -> &mut SendRequest<UpstreamBody> {
        &mut self.send
    }
}

impl Http1Pool {
    /// Starts the idle reaper on the current runtime; it ends when the pool is dropped.
    pub fn new(
        connector: Arc<dyn Connector>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_header_bytes: usize,
    ) -> Self {
        let inner = Arc::new(Inner {
            connector,
            connect_timeout,
            idle_timeout,
            max_header_bytes,
            idle: Mutex::new(HashMap::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// An idle connection to `addr` that is still open, or a new one.
    pub async fn checkout(
        &self,
        addr: SocketAddr,
        label: &Arc<str>,
    ) -> Result<Checkout, PoolError> {
        let worker = super::workers::current_index();
        while let Some(mut idle) = self.pop(addr, worker) {
            if idle.send.is_closed() || idle.since.elapsed() > self.inner.idle_timeout {
                continue;
            }
            // A connection given back the moment its response ended may still be finishing
            // that message inside hyper: wait for it to take a request (at once, normally).
            let ready = tokio::time::timeout(self.inner.connect_timeout, idle.send.ready());
            if !matches!(ready.await, Ok(Ok(()))) {
                continue;
            }
            return Ok(Checkout {
                send: idle.send,
                reused: true,
                addr,
                worker,
            });
        }
        self.connect(addr, label.clone()).await
    }

    /// Returns a connection whose last response was read to its end. One the endpoint asked
    /// to close (`Connection: close`) is closed by hyper and never comes back here as ready.
    pub fn give_back(&self, c: Checkout) {
        if c.send.is_closed() {
            return;
        }
        let Checkout {
            send, addr, worker, ..
        } = c;
        let key = (addr, worker);
        let mut idle = lock(&self.inner.idle);
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections to `addr` (all workers), for tests and the admin API.
    pub fn idle(&self, addr: SocketAddr) -> usize {
        lock(&self.inner.idle)
            .iter()
            .filter(|((a, _), _)| *a == addr)
            .map(|(_, l)| l.iter().filter(|i| !i.send.is_closed()).count())
            .sum()
    }

    /// Closes the idle connections to an endpoint that left its Service.
    pub fn retire_endpoint(&self, addr: SocketAddr) {
        lock(&self.inner.idle).retain(|(a, _), _| *a != addr);
    }

    fn pop(&self, addr: SocketAddr, worker: usize) -> Option<Idle> {
        // Most recently used first: it is the least likely to have been closed by the
        // endpoint's own keep-alive timeout.
        lock(&self.inner.idle).get_mut(&(addr, worker))?.pop()
    }

    /// A new connection of its own, outside the pool (an upgrade takes it over for good).
    pub async fn connect(&self, addr: SocketAddr, label: Arc<str>) -> Result<Checkout, PoolError> {
        let timeout = self.inner.connect_timeout;
        let stream = match tokio::time::timeout(timeout, self.inner.connector.connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(PoolError::Connect { addr, source }),
            Err(_) => return Err(PoolError::Timeout { addr, timeout }),
        };
        let (send, conn) = http1::Builder::new()
            .max_buf_size(self.inner.max_header_bytes.max(8192))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Http1Handshake { addr, source })?;
        m::upstream_connections_of(&label, m::RequestProtocol::Http1, 1.0);
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, %error, "upstream HTTP/1.1 connection ended");
            }
            m::upstream_connections_of(&label, m::RequestProtocol::Http1, -1.0);
        });
        Ok(Checkout {
            send,
            reused: false,
            addr,
            worker: super::workers::current_index(),
        })
    }
}

async fn reap(pool: Weak<Inner>) {
    loop {
        let period = match pool.upgrade() {
            Some(p) => (p.idle_timeout / 2).max(Duration::from_secs(1)),
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(p) = pool.upgrade() else { return };
        let timeout = p.idle_timeout;
        lock(&p.idle).retain(|_, list| {
            list.retain(|i| !i.send.is_closed() && i.since.elapsed() <= timeout);
            !list.is_empty()
        });
    }
}
