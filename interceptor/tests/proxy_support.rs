//! Shared pieces of the proxy tests: real tonic gRPC backends and clients on 127.0.0.x with a
//! hand-written bytes codec (no protoc), and a proxy bound to 127.0.0.1.
//!
//! Included by each `proxy_*.rs` test with `#[path]`; cargo also builds it alone (no tests).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use interceptor::proxy::config::ProxyConfig;
use interceptor::proxy::connector::TcpConnector;
use interceptor::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::Streaming;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

pub const MAX_MSG: usize = 32 * 1024 * 1024;

#[allow(unused_imports)]
pub use interceptor_test_support::codec::{RawCodec, RawDecoder, RawEncoder};
#[allow(unused_imports)]
pub use interceptor_test_support::h2_backend;

// ---- backend -----------------------------------------------------------------------------

/// What a backend saw.
#[derive(Debug, Default)]
pub struct BackendState {
    pub name: String,
    pub calls: AtomicUsize,
    /// Added to every unary call (a slow endpoint).
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// Calls to /test.Echo/Hang that started.
    pub hang_started: Mutex<Vec<Instant>>,
    /// When handlers of /test.Echo/Hang were dropped (the stream was reset).
    pub hang_dropped: Mutex<Vec<Instant>>,
}

type BoxFut<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

#[derive(Clone)]
struct EchoService(Arc<BackendState>);

impl NamedService for EchoService {
    const NAME: &'static str = "test.Echo";
}

fn response_md(state: &BackendState, req: &MetadataMap) -> MetadataMap {
    let mut md = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(state.name.as_str()) {
        md.insert("x-backend", v);
    }
    if let Some(v) = req.get("x-echo") {
        md.insert("x-echo", v.clone());
    }
    if let Some(v) = req.get_bin("x-echo-bin") {
        md.insert_bin("x-echo-bin", v.clone());
    }
    md
}

/// `x-fail-code: N` makes the call fail with code N and the request payload (UTF-8) as the
/// message, so messages can hold any text.
fn requested_failure(req: &MetadataMap, payload: &[u8]) -> Option<Status> {
    let code = req.get("x-fail-code")?.to_str().ok()?.parse::<i32>().ok()?;
    let msg = String::from_utf8_lossy(payload).into_owned();
    let mut md = MetadataMap::new();
    md.insert("x-detail", MetadataValue::from_static("failure-detail"));
    Some(Status::with_metadata(Code::from_i32(code), msg, md))
}

/// Ends a response stream with OK plus a custom trailer.
fn ok_trailers() -> Status {
    let mut md = MetadataMap::new();
    md.insert("x-trailer", MetadataValue::from_static("done"));
    Status::with_metadata(Code::Ok, "", md)
}

fn with_md<T>(body: T, md: MetadataMap) -> Response<T> {
    let mut r = Response::new(body);
    *r.metadata_mut() = md;
    r
}

struct Unary(Arc<BackendState>);
impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFut<Result<Response<Bytes>, Status>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.calls.fetch_add(1, Ordering::Relaxed);
            let delay = state.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if let Some(ms) = req
                .metadata()
                .get("x-sleep-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if let Some(st) = requested_failure(req.metadata(), req.get_ref()) {
                return Err(st);
            }
            let md = response_md(&state, req.metadata());
            Ok(with_md(req.into_inner(), md))
        })
    }
}

/// Request: count (u32 LE), size (u32 LE), gap in ms (u32 LE, optional).
struct ServerStream(Arc<BackendState>);
impl tonic::server::ServerStreamingService<Bytes> for ServerStream {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFut<Result<Response<BoxStream>, Status>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.calls.fetch_add(1, Ordering::Relaxed);
            let md = response_md(&state, req.metadata());
            let mut b = req.into_inner();
            if b.len() < 8 {
                return Err(Status::invalid_argument("need count and size"));
            }
            let count = b.get_u32_le();
            let size = b.get_u32_le() as usize;
            let gap = if b.len() >= 4 { b.get_u32_le() } else { 0 };
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..count {
                    if gap > 0 {
                        tokio::time::sleep(Duration::from_millis(gap as u64)).await;
                    }
                    if tx.send(Ok(pattern(size, i as u8))).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Err(ok_trailers())).await;
            });
            Ok(with_md(Box::pin(ReceiverStream::new(rx)) as BoxStream, md))
        })
    }
}

/// Replies with total length (u64 LE) and FNV-1a of all bytes (u64 LE).
struct ClientStream(Arc<BackendState>);
impl tonic::server::ClientStreamingService<Bytes> for ClientStream {
    type Response = Bytes;
    type Future = BoxFut<Result<Response<Bytes>, Status>>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.calls.fetch_add(1, Ordering::Relaxed);
            let md = response_md(&state, req.metadata());
            let mut s = req.into_inner();
            let mut digest = Digest::default();
            while let Some(m) = s.message().await? {
                digest.update(&m);
            }
            Ok(with_md(digest.to_bytes(), md))
        })
    }
}

struct Bidi(Arc<BackendState>);
impl tonic::server::StreamingService<Bytes> for Bidi {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFut<Result<Response<BoxStream>, Status>>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.calls.fetch_add(1, Ordering::Relaxed);
            let md = response_md(&state, req.metadata());
            let mut s = req.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                loop {
                    match s.message().await {
                        Ok(Some(m)) => {
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(st) => {
                            let _ = tx.send(Err(st)).await;
                            return;
                        }
                    }
                }
                let _ = tx.send(Err(ok_trailers())).await;
            });
            Ok(with_md(Box::pin(ReceiverStream::new(rx)) as BoxStream, md))
        })
    }
}

struct DropMark(Arc<BackendState>);
impl Drop for DropMark {
    fn drop(&mut self) {
        if let Ok(mut v) = self.0.hang_dropped.lock() {
            v.push(Instant::now());
        }
    }
}

/// Never answers; records when it starts and when it is dropped (stream reset).
struct Hang(Arc<BackendState>);
impl tonic::server::UnaryService<Bytes> for Hang {
    type Response = Bytes;
    type Future = BoxFut<Result<Response<Bytes>, Status>>;
    fn call(&mut self, _req: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.calls.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut v) = state.hang_started.lock() {
                v.push(Instant::now());
            }
            let _mark = DropMark(state.clone());
            std::future::pending::<()>().await;
            Err(Status::internal("unreachable"))
        })
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFut<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.0.clone();
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MSG)
                .max_encoding_message_size(MAX_MSG);
            let resp = match path.as_str() {
                "/test.Echo/Unary" => grpc.unary(Unary(state), req).await,
                "/test.Echo/Hang" => grpc.unary(Hang(state), req).await,
                "/test.Echo/ServerStream" => grpc.server_streaming(ServerStream(state), req).await,
                "/test.Echo/ClientStream" => grpc.client_streaming(ClientStream(state), req).await,
                "/test.Echo/Bidi" => grpc.streaming(Bidi(state), req).await,
                _ => Status::unimplemented(path).into_http(),
            };
            Ok(resp)
        })
    }
}

/// A tonic gRPC server in its own thread and runtime, so that `kill` can drop every task
/// and socket at once like a crashed process.
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    graceful: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend on `ip` (a 127.0.0.0/8 address) and an ephemeral port.
    pub fn start(ip: [u8; 4], name: &str) -> Backend {
        Self::start_with(ip, name, None)
    }

    /// Like `start`, advertising SETTINGS_MAX_CONCURRENT_STREAMS = `max_streams`.
    pub fn start_with(ip: [u8; 4], name: &str, max_streams: Option<u32>) -> Backend {
        Self::spawn(ip, name, max_streams, None)
    }

    /// Like `start`, without h2's defence against streams reset before they were accepted
    /// (it closes the connection at 20): for tests of what the proxy itself does in a storm.
    #[allow(dead_code)]
    pub fn start_tolerating_resets(ip: [u8; 4], name: &str) -> Backend {
        Self::spawn(ip, name, None, Some(usize::MAX))
    }

    fn spawn(
        ip: [u8; 4],
        name: &str,
        max_streams: Option<u32>,
        pending_accept_resets: Option<usize>,
    ) -> Backend {
        assert_eq!(ip[0], 127, "tests only use 127.0.0.0/8");
        let listener =
            std::net::TcpListener::bind(SocketAddr::from((ip, 0))).expect("bind backend");
        listener
            .set_nonblocking(true)
            .expect("nonblocking backend listener");
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(BackendState {
            name: name.to_string(),
            ..Default::default()
        });
        let (graceful_tx, graceful_rx) = oneshot::channel::<()>();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let svc = EchoService(state.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("backend runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                let serve = tonic::transport::Server::builder()
                    .max_concurrent_streams(max_streams)
                    .http2_max_pending_accept_reset_streams(pending_accept_resets)
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = graceful_rx.await;
                    });
                tokio::select! {
                    r = serve => { let _ = r; }
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime drops every connection task: sockets close mid-stream.
            rt.shutdown_background();
        });
        Backend {
            addr,
            state,
            graceful: Some(graceful_tx),
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::Relaxed)
    }

    /// Graceful shutdown: GOAWAY, in-flight calls finish, listener closes.
    pub fn shutdown_gracefully(&mut self) {
        if let Some(tx) = self.graceful.take() {
            let _ = tx.send(());
        }
    }

    /// Abrupt stop: all connections close at once, in-flight calls get no response.
    pub fn kill(&mut self) {
        if let Some(tx) = self.kill.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- proxy and clients ---------------------------------------------------------------------

pub struct ProxyUnderTest {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for ProxyUnderTest {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A proxy on 127.0.0.1; its own listen address doubles as the destination key.
pub async fn start_proxy(config: ProxyConfig, endpoints: &[SocketAddr]) -> ProxyUnderTest {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let proxy = Proxy::new(config, Arc::new(TcpConnector));
    proxy.endpoints(addr).set_ready(endpoints.iter().copied());
    let p = proxy.clone();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let p = p.clone();
            tokio::spawn(async move {
                let _ = p.serve_connection(s, addr).await;
            });
        }
    });
    ProxyUnderTest {
        addr,
        proxy,
        accept,
    }
}

pub type Client = tonic::client::Grpc<Channel>;

/// One client connection (a tonic Channel to one address uses one HTTP/2 connection).
pub async fn client(addr: SocketAddr) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint uri")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect client to proxy");
    tonic::client::Grpc::new(ch)
        .max_decoding_message_size(MAX_MSG)
        .max_encoding_message_size(MAX_MSG)
}

fn path(method: &str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::try_from(format!("/test.Echo/{method}")).expect("path")
}

pub fn request<T>(msg: T, md: &[(&'static str, &str)]) -> Request<T> {
    let mut r = Request::new(msg);
    for (k, v) in md {
        r.metadata_mut()
            .insert(*k, MetadataValue::try_from(*v).expect("ascii metadata"));
    }
    r
}

pub async fn unary(c: &mut Client, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.unary(req, path("Unary"), RawCodec).await
}

pub async fn hang(c: &mut Client, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.unary(req, path("Hang"), RawCodec).await
}

pub async fn server_stream(
    c: &mut Client,
    req: Request<Bytes>,
) -> Result<Response<Streaming<Bytes>>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.server_streaming(req, path("ServerStream"), RawCodec)
        .await
}

pub async fn client_stream(
    c: &mut Client,
    msgs: Vec<Bytes>,
    md: &[(&'static str, &str)],
) -> Result<Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let req = request(tokio_stream::iter(msgs), md);
    c.client_streaming(req, path("ClientStream"), RawCodec)
        .await
}

pub async fn bidi<S>(c: &mut Client, req: Request<S>) -> Result<Response<Streaming<Bytes>>, Status>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.streaming(req, path("Bidi"), RawCodec).await
}

/// Deterministic payload of `size` bytes, varying with `seed`.
pub fn pattern(size: usize, seed: u8) -> Bytes {
    let mut v = Vec::with_capacity(size);
    for i in 0..size {
        v.push((i as u8).wrapping_mul(31).wrapping_add(seed));
    }
    Bytes::from(v)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub fnv: u64,
}

impl Digest {
    pub fn update(&mut self, b: &[u8]) {
        if self.len == 0 {
            self.fnv = 0xcbf2_9ce4_8422_2325;
        }
        for x in b {
            self.fnv ^= *x as u64;
            self.fnv = self.fnv.wrapping_mul(0x100_0000_01b3);
        }
        self.len += b.len() as u64;
    }
    pub fn to_bytes(self) -> Bytes {
        let mut v = Vec::with_capacity(16);
        v.put_u64_le(self.len);
        v.put_u64_le(self.fnv);
        Bytes::from(v)
    }
}

/// Backend name from the `x-backend` response header.
pub fn backend_of<T>(r: &Response<T>) -> String {
    r.metadata()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string()
}

pub fn shares(counts: &HashMap<String, usize>) -> Vec<(String, f64)> {
    let total: usize = counts.values().sum();
    let mut v: Vec<(String, f64)> = counts
        .iter()
        .map(|(k, n)| (k.clone(), *n as f64 / total.max(1) as f64))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Drains a response stream, returning messages and trailers.
pub async fn collect(mut s: Streaming<Bytes>) -> Result<(Vec<Bytes>, Option<MetadataMap>), Status> {
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.push(m?);
    }
    let t = s.trailers().await?;
    Ok((out, t))
}

// ---- a well-behaved client beside an attack --------------------------------------------------

/// What the legitimate client saw while something else went on.
#[derive(Debug)]
pub struct LegitReport {
    pub calls: usize,
    pub errors: Vec<String>,
    pub p99: Duration,
}

/// A client on its own connection making sequential unary calls (5 s deadline each) until
/// stopped: the one whose service an attack must not hurt.
pub struct Legit {
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<LegitReport>,
}

impl Legit {
    pub async fn start(addr: SocketAddr) -> Legit {
        let mut c = client(addr).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let done = Arc::new(AtomicUsize::new(0));
        let count = done.clone();
        let task = tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = Vec::new();
            // Bounded in count as well as by the stop flag.
            for i in 0..100_000u32 {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let msg = Bytes::from(format!("legit {i}"));
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    unary(&mut c, request(msg.clone(), &[("grpc-timeout", "5S")])),
                )
                .await;
                lat.push(t.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(Ok(resp)) if resp.get_ref() == &msg => {}
                    Ok(Ok(_)) => errors.push(format!("call {i}: wrong payload")),
                    Ok(Err(st)) => errors.push(format!("call {i}: {st:?}")),
                    Err(_) => errors.push(format!("call {i}: no answer in 5 s")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lat.sort();
            let p99 = lat
                .get(lat.len().saturating_sub(1) * 99 / 100)
                .copied()
                .unwrap_or_default();
            LegitReport {
                calls: lat.len(),
                errors,
                p99,
            }
        });
        Legit { stop, done, task }
    }

    /// Stops after at least 50 calls (or 10 s), so a short attack still has company.
    pub async fn stop(self) -> LegitReport {
        let until = Instant::now() + Duration::from_secs(10);
        while self.done.load(Ordering::Relaxed) < 50 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("legit client task")
    }
}

/// Asserts the legitimate client was served throughout: some calls, none failed, p99 < 500 ms.
pub fn assert_unharmed(r: &LegitReport) {
    println!(
        "legitimate client: {} calls, {} errors, p99 {:?}",
        r.calls,
        r.errors.len(),
        r.p99
    );
    assert!(
        r.calls >= 10,
        "the legitimate client made only {} calls",
        r.calls
    );
    assert!(
        r.errors.is_empty(),
        "legitimate calls failed: {:?}",
        r.errors
    );
    assert!(
        r.p99 < Duration::from_millis(500),
        "legitimate p99 {:?}",
        r.p99
    );
}

/// This process's resident set, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

// Raw HTTP/2, for what no client library sends: bad frames, padding, unfinished blocks.

pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

// Frame types and flags (RFC 9113 6).
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 1;
pub const END_HEADERS: u8 = 4;
pub const PADDED: u8 = 8;

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1) after the flag bits `first`.
pub fn hpack_int(out: &mut Vec<u8>, n: u8, first: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A plain (not Huffman) HPACK string.
pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// :method POST, :scheme http, :path /test.Echo/Unary, :authority svc.test, from the static
/// table and literals that are not indexed.
pub fn request_pseudo() -> Vec<u8> {
    let mut b = vec![0x83, 0x86];
    hpack_int(&mut b, 4, 0, 4);
    hpack_str(&mut b, b"/test.Echo/Unary");
    hpack_int(&mut b, 4, 0, 1);
    hpack_str(&mut b, b"svc.test");
    b
}

/// A frame as `raw_conn` read it: type, stream id, payload, flags.
pub type RawFrame = (u8, u32, Vec<u8>, u8);

/// Opens a raw HTTP/2 connection (preface and empty SETTINGS) and reads whatever the proxy
/// sends in the background; returns the writer and the frames read once the proxy closes or
/// `read_for` passes.
pub async fn raw_conn(
    addr: SocketAddr,
    read_for: Duration,
) -> (
    tokio::net::tcp::OwnedWriteHalf,
    tokio::task::JoinHandle<Vec<RawFrame>>,
) {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect proxy");
    let (mut r, mut w) = s.into_split();
    w.write_all(interceptor::proxy::detect::H2_PREFACE)
        .await
        .expect("preface");
    w.write_all(&frame(4, 0, 0, &[])).await.expect("settings");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(read_for, r.read_to_end(&mut got)).await;
        parse_frames(&got)
    });
    (w, reader)
}

/// The error code of the RST_STREAM the proxy sent on stream `id`, if it sent one.
pub fn reset_code(frames: &[RawFrame], id: u32) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.0 == RST_STREAM && f.1 == id && f.2.len() == 4)
        .map(|f| u32::from_be_bytes([f.2[0], f.2[1], f.2[2], f.2[3]]))
}

/// The error code of the GOAWAY the proxy sent, if it sent one.
pub fn raw_goaway_code(frames: &[RawFrame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.0 == GOAWAY && f.2.len() >= 8)
        .map(|f| u32::from_be_bytes([f.2[4], f.2[5], f.2[6], f.2[7]]))
}

/// Type and stream of each frame, for assertion messages.
pub fn frame_kinds(frames: &[RawFrame]) -> Vec<(u8, u32)> {
    frames.iter().map(|f| (f.0, f.1)).collect()
}

/// The whole frames in `bytes`.
pub fn parse_frames(bytes: &[u8]) -> Vec<RawFrame> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = ((rest[0] as usize) << 16) | ((rest[1] as usize) << 8) | rest[2] as usize;
        if rest.len() < 9 + len {
            break;
        }
        let id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        frames.push((rest[3], id, rest[9..9 + len].to_vec(), rest[4]));
        rest = &rest[9 + len..];
    }
    frames
}

/// A proxy in front of `backend` granting the protocol's smallest windows, 64 KiB less one on
/// a stream and on the connection, so that a test's client reaches them soon.
pub async fn small_window_proxy(backend: SocketAddr) -> ProxyUnderTest {
    let cfg = ProxyConfig {
        stream_window: 65_535,
        connection_window: 65_535,
        ..ProxyConfig::default()
    };
    start_proxy(cfg, &[backend]).await
}

/// A child process (the real `interceptor proxy` binary), killed and reaped on drop, also when
/// the test fails.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free on 127.0.0.1 when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits up to 10 s for a process started by the test to listen on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let up = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < up,
            "the proxy did not start listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- an endpoint that answers its first connection with GOAWAY ------------------------------

/// How `goaway_endpoint` ends its first connection after the GOAWAY.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AfterGoaway {
    /// Closes at once with the proxy's bytes unread, so the kernel resets the connection: the
    /// proxy's next write fails before it read the GOAWAY.
    Reset,
    /// Reads until the proxy closes, as a server that flushed its GOAWAY and drains does.
    Drain,
}

/// An endpoint whose first connection answers the handshake with a burst that ends in GOAWAY
/// ENHANCE_YOUR_CALM (last stream 0: nothing processed), what a server closing its connection
/// for a burst of resets sends; later connections are served by h2. The burst is longer than
/// the relay reads in one turn, so with `AfterGoaway::Reset` the relay's next write meets the
/// reset before the GOAWAY was read. Returns the address and the connections accepted.
#[allow(dead_code)]
pub async fn goaway_endpoint(ip: [u8; 4], after: AfterGoaway) -> (SocketAddr, Arc<AtomicUsize>) {
    let mut burst = raw_frame(4, 0, &[]);
    for _ in 0..300 {
        // Unsolicited PING acks: read and ignored.
        burst.extend(raw_frame(6, 1, b"whatever"));
    }
    let enhance_your_calm = 0xb_u32;
    let goaway: Vec<u8> = 0u32
        .to_be_bytes()
        .into_iter()
        .chain(enhance_your_calm.to_be_bytes())
        .collect();
    burst.extend(raw_frame(7, 0, &goaway));
    first_connection_says(ip, burst, after).await
}

/// One HTTP/2 frame on stream 0.
#[allow(dead_code)]
pub fn raw_frame(ty: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![
        (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
        ty,
        flags,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(payload);
    f
}

/// An endpoint whose first connection gets `burst` once the proxy's preface arrives, and is
/// then closed as `after` says; later connections are served by h2. Returns the address and
/// the connections accepted.
#[allow(dead_code)]
pub async fn first_connection_says(
    ip: [u8; 4],
    burst: Vec<u8>,
    after: AfterGoaway,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind endpoint");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            if count.fetch_add(1, Ordering::SeqCst) > 0 {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(s).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(h2_backend::answer_grpc_ok(req, respond));
                    }
                });
                continue;
            }
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).await.is_err() {
                continue;
            }
            let _ = s.write_all(&burst).await;
            if after == AfterGoaway::Drain {
                let mut rest = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            }
            drop(s);
        }
    });
    (addr, accepted)
}
