//! A Kubernetes node's view for the discovery tests and the demo: pods whose cgroups are laid
//! out the way the kubelet (systemd driver) and containerd lay them out, and the Kubernetes
//! objects (Namespace, Service, EndpointSlice, Pod) of the file source, written as real
//! multi-document YAML manifests.

use std::net::IpAddr;
use std::path::Path;

use crate::{Cgroup, Node, Pod};

/// The node name used in manifests and passed to the agent.
pub const NODE_NAME: &str = "node-a";

/// A deterministic pod UID for pod number `n`.
pub fn pod_uid(n: u8) -> String {
    format!("0c0ffee0-0000-4000-8000-{n:012}")
}

impl Node {
    /// A pod whose cgroups follow the kubelet's systemd layout under this node's cgroup
    /// parent (the agent's `--cgroup-root`): the pod slice
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice` and the
    /// process in a containerd scope below it.
    pub fn add_kube_pod(&self, name: &str, n: u8) -> Pod {
        let uid = pod_uid(n).replace('-', "_");
        let slice = self.cgroup_parent.path.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
        ));
        let pod_cgroup = Cgroup::new(slice.clone());
        self.add_pod_in(
            name,
            n,
            slice.join(format!("cri-containerd-{n:064x}.scope")),
            Some(pod_cgroup),
        )
    }
}

pub fn namespace(name: &str, enabled: bool) -> String {
    let labels = if enabled {
        "\n  labels:\n    interceptor.io/enabled: \"true\""
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

fn annotations_yaml(annotations: &[(&str, &str)]) -> String {
    if annotations.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n  annotations:");
    for (k, v) in annotations {
        s.push_str(&format!("\n    {k}: \"{v}\""));
    }
    s
}

/// A ClusterIP Service with one TCP port named `grpc`.
pub fn service(ns: &str, name: &str, cluster_ip: IpAddr, port: u16, annotations: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}{}\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n  - name: grpc\n    port: {port}\n    targetPort: {port}\n    protocol: TCP\n    appProtocol: grpc\n",
        annotations_yaml(annotations)
    )
}

/// The EndpointSlice of `service` with its endpoints' IPs and readiness.
pub fn endpoint_slice(ns: &str, service: &str, port: u16, endpoints: &[(IpAddr, bool)]) -> String {
    let mut eps = String::new();
    for (ip, ready) in endpoints {
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n  nodeName: {NODE_NAME}\n"
        ));
    }
    if endpoints.is_empty() {
        eps.push_str("[]\n");
    }
    let family = if endpoints.iter().all(|(ip, _)| ip.is_ipv4()) { "IPv4" } else { "IPv6" };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abcde\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n- name: grpc\n  port: {port}\n  protocol: TCP\nendpoints:\n{eps}"
    )
}

/// A running pod on this node.
pub fn pod(ns: &str, pod: &Pod, n: u8, annotations: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {ns}\n  uid: {}{}\nspec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: app\n    image: example/app:1\nstatus:\n  phase: Running\n  qosClass: BestEffort\n  podIP: {}\n  podIPs:\n  - ip: {}\n",
        pod.name,
        pod_uid(n),
        annotations_yaml(annotations),
        pod.ip4,
        pod.ip4
    )
}

/// Writes the documents as one manifest, atomically (the agent never reads half a file).
pub fn write_manifests(path: &Path, docs: &[String]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, docs.join("---\n")).expect("write manifests");
    std::fs::rename(&tmp, path).expect("replace manifests");
}
