//! What the agent has applied, as its admin endpoint serves it (`/state`) and as `status` and
//! `explain` read it back: one typed shape on both sides, so a renamed field breaks the build,
//! not the operator's command.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::discovery::model::{DesiredState, PodUid};

/// 1 for each pod that should be intercepted and is not (yet), by namespace and pod.
pub const POD_NOT_INTERCEPTED: &str = "interceptor_pod_not_intercepted";
/// How many such pods there are.
pub const PODS_NOT_INTERCEPTED: &str = "interceptor_pods_not_intercepted";

/// A pod's interception as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodStatus {
    pub pod: String,
    pub intercepted: bool,
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: Option<u64>,
    /// Why it is not intercepted yet (retried every second).
    pub error: Option<String>,
}

/// What the admin endpoint serves as `/state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentState {
    /// True once a complete desired state has been applied.
    pub ready: bool,
    pub generation: u64,
    pub applied_at_unix_ms: u64,
    pub desired: DesiredState,
    pub pods: BTreeMap<PodUid, PodStatus>,
}

pub type SharedState = Arc<RwLock<AgentState>>;
