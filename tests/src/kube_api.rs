//! A test Kubernetes API server that speaks the real list/watch protocol over plain HTTP on
//! 127.0.0.1, so kube-rs's `watcher` and `reflector` run against it as against a real one.
//!
//! It serves Namespaces, Nodes, Services and Pods (core/v1) and EndpointSlices
//! (discovery.k8s.io/v1),
//! stored as JSON by (kind, namespace, name), with:
//! - lists (`XxxList` with `metadata.resourceVersion`; `limit`/`continue` paging from a snapshot
//!   taken by the first page), label and field selectors, `resourceVersion(Match)`;
//! - watches: chunked newline-delimited `{"type":..,"object":..}` events after the requested
//!   resourceVersion, filtered by the same selectors (an object that stops matching yields
//!   DELETED, one that starts matching yields ADDED), bookmarks when `allowWatchBookmarks` is
//!   set, `timeoutSeconds`, and streaming lists (`sendInitialEvents=true`, ended by a bookmark
//!   annotated `k8s.io/initial-events-end`);
//! - test controls: [`FakeApiServer::bookmark`], [`FakeApiServer::expire`] (410 Gone, like an
//!   etcd compaction), [`FakeApiServer::close_watches`], [`FakeApiServer::forbid`] (403 for
//!   a kind, like a role without the rule) and a request log ([`FakeApiServer::requests`]).
//!
//! Like the real API server, it validates what it is asked: an unsupported field selector, a
//! malformed label selector or resourceVersion, or `resourceVersionMatch` without a
//! resourceVersion is answered with a 400 `Status`. List items carry no `kind`/`apiVersion`
//! (the real server omits them too); watch objects do.
//!
//! It runs on its own thread with its own tokio runtime, so sync and async tests can use it;
//! dropping it stops the thread and closes every socket.
//!
//! Not modelled: writes through the API (tests change objects with [`FakeApiServer::apply`] and
//! [`FakeApiServer::delete`]), authentication and RBAC beyond `forbid`, protobuf, exact-version lists of old snapshots,
//! namespace deletion cascading to the objects in it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How long a watch lasts when the client sets no `timeoutSeconds` (the real server picks a
/// random time around 30 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Annotation on the bookmark that ends the initial events of a streaming list.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// The test API server. See the module documentation.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// One request the server answered, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Query parameters, percent-decoded, in request order.
    pub query: Vec<(String, String)>,
    /// HTTP status of the response. A watch is 200 even when it then ends with an ERROR event.
    pub status: u16,
    /// For a watch: the `code` of the ERROR event that ended it (410 after
    /// [`FakeApiServer::expire`] or when it asked for a compacted resourceVersion).
    pub watch_error: Option<u16>,
}

impl Request {
    /// The (first) value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this is a watch (`watch=true` or `watch=1`) rather than a list or get.
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        for (i, (k, v)) in self.query.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        write!(f, " -> {}", self.status)?;
        if let Some(code) = self.watch_error {
            write!(f, ", watch ended with ERROR {code}")?;
        }
        Ok(())
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a free port and serves from a background thread.
    ///
    /// # Panics
    /// If the port cannot be bound or the runtime or thread cannot be created.
    pub fn start() -> FakeApiServer {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("fake API server: bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("fake API server: make the listener non-blocking");
        let addr = std_listener
            .local_addr()
            .expect("fake API server: listener address");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("fake API server: build its tokio runtime");
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .expect("fake API server: register the listener with tokio")
        };
        let shared = Arc::new(Shared::default());
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn({
                let shared = shared.clone();
                // Dropping the runtime at the end of the thread drops every connection task,
                // so open watches end and their sockets close.
                move || runtime.block_on(serve(listener, shared, shutdown_rx))
            })
            .expect("fake API server: spawn its thread");
        FakeApiServer {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig whose current context points at this server: plain http, no
    /// credentials, namespace `default`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        );
        std::fs::write(path, kubeconfig)
    }

    /// Creates or replaces an object and notifies matching watches (ADDED or MODIFIED).
    ///
    /// `kind` and `metadata.name` are required; `apiVersion` is filled in when missing; a
    /// namespaced object without `metadata.namespace` goes to `default`. The server sets
    /// `metadata.resourceVersion` (a new one on every call, even when nothing changed) and
    /// `metadata.uid` when missing (a replaced object keeps its uid). Returns the stored object.
    ///
    /// # Panics
    /// On an object the server cannot store (unsupported kind, wrong apiVersion, no name):
    /// that is a bug in the test.
    pub fn apply(&self, mut obj: Value) -> Value {
        let kind_name = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("fake API server: apply: object has no kind: {obj}"))
            .to_owned();
        let kind = Kind::from_kind(&kind_name).unwrap_or_else(|| {
            panic!(
                "fake API server: apply: unsupported kind {kind_name:?} \
                 (supported: Namespace, Node, Service, Pod, EndpointSlice)"
            )
        });
        match obj.get("apiVersion").and_then(Value::as_str) {
            None => {
                obj["apiVersion"] = json!(kind.api_version());
            }
            Some(v) if v == kind.api_version() => {}
            Some(v) => panic!(
                "fake API server: apply: {kind_name} has apiVersion {v:?}, expected {:?}",
                kind.api_version()
            ),
        }
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("fake API server: apply: {kind_name} has no metadata"));
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("fake API server: apply: {kind_name} has no metadata.name"))
            .to_owned();
        let namespace = if kind.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };

        let mut store = lock(&self.shared.store);
        store.rv += 1;
        let rv = store.rv;
        let key = (kind, namespace.clone(), name);
        let prev = store.objects.get(&key).cloned();
        if !meta.contains_key("uid") {
            let uid = match prev.as_ref().and_then(|p| p["metadata"].get("uid")) {
                Some(uid) => uid.clone(),
                None => {
                    store.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", store.next_uid))
                }
            };
            meta.insert("uid".into(), uid);
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        store.objects.insert(key, obj.clone());
        store.record(Change {
            rv,
            kind,
            namespace,
            prev,
            cur: Some(obj.clone()),
        });
        obj
    }

    /// Applies every document of a multi-document YAML string, in order. Returns the stored
    /// objects.
    ///
    /// # Panics
    /// On invalid YAML or an object [`apply`](Self::apply) rejects.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<Value> {
        let mut applied = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let obj: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("fake API server: apply_yaml: invalid YAML: {e}"));
            if !obj.is_null() {
                applied.push(self.apply(obj));
            }
        }
        applied
    }

    /// Deletes an object and notifies matching watches (DELETED, with its last state and a new
    /// resourceVersion). `namespace` is ignored for Namespaces. Returns what was deleted, or
    /// `None` when there was no such object. Deleting a Namespace leaves the objects in it.
    ///
    /// # Panics
    /// On an unsupported kind.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let k = Kind::from_kind(kind)
            .unwrap_or_else(|| panic!("fake API server: delete: unsupported kind {kind:?}"));
        let namespace = if k.namespaced() { namespace } else { "" };
        let mut store = lock(&self.shared.store);
        let prev = store
            .objects
            .remove(&(k, namespace.to_owned(), name.to_owned()))?;
        store.rv += 1;
        let rv = store.rv;
        let mut last = prev.clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.record(Change {
            rv,
            kind: k,
            namespace: namespace.to_owned(),
            prev: Some(prev),
            cur: None,
        });
        Some(last)
    }

    /// The latest resourceVersion the server has issued.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch that allows
    /// bookmarks. Returns that resourceVersion.
    pub fn bookmark(&self) -> u64 {
        let mut store = lock(&self.shared.store);
        let rv = store.rv;
        store.send_all(|| WatchMsg::Bookmark {
            rv,
            initial_events_end: false,
        });
        rv
    }

    /// Compacts history like etcd: every open watch ends with an ERROR event carrying a 410
    /// `Expired` Status, a later watch from an older resourceVersion gets the same, and list
    /// `continue` tokens stop working (410). Clients must relist. Returns how many open
    /// watches were ended.
    pub fn expire(&self) -> usize {
        let mut store = lock(&self.shared.store);
        store.compacted = store.rv;
        store.history.clear();
        store.pages.clear();
        let compacted = store.compacted;
        let ended = store.send_all(|| WatchMsg::Expire { compacted });
        store.watches.clear();
        ended
    }

    /// Drops every open watch connection without ending the response (the client sees the
    /// connection break mid-stream). Returns how many there were.
    pub fn close_watches(&self) -> usize {
        let mut store = lock(&self.shared.store);
        let closed = store.send_all(|| WatchMsg::Close);
        store.watches.clear();
        closed
    }

    /// How many watches are being served right now.
    pub fn open_watches(&self) -> usize {
        let mut store = lock(&self.shared.store);
        store.watches.retain(|w| !w.is_closed());
        store.watches.len()
    }

    /// Answers every read of `kind` with 403 Forbidden, as the real API server does for a
    /// ServiceAccount whose role lacks the rule (an agent upgraded before its ClusterRole).
    ///
    /// # Panics
    /// On an unsupported kind.
    pub fn forbid(&self, kind: &str) {
        let k = Kind::from_kind(kind)
            .unwrap_or_else(|| panic!("fake API server: forbid: unsupported kind {kind:?}"));
        lock(&self.shared.forbidden).push(k);
    }

    /// Every request answered so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // Err: the thread has already ended (it can only end by panicking).
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("fake API server: its thread panicked (see the output above)");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    log: Mutex<Vec<Request>>,
    /// Kinds the client may not read (RBAC without the rule): 403 Forbidden.
    forbidden: Mutex<Vec<Kind>>,
}

/// Locks a mutex; a panic elsewhere while holding it leaves the data usable for a test.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Namespace,
    Node,
    Service,
    Pod,
    EndpointSlice,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Service,
        Kind::Pod,
        Kind::EndpointSlice,
    ];

    fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    fn from_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            _ => "",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Service => "services",
            Kind::Pod => "pods",
            Kind::EndpointSlice => "endpointslices",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// Field selectors the real API server accepts for this kind (besides metadata.name and
    /// metadata.namespace, which every kind accepts).
    fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["status.phase"],
            Kind::Node => &["spec.unschedulable"],
            Kind::Service => &["spec.clusterIP", "spec.type"],
            Kind::Pod => &[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Kind::EndpointSlice => &[],
        }
    }
}

/// (kind, namespace ("" when cluster-scoped), name); the map order is the list order.
type Key = (Kind, String, String);

/// One write, as the watches see it.
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    /// The object before the write (None: created).
    prev: Option<Value>,
    /// The object after the write (None: deleted).
    cur: Option<Value>,
}

enum WatchMsg {
    Change(Arc<Change>),
    Bookmark { rv: u64, initial_events_end: bool },
    Expire { compacted: u64 },
    Close,
}

/// The rest of a paged list: the snapshot its first page was cut from.
struct Page {
    rv: u64,
    items: Vec<Value>,
}

#[derive(Default)]
struct Store {
    /// The latest resourceVersion issued.
    rv: u64,
    /// Watches from a resourceVersion older than this get 410.
    compacted: u64,
    next_uid: u64,
    next_page: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change after `compacted`, oldest first.
    history: Vec<Arc<Change>>,
    /// Senders to the open watches. Unbounded: a test writes a handful of objects, and the
    /// writer (a sync test) cannot wait for a slow watch.
    watches: Vec<mpsc::UnboundedSender<WatchMsg>>,
    /// Continue token -> rest of a paged list.
    pages: HashMap<String, Page>,
}

impl Store {
    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push(change.clone());
        self.send_all(|| WatchMsg::Change(change.clone()));
    }

    /// Sends a message to every open watch, forgetting closed ones; returns how many got it.
    fn send_all(&mut self, msg: impl Fn() -> WatchMsg) -> usize {
        self.watches.retain(|w| w.send(msg()).is_ok());
        self.watches.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Parses a label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`,
/// comma-joined (all must hold).
fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    terms.into_iter().map(parse_label_term).collect()
}

fn parse_label_term(term: &str) -> Result<LabelReq, String> {
    let term = term.trim();
    let bad = || format!("unable to parse requirement: {term:?}");
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let value_ok = |v: &str| {
        v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(bad)?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
        if values.iter().all(|v| value_ok(v)) {
            Ok(values)
        } else {
            Err(bad())
        }
    };
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return if key_ok(key) {
            Ok(LabelReq::NotExists(key.to_owned()))
        } else {
            Err(bad())
        };
    }
    if let Some((key, rest)) = term.split_once(" notin ") {
        let key = key.trim();
        return if key_ok(key) {
            Ok(LabelReq::NotIn(key.to_owned(), set(rest)?))
        } else {
            Err(bad())
        };
    }
    if let Some((key, rest)) = term.split_once(" in ") {
        let key = key.trim();
        return if key_ok(key) {
            Ok(LabelReq::In(key.to_owned(), set(rest)?))
        } else {
            Err(bad())
        };
    }
    let (key, value, negated) = if let Some((k, v)) = term.split_once("!=") {
        (k, v, true)
    } else if let Some((k, v)) = term.split_once("==") {
        (k, v, false)
    } else if let Some((k, v)) = term.split_once('=') {
        (k, v, false)
    } else if key_ok(term) {
        return Ok(LabelReq::Exists(term.to_owned()));
    } else {
        return Err(bad());
    };
    let (key, value) = (key.trim(), value.trim());
    if !key_ok(key) || !value_ok(value) {
        return Err(bad());
    }
    Ok(if negated {
        LabelReq::NotEq(key.to_owned(), value.to_owned())
    } else {
        LabelReq::Eq(key.to_owned(), value.to_owned())
    })
}

impl LabelReq {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    path: String,
    value: String,
    negated: bool,
}

/// Parses a field selector: `f=v`, `f==v`, `f!=v`, comma-joined, with only the fields the real
/// API server supports for `kind`.
fn parse_field_selector(kind: Kind, s: &str) -> Result<Vec<FieldReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|term| {
            let (path, value, negated) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, false)
            } else {
                return Err(format!("invalid selector: {term:?}; can't understand it"));
            };
            let path = path.trim();
            if !["metadata.name", "metadata.namespace"].contains(&path)
                && !kind.selectable_fields().contains(&path)
            {
                return Err(format!(
                    "field label not supported: {path} (for {})",
                    kind.plural()
                ));
            }
            Ok(FieldReq {
                path: path.to_owned(),
                value: value.trim().to_owned(),
                negated,
            })
        })
        .collect()
}

impl FieldReq {
    fn matches(&self, obj: &Value) -> bool {
        let mut v = obj;
        for part in self.path.split('.') {
            v = v.get(part).unwrap_or(&Value::Null);
        }
        let actual = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        (actual == self.value) != self.negated
    }
}

/// What a list or watch selects.
struct Filter {
    kind: Kind,
    /// From a namespaced path; None: all namespaces.
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn in_scope(&self, kind: Kind, namespace: &str) -> bool {
        kind == self.kind && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"].get("labels").and_then(Value::as_object);
        self.labels.iter().all(|l| l.matches(labels)) && self.fields.iter().all(|f| f.matches(obj))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let response = handle(&shared, &req);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        // An error here is a client that went away or a watch that
                        // close_watches() broke on purpose: nothing to report.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of file descriptors and the like: retry shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// What a request resolved to, before it is logged.
enum Outcome {
    Json(StatusCode, Value),
    Watch(Watch),
}

fn handle<B>(shared: &Arc<Shared>, req: &hyper::Request<B>) -> hyper::Response<Body> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let outcome = if req.method() != Method::GET {
        Outcome::Json(
            StatusCode::METHOD_NOT_ALLOWED,
            status_json(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("the fake API server only serves GET, not {}", req.method()),
            ),
        )
    } else {
        route(shared, &path, &query)
    };
    let status = match &outcome {
        Outcome::Json(status, _) => *status,
        Outcome::Watch(_) => StatusCode::OK,
    };
    let log_index = {
        let mut log = lock(&shared.log);
        log.push(Request {
            method: req.method().to_string(),
            path,
            query,
            status: status.as_u16(),
            watch_error: None,
        });
        log.len() - 1
    };
    let body = match outcome {
        Outcome::Json(_, value) => {
            let mut text = value.to_string();
            text.push('\n');
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed_unsync()
        }
        Outcome::Watch(mut watch) => {
            watch.log_index = log_index;
            watch.shared = Some(shared.clone());
            let events = futures_util::stream::unfold(watch, |mut watch| async move {
                watch.next_frame().await.map(|frame| (frame, watch))
            });
            StreamBody::new(events).boxed_unsync()
        }
    };
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Parses `a=b&c=d`, percent-decoding keys and values (`+` is a space).
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Outcome {
    Outcome::Json(code, status_json(code, reason, message))
}

fn bad_request(message: &str) -> Outcome {
    error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn expired(message: &str) -> Outcome {
    error(StatusCode::GONE, "Expired", message)
}

/// What a path names.
enum Target {
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, "v1", rest @ ..] => (*group, rest),
        _ => return None,
    };
    let target = match *rest {
        [plural] => Target::Collection {
            kind: Kind::from_plural(group, plural)?,
            namespace: None,
        },
        [plural, name] => Target::Object {
            kind: Kind::from_plural(group, plural)?,
            namespace: String::new(),
            name: name.to_owned(),
        },
        ["namespaces", ns, plural] => Target::Collection {
            kind: Kind::from_plural(group, plural)?,
            namespace: Some(ns.to_owned()),
        },
        ["namespaces", ns, plural, name] => Target::Object {
            kind: Kind::from_plural(group, plural)?,
            namespace: ns.to_owned(),
            name: name.to_owned(),
        },
        _ => return None,
    };
    // Namespaced kinds live under namespaces/{ns}/ (or are listed across all of them);
    // cluster-scoped kinds never do.
    let scoped_right = match &target {
        Target::Collection { kind, namespace } => kind.namespaced() || namespace.is_none(),
        Target::Object {
            kind, namespace, ..
        } => kind.namespaced() != namespace.is_empty(),
    };
    scoped_right.then_some(target)
}

fn route(shared: &Shared, path: &str, query: &[(String, String)]) -> Outcome {
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(target) = parse_path(path) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let target_kind = match &target {
        Target::Collection { kind, .. } | Target::Object { kind, .. } => *kind,
    };
    if lock(&shared.forbidden).contains(&target_kind) {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "{} is forbidden: User \"system:serviceaccount:interceptor:interceptor\" cannot list resource \"{}\" in API group \"{}\" at the cluster scope",
                target_kind.plural(),
                target_kind.plural(),
                target_kind.group()
            ),
        );
    }
    let (kind, namespace) = match target {
        Target::Object {
            kind,
            namespace,
            name,
        } => {
            let store = lock(&shared.store);
            return match store.objects.get(&(kind, namespace, name.clone())) {
                Some(obj) => Outcome::Json(StatusCode::OK, obj.clone()),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind.plural()),
                ),
            };
        }
        Target::Collection { kind, namespace } => (kind, namespace),
    };
    let labels = match parse_label_selector(param("labelSelector").unwrap_or("")) {
        Ok(labels) => labels,
        Err(e) => return bad_request(&e),
    };
    let fields = match parse_field_selector(kind, param("fieldSelector").unwrap_or("")) {
        Ok(fields) => fields,
        Err(e) => return bad_request(&e),
    };
    let filter = Filter {
        kind,
        namespace,
        labels,
        fields,
    };
    let rv = match param("resourceVersion").filter(|rv| !rv.is_empty()) {
        None => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(&format!("invalid resourceVersion {rv:?}")),
        },
    };
    let version_match = param("resourceVersionMatch").filter(|m| !m.is_empty());
    match param("watch") {
        Some("true" | "1") => start_watch(shared, filter, rv, version_match, param),
        None | Some("false" | "0" | "") => list(shared, filter, rv, version_match, param),
        Some(other) => bad_request(&format!("invalid watch parameter {other:?}")),
    }
}

fn list<'a>(
    shared: &Shared,
    filter: Filter,
    rv: Option<u64>,
    version_match: Option<&str>,
    param: impl Fn(&str) -> Option<&'a str>,
) -> Outcome {
    let limit = match param("limit")
        .filter(|l| !l.is_empty())
        .map(str::parse::<usize>)
    {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let mut store = lock(&shared.store);
    let (snapshot_rv, mut items) = match param("continue").filter(|c| !c.is_empty()) {
        Some(token) => match store.pages.remove(token) {
            Some(page) => (page.rv, page.items),
            None => {
                return expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                )
            }
        },
        None => {
            match (version_match, rv) {
                (None | Some("NotOlderThan"), _) => {}
                (Some("Exact"), Some(rv)) if rv == store.rv => {}
                (Some("Exact"), Some(rv)) if rv < store.compacted => {
                    return expired(&format!(
                        "too old resource version: {rv} ({})",
                        store.compacted
                    ))
                }
                (Some("Exact"), Some(_)) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "the fake API server lists only the latest resourceVersion exactly",
                    )
                }
                (Some(m), None) => {
                    return bad_request(&format!(
                        "resourceVersionMatch {m:?} is forbidden unless resourceVersion is provided"
                    ))
                }
                (Some(m), Some(_)) => {
                    return bad_request(&format!("unsupported resourceVersionMatch {m:?}"))
                }
            }
            let items = store
                .objects
                .iter()
                .filter(|((k, ns, _), obj)| filter.in_scope(*k, ns) && filter.matches(obj))
                .map(|(_, obj)| {
                    let mut item = obj.clone();
                    if let Some(item) = item.as_object_mut() {
                        item.remove("kind");
                        item.remove("apiVersion");
                    }
                    item
                })
                .collect();
            (store.rv, items)
        }
    };
    let mut metadata = json!({ "resourceVersion": snapshot_rv.to_string() });
    if let Some(limit) = limit.filter(|&l| l < items.len()) {
        let rest = items.split_off(limit);
        store.next_page += 1;
        let token = format!("{snapshot_rv}-{}", store.next_page);
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        store.pages.insert(
            token,
            Page {
                rv: snapshot_rv,
                items: rest,
            },
        );
    }
    Outcome::Json(
        StatusCode::OK,
        json!({
            "kind": format!("{}List", filter.kind.kind()),
            "apiVersion": filter.kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn start_watch<'a>(
    shared: &Shared,
    filter: Filter,
    rv: Option<u64>,
    version_match: Option<&str>,
    param: impl Fn(&str) -> Option<&'a str>,
) -> Outcome {
    let bookmarks = matches!(param("allowWatchBookmarks"), Some("true" | "1"));
    let send_initial_events = match param("sendInitialEvents") {
        None => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(other) => return bad_request(&format!("invalid sendInitialEvents {other:?}")),
    };
    match (send_initial_events, version_match) {
        (None, Some(_)) => {
            return bad_request(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            )
        }
        (Some(_), m) if m != Some("NotOlderThan") => {
            return bad_request(
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )
        }
        (Some(true), _) if !bookmarks => {
            return bad_request("sendInitialEvents requires allowWatchBookmarks=true")
        }
        _ => {}
    }
    let timeout = match param("timeoutSeconds").filter(|t| !t.is_empty()) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(t) => match t.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => return bad_request(&format!("invalid timeoutSeconds {t:?}")),
        },
    };

    let (tx, rx) = mpsc::unbounded_channel();
    let mut store = lock(&shared.store);
    // Everything queued here is decided under the lock, so the watch sees each change once:
    // either in the state or history it starts from, or as a live change.
    let initial_state = send_initial_events.unwrap_or(matches!(rv, None | Some(0)));
    let start_rv = if initial_state {
        for ((k, ns, _), obj) in &store.objects {
            if filter.in_scope(*k, ns) {
                let synthetic = Change {
                    rv: store.rv,
                    kind: *k,
                    namespace: ns.clone(),
                    prev: None,
                    cur: Some(obj.clone()),
                };
                // Err cannot happen: rx is alive.
                let _ = tx.send(WatchMsg::Change(Arc::new(synthetic)));
            }
        }
        if send_initial_events == Some(true) {
            let _ = tx.send(WatchMsg::Bookmark {
                rv: store.rv,
                initial_events_end: true,
            });
        }
        store.rv
    } else {
        let from = rv.unwrap_or(store.rv);
        if from < store.compacted {
            let _ = tx.send(WatchMsg::Expire {
                compacted: store.compacted,
            });
        } else {
            for change in store.history.iter().filter(|c| c.rv > from) {
                let _ = tx.send(WatchMsg::Change(change.clone()));
            }
        }
        from
    };
    store.watches.push(tx);
    drop(store);
    Outcome::Watch(Watch {
        rx,
        filter,
        bookmarks,
        deadline: tokio::time::Instant::now() + timeout,
        last_rv: start_rv,
        done: false,
        shared: None,
        log_index: 0,
    })
}

/// One watch response being streamed.
struct Watch {
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    filter: Filter,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    /// resourceVersion of the last event sent (or where the watch started).
    last_rv: u64,
    /// An ERROR event went out: end the response.
    done: bool,
    /// For recording an ERROR in the request log.
    shared: Option<Arc<Shared>>,
    log_index: usize,
}

impl Watch {
    /// The next chunk: one event line. None ends the response cleanly; Some(Err) breaks the
    /// connection.
    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        loop {
            if self.done {
                return None;
            }
            let msg = tokio::select! {
                () = tokio::time::sleep_until(self.deadline) => return None,
                msg = self.rx.recv() => msg?,
            };
            let event = match msg {
                WatchMsg::Change(change) => match self.event_for(&change) {
                    Some(event) => event,
                    None => continue,
                },
                WatchMsg::Bookmark {
                    rv,
                    initial_events_end,
                } => {
                    if !self.bookmarks {
                        continue;
                    }
                    self.last_rv = self.last_rv.max(rv);
                    let mut metadata = json!({ "resourceVersion": rv.to_string() });
                    if initial_events_end {
                        metadata["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
                    }
                    json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": self.filter.kind.kind(),
                            "apiVersion": self.filter.kind.api_version(),
                            "metadata": metadata,
                        },
                    })
                }
                WatchMsg::Expire { compacted } => {
                    self.done = true;
                    if let Some(shared) = &self.shared {
                        if let Some(entry) = lock(&shared.log).get_mut(self.log_index) {
                            entry.watch_error = Some(StatusCode::GONE.as_u16());
                        }
                    }
                    json!({
                        "type": "ERROR",
                        "object": status_json(
                            StatusCode::GONE,
                            "Expired",
                            &format!("too old resource version: {} ({compacted})", self.last_rv),
                        ),
                    })
                }
                WatchMsg::Close => {
                    return Some(Err(
                        "fake API server: close_watches() broke this watch".into()
                    ))
                }
            };
            let mut line = event.to_string();
            line.push('\n');
            return Some(Ok(Frame::data(Bytes::from(line))));
        }
    }

    /// The event this watch sends for a change, like the real watch cache: the change's
    /// object must match now or before; one that stops matching is DELETED (its previous
    /// state at the new resourceVersion), one that starts matching is ADDED.
    fn event_for(&mut self, change: &Change) -> Option<Value> {
        if !self.filter.in_scope(change.kind, &change.namespace) {
            return None;
        }
        let now = change.cur.as_ref().filter(|o| self.filter.matches(o));
        let before = change.prev.as_ref().filter(|o| self.filter.matches(o));
        let (kind, object) = match (now, before) {
            (Some(now), None) => ("ADDED", now.clone()),
            (Some(now), Some(_)) => ("MODIFIED", now.clone()),
            (None, Some(before)) => {
                let mut last = before.clone();
                last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                ("DELETED", last)
            }
            (None, None) => return None,
        };
        self.last_rv = self.last_rv.max(change.rv);
        Some(json!({ "type": kind, "object": object }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let matches = |sel: &str| {
            parse_label_selector(sel)
                .expect("selector parses")
                .iter()
                .all(|r| r.matches(Some(&l)))
        };
        assert!(matches(""));
        assert!(matches("app=web"));
        assert!(matches("app==web,tier"));
        assert!(matches("app!=db"));
        assert!(matches("missing!=x"));
        assert!(matches("!missing"));
        assert!(matches("tier in (front, back),app notin (db)"));
        assert!(!matches("app=db"));
        assert!(!matches("app=web,missing"));
        assert!(!matches("!app"));
        assert!(!matches("tier notin (front)"));
        assert!(parse_label_selector("app=we b").is_err());
        assert!(parse_label_selector("a in b").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"},
                         "spec": {"nodeName": "node-a", "hostNetwork": true}});
        let matches = |sel: &str| {
            parse_field_selector(Kind::Pod, sel)
                .expect("selector parses")
                .iter()
                .all(|r| r.matches(&pod))
        };
        assert!(matches("spec.nodeName=node-a"));
        assert!(matches("spec.nodeName==node-a,metadata.namespace=ns"));
        assert!(matches("metadata.name!=q,spec.hostNetwork=true"));
        assert!(matches("status.phase="));
        assert!(!matches("spec.nodeName=node-b"));
        let err = parse_field_selector(Kind::Service, "spec.nodeName=x")
            .expect_err("services have no spec.nodeName field selector");
        assert!(err.contains("field label not supported"), "{err}");
    }

    #[test]
    fn queries_are_percent_decoded() {
        assert_eq!(
            parse_query("fieldSelector=spec.nodeName%3Dnode-a&watch=true&x=a+b&y"),
            vec![
                ("fieldSelector".into(), "spec.nodeName=node-a".into()),
                ("watch".into(), "true".into()),
                ("x".into(), "a b".into()),
                ("y".into(), "".into()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%2"), "%2");
    }

    #[test]
    fn paths() {
        let collection = |p: &str| match parse_path(p) {
            Some(Target::Collection { kind, namespace }) => Some((kind, namespace)),
            _ => None,
        };
        assert_eq!(collection("/api/v1/pods"), Some((Kind::Pod, None)));
        assert_eq!(
            collection("/api/v1/namespaces/ns1/services"),
            Some((Kind::Service, Some("ns1".into())))
        );
        assert_eq!(
            collection("/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices"),
            Some((Kind::EndpointSlice, Some("ns1".into())))
        );
        assert_eq!(
            collection("/api/v1/namespaces"),
            Some((Kind::Namespace, None))
        );
        assert!(collection("/api/v1/endpointslices").is_none());
        assert!(collection("/apis/apps/v1/deployments").is_none());
        assert!(matches!(
            parse_path("/api/v1/namespaces/ns1"),
            Some(Target::Object {
                kind: Kind::Namespace,
                ..
            })
        ));
        assert!(parse_path("/api/v1/pods/p1").is_none());
        assert!(parse_path("/api/v1/namespaces/ns1/namespaces").is_none());
    }
}
