//! HTTP/1.1 through the hook, balanced per request: real pods, the real eBPF object, the agent
//! on the file source, hyper HTTP/1.1 backends in the server pods (next to their greet gRPC
//! servers) behind the Service `shop/web`, and real clients in the client pod: Python's
//! requests with a keep-alive pool, curl, h2load in HTTP/1.1 mode, a tungstenite WebSocket
//! client, and a raw socket for malformed requests.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use interceptor_tests::cluster::{
    self, effect, endpoint_slice, share_line, write_manifests, GreetCluster as Cluster, Spec,
    Tallies,
};
use interceptor_tests::{http1, note, AgentProcess, ChildGuard};

const WEB_PORT: u16 = 8080;

fn web_vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 11], WEB_PORT))
}

fn web_url(path: &str) -> String {
    format!("http://{}{path}", web_vip())
}

/// The greet cluster plus an HTTP/1.1 backend in every server pod.
struct Web {
    c: Cluster,
    spec: Spec,
    /// Server pods listed as endpoints of shop/web.
    web_endpoints: Vec<u8>,
    web_annotations: Vec<(&'static str, &'static str)>,
    backends: Vec<ChildGuard>,
}

impl Web {
    fn new(servers: &[u8]) -> Self {
        let c = Cluster::new(servers);
        let backends = c
            .servers
            .iter()
            .map(|s| http1::serve_in(&s.pod, WEB_PORT))
            .collect();
        let w = Web {
            spec: Spec::new(true, servers),
            web_endpoints: servers.to_vec(),
            web_annotations: Vec::new(),
            c,
            backends,
        };
        w.write();
        w
    }

    fn add_server(&mut self, n: u8) {
        self.c.add_server(n);
        let pod = &self.c.servers.last().expect("the new server").pod;
        self.backends.push(http1::serve_in(pod, WEB_PORT));
    }

    /// shop/greet as the spec says, and shop/web: one port named http, no appProtocol (so
    /// connections are detected), the listed pods as endpoints.
    fn write(&self) -> Instant {
        let mut docs = self.c.docs(&self.spec);
        docs.push(
            cluster::service(
                cluster::NS,
                "web",
                web_vip().ip(),
                WEB_PORT,
                &self.web_annotations,
            )
            .replace("  - name: grpc\n", "  - name: http\n")
            .replace("    appProtocol: grpc\n", ""),
        );
        let ips: Vec<(IpAddr, bool)> = self
            .web_endpoints
            .iter()
            .filter_map(|n| self.c.servers.iter().find(|s| s.n == *n))
            .map(|s| (IpAddr::V4(s.pod.ip4), true))
            .collect();
        docs.push(
            endpoint_slice(cluster::NS, "web", WEB_PORT, &ips)
                .replace("- name: grpc\n  port:", "- name: http\n  port:"),
        );
        write_manifests(&self.c.manifests, &docs);
        Instant::now()
    }

    fn start_agent(&self) -> AgentProcess {
        let agent = self.c.start_agent();
        effect(Instant::now(), "client pod hooked", || {
            self.c.client_hooked()
        });
        agent
    }
}

/// `interceptor_requests_total` per endpoint for one Service and protocol.
fn requests_by_endpoint(
    agent: &AgentProcess,
    service: &str,
    protocol: &str,
) -> BTreeMap<String, u64> {
    agent.requests_by_endpoint(&[
        &format!("service=\"{service}\""),
        &format!("protocol=\"{protocol}\""),
    ])
}

fn since(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

#[test]
fn one_keep_alive_pool_is_balanced_per_request_next_to_a_grpc_channel() {
    let mut w = Web::new(&[30, 31, 32]);
    let agent = w.start_agent();

    // 3000 requests on ONE keep-alive connection of a requests.Session.
    let run = http1::python_client_count(&w.c.client, &web_url("/"), 3000);
    let shares = &run.last.by_pod;
    note(&format!(
        "python requests, one keep-alive connection, 3000 GETs: {} ({} connection(s), {} errors)",
        share_line(shares),
        run.connections,
        run.last.errors
    ));
    assert_eq!(run.last.errors, 0, "{:?}", run.last_error);
    assert_eq!(run.connections, 1, "the pool kept one connection");
    assert_eq!(shares.len(), 3, "{shares:?}");
    for (pod, n) in shares {
        let pct = *n as f64 / 30.0;
        assert!(
            (30.0..=36.4).contains(&pct),
            "{pod}: {pct:.1}% ({shares:?})"
        );
    }

    // Scale-up on the same connection: a 4th pod joins shop/web.
    let mut t = http1::python_client_run(&w.c.client, &web_url("/"), 8);
    let warm = t.window(Duration::from_millis(500));
    assert_eq!(warm.len(), 3, "{warm:?}");
    w.add_server(33);
    w.web_endpoints.push(33);
    let at = w.write();
    let first = t.until(Duration::from_secs(5), "greet-33 answers", |l| {
        l.by_pod.get("greet-33").copied().unwrap_or(0) > 0
    });
    let fair_at = cluster::fair_share_reached(&mut t, "greet-33", 4, 0.6, at);
    note(&format!(
        "scale up: new pod's first request {} ms, a fair share {} ms after the manifest changed",
        first.duration_since(at).as_millis(),
        fair_at.duration_since(at).as_millis()
    ));
    assert!(first.duration_since(at) <= cluster::EFFECT_LIMIT);
    assert!(fair_at.duration_since(at) <= cluster::EFFECT_LIMIT);
    let four = t.window(Duration::from_millis(800));
    assert_eq!(four.len(), 4, "{four:?}");
    assert_eq!(t.last.errors, 0, "{:?}", t.last_error);
    drop(t);

    // gRPC (tonic, one channel) to shop/greet and the HTTP/1.1 pool to shop/web at once.
    w.spec.endpoints.push(33);
    w.write();
    let mut grpc = w.c.client_run(6);
    let mut rest = http1::python_client_run(&w.c.client, &web_url("/"), 6);
    grpc.window(Duration::from_millis(500));
    let both_started = Instant::now();
    let g = grpc.window(Duration::from_millis(1500));
    let h = rest.window(Duration::from_millis(10));
    let h_total: BTreeMap<String, u64> = rest.last.by_pod.clone();
    note(&format!(
        "at once, from one pod: gRPC {} | HTTP/1.1 {} (after {:?})",
        share_line(&g),
        share_line(&h_total),
        both_started.elapsed()
    ));
    cluster::assert_spread(&g, 4, 0.15);
    let _ = h;
    cluster::assert_spread(&h_total, 4, 0.15);
    assert_eq!(grpc.last.errors, 0);
    assert_eq!(rest.last.errors, 0, "{:?}", rest.last_error);
    drop((grpc, rest));

    // h2load in HTTP/1.1 mode: 4 keep-alive connections, 4000 requests. The killed python
    // client's last request is counted when the agent notices it, so wait for that first.
    agent.wait_requests_settled(&["service=\"web\""], Duration::from_secs(10));
    let before = requests_by_endpoint(&agent, "web", "http1");
    let out = w.c.client.spawn_program(
        std::path::Path::new("h2load"),
        &["--h1", "-n", "4000", "-c", "4", "-T", "5", &web_url("/")],
    );
    let out = out.wait_output(Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary from h2load: {text}"));
    note(&format!("h2load --h1 -n 4000 -c 4: {summary}"));
    assert!(
        summary.contains("4000 succeeded, 0 failed, 0 errored"),
        "{summary}"
    );
    let by = since(&requests_by_endpoint(&agent, "web", "http1"), &before);
    note(&format!(
        "h2load's requests per endpoint (agent metrics, protocol=http1): {by:?}"
    ));
    assert_eq!(by.len(), 4, "{by:?}");
    assert_eq!(by.values().sum::<u64>(), 4000, "{by:?}");
    for n in by.values() {
        assert!(*n >= 600, "{by:?}");
    }
    assert!(
        !requests_by_endpoint(&agent, "greet", "h2").is_empty(),
        "the gRPC requests are counted with protocol=h2"
    );

    // Opt-out: interceptor.io/http1: opaque relays each connection to one endpoint.
    w.web_annotations = vec![("interceptor.io/http1", "opaque")];
    let at = w.write();
    effect(at, "opt-out shows in status", || {
        let (_, state) = agent.admin_get("/state");
        state.contains("interceptor.io/http1: opaque")
    });
    let run = http1::python_client_count(&w.c.client, &web_url("/"), 300);
    note(&format!(
        "opted out (interceptor.io/http1: opaque): {}",
        share_line(&run.last.by_pod)
    ));
    assert_eq!(run.last.by_pod.len(), 1, "one endpoint per connection");
    assert_eq!(run.last.errors, 0);
    let (_, metrics) = agent.admin_get("/metrics");
    assert!(
        metrics.contains("interceptor_detections_total{protocol=\"http1_opaque\"}"),
        "{metrics}"
    );
}

/// sha256 of a file, with the system's sha256sum.
fn sha256(path: &std::path::Path) -> String {
    let out = interceptor_tests::run("sha256sum", &[path.to_str().expect("utf-8")]);
    out.split_whitespace().next().expect("digest").to_string()
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field in /proc status")
}

#[test]
fn bodies_up_to_100_mib_are_byte_exact_and_websockets_work_through_the_hook() {
    let w = Web::new(&[40, 41]);
    let agent = w.start_agent();
    let dir = std::env::temp_dir().join(format!("icp-http1-{}", interceptor_tests::unique_id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let hwm_before = vm_kib(agent.pid(), "VmHWM:");
    for size in [0usize, 1, 65_537, 1 << 20, 100 << 20] {
        let input = dir.join(format!("in-{size}"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&input).expect("create input");
            let mut x: u32 = 0x9e37_79b9 ^ size as u32;
            let mut block = vec![0u8; 1 << 16];
            let mut left = size;
            while left > 0 {
                for b in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *b = x as u8;
                }
                let n = left.min(block.len());
                f.write_all(&block[..n]).expect("write input");
                left -= n;
            }
        }
        let want = sha256(&input);
        for chunked in [false, true] {
            let output = dir.join(format!("out-{size}-{chunked}"));
            let mut args = vec![
                "-sS".to_string(),
                "--fail".into(),
                "-H".into(),
                "content-type: application/octet-stream".into(),
                "--data-binary".into(),
                format!("@{}", input.display()),
                "-o".into(),
                output.display().to_string(),
                "-w".into(),
                "%{http_code} %{size_upload} %{size_download}".into(),
            ];
            if chunked {
                args.extend(["-H".into(), "transfer-encoding: chunked".into()]);
            }
            args.push(web_url("/echo"));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            let out =
                w.c.client
                    .spawn_program(std::path::Path::new("curl"), &args)
                    .wait_output(Duration::from_secs(120));
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "curl {size} B chunked={chunked}: {line} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got = if size == 0 && !output.exists() {
                // curl writes no file for an empty body.
                want.clone()
            } else {
                sha256(&output)
            };
            note(&format!(
                "curl {size} B {}: {line} in {:?}",
                if chunked { "chunked" } else { "fixed length" },
                started.elapsed()
            ));
            assert!(line.starts_with("200 "), "{line}");
            assert_eq!(got, want, "{size} B chunked={chunked} came back changed");
            let _ = std::fs::remove_file(&output);
        }
        let _ = std::fs::remove_file(&input);
    }
    let hwm_after = vm_kib(agent.pid(), "VmHWM:");
    note(&format!(
        "agent peak RSS {} MiB before the transfers, {} MiB after 2 x 100 MiB each way",
        hwm_before / 1024,
        hwm_after / 1024
    ));
    assert!(
        hwm_after.saturating_sub(hwm_before) < 48 * 1024,
        "a 100 MiB body must stream, not be held: peak grew {} KiB",
        hwm_after - hwm_before
    );

    // WebSocket echo through the hook: the upgrade goes to one endpoint, then opaque.
    let lines = w.c.client.run(
        &[
            "ws-echo",
            "--to",
            &web_vip().to_string(),
            "--messages",
            "30",
        ],
        Duration::from_secs(30),
    );
    note(&format!("websocket: {lines:?}"));
    let ws = lines
        .iter()
        .find(|l| l.starts_with("WS "))
        .expect("ws-echo result");
    assert!(ws.ends_with(" 31"), "{ws}");
    assert!(ws.contains("greet-4"), "answered by a web pod: {ws}");
}

#[test]
fn malformed_http1_gets_400_and_a_closed_connection_and_others_go_on() {
    let w = Web::new(&[50, 51]);
    let agent = w.start_agent();
    let mut t: Tallies = http1::python_client_run(&w.c.client, &web_url("/"), 10);
    t.window(Duration::from_millis(300));
    let dir = std::env::temp_dir().join(format!("icp-raw-{}", interceptor_tests::unique_id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut oversized = b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: ".to_vec();
    oversized.extend(std::iter::repeat_n(b'a', 100 * 1024));
    oversized.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad request line", b"GET / HTTP/1.1 trailing\r\nHost: web\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            "smuggling CL.TE",
            b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: web\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "smuggling TE.CL",
            b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "obfuscated transfer-encoding",
            b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        ("oversized headers", oversized, "HTTP/1.1 431"),
    ];
    for (what, bytes, want) in cases {
        let file = dir.join("request");
        std::fs::write(&file, &bytes).expect("write request");
        let lines = w.c.client.run(
            &[
                "raw-http",
                "--to",
                &web_vip().to_string(),
                "--request-file",
                file.to_str().expect("utf-8"),
            ],
            Duration::from_secs(15),
        );
        let response = lines.get(1).cloned().unwrap_or_default();
        note(&format!("{what}: {:?}", response.split("\\r\\n").next()));
        assert_eq!(
            lines.first().map(String::as_str),
            Some("CLOSED true"),
            "{what}: {lines:?}"
        );
        assert!(response.starts_with(want), "{what}: {response}");
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one answer only: {response}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let after = t.window(Duration::from_millis(500));
    note(&format!(
        "the keep-alive client meanwhile: {}",
        share_line(&t.last.by_pod)
    ));
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(t.last.errors, 0, "others unaffected: {:?}", t.last_error);
    let (_, metrics) = agent.admin_get("/metrics");
    for reason in ["ambiguous_framing", "malformed_http1"] {
        assert!(
            metrics.contains(&format!(
                "interceptor_abusive_connections_total{{reason=\"{reason}\"}}"
            )),
            "{reason} counted:\n{metrics}"
        );
    }
}
