//! The operator's commands: `status`, `explain`, `uninstall`. They read the agent's admin
//! endpoint when it answers and the pins (which outlive the agent) always, so they work at
//! 3 a.m. with the agent crash-looping.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::admin;
use crate::bpf::{self, ServiceAction};
use crate::cli::{ExplainArgs, PinArgs, StatusArgs};
use crate::discovery::model::{ExcludeReason, PortAction, ServicePort};
use crate::state::AgentState;

/// The agent's `/state`, or why it could not be read.
fn agent_state(addr: SocketAddr) -> Result<AgentState, String> {
    match admin::get(addr, "/state") {
        Ok((200, body)) => serde_json::from_str(&body)
            .map_err(|e| format!("unreadable /state (an agent of another version?): {e}")),
        Ok((code, body)) => Err(format!("HTTP {code}: {}", body.trim())),
        Err(e) => Err(e.to_string()),
    }
}

fn endpoint_summary(port: &ServicePort) -> String {
    let ready = port.endpoints.iter().filter(|e| e.ready).count();
    let terminating = port.endpoints.iter().filter(|e| e.terminating).count();
    format!(
        "{} endpoints ({ready} ready, {terminating} terminating)",
        port.endpoints.len()
    )
}

/// One line per endpoint the Service lists but this node leaves out, with the reason.
fn skipped_endpoint_lines(port: &ServicePort) -> Vec<String> {
    port.skipped_endpoints
        .iter()
        .map(|e| format!("endpoint {} not used: {}", e.addr, e.reason))
        .collect()
}

fn service_label(port: &ServicePort) -> String {
    match &port.port_name {
        Some(p) => format!("{}:{p}", port.service),
        None => port.service.to_string(),
    }
}

fn action_text(port: &ServicePort) -> String {
    match port.action {
        PortAction::Intercept => {
            if port.semantics.is_empty() {
                format!("intercepted, {}", endpoint_summary(port))
            } else {
                format!(
                    "intercepted, {}; {}",
                    endpoint_summary(port),
                    port.semantics.join("; ")
                )
            }
        }
        PortAction::Exclude => {
            let why = match port.exclude_reason {
                Some(ExcludeReason::ServiceAnnotation) => {
                    "Service annotation interceptor.io/intercept=false"
                }
                Some(ExcludeReason::SkipPortsAnnotation) => {
                    "Service annotation interceptor.io/skip-ports"
                }
                Some(ExcludeReason::ExcludedPort) => {
                    "port in --exclude-ports (server-first protocol)"
                }
                None => "excluded",
            };
            format!("not intercepted: {why}")
        }
    }
}

/// `interceptor status`.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    match agent_state(args.admin_addr) {
        Ok(state) => {
            println!(
                "agent: running (admin {}), {} , state generation {}",
                args.admin_addr,
                if state.ready { "ready" } else { "not ready" },
                state.generation
            );
            println!("pods to intercept on this node ({}):", state.pods.len());
            for (uid, p) in &state.pods {
                if p.intercepted {
                    println!(
                        "  {:<40} intercepted  cgroup id {}  uid {uid}",
                        p.pod,
                        p.cgroup_id.unwrap_or(0)
                    );
                } else {
                    println!(
                        "  {:<40} PENDING  {}",
                        p.pod,
                        p.error.as_deref().unwrap_or("")
                    );
                }
            }
            let skipped = &state.desired.skipped_pods;
            if !skipped.is_empty() {
                println!("pods on this node left alone ({}):", skipped.len());
                for (pod, why) in skipped {
                    println!("  {pod:<40} {why}");
                }
            }
            let services = &state.desired.services;
            println!("service ports ({}):", services.len());
            for (addr, port) in services {
                println!(
                    "  {:<24} {:<32} {}",
                    addr.to_string(),
                    service_label(port),
                    action_text(port)
                );
                for line in skipped_endpoint_lines(port) {
                    println!("  {:<24} {line}", "");
                }
            }
        }
        Err(e) => println!(
            "agent: not reachable at {} ({e}); showing what the pins say",
            args.admin_addr
        ),
    }
    pins_status(&args.pins)
}

fn pins_status(args: &PinArgs) -> anyhow::Result<()> {
    let layout = bpf::PinLayout::new(&args.pin_root);
    if !layout.dir().exists() {
        println!(
            "pins: none under {} (no hooks installed: every connect goes straight to kube-proxy)",
            layout.dir().display()
        );
        return Ok(());
    }
    println!("pins: {}", layout.dir().display());
    let pods = bpf::pinned_pods(&args.pin_root)?;
    println!("hooked pod cgroups ({}):", pods.len());
    for id in pods {
        println!("  cgroup id {id}");
    }
    let listeners = bpf::read_pinned_listeners(&args.pin_root)?;
    let v6 = listeners.iter().filter(|(_, v6)| *v6).count();
    let pods: BTreeSet<u64> = listeners.iter().map(|(cookie, _)| *cookie).collect();
    println!(
        "pod-local listeners: {} in {} pod netns ({} IPv4, {v6} IPv6){}",
        listeners.len(),
        pods.len(),
        listeners.len() - v6,
        if listeners.is_empty() {
            ": none, so every hooked pod's connects go to kube-proxy (agent down?)"
        } else {
            ""
        }
    );
    let services = bpf::read_pinned_services(&args.pin_root)?;
    println!("kernel service entries: {}", services.len());
    println!("kernel counters:");
    for (stat, value) in bpf::read_pinned_stats(&args.pin_root)? {
        println!("  {:<15} {value}", stat.label());
    }
    Ok(())
}

/// `interceptor explain <pod> <ip:port>`: each check in the order the hook makes them.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let target = args.target;
    let pin_root = &args.status.pins.pin_root;
    let hooked: BTreeSet<u64> = bpf::pinned_pods(pin_root)
        .map(|v| v.into_iter().map(|c| c.0).collect())
        .unwrap_or_default();
    let kernel_entry = bpf::read_pinned_services(pin_root).ok().and_then(|s| {
        s.into_iter()
            .find(|(a, _)| *a == target)
            .map(|(_, act)| act)
    });
    println!("explain: connect from {} to {target}", args.pod);
    let mut verdict: Option<String> = None;
    let mut fail = |why: String| {
        println!("  [no]  {why}");
        if verdict.is_none() {
            verdict = Some(why);
        }
    };

    let state = agent_state(args.status.admin_addr);
    match &state {
        Ok(_) => println!("  [ok]  agent reachable at {}", args.status.admin_addr),
        Err(e) => fail(format!(
            "agent not reachable at {} ({e}): its pod-local listeners are gone, so the hooks fail open and every connect goes to kube-proxy",
            args.status.admin_addr
        )),
    }
    if let Ok(state) = &state {
        let pod = state.pods.values().find(|p| p.pod == args.pod);
        match pod {
            Some(p) if p.intercepted => {
                let id = p.cgroup_id.unwrap_or(0);
                println!("  [ok]  pod {} is intercepted (cgroup id {id})", args.pod);
                if !hooked.contains(&id) {
                    fail(format!("no hook pinned for cgroup id {id} under {}: run `bpftool cgroup tree` and check the agent log", pin_root.display()));
                } else {
                    println!("  [ok]  hooks pinned for cgroup id {id}");
                }
            }
            Some(p) => fail(format!(
                "pod {} should be intercepted but is not yet: {}",
                args.pod,
                p.error.as_deref().unwrap_or("")
            )),
            None => match state.desired.skipped_pods.get(&args.pod) {
                Some(why) => fail(format!("pod {} is left alone: {why}", args.pod)),
                None => fail(format!(
                    "pod {} is not known on this node (not scheduled here, or not yet seen): run explain on the agent of the pod's node",
                    args.pod
                )),
            },
        }
        match state.desired.services.get(&target) {
            Some(port) => {
                let text = action_text(port);
                if port.action == PortAction::Intercept {
                    println!("  [ok]  {target} is {} of {}", text, service_label(port));
                    for line in skipped_endpoint_lines(port) {
                        println!("  [--]  {line}");
                    }
                } else {
                    fail(format!("{target} ({}) is {text}", service_label(port)));
                }
            }
            None => fail(format!(
                "{target} is not a ClusterIP:port of any TCP Service: the connect goes where it was going (pod IPs, headless Services, UDP and external addresses are never intercepted)"
            )),
        }
    }
    match kernel_entry {
        Some(ServiceAction::Intercept) => {
            println!("  [ok]  kernel map icp_services has {target}: intercept")
        }
        Some(ServiceAction::Exclude) => fail(format!(
            "kernel map icp_services has {target} marked excluded"
        )),
        None => fail(format!("kernel map icp_services has no entry for {target}")),
    }
    match verdict {
        None => println!("verdict: INTERCEPTED: the connect is redirected to the pod-local listener, and each HTTP/2 stream and HTTP/1.1 request is balanced over the Service's endpoints (upgrades, CONNECT, TLS and other protocols: one endpoint per connection)"),
        Some(why) => println!("verdict: NOT intercepted: {why}"),
    }
    Ok(())
}

/// `interceptor uninstall`.
pub fn uninstall(args: &PinArgs) -> anyhow::Result<()> {
    let removed = bpf::uninstall(&args.pin_root)?;
    println!(
        "removed {} hook links and {} maps under {}: pods' new connections now go straight to their Services",
        removed.links,
        removed.maps,
        args.pin_root.display()
    );
    Ok(())
}
