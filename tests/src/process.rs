//! Processes of the tests: commands run to completion, children killed on drop, and the
//! agent binary as a separate process with its log collected.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::unique_id;

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

    /// How many lines of the log contain `needle` (a warning said once must be said once).
    pub fn log_lines_containing(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The agent's process id (for its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Requests the agent finished per endpoint, from its /metrics
    /// (`interceptor_requests_total`), over the series whose labels contain every one of
    /// `labels` (e.g. `service="web"`; none: all).
    pub fn requests_by_endpoint(&self, labels: &[&str]) -> std::collections::BTreeMap<String, u64> {
        let (code, metrics) = self.admin_get("/metrics");
        assert_eq!(code, 200);
        let mut by = std::collections::BTreeMap::new();
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("interceptor_requests_total{"))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
        {
            let Some(ep) = line
                .split("endpoint=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            let n: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *by.entry(ep.to_string()).or_default() += n as u64;
        }
        by
    }

    /// The sum of the agent's `name` series whose labels contain every one of `labels` (e.g.
    /// `reason="rapid_reset"`), from its /metrics.
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        let (code, metrics) = self.admin_get("/metrics");
        assert_eq!(code, 200);
        let series = format!("{name}{{");
        metrics
            .lines()
            .filter(|l| l.starts_with(&series))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (bounded) until nothing is in flight for the series matching `labels`
    /// (`interceptor_active_streams` sums to 0) and `interceptor_requests_total` stays put
    /// across two reads: a client killed mid-request is counted when the agent notices, which
    /// may be after the next phase's "before" snapshot.
    pub fn wait_requests_settled(&self, labels: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = self.requests_by_endpoint(labels);
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = self.requests_by_endpoint(labels);
            let in_flight = self.metric_sum("interceptor_active_streams", labels);
            if in_flight == 0.0 && now == last {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "requests matching {labels:?} did not settle within {timeout:?}: {in_flight} in flight, counts {last:?} -> {now:?}"
            );
            last = now;
        }
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
            let status = self
                .child
                .0
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
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
