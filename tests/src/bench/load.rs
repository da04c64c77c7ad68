//! The benchmark's own HTTP/2 client (tokio + h2), run inside the client pod. Three modes:
//! - `probe`: one stream at a time (closed loop), the single-stream latency;
//! - `rate`: open loop at a fixed rate (`open_loop`: frame level, one thread; latency from each
//!   request's due time, so a stalled server cannot hide its stall: no coordinated omission);
//! - `idle`: opens N connections, one request each, then holds them idle (RSS per connection).
//!
//! Every response must be 200 with `grpc-status: 0` in the trailers; anything else is an error.
//! Prints one JSON line (`LoadResult`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use serde::{Deserialize, Serialize};

/// A gRPC frame: uncompressed, 5 bytes of message.
pub const REQUEST_BODY: &[u8] = b"\0\0\0\0\x05hello";

/// How long a client waits for its contender to accept connections.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_secs(10);
/// Requests still outstanding this long after the schedule ends count as errors.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requests started (after warm-up and during it).
    pub sent: u64,
    /// 200 + grpc-status 0.
    pub ok: u64,
    /// Transport errors, resets, timeouts, non-200 or a missing/non-zero grpc-status.
    pub errors: u64,
    /// Requests recorded in the latency histogram (after warm-up).
    pub measured: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    /// Completed requests per second over the measured window.
    pub achieved_rps: f64,
    /// Idle mode: connections that completed their request.
    pub conns_ok: u64,
    /// First error seen, for the report.
    pub first_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LoadArgs {
    pub mode: String,
    pub targets: Vec<SocketAddr>,
    pub conns: usize,
    pub count: u64,
    pub rate: f64,
    pub duration: Duration,
    pub warmup: Duration,
    pub hold: Duration,
}

impl LoadArgs {
    /// The command line the orchestrator passes to `bench load`.
    pub fn to_args(&self) -> Vec<String> {
        let targets: Vec<String> = self.targets.iter().map(|t| t.to_string()).collect();
        vec![
            "load".into(),
            self.mode.clone(),
            targets.join(","),
            self.conns.to_string(),
            self.count.to_string(),
            self.rate.to_string(),
            self.duration.as_millis().to_string(),
            self.warmup.as_millis().to_string(),
            self.hold.as_millis().to_string(),
        ]
    }

    pub fn parse(args: &[String]) -> Self {
        let get = |i: usize| {
            args.get(i)
                .unwrap_or_else(|| panic!("load: argument {i} missing"))
        };
        let num = |i: usize| -> u64 { get(i).parse().expect("load: numeric argument") };
        Self {
            mode: get(0).clone(),
            targets: get(1)
                .split(',')
                .map(|t| t.parse().expect("load: target address"))
                .collect(),
            conns: num(2) as usize,
            count: num(3),
            rate: get(4).parse().expect("load: rate"),
            duration: Duration::from_millis(num(5)),
            warmup: Duration::from_millis(num(6)),
            hold: Duration::from_millis(num(7)),
        }
    }
}

/// Entry point of `bench load ...` (inside the pod): runs and prints the JSON result.
pub fn main(args: &[String]) {
    let args = LoadArgs::parse(args);
    if args.mode == "rate" {
        let result = super::open_loop::run(&args);
        println!(
            "{}",
            serde_json::to_string(&result).expect("serialise the result")
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        match args.mode.as_str() {
            "probe" => probe(&args).await,
            "idle" => idle(&args).await,
            other => panic!("load: unknown mode {other}"),
        }
    });
    println!(
        "{}",
        serde_json::to_string(&result).expect("serialise the result")
    );
}

#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

/// One h2 connection, retrying the TCP connect while the contender starts up.
async fn connect(target: SocketAddr) -> Result<SendRequest<Bytes>, Failure> {
    let deadline = Instant::now() + CONNECT_RETRY;
    let stream = loop {
        match tokio::net::TcpStream::connect(target).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(Failure(format!("connect {target}: {e}"))),
        }
    };
    stream.set_nodelay(true)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 22)
        .handshake::<_, Bytes>(stream)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn connect_all(args: &LoadArgs) -> Result<Vec<(SendRequest<Bytes>, String)>, Failure> {
    let mut conns = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let target = args.targets[i % args.targets.len()];
        conns.push((connect(target).await?, target.to_string()));
    }
    Ok(conns)
}

/// One gRPC-shaped unary call; Ok only for 200 + `grpc-status: 0`.
async fn call(send: SendRequest<Bytes>, authority: &str) -> Result<(), Failure> {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}/bench.Bench/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let mut send = send.ready().await?;
    let (response, mut body_tx) = send.send_request(request, false)?;
    body_tx.send_data(Bytes::from_static(REQUEST_BODY), true)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        return Err(Failure(format!("status {}", response.status())));
    }
    let (parts, mut body) = response.into_parts();
    let headers = parts.headers;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(v) if v == "0" => Ok(()),
        Some(v) => Err(Failure(format!("grpc-status {v:?}"))),
        // A trailers-only response carries the status in the headers.
        None => Err(Failure(format!(
            "no grpc-status trailer (headers: grpc-status {:?}, grpc-message {:?})",
            headers.get("grpc-status"),
            headers.get("grpc-message")
        ))),
    }
}

#[derive(Default)]
pub(crate) struct Tally {
    ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    latencies_ns: Vec<u64>,
    pub(crate) last_done: Option<Instant>,
}

impl Tally {
    pub(crate) fn record(&mut self, outcome: Result<(), Failure>, latency: Option<Duration>) {
        match outcome {
            Ok(()) => {
                self.ok += 1;
                if let Some(l) = latency {
                    self.latencies_ns.push(l.as_nanos() as u64);
                    self.last_done = Some(Instant::now());
                }
            }
            Err(Failure(e)) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    pub(crate) fn finish(mut self, sent: u64, window: Duration) -> LoadResult {
        self.latencies_ns.sort_unstable();
        let n = self.latencies_ns.len();
        let pct = |p: f64| -> f64 {
            if n == 0 {
                return 0.0;
            }
            let i = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
            self.latencies_ns[i] as f64 / 1000.0
        };
        let mean = if n == 0 {
            0.0
        } else {
            self.latencies_ns.iter().sum::<u64>() as f64 / n as f64 / 1000.0
        };
        LoadResult {
            sent,
            ok: self.ok,
            errors: self.errors,
            measured: n as u64,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            mean_us: mean,
            achieved_rps: if window.is_zero() {
                0.0
            } else {
                n as f64 / window.as_secs_f64()
            },
            conns_ok: 0,
            first_error: self.first_error,
        }
    }
}

fn connect_failed(e: Failure) -> LoadResult {
    LoadResult {
        errors: 1,
        first_error: Some(e.0),
        ..LoadResult::default()
    }
}

/// Closed loop, one stream in flight: `count` calls round robin over the connections; the first
/// tenth (at least 50) is warm-up.
async fn probe(args: &LoadArgs) -> LoadResult {
    let conns = match connect_all(args).await {
        Ok(c) => c,
        Err(e) => return connect_failed(e),
    };
    let warm = (args.count / 10).max(50);
    let mut tally = Tally::default();
    let mut window = Duration::ZERO;
    for i in 0..(args.count + warm) {
        let (send, authority) = &conns[(i as usize) % conns.len()];
        let start = Instant::now();
        let outcome = call(send.clone(), authority).await;
        let took = start.elapsed();
        if i >= warm {
            window += took;
            tally.record(outcome, Some(took));
        } else {
            tally.record(outcome, None);
        }
    }
    tally.finish(args.count + warm, window)
}

/// Opens `conns` connections (one request each), prints `READY <ok>` and holds them idle for
/// `hold` (bounded) before reporting.
async fn idle(args: &LoadArgs) -> LoadResult {
    let mut tally = Tally::default();
    let mut held = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let target = args.targets[i % args.targets.len()];
        match connect(target).await {
            Ok(send) => {
                let outcome = call(send.clone(), &target.to_string()).await;
                tally.record(outcome, None);
                held.push(send);
            }
            Err(e) => tally.record(Err(e), None),
        }
    }
    let conns_ok = tally.ok;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {conns_ok}");
        let _ = out.flush();
    }
    tokio::time::sleep(args.hold).await;
    drop(held);
    let mut result = tally.finish(args.conns as u64, Duration::ZERO);
    result.conns_ok = conns_ok;
    result
}
