//! Discovery on the kube source, end to end: the agent process runs kube-rs watchers against a
//! test API server that speaks the real list/watch protocol (initial lists, ADDED/MODIFIED/
//! DELETED events, bookmarks, broken watches, 410 Gone -> relist), and the same effects the
//! file source produces reach the kernel and the demultiplexer: real pods in netns, the real
//! eBPF object, a real gRPC client with one channel.

use std::time::{Duration, Instant};

use interceptor_tests::cluster::{effect, share_line, GreetCluster, Spec, NODE_NAME};
use interceptor_tests::kube_api::FakeApiServer;
use interceptor_tests::*;

const EFFECT_LIMIT: Duration = interceptor_tests::cluster::EFFECT_LIMIT;

struct KubeconfigFile(std::path::PathBuf);

impl Drop for KubeconfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl KubeconfigFile {
    /// A kubeconfig pointing at `api`, removed on drop.
    fn for_api(api: &FakeApiServer, c: &GreetCluster) -> Self {
        let file = Self(std::env::temp_dir().join(format!("icp-{}-kubeconfig", c.node.id)));
        api.write_kubeconfig(&file.0).expect("write kubeconfig");
        file
    }
}

/// The agent on the kube source for this node, talking to the API server of `kubeconfig`.
fn start_kube_agent(c: &GreetCluster, kubeconfig: &KubeconfigFile) -> AgentProcess {
    let mut args = vec!["run".to_string(), "--source=kube".into()];
    args.extend(c.node_args());
    AgentProcess::start_with_env(
        &args,
        &[("KUBECONFIG", kubeconfig.0.to_str().expect("utf-8"))],
    )
}

fn apply(api: &FakeApiServer, c: &GreetCluster, spec: &Spec) -> Instant {
    api.apply_yaml(&c.docs(spec).join("---\n"));
    Instant::now()
}

#[test]
fn kube_watch_drives_the_datapath_and_the_balancer() {
    let mut c = GreetCluster::new(&[30, 31, 32]);
    let api = FakeApiServer::start();
    let kubeconfig = KubeconfigFile::for_api(&api, &c);
    // A pod on another node: the agent must never see it (field selector).
    api.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: elsewhere, namespace: shop, uid: 99}\nspec: {nodeName: node-b, containers: [{name: a, image: b}]}\nstatus: {phase: Running}\n",
    );
    let mut spec = Spec::new(false, &[30, 31, 32]);
    apply(&api, &c, &spec);

    let agent = start_kube_agent(&c, &kubeconfig);
    assert_eq!(
        agent.admin_get("/readyz").0,
        200,
        "ready after the initial lists"
    );
    assert_eq!(
        c.kernel_action(),
        Some(interceptor::bpf::ServiceAction::Intercept),
        "the Service from the initial list is in the kernel map"
    );
    assert!(!c.client_hooked(), "unlabelled namespace: not hooked");
    let state = agent.admin_get("/state").1;
    assert!(
        !state.contains("elsewhere"),
        "a pod of another node reached the agent: {state}"
    );

    // ADDED/MODIFIED: label the namespace.
    spec.labelled = true;
    let at = apply(&api, &c, &spec);
    effect(at, "kube: label namespace -> client pod hooked", || {
        c.client_hooked()
    });
    let mut t = c.client_run(30);
    let three = t.window(Duration::from_millis(1000));
    note(&format!("kube: 3 servers: {}", share_line(&three)));
    assert_eq!(three.len(), 3, "{three:?}");

    // Bookmarks keep the watches going; then a scale-up arrives as events.
    api.bookmark();
    c.add_server(33);
    c.program_kube_proxy();
    spec.endpoints.push(33);
    let at = apply(&api, &c, &spec);
    let first = t.until(Duration::from_secs(5), "greet-33 gets a call", |l| {
        l.by_pod.get("greet-33").copied().unwrap_or(0) > 0
    });
    let took = first.duration_since(at);
    note(&format!(
        "kube: scale up: new pod's first call after {} ms",
        took.as_millis()
    ));
    assert!(took <= EFFECT_LIMIT, "first call after {took:?}");

    // 410 Gone: history is compacted, every watch ends with Expired and must relist; a
    // change made meanwhile must still arrive.
    let expired = api.expire();
    assert!(expired >= 4, "every watch was open ({expired} ended)");
    spec.endpoints.retain(|n| *n != 31);
    let at = apply(&api, &c, &spec);
    let errors_before = t.last.errors;
    let count31 = |t: &interceptor_tests::cluster::Tallies| {
        t.last.by_pod.get("greet-31").copied().unwrap_or(0)
    };
    let mut last = (at, count31(&t));
    loop {
        t.window(Duration::from_millis(50));
        if count31(&t) != last.1 {
            last = (Instant::now(), count31(&t));
        } else if last.0.elapsed() >= Duration::from_millis(300) {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "greet-31 still gets calls after the relist"
        );
    }
    let took = last.0.saturating_duration_since(at);
    note(&format!(
        "kube: change during a 410 relist: removed pod's last call after {} ms",
        took.as_millis()
    ));
    assert!(
        took <= EFFECT_LIMIT,
        "a change across a 410 relist took {took:?}"
    );
    let log = api.requests();
    let relisted = log.iter().filter(|r| r.watch_error == Some(410)).count();
    assert!(relisted >= 4, "watches ended with 410: {relisted}");
    assert_eq!(
        t.last.errors, errors_before,
        "no failed calls across the relist"
    );

    // A broken watch connection: reconnect, and the next change still arrives.
    api.close_watches();
    spec.labelled = false;
    let at = apply(&api, &c, &spec);
    let deadline = at + Duration::from_secs(5);
    while c.client_hooked() {
        assert!(
            Instant::now() < deadline,
            "unlabel never arrived after the watch broke"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    note(&format!(
        "kube: unlabel after a broken watch: hooks detached after {} ms",
        at.elapsed().as_millis()
    ));

    // DELETED: the Service goes away, and so does its kernel entry.
    api.delete("Service", "shop", "greet");
    let at = Instant::now();
    effect(at, "kube: Service deleted -> kernel entry removed", || {
        c.kernel_action().is_none()
    });

    // Never a cluster-wide pod list or watch.
    let pods: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/pods"))
        .collect();
    assert!(!pods.is_empty());
    for r in &pods {
        assert_eq!(
            r.param("fieldSelector"),
            Some(format!("spec.nodeName={NODE_NAME}").as_str()),
            "pod request without this node's field selector: {r}"
        );
    }
    c.remove_server(31);
}

/// Topology, internalTrafficPolicy and sessionAffinity arriving as watch events, on one
/// long-lived channel: each changes where the calls land as kube-proxy would route
/// connections, and removing the fields balances over every endpoint again.
#[test]
fn kube_service_semantics_follow_the_watched_fields_on_one_channel() {
    use interceptor_tests::cluster::Placement;
    let c = GreetCluster::new(&[40, 41, 42]);
    let api = FakeApiServer::start();
    let kubeconfig = KubeconfigFile::for_api(&api, &c);
    // This node is in zone-a; 41 runs on another node of zone-a, 42 in zone-b.
    let mut spec = Spec::new(true, &[40, 41, 42]);
    spec.node_zone = Some("zone-a");
    spec.placement
        .insert(40, Placement::at(NODE_NAME, "zone-a"));
    spec.placement.insert(41, Placement::at("node-b", "zone-a"));
    spec.placement.insert(42, Placement::at("node-c", "zone-b"));
    // The EndpointSlice controller has not written hints yet: kube-proxy uses every endpoint.
    spec.service_fields = vec!["trafficDistribution: PreferClose".into()];
    apply(&api, &c, &spec);

    let agent = start_kube_agent(&c, &kubeconfig);
    effect(Instant::now(), "kube: client pod hooked", || {
        c.client_hooked()
    });
    let mut t = c.client_run(30);
    let unhinted = t.window(Duration::from_millis(800));
    note(&format!(
        "kube: trafficDistribution without hints yet: {}",
        share_line(&unhinted)
    ));
    assert_eq!(unhinted.len(), 3, "{unhinted:?}");

    // The controller writes zone hints: zone-a's endpoints only.
    for (n, hints) in [
        (40, "{forZones: [{name: zone-a}]}"),
        (41, "{forZones: [{name: zone-a}]}"),
        (42, "{forZones: [{name: zone-b}]}"),
    ] {
        spec.placement.get_mut(&n).expect("placed").hints = Some(hints);
    }
    let at = apply(&api, &c, &spec);
    let took = t.settle(at, "zone-a endpoints only", |w| {
        w.keys().all(|p| p == "greet-40" || p == "greet-41")
    });
    let zone = t.window(Duration::from_millis(800));
    note(&format!(
        "kube: zone hints (after {took:?}): {}",
        share_line(&zone)
    ));
    assert_eq!(
        zone.keys().collect::<Vec<_>>(),
        ["greet-40", "greet-41"],
        "{zone:?}"
    );
    assert!(
        took <= EFFECT_LIMIT + Duration::from_millis(200),
        "took {took:?}"
    );
    let (_, state) = agent.admin_get("/state");
    assert!(
        state.contains("hinted for zone zone-b, this node is in zone-a"),
        "{state}"
    );

    // The Node is relabelled into zone-b (a watch event on the Node): zone-b's endpoint.
    spec.node_zone = Some("zone-b");
    let at = apply(&api, &c, &spec);
    let took = t.settle(at, "zone-b endpoint only", |w| {
        w.keys().all(|p| p == "greet-42")
    });
    note(&format!(
        "kube: Node relabelled zone-b: only greet-42 after {took:?}"
    ));

    // internalTrafficPolicy Local (hints gone): only this node's endpoint.
    spec.node_zone = Some("zone-a");
    for n in [40, 41, 42] {
        spec.placement.get_mut(&n).expect("placed").hints = None;
    }
    spec.service_fields = vec!["internalTrafficPolicy: Local".into()];
    let at = apply(&api, &c, &spec);
    let took = t.settle(at, "this node's endpoint only", |w| {
        w.keys().all(|p| p == "greet-40")
    });
    let local = t.window(Duration::from_millis(800));
    note(&format!(
        "kube: internalTrafficPolicy Local (after {took:?}): {}",
        share_line(&local)
    ));
    assert_eq!(local.keys().collect::<Vec<_>>(), ["greet-40"], "{local:?}");

    // Removed: all three again.
    spec.service_fields.clear();
    let at = apply(&api, &c, &spec);
    let took = t.settle(at, "all three endpoints", |w| w.len() == 3);
    note(&format!(
        "kube: internalTrafficPolicy removed: all three after {took:?}"
    ));

    // sessionAffinity ClientIP: every call of the pod on one endpoint.
    spec.service_fields = vec![
        "sessionAffinity: ClientIP".into(),
        "sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}".into(),
    ];
    let at = apply(&api, &c, &spec);
    let took = t.settle(at, "one endpoint under sessionAffinity", |w| w.len() == 1);
    let sticky = t.window(Duration::from_millis(800));
    note(&format!(
        "kube: sessionAffinity ClientIP (after {took:?}): {}",
        share_line(&sticky)
    ));
    assert_eq!(sticky.len(), 1, "{sticky:?}");
    let status = {
        let out = std::process::Command::new(target_bin("interceptor"))
            .args(["status", "--admin-addr", &agent.admin_addr().to_string()])
            .args(["--pin-root", &c.pins.path.display().to_string()])
            .output()
            .expect("run interceptor status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        status.contains("sessionAffinity ClientIP (300 s)"),
        "{status}"
    );

    // Every field removed: balanced over all three on the same channel.
    spec.service_fields.clear();
    let at = apply(&api, &c, &spec);
    let took = t.settle(at, "all three endpoints", |w| w.len() == 3);
    let all = t.window(Duration::from_millis(1000));
    note(&format!(
        "kube: fields removed (after {took:?}): {}",
        share_line(&all)
    ));
    interceptor_tests::cluster::assert_spread(&all, 3, 0.2);
    assert_eq!(t.last.errors, 0, "no failed calls: {:?}", t.last_error);

    // The Service port says appProtocol: grpc (cluster::service): its connections went to the
    // HTTP/2 server without the detection wait, as on the file source.
    let (_, metrics) = agent.admin_get("/metrics");
    assert!(
        metrics.contains("interceptor_detections_total{protocol=\"declared_h2\"}"),
        "appProtocol grpc from the watched Service skips detection:\n{metrics}"
    );

    // The Node watch asks for this node only.
    let nodes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/nodes"))
        .collect();
    assert!(!nodes.is_empty(), "the agent watches its Node");
    for r in &nodes {
        assert_eq!(
            r.param("fieldSelector"),
            Some(format!("metadata.name={NODE_NAME}").as_str()),
            "node request without this node's field selector: {r}"
        );
    }
}

/// An agent upgraded before its ClusterRole (no `nodes` rule): it says why topology is off and
/// runs as before, instead of never becoming ready.
#[test]
fn without_rbac_for_nodes_the_agent_runs_and_ignores_topology() {
    let c = GreetCluster::new(&[45, 46]);
    let api = FakeApiServer::start();
    api.forbid("Node");
    let kubeconfig = KubeconfigFile::for_api(&api, &c);
    let spec = Spec::new(true, &[45, 46]);
    apply(&api, &c, &spec);
    let agent = start_kube_agent(&c, &kubeconfig);
    assert_eq!(agent.admin_get("/readyz").0, 200, "ready without the Node");
    effect(Instant::now(), "kube: client pod hooked", || {
        c.client_hooked()
    });
    let mut t = c.client_run(5);
    let both = t.window(Duration::from_millis(800));
    note(&format!("kube: Nodes forbidden: {}", share_line(&both)));
    assert_eq!(both.len(), 2, "{both:?}");
    let log = agent.log_text();
    let said = agent.log_lines_containing("cannot list Nodes yet: going on without them (topology hints are ignored until this node's zone is known)");
    assert_eq!(
        said, 1,
        "one line says what is missing and what it costs, once:\n{log}"
    );
    let forbidden = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/nodes"))
        .count();
    assert!(forbidden >= 1, "the agent asked for its Node");
    assert_eq!(t.last.errors, 0, "{:?}", t.last_error);
}
