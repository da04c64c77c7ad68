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
    let mut spec = Spec::new(false, &[10, 11, 12]);
    c.write(&spec);
    let agent = c.start_agent();
    assert!(
        !c.client_hooked(),
        "unlabelled namespace: the client pod must not be hooked"
    );
    assert_eq!(
        agent.admin_get("/readyz").0,
        200,
        "agent ready after the first state"
    );

    // Before: kube-proxy pins the one channel to one pod.
    let mut t = c.client_run(10);
    let before = t.window(Duration::from_millis(800));
    note(&format!("before (unlabelled): {}", share_line(&before)));
    assert_eq!(
        before.len(),
        1,
        "one channel through kube-proxy lands on one pod: {before:?}"
    );
    drop(t);

    // Label the namespace: the pod's hooks are attached, new channels are balanced.
    spec.labelled = true;
    let at = c.write(&spec);
    effect(at, "label namespace -> client pod hooked", || {
        c.client_hooked()
    });
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
    assert!(
        line.contains("Service shop/broken"),
        "the error names the object: {line}"
    );
    assert!(c.client_hooked(), "the previous state stays in force");
    spec.broken = false;

    // Service opt-out: its ClusterIP:port becomes excluded in the kernel map.
    spec.service_annotations = vec![("interceptor.io/intercept", "false")];
    let at = c.write(&spec);
    effect(
        at,
        "Service annotation intercept=false -> kernel entry excluded",
        || c.kernel_action() == Some(interceptor::bpf::ServiceAction::Exclude),
    );
    let mut t = c.client_run(10);
    let opted = t.window(Duration::from_millis(800));
    note(&format!("Service opted out: {}", share_line(&opted)));
    assert_eq!(
        opted.len(),
        1,
        "an opted-out Service is left to kube-proxy: {opted:?}"
    );
    drop(t);
    spec.service_annotations.clear();
    let at = c.write(&spec);
    effect(
        at,
        "Service annotation removed -> kernel entry intercepted",
        || c.kernel_action() == Some(interceptor::bpf::ServiceAction::Intercept),
    );

    // Pod opt-out: its hooks are detached.
    spec.client_annotations = vec![("interceptor.io/intercept", "false")];
    let at = c.write(&spec);
    effect(
        at,
        "pod annotation intercept=false -> hooks detached",
        || !c.client_hooked(),
    );
    spec.client_annotations.clear();
    let at = c.write(&spec);
    effect(at, "pod annotation removed -> hooks attached", || {
        c.client_hooked()
    });

    // Unlabel: interception stops for new connections.
    spec.labelled = false;
    let at = c.write(&spec);
    effect(at, "unlabel namespace -> hooks detached", || {
        !c.client_hooked()
    });
    let mut t = c.client_run(10);
    let unlabelled = t.window(Duration::from_millis(800));
    note(&format!("after unlabelling: {}", share_line(&unlabelled)));
    assert_eq!(unlabelled.len(), 1, "back to kube-proxy: {unlabelled:?}");
    assert_eq!(t.last.errors, 0);
}

#[test]
fn scale_up_and_down_reach_one_long_lived_channel_within_a_second() {
    let mut c = Cluster::new(&[20, 21, 22]);
    let mut spec = Spec::new(true, &[20, 21, 22]);
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
    note(&format!(
        "scale up: new pod's first call {first_ms} ms after the manifest changed"
    ));
    assert!(
        first.duration_since(at) <= EFFECT_LIMIT,
        "first call after {first_ms} ms"
    );
    // Fair share: the end of the first 250 ms window in which the new pod took at least 60%
    // of a fair quarter.
    let fair_at = interceptor_tests::cluster::fair_share_reached(&mut t, "greet-23", 4, 0.6, at);
    let fair = fair_at.duration_since(at);
    note(&format!(
        "scale up: new pod at a fair share {} ms after the manifest changed",
        fair.as_millis()
    ));
    assert!(fair <= EFFECT_LIMIT, "fair share after {fair:?}");
    let four = t.window(Duration::from_millis(1500));
    let pods4 = c.server_names();
    note(&format!(
        "4 servers: {} jain={:.3} max/mean={:.2}",
        share_line(&four),
        greet::jain(&four, &pods4),
        greet::max_over_mean(&four, &pods4)
    ));
    assert!(
        greet::jain(&four, &pods4) >= 0.95,
        "balanced over 4: {four:?}"
    );

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
        assert!(
            at.elapsed() < Duration::from_secs(5),
            "greet-21 still gets calls"
        );
    }
    let took = last_change.0.saturating_duration_since(at);
    note(&format!(
        "scale down: removed pod's last call {} ms after the manifest changed",
        took.as_millis()
    ));
    assert!(
        took <= EFFECT_LIMIT,
        "removed endpoint kept taking calls for {took:?}"
    );
    c.remove_server(21);
    c.program_kube_proxy();
    let rest = t.window(Duration::from_millis(800));
    note(&format!("after scale down: {}", share_line(&rest)));
    assert!(!rest.contains_key("greet-21"), "{rest:?}");
    assert_eq!(
        t.last.errors, errors_before,
        "zero failed calls across the scale-down"
    );
    assert!(t.total() > 0);
}

/// Runs an operator command (`status`, `explain`) against this agent; returns its stdout.
fn operator(agent: &AgentProcess, c: &Cluster, args: &[&str]) -> String {
    let out = std::process::Command::new(target_bin("interceptor"))
        .args(args)
        .args([
            "--admin-addr",
            &agent.admin_addr().to_string(),
            "--pin-root",
            &c.pins.path.display().to_string(),
        ])
        .output()
        .expect("run the interceptor CLI");
    assert!(
        out.status.success(),
        "interceptor {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn status_explain_and_the_admin_endpoint_tell_the_operator_what_and_why() {
    let c = Cluster::new(&[40, 41]);
    let mut spec = Spec::new(false, &[40, 41]);
    c.write(&spec);
    let agent = c.start_agent();
    let vip = interceptor_tests::cluster::vip().to_string();

    let why = operator(&agent, &c, &["explain", "shop/client", &vip]);
    note(&format!("explain (unlabelled):\n{why}"));
    assert!(why.contains("verdict: NOT intercepted"), "{why}");
    assert!(
        why.contains("not labelled interceptor.io/enabled=true"),
        "names the missing label: {why}"
    );

    spec.labelled = true;
    let at = c.write(&spec);
    effect(at, "label -> hooked", || c.client_hooked());
    let why = operator(&agent, &c, &["explain", "shop/client", &vip]);
    note(&format!("explain (labelled):\n{why}"));
    assert!(why.contains("verdict: INTERCEPTED"), "{why}");
    let why = operator(&agent, &c, &["explain", "shop/client", "10.96.0.99:80"]);
    assert!(
        why.contains("not a ClusterIP:port of any TCP Service"),
        "{why}"
    );

    // Some traffic, so that counters and request metrics exist.
    let mut t = c.client_run(5);
    t.window(Duration::from_millis(500));
    drop(t);

    let status = operator(&agent, &c, &["status"]);
    note(&format!("status:\n{status}"));
    assert!(status.contains("agent: running"), "{status}");
    assert!(
        status.contains("shop/client") && status.contains("intercepted"),
        "{status}"
    );
    assert!(
        status.contains(vip.as_str()) && status.contains("2 endpoints (2 ready"),
        "{status}"
    );
    assert!(status.contains("redirected"), "kernel counters: {status}");

    let (code, body) = agent.admin_get("/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, metrics) = agent.admin_get("/metrics");
    assert_eq!(code, 200);
    for name in [
        "interceptor_requests_total",
        "interceptor_request_duration_seconds_bucket",
        "interceptor_kernel_connects_total{reason=\"redirected\"}",
        "interceptor_detections_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    let (code, config) = agent.admin_get("/config");
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&config).expect("/config is JSON");
    assert_eq!(config["source"], "file");
    assert_eq!(config["node_name"], interceptor_tests::cluster::NODE_NAME);

    // With the agent gone, status still reads the pins and says so (client and both servers:
    // the whole namespace is labelled).
    drop(agent);
    let out = std::process::Command::new(target_bin("interceptor"))
        .args([
            "status",
            "--admin-addr",
            "127.0.0.1:9",
            "--pin-root",
            &c.pins.path.display().to_string(),
        ])
        .output()
        .expect("status without the agent");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("agent: not reachable") && text.contains("hooked pod cgroups (3)"),
        "{text}"
    );
}

#[test]
fn a_pod_without_a_cgroup_is_reported_once_and_retried_and_others_keep_working() {
    let c = Cluster::new(&[50, 51]);
    let spec = Spec::new(true, &[50, 51]);
    // A pod the kubelet has not created a cgroup for (or laid out in an unknown way).
    let mut docs = c.docs(&spec);
    docs.push(format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ghost, namespace: shop, uid: {}}}\nspec: {{nodeName: {}, containers: [{{name: a, image: b}}]}}\nstatus: {{phase: Running, qosClass: Burstable}}\n",
        interceptor_tests::cluster::pod_uid(99),
        interceptor_tests::cluster::NODE_NAME
    ));
    interceptor_tests::cluster::write_manifests(&c.manifests, &docs);
    let agent = c.start_agent();
    effect(
        Instant::now(),
        "client hooked despite the ghost pod",
        || c.client_hooked(),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let log = agent.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pod not intercepted yet"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line per reason, not one per retry:\n{log}"
    );
    assert!(
        lines[0].contains("shop/ghost") && lines[0].contains("--cgroup-root"),
        "the line names the pod and the fix: {}",
        lines[0]
    );
    let state = agent.admin_get("/state").1;
    assert!(
        state.contains("no cgroup for pod uid"),
        "/state shows why: {state}"
    );

    // The kubelet creates it: the next retry picks it up.
    let ghost_slice = c.node.cgroup_parent.path.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        interceptor_tests::cluster::pod_uid(99).replace('-', "_")
    ));
    let ghost = c.node.add_pod_in(
        "ghost",
        99,
        ghost_slice.join("crio-0123.scope"),
        Some(Cgroup::new(ghost_slice.clone())),
    );
    let at = Instant::now();
    let deadline = at + Duration::from_secs(3);
    while !bpftool_json(&["cgroup", "show", &ghost_slice.display().to_string()])
        .to_string()
        .contains("icp_connect4")
    {
        assert!(
            Instant::now() < deadline,
            "the late pod was never hooked:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    note(&format!("late cgroup (CRI-O scope, Burstable, cgroupfs-free systemd layout) hooked {} ms after it appeared", at.elapsed().as_millis()));
    drop(ghost);
}

#[test]
fn a_restarted_agent_takes_over_without_detaching_what_stays_wanted() {
    let c = Cluster::new(&[60, 61]);
    let spec = Spec::new(true, &[60, 61]);
    c.write(&spec);
    let agent = c.start_agent();
    effect(Instant::now(), "first agent hooks the client", || {
        c.client_hooked()
    });
    agent.kill9();
    assert!(c.client_hooked(), "hooks stay pinned when the agent dies");
    let agent = c.start_agent();
    assert!(c.client_hooked(), "still hooked after the restart");
    let mut t = c.client_run(5);
    let w = t.window(Duration::from_millis(800));
    assert_eq!(w.len(), 2, "the restarted agent balances again: {w:?}");
    assert_eq!(t.last.errors, 0);
    assert!(
        !agent.log_text().contains("detached hooks left"),
        "nothing wanted was detached:\n{}",
        agent.log_text()
    );
}

#[test]
fn start_up_errors_are_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("icp-{}-startup", unique_id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: x}]}\n").expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--source=file".into(),
                "--manifests".into(),
                broken.display().to_string(),
                "--cgroup-root".into(),
                dir.display().to_string(),
            ],
            "document 2 (Service a/s)",
        ),
        (
            vec![
                "run".into(),
                "--source=file".into(),
                "--manifests".into(),
                broken.display().to_string(),
                "--cgroup-root".into(),
                "/nonexistent/cgroup".into(),
            ],
            "set --cgroup-root to the cgroup2 mount",
        ),
        (
            vec!["run".into(), "--source=kube".into()],
            "--source kube needs --node-name",
        ),
        (
            vec!["run".into(), "--pod".into(), "a=/sys/fs/cgroup".into()],
            "add --source static",
        ),
    ];
    for (args, expect) in cases {
        let (status, out) = AgentProcess::run_to_exit(&args, Duration::from_secs(10));
        assert!(!status.success(), "{args:?} must fail");
        let errors: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("ERROR") || l.starts_with("error"))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error line, got:\n{out}");
        assert!(
            errors[0].contains(expect),
            "{args:?}: {:?} should say {expect:?}",
            errors[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_container_restart_keeps_interception_and_stopping_the_agent_fails_open() {
    let mut c = Cluster::new(&[70, 71]);
    let spec = Spec::new(true, &[70, 71]);
    c.write(&spec);
    let agent = c.start_agent();
    effect(Instant::now(), "client hooked", || c.client_hooked());

    // The client's container restarts: hooks sit on the pod's cgroup, so nothing to redo.
    c.client.restart_container(1);
    assert!(
        c.client_hooked(),
        "still hooked after the container restart"
    );
    let mut t = c.client_run(20);
    let w = t.window(Duration::from_millis(800));
    note(&format!("after a container restart: {}", share_line(&w)));
    assert_eq!(
        w.len(),
        2,
        "the restarted container's calls are balanced: {w:?}"
    );

    // SIGTERM: listeners close (new connects fail open), clients get GOAWAY, in-flight calls
    // finish. The client's channel reconnects through kube-proxy without a failed call.
    let stopped_at = Instant::now();
    let status = agent.terminate(Duration::from_secs(30));
    note(&format!(
        "agent stopped (SIGTERM, drain) in {} ms: {status}",
        stopped_at.elapsed().as_millis()
    ));
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
    let after = t.window(Duration::from_millis(1500));
    note(&format!(
        "after the agent stopped: {} ({} failed calls in all, last: {:?})",
        share_line(&after),
        t.last.errors,
        t.last_error
    ));
    let total: u64 = after.values().sum();
    let top = after.values().copied().max().unwrap_or(0);
    assert!(total > 0, "calls go on through kube-proxy");
    assert!(
        top as f64 > 0.95 * total as f64,
        "back on one pod (kube-proxy), apart from calls in flight at the stop: {after:?}"
    );
    // The agent answers every stream it accepted (GOAWAY, then drain). What tonic had queued
    // for the closing connection but not sent yet it fails as CANCELLED on its side (grpc-go
    // and grpc-java retry those transparently; tonic does not): at most one per caller.
    assert!(
        t.last.errors <= 4,
        "at most the 4 callers' queued requests may fail on the client side: {} failed, last {:?}",
        t.last.errors,
        t.last_error
    );
    if let Some(e) = &t.last_error {
        assert!(
            e.starts_with("Cancelled"),
            "only client-side cancellations: {e}"
        );
    }
}

#[test]
fn an_agent_upgrade_hands_the_listeners_over_and_nothing_falls_back_to_kube_proxy() {
    use interceptor_tests::interop::{Load, Stack};
    // The busy channel is grpcio's: C-core retries a call that a GOAWAY kept from being sent,
    // as gRPC clients must; tonic's channel fails such a call (hyper reports it canceled), with
    // any server's graceful GOAWAY, so it cannot show "zero failed calls".
    Stack::Grpcio.require();
    let c = Cluster::new(&[90, 91]);
    // Beside shop/greet, a plain TCP echo Service on pod 90: its connections are relayed
    // opaquely, and the old agent must keep relaying them until they end.
    let echo_vip = std::net::SocketAddr::from(([10, 96, 0, 20], 7000));
    let mut docs = c.docs(&Spec::new(true, &[90, 91]));
    docs.push(
        interceptor_tests::cluster::service("shop", "echo", echo_vip.ip(), 7000, &[])
            .replace("    appProtocol: grpc\n", ""),
    );
    docs.push(interceptor_tests::cluster::endpoint_slice(
        "shop",
        "echo",
        7000,
        &[(std::net::IpAddr::V4(c.servers[0].pod.ip4), true)],
    ));
    interceptor_tests::cluster::write_manifests(&c.manifests, &docs);
    let mut echo_server = c.servers[0].pod.spawn(&["echo-server", "--port", "7000"]);
    echo_server.wait_ready("echo server");
    let handoff = std::env::temp_dir().join(format!("icp-upgrade-{}.sock", unique_id()));
    // A short plain drain: the opaque relay outlives it only through the longer limit a
    // handover gives (--handoff-drain-timeout, 10 min by default).
    let args = c.agent_args(&[
        "--handoff-socket",
        &handoff.display().to_string(),
        "--drain-timeout",
        "1s",
    ]);
    // The counter this test reads does count: with no agent yet, a channel goes through the
    // emulated kube-proxy.
    let mut t = c.client_run(1);
    t.window(Duration::from_millis(300));
    drop(t);
    assert!(
        c.node.kube_proxy_connections() >= 1,
        "the kube-proxy counter saw no connection without an agent"
    );
    let mut old = AgentProcess::start(&args);
    effect(Instant::now(), "client pod hooked", || c.client_hooked());
    let vip = interceptor_tests::cluster::vip();

    // One channel kept busy across the upgrade (grpcio, 4 callers), and a new channel every
    // 5 ms (tonic, one call each).
    let busy_load = Load {
        runs: 1,
        calls: 20_000,
        concurrency: 4,
    };
    let busy = std::thread::scope(|scope| {
        let busy = scope.spawn(|| Stack::Grpcio.calls_in(&c.client, vip, busy_load));
        // ONE opaque TCP connection, a line echoed every 100 ms for 6 s, across the upgrade.
        let hold = c.client.spawn(&[
            "echo-hold",
            "--to",
            &echo_vip.to_string(),
            "--seconds",
            "6",
            "--interval-ms",
            "100",
        ]);
        std::thread::sleep(Duration::from_secs(1));
        let churn = c.client.spawn(&[
            "greet-churn",
            "--to",
            &vip.to_string(),
            "--seconds",
            "5",
            "--interval-ms",
            "5",
        ]);
        let kube_proxy_before = c.node.kube_proxy_connections();
        std::thread::sleep(Duration::from_secs(1));

        let started = Instant::now();
        let new = AgentProcess::start(&args);
        // Handed over and drained, the old agent waits for the SIGTERM the DaemonSet
        // controller sends once the new pod is ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut handed_after = None;
        while !old
            .log_text()
            .contains("handed over and drained: idle until SIGTERM")
        {
            if handed_after.is_none()
                && old
                    .log_text()
                    .contains("the new agent accepts on the pod-local listeners")
            {
                handed_after = Some(started.elapsed());
            }
            assert!(
                old.wait_exit(Duration::from_millis(20)).is_none(),
                "the old agent exited before it handed over:\n{}",
                old.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "the old agent did not hand over and drain:\n{}",
                old.log_text()
            );
        }
        note(&format!(
            "upgrade: the old agent stopped accepting {handed_after:?} after the new one started, and had drained (the opaque relay ended) after {:?}",
            started.elapsed()
        ));
        let old_log = old.log_text();
        let status = old.terminate(Duration::from_secs(10));
        assert!(
            status.success(),
            "old agent on SIGTERM: {status}\n{old_log}"
        );
        assert!(
            old_log.contains("the new agent accepts on the pod-local listeners"),
            "the old agent handed over:\n{old_log}"
        );
        assert!(
            new.log_text()
                .contains("taking over the pod-local listeners of the running agent"),
            "{}",
            new.log_text()
        );

        let out = churn.wait_output(Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (ok, failed) = text
            .lines()
            .find_map(|l| {
                let mut f = l.strip_prefix("CHURN ")?.split(' ');
                Some((
                    f.next()?.parse::<u64>().ok()?,
                    f.next()?.parse::<u64>().ok()?,
                ))
            })
            .unwrap_or_else(|| panic!("churn client printed no result: {text}"));
        note(&format!(
            "new channels across the upgrade: {ok} ok, {failed} failed"
        ));
        assert!(ok > 100, "the churn client made only {ok} calls: {text}");
        assert_eq!(failed, 0, "calls on new channels failed: {text}");
        let out = hold.wait_output(Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        note(&format!(
            "opaque connection across the upgrade: {}",
            text.trim()
        ));
        let (echoed, sent) = text
            .lines()
            .find_map(|l| {
                let mut f = l.strip_prefix("HOLD ")?.split(' ');
                Some((
                    f.next()?.parse::<u64>().ok()?,
                    f.next()?.parse::<u64>().ok()?,
                ))
            })
            .unwrap_or_else(|| panic!("echo client printed no result: {text}"));
        assert!(
            !text.contains("HOLD_ERROR") && echoed == sent && sent >= 30,
            "the opaque relay must outlive the handover: {text}"
        );
        let via_kube_proxy = c.node.kube_proxy_connections() - kube_proxy_before;
        assert_eq!(
            via_kube_proxy, 0,
            "{via_kube_proxy} connects went to kube-proxy during the upgrade"
        );

        // Only the busy channel is left, now on the new agent: within 1 s both endpoints
        // take its calls.
        let first = new.requests_by_endpoint(&[]);
        std::thread::sleep(Duration::from_secs(1));
        let second = new.requests_by_endpoint(&[]);
        let grew: Vec<(String, u64)> = second
            .iter()
            .map(|(ep, n)| (ep.clone(), n - first.get(ep).copied().unwrap_or(0)))
            .collect();
        note(&format!(
            "busy channel on the new agent, one second: {grew:?}"
        ));
        assert_eq!(
            grew.iter().filter(|(_, n)| *n > 0).count(),
            2,
            "the busy channel is balanced by the new agent within 1 s: {grew:?}"
        );
        let result = busy.join().expect("busy client thread");
        drop(new);
        result
    });
    note(&format!("busy channel: {busy:?}"));
    assert_eq!(busy.failed, 0, "calls on the busy channel failed: {busy:?}");
    assert_eq!(busy.ok, busy_load.total());
    let _ = std::fs::remove_file(&handoff);
}

#[test]
fn app_protocol_skips_detection_for_h2c_and_server_first_ports() {
    let c = Cluster::new(&[95, 96]);
    let server_first = std::net::SocketAddr::from(([10, 96, 0, 30], 3307));
    let undeclared = std::net::SocketAddr::from(([10, 96, 0, 31], 3308));
    let mut docs = c.docs(&Spec::new(true, &[95, 96]));
    let ip = std::net::IpAddr::V4(c.servers[0].pod.ip4);
    for (name, vip, app) in [
        ("db", server_first, Some("mysql")),
        ("plain", undeclared, None),
    ] {
        let svc = interceptor_tests::cluster::service("shop", name, vip.ip(), vip.port(), &[]);
        docs.push(match app {
            Some(a) => svc.replace("appProtocol: grpc", &format!("appProtocol: {a}")),
            None => svc.replace("    appProtocol: grpc\n", ""),
        });
        docs.push(interceptor_tests::cluster::endpoint_slice(
            "shop",
            name,
            vip.port(),
            &[(ip, true)],
        ));
    }
    interceptor_tests::cluster::write_manifests(&c.manifests, &docs);
    // Server-first on both ports: it writes its name as soon as a connection arrives.
    let _server = c.servers[0].pod.serve("3307,3308");
    let agent = c.start_agent();
    effect(Instant::now(), "client pod hooked", || c.client_hooked());

    // The fastest of 3 connects that read the server's greeting (process start included).
    let greeting_after = |vip: std::net::SocketAddr| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let lines = c.client.run(
                    &["connect", "--to", &vip.to_string(), "--count", "1"],
                    Duration::from_secs(10),
                );
                let took = t.elapsed();
                assert!(
                    lines
                        .iter()
                        .any(|l| l.starts_with("OK ") && l.ends_with("greet-95")),
                    "{vip}: {lines:?}"
                );
                took
            })
            .min()
            .expect("3 runs")
    };
    let declared = greeting_after(server_first);
    let detected = greeting_after(undeclared);
    note(&format!(
        "server-first greeting through the hook: appProtocol mysql {declared:?}, no appProtocol {detected:?} (the 300 ms detection wait)"
    ));
    assert!(
        declared < Duration::from_millis(150),
        "appProtocol mysql waited {declared:?}"
    );
    assert!(
        detected >= Duration::from_millis(300),
        "no appProtocol: {detected:?}"
    );

    // shop/greet says appProtocol: grpc: its connections go to the HTTP/2 server undetected.
    let mut t = c.client_run(1);
    t.window(Duration::from_millis(300));
    drop(t);
    let (_, metrics) = agent.admin_get("/metrics");
    for label in ["declared_h2", "declared_opaque", "server_first"] {
        assert!(
            metrics.contains(&format!(
                "interceptor_detections_total{{protocol=\"{label}\"}}"
            )),
            "no {label} connection counted:\n{metrics}"
        );
    }
}

#[test]
fn internal_traffic_policy_local_keeps_one_channel_on_this_nodes_endpoints() {
    let c = Cluster::new(&[100, 101, 102]);
    let spec = Spec::new(true, &[100, 101, 102]);
    // Servers 101 and 102 are reported on another node, as a multi-node cluster would.
    let docs = |local: bool| -> Vec<String> {
        let mut docs = c.docs(&spec);
        for d in docs.iter_mut() {
            if d.contains("kind: EndpointSlice") {
                for n in [101, 102] {
                    let ip = c.servers.iter().find(|s| s.n == n).expect("server").pod.ip4;
                    *d = d.replace(
                        &format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {}\n", interceptor_tests::cluster::NODE_NAME),
                        &format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-b\n"),
                    );
                }
                assert_eq!(d.matches("nodeName: node-b").count(), 2, "{d}");
            }
            if local && d.contains("kind: Service\n") && d.contains("name: greet\n") {
                *d = d.replace("spec:\n", "spec:\n  internalTrafficPolicy: Local\n");
            }
        }
        docs
    };
    interceptor_tests::cluster::write_manifests(&c.manifests, &docs(true));
    let agent = c.start_agent();
    effect(Instant::now(), "client pod hooked", || c.client_hooked());

    let mut t = c.client_run(8);
    let local = t.window(Duration::from_millis(800));
    note(&format!(
        "internalTrafficPolicy Local: {}",
        share_line(&local)
    ));
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        ["greet-100"],
        "only this node's endpoint takes calls: {local:?}"
    );
    let status = operator(&agent, &c, &["status"]);
    assert!(
        status.contains("internalTrafficPolicy Local: 1 of 3 endpoints are on this node"),
        "status shows the policy in force:\n{status}"
    );

    // Removing the field restores balancing over all three, on the same channel.
    let at = Instant::now();
    interceptor_tests::cluster::write_manifests(&c.manifests, &docs(false));
    t.until(
        Duration::from_secs(3),
        "all three endpoints take calls",
        |tally| tally.by_pod.len() == 3,
    );
    note(&format!(
        "internalTrafficPolicy removed: all three take calls after {:?}",
        at.elapsed()
    ));
    let all = t.window(Duration::from_millis(1000));
    note(&format!("without the field: {}", share_line(&all)));
    interceptor_tests::cluster::assert_spread(&all, 3, 0.2);
    assert_eq!(t.last.errors, 0, "no failed calls");
}

#[test]
fn session_affinity_client_ip_keeps_a_pods_calls_on_one_endpoint() {
    let c = Cluster::new(&[105, 106, 107]);
    let with_affinity = |spec: &Spec| -> Vec<String> {
        let mut docs = c.docs(spec);
        for d in docs.iter_mut() {
            if d.contains("kind: Service\n") && d.contains("name: greet\n") {
                *d = d.replace(
                    "spec:\n",
                    "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n",
                );
            }
        }
        docs
    };
    let mut spec = Spec::new(true, &[105, 106, 107]);
    interceptor_tests::cluster::write_manifests(&c.manifests, &with_affinity(&spec));
    let agent = c.start_agent();
    effect(Instant::now(), "client pod hooked", || c.client_hooked());

    let mut t = c.client_run(10);
    let sticky = t.window(Duration::from_millis(800));
    note(&format!(
        "sessionAffinity ClientIP: {}",
        share_line(&sticky)
    ));
    assert_eq!(
        sticky.len(),
        1,
        "every call of the pod on one endpoint: {sticky:?}"
    );
    let status = operator(&agent, &c, &["status"]);
    assert!(
        status.contains("sessionAffinity ClientIP (600 s)"),
        "{status}"
    );

    // Its endpoint leaves: the calls move to one other endpoint, none fails.
    let pod: u8 = sticky
        .keys()
        .next()
        .and_then(|p| p.strip_prefix("greet-"))
        .and_then(|n| n.parse().ok())
        .expect("a greet pod");
    spec.endpoints.retain(|n| *n != pod);
    let at = Instant::now();
    interceptor_tests::cluster::write_manifests(&c.manifests, &with_affinity(&spec));
    t.until(
        Duration::from_secs(3),
        "calls move off the removed endpoint",
        |tally| tally.by_pod.len() > 1,
    );
    note(&format!(
        "calls moved {:?} after the endpoint was removed",
        at.elapsed()
    ));
    // Streams already queued there finish first.
    std::thread::sleep(Duration::from_millis(200));
    let moved = t.window(Duration::from_millis(800));
    note(&format!("after its endpoint left: {}", share_line(&moved)));
    assert_eq!(moved.len(), 1, "still one endpoint: {moved:?}");
    assert!(!moved.contains_key(&format!("greet-{pod}")), "{moved:?}");

    // Without the field: balanced again on the same channel.
    let at = Instant::now();
    interceptor_tests::cluster::write_manifests(&c.manifests, &c.docs(&spec));
    t.until(
        Duration::from_secs(3),
        "both remaining endpoints take calls",
        |tally| tally.by_pod.len() > 2,
    );
    note(&format!(
        "balanced again {:?} after the field was removed",
        at.elapsed()
    ));
    let balanced = t.window(Duration::from_millis(800));
    note(&format!(
        "sessionAffinity removed: {}",
        share_line(&balanced)
    ));
    assert_eq!(balanced.len(), 2, "{balanced:?}");
    assert_eq!(t.last.errors, 0, "no failed calls: {:?}", t.last_error);
}

#[test]
fn slow_start_annotation_ramps_a_new_pods_share_on_one_channel() {
    let mut c = Cluster::new(&[110, 111]);
    let mut spec = Spec::new(true, &[110, 111]);
    spec.service_annotations = vec![("interceptor.io/slow-start", "3s")];
    c.write(&spec);
    let agent = c.start_agent();
    effect(Instant::now(), "client pod hooked", || c.client_hooked());
    let mut t = c.client_run(12);
    let warm = t.window(Duration::from_millis(500));
    assert_eq!(warm.len(), 2, "{warm:?}");

    // Scale up: the new pod's share ramps up over 3 s instead of a full third at once.
    c.add_server(112);
    c.program_kube_proxy();
    spec.endpoints.push(112);
    c.write(&spec);
    t.until(Duration::from_secs(3), "greet-112 gets a call", |l| {
        l.by_pod.get("greet-112").copied().unwrap_or(0) > 0
    });
    let share = |w: &std::collections::BTreeMap<String, u64>| {
        w.get("greet-112").copied().unwrap_or(0) as f64 / w.values().sum::<u64>().max(1) as f64
    };
    let early = t.window(Duration::from_millis(600));
    std::thread::sleep(Duration::from_millis(3000));
    let late = t.window(Duration::from_millis(1000));
    note(&format!(
        "slow start 3s: new pod {:.1}% in its first 0.6 s, {:.1}% after the window ({})",
        share(&early) * 100.0,
        share(&late) * 100.0,
        share_line(&late)
    ));
    assert!(share(&early) < 0.15, "early share {:.3}", share(&early));
    // After the window it is a peer like the others (p2c over 4 callers on one channel
    // spreads 27-36% in a second here).
    assert!(
        share(&late) > 0.22 && share(&late) > 2.5 * share(&early),
        "late share {:.3}",
        share(&late)
    );
    assert_eq!(t.last.errors, 0);
    let status = operator(&agent, &c, &["status"]);
    assert!(status.contains("slow start 3000 ms"), "{status}");
}

#[test]
fn topology_keeps_one_channel_in_this_zone_or_node_and_falls_back_like_kube_proxy() {
    use interceptor_tests::cluster::Placement;
    let c = Cluster::new(&[120, 121, 122]);
    let ip = |n: u8| c.servers.iter().find(|s| s.n == n).expect("server").pod.ip4;
    // This node is in zone-a; 121 runs on another node of zone-a, 122 in zone-b.
    let mut spec = Spec::new(true, &[120, 121, 122]);
    spec.node_zone = Some("zone-a");
    spec.placement.insert(
        120,
        Placement::at(interceptor_tests::cluster::NODE_NAME, "zone-a"),
    );
    spec.placement
        .insert(121, Placement::at("node-b", "zone-a"));
    spec.placement
        .insert(122, Placement::at("node-c", "zone-b"));
    spec.service_fields = vec!["trafficDistribution: PreferClose".into()];
    c.write(&spec);
    let agent = c.start_agent();
    effect(Instant::now(), "client pod hooked", || c.client_hooked());

    let mut t = c.client_run(25);
    let zone = t.window(Duration::from_millis(800));
    note(&format!(
        "trafficDistribution PreferClose: {}",
        share_line(&zone)
    ));
    assert_eq!(
        zone.keys().collect::<Vec<_>>(),
        ["greet-120", "greet-121"],
        "only zone-a's endpoints take calls: {zone:?}"
    );
    let status = operator(&agent, &c, &["status"]);
    assert!(
        status.contains(
            "topology same zone zone-a: 2 of 3 endpoints (trafficDistribution PreferClose)"
        ),
        "status shows topology in force:\n{status}"
    );
    let skip = format!(
        "endpoint {}:{} not used: hinted for zone zone-b, this node is in zone-a",
        ip(122),
        interceptor_tests::cluster::PORT
    );
    assert!(
        status.contains(&skip),
        "status says why 122 is skipped:\n{status}"
    );
    let vip = interceptor_tests::cluster::vip().to_string();
    let why = operator(&agent, &c, &["explain", "shop/client", &vip]);
    assert!(
        why.contains(&format!("[--]  {skip}")),
        "explain says why:\n{why}"
    );

    // PreferSameNode: this node's endpoint only.
    spec.service_fields = vec!["trafficDistribution: PreferSameNode".into()];
    let at = c.write(&spec);
    let took = t.settle(at, "only greet-120 under PreferSameNode", |w| {
        w.keys().all(|p| p == "greet-120")
    });
    note(&format!(
        "PreferSameNode: only this node's endpoint within {took:?}"
    ));
    let node = t.window(Duration::from_millis(800));
    note(&format!(
        "trafficDistribution PreferSameNode: {}",
        share_line(&node)
    ));
    assert_eq!(node.keys().collect::<Vec<_>>(), ["greet-120"], "{node:?}");

    // Hints (as a cluster's controller might have left them) for a zone with no endpoint for
    // this node's zone: kube-proxy ignores them and uses every endpoint.
    spec.service_fields.clear();
    for n in [120, 121, 122] {
        spec.placement.get_mut(&n).expect("placed").hints = Some("{forZones: [{name: zone-c}]}");
    }
    c.write(&spec);
    t.until(Duration::from_secs(3), "all three take calls", |tally| {
        tally.by_pod.len() == 3
    });
    let fallback = t.window(Duration::from_millis(800));
    note(&format!(
        "hints for another zone only: {}",
        share_line(&fallback)
    ));
    assert_eq!(fallback.len(), 3, "{fallback:?}");
    let status = operator(&agent, &c, &["status"]);
    assert!(
        status.contains("no endpoint is hinted for this node's zone zone-a"),
        "status says why topology is off:\n{status}"
    );

    // An unknown value and a malformed hint (no zone name): one warning naming each object,
    // every endpoint used.
    for n in [120, 121, 122] {
        spec.placement.get_mut(&n).expect("placed").hints = None;
    }
    spec.placement.get_mut(&121).expect("placed").hints = Some("{forZones: [{name: \"\"}]}");
    spec.service_fields = vec!["trafficDistribution: PreferFar".into()];
    c.write(&spec);
    std::thread::sleep(Duration::from_millis(600));
    let unknown = t.window(Duration::from_millis(800));
    note(&format!(
        "trafficDistribution PreferFar (unknown): {}",
        share_line(&unknown)
    ));
    assert_eq!(unknown.len(), 3, "{unknown:?}");
    let log = agent.log_text();
    let warned =
        agent.log_lines_containing("Service shop/greet: unknown trafficDistribution \"PreferFar\"");
    assert_eq!(warned, 1, "one clear line naming the Service:\n{log}");
    let malformed = agent.log_lines_containing(
        "EndpointSlice shop/greet-abcde: an endpoint has a forZones hint with no name",
    );
    assert_eq!(
        malformed, 1,
        "one clear line naming the EndpointSlice:\n{log}"
    );
    spec.placement.get_mut(&121).expect("placed").hints = None;

    // Removed: balanced over all three on the same channel.
    spec.service_fields.clear();
    c.write(&spec);
    std::thread::sleep(Duration::from_millis(600));
    let all = t.window(Duration::from_millis(1000));
    note(&format!(
        "trafficDistribution removed: {}",
        share_line(&all)
    ));
    interceptor_tests::cluster::assert_spread(&all, 3, 0.2);
    assert_eq!(t.last.errors, 0, "no failed calls: {:?}", t.last_error);
}
