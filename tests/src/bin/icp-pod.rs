//! The programs the e2e tests run inside "pods" (processes placed in a test netns and cgroup):
//! a backend that names itself, clients that report where each connection landed.
//! Output is one line per connection, parsed by the tests:
//!   OK <peer addr> <local addr> <first line the server sent>
//!   ERR <error>

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |name: &str, default: u64| -> u64 {
        flag(name)
            .map(|v| v.parse().expect("numeric flag"))
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("pause") => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Some("serve") => serve(
            &flag("--name").expect("--name"),
            &flag("--ports").expect("--ports"),
        ),
        Some("connect") => connect(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            num("--count", 1) as usize,
            num("--concurrency", 1) as usize,
            flag("--bind-base").map(|p| p.parse().expect("--bind-base PORT")),
        ),
        Some("connect-many") => {
            // --targets A,B,C: connection i dials target i % len.
            let targets: Vec<SocketAddr> = flag("--targets")
                .expect("--targets")
                .split(',')
                .map(|t| t.parse().expect("target addr"))
                .collect();
            connect_many(
                &targets,
                num("--count", 1) as usize,
                flag("--bind-base").map(|p| p.parse().expect("port")),
            )
        }
        Some("loop") => connect_loop(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            Duration::from_millis(num("--duration-ms", 1000)),
            Duration::from_millis(num("--interval-ms", 20)),
        ),
        Some("connect-bench") => connect_bench(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            num("--count", 10_000) as usize,
            flag("--cpu").map(|c| c.parse().expect("--cpu N")),
        ),
        Some("sink") => sink(num("--port", 0) as u16),
        Some("h2serve") => h2serve(
            num("--port", 0) as u16,
            // `--stack h2`: h2's high-level server (a task per stream), the backend the
            // benchmark used before its frame-level one; kept to reproduce the comparison.
            flag("--stack").as_deref() == Some("h2"),
        ),
        Some("greet-server") => interceptor_tests::greet::serve(
            &flag("--name").expect("--name"),
            flag("--host")
                .map(|h| h.parse().expect("--host IP"))
                .unwrap_or(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
            num("--port", 50051) as u16,
        ),
        Some("greet-calls") => interceptor_tests::greet::counted_calls(
            flag("--target")
                .expect("--target")
                .parse()
                .expect("--target ADDR"),
            num("--runs", 1) as usize,
            num("--calls", 1000) as usize,
            num("--concurrency", 1) as usize,
            Duration::from_secs_f64(
                flag("--deadline-s")
                    .map(|d| d.parse().expect("--deadline-s SECONDS"))
                    .unwrap_or(5.0),
            ),
        ),
        Some("greet-client") => interceptor_tests::greet::client(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            num("--concurrency", 4) as usize,
            Duration::from_secs(num("--seconds", 30)),
            Duration::from_millis(num("--report-ms", 100)),
        ),
        Some("greet-storm") => interceptor_tests::greet::storm(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            num("--max", 20_000) as usize,
            Duration::from_secs(num("--seconds", 10)),
        ),
        Some("greet-churn") => interceptor_tests::greet::churn(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            Duration::from_secs(num("--seconds", 5)),
            Duration::from_millis(num("--interval-ms", 5)),
        ),
        Some("echo-server") => echo_server(num("--port", 7000) as u16),
        Some("echo-hold") => echo_hold(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            Duration::from_secs(num("--seconds", 5)),
            Duration::from_millis(num("--interval-ms", 100)),
        ),
        Some("udp") => udp(flag("--to").expect("--to").parse().expect("--to ADDR")),
        Some("http1-serve") => interceptor_tests::http1::serve(
            &flag("--name").expect("--name"),
            num("--port", 8080) as u16,
        ),
        Some("ws-echo") => interceptor_tests::http1::ws_echo(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            num("--messages", 20) as usize,
        ),
        Some("raw-http") => interceptor_tests::http1::raw_exchange(
            flag("--to").expect("--to").parse().expect("--to ADDR"),
            &flag("--request-file").expect("--request-file"),
        ),
        other => {
            eprintln!("icp-pod: unknown command {other:?}");
            std::process::exit(2);
        }
    }
}

/// TCP and UDP on every port given, all addresses (dual-stack): each client gets our name.
fn serve(name: &str, ports: &str) {
    let mut threads = Vec::new();
    for port in ports.split(',') {
        let port: u16 = port.parse().expect("port");
        let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
        let reply = format!("{name}\n");
        let r = reply.clone();
        threads.push(std::thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut s = stream;
                    let _ = s.write_all(r.as_bytes());
                });
            }
        }));
        let udp = UdpSocket::bind(("::", port)).expect("bind udp");
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(reply.as_bytes(), from);
            }
        }));
    }
    println!("READY");
    for t in threads {
        let _ = t.join();
    }
}

fn one_connection(to: SocketAddr, bind_port: Option<u16>) -> String {
    let result = (|| -> std::io::Result<String> {
        let stream = match bind_port {
            Some(port) => {
                let domain = if to.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                bound_connect(domain, port, to)?
            }
            None => TcpStream::connect_timeout(&to, IO_TIMEOUT)?,
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(format!("OK {peer} {local} {}", line.trim_end()))
    })();
    result.unwrap_or_else(|e| format!("ERR {e}"))
}

/// Binds the client port before connecting, so tests can make loopback 4-tuples collide
/// across pods on purpose.
fn bound_connect(domain: i32, port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket syscalls on an fd we own; sockaddr structs are zeroed then filled.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const i32).cast(),
            4,
        );
        let rc = if domain == libc::AF_INET {
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_port = port.to_be();
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        } else {
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            sa.sin6_family = libc::AF_INET6 as u16;
            sa.sin6_port = port.to_be();
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in6).cast(),
                size_of::<libc::sockaddr_in6>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (addr, len) = sockaddr_of(to);
        if libc::connect(fd, (&addr as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is large enough for both families; zeroed is a valid start.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        match addr {
            SocketAddr::V4(a) => {
                let sa = &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_port = a.port().to_be();
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                (ss, size_of::<libc::sockaddr_in>() as u32)
            }
            SocketAddr::V6(a) => {
                let sa =
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                sa.sin6_family = libc::AF_INET6 as u16;
                sa.sin6_port = a.port().to_be();
                sa.sin6_addr.s6_addr = a.ip().octets();
                (ss, size_of::<libc::sockaddr_in6>() as u32)
            }
        }
    }
}

/// `count` connections, `concurrency` at a time, all starting together per wave.
fn connect(to: SocketAddr, count: usize, concurrency: usize, bind_base: Option<u16>) {
    let mut done = 0;
    while done < count {
        let wave = concurrency.min(count - done);
        let barrier = Arc::new(Barrier::new(wave));
        let handles: Vec<_> = (0..wave)
            .map(|i| {
                let barrier = barrier.clone();
                let port = bind_base.map(|b| b + (done + i) as u16);
                std::thread::spawn(move || {
                    barrier.wait();
                    one_connection(to, port)
                })
            })
            .collect();
        for h in handles {
            println!(
                "{}",
                h.join().unwrap_or_else(|_| "ERR thread panicked".into())
            );
        }
        done += wave;
    }
}

/// Accepts and closes connections on `port` (all addresses, dual-stack) as fast as one thread
/// can, with a deep backlog: a connect() benchmark's target. A thread per connection (`serve`)
/// accepts slower than a client connects, so its queue overflows and SYNs wait out a 1 s
/// retransmit, which is what made the benchmark stall.
fn sink(port: u16) {
    // SAFETY: plain socket syscalls on fds we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let off: libc::c_int = 0;
        let on: libc::c_int = 1;
        for (opt_level, opt, v) in [
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &off),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR, &on),
        ] {
            libc::setsockopt(
                fd,
                opt_level,
                opt,
                (v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
        let (addr, len) = sockaddr_of(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
        let rc = libc::bind(fd, (&addr as *const libc::sockaddr_storage).cast(), len);
        assert!(
            rc == 0,
            "bind [::]:{port}: {}",
            std::io::Error::last_os_error()
        );
        assert!(
            libc::listen(fd, 4096) == 0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        println!("READY");
        loop {
            let c = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
            if c >= 0 {
                libc::close(c);
            }
        }
    }
}

/// `count` concurrent connections, connection i to `targets[i % len]` (bound to bind_base + i).
fn connect_many(targets: &[SocketAddr], count: usize, bind_base: Option<u16>) {
    let barrier = Arc::new(Barrier::new(count));
    let handles: Vec<_> = (0..count)
        .map(|i| {
            let barrier = barrier.clone();
            let to = targets[i % targets.len()];
            let port = bind_base.map(|b| b + i as u16);
            std::thread::spawn(move || {
                barrier.wait();
                format!("{to} {}", one_connection(to, port))
            })
        })
        .collect();
    for h in handles {
        println!(
            "{}",
            h.join().unwrap_or_else(|_| "- ERR thread panicked".into())
        );
    }
}

/// Connects every `interval` for `duration` (bounded), one line per attempt with the time
/// since start in ms: `<ms> OK ...` / `<ms> ERR ...`.
fn connect_loop(to: SocketAddr, duration: Duration, interval: Duration) {
    let start = Instant::now();
    let max_attempts = 100_000;
    for _ in 0..max_attempts {
        if start.elapsed() >= duration {
            break;
        }
        let at = start.elapsed().as_millis();
        let line = one_connection(to, None);
        println!("{at} {line}");
        std::thread::sleep(interval);
    }
}

fn udp(to: SocketAddr) {
    let result = (|| -> std::io::Result<String> {
        let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.connect(to)?;
        sock.send(b"ping")?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf)?;
        Ok(format!(
            "OK {} {} {}",
            sock.peer_addr()?,
            sock.local_addr()?,
            String::from_utf8_lossy(&buf[..n]).trim_end()
        ))
    })();
    println!("{}", result.unwrap_or_else(|e| format!("ERR {e}")));
}

/// Times `count` blocking connect() calls to `to` (loopback: the handshake completes inside the
/// call) and prints `<count> <median ns> <p99 ns> <mean ns>`. Sockets are closed with an RST
/// (linger 0) so no TIME_WAIT piles up and exhausts the ports.
fn connect_bench(to: SocketAddr, count: usize, cpu: Option<usize>) {
    // One CPU for the whole measurement, so it does not move between CPUs mid-run.
    if let Some(cpu) = cpu {
        interceptor_tests::run_on_cpus([cpu]);
    }
    let mut samples = Vec::with_capacity(count);
    let (addr, len) = sockaddr_of(to);
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    for _ in 0..count {
        // SAFETY: plain socket syscalls on an fd we own and close.
        unsafe {
            let fd = libc::socket(domain, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as u32,
            );
            let start = Instant::now();
            let rc = libc::connect(fd, (&addr as *const libc::sockaddr_storage).cast(), len);
            let took = start.elapsed();
            assert!(rc == 0, "connect {to}: {}", std::io::Error::last_os_error());
            libc::close(fd);
            samples.push(took.as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    let mean = samples.iter().sum::<u64>() / samples.len() as u64;
    println!("{count} {median} {p99} {mean}");
}

/// A gRPC-shaped HTTP/2 backend (interceptor_tests::bench::h2serve, or h2's high-level server
/// with `high_level`): answers every request (200, a small body, `grpc-status: 0`
/// trailers). On SIGUSR1 it prints `stats <served> <unix us of the first request, 0 if none>`
/// and goes on (the benchmark polls it); on SIGTERM it prints `served <N>` and exits.
fn h2serve(port: u16, high_level: bool) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("::", port))
            .await
            .expect("bind h2 backend");
        let served = Arc::new(AtomicU64::new(0));
        let first = Arc::new(AtomicU64::new(0));
        if high_level {
            tokio::spawn(interceptor_tests::serve_grpc_stamped(
                listener,
                served.clone(),
                first.clone(),
            ));
        } else {
            tokio::spawn(interceptor_tests::bench::h2serve::serve(
                listener,
                served.clone(),
                first.clone(),
            ));
        }
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1 handler");
        println!("READY");
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = usr1.recv() => {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(
                        out,
                        "stats {} {}",
                        served.load(Ordering::Relaxed),
                        first.load(Ordering::Relaxed)
                    );
                    let _ = out.flush();
                }
            }
        }
        println!("served {}", served.load(Ordering::Relaxed));
    });
}

/// A line echo server on `port` (every address), a thread per connection; prints READY.
fn echo_server(port: u16) {
    let tcp = TcpListener::bind(("::", port)).expect("bind echo server");
    println!("READY");
    for stream in tcp.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = stream;
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut s, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// ONE TCP connection to `to` held for `duration`: a line every `interval`, each echoed back.
/// Prints `HOLD <echoed> <sent>` and, if the connection broke, `HOLD_ERROR ...`.
fn echo_hold(to: SocketAddr, duration: Duration, interval: Duration) {
    let start = Instant::now();
    let (mut sent, mut echoed) = (0u64, 0u64);
    let result = (|| -> std::io::Result<()> {
        let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        while start.elapsed() < duration {
            let line = format!("ping {sent}\n");
            w.write_all(line.as_bytes())?;
            sent += 1;
            let mut back = String::new();
            if r.read_line(&mut back)? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            if back != line {
                return Err(std::io::Error::other(format!("echoed {back:?}")));
            }
            echoed += 1;
            std::thread::sleep(interval);
        }
        Ok(())
    })();
    println!("HOLD {echoed} {sent}");
    if let Err(e) = result {
        println!("HOLD_ERROR {e} after {:?}", start.elapsed());
    }
}
