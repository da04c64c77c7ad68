//! The kube source: kube-rs watchers on Namespaces, Services, EndpointSlices and this node's
//! Pods, folded into the same object snapshot the file source produces.

/// One RBAC rule the agent needs. `deploy/` grants exactly these (a test checks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the kube source reads: list and watch, nothing else, no writes.
pub const REQUIRED_ACCESS: &[Access] = &[
    Access {
        api_group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    Access {
        api_group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    Access {
        api_group: "",
        resource: "pods",
        verbs: &["list", "watch"],
    },
    Access {
        api_group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
];
