//! Discovery on the file source, end to end: real pods (netns + kubelet-style cgroups), the
//! real eBPF object, the agent process reading a manifest file of Kubernetes objects, and a
//! real gRPC client keeping one channel to a Service ClusterIP. Every change is made by
//! rewriting the manifest, as an operator (or the demo) would, and the time until it takes
//! effect in the kernel or in the traffic is measured and printed.

use std::time::{Duration, Instant};

use interceptor_tests::cluster::{effect, share_line, GreetCluster as Cluster, Spec};
use interceptor_tests::greet::{self, TallyLine};
use interceptor_tests::*;

const EFFECT_LIMIT: Duration = interceptor_tests::cluster::EFFECT_LIMIT;

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
