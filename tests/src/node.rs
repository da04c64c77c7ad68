//! The node and its pods: network namespaces, veth pairs and cgroups the test creates and
//! removes (also when it panics), kube-proxy emulated by an nftables random DNAT in the
//! node's netns, and a bpffs pin root per test.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{require_root, run, target_bin, unique_id, ChildGuard};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
    /// Runs a command inside the netns (nsenter, not `ip netns exec`, which remounts /sys).
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let net = format!("--net={}", self.path().display());
        let mut full = vec![net.as_str(), "--", program];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The cgroup v2 mount, from /proc/mounts (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect(
            "no cgroup2 mount in /proc/mounts: the kernel's cgroup v2 is required for cgroup BPF",
        )
}

/// A cgroup directory; on drop its processes are killed and it is removed.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Kills every process in the cgroup tree and removes it, leaves first.
fn remove_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: signalling a pid is harmless if it is already gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A cgroup whose last process just died can be busy for a moment.
    for _ in 0..50 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("could not remove cgroup {}", path.display());
}

/// A "pod": a netns with an eth0 routed through the node, a cgroup, and a pause process that
/// keeps both in use (as the sandbox container does).
pub struct Pod {
    pub name: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub(crate) pause: Option<ChildGuard>,
    /// Where the pod's processes go (a container's cgroup for kubelet-style pods).
    pub cgroup: Cgroup,
    /// The pod-level cgroup of a kubelet-style pod (hooks attach here), removed with the pod.
    pub pod_cgroup: Option<Cgroup>,
    pub netns: Netns,
}

impl Pod {
    /// Starts `icp-pod ARGS` inside this pod (its netns and cgroup).
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        self.spawn_program(&target_bin("icp-pod"), args)
    }

    /// Starts any program inside this pod (its netns and cgroup), e.g. h2load.
    pub fn spawn_program(&self, program: &Path, args: &[&str]) -> ChildGuard {
        let netns = File::open(self.netns.path()).expect("open pod netns");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (ns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process into the cgroup.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} in the pod: {e}", program.display()));
        drop((netns, procs));
        ChildGuard(Some(child))
    }

    /// Runs `icp-pod ARGS` in this pod to completion (bounded by `timeout`), returning stdout lines.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Vec<String> {
        let child = self.spawn(args);
        let out = child.wait_output(timeout);
        assert!(
            out.status.success(),
            "icp-pod {args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Starts a backend that answers its name on these ports, and waits until it listens.
    pub fn serve(&self, ports: &str) -> ChildGuard {
        let mut child = self.spawn(&["serve", "--name", &self.name, "--ports", ports]);
        child.wait_ready(&format!("backend {}", self.name));
        child
    }

    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip4, port))
    }
}

/// The node: a netns that routes between pods (each pod a /32 behind its own veth, as
/// Calico does, so every pod-to-pod packet crosses the node's conntrack and DNAT).
pub struct Node {
    pub id: String,
    pub cgroup_parent: Cgroup,
    pub netns: Netns,
}

pub const NODE_GW4: &str = "169.254.1.1";
pub const NODE_GW6: &str = "fe80::1";

impl Node {
    pub fn new() -> Self {
        require_root();
        let id = unique_id();
        let netns = Netns::new(format!("icp-{id}-node"));
        netns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        let cgroup_parent = Cgroup::new(cgroup2_root().join(format!("icp-test-{id}")));
        Self {
            id,
            cgroup_parent,
            netns,
        }
    }

    /// A pod with addresses 10.244.0.N and fd00:244::N.
    pub fn add_pod(&self, name: &str, n: u8) -> Pod {
        self.add_pod_in(name, n, self.cgroup_parent.path.join(name), None)
    }

    /// Like `add_pod`, with the pod's processes in `cgroup_dir`.
    pub fn add_pod_in(
        &self,
        name: &str,
        n: u8,
        cgroup_dir: PathBuf,
        pod_cgroup: Option<Cgroup>,
    ) -> Pod {
        let ip4 = Ipv4Addr::new(10, 244, 0, n);
        let ip6: Ipv6Addr = format!("fd00:244::{n:x}").parse().expect("pod ipv6");
        let netns = Netns::new(format!("icp-{}-{name}", self.id));
        let veth = format!("v{n}");
        self.netns.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ]);
        self.netns.ip(&["link", "set", &veth, "up"]);
        self.netns
            .ip(&["addr", "add", &format!("{NODE_GW4}/32"), "dev", &veth]);
        self.netns.ip(&[
            "addr",
            "add",
            &format!("{NODE_GW6}/64"),
            "dev",
            &veth,
            "nodad",
        ]);
        self.netns
            .ip(&["route", "add", &format!("{ip4}/32"), "dev", &veth]);
        self.netns
            .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &veth]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", "eth0"]);
        netns.ip(&["addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"]);
        netns.ip(&["route", "add", NODE_GW4, "dev", "eth0", "scope", "link"]);
        netns.ip(&["route", "add", "default", "via", NODE_GW4, "dev", "eth0"]);
        netns.ip(&[
            "-6", "route", "add", "default", "via", NODE_GW6, "dev", "eth0",
        ]);
        let cgroup = Cgroup::new(cgroup_dir);
        let mut pod = Pod {
            name: name.to_string(),
            ip4,
            ip6,
            pause: None,
            cgroup,
            pod_cgroup,
            netns,
        };
        pod.pause = Some(pod.spawn(&["pause"]));
        pod
    }

    /// Emulated kube-proxy: TCP and UDP to `vip:port` are DNATed to one of `backends` (same
    /// port), chosen at random per connection, in the node's netns.
    pub fn kube_proxy(&self, services: &[(SocketAddr, Vec<std::net::IpAddr>)]) {
        let mut rules = String::new();
        // Each call replaces the whole rule set (a scale-up re-programs the Service).
        for family in ["ip", "ip6"] {
            rules.push_str(&format!(
                "table {family} icp_kp {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n  }}\n}}\nflush table {family} icp_kp\n"
            ));
        }
        for (vip, backends) in services {
            let (family, match_) = match vip {
                SocketAddr::V4(v) => ("ip", format!("ip daddr {}", v.ip())),
                SocketAddr::V6(v) => ("ip6", format!("ip6 daddr {}", v.ip())),
            };
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {b}"))
                .collect();
            rules.push_str(&format!(
                "add rule {family} icp_kp pre {match_} meta l4proto {{ tcp, udp }} th dport {} counter dnat to numgen random mod {} map {{ {} }}\n",
                vip.port(),
                backends.len(),
                map.join(", ")
            ));
        }
        let path = std::env::temp_dir().join(format!("icp-{}-kp.nft", self.id));
        std::fs::write(&path, rules).expect("write nft rules");
        self.netns
            .exec("nft", &["-f", path.to_str().expect("utf-8 path")]);
        let _ = std::fs::remove_file(path);
    }
}

impl Node {
    /// Connections the emulated kube-proxy has DNAT'ed so far (a nat chain sees the first
    /// packet of each connection only): what went around interceptor.
    pub fn kube_proxy_connections(&self) -> u64 {
        let mut total = 0;
        for family in ["ip", "ip6"] {
            let out = self
                .netns
                .exec("nft", &["-j", "list", "table", family, "icp_kp"]);
            let v: serde_json::Value = serde_json::from_str(&out).expect("nft -j prints JSON");
            for item in v["nftables"].as_array().into_iter().flatten() {
                for expr in item["rule"]["expr"].as_array().into_iter().flatten() {
                    if let Some(n) = expr["counter"]["packets"].as_u64() {
                        total += n;
                    }
                }
            }
        }
        total
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

/// A test-owned bpffs pin root; every pin under it is removed on drop (which detaches the
/// hooks still pinned there).
pub struct PinRoot {
    pub path: PathBuf,
}

impl PinRoot {
    pub fn new() -> Self {
        Self {
            path: PathBuf::from(format!("/sys/fs/bpf/icp-test-{}", unique_id())),
        }
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if let Err(e) = interceptor::bpf::uninstall(&self.path) {
            eprintln!("cleaning pins under {}: {e}", self.path.display());
        }
    }
}

/// One parsed `icp-pod` result line.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub reply: String,
}

/// Parses `OK <peer> <local> <reply>`; panics on `ERR` with the line.
pub fn parse_ok(line: &str) -> Conn {
    let rest = line
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("connection failed: {line}"));
    let mut parts = rest.splitn(3, ' ');
    let peer = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line}"));
    let local = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line}"));
    Conn {
        peer,
        local,
        reply: parts.next().unwrap_or("").to_string(),
    }
}

/// Writes `ORIG <original destination>` on each accepted connection: the in-process agent's
/// handler in tests that check what the agent recovered.
pub fn echo_orig_handler() -> interceptor::proxy::pod_listener::Handler {
    Arc::new(|conn| {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let mut stream = conn.stream;
            let _ = stream
                .write_all(format!("ORIG {}\n", conn.orig_dst).as_bytes())
                .await;
            let _ = stream.shutdown().await;
        })
    })
}

/// Kernel counters by label, from the pins.
pub fn pinned_stats(pin_root: &Path) -> std::collections::BTreeMap<&'static str, u64> {
    interceptor::bpf::read_pinned_stats(pin_root)
        .expect("read pinned icp_stats")
        .into_iter()
        .map(|(s, v)| (s.label(), v))
        .collect()
}
