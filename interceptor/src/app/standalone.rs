//! `interceptor proxy`: the demultiplexer on a plain listener with static or file-based
//! endpoints, for trying it out and benchmarking without eBPF or Kubernetes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::cli::ProxyArgs;
use crate::proxy::connector::TcpConnector;
use crate::proxy::destination::EndpointsHandle;
use crate::proxy::EndpointSpec;
use crate::proxy::Proxy;

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
                    let served = crate::proxy::workers::spawn_connection(stream, move |stream| async move {
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
