//! HTTP/1.1 in the end-to-end tests: the hyper backend that names itself (see
//! `interceptor_test_support::http1_backend`) as a pod's server, and the clients the tests run
//! inside the client pod: Python's requests with a keep-alive pool, curl, h2load's HTTP/1.1
//! mode, a tungstenite WebSocket client and a raw socket for malformed requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::Tallies;
use crate::greet::{self, TallyLine};
use crate::{ChildGuard, Pod};

/// `icp-pod http1-serve`: the backend on every address at `port`, until killed; prints READY.
pub fn serve(name: &str, port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("::", port))
            .await
            .expect("bind the HTTP/1.1 backend");
        println!("READY");
        let seen = Arc::new(interceptor_test_support::http1_backend::Seen::default());
        interceptor_test_support::http1_backend::serve(listener, Arc::from(name), seen).await;
    });
}

/// Starts the backend in `pod` at `port` and waits until it listens.
pub fn serve_in(pod: &Pod, port: u16) -> ChildGuard {
    let mut child = pod.spawn(&[
        "http1-serve",
        "--name",
        &pod.name,
        "--port",
        &port.to_string(),
    ]);
    child.wait_ready(&format!("HTTP/1.1 backend {}", pod.name));
    child
}

fn keepalive_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("http1/keepalive_client.py")
}

/// The Python keep-alive client for `seconds`, its progress read as it comes.
pub fn python_client_run(pod: &Pod, url: &str, seconds: u64) -> Tallies {
    Tallies::from_child(python_client(
        pod,
        url,
        &["--seconds", &seconds.to_string()],
    ))
}

/// Starts tests/http1/keepalive_client.py in `pod` with `args` after the URL.
fn python_client(pod: &Pod, url: &str, args: &[&str]) -> ChildGuard {
    let script = keepalive_script();
    let mut all = vec![script.to_str().expect("utf-8 path"), "--url", url];
    all.extend_from_slice(args);
    pod.spawn_program(std::path::Path::new("python3"), &all)
}

/// What one finished run of the Python client reported.
#[derive(Debug)]
pub struct PythonRun {
    pub last: TallyLine,
    pub connections: u64,
    pub last_error: Option<String>,
}

/// The Python keep-alive client for `count` requests, to its end.
pub fn python_client_count(pod: &Pod, url: &str, count: u64) -> PythonRun {
    let child = python_client(
        pod,
        url,
        &["--count", &count.to_string(), "--report-ms", "1000"],
    );
    let out = child.wait_output(Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout
        .lines()
        .filter_map(greet::parse_tally)
        .next_back()
        .unwrap_or_else(|| panic!("no TALLY from the python client: {stdout}"));
    let connections = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CONNECTIONS "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no CONNECTIONS line: {stdout}"));
    let last_error = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("LAST_ERROR "))
        .next_back()
        .map(str::to_string);
    PythonRun {
        last,
        connections,
        last_error,
    }
}

/// `icp-pod ws-echo`: a WebSocket client that sends `messages` text messages of growing size
/// and checks each echo. Prints `WS <backend> <messages echoed>` or panics.
pub fn ws_echo(target: SocketAddr, messages: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(target)
            .await
            .expect("connect");
        let url = format!("ws://{target}/ws");
        let (mut ws, resp) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::client_async(url.as_str(), tcp),
        )
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake");
        let backend = resp
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string();
        for i in 0..messages {
            let text = format!("{i}:{}", "x".repeat(i * 97));
            ws.send(Message::text(text.clone())).await.expect("send");
            let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("echo in time")
                .expect("stream open")
                .expect("echo");
            assert_eq!(
                echo.into_text().expect("text").as_str(),
                text,
                "message {i}"
            );
        }
        let big = vec![7u8; 1 << 20];
        ws.send(Message::binary(big.clone()))
            .await
            .expect("send 1 MiB");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("echo");
        assert_eq!(echo.into_data().as_ref(), &big[..], "1 MiB binary frame");
        let _ = ws.close(None).await;
        println!("WS {backend} {}", messages + 1);
    });
}

/// `icp-pod raw-http`: writes the bytes of `request_file` to `target`, reads until the peer
/// closes (or 5 s), prints `CLOSED <true|false>` then the response, escaped on one line.
pub fn raw_exchange(target: SocketAddr, request_file: &str) {
    let bytes = std::fs::read(request_file).expect("read the request file");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut s = tokio::net::TcpStream::connect(target)
            .await
            .expect("connect");
        s.write_all(&bytes).await.expect("write");
        let mut out = Vec::new();
        let closed = matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await,
            Ok(Ok(_))
        );
        println!("CLOSED {closed}");
        println!("{}", String::from_utf8_lossy(&out).escape_debug());
    });
}
