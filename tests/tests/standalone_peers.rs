//! `interceptor proxy` (standalone mode) as a separate process, driven by real HTTP/2 tools:
//! curl with prior knowledge, h2load, and a slow consumer of a 100 MiB response whose effect on
//! the proxy's memory is measured from /proc.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use interceptor_tests::standalone::Standalone;
use interceptor_tests::*;

fn backends(runtime: &tokio::runtime::Runtime, n: usize) -> (Vec<SocketAddr>, Vec<Arc<AtomicU64>>) {
    let mut addrs = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..n {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind backend");
        addrs.push(listener.local_addr().expect("addr"));
        let served = Arc::new(AtomicU64::new(0));
        counts.push(served.clone());
        runtime.spawn(serve_grpc_shaped(listener, served));
    }
    (addrs, counts)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn curl_prior_knowledge_and_h2load_work_through_the_standalone_proxy() {
    let rt = runtime();
    let (addrs, counts) = backends(&rt, 3);
    let proxy = Standalone::start(&addrs);
    let url = format!("http://{}/greet.Greeter/SayHello", proxy.listen);
    for _ in 0..30 {
        let out = Command::new("curl")
            .args(interceptor_tests::cluster::curl_h2_args(&url))
            .output()
            .expect("curl is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.trim(), "200 2", "curl over HTTP/2 prior knowledge");
    }
    let after_curl: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(after_curl.iter().sum::<u64>(), 30, "{after_curl:?}");
    assert!(
        after_curl.iter().all(|c| *c > 0),
        "30 separate curl connections reach every backend: {after_curl:?}"
    );

    let out = Command::new("h2load")
        .args([
            "-c1",
            "-m10",
            "-n",
            "600",
            "-H",
            "content-type: application/grpc",
            &url,
        ])
        .output()
        .expect("h2load is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("600 succeeded, 0 failed, 0 errored"),
        "h2load through the proxy:\n{text}"
    );
    let per: Vec<u64> = counts
        .iter()
        .zip(&after_curl)
        .map(|(c, b)| c.load(Ordering::Relaxed) - b)
        .collect();
    note(&format!(
        "h2load -c1 -n600 through `interceptor proxy`: per backend {per:?}"
    ));
    assert!(
        per.iter().all(|c| *c >= 120),
        "one h2load connection is spread: {per:?}"
    );
    let (code, metrics) = interceptor::admin::get(proxy.admin, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("interceptor_requests_total"), "{metrics}");
}

/// A backend that answers every request with `total` bytes of DATA as fast as flow control
/// lets it.
async fn big_backend(listener: tokio::net::TcpListener, total: usize) {
    interceptor_test_support::h2_backend::serve_default(
        listener,
        move |_req, mut respond| async move {
            let resp = http::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(())
                .expect("response");
            let Ok(mut send) = respond.send_response(resp, false) else {
                return;
            };
            let chunk = Bytes::from(vec![7u8; 64 * 1024]);
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                send.reserve_capacity(n);
                let got = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(c)) => c,
                    _ => return,
                };
                let n = n.min(got);
                if send.send_data(chunk.slice(..n), false).is_err() {
                    return;
                }
                left -= n;
            }
            let _ = send.send_data(Bytes::new(), true);
        },
    )
    .await
}

#[test]
fn a_slow_consumer_of_100_mib_keeps_the_proxy_memory_bounded() {
    const TOTAL: usize = 100 * 1024 * 1024;
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    rt.spawn(big_backend(listener, TOTAL));
    let proxy = Standalone::start(&[backend]);
    let (rss_before, _) = proxy.memory_kib();
    let listen = proxy.listen;
    let pid = proxy.child.pid();
    let (received, took, peak) = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect proxy");
        // The client's own windows stay at the protocol default (64 KiB): flow control, not a
        // big receive buffer, is what has to hold the backend back.
        let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method("GET")
            .uri(format!("http://{listen}/big"))
            .body(())
            .expect("request");
        let (resp, _) = client.send_request(req, true).expect("send request");
        let mut body = resp.await.expect("response headers").into_body();
        let started = Instant::now();
        let mut received = 0usize;
        let mut peak_kib = 0u64;
        let mut n = 0u64;
        // Slow: a 20 ms pause every 64 DATA frames (about 1 MiB), 2 s of pauses in all; bounded
        // at 60 s.
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("data keeps coming")
        {
            let chunk = chunk.expect("data frame");
            received += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
            n += 1;
            if n.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if n.is_multiple_of(256) {
                peak_kib = peak_kib.max(rss_kib(pid));
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "slow read bounded at 60 s"
            );
        }
        (received, started.elapsed(), peak_kib)
    });
    let (rss_after, hwm) = proxy.memory_kib();
    note(&format!(
        "100 MiB to a slow reader through `interceptor proxy` in {:.1} s: proxy RSS {} KiB before, {} KiB peak while streaming (sampled), {} KiB after, high-water mark {} KiB",
        took.as_secs_f64(),
        rss_before,
        peak,
        rss_after,
        hwm
    ));
    assert_eq!(received, TOTAL, "every byte arrived");
    assert!(
        hwm < rss_before + 32 * 1024,
        "the proxy buffered: high-water mark {hwm} KiB vs {rss_before} KiB at rest (bound: +32 MiB for a 100 MiB stream)"
    );
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("VmRSS of process {pid}"))
}
