//! The standalone `interceptor proxy` mode (argument parsing, endpoints file reload, drain on
//! shutdown) and the metrics the proxy emits.

#[path = "proxy_support.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use interceptor::app::standalone::serve;
use interceptor::cli::{BalancerArg, ProxyArgs};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use support::*;
use tokio::time::timeout;

/// Records every metric by its key with labels, e.g. `name{a=b,c=d}`.
#[derive(Clone, Default)]
struct TestRecorder(Arc<Mutex<HashMap<String, Arc<Cell>>>>);

#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    fn absolute(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, v: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
                Some((f64::from_bits(x) + v).to_bits())
            });
    }
    fn decrement(&self, v: f64) {
        GaugeFn::increment(self, -v);
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

impl HistogramFn for Cell {
    fn record(&self, _v: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0
            .lock()
            .expect("metrics")
            .entry(name)
            .or_default()
            .clone()
    }
    fn value(&self, name: &str) -> Option<u64> {
        self.0
            .lock()
            .expect("metrics")
            .get(name)
            .map(|c| c.0.load(Ordering::Relaxed))
    }
    fn gauge(&self, name: &str) -> Option<f64> {
        self.value(name).map(f64::from_bits)
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.lock().expect("metrics").keys().cloned().collect();
        v.sort();
        v
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

/// The process's recorder, installed by whichever test comes first.
fn test_recorder() -> TestRecorder {
    static RECORDER: std::sync::OnceLock<TestRecorder> = std::sync::OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let rec = TestRecorder::default();
            metrics::set_global_recorder(rec.clone()).expect("install the test recorder");
            interceptor::proxy::metrics::describe();
            rec
        })
        .clone()
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    proxy: ProxyArgs,
}

#[test]
fn arguments_parse() {
    let cli = Cli::try_parse_from([
        "interceptor",
        "--listen",
        "127.0.0.1:9000",
        "--endpoints",
        "127.0.0.2:50051,127.0.0.3:50051",
        "--balancer",
        "round-robin",
        "--detect-timeout-ms",
        "100",
    ])
    .expect("arguments parse");
    assert_eq!(cli.proxy.endpoints.len(), 2);
    assert_eq!(cli.proxy.balancer, BalancerArg::RoundRobin);
    assert_eq!(
        cli.proxy.config().detect_timeout,
        Duration::from_millis(100)
    );
    assert!(Cli::try_parse_from(["interceptor", "--balancer", "random"]).is_err());
    // The limits: defaults, and each flag reaching the proxy's configuration.
    let defaults = Cli::try_parse_from(["interceptor"]).expect("defaults");
    let cfg = defaults.proxy.config();
    assert_eq!(cfg.stream_idle_timeout, Duration::from_secs(300));
    assert_eq!(cfg.max_header_list_bytes, 64 * 1024);
    assert_eq!(cfg.max_client_connections, None);
    let tuned = Cli::try_parse_from([
        "interceptor",
        "--stream-idle-timeout-ms",
        "0",
        "--max-header-list-bytes",
        "16384",
        "--max-client-connections",
        "500",
    ])
    .expect("limits parse");
    let cfg = tuned.proxy.config();
    assert!(cfg.stream_idle_timeout.is_zero());
    assert_eq!(cfg.max_header_list_bytes, 16384);
    assert_eq!(cfg.max_client_connections, Some(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_file_reload_drain_and_metrics() {
    let rec = test_recorder();

    let b2 = Backend::start([127, 0, 0, 2], "b2");
    let b3 = Backend::start([127, 0, 0, 3], "b3");
    let file = std::env::temp_dir().join(format!(
        "interceptor-proxy-endpoints-{}.txt",
        std::process::id()
    ));
    std::fs::write(&file, format!("# test endpoints\n{}\n", b2.addr))
        .expect("write endpoints file");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cli = Cli::try_parse_from([
        "interceptor",
        "--endpoints-file",
        file.to_str().expect("utf-8 path"),
        "--reload-interval-ms",
        "50",
    ])
    .expect("arguments");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, cli.proxy, async {
        let _ = stop_rx.await;
    }));

    let mut c = client(addr).await;
    for _ in 0..20 {
        let r = unary(&mut c, request(Bytes::from_static(b"x"), &[]))
            .await
            .expect("call via b2");
        assert_eq!(backend_of(&r), "b2");
    }
    std::fs::write(&file, format!("{}\n", b3.addr)).expect("rewrite endpoints file");
    let switched = Instant::now();
    timeout(Duration::from_secs(5), async {
        loop {
            let r = unary(&mut c, request(Bytes::from_static(b"x"), &[]))
                .await
                .expect("call during reload");
            if backend_of(&r) == "b3" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the reloaded endpoint took over");
    println!(
        "endpoints file change took effect after {:?}",
        switched.elapsed()
    );
    for _ in 0..20 {
        let r = unary(&mut c, request(Bytes::from_static(b"x"), &[]))
            .await
            .expect("call via b3");
        assert_eq!(backend_of(&r), "b3");
    }

    // A call in flight at shutdown completes; then serve returns.
    let slow = tokio::spawn({
        let mut c = c.clone();
        async move {
            unary(
                &mut c,
                request(Bytes::from_static(b"slow"), &[("x-sleep-ms", "300")]),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(()).expect("stop");
    let r = timeout(Duration::from_secs(5), slow)
        .await
        .expect("slow call in time")
        .expect("task");
    assert_eq!(
        r.expect("in-flight call drained").into_inner(),
        Bytes::from_static(b"slow")
    );
    timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returned")
        .expect("task")
        .expect("serve ok");
    let _ = std::fs::remove_file(&file);

    println!("metrics: {:#?}", rec.names());
    // A standalone proxy names no Service: its listen address stands in for one.
    let svc = format!("namespace=,port={},service={addr}", addr.port());
    let ok2 = rec.value(&format!(
        "interceptor_requests_total{{endpoint={},namespace=,port={},protocol=h2,service={addr},status=0}}",
        b2.addr,
        addr.port()
    ));
    assert_eq!(ok2, Some(b2.calls() as u64));
    assert!(b2.calls() >= 20);
    let ok3 = rec.value(&format!(
        "interceptor_requests_total{{endpoint={},namespace=,port={},protocol=h2,service={addr},status=0}}",
        b3.addr,
        addr.port()
    ));
    assert_eq!(ok3, Some(b3.calls() as u64));
    assert!(
        rec.value("interceptor_detections_total{protocol=h2}")
            .unwrap_or(0)
            >= 1
    );
    assert!(
        rec.value(&format!("interceptor_request_duration_seconds{{{svc}}}"))
            .unwrap_or(0)
            >= 41
    );
    assert_eq!(
        rec.gauge(&format!("interceptor_active_streams{{{svc}}}")),
        Some(0.0)
    );
    assert!(rec
        .gauge(&format!(
            "interceptor_upstream_connections{{endpoint={},protocol=h2}}",
            b2.addr
        ))
        .is_some());
}

/// An endpoint that closes a connection in self-defence (GOAWAY ENHANCE_YOUR_CALM, as h2 does
/// for streams reset before it accepted them) shows in
/// `interceptor_upstream_goaways_total{endpoint,reason}`: what an operator looks at when calls
/// fail with "connection to the endpoint failed". Both engines. The endpoint drains after its
/// GOAWAY: one that resets the connection at once can make the streams engine's h2 fail on
/// its write before it read the GOAWAY, and then it is not counted there (the relay reads
/// it, `proxy_failures.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_goaway_with_an_error_is_counted_by_endpoint_and_code() {
    let rec = test_recorder();
    let (addr, _accepted) = goaway_endpoint([127, 0, 3, 4], AfterGoaway::Drain).await;
    let p = start_proxy(interceptor::proxy::config::ProxyConfig::default(), &[addr]).await;
    let mut c = client(p.addr).await;
    let r = timeout(
        Duration::from_secs(10),
        unary(&mut c, request(Bytes::from_static(b"x"), &[])),
    )
    .await
    .expect("the call ends in time");
    r.expect("the call goes on the endpoint's next connection");
    let key =
        format!("interceptor_upstream_goaways_total{{endpoint={addr},reason=enhance_your_calm}}");
    // Counted by the connection's own task, which may finish after the call did.
    let counted = timeout(Duration::from_secs(5), async {
        while rec.value(&key).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let names: Vec<String> = rec
        .names()
        .into_iter()
        .filter(|n| n.contains("goaways"))
        .collect();
    assert!(
        counted.is_ok(),
        "{key} not recorded; goaway series: {names:?}"
    );
    assert_eq!(rec.value(&key), Some(1), "{names:?}");
}
