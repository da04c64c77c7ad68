//! The intercepted pods and what keeps them intercepted: per pod a listener in its netns, the
//! hooks on its cgroup and (when balancing) a demultiplexer with its own upstream pools.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;

use crate::bpf::{CgroupId, Datapath, OrigDstTable, ServiceAction};
use crate::discovery::model::PodCgroup;
use crate::netns::Netns;
use crate::proxy::config::ProxyConfig;
use crate::proxy::destination::DestinationSettings;
use crate::proxy::limit::ConnectionLimit;
use crate::proxy::original_destination;
use crate::proxy::pod_listener::{
    Accepted, ConnEnds, Handler, OrigDstResolver, PodConnector, PodContext, PodListener,
};
use crate::proxy::EndpointSpec;
use crate::proxy::Proxy;

/// Adapts the kernel's original-destination maps to the proxy's resolver: an IPv4 connection
/// names its Service by the redirect address it arrived on; an IPv6 one by its client socket.
struct MapResolver(OrigDstTable);

impl OrigDstResolver for MapResolver {
    fn resolve(&self, conn: &ConnEnds<'_>) -> io::Result<Option<SocketAddr>> {
        let local_v4 = match conn.local.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(ip) => ip.to_ipv4_mapped(),
        };
        if let Some(ip) = local_v4 {
            return match interceptor_common::redirect_slot(ip.octets()) {
                Some(slot) => self.0.by_slot(slot).map_err(io::Error::other),
                None => Ok(None),
            };
        }
        let Some(diag) = conn.diag else {
            return Ok(None);
        };
        match diag.cookie(conn.peer, conn.local)? {
            Some(cookie) => self.0.by_cookie(cookie).map_err(io::Error::other),
            None => Ok(None),
        }
    }
}

/// The connection handler of one pod, and its demultiplexer when it has one.
struct PodHandler {
    handler: Handler,
    proxy: Option<Proxy>,
}

type HandlerFactory = Arc<dyn Fn(&Arc<PodContext>) -> PodHandler + Send + Sync>;

/// Endpoints per balanced destination (ClusterIP:port), shared with every pod's handler.
type Routes = Arc<RwLock<BTreeMap<SocketAddr, Vec<EndpointSpec>>>>;

struct EnabledPod {
    name: String,
    listener: PodListener,
    proxy: Option<Proxy>,
    netns_id: Option<(u64, u64)>,
}

/// Counts a client connection as open while alive (the shutdown drain waits for zero).
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Agent {
    listen_port: u16,
    resolver: Arc<dyn OrigDstResolver>,
    factory: HandlerFactory,
    pods: BTreeMap<CgroupId, EnabledPod>,
    routes: Routes,
    /// The Service of each balanced destination (for its metrics) and what its appProtocol
    /// says it carries.
    service_info: BTreeMap<SocketAddr, DestinationSettings>,
    /// Listening sockets the previous agent handed over, by pod cgroup id: (IPv4, IPv6).
    handed: BTreeMap<u64, (Option<OwnedFd>, Option<OwnedFd>)>,
    open: Arc<AtomicUsize>,
}

impl Agent {
    /// An agent whose every pod hands accepted connections to `handler`.
    pub fn new(datapath: &Datapath, listen_port: u16, handler: Handler) -> Self {
        let factory: HandlerFactory = Arc::new(move |_| PodHandler {
            handler: handler.clone(),
            proxy: None,
        });
        Self::with_factory(
            datapath,
            listen_port,
            factory,
            Routes::default(),
            Arc::new(AtomicUsize::new(0)),
        )
    }

    /// An agent that balances each HTTP/2 stream of a connection to a destination with
    /// endpoints (see [`Agent::set_endpoints`]) over those endpoints, through a demultiplexer
    /// per pod (its upstream connections are opened from the pod's netns and pooled per pod).
    /// Connections to other intercepted destinations are relayed to where they were going.
    pub fn with_balancing(datapath: &Datapath, listen_port: u16, config: ProxyConfig) -> Self {
        let routes = Routes::default();
        let open = Arc::new(AtomicUsize::new(0));
        // Descriptors are the process's: one limit over every pod's connections.
        let limit = ConnectionLimit::new(config.max_client_connections);
        let (routes_h, open_h) = (routes.clone(), open.clone());
        let factory: HandlerFactory = Arc::new(move |pod: &Arc<PodContext>| {
            let proxy = Proxy::with_connection_limit(
                config.clone(),
                Arc::new(PodConnector(pod.clone())),
                limit.clone(),
            );
            let (routes, open, limit) = (routes_h.clone(), open_h.clone(), limit.clone());
            let p = proxy.clone();
            let handler: Handler = Arc::new(move |conn: Accepted| {
                let proxy = p.clone();
                let balanced = match routes.read() {
                    Ok(r) => r.contains_key(&conn.orig_dst),
                    Err(poisoned) => poisoned.into_inner().contains_key(&conn.orig_dst),
                };
                let open = Open::new(&open);
                let limit = limit.clone();
                Box::pin(async move {
                    let _open = open;
                    if !balanced {
                        // Counted like demultiplexed ones (which take their slot inside).
                        let Some(_slot) = limit.try_acquire() else {
                            return;
                        };
                        return original_destination::relay(conn).await;
                    }
                    let span = tracing::debug_span!("pod", pod = %conn.pod.name, peer = %conn.peer);
                    let dest = conn.orig_dst;
                    let served = proxy.serve_connection(conn.stream, dest);
                    if let Err(e) = tracing::Instrument::instrument(served, span.clone()).await {
                        span.in_scope(|| tracing::debug!(%dest, error = %e, "client connection ended with an error"));
                    }
                })
            });
            PodHandler {
                handler,
                proxy: Some(proxy),
            }
        });
        Self::with_factory(datapath, listen_port, factory, routes, open)
    }

    fn with_factory(
        datapath: &Datapath,
        listen_port: u16,
        factory: HandlerFactory,
        routes: Routes,
        open: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            listen_port,
            resolver: Arc::new(MapResolver(datapath.orig_dst_table())),
            factory,
            pods: BTreeMap::new(),
            routes,
            service_info: BTreeMap::new(),
            handed: BTreeMap::new(),
            open,
        }
    }

    /// Opens the pod's listener in its netns, then attaches the hooks to its cgroup.
    pub fn enable_pod(
        &mut self,
        datapath: &mut Datapath,
        pod: &PodCgroup,
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
        let netns_id = netns.id().ok();
        let ctx = Arc::new(PodContext {
            name: pod.name.clone(),
            netns,
        });
        let PodHandler { handler, proxy } = (self.factory)(&ctx);
        if let Some(proxy) = &proxy {
            let routes = self.routes.read().map(|r| r.clone()).unwrap_or_default();
            for (dest, endpoints) in routes {
                let handle = proxy.endpoints(dest);
                if let Some(settings) = self.service_info.get(&dest) {
                    handle.configure(settings);
                }
                handle.update(endpoints);
            }
        }
        let mut register = |cookie, v6, socket: std::os::fd::BorrowedFd<'_>| {
            datapath
                .register_listener(cookie, v6, socket)
                .map_err(io::Error::other)
        };
        let listener = match self.handed.remove(&id.0) {
            Some((Some(v4), v6)) => PodListener::adopt(
                ctx,
                self.listen_port,
                v4,
                v6,
                self.resolver.clone(),
                handler,
                &mut register,
            )
            .with_context(|| {
                format!(
                    "pod {}: serving the listener the previous agent handed over",
                    pod.name
                )
            })?,
            _ => PodListener::open(
                ctx,
                self.listen_port,
                self.resolver.clone(),
                handler,
                &mut register,
            )
            .with_context(|| format!("pod {}: opening the pod-local listener", pod.name))?,
        };
        datapath
            .enable_pod(&pod.cgroup)
            .with_context(|| format!("pod {}", pod.name))?;
        tracing::info!(pod = %pod.name, cgroup_id = id.0, "interception enabled");
        self.pods.insert(
            id,
            EnabledPod {
                name: pod.name.clone(),
                listener,
                proxy,
                netns_id,
            },
        );
        Ok(id)
    }

    /// Detaches the hooks and closes the pod's listener; its open connections finish.
    pub fn disable_pod(&mut self, datapath: &mut Datapath, id: CgroupId) -> anyhow::Result<()> {
        datapath.disable_pod(id)?;
        if let Some(pod) = self.pods.remove(&id) {
            pod.listener.close();
            tracing::info!(pod = %pod.name, cgroup_id = id.0, "interception disabled");
        }
        Ok(())
    }

    /// Keeps the listening sockets a previous agent handed over, for `enable_pod` to serve
    /// instead of opening new ones (sockets of pods this agent does not enable are closed when
    /// `forget_handed` runs).
    pub fn adopt_handed(&mut self, handed: Vec<super::handoff::HandedListener>) {
        for h in handed {
            let entry = self.handed.entry(h.cgroup_id).or_default();
            if h.v6 {
                entry.1 = Some(h.socket);
            } else {
                entry.0 = Some(h.socket);
            }
        }
    }

    /// Closes handed-over sockets no enabled pod took (their pods are gone or not wanted).
    pub fn forget_handed(&mut self) -> usize {
        let n = self.handed.len();
        self.handed.clear();
        n
    }

    /// Every enabled pod's listening sockets, (cgroup id, IPv6?, socket), for the next agent.
    pub fn listener_sockets(&self) -> Vec<(u64, bool, BorrowedFd<'_>)> {
        self.pods
            .iter()
            .flat_map(|(id, pod)| pod.listener.sockets().map(move |(v6, fd)| (id.0, v6, fd)))
            .collect()
    }

    /// The enabled pods' cgroups.
    pub fn enabled(&self) -> BTreeSet<CgroupId> {
        self.pods.keys().copied().collect()
    }

    /// Whether the pod's listener still lives in the netns a process of `cgroup` is in now
    /// (false after the pod sandbox was recreated: the listener must be reopened).
    pub fn netns_current(&self, id: CgroupId, cgroup: &std::path::Path) -> bool {
        let Some(pod) = self.pods.get(&id) else {
            return false;
        };
        match (pod.netns_id, Netns::of_cgroup(cgroup).and_then(|n| n.id())) {
            (Some(have), Ok(now)) => have == now,
            // Cannot tell (no process right now): leave it alone.
            _ => true,
        }
    }

    /// Makes the kernel's service entries exactly `desired` (entries a previous agent left are removed).
    pub fn set_services(
        &mut self,
        datapath: &mut Datapath,
        desired: &[(SocketAddr, ServiceAction)],
    ) -> anyhow::Result<()> {
        let want: BTreeMap<SocketAddr, ServiceAction> = desired.iter().copied().collect();
        let have: BTreeMap<SocketAddr, ServiceAction> = datapath.services()?.into_iter().collect();
        for addr in have.keys().filter(|a| !want.contains_key(a)) {
            datapath.remove_service(*addr)?;
        }
        for (addr, action) in &want {
            if have.get(addr) != Some(action) {
                datapath.set_service(*addr, *action)?;
            }
        }
        Ok(())
    }

    /// Names the Service of each destination, for the per-Service metrics of the pods'
    /// demultiplexers, and what its appProtocol says it carries (call before `set_endpoints`;
    /// destinations without a name are labelled with their address and detected).
    pub fn set_service_info(&mut self, info: BTreeMap<SocketAddr, DestinationSettings>) {
        self.service_info = info;
    }

    /// Replaces the balanced destinations and their endpoints, in every pod's demultiplexer.
    /// The next stream sees the change; streams in flight finish where they are.
    pub fn set_endpoints(&mut self, routes: BTreeMap<SocketAddr, Vec<EndpointSpec>>) {
        let old = match self.routes.write() {
            Ok(mut r) => std::mem::replace(&mut *r, routes.clone()),
            Err(p) => std::mem::replace(&mut *p.into_inner(), routes.clone()),
        };
        for pod in self.pods.values() {
            let Some(proxy) = &pod.proxy else { continue };
            for (dest, endpoints) in &routes {
                let handle = proxy.endpoints(*dest);
                if let Some(settings) = self.service_info.get(dest) {
                    handle.configure(settings);
                }
                if old.get(dest) != Some(endpoints) {
                    handle.update(endpoints.iter().copied());
                }
            }
            for gone in old.keys().filter(|d| !routes.contains_key(d)) {
                proxy.remove_destination(*gone);
            }
        }
    }

    /// Closes every listener (new connects fail open to kube-proxy), asks every HTTP/2 client
    /// to go away, and waits up to `timeout` for open connections to finish. Returns how many
    /// were still open.
    pub async fn drain(&mut self, timeout: Duration) -> usize {
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.listener.close();
            if let Some(proxy) = pod.proxy {
                proxy.shutdown();
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.open.load(Ordering::Relaxed)
    }

    pub fn close_all(&mut self) {
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.listener.close();
        }
    }
}
