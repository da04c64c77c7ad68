//! Optional busy polling on a proxy worker (`--busy-poll-us`, off by default).
//!
//! At low request rates a worker sleeps in epoll between every request and its response, and
//! on a virtual machine the wake-up that follows costs tens of microseconds: more than the
//! relay's own work per request. With a budget set, each worker keeps one task that, after the
//! relay read something on this worker, yields to the runtime until nothing more was read for
//! the budget. While it yields the runtime polls epoll with a zero timeout instead of
//! sleeping, so the answer that comes back is seen without a wake-up. The price is a core kept
//! busy for up to the budget after the last read, which is why a node agent does not do it
//! unless told to.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Reads on this worker so far.
    static READS: Cell<u64> = const { Cell::new(0) };
    /// The spinner while it waits for a read.
    static WAITING: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// The relay read something on this thread: a waiting spinner starts spinning.
pub(crate) fn read_done() {
    READS.with(|r| r.set(r.get().wrapping_add(1)));
    WAITING.with(|w| {
        if let Some(waker) = w.borrow_mut().take() {
            waker.wake();
        }
    });
}

/// The spinner of one worker: runs on that worker's runtime until the process exits.
pub(crate) async fn spin(budget: Duration) {
    let mut seen = READS.with(Cell::get);
    loop {
        // Sleep until the relay reads something new.
        poll_fn(|cx| {
            let now = READS.with(Cell::get);
            if now != seen {
                seen = now;
                return Poll::Ready(());
            }
            WAITING.with(|w| *w.borrow_mut() = Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        let mut quiet_since = Instant::now();
        loop {
            tokio::task::yield_now().await;
            let now = READS.with(Cell::get);
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= budget {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spinner spins while reads come, stops once none came for the budget, and starts
    /// again at the next read. Spinning is seen as the runtime polling the spinner.
    #[tokio::test(flavor = "current_thread")]
    async fn spins_after_reads_and_stops_when_they_stop() {
        use std::future::Future;
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        use std::sync::Arc;

        let polls = Arc::new(AtomicU64::new(0));
        let counter = polls.clone();
        // On this test's own thread: the runtime is single-threaded.
        let spinner = tokio::spawn(async move {
            let mut inner = Box::pin(spin(Duration::from_millis(20)));
            poll_fn(|cx| {
                counter.fetch_add(1, Relaxed);
                inner.as_mut().poll(cx)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let idle = polls.load(Relaxed);
        assert!(idle <= 2, "the spinner ran {idle} times before any read");

        read_done();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let spinning = polls.load(Relaxed) - idle;
        assert!(spinning > 10, "only {spinning} polls in 5 ms after a read");

        tokio::time::sleep(Duration::from_millis(60)).await;
        let settled = polls.load(Relaxed);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            polls.load(Relaxed),
            settled,
            "still spinning 60 ms after the last read"
        );

        read_done();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            polls.load(Relaxed) > settled + 10,
            "did not spin again at the next read"
        );
        spinner.abort();
    }
}
