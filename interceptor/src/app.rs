//! Wiring and lifecycle: the data path (bpf), the pod-local listeners and demultiplexers
//! (proxy), the source of what to intercept (discovery), and the admin endpoint.

pub mod agent;
pub mod handoff;
pub mod inspect;
pub mod reconcile;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::admin::{self, Admin};
use crate::bpf::{Datapath, DatapathConfig, ServiceAction};
use crate::cli::{RunArgs, Source};
use crate::discovery::cgroup::CgroupLayout;
use crate::discovery::objects::{Objects, Policy};
use crate::discovery::{file, kube};
use crate::proxy::config::ProxyConfig;
use crate::proxy::endpoints::EndpointSpec;

pub use agent::Agent;
pub use inspect::{explain, status, uninstall};
use reconcile::{Reconciler, SharedState};

/// The agent: `interceptor run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    tracing::info!(config = %serde_json::to_string(&args).unwrap_or_default(), "starting");
    runtime(args.worker_threads)?.block_on(run_agent(args))
}

/// The proxy worker threads (`workers`, default one per CPU) serve the client connections;
/// this runtime, one thread, runs the rest: listeners' accept loops, discovery, the admin
/// endpoint.
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let n = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    crate::proxy::workers::start(n).context("starting the proxy worker threads")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("interceptor")
        .build()
        .context("starting the async runtime")
}

/// Flags that contradict each other fail before anything is touched.
fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    let static_flags =
        !args.pods.is_empty() || !args.services.is_empty() || !args.endpoints.is_empty();
    if static_flags && args.source != Source::Static {
        anyhow::bail!("--pod, --service and --endpoints describe a static setup: add --source static (the {:?} source finds pods and Services itself)", args.source);
    }
    if args.source == Source::Kube && args.node_name.as_deref().unwrap_or("").is_empty() {
        anyhow::bail!("--source kube needs --node-name (INTERCEPTOR_NODE_NAME; in the DaemonSet it comes from the downward API's spec.nodeName)");
    }
    if args.source != Source::File && args.manifests.is_some() {
        anyhow::bail!("--manifests is only read with --source file");
    }
    if let Some(m) = args.metrics_addr {
        m.resolve(args.node_ip).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

async fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let metrics = admin::install_metrics()?;
    // The cgroup layout and the Kubernetes client are checked before the datapath is touched:
    // a misconfigured agent must not take over a previous agent's hooks and then exit.
    let layout = match args.source {
        Source::Static => None,
        _ => Some(CgroupLayout::detect(args.cgroup_root.clone())?),
    };
    let kube_client = match args.source {
        Source::Kube => Some(kube::client().await?),
        _ => None,
    };
    if let Some(path) = &args.manifests {
        file::load(path).context("the agent starts only with manifests that parse")?;
    }

    let config = DatapathConfig {
        pin_root: args.pins.pin_root.clone(),
        listen_port: args.listen_port,
        kernel_debug_log: args.kernel_debug_log,
        replace_stale_pins: args.replace_stale_pins,
    };
    let mut datapath = Datapath::load(&config)?;
    let mut agent = Agent::with_balancing(
        &datapath,
        args.listen_port,
        args.limits.apply(ProxyConfig::default()),
    );
    let state = SharedState::default();
    let admin = Arc::new(Admin {
        metrics,
        config: serde_json::to_value(&args).unwrap_or_default(),
        state: Some(state.clone()),
        pin_root: Some(args.pins.pin_root.clone()),
    });
    admin::serve(args.admin_addr, admin.clone()).await?;
    if let Some(addr) = args.metrics_addr {
        let addr = addr.resolve(args.node_ip).map_err(anyhow::Error::msg)?;
        admin::serve_scoped(addr, admin, admin::Scope::MetricsOnly).await?;
    }

    let (objects_tx, mut objects_rx) = watch::channel(Arc::new(Objects::default()));
    let mut source = tokio::task::JoinSet::new();
    match (args.source, layout.clone()) {
        (Source::Static, _) => {
            apply_static(&args, &mut agent, &mut datapath)?;
            if let Ok(mut v) = state.write() {
                v.ready = true;
            }
            tracing::info!(
                pods = agent.enabled().len(),
                services = args.services.len(),
                "agent ready"
            );
        }
        (Source::File, _) => {
            let path = args
                .manifests
                .clone()
                .context("--source file needs --manifests")?;
            source.spawn(async move {
                file::watch_manifests(path, objects_tx)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        (Source::Kube, _) => {
            let client = kube_client.context("Kubernetes client")?;
            let node = args.node_name.clone().unwrap_or_default();
            source.spawn(async move {
                kube::watch_cluster(client, node, objects_tx)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
    }
    let policy = Policy {
        node_name: args.node_name.clone(),
        exclude_ports: args.exclude_ports.clone(),
    };
    let mut reconciler = layout.map(|l| Reconciler::new(l, state.clone()));
    let mut applied_once = false;

    let mut log_tick = tokio::time::interval(Duration::from_millis(100));
    let mut retry_tick = tokio::time::interval(Duration::from_secs(1));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = log_tick.tick() => datapath.drain_kernel_log(),
            changed = objects_rx.changed(), if reconciler.is_some() => {
                if changed.is_err() {
                    continue;
                }
                let objects = objects_rx.borrow_and_update().clone();
                let desired = objects.desired_state(&policy);
                if let Some(r) = reconciler.as_mut() {
                    r.apply(desired, &mut agent, &mut datapath);
                }
                if !applied_once {
                    applied_once = true;
                    tracing::info!(pods = agent.enabled().len(), "agent ready");
                }
            }
            _ = retry_tick.tick(), if applied_once => {
                if let Some(r) = reconciler.as_mut() {
                    r.retry(&mut agent, &mut datapath);
                }
            }
            Some(ended) = source.join_next() => {
                // A source only returns on a fatal error; what was applied stays in force.
                match ended {
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "discovery stopped; the agent keeps serving the last state"),
                    Ok(Ok(())) => tracing::warn!("discovery ended; the agent keeps serving the last state"),
                    Err(e) => tracing::error!(error = %e, "discovery task failed; the agent keeps serving the last state"),
                }
            }
        }
    }
    // The hooks stay attached (pinned): with the listeners closed they fail open, and the next
    // agent picks them up. `interceptor uninstall` removes them.
    tracing::info!(drain_timeout_ms = args.drain_timeout.as_millis() as u64, "stopping: closing pod-local listeners (new connects fail open), draining open connections; hooks stay pinned");
    source.abort_all();
    let left = agent.drain(args.drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout reached; closing the remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
    Ok(())
}

/// `--source static`: pods, services and endpoints straight from the flags.
fn apply_static(args: &RunArgs, agent: &mut Agent, datapath: &mut Datapath) -> anyhow::Result<()> {
    let routes: BTreeMap<SocketAddr, Vec<EndpointSpec>> = args
        .endpoints
        .iter()
        .map(|e| {
            (
                e.service,
                e.endpoints
                    .iter()
                    .copied()
                    .map(EndpointSpec::ready)
                    .collect(),
            )
        })
        .collect();
    agent.set_endpoints(routes);
    let desired: Vec<(SocketAddr, ServiceAction)> = args
        .services
        .iter()
        .map(|addr| {
            let action = if args.exclude_ports.contains(&addr.port()) {
                ServiceAction::Exclude
            } else {
                ServiceAction::Intercept
            };
            (*addr, action)
        })
        .collect();
    agent.set_services(datapath, &desired)?;
    for pod in &args.pods {
        // One pod failing (gone, no process yet) must not stop the others.
        if let Err(e) = agent.enable_pod(datapath, pod) {
            tracing::error!(pod = %pod.name, error = %format!("{e:#}"), "cannot intercept pod");
        }
    }
    for id in datapath.prune_stale_links()? {
        tracing::info!(
            cgroup_id = id.0,
            "detached hooks left for a pod that is no longer enabled"
        );
    }
    Ok(())
}

/// `interceptor proxy`: the demultiplexer on its own (no BPF, no cluster).
pub fn standalone_proxy(args: crate::proxy::standalone::ProxyArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, "starting standalone proxy");
    runtime(args.worker_threads)?.block_on(crate::proxy::standalone::run(args))
}
