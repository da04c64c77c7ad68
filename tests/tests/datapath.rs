//! The eBPF interception datapath, end to end, on this kernel: the real object loaded, hooks
//! attached to pod cgroups, pod-local listeners inside pod netns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use interceptor::app::Agent;
use interceptor::bpf::{CgroupId, Datapath, DatapathConfig, ServiceAction};
use interceptor::discovery::model::PodCgroup;
use interceptor_common::names;
use interceptor_tests::*;

const LISTEN_PORT: u16 = 15001;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn load_datapath(pins: &PinRoot) -> Datapath {
    Datapath::load(&DatapathConfig {
        pin_root: pins.path.clone(),
        listen_port: LISTEN_PORT,
        kernel_debug_log: false,
        replace_stale_pins: false,
    })
    .expect("load the eBPF datapath")
}

/// The agent in this process, with the echo handler: each intercepted connection is told the
/// original destination the agent recovered for it.
fn in_process_agent(
    pins: &PinRoot,
    services: &[(SocketAddr, ServiceAction)],
    pods: &[&Pod],
) -> (Datapath, Agent, Vec<CgroupId>) {
    let mut datapath = load_datapath(pins);
    let mut agent = Agent::new(&datapath, LISTEN_PORT, echo_orig_handler());
    agent
        .set_services(&mut datapath, services)
        .expect("set services");
    let ids = pods
        .iter()
        .map(|pod| {
            agent
                .enable_pod(&mut datapath, &static_pod(pod))
                .expect("enable pod")
        })
        .collect();
    (datapath, agent, ids)
}

/// `bpftool cgroup show` lists no program on the pod's cgroup.
fn assert_no_hooks(pod: &Pod, when: &str) {
    let attached = bpftool_json(&["cgroup", "show", pod.cgroup.path.to_str().expect("utf-8")]);
    assert_eq!(
        attached.as_array().map(Vec::len),
        Some(0),
        "hooks still attached {when}: {attached}"
    );
}

fn static_pod(pod: &Pod) -> PodCgroup {
    PodCgroup {
        name: format!("default/{}", pod.name),
        cgroup: pod.cgroup.path.clone(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_recovers_the_original_destination_v4_v6_and_v4_mapped() {
    let node = Node::new();
    let client = node.add_pod("client", 1);
    let pins = PinRoot::new();
    let svc4 = sa("10.96.0.10:80");
    let svc6 = sa("[fd00:96::10]:8080");
    let services = [
        (svc4, ServiceAction::Intercept),
        (svc6, ServiceAction::Intercept),
    ];
    let (_datapath, mut agent, _) = in_process_agent(&pins, &services, &[&client]);

    // A v4-mapped destination on an AF_INET6 socket is the same Service as its IPv4 form.
    let cases = [
        (svc4, svc4),
        (svc6, svc6),
        (sa("[::ffff:10.96.0.10]:80"), svc4),
    ];
    for (dialled, service) in cases {
        let lines = client.run(
            &[
                "connect",
                "--to",
                &dialled.to_string(),
                "--count",
                "50",
                "--concurrency",
                "50",
            ],
            RUN_TIMEOUT,
        );
        assert_eq!(lines.len(), 50, "one result per connection for {dialled}");
        for line in &lines {
            let conn = parse_ok(line);
            assert_eq!(
                conn.reply,
                format!("ORIG {service}"),
                "agent recovered the wrong destination for {dialled}"
            );
            assert_eq!(
                conn.peer, dialled,
                "getpeername must return what the app dialled"
            );
            assert!(
                is_loopback(&conn.local),
                "{dialled}: connection was not redirected to the pod-local listener: {line}"
            );
        }
    }
    let stats = pinned_stats(&pins.path);
    assert!(stats["redirected"] >= 150, "counters: {stats:?}");
    assert!(stats["peer_rewritten"] >= 150, "counters: {stats:?}");
    agent.close_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pods_with_colliding_loopback_tuples_each_get_their_own_destination() {
    const PODS: u8 = 10;
    const PER_POD: usize = 100;
    let node = Node::new();
    let pods: Vec<Pod> = (1..=PODS)
        .map(|n| node.add_pod(&format!("c{n}"), n))
        .collect();
    let pins = PinRoot::new();
    // Half IPv4 (told apart by their redirect address), half IPv6 (by the client socket's
    // cookie, looked up through each pod's own sock_diag socket).
    let services: Vec<SocketAddr> = (1..=10)
        .map(|i| match i {
            1..=5 => sa(&format!("10.96.1.{i}:{}", 8000 + i)),
            _ => sa(&format!("[fd00:96::1:{i}]:{}", 8000 + i)),
        })
        .collect();
    let entries: Vec<_> = services
        .iter()
        .map(|s| (*s, ServiceAction::Intercept))
        .collect();
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    let (_datapath, mut agent, _) = in_process_agent(&pins, &entries, &pod_refs);

    // Every pod binds the same client ports (41000..41099) and, after the rewrite, dials the same
    // pod-local listener addresses: identical 4-tuples in all ten pods, each in its own netns.
    let targets: Vec<String> = services.iter().map(ToString::to_string).collect();
    // Pod p's connection i dials service (i + p) % 10, so a mix-up between pods shows.
    let children: Vec<(usize, ChildGuard)> = pods
        .iter()
        .enumerate()
        .map(|(p, pod)| {
            let mut rotated = targets.clone();
            rotated.rotate_left(p);
            let args = [
                "connect-many",
                "--targets",
                &rotated.join(","),
                "--count",
                &PER_POD.to_string(),
                "--bind-base",
                "41000",
            ];
            (p, pod.spawn(&args))
        })
        .collect();
    let mut ports_seen: BTreeMap<u16, usize> = BTreeMap::new();
    let mut total = 0;
    for (p, child) in children {
        let out = child.wait_output(RUN_TIMEOUT);
        assert!(
            out.status.success(),
            "pod {p} client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), PER_POD, "pod {p}: one line per connection");
        for line in lines {
            let (dialled, result) = line.split_once(' ').expect("<target> <result>");
            let conn = parse_ok(result);
            assert_eq!(
                conn.reply,
                format!("ORIG {dialled}"),
                "pod {p}: wrong original destination"
            );
            assert_eq!(conn.peer.to_string(), dialled, "pod {p}: getpeername");
            assert!(
                conn.local.ip().is_loopback(),
                "pod {p}: not redirected: {line}"
            );
            *ports_seen.entry(conn.local.port()).or_default() += 1;
            total += 1;
        }
    }
    assert_eq!(total, PODS as usize * PER_POD);
    // The collision the test is about really happened: each client port was used in every pod.
    assert_eq!(ports_seen.len(), PER_POD, "client ports: {ports_seen:?}");
    assert!(
        ports_seen.values().all(|n| *n == PODS as usize),
        "client ports: {ports_seen:?}"
    );
    agent.close_all();
}

/// Backends b1..b3 answer their name; kube-proxy spreads the Service VIPs over them.
struct ServiceNode {
    // Backends go before the node that routes them.
    backends: Vec<(Pod, ChildGuard)>,
    node: Node,
}

fn service_node(services: &[SocketAddr], ports: &str) -> ServiceNode {
    let node = Node::new();
    let backends: Vec<(Pod, ChildGuard)> = (1..=3)
        .map(|i| {
            let pod = node.add_pod(&format!("b{i}"), 10 + i);
            let server = pod.serve(ports);
            (pod, server)
        })
        .collect();
    let kp: Vec<(SocketAddr, Vec<IpAddr>)> = services
        .iter()
        .map(|svc| {
            let ips = backends
                .iter()
                .map(|(b, _)| {
                    if svc.is_ipv4() {
                        IpAddr::V4(b.ip4)
                    } else {
                        IpAddr::V6(b.ip6)
                    }
                })
                .collect();
            (*svc, ips)
        })
        .collect();
    node.kube_proxy(&kp);
    ServiceNode { backends, node }
}

impl ServiceNode {
    fn backend_names(&self) -> BTreeSet<String> {
        self.backends.iter().map(|(p, _)| p.name.clone()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untouched_cases_reach_where_they_would_without_interceptor() {
    let svc = sa("10.96.0.10:80");
    let excluded = sa("10.96.0.10:3306");
    let unknown = sa("10.96.0.20:81");
    let sn = service_node(&[svc, excluded, unknown], "80,81,3306");
    let client = sn.node.add_pod("client", 1);
    let other = sn.node.add_pod("other", 2);
    let pins = PinRoot::new();
    let services = [
        (svc, ServiceAction::Intercept),
        (excluded, ServiceAction::Exclude),
    ];
    let (mut datapath, mut agent, ids) = in_process_agent(&pins, &services, &[&client]);
    let client_id = ids[0];
    let names = sn.backend_names();
    let landed_on_backend = |pod: &Pod, line: &str, what: &str| {
        let conn = parse_ok(line);
        assert!(
            names.contains(&conn.reply),
            "{what}: expected a backend's answer, got {line}"
        );
        assert_eq!(
            conn.local.ip(),
            IpAddr::V4(pod.ip4),
            "{what}: must leave from the pod's own IP: {line}"
        );
    };
    let one = |pod: &Pod, args: &[&str]| pod.run(args, RUN_TIMEOUT).pop().expect("one result line");

    let before = pinned_stats(&pins.path);
    // Sanity: the enabled pod's Service connect is intercepted.
    let line = one(&client, &["connect", "--to", &svc.to_string()]);
    assert_eq!(
        parse_ok(&line).reply,
        format!("ORIG {svc}"),
        "enabled pod, known Service: {line}"
    );
    // A pod that is not enabled: the hook is not attached to its cgroup.
    landed_on_backend(
        &other,
        &one(&other, &["connect", "--to", &svc.to_string()]),
        "pod not enabled",
    );
    // An enabled pod dialling a ClusterIP interceptor does not know.
    landed_on_backend(
        &client,
        &one(&client, &["connect", "--to", &unknown.to_string()]),
        "unknown destination",
    );
    // An excluded (server-first) port of a known Service.
    landed_on_backend(
        &client,
        &one(&client, &["connect", "--to", &excluded.to_string()]),
        "excluded port",
    );
    // UDP to the intercepted Service port: left to kube-proxy.
    let udp = one(&client, &["udp", "--to", &svc.to_string()]);
    assert!(
        names.contains(&parse_ok(&udp).reply),
        "UDP: expected a backend's answer, got {udp}"
    );
    let after = pinned_stats(&pins.path);
    for (label, min) in [
        ("redirected", 1),
        ("no_service", 1),
        ("excluded", 1),
        ("not_tcp", 1),
    ] {
        assert!(
            after[label] >= before[label] + min,
            "counter {label} did not count: {before:?} -> {after:?}"
        );
    }

    // Disabling the pod detaches its hooks: the same connect now goes to kube-proxy.
    agent
        .disable_pod(&mut datapath, client_id)
        .expect("disable client");
    landed_on_backend(
        &client,
        &one(&client, &["connect", "--to", &svc.to_string()]),
        "pod disabled",
    );
    assert_no_hooks(&client, "after disable");
}

fn agent_args(pins: &PinRoot, pods: &[&Pod], services: &[SocketAddr]) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--source=static".to_string(),
        "--pin-root".into(),
        pins.path.display().to_string(),
    ];
    for pod in pods {
        args.push("--pod".into());
        args.push(format!(
            "default/{}={}",
            pod.name,
            pod.cgroup.path.display()
        ));
    }
    for svc in services {
        args.push("--service".into());
        args.push(svc.to_string());
    }
    args
}

#[test]
fn fail_open_when_the_agent_is_killed_and_resume_on_restart() {
    let svc = sa("10.96.0.10:80");
    let sn = service_node(&[svc], "80");
    let client = sn.node.add_pod("client", 1);
    let pins = PinRoot::new();
    let args = agent_args(&pins, &[&client], &[svc]);
    let agent = AgentProcess::start(&args);

    let loop_started = Instant::now();
    let looping = client.spawn(&[
        "loop",
        "--to",
        &svc.to_string(),
        "--duration-ms",
        "6000",
        "--interval-ms",
        "20",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = loop_started.elapsed().as_millis() as u64;
    agent.kill9();
    // What the operator sees with the agent down: hooks pinned, no listener registered.
    let status = run(
        target_bin("interceptor").to_str().expect("utf-8"),
        &["status", "--pin-root", pins.path.to_str().expect("utf-8")],
    );
    assert!(
        status.contains("pod-local listeners: 0 in 0 pod netns")
            && status.contains("hooked pod cgroups (1)"),
        "{status}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let restart_at = loop_started.elapsed().as_millis() as u64;
    let agent = AgentProcess::start(&args);
    let ready_at = loop_started.elapsed().as_millis() as u64;
    let out = looping.wait_output(RUN_TIMEOUT);
    assert!(out.status.success(), "client loop failed");
    let text = String::from_utf8_lossy(&out.stdout);
    note(&format!(
        "agent killed at {killed_at} ms, restarted at {restart_at} ms, ready at {ready_at} ms"
    ));

    let names = sn.backend_names();
    let (mut intercepted_before, mut direct_while_down, mut intercepted_after, mut failures) =
        (0, 0, 0, Vec::new());
    for line in text.lines() {
        let (at, result) = line.split_once(' ').expect("<ms> <result>");
        let at: u64 = at.parse().expect("ms");
        if result.starts_with("ERR") {
            failures.push((at, result.to_string()));
            continue;
        }
        let conn = parse_ok(result);
        if conn.reply.is_empty() {
            // Closed before the reply: the agent that held the connection was killed. Judged
            // with the connect errors below (only one in flight at the kill may end so).
            failures.push((at, result.to_string()));
            continue;
        }
        assert!(
            names.contains(&conn.reply),
            "at {at} ms the connect did not reach the Service: {line}"
        );
        let intercepted = conn.local.ip().is_loopback();
        // Margins absorb the few ms between this clock and the client's.
        if at + 200 < killed_at {
            assert!(
                intercepted,
                "before the kill every connect is intercepted: {line}"
            );
            intercepted_before += 1;
        } else if at > killed_at + 200 && at + 200 < restart_at {
            assert!(
                !intercepted,
                "while the agent is down the hook must fail open: {line}"
            );
            direct_while_down += 1;
        } else if at > ready_at + 200 {
            assert!(
                intercepted,
                "after the restart interception resumes: {line}"
            );
            intercepted_after += 1;
        }
    }
    // Only a connection in flight at the instant of the kill may die with the agent.
    assert!(
        failures.iter().all(|(at, _)| at.abs_diff(killed_at) < 200) && failures.len() <= 1,
        "connects failed because of interception: {failures:?}"
    );
    assert!(intercepted_before > 20 && direct_while_down > 20 && intercepted_after > 20,
        "phases too short to judge: {intercepted_before} / {direct_while_down} / {intercepted_after}");
    let stats = pinned_stats(&pins.path);
    assert!(
        stats["no_listener"] as usize >= direct_while_down,
        "fail-open not counted: {stats:?}"
    );
    assert!(
        agent.log_text().contains("reusing pinned map"),
        "restart did not reuse the pins:\n{}",
        agent.log_text()
    );
    drop(agent);
}

#[test]
fn a_pin_with_the_wrong_layout_is_rejected_or_replaced_never_trusted() {
    require_root();
    let pins = PinRoot::new();
    let dir = pins
        .path
        .join(format!("v{}", interceptor_common::ABI_VERSION));
    // Make sure bpffs is there (the agent mounts it on a fresh machine) before planting the pin.
    let probe = AgentProcess::start(&[
        "run".into(),
        "--source=static".into(),
        "--pin-root".into(),
        pins.path.display().to_string(),
    ]);
    probe.kill9();
    interceptor::bpf::uninstall(&pins.path).expect("clear the probe's pins");
    std::fs::create_dir_all(&dir).expect("pin dir");
    let stale = dir.join(names::MAP_V6_DST);
    let stale_str = stale.to_str().expect("utf-8");
    run(
        "bpftool",
        &[
            "map",
            "create",
            stale_str,
            "type",
            "lru_hash",
            "key",
            "8",
            "value",
            "16",
            "entries",
            "64",
            "name",
            "icp_v6_dst",
        ],
    );

    let args = vec![
        "run".to_string(),
        "--source=static".to_string(),
        "--pin-root".into(),
        pins.path.display().to_string(),
    ];
    let (status, output) = AgentProcess::run_to_exit(&args, Duration::from_secs(30));
    assert!(
        !status.success(),
        "the agent must refuse a stale pin:\n{output}"
    );
    assert!(
        output.contains("icp_v6_dst")
            && output.contains("value size 16, expected 24")
            && output.contains("--replace-stale-pins"),
        "the error must name the map, the mismatch and the fix:\n{output}"
    );
    assert_eq!(
        output.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "one clear error line:\n{output}"
    );

    let mut replace = args.clone();
    replace.push("--replace-stale-pins".into());
    let agent = AgentProcess::start(&replace);
    let info = bpftool_json(&["map", "show", "pinned", stale_str]);
    assert_eq!(info["bytes_value"], 24, "stale pin not replaced: {info}");
    drop(agent);
}

/// After an upgrade the previous version's hooks would redirect into a listener this agent
/// cannot resolve: its pins go when the agent starts, before any listener opens.
#[test]
fn pins_of_another_abi_version_are_removed_at_start() {
    require_root();
    let pins = PinRoot::new();
    let old = pins.path.join("v1");
    // The agent mounts bpffs on a fresh machine; a short first run makes sure it is there.
    let args = vec![
        "run".to_string(),
        "--source=static".to_string(),
        "--pin-root".into(),
        pins.path.display().to_string(),
    ];
    AgentProcess::start(&args).kill9();
    std::fs::create_dir_all(&old).expect("old version dir");
    let old_map = old.join(names::MAP_SERVICES);
    run(
        "bpftool",
        &[
            "map",
            "create",
            old_map.to_str().expect("utf-8"),
            "type",
            "hash",
            "key",
            "20",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "icp_services",
        ],
    );
    let agent = AgentProcess::start(&args);
    assert!(!old.exists(), "pins of v1 left behind at {}", old.display());
    assert!(
        pins.path
            .join(format!("v{}", interceptor_common::ABI_VERSION))
            .join(names::MAP_SERVICES)
            .exists(),
        "this version's pins are there"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpftool_shows_programs_maps_pins_and_named_fields() {
    let node = Node::new();
    let client = node.add_pod("client", 1);
    let pins = PinRoot::new();
    let svc = sa("10.96.0.10:80");
    let (_datapath, mut agent, _) =
        in_process_agent(&pins, &[(svc, ServiceAction::Intercept)], &[&client]);
    let line = client
        .run(&["connect", "--to", &svc.to_string()], RUN_TIMEOUT)
        .pop()
        .expect("result");
    assert_eq!(parse_ok(&line).reply, format!("ORIG {svc}"));

    let progs = bpftool_json(&["prog", "list"]);
    let prog_names: BTreeSet<&str> = progs
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in names::PROGRAMS {
        assert!(prog_names.contains(name), "bpftool prog list lacks {name}");
    }
    let maps = bpftool_json(&["map", "list"]);
    let map_names: BTreeSet<&str> = maps
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for name in names::MAPS {
        assert!(map_names.contains(name), "bpftool map list lacks {name}");
    }

    let tree = bpftool_json(&["cgroup", "tree", cgroup2_root().to_str().expect("utf-8")]);
    let pod_cgroup = client.cgroup.path.to_str().expect("utf-8");
    let entry = tree
        .as_array()
        .expect("tree")
        .iter()
        .find(|e| {
            e["cgroup"].as_str().is_some_and(|c| {
                Path::new(pod_cgroup).ends_with(c.trim_start_matches('/')) || c == pod_cgroup
            })
        })
        .unwrap_or_else(|| {
            panic!("bpftool cgroup tree does not list the pod cgroup {pod_cgroup}: {tree}")
        });
    let attached: BTreeSet<&str> = entry["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        attached,
        names::PROGRAMS.into_iter().collect(),
        "programs on the pod cgroup"
    );

    let v = pins
        .path
        .join(format!("v{}", interceptor_common::ABI_VERSION));
    let services = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        v.join(names::MAP_SERVICES).to_str().expect("utf-8"),
    ]);
    // With BTF, bpftool prints each entry's fields by name under "formatted".
    let first = &services[0]["formatted"];
    assert!(
        first["key"]["addr"].is_array() && first["key"]["port_be"].is_number(),
        "BTF field names in keys: {services}"
    );
    assert_eq!(
        first["value"]["action"],
        interceptor_common::SVC_INTERCEPT,
        "BTF field names in values: {services}"
    );
    // The service's redirect slot names it in icp_redirects (what 127.100.x.y stands for).
    let slot = first["value"]["slot"]
        .as_u64()
        .unwrap_or_else(|| panic!("slot field in icp_services values: {services}"))
        as u32;
    let slot_key: Vec<String> = slot.to_ne_bytes().iter().map(|b| b.to_string()).collect();
    let mut lookup = vec!["map", "lookup", "pinned"];
    let redirects = v.join(names::MAP_REDIRECTS);
    lookup.push(redirects.to_str().expect("utf-8"));
    lookup.push("key");
    lookup.extend(slot_key.iter().map(String::as_str));
    let entry = bpftool_json(&lookup);
    assert_eq!(
        entry["formatted"]["value"]["port_be"],
        80u16.to_be(),
        "icp_redirects entry of the service's slot {slot}: {entry}"
    );
    let listeners = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        v.join(names::MAP_LISTENERS).to_str().expect("utf-8"),
    ]);
    // Socket maps carry no BTF for keys and values (the kernel refuses it), so bpftool prints
    // bytes: the key is (netns cookie u64, family u32, pad), the value the socket's cookie.
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .expect("byte array")
            .iter()
            .map(|b| {
                u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16)
                    .expect("hex byte")
            })
            .collect()
    };
    let mut families = Vec::new();
    for entry in listeners.as_array().expect("dump") {
        let key = bytes(&entry["key"]);
        let value = bytes(&entry["value"]);
        let cookie = u64::from_ne_bytes(key[..8].try_into().expect("8 bytes"));
        let socket_cookie = u64::from_ne_bytes(value[..8].try_into().expect("8 bytes"));
        assert!(
            cookie > 0 && socket_cookie > 0,
            "icp_listeners entry: {entry}"
        );
        families.push(u32::from_ne_bytes(key[8..12].try_into().expect("4 bytes")));
    }
    families.sort_unstable();
    assert_eq!(
        families,
        [
            interceptor_common::LISTENER_V4,
            interceptor_common::LISTENER_V6
        ],
        "the pod's two listeners: {listeners}"
    );
    let stats = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        v.join(names::MAP_STATS).to_str().expect("utf-8"),
    ]);
    let redirected: u64 = stats[0]["formatted"]["values"]
        .as_array()
        .expect("per-cpu values")
        .iter()
        .filter_map(|c| c["value"].as_u64())
        .sum();
    assert!(redirected >= 1, "per-CPU stats readable: {stats}");

    // The status command reads the same pins, without talking to the agent.
    let status = run(
        target_bin("interceptor").to_str().expect("utf-8"),
        &["status", "--pin-root", pins.path.to_str().expect("utf-8")],
    );
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["redirected", &redirected.to_string()]),
        "{status}"
    );
    assert!(
        status.contains("pod-local listeners: 2 in 1 pod netns (1 IPv4, 1 IPv6)"),
        "{status}"
    );
    agent.close_all();
}

#[test]
fn uninstall_detaches_every_hook_and_removes_every_pin() {
    let svc = sa("10.96.0.10:80");
    let sn = service_node(&[svc], "80");
    let client = sn.node.add_pod("client", 1);
    let pins = PinRoot::new();
    let agent = AgentProcess::start(&agent_args(&pins, &[&client], &[svc]));
    let before =
        parse_ok(&client.run(&["connect", "--to", &svc.to_string()], RUN_TIMEOUT)[0].clone());
    assert!(
        before.local.ip().is_loopback(),
        "intercepted before uninstall"
    );
    agent.kill9();
    let out = run(
        target_bin("interceptor").to_str().expect("utf-8"),
        &[
            "uninstall",
            "--pin-root",
            pins.path.to_str().expect("utf-8"),
        ],
    );
    let removed = format!(
        "removed {} hook links and {} maps",
        names::PROGRAMS.len(),
        names::MAPS.len()
    );
    assert!(out.contains(&removed), "{out}");
    assert!(!pins.path.exists(), "pins left behind");
    assert_no_hooks(&client, "after uninstall");
    let after =
        parse_ok(&client.run(&["connect", "--to", &svc.to_string()], RUN_TIMEOUT)[0].clone());
    assert_eq!(
        after.local.ip(),
        IpAddr::V4(client.ip4),
        "after uninstall connects go straight to kube-proxy"
    );
    assert!(sn.backend_names().contains(&after.reply));
}

#[test]
fn kernel_debug_log_is_off_by_default_and_names_each_decision_when_on() {
    let svc = sa("10.96.0.10:80");
    let sn = service_node(&[svc], "80");
    let client = sn.node.add_pod("client", 1);
    let pins = PinRoot::new();
    let args = agent_args(&pins, &[&client], &[svc]);
    let connect_and_settle = |agent: &AgentProcess| {
        let conn =
            parse_ok(&client.run(&["connect", "--to", &svc.to_string()], RUN_TIMEOUT)[0].clone());
        assert!(conn.local.ip().is_loopback(), "intercepted");
        // The agent drains the kernel's log ring every 100 ms.
        std::thread::sleep(Duration::from_millis(400));
        agent.log_text()
    };

    let quiet = AgentProcess::start(&args);
    let log = connect_and_settle(&quiet);
    assert!(
        !log.contains("verdict="),
        "kernel debug records without --kernel-debug-log:\n{log}"
    );
    quiet.kill9();

    let mut verbose_args = args.clone();
    verbose_args.push("--kernel-debug-log".into());
    let verbose = AgentProcess::start(&verbose_args);
    let log = connect_and_settle(&verbose);
    let redirected = format!(
        "icp_connect4 verdict={}",
        interceptor_common::Stat::Redirected as u32
    );
    assert!(
        log.contains(&redirected),
        "no kernel debug record for the redirect:\n{log}"
    );
}

/// The redirect listener takes any 127.100.x.y but is bound to the loopback device: from
/// outside the pod its port on the pod IP is closed, so it relays nothing for anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_local_listener_is_not_reachable_from_outside_the_pod() {
    let node = Node::new();
    let pod = node.add_pod("client", 1);
    let outsider = node.add_pod("outsider", 2);
    let pins = PinRoot::new();
    let svc = sa("10.96.0.10:80");
    let (_datapath, mut agent, _) =
        in_process_agent(&pins, &[(svc, ServiceAction::Intercept)], &[&pod]);
    let inside = pod.run(&["connect", "--to", &svc.to_string()], RUN_TIMEOUT);
    assert_eq!(
        parse_ok(&inside[0]).reply,
        format!("ORIG {svc}"),
        "intercepted"
    );
    let from_outside = outsider.run(
        &["connect", "--to", &pod.addr4(LISTEN_PORT).to_string()],
        RUN_TIMEOUT,
    );
    assert!(
        from_outside[0].starts_with("ERR") && from_outside[0].contains("refused"),
        "the listener port on the pod IP must refuse outsiders: {from_outside:?}"
    );
    agent.close_all();
}

#[test]
fn the_kernel_is_checked_first_and_a_missing_privilege_is_one_clear_error() {
    require_root();
    let pins = PinRoot::new();
    let args = [
        "run".to_string(),
        "--source=static".to_string(),
        "--pin-root".into(),
        pins.path.display().to_string(),
    ];
    // Root without a single capability (empty bounding set): bpf() answers EPERM.
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--"])
        .arg(target_bin("interceptor"))
        .args(&args)
        .output()
        .expect("run the agent under setpriv (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the agent must refuse:\n{text}");
    assert!(
        text.contains("CAP_BPF") && text.contains("CAP_SYS_ADMIN") && text.contains("privileged"),
        "the error must name the missing privilege and the fix:\n{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "one clear error line:\n{text}"
    );
    assert!(
        std::fs::read_dir(&pins.path).map_or(true, |mut d| d.next().is_none()),
        "nothing may be pinned before the kernel check passed"
    );

    // With its privileges, the agent says which kernel it checked.
    let agent = AgentProcess::start(&args);
    let log = agent.log_text();
    drop(agent);
    let release = run("uname", &["-r"]);
    assert!(
        log.contains("kernel has every feature the datapath needs") && log.contains(release.trim()),
        "the start-up log names the kernel it checked:\n{log}"
    );
}
