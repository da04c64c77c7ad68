//! A Kubernetes node's view for the discovery tests and the demo: pods whose cgroups are laid
//! out the way the kubelet (systemd driver) and containerd lay them out, and the Kubernetes
//! objects (Namespace, Service, EndpointSlice, Pod) of the file source, written as real
//! multi-document YAML manifests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::greet::{self, TallyLine};
use crate::interop::Stack;
use crate::{bpftool_json, note, AgentProcess, Cgroup, ChildGuard, Node, PinRoot, Pod};

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

impl Pod {
    /// A container restart as containerd does it: the old container's process dies, a new one
    /// starts in a new scope under the same pod cgroup (the netns stays: the sandbox holds it).
    pub fn restart_container(&mut self, generation: u8) {
        let slice = self
            .pod_cgroup
            .as_ref()
            .expect("a kubelet-style pod (add_kube_pod)")
            .path
            .clone();
        let scope = Cgroup::new(slice.join(format!("cri-containerd-restart{generation}.scope")));
        let old = std::mem::replace(&mut self.cgroup, scope);
        self.pause = None;
        drop(old);
        self.pause = Some(self.spawn(&["pause"]));
    }
}

/// curl arguments for one gRPC-shaped POST over HTTP/2 with prior knowledge, printing
/// `<status> <http version>`.
pub fn curl_h2_args(url: &str) -> Vec<String> {
    [
        "-sS",
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/grpc",
        "--data-binary",
        "",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until `pod` takes at least `fraction` of a fair share (of `n_pods`) over a 250 ms
/// window; returns when that window ended. Bounded at 5 s after `since`.
pub fn fair_share_reached(
    t: &mut Tallies,
    pod: &str,
    n_pods: usize,
    fraction: f64,
    since: Instant,
) -> Instant {
    loop {
        let w = t.window(Duration::from_millis(250));
        let total: u64 = w.values().sum();
        let mine = w.get(pod).copied().unwrap_or(0);
        if total > 0 && mine as f64 >= fraction * total as f64 / n_pods as f64 {
            return Instant::now();
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{pod} never reached {fraction} of a fair share: {w:?}"
        );
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
pub fn service(
    ns: &str,
    name: &str,
    cluster_ip: IpAddr,
    port: u16,
    annotations: &[(&str, &str)],
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}{}\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n  - name: grpc\n    port: {port}\n    targetPort: {port}\n    protocol: TCP\n    appProtocol: grpc\n",
        annotations_yaml(annotations)
    )
}

/// The EndpointSlice of `service` with its endpoints' IPs and readiness, all on this node.
pub fn endpoint_slice(ns: &str, service: &str, port: u16, endpoints: &[(IpAddr, bool)]) -> String {
    let placed: Vec<(IpAddr, bool, Placement)> = endpoints
        .iter()
        .map(|(ip, ready)| (*ip, *ready, Placement::default()))
        .collect();
    endpoint_slice_placed(ns, service, port, &placed)
}

/// Where an endpoint runs, as its EndpointSlice says.
#[derive(Clone, Default, Debug)]
pub struct Placement {
    /// `nodeName` (default: this node).
    pub node: Option<&'static str>,
    /// `zone` (default: none).
    pub zone: Option<&'static str>,
    /// `hints`, as YAML flow (e.g. `{forZones: [{name: zone-b}]}`), as the EndpointSlice
    /// controller writes them.
    pub hints: Option<&'static str>,
}

impl Placement {
    pub fn at(node: &'static str, zone: &'static str) -> Self {
        Self {
            node: Some(node),
            zone: Some(zone),
            hints: None,
        }
    }
}

/// The EndpointSlice of `service`: each endpoint's IP, readiness and placement.
pub fn endpoint_slice_placed(
    ns: &str,
    service: &str,
    port: u16,
    endpoints: &[(IpAddr, bool, Placement)],
) -> String {
    let mut eps = String::new();
    for (ip, ready, at) in endpoints {
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n  nodeName: {}\n",
            at.node.unwrap_or(NODE_NAME)
        ));
        if let Some(zone) = at.zone {
            eps.push_str(&format!("  zone: {zone}\n"));
        }
        if let Some(hints) = at.hints {
            eps.push_str(&format!("  hints: {hints}\n"));
        }
    }
    if endpoints.is_empty() {
        eps.push_str("[]\n");
    }
    let family = if endpoints.iter().all(|(ip, _, _)| ip.is_ipv4()) {
        "IPv4"
    } else {
        "IPv6"
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abcde\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n- name: grpc\n  port: {port}\n  protocol: TCP\nendpoints:\n{eps}"
    )
}

/// This node's Node object, labelled with its zone.
pub fn node_object(zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n  labels:\n    kubernetes.io/hostname: {NODE_NAME}\n    topology.kubernetes.io/zone: {zone}\n"
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

pub const NS: &str = "shop";
pub const PORT: u16 = 50051;
pub const EFFECT_LIMIT: Duration = Duration::from_secs(1);

pub fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10], PORT))
}

/// What the manifest says; rendered in full on every change.
#[derive(Clone)]
pub struct Spec {
    pub labelled: bool,
    pub service_annotations: Vec<(&'static str, &'static str)>,
    pub client_annotations: Vec<(&'static str, &'static str)>,
    /// Server pod numbers listed as ready endpoints.
    pub endpoints: Vec<u8>,
    /// Adds a Service that does not parse.
    pub broken: bool,
    /// Lines added under the Service's `spec:` (e.g. `internalTrafficPolicy: Local`).
    pub service_fields: Vec<String>,
    /// Where endpoints run, by server pod number (default: this node, no zone, no hints).
    pub placement: BTreeMap<u8, Placement>,
    /// This node's zone: when set, the manifests include its Node object with the label.
    pub node_zone: Option<&'static str>,
}

pub struct Server {
    pub n: u8,
    pub pod: Pod,
    _process: ChildGuard,
}

/// A node with one client pod and greet server pods behind the Service `shop/greet`.
pub struct GreetCluster {
    pub servers: Vec<Server>,
    pub client: Pod,
    pub node: Node,
    pub pins: PinRoot,
    pub manifests: PathBuf,
}

impl Spec {
    /// Every server pod listed as a ready endpoint, no annotations.
    pub fn new(labelled: bool, endpoints: &[u8]) -> Self {
        Self {
            labelled,
            service_annotations: Vec::new(),
            client_annotations: Vec::new(),
            endpoints: endpoints.to_vec(),
            broken: false,
            service_fields: Vec::new(),
            placement: BTreeMap::new(),
            node_zone: None,
        }
    }
}

impl Drop for GreetCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.manifests);
    }
}

pub const CLIENT_N: u8 = 2;

impl GreetCluster {
    /// Tonic greet servers as pods `servers`.
    pub fn new(servers: &[u8]) -> Self {
        let stacks: Vec<(u8, Stack)> = servers.iter().map(|&n| (n, Stack::Tonic)).collect();
        Self::with_servers(&stacks)
    }

    /// Server pods `n`, each running `stack`'s greet server.
    pub fn with_servers(servers: &[(u8, Stack)]) -> Self {
        let node = Node::new();
        let pins = PinRoot::new();
        let client = node.add_kube_pod("client", CLIENT_N);
        let manifests = std::env::temp_dir().join(format!("icp-{}-manifests.yaml", node.id));
        let mut c = GreetCluster {
            servers: Vec::new(),
            client,
            node,
            pins,
            manifests,
        };
        for &(n, stack) in servers {
            c.add_server_of(n, stack);
        }
        c.program_kube_proxy();
        c
    }

    /// Adds a greet server pod (tonic).
    pub fn add_server(&mut self, n: u8) {
        self.add_server_of(n, Stack::Tonic);
    }

    /// Adds a greet server pod running `stack`'s server.
    pub fn add_server_of(&mut self, n: u8, stack: Stack) {
        let pod = self.node.add_kube_pod(&format!("greet-{n}"), n);
        let process = stack.serve_in(&pod, PORT);
        self.servers.push(Server {
            n,
            pod,
            _process: process,
        });
    }

    pub fn remove_server(&mut self, n: u8) {
        self.servers.retain(|s| s.n != n);
    }

    /// Emulated kube-proxy: the Service's ClusterIP DNATed to the current servers.
    pub fn program_kube_proxy(&self) {
        let ips: Vec<IpAddr> = self.servers.iter().map(|s| IpAddr::V4(s.pod.ip4)).collect();
        self.node.kube_proxy(&[(vip(), ips)]);
    }

    /// Writes the manifest file; returns when it was written.
    pub fn write(&self, spec: &Spec) -> Instant {
        write_manifests(&self.manifests, &self.docs(spec));
        Instant::now()
    }

    /// The Kubernetes objects `spec` describes.
    pub fn docs(&self, spec: &Spec) -> Vec<String> {
        let mut svc = service(NS, "greet", vip().ip(), PORT, &spec.service_annotations);
        for field in spec.service_fields.iter().rev() {
            svc = svc.replacen("\nspec:\n", &format!("\nspec:\n  {field}\n"), 1);
        }
        let mut docs = vec![
            namespace(NS, spec.labelled),
            svc,
            endpoint_slice_placed(
                NS,
                "greet",
                PORT,
                &spec
                    .endpoints
                    .iter()
                    .filter_map(|n| self.servers.iter().find(|s| s.n == *n))
                    .map(|s| {
                        let at = spec.placement.get(&s.n).cloned().unwrap_or_default();
                        (IpAddr::V4(s.pod.ip4), true, at)
                    })
                    .collect::<Vec<_>>(),
            ),
            pod(NS, &self.client, CLIENT_N, &spec.client_annotations),
        ];
        if let Some(zone) = spec.node_zone {
            docs.push(node_object(zone));
        }
        for s in &self.servers {
            docs.push(pod(NS, &s.pod, s.n, &[]));
        }
        if spec.broken {
            docs.push("apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: shop\nspec:\n  ports:\n  - port: not-a-number\n".into());
        }
        docs
    }

    /// The agent on the file source.
    pub fn start_agent(&self) -> AgentProcess {
        AgentProcess::start(&self.agent_args(&[]))
    }

    /// `interceptor run` on the file source for this node, then `extra` flags.
    pub fn agent_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            "--source=file".into(),
            "--manifests".into(),
            self.manifests.display().to_string(),
        ];
        args.extend(self.node_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Agent flags for this node (every source).
    pub fn node_args(&self) -> Vec<String> {
        vec![
            "--node-name".into(),
            NODE_NAME.into(),
            "--cgroup-root".into(),
            self.node.cgroup_parent.path.display().to_string(),
            "--pin-root".into(),
            self.pins.path.display().to_string(),
        ]
    }

    pub fn client_slice(&self) -> String {
        pod_slice(&self.client)
    }

    pub fn client_hooked(&self) -> bool {
        pod_hooked(&self.client)
    }

    pub fn kernel_action(&self) -> Option<interceptor::bpf::ServiceAction> {
        interceptor::bpf::read_pinned_services(&self.pins.path)
            .ok()?
            .into_iter()
            .find(|(a, _)| *a == vip())
            .map(|(_, act)| act)
    }

    pub fn server_names(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.pod.name.clone()).collect()
    }

    /// Starts a greet client in the client pod: ONE channel to the ClusterIP for `seconds`.
    pub fn client_run(&self, seconds: u64) -> Tallies {
        let child = self.client.spawn(&[
            "greet-client",
            "--to",
            &vip().to_string(),
            "--concurrency",
            "4",
            "--seconds",
            &seconds.to_string(),
            "--report-ms",
            "25",
        ]);
        Tallies::from_child(child)
    }
}

impl Tallies {
    /// Reads the progress of any client that prints the greet client's TALLY lines.
    pub fn from_child(mut child: ChildGuard) -> Self {
        let stdout = child
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("client stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Tallies {
            _child: child,
            rx,
            last: TallyLine::default(),
            last_error: None,
        }
    }
}

/// A running greet client's cumulative tallies, with when each arrived.
pub struct Tallies {
    _child: ChildGuard,
    rx: Receiver<(Instant, String)>,
    pub last: TallyLine,
    /// The client's most recent failed call, if any.
    pub last_error: Option<String>,
}

impl Tallies {
    /// Reads lines until `pred` holds for the latest tally, or panics after `timeout`.
    pub fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&TallyLine) -> bool,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, line)) => {
                    if let Some(t) = greet::parse_tally(&line) {
                        self.last = t.clone();
                        if pred(&t) {
                            return at;
                        }
                    } else if let Some(e) = line.strip_prefix("LAST_ERROR ") {
                        self.last_error = Some(e.to_string());
                    } else if line == "DONE" {
                        panic!(
                            "client finished before: {what} (last tally {:?})",
                            self.last
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "not within {timeout:?}: {what} (last tally {:?})",
                    self.last
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("client exited before: {what} (last tally {:?})", self.last)
                }
            }
        }
    }

    /// Collects for `d` and returns the calls per pod in that window.
    pub fn window(&mut self, d: Duration) -> BTreeMap<String, u64> {
        let start = self.last.clone();
        let end = Instant::now() + d;
        self.until(d + Duration::from_secs(2), "window end", |_| {
            Instant::now() >= end
        });
        self.last.since(&start)
    }

    /// Collects 200 ms windows until one satisfies `pred`; returns how long after `since`.
    /// Panics after 3 s.
    pub fn settle(
        &mut self,
        since: Instant,
        what: &str,
        pred: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Duration {
        loop {
            let w = self.window(Duration::from_millis(200));
            if !w.is_empty() && pred(&w) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(3),
                "not within 3 s: {what} (last 200 ms: {w:?})"
            );
        }
    }

    /// Total calls so far.
    pub fn total(&self) -> u64 {
        self.last.by_pod.values().sum()
    }
}

/// Asserts that a window of calls reached exactly `pods` pods, each with more than
/// `min_share` of them.
pub fn assert_spread(window: &BTreeMap<String, u64>, pods: usize, min_share: f64) {
    assert_eq!(window.len(), pods, "calls reached {window:?}");
    let total: u64 = window.values().sum();
    for (pod, n) in window {
        assert!(
            *n as f64 > min_share * total as f64,
            "{pod} got {n} of {total}: {window:?}"
        );
    }
}

/// Polls `cond` every 10 ms; returns the elapsed time since `since` when it first held.
pub fn effect(since: Instant, what: &str, cond: impl Fn() -> bool) -> Duration {
    let deadline = since + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: no effect within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = since.elapsed();
    note(&format!("{what}: took effect in {} ms", took.as_millis()));
    assert!(
        took <= EFFECT_LIMIT,
        "{what} took {took:?} (limit {EFFECT_LIMIT:?})"
    );
    took
}

pub fn share_line(counts: &BTreeMap<String, u64>) -> String {
    let total: u64 = counts.values().sum();
    counts
        .iter()
        .map(|(p, n)| format!("{p}={n} ({:.0}%)", 100.0 * *n as f64 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The pod-level cgroup of a kubelet-style pod, where the hooks attach.
pub fn pod_slice(pod: &Pod) -> String {
    pod.pod_cgroup
        .as_ref()
        .expect("kubelet-style pod")
        .path
        .display()
        .to_string()
}

/// Whether the connect hook is attached to `pod`'s cgroup.
pub fn pod_hooked(pod: &Pod) -> bool {
    bpftool_json(&["cgroup", "show", &pod_slice(pod)])
        .to_string()
        .contains("icp_connect4")
}
