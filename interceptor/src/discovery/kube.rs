//! The kube source: kube-rs watchers on Namespaces, Services, EndpointSlices, this node's
//! Pods and this node's Node object (its zone, for topology), folded into the same object
//! snapshot the file source produces.

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
    // This node's zone label, for topology-aware routing. A field selector narrows the watch
    // to the one Node (as kube-proxy watches its own); RBAC cannot narrow a list/watch grant
    // by name, so the rule covers nodes.
    Access {
        api_group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
    Access {
        api_group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
];

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

use super::object_ref;
use super::objects::Objects;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes client configuration (in a pod: the ServiceAccount token is mounted by automountServiceAccountToken; elsewhere: set KUBECONFIG): {0}")]
    Config(#[source] kube::config::InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("the kube source needs this node's name: set --node-name (INTERCEPTOR_NODE_NAME, from the downward API's spec.nodeName)")]
    NoNodeName,
}

/// Changes are published at most this often: a burst of events (a rollout) becomes one
/// reconcile, and the delay stays far below the 1 s a change may take to apply.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Builds a client the way kubectl and in-cluster controllers do (KUBECONFIG, then the
/// ServiceAccount).
pub async fn client() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await.map_err(KubeError::Config)?;
    Client::try_from(config).map_err(KubeError::Client)
}

/// One watcher per kind; the snapshot is published once each has listed.
const SLOTS: usize = 5;

struct Shared {
    objects: Mutex<Objects>,
    synced: Mutex<[bool; SLOTS]>,
    changed: Notify,
}

impl Shared {
    fn edit(&self, f: impl FnOnce(&mut Objects)) {
        match self.objects.lock() {
            Ok(mut o) => f(&mut o),
            Err(p) => f(&mut p.into_inner()),
        }
        self.changed.notify_one();
    }

    fn mark_synced(&self, slot: usize) {
        if let Ok(mut s) = self.synced.lock() {
            s[slot] = true;
        }
        self.changed.notify_one();
    }

    fn is_synced(&self, slot: usize) -> bool {
        self.synced.lock().map(|s| s[slot]).unwrap_or(false)
    }

    fn all_synced(&self) -> bool {
        self.synced
            .lock()
            .map(|s| s.iter().all(|x| *x))
            .unwrap_or(false)
    }
}

/// Retry spacing for a failed watch: 100 ms first (a 410 Gone is routine compaction and the
/// relist should follow at once, where kube-rs's default waits 800 ms), doubling to 30 s while
/// the API server keeps failing, back to the start after a success.
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// How one kind is stored in `Objects`.
struct Kind<K> {
    slot: usize,
    name: &'static str,
    reset: fn(&mut Objects),
    apply: fn(&mut Objects, K),
    delete: fn(&mut Objects, &K),
    /// Needed only for an optional feature: when it cannot be listed (an older ClusterRole
    /// without the rule), the agent goes on without it instead of never becoming ready.
    optional: Option<&'static str>,
}

/// Drops what the agent never reads and a DaemonSet should not hold for every Service and
/// EndpointSlice of the cluster: server-side-apply bookkeeping is often most of an object.
fn slim<K: Resource>(mut obj: K) -> K {
    obj.meta_mut().managed_fields = None;
    obj
}

async fn watch_kind<K>(api: Api<K>, config: watcher::Config, kind: Kind<K>, shared: Arc<Shared>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, config).backoff(WatchBackoff::new()).boxed();
    let mut buffer: Vec<K> = Vec::new();
    // An optional kind that could not be listed yet, and the snapshot went on without it.
    let mut going_without = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => buffer.clear(),
            Ok(watcher::Event::InitApply(obj)) => buffer.push(slim(obj)),
            Ok(watcher::Event::InitDone) => {
                let listed = std::mem::take(&mut buffer);
                tracing::debug!(kind = kind.name, objects = listed.len(), "listed");
                shared.edit(|o| {
                    (kind.reset)(o);
                    for obj in listed {
                        (kind.apply)(o, obj);
                    }
                });
                shared.mark_synced(kind.slot);
                going_without = false;
            }
            Ok(watcher::Event::Apply(obj)) => {
                let obj = slim(obj);
                shared.edit(|o| (kind.apply)(o, obj))
            }
            Ok(watcher::Event::Delete(obj)) => shared.edit(|o| (kind.delete)(o, &obj)),
            // The watcher relists by itself (410 Gone included); the backoff spaces retries.
            Err(error) => match kind.optional {
                // Never listed and still failing (a role without the rule): said once below,
                // then quietly retried, so the log is not a warning every 30 s forever.
                Some(_) if going_without => {
                    tracing::debug!(kind = kind.name, %error, "still cannot list; retrying")
                }
                Some(without) if !shared.is_synced(kind.slot) => {
                    tracing::warn!(kind = kind.name, %error, "cannot list {}s yet: going on without them ({without}); retrying", kind.name);
                    going_without = true;
                    shared.mark_synced(kind.slot);
                }
                _ => {
                    tracing::warn!(kind = kind.name, %error, "watch failed; retrying with backoff (the last known state stays in force)")
                }
            },
        }
    }
}

/// Watches Namespaces, Services, EndpointSlices, the Pods scheduled on `node_name` and its
/// Node, and publishes the objects once all five have been listed, then after every change. Runs until
/// `out` has no receivers.
pub async fn watch_cluster(
    client: Client,
    node_name: String,
    out: watch::Sender<Arc<Objects>>,
) -> Result<(), KubeError> {
    if node_name.is_empty() {
        return Err(KubeError::NoNodeName);
    }
    let shared = Arc::new(Shared {
        objects: Mutex::new(Objects::default()),
        synced: Mutex::new([false; SLOTS]),
        changed: Notify::new(),
    });
    let all = watcher::Config::default();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        all.clone(),
        Kind {
            slot: 0,
            name: "Namespace",
            reset: |o| o.namespaces.clear(),
            apply: |o, ns: Namespace| {
                let name = ns.metadata.name.clone().unwrap_or_default();
                o.namespaces.insert(name, ns);
            },
            delete: |o, ns| {
                o.namespaces
                    .remove(ns.metadata.name.as_deref().unwrap_or_default());
            },
            optional: None,
        },
        shared.clone(),
    ));
    tasks.spawn(watch_kind(
        Api::<Service>::all(client.clone()),
        all.clone(),
        Kind {
            slot: 1,
            name: "Service",
            reset: |o| o.services.clear(),
            apply: |o, s: Service| {
                o.services.insert(object_ref(&s.metadata), s);
            },
            delete: |o, s| {
                o.services.remove(&object_ref(&s.metadata));
            },
            optional: None,
        },
        shared.clone(),
    ));
    tasks.spawn(watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        all.clone(),
        Kind {
            slot: 2,
            name: "EndpointSlice",
            reset: |o| o.slices.clear(),
            apply: |o, s: EndpointSlice| {
                o.slices.insert(object_ref(&s.metadata), s);
            },
            delete: |o, s| {
                o.slices.remove(&object_ref(&s.metadata));
            },
            optional: None,
        },
        shared.clone(),
    ));
    // Only this node's pods: a DaemonSet watching every pod of the cluster would cost the API
    // server a full pod stream per node.
    tasks.spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        all.clone().fields(&format!("spec.nodeName={node_name}")),
        Kind {
            slot: 3,
            name: "Pod",
            reset: |o| o.pods.clear(),
            apply: |o, p: Pod| {
                o.pods.insert(object_ref(&p.metadata), p);
            },
            delete: |o, p| {
                o.pods.remove(&object_ref(&p.metadata));
            },
            optional: None,
        },
        shared.clone(),
    ));
    tasks.spawn(watch_kind(
        Api::<Node>::all(client.clone()),
        all.fields(&format!("metadata.name={node_name}")),
        Kind {
            slot: 4,
            name: "Node",
            reset: |o| o.nodes.clear(),
            apply: |o, n: Node| {
                let name = n.metadata.name.clone().unwrap_or_default();
                o.nodes.insert(name, n);
            },
            delete: |o, n| {
                o.nodes
                    .remove(n.metadata.name.as_deref().unwrap_or_default());
            },
            optional: Some("topology hints are ignored until this node's zone is known"),
        },
        shared.clone(),
    ));

    let mut announced = false;
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = out.closed() => break,
            done = tasks.join_next() => {
                // A watcher task only ends on a panic: make that loud, not silent staleness.
                tracing::error!(?done, "a Kubernetes watch ended unexpectedly; the agent keeps the last state");
                if tasks.is_empty() { break; }
                continue;
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        // Publishing before every kind is listed would look like "no pods, no services" and
        // detach everything a previous agent left in place.
        if !shared.all_synced() {
            continue;
        }
        let snapshot = match shared.objects.lock() {
            Ok(o) => o.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if !announced {
            announced = true;
            tracing::info!(
                namespaces = snapshot.namespaces.len(),
                services = snapshot.services.len(),
                slices = snapshot.slices.len(),
                pods = snapshot.pods.len(),
                node_zone = snapshot.node_zone(Some(&node_name)).unwrap_or("(none)"),
                "Kubernetes objects listed"
            );
        }
        out.send_replace(Arc::new(snapshot));
    }
    tasks.abort_all();
    Ok(())
}
