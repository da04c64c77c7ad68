//! Discovery: Kubernetes objects, from the API server (`kube`) or from manifest files
//! (`file`), turned into one desired state for this node (`model`) by the same code
//! (`objects`). Pod cgroups are found on the node (`cgroup`). Only this layer touches kube.

pub mod cgroup;
pub mod file;
pub mod kube;
pub mod model;
pub mod objects;
pub mod topology;

/// Namespace label that turns interception on for the namespace's pods (value `true`).
pub const ENABLED_LABEL: &str = "interceptor.io/enabled";
/// Annotation on a Pod or a Service: `"false"` opts it out of interception.
pub const INTERCEPT_ANNOTATION: &str = "interceptor.io/intercept";
/// Annotation on a Service: comma-separated port numbers or names never intercepted.
pub const SKIP_PORTS_ANNOTATION: &str = "interceptor.io/skip-ports";
/// Service annotation: endpoints that join ramp up their share over this window (e.g. `30s`).
pub const SLOW_START_ANNOTATION: &str = "interceptor.io/slow-start";
