//! `cargo xtask proxy-demo`: the HTTP/2 balancer on loopback, no cluster needed.
//! Three backends (minimal HTTP/2 servers that count the requests they serve), one h2load
//! client with ONE connection: first straight to a backend, as per-connection balancing
//! (kube-proxy) would pin it; then through `interceptor proxy`; then after a fourth backend
//! is added to the endpoints file. Prints each phase's per-backend share and a balance line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor_tests::{target_bin, ChildGuard};

const REQUESTS: u32 = 3000;

struct Backend {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
}

/// A gRPC-shaped responder: 200, a small body, `grpc-status: 0` trailers.
async fn start_backend() -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let served = Arc::new(AtomicU64::new(0));
    tokio::spawn(interceptor_tests::serve_grpc_shaped(
        listener,
        served.clone(),
    ));
    Backend { addr, served }
}

/// h2load with one connection and `REQUESTS` requests; returns (succeeded, failed).
fn h2load(target: SocketAddr) -> (u64, u64) {
    let url = format!("http://{target}/greet.Greeter/SayHello");
    let out = Command::new("h2load")
        .args([
            "-c1",
            "-m10",
            "-n",
            &REQUESTS.to_string(),
            "-H",
            "content-type: application/grpc",
            &url,
        ])
        .output()
        .expect("h2load (Debian nghttp2-client) is installed by `cargo xtask setup`");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("h2load printed no summary:\n{text}"));
    let field = |name: &str| -> u64 {
        line.split(',')
            .find(|f| f.trim().ends_with(name))
            .and_then(|f| f.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("succeeded"), field("failed"))
}

fn snapshot(backends: &[Backend]) -> Vec<u64> {
    backends
        .iter()
        .map(|b| b.served.load(Ordering::Relaxed))
        .collect()
}

/// Prints the phase's table and returns (jain, max/mean) of its per-backend counts.
fn report(phase: &str, backends: &[Backend], before: &[u64], ok: u64, failed: u64) -> (f64, f64) {
    let counts: Vec<u64> = snapshot(backends)
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a - b)
        .collect();
    let total: u64 = counts.iter().sum();
    println!("\n{phase}  ({ok} ok, {failed} failed, one client connection)");
    println!(
        "  {:<8} {:>21} {:>8} {:>7}",
        "backend", "address", "calls", "share"
    );
    for (i, (b, n)) in backends.iter().zip(&counts).enumerate() {
        let share = if total > 0 {
            100.0 * *n as f64 / total as f64
        } else {
            0.0
        };
        println!(
            "  pod-{:<4} {:>21} {:>8} {:>6.1}%  {}",
            i + 1,
            b.addr.to_string(),
            n,
            share,
            "#".repeat((share / 2.5) as usize)
        );
    }
    let n = counts.len() as f64;
    let sum: f64 = counts.iter().map(|c| *c as f64).sum();
    let sq: f64 = counts.iter().map(|c| (*c as f64).powi(2)).sum();
    let jain = if sq > 0.0 { sum * sum / (n * sq) } else { 0.0 };
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    (jain, if sum > 0.0 { max / (sum / n) } else { 0.0 })
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "interceptor proxy did not listen on {addr} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut backends: Vec<Backend> = runtime.block_on(async {
        vec![
            start_backend().await,
            start_backend().await,
            start_backend().await,
        ]
    });
    println!("interceptor proxy demo: {REQUESTS} gRPC-shaped requests per phase over ONE HTTP/2 connection (h2load -c1 -m10)");

    // Before: per-connection balancing picks one backend for the connection, for good.
    eprint!("phase 1/3: straight to the Service (per-connection balancing) ... ");
    let pinned = backends[(std::process::id() as usize) % backends.len()].addr;
    let before = snapshot(&backends);
    let (ok, failed) = h2load(pinned);
    eprintln!("done");
    report(
        "before: per-connection balancing (what kube-proxy does)",
        &backends,
        &before,
        ok,
        failed,
    );

    let endpoints_file: PathBuf =
        std::env::temp_dir().join(format!("icp-demo-endpoints-{}", std::process::id()));
    let write_endpoints = |backends: &[Backend]| {
        let text: String = backends.iter().map(|b| format!("{}\n", b.addr)).collect();
        // Write then rename, as a config manager would: the proxy never reads half a file.
        let tmp = endpoints_file.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write endpoints file");
        std::fs::rename(&tmp, &endpoints_file).expect("replace endpoints file");
    };
    write_endpoints(&backends);
    let listen: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr")
    };
    let proxy = Command::new(target_bin("interceptor"))
        .args([
            "proxy",
            "--listen",
            &listen.to_string(),
            "--endpoints-file",
            endpoints_file.to_str().expect("utf-8 path"),
            "--reload-interval-ms",
            "100",
        ])
        .env("INTERCEPTOR_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start interceptor proxy");
    let _proxy = ChildGuard(Some(proxy));
    wait_listening(listen);

    eprint!("phase 2/3: through interceptor ... ");
    let before = snapshot(&backends);
    let (ok, failed) = h2load(listen);
    eprintln!("done");
    report(
        "after: through interceptor (per-request balancing)",
        &backends,
        &before,
        ok,
        failed,
    );

    eprint!("phase 3/3: scale up to 4 backends ... ");
    backends.push(runtime.block_on(start_backend()));
    write_endpoints(&backends);
    let added = Instant::now();
    // The proxy re-reads the file every 100 ms; wait until the new backend takes traffic.
    while backends[3].served.load(Ordering::Relaxed) == 0
        && added.elapsed() < Duration::from_secs(5)
    {
        h2load_small(listen);
    }
    let first_call = added.elapsed();
    let before = snapshot(&backends);
    let (ok, failed) = h2load(listen);
    eprintln!("done");
    let (jain, max_mean) = report("scaled to 4 backends", &backends, &before, ok, failed);
    println!(
        "\nnew backend's first call {} ms after it was added to the endpoints file",
        first_call.as_millis()
    );
    println!(
        "balance: pods={} jain={jain:.3} max/mean={max_mean:.3}",
        backends.len()
    );
    let _ = std::fs::remove_file(&endpoints_file);
}

fn h2load_small(target: SocketAddr) {
    let url = format!("http://{target}/greet.Greeter/SayHello");
    let _ = Command::new("h2load")
        .args(["-c1", "-n", "20", &url])
        .output();
}
