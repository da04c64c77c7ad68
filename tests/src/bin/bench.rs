//! `cargo xtask bench [--quick]`: interceptor against the alternatives, on this one machine, in
//! network namespaces and loopback only, everything in the same run, reported as ratios.
//!
//! Topology: a test node (netns) routing a client pod and four backend pods, an emulated
//! kube-proxy (nftables random DNAT) for the ClusterIP 10.96.0.10:8080, which exists only in
//! the node's netns. The proxy under test runs in the client pod's netns, pinned to CPU 1 with
//! one worker thread; the load generators and the backends run on CPU 0.
//!
//! Contenders (started one at a time, interleaved over repetitions):
//! - S0 client-side round robin straight to the pods (the limit);
//! - S1 kube-proxy with 1 and 2 long-lived connections (the problem);
//! - S2 nginx `grpc_pass`, S3 HAProxy h2, both round robin with upstream keep-alive/reuse;
//! - S4 `interceptor proxy` dialled directly; S5 the agent, transparent through the eBPF
//!   connect hook (the client dials the ClusterIP).
//!
//! Load: h2load for saturation and fairness; our own open-loop client (bench::load) for the
//! single-stream probe and fixed rates (latency from the intended send time). Results go to
//! target/bench/<timestamp>/ (results.json, table.md, chart.png) and target/bench/summary.json.
//! A program that prints a table, not a test: it asserts nothing about the numbers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interceptor_tests::bench::load::{LoadArgs, LoadResult, REQUEST_BODY};
use interceptor_tests::bench::{self, guest_idle, H2loadResult};
use interceptor_tests::{
    pinned_stats, require_root, target_bin, unix_micros, ChildGuard, Netns, Node, PinRoot, Pod,
};
use serde_json::{json, Value};

#[path = "bench_http1/mod.rs"]
mod bench_http1;

const VIP: &str = "10.96.0.10:8080";
const BACKEND_PORT: u16 = 8080;
const BACKENDS: usize = 4;
const NGINX_PORT: u16 = 18001;
const HAPROXY_PORT: u16 = 18002;
const ICP_PORT: u16 = 18003;
const ICP_FILE_PORT: u16 = 18004;
/// The proxy under test gets CPU 1; clients and backends share CPU 0.
const PROXY_CPU: &str = "1";
const LOAD_CPU: &str = "0";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C / SIGTERM: finish the current step, then unwind so every guard cleans up.
fn check_stop() {
    if STOP.load(Ordering::SeqCst) {
        panic!("interrupted: cleaning up (netns, cgroups, pins, processes)");
    }
}

fn sleep(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_stop();
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
}

/// Sweep sizes: quick (under 5 minutes) or full.
struct Plan {
    reps: usize,
    probe_count: u64,
    sat_warmup: Duration,
    sat_duration: Duration,
    rate_warmup: Duration,
    rate_duration: Duration,
    /// Which fixed rates to run (see `RATES`).
    rates: Vec<&'static str>,
    jain_duration: Duration,
    jain_every_rep: bool,
    idle_conns: usize,
    connect_count: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                reps: 2,
                probe_count: 2000,
                sat_warmup: Duration::from_millis(500),
                sat_duration: Duration::from_millis(2000),
                rate_warmup: Duration::from_millis(200),
                rate_duration: Duration::from_millis(1000),
                rates: vec!["low", "icp_half", "s0_half"],
                jain_duration: Duration::from_millis(1500),
                jain_every_rep: false,
                idle_conns: 1000,
                connect_count: 2000,
            }
        } else {
            Self {
                reps: 3,
                probe_count: 10_000,
                sat_warmup: Duration::from_millis(1000),
                sat_duration: Duration::from_secs(5),
                rate_warmup: Duration::from_millis(500),
                rate_duration: Duration::from_secs(5),
                rates: vec!["low", "icp_half", "s0_quarter", "s0_half"],
                jain_duration: Duration::from_secs(3),
                jain_every_rep: true,
                idle_conns: 1000,
                connect_count: 2_000,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    S0,
    S1x1,
    S1x2,
    Nginx,
    Haproxy,
    IcpDirect,
    IcpTransparent,
}

const ALL: [Kind; 7] = [
    Kind::S0,
    Kind::S1x1,
    Kind::S1x2,
    Kind::Nginx,
    Kind::Haproxy,
    Kind::IcpDirect,
    Kind::IcpTransparent,
];

impl Kind {
    fn id(self) -> &'static str {
        match self {
            Kind::S0 => "S0",
            Kind::S1x1 => "S1x1",
            Kind::S1x2 => "S1x2",
            Kind::Nginx => "S2",
            Kind::Haproxy => "S3",
            Kind::IcpDirect => "S4",
            Kind::IcpTransparent => "S5",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Kind::S0 => "S0 client round robin to pods (limit)",
            Kind::S1x1 => "S1 kube-proxy DNAT, 1 connection",
            Kind::S1x2 => "S1 kube-proxy DNAT, 2 connections",
            Kind::Nginx => "S2 nginx grpc_pass",
            Kind::Haproxy => "S3 HAProxy h2",
            Kind::IcpDirect => "S4 interceptor proxy (dialled)",
            Kind::IcpTransparent => "S5 interceptor agent (eBPF redirect)",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Kind::S0 => "S0 direct",
            Kind::S1x1 => "S1 kp x1",
            Kind::S1x2 => "S1 kp x2",
            Kind::Nginx => "S2 nginx",
            Kind::Haproxy => "S3 HAProxy",
            Kind::IcpDirect => "S4 icp",
            Kind::IcpTransparent => "S5 icp+eBPF",
        }
    }
    fn is_proxy(self) -> bool {
        matches!(
            self,
            Kind::Nginx | Kind::Haproxy | Kind::IcpDirect | Kind::IcpTransparent
        )
    }
}

/// A process tree (nginx forks its worker) stopped with SIGTERM, then SIGKILL for what is
/// left, on drop: nothing outlives the benchmark, also when it panics.
struct Proc {
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(ChildGuard::pid)
            .expect("process present")
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.0.as_mut())
            .and_then(|c| c.try_wait().ok().flatten())
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Some(mut guard) = self.child.take() else {
            return;
        };
        let pid = guard.pid();
        let tree = bench::process_tree(pid);
        // SAFETY: signalling processes we started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        if let Some(child) = guard.0.as_mut() {
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for p in tree {
            if Path::new(&format!("/proc/{p}")).exists() {
                // SAFETY: as above; the tree was read while the root was alive.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
        drop(guard);
    }
}

/// Starts `program` under `taskset -c cpu` (taskset execs, so the pid is the program's),
/// optionally inside `netns`, with stdout+stderr into `log`.
fn spawn_pinned(
    netns: Option<&Netns>,
    cpu: &str,
    program: &Path,
    args: &[String],
    log: PathBuf,
) -> Proc {
    // Appended, one header per start: the results keep every start's log, not only the last.
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    {
        use std::io::Write;
        let _ = writeln!(
            out,
            "=== {} start {} {}",
            now_hms(),
            program.display(),
            args.join(" ")
        );
    }
    let err = out.try_clone().expect("clone log fd");
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("INTERCEPTOR_LOG", "info");
    let ns_file = netns.map(|n| File::open(n.path()).expect("open netns"));
    if let Some(f) = &ns_file {
        let fd = f.as_raw_fd();
        // SAFETY: only setns between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    drop(ns_file);
    Proc {
        child: Some(ChildGuard(Some(child))),
        log,
    }
}

/// A backend pod's gRPC-shaped responder (`icp-pod h2serve`), polled with SIGUSR1.
struct Backend {
    child: Option<ChildGuard>,
    /// (replies seen, served, unix us of the first request)
    stats: Arc<Mutex<(u64, u64, u64)>>,
}

impl Backend {
    fn start(pod: &Pod) -> Self {
        let icp_pod = target_bin("icp-pod");
        let mut child = pod.spawn_program(
            Path::new("/usr/bin/taskset"),
            &[
                "-c",
                LOAD_CPU,
                icp_pod.to_str().expect("utf-8 path"),
                "h2serve",
                "--port",
                &BACKEND_PORT.to_string(),
            ],
        );
        let reader = child.wait_ready(&format!("backend in {}", pod.name));
        let stats = Arc::new(Mutex::new((0, 0, 0)));
        let sink = stats.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let f: Vec<u64> = line
                    .strip_prefix("stats ")
                    .map(|r| {
                        r.split_whitespace()
                            .filter_map(|v| v.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                if f.len() == 2 {
                    let mut s = sink.lock().expect("stats lock");
                    *s = (s.0 + 1, f[0], f[1]);
                }
            }
        });
        Self {
            child: Some(child),
            stats,
        }
    }
}

/// (served, first-request unix us) of every backend, polled at once. A stopped backend
/// reports (0, 0).
fn snapshot(backends: &[Backend]) -> Vec<(u64, u64)> {
    let before: Vec<u64> = backends
        .iter()
        .map(|b| {
            let seq = b.stats.lock().expect("stats lock").0;
            if let Some(c) = &b.child {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.pid() as i32, libc::SIGUSR1) };
            }
            seq
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    backends
        .iter()
        .zip(before)
        .map(|(b, seq)| {
            if b.child.is_none() {
                return (0, 0);
            }
            loop {
                let s = *b.stats.lock().expect("stats lock");
                if s.0 > seq {
                    return (s.1, s.2);
                }
                assert!(
                    Instant::now() < deadline,
                    "a backend did not answer SIGUSR1"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .collect()
}

fn deltas(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<u64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| y.0.saturating_sub(x.0))
        .collect()
}

struct Topology {
    dir: PathBuf,
    bench_exe: PathBuf,
    body_file: PathBuf,
    backends: Vec<Backend>,
    backend_addrs: Vec<SocketAddr>,
    backend_pods: Vec<Pod>,
    /// The HTTP/1.1 backends beside the gRPC ones (the HTTP/1.1 rows).
    _http1_backends: Vec<ChildGuard>,
    client: Pod,
    _node: Node,
}

/// A contender while it runs: its process (none for S0/S1), what the client dials, and for
/// S5 the agent's pin root (dropped after the agent).
struct Running {
    kind: Kind,
    proc: Option<Proc>,
    pins: Option<PinRoot>,
    target: Vec<SocketAddr>,
}

impl Running {
    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.proc.take());
        drop(self.pins.take());
    }
}

fn nginx_conf(dir: &Path, backends: &[SocketAddr]) -> String {
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n\
         proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n\
         uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
         keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  http2_max_concurrent_streams 128;\n\
         upstream backends {{\n{servers}    keepalive 2048;\n    keepalive_requests 100000000;\n    keepalive_timeout 300s;\n  }}\n\
         server {{\n    listen 127.0.0.1:{NGINX_PORT} http2;\n\
         location / {{ grpc_pass grpc://backends; }}\n  }}\n}}\n"
    )
}

/// `global`: extra lines for HAProxy's global section (the busy-polling info rows).
fn haproxy_conf(backends: &[SocketAddr], global: &[&str]) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{i} {b} proto h2\n"))
        .collect();
    let global: String = global.iter().map(|l| format!("  {l}\n")).collect();
    format!(
        "global\n  nbthread 1\n  maxconn 8000\n{global}\ndefaults\n  mode http\n  timeout connect 5s\n\
         timeout client 300s\n  timeout server 300s\n  http-reuse always\n\n\
         frontend fe\n  bind 127.0.0.1:{HAPROXY_PORT} proto h2\n  default_backend be\n\n\
         backend be\n  balance roundrobin\n{servers}"
    )
}

impl Topology {
    fn new(node: Node, dir: PathBuf) -> Self {
        let client = node.add_pod("client", 1);
        let backend_pods: Vec<Pod> = (1..=BACKENDS as u8)
            .map(|n| node.add_pod(&format!("b{n}"), 10 + n))
            .collect();
        let vip: SocketAddr = VIP.parse().expect("vip");
        node.kube_proxy(&[(
            vip,
            backend_pods.iter().map(|b| IpAddr::V4(b.ip4)).collect(),
        )]);
        let backends = backend_pods.iter().map(Backend::start).collect();
        let http1_backends = bench_http1::start_backends(&backend_pods);
        let backend_addrs = backend_pods.iter().map(|p| p.addr4(BACKEND_PORT)).collect();
        let body_file = dir.join("request.bin");
        std::fs::write(&body_file, REQUEST_BODY).expect("write the request body");
        Self {
            dir,
            bench_exe: std::env::current_exe().expect("current executable"),
            body_file,
            backends,
            backend_addrs,
            backend_pods,
            _http1_backends: http1_backends,
            client,
            _node: node,
        }
    }

    fn vip(&self) -> SocketAddr {
        VIP.parse().expect("vip")
    }

    fn start(&self, kind: Kind) -> Running {
        self.start_with(kind, &[])
    }

    /// `extra`: arguments to `interceptor proxy` (S4) or lines for HAProxy's global section
    /// (S3); the info rows (round robin, busy polling). Ignored for the others.
    fn start_with(&self, kind: Kind, extra: &[&str]) -> Running {
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let eps: Vec<String> = self.backend_addrs.iter().map(|a| a.to_string()).collect();
        let log = |name: &str| self.dir.join(format!("{name}.log"));
        let (proc, pins, target) = match kind {
            Kind::S0 => (None, None, self.backend_addrs.clone()),
            Kind::S1x1 | Kind::S1x2 => (None, None, vec![self.vip()]),
            Kind::Nginx => {
                let conf = self.dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&self.dir, &self.backend_addrs))
                    .expect("write nginx.conf");
                let args: Vec<String> = vec![
                    "-c".into(),
                    conf.display().to_string(),
                    "-p".into(),
                    format!("{}/", self.dir.display()),
                    "-e".into(),
                    self.dir.join("nginx-error.log").display().to_string(),
                ];
                let p = spawn_pinned(
                    Some(&self.client.netns),
                    PROXY_CPU,
                    Path::new("/usr/sbin/nginx"),
                    &args,
                    log("nginx"),
                );
                (Some(p), None, vec![local(NGINX_PORT)])
            }
            Kind::Haproxy => {
                let conf = self.dir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_conf(&self.backend_addrs, extra))
                    .expect("write haproxy.cfg");
                let args = vec!["-db".into(), "-f".into(), conf.display().to_string()];
                let p = spawn_pinned(
                    Some(&self.client.netns),
                    PROXY_CPU,
                    Path::new("/usr/sbin/haproxy"),
                    &args,
                    log("haproxy"),
                );
                (Some(p), None, vec![local(HAPROXY_PORT)])
            }
            Kind::IcpDirect => {
                let args = vec![
                    "proxy".into(),
                    "--listen".into(),
                    local(ICP_PORT).to_string(),
                    "--endpoints".into(),
                    eps.join(","),
                    "--worker-threads".into(),
                    "1".into(),
                ];
                let args: Vec<String> = args
                    .into_iter()
                    .chain(extra.iter().map(|a| a.to_string()))
                    .collect();
                let p = spawn_pinned(
                    Some(&self.client.netns),
                    PROXY_CPU,
                    &target_bin("interceptor"),
                    &args,
                    log("interceptor-proxy"),
                );
                (Some(p), None, vec![local(ICP_PORT)])
            }
            Kind::IcpTransparent => {
                let pins = PinRoot::new();
                let args = vec![
                    "run".into(),
                    "--source=static".into(),
                    "--pin-root".into(),
                    pins.path.display().to_string(),
                    "--admin-addr".into(),
                    "127.0.0.1:0".into(),
                    "--handoff-socket".into(),
                    // In the work directory, which goes when the run ends (a killed agent
                    // leaves its socket file behind).
                    self.dir.join("handoff.sock").display().to_string(),
                    "--drain-timeout".into(),
                    "1s".into(),
                    "--worker-threads".into(),
                    "1".into(),
                    "--pod".into(),
                    format!("default/client={}", self.client.cgroup.path.display()),
                    "--service".into(),
                    VIP.into(),
                    "--endpoints".into(),
                    format!("{VIP}={}", eps.join(",")),
                ];
                let mut p = spawn_pinned(
                    None,
                    PROXY_CPU,
                    &target_bin("interceptor"),
                    &args,
                    log("interceptor-agent"),
                );
                let deadline = Instant::now() + Duration::from_secs(30);
                while !p.log_text().contains("agent ready") {
                    if let Some(status) = p.exited() {
                        panic!("the agent exited ({status}):\n{}", p.log_text());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "agent not ready within 30 s:\n{}",
                        p.log_text()
                    );
                    sleep(Duration::from_millis(20));
                }
                (Some(p), Some(pins), vec![self.vip()])
            }
        };
        Running {
            kind,
            proc,
            pins,
            target,
        }
    }

    /// Runs our load client in the client pod (CPU 0) and returns its result.
    fn load(&self, args: &LoadArgs, timeout: Duration) -> LoadResult {
        let child = self.spawn_load(args);
        let out = child.wait_output(timeout);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().rev().find(|l| l.starts_with('{'));
        match line.map(serde_json::from_str::<LoadResult>) {
            Some(Ok(r)) => r,
            _ => LoadResult {
                errors: 1,
                first_error: Some(format!(
                    "load client failed ({}): {}{}",
                    out.status,
                    text,
                    String::from_utf8_lossy(&out.stderr)
                )),
                ..LoadResult::default()
            },
        }
    }

    fn spawn_load(&self, args: &LoadArgs) -> ChildGuard {
        let mut full = vec![
            "-c".to_string(),
            LOAD_CPU.to_string(),
            self.bench_exe.display().to_string(),
        ];
        full.extend(args.to_args());
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.client
            .spawn_program(Path::new("/usr/bin/taskset"), &refs)
    }

    /// h2load in the client pod on CPU 0: one process per target, `conns` connections each.
    fn spawn_h2load(
        &self,
        targets: &[SocketAddr],
        conns: usize,
        streams: usize,
        warmup: Duration,
        duration: Duration,
    ) -> Vec<ChildGuard> {
        targets
            .iter()
            .map(|t| {
                let url = format!("http://{t}/bench.Bench/Call");
                let args = [
                    "-c".to_string(),
                    LOAD_CPU.to_string(),
                    "h2load".to_string(),
                    format!("-c{conns}"),
                    format!("-m{streams}"),
                    format!("-D{}ms", duration.as_millis()),
                    format!("--warm-up-time={}ms", warmup.as_millis()),
                    "-d".to_string(),
                    self.body_file.display().to_string(),
                    "-H".to_string(),
                    "content-type: application/grpc".to_string(),
                    "-H".to_string(),
                    "te: trailers".to_string(),
                    url,
                ];
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                self.client
                    .spawn_program(Path::new("/usr/bin/taskset"), &refs)
            })
            .collect()
    }
}

fn h2load_collect(children: Vec<ChildGuard>, timeout: Duration) -> (H2loadResult, Vec<String>) {
    let mut sum = H2loadResult::default();
    let mut problems = Vec::new();
    for child in children {
        let out = child.wait_output(timeout);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        match bench::parse_h2load(&text) {
            Some(r) => {
                sum.succeeded += r.succeeded;
                sum.errors += r.errors;
                sum.rps += r.rps;
                if r.errors > 0 {
                    problems.push(text);
                }
            }
            None => {
                sum.errors += 1;
                problems.push(format!(
                    "h2load printed no summary ({}): {text}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    (sum, problems)
}

/// One saturation run: h2load throughput, and the proxy's CPU per request and CPU use over the
/// middle of the measured window (backend counts give the requests in that window).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Sat {
    conns: usize,
    streams: usize,
    rps: f64,
    errors: u64,
    cpu_us_per_req: Option<f64>,
    cpu_util: Option<f64>,
}

/// Balance over one client connection: requests per backend.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Fairness {
    counts: Vec<f64>,
    jain: f64,
    max_over_mean: f64,
    errors: u64,
}

/// One fixed-rate open-loop run.
#[derive(Debug, Clone, serde::Serialize)]
struct RateRun {
    name: &'static str,
    rate: f64,
    /// It achieved under 90% of the scheduled rate: its errors are reported apart.
    overloaded: bool,
    result: LoadResult,
}

/// One contender in one repetition: phase A (warm-up, probe, saturation, balance) and
/// phase B (the fixed rates).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct ContenderRun {
    warmup_errors: u64,
    probe: LoadResult,
    saturation: Vec<Sat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fairness: Option<Fairness>,
    rates: Vec<RateRun>,
    /// Connects the hook redirected (transparent contender only), in phase A and phase B.
    #[serde(skip_serializing_if = "Option::is_none")]
    hook_redirected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hook_redirected_rates: Option<u64>,
}

/// Phase B of one contender.
struct RatesRun {
    rates: Vec<RateRun>,
    warmup_errors: u64,
    hook_redirected: Option<u64>,
}

/// Memory of a contender: idle, and with idle client connections.
#[derive(Debug, Clone, serde::Serialize)]
struct Rss {
    idle_mib: f64,
    with_conns_mib: f64,
    conns_opened: u64,
    conns_wanted: usize,
    per_1k_conns_mib: Option<f64>,
    warmup_errors: u64,
}

/// A new endpoint's first request and fair share, and failed requests on its removal.
#[derive(Debug, Clone, serde::Serialize)]
struct Dynamics {
    reload_interval_ms: u64,
    rate: f64,
    first_request_ms: Option<f64>,
    fair_share_ms: Option<f64>,
    failed_requests: u64,
    ok_requests: u64,
    first_error: Option<String>,
}

/// The connect() cost of the hook, from bench-connect.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct ConnectCost {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<String>,
    connects: u32,
    redirect_kernel_ns: Option<i64>,
    pass_kernel_ns: Option<i64>,
    redirect_added_ns: Option<i64>,
    pass_added_ns: Option<i64>,
    ok: bool,
    table: String,
}

/// What the run ran on.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Machine {
    cpu: String,
    cpus: usize,
    kernel: String,
    nginx: String,
    haproxy: String,
    h2load: String,
    loadavg: String,
    loadavg_end: String,
    /// Share of all CPUs' time spent busy in the second before the run: other work that
    /// would disturb it. (The load average lags: it stays high for minutes after the release
    /// build that precedes every run, while the CPUs are already idle.)
    busy_at_start: Option<f64>,
    /// How idle CPUs wait (as found; the halt-polling rows change it for their own runs).
    idle: guest_idle::IdleSetup,
}

fn saturate(topo: &Topology, plan: &Plan, run: &Running, conns: usize, streams: usize) -> Sat {
    let (targets, per_target) = if run.kind == Kind::S0 {
        (topo.backend_addrs.clone(), (conns / BACKENDS).max(1))
    } else {
        (run.target.clone(), conns)
    };
    let children = topo.spawn_h2load(
        &targets,
        per_target,
        streams,
        plan.sat_warmup,
        plan.sat_duration,
    );
    let margin = Duration::from_millis(300);
    sleep(plan.sat_warmup + margin);
    let sample = || {
        (
            Instant::now(),
            run.pid().map(bench::cpu_micros),
            snapshot(&topo.backends),
        )
    };
    let (t0, c0, s0) = sample();
    sleep(plan.sat_duration.saturating_sub(margin * 2));
    let (t1, c1, s1) = sample();
    let (r, problems) = h2load_collect(children, plan.sat_duration + Duration::from_secs(60));
    for p in problems {
        eprintln!("{}: h2load reported errors:\n{p}", run.kind.id());
    }
    let served: u64 = deltas(&s0, &s1).iter().sum();
    let cpu = c0.zip(c1).map(|(a, b)| b.saturating_sub(a) as f64);
    Sat {
        conns,
        streams,
        rps: r.rps,
        errors: r.errors,
        cpu_us_per_req: cpu.filter(|_| served > 0).map(|c| c / served as f64),
        cpu_util: cpu.map(|c| c / (t1 - t0).as_secs_f64() / 1e6),
    }
}

/// h2load with one connection; the backends' counts give each endpoint's share.
fn fairness(topo: &Topology, plan: &Plan, run: &Running) -> Fairness {
    let before = snapshot(&topo.backends);
    let children = topo.spawn_h2load(
        &run.target[..1],
        1,
        10,
        Duration::from_millis(200),
        plan.jain_duration,
    );
    let (r, _) = h2load_collect(children, plan.jain_duration + Duration::from_secs(60));
    let after = snapshot(&topo.backends);
    let shares: Vec<f64> = deltas(&before, &after).iter().map(|&n| n as f64).collect();
    Fairness {
        jain: bench::jain(&shares),
        max_over_mean: bench::max_over_mean(&shares),
        counts: shares,
        errors: r.errors,
    }
}

fn load_timeout(args: &LoadArgs) -> Duration {
    args.warmup + args.duration + args.hold + Duration::from_secs(60)
}

fn probe_args(run: &Running, count: u64) -> LoadArgs {
    LoadArgs {
        mode: "probe".into(),
        targets: run.target.clone(),
        conns: run.target.len(),
        count,
        rate: 0.0,
        duration: Duration::ZERO,
        warmup: Duration::ZERO,
        hold: Duration::ZERO,
    }
}

/// An open-loop run at `rate` for the plan's rate window, on the contender's connections.
fn rate_args(targets: Vec<SocketAddr>, kind: Kind, rate: f64, plan: &Plan) -> LoadArgs {
    LoadArgs {
        mode: "rate".into(),
        targets,
        conns: rate_conns(kind),
        count: 0,
        rate,
        duration: plan.rate_duration,
        warmup: plan.rate_warmup,
        hold: Duration::ZERO,
    }
}

fn rate_conns(kind: Kind) -> usize {
    match kind {
        Kind::S1x1 => 1,
        Kind::S1x2 => 2,
        _ => 4,
    }
}

/// One contender's whole sweep in one repetition.
/// The fixed rates, from the first repetition's saturation runs: every contender runs the
/// same rates.
/// - `low`: half the saturation of the slowest proxy (every proxy at most half loaded);
/// - `icp_half`: half of interceptor's (S4) saturation;
/// - `s0_quarter`, `s0_half`: a quarter and half of S0's saturation (the reference;
///   on this machine S0 runs several times faster than any proxy, so these overload them).
fn fixed_rates(first_rep: &BTreeMap<Kind, ContenderRun>) -> BTreeMap<&'static str, f64> {
    let best = |k: Kind| {
        first_rep
            .get(&k)
            .and_then(|v| v.saturation.iter().map(|s| s.rps).reduce(f64::max))
    };
    let slowest_proxy = [
        Kind::Nginx,
        Kind::Haproxy,
        Kind::IcpDirect,
        Kind::IcpTransparent,
    ]
    .into_iter()
    .filter_map(best)
    .filter(|r| *r > 0.0)
    .reduce(f64::min)
    .unwrap_or(2000.0);
    let s0 = best(Kind::S0).unwrap_or(2000.0);
    let icp = best(Kind::IcpDirect).unwrap_or(2000.0);
    BTreeMap::from([
        ("low", (slowest_proxy * 0.5).round()),
        ("icp_half", (icp * 0.5).round()),
        ("s0_quarter", (s0 * 0.25).round()),
        ("s0_half", (s0 * 0.5).round()),
    ])
}

/// Phase A of one contender in one repetition: warm-up, single-stream probe, saturation, and
/// (first repetition, or every one in full mode) balance over one connection.
fn run_contender(topo: &Topology, plan: &Plan, kind: Kind, rep: usize) -> ContenderRun {
    eprintln!("[{}] rep {} {}", now_hms(), rep + 1, kind.label());
    let run = topo.start(kind);
    let mut out = ContenderRun::default();
    // Warm-up: connections, pools and caches, discarded.
    let warm = topo.load(&probe_args(&run, 300), Duration::from_secs(60));
    out.warmup_errors = warm.errors;
    if let Some(e) = &warm.first_error {
        eprintln!("  warm-up error: {e}");
    }
    check_stop();
    let probe = topo.load(
        &probe_args(&run, plan.probe_count),
        Duration::from_secs(120),
    );
    eprintln!(
        "  probe: p50 {:.0} us p99 {:.0} us errors {}",
        probe.p50_us, probe.p99_us, probe.errors
    );
    out.probe = probe;
    check_stop();
    let mut sats = Vec::new();
    let loads: &[(usize, usize)] = match kind {
        Kind::S1x1 => &[(1, 128)],
        Kind::S1x2 => &[(2, 64)],
        _ => &[(4, 32), (16, 100)],
    };
    for &(c, m) in loads {
        let s = saturate(topo, plan, &run, c, m);
        eprintln!(
            "  saturation -c{c} -m{m}: {:.0} req/s, errors {}, cpu/req {:?} us, cpu {:?}",
            s.rps, s.errors, s.cpu_us_per_req, s.cpu_util
        );
        sats.push(s);
        check_stop();
    }
    out.saturation = sats;
    if kind != Kind::S0 && kind != Kind::S1x2 && (rep == 0 || plan.jain_every_rep) {
        let fair = fairness(topo, plan, &run);
        eprintln!(
            "  one connection: counts {:?} jain {:.3}",
            fair.counts, fair.jain
        );
        out.fairness = Some(fair);
    }
    out.hook_redirected = hook_redirected(&run);
    out
}

/// Phase B: the fixed-rate open-loop runs, same rates for every contender.
fn run_rates(
    topo: &Topology,
    plan: &Plan,
    kind: Kind,
    rep: usize,
    rates: &BTreeMap<&'static str, f64>,
) -> RatesRun {
    eprintln!(
        "[{}] rep {} fixed rates {}",
        now_hms(),
        rep + 1,
        kind.label()
    );
    let run = topo.start(kind);
    let warm = topo.load(&probe_args(&run, 300), Duration::from_secs(60));
    let mut out = Vec::new();
    for name in &plan.rates {
        let rate = rates.get(name).copied().unwrap_or(1000.0).max(100.0);
        let args = rate_args(run.target.clone(), kind, rate, plan);
        let r = topo.load(&args, load_timeout(&args));
        eprintln!(
            "  rate {name} {rate:.0}/s: p50 {:.0} us p99 {:.0} us p99.9 {:.0} us, achieved {:.0}/s, errors {}",
            r.p50_us, r.p99_us, r.p999_us, r.achieved_rps, r.errors
        );
        if let Some(e) = &r.first_error {
            eprintln!("    first error: {e}");
        }
        // A contender that cannot keep up with the schedule is overloaded: its errors there
        // (refused streams, timeouts) are reported apart from the correctness guard.
        let overloaded = r.achieved_rps < 0.9 * rate;
        out.push(RateRun {
            name,
            rate,
            overloaded,
            result: r,
        });
        check_stop();
    }
    RatesRun {
        rates: out,
        warmup_errors: warm.errors,
        hook_redirected: hook_redirected(&run),
    }
}

/// Busy polling in the info rows: longer than a round trip to a backend here (50-100 us), so
/// a worker that forwarded a request is still polling when the answer comes back.
const BUSY_POLL_US: &str = "200";

/// One contender under a setting that is not the default (info rows): the same single-stream
/// probe and `low` rate as the main rows.
#[derive(Debug, Clone, serde::Serialize)]
struct InfoRun {
    id: &'static str,
    setting: String,
    probe: LoadResult,
    low_rate: f64,
    low: LoadResult,
    /// Share of one core the proxy used during the `low` run (None for S0).
    cpu_util_at_low: Option<f64>,
}

impl InfoRun {
    fn errors(&self) -> u64 {
        self.probe.errors + self.low.errors
    }
}

/// Starts `kind` with `extra` flags, warms it up, and runs the probe and the `low` rate.
fn info_run(
    topo: &Topology,
    plan: &Plan,
    rates: &BTreeMap<&'static str, f64>,
    kind: Kind,
    extra: &[&str],
    setting: String,
) -> InfoRun {
    eprintln!("[{}] {} with {setting} (info)", now_hms(), kind.label());
    let run = topo.start_with(kind, extra);
    let _ = topo.load(&probe_args(&run, 300), Duration::from_secs(60));
    let probe = topo.load(
        &probe_args(&run, plan.probe_count),
        Duration::from_secs(120),
    );
    let low_rate = rates.get("low").copied().unwrap_or(1000.0).max(100.0);
    let args = rate_args(run.target.clone(), kind, low_rate, plan);
    let (t0, c0) = (Instant::now(), run.pid().map(bench::cpu_micros));
    let low = topo.load(&args, load_timeout(&args));
    let (t1, c1) = (Instant::now(), run.pid().map(bench::cpu_micros));
    let cpu_util_at_low = c0
        .zip(c1)
        .map(|(a, b)| b.saturating_sub(a) as f64 / (t1 - t0).as_secs_f64() / 1e6);
    eprintln!(
        "  probe p50 {:.0} us; rate low {low_rate:.0}/s: p99 {:.0} us, errors {}, cpu {:?}",
        probe.p50_us,
        low.p99_us,
        probe.errors + low.errors,
        cpu_util_at_low
    );
    check_stop();
    InfoRun {
        id: kind.id(),
        setting,
        probe,
        low_rate,
        low,
        cpu_util_at_low,
    }
}

/// Info only: a proxy with busy polling, which neither proxy does by default (it keeps a core
/// busy while traffic flows).
fn busy_polling(topo: &Topology, plan: &Plan, rates: &BTreeMap<&'static str, f64>) -> Vec<InfoRun> {
    let setups: [(Kind, Vec<&str>); 2] = [
        (Kind::Haproxy, vec!["busy-polling"]),
        (Kind::IcpDirect, vec!["--busy-poll-us", BUSY_POLL_US]),
    ];
    setups
        .into_iter()
        .map(|(kind, extra)| info_run(topo, plan, rates, kind, &extra, extra.join(" ")))
        .collect()
}

/// The halt-polling info rows: S0, HAProxy and interceptor at their own defaults, on a
/// machine whose idle vCPUs poll before they halt (the kernel's default, see guest_idle.rs).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct HaltPolling {
    /// Why the rows were not run, when they were not.
    skipped: Option<String>,
    runs: Vec<InfoRun>,
}

/// Runs the halt-polling rows with `guest_halt_poll_ns` at the kernel's default, and puts the
/// machine's own value back afterwards.
fn halt_polling(topo: &Topology, plan: &Plan, rates: &BTreeMap<&'static str, f64>) -> HaltPolling {
    let skip = |why: String| {
        eprintln!("[{}] halt-polling rows not run: {why}", now_hms());
        HaltPolling {
            skipped: Some(why),
            runs: Vec::new(),
        }
    };
    if let Some(why) = guest_idle::IdleSetup::read().why_not_raisable() {
        return skip(why);
    }
    let _polling = match guest_idle::HaltPollOverride::set(guest_idle::KERNEL_DEFAULT_NS) {
        Ok(o) => o,
        Err(e) => return skip(format!("could not set guest_halt_poll_ns: {e}")),
    };
    let setting = format!("guest_halt_poll_ns {}", guest_idle::KERNEL_DEFAULT_NS);
    let runs = [Kind::S0, Kind::Haproxy, Kind::IcpDirect]
        .into_iter()
        .map(|kind| info_run(topo, plan, rates, kind, &[], setting.clone()))
        .collect();
    HaltPolling {
        skipped: None,
        runs,
    }
}

/// Connects the hook redirected so far, for the transparent contender.
fn hook_redirected(run: &Running) -> Option<u64> {
    if run.kind != Kind::IcpTransparent {
        return None;
    }
    let pins = run.pins.as_ref().expect("agent pins");
    Some(
        pinned_stats(&pins.path)
            .get("redirected")
            .copied()
            .unwrap_or(0),
    )
}

/// RSS of a fresh contender after a warm-up, then with `conns` idle client connections.
fn rss(topo: &Topology, plan: &Plan, kind: Kind) -> Rss {
    eprintln!("[{}] RSS {}", now_hms(), kind.label());
    let run = topo.start(kind);
    let warm = topo.load(&probe_args(&run, 200), Duration::from_secs(60));
    sleep(Duration::from_millis(300));
    let pid = run.pid().expect("proxy pid");
    let base = bench::rss_kib(pid);
    let args = LoadArgs {
        mode: "idle".into(),
        targets: run.target.clone(),
        conns: plan.idle_conns,
        count: 0,
        rate: 0.0,
        duration: Duration::ZERO,
        warmup: Duration::ZERO,
        hold: Duration::from_secs(60),
    };
    let mut child = topo.spawn_load(&args);
    let stdout = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("idle client stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    let opened: u64 = line
        .strip_prefix("READY ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    sleep(Duration::from_millis(500));
    let with_conns = bench::rss_kib(pid);
    drop(child);
    let per_1k_mib = if opened > 0 {
        Some((with_conns as f64 - base as f64) / 1024.0 * 1000.0 / opened as f64)
    } else {
        None
    };
    eprintln!(
        "  idle {:.1} MiB, +{opened} connections {:.1} MiB",
        base as f64 / 1024.0,
        with_conns as f64 / 1024.0
    );
    Rss {
        idle_mib: base as f64 / 1024.0,
        with_conns_mib: with_conns as f64 / 1024.0,
        conns_opened: opened,
        conns_wanted: plan.idle_conns,
        per_1k_conns_mib: per_1k_mib,
        warmup_errors: warm.errors,
    }
}

/// interceptor's endpoints file: a new endpoint's first request and fair share, then its
/// removal under load (failed requests), with `interceptor proxy --endpoints-file`.
fn endpoint_dynamics(topo: &mut Topology, reload_ms: u64) -> Dynamics {
    eprintln!(
        "[{}] endpoint add/remove (interceptor proxy, endpoints file)",
        now_hms()
    );
    // A fresh responder for the endpoint that appears, so its first-request stamp is new.
    // (The old one goes first: it holds the port.)
    drop(topo.backends[BACKENDS - 1].child.take());
    topo.backends[BACKENDS - 1] = Backend::start(&topo.backend_pods[BACKENDS - 1]);
    let file = topo.dir.join("endpoints.txt");
    let write_eps = |n: usize| {
        let text: String = topo.backend_addrs[..n]
            .iter()
            .map(|a| format!("{a}\n"))
            .collect();
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write endpoints file");
        std::fs::rename(&tmp, &file).expect("replace endpoints file");
    };
    write_eps(BACKENDS - 1);
    let local = SocketAddr::from(([127, 0, 0, 1], ICP_FILE_PORT));
    let args = vec![
        "proxy".into(),
        "--listen".into(),
        local.to_string(),
        "--endpoints-file".into(),
        file.display().to_string(),
        "--reload-interval-ms".into(),
        reload_ms.to_string(),
        "--worker-threads".into(),
        "1".into(),
    ];
    let proxy = spawn_pinned(
        Some(&topo.client.netns),
        PROXY_CPU,
        &target_bin("interceptor"),
        &args,
        topo.dir.join("interceptor-file.log"),
    );
    let rate = 2000.0;
    let load = LoadArgs {
        mode: "rate".into(),
        targets: vec![local],
        conns: 1,
        count: 0,
        rate,
        duration: Duration::from_millis(4500),
        warmup: Duration::ZERO,
        hold: Duration::ZERO,
    };
    let client = topo.spawn_load(&load);
    sleep(Duration::from_millis(1000));
    let new = BACKENDS - 1;
    let mut prev = snapshot(&topo.backends);
    let t0 = unix_micros();
    write_eps(BACKENDS);
    let added = Instant::now();
    let mut first_ms = None;
    let mut fair_ms = None;
    let mut window: Vec<(Instant, Vec<(u64, u64)>)> = vec![(added, prev.clone())];
    while added.elapsed() < Duration::from_millis(2000) && fair_ms.is_none() {
        sleep(Duration::from_millis(25));
        let now = snapshot(&topo.backends);
        if first_ms.is_none() && now[new].1 != 0 {
            first_ms = Some(now[new].1.saturating_sub(t0) as f64 / 1000.0);
        }
        window.push((Instant::now(), now.clone()));
        // Share over the last ~100 ms.
        if let Some((_, old)) = window
            .iter()
            .rev()
            .find(|(t, _)| t.elapsed() >= Duration::from_millis(100))
        {
            let d = deltas(old, &now);
            let total: u64 = d.iter().sum();
            if total > 0 && d[new] as f64 / total as f64 >= 0.9 / BACKENDS as f64 {
                fair_ms = Some(added.elapsed().as_secs_f64() * 1000.0);
            }
        }
        prev = now;
    }
    let _ = prev;
    // Removal: drop the endpoint from the file, give the proxy one reload interval plus a
    // margin, then stop that backend (it exits at once, as a pod killed after its grace).
    sleep(Duration::from_millis(500));
    write_eps(BACKENDS - 1);
    sleep(Duration::from_millis(reload_ms * 2 + 100));
    if let Some(c) = topo.backends[new].child.take() {
        drop(c);
    }
    let out = client.wait_output(load_timeout(&load));
    let text = String::from_utf8_lossy(&out.stdout);
    let r: LoadResult = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(LoadResult {
            errors: 1,
            first_error: Some(format!("load client failed: {text}")),
            ..LoadResult::default()
        });
    drop(proxy);
    topo.backends[new] = Backend::start(&topo.backend_pods[new]);
    eprintln!(
        "  first request after {first_ms:?} ms, fair share after {fair_ms:?} ms, failed during add+remove: {} ({:?})",
        r.errors, r.first_error
    );
    Dynamics {
        reload_interval_ms: reload_ms,
        rate,
        first_request_ms: first_ms,
        fair_share_ms: fair_ms,
        failed_requests: r.errors,
        ok_requests: r.ok,
        first_error: r.first_error,
    }
}

/// The connect() cost of the hook: the reduced `bench-connect` (same program as `cargo xtask
/// bench-connect`), its "added median" per path.
fn connect_cost(count: u32) -> ConnectCost {
    eprintln!("[{}] connect() cost (bench-connect {count})", now_hms());
    let child = Command::new(target_bin("bench-connect"))
        .arg(count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bench-connect");
    let mut guard = ChildGuard(Some(child));
    let pid = guard.pid();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut stalled = false;
    loop {
        let done = guard
            .0
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .is_some();
        if done {
            break;
        }
        if Instant::now() > deadline && !stalled {
            // Stuck (it used to stall on SYN retransmits, docs/benchmarks.md): kill only the
            // measuring client, so
            // bench-connect fails its own run and unwinds, removing its netns, cgroups and pins.
            // Killing bench-connect itself would leave them behind.
            stalled = true;
            for p in bench::process_tree(pid) {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmd).contains("connect-bench") {
                    // SAFETY: a process of the tree we started.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
            }
        }
        if Instant::now() > deadline + Duration::from_secs(60) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let out = guard.wait_output(Duration::from_secs(30));
    if stalled || !out.status.success() {
        return ConnectCost {
            error: Some(if stalled {
                "bench-connect overstayed 150 s; its measuring client was stopped"
            } else {
                "bench-connect failed"
            }),
            stderr: Some(
                String::from_utf8_lossy(&out.stderr)
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>(),
            ),
            connects: count,
            ..ConnectCost::default()
        };
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let added = |path: &str| -> Option<i64> {
        text.lines()
            .find(|l| l.starts_with(&format!("| {path} |")) && l.matches('|').count() == 7)
            .and_then(|l| l.split('|').nth(4))
            .and_then(|c| c.trim().trim_end_matches(" ns").parse().ok())
    };
    // Kernel-accounted run time of our programs per redirected connect (bpf_stats): what the
    // hook itself costs, without the wall-clock noise of a loaded 2-core VM.
    let kernel = |path: &str| -> Option<i64> {
        let rows: Vec<i64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("| {path} | icp_")))
            .filter_map(|l| l.split('|').nth(5)?.trim().parse().ok())
            .collect();
        (!rows.is_empty()).then(|| rows.iter().sum())
    };
    ConnectCost {
        error: None,
        stderr: None,
        connects: count,
        redirect_kernel_ns: kernel("redirect"),
        pass_kernel_ns: kernel("pass"),
        redirect_added_ns: added("redirect"),
        pass_added_ns: added("pass"),
        ok: out.status.success(),
        table: text,
    }
}

fn now_hms() -> String {
    let s = unix_micros() / 1_000_000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(v[v.len() / 2])
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = |cmd: &str, arg: &str| -> String {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let t = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                t.lines().next().unwrap_or("").to_string()
            })
            .unwrap_or_default()
    };
    Machine {
        cpu,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: kernel.trim().to_string(),
        nginx: version("/usr/sbin/nginx", "-v"),
        haproxy: version("/usr/sbin/haproxy", "-v"),
        h2load: version("h2load", "--version"),
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        loadavg_end: String::new(),
        busy_at_start: cpu_busy_share(Duration::from_secs(1)),
        idle: guest_idle::IdleSetup::read(),
    }
}

/// Share of all CPUs' time spent busy (not idle or waiting for I/O) over `window`, from
/// /proc/stat.
fn cpu_busy_share(window: Duration) -> Option<f64> {
    let sample = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((v.iter().sum(), idle))
    };
    let (t0, i0) = sample()?;
    sleep(window);
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0).filter(|t| *t > 0)?;
    Some(1.0 - i1.saturating_sub(i0) as f64 / total as f64)
}

const USAGE: &str = "usage: bench [--quick] [--out DIR] [--http1-only]
  (as root; `cargo xtask bench [--quick]` builds the release binaries first)
  --quick        2 repetitions, short phases (about 4 minutes)
  --out DIR      results root (default target/bench): DIR/<time>/ and DIR/summary.json
  --http1-only   print only the HTTP/1.1 rows; nothing is written";

/// An unknown argument stops the bench before it builds any namespace: a typo must not start
/// a full run.
fn check_args(args: &[String]) {
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" | "--http1-only" => {}
            "--out" if i + 1 < args.len() => i += 1,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("bench: unexpected argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
        i += 1;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("load") {
        bench::load::main(&args[1..]);
        return;
    }
    check_args(&args);
    let quick = args.iter().any(|a| a == "--quick");
    let out_root = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    require_root();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    raise_nofile();
    for tool in [
        "/usr/sbin/nginx",
        "/usr/sbin/haproxy",
        "/usr/bin/h2load",
        "/usr/bin/taskset",
    ] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: `cargo xtask setup` installs nginx-light, haproxy, nghttp2-client"
        );
    }
    if args.iter().any(|a| a == "--http1-only") {
        // Only the HTTP/1.1 rows, printed (for working on them; nothing is written).
        let work = tempdir();
        let topo = Topology::new(Node::new(), work.0.clone());
        let rows = bench_http1::run_all(&topo, &Plan::new(quick));
        println!("{}", bench_http1::markdown(&rows));
        return;
    }
    let started = Instant::now();
    let mut machine_info = machine();
    let stamp = {
        let s = unix_micros() / 1_000_000;
        let out = Command::new("date")
            .args(["-u", "-d", &format!("@{s}"), "+%Y%m%dT%H%M%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| s.to_string());
        out
    };
    let dir = out_root.join(&stamp);
    std::fs::create_dir_all(&dir).expect("create the results directory");
    let work = tempdir();
    let plan = Plan::new(quick);
    eprintln!(
        "bench ({}): results into {}",
        if quick { "quick" } else { "full" },
        dir.display()
    );

    let mut reps: Vec<BTreeMap<Kind, ContenderRun>> = Vec::new();
    let mut rates = BTreeMap::new();
    let mut rss_results: BTreeMap<Kind, Rss> = BTreeMap::new();
    let dynamics;
    let rr_fairness;
    let busy_poll;
    let halt_poll;
    let http1_rows;
    {
        let mut topo = Topology::new(Node::new(), work.0.clone());
        for rep in 0..plan.reps {
            let mut order: Vec<Kind> = ALL[1..].to_vec();
            let n = order.len();
            order.rotate_left(rep % n);
            order.insert(0, Kind::S0);
            let mut results = BTreeMap::new();
            for &kind in &order {
                results.insert(kind, run_contender(&topo, &plan, kind, rep));
            }
            if rep == 0 {
                rates = fixed_rates(&results);
                eprintln!("fixed rates: {rates:?}");
            }
            for &kind in &order {
                let r = run_rates(&topo, &plan, kind, rep, &rates);
                if let Some(o) = results.get_mut(&kind) {
                    o.rates = r.rates;
                    o.warmup_errors += r.warmup_errors;
                    o.hook_redirected_rates = r.hook_redirected;
                }
            }
            reps.push(results);
        }
        for kind in [
            Kind::Nginx,
            Kind::Haproxy,
            Kind::IcpDirect,
            Kind::IcpTransparent,
        ] {
            rss_results.insert(kind, rss(&topo, &plan, kind));
            check_stop();
        }
        http1_rows = bench_http1::run_all(&topo, &plan);
        // Info only: the same one-connection balance with interceptor's round-robin option
        // (the default, used everywhere else, is power of two choices over peak EWMA).
        eprintln!(
            "[{}] one connection, interceptor proxy --balancer round-robin (info)",
            now_hms()
        );
        let run = topo.start_with(Kind::IcpDirect, &["--balancer", "round-robin"]);
        let _ = topo.load(&probe_args(&run, 300), Duration::from_secs(60));
        rr_fairness = fairness(&topo, &plan, &run);
        drop(run);
        eprintln!(
            "  counts {:?} jain {:.3}",
            rr_fairness.counts, rr_fairness.jain
        );
        busy_poll = busy_polling(&topo, &plan, &rates);
        halt_poll = halt_polling(&topo, &plan, &rates);
        dynamics = endpoint_dynamics(&mut topo, 50);
        drop(topo);
    }
    // Keep the contenders' logs (configs too) with the results.
    let logs = dir.join("logs");
    let _ = std::fs::create_dir_all(&logs);
    for entry in std::fs::read_dir(&work.0).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".log") || n.ends_with(".conf") || n.ends_with(".cfg") {
            let _ = std::fs::copy(entry.path(), logs.join(&name));
        }
    }
    let connect = connect_cost(plan.connect_count);
    let elapsed = started.elapsed();

    let mut report = Report::new(
        &plan,
        quick,
        rates,
        reps,
        rss_results,
        dynamics,
        connect,
        elapsed,
    );
    report.rr_fairness = Some(rr_fairness);
    report.busy_poll = busy_poll;
    report.halt_poll = halt_poll;
    report.http1 = http1_rows;
    report.ejections = ejections_logged(&logs);
    report.busy_at_start = machine_info.busy_at_start;
    machine_info.loadavg_end = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let results = report.results_json(&machine_info);
    bench::write_file(
        &dir.join("results.json"),
        &serde_json::to_string_pretty(&results).expect("json"),
    );
    let summary = report.summary();
    let summary_text = serde_json::to_string_pretty(&summary).expect("json");
    bench::write_file(&dir.join("summary.json"), &summary_text);
    bench::write_file(&out_root.join("summary.json"), &summary_text);
    let mut table = report.markdown(&machine_info, &stamp);
    table.push_str(&bench_http1::markdown(&report.http1));
    bench::write_file(&dir.join("table.md"), &table);
    let chart = dir.join("chart.png");
    if let Err(e) = interceptor_tests::bench::chart::bars(&chart, &report.chart_panels()) {
        eprintln!("chart not drawn: {e}");
    }
    println!("{table}");
    println!("summary: {}", out_root.join("summary.json").display());
    println!("results: {}", dir.display());
}

/// A temporary working directory (configs, logs, endpoints file), removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> TempDir {
    let p = std::env::temp_dir().join(format!("icp-bench-{}", interceptor_tests::unique_id()));
    std::fs::create_dir_all(&p).expect("create the work directory");
    TempDir(p)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `summary.json` holds: the targets as ratios and values, and notes.
#[derive(Debug, Clone, serde::Serialize)]
struct Summary {
    rps_ratio_vs_haproxy: Option<f64>,
    rps_ratio_vs_nginx: Option<f64>,
    cpu_per_req_ratio_vs_haproxy: Option<f64>,
    added_latency_ratio_vs_haproxy: Option<f64>,
    /// The same ratio from the halt-polling info rows (not this machine's setting).
    added_latency_ratio_vs_haproxy_halt_polling: Option<f64>,
    p99_added_us_at_low_load_halt_polling: Option<f64>,
    p99_added_us_at_half_load: Option<f64>,
    p99_added_us_at_half_load_transparent: Option<f64>,
    p99_added_us_at_low_load: Option<f64>,
    p99_added_us_at_half_of_s0: Option<f64>,
    rates: BTreeMap<&'static str, f64>,
    jain_one_conn: Option<f64>,
    max_over_mean_one_conn: Option<f64>,
    jain_one_conn_transparent: Option<f64>,
    jain_one_conn_round_robin: Option<f64>,
    new_endpoint_first_request_ms: Option<f64>,
    new_endpoint_fair_share_ms: Option<f64>,
    removal_failed_requests: Option<u64>,
    rss_idle_mib: Option<f64>,
    rss_per_1k_conns_mib: Option<f64>,
    ejections: Option<u64>,
    connect_added_ns: Option<f64>,
    connect_added_wall_ns: Option<f64>,
    connect_pass_kernel_ns: Option<f64>,
    connect_pass_added_wall_ns: Option<f64>,
    transparent_vs_direct_ratio: Option<f64>,
    saturation_rps_interceptor: Option<f64>,
    saturation_rps_haproxy: Option<f64>,
    saturation_rps_nginx: Option<f64>,
    saturation_rps_s0: Option<f64>,
    errors: u64,
    overload_errors: BTreeMap<&'static str, u64>,
    noisy: bool,
    s0_drift: Option<f64>,
    quick: bool,
    elapsed_s: f64,
    notes: Vec<String>,
}

/// Counts "endpoint ejected" warnings in the S4 and S5 logs of this run.
fn ejections_logged(logs: &Path) -> Option<u64> {
    let mut n = 0;
    for name in ["interceptor-proxy.log", "interceptor-agent.log"] {
        let text = std::fs::read_to_string(logs.join(name)).ok()?;
        n += text
            .lines()
            .filter(|l| l.contains("endpoint ejected"))
            .count() as u64;
    }
    Some(n)
}

/// What `results.json` holds: every measurement of the run, and the summary.
#[derive(Debug, serde::Serialize)]
struct Results<'a> {
    machine: &'a Machine,
    plan: &'a Value,
    repetitions: Vec<BTreeMap<&'static str, &'a ContenderRun>>,
    rss: BTreeMap<&'static str, &'a Rss>,
    endpoint_dynamics: &'a Dynamics,
    connect: &'a ConnectCost,
    fairness_icp_round_robin: Option<&'a Fairness>,
    busy_poll: &'a [InfoRun],
    halt_poll: &'a HaltPolling,
    http1: &'a [bench_http1::Row],
    summary: Summary,
}

/// Aggregation over repetitions (medians), the summary and the tables.
struct Report {
    quick: bool,
    /// "endpoint ejected" lines in interceptor's logs (S4 and S5, every phase of every
    /// repetition: the logs are appended to); None if a log could not be read.
    ejections: Option<u64>,
    rr_fairness: Option<Fairness>,
    busy_poll: Vec<InfoRun>,
    halt_poll: HaltPolling,
    http1: Vec<bench_http1::Row>,
    busy_at_start: Option<f64>,
    rates: BTreeMap<&'static str, f64>,
    rate_names: Vec<&'static str>,
    reps: Vec<BTreeMap<Kind, ContenderRun>>,
    rss: BTreeMap<Kind, Rss>,
    dynamics: Dynamics,
    connect: ConnectCost,
    elapsed: Duration,
    plan_desc: Value,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn new(
        plan: &Plan,
        quick: bool,
        rates: BTreeMap<&'static str, f64>,
        reps: Vec<BTreeMap<Kind, ContenderRun>>,
        rss: BTreeMap<Kind, Rss>,
        dynamics: Dynamics,
        connect: ConnectCost,
        elapsed: Duration,
    ) -> Self {
        Self {
            ejections: None,
            quick,
            rr_fairness: None,
            busy_poll: Vec::new(),
            halt_poll: HaltPolling::default(),
            http1: Vec::new(),
            busy_at_start: None,
            rates,
            rate_names: plan.rates.clone(),
            reps,
            rss,
            dynamics,
            connect,
            elapsed,
            plan_desc: json!({
                "repetitions": plan.reps,
                "probe_requests": plan.probe_count,
                "saturation_warmup_ms": plan.sat_warmup.as_millis() as u64,
                "saturation_ms": plan.sat_duration.as_millis() as u64,
                "rate_ms": plan.rate_duration.as_millis() as u64,
                "rates": plan.rates,
                "idle_conns": plan.idle_conns,
            }),
        }
    }

    /// Median over repetitions of a number picked from each repetition's result.
    fn med(&self, kind: Kind, pick: impl Fn(&ContenderRun) -> Option<f64>) -> Option<f64> {
        median(
            self.reps
                .iter()
                .filter_map(|r| r.get(&kind))
                .filter_map(&pick)
                .collect(),
        )
    }

    fn sat_best(&self, kind: Kind) -> Option<f64> {
        self.med(kind, |v| {
            v.saturation.iter().map(|s| s.rps).reduce(f64::max)
        })
    }

    fn sat_at(&self, kind: Kind, i: usize, field: fn(&Sat) -> Option<f64>) -> Option<f64> {
        self.med(kind, |v| field(v.saturation.get(i)?))
    }

    fn probe(&self, kind: Kind, field: fn(&LoadResult) -> f64) -> Option<f64> {
        self.med(kind, |v| Some(field(&v.probe)))
    }

    fn rate(&self, kind: Kind, name: &str, field: fn(&LoadResult) -> f64) -> Option<f64> {
        self.med(kind, |v| {
            v.rates
                .iter()
                .find(|r| r.name == name)
                .map(|r| field(&r.result))
        })
    }

    fn fair(&self, kind: Kind, field: fn(&Fairness) -> f64) -> Option<f64> {
        self.med(kind, |v| v.fairness.as_ref().map(field))
    }

    fn errors(&self, kind: Kind) -> u64 {
        self.reps
            .iter()
            .filter_map(|r| r.get(&kind))
            .map(|v| {
                v.warmup_errors
                    + v.probe.errors
                    + v.fairness.as_ref().map_or(0, |f| f.errors)
                    + v.saturation.iter().map(|s| s.errors).sum::<u64>()
                    + v.rates
                        .iter()
                        .filter(|r| !r.overloaded)
                        .map(|r| r.result.errors)
                        .sum::<u64>()
            })
            .sum::<u64>()
            + self.rss.get(&kind).map_or(0, |v| v.warmup_errors)
    }

    /// Errors in fixed-rate runs the contender could not keep up with.
    fn overload_errors(&self, kind: Kind) -> u64 {
        self.reps
            .iter()
            .filter_map(|r| r.get(&kind))
            .flat_map(|v| v.rates.iter())
            .filter(|r| r.overloaded)
            .map(|r| r.result.errors)
            .sum()
    }

    fn s0_drift(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .reps
            .iter()
            .filter_map(|r| r.get(&Kind::S0))
            .filter_map(|v| Some(v.saturation.first()?.rps))
            .collect();
        let min = v.iter().copied().reduce(f64::min)?;
        let max = v.iter().copied().reduce(f64::max)?;
        (min > 0.0).then(|| (max - min) / min)
    }

    fn added(&self, kind: Kind, f: impl Fn(&Self, Kind) -> Option<f64>) -> Option<f64> {
        Some(f(self, kind)? - f(self, Kind::S0)?)
    }

    /// A halt-polling row's value over S0's under the same setting.
    fn halt_poll_added(&self, kind: Kind, field: fn(&InfoRun) -> f64) -> Option<f64> {
        let get = |k: Kind| {
            self.halt_poll
                .runs
                .iter()
                .find(|r| r.id == k.id())
                .map(field)
        };
        Some(get(kind)? - get(Kind::S0)?)
    }

    fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
        match (a, b) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        }
    }

    fn summary(&self) -> Summary {
        let mut notes: Vec<String> = Vec::new();
        let sat = |k| self.sat_best(k);
        let cpu = |k| self.sat_at(k, 0, |s| s.cpu_us_per_req);
        let probe_added = |k| self.added(k, |s, k| s.probe(k, |r| r.p50_us));
        let half_p99_added = |k| self.added(k, |s, k| s.rate(k, "icp_half", |r| r.p99_us));
        let low_p99_added = |k| self.added(k, |s, k| s.rate(k, "low", |r| r.p99_us));
        let s0_half_p99_added = |k| self.added(k, |s, k| s.rate(k, "s0_half", |r| r.p99_us));
        let connect_added = self.connect.redirect_kernel_ns.map(|n| n as f64);
        if connect_added.is_none() {
            notes.push(format!(
                "connect_added_ns: bench-connect gave no result ({})",
                self.connect.error.unwrap_or("no table row")
            ));
        }
        let first = self.dynamics.first_request_ms;
        if first.is_none() {
            notes.push(
                "new_endpoint_first_request_ms: the new endpoint got no request within 2 s".into(),
            );
        }
        if let Some(busy) = self.busy_at_start.filter(|b| *b > 0.2) {
            notes.push(format!(
                "other work was running on the machine: the CPUs were {:.0}% busy in the second before the run; expect noise",
                busy * 100.0
            ));
        }
        let drift = self.s0_drift();
        let noisy = drift.is_some_and(|d| d > 0.10);
        if noisy {
            notes.push(format!(
                "noisy run: S0 saturation (-c4 -m32) drifted {:.1}% between repetitions (> 10%)",
                drift.unwrap_or(0.0) * 100.0
            ));
        }
        notes.push("ratios vs HAProxy/nginx compare S4 (interceptor proxy dialled directly), so all three proxies sit on the same path; S5 (transparent) is in transparent_vs_direct_ratio and the table".into());
        notes.push("new endpoint and removal: interceptor proxy --endpoints-file with --reload-interval-ms 50 (nginx and HAProxy have no equivalent without a reload; not measured for them)".into());
        notes.push("connect_added_ns: run time of our programs per redirected connect (ClusterIP -> pod-local listener) as the kernel accounts it (bpf_stats: icp_connect4), from a reduced bench-connect; connect_added_wall_ns is the median of bench-connect's per-round wall-clock differences attached - detached, which on this loaded 2-core VM is noisy (single runs 0.4-1.9 us); *_pass_* for a connect the hook looks at and leaves alone".into());
        let errors: u64 = ALL.iter().map(|&k| self.errors(k)).sum::<u64>()
            + self
                .busy_poll
                .iter()
                .chain(&self.halt_poll.runs)
                .map(InfoRun::errors)
                .sum::<u64>();
        let overload: BTreeMap<&str, u64> = ALL
            .iter()
            .map(|&k| (k.id(), self.overload_errors(k)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if !overload.is_empty() {
            notes.push("overload_errors: errors in fixed-rate runs where the contender achieved under 90% of the scheduled rate (overloaded); not counted in errors".into());
        }
        Summary {
            rps_ratio_vs_haproxy: Self::ratio(sat(Kind::IcpDirect), sat(Kind::Haproxy)),
            rps_ratio_vs_nginx: Self::ratio(sat(Kind::IcpDirect), sat(Kind::Nginx)),
            cpu_per_req_ratio_vs_haproxy: Self::ratio(cpu(Kind::IcpDirect), cpu(Kind::Haproxy)),
            added_latency_ratio_vs_haproxy: Self::ratio(
                probe_added(Kind::IcpDirect),
                probe_added(Kind::Haproxy),
            ),
            added_latency_ratio_vs_haproxy_halt_polling: Self::ratio(
                self.halt_poll_added(Kind::IcpDirect, |r| r.probe.p50_us),
                self.halt_poll_added(Kind::Haproxy, |r| r.probe.p50_us),
            ),
            p99_added_us_at_low_load_halt_polling: self
                .halt_poll_added(Kind::IcpDirect, |r| r.low.p99_us),
            p99_added_us_at_half_load: half_p99_added(Kind::IcpDirect),
            p99_added_us_at_half_load_transparent: half_p99_added(Kind::IcpTransparent),
            p99_added_us_at_low_load: low_p99_added(Kind::IcpDirect),
            p99_added_us_at_half_of_s0: s0_half_p99_added(Kind::IcpDirect),
            rates: self.rates.clone(),
            jain_one_conn: self.fair(Kind::IcpDirect, |f| f.jain),
            max_over_mean_one_conn: self.fair(Kind::IcpDirect, |f| f.max_over_mean),
            jain_one_conn_transparent: self.fair(Kind::IcpTransparent, |f| f.jain),
            jain_one_conn_round_robin: self.rr_fairness.as_ref().map(|f| f.jain),
            new_endpoint_first_request_ms: first,
            new_endpoint_fair_share_ms: self.dynamics.fair_share_ms,
            removal_failed_requests: Some(self.dynamics.failed_requests),
            rss_idle_mib: self.rss.get(&Kind::IcpDirect).map(|v| v.idle_mib),
            rss_per_1k_conns_mib: self
                .rss
                .get(&Kind::IcpDirect)
                .and_then(|v| v.per_1k_conns_mib),
            ejections: self.ejections,
            connect_added_ns: connect_added,
            connect_added_wall_ns: self.connect.redirect_added_ns.map(|n| n as f64),
            connect_pass_kernel_ns: self.connect.pass_kernel_ns.map(|n| n as f64),
            connect_pass_added_wall_ns: self.connect.pass_added_ns.map(|n| n as f64),
            transparent_vs_direct_ratio: Self::ratio(
                sat(Kind::IcpTransparent),
                sat(Kind::IcpDirect),
            ),
            saturation_rps_interceptor: sat(Kind::IcpDirect),
            saturation_rps_haproxy: sat(Kind::Haproxy),
            saturation_rps_nginx: sat(Kind::Nginx),
            saturation_rps_s0: sat(Kind::S0),
            errors,
            overload_errors: overload,
            noisy,
            s0_drift: drift,
            quick: self.quick,
            elapsed_s: self.elapsed.as_secs_f64(),
            notes,
        }
    }

    fn results_json<'a>(&'a self, machine: &'a Machine) -> Results<'a> {
        Results {
            machine,
            plan: &self.plan_desc,
            repetitions: self
                .reps
                .iter()
                .map(|r| r.iter().map(|(k, v)| (k.id(), v)).collect())
                .collect(),
            rss: self.rss.iter().map(|(k, v)| (k.id(), v)).collect(),
            endpoint_dynamics: &self.dynamics,
            connect: &self.connect,
            fairness_icp_round_robin: self.rr_fairness.as_ref(),
            busy_poll: &self.busy_poll,
            halt_poll: &self.halt_poll,
            http1: &self.http1,
            summary: self.summary(),
        }
    }

    fn chart_panels(&self) -> Vec<(&'static str, Vec<(String, f64)>)> {
        let sat: Vec<(String, f64)> = ALL
            .iter()
            .filter_map(|&k| Some((k.short().to_string(), self.sat_best(k)?)))
            .collect();
        let lat: Vec<(String, f64)> = ALL[1..]
            .iter()
            .filter(|k| k.is_proxy())
            .filter_map(|&k| {
                Some((
                    k.short().to_string(),
                    self.added(k, |s, k| s.probe(k, |r| r.p50_us))?,
                ))
            })
            .collect();
        vec![
            (
                "Saturation requests/s (proxy on one core; best of -c4 -m32 and -c16 -m100)",
                sat,
            ),
            ("Added latency over S0, single stream, p50 (us)", lat),
        ]
    }

    /// The busy-polling info rows beside the same contenders at their defaults.
    fn busy_poll_markdown(&self) -> String {
        let p50 = |r: &LoadResult| r.p50_us;
        let p99 = |r: &LoadResult| r.p99_us;
        let s0_p50 = self.probe(Kind::S0, p50);
        let s0_low = self.rate(Kind::S0, "low", p99);
        let minus = |v: Option<f64>, b: Option<f64>| Some(v? - b?);
        let cell = |v: Option<f64>, b: Option<f64>| match (v, minus(v, b)) {
            (Some(v), Some(d)) => format!("{v:.0} ({d:+.0})"),
            (Some(v), None) => format!("{v:.0}"),
            _ => "-".into(),
        };
        let mut t = String::from(
            "\nBusy polling (info; neither proxy's default, it keeps the proxy's core busy while requests flow): single-stream p50 and p99 at the `low` rate, us, added over S0 in parentheses.\n\n| contender | setting | 1 stream p50 | low p99 | proxy CPU busy at low | errors |\n|---|---|---:|---:|---:|---:|\n",
        );
        let mut busy_added = BTreeMap::new();
        for kind in [Kind::Haproxy, Kind::IcpDirect] {
            t.push_str(&format!(
                "| {} | default | {} | {} | - | - |\n",
                kind.label(),
                cell(self.probe(kind, p50), s0_p50),
                cell(self.rate(kind, "low", p99), s0_low),
            ));
            for b in self.busy_poll.iter().filter(|b| b.id == kind.id()) {
                busy_added.insert(kind, minus(Some(b.probe.p50_us), s0_p50));
                t.push_str(&format!(
                    "| {} | `{}` | {} | {} | {} | {} |\n",
                    kind.label(),
                    b.setting,
                    cell(Some(b.probe.p50_us), s0_p50),
                    cell(Some(b.low.p99_us), s0_low),
                    b.cpu_util_at_low
                        .map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
                    b.probe.errors + b.low.errors,
                ));
            }
        }
        let icp_busy = busy_added.get(&Kind::IcpDirect).copied().flatten();
        let hap_busy = busy_added.get(&Kind::Haproxy).copied().flatten();
        let hap_default = minus(self.probe(Kind::Haproxy, p50), s0_p50);
        let f2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        t.push_str(&format!(
            "\nAdded single-stream latency, S4 with busy polling vs HAProxy with busy polling: {}; vs HAProxy at its default: {}.\n",
            f2(Self::ratio(icp_busy, hap_busy)),
            f2(Self::ratio(icp_busy, hap_default)),
        ));
        t
    }

    /// The halt-polling info rows beside the same contenders as the machine was found.
    fn halt_poll_markdown(&self, machine: &Machine, s: &Summary) -> String {
        let as_found = machine
            .idle
            .halt_poll_ns
            .map_or("?".to_string(), |ns| ns.to_string());
        let mut t = format!(
            "\nWake-up cost (info; a machine setting, the same for every contender): the single-stream probe and the `low` rate again, every contender at its own defaults, with the guest's halt polling at the kernel's default (`guest_halt_poll_ns` {}; this machine: {as_found}). An idle vCPU then polls for up to 200 us before it halts, so waking it costs neither an IPI nor a VM exit. Microseconds, added over S0 under the same setting in parentheses.\n\n",
            guest_idle::KERNEL_DEFAULT_NS
        );
        if let Some(why) = &self.halt_poll.skipped {
            t.push_str(&format!("Not run: {why}.\n"));
            return t;
        }
        let p50 = |r: &LoadResult| r.p50_us;
        let p99 = |r: &LoadResult| r.p99_us;
        let cell = |v: Option<f64>, b: Option<f64>, kind: Kind| match (v, b) {
            (Some(v), Some(b)) if kind != Kind::S0 => format!("{v:.0} ({:+.0})", v - b),
            (Some(v), _) => format!("{v:.0}"),
            _ => "-".into(),
        };
        let polled = |kind: Kind| self.halt_poll.runs.iter().find(|r| r.id == kind.id());
        t.push_str("| contender | 1 stream p50, as found | with halt polling | low p99, as found | with halt polling | errors with halt polling |\n|---|---:|---:|---:|---:|---:|\n");
        for kind in [Kind::S0, Kind::Haproxy, Kind::IcpDirect] {
            let on = polled(kind);
            let s0_on = polled(Kind::S0);
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                kind.label(),
                cell(self.probe(kind, p50), self.probe(Kind::S0, p50), kind),
                cell(
                    on.map(|r| r.probe.p50_us),
                    s0_on.map(|r| r.probe.p50_us),
                    kind
                ),
                cell(
                    self.rate(kind, "low", p99),
                    self.rate(Kind::S0, "low", p99),
                    kind
                ),
                cell(on.map(|r| r.low.p99_us), s0_on.map(|r| r.low.p99_us), kind),
                on.map_or("-".into(), |r| r.errors().to_string()),
            ));
        }
        let f2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        t.push_str(&format!(
            "\nAdded single-stream latency, S4 vs HAProxy, with halt polling: {} (as found: {}).\n",
            f2(s.added_latency_ratio_vs_haproxy_halt_polling),
            f2(s.added_latency_ratio_vs_haproxy),
        ));
        t
    }

    fn markdown(&self, machine: &Machine, stamp: &str) -> String {
        let f0 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let f1 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let f2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let f3 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let s0_sat = self.sat_best(Kind::S0);
        let mut t = String::new();
        t.push_str(&format!(
            "Run {stamp} ({} mode, {} repetitions, medians), {:.0} s. Machine: {}, {} CPUs, kernel {}, {}; {}; {}; {}. Load average (1/5/15 min) at start {}, at end {}; CPUs {} busy in the second before the run.\n\n",
            if self.quick { "quick" } else { "full" },
            self.reps.len(),
            self.elapsed.as_secs_f64(),
            machine.cpu,
            machine.cpus,
            machine.kernel,
            machine.idle.describe(),
            machine.nginx,
            machine.haproxy.split(" - ").next().unwrap_or("?"),
            machine.h2load,
            machine.loadavg.split(' ').take(3).collect::<Vec<_>>().join(" "),
            machine.loadavg_end.split(' ').take(3).collect::<Vec<_>>().join(" "),
            machine
                .busy_at_start
                .map_or("?".into(), |b| format!("{:.0}%", b * 100.0)),
        ));
        t.push_str("Throughput and CPU (h2load; the proxy alone on CPU 1, client and backends on CPU 0):\n\n");
        t.push_str("| contender | rps -c4 -m32 | rps -c16 -m100 | best / S0 | proxy CPU busy | proxy CPU us/req | errors |\n|---|---:|---:|---:|---:|---:|---:|\n");
        for k in ALL {
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                k.label(),
                f0(self.sat_at(k, 0, |s| Some(s.rps))),
                f0(self.sat_at(k, 1, |s| Some(s.rps))),
                f2(Self::ratio(self.sat_best(k), s0_sat)),
                self.sat_at(k, 0, |s| s.cpu_util)
                    .map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
                f1(self.sat_at(k, 0, |s| s.cpu_us_per_req)),
                self.errors(k),
            ));
        }
        t.push_str("\n(S1 runs -c1 -m128 and -c2 -m64: the same 128 streams in flight as -c4 -m32 on its 1 or 2 connections.)\n\n");
        t.push_str("Latency in microseconds, from our client (single stream: one request in flight; fixed rates: open loop, latency from the intended send time, every contender at the same rates). Absolute, with the added latency over S0 in parentheses; `!` marks a contender that fell behind the schedule (overloaded).\n\n");
        let mut cols = vec![("1 stream".to_string(), None)];
        for name in &self.rate_names {
            let rate = self.rates.get(name).copied().unwrap_or(0.0);
            cols.push((format!("{name} {rate:.0}/s"), Some(*name)));
        }
        t.push_str("| contender |");
        for (c, _) in &cols {
            t.push_str(&format!(" {c} p50 | p99 | p99.9 |"));
        }
        t.push_str("\n|---|");
        for _ in &cols {
            t.push_str("---:|---:|---:|");
        }
        t.push('\n');
        for k in ALL {
            let cell = |v: Option<f64>, base: Option<f64>| match (v, base) {
                (Some(v), Some(b)) if k != Kind::S0 => format!("{v:.0} ({:+.0})", v - b),
                (Some(v), _) => format!("{v:.0}"),
                _ => "-".into(),
            };
            t.push_str(&format!("| {} |", k.label()));
            for (_, rate) in &cols {
                let fields: [fn(&LoadResult) -> f64; 3] =
                    [|r| r.p50_us, |r| r.p99_us, |r| r.p999_us];
                for f in fields {
                    let c = match rate {
                        None => cell(self.probe(k, f), self.probe(Kind::S0, f)),
                        Some(name) => {
                            let c = cell(self.rate(k, name, f), self.rate(Kind::S0, name, f));
                            let over =
                                self.reps.iter().filter_map(|r| r.get(&k)).any(|v| {
                                    v.rates.iter().any(|r| r.name == *name && r.overloaded)
                                });
                            if over {
                                format!("{c} !")
                            } else {
                                c
                            }
                        }
                    };
                    t.push_str(&format!(" {c} |"));
                }
            }
            t.push('\n');
        }
        t.push_str("\nRates: `low` = half the slowest proxy's saturation, `icp_half` = half of S4's, `s0_half` = half of S0's (the issue's reference point; S0 has no proxy hop and runs several times faster than any proxy here, so this overloads every proxy).\n");
        if !self.busy_poll.is_empty() {
            t.push_str(&self.busy_poll_markdown());
        }
        let s = self.summary();
        t.push_str(&self.halt_poll_markdown(machine, &s));
        t.push_str("\nBalance with ONE client connection (h2load -c1 -m10, counts per backend) and memory:\n\n");
        t.push_str("| contender | Jain | max/mean | RSS idle MiB | RSS per 1k idle conns MiB |\n|---|---:|---:|---:|---:|\n");
        for k in ALL[1..].iter().copied().filter(|&k| k != Kind::S1x2) {
            let rss = self.rss.get(&k);
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                k.label(),
                f3(self.fair(k, |f| f.jain)),
                f2(self.fair(k, |f| f.max_over_mean)),
                f1(rss.map(|v| v.idle_mib)),
                f1(rss.and_then(|v| v.per_1k_conns_mib)),
            ));
        }
        t.push_str(&format!(
            "| S4 with `--balancer round-robin` (info; not the default) | {} | {} | - | - |\n",
            f3(self.rr_fairness.as_ref().map(|f| f.jain)),
            f2(self.rr_fairness.as_ref().map(|f| f.max_over_mean)),
        ));
        // An added p99 is only meaningful when S0 itself ran clean at that rate.
        let s0_p99 = |name: &str| self.rate(Kind::S0, name, |r| r.p99_us);
        let latency_check = |value: Option<f64>, name: &str| -> &'static str {
            match (value, s0_p99(name)) {
                (Some(_), Some(b)) if b > 5000.0 => {
                    "inconclusive: S0 itself (no proxy) had p99 > 5 ms: CPU 0, which generates this rate open loop and serves it, is saturated"
                }
                // The target for an added p99: 1 ms.
                (Some(v), Some(_)) if v <= 1000.0 => "met",
                (Some(_), Some(_)) => "**missed**",
                _ => "not measured",
            }
        };
        let check = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let rows: Vec<(String, String, &str)> = vec![
            (
                "saturation rps vs HAProxy (S4/S3)".into(),
                f2(s.rps_ratio_vs_haproxy),
                check(s.rps_ratio_vs_haproxy.map(|v| v >= 1.2)),
            ),
            (
                "saturation rps vs nginx (S4/S2)".into(),
                f2(s.rps_ratio_vs_nginx),
                check(s.rps_ratio_vs_nginx.map(|v| v >= 2.5)),
            ),
            (
                "CPU per request vs HAProxy".into(),
                f2(s.cpu_per_req_ratio_vs_haproxy),
                check(s.cpu_per_req_ratio_vs_haproxy.map(|v| v <= 0.8)),
            ),
            (
                "added single-stream latency vs HAProxy".into(),
                f2(s.added_latency_ratio_vs_haproxy),
                check(s.added_latency_ratio_vs_haproxy.map(|v| v <= 0.7)),
            ),
            (
                "the same, with the guest's halt polling at the kernel's default (info: not this machine's setting)".into(),
                f2(s.added_latency_ratio_vs_haproxy_halt_polling),
                check(s.added_latency_ratio_vs_haproxy_halt_polling.map(|v| v <= 0.7)),
            ),
            (
                "added p99 at half of interceptor's saturation, us (S4)".into(),
                f0(s.p99_added_us_at_half_load),
                latency_check(s.p99_added_us_at_half_load, "icp_half"),
            ),
            (
                "added p99 at half of the slowest proxy's saturation, us (S4)".into(),
                f0(s.p99_added_us_at_low_load),
                latency_check(s.p99_added_us_at_low_load, "low"),
            ),
            (
                "added p99 at half of S0's saturation, us (S4)".into(),
                f0(s.p99_added_us_at_half_of_s0),
                latency_check(s.p99_added_us_at_half_of_s0, "s0_half"),
            ),
            (
                "RSS idle, MiB".into(),
                f1(s.rss_idle_mib),
                check(s.rss_idle_mib.map(|v| v <= 15.0)),
            ),
            (
                "RSS per 1k idle conns, MiB".into(),
                f1(s.rss_per_1k_conns_mib),
                check(s.rss_per_1k_conns_mib.map(|v| v <= 15.0)),
            ),
            (
                "endpoints ejected (S4 and S5 logs, every phase)".into(),
                f0(s.ejections.map(|v| v as f64)),
                check(s.ejections.map(|v| v == 0)),
            ),
            (
                "Jain, 1 client connection (S4)".into(),
                f3(s.jain_one_conn),
                check(s.jain_one_conn.map(|v| v >= 0.99)),
            ),
            (
                "max/mean, 1 client connection (S4)".into(),
                f2(s.max_over_mean_one_conn),
                check(s.max_over_mean_one_conn.map(|v| v <= 1.05)),
            ),
            (
                "new endpoint: first request, ms".into(),
                f1(s.new_endpoint_first_request_ms),
                check(s.new_endpoint_first_request_ms.map(|v| v <= 100.0)),
            ),
            (
                "new endpoint: fair share, ms".into(),
                f0(s.new_endpoint_fair_share_ms),
                check(s.new_endpoint_fair_share_ms.map(|v| v <= 1000.0)),
            ),
            (
                "failed requests on endpoint removal".into(),
                f0(s.removal_failed_requests.map(|v| v as f64)),
                check(
                    s.removal_failed_requests
                        .map(|v| v as f64)
                        .map(|v| v == 0.0),
                ),
            ),
            (
                "S5 / S4 saturation (transparent vs direct)".into(),
                f3(s.transparent_vs_direct_ratio),
                check(s.transparent_vs_direct_ratio.map(|v| v >= 0.99)),
            ),
            (
                "connect() hook run time per redirected connect (kernel-accounted), ns".into(),
                f0(s.connect_added_ns),
                check(s.connect_added_ns.map(|v| v <= 1000.0)),
            ),
            (
                "connect() added wall clock, redirect path, ns (noisy)".into(),
                f0(s.connect_added_wall_ns),
                check(s.connect_added_wall_ns.map(|v| v <= 1000.0)),
            ),
            (
                "connect() hook run time, pass path (kernel-accounted), ns".into(),
                f0(s.connect_pass_kernel_ns),
                check(s.connect_pass_kernel_ns.map(|v| v <= 1000.0)),
            ),
            (
                "errors (all contenders, all phases)".into(),
                f0(Some(s.errors as f64)),
                check(Some(s.errors as f64).map(|v| v == 0.0)),
            ),
        ];
        t.push_str("\nTargets for interceptor:\n\n| metric | value | target |\n|---|---:|---|\n");
        for (m, v, c) in rows {
            t.push_str(&format!("| {m} | {v} | {c} |\n"));
        }
        t.push_str("\nNotes:\n\n");
        for n in &s.notes {
            t.push_str(&format!("- {n}\n"));
        }
        if let Some(d) = s.s0_drift {
            t.push_str(&format!(
                "\nS0 saturation (-c4 -m32) drift between repetitions: {:.1}%{}.\n",
                d * 100.0,
                if s.noisy { " (noisy run)" } else { "" }
            ));
        }
        t
    }
}
