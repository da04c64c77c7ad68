//! HTTP/2 and gRPC header rules the demultiplexer applies.

use std::time::Duration;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{Response, StatusCode};

pub const GRPC_STATUS: &str = "grpc-status";
pub const GRPC_MESSAGE: &str = "grpc-message";
pub const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// gRPC status codes the proxy itself produces.
pub const UNAVAILABLE: u32 = 14;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const INTERNAL: u32 = 13;

/// True for gRPC requests (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
}

/// `is_grpc` on a content-type value.
pub fn is_grpc_content_type(v: &[u8]) -> bool {
    v.starts_with(b"application/grpc")
}

/// Removes connection-specific headers, which HTTP/2 forbids (RFC 9113 8.2.2). `te: trailers`
/// is the one allowed value and gRPC needs it, so it stays.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(n);
    }
    for n in ["keep-alive", "proxy-connection"] {
        headers.remove(n);
    }
    if headers
        .get(TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(TE);
    }
}

/// Parses `grpc-timeout` (`1*8DIGIT unit`, unit one of H M S m u n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get("grpc-timeout")?.as_bytes())
}

/// `grpc_timeout` on the header's value.
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-timeout` for `d`: milliseconds while they fit the 8 digits gRPC allows, else
/// seconds, else hours (round down, so the endpoint's deadline is never later than ours).
pub fn encode_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ms = d.as_millis();
    let text = if ms <= MAX {
        format!("{}m", ms.max(1))
    } else if d.as_secs() as u128 <= MAX {
        format!("{}S", d.as_secs())
    } else {
        format!("{}H", (d.as_secs() / 3600).min(MAX as u64))
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("1m"))
}

/// A response the proxy answers by itself: trailers-only gRPC (HTTP 200 with grpc-status) for
/// gRPC requests, a bare HTTP status otherwise. Sent with END_STREAM on the headers.
pub fn local_response(
    grpc: bool,
    grpc_code: u32,
    http_status: StatusCode,
    message: &str,
) -> Response<()> {
    let mut resp = Response::new(());
    if grpc {
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(GRPC_STATUS, HeaderValue::from(grpc_code));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert(GRPC_MESSAGE, v);
        }
    } else {
        *resp.status_mut() = http_status;
    }
    resp
}

/// Trailers carrying a gRPC status, for a stream whose response headers were already sent.
pub fn status_trailers(code: u32, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    h
}

// grpc-message is percent-encoded (gRPC over HTTP/2 spec); our own messages are ASCII, so
// only the reserved bytes need care.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("250m"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", HeaderValue::from_static("2S"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", HeaderValue::from_static("123456789S"));
        assert_eq!(grpc_timeout(&h), None);
        h.insert("grpc-timeout", HeaderValue::from_static("5x"));
        assert_eq!(grpc_timeout(&h), None);
    }

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-foo"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("1"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("x-foo").is_none()
                && h.get(CONNECTION).is_none()
                && h.get("keep-alive").is_none()
        );
        assert_eq!(h.get(TE).map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-keep").is_some());
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    #[test]
    fn grpc_timeout_round_trips_and_rounds_down() {
        for (d, text) in [
            (Duration::from_millis(250), "250m"),
            (Duration::from_micros(1500), "1m"),
            (Duration::from_micros(10), "1m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(100_000_000 * 3600), "99999999H"),
        ] {
            assert_eq!(encode_grpc_timeout(d), text, "{d:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            "grpc-timeout",
            encode_grpc_timeout(Duration::from_millis(1234)),
        );
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(1234)));
    }
}

/// `grpc-retry-pushback-ms` (in trailers, or the headers of a trailers-only response): how
/// long the endpoint asks not to be sent more. A negative or malformed value means "do not
/// retry" to a client, and nothing to the balancer.
pub fn retry_pushback(v: &HeaderValue) -> Option<Duration> {
    parse_retry_pushback(v.as_bytes())
}

/// `retry_pushback` on the header's value.
pub fn parse_retry_pushback(v: &[u8]) -> Option<Duration> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
}
