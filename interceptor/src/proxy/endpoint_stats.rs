//! What the balancer knows of one endpoint: its peak-EWMA latency estimate, streams in
//! flight, consecutive failures and ejection. The estimate decays towards zero while an
//! endpoint gets no samples, so an endpoint that was penalised once is probed again instead
//! of starving. Kept across endpoint set updates.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics as m;

/// Load statistics and health of one endpoint, kept across EndpointSet updates.
#[derive(Debug)]
pub struct EndpointStats {
    addr: SocketAddr,
    label: Arc<str>,
    in_flight: AtomicU64,
    ewma: Mutex<Ewma>,
    decay_ns: f64,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch()` until which the endpoint takes no new streams.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Has answered at least once: only such a peer shows that failures are the endpoint's.
    proven: AtomicBool,
    /// Its request counters in its destination's Service (the stats are per destination).
    requests: std::sync::OnceLock<m::EndpointRequests>,
    http1_requests: std::sync::OnceLock<m::EndpointRequests>,
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    cost_ns: f64,
    stamp: Instant,
}

/// What a failed answer weighs in the latency estimate (it decays like any sample).
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Ejection policy, copied from the proxy config.
#[derive(Debug, Clone, Copy)]
pub struct EjectPolicy {
    pub after_failures: u32,
    pub base: Duration,
    pub max: Duration,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl EndpointStats {
    /// `seed` is the initial latency estimate: for an endpoint added to a live set it is the
    /// mean of its peers, so it is neither preferred over them (flood) nor avoided (starve).
    pub fn new(addr: SocketAddr, seed: Duration, decay: Duration) -> Self {
        Self {
            addr,
            label: Arc::from(addr.to_string()),
            in_flight: AtomicU64::new(0),
            ewma: Mutex::new(Ewma {
                cost_ns: seed.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            decay_ns: decay.as_nanos().max(1) as f64,
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            proven: AtomicBool::new(false),
            requests: std::sync::OnceLock::new(),
            http1_requests: std::sync::OnceLock::new(),
        }
    }

    /// Its request counters, labelled with `service` (its destination's Service) on first use.
    pub(crate) fn requests(&self, service: &m::ServiceMetrics) -> &m::EndpointRequests {
        self.requests.get_or_init(|| {
            m::EndpointRequests::new(
                service.labels(),
                self.label.clone(),
                m::RequestProtocol::Http2,
            )
        })
    }

    /// Its HTTP/1.1 request counters (see `requests`).
    pub(crate) fn http1_requests(&self, service: &m::ServiceMetrics) -> &m::EndpointRequests {
        self.http1_requests.get_or_init(|| {
            m::EndpointRequests::new(
                service.labels(),
                self.label.clone(),
                m::RequestProtocol::Http1,
            )
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint as a metrics label value (allocated once).
    pub fn label(&self) -> Arc<str> {
        self.label.clone()
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a stream (or opaque connection) as in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The decayed latency estimate in nanoseconds.
    pub fn rtt_ns(&self, now: Instant) -> f64 {
        match self.ewma.lock() {
            Ok(e) => decayed(&e, now, self.decay_ns),
            Err(_) => 0.0,
        }
    }

    /// What p2c compares.
    pub fn load(&self, now: Instant) -> Load {
        Load {
            rtt_ns: self.rtt_ns(now),
            in_flight: self.in_flight(),
        }
    }

    /// Records a latency sample (time to response headers).
    pub fn observe_rtt(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt_ns = rtt.as_nanos() as f64;
        if let Ok(mut e) = self.ewma.lock() {
            let prev = decayed(&e, now, self.decay_ns);
            // Peak sensitivity: a slower sample is believed at once, a faster one gradually.
            e.cost_ns = if rtt_ns > prev {
                rtt_ns
            } else {
                let elapsed = now.saturating_duration_since(e.stamp).as_nanos() as f64;
                // Time-weighted as in Finagle, but every faster sample moves the estimate by
                // at least MIN_DOWN_WEIGHT: at thousands of samples a second the pure time
                // weight is ~0 and one spike would pin the estimate for a whole decay period.
                let w = (-elapsed / self.decay_ns).exp().min(1.0 - MIN_DOWN_WEIGHT);
                prev * w + rtt_ns * (1.0 - w)
            };
            e.stamp = now;
        }
    }

    /// A failed answer: counted in the latency estimate as a slow one, so that p2c steers
    /// away from an endpoint that fails fast, until the estimate decays and it is probed again.
    pub fn observe_failure(&self) {
        self.observe_rtt(FAILURE_PENALTY);
    }

    /// Takes the endpoint out of rotation for `d` (its own request: grpc-retry-pushback-ms).
    pub fn eject_for(&self, d: Duration) {
        self.ejected_until_ms
            .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
        self.proven.store(false, Ordering::Relaxed);
        m::ejection(&self.label);
        tracing::info!(endpoint = %self.addr, pushback_ms = d.as_millis() as u64, "endpoint asked for a pause (grpc-retry-pushback-ms): out of rotation");
    }

    pub fn is_ejected(&self) -> bool {
        // Asked for every endpoint on every pick: one never ejected costs no clock read.
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > now_ms()
    }

    /// Answered at least once and has not failed since.
    pub fn is_healthy(&self) -> bool {
        self.proven.load(Ordering::Relaxed) && self.consecutive_failures() == 0
    }

    pub fn record_success(&self) {
        if !self.proven.load(Ordering::Relaxed) {
            self.proven.store(true, Ordering::Relaxed);
        }
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 && !self.is_ejected() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Records a failure the endpoint is to blame for; returns true when this ejected it.
    /// `may_eject` is asked only when the failure count reaches the policy's threshold: the
    /// destination answers whether ejecting one more of its endpoints stays within bounds.
    /// `why`: what the last failure was, for the log line an ejection writes.
    pub fn record_failure(
        &self,
        policy: &EjectPolicy,
        why: &'static str,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < policy.after_failures || self.is_ejected() {
            return false;
        }
        if !may_eject() {
            // Start counting afresh: failures shared with every peer say nothing about this
            // endpoint, and must not leave it one straggler away from ejection.
            self.consecutive_failures.store(0, Ordering::Relaxed);
            m::ejection_suppressed(&self.label);
            tracing::debug!(endpoint = %self.addr, failures = n, last_failure = why, "endpoint keeps failing but is not ejected: its peers fail too, or enough of them are ejected already");
            return false;
        }
        let times = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = policy
            .base
            .saturating_mul(1u32 << times)
            .min(policy.max)
            .max(policy.base.min(policy.max));
        self.ejected_until_ms
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Back from ejection it must answer again before it vouches for its peers.
        self.proven.store(false, Ordering::Relaxed);
        m::ejection(&self.label);
        tracing::warn!(endpoint = %self.addr, backoff_ms = backoff.as_millis() as u64, failures = n, last_failure = why, "endpoint ejected after repeated failures while its peers succeed");
        true
    }
}

fn decayed(e: &Ewma, now: Instant, decay_ns: f64) -> f64 {
    let elapsed = now.saturating_duration_since(e.stamp).as_nanos() as f64;
    e.cost_ns * (-elapsed / decay_ns).exp()
}

/// Keeps an endpoint's in-flight count up while alive.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointStats>);

impl InFlight {
    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Least weight of a sample faster than the current estimate.
pub const MIN_DOWN_WEIGHT: f64 = 0.2;

/// What p2c compares for one candidate.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rtt_ns: f64,
    pub in_flight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_backs_off_and_recovers() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let s = EndpointStats::new(addr, Duration::from_millis(1), Duration::from_secs(1));
        let p = EjectPolicy {
            after_failures: 2,
            base: Duration::from_millis(50),
            max: Duration::from_secs(1),
        };
        assert!(!s.record_failure(&p, "test", || true));
        assert!(
            !s.record_failure(&p, "test", || false),
            "the destination said no"
        );
        // ...and the count starts again.
        assert!(!s.record_failure(&p, "test", || true));
        assert!(s.record_failure(&p, "test", || true));
        assert!(s.is_ejected());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!s.is_ejected());
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let s = EndpointStats::new(addr, Duration::from_millis(1), Duration::from_millis(100));
        s.observe_rtt(Duration::from_millis(50));
        assert!(s.rtt_ns(Instant::now()) > 40e6);
        std::thread::sleep(Duration::from_millis(300));
        assert!(s.rtt_ns(Instant::now()) < 5e6);
    }
}
