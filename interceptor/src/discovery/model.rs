//! The desired state of this node, whatever source produced it: which pods are intercepted,
//! which Service ports the kernel redirects, and the endpoints the proxy balances over.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::proxy::{EndpointSpec, EndpointState};

/// `namespace/name` of a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod's UID, which names its cgroup on the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodUid(pub String);

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pod to intercept, by its cgroup directory (its netns is found from a process in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCgroup {
    /// `namespace/name`, for logs and status.
    pub name: String,
    pub cgroup: std::path::PathBuf,
}

/// Kubernetes QoS class: the kubelet puts the pod's cgroup under a class-specific parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A pod on this node that should be intercepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodTarget {
    pub pod: ObjectRef,
    pub uid: PodUid,
    pub qos: Option<QosClass>,
    pub ips: Vec<IpAddr>,
}

/// What the kernel does with connects to one ClusterIP:port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortAction {
    Intercept,
    /// Opted out (annotation or excluded port): left to kube-proxy, counted as excluded.
    Exclude,
}

/// Why a Service port is not intercepted (for `explain` and logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExcludeReason {
    ServiceAnnotation,
    SkipPortsAnnotation,
    ExcludedPort,
}

/// One TCP port of a Service, on one of its ClusterIPs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub service: ObjectRef,
    pub port_name: Option<String>,
    /// `appProtocol`, a hint only: detection decides what a connection carries.
    pub app_protocol: Option<String>,
    pub action: PortAction,
    pub exclude_reason: Option<ExcludeReason>,
    pub endpoints: Vec<Endpoint>,
    /// Endpoints the Service lists that this node does not use, and why
    /// (internalTrafficPolicy Local, topology).
    pub skipped_endpoints: Vec<SkippedEndpoint>,
    /// sessionAffinity ClientIP: streams from one pod stick to one endpoint for this long
    /// after the last one.
    pub affinity_timeout_s: Option<u32>,
    /// The Service's interceptor.io/slow-start annotation: a joining endpoint's share ramps
    /// up over this window.
    pub slow_start_ms: Option<u64>,
    /// The Service's interceptor.io/http1 annotation says `opaque`: HTTP/1.x connections are
    /// relayed to one endpoint each instead of balanced per request.
    #[serde(default)]
    pub http1_opaque: bool,
    /// Service fields in force for this port and what they do, for `status` and `explain`
    /// (e.g. "internalTrafficPolicy Local: 1 of 3 endpoints are on this node").
    pub semantics: Vec<String>,
}

impl ServicePort {
    /// The labels of this port's metrics: namespace, Service name, and the port's name (its
    /// number when it has none).
    pub fn metric_labels(&self, port: u16) -> crate::proxy::metrics::ServiceLabels {
        let port = match &self.port_name {
            Some(name) if !name.is_empty() => name.clone(),
            _ => port.to_string(),
        };
        crate::proxy::metrics::ServiceLabels::new(
            &self.service.namespace,
            &self.service.name,
            &port,
        )
    }
}

/// An endpoint as EndpointSlices give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node it runs on, when the EndpointSlice says.
    pub node_name: Option<String>,
    /// The zone it runs in, when the EndpointSlice says.
    pub zone: Option<String>,
    /// `hints.forZones`: the zones whose nodes should use this endpoint.
    pub hint_zones: Vec<String>,
    /// `hints.forNodes`: the nodes that should use this endpoint.
    pub hint_nodes: Vec<String>,
}

/// An endpoint of a Service that this node leaves out, for `status` and `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEndpoint {
    pub addr: SocketAddr,
    pub reason: String,
}

impl Endpoint {
    /// Ready takes new streams; serving-but-terminating only when nothing is ready.
    pub fn spec(&self) -> EndpointSpec {
        let state = if self.ready {
            EndpointState::Ready
        } else if self.serving && self.terminating {
            EndpointState::Terminating
        } else {
            EndpointState::NotReady
        };
        EndpointSpec {
            addr: self.addr,
            state,
        }
    }
}

/// Everything this node should do, keyed for cheap diffs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Intercepted pods on this node, by UID.
    pub pods: BTreeMap<PodUid, PodTarget>,
    /// Every TCP ClusterIP:port of every Service (intercepted or excluded).
    pub services: BTreeMap<SocketAddr, ServicePort>,
    /// Pods on this node that are not intercepted, and why (for `explain`), by
    /// `namespace/name` (a string, so the state serialises as a JSON object).
    pub skipped_pods: BTreeMap<String, String>,
}
