//! Running out of file descriptors is this process's problem, not the endpoints': the real
//! `interceptor proxy` binary under a low RLIMIT_NOFILE caps its client connections below the
//! limit, closes the excess at accept, and ejects nothing.

#[path = "proxy_support.rs"]
mod support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use interceptor::proxy::detect::H2_PREFACE;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const NOFILE: u64 = 256;

async fn metrics_text(admin: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", admin))
        .await
        .expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("metrics in time")
        .expect("metrics");
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_fd_limit_caps_connections_and_ejects_nothing() {
    let b = Backend::start([127, 0, 0, 2], "b2");
    let (listen, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_interceptor"));
    cmd.args([
        "proxy",
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--endpoints",
        &b.addr.to_string(),
        "--admin-addr",
        &format!("127.0.0.1:{admin}"),
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut proxy = Running(cmd.spawn().expect("start interceptor proxy"));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], listen));
    wait_listening(addr).await;
    let legit = Legit::start(addr).await;

    // Twice the descriptors the proxy has, each a client that stays connected.
    let mut held = Vec::new();
    for _ in 0..2 * NOFILE {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("the kernel still accepts");
        let _ = s.write_all(H2_PREFACE).await;
        held.push(s);
    }
    let mut served = 0;
    let mut closed = 0;
    for s in held.iter_mut() {
        let mut buf = [0u8; 64];
        match timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => served += 1,
            Err(_) => {}
        }
    }
    let report = legit.stop().await;
    let text = metrics_text(admin).await;
    drop(held);
    let rejected = metric(&text, "interceptor_rejected_connections_total") as u64;
    let ejections = metric(&text, "interceptor_ejections_total") as u64;
    let _ = proxy.0.kill();
    let _ = proxy.0.wait();
    let mut stderr = String::new();
    if let Some(mut e) = proxy.0.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    println!(
        "RLIMIT_NOFILE {NOFILE}: {served} of {} extra connections served, {closed} closed at accept; rejected {rejected}, ejections {ejections}",
        2 * NOFILE
    );
    println!("proxy log:\n{stderr}");
    // The cap is half the limit less a reserve: 64 with the legitimate client among them.
    assert_eq!(served, 63, "connections served beside the legitimate one");
    assert_eq!(closed as u64, 2 * NOFILE - 63);
    assert_eq!(rejected, 2 * NOFILE - 63);
    assert_eq!(
        ejections, 0,
        "running out of descriptors ejected an endpoint"
    );
    assert!(
        stderr.contains("client connection limit reached"),
        "{stderr}"
    );
    assert!(!stderr.contains("ejected"), "{stderr}");
    assert_unharmed(&report);
}
