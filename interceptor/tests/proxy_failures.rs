//! Cancellation, resets, deadlines, endpoint shutdown and crashes, and the absence of any
//! usable endpoint.

#[path = "proxy_support.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::Reason;
use interceptor::proxy::config::ProxyConfig;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

/// A raw h2 backend whose behaviour is chosen by path:
/// `/reset-before/N` resets with reason N before any response; `/reset-after/N` sends
/// headers and one DATA frame, then resets with N; `/early-response` sends a complete
/// response (headers, DATA, trailers) without reading the request and drops the stream, so
/// h2 follows it with RST_STREAM(NO_ERROR) (RFC 9113 8.1, what C-core and grpc-go servers
/// do); `/echo-timeout` answers with the grpc-timeout it received in `x-grpc-timeout`;
/// `/hang` never answers and reports when its stream is reset.
async fn raw_backend(
    ip: [u8; 4],
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
) {
    let l = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind raw h2 backend");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(h2_backend::serve_default(l, move |req, mut respond| {
        let tx = tx.clone();
        async move {
            let path = req.uri().path().to_string();
            let _ = tx.send((format!("start {path}"), Instant::now()));
            let reason = |p: &str| {
                Reason::from(
                    p.rsplit('/')
                        .next()
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(2),
                )
            };
            if path.starts_with("/reset-before/") {
                respond.send_reset(reason(&path));
            } else if path.starts_with("/reset-after/") {
                let Some(mut s) = grpc_message_sent(&mut respond) else {
                    return;
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
                s.send_reset(reason(&path));
            } else if path == "/echo-timeout" {
                let mut resp = http::Response::new(());
                if let Some(v) = req.headers().get("grpc-timeout") {
                    resp.headers_mut().insert("x-grpc-timeout", v.clone());
                }
                let _ = respond.send_response(resp, true);
            } else if path == "/early-response" {
                let Some(mut s) = grpc_message_sent(&mut respond) else {
                    return;
                };
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = s.send_trailers(trailers);
                // Dropping the request body and the handles while the request is
                // still open is what makes h2 send RST_STREAM(NO_ERROR).
                drop((req, s, respond));
            } else {
                let r = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                let _ = tx.send((format!("reset {r:?}"), Instant::now()));
            }
        }
    }));
    (addr, rx)
}

/// Sends gRPC response headers and one 1-byte message; None if the stream is gone.
fn grpc_message_sent(
    respond: &mut h2::server::SendResponse<Bytes>,
) -> Option<h2::SendStream<Bytes>> {
    let mut resp = http::Response::new(());
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    let mut s = respond.send_response(resp, false).ok()?;
    let _ = s.send_data(Bytes::from_static(b"\0\0\0\0\x01z"), false);
    Some(s)
}

/// A raw h2 client connection to the proxy.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let s = TcpStream::connect(addr).await.expect("connect proxy");
    let (send, conn) = h2::client::handshake(s)
        .await
        .expect("h2 handshake with proxy");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn grpc_request(path: &str, extra: &[(&'static str, &'static str)]) -> http::Request<()> {
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://svc.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.body(()).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_resets_the_upstream_stream_within_100ms() {
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let mut c = client(p.addr).await;
    for round in 0..3 {
        let call = tokio::spawn({
            let mut c = c.clone();
            async move { hang(&mut c, request(Bytes::from_static(b"wait"), &[])).await }
        });
        timeout(LIMIT, async {
            while b.state.hang_started.lock().expect("lock").len() <= round {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("call reached the backend");
        let cancelled = Instant::now();
        call.abort();
        let dropped = timeout(LIMIT, async {
            loop {
                if let Some(t) = b
                    .state
                    .hang_dropped
                    .lock()
                    .expect("lock")
                    .get(round)
                    .copied()
                {
                    return t;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("backend saw the cancellation");
        let took = dropped.saturating_duration_since(cancelled);
        println!("cancel reached the backend after {took:?}");
        assert!(took <= Duration::from_millis(100), "cancel took {took:?}");
    }
    // The connection is still usable.
    unary(&mut c, request(Bytes::from_static(b"after"), &[]))
        .await
        .expect("call after cancels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_the_client_with_its_reason() {
    let (addr, _events) = raw_backend([127, 0, 0, 2]).await;
    let p = start_proxy(ProxyConfig::default(), &[addr]).await;
    let mut send = h2_client(p.addr).await;
    for (path, reason) in [
        ("/reset-before/11", Reason::ENHANCE_YOUR_CALM),
        ("/reset-before/2", Reason::INTERNAL_ERROR),
        ("/reset-after/8", Reason::CANCEL),
        ("/reset-after/12", Reason::INADEQUATE_SECURITY),
    ] {
        send = send.ready().await.expect("ready");
        let (resp, _body) = send
            .send_request(grpc_request(path, &[]), true)
            .expect("send");
        let outcome = timeout(LIMIT, async {
            let resp = resp.await?;
            let mut body = resp.into_body();
            while let Some(chunk) = body.data().await {
                chunk?;
            }
            body.trailers().await.map(|_| ())
        })
        .await
        .expect("outcome in time");
        let err = outcome.expect_err("the stream was reset");
        assert_eq!(err.reason(), Some(reason), "{path}: {err:?}");
        assert!(err.is_reset(), "{path}: {err:?}");
    }
}

/// A backend that answers completely before the request ended and then resets the stream
/// with NO_ERROR: the client gets the whole response, trailers included, never a bare reset
/// (which gRPC clients report as INTERNAL "RST_STREAM with error code 0").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_response_then_reset_no_error_reaches_the_client_whole() {
    let (backend, _events) = raw_backend([127, 0, 0, 1]).await;
    let proxy = start_proxy(ProxyConfig::default(), &[backend]).await;
    let mut send = h2_client(proxy.addr).await;
    for i in 0..200 {
        send = send.ready().await.expect("connection ready");
        let (resp, mut body_tx) = send
            .send_request(grpc_request("/early-response", &[]), false)
            .expect("send request");
        // Part of the request body; its end is never sent before the response is complete.
        // This may already fail: on a busy machine the whole exchange, the backend's
        // RST_STREAM(NO_ERROR) and the proxy's included, can finish before this line runs.
        // What the test checks is the response.
        let _ = body_tx.send_data(Bytes::from_static(b"\0\0\0\0\x01x"), false);
        let resp = timeout(LIMIT, resp)
            .await
            .expect("response within the limit")
            .unwrap_or_else(|e| panic!("call {i}: response headers: {e}"));
        assert_eq!(resp.status(), 200, "call {i}");
        let mut body = resp.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("call {i}: response body: {e}"));
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        assert_eq!(data, b"\0\0\0\0\x01z", "call {i}: response body");
        let trailers = body
            .trailers()
            .await
            .unwrap_or_else(|e| panic!("call {i}: the trailers were lost to a reset: {e}"))
            .unwrap_or_else(|| panic!("call {i}: response ended without trailers"));
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "call {i}: trailers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_enforced_and_resets_upstream() {
    let (addr, mut events) = raw_backend([127, 0, 0, 2]).await;
    let p = start_proxy(ProxyConfig::default(), &[addr]).await;
    let send = h2_client(p.addr).await;
    let mut send = send.ready().await.expect("ready");
    let started = Instant::now();
    let (resp, _body) = send
        .send_request(grpc_request("/hang", &[("grpc-timeout", "200m")]), true)
        .expect("send");
    let resp = timeout(LIMIT, resp)
        .await
        .expect("answer in time")
        .expect("response");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
        "answered after {took:?}"
    );
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("grpc-status")
            .expect("trailers-only status"),
        "4"
    );
    let reset = timeout(LIMIT, async {
        loop {
            let (what, _) = events.recv().await.expect("backend event");
            if what.starts_with("reset") {
                return what;
            }
        }
    })
    .await
    .expect("backend stream reset");
    assert!(reset.contains("CANCEL"), "{reset}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_endpoint_answers_unavailable_at_once() {
    let p = start_proxy(ProxyConfig::default(), &[]).await;
    let mut c = client(p.addr).await;
    let started = Instant::now();
    let st = unary(&mut c, request(Bytes::from_static(b"x"), &[]))
        .await
        .expect_err("no endpoint");
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "took {:?}",
        started.elapsed()
    );

    // Non-gRPC HTTP/2 gets a 503.
    let send = h2_client(p.addr).await;
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::builder()
        .uri("http://svc.test/")
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), http::StatusCode::SERVICE_UNAVAILABLE);

    // Endpoints that all refuse connections: UNAVAILABLE too, and fast.
    let dead: Vec<SocketAddr> = (2..=4)
        .map(|i| {
            std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, i], 0)))
                .expect("bind")
                .local_addr()
                .expect("addr")
        })
        .collect();
    p.proxy.endpoints(p.addr).set_ready(dead);
    for _ in 0..5 {
        let started = Instant::now();
        let st = unary(&mut c, request(Bytes::from_static(b"x"), &[]))
            .await
            .expect_err("all refuse");
        assert_eq!(st.code(), Code::Unavailable, "{st:?}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoint_is_skipped_and_ejected() {
    let live = Backend::start([127, 0, 0, 2], "b2");
    let dead = std::net::TcpListener::bind("127.0.0.3:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let p = start_proxy(ProxyConfig::default(), &[live.addr, dead]).await;
    let mut c = client(p.addr).await;
    for _ in 0..200 {
        unary(&mut c, request(Bytes::from_static(b"x"), &[]))
            .await
            .expect("call succeeds despite a dead endpoint");
    }
    let stats = p
        .proxy
        .endpoints(p.addr)
        .destination()
        .stats(dead)
        .expect("stats");
    assert!(stats.is_ejected(), "the dead endpoint was ejected");
    assert_eq!(live.calls(), 200);
}

/// Load with per-call latency, counting failures by code.
struct Load {
    failures: Arc<Mutex<Vec<(Instant, Code)>>>,
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    async fn start(addr: SocketAddr, concurrency: usize, sleep_ms: &'static str) -> Load {
        let c = client(addr).await;
        let failures = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (mut c, failures, ok, stop) =
                (c.clone(), failures.clone(), ok.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match unary(
                        &mut c,
                        request(Bytes::from_static(b"load"), &[("x-sleep-ms", sleep_ms)]),
                    )
                    .await
                    {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(st) => {
                            eprintln!("call failed: {st:?}");
                            failures
                                .lock()
                                .expect("lock")
                                .push((Instant::now(), st.code()));
                        }
                    }
                }
            });
        }
        Load {
            failures,
            ok,
            stop,
            tasks,
        }
    }

    async fn stop(mut self) -> (usize, Vec<(Instant, Code)>) {
        self.stop.store(true, Ordering::Relaxed);
        timeout(LIMIT, async {
            while let Some(r) = self.tasks.join_next().await {
                r.expect("load task");
            }
        })
        .await
        .expect("load stopped");
        let f = self.failures.lock().expect("lock").clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_graceful_shutdown_under_load_fails_no_call() {
    let mut backends: Vec<Backend> = (2..=4)
        .map(|i| Backend::start([127, 0, 0, i], &format!("b{i}")))
        .collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let load = Load::start(p.addr, 24, "5").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = backends[0].calls();
    backends[0].shutdown_gracefully();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, failures) = load.stop().await;
    println!(
        "{ok} calls ok; b2 took {before} before its shutdown, {} in all",
        backends[0].calls()
    );
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    assert!(before > 0 && ok > before * 2);
    // The other two carried the load after the shutdown.
    let rest: HashMap<_, _> = backends[1..]
        .iter()
        .map(|b| (b.state.name.clone(), b.calls()))
        .collect();
    assert!(rest.values().all(|n| *n > 0), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_fails_only_its_in_flight_calls_with_unavailable() {
    let mut backends: Vec<Backend> = (2..=4)
        .map(|i| Backend::start([127, 0, 0, i], &format!("b{i}")))
        .collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let concurrency = 12;
    let load = Load::start(p.addr, concurrency, "30").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let killed = Instant::now();
    backends[0].kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, failures) = load.stop().await;
    println!("{ok} calls ok, {} failed: {failures:?}", failures.len());
    assert!(
        failures.iter().all(|(_, c)| *c == Code::Unavailable),
        "{failures:?}"
    );
    // Only calls in flight on the killed backend may fail: at most its share of the
    // concurrency, and only right at the kill.
    assert!(failures.len() <= concurrency, "{} failures", failures.len());
    assert!(
        failures
            .iter()
            .all(|(t, _)| t.saturating_duration_since(killed) < Duration::from_millis(200)),
        "failures after the kill settled: {failures:?}"
    );
    assert!(ok > 100);
}

/// A TCP relay in front of a backend whose existing connections can be frozen (bytes stop
/// flowing both ways, the sockets stay open: a black-holed peer); connections accepted later
/// flow normally.
struct FreezableRelay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    frozen_up_to: Arc<AtomicUsize>,
}

impl FreezableRelay {
    async fn start(backend: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let frozen_up_to = Arc::new(AtomicUsize::new(0));
        let (acc, frozen) = (accepted.clone(), frozen_up_to.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = acc.fetch_add(1, Ordering::Relaxed) + 1;
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let a = tokio::spawn(pump(cr, sw, generation, frozen.clone()));
                    let b = tokio::spawn(pump(sr, cw, generation, frozen));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Self {
            addr,
            accepted,
            frozen_up_to,
        }
    }

    /// Freezes every connection accepted so far.
    fn freeze_existing(&self) {
        self.frozen_up_to
            .store(self.accepted.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    generation: usize,
    frozen_up_to: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation <= frozen_up_to.load(Ordering::Relaxed) {
            // Black hole: swallow everything, answer nothing, keep the socket open.
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_connection_is_found_by_keepalive_and_replaced() {
    let backend = Backend::start([127, 0, 0, 3], "b3");
    let relay = FreezableRelay::start(backend.addr).await;
    let p = start_proxy(
        ProxyConfig {
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        &[relay.addr],
    )
    .await;
    let mut c = client(p.addr).await;
    unary(&mut c, request(Bytes::from_static(b"warm"), &[]))
        .await
        .expect("call through the relay");
    assert_eq!(
        relay.accepted.load(Ordering::Relaxed),
        1,
        "one pooled connection"
    );

    // The peer goes silent without closing: only PING can tell.
    relay.freeze_existing();
    let frozen_at = Instant::now();
    let deadline = frozen_at + Duration::from_secs(5);
    while relay.accepted.load(Ordering::Relaxed) < 2
        || p.proxy.upstream_connections(relay.addr) == 0
    {
        // Nudge the pool: a call made after the keepalive verdict opens a fresh connection.
        let _ = timeout(
            Duration::from_millis(300),
            unary(&mut c, request(Bytes::from_static(b"probe"), &[])),
        )
        .await;
        assert!(
            Instant::now() < deadline,
            "the silent connection was never replaced"
        );
    }
    let replaced = frozen_at.elapsed();
    println!(
        "silent upstream connection replaced {} ms after it went quiet",
        replaced.as_millis()
    );
    let r = timeout(
        Duration::from_secs(2),
        unary(&mut c, request(Bytes::from_static(b"after"), &[])),
    )
    .await
    .expect("a call after the keepalive verdict does not hang")
    .expect("and succeeds on the new connection");
    assert_eq!(backend_of(&r), "b3");
}

// ---- endpoints that fail in ways a healthy peer does not ------------------------------------

/// How `broken_backend` answers every request: response headers, then garbage on the
/// connection, or one DATA frame and a closed socket.
#[derive(Clone, Copy, Debug)]
enum Breakage {
    GarbageAfterHeaders,
    CloseMidResponse,
}

/// A hand-written HTTP/2 server (SETTINGS, PING and HEADERS are all it understands) that
/// breaks every response after its headers, which an h2-based server cannot be made to do.
async fn broken_backend(ip: [u8; 4], how: Breakage) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind broken backend");
    let addr = l.local_addr().expect("addr");
    let frame = |ty: u8, flags: u8, id: u32, payload: &[u8]| {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                if s.write_all(&frame(4, 0, 0, &[])).await.is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len =
                        ((head[0] as usize) << 16) | ((head[1] as usize) << 8) | head[2] as usize;
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let out = match (head[3], head[4]) {
                        (4, f) if f & 1 == 0 => frame(4, 1, 0, &[]),
                        (6, f) if f & 1 == 0 => frame(6, 1, 0, &payload),
                        (1, _) => {
                            // :status 200 from the static table.
                            let mut out = frame(1, 4, id, &[0x88]);
                            match how {
                                Breakage::GarbageAfterHeaders => out.extend_from_slice(&[0xff; 64]),
                                Breakage::CloseMidResponse => {
                                    out.extend(frame(0, 0, id, b"\0\0\0\0\x05hal"));
                                    let _ = s.write_all(&out).await;
                                    return;
                                }
                            }
                            out
                        }
                        _ => continue,
                    };
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sequential unary calls through `p`; returns (failures, the slowest failed call).
async fn call_sequentially(
    p: &ProxyUnderTest,
    calls: usize,
    md: &[(&'static str, &str)],
) -> (Vec<Code>, Duration) {
    let mut c = client(p.addr).await;
    let mut failed = Vec::new();
    let mut slowest_failure = Duration::ZERO;
    for i in 0..calls {
        let t = Instant::now();
        let r = timeout(
            LIMIT,
            unary(&mut c, request(Bytes::from(format!("c{i}")), md)),
        )
        .await
        .expect("every call ends");
        if let Err(st) = r {
            failed.push(st.code());
            slowest_failure = slowest_failure.max(t.elapsed());
        }
    }
    (failed, slowest_failure)
}

fn ejected(p: &ProxyUnderTest, addrs: &[SocketAddr]) -> usize {
    let d = p.proxy.endpoints(p.addr);
    addrs
        .iter()
        .filter(|a| d.destination().stats(**a).is_some_and(|s| s.is_ejected()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_that_breaks_responses_after_the_headers_is_ejected() {
    for (i, how) in [Breakage::GarbageAfterHeaders, Breakage::CloseMidResponse]
        .into_iter()
        .enumerate()
    {
        let good: Vec<Backend> = (0..2)
            .map(|j| Backend::start([127, 0, 1 + i as u8, 2 + j], &format!("g{j}")))
            .collect();
        let bad = broken_backend([127, 0, 1 + i as u8, 9], how).await;
        let p = start_proxy(ProxyConfig::default(), &[good[0].addr, good[1].addr, bad]).await;
        let (failed, _) = call_sequentially(&p, 300, &[]).await;
        let served: usize = good.iter().map(|b| b.calls()).sum();
        println!(
            "{how:?}: 300 calls, {} failed ({failed:?}), {served} served by the healthy two",
            failed.len()
        );
        // Each failure is a broken response the client had to see; before failures after
        // the headers counted, the endpoint kept a third of the calls (about 100 failed).
        assert!(!failed.is_empty(), "the broken endpoint was tried");
        assert!(failed.len() <= 12, "{} calls failed", failed.len());
        assert!(
            failed
                .iter()
                .all(|c| *c == Code::Unavailable || *c == Code::Internal),
            "{failed:?}"
        );
        assert_eq!(served + failed.len(), 300);
        assert_eq!(
            ejected(&p, &[good[0].addr, good[1].addr]),
            0,
            "a healthy endpoint was ejected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_that_never_answers_ends_calls_in_time_and_is_ejected_by_deadlines() {
    // With a deadline: each call to the silent endpoint ends at its deadline.
    let good: Vec<Backend> = (2..=3)
        .map(|j| Backend::start([127, 0, 3, j], &format!("g{j}")))
        .collect();
    let (hole, _) = raw_backend([127, 0, 3, 9]).await;
    let p = start_proxy(ProxyConfig::default(), &[good[0].addr, good[1].addr, hole]).await;
    let (failed, slowest) = call_sequentially(&p, 100, &[("grpc-timeout", "200m")]).await;
    println!(
        "200 ms deadline: {} of 100 calls failed, slowest failure {slowest:?}",
        failed.len()
    );
    assert!(!failed.is_empty() && failed.len() <= 6, "{failed:?}");
    // The client's own deadline and the proxy's race: either code is the deadline.
    assert!(
        failed
            .iter()
            .all(|c| *c == Code::DeadlineExceeded || *c == Code::Cancelled),
        "{failed:?}"
    );
    assert!(
        slowest < Duration::from_millis(450),
        "a failed call took {slowest:?}"
    );
    assert_eq!(ejected(&p, &[good[0].addr, good[1].addr]), 0);

    // Without one: the stream idle timeout ends them, with UNAVAILABLE. That is not charged
    // to the endpoint (a server may send the headers of a quiet stream, a watch, only with
    // its first message), so the silent endpoint keeps its share of such calls.
    let good: Vec<Backend> = (2..=3)
        .map(|j| Backend::start([127, 0, 4, j], &format!("g{j}")))
        .collect();
    let (hole, _) = raw_backend([127, 0, 4, 9]).await;
    let cfg = ProxyConfig {
        stream_idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let p = start_proxy(cfg, &[good[0].addr, good[1].addr, hole]).await;
    let (failed, slowest) = call_sequentially(&p, 30, &[]).await;
    println!(
        "no deadline, 300 ms idle timeout: {} of 30 calls failed, slowest failure {slowest:?}",
        failed.len()
    );
    assert!(!failed.is_empty(), "the silent endpoint was tried");
    assert!(failed.iter().all(|c| *c == Code::Unavailable), "{failed:?}");
    assert!(
        slowest < Duration::from_millis(550),
        "a failed call took {slowest:?}"
    );
    assert_eq!(ejected(&p, &[good[0].addr, good[1].addr, hole]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_is_bounded_and_relative() {
    let dead = |ip: [u8; 4]| {
        std::net::TcpListener::bind(SocketAddr::from((ip, 0)))
            .expect("bind")
            .local_addr()
            .expect("addr")
    };
    // 3 of 4 refuse connections: at most 2 are ejected at any time, and every call still
    // succeeds on the live one.
    let live = Backend::start([127, 0, 5, 2], "live");
    let dead3: Vec<SocketAddr> = (3..=5).map(|i| dead([127, 0, 5, i])).collect();
    let mut all = vec![live.addr];
    all.extend(&dead3);
    let p = start_proxy(ProxyConfig::default(), &all).await;
    let mut c = client(p.addr).await;
    let mut most = 0;
    for i in 0..300 {
        unary(&mut c, request(Bytes::from(format!("b{i}")), &[]))
            .await
            .expect("a call succeeds while one endpoint is live");
        most = most.max(ejected(&p, &dead3));
    }
    println!("3 of 4 endpoints dead: at most {most} ejected at once");
    assert!(most >= 1, "a dead endpoint beside a live one is ejected");
    assert!(most <= 2, "{most} of 4 ejected");
    assert_eq!(ejected(&p, &[live.addr]), 0);

    // All dead: the failure is not any one endpoint's, so none is ejected and each call
    // still tries them (and fails fast).
    let dead2: Vec<SocketAddr> = (6..=7).map(|i| dead([127, 0, 5, i])).collect();
    let p = start_proxy(ProxyConfig::default(), &dead2).await;
    let mut c = client(p.addr).await;
    for i in 0..30 {
        let st = unary(&mut c, request(Bytes::from(format!("d{i}")), &[]))
            .await
            .expect_err("nothing is listening");
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(
            ejected(&p, &dead2),
            0,
            "an endpoint was ejected while every peer failed too"
        );
    }
}

/// Accepts TCP connections on `ip` and holds them without a byte: an endpoint whose HTTP/2
/// handshake never completes.
async fn silent_listener(ip: [u8; 4]) -> SocketAddr {
    let silent = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_connection_ends_at_its_deadline() {
    // Accepts TCP and never speaks: every HTTP/2 handshake with it waits out connect_timeout
    // (1 s), and three attempts took 3 s for a call with a 300 ms deadline.
    let addr = silent_listener([127, 0, 0, 6]).await;
    let p = start_proxy(ProxyConfig::default(), &[addr]).await;
    let c = client(p.addr).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = unary(
                &mut c,
                request(Bytes::from(format!("q{i}")), &[("grpc-timeout", "300m")]),
            )
            .await;
            (r.map(|_| ()), t.elapsed())
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (r, took) = r.expect("call task");
        let st = r.expect_err("the endpoint never answers");
        // tonic enforces the deadline too; which side ends the call first is a race.
        assert!(
            st.code() == Code::DeadlineExceeded || st.code() == Code::Cancelled,
            "{st:?}"
        );
        assert!(
            took < Duration::from_millis(550),
            "a 300 ms call took {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_that_never_completes_the_handshake_is_ejected_though_every_deadline_is_shorter() {
    // Accepts TCP and never speaks HTTP/2. Every call has a 200 ms deadline, a fifth of
    // connect_timeout, so no call is still waiting when a handshake times out: the connect
    // must be charged on its own, or the endpoint is never ejected and keeps failing calls.
    let good: Vec<Backend> = (2..=3)
        .map(|j| Backend::start([127, 0, 6, j], &format!("g{j}")))
        .collect();
    let hole = silent_listener([127, 0, 6, 9]).await;
    let p = start_proxy(ProxyConfig::default(), &[good[0].addr, good[1].addr, hole]).await;
    let mut c = client(p.addr).await;
    let started = Instant::now();
    let (mut calls, mut failed, mut ejected_after) = (0, 0, None);
    while calls < 2000 && started.elapsed() < Duration::from_secs(6) {
        let r = timeout(
            LIMIT,
            unary(
                &mut c,
                request(
                    Bytes::from(format!("h{calls}")),
                    &[("grpc-timeout", "200m")],
                ),
            ),
        )
        .await
        .expect("every call ends");
        calls += 1;
        if let Err(st) = r {
            failed += 1;
            assert!(
                st.code() == Code::DeadlineExceeded || st.code() == Code::Cancelled,
                "{st:?}"
            );
        }
        if ejected_after.is_none() && ejected(&p, &[hole]) == 1 {
            ejected_after = Some((started.elapsed(), failed));
        }
        assert_eq!(
            ejected(&p, &[good[0].addr, good[1].addr]),
            0,
            "a healthy endpoint was ejected"
        );
    }
    println!("silent handshake, 200 ms deadlines: {calls} calls in {:?}, {failed} failed, ejected after (time, failures) {ejected_after:?}", started.elapsed());
    let (after, failures) = ejected_after.expect("the silent endpoint was never ejected");
    // Three handshakes time out one after another (3 x 1 s) before the ejection.
    assert!(
        after < Duration::from_secs(5),
        "ejected only after {after:?}"
    );
    assert!(
        failures <= 20,
        "{failures} calls failed before the ejection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_is_told_the_time_left_less_a_margin() {
    let (backend, _events) = raw_backend([127, 0, 0, 7]).await;
    let proxy = start_proxy(ProxyConfig::default(), &[backend]).await;
    let mut send = h2_client(proxy.addr).await;
    send = send.ready().await.expect("ready");
    let (resp, _) = send
        .send_request(
            grpc_request("/echo-timeout", &[("grpc-timeout", "2S")]),
            true,
        )
        .expect("send");
    let resp = timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("response");
    let told = resp
        .headers()
        .get("x-grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .expect("the endpoint got a grpc-timeout")
        .to_string();
    let ms: u64 = told.trim_end_matches('m').parse().expect("milliseconds");
    println!("client 2S, endpoint told {told}");
    // Less than the client's 2 s by at least the 10 ms margin, and not much more.
    assert!(told.ends_with('m') && (1900..=1990).contains(&ms), "{told}");
}

/// An HTTP/2 endpoint that answers every call at once with gRPC status `status` (trailers-only,
/// after reading the request), optionally asking for a pause with grpc-retry-pushback-ms.
/// Returns its address and how many calls it answered.
async fn failing_backend(
    ip: [u8; 4],
    status: &'static str,
    pushback_ms: Option<&'static str>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind failing backend");
    let addr = l.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    tokio::spawn(h2_backend::serve_default(l, move |req, mut respond| {
        let count = count.clone();
        async move {
            let mut body = req.into_body();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            count.fetch_add(1, Ordering::Relaxed);
            let mut resp = http::Response::new(());
            let h = resp.headers_mut();
            h.insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", http::HeaderValue::from_static(status));
            if let Some(p) = pushback_ms {
                h.insert("grpc-retry-pushback-ms", http::HeaderValue::from_static(p));
            }
            let _ = respond.send_response(resp, true);
        }
    }));
    (addr, calls)
}

/// 8 concurrent callers on one connection for `d`; returns (calls, failed calls).
async fn load_for(p: &ProxyUnderTest, d: Duration) -> (usize, usize) {
    let c = client(p.addr).await;
    let deadline = Instant::now() + d;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let (mut n, mut failed) = (0, 0);
            // Bounded in count as well as in time.
            while Instant::now() < deadline && n < 50_000 {
                let r = unary(&mut c, request(Bytes::from(format!("w{w}")), &[])).await;
                n += 1;
                if r.is_err() {
                    failed += 1;
                }
            }
            (n, failed)
        });
    }
    let (mut n, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (a, b) = r.expect("caller");
        n += a;
        failed += b;
    }
    (n, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_fast_gets_almost_no_calls_and_its_peers_a_fair_share() {
    let good: Vec<Backend> = (2..=4)
        .map(|j| Backend::start([127, 0, 7, j], &format!("g{j}")))
        .collect();
    let (bad, bad_calls) = failing_backend([127, 0, 7, 9], "14", None).await;
    let addrs: Vec<SocketAddr> = good.iter().map(|b| b.addr).chain([bad]).collect();
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let (calls, failed) = load_for(&p, Duration::from_secs(1)).await;
    let bad_n = bad_calls.load(Ordering::Relaxed);
    let shares: Vec<f64> = good
        .iter()
        .map(|b| b.calls() as f64 / calls as f64)
        .collect();
    println!(
        "1 of 4 endpoints answers UNAVAILABLE at once: {calls} calls in 1 s, {bad_n} to it ({:.2}%), {failed} failed, healthy shares {shares:.3?}",
        100.0 * bad_n as f64 / calls as f64
    );
    assert!(
        (bad_n as f64) < 0.05 * calls as f64,
        "the failing endpoint got {bad_n} of {calls}"
    );
    // Only the calls it answered failed: every other call was served by a healthy endpoint.
    assert_eq!(failed, bad_n);
    for s in &shares {
        assert!(*s > 0.25, "a healthy endpoint got {s:.3}: {shares:?}");
    }
    assert_eq!(ejected(&p, &[good[0].addr, good[1].addr, good[2].addr]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_of_four_failing_fast_eject_at_most_half() {
    let good = Backend::start([127, 0, 8, 2], "g2");
    let mut bad = Vec::new();
    let mut counts = Vec::new();
    for j in 3..=5 {
        let (a, n) = failing_backend([127, 0, 8, j], "13", None).await;
        bad.push(a);
        counts.push(n);
    }
    let mut addrs = vec![good.addr];
    addrs.extend(&bad);
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let watch = {
        let d = p.proxy.endpoints(p.addr);
        let bad = bad.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..150 {
                let n = bad
                    .iter()
                    .filter(|a| d.destination().stats(**a).is_some_and(|s| s.is_ejected()))
                    .count();
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let (calls, failed) = load_for(&p, Duration::from_millis(1500)).await;
    let most = watch.await.expect("watcher");
    println!(
        "3 of 4 endpoints answer INTERNAL at once: {calls} calls, {failed} failed, {} served by the healthy one, at most {most} ejected at once",
        good.calls()
    );
    assert!(most <= 2, "{most} of 4 ejected at once");
    assert!(
        good.calls() as f64 > 0.8 * calls as f64,
        "the healthy endpoint served {} of {calls}",
        good.calls()
    );
    assert_eq!(ejected(&p, &[good.addr]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_asking_for_a_pause_is_left_alone_for_it() {
    let good: Vec<Backend> = (2..=3)
        .map(|j| Backend::start([127, 0, 9, j], &format!("g{j}")))
        .collect();
    // RESOURCE_EXHAUSTED with a 400 ms pushback.
    let (paused, paused_calls) = failing_backend([127, 0, 9, 9], "8", Some("400")).await;
    let p = start_proxy(
        ProxyConfig::default(),
        &[good[0].addr, good[1].addr, paused],
    )
    .await;
    let (calls, failed) = load_for(&p, Duration::from_secs(1)).await;
    let n = paused_calls.load(Ordering::Relaxed);
    println!("an endpoint answering RESOURCE_EXHAUSTED with grpc-retry-pushback-ms 400: {n} of {calls} calls in 1 s, {failed} failed");
    // A handful: the calls in flight when it first answered, then one probe per pause.
    assert!(n <= 12, "the paused endpoint got {n} calls");
    assert_eq!(failed, n);
}

/// A TCP relay in front of `backend` that passes its first connection through at once and
/// holds every later one for `hold` before relaying it: an endpoint that answers on the
/// connection it has while its new handshakes are slow, as a busy server's are. Returns the
/// relay's address and how many connections it has accepted.
async fn slow_after_first(
    ip: [u8; 4],
    backend: SocketAddr,
    hold: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let gate = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind gate");
    let addr = gate.local_addr().expect("gate addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = gate.accept().await {
            let first = seen.fetch_add(1, Ordering::Relaxed) == 0;
            tokio::spawn(async move {
                if !first {
                    tokio::time::sleep(hold).await;
                }
                if let Ok(mut up) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_of_extra_connections_stall_no_stream_and_eject_nothing() {
    // Each endpoint answers on its first connection; every further handshake takes 2 s, four
    // times connect_timeout. 24 concurrent calls need two connections per endpoint at 4
    // streams each: the pool tries to grow, and the calls must not wait for it (the peer takes
    // more streams on the connection it has), nor may its timeouts count against endpoints
    // that answer every call.
    let backends: Vec<Backend> = (2..=4)
        .map(|j| Backend::start([127, 0, 11, j], &format!("b{j}")))
        .collect();
    let mut gates = Vec::new();
    for (j, b) in backends.iter().enumerate() {
        gates.push(
            slow_after_first([127, 0, 11, 12 + j as u8], b.addr, Duration::from_secs(2)).await,
        );
    }
    let addrs: Vec<SocketAddr> = gates.iter().map(|g| g.0).collect();
    let connect_timeout = Duration::from_millis(500);
    let cfg = ProxyConfig {
        streams_per_connection: 4,
        connect_timeout,
        ..ProxyConfig::default()
    };
    let p = start_proxy(cfg, &addrs).await;
    let c = client(p.addr).await;
    let (mut slowest, mut calls) = (Duration::ZERO, 0);
    for round in 0..6 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..24 {
            let mut c = c.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let r = unary(
                    &mut c,
                    request(
                        Bytes::from(format!("r{round}c{i}")),
                        &[("x-sleep-ms", "100")],
                    ),
                )
                .await;
                (r.map(|_| ()), t.elapsed())
            });
        }
        while let Some(r) = timeout(LIMIT, tasks.join_next())
            .await
            .expect("every call ends")
        {
            let (r, took) = r.expect("call task");
            r.expect("every endpoint answers every call");
            slowest = slowest.max(took);
            calls += 1;
        }
        assert_eq!(
            ejected(&p, &addrs),
            0,
            "a healthy endpoint was ejected in round {round}"
        );
    }
    let accepted: Vec<usize> = gates.iter().map(|g| g.1.load(Ordering::Relaxed)).collect();
    println!("{calls} calls of 100 ms, slowest {slowest:?}; connections accepted per endpoint {accepted:?}");
    assert!(
        accepted.iter().sum::<usize>() > addrs.len(),
        "the pool never tried to grow past one connection per endpoint ({accepted:?}), so this test showed nothing"
    );
    assert!(
        slowest < connect_timeout,
        "a 100 ms call took {slowest:?}: it waited for a handshake"
    );
}

/// A connection that breaks with several calls on it is one failure of its endpoint, not one
/// per call: counted per call, one event (a backend restart, or its server closing the
/// connection for a burst of resets that one client's cancels made) ejected a healthy endpoint
/// at once, three calls being three failures in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_connection_is_one_failure_however_many_calls_it_carried() {
    let mut backends: Vec<Backend> = (2..=4)
        .map(|i| Backend::start([127, 0, 2, i], &format!("h{i}")))
        .collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let mut c = client(p.addr).await;
    // Every endpoint answers first: ejection needs peers that are known to succeed.
    for _ in 0..30 {
        unary(&mut c, request(Bytes::from_static(b"warm"), &[]))
            .await
            .expect("warm-up call");
    }
    assert!(
        backends.iter().all(|b| b.calls() > 0),
        "every endpoint answered"
    );
    let before = backends[0].calls();
    // 30 calls that hang, spread over the three endpoints, about ten on each connection.
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { hang(&mut c, request(Bytes::from_static(b"x"), &[])).await })
        })
        .collect();
    let on_first = async {
        while backends[0].calls() < before + 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(LIMIT, on_first)
        .await
        .expect("the first endpoint took some of the calls");
    let carried = backends[0].calls() - before;
    // Its process dies: its one connection breaks with every call on it.
    backends[0].kill();
    // Ejection lasts a second: watched while the calls fail.
    let settled = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut out = 0;
    while tokio::time::Instant::now() < settled {
        out = out.max(ejected(&p, &[addrs[0]]));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut failed = 0;
    for call in calls {
        // The calls on live endpoints still hang: only those that ended are counted.
        if let Ok(r) = tokio::time::timeout_at(settled, call).await {
            let st = r
                .expect("task")
                .expect_err("a hanging call ends only by failing");
            assert_eq!(st.code(), Code::Unavailable, "{st:?}");
            failed += 1;
        }
    }
    println!("{carried} calls on the killed endpoint, {failed} failed; ejected: {out}");
    assert_eq!(failed, carried, "exactly its calls failed");
    assert_eq!(out, 0, "one broken connection ejected its endpoint");
}

// ---- keepalive PINGs only where they tell something ------------------------------------------

/// An HTTP/2 endpoint at frame level that answers SETTINGS and PINGs, never answers a request,
/// counts the requests, resets and PINGs it receives and, while `chatty` is set, sends a PING
/// of its own every 50 ms (so the connection keeps hearing from it).
struct PingCountingBackend {
    addr: SocketAddr,
    /// HEADERS, RST_STREAM and PING frames received.
    requests: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    pings: Arc<AtomicUsize>,
    chatty: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PingCountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PingCountingBackend {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let pings = Arc::new(AtomicUsize::new(0));
        let chatty = Arc::new(AtomicBool::new(true));
        let (q, r, p, c) = (
            requests.clone(),
            resets.clone(),
            pings.clone(),
            chatty.clone(),
        );
        let task = tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut preface = [0u8; 24];
            if s.read_exact(&mut preface).await.is_err() {
                return;
            }
            let _ = s.write_all(&frame(4, 0, 0, &[])).await;
            let mut buf = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                let mut chunk = [0u8; 4096];
                tokio::select! {
                    n = s.read(&mut chunk) => {
                        let Ok(n @ 1..) = n else { return };
                        buf.extend_from_slice(&chunk[..n]);
                        let frames = parse_frames(&buf);
                        let used: usize = frames.iter().map(|f| 9 + f.2.len()).sum();
                        buf.drain(..used);
                        for (ty, _, payload, flags) in frames {
                            let reply = match (ty, flags & 1) {
                                (1, _) => {
                                    q.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                (3, _) => {
                                    r.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                (4, 0) => frame(4, 1, 0, &[]),
                                (6, 0) => {
                                    p.fetch_add(1, Ordering::Relaxed);
                                    frame(6, 1, 0, &payload)
                                }
                                _ => continue,
                            };
                            if s.write_all(&reply).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ = tick.tick() => {
                        if c.load(Ordering::Relaxed)
                            && s.write_all(&frame(6, 0, 0, b"backend!")).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        PingCountingBackend {
            addr,
            requests,
            resets,
            pings,
            chatty,
            task,
        }
    }
}

/// grpc-go servers close a connection with GOAWAY "too_many_pings" when PINGs come more often
/// than every 5 minutes while they send nothing, or on a connection without streams. So the
/// relay PINGs only a connection that carries streams and has heard nothing for the keepalive
/// interval: the one case where a PING tells something (a black-holed endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_only_a_quiet_connection_that_carries_streams() {
    use interceptor::proxy::config::H2Engine;
    assert!(
        ProxyConfig::default().keepalive_interval >= Duration::from_secs(300),
        "the default keepalive interval stays within grpc-go's default enforcement (5 min)"
    );
    let backend = PingCountingBackend::start().await;
    let p = start_proxy(
        ProxyConfig {
            // The streams engine PINGs every pooled connection on the interval.
            h2_engine: H2Engine::Relay,
            // Ten of the endpoint's PINGs per interval: a loaded test machine must stall this
            // test for half a second before a PING is due in the busy phase.
            keepalive_interval: Duration::from_millis(500),
            keepalive_timeout: Duration::from_secs(5),
            ..Default::default()
        },
        &[backend.addr],
    )
    .await;
    let mut c = client(p.addr).await;
    let call = tokio::spawn(async move {
        let _ = hang(&mut c, request(Bytes::from_static(b"wait"), &[])).await;
        c
    });
    let until = Instant::now() + Duration::from_secs(5);
    while backend.requests.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < until,
            "the call never reached the endpoint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A stream is open and the endpoint keeps talking: nothing to find out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let busy = backend.pings.load(Ordering::Relaxed);
    assert_eq!(
        busy, 0,
        "PINGs on a connection that hears from its endpoint"
    );

    // The endpoint falls silent with the stream open: a PING about every interval.
    backend.chatty.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let quiet = backend.pings.load(Ordering::Relaxed);
    assert!(
        quiet >= 2,
        "a silent connection with a stream open got {quiet} PINGs in 2.5 s at a 500 ms interval"
    );

    // The call ends (the client gives up): a connection without streams is not PINGed.
    call.abort();
    let _ = call.await;
    let until = Instant::now() + Duration::from_secs(5);
    while backend.resets.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < until,
            "the cancelled call was never reset upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_idle = backend.pings.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = backend.pings.load(Ordering::Relaxed) - before_idle;
    assert!(
        idle <= 1,
        "{idle} PINGs on a connection without streams (one may have been on its way)"
    );
    println!("keepalive PINGs: busy {busy}, quiet {quiet}, idle {idle}");
}

/// An HTTP/2 endpoint at frame level that answers each request by its body with a 5-byte
/// body: `short` announces a content-length of 10, `long` one of 3, anything else 5. A
/// request without a body (a HEAD) gets a content-length of 5 and no body.
async fn endpoint_with_content_lengths() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = s.write_all(&frame(4, 0, 0, &[])).await;
                let (mut buf, mut bodies) = (Vec::new(), HashMap::<u32, Vec<u8>>::new());
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    let frames = parse_frames(&buf);
                    buf.drain(..frames.iter().map(|f| 9 + f.2.len()).sum::<usize>());
                    let mut out = Vec::new();
                    for (ty, id, payload, flags) in frames {
                        match ty {
                            4 if flags & 1 == 0 => out.extend(frame(4, 1, 0, &[])),
                            6 if flags & 1 == 0 => out.extend(frame(6, 1, 0, &payload)),
                            HEADERS if flags & END_STREAM != 0 => {
                                let mut head = vec![0x88];
                                hpack_int(&mut head, 4, 0, 28);
                                hpack_str(&mut head, b"5");
                                out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &head));
                            }
                            0 => {
                                let body = bodies.entry(id).or_default();
                                body.extend_from_slice(&payload);
                                if flags & END_STREAM == 0 {
                                    continue;
                                }
                                let announced: &[u8] = match body.as_slice() {
                                    b"short" => b"10",
                                    b"long" => b"3",
                                    _ => b"5",
                                };
                                // :status 200, then content-length as a literal.
                                let mut head = vec![0x88];
                                hpack_int(&mut head, 4, 0, 28);
                                hpack_str(&mut head, announced);
                                out.extend(frame(HEADERS, END_HEADERS, id, &head));
                                out.extend(frame(0, END_STREAM, id, b"hello"));
                            }
                            _ => {}
                        }
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A response whose DATA does not add up to its content-length is malformed (RFC 9113 8.1.1)
/// and must not be passed on: the client's stream ends with a reset, not with a body cut
/// short or run long that it would take for whole. A HEAD response announces a length it
/// does not send, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_contradicts_its_content_length_ends_in_a_reset() {
    use tokio::io::AsyncWriteExt;
    let b = endpoint_with_content_lengths().await;
    let p = start_proxy(ProxyConfig::default(), &[b]).await;
    let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(1)).await;
    let mut burst = Vec::new();
    for (id, body) in [(1u32, &b"short"[..]), (3, b"long"), (5, b"fine")] {
        burst.extend(frame(HEADERS, END_HEADERS, id, &request_pseudo()));
        burst.extend(frame(0, END_STREAM, id, body));
    }
    let mut head_request = Vec::new();
    hpack_int(&mut head_request, 4, 0, 2);
    hpack_str(&mut head_request, b"HEAD");
    head_request.extend_from_slice(&request_pseudo()[1..]);
    burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 7, &head_request));
    w.write_all(&burst).await.expect("the requests");
    let frames = reader.await.expect("reader");
    drop(w);
    let seen: Vec<(u8, u32, u8)> = frames.iter().map(|f| (f.0, f.1, f.3)).collect();
    let reset = |id: u32| frames.iter().any(|f| f.0 == 3 && f.1 == id);
    let body = |id: u32| -> Vec<u8> {
        frames
            .iter()
            .filter(|f| f.0 == 0 && f.1 == id)
            .flat_map(|f| f.2.clone())
            .collect()
    };
    let ended = |id: u32| {
        frames
            .iter()
            .any(|f| f.1 == id && f.0 <= 1 && f.3 & END_STREAM != 0)
    };
    for id in [1, 3] {
        assert!(
            reset(id) && !ended(id),
            "stream {id}: a reset and no END_STREAM; frames (type, stream, flags): {seen:?}"
        );
        assert!(
            body(id).len() < 5,
            "stream {id}: the body went on whole: {seen:?}"
        );
    }
    assert_eq!(body(5), b"hello", "the well-formed response: {seen:?}");
    assert!(ended(5) && !reset(5), "the well-formed response: {seen:?}");
    assert!(
        ended(7) && !reset(7) && body(7).is_empty(),
        "the response to HEAD: {seen:?}"
    );
}

/// One call through a proxy to `addr`, whose first connection fails: it must succeed on the
/// endpoint's second connection.
async fn one_call_goes_on_the_second_connection(addr: SocketAddr, accepted: &AtomicUsize) {
    let p = start_proxy(ProxyConfig::default(), &[addr]).await;
    let mut c = client(p.addr).await;
    let r = timeout(LIMIT, unary(&mut c, request(Bytes::from_static(b"x"), &[])))
        .await
        .expect("the call ends in time");
    let connections = accepted.load(Ordering::SeqCst);
    let r = r.unwrap_or_else(|s| {
        panic!("the call failed ({s:?}) after {connections} connection(s) to the endpoint")
    });
    assert_eq!(r.into_inner(), Bytes::from_static(b"ok"));
    assert_eq!(connections, 2, "replayed on a second connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_endpoint_never_processed_is_replayed_though_writing_failed_first() {
    // On the relay, the write that fails carries the call's HEADERS. The streams engine waits
    // for a PING answer before it uses a connection, so there the first connection is a
    // failed handshake that the call never went on: it is tried again all the same.
    let (addr, accepted) = goaway_endpoint([127, 0, 3, 2], AfterGoaway::Reset).await;
    one_call_goes_on_the_second_connection(addr, &accepted).await;
}

/// A connection that fails while a call waits for the endpoint's SETTINGS: the call never
/// left, so it goes on another connection. The endpoint sends 300 PINGs, more than the relay
/// reads in one turn, so the relay's answers meet the reset; its SETTINGS come after them
/// and are read only then, when no stream may start any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_settings_on_a_connection_that_fails_is_replayed() {
    let mut burst = Vec::new();
    for _ in 0..300 {
        burst.extend(raw_frame(6, 0, b"pingping"));
    }
    burst.extend(raw_frame(4, 0, &[]));
    let (addr, accepted) = first_connection_says([127, 0, 3, 5], burst, AfterGoaway::Reset).await;
    one_call_goes_on_the_second_connection(addr, &accepted).await;
}
