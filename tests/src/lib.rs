//! End-to-end harness: a Kubernetes node built from network namespaces, veth pairs and
//! cgroups that the test creates (and removes, also when it panics), with kube-proxy emulated
//! by an nftables random DNAT in the node's netns. "Pods" are real processes placed in a netns
//! and a cgroup. ClusterIPs and pod IPs exist only inside these namespaces.
//!
//! `kube_api` is a test Kubernetes API server (list/watch over plain HTTP on 127.0.0.1) for the
//! discovery tests; it needs no root.

pub mod bench;
pub mod kube_api;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fails the test (never skips it) when the capabilities are missing.
pub mod cluster;
pub mod greet;
pub mod interop;
pub mod standalone;

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

/// Runs a command, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot start {program}: {e} (is it installed? `cargo xtask setup`)")
        });
    if !out.status.success() {
        panic!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where cargo put the sibling binaries (`interceptor`, `icp-pod`): next to a program, or one
/// level up from a test binary in `deps/`.
/// Restricts this process (and the children it starts later, which inherit it) to `cpus`, so a
/// benchmark's client and server do not take turns on one CPU.
pub fn run_on_cpus(cpus: impl IntoIterator<Item = usize>) {
    // SAFETY: a zeroed cpu_set_t is empty; callers pass CPU numbers below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert!(
            rc == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable has a directory");
    let candidates = [
        dir.join(name),
        dir.parent().map(|d| d.join(name)).unwrap_or_default(),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("{name} is missing next to {}: build it first (`cargo build`, or `cargo xtask test`)", exe.display())
    })
}

pub fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("bpftool", &full);
    // `bpftool -j cgroup show` prints nothing at all for a cgroup without programs.
    if out.trim().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bpftool {args:?} printed invalid JSON ({e}): {out}"))
}

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
    pause: Option<ChildGuard>,
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

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Takes the child's stdout and waits for its first line to be `READY` (what every test
    /// server prints once it listens); returns the rest of stdout.
    pub fn wait_ready(&mut self, what: &str) -> BufReader<std::process::ChildStdout> {
        let stdout = self
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .unwrap_or_else(|| panic!("{what}: no stdout to read readiness from"));
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{what}: reading readiness: {e}"));
        assert_eq!(line.trim(), "READY", "{what} did not start");
        reader
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).expect("child present")
    }
    /// Waits for exit within `timeout`, killing the child if it overstays.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let mut child = self.0.take().expect("child present");
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let out_t = std::thread::spawn(move || read_all(stdout));
        let err_t = std::thread::spawn(move || read_all(stderr));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait child") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().expect("reap child");
                let stdout = out_t.join().unwrap_or_default();
                panic!(
                    "child overstayed {timeout:?} ({status}); output so far: {}",
                    String::from_utf8_lossy(&stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        }
    }
}

fn read_all(r: Option<impl std::io::Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut r) = r {
        let _ = r.read_to_end(&mut buf);
    }
    buf
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
            let out = self.netns.exec("nft", &["-j", "list", "table", family, "icp_kp"]);
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

/// The agent binary running as a separate process (so it can be `kill -9`ed); its log is
/// collected for assertions and failure messages.
pub struct AgentProcess {
    child: ChildGuard,
    pub log: Arc<Mutex<String>>,
    /// The handoff socket this test gave the agent, removed with it.
    handoff: PathBuf,
}

/// A handoff socket path unique to one agent of one test.
fn own_handoff_socket() -> PathBuf {
    std::env::temp_dir().join(format!("icp-handoff-{}.sock", unique_id()))
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.handoff);
    }
}

impl AgentProcess {
    /// Starts `interceptor ARGS` and waits for "agent ready"; panics with its log if it exits.
    pub fn start(args: &[String]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Like `start`, with extra environment variables (e.g. KUBECONFIG).
    pub fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Self {
        let handoff = own_handoff_socket();
        let mut child = Command::new(target_bin("interceptor"))
            .args(args)
            .envs(env.iter().copied())
            // Test API servers live on 127.0.0.1: a proxy from the environment must not apply.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env("INTERCEPTOR_LOG", "info,interceptor=debug")
            // Tests run agents side by side: each gets a free admin port (see `admin_addr`),
            // and a handoff socket of its own, so that no agent takes over another test's
            // listeners (an upgrade test passes --handoff-socket to both of its agents).
            .env("INTERCEPTOR_ADMIN_ADDR", "127.0.0.1:0")
            .env("INTERCEPTOR_HANDOFF_SOCKET", &handoff)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the interceptor agent");
        let stderr = child.stderr.take().expect("agent stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut agent = Self {
            child: ChildGuard(Some(child)),
            log,
            handoff,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if agent.log_text().contains("agent ready") {
                return agent;
            }
            let exited = agent
                .child
                .0
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "agent exited ({status}) before it was ready:\n{}",
                    agent.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready within 30 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the agent to completion (for start-up failures), returning its status and log.
    pub fn run_to_exit(args: &[String], timeout: Duration) -> (std::process::ExitStatus, String) {
        let handoff = own_handoff_socket();
        let child = Command::new(target_bin("interceptor"))
            .args(args)
            .env("INTERCEPTOR_HANDOFF_SOCKET", &handoff)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the interceptor agent");
        let out = ChildGuard(Some(child)).wait_output(timeout);
        let _ = std::fs::remove_file(&handoff);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The admin endpoint's address, from the agent's start-up log.
    pub fn admin_addr(&self) -> SocketAddr {
        let log = self.log_text();
        log.lines()
            .find_map(|l| {
                let (_, rest) = l.split_once("admin_addr=")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("the agent logged no admin endpoint address:\n{log}"))
    }

    /// GET on the admin endpoint: (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        interceptor::admin::get(self.admin_addr(), path)
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}\n{}", self.log_text()))
    }

    /// Sends SIGTERM and waits (bounded) for the agent to exit.
    pub fn terminate(mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.0.take().expect("agent running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        ChildGuard(Some(child)).wait_output(timeout).status
    }

    /// Waits for the agent to exit by itself (e.g. after handing over to a new one).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if status.is_some() || Instant::now() >= deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no clean-up code runs, as when the agent crashes or is OOM-killed.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.0.take() {
            child.kill().expect("kill -9 the agent");
            child.wait().expect("reap the agent");
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

/// Flushes stdout so interleaved parallel test output stays readable.
pub fn note(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
}

/// A gRPC-shaped HTTP/2 backend on `listener`: every request gets 200, a small body and
/// `grpc-status: 0` trailers, and is counted in `served`. Runs until the task is dropped.
pub async fn serve_grpc_shaped(
    listener: tokio::net::TcpListener,
    served: Arc<std::sync::atomic::AtomicU64>,
) {
    serve_grpc_stamped(listener, served, Arc::default()).await
}

/// Like `serve_grpc_shaped`, and stamps the wall-clock time (microseconds since the Unix
/// epoch) of the first request into `first_unix_us` (the benchmark's "time to first request").
pub async fn serve_grpc_stamped(
    listener: tokio::net::TcpListener,
    served: Arc<std::sync::atomic::AtomicU64>,
    first_unix_us: Arc<std::sync::atomic::AtomicU64>,
) {
    interceptor_test_support::h2_backend::serve_default(listener, move |request, respond| {
        if served.fetch_add(1, Ordering::Relaxed) == 0 {
            first_unix_us.store(unix_micros(), Ordering::Relaxed);
        }
        interceptor_test_support::h2_backend::answer_grpc_ok(request, respond)
    })
    .await
}

/// Wall-clock microseconds since the Unix epoch (comparable across processes).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
