//! Topology-aware routing, by kube-proxy's rules (`pkg/proxy/topology.go`), so labelling a
//! namespace keeps a Service's zone- and node-local traffic where kube-proxy would send it.
//!
//! kube-proxy reads only the EndpointSlices' hints; `spec.trafficDistribution` matters
//! through the EndpointSlice controller, which writes those hints. So:
//! - the kube source trusts the hints the controller wrote (no hints yet: every endpoint);
//! - the file source has no controller: it writes the hints the controller would
//!   ([`controller_hints`]), from each endpoint's `zone` and `nodeName`, for Services that ask.
//!
//! The rules, over the Service's ready endpoints: when every one has node hints and one is
//! for this node, only endpoints hinted for this node; otherwise when every one has zone hints
//! and one is for this node's zone, only endpoints hinted for the zone; otherwise (a missing
//! hint anywhere, no endpoint for this node or zone, no zone label on the Node) every
//! endpoint. internalTrafficPolicy Local overrides topology (kube-proxy ignores hints then).

use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};

use super::model::Endpoint;
use super::warn_once;

/// The well-known Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What `spec.trafficDistribution` asks of the EndpointSlice controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// PreferClose (the original name) and PreferSameZone: hints for the endpoint's zone.
    SameZone,
    /// PreferSameNode: hints for the endpoint's node, and its zone as the fallback.
    SameNode,
}

impl TrafficDistribution {
    /// Parses the field; an unknown value is logged once naming the Service and means none,
    /// as the EndpointSlice controller treats it (it clears the hints).
    pub fn parse(value: Option<&str>, service: &str) -> Option<Self> {
        match value? {
            "PreferClose" | "PreferSameZone" => Some(Self::SameZone),
            "PreferSameNode" => Some(Self::SameNode),
            other => {
                warn_once(format!("Service {service}: unknown trafficDistribution {other:?} (PreferClose, PreferSameZone or PreferSameNode); ignoring it, every endpoint is used"));
                None
            }
        }
    }
}

/// Which endpoints kube-proxy on this node would keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Only endpoints hinted for this node.
    SameNode(String),
    /// Only endpoints hinted for this zone.
    SameZone(String),
}

/// kube-proxy's choice from the hints of `endpoints` for a node named `node` in `zone`;
/// `Err` says why no topology applies (for `status`), `Ok(None)` when there are no hints.
pub fn mode(
    endpoints: &[Endpoint],
    node: Option<&str>,
    zone: Option<&str>,
) -> Result<Option<Mode>, String> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty()
        || ready
            .iter()
            .all(|e| e.hint_nodes.is_empty() && e.hint_zones.is_empty())
    {
        return Ok(None);
    }
    if let Some(node) = node {
        if ready.iter().all(|e| !e.hint_nodes.is_empty())
            && ready.iter().any(|e| e.hint_nodes.iter().any(|n| n == node))
        {
            return Ok(Some(Mode::SameNode(node.to_string())));
        }
    }
    if ready.iter().any(|e| e.hint_zones.is_empty()) {
        return Err(
            "hints ignored: a ready endpoint has no zone hint; every endpoint used".to_string(),
        );
    }
    let Some(zone) = zone else {
        return Err(format!(
            "hints ignored: this node has no {ZONE_LABEL} label (or its Node is not visible); every endpoint used"
        ));
    };
    if ready.iter().any(|e| e.hint_zones.iter().any(|z| z == zone)) {
        Ok(Some(Mode::SameZone(zone.to_string())))
    } else {
        Err(format!(
            "hints ignored: no endpoint is hinted for this node's zone {zone}; every endpoint used"
        ))
    }
}

impl Mode {
    /// kube-proxy's `availableForTopology`: `Err` is why `e` is left out.
    pub fn admits(&self, e: &Endpoint) -> Result<(), String> {
        match self {
            Mode::SameNode(_) if e.hint_nodes.is_empty() => {
                Err("no node hint (topology: same node)".to_string())
            }
            Mode::SameNode(node) if !e.hint_nodes.iter().any(|n| n == node) => Err(format!(
                "hinted for node {}, not this node {node} (topology: same node)",
                e.hint_nodes.join(",")
            )),
            Mode::SameZone(_) if e.hint_zones.is_empty() => {
                Err("no zone hint (topology: same zone)".to_string())
            }
            Mode::SameZone(zone) if !e.hint_zones.iter().any(|z| z == zone) => Err(format!(
                "hinted for zone {}, this node is in {zone} (topology: same zone)",
                e.hint_zones.join(",")
            )),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Mode::SameNode(node) => format!("same node {node}"),
            Mode::SameZone(zone) => format!("same zone {zone}"),
        }
    }
}

/// The hints the EndpointSlice controller writes for an endpoint of a Service with
/// `td`: a ready endpoint with a zone is hinted for that zone (and for its node under
/// PreferSameNode); one without a zone, or not ready, gets none, which turns topology off for
/// the Service, as in a cluster.
pub fn controller_hints(
    td: TrafficDistribution,
    ready: bool,
    zone: Option<&str>,
    node: Option<&str>,
) -> Option<EndpointHints> {
    let zone = zone.filter(|_| ready)?;
    let for_nodes = match (td, node) {
        (TrafficDistribution::SameNode, Some(node)) => Some(vec![ForNode {
            name: node.to_string(),
        }]),
        _ => None,
    };
    Some(EndpointHints {
        for_zones: Some(vec![ForZone {
            name: zone.to_string(),
        }]),
        for_nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ready: bool, zones: &[&str], nodes: &[&str]) -> Endpoint {
        Endpoint {
            addr: "10.0.0.1:80".parse().expect("addr"),
            ready,
            serving: ready,
            terminating: false,
            node_name: None,
            zone: None,
            hint_zones: zones.iter().map(|s| s.to_string()).collect(),
            hint_nodes: nodes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn zone_hints_pick_this_zone_and_fall_back_as_kube_proxy_does() {
        let eps = [ep(true, &["a"], &[]), ep(true, &["b"], &[])];
        let m = mode(&eps, Some("n1"), Some("a"))
            .expect("applies")
            .expect("mode");
        assert_eq!(m, Mode::SameZone("a".into()));
        assert!(m.admits(&eps[0]).is_ok());
        assert!(m
            .admits(&eps[1])
            .expect_err("other zone")
            .contains("hinted for zone b"));
        // No endpoint for this zone, no zone label, or one ready endpoint without hints:
        // every endpoint.
        assert!(mode(&eps, Some("n1"), Some("c"))
            .expect_err("no match")
            .contains("zone c"));
        assert!(mode(&eps, Some("n1"), None)
            .expect_err("no label")
            .contains(ZONE_LABEL));
        let partial = [ep(true, &["a"], &[]), ep(true, &[], &[])];
        assert!(mode(&partial, Some("n1"), Some("a")).is_err());
        // A not-ready endpoint without hints does not count.
        let with_unready = [ep(true, &["a"], &[]), ep(false, &[], &[])];
        assert!(mode(&with_unready, Some("n1"), Some("a"))
            .expect("ok")
            .is_some());
        // No hints at all, or nothing ready: no topology, nothing to say.
        assert_eq!(mode(&[ep(true, &[], &[])], Some("n1"), Some("a")), Ok(None));
        assert_eq!(
            mode(&[ep(false, &["a"], &[])], Some("n1"), Some("a")),
            Ok(None)
        );
    }

    #[test]
    fn node_hints_win_over_zone_hints_only_when_one_is_for_this_node() {
        let eps = [
            ep(true, &["a"], &["n1"]),
            ep(true, &["a"], &["n2"]),
            ep(true, &["b"], &["n3"]),
        ];
        assert_eq!(
            mode(&eps, Some("n1"), Some("a")),
            Ok(Some(Mode::SameNode("n1".into())))
        );
        // No endpoint on this node: the zone hints decide.
        assert_eq!(
            mode(&eps, Some("n9"), Some("a")),
            Ok(Some(Mode::SameZone("a".into())))
        );
        // One endpoint without a node hint: node hints ignored, zone hints used.
        let mixed = [ep(true, &["a"], &["n1"]), ep(true, &["a"], &[])];
        assert_eq!(
            mode(&mixed, Some("n1"), Some("a")),
            Ok(Some(Mode::SameZone("a".into())))
        );
    }

    #[test]
    fn unknown_traffic_distribution_is_none() {
        assert_eq!(
            TrafficDistribution::parse(Some("PreferClose"), "s/x"),
            Some(TrafficDistribution::SameZone)
        );
        assert_eq!(
            TrafficDistribution::parse(Some("PreferSameNode"), "s/x"),
            Some(TrafficDistribution::SameNode)
        );
        assert_eq!(TrafficDistribution::parse(Some("PreferFar"), "s/x"), None);
        assert_eq!(TrafficDistribution::parse(None, "s/x"), None);
    }
}
