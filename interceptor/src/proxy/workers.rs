//! Proxy worker threads: one single-threaded tokio runtime each, every client connection
//! served start to end on one of them.
//!
//! Why not one multi-threaded runtime: there a task that wakes another hands it the worker's
//! LIFO slot, so each stream task's send ran the connection task at once and every frame
//! left in its own writev (1.5 per request measured, HAProxy 0.26). On a single-threaded
//! runtime woken tasks queue behind the ones already ready, the connection task writes the
//! frames of many streams at once (0.23 writev per request), and CPU per request fell by a
//! third. Each worker also keeps its own upstream connections (see `Pool`), so a stream and
//! the connection it rides are driven by the same thread: no cross-thread wake-ups.
//!
//! Without `start` (tests, embedding) connections are served on the caller's runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Which worker this thread is: 1..=n on a worker, 0 anywhere else.
pub fn current_index() -> usize {
    INDEX.with(|i| i.get())
}

/// Starts `n` workers for the rest of the process, each busy polling for `busy_poll` after
/// its last read (zero: never; see `busy_poll`). Fails if called twice or a thread cannot be
/// started.
pub fn start(n: usize, busy_poll: Duration) -> io::Result<()> {
    let n = n.max(1);
    let mut handles = Vec::with_capacity(n);
    for i in 1..=n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("interceptor-w{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i));
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                // Runs the worker's tasks until the process exits.
                rt.block_on(async move {
                    if !busy_poll.is_zero() {
                        tokio::spawn(super::busy_poll::spin(busy_poll));
                    }
                    std::future::pending::<()>().await
                });
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other("proxy worker thread exited at start"))??;
        handles.push(handle);
    }
    WORKERS
        .set(Workers {
            handles,
            next: AtomicUsize::new(0),
        })
        .map_err(|_| io::Error::other("proxy workers started twice"))?;
    tracing::info!(
        workers = n,
        busy_poll_us = busy_poll.as_micros() as u64,
        "proxy worker threads started"
    );
    Ok(())
}

/// Serves `stream` with `serve` on the next worker (round robin), or on the caller's runtime
/// when no workers were started. The socket is moved to the worker's own reactor.
pub fn spawn_connection<F, Fut>(stream: TcpStream, serve: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(w) = WORKERS.get() else {
        return Ok(tokio::spawn(serve(stream)));
    };
    let std = stream.into_std()?;
    let i = w.next.fetch_add(1, Ordering::Relaxed) % w.handles.len();
    Ok(w.handles[i].spawn(async move {
        match TcpStream::from_std(std) {
            Ok(stream) => serve(stream).await,
            Err(error) => tracing::warn!(%error, "moving a connection to a proxy worker failed"),
        }
    }))
}
