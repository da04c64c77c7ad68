//! The pod-local listener: opened inside a pod's network namespace at the port the connect hook
//! redirects to. Each accepted connection is matched with the destination the app dialled and
//! handed on.
//!
//! Two sockets per pod, both on that port:
//! - 0.0.0.0 bound to `lo`: receives redirected IPv4 connects, which arrive on 127.100.x.y (the
//!   Service's redirect address); bound to the loopback device, so nothing outside the pod
//!   can reach it on the pod IP;
//! - [::1]: receives redirected IPv6 connects.
//!
//! Each is registered with the datapath (`register`), which is what the connect hook checks
//! before it redirects: the kernel forgets a socket when it closes, so a dead agent fails open.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::netns::{netns_cookie, Netns};
use crate::sockdiag::SockDiag;

use super::limit::RateLimit;

/// Backlog of each pod-local listener: bursts of connects from one pod queue here.
const BACKLOG: i32 = 1024;

/// A pod the agent intercepts, as the data path needs it.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`, for logs and metrics.
    pub name: String,
    pub netns: Netns,
}

/// The two ends of an accepted connection, and how to look its client socket up.
pub struct ConnEnds<'a> {
    /// Where the connection arrived (a redirect address, or [::1]).
    pub local: SocketAddr,
    /// The client socket's address in the pod.
    pub peer: SocketAddr,
    /// The pod netns' sock_diag socket (only with the IPv6 listener).
    pub diag: Option<&'a SockDiag>,
}

/// Resolves an accepted connection to the destination its client dialled.
pub trait OrigDstResolver: Send + Sync + 'static {
    /// `None`: the connection was not redirected by the hook (someone dialled the listener
    /// directly); it is closed.
    fn resolve(&self, conn: &ConnEnds<'_>) -> io::Result<Option<SocketAddr>>;
}

/// A connection accepted on a pod-local listener.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The Service ClusterIP:port the app dialled.
    pub orig_dst: SocketAddr,
    pub pod: Arc<PodContext>,
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// What to do with each accepted connection (relay, demultiplex, ...).
pub type Handler = Arc<dyn Fn(Accepted) -> BoxFuture + Send + Sync>;
/// Registers a listening socket with the datapath: (pod netns cookie, is IPv6, socket).
pub type Register<'a> = &'a mut dyn FnMut(u64, bool, BorrowedFd<'_>) -> io::Result<()>;

/// The listeners of one pod; dropping it closes them (the hook then fails open for new
/// connects from this pod) and ends the accept loops.
pub struct PodListener {
    tasks: JoinSet<()>,
    /// Duplicates of the listening sockets (IPv6?, socket), to hand to a new agent.
    sockets: Vec<(bool, std::os::fd::OwnedFd)>,
}

impl PodListener {
    /// Opens the listeners inside the pod's netns, registers them, and starts accepting. Must
    /// run inside a tokio runtime.
    pub fn open(
        pod: Arc<PodContext>,
        port: u16,
        resolver: Arc<dyn OrigDstResolver>,
        handler: Handler,
        register: Register<'_>,
    ) -> io::Result<Self> {
        let (v4, v6) = pod.netns.enter(|| {
            let v4 = listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), true);
            let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), false)
                .and_then(|socket| Ok((socket, SockDiag::open()?)));
            (v4, v6)
        })?;
        let v4 = v4.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "listening on 0.0.0.0:{port} (device lo) in {}: {e}",
                    pod.name
                ),
            )
        })?;
        Self::start(
            pod,
            port,
            v4,
            v6,
            resolver,
            handler,
            register,
            "pod-local listener open",
        )
    }

    /// Serves listening sockets a previous agent handed over (see `app::handoff`): the same
    /// kernel sockets, so connects never find the pod without a listener. `v6` is absent for
    /// a pod without IPv6.
    pub fn adopt(
        pod: Arc<PodContext>,
        port: u16,
        v4: std::os::fd::OwnedFd,
        v6: Option<std::os::fd::OwnedFd>,
        resolver: Arc<dyn OrigDstResolver>,
        handler: Handler,
        register: Register<'_>,
    ) -> io::Result<Self> {
        let v6 = match v6 {
            Some(fd) => Ok((Socket::from(fd), pod.netns.enter(SockDiag::open)??)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no IPv6 listener was handed over",
            )),
        };
        Self::start(
            pod,
            port,
            Socket::from(v4),
            v6,
            resolver,
            handler,
            register,
            "pod-local listener taken over from the previous agent",
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        pod: Arc<PodContext>,
        port: u16,
        v4: Socket,
        v6: io::Result<(Socket, SockDiag)>,
        resolver: Arc<dyn OrigDstResolver>,
        handler: Handler,
        register: Register<'_>,
        what: &'static str,
    ) -> io::Result<Self> {
        let cookie = netns_cookie(&v4)?;
        register(cookie, false, v4.as_fd())?;
        let mut sockets = vec![(v4, None)];
        match v6 {
            Ok((socket, diag)) => {
                register(cookie, true, socket.as_fd())?;
                sockets.push((socket, Some(Arc::new(diag))));
            }
            // A pod without IPv6 (no ::1) simply gets no IPv6 interception.
            Err(e) => tracing::debug!(pod = %pod.name, error = %e, "no IPv6 pod-local listener"),
        }
        let mut tasks = JoinSet::new();
        let mut kept = Vec::new();
        for (socket, diag) in sockets {
            kept.push((
                diag.is_some(),
                std::os::fd::OwnedFd::from(socket.try_clone()?),
            ));
            socket.set_nonblocking(true)?;
            let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
            tasks.spawn(accept_loop(
                listener,
                diag,
                pod.clone(),
                resolver.clone(),
                handler.clone(),
            ));
        }
        tracing::info!(pod = %pod.name, netns_cookie = cookie, port, "{what}");
        Ok(Self {
            tasks,
            sockets: kept,
        })
    }

    /// The listening sockets, (IPv6?, socket), for a handoff to a new agent.
    pub fn sockets(&self) -> impl Iterator<Item = (bool, BorrowedFd<'_>)> {
        self.sockets.iter().map(|(v6, fd)| (*v6, fd.as_fd()))
    }

    /// Stops accepting; connections already handed on continue.
    pub fn close(mut self) {
        self.tasks.abort_all();
    }
}

/// A listening socket at `addr`; `loopback_only` binds it to the `lo` device.
fn listen(addr: SocketAddr, loopback_only: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if loopback_only {
        socket.bind_device(Some(b"lo"))?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

async fn accept_loop(
    listener: TcpListener,
    diag: Option<Arc<SockDiag>>,
    pod: Arc<PodContext>,
    resolver: Arc<dyn OrigDstResolver>,
    handler: Handler,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the hook keeps working.
                tracing::warn!(pod = %pod.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ends = stream.local_addr().map(|local| ConnEnds {
            local,
            peer,
            diag: diag.as_deref(),
        });
        match ends.and_then(|ends| resolver.resolve(&ends)) {
            Ok(Some(orig_dst)) => {
                let _ = stream.set_nodelay(true);
                tracing::debug!(pod = %pod.name, %peer, %orig_dst, "accepted redirected connection");
                let (pod, handler) = (pod.clone(), handler.clone());
                let served = super::workers::spawn_connection(stream, move |stream| {
                    handler(Accepted {
                        stream,
                        peer,
                        orig_dst,
                        pod,
                    })
                });
                if let Err(error) = served {
                    tracing::warn!(%peer, %error, "could not hand a connection to a worker");
                }
            }
            Ok(None) => {
                metrics::counter!("interceptor_listener_unresolved_total").increment(1);
                if let Some(suppressed) = UNRESOLVED_WARNINGS.allow() {
                    tracing::warn!(pod = %pod.name, %peer, suppressed, "connection without an original destination (dialled the listener directly?): closed");
                }
            }
            Err(e) => {
                metrics::counter!("interceptor_listener_unresolved_total").increment(1);
                if let Some(suppressed) = UNRESOLVED_WARNINGS.allow() {
                    tracing::warn!(pod = %pod.name, %peer, error = %e, suppressed, "original destination lookup failed: closed");
                }
            }
        }
    }
}

/// At most one warning per interval for connections the listener cannot place: a client
/// dialling the listener in a loop must not flood the log (the metric counts every one).
static UNRESOLVED_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Opens a TCP connection from inside the pod's netns, so the backend sees the pod's IP and
/// NetworkPolicy applies as if the app had connected itself.
pub async fn connect_from_pod(netns: &Netns, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns.enter(|| Socket::new(Domain::for_address(addr), Type::STREAM, None))??;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(addr).await
}

/// Opens the demultiplexer's upstream connections from inside one pod's netns.
pub struct PodConnector(pub Arc<PodContext>);

impl super::connector::Connector for PodConnector {
    fn connect(&self, addr: SocketAddr) -> super::connector::ConnectFuture {
        let pod = self.0.clone();
        Box::pin(async move { connect_from_pod(&pod.netns, addr).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_one_per_interval_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_millis(50));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.allow(), Some(2));
    }
}
