//! Desired state -> datapath and proxy: kernel service entries, balanced endpoint sets, and
//! which pods are intercepted. Idempotent (applying the same state twice changes nothing) and
//! safe across agent restarts (hooks a previous agent pinned are taken over, and only the
//! ones no longer wanted are detached, after the first complete state).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::agent::Agent;
use crate::bpf::{CgroupId, Datapath, ServiceAction};
use crate::discovery::cgroup::CgroupLayout;
use crate::discovery::model::{DesiredState, ObjectRef, PodCgroup, PodUid, PortAction};
use crate::proxy::destination::DestinationSettings;
use crate::proxy::detect::{Http1Mode, ProtocolHint};
use crate::proxy::EndpointSpec;
use crate::state::{AgentState, PodStatus, SharedState, PODS_NOT_INTERCEPTED, POD_NOT_INTERCEPTED};

struct Enabled {
    id: CgroupId,
    cgroup: PathBuf,
}

pub struct Reconciler {
    layout: CgroupLayout,
    desired: DesiredState,
    enabled: BTreeMap<PodUid, Enabled>,
    errors: BTreeMap<PodUid, String>,
    /// Pods last reported by the not-intercepted gauge, so a fixed or gone pod drops to 0.
    flagged: std::collections::BTreeSet<ObjectRef>,
    services: Option<Vec<(SocketAddr, ServiceAction)>>,
    routes: Option<BTreeMap<SocketAddr, Vec<EndpointSpec>>>,
    info: Option<BTreeMap<SocketAddr, DestinationSettings>>,
    pruned: bool,
    generation: u64,
    view: SharedState,
}

impl Reconciler {
    pub fn new(layout: CgroupLayout, view: SharedState) -> Self {
        Self {
            layout,
            desired: DesiredState::default(),
            enabled: BTreeMap::new(),
            errors: BTreeMap::new(),
            flagged: std::collections::BTreeSet::new(),
            services: None,
            routes: None,
            info: None,
            pruned: false,
            generation: 0,
            view,
        }
    }

    /// Applies a new desired state.
    pub fn apply(&mut self, desired: DesiredState, agent: &mut Agent, datapath: &mut Datapath) {
        let started = Instant::now();
        self.desired = desired;
        self.generation += 1;
        self.sync_services(agent, datapath);
        self.sync_pods(agent, datapath);
        if !self.pruned {
            // Only now is it known which of a previous agent's hooks are still wanted.
            self.pruned = true;
            match datapath.prune_stale_links() {
                Ok(ids) => {
                    for id in ids {
                        tracing::info!(
                            cgroup_id = id.0,
                            "detached hooks left for a pod that is no longer intercepted"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not prune hooks a previous agent left"),
            }
        }
        tracing::debug!(
            generation = self.generation,
            elapsed_us = started.elapsed().as_micros() as u64,
            "desired state applied"
        );
        self.export_not_intercepted();
        self.publish();
    }

    /// Retries pods that could not be enabled yet and re-opens listeners of pods whose
    /// sandbox (netns) was recreated. Call periodically.
    pub fn retry(&mut self, agent: &mut Agent, datapath: &mut Datapath) {
        let stale: Vec<PodUid> = self
            .enabled
            .iter()
            .filter(|(_, e)| !agent.netns_current(e.id, &e.cgroup))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &stale {
            if let Some(e) = self.enabled.remove(uid) {
                tracing::info!(uid = %uid, "pod network namespace changed (sandbox recreated): reopening its listener");
                if let Err(err) = agent.disable_pod(datapath, e.id) {
                    tracing::warn!(uid = %uid, error = %format!("{err:#}"), "detaching before re-enable failed");
                }
            }
        }
        let missing = self
            .desired
            .pods
            .keys()
            .any(|uid| !self.enabled.contains_key(uid));
        if missing || !stale.is_empty() {
            self.sync_pods(agent, datapath);
            self.export_not_intercepted();
            self.publish();
        }
    }

    fn sync_services(&mut self, agent: &mut Agent, datapath: &mut Datapath) {
        let services: Vec<(SocketAddr, ServiceAction)> = self
            .desired
            .services
            .iter()
            .map(|(addr, port)| {
                let action = match port.action {
                    PortAction::Intercept => ServiceAction::Intercept,
                    PortAction::Exclude => ServiceAction::Exclude,
                };
                (*addr, action)
            })
            .collect();
        if self.services.as_ref() != Some(&services) {
            match agent.set_services(datapath, &services) {
                Ok(()) => {
                    tracing::info!(entries = services.len(), "service entries updated");
                    self.services = Some(services);
                }
                Err(e) => {
                    // Next change retries; the kernel keeps the entries it has.
                    tracing::error!(error = %format!("{e:#}"), "updating service entries failed");
                    self.services = None;
                }
            }
        }
        let routes: BTreeMap<SocketAddr, Vec<EndpointSpec>> = self
            .desired
            .services
            .iter()
            .filter(|(_, p)| p.action == PortAction::Intercept)
            .map(|(addr, p)| (*addr, p.endpoints.iter().map(|e| e.spec()).collect()))
            .collect();
        let info: BTreeMap<SocketAddr, DestinationSettings> = self
            .desired
            .services
            .iter()
            .filter(|(_, p)| p.action == PortAction::Intercept)
            .map(|(addr, p)| {
                let settings = DestinationSettings {
                    labels: p.metric_labels(addr.port()),
                    protocol: ProtocolHint::from_app_protocol(p.app_protocol.as_deref()),
                    http1: if p.http1_opaque {
                        Http1Mode::Opaque
                    } else {
                        Http1Mode::PerRequest
                    },
                    affinity: p.affinity_timeout_s.map(|s| Duration::from_secs(s.into())),
                    slow_start: p.slow_start_ms.map(Duration::from_millis),
                };
                (*addr, settings)
            })
            .collect();
        if self.routes.as_ref() != Some(&routes) || self.info.as_ref() != Some(&info) {
            agent.set_service_info(info.clone());
            self.info = Some(info);
            agent.set_endpoints(routes.clone());
            self.routes = Some(routes);
        }
    }

    fn sync_pods(&mut self, agent: &mut Agent, datapath: &mut Datapath) {
        let gone: Vec<PodUid> = self
            .enabled
            .keys()
            .filter(|uid| !self.desired.pods.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(e) = self.enabled.remove(&uid) {
                if let Err(err) = agent.disable_pod(datapath, e.id) {
                    tracing::error!(uid = %uid, error = %format!("{err:#}"), "disabling interception failed");
                }
            }
        }
        self.errors
            .retain(|uid, _| self.desired.pods.contains_key(uid));
        let wanted: Vec<_> = self
            .desired
            .pods
            .iter()
            .filter(|(uid, _)| !self.enabled.contains_key(*uid))
            .map(|(uid, t)| (uid.clone(), t.clone()))
            .collect();
        for (uid, target) in wanted {
            let result = self
                .layout
                .pod_cgroup(&uid, target.qos)
                .map_err(anyhow::Error::from)
                .and_then(|cgroup| {
                    let id = agent.enable_pod(
                        datapath,
                        &PodCgroup {
                            name: target.pod.to_string(),
                            cgroup: cgroup.clone(),
                        },
                    )?;
                    Ok(Enabled { id, cgroup })
                });
            match result {
                Ok(e) => {
                    self.errors.remove(&uid);
                    self.enabled.insert(uid, e);
                }
                Err(err) => {
                    let msg = format!("{err:#}");
                    // One line per new reason, not one per retry.
                    if self.errors.get(&uid) != Some(&msg) {
                        tracing::warn!(pod = %target.pod, uid = %uid, error = %msg, "pod not intercepted yet; retrying every second");
                    }
                    self.errors.insert(uid, msg);
                }
            }
        }
    }

    /// Pods that should be intercepted but are not (cgroup not found yet, netns gone, attach
    /// failed): 1 each in `interceptor_pod_not_intercepted`, and their count.
    fn export_not_intercepted(&mut self) {
        let now: std::collections::BTreeSet<ObjectRef> = self
            .desired
            .pods
            .iter()
            .filter(|(uid, _)| !self.enabled.contains_key(*uid))
            .map(|(_, t)| t.pod.clone())
            .collect();
        for pod in self.flagged.difference(&now) {
            metrics::gauge!(POD_NOT_INTERCEPTED, "namespace" => pod.namespace.clone(), "pod" => pod.name.clone()).set(0.0);
        }
        for pod in &now {
            metrics::gauge!(POD_NOT_INTERCEPTED, "namespace" => pod.namespace.clone(), "pod" => pod.name.clone()).set(1.0);
        }
        metrics::gauge!(PODS_NOT_INTERCEPTED).set(now.len() as f64);
        self.flagged = now;
    }

    fn publish(&self) {
        let pods = self
            .desired
            .pods
            .iter()
            .map(|(uid, t)| {
                let e = self.enabled.get(uid);
                (
                    uid.clone(),
                    PodStatus {
                        pod: t.pod.to_string(),
                        intercepted: e.is_some(),
                        cgroup: e.map(|e| e.cgroup.clone()),
                        cgroup_id: e.map(|e| e.id.0),
                        error: self.errors.get(uid).cloned(),
                    },
                )
            })
            .collect();
        let view = AgentState {
            ready: true,
            generation: self.generation,
            applied_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            desired: self.desired.clone(),
            pods,
        };
        match self.view.write() {
            Ok(mut v) => *v = view,
            Err(p) => *p.into_inner() = view,
        }
    }
}
