//! Discovery: Kubernetes objects, from the API server (`kube`) or from manifest files
//! (`file`), turned into one desired state for this node (`model`) by the same code
//! (`objects`). Pod cgroups are found on the node (`cgroup`). Only this layer touches kube.

pub mod cgroup;
pub mod file;
pub mod kube;
pub mod model;
pub mod objects;
pub mod topology;

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use model::ObjectRef;

/// Namespace label that turns interception on for the namespace's pods (value `true`).
pub const ENABLED_LABEL: &str = "interceptor.io/enabled";
/// Annotation on a Pod or a Service: `"false"` opts it out of interception.
pub const INTERCEPT_ANNOTATION: &str = "interceptor.io/intercept";
/// Annotation on a Service: comma-separated port numbers or names never intercepted.
pub const SKIP_PORTS_ANNOTATION: &str = "interceptor.io/skip-ports";
/// Service annotation: endpoints that join ramp up their share over this window (e.g. `30s`).
pub const SLOW_START_ANNOTATION: &str = "interceptor.io/slow-start";
/// On a Service: `opaque` relays its HTTP/1.x connections as TCP, one endpoint each, instead
/// of balancing every request (`per-request`, the default).
pub const HTTP1_ANNOTATION: &str = "interceptor.io/http1";

/// Logs a problem with an object once per process (desired states are recomputed on every
/// change, and an operator needs the line once, not per change).
pub(crate) fn warn_once(msg: String) {
    static SEEN: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let first = match SEEN.lock() {
        Ok(mut s) => s.insert(msg.clone()),
        Err(_) => true,
    };
    if first {
        tracing::warn!("{msg}");
    }
}

pub fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        meta.name.clone().unwrap_or_default(),
    )
}
