//! The golden metrics as a cluster would see them: a real Prometheus (the Debian package, run
//! by this test on loopback) scrapes the agent's metrics-only listener while h2load in a pod
//! calls a Service through the hook, and the queries of the Grafana dashboard in
//! deploy/monitoring/ must answer per-Service rate, error ratio, p99 and in-flight that match
//! what the test sent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interceptor_tests::cluster::{effect, GreetCluster as Cluster, Spec};
use interceptor_tests::*;

/// Calls sent: every fourth goes to a method the greet servers do not have (UNIMPLEMENTED).
const CALLS: u64 = 800;
const FAILING_EVERY: u64 = 4;
/// h2load's request rate, so the run spans several scrapes.
const RPS: u64 = 100;
/// h2load's concurrent streams: the most that can be in flight.
const STREAMS: u64 = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    addr: SocketAddr,
    _process: ChildGuard,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: interceptor\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package `prometheus`: run `cargo xtask setup`)");
        let p = Prometheus {
            addr,
            _process: ChildGuard(Some(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while interceptor::admin::get(addr, "/-/ready").map(|r| r.0).ok() != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// An instant query; the result vector as (labels, value).
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let (code, body) = interceptor::admin::get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(q)),
        )
        .expect("query prometheus");
        assert_eq!(code, 200, "query {q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("prometheus answers JSON");
        assert_eq!(v["status"], "success", "query {q}: {body}");
        v["data"]["result"]
            .as_array()
            .expect("a vector result")
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .expect("a sample value");
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// The one value of `q` for shop/greet.
    fn greet_value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .into_iter()
            .find(|(m, _)| m["service"] == "greet" && m["namespace"] == "shop")
            .map(|(_, v)| v)
    }
}

/// The dashboard's queries by panel id, with its variables set to shop/greet.
fn dashboard_queries() -> Vec<(u64, String, String)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the Grafana dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("panel id");
        let title = panel["title"].as_str().unwrap_or("").to_string();
        for t in panel["targets"].as_array().expect("targets") {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$namespace", "shop")
                .replace("$service", "greet")
                .replace("$__rate_interval", "1m");
            out.push((id, title.clone(), expr));
        }
    }
    out
}

#[test]
fn prometheus_scrapes_the_agent_and_the_dashboard_answers_per_service() {
    let c = Cluster::new(&[70, 71]);
    c.write(&Spec::new(true, &[70, 71]));
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = AgentProcess::start(&c.agent_args(&["--metrics-addr", &metrics_addr.to_string()]));
    effect(Instant::now(), "client pod hooked", || c.client_hooked());

    // The metrics-only listener serves /metrics and nothing else.
    let (code, _) = interceptor::admin::get(metrics_addr, "/metrics").expect("metrics listener");
    assert_eq!(code, 200);
    let (code, _) = interceptor::admin::get(metrics_addr, "/config").expect("metrics listener");
    assert_eq!(code, 404, "the metrics listener must not serve /config");

    let scratch = Scratch(PathBuf::from(format!("/tmp/icp-prom-{}", unique_id())));
    std::fs::create_dir_all(&scratch.0).expect("scratch dir");
    let prom = Prometheus::start(&scratch.0, metrics_addr);

    // A gRPC frame holding an empty message.
    let body = scratch.0.join("empty.msg");
    std::fs::write(&body, [0u8; 5]).expect("write the request body");
    let vip = interceptor_tests::cluster::vip();
    let ok = format!("http://{vip}/greet.Greeter/SayHello");
    let bad = format!("http://{vip}/greet.Greeter/NoSuchMethod");
    // One connection with STREAMS streams, gRPC-shaped POSTs.
    let common: Vec<String> = [
        "-c1",
        &format!("-m{STREAMS}"),
        "-d",
        &body.display().to_string(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut h2load_args = common.clone();
    h2load_args.extend(["-n".to_string(), CALLS.to_string(), format!("--rps={RPS}")]);
    // h2load takes the URIs in turn: exactly one call in FAILING_EVERY fails.
    for _ in 1..FAILING_EVERY {
        h2load_args.push(ok.clone());
    }
    h2load_args.push(bad);
    let a: Vec<&str> = h2load_args.iter().map(String::as_str).collect();
    let load = c.client.spawn_program(Path::new("/usr/bin/h2load"), &a);

    let out = load.wait_output(Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "h2load failed: {text}");
    assert!(
        text.contains(&format!("{CALLS} succeeded")),
        "h2load: every call answered (gRPC errors travel in trailers): {text}"
    );

    // Exact counts, once Prometheus has scraped the last of them.
    let total_q = "sum by (namespace, service) (interceptor_requests_total{namespace=\"shop\",service=\"greet\"})";
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = prom.greet_value(total_q).unwrap_or(0.0);
        if seen as u64 == CALLS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus shows {seen} requests for shop/greet, the test sent {CALLS}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let by_status: Vec<(String, u64)> = prom
        .query("sum by (status) (interceptor_requests_total{namespace=\"shop\",service=\"greet\"})")
        .into_iter()
        .map(|(m, v)| (m["status"].as_str().unwrap_or("").to_string(), v as u64))
        .collect();
    note(&format!("by status: {by_status:?}"));
    let failing = CALLS / FAILING_EVERY;
    assert!(
        by_status.contains(&("0".into(), CALLS - failing)),
        "{by_status:?}"
    );
    assert!(by_status.contains(&("12".into(), failing)), "{by_status:?}");

    // Every dashboard query is valid PromQL; the golden ones answer what was sent.
    let expected_ratio = 1.0 / FAILING_EVERY as f64;
    for (id, title, expr) in dashboard_queries() {
        let result = prom.query(&expr);
        let greet = result
            .iter()
            .find(|(m, _)| m["service"] == "greet")
            .map(|(_, v)| *v);
        note(&format!("panel {id} ({title}): {greet:?}"));
        match id {
            1 => {
                let rate = greet.expect("a request rate for shop/greet");
                assert!(rate > 0.0 && rate <= RPS as f64 * 1.2, "rate {rate}");
            }
            2 => {
                let ratio = greet.expect("an error ratio for shop/greet");
                assert!(
                    (ratio - expected_ratio).abs() < 0.05,
                    "error ratio {ratio}, sent {expected_ratio}"
                );
            }
            3 => {
                let p99 = greet.expect("a p99 for shop/greet");
                assert!(p99 > 0.0 && p99 < 1.0, "p99 {p99} s");
            }
            4 => assert_eq!(greet, Some(0.0), "nothing in flight after the run"),
            5 => {
                let endpoints = result
                    .iter()
                    .filter(|(m, v)| m["service"] == "greet" && *v > 0.0)
                    .count();
                assert_eq!(endpoints, 2, "both endpoints take calls: {result:?}");
            }
            9 if expr.starts_with("sum(") => {
                assert_eq!(
                    result.first().map(|r| r.1),
                    Some(0.0),
                    "every enabled pod is intercepted"
                )
            }
            _ => {}
        }
    }

    // In flight: h2load at full speed keeps STREAMS streams open for 4 s (it starts the next
    // call as one ends); Prometheus must see them, and never more.
    let in_flight_q = dashboard_queries()
        .into_iter()
        .find(|(id, ..)| *id == 4)
        .expect("the in-flight panel")
        .2;
    let ok_only: Vec<&str> = common
        .iter()
        .map(String::as_str)
        .chain(["-D", "4", ok.as_str()])
        .collect();
    let busy = c
        .client
        .spawn_program(Path::new("/usr/bin/h2load"), &ok_only);
    let mut seen = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        seen.push(prom.greet_value(&in_flight_q).unwrap_or(-1.0));
    }
    let out = busy.wait_output(Duration::from_secs(30));
    assert!(
        out.status.success(),
        "h2load -D 4 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    note(&format!("in flight under load, every 500 ms: {seen:?}"));
    let most = seen.iter().cloned().fold(f64::MIN, f64::max);
    assert!(
        most >= 1.0 && most <= STREAMS as f64,
        "in flight under load {seen:?}, h2load kept {STREAMS} open"
    );
    drop(prom);
    drop(agent);
}
