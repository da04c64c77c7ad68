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

fn apply(api: &FakeApiServer, c: &GreetCluster, spec: &Spec) -> Instant {
    api.apply_yaml(&c.docs(spec).join("---\n"));
    Instant::now()
}

#[test]
fn kube_watch_drives_the_datapath_and_the_balancer() {
    let mut c = GreetCluster::new(&[30, 31, 32]);
    let api = FakeApiServer::start();
    let kubeconfig =
        KubeconfigFile(std::env::temp_dir().join(format!("icp-{}-kubeconfig", c.node.id)));
    api.write_kubeconfig(&kubeconfig.0)
        .expect("write kubeconfig");
    // A pod on another node: the agent must never see it (field selector).
    api.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: elsewhere, namespace: shop, uid: 99}\nspec: {nodeName: node-b, containers: [{name: a, image: b}]}\nstatus: {phase: Running}\n",
    );
    let mut spec = Spec::new(false, &[30, 31, 32]);
    apply(&api, &c, &spec);

    let mut args = vec!["run".to_string(), "--source=kube".into()];
    args.extend(c.node_args());
    let agent = AgentProcess::start_with_env(
        &args,
        &[("KUBECONFIG", kubeconfig.0.to_str().expect("utf-8"))],
    );
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
