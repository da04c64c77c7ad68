//! Detection and opaque relay: anything that is not HTTP/2 prior knowledge passes through to
//! one endpoint byte for byte, with half-close.

#[path = "proxy_support.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use interceptor::proxy::config::ProxyConfig;
use interceptor::proxy::detect::ProtocolHint;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

/// A raw TCP backend: optionally greets first, reads until the client half-closes, reports
/// what it read, then answers `reply` and closes.
async fn capture_backend(
    ip: [u8; 4],
    greeting: &'static [u8],
    reply: Vec<u8>,
) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind raw backend");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let tx = tx.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                if !greeting.is_empty() {
                    s.write_all(greeting).await.expect("greet");
                }
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("backend read");
                s.write_all(&reply).await.expect("backend reply");
                s.shutdown().await.expect("backend shutdown");
                let _ = tx.send(got).await;
            });
        }
    });
    (addr, rx)
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Client sends `request`, half-closes, reads to EOF; both directions must be exact.
async fn roundtrip(first: &[u8], rest: &[u8], reply_len: usize) {
    let reply = random_bytes(reply_len, 7);
    let (backend, mut seen) = capture_backend([127, 0, 0, 2], b"", reply.clone()).await;
    let p = start_proxy(ProxyConfig::default(), &[backend]).await;
    // HTTP/1.x goes through the opaque relay only where its Service opted out of per-request
    // balancing (interceptor.io/http1: opaque); these bytes are not a real exchange.
    p.proxy
        .endpoints(p.addr)
        .set_http1_mode(interceptor::proxy::detect::Http1Mode::Opaque);
    let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
    let mut sent = first.to_vec();
    sent.extend_from_slice(rest);
    let client = async {
        c.write_all(first).await.expect("write first bytes");
        // Let detection see only the first bytes, then send the rest.
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(rest).await.expect("write rest");
        c.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.expect("read reply");
        got
    };
    let got = timeout(LIMIT, client)
        .await
        .expect("relay finished in time");
    assert!(
        got == reply,
        "reply differs: {} bytes, expected {}",
        got.len(),
        reply.len()
    );
    let backend_got = timeout(LIMIT, seen.recv())
        .await
        .expect("backend reported")
        .expect("backend report");
    assert!(
        backend_got == sent,
        "backend got {} bytes, client sent {}",
        backend_got.len(),
        sent.len()
    );
}

#[tokio::test]
async fn http1_passes_through_byte_exact() {
    let head = b"GET /index.html HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 100000\r\n\r\n";
    roundtrip(head, &random_bytes(100_000, 1), 200_000).await;
}

#[tokio::test]
async fn tls_client_hello_passes_through_byte_exact() {
    // A TLS 1.2 record header for a ClientHello, then handshake bytes.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend(random_bytes(501, 3));
    roundtrip(&hello, &random_bytes(70_000, 4), 50_000).await;
}

#[tokio::test]
async fn almost_h2_preface_passes_through() {
    // Shares a prefix with the HTTP/2 preface, then differs: must not be eaten by detection.
    roundtrip(b"PRI * HTTP/1.1\r\n", b"rest of it", 10).await;
}

#[tokio::test]
async fn server_first_protocol_passes_through() {
    let banner: &'static [u8] = b"220 smtp.example ESMTP ready\r\n";
    let (backend, mut seen) =
        capture_backend([127, 0, 0, 3], banner, b"221 bye\r\n".to_vec()).await;
    let p = start_proxy(ProxyConfig::default(), &[backend]).await;
    let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
    let started = Instant::now();
    let mut got = vec![0u8; banner.len()];
    timeout(LIMIT, c.read_exact(&mut got))
        .await
        .expect("banner in time")
        .expect("read banner");
    assert_eq!(&got[..], banner);
    // The banner can only come after the detection wait gave up on the client.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "banner after {waited:?}, before the detection wait ended"
    );
    assert!(waited < Duration::from_secs(2), "banner took {waited:?}");
    c.write_all(b"QUIT\r\n").await.expect("write quit");
    c.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    timeout(LIMIT, c.read_to_end(&mut rest))
        .await
        .expect("reply in time")
        .expect("read reply");
    assert_eq!(&rest[..], b"221 bye\r\n");
    let backend_got = timeout(LIMIT, seen.recv())
        .await
        .expect("backend reported")
        .expect("report");
    assert_eq!(&backend_got[..], b"QUIT\r\n");
}

#[tokio::test]
async fn opaque_bulk_both_ways_concurrently() {
    // An echo backend: what goes in comes back, while the client is still writing.
    let l = TcpListener::bind("127.0.0.4:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((s, _)) = l.accept().await else { return };
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    let p = start_proxy(ProxyConfig::default(), &[addr]).await;
    let c = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut r, mut w) = c.into_split();
    let data = random_bytes(8 * 1024 * 1024, 11);
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(b"\x00binary protocol").await.expect("write");
        w.write_all(&data).await.expect("write bulk");
        w.shutdown().await.expect("half-close");
    });
    let mut got = Vec::new();
    timeout(LIMIT, r.read_to_end(&mut got))
        .await
        .expect("echo in time")
        .expect("read echo");
    writer.await.expect("writer task");
    assert_eq!(&got[..16], b"\x00binary protocol");
    assert!(
        got[16..] == expect[..],
        "echo differs ({} bytes)",
        got.len()
    );
}

#[tokio::test]
async fn opaque_without_endpoint_closes_promptly_and_skips_dead_ones() {
    let p = start_proxy(ProxyConfig::default(), &[]).await;
    // Opaque HTTP/1 (opted out); balanced HTTP/1.1 answers 503 instead (proxy_http1).
    p.proxy
        .endpoints(p.addr)
        .set_http1_mode(interceptor::proxy::detect::Http1Mode::Opaque);
    let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let started = Instant::now();
    let _ = timeout(Duration::from_secs(2), c.read_to_end(&mut buf))
        .await
        .expect("closed promptly");
    assert!(buf.is_empty());
    assert!(started.elapsed() < Duration::from_secs(1));

    // A refused endpoint is skipped in favour of a live one.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.5:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (live, mut seen) = capture_backend([127, 0, 0, 6], b"", b"ok".to_vec()).await;
    for _ in 0..5 {
        p.proxy.endpoints(p.addr).set_ready([dead, live]);
        let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
        c.write_all(b"hello").await.expect("write");
        c.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        timeout(LIMIT, c.read_to_end(&mut got))
            .await
            .expect("reply in time")
            .expect("read");
        assert_eq!(&got[..], b"ok");
        assert_eq!(
            timeout(LIMIT, seen.recv())
                .await
                .expect("report")
                .expect("report"),
            b"hello"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_opaque_relay_is_closed_busy_one_is_not() {
    let (backend, _seen) = capture_backend([127, 0, 0, 3], b"", Vec::new()).await;
    let cfg = ProxyConfig {
        opaque_idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let p = start_proxy(cfg, &[backend]).await;
    p.proxy
        .endpoints(p.addr)
        .set_http1_mode(interceptor::proxy::detect::Http1Mode::Opaque);
    let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
    let started = Instant::now();
    c.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
    // Busy for 1.2 s, three times the timeout: a byte every 250 ms.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.write_all(b"X-Keep: on\r\n")
            .await
            .expect("the busy relay stays up");
    }
    let last = Instant::now();
    let mut rest = Vec::new();
    let r = timeout(LIMIT, c.read_to_end(&mut rest))
        .await
        .expect("the idle relay was closed");
    let idle = last.elapsed();
    println!(
        "busy for {:?}, closed {idle:?} after the last byte ({r:?})",
        last - started
    );
    assert!(last - started >= Duration::from_millis(1200));
    assert!(idle >= Duration::from_millis(400), "closed after {idle:?}");
    assert!(idle < Duration::from_millis(1200), "closed after {idle:?}");
}

#[tokio::test]
async fn a_server_first_protocol_declared_by_app_protocol_greets_at_once() {
    let banner: &'static [u8] = b"5.7.44-mysql greeting\n";
    let (backend, _seen) = capture_backend([127, 0, 0, 4], banner, Vec::new()).await;
    let p = start_proxy(ProxyConfig::default(), &[backend]).await;
    // appProtocol: mysql on the Service port.
    p.proxy
        .endpoints(p.addr)
        .set_protocol(ProtocolHint::from_app_protocol(Some("mysql")));
    let mut waits = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
        let mut got = vec![0u8; banner.len()];
        timeout(LIMIT, c.read_exact(&mut got))
            .await
            .expect("greeting in time")
            .expect("read greeting");
        assert_eq!(&got[..], banner);
        waits.push(started.elapsed());
    }
    println!("greeting through the proxy with appProtocol mysql: {waits:?} (detection would wait 300 ms)");
    assert!(
        waits.iter().all(|w| *w < Duration::from_millis(100)),
        "the greeting waited: {waits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_declared_h2c_is_served_without_detection() {
    let b = Backend::start([127, 0, 0, 5], "b5");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    p.proxy
        .endpoints(p.addr)
        .set_protocol(ProtocolHint::from_app_protocol(Some("kubernetes.io/h2c")));
    // gRPC works, each call on a fresh connection; time to the first response measured.
    let mut firsts = Vec::new();
    for i in 0..20u8 {
        let started = Instant::now();
        let mut c = client(p.addr).await;
        let r = unary(&mut c, request(Bytes::from(vec![i]), &[]))
            .await
            .expect("a call on an h2c-declared port");
        assert_eq!(r.get_ref(), &Bytes::from(vec![i]));
        firsts.push(started.elapsed());
    }
    firsts.sort();
    println!(
        "appProtocol kubernetes.io/h2c: connect + first call, median {:?}, max {:?}",
        firsts[firsts.len() / 2],
        firsts[firsts.len() - 1]
    );
    // A client that is not HTTP/2 after all gets its connection closed by the HTTP/2 server
    // (as an h2c-only server would), promptly, not a hang.
    let mut c = TcpStream::connect(p.addr).await.expect("connect proxy");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    timeout(Duration::from_secs(2), c.read_to_end(&mut rest))
        .await
        .expect("closed within 2 s")
        .ok();
    assert!(
        !String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
        "an HTTP/1 request must not be relayed on an h2c port"
    );
}
