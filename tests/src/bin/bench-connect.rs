//! `cargo xtask bench-connect`: what the connect hook adds to connect(), measured in a pod of a
//! test node (netns + cgroup), with the real eBPF object. Prints a table; asserts nothing.
//!
//! Three paths, each timed with the hook detached and attached, interleaved over rounds:
//! - service: what the app sees. It dials a Service ClusterIP; detached, kube-proxy (an
//!   nftables DNAT in the node) sends it to a backend pod over the veth; attached, the hook
//!   sends it to the pod-local listener;
//! - redirect: the program's own cost: the same ClusterIP dial attached, against a baseline
//!   that dials where the hook sends it (the Service's redirect address, 127.100.0.0:15001 for
//!   the first slot, on the pod-local listener) directly, so only the hook differs;
//! - pass: the app dials something that is not a Service (a listener on 127.0.0.1:15002);
//!   the hook runs, looks up, and leaves it alone.
//!
//! Plus the kernel's own accounting of each program's run time (kernel.bpf_stats_enabled).

use std::net::SocketAddr;
use std::time::Duration;

use interceptor::app::Agent;
use interceptor::bpf::{Datapath, DatapathConfig, ServiceAction};
use interceptor::discovery::model::PodCgroup;
use interceptor_tests::{bpftool_json, ChildGuard, Node, PinRoot, Pod};

const LISTEN_PORT: u16 = 15001;
/// The client runs on this CPU and everything else (the listener's accept loop, the sinks) on
/// the others: on a small machine a measurement otherwise shares its CPU with whichever
/// process the scheduler puts there, which moves the medians by more than the hook costs.
const CLIENT_CPU: usize = 1;

/// Many short rounds rather than a few long ones: on this kind of machine a round's median moves
/// by a few microseconds with whatever else runs, so the hook's cost only shows in the median
/// of many paired (same-round) differences. Rounds alternate which state goes first, so drift
/// does not always count against the same side.
const ROUNDS: usize = 101;

/// A path's name and its per-round samples, detached and attached.
type Row = (&'static str, Vec<Sample>, Vec<Sample>);

#[derive(Default, Clone, Copy)]
struct Sample {
    median: u64,
    p99: u64,
}

fn time_connects(pod: &Pod, to: SocketAddr, count: u32) -> Sample {
    let out = pod.run(
        &[
            "connect-bench",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--cpu",
            &CLIENT_CPU.to_string(),
        ],
        Duration::from_secs(300),
    );
    let fields: Vec<u64> = out[0]
        .split_whitespace()
        .map(|f| f.parse().expect("number"))
        .collect();
    Sample {
        median: fields[1],
        p99: fields[2],
    }
}

/// Runs this process (and the children it starts) on every CPU but `cpu`.
fn keep_off_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("one CPU: client and listener share it");
        return;
    }
    interceptor_tests::run_on_cpus((0..cpus).filter(|c| *c != cpu));
}

/// A listener that only accepts and closes, fast enough that its queue never overflows.
fn sink(pod: &Pod, port: u16) -> ChildGuard {
    let mut child = pod.spawn(&["sink", "--port", &port.to_string()]);
    child.wait_ready(&format!("sink on port {port} in {}", pod.name));
    child
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .map(|c| c.parse().expect("connect count"))
        .unwrap_or(2_000);
    keep_off_cpu(CLIENT_CPU);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();

    let node = Node::new();
    let pod = node.add_pod("bench", 1);
    let backend = node.add_pod("backend", 2);
    let _backend_server = sink(&backend, 80);
    pod.netns.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65000"],
    );
    let pins = PinRoot::new();
    let mut datapath = Datapath::load(&DatapathConfig {
        pin_root: pins.path.clone(),
        listen_port: LISTEN_PORT,
        kernel_debug_log: false,
        replace_stale_pins: false,
    })
    .expect("load the eBPF datapath");
    // The listener only has to exist and accept; connections are dropped at once.
    let drop_handler: interceptor::proxy::pod_listener::Handler =
        std::sync::Arc::new(|_conn| Box::pin(async {}));
    let mut agent = Agent::new(&datapath, LISTEN_PORT, drop_handler);
    let svc: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    node.kube_proxy(&[(svc, vec![std::net::IpAddr::V4(backend.ip4)])]);
    agent
        .set_services(&mut datapath, &[(svc, ServiceAction::Intercept)])
        .expect("service");
    let static_pod = PodCgroup {
        name: "bench/pod".into(),
        cgroup: pod.cgroup.path.clone(),
    };
    let id = agent
        .enable_pod(&mut datapath, &static_pod)
        .expect("enable pod");
    // A plain listener that is not a Service, for the pass path.
    let _other = sink(&pod, 15002);

    // The only Service has the first redirect slot: the hook sends its connects here.
    let listener = SocketAddr::from((interceptor_common::redirect_ip4(0), LISTEN_PORT));
    let other: SocketAddr = "127.0.0.1:15002".parse().expect("addr");
    let mut rows: Vec<Row> = vec![
        ("service", vec![], vec![]),
        ("redirect", vec![], vec![]),
        ("pass", vec![], vec![]),
    ];
    let stats_was = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    for round in 0..ROUNDS {
        if round % 10 == 0 {
            eprintln!(
                "round {}/{ROUNDS}: {count} connects per measurement",
                round + 1
            );
        }
        let detached = |datapath: &mut Datapath, rows: &mut Vec<Row>| {
            datapath.disable_pod(id).expect("detach");
            rows[0].1.push(time_connects(&pod, svc, count));
            rows[1].1.push(time_connects(&pod, listener, count));
            rows[2].1.push(time_connects(&pod, other, count));
        };
        let attached = |datapath: &mut Datapath, rows: &mut Vec<Row>| {
            datapath.enable_pod(&pod.cgroup.path).expect("attach");
            let redirected = time_connects(&pod, svc, count);
            rows[0].2.push(redirected);
            rows[1].2.push(redirected);
            rows[2].2.push(time_connects(&pod, other, count));
        };
        if round % 2 == 0 {
            detached(&mut datapath, &mut rows);
            attached(&mut datapath, &mut rows);
        } else {
            attached(&mut datapath, &mut rows);
            detached(&mut datapath, &mut rows);
        }
    }
    datapath.enable_pod(&pod.cgroup.path).expect("attach");
    // Run-time accounting costs two clock reads per program run: measured in passes of their
    // own, per path, so it does not inflate the latencies above.
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enable bpf stats");
    let mut run_times = Vec::new();
    for (name, to) in [("redirect", svc), ("pass", other)] {
        let before = prog_run_stats();
        time_connects(&pod, to, count);
        let after = prog_run_stats();
        for (prog, (cnt, ns)) in after {
            let (c0, n0) = before.get(&prog).copied().unwrap_or((0, 0));
            if cnt > c0 {
                run_times.push((
                    name,
                    prog,
                    cnt - c0,
                    (ns - n0) / (cnt - c0),
                    (ns - n0) / u64::from(count),
                ));
            }
        }
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_was.trim())
        .expect("restore bpf stats");

    println!("\nconnect() latency in a pod, hook detached vs attached ({count} connects x {ROUNDS} rounds; medians of the per-round medians, added = median of the per-round differences)\n");
    println!(
        "| path | detached median | attached median | added median | detached p99 | attached p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, detached, attached) in &rows {
        let dm = median(detached.iter().map(|s| s.median as i64).collect());
        let am = median(attached.iter().map(|s| s.median as i64).collect());
        let added = median(
            detached
                .iter()
                .zip(attached)
                .map(|(d, a)| a.median as i64 - d.median as i64)
                .collect(),
        );
        let dp = median(detached.iter().map(|s| s.p99 as i64).collect());
        let ap = median(attached.iter().map(|s| s.p99 as i64).collect());
        println!("| {name} | {dm} ns | {am} ns | {added} ns | {dp} ns | {ap} ns |");
    }

    println!("\nkernel-accounted program run time, bpf_stats on, one extra attached pass per path ({count} connects)\n");
    println!("| path | program | runs | ns per run | ns per connect |");
    println!("|---|---|---:|---:|---:|");
    for (path, prog, runs, per_run, per_connect) in run_times {
        println!("| {path} | {prog} | {runs} | {per_run} | {per_connect} |");
    }
    agent.close_all();
    drop(datapath);
}

/// (run_cnt, run_time_ns) of each of our loaded programs, by name.
fn prog_run_stats() -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for prog in bpftool_json(&["prog", "list"])
        .as_array()
        .expect("prog list")
    {
        let name = prog["name"].as_str().unwrap_or_default();
        if interceptor_common::names::PROGRAMS.contains(&name) {
            let e = out.entry(name.to_string()).or_insert((0, 0));
            e.0 += prog["run_cnt"].as_u64().unwrap_or(0);
            e.1 += prog["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    out
}
