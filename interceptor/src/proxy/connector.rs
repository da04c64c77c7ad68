//! How upstream sockets are opened.
//!
//! The agent opens upstream connections from inside the pod's network namespace, so the proxy
//! never calls `TcpStream::connect` itself: it asks a [`Connector`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpStream;

/// The future a [`Connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'static>>;

/// Opens TCP connections to endpoints. Implementations must be cheap to call concurrently.
pub trait Connector: Send + Sync + 'static {
    /// Connects to `addr`. The proxy applies its own connect timeout around this future.
    fn connect(&self, addr: SocketAddr) -> ConnectFuture;
}

/// Connects from the caller's network namespace, with `TCP_NODELAY` on (small gRPC frames
/// must not wait for Nagle).
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(&self, addr: SocketAddr) -> ConnectFuture {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}
