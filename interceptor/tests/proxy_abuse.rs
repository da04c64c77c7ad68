//! Bad input on one client connection ends that connection only.

#[path = "proxy_support.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use interceptor::proxy::config::{H2Engine, ProxyConfig};
use interceptor::proxy::detect::H2_PREFACE;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

/// Writes `bytes` after the preface and reads until the proxy closes; returns the frames the
/// proxy sent as (type, payload).
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await.expect("connect proxy");
    s.write_all(H2_PREFACE).await.expect("preface");
    s.write_all(bytes).await.expect("bad bytes");
    let mut got = Vec::new();
    // The proxy must close the connection (EOF or reset), not hang.
    let _ = timeout(LIMIT, s.read_to_end(&mut got))
        .await
        .expect("proxy closed the connection");
    parse_frames(&got)
        .into_iter()
        .map(|(kind, _, payload, _)| (kind, payload))
        .collect()
}

fn goaway_code(frames: &[(u8, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|(t, p)| *t == 7 && p.len() >= 8)
        .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
}

async fn healthy(c: &mut Client) {
    let r = timeout(
        LIMIT,
        unary(c, request(Bytes::from_static(b"still fine"), &[])),
    )
    .await
    .expect("call in time")
    .expect("other connection still works");
    assert_eq!(r.into_inner(), Bytes::from_static(b"still fine"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_preface_closes_only_that_connection() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let mut good = client(p.addr).await;
    healthy(&mut good).await;
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let frames = send_raw(p.addr, &garbage).await;
    println!(
        "proxy answered garbage with frame types {:?}",
        frames.iter().map(|f| f.0).collect::<Vec<_>>()
    );
    healthy(&mut good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_frames_get_goaway_with_the_rfc_error_code() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let mut good = client(p.addr).await;
    let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    // DATA on stream 0 is a connection error of type PROTOCOL_ERROR (RFC 9113 6.1).
    let mut bad = settings.to_vec();
    bad.extend_from_slice(&[0, 0, 4, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', b'd']);
    let frames = send_raw(p.addr, &bad).await;
    assert_eq!(
        goaway_code(&frames),
        Some(1),
        "GOAWAY PROTOCOL_ERROR expected: {frames:?}"
    );
    // A WINDOW_UPDATE of 0 on the connection is one too.
    let mut bad = settings.to_vec();
    bad.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let frames = send_raw(p.addr, &bad).await;
    assert_eq!(
        goaway_code(&frames),
        Some(1),
        "GOAWAY PROTOCOL_ERROR expected: {frames:?}"
    );
    // A frame larger than SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR.
    let mut bad = settings.to_vec();
    bad.extend_from_slice(&[0, 0x80, 0, 0, 0, 0, 0, 0, 1]);
    bad.extend(std::iter::repeat_n(0u8, 0x8000));
    let frames = send_raw(p.addr, &bad).await;
    assert_eq!(
        goaway_code(&frames),
        Some(6),
        "GOAWAY FRAME_SIZE_ERROR expected: {frames:?}"
    );
    // A header block HPACK cannot decode (index 0 is not a table entry): COMPRESSION_ERROR
    // (RFC 9113 4.3). The relay decodes HPACK itself and says so; the streams engine's h2
    // 0.4 sends PROTOCOL_ERROR for every HPACK decoding error, with no way for its user to
    // choose the code.
    let mut bad = settings.to_vec();
    bad.extend_from_slice(&[0, 0, 1, 1, 5, 0, 0, 0, 1, 0x80]);
    let frames = send_raw(p.addr, &bad).await;
    let (code, name) = match H2Engine::default() {
        H2Engine::Relay => (9, "COMPRESSION_ERROR"),
        H2Engine::Streams => (1, "PROTOCOL_ERROR"),
    };
    assert_eq!(
        goaway_code(&frames),
        Some(code),
        "GOAWAY {name} expected: {frames:?}"
    );
    // A WINDOW_UPDATE that takes the connection window past 2^31-1: FLOW_CONTROL_ERROR.
    let mut bad = settings.to_vec();
    bad.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
    let frames = send_raw(p.addr, &bad).await;
    assert_eq!(
        goaway_code(&frames),
        Some(3),
        "GOAWAY FLOW_CONTROL_ERROR expected: {frames:?}"
    );
    healthy(&mut good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_storm_closes_only_that_connection() {
    let _serial = SERIAL.lock().await;
    // The endpoint's own defence is lifted (h2 closes a connection on which more than 20
    // streams were reset before it accepted them): here both clients share the proxy's
    // upstream connections, and what is tested is what the proxy does. What the endpoint's
    // defence does, and that it reaches only the storming pod, is tests/tests/fault_domain.rs.
    let b = Backend::start_tolerating_resets([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let mut good = client(p.addr).await;
    healthy(&mut good).await;
    // Another client's calls all through the storm.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (mut c, stop) = (good.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let call = unary(&mut c, request(Bytes::from_static(b"meanwhile"), &[]));
                    match timeout(LIMIT, call).await {
                        Ok(Ok(_)) => ok += 1,
                        Ok(Err(status)) => failed.push(format!("{status:?}")),
                        Err(_) => failed.push("no answer in time".to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::handshake(s).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let storm = 20_000;
    let mut sent = 0;
    let outcome = timeout(LIMIT, async {
        for _ in 0..storm {
            send = match send.ready().await {
                Ok(s) => s,
                Err(e) => return Some(e),
            };
            let req = http::Request::builder()
                .method("POST")
                .uri("http://svc.test/test.Echo/Hang")
                .header("content-type", "application/grpc")
                .body(())
                .expect("request");
            match send.send_request(req, false) {
                Ok((_resp, mut body)) => body.send_reset(h2::Reason::CANCEL),
                Err(e) => return Some(e),
            }
            sent += 1;
        }
        None
    })
    .await
    .expect("storm ended in time");
    let conn_result = timeout(LIMIT, conn)
        .await
        .expect("storm connection closed")
        .expect("conn task");
    println!("storm: {sent} streams sent before {outcome:?}; connection ended with {conn_result:?}; backend saw {} calls", b.calls());
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for caller in callers {
        let (n, f) = caller.await.expect("caller task");
        ok += n;
        failed.extend(f);
    }
    println!(
        "meanwhile on another connection: {ok} calls answered, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "calls of another client failed: {failed:?}"
    );
    assert!(ok > 0, "the other client's calls went on during the storm");
    assert!(sent < storm, "the storm connection was never closed");
    let err = conn_result.expect_err("the connection ended with an error");
    // GOAWAY ENHANCE_YOUR_CALM; or, when the proxy closed the socket with the storm's bytes
    // still unread, the kernel's RST can overtake the GOAWAY on its way to the client.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err:?}"
    );
    healthy(&mut good).await;
    // A fresh connection works too.
    let mut fresh = client(p.addr).await;
    healthy(&mut fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_accepted_streams_too_fast_closes_the_connection() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let cfg = ProxyConfig {
        max_client_resets_per_second: 20,
        ..Default::default()
    };
    let p = start_proxy(cfg, &[b.addr]).await;
    let mut good = client(p.addr).await;
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::handshake(s).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    timeout(LIMIT, async {
        for _ in 0..200 {
            send = match send.ready().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let req = http::Request::builder()
                .method("POST")
                .uri("http://svc.test/test.Echo/Hang")
                .header("content-type", "application/grpc")
                .body(())
                .expect("request");
            let Ok((_resp, mut body)) = send.send_request(req, false) else {
                return;
            };
            // Long enough for the proxy to accept and forward the stream.
            tokio::time::sleep(Duration::from_millis(3)).await;
            body.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
    })
    .await
    .expect("cancels in time");
    let err = timeout(LIMIT, conn)
        .await
        .expect("connection closed")
        .expect("conn task")
        .expect_err("closed with an error");
    println!(
        "closed after {sent} cancelled streams: {err:?}; backend saw {} calls",
        b.calls()
    );
    // GOAWAY ENHANCE_YOUR_CALM; or, when the client was still writing as the proxy closed
    // the socket, its write fails (broken pipe, reset) before it reads the GOAWAY.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err:?}"
    );
    assert!(sent < 200 && sent > 20, "{sent}");
    healthy(&mut good).await;
}

// ---- header lists, HPACK, flow control and connection limits -------------------------------

/// Tests here run one at a time: several measure this process's RSS.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_list_gets_431_and_never_reaches_an_endpoint() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let legit = Legit::start(p.addr).await;
    let rss_before = rss_kib();
    let big_request = |size: usize| {
        http::Request::builder()
            .method("POST")
            .uri("http://svc.test/test.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("x-big", "a".repeat(size))
            .body(())
            .expect("request")
    };
    // 200 streams with a 70 KiB header, just over the 64 KiB cap: each gets 431 and the
    // connection stays up.
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::handshake(s).await.expect("handshake");
    tokio::spawn(conn);
    let mut statuses = HashMap::<u16, usize>::new();
    for _ in 0..200 {
        send = send.ready().await.expect("connection still usable");
        let (resp, _) = send
            .send_request(big_request(70 << 10), true)
            .expect("send");
        let resp = timeout(LIMIT, resp)
            .await
            .expect("answer in time")
            .expect("a response, not a reset");
        *statuses.entry(resp.status().as_u16()).or_default() += 1;
    }
    // A 1 MiB header needs far more CONTINUATION frames than 64 KiB can fill: h2 ends the
    // connection (GOAWAY ENHANCE_YOUR_CALM) instead of piling the block up.
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::handshake(s).await.expect("handshake");
    let conn = tokio::spawn(conn);
    send = send.ready().await.expect("ready");
    let (resp, _) = send.send_request(big_request(1 << 20), true).expect("send");
    let huge = timeout(LIMIT, resp).await.expect("answer in time");
    let conn_end = timeout(LIMIT, conn)
        .await
        .expect("closed in time")
        .expect("conn task");
    let growth = rss_kib().saturating_sub(rss_before);
    let report = legit.stop().await;
    println!(
        "70 KiB headers: statuses {statuses:?}; 1 MiB header: {:?}, connection {conn_end:?}; RSS growth {growth} KiB",
        huge.as_ref().map(|r| r.status())
    );
    assert_eq!(statuses.get(&431), Some(&200), "{statuses:?}");
    let err = huge.expect_err("no response to a 1 MiB header");
    // GOAWAY ENHANCE_YOUR_CALM; or, when the proxy closed the socket while the client was
    // still writing the block, its write fails (broken pipe) before it reads the GOAWAY.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err:?}"
    );
    // Only the legitimate client's calls reached the endpoint.
    assert_eq!(
        b.calls(),
        report.calls,
        "an oversized request was forwarded"
    );
    assert_unharmed(&report);
    // Without the cap the proxy held every decoded header list (the abuse report measured
    // 210 MiB for 200 streams of 1 MiB).
    assert!(growth < 32 * 1024, "RSS grew by {growth} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_continuation_blocks_hold_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let legit = Legit::start(p.addr).await;
    let rss_before = rss_kib();
    let mut attackers = Vec::new();
    // 16 connections, each starting one header block whose single value claims 8 MiB and
    // sending it on in CONTINUATION frames, never ending the block.
    for _ in 0..16 {
        let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(3)).await;
        let mut block = request_pseudo();
        block.push(0x00);
        hpack_str(&mut block, b"x-pile");
        hpack_int(&mut block, 7, 0, 8 << 20);
        block.resize(16_000, b'a');
        let mut sent = 0usize;
        let mut first = Some(frame(HEADERS, END_STREAM, 1, &block));
        let chunk = vec![b'a'; 16_000];
        while sent < 8 << 20 {
            let f = first
                .take()
                .unwrap_or_else(|| frame(CONTINUATION, 0, 1, &chunk));
            if w.write_all(&f).await.is_err() {
                break;
            }
            sent += 16_000;
        }
        attackers.push((w, reader, sent));
    }
    let growth = rss_kib().saturating_sub(rss_before);
    let mut closed = 0;
    for (w, reader, sent) in attackers {
        let frames = reader.await.expect("reader");
        // The proxy gave up on the block long before 8 MiB: GOAWAY, then closed.
        if frames.iter().any(|f| f.0 == 7) {
            closed += 1;
        }
        assert!(
            sent < 8 << 20 || frames.iter().any(|f| f.0 == 7),
            "{sent} bytes taken without complaint"
        );
        drop(w);
    }
    let report = legit.stop().await;
    println!(
        "16 unfinished header blocks: RSS growth {growth} KiB, {closed} connections got GOAWAY"
    );
    assert_eq!(closed, 16, "every attacking connection is told to go away");
    assert_eq!(
        b.calls(),
        report.calls,
        "a partial header block was forwarded"
    );
    assert_unharmed(&report);
    assert!(
        growth < 32 * 1024,
        "RSS grew by {growth} KiB (h2's 16 MiB default: ~318 MiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_is_rejected_before_it_reaches_an_endpoint() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let legit = Legit::start(p.addr).await;
    let rss_before = rss_kib();
    let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(3)).await;
    let streams = 500u32;
    let mut wire = 0usize;
    for i in 0..streams {
        let mut block = request_pseudo();
        if i == 0 {
            // A 4000-byte value into the dynamic table (index 62)...
            block.push(0x40);
            hpack_str(&mut block, b"x-bomb");
            hpack_str(&mut block, &[b'b'; 4000]);
        }
        // ...referenced 20 times per request: 30 bytes on the wire, 80 KB decoded.
        block.extend(std::iter::repeat_n(0xbe, 20));
        let f = frame(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * i, &block);
        wire += f.len();
        if w.write_all(&f).await.is_err() {
            break;
        }
    }
    let frames = reader.await.expect("reader");
    let growth = rss_kib().saturating_sub(rss_before);
    let answered: std::collections::HashSet<u32> = frames
        .iter()
        .filter(|f| f.0 == HEADERS)
        .map(|f| f.1)
        .collect();
    let report = legit.stop().await;
    println!(
        "HPACK bomb: {wire} bytes sent for {} MB decoded; {} streams answered locally, {} GOAWAY; RSS growth {growth} KiB",
        streams as usize * 20 * 4038 / 1_000_000,
        answered.len(),
        frames.iter().filter(|f| f.0 == 7).count(),
    );
    assert_eq!(
        b.calls(),
        report.calls,
        "a bomb request reached the endpoint"
    );
    assert!(
        answered.len() as u32 == streams || frames.iter().any(|f| f.0 == 7),
        "every bomb stream is answered (431) or the connection is closed"
    );
    assert_unharmed(&report);
    assert!(growth < 32 * 1024, "RSS grew by {growth} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pings_without_reading_is_no_longer_read() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let legit = Legit::start(p.addr).await;
    let rss_before = rss_kib();
    // Every PING asks for an answer that this client never reads. Were the proxy to read on,
    // the answers would pile up in it without end; it stops reading instead, and the client's
    // writes stall once the socket buffers between the two are full (a few MiB on loopback).
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (_r, mut w) = s.into_split();
    w.write_all(H2_PREFACE).await.expect("preface");
    w.write_all(&frame(4, 0, 0, &[])).await.expect("settings");
    let batch: Vec<u8> = (0..4096u64)
        .flat_map(|i| frame(6, 0, 0, &i.to_be_bytes()))
        .collect();
    const CAP: usize = 256 << 20;
    let started = Instant::now();
    let mut sent = 0usize;
    let stalled = loop {
        if sent >= CAP || started.elapsed() > Duration::from_secs(60) {
            break false;
        }
        match timeout(Duration::from_secs(2), w.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(e)) => panic!("the proxy closed the connection instead: {e}"),
            Err(_) => break true,
        }
    };
    let growth = rss_kib().saturating_sub(rss_before);
    println!(
        "PINGs written before the proxy stopped reading: {} MiB in {:?}; RSS growth {growth} KiB",
        sent >> 20,
        started.elapsed()
    );
    assert!(
        stalled,
        "the proxy read {} MiB of PINGs it could not answer",
        sent >> 20
    );
    // The answers it holds (1 MiB) and what its socket buffers hold, not the flood.
    assert!(growth < 32 * 1024, "RSS grew by {growth} KiB");
    drop(w);
    assert_unharmed(&legit.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_stall_only_their_own_streams() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let rss_before = rss_kib();
    // 12 streams on a connection that advertises a zero stream window: the proxy can send
    // them nothing, so every byte the endpoint answers stays in the proxy's upstream windows.
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(s)
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut stalled = Vec::new();
    for _ in 0..12 {
        send = send.ready().await.expect("ready");
        let req = http::Request::builder()
            .method("POST")
            .uri("http://svc.test/test.Echo/ServerStream")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (resp, mut body) = send.send_request(req, false).expect("send");
        // 4 messages of 512 KiB: 2 MiB, twice the stream window.
        let mut msg = vec![0u8, 0, 0, 0, 8];
        msg.extend_from_slice(&4u32.to_le_bytes());
        msg.extend_from_slice(&(512u32 * 1024).to_le_bytes());
        body.send_data(Bytes::from(msg), true)
            .expect("request body");
        stalled.push(resp);
    }
    // Give the endpoint time to fill the windows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = client(p.addr).await;
    let mut lat = Vec::new();
    for i in 0..30u8 {
        let t = Instant::now();
        let mut req = Vec::new();
        req.extend_from_slice(&2u32.to_le_bytes());
        req.extend_from_slice(&(256u32 * 1024).to_le_bytes());
        let resp = timeout(
            Duration::from_secs(5),
            server_stream(&mut c, request(Bytes::from(req), &[])),
        )
        .await
        .unwrap_or_else(|_| panic!("call {i} stalled behind the clients that stopped reading"))
        .expect("server stream");
        let (msgs, _) = timeout(Duration::from_secs(5), collect(resp.into_inner()))
            .await
            .unwrap_or_else(|_| panic!("call {i}'s body stalled"))
            .expect("messages");
        assert_eq!(msgs.len(), 2);
        lat.push(t.elapsed());
    }
    let growth = rss_kib().saturating_sub(rss_before);
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100 - 1];
    println!(
        "12 stalled streams beside 30 x 512 KiB calls: p99 {p99:?}, RSS growth {growth} KiB, upstream connections {}",
        p.proxy.upstream_connections(b.addr)
    );
    assert_eq!(
        p.proxy.upstream_connections(b.addr),
        1,
        "all streams share one upstream connection"
    );
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    // Bounded by one stream window (1 MiB) per stalled stream on the proxy's side, plus what
    // the endpoint and this test's own clients buffer.
    assert!(growth < 96 * 1024, "RSS grew by {growth} KiB");
    drop(stalled);
}

/// An HTTP/2 endpoint that never reads the request bodies of `/no-read` streams (holding
/// them until the test ends) and answers `/ok` once it has read the whole request. Its own
/// connection window is large, as grpc-go's is in effect, so one unread stream does not
/// freeze its other streams on the endpoint's side.
async fn endpoint_that_stops_reading(ip: [u8; 4]) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let mut builder = h2::server::Builder::new();
    builder.initial_connection_window_size(1 << 30);
    tokio::spawn(h2_backend::serve(l, builder, |req, respond| async move {
        if req.uri().path() == "/no-read" {
            // Held, never read, until the test ends.
            let _held = (req, respond);
            return std::future::pending::<()>().await;
        }
        h2_backend::answer_grpc_ok(req, respond).await
    }));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_whose_endpoint_stops_reading_stall_only_themselves() {
    let _serial = SERIAL.lock().await;
    let b = endpoint_that_stops_reading([127, 0, 0, 3]).await;
    let p = start_proxy(ProxyConfig::default(), &[b]).await;
    let rss_before = rss_kib();
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::handshake(s).await.expect("handshake");
    tokio::spawn(conn);
    let post = |path: &str| {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://svc.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request")
    };
    // 40 streams of 1 MiB the endpoint never reads: each leaves a stream window (256 KiB) of
    // unreleased body in this connection's window, 10 MiB in all, more than its 4 MiB start.
    let mut stalled = Vec::new();
    for _ in 0..40 {
        send = send.ready().await.expect("ready");
        let (resp, mut body) = send.send_request(post("/no-read"), false).expect("send");
        body.send_data(Bytes::from(vec![0u8; 1 << 20]), true)
            .expect("request body");
        stalled.push((resp, body));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The same connection's other calls, each with a 64 KiB body.
    let mut lat = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        send = send.ready().await.expect("ready");
        let (resp, mut body) = send.send_request(post("/ok"), false).expect("send");
        let mut msg = vec![0u8, 0, 1, 0, 0];
        msg.resize(5 + 65536, 7);
        body.send_data(Bytes::from(msg), true)
            .expect("request body");
        let resp = timeout(Duration::from_secs(5), resp)
            .await
            .unwrap_or_else(|_| panic!("call {i} stalled behind the streams nobody reads"))
            .expect("response");
        let mut rbody = resp.into_body();
        while let Some(chunk) = rbody.data().await {
            chunk.expect("response body");
        }
        let trailers = timeout(Duration::from_secs(5), rbody.trailers())
            .await
            .expect("trailers in time")
            .expect("trailers")
            .expect("trailers present");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        lat.push(t.elapsed());
    }
    let growth = rss_kib().saturating_sub(rss_before);
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100 - 1];
    println!("40 streams the endpoint never reads beside 50 calls on the same connection: p99 {p99:?}, RSS growth {growth} KiB");
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    // At most a stream window, the replay log and what is in flight upstream (about 400 KiB)
    // per unread stream in the proxy, plus what this test's own client and endpoint buffer.
    assert!(growth < 96 * 1024, "RSS grew by {growth} KiB");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_accept() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let cfg = ProxyConfig {
        max_client_connections: Some(20),
        ..Default::default()
    };
    let p = start_proxy(cfg, &[b.addr]).await;
    let legit = Legit::start(p.addr).await;
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(p.addr).await.expect("connect proxy");
        s.write_all(H2_PREFACE).await.expect("preface");
        held.push(s);
    }
    let mut closed = 0;
    for s in held.iter_mut() {
        let mut buf = [0u8; 256];
        // A served connection gets the proxy's SETTINGS; a rejected one EOF or a reset.
        match timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    let (open, max) = p.proxy.client_connections();
    let report = legit.stop().await;
    println!("40 connections over a limit of 20 (1 legitimate): {closed} closed at accept; {open}/{max} open");
    assert_eq!(max, 20);
    assert_eq!(
        closed, 21,
        "all but the 19 that fit beside the legitimate one are closed"
    );
    assert_unharmed(&report);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connection_gets_goaway() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let cfg = ProxyConfig {
        client_idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let p = start_proxy(cfg, &[b.addr]).await;
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (mut send, conn) = h2::client::handshake(s).await.expect("handshake");
    let conn = tokio::spawn(conn);
    // Busy for longer than the timeout: a connection with a stream open is not idle.
    let started = Instant::now();
    send = send.ready().await.expect("ready");
    let req = http::Request::builder()
        .method("POST")
        .uri("http://svc.test/test.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-sleep-ms", "700")
        .body(())
        .expect("request");
    let (resp, mut body) = send.send_request(req, false).expect("send");
    body.send_data(Bytes::from_static(b"\0\0\0\0\x01z"), true)
        .expect("body");
    let resp = timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut rb = resp.into_body();
    while let Some(d) = rb.data().await {
        let d = d.expect("response body after 700 ms on a connection with a 400 ms idle timeout");
        let _ = rb.flow_control().release_capacity(d.len());
    }
    assert!(started.elapsed() >= Duration::from_millis(700));
    let idle_from = Instant::now();
    let ended = timeout(Duration::from_secs(3), conn)
        .await
        .expect("the idle connection was closed")
        .expect("conn task");
    println!(
        "idle connection closed {:?} after its last stream: {ended:?}",
        idle_from.elapsed()
    );
    assert!(ended.is_ok(), "a graceful GOAWAY, not an error: {ended:?}");
    assert!(idle_from.elapsed() < Duration::from_millis(1500));
}

/// h2 endpoints (tonic, hyper) close a connection with GOAWAY "too_many_data_frames" once it
/// has brought them 100 empty DATA frames without END_STREAM, counted over the connection's
/// life. The upstream connection is shared by every client of the endpoint, so the empty
/// frames of two clients (60 each, each under any per-connection limit of its own) must not
/// reach it: a call of a third client waiting there would be cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_frames_of_clients_do_not_reach_the_shared_upstream_connection() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    // A call that stays open on the upstream connection until the test ends it.
    let mut waiter = client(p.addr).await;
    let waiting =
        tokio::spawn(
            async move { hang(&mut waiter, request(Bytes::from_static(b"wait"), &[])).await },
        );
    let until = Instant::now() + LIMIT;
    while b.state.hang_started.lock().expect("lock").is_empty() {
        assert!(
            Instant::now() < until,
            "the waiting call never reached the endpoint"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let legit = Legit::start(p.addr).await;
    let mut abusers = Vec::new();
    for _ in 0..2 {
        let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(2)).await;
        let mut burst = Vec::new();
        let mut block = request_pseudo();
        hpack_int(&mut block, 4, 0, 31);
        hpack_str(&mut block, b"application/grpc");
        burst.extend(frame(HEADERS, END_HEADERS, 1, &block));
        for _ in 0..60 {
            burst.extend(frame(0, 0, 1, &[]));
        }
        burst.extend(frame(0, END_STREAM, 1, b"\0\0\0\0\x03abc"));
        w.write_all(&burst).await.expect("the abuser's frames");
        abusers.push((w, reader));
    }
    for (w, reader) in abusers {
        let frames = reader.await.expect("abuser reader");
        drop(w);
        let answered = frames
            .iter()
            .any(|(ty, id, _, flags)| *ty == HEADERS && *id == 1 && flags & END_STREAM != 0);
        let goaway = frames.iter().find(|f| f.0 == 7).map(|f| f.2.clone());
        // The relay drops the empty frames and answers; h2's server (the streams engine) may
        // send its own GOAWAY to the abuser. Either way only the abuser is affected.
        println!("abuser: answered {answered}, GOAWAY {goaway:?}");
    }
    assert!(
        !waiting.is_finished(),
        "the call waiting on the shared upstream connection ended: {:?}",
        waiting.await
    );
    waiting.abort();
    assert_unharmed(&legit.stop().await);
}

/// A request whose DATA does not add up to its content-length is malformed (RFC 9113 8.1.1):
/// reset here with PROTOCOL_ERROR, not passed on. Passed on, the endpoint would reset it, and
/// a reset from the endpoint counts against it: one client could get healthy endpoints
/// ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_contradicts_its_content_length_is_reset_here_and_not_charged() {
    let _serial = SERIAL.lock().await;
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let head = |content_length: &[u8]| {
        let mut block = request_pseudo();
        hpack_int(&mut block, 4, 0, 31);
        hpack_str(&mut block, b"application/grpc");
        hpack_int(&mut block, 4, 0, 28);
        hpack_str(&mut block, content_length);
        block
    };
    let msg: &[u8] = b"\0\0\0\0\x05hello";
    // More DATA than announced, less DATA than announced, a value that is not a number, and
    // END_STREAM on HEADERS with a length.
    let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(1)).await;
    let mut burst = Vec::new();
    burst.extend(frame(HEADERS, END_HEADERS, 1, &head(b"3")));
    burst.extend(frame(0, END_STREAM, 1, msg));
    burst.extend(frame(HEADERS, END_HEADERS, 3, &head(b"30")));
    burst.extend(frame(0, END_STREAM, 3, msg));
    burst.extend(frame(HEADERS, END_HEADERS, 5, &head(b"1x")));
    burst.extend(frame(0, END_STREAM, 5, msg));
    burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 7, &head(b"4")));
    w.write_all(&burst).await.expect("the requests");
    let frames = reader.await.expect("reader");
    drop(w);
    for id in [1, 3, 5, 7] {
        assert_eq!(
            reset_code(&frames, id),
            Some(1),
            "stream {id}: RST_STREAM PROTOCOL_ERROR"
        );
    }
    let stats = p.proxy.endpoints(p.addr).destination().stats(b.addr);
    assert_eq!(
        stats.map(|s| s.consecutive_failures()).unwrap_or(0),
        0,
        "the endpoint was charged for requests that were malformed"
    );
    // A body that matches its content-length, in two frames, is answered.
    let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(1)).await;
    let mut burst = Vec::new();
    burst.extend(frame(HEADERS, END_HEADERS, 1, &head(b"10")));
    burst.extend(frame(0, 0, 1, &msg[..4]));
    burst.extend(frame(0, END_STREAM, 1, &msg[4..]));
    w.write_all(&burst).await.expect("the request");
    let frames = reader.await.expect("reader");
    drop(w);
    assert!(
        frames
            .iter()
            .any(|(ty, id, _, flags)| *ty == HEADERS && *id == 1 && flags & END_STREAM != 0),
        "the request whose body matches its content-length is answered: {:?}",
        frames.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>()
    );
    assert_eq!(reset_code(&frames, 1), None);
}

/// h2 endpoints keep a per-connection budget for small DATA frames their application has not
/// read yet, and close the connection with GOAWAY ENHANCE_YOUR_CALM once it is spent (about
/// 130 one-byte frames). The upstream connection carries other clients' calls: a flood of tiny
/// frames from one client, read in one turn, must reach the endpoint joined (both engines: the
/// relay in relay/coalesce.rs, the streams engine in body_pump.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tiny_data_frames_reaches_the_endpoint_joined() {
    let _serial = SERIAL.lock().await;
    // An h2 endpoint whose application never reads request bodies.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = listener.local_addr().expect("addr");
    let server = tokio::spawn(interceptor_test_support::h2_backend::serve_default(
        listener,
        |request, respond| async move {
            let _unread = (request, respond);
            std::future::pending::<()>().await
        },
    ));
    let p = start_proxy(ProxyConfig::default(), &[endpoint]).await;
    // Another client's call, open on the upstream connection.
    let s = TcpStream::connect(p.addr).await.expect("connect proxy");
    let (send, conn) = h2::client::handshake(s).await.expect("handshake");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let victim = http::Request::builder()
        .method("POST")
        .uri("http://svc.test/test.Echo/Unary")
        .header("content-type", "application/grpc")
        .body(())
        .expect("request");
    let (victim, mut victim_body) = send.send_request(victim, false).expect("send");
    victim_body
        .send_data(Bytes::from_static(b"\0\0\0\0\x05hello"), false)
        .expect("victim data");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 400 one-byte DATA frames in one write.
    let (mut w, reader) = raw_conn(p.addr, Duration::from_secs(1)).await;
    let mut block = request_pseudo();
    hpack_int(&mut block, 4, 0, 31);
    hpack_str(&mut block, b"application/grpc");
    let mut burst = frame(HEADERS, END_HEADERS, 1, &block);
    for i in 0..400u32 {
        burst.extend(frame(0, 0, 1, &[i as u8]));
    }
    w.write_all(&burst).await.expect("the flood");
    let frames = reader.await.expect("reader");
    drop(w);
    let ended = frames
        .iter()
        .find(|f| f.0 == 7 || f.0 == 3)
        .map(|f| (f.0, f.2.clone()));
    println!("flooding client got: {ended:?}");
    match timeout(Duration::from_millis(500), victim).await {
        Err(_) => {}
        Ok(r) => panic!("the other client's call ended: {r:?}"),
    }
    server.abort();
}
