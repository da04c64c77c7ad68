//! Wiring and lifecycle: the data path (bpf), the pod-local listeners and demultiplexers
//! (proxy), the source of what to intercept (discovery), and the admin endpoint.

pub mod agent;
pub mod handoff;
pub mod inspect;
pub mod reconcile;
pub mod standalone;

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
use crate::proxy::EndpointSpec;

use crate::state::SharedState;
pub use agent::Agent;
pub use inspect::{explain, status, uninstall};
use reconcile::Reconciler;

/// The agent: `interceptor run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    tracing::info!(config = %serde_json::to_string(&args).unwrap_or_default(), "starting");
    warn_if_busy_poll_unused(args.busy_poll_us, &args.limits);
    runtime(args.worker_threads, args.busy_poll_us)?.block_on(run_agent(args))
}

/// The proxy worker threads (`workers`, default one per CPU) serve the client connections;
/// this runtime, one thread, runs the rest: listeners' accept loops, discovery, the admin
/// endpoint. `busy_poll_us` > 0 keeps each worker polling that long after its last read.
fn runtime(workers: Option<usize>, busy_poll_us: u64) -> anyhow::Result<tokio::runtime::Runtime> {
    let n = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    crate::proxy::workers::start(n, std::time::Duration::from_micros(busy_poll_us))
        .context("starting the proxy worker threads")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("interceptor")
        .build()
        .context("starting the async runtime")
}

/// Busy polling follows the relay's reads: on the streams engine it would never start.
fn warn_if_busy_poll_unused(busy_poll_us: u64, limits: &crate::cli::LimitArgs) {
    if busy_poll_us > 0 && limits.h2_engine == crate::cli::H2EngineArg::Streams {
        tracing::warn!(
            busy_poll_us,
            "--busy-poll-us has no effect with --h2-engine streams: only the relay engine busy polls"
        );
    }
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
    // A running agent (an upgrade in progress) hands over its pod-local listeners, so no
    // connect falls back to kube-proxy while this one starts.
    let mut taking = match handoff::take(&args.handoff_socket) {
        Ok(Some((listeners, taking))) => {
            tracing::info!(listeners = listeners.len(), socket = %args.handoff_socket.display(), "taking over the pod-local listeners of the running agent");
            agent.adopt_handed(listeners);
            Some(taking)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not take over from the running agent; opening new listeners (its pods fall back to kube-proxy until it exits)");
            None
        }
    };
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
            finish_takeover(&mut taking, &mut agent);
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
    // Hands this agent's listeners to the next one (an upgrade); see app/handoff.rs.
    let (offers_tx, mut offers) = tokio::sync::mpsc::channel::<handoff::Request>(1);
    match handoff::Offer::bind(&args.handoff_socket) {
        Ok(offer) => {
            std::thread::Builder::new()
                .name("handoff".into())
                .spawn(move || loop {
                    match offer.accept() {
                        Ok(req) => {
                            if offers_tx.blocking_send(req).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "handoff socket failed; upgrades will not be hitless");
                            return;
                        }
                    }
                })?;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve the handoff socket; the next upgrade will not be hitless")
        }
    }
    // Set once the listeners are sent: the new agent's READY, or why it never came.
    let mut handing: Option<tokio::sync::oneshot::Receiver<Result<(), handoff::HandoffError>>> =
        None;
    let mut handed_over = false;

    let mut log_tick = tokio::time::interval(Duration::from_millis(100));
    let mut retry_tick = tokio::time::interval(Duration::from_secs(1));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = log_tick.tick() => datapath.drain_kernel_log(),
            Some(req) = offers.recv(), if handing.is_none() => {
                // Discovery and retries pause until the new agent answers: this agent must
                // not detach or re-pin hooks the new one is taking over.
                let sockets = agent.listener_sockets();
                match req.send(&sockets) {
                    Ok(()) => {
                        tracing::info!(listeners = sockets.len(), "a new agent is taking over: listeners sent, waiting until it accepts on them");
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        tokio::task::spawn_blocking(move || {
                            let _ = tx.send(req.wait_ready());
                        });
                        handing = Some(rx);
                    }
                    Err(e) => tracing::warn!(error = %e, "handing the listeners to the new agent failed; still serving"),
                }
            }
            ready = async { handing.as_mut().expect("guarded").await }, if handing.is_some() => {
                match ready {
                    Ok(Ok(())) => {
                        handed_over = true;
                        break;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "the new agent did not take over; still serving"),
                    Err(_) => tracing::warn!("the handoff was abandoned; still serving"),
                }
                handing = None;
            }
            changed = objects_rx.changed(), if reconciler.is_some() && handing.is_none() => {
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
                    finish_takeover(&mut taking, &mut agent);
                    tracing::info!(pods = agent.enabled().len(), "agent ready");
                }
            }
            _ = retry_tick.tick(), if applied_once && handing.is_none() => {
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
    if handed_over {
        // The sockets live on in the new agent: closing this agent's copies changes nothing
        // for new connects, and its HTTP/2 clients reconnect to the new agent after GOAWAY.
        tracing::info!(drain_timeout_ms = args.handoff_drain_timeout.as_millis() as u64, "the new agent accepts on the pod-local listeners: this agent stops accepting and drains its open connections (GOAWAY to HTTP/2 clients; opaque relays until they end)");
    } else {
        // The hooks stay attached (pinned): with the listeners closed they fail open, and the
        // next agent picks them up. `interceptor uninstall` removes them.
        tracing::info!(drain_timeout_ms = args.drain_timeout.as_millis() as u64, "stopping: closing pod-local listeners (new connects fail open), draining open connections; hooks stay pinned");
    }
    source.abort_all();
    // After a handover nothing here waits on this agent but its own old connections: opaque
    // relays (a database session, a stream) may take their time, up to the longer limit.
    let limit = if handed_over {
        args.handoff_drain_timeout
    } else {
        args.drain_timeout
    };
    let left = agent.drain(limit).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout reached; closing the remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
    if handed_over {
        // Exiting now would make the kubelet restart this container, and the restarted old
        // version would take the listeners back. The DaemonSet controller deletes this pod
        // once the new one is ready (maxSurge): its SIGTERM ends the agent.
        tracing::info!("handed over and drained: idle until SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    Ok(())
}

/// Once this agent serves every pod it took over: tells the previous agent to stop, and closes
/// handed sockets no pod took.
fn finish_takeover(taking: &mut Option<handoff::Taking>, agent: &mut Agent) {
    let Some(t) = taking.take() else { return };
    let unused = agent.forget_handed();
    match t.ready() {
        Ok(()) => tracing::info!(
            pods = agent.enabled().len(),
            unused,
            "took over the pod-local listeners; the previous agent stops accepting and drains"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not tell the previous agent to stop; it keeps accepting until it exits")
        }
    }
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
pub fn standalone_proxy(args: crate::cli::ProxyArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, "starting standalone proxy");
    warn_if_busy_poll_unused(args.busy_poll_us, &args.limits);
    runtime(args.worker_threads, args.busy_poll_us)?.block_on(standalone::run(args))
}
