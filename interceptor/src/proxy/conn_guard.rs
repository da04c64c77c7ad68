//! One client connection's accounting, shared by the HTTP/2 server and its stream tasks:
//! client resets per second (rapid reset: over the limit closes the connection) and open
//! streams with the time the connection last became idle (the idle timeout).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Per-connection abuse accounting shared with the connection's stream tasks.
pub(crate) struct ConnGuard {
    limit: u32,
    started: Instant,
    window_start_ms: AtomicU64,
    resets: AtomicU32,
    tripped: AtomicBool,
    pub(crate) trip: Notify,
    /// Streams of this connection being relayed, and when the count last fell to zero (ms
    /// since `started`), for the idle timeout.
    pub(crate) open_streams: AtomicU32,
    idle_since_ms: AtomicU64,
    /// Told when the last open stream ends.
    streams_ended: Notify,
}

/// Holds one stream open in its connection's count.
pub(crate) struct OpenStream(Arc<ConnGuard>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        // The time first, then the count: whoever sees the count at zero sees a time at
        // least as recent as the last stream's end.
        let now = self.0.started.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now, Ordering::Release);
        if self.0.open_streams.fetch_sub(1, Ordering::Release) == 1 {
            // A permit is kept when nobody waits yet, so the wake-up is never lost.
            self.0.streams_ended.notify_one();
        }
    }
}

impl ConnGuard {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            started: Instant::now(),
            window_start_ms: AtomicU64::new(0),
            resets: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
            trip: Notify::new(),
            open_streams: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            streams_ended: Notify::new(),
        }
    }

    pub(crate) fn open_stream(self: &Arc<Self>) -> OpenStream {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Returns once no stream task of this connection is left, or after `limit`. h2 ends the
    /// connection when the last frame is out, a moment before the stream tasks have settled
    /// their accounting (metrics, the endpoint's latency, the pooled lease); a drain that
    /// waits for connections means to wait for that too.
    pub(crate) async fn streams_settled(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while self.open_streams.load(Ordering::Acquire) != 0 {
                self.streams_ended.notified().await;
            }
        })
        .await;
    }

    /// How long the connection has had no stream, or None while it has one.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.open_streams.load(Ordering::Acquire) != 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        let now = self.started.elapsed().as_millis() as u64;
        Some(Duration::from_millis(now.saturating_sub(since)))
    }

    /// Called by a stream task when the client cancelled its stream.
    pub(crate) fn client_reset(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= 1000 {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.resets.store(0, Ordering::Relaxed);
        }
        let n = self.resets.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.limit && !self.tripped.swap(true, Ordering::Relaxed) {
            self.trip.notify_one();
        }
    }
}
