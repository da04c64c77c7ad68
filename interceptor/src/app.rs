//! Wiring and lifecycle: the data path (bpf), the pod-local listeners (proxy) and the source
//! of what to intercept.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::bpf::{self, CgroupId, Datapath, DatapathConfig, OrigDstTable, ServiceAction};
use crate::cli::{PinArgs, RunArgs, StaticPod};
use crate::netns::Netns;
use crate::proxy::config::ProxyConfig;
use crate::proxy::endpoints::EndpointSpec;
use crate::proxy::passthrough;
use crate::proxy::pod_listener::{
    Accepted, Handler, OrigDstResolver, PodConnector, PodContext, PodListener,
};
use crate::proxy::server::Proxy;

/// The agent: `interceptor run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, "starting");
    runtime()?.block_on(run_agent(args))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("interceptor")
        .build()
        .context("starting the async runtime")
}

async fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let config = DatapathConfig {
        pin_root: args.pins.pin_root.clone(),
        listen_port: args.listen_port,
        kernel_debug_log: args.kernel_debug_log,
        replace_stale_pins: args.replace_stale_pins,
    };
    let mut datapath = Datapath::load(&config)?;
    let balanced: BTreeMap<SocketAddr, Vec<SocketAddr>> = args
        .endpoints
        .iter()
        .map(|e| (e.service, e.endpoints.clone()))
        .collect();
    let mut agent = Agent::with_balancing(&datapath, args.listen_port, balanced);

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
    agent.set_services(&mut datapath, &desired)?;
    for pod in &args.pods {
        // One pod failing (gone, no process yet) must not stop the others.
        if let Err(e) = agent.enable_pod(&mut datapath, pod) {
            tracing::error!(pod = %pod.name, error = %format!("{e:#}"), "cannot intercept pod");
        }
    }
    for id in datapath.prune_stale_links()? {
        tracing::info!(
            cgroup_id = id.0,
            "detached hooks left for a pod that is no longer enabled"
        );
    }
    tracing::info!(
        pods = agent.pods.len(),
        services = desired.len(),
        "agent ready"
    );

    let mut log_tick = tokio::time::interval(Duration::from_millis(100));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = log_tick.tick() => datapath.drain_kernel_log(),
        }
    }
    // The hooks stay attached (pinned): with the listeners closed they fail open, and the next
    // agent picks them up. `interceptor uninstall` removes them.
    tracing::info!("stopping: closing pod-local listeners, hooks stay pinned and fail open");
    agent.close_all();
    Ok(())
}

/// Adapts the kernel's original-destination map to the proxy's resolver.
struct MapResolver(OrigDstTable);

impl OrigDstResolver for MapResolver {
    fn resolve(&self, netns_cookie: u64, peer: SocketAddr) -> io::Result<Option<SocketAddr>> {
        self.0.lookup(netns_cookie, peer).map_err(io::Error::other)
    }
}

/// Makes the connection handler of one pod (each pod gets its own demultiplexer and pools).
type HandlerFactory = Arc<dyn Fn(&Arc<PodContext>) -> Handler + Send + Sync>;

/// The intercepted pods and what keeps them intercepted.
pub struct Agent {
    listen_port: u16,
    resolver: Arc<dyn OrigDstResolver>,
    handlers: HandlerFactory,
    pods: BTreeMap<CgroupId, (String, PodListener)>,
}

impl Agent {
    /// An agent whose every pod hands accepted connections to `handler`.
    pub fn new(datapath: &Datapath, listen_port: u16, handler: Handler) -> Self {
        Self::with_factory(datapath, listen_port, Arc::new(move |_| handler.clone()))
    }

    /// An agent that balances each HTTP/2 stream of a connection to one of `balanced`'s
    /// Services over that Service's endpoints, through a demultiplexer per pod (its upstream
    /// connections are opened from the pod's netns and pooled per pod). Connections to other
    /// intercepted Services are relayed to their original destination.
    pub fn with_balancing(
        datapath: &Datapath,
        listen_port: u16,
        balanced: BTreeMap<SocketAddr, Vec<SocketAddr>>,
    ) -> Self {
        let balanced = Arc::new(balanced);
        let factory: HandlerFactory = Arc::new(move |pod: &Arc<PodContext>| {
            let proxy = Proxy::new(ProxyConfig::default(), Arc::new(PodConnector(pod.clone())));
            for (service, endpoints) in balanced.iter() {
                proxy
                    .endpoints(*service)
                    .update(endpoints.iter().map(|e| EndpointSpec::ready(*e)));
            }
            let balanced = balanced.clone();
            Arc::new(move |conn: Accepted| {
                let proxy = proxy.clone();
                let balanced = balanced.contains_key(&conn.orig_dst);
                Box::pin(async move {
                    if !balanced {
                        return passthrough::relay(conn).await;
                    }
                    let (pod, dest) = (conn.pod.name.clone(), conn.orig_dst);
                    if let Err(e) = proxy.serve_connection(conn.stream, dest).await {
                        tracing::debug!(pod = %pod, %dest, error = %e, "client connection ended with an error");
                    }
                })
            })
        });
        Self::with_factory(datapath, listen_port, factory)
    }

    fn with_factory(datapath: &Datapath, listen_port: u16, handlers: HandlerFactory) -> Self {
        Self {
            listen_port,
            resolver: Arc::new(MapResolver(datapath.orig_dst_table())),
            handlers,
            pods: BTreeMap::new(),
        }
    }

    /// Opens the pod's listener in its netns, then attaches the hooks to its cgroup.
    pub fn enable_pod(
        &mut self,
        datapath: &mut Datapath,
        pod: &StaticPod,
    ) -> anyhow::Result<CgroupId> {
        let id = CgroupId::of(&pod.cgroup)
            .with_context(|| format!("pod {}: cgroup {}", pod.name, pod.cgroup.display()))?;
        if self.pods.contains_key(&id) {
            return Ok(id);
        }
        let netns = Netns::of_cgroup(&pod.cgroup).with_context(|| {
            format!(
                "pod {}: finding its network namespace from {}",
                pod.name,
                pod.cgroup.display()
            )
        })?;
        let ctx = Arc::new(PodContext {
            name: pod.name.clone(),
            netns,
        });
        let handler = (self.handlers)(&ctx);
        let listener = PodListener::open(ctx, self.listen_port, self.resolver.clone(), handler)
            .with_context(|| format!("pod {}: opening the pod-local listener", pod.name))?;
        datapath
            .enable_pod(&pod.cgroup)
            .with_context(|| format!("pod {}", pod.name))?;
        tracing::info!(pod = %pod.name, cgroup_id = id.0, "interception enabled");
        self.pods.insert(id, (pod.name.clone(), listener));
        Ok(id)
    }

    /// Detaches the hooks and closes the pod's listener.
    pub fn disable_pod(&mut self, datapath: &mut Datapath, id: CgroupId) -> anyhow::Result<()> {
        datapath.disable_pod(id)?;
        if let Some((name, listener)) = self.pods.remove(&id) {
            listener.close();
            tracing::info!(pod = %name, cgroup_id = id.0, "interception disabled");
        }
        Ok(())
    }

    /// Makes the kernel's service entries exactly `desired` (entries a previous agent left are removed).
    pub fn set_services(
        &mut self,
        datapath: &mut Datapath,
        desired: &[(SocketAddr, ServiceAction)],
    ) -> anyhow::Result<()> {
        let want: BTreeSet<SocketAddr> = desired.iter().map(|(a, _)| *a).collect();
        for (addr, _) in datapath.services()? {
            if !want.contains(&addr) {
                datapath.remove_service(addr)?;
            }
        }
        for (addr, action) in desired {
            datapath.set_service(*addr, *action)?;
        }
        Ok(())
    }

    pub fn close_all(&mut self) {
        for (_, (_, listener)) in std::mem::take(&mut self.pods) {
            listener.close();
        }
    }
}

/// `interceptor proxy`: the demultiplexer on its own (no BPF, no cluster).
pub fn standalone_proxy(args: crate::proxy::standalone::ProxyArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, "starting standalone proxy");
    runtime()?.block_on(crate::proxy::standalone::run(args))
}

/// `interceptor status`: read from the pins, so it works while the agent is down.
pub fn status(args: &PinArgs) -> anyhow::Result<()> {
    let layout = bpf::PinLayout::new(&args.pin_root);
    if !layout.dir().exists() {
        println!(
            "interceptor is not installed here: no pins under {}",
            layout.dir().display()
        );
        return Ok(());
    }
    println!("pins: {}", layout.dir().display());
    let pods = bpf::pinned_pods(&args.pin_root)?;
    println!("intercepted pod cgroups ({}):", pods.len());
    for id in pods {
        println!("  cgroup id {id}");
    }
    println!("kernel counters:");
    for (stat, value) in bpf::read_pinned_stats(&args.pin_root)? {
        println!("  {:<15} {value}", stat.label());
    }
    Ok(())
}

/// `interceptor uninstall`.
pub fn uninstall(args: &PinArgs) -> anyhow::Result<()> {
    let removed = bpf::uninstall(&args.pin_root)?;
    println!(
        "removed {} hook links and {} maps under {}: pods' new connections now go straight to their Services",
        removed.links,
        removed.maps,
        args.pin_root.display()
    );
    Ok(())
}
