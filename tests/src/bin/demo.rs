//! `cargo xtask demo`: interceptor end to end on one machine, no cluster. A node is built
//! from network namespaces and cgroups laid out like the kubelet's; the agent runs on the file
//! source (a manifest of real Kubernetes objects this demo writes and edits); three "greet"
//! gRPC server pods sit behind a ClusterIP Service that an emulated kube-proxy (nftables
//! random DNAT) serves; a client pod keeps ONE gRPC channel and counts which pod answered.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use interceptor_tests::cluster::{vip, GreetCluster, Spec, Tallies, NS};
use interceptor_tests::greet;

fn progress(t: &Tallies, phase: &str, since: &greet::TallyLine) {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    let w = t.last.since(since);
    let calls: u64 = w.values().sum();
    eprint!(
        "\r  {phase}: {calls:>6} calls, {} errors   ",
        t.last.errors - since.errors
    );
    let _ = std::io::stderr().flush();
}

/// Runs the client for `d`, with a progress line; returns the calls per pod in that window.
fn phase_window(t: &mut Tallies, phase: &str, d: Duration) -> (BTreeMap<String, u64>, u64) {
    let start = t.last.clone();
    let end = Instant::now() + d;
    while Instant::now() < end {
        t.window(Duration::from_millis(100));
        progress(t, phase, &start);
    }
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    (t.last.since(&start), t.last.errors - start.errors)
}

fn table(title: &str, counts: &BTreeMap<String, u64>, pods: &[String], errors: u64) {
    let total: u64 = counts.values().sum();
    println!("\n{title}  ({total} calls, {errors} failed)");
    println!("  {:<10} {:>7} {:>7}", "pod", "calls", "share");
    for p in pods {
        let n = counts.get(p).copied().unwrap_or(0);
        let share = 100.0 * n as f64 / total.max(1) as f64;
        println!(
            "  {p:<10} {n:>7} {share:>6.1}%  {}",
            "#".repeat((share / 2.5) as usize)
        );
    }
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo builds network namespaces and cgroups and loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
        std::process::exit(1);
    }
    println!("interceptor demo: a node in network namespaces, 3 greet gRPC pods behind Service {NS}/greet ({}), one client pod with ONE gRPC channel", vip());
    let mut c = GreetCluster::new(&[10, 11, 12]);
    let mut spec = Spec::new(false, &[10, 11, 12]);
    c.write(&spec);
    println!("manifest (file source): {}", c.manifests.display());
    let agent = c.start_agent();
    println!(
        "agent running (admin endpoint {}), namespace {NS} not labelled yet",
        agent.admin_addr()
    );

    // Phase 1: kube-proxy alone balances per connection: one channel, one pod.
    let mut t = c.client_run(30);
    let (before, errors) = phase_window(&mut t, "before", Duration::from_secs(2));
    table(
        "before: kube-proxy only (per-connection balancing)",
        &before,
        &c.server_names(),
        errors,
    );
    drop(t);

    // Phase 2: label the namespace. New connections are intercepted (existing ones are left
    // alone), so the client opens its channel again, as it would after any reconnect.
    spec.labelled = true;
    let at = c.write(&spec);
    while !c.client_hooked() && at.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "\nlabelled namespace {NS} interceptor.io/enabled=true: client pod hooked {} ms later; the client reconnects once and keeps that ONE channel from here on",
        at.elapsed().as_millis()
    );
    let mut t = c.client_run(60);
    let (after, errors) = phase_window(&mut t, "labelled", Duration::from_secs(3));
    table(
        "after labelling: per-request balancing",
        &after,
        &c.server_names(),
        errors,
    );

    // Phase 3: scale up to 4 on the same channel.
    c.add_server(13);
    c.program_kube_proxy();
    spec.endpoints.push(13);
    let at = c.write(&spec);
    let first = t.until(Duration::from_secs(5), "greet-13 gets a call", |l| {
        l.by_pod.get("greet-13").copied().unwrap_or(0) > 0
    });
    let fair_at = interceptor_tests::cluster::fair_share_reached(&mut t, "greet-13", 4, 0.8, at);
    println!(
        "\nscaled to 4 server pods: greet-13's first call {} ms after the EndpointSlice changed, a fair share by {} ms",
        first.duration_since(at).as_millis(),
        fair_at.duration_since(at).as_millis()
    );
    let (scaled, errors) = phase_window(&mut t, "scaled", Duration::from_secs(3));
    let pods = c.server_names();
    table("scaled to 4 (same channel)", &scaled, &pods, errors);
    println!(
        "\nbalance: pods={} jain={:.3} max/mean={:.2}",
        pods.len(),
        greet::jain(&scaled, &pods),
        greet::max_over_mean(&scaled, &pods)
    );
    drop(t);
    drop(agent);
}
