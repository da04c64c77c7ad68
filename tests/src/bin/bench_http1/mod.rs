//! The HTTP/1.1 rows of `cargo xtask bench`: the same pods and CPUs, an HTTP/1.1 backend
//! (hyper, `icp-pod http1-serve`) beside each gRPC one, and every proxy in HTTP/1.1 mode on
//! both sides with upstream keep-alive: nginx `proxy_pass` (`proxy_http_version 1.1`,
//! `keepalive`), HAProxy `mode http` (`http-reuse always`), `interceptor proxy` (detects
//! HTTP/1.1 and balances each request). Load: h2load `--h1` (no multiplexing: one request in
//! flight per connection), a GET answered with the backend's name.
//!
//! Per contender: single-connection latency (mean time per request at -c1, 2000 requests),
//! saturation at -c16, and the proxy's CPU per request over the saturation window.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use interceptor_tests::{bench as lib_bench, target_bin, ChildGuard};

use super::{sleep, spawn_pinned, Plan, Proc, Topology, LOAD_CPU, PROXY_CPU};

pub const HTTP1_PORT: u16 = 8081;
const NGINX_H1_PORT: u16 = 18011;
const HAPROXY_H1_PORT: u16 = 18012;
const ICP_H1_PORT: u16 = 18013;
const SAT_CONNS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Direct,
    Nginx,
    Haproxy,
    Interceptor,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::Direct => "H0 h2load round robin to pods (limit)",
            Contender::Nginx => "H2 nginx proxy_pass (HTTP/1.1, keepalive)",
            Contender::Haproxy => "H3 HAProxy mode http (h1, http-reuse always)",
            Contender::Interceptor => "H4 interceptor proxy (dialled)",
        }
    }
}

/// One contender's HTTP/1.1 results.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Row {
    pub contender: &'static str,
    pub latency_mean_us: Option<f64>,
    pub rps: f64,
    pub errors: u64,
    pub cpu_us_per_req: Option<f64>,
    pub cpu_util: Option<f64>,
    pub problem: Option<String>,
}

/// Starts one HTTP/1.1 backend per backend pod, on the load CPU.
pub fn start_backends(topo_pods: &[interceptor_tests::Pod]) -> Vec<ChildGuard> {
    let icp_pod = target_bin("icp-pod");
    topo_pods
        .iter()
        .map(|pod| {
            let mut child = pod.spawn_program(
                Path::new("/usr/bin/taskset"),
                &[
                    "-c",
                    LOAD_CPU,
                    icp_pod.to_str().expect("utf-8 path"),
                    "http1-serve",
                    "--name",
                    &pod.name,
                    "--port",
                    &HTTP1_PORT.to_string(),
                ],
            );
            child.wait_ready(&format!("HTTP/1.1 backend in {}", pod.name));
            child
        })
        .collect()
}

fn nginx_conf(dir: &Path, backends: &[SocketAddr]) -> String {
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx-h1.pid;\n\
         error_log {d}/nginx-h1-error.log warn;\nevents {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n\
         proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n\
         uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
         keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
         upstream backends {{\n{servers}    keepalive 2048;\n    keepalive_requests 100000000;\n    keepalive_timeout 300s;\n  }}\n\
         server {{\n    listen 127.0.0.1:{NGINX_H1_PORT};\n\
         location / {{ proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n  }}\n}}\n"
    )
}

fn haproxy_conf(backends: &[SocketAddr]) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{i} {b}\n"))
        .collect();
    format!(
        "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n\
         timeout client 300s\n  timeout server 300s\n  http-reuse always\n\n\
         frontend fe\n  bind 127.0.0.1:{HAPROXY_H1_PORT}\n  default_backend be\n\n\
         backend be\n  balance roundrobin\n{servers}"
    )
}

/// A running contender: its process (none for Direct) and what h2load dials.
struct Started {
    proc: Option<Proc>,
    targets: Vec<SocketAddr>,
}

fn start(topo: &Topology, c: Contender) -> Started {
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let backends: Vec<SocketAddr> = topo
        .backend_pods
        .iter()
        .map(|p| p.addr4(HTTP1_PORT))
        .collect();
    let log = |name: &str| topo.dir.join(format!("{name}.log"));
    let (proc, target) = match c {
        Contender::Direct => {
            return Started {
                proc: None,
                targets: backends,
            }
        }
        Contender::Nginx => {
            let conf = topo.dir.join("nginx-h1.conf");
            std::fs::write(&conf, nginx_conf(&topo.dir, &backends)).expect("nginx-h1.conf");
            let args = vec![
                "-c".into(),
                conf.display().to_string(),
                "-p".into(),
                format!("{}/", topo.dir.display()),
                "-e".into(),
                topo.dir.join("nginx-h1-error.log").display().to_string(),
            ];
            let p = spawn_pinned(
                Some(&topo.client.netns),
                PROXY_CPU,
                Path::new("/usr/sbin/nginx"),
                &args,
                log("nginx-h1"),
            );
            (p, local(NGINX_H1_PORT))
        }
        Contender::Haproxy => {
            let conf = topo.dir.join("haproxy-h1.cfg");
            std::fs::write(&conf, haproxy_conf(&backends)).expect("haproxy-h1.cfg");
            let args = vec!["-db".into(), "-f".into(), conf.display().to_string()];
            let p = spawn_pinned(
                Some(&topo.client.netns),
                PROXY_CPU,
                Path::new("/usr/sbin/haproxy"),
                &args,
                log("haproxy-h1"),
            );
            (p, local(HAPROXY_H1_PORT))
        }
        Contender::Interceptor => {
            let eps: Vec<String> = backends.iter().map(|a| a.to_string()).collect();
            let args = vec![
                "proxy".into(),
                "--listen".into(),
                local(ICP_H1_PORT).to_string(),
                "--endpoints".into(),
                eps.join(","),
                "--worker-threads".into(),
                "1".into(),
            ];
            let p = spawn_pinned(
                Some(&topo.client.netns),
                PROXY_CPU,
                &target_bin("interceptor"),
                &args,
                log("interceptor-proxy-h1"),
            );
            (p, local(ICP_H1_PORT))
        }
    };
    // Listening once a connect succeeds (from the client pod, where the proxy listens).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = topo
            .client
            .spawn_program(
                Path::new("curl"),
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("http://{target}/"),
                ],
            )
            .wait_output(Duration::from_secs(5));
        if String::from_utf8_lossy(&out.stdout).trim() == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer within 10 s",
            c.label()
        );
        sleep(Duration::from_millis(50));
    }
    Started {
        proc: Some(proc),
        targets: vec![target],
    }
}

/// h2load --h1 in the client pod on the load CPU: one process per target.
fn h2load(topo: &Topology, targets: &[SocketAddr], args: &[String]) -> Vec<ChildGuard> {
    targets
        .iter()
        .map(|t| {
            let mut full = vec![
                "-c".to_string(),
                LOAD_CPU.to_string(),
                "h2load".into(),
                "--h1".into(),
            ];
            full.extend(args.iter().cloned());
            full.push(format!("http://{t}/"));
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            topo.client
                .spawn_program(Path::new("/usr/bin/taskset"), &refs)
        })
        .collect()
}

/// The mean of h2load's "time for request" line, in microseconds.
fn mean_request_us(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("time for request:"))?;
    let mean = line
        .trim_start_matches("time for request:")
        .split_whitespace()
        .nth(2)?;
    let (num, scale) = if let Some(v) = mean.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = mean.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = mean.strip_suffix('s') {
        (v, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn run(topo: &Topology, plan: &Plan, c: Contender) -> Row {
    eprintln!("[http1] {}", c.label());
    let started = start(topo, c);
    let mut row = Row {
        contender: c.label(),
        ..Row::default()
    };
    let pid = started.proc.as_ref().map(Proc::pid);
    // Warm-up, then latency over one connection (the first target only).
    for child in h2load(
        topo,
        &started.targets,
        &["-n".into(), "500".into(), "-c".into(), "4".into()],
    ) {
        let _ = child.wait_output(Duration::from_secs(60));
    }
    let probe = h2load(
        topo,
        &started.targets[..1],
        &[
            "-n".into(),
            plan.probe_count.to_string(),
            "-c".into(),
            "1".into(),
        ],
    );
    for child in probe {
        let out = child.wait_output(Duration::from_secs(120));
        let text = String::from_utf8_lossy(&out.stdout);
        row.latency_mean_us = mean_request_us(&text);
        if let Some(r) = lib_bench::parse_h2load(&text) {
            row.errors += r.errors;
        }
    }
    // Saturation: SAT_CONNS connections in all (split over the pods for Direct).
    let per = (SAT_CONNS / started.targets.len()).max(1);
    let children = h2load(
        topo,
        &started.targets,
        &[
            format!("-c{per}"),
            format!("-D{}ms", plan.sat_duration.as_millis()),
            format!("--warm-up-time={}ms", plan.sat_warmup.as_millis()),
        ],
    );
    let margin = Duration::from_millis(300);
    sleep(plan.sat_warmup + margin);
    let (t0, c0) = (Instant::now(), pid.map(lib_bench::cpu_micros));
    sleep(plan.sat_duration.saturating_sub(margin * 2));
    let (t1, c1) = (Instant::now(), pid.map(lib_bench::cpu_micros));
    for child in children {
        let out = child.wait_output(plan.sat_duration + Duration::from_secs(60));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match lib_bench::parse_h2load(&text) {
            Some(r) => {
                row.rps += r.rps;
                row.errors += r.errors;
            }
            None => {
                row.errors += 1;
                row.problem = Some(format!("h2load printed no summary: {text}"));
            }
        }
    }
    let window = (t1 - t0).as_secs_f64();
    if let (Some(a), Some(b)) = (c0, c1) {
        let cpu = b.saturating_sub(a) as f64;
        row.cpu_util = Some(cpu / window / 1e6);
        if row.rps > 0.0 {
            row.cpu_us_per_req = Some(cpu / (row.rps * window));
        }
    }
    eprintln!(
        "  latency mean {:?} us, saturation {:.0} req/s, errors {}, cpu/req {:?} us",
        row.latency_mean_us, row.rps, row.errors, row.cpu_us_per_req
    );
    drop(started);
    row
}

/// Every contender once, in a fixed order.
pub fn run_all(topo: &Topology, plan: &Plan) -> Vec<Row> {
    [
        Contender::Direct,
        Contender::Nginx,
        Contender::Haproxy,
        Contender::Interceptor,
    ]
    .into_iter()
    .map(|c| {
        let r = run(topo, plan, c);
        super::check_stop();
        r
    })
    .collect()
}

/// The markdown section, with ratios to HAProxy and nginx.
pub fn markdown(rows: &[Row]) -> String {
    let find = |prefix: &str| rows.iter().find(|r| r.contender.starts_with(prefix));
    let direct = find("H0").and_then(|r| r.latency_mean_us);
    let mut s = String::from(
        "\n## HTTP/1.1 (h2load --h1, GET, keep-alive both sides)\n\n\
         | contender | mean latency c1 (us) | added vs direct (us) | saturation c16 (req/s) | CPU/req (us) | proxy CPU (cores) | errors |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let added = r
            .latency_mean_us
            .zip(direct)
            .map(|(a, d)| format!("{:.0}", a - d))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} |\n",
            r.contender,
            r.latency_mean_us
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "-".into()),
            if r.contender.starts_with("H0") {
                "-".into()
            } else {
                added
            },
            r.rps,
            r.cpu_us_per_req
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.cpu_util
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.errors
        ));
    }
    if let (Some(icp), Some(ha), Some(ng)) = (find("H4"), find("H3"), find("H2")) {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        s.push_str(&format!(
            "\ninterceptor vs HAProxy: saturation {}, CPU/req {}; vs nginx: saturation {}, CPU/req {}\n",
            ratio(icp.rps, ha.rps),
            icp.cpu_us_per_req
                .zip(ha.cpu_us_per_req)
                .map(|(a, b)| ratio(a, b))
                .unwrap_or_else(|| "-".into()),
            ratio(icp.rps, ng.rps),
            icp.cpu_us_per_req
                .zip(ng.cpu_us_per_req)
                .map(|(a, b)| ratio(a, b))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    s.push_str(
        "\nThe load generator and the backends share one CPU: when the proxy's CPU is under one \
         core, saturation is the client's, and CPU per request is the comparison that holds.\n",
    );
    s
}
