//! Clients that send random HTTP/2 conversations, mostly well-formed with mistakes mixed in
//! (seeded, so a failure names the conversation that reproduces it), beside a well-behaved
//! client: no panic anywhere, the well-behaved client unharmed, the endpoint not ejected, and
//! once the random clients are gone, nothing of theirs left open at the endpoint.

#[path = "proxy_support.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use interceptor::proxy::config::ProxyConfig;
use interceptor_test_support::rng::Rng;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

const CONVERSATIONS: u64 = 400;
const AT_ONCE: usize = 20;

fn request_block(rng: &mut Rng) -> Vec<u8> {
    let method = if rng.chance(30) { "Hang" } else { "Unary" };
    let mut b = vec![0x83, 0x86];
    hpack_int(&mut b, 4, 0, 4);
    hpack_str(&mut b, format!("/test.Echo/{method}").as_bytes());
    hpack_int(&mut b, 4, 0, 1);
    hpack_str(&mut b, b"svc.test");
    if rng.chance(5) {
        // A field no request may carry: a response's, an upper-case name, a hop-by-hop one.
        match rng.below(3) {
            0 => b.push(0x88),
            1 => {
                hpack_int(&mut b, 4, 0, 0);
                hpack_str(&mut b, b"X-Upper");
                hpack_str(&mut b, b"1");
            }
            _ => {
                hpack_int(&mut b, 4, 0, 0);
                hpack_str(&mut b, b"connection");
                hpack_str(&mut b, b"close");
            }
        }
    }
    hpack_int(&mut b, 4, 0, 31);
    hpack_str(&mut b, b"application/grpc");
    if rng.chance(50) {
        hpack_int(&mut b, 4, 0, 0);
        hpack_str(&mut b, b"te");
        hpack_str(&mut b, b"trailers");
    }
    b
}

fn trailers_block(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    if rng.chance(10) {
        b.push(0x82);
    }
    hpack_int(&mut b, 4, 0, 0);
    hpack_str(&mut b, if rng.chance(90) { b"x-sum" } else { b"X-Sum" });
    hpack_str(&mut b, b"1");
    b
}

fn grpc_message(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => rng.below(40_000) as usize,
        _ => rng.below(200) as usize,
    };
    let mut m = vec![0];
    m.extend_from_slice(&(len as u32).to_be_bytes());
    m.extend(std::iter::repeat_n(b'm', len));
    if rng.chance(5) {
        // A message whose prefix promises more than comes, or a frame of loose bytes.
        m.truncate(m.len() / 2);
    }
    m
}

/// One conversation after the preface and an empty SETTINGS. A `careful` one makes only
/// mistakes that are one stream's (a malformed request or trailers, a PRIORITY on itself, a
/// message cut short, cancels), so that it lives long enough to get answers; the others
/// also make the connection's (frames on idle, even or ended streams, a reused id, a bad
/// SETTINGS value, loose bytes) and are usually closed early.
fn conversation(rng: &mut Rng, careful: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut next_id = 1u32;
    // Streams opened and not reset by us; those we may still send DATA or trailers on.
    let mut opened: Vec<u32> = Vec::new();
    let mut sending: Vec<u32> = Vec::new();
    let some_stream = |rng: &mut Rng, opened: &[u32]| -> Option<u32> {
        match (rng.below(10), opened.is_empty()) {
            (0, _) | (_, true) if !careful => Some(rng.below(20) as u32),
            (_, true) => None,
            _ => Some(opened[rng.below(opened.len() as u64) as usize]),
        }
    };
    for _ in 0..10 + rng.below(50) {
        match rng.below(20) {
            0..=4 => {
                let id = if !careful && rng.chance(4) {
                    // Reused, lower, even or 0.
                    rng.below(u64::from(next_id) + 2) as u32
                } else {
                    let id = next_id;
                    next_id += 2;
                    id
                };
                let block = request_block(rng);
                let eos = if rng.chance(10) { END_STREAM } else { 0 };
                if rng.chance(10) && block.len() > 4 {
                    let cut = 1 + rng.below(block.len() as u64 - 2) as usize;
                    out.extend(frame(HEADERS, eos, id, &block[..cut]));
                    if !careful && rng.chance(10) {
                        // Something between HEADERS and its CONTINUATION.
                        out.extend(frame(PING, 0, 0, b"between!"));
                    }
                    let cont_id = if !careful && rng.chance(5) {
                        id + 2
                    } else {
                        id
                    };
                    out.extend(frame(CONTINUATION, END_HEADERS, cont_id, &block[cut..]));
                } else {
                    out.extend(frame(HEADERS, END_HEADERS | eos, id, &block));
                }
                opened.push(id);
                if eos == 0 {
                    sending.push(id);
                }
            }
            5..=8 => {
                // A careful client sends nothing more on a stream it ended.
                let Some(id) = some_stream(rng, if careful { &sending } else { &opened }) else {
                    continue;
                };
                let mut payload = grpc_message(rng);
                let mut flags = if rng.chance(60) { END_STREAM } else { 0 };
                if !careful && rng.chance(5) {
                    flags |= PADDED;
                    let pad = rng.below(20) as u8;
                    payload.insert(0, pad);
                    payload.extend(std::iter::repeat_n(0, rng.below(20) as usize));
                }
                for chunk in payload.chunks(16_384) {
                    out.extend(frame(DATA, 0, id, chunk));
                }
                if flags != 0 {
                    out.extend(frame(DATA, flags, id, &[]));
                    sending.retain(|o| *o != id);
                }
            }
            9 => {
                let Some(id) = some_stream(rng, &opened) else {
                    continue;
                };
                let code = [0u32, 1, 2, 7, 8, 11, 0xffff][rng.below(7) as usize];
                out.extend(frame(RST_STREAM, 0, id, &code.to_be_bytes()));
                if careful {
                    opened.retain(|o| *o != id);
                    sending.retain(|o| *o != id);
                }
            }
            10 | 11 => {
                let id = if rng.chance(50) {
                    0
                } else {
                    some_stream(rng, &opened).unwrap_or(0)
                };
                let mut inc = [0u32, 1, 65_535, 1 << 20, 0x7fff_ffff][rng.below(5) as usize];
                // A careful client's windows stay within 2^31-1 and never grow by 0 (h2 makes
                // that on a stream a connection error too).
                if careful && (id == 0 || inc == 0 || inc > 1 << 20) {
                    inc = 1 + rng.below(1 << 16) as u32;
                }
                out.extend(frame(WINDOW_UPDATE, 0, id, &inc.to_be_bytes()));
            }
            12 => {
                let Some(id) = some_stream(rng, &opened) else {
                    continue;
                };
                let dep = if rng.chance(20) {
                    id
                } else {
                    rng.below(10) as u32
                };
                let mut p = dep.to_be_bytes().to_vec();
                p.push(rng.next_u64() as u8);
                if !careful && rng.chance(10) {
                    p.pop();
                }
                out.extend(frame(PRIORITY, 0, id, &p));
            }
            13 => {
                if rng.chance(20) {
                    out.extend(frame(SETTINGS, 1, 0, &[]));
                } else {
                    let mut p = Vec::new();
                    for _ in 0..1 + rng.below(3) {
                        let id = 1 + rng.below(8) as u16;
                        let value = match id {
                            // Initial window: sometimes shrinking to 0 or past 2^31-1.
                            4 if careful => [0u32, 1, 65_535, 1 << 24][rng.below(4) as usize],
                            4 => [0u32, 1, 65_535, 1 << 24, 0x8000_0000][rng.below(5) as usize],
                            5 if careful => [16_384u32, 1 << 20][rng.below(2) as usize],
                            5 => [16_384u32, 1 << 20, 100][rng.below(3) as usize],
                            2 | 8 if careful => rng.below(2) as u32,
                            2 | 8 => rng.below(3) as u32,
                            _ => rng.next_u64() as u32,
                        };
                        p.extend_from_slice(&id.to_be_bytes());
                        p.extend_from_slice(&value.to_be_bytes());
                    }
                    out.extend(frame(SETTINGS, 0, 0, &p));
                }
            }
            14 => {
                let len = if careful || rng.chance(90) { 8 } else { 7 };
                let ack = if rng.chance(20) { 1 } else { 0 };
                out.extend(frame(PING, ack, 0, &vec![7u8; len]));
            }
            15 | 16 => {
                let Some(id) = some_stream(rng, if careful { &sending } else { &opened }) else {
                    continue;
                };
                let block = trailers_block(rng);
                out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
                sending.retain(|o| *o != id);
            }
            17 => out.extend(frame(0xfa, rng.next_u64() as u8, 1, b"unknown")),
            18 => {
                let last = some_stream(rng, &opened).unwrap_or(0);
                let mut p = last.to_be_bytes().to_vec();
                p.extend_from_slice(&0u32.to_be_bytes());
                out.extend(frame(GOAWAY, 0, 0, &p));
            }
            _ => {
                // A few loose bytes: from here on the framing is whatever they make it.
                if !careful && rng.chance(20) {
                    out.extend((0..1 + rng.below(12)).map(|_| rng.next_u64() as u8));
                }
            }
        }
    }
    out
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_conversations_leave_nothing_behind() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let b = Backend::start_tolerating_resets([127, 0, 0, 2], "b2");
    let p = start_proxy(ProxyConfig::default(), &[b.addr]).await;
    let legit = Legit::start(p.addr).await;
    let mut stats = (0usize, 0usize);
    let mut next = 0u64;
    while next < CONVERSATIONS {
        let batch: Vec<_> = (next..(next + AT_ONCE as u64).min(CONVERSATIONS))
            .map(|seed| {
                let addr = p.addr;
                tokio::spawn(async move {
                    let mut rng = Rng::new(seed + 1);
                    let bytes = conversation(&mut rng, seed % 2 == 0);
                    let (mut w, reader) = raw_conn(addr, Duration::from_millis(300)).await;
                    // The proxy may close before it read all of it.
                    let _ = w.write_all(&bytes).await;
                    let frames = reader.await.expect("reader");
                    drop(w);
                    let goaway = frames.iter().any(|f| f.0 == GOAWAY);
                    let answered = frames.iter().filter(|f| f.0 == HEADERS).count();
                    (goaway, answered)
                })
            })
            .collect();
        next += AT_ONCE as u64;
        for t in batch {
            let (goaway, answered) = t.await.expect("conversation");
            stats.0 += usize::from(goaway);
            stats.1 += answered;
        }
    }
    let report = legit.stop().await;
    println!(
        "{CONVERSATIONS} conversations: {} ended with GOAWAY, {} responses; the endpoint started {} calls that hang",
        stats.0,
        stats.1,
        b.state.hang_started.lock().expect("lock").len()
    );
    assert_unharmed(&report);
    // Every call that reached the endpoint and waits there is cancelled once its client
    // connection is gone: nothing is left open on the shared upstream connection.
    let settled = timeout(Duration::from_secs(10), async {
        loop {
            let started = b.state.hang_started.lock().expect("lock").len();
            let dropped = b.state.hang_dropped.lock().expect("lock").len();
            if started == dropped && p.proxy.client_connections().0 == 0 {
                return started;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let started = b.state.hang_started.lock().expect("lock").len();
    let dropped = b.state.hang_dropped.lock().expect("lock").len();
    assert!(
        settled.is_ok(),
        "{started} calls started at the endpoint, {dropped} cancelled; {} client connections open",
        p.proxy.client_connections().0
    );
    assert!(
        started > 10,
        "the conversations reached the endpoint: {started}"
    );
    assert!(stats.0 > 10 && stats.1 > 10, "{stats:?}");
    let ep = p.proxy.endpoints(p.addr).destination().stats(b.addr);
    assert!(
        !ep.is_some_and(|s| s.is_ejected()),
        "the endpoint was ejected"
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "something panicked (see above)"
    );
}
