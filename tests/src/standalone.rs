//! `interceptor proxy` (standalone mode) as a separate process on loopback, for tests that
//! drive it with real clients.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{target_bin, ChildGuard};

/// A free port on 127.0.0.1 (bound, then released for the caller to bind).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr")
}

pub struct Standalone {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub child: ChildGuard,
}

impl Standalone {
    pub fn start(endpoints: &[SocketAddr]) -> Self {
        let (listen, admin) = (free_port(), free_port());
        let eps: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        let child = Command::new(target_bin("interceptor"))
            .args([
                "proxy",
                "--listen",
                &listen.to_string(),
                "--endpoints",
                &eps.join(","),
                "--admin-addr",
                &admin.to_string(),
            ])
            .env("INTERCEPTOR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start interceptor proxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err()
            || std::net::TcpStream::connect(admin).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "interceptor proxy did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            listen,
            admin,
            child: ChildGuard(Some(child)),
        }
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid()))
            .expect("proxy status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in /proc/pid/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}
