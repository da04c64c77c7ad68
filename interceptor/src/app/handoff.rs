//! Hitless upgrade: a starting agent takes the pod-local listening sockets of the running one
//! over a unix socket (SCM_RIGHTS), so during a rollout no connect ever finds the listeners
//! closed and falls back to kube-proxy. The sockets stay the same kernel objects: their entries
//! in `icp_listeners` stay valid, and connections queued on them are accepted by whichever
//! agent calls accept first.
//!
//! Protocol, one SOCK_SEQPACKET message each:
//! 1. new -> old: `TAKE1`
//! 2. old -> new: one [`RECORD_LEN`]-byte record per listener (cgroup id, family) carrying
//!    the socket, then `END`
//! 3. new -> old: `READY`, once the new agent accepts on them
//! 4. the old agent stops accepting, sends GOAWAY to its HTTP/2 clients, drains, exits.
//!
//! A crash (SIGKILL) of either side needs nothing from this: the old agent's sockets close with
//! it (fail open), and a new agent that finds no one to take from opens its own listeners.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const TAKE: &[u8] = b"TAKE1";
const END: &[u8] = b"END";
const READY: &[u8] = b"READY";
const MAGIC: &[u8; 4] = b"ICPL";
/// magic, cgroup id (u64 LE), IPv6 flag (u8), padding.
pub const RECORD_LEN: usize = 16;

/// A listening socket received from the previous agent.
#[derive(Debug)]
pub struct HandedListener {
    pub cgroup_id: u64,
    pub v6: bool,
    pub socket: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "handoff socket {path}: the other agent sent {what} (a different interceptor version?)"
    )]
    Protocol { path: PathBuf, what: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> HandoffError + 'a {
    move |source| HandoffError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a unix socket",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn send(fd: BorrowedFd<'_>, data: &[u8], pass: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one descriptor, aligned as cmsghdr wants.
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(pass) = pass {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds one cmsghdr with room for one fd (32 bytes >= space).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), pass);
        }
    }
    // SAFETY: msg is fully initialised above.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One message and the descriptor it carried, if any.
fn recv(fd: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut data = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: msg points at buffers that outlive the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut passed = None;
    // SAFETY: walking the control messages the kernel wrote into cmsg_buf.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                passed = Some(OwnedFd::from_raw_fd(fd));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((data[..n as usize].to_vec(), passed))
}

fn record(cgroup_id: u64, v6: bool) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..4].copy_from_slice(MAGIC);
    r[4..12].copy_from_slice(&cgroup_id.to_le_bytes());
    r[12] = v6 as u8;
    r
}

/// The new agent's side while it takes over: tell the old agent when to stop.
pub struct Taking {
    conn: OwnedFd,
    path: PathBuf,
}

impl Taking {
    /// The new agent accepts on the handed sockets: the old one may stop.
    pub fn ready(self) -> Result<(), HandoffError> {
        send(self.conn.as_fd(), READY, None).map_err(io_err(&self.path, "sending READY"))
    }
}

/// Asks the agent serving `path` for its listeners. `Ok(None)`: nobody serves it (first
/// start, or the previous agent is gone), so the caller opens its own listeners.
pub fn take(path: &Path) -> Result<Option<(Vec<HandedListener>, Taking)>, HandoffError> {
    let conn = seqpacket().map_err(io_err(path, "socket"))?;
    let (addr, len) = sockaddr(path).map_err(io_err(path, "address"))?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let r = unsafe {
        libc::connect(
            conn.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT | libc::ECONNREFUSED) => Ok(None),
            _ => Err(io_err(path, "connecting")(e)),
        };
    }
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the right size.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    send(conn.as_fd(), TAKE, None).map_err(io_err(path, "sending TAKE"))?;
    let mut listeners = Vec::new();
    loop {
        let (data, fd) = recv(conn.as_fd()).map_err(io_err(path, "receiving"))?;
        if data == END {
            break;
        }
        let (Ok(r), Some(socket)) = (<[u8; RECORD_LEN]>::try_from(data.as_slice()), fd) else {
            return Err(HandoffError::Protocol {
                path: path.to_path_buf(),
                what: format!("{} bytes without a socket", data.len()),
            });
        };
        if &r[..4] != MAGIC {
            return Err(HandoffError::Protocol {
                path: path.to_path_buf(),
                what: format!("record {:?}", &r[..4]),
            });
        }
        let cgroup_id = u64::from_le_bytes(r[4..12].try_into().expect("8 bytes"));
        listeners.push(HandedListener {
            cgroup_id,
            v6: r[12] != 0,
            socket,
        });
    }
    Ok(Some((
        listeners,
        Taking {
            conn,
            path: path.to_path_buf(),
        },
    )))
}

/// The serving side: binds the handoff socket (replacing a stale one) for the next agent.
pub struct Offer {
    listener: OwnedFd,
    path: PathBuf,
}

/// A new agent asking for the listeners.
pub struct Request {
    conn: OwnedFd,
    path: PathBuf,
}

impl Offer {
    pub fn bind(path: &Path) -> Result<Self, HandoffError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(path, "creating its directory"))?;
        }
        // A previous agent's socket file: it is not accepting any more (it handed over, or
        // it is gone), and a bound path cannot be bound again.
        let _ = std::fs::remove_file(path);
        let listener = seqpacket().map_err(io_err(path, "socket"))?;
        let (addr, len) = sockaddr(path).map_err(io_err(path, "address"))?;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes; listen on a bound socket.
        unsafe {
            if libc::bind(
                listener.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            ) < 0
            {
                return Err(io_err(path, "binding")(io::Error::last_os_error()));
            }
            if libc::listen(listener.as_raw_fd(), 4) < 0 {
                return Err(io_err(path, "listening")(io::Error::last_os_error()));
            }
        }
        // Only root (the agent) may take the listeners.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (blocking) for the next agent's `TAKE`. Run it on a blocking thread.
    pub fn accept(&self) -> Result<Request, HandoffError> {
        loop {
            // SAFETY: accept4 on our listening socket; the result is checked and owned.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err(&self.path, "accepting")(e));
            }
            // SAFETY: a fresh descriptor we own.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            let (data, _) = recv(conn.as_fd()).map_err(io_err(&self.path, "receiving"))?;
            if data != TAKE {
                tracing::warn!(path = %self.path.display(), "handoff socket: ignoring a peer that did not ask to take over");
                continue;
            }
            return Ok(Request {
                conn,
                path: self.path.clone(),
            });
        }
    }
}

impl Request {
    /// Sends the listening sockets: (pod cgroup id, IPv6, socket) each.
    pub fn send(&self, listeners: &[(u64, bool, BorrowedFd<'_>)]) -> Result<(), HandoffError> {
        for (cgroup_id, v6, fd) in listeners {
            send(
                self.conn.as_fd(),
                &record(*cgroup_id, *v6),
                Some(fd.as_raw_fd()),
            )
            .map_err(io_err(&self.path, "sending a listener"))?;
        }
        send(self.conn.as_fd(), END, None).map_err(io_err(&self.path, "sending END"))
    }

    /// Waits (blocking) until the new agent accepts on the sockets. An error means it died
    /// or gave up: the old agent then keeps serving.
    pub fn wait_ready(&self) -> Result<(), HandoffError> {
        let (data, _) = recv(self.conn.as_fd()).map_err(io_err(&self.path, "waiting for READY"))?;
        if data == READY {
            Ok(())
        } else {
            Err(HandoffError::Protocol {
                path: self.path.clone(),
                what: if data.is_empty() {
                    "nothing (it closed the connection)".into()
                } else {
                    format!("{data:?} instead of READY")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn listeners_cross_with_their_queue_and_the_old_side_hears_ready() {
        let dir = std::env::temp_dir().join(format!("icp-handoff-test-{}", std::process::id()));
        let path = dir.join("handoff.sock");
        assert!(take(&path).expect("no one serves it").is_none());
        let offer = Offer::bind(&path).expect("bind");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp listener");
        let addr = listener.local_addr().expect("addr");
        // A connection queued before the handoff must be accepted after it.
        let mut early = std::net::TcpStream::connect(addr).expect("connect");
        let old = std::thread::spawn(move || {
            let req = offer.accept().expect("TAKE");
            req.send(&[(42, false, listener.as_fd())]).expect("send");
            drop(listener); // the old side closes its copy: the socket lives on
            req.wait_ready()
        });
        let (got, taking) = take(&path).expect("take").expect("someone serves it");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].cgroup_id, got[0].v6), (42, false));
        taking.ready().expect("ready");
        old.join().expect("old side").expect("READY heard");
        let taken = std::net::TcpListener::from(got.into_iter().next().expect("one").socket);
        let (mut conn, _) = taken.accept().expect("the queued connection");
        early.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
        let _ = std::fs::remove_dir_all(dir);
    }
}
