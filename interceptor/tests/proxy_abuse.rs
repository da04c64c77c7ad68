//! Bad input on one client connection ends that connection only.

#[path = "proxy_support.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use interceptor::proxy::config::ProxyConfig;
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
    let mut frames = Vec::new();
    let mut rest = &got[..];
    while rest.len() >= 9 {
        let len = ((rest[0] as usize) << 16) | ((rest[1] as usize) << 8) | rest[2] as usize;
        if rest.len() < 9 + len {
            break;
        }
        frames.push((rest[3], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    frames
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
async fn invalid_frames_get_goaway_protocol_error() {
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
    healthy(&mut good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_storm_closes_only_that_connection() {
    let b = Backend::start([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let mut good = client(p.addr).await;
    healthy(&mut good).await;

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
