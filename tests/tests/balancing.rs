//! Transparent per-request balancing end to end: an unmodified HTTP/2 client in a pod keeps
//! ONE connection to a Service ClusterIP; the connect hook hands it to the agent, whose
//! demultiplexer spreads the streams over the Service's endpoints.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use interceptor_tests::*;

const REQUESTS: u32 = 3000;

/// Starts a counting HTTP/2 backend in the pod and waits until it listens.
fn h2_backend(pod: &Pod) -> ChildGuard {
    let mut server = pod.spawn(&["h2serve", "--port", "8080"]);
    let mut reader = server.wait_ready(&format!("backend in {}", pod.name));
    // Hand the rest of stdout back to the guard, which reads it on exit.
    if let Some(child) = server.0.as_mut() {
        child.stdout = None;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        let _ = tx.send(rest);
    });
    COUNTS.with(|c| c.borrow_mut().push(rx));
    server
}

thread_local! {
    static COUNTS: std::cell::RefCell<Vec<std::sync::mpsc::Receiver<String>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// SIGTERM makes each backend print how many requests it served; returns the counts in order.
fn served(servers: Vec<ChildGuard>) -> Vec<u64> {
    let receivers: Vec<_> = COUNTS.with(|c| c.borrow_mut().drain(..).collect());
    servers
        .into_iter()
        .zip(receivers)
        .map(|(server, rx)| {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
            let _ = server.wait_output(Duration::from_secs(10));
            let text = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("backend output");
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("served ")
                        .and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or_else(|| panic!("backend printed no count: {text}"))
        })
        .collect()
}

fn h2load(client: &Pod, svc: SocketAddr) {
    let url = format!("http://{svc}/greet.Greeter/SayHello");
    let args = [
        "-c1",
        "-m10",
        "-n",
        &REQUESTS.to_string(),
        "-H",
        "content-type: application/grpc",
        &url,
    ];
    let out = client
        .spawn_program(Path::new("/usr/bin/h2load"), &args)
        .wait_output(Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "h2load failed: {text}");
    assert!(
        text.contains(&format!("{REQUESTS} succeeded, 0 failed")),
        "h2load saw failures: {text}"
    );
}

#[test]
fn one_client_connection_is_balanced_per_request_through_the_hook() {
    let svc: SocketAddr = "10.96.0.10:8080".parse().expect("addr");
    let node = Node::new();
    let client = node.add_pod("client", 1);
    let backends: Vec<Pod> = (1..=3)
        .map(|n| node.add_pod(&format!("b{n}"), 10 + n))
        .collect();
    node.kube_proxy(&[(svc, backends.iter().map(|b| IpAddr::V4(b.ip4)).collect())]);
    let pins = PinRoot::new();

    // Before: kube-proxy balances the one connection once, so one backend gets every request.
    let servers: Vec<ChildGuard> = backends.iter().map(h2_backend).collect();
    h2load(&client, svc);
    let before = served(servers);
    note(&format!("kube-proxy only: {before:?}"));
    assert_eq!(before.iter().sum::<u64>(), u64::from(REQUESTS));
    assert_eq!(
        before.iter().filter(|n| **n > 0).count(),
        1,
        "one connection sticks to one backend: {before:?}"
    );

    // After: the same unmodified client and its single connection, through interceptor.
    let servers: Vec<ChildGuard> = backends.iter().map(h2_backend).collect();
    let endpoints: Vec<String> = backends.iter().map(|b| b.addr4(8080).to_string()).collect();
    let args = vec![
        "run".to_string(),
        "--source=static".to_string(),
        "--pin-root".into(),
        pins.path.display().to_string(),
        "--pod".into(),
        format!("default/client={}", client.cgroup.path.display()),
        "--service".into(),
        svc.to_string(),
        "--endpoints".into(),
        format!("{svc}={}", endpoints.join(",")),
    ];
    let agent = AgentProcess::start(&args);
    h2load(&client, svc);
    // curl with HTTP/2 prior knowledge, each call its own connection, through the hook too.
    for _ in 0..5 {
        let args = interceptor_tests::cluster::curl_h2_args(&format!(
            "http://{svc}/greet.Greeter/SayHello"
        ));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = client
            .spawn_program(Path::new("/usr/bin/curl"), &args)
            .wait_output(Duration::from_secs(10));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.trim() == "200 2",
            "curl --http2-prior-knowledge through the hook: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = served(servers);
    note(&format!("through interceptor: {after:?}"));
    assert_eq!(
        after.iter().sum::<u64>(),
        u64::from(REQUESTS) + 5,
        "every request (h2load's and curl's) served exactly once"
    );
    assert!(
        after.iter().all(|n| *n > 0),
        "every endpoint takes requests: {after:?}"
    );
    let max_share = *after.iter().max().expect("3 backends") as f64 / f64::from(REQUESTS + 5);
    assert!(
        max_share < 0.6,
        "requests spread over the endpoints (max share {max_share:.2}): {after:?}"
    );
    let stats = pinned_stats(&pins.path);
    assert!(
        stats["redirected"] >= 1,
        "the connection went through the hook: {stats:?}"
    );
    drop(agent);
}
