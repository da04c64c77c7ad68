//! Interop with the gRPC stacks users run: grpcio (C-core), grpc-js and tonic clients, each
//! against servers of every stack behind one Service (two of them grpcio: C-core servers are
//! the ones that end a stream with RST_STREAM(NO_ERROR) after a complete response), through the standalone proxy and
//! through the connect hook. A proxy must never turn a successful call into an error: every
//! call of every run must succeed.
//!
//! The load is what once exposed a lost-trailers race (C-core saw `INTERNAL: Received
//! RST_STREAM with error code 0` on about 1 in 600 calls): sequential unary calls with 1-byte
//! requests, 20 runs x 1000 on fresh channels, then 10 runs x 1000 over 32 concurrent callers.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use interceptor_tests::cluster::{vip, GreetCluster, Spec};
use interceptor_tests::interop::{requests_served, CallResult, Load, Stack, STACKS};
use interceptor_tests::standalone::{free_port, Standalone};
use interceptor_tests::*;

const SEQUENTIAL: Load = Load {
    runs: 20,
    calls: 1000,
    concurrency: 1,
};
const CONCURRENT: Load = Load {
    runs: 10,
    calls: 1000,
    concurrency: 32,
};

/// The servers behind the Service, by stack.
const SERVERS: [Stack; 4] = [Stack::Grpcio, Stack::Grpcio, Stack::GrpcJs, Stack::Tonic];

/// Every call succeeded, and every server answered some of them (the calls were balanced
/// over all of them, not pinned to one).
fn check(client: Stack, path: &str, load: Load, r: &CallResult, servers: &[String]) {
    note(&format!(
        "{} client via {path}, {} runs x {} calls x {} callers: ok={} failed={} by server {:?}",
        client.name(),
        load.runs,
        load.calls,
        load.concurrency,
        r.ok,
        r.failed,
        r.by_server
    ));
    assert_eq!(
        (r.ok, r.failed),
        (load.total(), 0),
        "{} client via {path}: calls failed: {:?}",
        client.name(),
        r.errors
    );
    let floor = load.total() / 20;
    assert_eq!(
        r.by_server.len(),
        servers.len(),
        "{} client via {path}: servers that answered: {:?}",
        client.name(),
        r.by_server
    );
    for s in servers {
        let got = r.by_server.get(s).copied().unwrap_or(0);
        assert!(
            got >= floor,
            "{} client via {path}: server {s} answered {got} of {} calls (at least {floor} \
             expected with four servers): {:?}",
            client.name(),
            load.total(),
            r.by_server
        );
    }
}

/// `SERVERS` on loopback, behind `interceptor proxy`.
struct LocalServers {
    _servers: Vec<ChildGuard>,
    names: Vec<String>,
    proxy: Standalone,
}

impl LocalServers {
    fn start() -> Self {
        let mut servers = Vec::new();
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let mut names = Vec::new();
        for (i, stack) in SERVERS.into_iter().enumerate() {
            let addr = free_port();
            let name = format!("{}-server-{i}", stack.name());
            servers.push(stack.serve_local(&name, addr));
            addrs.push(addr);
            names.push(name);
        }
        let proxy = Standalone::start(&addrs);
        Self {
            _servers: servers,
            names,
            proxy,
        }
    }

    fn requests_served(&self) -> u64 {
        let (code, metrics) =
            interceptor::admin::get(self.proxy.admin, "/metrics").expect("proxy /metrics");
        assert_eq!(code, 200, "proxy /metrics");
        requests_served(&metrics)
    }

    fn run(&self, client: Stack) {
        for load in [SEQUENTIAL, CONCURRENT] {
            let before = self.requests_served();
            let r = client.calls_local(self.proxy.listen, load);
            check(client, "the standalone proxy", load, &r, &self.names);
            assert_eq!(
                self.requests_served() - before,
                load.total(),
                "the proxy counts every call it relayed"
            );
        }
    }
}

#[test]
fn grpcio_client_through_the_standalone_proxy_loses_no_call() {
    LocalServers::start().run(Stack::Grpcio);
}

#[test]
fn grpc_js_client_through_the_standalone_proxy_loses_no_call() {
    LocalServers::start().run(Stack::GrpcJs);
}

#[test]
fn tonic_client_through_the_standalone_proxy_loses_no_call() {
    LocalServers::start().run(Stack::Tonic);
}

/// A node with `SERVERS` as pods behind the ClusterIP, the namespace labelled:
/// every client stack's calls go through the connect hook and the agent.
#[test]
fn every_client_stack_through_the_hook_loses_no_call() {
    require_root();
    let pods = [10, 11, 12, 13];
    let servers: Vec<(u8, Stack)> = pods.into_iter().zip(SERVERS).collect();
    let c = GreetCluster::with_servers(&servers);
    c.write(&Spec::new(true, &pods));
    let agent = c.start_agent();
    assert!(
        c.client_hooked(),
        "labelled namespace: the client pod is hooked once the agent is ready"
    );
    let served = || {
        let (code, metrics) = agent.admin_get("/metrics");
        assert_eq!(code, 200, "agent /metrics");
        requests_served(&metrics)
    };
    let names = c.server_names();
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for client in STACKS {
        for load in [SEQUENTIAL, CONCURRENT] {
            let before = served();
            let r = client.calls_in(&c.client, vip(), load);
            check(client, "the connect hook", load, &r, &names);
            // Every call went through the agent, none around it through kube-proxy.
            assert_eq!(
                served() - before,
                load.total(),
                "{} client: calls the agent relayed",
                client.name()
            );
            *totals.entry(client.name()).or_default() += r.ok;
        }
    }
    note(&format!(
        "through the hook, calls per client stack: {totals:?}"
    ));
}
