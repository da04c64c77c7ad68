//! The cap on client connections served at once. File descriptors are a per-process resource,
//! so the agent shares one limit between the demultiplexers of all its pods and the relays it
//! passes through; running out must never look like an endpoint failing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::metrics as m;

#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
    warnings: RateLimit,
}

/// One connection's place under the limit, given back on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<ConnectionLimit>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionLimit {
    /// `max` connections, or (None) half the soft RLIMIT_NOFILE less a reserve for listeners,
    /// pins and the admin server: a client connection can need an upstream socket too.
    pub fn new(max: Option<usize>) -> Arc<Self> {
        let max = max.unwrap_or_else(from_rlimit);
        tracing::debug!(max_client_connections = max, "client connection limit");
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
            warnings: RateLimit::new(Duration::from_secs(1)),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot, or None (counted, and warned about at most once a second) at the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(self.clone());
        if before < self.max {
            return Some(slot);
        }
        drop(slot);
        m::rejected_connection();
        if let Some(suppressed) = self.warnings.allow() {
            tracing::warn!(max = self.max, suppressed, "client connection limit reached; closing new connections at accept (raise RLIMIT_NOFILE or --max-client-connections)");
        }
        None
    }
}

fn from_rlimit() -> usize {
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

/// At most one event per interval passes (for log lines a flood could repeat); the rest are
/// counted and reported with the next one that passes.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval_ms: u64,
    next_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    pub(crate) const fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            next_ms: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(events suppressed since the last allowed one)` when this one may be logged.
    pub(crate) fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.interval_ms, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}
