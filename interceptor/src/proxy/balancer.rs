//! The choice of an endpoint for each stream.
//!
//! Power of two choices over peak-EWMA latency weighted by in-flight requests (Finagle,
//! Linkerd): cheap, no global ordering, and it moves load away from slow or busy endpoints
//! faster than least-requests alone. Round robin as an option. On top: ready endpoints
//! before terminating ones, session affinity (one sticky endpoint per pod), and slow start
//! (a joining endpoint's share ramps up).

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::BalancerKind;
use super::endpoint_stats::{EndpointStats, Load};
use super::EndpointState;

/// One endpoint of a destination's current set.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub state: EndpointState,
    pub stats: Arc<EndpointStats>,
    /// When it joined a set that already had endpoints (slow start ramps it from there); `None`
    /// for the first set, which has no peers to take the load meanwhile.
    pub joined: Option<Instant>,
}

/// The least share a slow-starting endpoint takes from the start (Envoy's min_weight_percent).
const SLOW_START_FLOOR: f64 = 0.1;

#[derive(Debug, Default)]
struct Affinity {
    timeout: Duration,
    /// The endpoint and when a stream last went to it.
    sticky: Option<(SocketAddr, Instant)>,
}

/// How one destination chooses: the kind, the round-robin position, slow start and session
/// affinity.
#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    rr: AtomicUsize,
    /// Slow start window in ms (0: off): a joining endpoint's share ramps up over it.
    slow_start_ms: AtomicU64,
    /// sessionAffinity ClientIP: the endpoint this destination's streams stick to. The
    /// proxy serves one pod, so its client IP is the pod's: one sticky endpoint per proxy.
    affinity: Mutex<Affinity>,
    affinity_on: AtomicBool,
}

impl Balancer {
    pub fn new(kind: BalancerKind) -> Self {
        Self {
            kind,
            rr: AtomicUsize::new(0),
            slow_start_ms: AtomicU64::new(0),
            affinity: Mutex::new(Affinity::default()),
            affinity_on: AtomicBool::new(false),
        }
    }

    /// Slow start (the Service's interceptor.io/slow-start annotation): an endpoint that joins
    /// takes a share growing linearly from 10% to a full one over `window`.
    pub fn set_slow_start(&self, window: Option<Duration>) {
        let ms = window.map_or(0, |w| w.as_millis().max(1) as u64);
        self.slow_start_ms.store(ms, Ordering::Relaxed);
    }

    /// sessionAffinity ClientIP with `timeout`, or none. A changed timeout keeps the current
    /// sticky endpoint.
    pub fn set_affinity(&self, timeout: Option<Duration>) {
        let mut a = match self.affinity.lock() {
            Ok(a) => a,
            Err(p) => p.into_inner(),
        };
        match timeout {
            Some(t) => a.timeout = t,
            None => *a = Affinity::default(),
        }
        self.affinity_on.store(timeout.is_some(), Ordering::Relaxed);
    }

    /// Chooses an endpoint of `set` for a new stream, skipping `exclude` (endpoints this stream already
    /// failed on). Ready endpoints first; terminating ones only when none is ready.
    pub fn pick(&self, set: &[Endpoint], exclude: &[SocketAddr]) -> Option<Arc<EndpointStats>> {
        if !self.affinity_on.load(Ordering::Relaxed) {
            return self.pick_balanced(set, exclude);
        }
        let mut a = match self.affinity.lock() {
            Ok(a) => a,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        if let Some((addr, last)) = a.sticky {
            if now.duration_since(last) <= a.timeout {
                let still = set.iter().find(|e| {
                    e.stats.addr() == addr
                        && e.state == EndpointState::Ready
                        && !e.stats.is_ejected()
                });
                if let Some(e) = still {
                    if exclude.contains(&addr) {
                        // This stream's retry after a failure there: another endpoint for it
                        // alone; the pod's other streams stay where they are.
                        drop(a);
                        return self.pick_balanced(set, exclude);
                    }
                    a.sticky = Some((addr, now));
                    return Some(e.stats.clone());
                }
            }
        }
        // No sticky endpoint, it expired, or it can no longer take streams: choose anew, as
        // kube-proxy does when the remembered endpoint is gone.
        let picked = self.pick_balanced(set, exclude)?;
        a.sticky = Some((picked.addr(), now));
        Some(picked)
    }

    fn pick_balanced(
        &self,
        set: &[Endpoint],
        exclude: &[SocketAddr],
    ) -> Option<Arc<EndpointStats>> {
        let now = Instant::now();
        for tier in [EndpointState::Ready, EndpointState::Terminating] {
            let usable = |e: &&Endpoint| {
                e.state == tier && !e.stats.is_ejected() && !exclude.contains(&e.stats.addr())
            };
            let n = set.iter().filter(usable).count();
            if n == 0 {
                continue;
            }
            let nth = |i: usize| set.iter().filter(usable).nth(i);
            let idx = match self.kind {
                BalancerKind::P2c => p2c(n, |i| {
                    nth(i).map_or(
                        Load {
                            rtt_ns: f64::MAX,
                            in_flight: u64::MAX,
                        },
                        |e| e.stats.load(now),
                    )
                }),
                BalancerKind::RoundRobin => Some(self.rr.fetch_add(1, Ordering::Relaxed) % n),
            };
            if let Some(e) = idx.and_then(nth) {
                if n > 1 && !self.takes_this_stream(e, now) {
                    // Still ramping up: this stream goes to one of its peers.
                    let mut more = exclude.to_vec();
                    more.push(e.stats.addr());
                    if let Some(other) = self.pick_balanced(set, &more) {
                        return Some(other);
                    }
                }
                return Some(e.stats.clone());
            }
        }
        None
    }

    /// Slow start: a joining endpoint takes a stream with probability rising from the floor
    /// to 1 over the window.
    fn takes_this_stream(&self, e: &Endpoint, now: Instant) -> bool {
        let window_ms = self.slow_start_ms.load(Ordering::Relaxed);
        let Some(joined) = e.joined else { return true };
        if window_ms == 0 {
            return true;
        }
        let age_ms = now.saturating_duration_since(joined).as_millis() as u64;
        if age_ms >= window_ms {
            return true;
        }
        let share = (age_ms as f64 / window_ms as f64).max(SLOW_START_FLOOR);
        (random_below(1 << 20) as f64) < share * (1 << 20) as f64
    }
}

fn cost(l: Load) -> f64 {
    // +1 ns keeps a zero estimate from erasing the in-flight weighting.
    (l.rtt_ns + 1.0) * (l.in_flight as f64 + 1.0)
}

/// A small xorshift generator per thread: p2c needs cheap, not cryptographic, randomness.
pub fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    if n <= 1 {
        return 0;
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        ((x >> 11) % n as u64) as usize
    })
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let local = 0u8;
    // Mix in a stack address so threads started in the same nanosecond differ.
    (t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// Latency estimates count as equal unless the slower is at least four times the faster...
pub const RTT_TIE_RELATIVE: f64 = 0.75;
/// ...and at least this much slower (nanoseconds). Peak-EWMA believes one slow sample at
/// once, and on a busy node latency differences of a few milliseconds are scheduling noise,
/// not the endpoint: with a 1 ms band one of 4 endpoints got 0 of 3000 calls in a burst, and
/// with 5 ms, on a saturated CPU, the feedback loop ran the other way (an endpoint that gets
/// fewer calls is scheduled later, looks slower, gets fewer calls: one endpoint took 75% in
/// the benchmark). Between equal endpoints in-flight counts decide (least outstanding
/// requests, which already moves load off a moderately slow endpoint); latency only decides
/// for outliers such as a GC pause or an overloaded pod.
pub const RTT_TIE_ABSOLUTE_NS: f64 = 20_000_000.0;

/// Chooses between two candidates: peak-EWMA latency times (in-flight + 1), except that
/// equally fast endpoints are compared by in-flight alone, and exact ties are broken at
/// random. Returns true to take `b`.
pub fn prefer_b(a: Load, b: Load) -> bool {
    let diff = (a.rtt_ns - b.rtt_ns).abs();
    let rtt_tie = diff <= RTT_TIE_ABSOLUTE_NS.max(RTT_TIE_RELATIVE * a.rtt_ns.max(b.rtt_ns));
    if rtt_tie {
        if a.in_flight != b.in_flight {
            return b.in_flight < a.in_flight;
        }
        return random_below(2) == 1;
    }
    cost(b) < cost(a)
}

/// Power of two choices among `n` candidates given by index; returns the chosen index.
pub fn p2c(n: usize, load: impl Fn(usize) -> Load) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = random_below(n);
            let mut b = random_below(n - 1);
            if b >= a {
                b += 1;
            }
            Some(if prefer_b(load(a), load(b)) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2c_prefers_lower_load() {
        let ms = |x: f64, f: u64| Load {
            rtt_ns: x * 1e6,
            in_flight: f,
        };
        // Clearly slower: avoided.
        let loads = [ms(50.0, 0), ms(2.0, 0)];
        for _ in 0..100 {
            assert_eq!(p2c(2, |i| loads[i]), Some(1));
        }
        // Equally fast (within noise): fewer in flight wins.
        let loads = [ms(0.3, 0), ms(2.5, 3)];
        for _ in 0..100 {
            assert_eq!(p2c(2, |i| loads[i]), Some(0));
        }
        // Equal: both get picked.
        let loads = [ms(0.3, 1), ms(0.4, 1)];
        let ones = (0..200).filter(|_| p2c(2, |i| loads[i]) == Some(1)).count();
        assert!((50..150).contains(&ones), "{ones}");
    }
}
