//! Raw HTTP/2 backends on h2: one accept loop, one connection task per client and one task
//! per stream, with the test's own handler for each request.

use std::future::Future;

use bytes::Bytes;
use h2::server::{Builder, SendResponse};
use h2::RecvStream;
use http::Request;
use tokio::net::TcpListener;

/// Serves HTTP/2 on `listener` until it fails, with connections set up by `builder`. Each
/// request is handed to `handler` on its connection's task (so what the closure does before
/// its future sees requests in order) and the returned future runs in its own task.
pub async fn serve<H, F>(listener: TcpListener, builder: Builder, handler: H)
where
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let (builder, handler) = (builder.clone(), handler.clone());
        tokio::spawn(async move {
            let Ok(mut conn) = builder.handshake::<_, Bytes>(stream).await else {
                return;
            };
            while let Some(Ok((request, respond))) = conn.accept().await {
                tokio::spawn(handler(request, respond));
            }
        });
    }
}

/// [`serve`] with h2's default settings.
pub async fn serve_default<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    serve(listener, Builder::new(), handler).await
}

/// Reads the request to its end, as a unary gRPC server does, then answers one message
/// (`ok`) and `grpc-status: 0`. Answering before the request's end would make h2 reset the
/// stream (RST_STREAM NO_ERROR), and a server that resets many streams is told off by its
/// own h2 ("too_many_internal_resets" GOAWAY).
pub async fn answer_grpc_ok(request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let mut body = request.into_body();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let response = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .expect("static response");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x02ok"), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = send.send_trailers(trailers);
}
