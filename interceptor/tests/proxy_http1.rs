//! HTTP/1.1 through the proxy, per request: real hyper backends on 127.0.0.x, hyper clients
//! and raw sockets for what a library would never send (pipelining in one write, smuggling).

#[path = "proxy_support.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use interceptor::proxy::config::ProxyConfig;
use interceptor::proxy::detect::Http1Mode;
use interceptor_test_support::http1_backend::{self, Seen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use support::start_proxy;

struct Http1Backend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Http1Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(ip: [u8; 4], name: &str) -> Http1Backend {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let task = tokio::spawn(http1_backend::serve(
        listener,
        Arc::from(name),
        seen.clone(),
    ));
    Http1Backend { addr, seen, task }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One keep-alive client connection (hyper's client, as REST libraries use it).
async fn client(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.expect("connect proxy");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

async fn get(send: &mut Sender, path: &str) -> (u16, String, String) {
    send.ready().await.expect("connection usable");
    let req = Request::get(path)
        .header("host", "greet.shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("answered in time")
        .expect("response");
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, backend, String::from_utf8_lossy(&body).into_owned())
}

/// Writes `bytes` on a new connection and reads until the proxy closes it (or 5 s).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let closed = matches!(
        timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await,
        Ok(Ok(_))
    );
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn one_keep_alive_connection_is_balanced_per_request_and_takes_a_scale_up() {
    let b: Vec<Http1Backend> = vec![
        backend([127, 0, 0, 11], "b1").await,
        backend([127, 0, 0, 12], "b2").await,
        backend([127, 0, 0, 13], "b3").await,
    ];
    let addrs: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let mut c = client(p.addr).await;
    let mut by: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (status, backend, body) = get(&mut c, "/").await;
        assert_eq!(status, 200);
        assert_eq!(body.trim(), backend);
        *by.entry(backend).or_default() += 1;
    }
    println!("300 requests on one connection: {by:?}");
    assert_eq!(by.len(), 3, "{by:?}");
    for n in by.values() {
        assert!(*n >= 60, "each backend gets a share: {by:?}");
    }
    // Each backend saw one or a few upstream connections, not one per request.
    for x in &b {
        assert!(
            x.seen.connections() <= 2,
            "pooled: {} connections",
            x.seen.connections()
        );
    }
    // Scale-up: a fourth endpoint, the same client connection.
    let b4 = backend([127, 0, 0, 14], "b4").await;
    let mut with4 = addrs.clone();
    with4.push(b4.addr);
    p.proxy.endpoints(p.addr).set_ready(with4);
    let mut after: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let (_, backend, _) = get(&mut c, "/").await;
        *after.entry(backend).or_default() += 1;
    }
    println!("after the scale-up: {after:?}");
    assert!(after.get("b4").copied().unwrap_or(0) >= 20, "{after:?}");
    // Hop-by-hop fields stay on their hop; Host reaches the endpoint.
    let (status, ..) = {
        let req = Request::get("/")
            .header("host", "greet.shop")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::new()))
            .expect("request");
        c.ready().await.expect("ready");
        let resp = c.send_request(req).await.expect("response");
        let backend = resp.headers()["x-backend"]
            .to_str()
            .expect("name")
            .to_string();
        (resp.status().as_u16(), backend)
    };
    assert_eq!(status, 200);
    let seen: Vec<_> = [&b[0], &b[1], &b[2], &b4]
        .iter()
        .filter_map(|x| x.seen.last_headers.lock().ok().and_then(|h| h.clone()))
        .collect();
    let last = seen
        .iter()
        .find(|h| h.contains_key("x-end-to-end"))
        .expect("some backend saw the last request");
    assert_eq!(last["host"], "greet.shop");
    assert!(!last.contains_key("x-private"), "{last:?}");
    assert!(!last.contains_key("keep-alive"), "{last:?}");
}

#[tokio::test]
async fn bodies_are_byte_exact_fixed_length_and_chunked_both_ways() {
    let b1 = backend([127, 0, 0, 21], "b1").await;
    let b2 = backend([127, 0, 0, 22], "b2").await;
    let p = start_proxy(ProxyConfig::default(), &[b1.addr, b2.addr]).await;
    let mut c = client(p.addr).await;
    for size in [0usize, 1, 65_536, 3 * 1024 * 1024 + 7] {
        let body = support::pattern(size, size as u8);
        // Fixed length.
        c.ready().await.expect("ready");
        let req = Request::post("/echo")
            .header("host", "x")
            .body(Full::new(body.clone()))
            .expect("request");
        let resp = c.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        if size > 0 {
            assert_eq!(
                resp.headers().get("content-length").map(|v| v.as_bytes()),
                Some(size.to_string().as_bytes()),
                "fixed length stays fixed"
            );
        }
        let got = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(got.len(), size);
        assert!(
            got == body,
            "fixed-length body of {size} bytes came back changed"
        );
    }
    // Chunked, with trailers, on a raw connection (hyper's client would not send trailers).
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\r\n0\r\n") || !got.ends_with("\r\n\r\n") {
        let n = timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    println!("chunked echo: {got:?}");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{got}"
    );
    assert!(got.contains("hello") && got.contains(" world"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("x-checksum: 42"),
        "trailers pass: {got}"
    );
    // A streamed chunked upload through hyper's client, 5 MiB in 64 KiB frames.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let stream = TcpStream::connect(p.addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post("/echo")
        .header("host", "x")
        .body(body)
        .expect("req");
    let writer = tokio::spawn(async move {
        for i in 0..80u8 {
            let chunk = support::pattern(64 * 1024, i);
            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
        }
    });
    let resp = send.send_request(req).await.expect("response");
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    writer.await.expect("writer");
    let want: Vec<u8> = (0..80u8)
        .flat_map(|i| support::pattern(64 * 1024, i).to_vec())
        .collect();
    assert!(
        got.len() == want.len() && got[..] == want[..],
        "chunked upload echoed exactly"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_continue_and_close_are_honoured() {
    let b1 = backend([127, 0, 0, 31], "b1").await;
    let b2 = backend([127, 0, 0, 32], "b2").await;
    let p = start_proxy(ProxyConfig::default(), &[b1.addr, b2.addr]).await;
    // Three requests in one write, the last says close.
    let (out, closed) = raw_exchange(
        p.addr,
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwoGET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    println!("pipelined: {out:?}");
    assert!(
        closed,
        "Connection: close from the client closes it after the answer"
    );
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    let two = out.find("\r\n\r\ntwo").expect("the echo, second");
    let first_name = out.find("\r\n\r\nb").expect("a name, first");
    assert!(first_name < two, "{out}");
    assert_eq!(b1.seen.requests() + b2.seen.requests(), 3);

    // Expect: 100-continue: the 100 comes before the body is sent.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write head");
    let mut buf = vec![0u8; 1024];
    let n = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 in time")
        .expect("read");
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    s.write_all(b"body").await.expect("write body");
    let mut got = String::new();
    while !got.ends_with("body") {
        let n = timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("HTTP/1.1 200"), "{got}");

    // The endpoint's Connection: close ends that upstream connection only: the client's
    // stays open and the next request goes on (a new upstream connection if needed).
    let mut c = client(p.addr).await;
    for _ in 0..6 {
        let (status, ..) = get(&mut c, "/close").await;
        assert_eq!(status, 200);
    }
    let (status, ..) = get(&mut c, "/").await;
    assert_eq!(status, 200);
    assert!(
        b1.seen.connections() + b2.seen.connections() >= 6,
        "each /close answer closed its upstream connection"
    );
}

#[tokio::test]
async fn malformed_requests_get_400_and_a_closed_connection_and_others_go_on() {
    let b1 = backend([127, 0, 0, 41], "b1").await;
    let p = start_proxy(ProxyConfig::default(), &[b1.addr]).await;
    let mut healthy = client(p.addr).await;
    assert_eq!(get(&mut healthy, "/").await.0, 200);
    let before = b1.seen.requests();

    let cases: [(&str, &[u8], &str); 5] = [
        ("bad request line", b"GET /x HTTP/9.9 extra\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
        ("CL then TE", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
        ("TE then CL", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
        ("two lengths", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", "HTTP/1.1 400"),
        ("TE not chunked", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", "HTTP/1.1 400"),
    ];
    for (what, bytes, want) in cases {
        let (out, closed) = raw_exchange(p.addr, bytes).await;
        println!("{what}: {out:?}");
        assert!(out.starts_with(want), "{what}: {out:?}");
        assert!(closed, "{what}: connection closed");
        assert_eq!(
            out.matches("HTTP/1.1").count(),
            1,
            "{what}: nothing after: {out}"
        );
    }
    // Headers past the limit: 431, closed.
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 128 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let (out, closed) = raw_exchange(p.addr, &big).await;
    println!("oversized headers: {:?}", out.lines().next());
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    assert!(closed);
    assert_eq!(
        b1.seen.requests(),
        before,
        "no malformed request reached the endpoint"
    );
    // The healthy connection was not disturbed.
    assert_eq!(get(&mut healthy, "/").await.0, 200);
}

#[tokio::test]
async fn requests_that_never_reached_an_endpoint_go_to_another_and_others_do_not() {
    let good = backend([127, 0, 0, 51], "good").await;
    // A port that refuses connections.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.52:0").expect("bind");
        l.local_addr().expect("addr")
    };
    // An endpoint that accepts, reads the request and closes without a byte of response.
    let dropper = TcpListener::bind("127.0.0.53:0").await.expect("bind");
    let dropper_addr = dropper.local_addr().expect("addr");
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = dropped.clone();
    let dropper_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = dropper.accept().await {
            d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let config = ProxyConfig {
        balancer: interceptor::proxy::config::BalancerKind::RoundRobin,
        // Ejection would hide the broken endpoints after a few requests.
        eject_after_failures: 1000,
        ..ProxyConfig::default()
    };
    let p = start_proxy(config, &[good.addr, refused]).await;
    let mut c = client(p.addr).await;
    for i in 0..20 {
        c.ready().await.expect("ready");
        let req = Request::post("/echo")
            .header("host", "x")
            .body(Full::new(Bytes::from(format!("post {i}"))))
            .expect("req");
        let resp = c.send_request(req).await.expect("response");
        assert_eq!(
            resp.status(),
            200,
            "refused connects cost no request (POST {i})"
        );
    }
    assert_eq!(good.seen.requests(), 20);

    // A GET on a connection closed before any response byte is repeated elsewhere; a POST
    // is not.
    p.proxy
        .endpoints(p.addr)
        .set_ready([good.addr, dropper_addr]);
    let mut ok = 0;
    for _ in 0..10 {
        let (status, backend, _) = get(&mut c, "/").await;
        assert_eq!(status, 200);
        assert_eq!(backend, "good");
        ok += 1;
    }
    assert_eq!(ok, 10);
    assert!(
        dropped.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the dropper was tried"
    );
    let mut bad_gateway = 0;
    let posts_before = good.seen.requests();
    for i in 0..10 {
        let mut c = client(p.addr).await;
        c.ready().await.expect("ready");
        let req = Request::post("/echo")
            .header("host", "x")
            .body(Full::new(Bytes::from(format!("once {i}"))))
            .expect("req");
        let resp = c.send_request(req).await.expect("response");
        if resp.status() == 502 {
            bad_gateway += 1;
        } else {
            assert_eq!(resp.status(), 200);
        }
    }
    println!("POSTs answered 502 after the endpoint dropped them: {bad_gateway}");
    assert!(
        bad_gateway >= 3,
        "round robin sent about half to the dropper"
    );
    assert_eq!(
        good.seen.requests() - posts_before + bad_gateway,
        10,
        "no POST was sent twice"
    );
    dropper_task.abort();
}

#[tokio::test]
async fn an_upgrade_becomes_an_opaque_relay_to_one_endpoint() {
    let b1 = backend([127, 0, 0, 61], "b1").await;
    let b2 = backend([127, 0, 0, 62], "b2").await;
    let p = start_proxy(ProxyConfig::default(), &[b1.addr, b2.addr]).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(
        b"GET /raw-upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for i in 0..20 {
        let msg = format!("ping {i} GET / HTTP/1.1\r\n\r\n");
        s.write_all(msg.as_bytes()).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(
            got,
            msg.as_bytes(),
            "raw bytes after the upgrade pass unparsed"
        );
    }
    assert_eq!(
        b1.seen.requests() + b2.seen.requests(),
        1,
        "one request, then bytes"
    );
}

#[tokio::test]
async fn without_endpoints_the_proxy_answers_503_itself() {
    let p = start_proxy(ProxyConfig::default(), &[]).await;
    let mut c = client(p.addr).await;
    let (status, _, body) = get(&mut c, "/").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("interceptor: no usable endpoint"),
        "{body}"
    );
    // The connection stays usable: an endpoint appears, the next request reaches it.
    let b1 = backend([127, 0, 0, 81], "b1").await;
    p.proxy.endpoints(p.addr).set_ready([b1.addr]);
    let (status, backend, _) = get(&mut c, "/").await;
    assert_eq!((status, backend.as_str()), (200, "b1"));
}

#[tokio::test]
async fn an_opted_out_service_relays_http1_to_one_endpoint_per_connection() {
    let b1 = backend([127, 0, 0, 71], "b1").await;
    let b2 = backend([127, 0, 0, 72], "b2").await;
    let p = start_proxy(ProxyConfig::default(), &[b1.addr, b2.addr]).await;
    p.proxy.endpoints(p.addr).set_http1_mode(Http1Mode::Opaque);
    let mut c = client(p.addr).await;
    let mut by: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let (_, backend, _) = get(&mut c, "/").await;
        *by.entry(backend).or_default() += 1;
    }
    assert_eq!(by.len(), 1, "one endpoint for the whole connection: {by:?}");
}

#[tokio::test]
async fn a_silent_endpoint_times_out_but_a_slow_upload_that_moves_does_not() {
    let b1 = backend([127, 0, 0, 91], "b1").await;
    // Accepts, reads, never answers.
    let silent = TcpListener::bind("127.0.0.92:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let silent_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let config = ProxyConfig {
        stream_idle_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let p = start_proxy(config, &[silent_addr]).await;
    let mut c = client(p.addr).await;
    let started = std::time::Instant::now();
    let (status, _, body) = get(&mut c, "/").await;
    let took = started.elapsed();
    println!("silent endpoint: {status} after {took:?}: {body}");
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // An upload that takes 1.2 s, a chunk every 100 ms, is not cut at 300 ms (the endpoint
    // answers once it has the whole body: `/` drains it first).
    p.proxy.endpoints(p.addr).set_ready([b1.addr]);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let stream = TcpStream::connect(p.addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let started = std::time::Instant::now();
    let req = Request::post("/")
        .header("host", "x")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("req");
    let writer = tokio::spawn(async move {
        for i in 0..12u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx
                .send(Ok(Frame::data(Bytes::from(vec![i; 1000]))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let resp = timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200, "answered after the whole upload");
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    writer.await.expect("writer");
    assert_eq!(&got[..], b"b1\n");
    assert!(started.elapsed() >= Duration::from_millis(1200));
    silent_task.abort();
}

/// Reads one HTTP/1.1 response head from `s` (up to the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("head in time")
            .expect("read");
        assert!(
            n == 1,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn an_h2c_upgrade_and_a_connect_tunnel_become_opaque_relays() {
    let b1 = backend([127, 0, 0, 95], "b1").await;
    let p = start_proxy(ProxyConfig::default(), &[b1.addr]).await;
    // h2c upgrade (RFC 7540 3.2): the fields the upgrade needs reach the endpoint, and after
    // 101 the HTTP/2 preface passes unparsed.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET /raw-upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: h2c"), "{head}");
    let seen = b1
        .seen
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("a request");
    assert_eq!(seen["http2-settings"], "AAMAAABkAARAAAAAAAIAAAAA");
    assert_eq!(seen["upgrade"], "h2c");
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    s.write_all(preface).await.expect("write preface");
    let mut got = vec![0u8; preface.len()];
    timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&got[..], &preface[..]);

    // CONNECT: 200 from the endpoint, then a byte tunnel.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for i in 0..5 {
        let msg = format!("tunnel {i}\n");
        s.write_all(msg.as_bytes()).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(got, msg.as_bytes());
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_client_idle_timeout() {
    let b1 = backend([127, 0, 0, 97], "b1").await;
    let config = ProxyConfig {
        client_idle_timeout: Duration::from_millis(400),
        ..ProxyConfig::default()
    };
    let p = start_proxy(config, &[b1.addr]).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    // Busy past the timeout: a request every 150 ms for 900 ms keeps it open.
    for i in 0..6 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = [0u8; 3];
        s.read_exact(&mut body).await.expect("body");
    }
    // Then idle: closed about 400 ms after the last answer.
    let idle_from = std::time::Instant::now();
    let mut rest = Vec::new();
    timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("clean close");
    let idle = idle_from.elapsed();
    println!("idle keep-alive connection closed after {idle:?}");
    assert!(idle >= Duration::from_millis(350), "{idle:?}");
}
