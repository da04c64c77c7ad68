//! `--busy-poll-us` on the real `interceptor proxy` binary: after a call the worker keeps its
//! core busy for the budget and then sleeps; without the flag it sleeps at once. Calls are
//! answered either way. On the relay engine, which is where busy polling is.

#[path = "proxy_support.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name: utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Share of one core `pid` used over `window`.
async fn busy_share(pid: u32, window: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), cpu_seconds(pid));
    tokio::time::sleep(window).await;
    (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64()
}

/// Starts the proxy with `busy_poll_us`, makes calls through it and returns the share of a
/// core it used in the 600 ms after the last call, and 600 ms after that.
async fn after_calls(backend: &Backend, busy_poll_us: u64) -> (f64, f64) {
    let listen = free_port();
    let proxy = Running(
        Command::new(env!("CARGO_BIN_EXE_interceptor"))
            .args([
                "proxy",
                "--listen",
                &format!("127.0.0.1:{listen}"),
                "--endpoints",
                &backend.addr.to_string(),
                "--worker-threads",
                "1",
                "--busy-poll-us",
                &busy_poll_us.to_string(),
                // Busy polling follows the relay's reads; the streams engine does not have it.
                "--h2-engine",
                "relay",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start interceptor proxy"),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], listen));
    wait_listening(addr).await;
    let mut c = client(addr).await;
    for i in 0..20 {
        let r = unary(&mut c, request(Bytes::from(format!("call {i}")), &[]))
            .await
            .unwrap_or_else(|e| panic!("call {i} with --busy-poll-us {busy_poll_us}: {e}"));
        assert_eq!(backend_of(&r), "busy");
    }
    let pid = proxy.0.id();
    let right_after = busy_share(pid, Duration::from_millis(600)).await;
    let later = busy_share(pid, Duration::from_millis(600)).await;
    (right_after, later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_keeps_the_worker_busy_for_its_budget_and_then_sleeps() {
    let backend = Backend::start([127, 0, 0, 3], "busy");

    // A 300 ms budget: polling through half of the first window, asleep in the second.
    let (right_after, later) = after_calls(&backend, 300_000).await;
    println!("--busy-poll-us 300000: {right_after:.2} of a core after the calls, {later:.2} later");
    assert!(
        right_after > 0.25,
        "the worker slept after the calls: {right_after:.2} of a core in the 600 ms after them"
    );
    assert!(
        later < 0.1,
        "busy polling did not stop after its budget: {later:.2} of a core 600-1200 ms after the calls"
    );

    let (right_after, _) = after_calls(&backend, 0).await;
    println!("--busy-poll-us 0: {right_after:.2} of a core after the calls");
    assert!(
        right_after < 0.1,
        "without busy polling the idle proxy used {right_after:.2} of a core"
    );
}
