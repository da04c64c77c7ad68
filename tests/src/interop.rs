//! Real gRPC stacks as peers: grpcio (C-core, what Python, C++, Ruby and PHP use), grpc-js
//! (Node) and tonic (Rust). Every stack has a server answering greet's SayHello with its name
//! and a client that makes counted unary calls and prints one `RESULT {json}` line, so every
//! client runs against every server. The Python and Node peers live in `tests/interop/` and
//! are installed by `cargo xtask setup` (pip package grpcio, npm package @grpc/grpc-js).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{target_bin, ChildGuard, Pod};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Grpcio,
    GrpcJs,
    Tonic,
}

pub const STACKS: [Stack; 3] = [Stack::Grpcio, Stack::GrpcJs, Stack::Tonic];

/// What one client run saw: successes per server, failures per status and message.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CallResult {
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub by_server: BTreeMap<String, u64>,
}

impl CallResult {
    pub fn ok(&mut self, server: &str) {
        self.ok += 1;
        *self.by_server.entry(server.to_string()).or_default() += 1;
    }

    pub fn failed(&mut self, error: &str) {
        self.failed += 1;
        *self.errors.entry(error.to_string()).or_default() += 1;
    }
}

/// The calls a client makes: `runs` fresh channels, `calls` each over `concurrency` callers.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub runs: u32,
    pub calls: u32,
    pub concurrency: u32,
}

impl Load {
    pub fn total(&self) -> u64 {
        u64::from(self.runs) * u64::from(self.calls)
    }
}

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop")
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Stack::Grpcio => "grpcio",
            Stack::GrpcJs => "grpc-js",
            Stack::Tonic => "tonic",
        }
    }

    /// Fails (never skips) with the fix when this stack's peer is not installed.
    pub fn require(self) {
        let (ok, what) = match self {
            Stack::Grpcio => (
                Command::new("python3")
                    .args(["-c", "import grpc"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "the Python package grpcio",
            ),
            Stack::GrpcJs => (
                peers_dir()
                    .join("node_modules/@grpc/grpc-js/package.json")
                    .is_file(),
                "node and tests/interop/node_modules (@grpc/grpc-js)",
            ),
            Stack::Tonic => (true, ""),
        };
        assert!(
            ok,
            "{what} is missing for the {} interop peer: run `cargo xtask setup`",
            self.name()
        );
    }

    /// (program, args) of this stack's server.
    fn server_command(self, name: &str, host: IpAddr, port: u16) -> (PathBuf, Vec<String>) {
        let common = vec![
            "--name".to_string(),
            name.to_string(),
            "--host".into(),
            host.to_string(),
            "--port".into(),
            port.to_string(),
        ];
        self.command("server", "greet-server", common)
    }

    fn client_command(self, target: SocketAddr, load: Load) -> (PathBuf, Vec<String>) {
        let common = vec![
            "--target".to_string(),
            target.to_string(),
            "--runs".into(),
            load.runs.to_string(),
            "--calls".into(),
            load.calls.to_string(),
            "--concurrency".into(),
            load.concurrency.to_string(),
            "--deadline-s".into(),
            "5".into(),
        ];
        self.command("client", "greet-calls", common)
    }

    fn command(
        self,
        peer_cmd: &str,
        icp_pod_cmd: &str,
        rest: Vec<String>,
    ) -> (PathBuf, Vec<String>) {
        let script = |file: &str| peers_dir().join(file).display().to_string();
        let (program, mut args) = match self {
            Stack::Grpcio => (
                PathBuf::from("python3"),
                vec![script("grpcio_peer.py"), peer_cmd.into()],
            ),
            Stack::GrpcJs => (
                PathBuf::from("node"),
                vec![script("grpc_js_peer.js"), peer_cmd.into()],
            ),
            Stack::Tonic => (target_bin("icp-pod"), vec![icp_pod_cmd.to_string()]),
        };
        args.extend(rest);
        (program, args)
    }

    /// Starts this stack's server on the machine (for loopback addresses) and waits for READY.
    pub fn serve_local(self, name: &str, addr: SocketAddr) -> ChildGuard {
        self.require();
        let (program, args) = self.server_command(name, addr.ip(), addr.port());
        let child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start {} server ({}): {e}", self.name(), program.display())
            });
        let mut guard = ChildGuard(Some(child));
        guard.wait_ready(&format!("{} server {name}", self.name()));
        guard
    }

    /// Starts this stack's server in `pod` on every address and waits for READY.
    pub fn serve_in(self, pod: &Pod, port: u16) -> ChildGuard {
        self.require();
        let (program, args) = self.server_command(&pod.name, "::".parse().expect("::"), port);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut guard = pod.spawn_program(&program, &args);
        guard.wait_ready(&format!("{} server {}", self.name(), pod.name));
        guard
    }

    /// Runs this stack's client on the machine against `target` to completion.
    pub fn calls_local(self, target: SocketAddr, load: Load) -> CallResult {
        self.require();
        let (program, args) = self.client_command(target, load);
        let child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start {} client ({}): {e}", self.name(), program.display())
            });
        self.result(ChildGuard(Some(child)), load)
    }

    /// Runs this stack's client inside `pod` against `target` to completion.
    pub fn calls_in(self, pod: &Pod, target: SocketAddr, load: Load) -> CallResult {
        self.require();
        let (program, args) = self.client_command(target, load);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.result(pod.spawn_program(&program, &args), load)
    }

    fn result(self, child: ChildGuard, load: Load) -> CallResult {
        // Generous: a call's deadline is 5 s, and a healthy run makes well over 200 calls/s.
        let bound = Duration::from_secs(30 + load.total() / 200);
        let out = child.wait_output(bound);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} client failed ({}): {}{}",
            self.name(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("{} client printed no RESULT line: {stdout}", self.name()));
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("{} client's RESULT is not valid ({e}): {line}", self.name())
        })
    }
}

/// The sum of every `interceptor_requests_total` sample in a Prometheus exposition: how many
/// streams the proxy finished, whatever their outcome.
pub fn requests_served(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix("interceptor_requests_total")
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
