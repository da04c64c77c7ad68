//! Discovery on the file source, end to end: real pods (netns + kubelet-style cgroups), the
//! real eBPF object, the agent process reading a manifest file of Kubernetes objects, and a
//! real gRPC client keeping one channel to a Service ClusterIP. Every change is made by
//! rewriting the manifest, as an operator (or the demo) would, and the time until it takes
//! effect in the kernel or in the traffic is measured and printed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use interceptor_tests::cluster::{self, NODE_NAME};
use interceptor_tests::greet::{self, TallyLine};
use interceptor_tests::*;

const NS: &str = "shop";
const PORT: u16 = 50051;
const EFFECT_LIMIT: Duration = Duration::from_secs(1);

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10], PORT))
}

/// What the manifest says; rendered in full on every change.
#[derive(Clone)]
struct Spec {
    labelled: bool,
    service_annotations: Vec<(&'static str, &'static str)>,
    client_annotations: Vec<(&'static str, &'static str)>,
    /// Server pod numbers listed as ready endpoints.
    endpoints: Vec<u8>,
    broken: bool,
}

struct Server {
    n: u8,
    pod: Pod,
    _process: ChildGuard,
}

struct Cluster {
    servers: Vec<Server>,
    client: Pod,
    node: Node,
    pins: PinRoot,
    manifests: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.manifests);
    }
}

const CLIENT_N: u8 = 2;

impl Cluster {
    fn new(servers: &[u8]) -> Self {
        let node = Node::new();
        let pins = PinRoot::new();
        let client = node.add_kube_pod("client", CLIENT_N);
        let manifests = std::env::temp_dir().join(format!("icp-{}-manifests.yaml", node.id));
        let mut c = Cluster {
            servers: Vec::new(),
            client,
            node,
            pins,
            manifests,
        };
        for &n in servers {
            c.add_server(n);
        }
        c.program_kube_proxy();
        c
    }

    fn add_server(&mut self, n: u8) {
        let pod = self.node.add_kube_pod(&format!("greet-{n}"), n);
        let mut process = pod.spawn(&["greet-server", "--name", &pod.name, "--port", &PORT.to_string()]);
        let stdout = process.0.as_mut().and_then(|c| c.stdout.take()).expect("server stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("server readiness");
        assert_eq!(line.trim(), "READY", "greet server {} did not start", pod.name);
        self.servers.push(Server { n, pod, _process: process });
    }

    fn remove_server(&mut self, n: u8) {
        self.servers.retain(|s| s.n != n);
    }

    /// Emulated kube-proxy: the Service's ClusterIP DNATed to the current servers.
    fn program_kube_proxy(&self) {
        let ips: Vec<IpAddr> = self.servers.iter().map(|s| IpAddr::V4(s.pod.ip4)).collect();
        self.node.kube_proxy(&[(vip(), ips)]);
    }

    fn write(&self, spec: &Spec) -> Instant {
        let mut docs = vec![
            cluster::namespace(NS, spec.labelled),
            cluster::service(NS, "greet", vip().ip(), PORT, &spec.service_annotations),
            cluster::endpoint_slice(
                NS,
                "greet",
                PORT,
                &spec
                    .endpoints
                    .iter()
                    .filter_map(|n| self.servers.iter().find(|s| s.n == *n))
                    .map(|s| (IpAddr::V4(s.pod.ip4), true))
                    .collect::<Vec<_>>(),
            ),
            cluster::pod(NS, &self.client, CLIENT_N, &spec.client_annotations),
        ];
        for s in &self.servers {
            docs.push(cluster::pod(NS, &s.pod, s.n, &[]));
        }
        if spec.broken {
            docs.push("apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: shop\nspec:\n  ports:\n  - port: not-a-number\n".into());
        }
        cluster::write_manifests(&self.manifests, &docs);
        Instant::now()
    }

    fn start_agent(&self) -> AgentProcess {
        AgentProcess::start(&[
            "run".into(),
            "--source=file".into(),
            "--manifests".into(),
            self.manifests.display().to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--cgroup-root".into(),
            self.node.cgroup_parent.path.display().to_string(),
            "--pin-root".into(),
            self.pins.path.display().to_string(),
        ])
    }

    fn client_slice(&self) -> String {
        self.client.pod_cgroup.as_ref().expect("kubelet-style pod").path.display().to_string()
    }

    fn client_hooked(&self) -> bool {
        let progs = bpftool_json(&["cgroup", "show", &self.client_slice()]);
        progs.to_string().contains("icp_connect4")
    }

    fn kernel_action(&self) -> Option<interceptor::bpf::ServiceAction> {
        interceptor::bpf::read_pinned_services(&self.pins.path)
            .ok()?
            .into_iter()
            .find(|(a, _)| *a == vip())
            .map(|(_, act)| act)
    }

    fn server_names(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.pod.name.clone()).collect()
    }

    /// Starts a greet client in the client pod: ONE channel to the ClusterIP for `seconds`.
    fn client_run(&self, seconds: u64) -> Tallies {
        let mut child = self.client.spawn(&[
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
        let stdout = child.0.as_mut().and_then(|c| c.stdout.take()).expect("client stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Tallies { _child: child, rx, last: TallyLine::default(), history: Vec::new() }
    }
}

/// A running greet client's cumulative tallies, with when each arrived.
struct Tallies {
    _child: ChildGuard,
    rx: Receiver<(Instant, String)>,
    last: TallyLine,
    history: Vec<(Instant, TallyLine)>,
}

impl Tallies {
    /// Reads lines until `pred` holds for the latest tally, or panics after `timeout`.
    fn until(&mut self, timeout: Duration, what: &str, pred: impl Fn(&TallyLine) -> bool) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, line)) => {
                    if let Some(t) = greet::parse_tally(&line) {
                        self.last = t.clone();
                        self.history.push((at, t.clone()));
                        if pred(&t) {
                            return at;
                        }
                    } else if line == "DONE" {
                        panic!("client finished before: {what} (last tally {:?})", self.last);
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("not within {timeout:?}: {what} (last tally {:?})", self.last),
                Err(RecvTimeoutError::Disconnected) => panic!("client exited before: {what} (last tally {:?})", self.last),
            }
        }
    }

    /// Collects for `d` and returns the calls per pod in that window.
    fn window(&mut self, d: Duration) -> BTreeMap<String, u64> {
        let start = self.last.clone();
        let end = Instant::now() + d;
        self.until(d + Duration::from_secs(2), "window end", |_| Instant::now() >= end);
        self.last.since(&start)
    }

    /// Total calls so far.
    fn total(&self) -> u64 {
        self.last.by_pod.values().sum()
    }
}

/// Polls `cond` every 10 ms; returns the elapsed time since `since` when it first held.
fn effect(since: Instant, what: &str, cond: impl Fn() -> bool) -> Duration {
    let deadline = since + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: no effect within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = since.elapsed();
    note(&format!("{what}: took effect in {} ms", took.as_millis()));
    assert!(took <= EFFECT_LIMIT, "{what} took {took:?} (limit {EFFECT_LIMIT:?})");
    took
}

fn share_line(counts: &BTreeMap<String, u64>) -> String {
    let total: u64 = counts.values().sum();
    counts
        .iter()
        .map(|(p, n)| format!("{p}={n} ({:.0}%)", 100.0 * *n as f64 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn label_unlabel_and_opt_outs_take_effect_within_a_second() {
    let c = Cluster::new(&[10, 11, 12]);
    let mut spec = Spec {
        labelled: false,
        service_annotations: vec![],
        client_annotations: vec![],
        endpoints: vec![10, 11, 12],
        broken: false,
    };
    c.write(&spec);
    let agent = c.start_agent();
    assert!(!c.client_hooked(), "unlabelled namespace: the client pod must not be hooked");
    assert_eq!(agent.admin_get("/readyz").0, 200, "agent ready after the first state");

    // Before: kube-proxy pins the one channel to one pod.
    let mut t = c.client_run(10);
    let before = t.window(Duration::from_millis(800));
    note(&format!("before (unlabelled): {}", share_line(&before)));
    assert_eq!(before.len(), 1, "one channel through kube-proxy lands on one pod: {before:?}");
    drop(t);

    // Label the namespace: the pod's hooks are attached, new channels are balanced.
    spec.labelled = true;
    let at = c.write(&spec);
    effect(at, "label namespace -> client pod hooked", || c.client_hooked());
    let mut t = c.client_run(10);
    let after = t.window(Duration::from_millis(1500));
    note(&format!("after labelling: {}", share_line(&after)));
    assert_eq!(after.len(), 3, "every server takes calls: {after:?}");
    let total: u64 = after.values().sum();
    for (pod, n) in &after {
        assert!(*n as f64 > 0.2 * total as f64, "{pod} got {n} of {total}");
    }
    assert_eq!(t.last.errors, 0, "no failed calls");
    drop(t);

    // A manifest that does not parse changes nothing and says why in one line.
    spec.broken = true;
    c.write(&spec);
    std::thread::sleep(Duration::from_millis(600));
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("manifests not applied"))
        .unwrap_or_else(|| panic!("no error line for the broken manifest:\n{log}"));
    assert!(line.contains("Service shop/broken"), "the error names the object: {line}");
    assert!(c.client_hooked(), "the previous state stays in force");
    spec.broken = false;

    // Service opt-out: its ClusterIP:port becomes excluded in the kernel map.
    spec.service_annotations = vec![("interceptor.io/intercept", "false")];
    let at = c.write(&spec);
    effect(at, "Service annotation intercept=false -> kernel entry excluded", || {
        c.kernel_action() == Some(interceptor::bpf::ServiceAction::Exclude)
    });
    let mut t = c.client_run(10);
    let opted = t.window(Duration::from_millis(800));
    note(&format!("Service opted out: {}", share_line(&opted)));
    assert_eq!(opted.len(), 1, "an opted-out Service is left to kube-proxy: {opted:?}");
    drop(t);
    spec.service_annotations.clear();
    let at = c.write(&spec);
    effect(at, "Service annotation removed -> kernel entry intercepted", || {
        c.kernel_action() == Some(interceptor::bpf::ServiceAction::Intercept)
    });

    // Pod opt-out: its hooks are detached.
    spec.client_annotations = vec![("interceptor.io/intercept", "false")];
    let at = c.write(&spec);
    effect(at, "pod annotation intercept=false -> hooks detached", || !c.client_hooked());
    spec.client_annotations.clear();
    let at = c.write(&spec);
    effect(at, "pod annotation removed -> hooks attached", || c.client_hooked());

    // Unlabel: interception stops for new connections.
    spec.labelled = false;
    let at = c.write(&spec);
    effect(at, "unlabel namespace -> hooks detached", || !c.client_hooked());
    let mut t = c.client_run(10);
    let unlabelled = t.window(Duration::from_millis(800));
    note(&format!("after unlabelling: {}", share_line(&unlabelled)));
    assert_eq!(unlabelled.len(), 1, "back to kube-proxy: {unlabelled:?}");
    assert_eq!(t.last.errors, 0);
}

#[test]
fn scale_up_and_down_reach_one_long_lived_channel_within_a_second() {
    let mut c = Cluster::new(&[20, 21, 22]);
    let mut spec = Spec {
        labelled: true,
        service_annotations: vec![],
        client_annotations: vec![],
        endpoints: vec![20, 21, 22],
        broken: false,
    };
    c.write(&spec);
    let _agent = c.start_agent();
    let at = Instant::now();
    effect(at, "agent start -> client pod hooked", || c.client_hooked());

    let mut t = c.client_run(20);
    let warm = t.window(Duration::from_millis(800));
    note(&format!("3 servers: {}", share_line(&warm)));
    assert_eq!(warm.len(), 3, "{warm:?}");

    // Scale up: a 4th pod starts, kube-proxy and the EndpointSlice list it.
    c.add_server(23);
    c.program_kube_proxy();
    spec.endpoints.push(23);
    let at = c.write(&spec);
    let first = t.until(Duration::from_secs(5), "greet-23 gets a call", |l| {
        l.by_pod.get("greet-23").copied().unwrap_or(0) > 0
    });
    let first_ms = first.duration_since(at).as_millis();
    note(&format!("scale up: new pod's first call {first_ms} ms after the manifest changed"));
    assert!(first.duration_since(at) <= EFFECT_LIMIT, "first call after {first_ms} ms");
    // Fair share: the end of the first 250 ms window in which the new pod took at least 60%
    // of a fair quarter.
    let fair_at = loop {
        let w = t.window(Duration::from_millis(250));
        let total: u64 = w.values().sum();
        let mine = w.get("greet-23").copied().unwrap_or(0);
        if total > 0 && mine as f64 >= 0.6 * total as f64 / 4.0 {
            break Instant::now();
        }
        assert!(at.elapsed() < Duration::from_secs(3), "greet-23 never reached a fair share: {w:?}");
    };
    let fair = fair_at.duration_since(at);
    note(&format!("scale up: new pod at a fair share {} ms after the manifest changed", fair.as_millis()));
    assert!(fair <= EFFECT_LIMIT, "fair share after {fair:?}");
    let four = t.window(Duration::from_millis(1500));
    let pods4 = c.server_names();
    note(&format!(
        "4 servers: {} jain={:.3} max/mean={:.2}",
        share_line(&four),
        greet::jain(&four, &pods4),
        greet::max_over_mean(&four, &pods4)
    ));
    assert!(greet::jain(&four, &pods4) >= 0.95, "balanced over 4: {four:?}");

    // Scale down: greet-21 leaves the EndpointSlice (then the pod stops).
    let errors_before = t.last.errors;
    spec.endpoints.retain(|n| *n != 21);
    let at = c.write(&spec);
    let count21 = |l: &TallyLine| l.by_pod.get("greet-21").copied().unwrap_or(0);
    // The endpoint is out once its count stops moving for 300 ms.
    let mut last_change = (at, count21(&t.last));
    loop {
        t.window(Duration::from_millis(50));
        let now = count21(&t.last);
        if now != last_change.1 {
            last_change = (Instant::now(), now);
        } else if last_change.0.elapsed() >= Duration::from_millis(300) {
            break;
        }
        assert!(at.elapsed() < Duration::from_secs(5), "greet-21 still gets calls");
    }
    let took = last_change.0.saturating_duration_since(at);
    note(&format!("scale down: removed pod's last call {} ms after the manifest changed", took.as_millis()));
    assert!(took <= EFFECT_LIMIT, "removed endpoint kept taking calls for {took:?}");
    c.remove_server(21);
    c.program_kube_proxy();
    let rest = t.window(Duration::from_millis(800));
    note(&format!("after scale down: {}", share_line(&rest)));
    assert!(!rest.contains_key("greet-21"), "{rest:?}");
    assert_eq!(t.last.errors, errors_before, "zero failed calls across the scale-down");
    assert!(t.total() > 0);
}
