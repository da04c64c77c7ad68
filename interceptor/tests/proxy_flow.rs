//! Replay of refused streams, and end-to-end flow control (memory stays bounded when a
//! client stops reading).

#[path = "proxy_support.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use interceptor::proxy::config::ProxyConfig;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

/// An h2 backend that reads a little of each request, then refuses it with REFUSED_STREAM.
async fn refusing_backend(ip: [u8; 4]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(h2_backend::serve_default(l, move |req, mut respond| {
        let count = count.clone();
        async move {
            let mut body = req.into_body();
            // Let some of the body arrive first, so a replay must resend it.
            let _ = timeout(Duration::from_millis(5), body.data()).await;
            respond.send_reset(Reason::REFUSED_STREAM);
            count.fetch_add(1, Ordering::Relaxed);
        }
    }));
    (addr, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_replayed_with_their_body() {
    let (refusing, refused) = refusing_backend([127, 0, 0, 2]).await;
    let good = Backend::start([127, 0, 0, 3], "b3");
    let p = start_proxy(ProxyConfig::default(), &[refusing, good.addr]).await;
    let mut c = client(p.addr).await;
    timeout(LIMIT, async {
        for i in 0..60u8 {
            // 10 x 4 KiB: within the replay buffer.
            let msgs: Vec<Bytes> = (0..10).map(|j| pattern(4096, i.wrapping_add(j))).collect();
            let mut d = Digest::default();
            for m in &msgs {
                d.update(m);
            }
            let r = client_stream(&mut c, msgs, &[])
                .await
                .expect("call replayed to the good endpoint");
            assert_eq!(r.into_inner(), d.to_bytes());
            let r = unary(&mut c, request(pattern(1000, i), &[]))
                .await
                .expect("unary replayed");
            assert_eq!(r.into_inner(), pattern(1000, i));
        }
    })
    .await
    .expect("calls in time");
    println!("refused and replayed: {}", refused.load(Ordering::Relaxed));
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the refusing endpoint was never tried"
    );
    assert_eq!(good.calls(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_stops_the_backend() {
    // A backend that streams as fast as flow control lets it, counting what it hands to h2.
    let l = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let sent = Arc::new(AtomicUsize::new(0));
    let sent_by_backend = sent.clone();
    tokio::spawn(async move {
        let Ok((s, _)) = l.accept().await else { return };
        let Ok(mut conn) = h2::server::handshake(s).await else {
            return;
        };
        let Some(Ok((_req, mut respond))) = conn.accept().await else {
            return;
        };
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let Ok(mut tx) = respond.send_response(http::Response::new(()), false) else {
            return;
        };
        let mut i = 0u8;
        loop {
            tx.reserve_capacity(16 * 1024);
            let Some(Ok(cap)) = std::future::poll_fn(|cx| tx.poll_capacity(cx)).await else {
                return;
            };
            if cap == 0 {
                continue;
            }
            let chunk = pattern(cap, i);
            i = i.wrapping_add(1);
            // Counted before it is handed to h2: counted after, a chunk could reach the client
            // before its count did (seen once in CI, on a loaded machine).
            sent_by_backend.fetch_add(cap, Ordering::Relaxed);
            if tx.send_data(chunk, false).is_err() {
                return;
            }
        }
    });
    let p = start_proxy(ProxyConfig::default(), &[addr]).await;
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    // The client's windows are h2's defaults (64 KiB), and it releases nothing for a second.
    let (send, conn) = h2::client::handshake(s).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::builder()
        .uri("http://svc.test/stream")
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = timeout(LIMIT, resp)
        .await
        .expect("headers in time")
        .expect("response");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stalled_at = sent.load(Ordering::Relaxed);
    println!("backend sent {stalled_at} bytes while the client read nothing");
    // Client window + the proxy's per-stream window towards the backend, plus a frame.
    let bound = 64 * 1024 + ProxyConfig::default().stream_window as usize + 64 * 1024;
    assert!(
        stalled_at <= bound,
        "backend sent {stalled_at} bytes, more than the windows allow ({bound})"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sent.load(Ordering::Relaxed),
        stalled_at,
        "backend kept sending"
    );

    // Reading resumes the flow.
    let mut body = resp.into_body();
    let mut got = 0usize;
    timeout(LIMIT, async {
        while got < 8 * 1024 * 1024 {
            let chunk = body.data().await.expect("more data").expect("data");
            got += chunk.len();
            body.flow_control()
                .release_capacity(chunk.len())
                .expect("release");
        }
    })
    .await
    .expect("8 MiB after resuming");
    assert!(sent.load(Ordering::Relaxed) >= got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_stream_limit_opens_more_upstream_connections() {
    let b = Backend::start_with([127, 0, 0, 2], "b2", Some(4));
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let c = client(p.addr).await;
    // 16 calls held open at once on one client connection, against a peer that takes 4
    // streams per connection.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..16u8 {
        let mut c = c.clone();
        calls.spawn(async move {
            let r = unary(&mut c, request(pattern(10, i), &[("x-sleep-ms", "300")])).await;
            r.map(|r| r.into_inner() == pattern(10, i))
        });
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let conns = p.proxy.upstream_connections(b.addr);
    println!("upstream connections with 16 calls in flight: {conns}");
    assert!(
        conns >= 4,
        "only {conns} upstream connections for 16 streams at 4 per connection"
    );
    timeout(LIMIT, async {
        while let Some(r) = calls.join_next().await {
            assert!(r.expect("task").expect("call succeeds"), "payload intact");
        }
    })
    .await
    .expect("calls in time");
    assert_eq!(b.calls(), 16);
}

/// An h2 backend that answers gRPC calls by echoing the framed request body, and starts a
/// graceful shutdown (GOAWAY) on each connection as soon as its first stream arrives.
async fn goaway_backend(ip: [u8; 4]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                let mut first = true;
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if first {
                        conn.graceful_shutdown();
                        first = false;
                    }
                    let count = count.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut echo = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            echo.extend_from_slice(&chunk);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let mut resp = http::Response::new(());
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/grpc"),
                        );
                        resp.headers_mut()
                            .insert("x-backend", http::HeaderValue::from_static("goaway"));
                        let Ok(mut tx) = respond.send_response(resp, false) else {
                            return;
                        };
                        let _ = tx.send_data(Bytes::from(echo), false);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let _ = tx.send_trailers(trailers);
                        count.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
        }
    });
    (addr, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_an_upstream_goaway_are_replayed() {
    let (going, answered) = goaway_backend([127, 0, 0, 2]).await;
    let good = Backend::start([127, 0, 0, 3], "b3");
    let p = start_proxy(ProxyConfig::default(), &[going, good.addr]).await;
    let c = client(p.addr).await;
    let mut total = 0;
    timeout(LIMIT, async {
        for round in 0..10u8 {
            let mut calls = tokio::task::JoinSet::new();
            for i in 0..20u8 {
                let mut c = c.clone();
                let payload = pattern(100 + i as usize, round.wrapping_add(i));
                calls.spawn(async move {
                    let r = unary(&mut c, request(payload.clone(), &[])).await;
                    r.map(|r| r.into_inner() == payload)
                });
            }
            while let Some(r) = calls.join_next().await {
                assert!(
                    r.expect("task").expect("call succeeds despite GOAWAY"),
                    "payload intact"
                );
                total += 1;
            }
        }
    })
    .await
    .expect("calls in time");
    let by_goaway = answered.load(Ordering::Relaxed);
    println!(
        "{total} calls: {by_goaway} answered by the draining backend, {} by the other",
        good.calls()
    );
    assert_eq!(
        by_goaway + good.calls(),
        total,
        "every call answered exactly once"
    );
    assert!(
        by_goaway > 0,
        "the draining backend answered its processed streams"
    );
}

/// Padding counts against the flow-control windows like payload (RFC 9113 6.1) but goes
/// nowhere: the proxy must give its window back, on the connection and on the stream. A
/// client that pads its request body and keeps to its windows must not stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_request_data_gives_its_window_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = small_window_proxy(b.addr).await;
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut r, mut w) = s.into_split();
    // Frames the proxy sends, as (type, flags, stream, payload), read in the background.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u8, u8, u32, Vec<u8>)>();
    tokio::spawn(async move {
        let mut head = [0u8; 9];
        while r.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if r.read_exact(&mut payload).await.is_err() {
                return;
            }
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if tx.send((head[3], head[4], id, payload)).is_err() {
                return;
            }
        }
    });
    // The client takes any response: the largest windows.
    let mut hello = interceptor::proxy::detect::H2_PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    hello.extend(frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    let mut block = request_pseudo();
    hpack_int(&mut block, 4, 0, 31);
    hpack_str(&mut block, b"application/grpc");
    block.push(0x00);
    hpack_str(&mut block, b"te");
    hpack_str(&mut block, b"trailers");
    hello.extend(frame(HEADERS, END_HEADERS, 1, &block));
    w.write_all(&hello).await.expect("request head");
    // A gRPC message in DATA frames of 256 bytes, each padded with 255 more (and the length
    // byte): 400 KB of window for 200 KB of body, six times the windows the proxy grants.
    const CHUNK: usize = 256;
    const FRAME: i64 = 1 + CHUNK as i64 + 255;
    let msg: Vec<u8> = (0..800 * CHUNK - 5).map(|i| (i % 251) as u8).collect();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let chunks: Vec<&[u8]> = body.chunks(CHUNK).collect();
    #[derive(Default)]
    struct Seen {
        conn_window: i64,
        stream_window: i64,
        echoed: usize,
        ended: bool,
    }
    fn on_frame(seen: &mut Seen, (kind, flags, id, payload): (u8, u8, u32, Vec<u8>)) {
        match kind {
            8 => {
                let n = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let n = (n & 0x7fff_ffff) as i64;
                if id == 0 {
                    seen.conn_window += n;
                } else {
                    seen.stream_window += n;
                }
            }
            0 if id == 1 => seen.echoed += payload.len(),
            1 if id == 1 && flags & END_STREAM != 0 => seen.ended = true,
            7 | 3 => panic!("the proxy ended the stream or connection: type {kind} {payload:?}"),
            _ => {}
        }
    }
    let mut seen = Seen {
        conn_window: 65_535,
        stream_window: 65_535,
        ..Seen::default()
    };
    let mut sent = 0;
    while sent < chunks.len() {
        if seen.conn_window < FRAME || seen.stream_window < FRAME {
            let f = timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "stalled after {sent} of {} frames: windows {} / {}",
                        chunks.len(),
                        seen.conn_window,
                        seen.stream_window
                    )
                })
                .expect("proxy still connected");
            on_frame(&mut seen, f);
            continue;
        }
        let mut payload = vec![255u8];
        payload.extend_from_slice(chunks[sent]);
        payload.resize(FRAME as usize, 0);
        sent += 1;
        let flags = 0x8 | if sent == chunks.len() { END_STREAM } else { 0 };
        w.write_all(&frame(0, flags, 1, &payload))
            .await
            .expect("data");
        seen.conn_window -= FRAME;
        seen.stream_window -= FRAME;
    }
    while !seen.ended {
        let f = timeout(LIMIT, rx.recv())
            .await
            .expect("response in time")
            .expect("proxy still connected");
        on_frame(&mut seen, f);
    }
    let echoed = seen.echoed;
    println!("{sent} padded frames sent, {echoed} bytes echoed");
    assert_eq!(echoed, body.len(), "the message came back whole");
}

/// A client that sends past the windows it was granted is stopped (RFC 9113 6.9.1): what it
/// sends beyond would pile up in the proxy for an endpoint that reads at its own pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_past_the_granted_window_is_a_flow_control_error() {
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = small_window_proxy(b.addr).await;
    let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(3)).await;
    let mut bytes = frame(HEADERS, END_HEADERS, 1, &request_pseudo());
    // 16 frames of 16 KiB: four times the stream's window, sent without waiting for any.
    for _ in 0..16 {
        bytes.extend(frame(0, 0, 1, &[7u8; 16_384]));
    }
    use tokio::io::AsyncWriteExt;
    let _ = w.write_all(&bytes).await;
    let frames = reader.await.expect("reader");
    let code = |p: &[u8], at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let reset = frames
        .iter()
        .any(|f| f.0 == 3 && f.1 == 1 && code(&f.2, 0) == 3);
    let goaway = frames.iter().any(|f| f.0 == 7 && code(&f.2, 4) == 3);
    assert!(
        reset || goaway,
        "RST_STREAM or GOAWAY with FLOW_CONTROL_ERROR expected: {:?}",
        frames.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>()
    );
}
