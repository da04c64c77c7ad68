//! A real HTTP/1.1 backend on hyper that names itself, for the proxy and end-to-end tests:
//! - every response carries `x-backend: <name>`;
//! - `/echo` streams the request body back as it arrives (fixed length in, fixed length
//!   out; chunked in, chunked out; request trailers back as response trailers when the
//!   client accepts them);
//! - `/close` answers with `Connection: close`;
//! - `/ws` is a WebSocket echo (tungstenite), `/raw-upgrade` switches to whatever `Upgrade`
//!   asks for and echoes raw bytes, CONNECT answers 200 and echoes;
//! - anything else answers `<name>\n`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// What one backend saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    /// The headers of the latest request.
    pub last_headers: Mutex<Option<HeaderMap>>,
}

impl Seen {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

type Body = Either<Incoming, Full<Bytes>>;

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, name: Arc<str>, seen: Arc<Seen>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        seen.connections.fetch_add(1, Ordering::Relaxed);
        let (name, seen) = (name.clone(), seen.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(name.clone(), seen.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn text(name: &str, status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(name) {
        r.headers_mut().insert("x-backend", v);
    }
    r
}

async fn handle(
    name: Arc<str>,
    seen: Arc<Seen>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    seen.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut h) = seen.last_headers.lock() {
        *h = Some(req.headers().clone());
    }
    if req.method() == http::Method::CONNECT {
        // A tunnel: 200, then the bytes come back.
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(io) = upgrade.await else { return };
            let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        return Ok(text(&name, StatusCode::OK, String::new()));
    }
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/echo" => {
            // hyper sends only the trailer fields a message declares in `Trailer`.
            let declared = req.headers().get(http::header::TRAILER).cloned();
            let mut r = Response::new(Either::Left(req.into_body()));
            if let Some(t) = declared {
                r.headers_mut().insert(http::header::TRAILER, t);
            }
            r.headers_mut()
                .insert("x-backend", HeaderValue::from_str(&name).expect("name"));
            r
        }
        "/close" => {
            let mut r = text(&name, StatusCode::OK, format!("{name}\n"));
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                return Ok(text(&name, StatusCode::BAD_REQUEST, "no key\n".into()));
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = text(&name, StatusCode::SWITCHING_PROTOCOLS, String::new());
            let h = r.headers_mut();
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(
                "sec-websocket-accept",
                HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("accept key"),
            );
            r
        }
        "/raw-upgrade" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            // Switches to whatever was asked for (echo, h2c, ...) and echoes raw bytes.
            let token = req
                .headers()
                .get(UPGRADE)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("echo"));
            let mut r = text(&name, StatusCode::SWITCHING_PROTOCOLS, String::new());
            r.headers_mut().insert(UPGRADE, token);
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            r
        }
        _ => {
            // Drain what was sent, so keep-alive goes on after a request with a body.
            let _ = req.into_body().collect().await;
            text(&name, StatusCode::OK, format!("{name}\n"))
        }
    };
    Ok(resp)
}
