//! The benchmark's open-loop load (`bench load rate ...`): request i is due at start + i/rate
//! and its latency is measured from that due time, so a contender that stalls cannot hide the
//! stall by slowing the client down (no coordinated omission).
//!
//! One thread drives every connection at frame level on h2's codec (h2's framing and HPACK)
//! over non-blocking sockets, and sleeps in `ppoll` until the next request is due or a
//! response arrives, with 1 us timer slack. Why not h2's client and a task per request, as the
//! other modes use: the generator shares CPU 0 with the four backends, and at tens of
//! thousands of requests per second the task machinery and the wake-ups between a pacer
//! thread and the runtime cost more than the backends, so the baseline (S0) itself fell
//! behind its schedule and no added p99 could be read at half load.
//!
//! Every response must be 200 with `grpc-status: 0` in its trailers; anything else, a reset,
//! a GOAWAY that drops the stream or no answer within the drain grace, is an error.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use h2::frame::{self, Frame, StreamId};
use h2::Codec;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::load::{Failure, LoadArgs, LoadResult, Tally, CONNECT_RETRY, DRAIN_GRACE, REQUEST_BODY};

/// What we let a contender send before we give window back: per stream and per connection.
const STREAM_WINDOW: u32 = 1 << 20;
const CONN_WINDOW: u32 = 1 << 22;
const DEFAULT_WINDOW: u32 = 65_535;
/// Streams per connection until the peer's SETTINGS say otherwise (RFC 9113 recommends
/// allowing at least 100).
const ASSUMED_MAX_STREAMS: usize = 100;

/// Runs the open loop described by `args` (mode `rate`) and tallies it.
pub fn run(args: &LoadArgs) -> LoadResult {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack; 1 ns asks for
    // the finest the kernel gives, so sleeps end when the next request is due.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let mut conns = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let target = args.targets[i % args.targets.len()];
        match Conn::open(target) {
            Ok(c) => conns.push(c),
            Err(e) => {
                return LoadResult {
                    errors: 1,
                    first_error: Some(e.0),
                    ..LoadResult::default()
                }
            }
        }
    }
    let total = ((args.warmup + args.duration).as_secs_f64() * args.rate) as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + args.warmup;
    let due = |i: u64| start + interval.mul_f64(i as f64);
    let schedule_end = due(total);
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut tally = Tally::default();
    let mut next = 0u64;
    loop {
        let now = Instant::now();
        while next < total && due(next) <= now {
            let c = (next as usize) % conns.len();
            conns[c].queued.push_back(due(next));
            next += 1;
        }
        for c in conns.iter_mut() {
            c.turn(&mut cx, measure_from, &mut tally);
        }
        for c in conns.iter_mut() {
            c.readable = false;
        }
        let waiting: usize = conns.iter().map(Conn::outstanding).sum();
        if next == total && waiting == 0 {
            break;
        }
        let now = Instant::now();
        if next == total && now >= schedule_end + DRAIN_GRACE {
            tally.errors += waiting as u64;
            tally.first_error.get_or_insert(format!(
                "{waiting} requests unanswered {DRAIN_GRACE:?} after the schedule ended"
            ));
            break;
        }
        let wake_at = if next < total {
            due(next)
        } else {
            // Draining: poll for answers, bounded by the grace.
            now + Duration::from_millis(100)
        };
        sleep_until_ready(&mut conns, wake_at.saturating_duration_since(now));
    }
    // A contender that fell behind finishes late: the rate is over the time it really took.
    let window = tally
        .last_done
        .map(|t| t.saturating_duration_since(measure_from))
        .unwrap_or_default()
        .max(args.duration);
    tally.finish(total, window)
}

/// Sleeps until a live connection is readable (or writable, when it has bytes waiting to go)
/// or `timeout` passes, and marks the connections that are ready: only those are read, since
/// at tens of thousands of requests per second a read that finds nothing is most of the cost.
fn sleep_until_ready(conns: &mut [Conn], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            // A negative fd is ignored by ppoll.
            fd: if c.dead { -1 } else { c.fd },
            events: libc::POLLIN | if c.write_blocked { libc::POLLOUT } else { 0 },
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd, `ts` outlives the call, and a null
    // signal mask leaves the mask unchanged.
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if n < 0 {
        // EINTR: nothing is marked; the loop comes back here after sending what is due.
        return;
    }
    for (c, fd) in conns.iter_mut().zip(&fds) {
        c.readable = fd.revents != 0;
    }
}

/// A non-blocking socket as tokio's IO traits, for h2's codec driven by our own loop: would
/// block is Pending (and the loop's `ppoll` does the waiting, so no waker is kept).
struct Nonblocking(TcpStream);

impl AsyncRead for Nonblocking {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match (&self.0).read(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Nonblocking {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match (&self.0).write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            other => Poll::Ready(other),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.shutdown(std::net::Shutdown::Write))
    }
}

/// A request on the wire: when it was due, and whether its head said 200.
struct InFlight {
    due: Instant,
    head_ok: bool,
}

struct Conn {
    codec: Codec<Nonblocking, Bytes>,
    fd: i32,
    uri: Uri,
    fields: HeaderMap,
    next_id: u32,
    /// Due times of requests waiting for a stream slot or window.
    queued: VecDeque<Instant>,
    in_flight: HashMap<u32, InFlight>,
    max_streams: usize,
    /// What the peer lets us send on the connection.
    send_window: i64,
    /// Response bytes received and not yet given back.
    unreleased: u32,
    /// Frames waiting for room in the codec's write buffer.
    out: VecDeque<Frame<Bytes>>,
    /// Frames are buffered in the codec and not yet written.
    unflushed: bool,
    /// The socket would not take everything: wait for POLLOUT.
    write_blocked: bool,
    /// ppoll said readable (or anything else worth a read: an error, a hang-up).
    readable: bool,
    /// No stream above this id will be answered (the peer's GOAWAY); u32::MAX until then.
    last_id: u32,
    dead: bool,
}

impl Conn {
    fn open(target: SocketAddr) -> Result<Conn, Failure> {
        let deadline = Instant::now() + CONNECT_RETRY;
        let mut stream = loop {
            match TcpStream::connect(target) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(Failure(format!("connect {target}: {e}"))),
            }
        };
        stream.set_nodelay(true)?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
        stream.set_nonblocking(true)?;
        let fd = stream.as_raw_fd();
        let mut settings = frame::Settings::default();
        settings.set_initial_window_size(Some(STREAM_WINDOW));
        settings.set_enable_push(false);
        let out = VecDeque::from([
            settings.into(),
            frame::WindowUpdate::new(StreamId::zero(), CONN_WINDOW - DEFAULT_WINDOW).into(),
        ]);
        Ok(Conn {
            codec: Codec::new(Nonblocking(stream)),
            fd,
            uri: format!("http://{target}/bench.Bench/Call").parse()?,
            fields: HeaderMap::from_iter([
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                ),
                (http::header::TE, HeaderValue::from_static("trailers")),
            ]),
            next_id: 1,
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            max_streams: ASSUMED_MAX_STREAMS,
            send_window: i64::from(DEFAULT_WINDOW),
            unreleased: 0,
            out,
            unflushed: false,
            write_blocked: false,
            // The peer's SETTINGS may already be there.
            readable: true,
            last_id: u32::MAX,
            dead: false,
        })
    }

    fn outstanding(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    /// Starts what may start, writes what is buffered, reads and checks what came back.
    fn turn(&mut self, cx: &mut Context<'_>, measure_from: Instant, tally: &mut Tally) {
        if self.dead {
            return;
        }
        let result = (|| -> Result<(), Failure> {
            self.start_queued();
            self.write(cx)?;
            while self.readable {
                match Pin::new(&mut self.codec).poll_next(cx) {
                    Poll::Ready(Some(Ok(f))) => self.on_frame(f, measure_from, tally)?,
                    Poll::Ready(Some(Err(e))) => return Err(Failure(format!("{e:?}"))),
                    Poll::Ready(None) => return Err(Failure("connection closed".into())),
                    Poll::Pending => self.readable = false,
                }
            }
            // Answers read may have freed slots and brought window updates to send.
            self.start_queued();
            self.write(cx)
        })();
        if let Err(Failure(e)) = result {
            self.dead = true;
            let lost = self.outstanding() as u64;
            tally.errors += lost;
            if lost > 0 {
                tally.first_error.get_or_insert(e);
            }
            self.in_flight.clear();
            self.queued.clear();
        }
    }

    fn start_queued(&mut self) {
        while self.in_flight.len() < self.max_streams
            && self.send_window >= REQUEST_BODY.len() as i64
            && self.next_id < self.last_id
        {
            let Some(due) = self.queued.pop_front() else {
                break;
            };
            let id = StreamId::from(self.next_id);
            self.next_id += 2;
            let pseudo = frame::Pseudo::request(Method::POST, self.uri.clone(), None);
            self.out
                .push_back(frame::Headers::new(id, pseudo, self.fields.clone()).into());
            let mut data = frame::Data::new(id, Bytes::from_static(REQUEST_BODY));
            data.set_end_stream(true);
            self.out.push_back(data.into());
            self.send_window -= REQUEST_BODY.len() as i64;
            self.in_flight.insert(
                id.into(),
                InFlight {
                    due,
                    head_ok: false,
                },
            );
        }
    }

    fn write(&mut self, cx: &mut Context<'_>) -> Result<(), Failure> {
        if self.out.is_empty() && !self.unflushed {
            return Ok(());
        }
        self.write_blocked = true;
        while let Some(f) = self.out.pop_front() {
            match self.codec.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.codec.buffer(f)?;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    self.out.push_front(f);
                    return Ok(());
                }
            }
        }
        match self.codec.flush(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => return Ok(()),
        }
        self.unflushed = false;
        self.write_blocked = false;
        Ok(())
    }

    fn on_frame(
        &mut self,
        f: Frame,
        measure_from: Instant,
        tally: &mut Tally,
    ) -> Result<(), Failure> {
        match f {
            Frame::Headers(h) => {
                let id: u32 = h.stream_id().into();
                let end = h.is_end_stream();
                let Some(call) = self.in_flight.get_mut(&id) else {
                    return Ok(());
                };
                let (pseudo, fields) = h.into_parts();
                if !call.head_ok {
                    let outcome = match pseudo.status {
                        Some(StatusCode::OK) if !end => {
                            call.head_ok = true;
                            return Ok(());
                        }
                        Some(StatusCode::OK) => Err(Failure(format!(
                            "trailers-only answer: grpc-status {:?}, grpc-message {:?}",
                            fields.get("grpc-status"),
                            fields.get("grpc-message")
                        ))),
                        other => Err(Failure(format!("status {other:?}"))),
                    };
                    self.in_flight.remove(&id);
                    tally.record(outcome, None);
                    return Ok(());
                }
                if !end {
                    return Err(Failure(format!("stream {id}: trailers without END_STREAM")));
                }
                let call = self.in_flight.remove(&id).expect("checked above");
                let outcome = match fields.get("grpc-status") {
                    Some(v) if v == "0" => Ok(()),
                    Some(v) => Err(Failure(format!("grpc-status {v:?}"))),
                    None => Err(Failure("no grpc-status trailer".into())),
                };
                let latency = (call.due >= measure_from).then(|| call.due.elapsed());
                tally.record(outcome, latency);
            }
            Frame::Data(d) => {
                let id: u32 = d.stream_id().into();
                self.unreleased += d.payload().len() as u32;
                if self.unreleased >= CONN_WINDOW / 4 {
                    let n = std::mem::take(&mut self.unreleased);
                    self.out
                        .push_back(frame::WindowUpdate::new(StreamId::zero(), n).into());
                }
                if d.is_end_stream() && self.in_flight.remove(&id).is_some() {
                    tally.record(Err(Failure("answer ended without trailers".into())), None);
                }
            }
            Frame::Reset(r) if self.in_flight.remove(&r.stream_id().into()).is_some() => {
                tally.record(
                    Err(Failure(format!("stream reset: {:?}", r.reason()))),
                    None,
                );
            }
            Frame::GoAway(g) => {
                // Streams above the last one the peer processed will not be answered; the
                // rest still are.
                let last: u32 = g.last_stream_id().into();
                self.last_id = last.saturating_add(1);
                let dropped: Vec<u32> = self
                    .in_flight
                    .keys()
                    .copied()
                    .filter(|id| *id > last)
                    .collect();
                for id in dropped {
                    self.in_flight.remove(&id);
                    tally.record(Err(Failure(format!("GOAWAY {:?}", g.reason()))), None);
                }
            }
            Frame::Settings(s) if !s.is_ack() => {
                if let Some(n) = s.max_concurrent_streams() {
                    self.max_streams = n as usize;
                }
                super::h2serve::ack_settings(&mut self.codec, &mut self.out, &s);
            }
            Frame::Ping(p) if !p.is_ack() => super::h2serve::pong(&mut self.out, &p),
            Frame::WindowUpdate(w) if w.stream_id().is_zero() => {
                self.send_window += i64::from(w.size_increment());
            }
            _ => {}
        }
        Ok(())
    }
}
