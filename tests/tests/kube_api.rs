//! The test API server (`interceptor_tests::kube_api`) driven by kube-rs itself: the client is
//! built from the kubeconfig the server writes, and `watcher`/`reflector` must see initial
//! lists, changes, bookmarks, reconnects and 410 relists exactly as against a real API server.
//! No root needed.

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use interceptor_tests::kube_api::{FakeApiServer, Request};
use interceptor_tests::unique_id;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::Event;
use kube::runtime::{reflector, watcher};
use kube::{Client, Config, ResourceExt};
use serde_json::{json, Value};

/// Bound on every wait for something that must happen.
const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// A client built the way the agent builds one: from a kubeconfig file.
async fn client(server: &FakeApiServer) -> Client {
    let path = std::env::temp_dir().join(format!("icp-kubeconfig-{}.yaml", unique_id()));
    server
        .write_kubeconfig(&path)
        .expect("write the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kube-rs reads the kubeconfig");
    std::fs::remove_file(&path).expect("remove the kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    assert_eq!(config.default_namespace, "default");
    // An HTTPS_PROXY in the environment must not reroute a server on 127.0.0.1.
    config.proxy_url = None;
    Client::try_from(config).expect("build a kube client")
}

fn pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "apps", "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"podIP": "10.0.0.1", "phase": "Running"},
    })
}

fn service(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "apps", "labels": {"app": app}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "grpc", "port": 8080}]},
    })
}

/// The next watcher item, whatever it is.
async fn next_item<K>(events: &mut Events<K>, what: &str) -> Result<Event<K>, watcher::Error> {
    match tokio::time::timeout(WAIT, events.next()).await {
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        Ok(None) => panic!("the watcher stream ended while waiting for {what}"),
        Ok(Some(item)) => item,
    }
}

/// The next watcher event, as `Init`, `InitApply(name)`, `Apply(name)`, ...
async fn next_event<K: ResourceExt>(events: &mut Events<K>, what: &str) -> (String, Option<K>) {
    match next_item(events, what).await {
        Err(e) => panic!("watcher error while waiting for {what}: {e}"),
        Ok(event) => {
            let text = event.to_string();
            let obj = match event {
                Event::Apply(o) | Event::Delete(o) | Event::InitApply(o) => Some(o),
                Event::Init | Event::InitDone => None,
            };
            (text, obj)
        }
    }
}

/// Asserts that the next event is `expected` (e.g. "Apply(p1)") and returns its object.
async fn expect_event<K: ResourceExt>(events: &mut Events<K>, expected: &str) -> Option<K> {
    let (got, obj) = next_event(events, expected).await;
    assert_eq!(got, expected, "unexpected watcher event");
    obj
}

/// Asserts that the watcher yields nothing for a while.
async fn expect_quiet<K: ResourceExt>(events: &mut Events<K>, why: &str) {
    if let Ok(item) = tokio::time::timeout(QUIET, events.next()).await {
        let got = match item {
            None => "the end of the stream".to_owned(),
            Some(Ok(event)) => event.to_string(),
            Some(Err(e)) => format!("error {e}"),
        };
        panic!("expected no watcher event ({why}), got {got}");
    }
}

/// Waits until `cond` holds, polling.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `cond` holds while polling the watcher (it only makes requests when polled),
/// which must yield nothing meanwhile.
async fn poll_until<K: ResourceExt>(
    events: &mut Events<K>,
    what: &str,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(10), events.next()).await {
            let got = match item {
                None => "the end of the stream".to_owned(),
                Some(Ok(event)) => event.to_string(),
                Some(Err(e)) => format!("error {e}"),
            };
            panic!("expected no watcher event while waiting until {what}, got {got}");
        }
    }
}

/// The logged requests for one path, in order.
fn requests_for(server: &FakeApiServer, path: &str) -> Vec<Request> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

/// Requests one per line, for failure messages.
fn show(requests: &[Request]) -> String {
    requests
        .iter()
        .map(|r| format!("  {r}\n"))
        .collect::<String>()
}

#[tokio::test]
async fn kubeconfig_client_lists_and_gets_typed_objects() {
    let server = FakeApiServer::start();
    server.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels:\n    interceptor.io/enabled: \"true\"\n\
         ---\n\
         kind: Pod\nmetadata:\n  name: in-default\nspec:\n  nodeName: node-a\n  containers: []\n",
    );
    server.apply(pod("p1", "node-a"));
    server.apply(service("web", "web"));
    let client = client(&server).await;

    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list all pods");
    let mut names: Vec<String> = pods.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["in-default", "p1"]);
    assert_eq!(
        pods.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    let default_pods = Api::<Pod>::default_namespaced(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list pods in the kubeconfig's namespace");
    assert_eq!(default_pods.items.len(), 1);
    assert_eq!(
        default_pods.items[0].namespace().as_deref(),
        Some("default")
    );

    let ns = Api::<Namespace>::all(client.clone())
        .get("apps")
        .await
        .expect("get namespace apps");
    assert_eq!(
        ns.labels()
            .get("interceptor.io/enabled")
            .map(String::as_str),
        Some("true")
    );
    assert!(ns.uid().is_some(), "the server sets metadata.uid");

    let services: Api<Service> = Api::namespaced(client.clone(), "apps");
    let web = services.get("web").await.expect("get service web");
    assert_eq!(
        web.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("10.96.0.10")
    );
    let missing = services
        .get("nope")
        .await
        .expect_err("getting a missing service fails");
    match missing {
        kube::Error::Api(status) => assert_eq!(status.code, 404, "{status:?}"),
        other => panic!("expected a 404 Status, got {other}"),
    }

    let bad = Api::<Service>::all(client.clone())
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .expect_err("services have no spec.nodeName field selector");
    match bad {
        kube::Error::Api(status) => assert_eq!(status.code, 400, "{status:?}"),
        other => panic!("expected a 400 Status, got {other}"),
    }

    let slices = Api::<EndpointSlice>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list endpointslices");
    assert!(slices.items.is_empty());
}

#[tokio::test]
async fn pod_watcher_sees_only_its_node() {
    let server = FakeApiServer::start();
    server.apply(pod("p1", "node-a"));
    server.apply(pod("other", "node-b"));
    let client = client(&server).await;
    let mut events: Events<Pod> = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().fields("spec.nodeName=node-a"),
    )
    .boxed();

    expect_event(&mut events, "Init").await;
    expect_event(&mut events, "InitApply(p1)").await;
    expect_event(&mut events, "InitDone").await;

    server.apply(pod("p2", "node-a"));
    expect_event(&mut events, "Apply(p2)").await;

    // A pod on another node never arrives: the next event is the change made after it.
    server.apply(pod("other2", "node-b"));
    let mut p1 = pod("p1", "node-a");
    p1["metadata"]["labels"]["version"] = json!("2");
    server.apply(p1);
    let p1 = expect_event(&mut events, "Apply(p1)")
        .await
        .expect("an object");
    assert_eq!(p1.labels().get("version").map(String::as_str), Some("2"));

    // Moving off the node is a delete for this watch, moving onto it an add.
    server.apply(pod("p2", "node-b"));
    let gone = expect_event(&mut events, "Delete(p2)")
        .await
        .expect("an object");
    assert_eq!(
        gone.spec.and_then(|s| s.node_name).as_deref(),
        Some("node-a"),
        "DELETED carries the last state that matched"
    );
    server.apply(pod("other", "node-a"));
    expect_event(&mut events, "Apply(other)").await;

    let deleted = server.delete("Pod", "apps", "p1").expect("p1 existed");
    let p1 = expect_event(&mut events, "Delete(p1)")
        .await
        .expect("an object");
    assert_eq!(
        p1.resource_version(),
        deleted["metadata"]["resourceVersion"]
            .as_str()
            .map(String::from)
    );
    server
        .delete("Pod", "apps", "other2")
        .expect("other2 existed");
    expect_quiet(&mut events, "a pod on node-b was deleted").await;

    let pod_requests = requests_for(&server, "/api/v1/pods");
    assert!(
        pod_requests.len() >= 2,
        "a list and a watch:\n{}",
        show(&pod_requests)
    );
    for r in &pod_requests {
        assert_eq!(
            r.param("fieldSelector"),
            Some("spec.nodeName=node-a"),
            "every pod list/watch is limited to the node:\n{}",
            show(&pod_requests)
        );
        assert_eq!(r.status, 200, "{r}");
    }
    assert!(!pod_requests[0].is_watch() && pod_requests[1].is_watch());
}

#[tokio::test]
async fn bookmarks_advance_the_watch_and_reconnects_resume_from_them() {
    let server = FakeApiServer::start();
    server.apply(pod("p1", "node-a"));
    let client = client(&server).await;
    let mut events: Events<Pod> = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().fields("spec.nodeName=node-a"),
    )
    .boxed();
    expect_event(&mut events, "Init").await;
    expect_event(&mut events, "InitApply(p1)").await;
    expect_event(&mut events, "InitDone").await;
    poll_until(&mut events, "the pod watch is open", || {
        server.open_watches() == 1
    })
    .await;

    // Changes to other objects move the resourceVersion on; the bookmark tells the watch.
    server.apply(service("web", "web"));
    server.apply(pod("elsewhere", "node-b"));
    let bookmark_rv = server.bookmark();
    expect_quiet(&mut events, "a bookmark is not an event").await;

    // The stream survives the bookmark.
    server.apply(pod("p2", "node-a"));
    expect_event(&mut events, "Apply(p2)").await;
    let after_p2 = server.resource_version();
    server.apply(service("db", "db"));
    let bookmark_rv2 = server.bookmark();
    assert!(bookmark_rv2 > after_p2);
    expect_quiet(&mut events, "a bookmark is not an event").await;

    // Breaking the connection: the watcher re-watches from the bookmark, without relisting.
    assert_eq!(server.close_watches(), 1);
    server.apply(pod("p3", "node-a"));
    expect_event(&mut events, "Apply(p3)").await;

    let pod_requests = requests_for(&server, "/api/v1/pods");
    let watches: Vec<&Request> = pod_requests.iter().filter(|r| r.is_watch()).collect();
    assert_eq!(
        pod_requests.iter().filter(|r| !r.is_watch()).count(),
        1,
        "one list only:\n{}",
        show(&pod_requests)
    );
    assert_eq!(watches.len(), 2, "{}", show(&pod_requests));
    assert_eq!(watches[0].param("allowWatchBookmarks"), Some("true"));
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(bookmark_rv2.to_string().as_str()),
        "the second watch resumes from the last bookmark ({bookmark_rv} was the first):\n{}",
        show(&pod_requests)
    );
}

#[tokio::test]
async fn watch_timeout_ends_the_watch_and_the_watcher_resumes() {
    let server = FakeApiServer::start();
    let client = client(&server).await;
    let mut events: Events<Pod> = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default()
            .fields("spec.nodeName=node-a")
            .timeout(1),
    )
    .boxed();
    expect_event(&mut events, "Init").await;
    expect_event(&mut events, "InitDone").await;
    poll_until(
        &mut events,
        "the pod watch was renewed after its timeoutSeconds",
        || {
            requests_for(&server, "/api/v1/pods")
                .iter()
                .filter(|r| r.is_watch())
                .count()
                >= 2
        },
    )
    .await;
    server.apply(pod("p1", "node-a"));
    expect_event(&mut events, "Apply(p1)").await;
    let pod_requests = requests_for(&server, "/api/v1/pods");
    assert_eq!(
        pod_requests.iter().filter(|r| !r.is_watch()).count(),
        1,
        "a timed-out watch is resumed, not relisted:\n{}",
        show(&pod_requests)
    );
    assert_eq!(pod_requests[1].param("timeoutSeconds"), Some("1"));
}

#[tokio::test]
async fn expire_forces_a_relist() {
    let server = FakeApiServer::start();
    server.apply(pod("p1", "node-a"));
    let client = client(&server).await;
    let mut events: Events<Pod> = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().fields("spec.nodeName=node-a"),
    )
    .boxed();
    expect_event(&mut events, "Init").await;
    expect_event(&mut events, "InitApply(p1)").await;
    expect_event(&mut events, "InitDone").await;
    poll_until(&mut events, "the pod watch is open", || {
        server.open_watches() == 1
    })
    .await;

    server.apply(pod("p2", "node-a"));
    expect_event(&mut events, "Apply(p2)").await;
    assert_eq!(server.expire(), 1, "one open watch ended");
    match next_item(&mut events, "the 410 error").await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!(status.code, 410, "{status:?}");
            assert_eq!(status.reason, "Expired", "{status:?}");
        }
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    expect_event(&mut events, "Init").await;
    expect_event(&mut events, "InitApply(p1)").await;
    expect_event(&mut events, "InitApply(p2)").await;
    expect_event(&mut events, "InitDone").await;
    server.apply(pod("p3", "node-a"));
    expect_event(&mut events, "Apply(p3)").await;

    let pod_requests = requests_for(&server, "/api/v1/pods");
    let kinds: Vec<String> = pod_requests
        .iter()
        .map(|r| {
            let kind = if r.is_watch() { "watch" } else { "list" };
            match r.watch_error {
                Some(code) => format!("{kind}->{code}"),
                None => kind.to_owned(),
            }
        })
        .collect();
    assert_eq!(
        kinds,
        ["list", "watch->410", "list", "watch"],
        "{}",
        show(&pod_requests)
    );
    let relist_rv = pod_requests[3].param("resourceVersion").expect("watch rv");
    let first_rv = pod_requests[1].param("resourceVersion").expect("watch rv");
    assert!(
        relist_rv.parse::<u64>().expect("numeric rv")
            > first_rv.parse::<u64>().expect("numeric rv"),
        "the relist watches from the new list's resourceVersion:\n{}",
        show(&pod_requests)
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410() {
    let server = FakeApiServer::start();
    server.apply(pod("p1", "node-a"));
    let old_rv = server.resource_version().to_string();
    server.apply(pod("p2", "node-a"));
    let client = client(&server).await;
    let api = Api::<Pod>::all(client);

    // Before compaction, history after old_rv is replayed.
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), &old_rv)
        .await
        .expect("start a watch")
        .boxed();
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(WatchEvent::Added(p)))) => assert_eq!(p.name_any(), "p2"),
        other => panic!("expected ADDED p2 from history, got {other:?}"),
    }
    drop(stream);

    server.expire();
    let mut stream = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("a watch from a compacted version still starts (200)")
        .boxed();
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => {
            assert_eq!(status.code, 410, "{status:?}");
            assert!(
                status.message.contains("too old resource version"),
                "{status:?}"
            );
        }
        other => panic!("expected an ERROR 410 event, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(None) => {}
        other => panic!("expected the watch to end after the error, got {other:?}"),
    }
    let last = server.requests().pop().expect("requests were logged");
    assert_eq!(last.watch_error, Some(410), "{last}");
}

#[tokio::test]
async fn label_selected_watch_sees_objects_leave_and_enter_the_selection() {
    let server = FakeApiServer::start();
    server.apply(service("web", "web"));
    server.apply(service("db", "db"));
    let client = client(&server).await;
    let mut events: Events<Service> = watcher(
        Api::<Service>::namespaced(client, "apps"),
        watcher::Config::default().labels("app in (web,api),tier!=internal"),
    )
    .boxed();
    expect_event(&mut events, "Init").await;
    expect_event(&mut events, "InitApply(web)").await;
    expect_event(&mut events, "InitDone").await;

    let mut web = service("web", "web");
    web["metadata"]["labels"]["tier"] = json!("internal");
    server.apply(web);
    expect_event(&mut events, "Delete(web)").await;
    server.apply(service("db", "api"));
    expect_event(&mut events, "Apply(db)").await;
    let mut other_ns = service("api", "api");
    other_ns["metadata"]["namespace"] = json!("elsewhere");
    server.apply(other_ns);
    expect_quiet(&mut events, "the watch is limited to namespace apps").await;

    let requests = requests_for(&server, "/api/v1/namespaces/apps/services");
    assert!(requests.len() >= 2, "{}", show(&requests));
    assert!(requests
        .iter()
        .all(|r| r.param("labelSelector") == Some("app in (web,api),tier!=internal")));
}

#[tokio::test]
async fn service_reflector_follows_changes_and_relists() {
    let server = FakeApiServer::start();
    server.apply(service("web", "web"));
    server.apply(service("db", "db"));
    let client = client(&server).await;
    let (store, writer) = reflector::store::<Service>();
    let mut reflected: Events<Service> = reflector(
        writer,
        watcher(Api::<Service>::all(client), watcher::Config::default()),
    )
    .boxed();
    // The reflector only moves while its stream is polled.
    let driver = tokio::spawn(async move {
        while let Some(item) = reflected.next().await {
            // Errors (the 410) are expected; the watcher recovers on the next poll.
            drop(item);
        }
    });

    tokio::time::timeout(WAIT, store.wait_until_ready())
        .await
        .expect("the store is ready in time")
        .expect("the reflector is alive");
    let names = |store: &reflector::Store<Service>| {
        let mut names: Vec<String> = store.state().iter().map(|s| s.name_any()).collect();
        names.sort();
        names
    };
    assert_eq!(names(&store), ["db", "web"]);

    server.apply(service("api", "api"));
    wait_until("api is in the store", || {
        names(&store) == ["api", "db", "web"]
    })
    .await;
    server.delete("Service", "apps", "db").expect("db existed");
    wait_until("db left the store", || names(&store) == ["api", "web"]).await;

    // History is gone; the relist must replace the store, so a delete the watch never saw
    // still removes the object.
    server.expire();
    server
        .delete("Service", "apps", "web")
        .expect("web existed");
    server.apply(service("cache", "cache"));
    wait_until("the relisted store has api and cache only", || {
        names(&store) == ["api", "cache"]
    })
    .await;
    let lists = requests_for(&server, "/api/v1/services")
        .iter()
        .filter(|r| !r.is_watch())
        .count();
    assert_eq!(lists, 2, "the 410 caused exactly one relist");
    driver.abort();
}

#[tokio::test]
async fn paged_lists_and_streaming_lists() {
    let server = FakeApiServer::start();
    for name in ["a", "b", "c"] {
        server.apply(json!({"kind": "Namespace", "metadata": {"name": name}}));
    }
    let slice = |name: &str, ns: &str| {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"name": "grpc", "port": 8080}],
        })
    };
    server.apply(slice("web-1", "apps"));
    let client = client(&server).await;

    // ListWatch with one object per page: the watcher follows the continue tokens.
    let mut namespaces: Events<Namespace> = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default().page_size(1),
    )
    .boxed();
    expect_event(&mut namespaces, "Init").await;
    for name in ["a", "b", "c"] {
        expect_event(&mut namespaces, &format!("InitApply({name})")).await;
    }
    expect_event(&mut namespaces, "InitDone").await;
    let lists: Vec<Request> = requests_for(&server, "/api/v1/namespaces")
        .into_iter()
        .filter(|r| !r.is_watch())
        .collect();
    assert_eq!(lists.len(), 3, "three pages:\n{}", show(&lists));
    assert!(lists[0].param("continue").is_none());
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());

    // StreamingList: the initial state comes over the watch, ended by a bookmark.
    let mut slices: Events<EndpointSlice> = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default()
            .labels("kubernetes.io/service-name=web")
            .streaming_lists(),
    )
    .boxed();
    expect_event(&mut slices, "Init").await;
    expect_event(&mut slices, "InitApply(web-1)").await;
    expect_event(&mut slices, "InitDone").await;
    server.apply(slice("web-2", "apps"));
    expect_event(&mut slices, "Apply(web-2)").await;
    let watches = requests_for(&server, "/apis/discovery.k8s.io/v1/endpointslices");
    assert_eq!(watches.len(), 1, "no list call:\n{}", show(&watches));
    assert_eq!(watches[0].param("sendInitialEvents"), Some("true"));
    assert_eq!(
        watches[0].param("resourceVersionMatch"),
        Some("NotOlderThan")
    );
}

#[tokio::test]
async fn dropping_the_server_ends_watches_and_closes_the_port() {
    let server = FakeApiServer::start();
    let addr = server.addr();
    let client = client(&server).await;
    let mut stream = Api::<Pod>::all(client)
        .watch(&WatchParams::default(), "0")
        .await
        .expect("start a watch")
        .boxed();
    wait_until("the watch is open", || server.open_watches() == 1).await;
    let dropped = tokio::task::spawn_blocking(move || drop(server));
    tokio::time::timeout(WAIT, dropped)
        .await
        .expect("drop returns in time")
        .expect("drop does not panic");
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(None | Some(Err(_))) => {}
        other => panic!("expected the watch to end with the server, got {other:?}"),
    }
    tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("nothing listens on the port after drop");
}
