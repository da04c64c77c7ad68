//! Every gRPC call shape through the demultiplexer, from empty to 16 MiB messages, with
//! metadata, trailers and error statuses intact.

#[path = "proxy_support.rs"]
mod support;

use std::time::Duration;

use bytes::{BufMut, Bytes};
use interceptor::proxy::config::ProxyConfig;
use support::*;
use tokio::time::timeout;
use tonic::metadata::MetadataValue;
use tonic::Code;

const SIZES: [usize; 7] = [
    0,
    1,
    100,
    16 * 1024,
    65_537,
    1024 * 1024 + 3,
    16 * 1024 * 1024,
];
const LIMIT: Duration = Duration::from_secs(60);

async fn setup() -> (Vec<Backend>, ProxyUnderTest, Client) {
    let backends: Vec<Backend> = (2..=3)
        .map(|i| Backend::start([127, 0, 0, i], &format!("b{i}")))
        .collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let p = start_proxy(ProxyConfig::default(), &addrs).await;
    let c = client(p.addr).await;
    (backends, p, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_all_sizes_with_metadata() {
    let (_b, _p, mut c) = setup().await;
    timeout(LIMIT, async {
        for (i, size) in SIZES.iter().enumerate() {
            let payload = pattern(*size, i as u8);
            let mut req = request(payload.clone(), &[("x-echo", "hello metadata")]);
            req.metadata_mut()
                .insert_bin("x-echo-bin", MetadataValue::from_bytes(&[0u8, 1, 2, 255]));
            let r = unary(&mut c, req).await.expect("unary call");
            assert_eq!(
                r.metadata().get("x-echo").expect("x-echo back"),
                "hello metadata"
            );
            assert_eq!(
                r.metadata()
                    .get_bin("x-echo-bin")
                    .expect("binary metadata back")
                    .to_bytes()
                    .expect("b64"),
                Bytes::from_static(&[0, 1, 2, 255])
            );
            assert!(r.into_inner() == payload, "payload of {size} bytes differs");
        }
    })
    .await
    .expect("unary calls in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_all_sizes_with_trailers() {
    let (_b, _p, mut c) = setup().await;
    timeout(LIMIT, async {
        for size in SIZES {
            let count: u32 = if size >= 1024 * 1024 { 2 } else { 20 };
            let mut req = Vec::new();
            req.put_u32_le(count);
            req.put_u32_le(size as u32);
            let r = server_stream(&mut c, request(Bytes::from(req), &[("x-echo", "s")]))
                .await
                .expect("server streaming call");
            assert_eq!(r.metadata().get("x-echo").expect("header back"), "s");
            let (msgs, trailers) = collect(r.into_inner()).await.expect("stream");
            assert_eq!(msgs.len(), count as usize);
            for (i, m) in msgs.iter().enumerate() {
                assert!(
                    *m == pattern(size, i as u8),
                    "message {i} of {size} bytes differs"
                );
            }
            let t = trailers.expect("trailers");
            assert_eq!(t.get("x-trailer").expect("custom trailer"), "done");
        }
    })
    .await
    .expect("server streaming in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_all_sizes() {
    let (_b, _p, mut c) = setup().await;
    timeout(LIMIT, async {
        for size in SIZES {
            let n = if size >= 1024 * 1024 { 2 } else { 30 };
            let msgs: Vec<Bytes> = (0..n).map(|i| pattern(size, i as u8)).collect();
            let mut d = Digest::default();
            for m in &msgs {
                d.update(m);
            }
            let r = client_stream(&mut c, msgs, &[("x-echo", "c")])
                .await
                .expect("client streaming call");
            assert_eq!(r.metadata().get("x-echo").expect("header back"), "c");
            assert_eq!(r.into_inner(), d.to_bytes(), "digest of {n} x {size} bytes");
        }
        // No message at all.
        let r = client_stream(&mut c, Vec::new(), &[])
            .await
            .expect("empty client stream");
        assert_eq!(r.into_inner(), Digest::default().to_bytes());
    })
    .await
    .expect("client streaming in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_all_sizes_interleaved() {
    let (_b, _p, mut c) = setup().await;
    timeout(LIMIT, async {
        for size in SIZES {
            let n = if size >= 1024 * 1024 { 2 } else { 25 };
            // Send one message, wait for its echo, then the next: proves each direction
            // flows while the other is open.
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            let r = bidi(
                &mut c,
                request(tokio_stream::wrappers::ReceiverStream::new(rx), &[]),
            )
            .await
            .expect("bidi call");
            let mut s = r.into_inner();
            for i in 0..n {
                let m = pattern(size, i as u8);
                tx.send(m.clone()).await.expect("send bidi message");
                let echo = s.message().await.expect("bidi echo").expect("an echo");
                assert!(echo == m, "echo {i} of {size} bytes differs");
            }
            drop(tx);
            assert!(s.message().await.expect("end").is_none());
            let t = s
                .trailers()
                .await
                .expect("trailers")
                .expect("trailers present");
            assert_eq!(t.get("x-trailer").expect("custom trailer"), "done");
        }
    })
    .await
    .expect("bidi in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_messages_and_details_unchanged() {
    let (_b, _p, mut c) = setup().await;
    let cases = [
        (Code::InvalidArgument, "bad argument: field x"),
        (Code::NotFound, "no such thing"),
        (Code::PermissionDenied, "über verboten ✓"),
        (Code::Unavailable, "backend says unavailable"),
        (Code::Internal, ""),
        (Code::ResourceExhausted, "quota\nwith newline"),
    ];
    timeout(LIMIT, async {
        for (code, msg) in cases {
            let code_s = (code as i32).to_string();
            let req = request(
                Bytes::copy_from_slice(msg.as_bytes()),
                &[("x-fail-code", code_s.as_str())],
            );
            let st = unary(&mut c, req).await.expect_err("the call fails");
            assert_eq!(st.code(), code, "{st:?}");
            assert_eq!(st.message(), msg, "{st:?}");
            assert_eq!(
                st.metadata().get("x-detail").expect("error metadata"),
                "failure-detail"
            );
        }
    })
    .await
    .expect("error calls in time");
}
