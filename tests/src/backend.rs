//! gRPC-shaped HTTP/2 backends for the demos and benchmarks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A gRPC-shaped HTTP/2 backend on `listener`: every request gets 200, a small body and
/// `grpc-status: 0` trailers, and is counted in `served`. Runs until the task is dropped.
pub async fn serve_grpc_shaped(
    listener: tokio::net::TcpListener,
    served: Arc<std::sync::atomic::AtomicU64>,
) {
    serve_grpc_stamped(listener, served, Arc::default()).await
}

/// Like `serve_grpc_shaped`, and stamps the wall-clock time (microseconds since the Unix
/// epoch) of the first request into `first_unix_us` (the benchmark's "time to first request").
pub async fn serve_grpc_stamped(
    listener: tokio::net::TcpListener,
    served: Arc<std::sync::atomic::AtomicU64>,
    first_unix_us: Arc<std::sync::atomic::AtomicU64>,
) {
    interceptor_test_support::h2_backend::serve_default(listener, move |request, respond| {
        if served.fetch_add(1, Ordering::Relaxed) == 0 {
            first_unix_us.store(unix_micros(), Ordering::Relaxed);
        }
        interceptor_test_support::h2_backend::answer_grpc_ok(request, respond)
    })
    .await
}

/// Wall-clock microseconds since the Unix epoch (comparable across processes).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
