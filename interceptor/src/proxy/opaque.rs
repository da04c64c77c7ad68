//! Opaque TCP relay for everything that is not HTTP/2 prior knowledge.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::endpoints::Destination;
use super::metrics as m;
use super::server::Inner;

/// Relays `client` to one endpoint, byte for byte, after writing `prefix` (bytes already read
/// by detection). Each direction's EOF is passed on as a half-close, so request/response
/// protocols that shut down their write side keep working.
pub(crate) async fn relay(
    inner: &Inner,
    dest: &Destination,
    mut client: TcpStream,
    prefix: BytesMut,
) {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let (mut upstream, in_flight) = loop {
        let Some(ep) = dest.pick(&tried) else {
            m::opaque("no_endpoint");
            m::unavailable("no_endpoint");
            tracing::warn!(dest = %dest.addr(), tried = tried.len(), "no usable endpoint for an opaque connection; closing it");
            return;
        };
        let in_flight = ep.start();
        let connect = inner.connector.connect(ep.addr());
        match tokio::time::timeout(inner.config.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                ep.record_success();
                break (s, in_flight);
            }
            Ok(Err(error)) => {
                tracing::debug!(endpoint = %ep.addr(), %error, "opaque connect failed; trying another endpoint");
            }
            Err(_) => {
                tracing::debug!(endpoint = %ep.addr(), "opaque connect timed out; trying another endpoint");
            }
        }
        m::connect_failure(&ep.label());
        ep.record_failure(&inner.eject_policy());
        tried.push(ep.addr());
        if tried.len() >= inner.config.max_attempts {
            m::opaque("connect_failed");
            return;
        }
    };
    if !prefix.is_empty() {
        if let Err(error) = upstream.write_all(&prefix).await {
            tracing::debug!(%error, "writing detected bytes to the endpoint failed");
            m::opaque("upstream_error");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            m::opaque("closed");
            tracing::debug!(endpoint = %in_flight.stats().addr(), bytes_up = up + prefix.len() as u64, bytes_down = down, "opaque relay finished");
        }
        Err(error) => {
            m::opaque("reset");
            tracing::debug!(endpoint = %in_flight.stats().addr(), %error, "opaque relay ended with an error");
        }
    }
}
