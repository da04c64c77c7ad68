//! The endpoints of one destination (a Service's ClusterIP:port), replaceable at run time,
//! with what discovery says about it (labels, protocol, affinity, slow start).
//!
//! An update swaps the whole set atomically: the next stream sees it, streams already on a
//! removed endpoint finish on their pooled connection, and statistics of endpoints that stay
//! are carried over so an update does not reset what the balancer has learnt.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::balancer::{Balancer, Endpoint};
use super::config::BalancerKind;
use super::detect::{Http1Mode, ProtocolHint};
use super::endpoint_stats::{EjectPolicy, EndpointStats};
use super::http1_pool::Http1Pool;
use super::metrics::{ServiceLabels, ServiceMetrics};
use super::pool::Pool;
use super::{EndpointSpec, EndpointState};

/// Balancing state of one destination.
#[derive(Debug)]
pub struct Destination {
    addr: SocketAddr,
    decay: Duration,
    default_rtt: Duration,
    set: RwLock<Arc<Vec<Endpoint>>>,
    pool: Option<Pool>,
    http1_pool: Option<Http1Pool>,
    /// Serialises ejection decisions, so concurrent failures cannot together eject past the
    /// bound (failures only: the success path never takes it).
    ejecting: Mutex<()>,
    /// Metric handles under the destination's Service labels, fixed on first use.
    metrics: std::sync::OnceLock<Arc<ServiceMetrics>>,
    /// What the Service port's appProtocol says (a `ProtocolHint` as u8).
    protocol: std::sync::atomic::AtomicU8,
    /// Whether HTTP/1.x is balanced per request (0) or relayed opaquely (1).
    http1_opaque: std::sync::atomic::AtomicBool,
    /// How its endpoints are chosen (kind, slow start, session affinity).
    balancer: Balancer,
}

/// What discovery says about a destination besides its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationSettings {
    pub labels: ServiceLabels,
    pub protocol: ProtocolHint,
    /// How HTTP/1.x connections are served.
    pub http1: Http1Mode,
    /// sessionAffinity ClientIP with this timeout (since the last stream), or none.
    pub affinity: Option<Duration>,
    /// Slow start window for endpoints that join, or none.
    pub slow_start: Option<Duration>,
}

impl Destination {
    pub(crate) fn new(
        addr: SocketAddr,
        kind: BalancerKind,
        decay: Duration,
        default_rtt: Duration,
    ) -> Self {
        Self {
            addr,
            decay,
            default_rtt,
            set: RwLock::new(Arc::new(Vec::new())),
            pool: None,
            http1_pool: None,
            ejecting: Mutex::new(()),
            metrics: std::sync::OnceLock::new(),
            protocol: std::sync::atomic::AtomicU8::new(0),
            http1_opaque: std::sync::atomic::AtomicBool::new(false),
            balancer: Balancer::new(kind),
        }
    }

    /// Slow start (the Service's interceptor.io/slow-start annotation): an endpoint that joins
    /// takes a share growing linearly from 10% to a full one over `window`.
    pub fn set_slow_start(&self, window: Option<Duration>) {
        self.balancer.set_slow_start(window);
    }

    /// sessionAffinity ClientIP with `timeout`, or none. A changed timeout keeps the current
    /// sticky endpoint.
    pub fn set_affinity(&self, timeout: Option<Duration>) {
        self.balancer.set_affinity(timeout);
    }

    /// Takes effect for the next accepted connection.
    pub fn set_protocol(&self, hint: ProtocolHint) {
        let v = match hint {
            ProtocolHint::Detect => 0,
            ProtocolHint::Http2 => 1,
            ProtocolHint::Opaque => 2,
        };
        self.protocol.store(v, Ordering::Relaxed);
    }

    /// Takes effect for the next accepted connection.
    pub fn set_http1_mode(&self, mode: Http1Mode) {
        self.http1_opaque
            .store(mode == Http1Mode::Opaque, Ordering::Relaxed);
    }

    pub fn http1_mode(&self) -> Http1Mode {
        if self.http1_opaque.load(Ordering::Relaxed) {
            Http1Mode::Opaque
        } else {
            Http1Mode::PerRequest
        }
    }

    pub fn protocol(&self) -> ProtocolHint {
        match self.protocol.load(Ordering::Relaxed) {
            1 => ProtocolHint::Http2,
            2 => ProtocolHint::Opaque,
            _ => ProtocolHint::Detect,
        }
    }

    /// Names the Service this destination belongs to, for its metrics. Takes effect only
    /// before the first stream: a destination's labels never change (a Service that goes away
    /// takes its destination with it).
    pub fn describe(&self, labels: ServiceLabels) {
        if self.metrics.get().is_some_and(|m| *m.labels() != labels) {
            tracing::debug!(dest = %self.addr, "destination already has its metric labels");
            return;
        }
        let _ = self.metrics.set(Arc::new(ServiceMetrics::new(labels)));
    }

    /// The destination's metric handles (labelled with its address if no Service named it).
    pub(crate) fn metrics(&self) -> &Arc<ServiceMetrics> {
        self.metrics
            .get_or_init(|| Arc::new(ServiceMetrics::new(ServiceLabels::unnamed(self.addr))))
    }

    /// Lets updates release pooled connections of removed endpoints.
    pub(crate) fn with_pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// As `with_pool`, for the HTTP/1.1 pool.
    pub(crate) fn with_http1_pool(mut self, pool: Http1Pool) -> Self {
        self.http1_pool = Some(pool);
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn current(&self) -> Arc<Vec<Endpoint>> {
        match self.set.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the endpoint set. Duplicate addresses keep their first entry.
    pub fn update(&self, specs: impl IntoIterator<Item = EndpointSpec>) {
        let old = self.current();
        let now = Instant::now();
        let measured: Vec<f64> = old
            .iter()
            .filter(|e| e.state == EndpointState::Ready)
            .map(|e| e.stats.rtt_ns(now))
            .collect();
        // A new endpoint starts at its peers' mean latency: lower would flood it with every
        // p2c comparison it enters, higher would starve it until the estimate decays.
        let seed = if measured.is_empty() {
            self.default_rtt
        } else {
            Duration::from_nanos((measured.iter().sum::<f64>() / measured.len() as f64) as u64)
        };
        let mut next: Vec<Endpoint> = Vec::new();
        for spec in specs {
            if next.iter().any(|e| e.stats.addr() == spec.addr) {
                continue;
            }
            let (stats, joined) = match old.iter().find(|e| e.stats.addr() == spec.addr) {
                Some(e) => (e.stats.clone(), e.joined),
                None => (
                    Arc::new(EndpointStats::new(spec.addr, seed, self.decay)),
                    (!old.is_empty()).then_some(now),
                ),
            };
            next.push(Endpoint {
                state: spec.state,
                stats,
                joined,
            });
        }
        tracing::debug!(dest = %self.addr, endpoints = next.len(), "endpoint set updated");
        let next = Arc::new(next);
        match self.set.write() {
            Ok(mut s) => *s = next.clone(),
            Err(poisoned) => *poisoned.into_inner() = next.clone(),
        }
        // Pooled connections to removed endpoints leave the pool now; streams still on them
        // finish, then h2 closes the connection. (Another destination sharing the endpoint
        // just reconnects.)
        for gone in old
            .iter()
            .filter(|o| !next.iter().any(|n| n.stats.addr() == o.stats.addr()))
        {
            if let Some(pool) = &self.pool {
                pool.retire_endpoint(gone.stats.addr());
            }
            if let Some(pool) = &self.http1_pool {
                pool.retire_endpoint(gone.stats.addr());
            }
        }
    }

    /// The current set as specs.
    pub fn snapshot(&self) -> Vec<EndpointSpec> {
        self.current()
            .iter()
            .map(|e| EndpointSpec {
                addr: e.stats.addr(),
                state: e.state,
            })
            .collect()
    }

    /// Statistics of a current endpoint (for tests and the admin API).
    pub fn stats(&self, addr: SocketAddr) -> Option<Arc<EndpointStats>> {
        self.current()
            .iter()
            .find(|e| e.stats.addr() == addr)
            .map(|e| e.stats.clone())
    }

    /// Charges `ep` with a failure (connect, handshake, broken connection, no answer in
    /// time). Ejection stays relative and bounded: only while another endpoint of this
    /// destination is not failing (when all fail, the cause is elsewhere: the network, this
    /// node, a bad request), and never past `max_percent` of the set, so a lone endpoint is
    /// never ejected.
    pub fn record_failure(
        &self,
        ep: &EndpointStats,
        policy: &EjectPolicy,
        max_percent: u32,
        why: &'static str,
    ) -> bool {
        let _deciding = match self.ejecting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        ep.record_failure(policy, why, || self.may_eject(ep, max_percent))
    }

    /// The endpoint asked for a pause (grpc-retry-pushback-ms): out of rotation for `d`, within
    /// the same bound as ejection. Returns whether it was taken out.
    pub fn push_back(&self, ep: &EndpointStats, max_percent: u32, d: Duration) -> bool {
        let _deciding = match self.ejecting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if ep.is_ejected() || !self.may_eject(ep, max_percent) {
            return false;
        }
        ep.eject_for(d);
        true
    }

    /// Whether taking `ep` out keeps ejection relative (a peer is answering) and bounded.
    fn may_eject(&self, ep: &EndpointStats, max_percent: u32) -> bool {
        let set = self.current();
        let ejected = set.iter().filter(|e| e.stats.is_ejected()).count();
        let allowed = set.len() * max_percent.min(100) as usize / 100;
        let peer_healthy = set.iter().any(|e| {
            e.stats.addr() != ep.addr()
                && e.state != EndpointState::NotReady
                && !e.stats.is_ejected()
                && e.stats.is_healthy()
        });
        ejected < allowed && peer_healthy
    }

    /// Whether `pick(exclude)` would find an endpoint.
    pub fn any_usable(&self, exclude: &[SocketAddr]) -> bool {
        self.current().iter().any(|e| {
            e.state != EndpointState::NotReady
                && !e.stats.is_ejected()
                && !exclude.contains(&e.stats.addr())
        })
    }

    /// Chooses an endpoint for a new stream, skipping `exclude` (endpoints this stream already
    /// failed on): see [`Balancer::pick`].
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<EndpointStats>> {
        self.balancer.pick(&self.current(), exclude)
    }
}

/// Handle through which discovery replaces a destination's endpoints.
#[derive(Debug, Clone)]
pub struct EndpointsHandle(pub(crate) Arc<Destination>);

impl EndpointsHandle {
    /// Names the destination's Service for its metrics (before its first stream).
    pub fn describe(&self, labels: ServiceLabels) {
        self.0.describe(labels)
    }

    /// What the Service port's appProtocol says the connections carry.
    pub fn set_protocol(&self, hint: ProtocolHint) {
        self.0.set_protocol(hint)
    }

    /// Whether HTTP/1.x is balanced per request or relayed opaquely.
    pub fn set_http1_mode(&self, mode: Http1Mode) {
        self.0.set_http1_mode(mode)
    }

    /// Applies what discovery says about the destination (labels before its first stream).
    pub fn configure(&self, s: &DestinationSettings) {
        self.0.describe(s.labels.clone());
        self.0.set_protocol(s.protocol);
        self.0.set_http1_mode(s.http1);
        self.0.set_affinity(s.affinity);
        self.0.set_slow_start(s.slow_start);
    }

    /// Slow start for endpoints that join from now on (see `Destination::set_slow_start`).
    pub fn set_slow_start(&self, window: Option<Duration>) {
        self.0.set_slow_start(window)
    }

    /// Replaces the endpoint set; the next stream sees the update.
    pub fn update(&self, specs: impl IntoIterator<Item = EndpointSpec>) {
        self.0.update(specs)
    }

    /// Replaces the set with these addresses, all ready.
    pub fn set_ready(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        self.0.update(addrs.into_iter().map(EndpointSpec::ready))
    }

    /// Changes the state of one endpoint (e.g. to `Terminating`); false if it is not in the set.
    pub fn set_state(&self, addr: SocketAddr, state: EndpointState) -> bool {
        let mut specs = self.0.snapshot();
        let mut found = false;
        for s in specs.iter_mut().filter(|s| s.addr == addr) {
            s.state = state;
            found = true;
        }
        if found {
            self.0.update(specs);
        }
        found
    }

    pub fn snapshot(&self) -> Vec<EndpointSpec> {
        self.0.snapshot()
    }

    pub fn destination(&self) -> &Arc<Destination> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn session_affinity_sticks_moves_when_its_endpoint_goes_and_expires() {
        let d = Destination::new(
            addr(1),
            BalancerKind::RoundRobin,
            Duration::from_secs(1),
            Duration::from_millis(1),
        );
        d.update([10, 11, 12].map(|p| EndpointSpec::ready(addr(p))));
        d.set_affinity(Some(Duration::from_millis(200)));
        let first = d.pick(&[]).expect("an endpoint").addr();
        for _ in 0..20 {
            assert_eq!(d.pick(&[]).expect("an endpoint").addr(), first, "sticks");
        }
        // A stream that failed on it may try another, for itself only.
        let other = d.pick(&[first]).expect("another").addr();
        assert_ne!(other, first);
        assert_eq!(d.pick(&[]).expect("an endpoint").addr(), first);
        // Its endpoint leaves: the next pick moves, and sticks again.
        d.update(
            [10, 11, 12]
                .map(|p| EndpointSpec::ready(addr(p)))
                .into_iter()
                .filter(|e| e.addr != first),
        );
        let moved = d.pick(&[]).expect("an endpoint").addr();
        assert_ne!(moved, first);
        assert_eq!(d.pick(&[]).expect("an endpoint").addr(), moved);
        // Idle past the timeout: chosen anew (round robin moves on).
        std::thread::sleep(Duration::from_millis(250));
        let after = d.pick(&[]).expect("an endpoint").addr();
        assert_eq!(d.pick(&[]).expect("an endpoint").addr(), after);
        // Off again: balanced.
        d.set_affinity(None);
        let picks: std::collections::BTreeSet<SocketAddr> = (0..4)
            .map(|_| d.pick(&[]).expect("an endpoint").addr())
            .collect();
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn round_robin_rotates_and_skips_not_ready() {
        let d = Destination::new(
            addr(1),
            BalancerKind::RoundRobin,
            Duration::from_secs(1),
            Duration::from_millis(1),
        );
        d.update([
            EndpointSpec::ready(addr(10)),
            EndpointSpec {
                addr: addr(11),
                state: EndpointState::NotReady,
            },
            EndpointSpec::ready(addr(12)),
        ]);
        let picks: Vec<u16> = (0..4)
            .map(|_| d.pick(&[]).expect("an endpoint").addr().port())
            .collect();
        assert_eq!(picks, vec![10, 12, 10, 12]);
    }

    #[test]
    fn terminating_used_only_without_ready() {
        let d = Destination::new(
            addr(1),
            BalancerKind::P2c,
            Duration::from_secs(1),
            Duration::from_millis(1),
        );
        d.update([
            EndpointSpec {
                addr: addr(10),
                state: EndpointState::Terminating,
            },
            EndpointSpec::ready(addr(11)),
        ]);
        for _ in 0..50 {
            assert_eq!(d.pick(&[]).expect("an endpoint").addr(), addr(11));
        }
        assert_eq!(d.pick(&[addr(11)]).expect("fallback").addr(), addr(10));
        assert!(d.pick(&[addr(10), addr(11)]).is_none());
    }

    #[test]
    fn update_keeps_stats_of_remaining_endpoints() {
        let d = Destination::new(
            addr(1),
            BalancerKind::P2c,
            Duration::from_secs(1),
            Duration::from_millis(1),
        );
        d.update([EndpointSpec::ready(addr(10))]);
        let before = d.stats(addr(10)).expect("stats");
        d.update([EndpointSpec::ready(addr(10)), EndpointSpec::ready(addr(11))]);
        let after = d.stats(addr(10)).expect("stats");
        assert!(Arc::ptr_eq(&before, &after));
    }
}
