//! Command line. Every flag can also come from an `INTERCEPTOR_*` environment variable, which
//! is how the DaemonSet configures the agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::bpf::DEFAULT_PIN_ROOT;
use crate::discovery::model::PodCgroup;
use crate::proxy::config::{BalancerKind, H2Engine, ProxyConfig};

/// Ports of protocols where the server speaks first (FTP, SSH, SMTP, POP3, IMAP, MySQL):
/// a proxy that waits for the client's first bytes would stall them, so they are left alone.
pub const DEFAULT_EXCLUDED_PORTS: &str = "21,22,25,110,143,587,3306";

/// Where a running agent offers its pod-local listeners to its successor (a hostPath
/// directory shared by the old and the new agent pod on the node).
pub const DEFAULT_HANDOFF_SOCKET: &str = "/run/interceptor/handoff.sock";

#[derive(Parser, Debug)]
#[command(
    name = "interceptor",
    version,
    about = "Per-request HTTP/2 load balancing for Kubernetes pods, without app changes"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `interceptor=debug`. Release
    /// builds stop at `debug`: `trace` records are compiled out (h2 has one per frame).
    #[arg(long, env = "INTERCEPTOR_LOG", default_value = "info", global = true)]
    pub log_level: String,
    /// Log output format.
    #[arg(long, env = "INTERCEPTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: load the eBPF programs, intercept the enabled pods, relay their connections.
    Run(RunArgs),
    /// Show what is intercepted, services, endpoints and counters: from the agent's admin
    /// endpoint, and from the pins (which work without the agent).
    Status(StatusArgs),
    /// Say why a connect from a pod to an address would or would not be intercepted.
    Explain(ExplainArgs),
    /// Detach every hook and remove every pin: pods' new connections go straight to kube-proxy.
    Uninstall(PinArgs),
    /// The balancer alone, without eBPF or a cluster: listen on an address and spread each
    /// HTTP/2 stream and HTTP/1.1 request over the given endpoints.
    Proxy(ProxyArgs),
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct PinArgs {
    /// bpffs directory holding interceptor's pins.
    #[arg(long, env = "INTERCEPTOR_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The agent's admin endpoint.
    #[arg(long, env = "INTERCEPTOR_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub status: StatusArgs,
    /// The pod, as NAMESPACE/NAME.
    pub pod: String,
    /// The address the pod dials, e.g. 10.96.0.10:50051.
    pub target: SocketAddr,
}

/// Admin endpoint default: loopback only (health, readiness, metrics, config, state).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9901";

/// Where the agent learns what to intercept.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Kubernetes API watch (the DaemonSet).
    Kube,
    /// Manifest files of Kubernetes objects (`--manifests`), reloaded on change.
    File,
    /// Only the `--pod`, `--service` and `--endpoints` flags.
    Static,
}

/// Where the metrics-only listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MetricsAddr {
    Addr(SocketAddr),
    /// This port on the node's IP.
    NodePort(u16),
}

impl MetricsAddr {
    /// The address to bind, given the node's IP.
    pub fn resolve(self, node_ip: Option<std::net::IpAddr>) -> Result<SocketAddr, String> {
        match (self, node_ip) {
            (MetricsAddr::Addr(a), _) => Ok(a),
            (MetricsAddr::NodePort(p), Some(ip)) => Ok(SocketAddr::new(ip, p)),
            (MetricsAddr::NodePort(p), None) => Err(format!(
                "--metrics-addr {p} (a port alone) binds the node's IP, but --node-ip (INTERCEPTOR_NODE_IP) is not set: set it, or give IP:PORT"
            )),
        }
    }
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(MetricsAddr::NodePort(port));
    }
    s.parse::<SocketAddr>()
        .map(MetricsAddr::Addr)
        .map_err(|_| format!("{s:?} is neither IP:PORT nor a port"))
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct RunArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Where the desired state comes from.
    #[arg(long, env = "INTERCEPTOR_SOURCE", value_enum, default_value_t = Source::Kube)]
    pub source: Source,
    /// Manifest file, or directory of `*.yaml` files, for `--source file`.
    #[arg(long, env = "INTERCEPTOR_MANIFESTS", required_if_eq("source", "file"))]
    pub manifests: Option<PathBuf>,
    /// This node's name: only pods scheduled here are intercepted (required for `--source
    /// kube`; optional for `--source file`, where it filters by `spec.nodeName`).
    #[arg(long, env = "INTERCEPTOR_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's IP (informational: logged and shown in /config).
    #[arg(long, env = "INTERCEPTOR_NODE_IP")]
    pub node_ip: Option<std::net::IpAddr>,
    /// The cgroup2 mount the kubelet uses (default: found in /proc/mounts).
    #[arg(long, env = "INTERCEPTOR_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Admin endpoint: /healthz, /readyz, /metrics, /config, /state. Port 0 picks a free one.
    #[arg(long, env = "INTERCEPTOR_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// A second listener that serves only /metrics, for a cluster Prometheus (off by default):
    /// IP:PORT, or a port alone for the node's IP (`--node-ip`), as deploy/monitoring sets it.
    /// Admit only Prometheus to it (node firewall or CNI host policy); the admin endpoint
    /// stays on loopback.
    #[arg(long, env = "INTERCEPTOR_METRICS_ADDR", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<MetricsAddr>,
    /// Unix socket through which a new agent takes over this one's pod-local listeners (a
    /// hostPath directory shared by the DaemonSet's old and new pods), so upgrades never fall
    /// back to kube-proxy.
    #[arg(long, env = "INTERCEPTOR_HANDOFF_SOCKET", default_value = DEFAULT_HANDOFF_SOCKET)]
    pub handoff_socket: PathBuf,
    /// After handing the listeners over to a new agent, how long this one keeps relaying the
    /// connections it still has: opaque TCP relays above all (HTTP/2 clients were sent GOAWAY
    /// and move over). The DaemonSet's terminationGracePeriodSeconds must cover it.
    #[arg(long, env = "INTERCEPTOR_HANDOFF_DRAIN_TIMEOUT", default_value = "10m", value_parser = crate::duration::parse)]
    #[serde(serialize_with = "serialize_duration")]
    pub handoff_drain_timeout: std::time::Duration,
    /// On SIGTERM, how long open connections may take to finish (e.g. `20s`, `500ms`).
    #[arg(long, env = "INTERCEPTOR_DRAIN_TIMEOUT", default_value = "20s", value_parser = crate::duration::parse)]
    #[serde(serialize_with = "serialize_duration")]
    pub drain_timeout: std::time::Duration,
    /// Proxy worker threads, each serving its share of the client connections on its own
    /// single-threaded runtime (default: one per CPU).
    #[arg(long, env = "INTERCEPTOR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Keep each proxy worker polling, instead of sleeping, for this many microseconds after
    /// it last read from a connection (0: off). Cuts the wake-up latency of every request at
    /// low rates, at the price of a busy core for that long after the last request. Relay
    /// engine only.
    #[arg(long, env = "INTERCEPTOR_BUSY_POLL_US", default_value_t = 0)]
    pub busy_poll_us: u64,
    /// Port of the pod-local listener (127.0.0.1 and [::1] inside each pod).
    #[arg(long, env = "INTERCEPTOR_LISTEN_PORT", default_value_t = 15001)]
    pub listen_port: u16,
    /// Intercept a pod given as NAME=CGROUP_DIR (cgroup v2 directory of the pod). Repeatable.
    /// Its netns is taken from a process in that cgroup.
    #[arg(long = "pod", env = "INTERCEPTOR_PODS", value_delimiter = ';', value_parser = parse_pod)]
    pub pods: Vec<PodCgroup>,
    /// A Service ClusterIP:port whose connects are intercepted. Repeatable.
    #[arg(long = "service", env = "INTERCEPTOR_SERVICES", value_delimiter = ',')]
    pub services: Vec<SocketAddr>,
    /// Endpoints for per-request balancing of a Service: VIP:PORT=EP[,EP...]. Repeatable
    /// (`;`-separated in the env var). Intercepted Services without endpoints are relayed to
    /// their original destination, where kube-proxy routes them as before.
    #[arg(long = "endpoints", env = "INTERCEPTOR_ENDPOINTS", value_delimiter = ';', value_parser = parse_endpoints)]
    pub endpoints: Vec<StaticEndpoints>,
    /// Service ports never intercepted (server-first protocols).
    #[arg(long, env = "INTERCEPTOR_EXCLUDE_PORTS", value_delimiter = ',', default_value = DEFAULT_EXCLUDED_PORTS)]
    pub exclude_ports: Vec<u16>,
    /// Emit the kernel programs' per-connect debug records into the agent log (costly).
    #[arg(long, env = "INTERCEPTOR_KERNEL_DEBUG_LOG")]
    pub kernel_debug_log: bool,
    /// Replace pinned maps whose layout differs from this build's, instead of refusing to start.
    #[arg(long, env = "INTERCEPTOR_REPLACE_STALE_PINS")]
    pub replace_stale_pins: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Clone, Debug, Serialize)]
pub struct StaticEndpoints {
    pub service: SocketAddr,
    pub endpoints: Vec<SocketAddr>,
}

fn serialize_duration<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn parse_endpoints(s: &str) -> Result<StaticEndpoints, String> {
    let usage = || format!("expected VIP:PORT=ENDPOINT[,ENDPOINT...], got {s:?}");
    let (service, list) = s.split_once('=').ok_or_else(usage)?;
    let service = service.parse().map_err(|_| usage())?;
    let endpoints = list
        .split(',')
        .map(|e| e.trim().parse().map_err(|_| usage()))
        .collect::<Result<Vec<SocketAddr>, String>>()?;
    if endpoints.is_empty() {
        return Err(usage());
    }
    Ok(StaticEndpoints { service, endpoints })
}

fn parse_pod(s: &str) -> Result<PodCgroup, String> {
    let (name, cgroup) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=CGROUP_DIR, got {s:?}"))?;
    if name.is_empty() || cgroup.is_empty() {
        return Err(format!("expected NAME=CGROUP_DIR, got {s:?}"));
    }
    Ok(PodCgroup {
        name: name.to_string(),
        cgroup: PathBuf::from(cgroup),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BalancerArg {
    P2c,
    RoundRobin,
}

/// Arguments of the standalone proxy.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to accept client connections on.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_LISTEN",
        default_value = "127.0.0.1:15001"
    )]
    pub listen: SocketAddr,
    /// Endpoints (ADDR[,ADDR...]).
    #[arg(long, env = "INTERCEPTOR_PROXY_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<SocketAddr>,
    /// File with one endpoint ADDR per line ('#' starts a comment); re-read when it changes.
    #[arg(long, env = "INTERCEPTOR_PROXY_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
    /// How each stream's endpoint is chosen.
    #[arg(long, env = "INTERCEPTOR_PROXY_BALANCER", value_enum, default_value_t = BalancerArg::P2c)]
    pub balancer: BalancerArg,
    /// Wait for a client's first bytes before relaying it as opaque TCP, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_DETECT_TIMEOUT_MS",
        default_value_t = 300
    )]
    pub detect_timeout_ms: u64,
    /// Connect timeout per endpoint, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_CONNECT_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub connect_timeout_ms: u64,
    /// How often the endpoints file is checked for changes, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_RELOAD_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub reload_interval_ms: u64,
    /// On shutdown, how long in-flight streams may take to finish, in milliseconds.
    #[arg(
        long,
        env = "INTERCEPTOR_PROXY_DRAIN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub drain_timeout_ms: u64,
    /// Admin endpoint (/healthz, /readyz, /metrics, /config); off unless given.
    #[arg(long, env = "INTERCEPTOR_PROXY_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Proxy worker threads, each serving its share of the client connections on its own
    /// single-threaded runtime (default: one per CPU).
    #[arg(long, env = "INTERCEPTOR_PROXY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Keep each proxy worker polling, instead of sleeping, for this many microseconds after
    /// it last read from a connection (0: off); see `interceptor run --help`.
    #[arg(long, env = "INTERCEPTOR_PROXY_BUSY_POLL_US", default_value_t = 0)]
    pub busy_poll_us: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Limits that keep one client or one endpoint from hurting the others; shared by
/// `interceptor run` and `interceptor proxy`.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct LimitArgs {
    /// End a stream on which nothing moved for this long, in milliseconds (0: never). Calls
    /// with a grpc-timeout end at their deadline anyway; long-lived streams that may stay
    /// silent longer (watches) need a larger value or 0.
    #[arg(
        long,
        env = "INTERCEPTOR_STREAM_IDLE_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    pub stream_idle_timeout_ms: u64,
    /// PING an upstream connection that carries streams and has heard nothing from its
    /// endpoint for this long, in milliseconds (0: never); unanswered within 10 s, the
    /// connection is closed. Below 300000 (5 min), grpc-go servers with their default keepalive
    /// policy close the connection with GOAWAY "too_many_pings".
    #[arg(
        long,
        env = "INTERCEPTOR_UPSTREAM_KEEPALIVE_MS",
        default_value_t = 300_000
    )]
    pub upstream_keepalive_ms: u64,
    /// Largest request or response header list taken, in bytes; bigger requests get 431.
    #[arg(
        long,
        env = "INTERCEPTOR_MAX_HEADER_LIST_BYTES",
        default_value_t = 65_536
    )]
    pub max_header_list_bytes: u32,
    /// Client connections served at once; the excess is closed at accept. Default: half of
    /// RLIMIT_NOFILE less 64.
    #[arg(long, env = "INTERCEPTOR_MAX_CLIENT_CONNECTIONS")]
    pub max_client_connections: Option<usize>,
    /// How HTTP/2 client connections are served: `relay` (frames relayed on h2's codec, the
    /// stream mapping and flow control ours) or `streams` (h2's server and client, a task per
    /// stream: the fallback, at about 1.6x the CPU per request).
    #[arg(long, env = "INTERCEPTOR_H2_ENGINE", value_enum, default_value_t = H2EngineArg::default())]
    pub h2_engine: H2EngineArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum H2EngineArg {
    Relay,
    Streams,
}

impl Default for H2EngineArg {
    fn default() -> Self {
        match H2Engine::default() {
            H2Engine::Streams => H2EngineArg::Streams,
            H2Engine::Relay => H2EngineArg::Relay,
        }
    }
}

impl LimitArgs {
    /// `config` with these limits.
    pub fn apply(&self, config: ProxyConfig) -> ProxyConfig {
        ProxyConfig {
            stream_idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
            keepalive_interval: Duration::from_millis(self.upstream_keepalive_ms),
            max_header_list_bytes: self.max_header_list_bytes,
            max_client_connections: self.max_client_connections,
            h2_engine: match self.h2_engine {
                H2EngineArg::Streams => H2Engine::Streams,
                H2EngineArg::Relay => H2Engine::Relay,
            },
            ..config
        }
    }
}

impl ProxyArgs {
    /// The proxy configuration these arguments select.
    pub fn config(&self) -> ProxyConfig {
        self.limits.apply(ProxyConfig {
            balancer: match self.balancer {
                BalancerArg::P2c => BalancerKind::P2c,
                BalancerArg::RoundRobin => BalancerKind::RoundRobin,
            },
            detect_timeout: Duration::from_millis(self.detect_timeout_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            ..ProxyConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_parse_and_reject_garbage() {
        let pod = parse_pod("default/web=/sys/fs/cgroup/kubepods/pod1").expect("valid pod");
        assert_eq!(pod.name, "default/web");
        assert_eq!(pod.cgroup, PathBuf::from("/sys/fs/cgroup/kubepods/pod1"));
        assert!(parse_pod("no-cgroup").is_err());
        assert!(parse_pod("=/x").is_err());
    }

    #[test]
    fn endpoints_parse_and_reject_garbage() {
        let e = parse_endpoints("10.96.0.10:80=10.244.0.11:8080,10.244.0.12:8080").expect("valid");
        assert_eq!(
            e.service,
            "10.96.0.10:80".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(e.endpoints.len(), 2);
        assert!(parse_endpoints("10.96.0.10:80").is_err());
        assert!(parse_endpoints("10.96.0.10:80=nope").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            crate::duration::parse("20s"),
            Ok(std::time::Duration::from_secs(20))
        );
        assert_eq!(
            crate::duration::parse("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            crate::duration::parse("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            crate::duration::parse("7"),
            Ok(std::time::Duration::from_secs(7))
        );
        assert!(crate::duration::parse("soon").is_err());
        assert!(crate::duration::parse("5h").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
