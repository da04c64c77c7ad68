//! What one pod does to its connections stays with that pod. The agent serves every pod with a
//! proxy of its own, whose upstream connections carry that pod's streams only: an endpoint's
//! server that closes a connection in self-defence cuts calls of that pod alone.

use std::time::{Duration, Instant};

use interceptor_tests::cluster::{self, effect, share_line, GreetCluster as Cluster, Spec};
use interceptor_tests::*;

const STORM_POD: u8 = 3;

/// A rapid-reset storm from one pod: the greet servers (tonic, on h2) close every connection on
/// which more than 20 streams are reset before they were accepted, with GOAWAY
/// ENHANCE_YOUR_CALM "too_many_resets". Were the storming pod's streams on the connections
/// that carry the other pod's calls, those calls would be cut (the proxy's own tests measure
/// 0 to 8 cut calls per storm when both clients share one proxy).
#[test]
fn one_pods_rapid_reset_storm_fails_no_call_of_another_pod() {
    let c = Cluster::new(&[40, 41]);
    let storm_pod = c.node.add_kube_pod("storm", STORM_POD);
    let spec = Spec::new(true, &[40, 41]);
    let mut docs = c.docs(&spec);
    docs.push(cluster::pod(cluster::NS, &storm_pod, STORM_POD, &[]));
    cluster::write_manifests(&c.manifests, &docs);
    let agent = c.start_agent();
    effect(Instant::now(), "both client pods hooked", || {
        c.client_hooked() && cluster::pod_hooked(&storm_pod)
    });

    let mut calls = c.client_run(8);
    let before = calls.window(Duration::from_millis(500));
    assert_eq!(before.len(), 2, "both endpoints answer: {before:?}");

    let abusive = |agent: &AgentProcess| {
        agent.metric_sum(
            "interceptor_abusive_connections_total",
            &["reason=\"rapid_reset\""],
        )
    };
    let abusive_before = abusive(&agent);
    let storms: Vec<String> = (0..3)
        .map(|_| {
            let out = storm_pod
                .spawn(&[
                    "greet-storm",
                    "--to",
                    &cluster::vip().to_string(),
                    "--max",
                    "20000",
                    "--seconds",
                    "10",
                ])
                .wait_output(Duration::from_secs(30));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines()
                .find(|l| l.starts_with("STORM "))
                .unwrap_or_else(|| panic!("no STORM line: {text}"))
                .to_string()
        })
        .collect();
    let during = calls.window(Duration::from_millis(500));
    note(&format!(
        "storms from pod {STORM_POD}: {storms:?}; the other pod's calls meanwhile: {} errors, then {}",
        calls.last.errors,
        share_line(&during)
    ));
    for s in &storms {
        assert!(
            s.contains(" closed: "),
            "the proxy closes the storming connection: {s}"
        );
    }
    assert!(
        abusive(&agent) - abusive_before >= storms.len() as f64,
        "each storm counted as a rapid reset"
    );
    // What makes the storm a threat to others: the endpoints closed connections that carried
    // its streams. Had those connections carried the other pod's calls too, they were cut.
    let closed_by_endpoints = agent.metric_sum(
        "interceptor_upstream_goaways_total",
        &["reason=\"enhance_your_calm\""],
    );
    note(&format!(
        "upstream connections the endpoints closed for too many resets: {closed_by_endpoints}"
    ));
    assert!(
        closed_by_endpoints > 0.0,
        "the storms made no endpoint close a connection: this test shows nothing"
    );
    assert_eq!(
        calls.last.errors, 0,
        "no call of the other pod failed: {:?}",
        calls.last_error
    );
    assert_eq!(during.len(), 2, "both endpoints still answer: {during:?}");
}
