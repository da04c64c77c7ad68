//! Command line. Every flag can also come from an `INTERCEPTOR_*` environment variable, which
//! is how the DaemonSet configures the agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bpf::DEFAULT_PIN_ROOT;

/// Ports of protocols where the server speaks first (FTP, SSH, SMTP, POP3, IMAP, MySQL):
/// a proxy that waits for the client's first bytes would stall them, so they are left alone.
pub const DEFAULT_EXCLUDED_PORTS: &str = "21,22,25,110,143,587,3306";

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
    /// Log filter (tracing env-filter syntax), e.g. `info` or `interceptor=debug`.
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
    /// Show what is intercepted and the kernel counters, read from the pins (works without the agent).
    Status(PinArgs),
    /// Detach every hook and remove every pin: pods' new connections go straight to kube-proxy.
    Uninstall(PinArgs),
    /// The HTTP/2 balancer alone, without eBPF or a cluster: listen on an address and spread
    /// each stream over the given endpoints.
    Proxy(crate::proxy::standalone::ProxyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PinArgs {
    /// bpffs directory holding interceptor's pins.
    #[arg(long, env = "INTERCEPTOR_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Port of the pod-local listener (127.0.0.1 and [::1] inside each pod).
    #[arg(long, env = "INTERCEPTOR_LISTEN_PORT", default_value_t = 15001)]
    pub listen_port: u16,
    /// Intercept a pod given as NAME=CGROUP_DIR (cgroup v2 directory of the pod). Repeatable.
    /// Its netns is taken from a process in that cgroup.
    #[arg(long = "pod", env = "INTERCEPTOR_PODS", value_delimiter = ';', value_parser = parse_pod)]
    pub pods: Vec<StaticPod>,
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
}

#[derive(Clone, Debug)]
pub struct StaticPod {
    pub name: String,
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug)]
pub struct StaticEndpoints {
    pub service: SocketAddr,
    pub endpoints: Vec<SocketAddr>,
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

fn parse_pod(s: &str) -> Result<StaticPod, String> {
    let (name, cgroup) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=CGROUP_DIR, got {s:?}"))?;
    if name.is_empty() || cgroup.is_empty() {
        return Err(format!("expected NAME=CGROUP_DIR, got {s:?}"));
    }
    Ok(StaticPod {
        name: name.to_string(),
        cgroup: PathBuf::from(cgroup),
    })
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
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
