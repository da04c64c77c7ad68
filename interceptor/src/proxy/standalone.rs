//! `interceptor proxy`: the demultiplexer on a plain listener with static or file-based
//! endpoints, for trying it out and benchmarking without eBPF or Kubernetes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::config::{BalancerKind, ProxyConfig};
use super::connector::TcpConnector;
use super::endpoints::{EndpointSpec, EndpointsHandle};
use super::server::Proxy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BalancerArg {
    P2c,
    RoundRobin,
}

/// Arguments of the standalone proxy.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to accept client connections on.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_LISTEN",
        default_value = "127.0.0.1:15001"
    )]
    pub listen: SocketAddr,
    /// Endpoints (ADDR[,ADDR...]).
    #[arg(long, env = "INTERCEPTOR_PROXY_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<SocketAddr>,
    /// File with one endpoint ADDR per line ('#' starts a comment); re-read when it changes.
    #[arg(long, env = "INTERCEPTOR_PROXY_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
    /// How each stream's endpoint is chosen.
    #[arg(long, env = "INTERCEPTOR_PROXY_BALANCER", value_enum, default_value_t = BalancerArg::P2c)]
    pub balancer: BalancerArg,
    /// Wait for a client's first bytes before relaying it as opaque TCP, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_DETECT_TIMEOUT_MS",
        default_value_t = 300
    )]
    pub detect_timeout_ms: u64,
    /// Connect timeout per endpoint, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_CONNECT_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub connect_timeout_ms: u64,
    /// How often the endpoints file is checked for changes, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_RELOAD_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub reload_interval_ms: u64,
    /// On shutdown, how long in-flight streams may take to finish, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_DRAIN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub drain_timeout_ms: u64,
    /// Admin endpoint (/healthz, /readyz, /metrics, /config); off unless given.
    #[arg(long, env = "INTERCEPTOR_PROXY_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Proxy worker threads, each serving its share of the client connections on its own
    /// single-threaded runtime (default: one per CPU).
    #[arg(long, env = "INTERCEPTOR_PROXY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Limits that keep one client or one endpoint from hurting the others; shared by
/// `interceptor run` and `interceptor proxy`.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct LimitArgs {
    /// End a stream on which nothing moved for this long, in milliseconds (0: never). Calls
    /// with a grpc-timeout end at their deadline anyway; long-lived streams that may stay
    /// silent longer (watches) need a larger value or 0.
    #[arg(
        long,
        env = "INTERCEPTOR_STREAM_IDLE_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    pub stream_idle_timeout_ms: u64,
    /// Largest request or response header list taken, in bytes; bigger requests get 431.
    #[arg(
        long,
        env = "INTERCEPTOR_MAX_HEADER_LIST_BYTES",
        default_value_t = 65_536
    )]
    pub max_header_list_bytes: u32,
    /// Client connections served at once; the excess is closed at accept. Default: half of
    /// RLIMIT_NOFILE less 64.
    #[arg(long, env = "INTERCEPTOR_MAX_CLIENT_CONNECTIONS")]
    pub max_client_connections: Option<usize>,
}

impl LimitArgs {
    /// `config` with these limits.
    pub fn apply(&self, config: ProxyConfig) -> ProxyConfig {
        ProxyConfig {
            stream_idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
            max_header_list_bytes: self.max_header_list_bytes,
            max_client_connections: self.max_client_connections,
            ..config
        }
    }
}

impl ProxyArgs {
    /// The proxy configuration these arguments select.
    pub fn config(&self) -> ProxyConfig {
        self.limits.apply(ProxyConfig {
            balancer: match self.balancer {
                BalancerArg::P2c => BalancerKind::P2c,
                BalancerArg::RoundRobin => BalancerKind::RoundRobin,
            },
            detect_timeout: Duration::from_millis(self.detect_timeout_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            ..ProxyConfig::default()
        })
    }
}

/// Parses an endpoints file: one address per line, blank lines and `#` comments ignored.
pub fn parse_endpoints(text: &str) -> anyhow::Result<Vec<SocketAddr>> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            l.parse::<SocketAddr>()
                .with_context(|| format!("line {}: {l:?} is not an IP:PORT address", i + 1))
        })
        .collect()
}

async fn read_endpoints(path: &Path) -> anyhow::Result<Vec<SocketAddr>> {
    // tokio's fs feature is not enabled for the agent; the file is small, read it off the
    // runtime threads.
    let owned = path.to_path_buf();
    let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(owned))
        .await
        .context("endpoints file reader task")?
        .with_context(|| format!("reading endpoints file {}", path.display()))?;
    parse_endpoints(&text).with_context(|| format!("parsing endpoints file {}", path.display()))
}

fn apply(handle: &EndpointsHandle, fixed: &[SocketAddr], from_file: &[SocketAddr]) {
    handle.update(
        fixed
            .iter()
            .chain(from_file)
            .copied()
            .map(EndpointSpec::ready),
    );
}

/// Runs until Ctrl-C or SIGTERM, then drains.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.admin_addr {
        let metrics = crate::admin::install_metrics()?;
        crate::admin::serve(
            addr,
            Arc::new(crate::admin::Admin {
                metrics,
                config: serde_json::json!({ "mode": "proxy", "args": format!("{args:?}") }),
                state: None,
                pin_root: None,
            }),
        )
        .await?;
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the proxy listener on {}", args.listen))?;
    serve(listener, args, async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(error) => {
                    tracing::error!(%error, "cannot wait for SIGTERM; stopping");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await
}

/// Serves on `listener` until `shutdown` completes, then drains (for tests and embedding).
pub async fn serve(
    listener: TcpListener,
    args: ProxyArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if args.endpoints.is_empty() && args.endpoints_file.is_none() {
        anyhow::bail!("no endpoints: pass --endpoints ADDR[,ADDR...] or --endpoints-file PATH");
    }
    let local = listener
        .local_addr()
        .context("reading the listener address")?;
    let proxy = Proxy::new(args.config(), Arc::new(TcpConnector));
    let handle = proxy.endpoints(local);
    let mut from_file = match &args.endpoints_file {
        Some(p) => read_endpoints(p).await?,
        None => Vec::new(),
    };
    apply(&handle, &args.endpoints, &from_file);
    tracing::info!(listen = %local, endpoints = ?handle.snapshot().iter().map(|e| e.addr).collect::<Vec<_>>(), balancer = ?args.balancer, "proxy listening");

    let mut reload = tokio::time::interval(Duration::from_millis(args.reload_interval_ms.max(10)));
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let proxy = proxy.clone();
                    let served = super::workers::spawn_connection(stream, move |stream| async move {
                        if let Err(error) = proxy.serve_connection(stream, local).await {
                            tracing::debug!(%peer, %error, "client connection ended with an error");
                        }
                    });
                    match served {
                        // Tracked here so the drain waits for it, wherever it runs.
                        Ok(task) => {
                            conns.spawn(async move {
                                let _ = task.await;
                            });
                        }
                        Err(error) => tracing::warn!(%peer, %error, "could not hand a connection to a worker"),
                    }
                }
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = reload.tick(), if args.endpoints_file.is_some() => {
                if let Some(path) = &args.endpoints_file {
                    match read_endpoints(path).await {
                        Ok(next) if next != from_file => {
                            tracing::info!(endpoints = ?next, "endpoints file changed");
                            from_file = next;
                            apply(&handle, &args.endpoints, &from_file);
                        }
                        Ok(_) => {}
                        Err(error) => tracing::warn!(error = %format!("{error:#}"), "keeping the previous endpoints"),
                    }
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    proxy.shutdown();
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(args.drain_timeout_ms), drain)
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = conns.len(),
            "drain timeout; closing remaining connections"
        );
        conns.abort_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_lines() {
        let v = parse_endpoints("# pods\n127.0.0.1:80\n\n 127.0.0.2:81 # second\n").expect("parse");
        assert_eq!(v.len(), 2);
        assert!(parse_endpoints("nonsense").is_err());
    }
}
