//! End-to-end harness: a Kubernetes node built from network namespaces, veth pairs and
//! cgroups that the test creates (and removes, also when it panics), with kube-proxy emulated
//! by an nftables random DNAT in the node's netns. "Pods" are real processes placed in a netns
//! and a cgroup. ClusterIPs and pod IPs exist only inside these namespaces.
//!
//! `kube_api` is a test Kubernetes API server (list/watch over plain HTTP on 127.0.0.1) for the
//! discovery tests; it needs no root.

pub mod backend;
pub mod bench;
pub mod cluster;
pub mod greet;
pub mod http1;
pub mod interop;
pub mod kube_api;
pub mod node;
pub mod process;
pub mod standalone;

// The fixtures are used as `interceptor_tests::Node`, `interceptor_tests::AgentProcess`, ...
pub use backend::*;
pub use node::*;
pub use process::*;

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

/// Fails the test (never skips it) when the capabilities are missing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "the e2e tests need root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN) to load eBPF and \
             create network namespaces: run `cargo xtask test` as root"
        );
    }
}

/// A short id unique to this process and call: names of netns, cgroups and pins.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Flushes stdout so interleaved parallel test output stays readable.
pub fn note(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
}
