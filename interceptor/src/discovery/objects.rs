//! The Kubernetes objects a source has seen, and the one function that turns them into this
//! node's desired state. Both sources (kube watch, manifest files) end here, so a behaviour
//! tested on one holds for the other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::model::{
    DesiredState, Endpoint, ExcludeReason, ObjectRef, PodTarget, PodUid, PortAction, QosClass,
    ServicePort, SkippedEndpoint,
};
use super::topology::{self, TrafficDistribution};
use super::{
    object_ref, warn_once, ENABLED_LABEL, HTTP1_ANNOTATION, INTERCEPT_ANNOTATION,
    SKIP_PORTS_ANNOTATION, SLOW_START_ANNOTATION,
};

/// Label linking an EndpointSlice to its Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The objects a source currently knows, by name.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub namespaces: BTreeMap<String, Namespace>,
    pub services: BTreeMap<ObjectRef, Service>,
    pub slices: BTreeMap<ObjectRef, EndpointSlice>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    /// This node's Node object (for its zone label), by name.
    pub nodes: BTreeMap<String, Node>,
}

/// Node-level settings that shape the desired state.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Only pods scheduled here are intercepted (`None`: every pod the source lists).
    pub node_name: Option<String>,
    /// Service ports never intercepted (server-first protocols).
    pub exclude_ports: Vec<u16>,
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn opted_out(meta: &ObjectMeta) -> bool {
    annotation(meta, INTERCEPT_ANNOTATION).is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

impl Objects {
    /// Whether the namespace carries the enablement label.
    pub fn namespace_enabled(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .and_then(|ns| ns.metadata.labels.as_ref())
            .and_then(|l| l.get(ENABLED_LABEL))
            .is_some_and(|v| v == "true")
    }

    /// This node's desired state.
    pub fn desired_state(&self, policy: &Policy) -> DesiredState {
        let mut state = DesiredState::default();
        for (name, pod) in &self.pods {
            match self.pod_target(pod, policy) {
                Ok(Some(target)) => {
                    state.pods.insert(target.uid.clone(), target);
                }
                Ok(None) => {}
                Err(why) => {
                    state.skipped_pods.insert(name.to_string(), why);
                }
            }
        }
        for (name, svc) in &self.services {
            self.service_ports(name, svc, policy, &mut state.services);
        }
        state
    }

    /// `Ok(None)`: not on this node. `Err(why)`: on this node but not intercepted.
    fn pod_target(&self, pod: &Pod, policy: &Policy) -> Result<Option<PodTarget>, String> {
        let spec = pod.spec.as_ref();
        if let Some(node) = &policy.node_name {
            if spec.and_then(|s| s.node_name.as_deref()) != Some(node.as_str()) {
                return Ok(None);
            }
        }
        let name = object_ref(&pod.metadata);
        if !self.namespace_enabled(&name.namespace) {
            return Err(format!(
                "namespace {} is not labelled {ENABLED_LABEL}=true",
                name.namespace
            ));
        }
        if opted_out(&pod.metadata) {
            return Err(format!("pod annotation {INTERCEPT_ANNOTATION}=false"));
        }
        if spec.and_then(|s| s.host_network) == Some(true) {
            return Err("hostNetwork pod: it shares the node's network namespace".to_string());
        }
        let status = pod.status.as_ref();
        if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
            return Err(format!("pod phase {phase}"));
        }
        let Some(uid) = pod.metadata.uid.clone().filter(|u| !u.is_empty()) else {
            return Err("pod has no metadata.uid".to_string());
        };
        let qos = match status.and_then(|s| s.qos_class.as_deref()) {
            Some("Guaranteed") => Some(QosClass::Guaranteed),
            Some("Burstable") => Some(QosClass::Burstable),
            Some("BestEffort") => Some(QosClass::BestEffort),
            _ => None,
        };
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .unwrap_or_default();
        Ok(Some(PodTarget {
            pod: name,
            uid: PodUid(uid),
            qos,
            ips,
        }))
    }

    fn service_ports(
        &self,
        name: &ObjectRef,
        svc: &Service,
        policy: &Policy,
        out: &mut BTreeMap<SocketAddr, ServicePort>,
    ) {
        let Some(spec) = svc.spec.as_ref() else {
            return;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return;
        }
        let mut ips: BTreeSet<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        // Headless Services have no ClusterIP: clients dial pods directly, nothing to redirect.
        ips.retain(|ip| !ip.is_unspecified());
        let opted_out_svc = opted_out(&svc.metadata);
        let affinity_timeout_s = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                const DEFAULT_S: i32 = 10_800;
                let t = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(DEFAULT_S);
                if (1..=86_400).contains(&t) {
                    Some(t as u32)
                } else {
                    warn_once(format!("Service {name}: sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range (1 to 86400); using {DEFAULT_S}"));
                    Some(DEFAULT_S as u32)
                }
            }
            Some(other) => {
                warn_once(format!("Service {name}: unknown sessionAffinity {other:?} (None or ClientIP); treating it as None"));
                None
            }
        };
        let slow_start_ms = annotation(&svc.metadata, SLOW_START_ANNOTATION).and_then(|v| {
            match crate::duration::parse(v) {
                Ok(d) if !d.is_zero() && d <= std::time::Duration::from_secs(3600) => {
                    Some(d.as_millis() as u64)
                }
                Ok(_) => {
                    warn_once(format!("Service {name}: annotation {SLOW_START_ANNOTATION}={v:?} must be between 1ms and 1h; no slow start"));
                    None
                }
                Err(e) => {
                    warn_once(format!("Service {name}: annotation {SLOW_START_ANNOTATION}={v:?}: {e}; no slow start"));
                    None
                }
            }
        });
        let http1_opaque = annotation(&svc.metadata, HTTP1_ANNOTATION).is_some_and(|v| {
            match crate::proxy::detect::Http1Mode::parse(v) {
                Ok(mode) => mode == crate::proxy::detect::Http1Mode::Opaque,
                Err(accepted) => {
                    warn_once(format!("Service {name}: annotation {HTTP1_ANNOTATION}={v:?} must be {accepted}; balancing HTTP/1.1 per request"));
                    false
                }
            }
        });
        // internalTrafficPolicy: Local keeps traffic on this node, as kube-proxy does (no
        // node-local endpoint: none at all).
        let local_node = match spec.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => None,
            Some("Local") => match policy.node_name.as_deref() {
                Some(node) => Some(node),
                None => {
                    warn_once(format!("Service {name}: internalTrafficPolicy Local needs the agent's --node-name to tell this node's endpoints apart; using every endpoint"));
                    None
                }
            },
            Some(other) => {
                warn_once(format!("Service {name}: unknown internalTrafficPolicy {other:?} (Cluster or Local); treating it as Cluster"));
                None
            }
        };
        // Parsed here for its warning and for `status`; the hints carry its effect.
        let traffic_distribution = spec.traffic_distribution.as_deref().and_then(|v| {
            TrafficDistribution::parse(Some(v), &name.to_string()).map(|_| v.to_string())
        });
        let zone = self.node_zone(policy.node_name.as_deref());
        let skip: Vec<String> = annotation(&svc.metadata, SKIP_PORTS_ANNOTATION)
            .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
            .unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let skipped = skip.iter().any(|s| {
                s == &number.to_string() || port.name.as_deref().is_some_and(|n| n == s.as_str())
            });
            let exclude_reason = if opted_out_svc {
                Some(ExcludeReason::ServiceAnnotation)
            } else if skipped {
                Some(ExcludeReason::SkipPortsAnnotation)
            } else if policy.exclude_ports.contains(&number) {
                Some(ExcludeReason::ExcludedPort)
            } else {
                None
            };
            for ip in &ips {
                let all = self.endpoints(name, port.name.as_deref(), ip.is_ipv4());
                let mut semantics = Vec::new();
                let (endpoints, skipped_endpoints) = match local_node {
                    Some(node) => {
                        let (local, skipped) = split(all, |e| match e.node_name.as_deref() {
                            Some(n) if n == node => Ok(()),
                            Some(n) => Err(format!(
                                "on node {n}, not this node (internalTrafficPolicy Local)"
                            )),
                            None => Err(
                                "no nodeName in its EndpointSlice (internalTrafficPolicy Local)"
                                    .to_string(),
                            ),
                        });
                        semantics.push(format!(
                            "internalTrafficPolicy Local: {} of {} endpoints are on this node",
                            local.len(),
                            local.len() + skipped.len()
                        ));
                        if traffic_distribution.is_some() {
                            semantics.push(
                                "trafficDistribution ignored under internalTrafficPolicy Local"
                                    .to_string(),
                            );
                        }
                        (local, skipped)
                    }
                    None => {
                        let total = all.len();
                        match topology::mode(&all, policy.node_name.as_deref(), zone) {
                            Ok(Some(mode)) => {
                                let (kept, skipped) = split(all, |e| mode.admits(e));
                                semantics.push(format!(
                                    "topology {}: {} of {total} endpoints{}",
                                    mode.describe(),
                                    kept.len(),
                                    traffic_distribution
                                        .as_deref()
                                        .map(|t| format!(" (trafficDistribution {t})"))
                                        .unwrap_or_default()
                                ));
                                (kept, skipped)
                            }
                            Ok(None) => {
                                if let Some(t) = &traffic_distribution {
                                    semantics.push(format!("trafficDistribution {t}: no hints on the EndpointSlices (yet); every endpoint used"));
                                }
                                (all, Vec::new())
                            }
                            Err(why) => {
                                semantics.push(format!("topology {why}"));
                                (all, Vec::new())
                            }
                        }
                    }
                };
                if let Some(ms) = slow_start_ms {
                    semantics.push(format!(
                        "slow start {ms} ms: a joining endpoint's share ramps up from 10%"
                    ));
                }
                if http1_opaque {
                    semantics.push(format!(
                        "{HTTP1_ANNOTATION}: opaque: HTTP/1.x relayed as TCP, one endpoint per connection"
                    ));
                }
                if let Some(t) = affinity_timeout_s {
                    semantics.push(format!(
                        "sessionAffinity ClientIP ({t} s): each pod's streams stick to one endpoint"
                    ));
                }
                if let Some(app) = port.app_protocol.as_deref() {
                    let hint = crate::proxy::detect::ProtocolHint::from_app_protocol(Some(app));
                    semantics.push(match hint {
                        crate::proxy::detect::ProtocolHint::Http2 => {
                            format!("appProtocol {app}: HTTP/2 without detection")
                        }
                        crate::proxy::detect::ProtocolHint::Opaque => {
                            format!("appProtocol {app}: relayed as TCP without detection")
                        }
                        crate::proxy::detect::ProtocolHint::Detect => {
                            format!("appProtocol {app}: not known, detected")
                        }
                    });
                }
                out.insert(
                    SocketAddr::new(*ip, number),
                    ServicePort {
                        service: name.clone(),
                        port_name: port.name.clone().filter(|n| !n.is_empty()),
                        app_protocol: port.app_protocol.clone(),
                        action: if exclude_reason.is_some() {
                            PortAction::Exclude
                        } else {
                            PortAction::Intercept
                        },
                        exclude_reason: exclude_reason.clone(),
                        endpoints,
                        skipped_endpoints,
                        affinity_timeout_s,
                        slow_start_ms,
                        http1_opaque,
                        semantics,
                    },
                );
            }
        }
    }

    /// Endpoints of one Service port in one address family, from all its EndpointSlices.
    fn endpoints(&self, service: &ObjectRef, port_name: Option<&str>, v4: bool) -> Vec<Endpoint> {
        let want_name = port_name.unwrap_or("");
        let mut out: Vec<Endpoint> = Vec::new();
        for (slice_name, slice) in &self.slices {
            if slice_name.namespace != service.namespace
                || slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    != Some(&service.name)
            {
                continue;
            }
            let family_ok = match slice.address_type.as_str() {
                "IPv4" => v4,
                "IPv6" => !v4,
                _ => false,
            };
            if !family_ok {
                continue;
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == want_name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let cond = ep.conditions.as_ref();
                // Per the EndpointSlice API: unknown readiness counts as ready, `serving`
                // defaults to `ready`, `terminating` to false.
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
                let hints = ep.hints.as_ref();
                for addr in &ep.addresses {
                    let Ok(ip) = addr.parse::<IpAddr>() else {
                        continue;
                    };
                    let addr = SocketAddr::new(ip, port);
                    if out.iter().any(|e| e.addr == addr) {
                        continue;
                    }
                    out.push(Endpoint {
                        addr,
                        ready,
                        serving,
                        terminating,
                        node_name: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                        hint_zones: hint_names(
                            hints
                                .and_then(|h| h.for_zones.as_ref())
                                .into_iter()
                                .flatten()
                                .map(|z| z.name.as_str()),
                            slice,
                            "forZones",
                        ),
                        hint_nodes: hint_names(
                            hints
                                .and_then(|h| h.for_nodes.as_ref())
                                .into_iter()
                                .flatten()
                                .map(|n| n.name.as_str()),
                            slice,
                            "forNodes",
                        ),
                    });
                }
            }
        }
        out.sort_by_key(|e| e.addr);
        out
    }
}

impl Objects {
    /// This node's zone: the zone label of its Node object.
    pub fn node_zone(&self, node: Option<&str>) -> Option<&str> {
        self.nodes
            .get(node?)?
            .metadata
            .labels
            .as_ref()?
            .get(topology::ZONE_LABEL)
            .map(String::as_str)
            .filter(|z| !z.is_empty())
    }

    /// Writes the hints the EndpointSlice controller would for every Service with a
    /// trafficDistribution (the file source has no controller).
    pub fn derive_hints(&mut self) {
        let wanted: BTreeMap<ObjectRef, TrafficDistribution> = self
            .services
            .iter()
            .filter_map(|(name, svc)| {
                let value = svc.spec.as_ref()?.traffic_distribution.as_deref();
                Some((
                    name.clone(),
                    TrafficDistribution::parse(value, &name.to_string())?,
                ))
            })
            .collect();
        for slice in self.slices.values_mut() {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let name = ObjectRef::new(
                slice.metadata.namespace.clone().unwrap_or_default(),
                service.clone(),
            );
            let Some(td) = wanted.get(&name).copied() else {
                continue;
            };
            for ep in &mut slice.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                ep.hints = topology::controller_hints(
                    td,
                    ready,
                    ep.zone.as_deref(),
                    ep.node_name.as_deref(),
                );
            }
        }
    }
}

/// The hint names of one endpoint's `hints`: entries with an empty name are malformed (the
/// API server would have refused them); they are dropped with one line naming the slice.
fn hint_names<'a>(
    names: impl Iterator<Item = &'a str>,
    slice: &EndpointSlice,
    what: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        if name.trim().is_empty() {
            warn_once(format!(
                "EndpointSlice {}: an endpoint has a {what} hint with no name; ignoring that hint",
                object_ref(&slice.metadata)
            ));
        } else {
            out.push(name.to_string());
        }
    }
    out
}

/// Splits `all` into the endpoints `keep` admits and the others with its reason.
fn split(
    all: Vec<Endpoint>,
    keep: impl Fn(&Endpoint) -> Result<(), String>,
) -> (Vec<Endpoint>, Vec<SkippedEndpoint>) {
    let mut kept = Vec::new();
    let mut skipped = Vec::new();
    for e in all {
        match keep(&e) {
            Ok(()) => kept.push(e),
            Err(reason) => skipped.push(SkippedEndpoint {
                addr: e.addr,
                reason,
            }),
        }
    }
    (kept, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid object")
    }

    fn sample(labelled: bool) -> Objects {
        let mut o = Objects::default();
        let mut ns = serde_json::json!({"metadata": {"name": "shop"}});
        if labelled {
            ns["metadata"]["labels"] = serde_json::json!({ENABLED_LABEL: "true"});
        }
        o.namespaces.insert("shop".into(), parse(ns));
        o.services.insert(
            ObjectRef::new("shop", "greet"),
            parse(serde_json::json!({
                "metadata": {"name": "greet", "namespace": "shop",
                             "annotations": {SKIP_PORTS_ANNOTATION: "admin"}},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                         "ports": [{"name": "grpc", "port": 50051},
                                   {"name": "admin", "port": 9000},
                                   {"name": "dns", "port": 53, "protocol": "UDP"}]}
            })),
        );
        o.slices.insert(
            ObjectRef::new("shop", "greet-abc"),
            parse(serde_json::json!({
                "metadata": {"name": "greet-abc", "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "greet"}},
                "addressType": "IPv4",
                "ports": [{"name": "grpc", "port": 8080}, {"name": "admin", "port": 9001}],
                "endpoints": [
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.0.0.4"]}
                ]
            })),
        );
        o.pods.insert(
            ObjectRef::new("shop", "client"),
            parse(serde_json::json!({
                "metadata": {"name": "client", "namespace": "shop", "uid": "u-1"},
                "spec": {"nodeName": "node-a", "containers": []},
                "status": {"phase": "Running", "qosClass": "BestEffort", "podIPs": [{"ip": "10.0.0.9"}]}
            })),
        );
        o.pods.insert(
            ObjectRef::new("shop", "elsewhere"),
            parse(serde_json::json!({
                "metadata": {"name": "elsewhere", "namespace": "shop", "uid": "u-2"},
                "spec": {"nodeName": "node-b", "containers": []}
            })),
        );
        o
    }

    fn policy() -> Policy {
        Policy {
            node_name: Some("node-a".into()),
            exclude_ports: vec![3306],
        }
    }

    #[test]
    fn labelled_namespace_enables_only_this_nodes_pods() {
        let state = sample(true).desired_state(&policy());
        let uids: Vec<&str> = state.pods.keys().map(|u| u.0.as_str()).collect();
        assert_eq!(uids, ["u-1"]);
        let pod = &state.pods[&PodUid("u-1".into())];
        assert_eq!(pod.qos, Some(QosClass::BestEffort));
        assert_eq!(pod.ips, ["10.0.0.9".parse::<IpAddr>().expect("ip")]);

        let state = sample(false).desired_state(&policy());
        assert!(state.pods.is_empty());
        assert!(state.skipped_pods["shop/client"].contains("not labelled"));
    }

    #[test]
    fn pod_opt_out_annotation() {
        let mut o = sample(true);
        let pod = o
            .pods
            .get_mut(&ObjectRef::new("shop", "client"))
            .expect("pod");
        pod.metadata.annotations =
            Some([(INTERCEPT_ANNOTATION.to_string(), "false".to_string())].into());
        let state = o.desired_state(&policy());
        assert!(state.pods.is_empty());
        assert!(state.skipped_pods["shop/client"].contains("annotation"));
    }

    #[test]
    fn service_ports_per_cluster_ip_with_endpoints_and_conditions() {
        let state = sample(true).desired_state(&policy());
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let keys: Vec<SocketAddr> = state.services.keys().copied().collect();
        // UDP is never intercepted; both families of a dual-stack Service are.
        assert_eq!(
            keys,
            [
                addr("10.96.0.10:9000"),
                addr("10.96.0.10:50051"),
                addr("[fd00::10]:9000"),
                addr("[fd00::10]:50051")
            ]
        );
        let grpc = &state.services[&addr("10.96.0.10:50051")];
        assert_eq!(grpc.action, PortAction::Intercept);
        let eps: Vec<(SocketAddr, bool, bool)> = grpc
            .endpoints
            .iter()
            .map(|e| (e.addr, e.ready, e.terminating))
            .collect();
        assert_eq!(
            eps,
            [
                (addr("10.0.0.2:8080"), true, false),
                (addr("10.0.0.3:8080"), false, true),
                (addr("10.0.0.4:8080"), true, false)
            ]
        );
        // No IPv6 slice: the v6 ClusterIP has no endpoints.
        assert!(state.services[&addr("[fd00::10]:50051")]
            .endpoints
            .is_empty());
        let admin = &state.services[&addr("10.96.0.10:9000")];
        assert_eq!(admin.action, PortAction::Exclude);
        assert_eq!(
            admin.exclude_reason,
            Some(ExcludeReason::SkipPortsAnnotation)
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
        let mut o = sample(true);
        let slice = o
            .slices
            .get_mut(&ObjectRef::new("shop", "greet-abc"))
            .expect("slice");
        slice.endpoints[0].node_name = Some("node-a".into());
        slice.endpoints[2].node_name = Some("node-b".into());
        let grpc = |o: &Objects| {
            let state = o.desired_state(&policy());
            state.services[&"10.96.0.10:50051".parse::<SocketAddr>().expect("addr")].clone()
        };
        assert_eq!(
            grpc(&o).endpoints.len(),
            3,
            "Cluster (the default): every endpoint"
        );
        let set = |o: &mut Objects, v: &str| {
            o.services
                .get_mut(&ObjectRef::new("shop", "greet"))
                .and_then(|s| s.spec.as_mut())
                .expect("spec")
                .internal_traffic_policy = Some(v.into());
        };
        set(&mut o, "Local");
        let port = grpc(&o);
        let eps: Vec<String> = port.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(eps, ["10.0.0.2:8080"], "only node-a's endpoint");
        assert!(port
            .semantics
            .iter()
            .any(|s| s.contains("internalTrafficPolicy Local: 1 of 3")));
        // An unknown value is Cluster, with a warning (not an outage).
        set(&mut o, "Locall");
        assert_eq!(grpc(&o).endpoints.len(), 3);
    }

    #[test]
    fn topology_hints_keep_this_zones_endpoints_and_say_why_others_are_skipped() {
        let mut o = sample(true);
        o.nodes.insert(
            "node-a".into(),
            parse(serde_json::json!({"metadata": {"name": "node-a",
                "labels": {topology::ZONE_LABEL: "zone-a"}}})),
        );
        let slice = o
            .slices
            .get_mut(&ObjectRef::new("shop", "greet-abc"))
            .expect("slice");
        for (ep, (node, zone)) in slice.endpoints.iter_mut().zip([
            ("node-a", "zone-a"),
            ("node-b", "zone-b"),
            ("node-c", "zone-a"),
        ]) {
            ep.node_name = Some(node.into());
            ep.zone = Some(zone.into());
        }
        let grpc = |o: &Objects| {
            o.desired_state(&policy()).services
                [&"10.96.0.10:50051".parse::<SocketAddr>().expect("addr")]
                .clone()
        };
        let addrs = |p: &ServicePort| -> Vec<String> {
            p.endpoints.iter().map(|e| e.addr.to_string()).collect()
        };
        // Zones on the endpoints but no hints (no trafficDistribution): every endpoint.
        assert_eq!(grpc(&o).endpoints.len(), 3);
        let set_td = |o: &mut Objects, v: &str| {
            o.services
                .get_mut(&ObjectRef::new("shop", "greet"))
                .and_then(|s| s.spec.as_mut())
                .expect("spec")
                .traffic_distribution = Some(v.into());
            o.derive_hints();
        };
        set_td(&mut o, "PreferClose");
        let p = grpc(&o);
        // 10.0.0.3 is not ready: the controller gives it no hint, and it does not count.
        assert_eq!(addrs(&p), ["10.0.0.2:8080", "10.0.0.4:8080"]);
        assert_eq!(p.skipped_endpoints.len(), 1);
        assert!(
            p.skipped_endpoints[0].reason.contains("no zone hint"),
            "{p:?}"
        );
        assert!(
            p.semantics.iter().any(|s| s.contains(
                "topology same zone zone-a: 2 of 3 endpoints (trafficDistribution PreferClose)"
            )),
            "{:?}",
            p.semantics
        );
        set_td(&mut o, "PreferSameNode");
        let p = grpc(&o);
        assert_eq!(addrs(&p), ["10.0.0.2:8080"]);
        assert!(p
            .skipped_endpoints
            .iter()
            .any(|s| s.reason.contains("hinted for node node-c")));
        // internalTrafficPolicy Local wins over topology.
        o.services
            .get_mut(&ObjectRef::new("shop", "greet"))
            .and_then(|s| s.spec.as_mut())
            .expect("spec")
            .internal_traffic_policy = Some("Local".into());
        let p = grpc(&o);
        assert_eq!(addrs(&p), ["10.0.0.2:8080"]);
        assert!(p
            .semantics
            .iter()
            .any(|s| s.contains("trafficDistribution ignored")));
        // Malformed hints (empty names) are dropped with a warning: no hints, every endpoint.
        o.services
            .get_mut(&ObjectRef::new("shop", "greet"))
            .and_then(|s| s.spec.as_mut())
            .expect("spec")
            .internal_traffic_policy = None;
        let slice = o
            .slices
            .get_mut(&ObjectRef::new("shop", "greet-abc"))
            .expect("slice");
        for ep in &mut slice.endpoints {
            ep.hints = Some(parse(serde_json::json!({"forZones": [{"name": ""}]})));
        }
        assert_eq!(grpc(&o).endpoints.len(), 3);
        // This node has no zone label: hints ignored, and status says so.
        o.services
            .get_mut(&ObjectRef::new("shop", "greet"))
            .and_then(|s| s.spec.as_mut())
            .expect("spec")
            .traffic_distribution = Some("PreferClose".into());
        o.derive_hints();
        o.nodes.clear();
        let p = grpc(&o);
        assert_eq!(p.endpoints.len(), 3);
        assert!(
            p.semantics
                .iter()
                .any(|s| s.contains("no topology.kubernetes.io/zone label")),
            "{:?}",
            p.semantics
        );
    }

    #[test]
    fn slow_start_annotation_and_session_affinity_parse_and_bad_values_fall_back() {
        let port = |o: &Objects| {
            o.desired_state(&policy()).services
                [&"10.96.0.10:50051".parse::<SocketAddr>().expect("addr")]
                .clone()
        };
        let mut o = sample(true);
        let svc = |o: &mut Objects| {
            o.services
                .get_mut(&ObjectRef::new("shop", "greet"))
                .expect("svc")
                .clone()
        };
        let mut s = svc(&mut o);
        s.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SLOW_START_ANNOTATION.into(), "30s".into());
        let spec = s.spec.as_mut().expect("spec");
        spec.session_affinity = Some("ClientIP".into());
        o.services
            .insert(ObjectRef::new("shop", "greet"), s.clone());
        let p = port(&o);
        assert_eq!(p.slow_start_ms, Some(30_000));
        assert_eq!(
            p.affinity_timeout_s,
            Some(10_800),
            "the API's default timeout"
        );
        // Out of range or malformed: the Service keeps working without them.
        s.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SLOW_START_ANNOTATION.into(), "soon".into());
        let spec = s.spec.as_mut().expect("spec");
        spec.session_affinity_config = Some(
            serde_json::from_value(serde_json::json!({"clientIP": {"timeoutSeconds": 999_999}}))
                .expect("config"),
        );
        o.services.insert(ObjectRef::new("shop", "greet"), s);
        let p = port(&o);
        assert_eq!(p.slow_start_ms, None);
        assert_eq!(p.affinity_timeout_s, Some(10_800));
        assert_eq!(p.endpoints.len(), 3);
    }

    #[test]
    fn service_opt_out_and_excluded_ports() {
        let mut o = sample(true);
        let svc = o
            .services
            .get_mut(&ObjectRef::new("shop", "greet"))
            .expect("svc");
        svc.metadata.annotations =
            Some([(INTERCEPT_ANNOTATION.to_string(), "false".to_string())].into());
        let state = o.desired_state(&Policy {
            node_name: None,
            exclude_ports: vec![50051],
        });
        assert!(state
            .services
            .values()
            .all(|p| p.action == PortAction::Exclude
                && p.exclude_reason == Some(ExcludeReason::ServiceAnnotation)));
        // Without a node name every listed pod counts.
        assert_eq!(state.pods.len(), 2);
    }
}
