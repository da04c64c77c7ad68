//! The admin endpoint (loopback by default): `/healthz`, `/readyz`, `/metrics` (Prometheus),
//! `/config` (the effective configuration) and `/state` (what the agent applied).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::proxy::metrics as pm;
use crate::state::SharedState;

/// Kernel counters exported under this name, one series per reason.
pub const KERNEL_CONNECTS: &str = "interceptor_kernel_connects_total";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin endpoint: cannot listen on {addr}: {source} (choose another --admin-addr)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics listener: cannot listen on {addr}: {source} (choose another --metrics-addr; on a node, the node's own IP)")]
    BindMetrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the metrics recorder: {0}")]
    Metrics(String),
}

/// Installs the process-wide Prometheus recorder and describes every metric. Once per process.
pub fn install_metrics() -> Result<PrometheusHandle, AdminError> {
    // Request latency buckets: loopback and in-cluster calls are sub-millisecond to seconds.
    let buckets = [
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(pm::REQUEST_DURATION.to_string()), &buckets)
        .map_err(|e| AdminError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| AdminError::Metrics(e.to_string()))?;
    pm::describe();
    metrics::describe_counter!(
        KERNEL_CONNECTS,
        metrics::Unit::Count,
        "connect() calls seen by the eBPF hooks in intercepted pods, by verdict"
    );
    metrics::describe_gauge!(
        crate::state::POD_NOT_INTERCEPTED,
        metrics::Unit::Count,
        "1 while a pod in an enabled namespace is not intercepted (cgroup not found yet, attach failed; `interceptor status` says why), 0 once it is"
    );
    metrics::describe_gauge!(
        crate::state::PODS_NOT_INTERCEPTED,
        metrics::Unit::Count,
        "Pods in enabled namespaces that are not intercepted"
    );
    Ok(handle)
}

/// What the admin endpoint serves.
pub struct Admin {
    pub metrics: PrometheusHandle,
    /// The effective configuration as JSON.
    pub config: serde_json::Value,
    /// The agent's applied state; `None` for the standalone proxy (always ready).
    pub state: Option<SharedState>,
    /// Pin root whose stats map feeds the kernel counters, if any.
    pub pin_root: Option<PathBuf>,
}

impl Admin {
    fn ready(&self) -> Result<(), &'static str> {
        match &self.state {
            None => Ok(()),
            Some(s) => match s.read() {
                Ok(v) if v.ready => Ok(()),
                Ok(_) => {
                    Err("waiting for the first complete desired state (discovery not synced yet)")
                }
                Err(_) => Err("state lock poisoned"),
            },
        }
    }

    fn metrics_text(&self) -> String {
        if let Some(root) = &self.pin_root {
            if let Ok(stats) = crate::bpf::read_pinned_stats(root) {
                for (stat, value) in stats {
                    metrics::counter!(KERNEL_CONNECTS, "reason" => stat.label()).absolute(value);
                }
            }
        }
        self.metrics.render()
    }

    fn respond(&self, path: &str, scope: Scope) -> (StatusCode, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        if scope == Scope::MetricsOnly && path != "/metrics" {
            return (
                StatusCode::NOT_FOUND,
                TEXT,
                "this listener serves only /metrics (the admin endpoint is on loopback)\n".into(),
            );
        }
        match path {
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => match self.ready() {
                Ok(()) => (StatusCode::OK, TEXT, "ready\n".into()),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
            },
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics_text(),
            ),
            "/config" => json_body(serde_json::to_string_pretty(&self.config)),
            "/state" => match &self.state {
                Some(s) => json_body(match s.read() {
                    Ok(v) => serde_json::to_string_pretty(&*v),
                    Err(p) => serde_json::to_string_pretty(&*p.into_inner()),
                }),
                None => (
                    StatusCode::NOT_FOUND,
                    TEXT,
                    "no agent state in proxy mode\n".into(),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                TEXT,
                "not found: try /healthz /readyz /metrics /config /state\n".into(),
            ),
        }
    }
}

fn json_body(r: serde_json::Result<String>) -> (StatusCode, &'static str, String) {
    match r {
        Ok(body) => (StatusCode::OK, "application/json", body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("cannot serialise: {e}\n"),
        ),
    }
}

/// What a listener serves: everything (the loopback admin endpoint), or only /metrics (the
/// opt-in listener a cluster Prometheus scrapes, which must not expose /config or /state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Full,
    MetricsOnly,
}

async fn handle(
    admin: Arc<Admin>,
    scope: Scope,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = admin.respond(req.uri().path(), scope);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// A listener that the next agent can bind too while this one still runs (an upgrade with
/// maxSurge: old and new agent share the node's network), hence SO_REUSEPORT.
fn bind_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Binds `addr` and serves in the background; returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, admin: Arc<Admin>) -> Result<SocketAddr, AdminError> {
    serve_scoped(addr, admin, Scope::Full).await
}

/// Like `serve`, with what the listener may serve.
pub async fn serve_scoped(
    addr: SocketAddr,
    admin: Arc<Admin>,
    scope: Scope,
) -> Result<SocketAddr, AdminError> {
    let listener = bind_shared(addr).map_err(|source| match scope {
        Scope::Full => AdminError::Bind { addr, source },
        Scope::MetricsOnly => AdminError::BindMetrics { addr, source },
    })?;
    let local = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin endpoint accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(admin.clone(), scope, req));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    });
    match scope {
        Scope::Full => tracing::info!(admin_addr = %local, "admin endpoint listening"),
        Scope::MetricsOnly => {
            tracing::info!(metrics_addr = %local, "metrics listener (only /metrics) listening")
        }
    }
    Ok(local)
}

/// A GET against an admin endpoint, for the CLI (`status`, `explain`): plain HTTP/1.0 on a
/// loopback socket, so the CLI needs no runtime.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}
