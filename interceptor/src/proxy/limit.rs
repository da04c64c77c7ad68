//! The cap on client connections served at once. File descriptors are a per-process resource,
//! so the agent shares one limit between the demultiplexers of all its pods and the relays it
//! passes through; running out must never look like an endpoint failing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::metrics as m;

#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
    /// Milliseconds since `started` of the last warning; 0: none yet.
    last_warning_ms: AtomicU64,
    started: Instant,
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
            last_warning_ms: AtomicU64::new(0),
            started: Instant::now(),
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
        let now = (self.started.elapsed().as_millis() as u64).max(1);
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(max = self.max, "client connection limit reached; closing new connections at accept (raise RLIMIT_NOFILE or --max-client-connections)");
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
