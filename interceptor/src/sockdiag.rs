//! The socket cookie of a TCP socket, found by its addresses with one NETLINK_SOCK_DIAG request
//! (the interface `ss` uses). The agent needs it for redirected IPv6 connections: IPv6 has a
//! single loopback address, so the connect hook records those by the client socket's cookie,
//! and after accept the agent asks the pod's netns which socket is on the other end.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then `struct inet_diag_sockid`
/// (sport, dport, src[16], dst[16], if, cookie[2]).
const REQ_LEN: usize = 56;
/// Offset of `id.idiag_cookie` in `struct inet_diag_msg` (family, state, timer, retrans, id).
const MSG_COOKIE_OFFSET: usize = 4 + 2 + 2 + 16 + 16 + 4;
/// `INET_DIAG_NOCOOKIE`: match any socket with these addresses.
const NO_COOKIE: u32 = !0;
/// A stuck kernel reply must not stall an accept loop for long.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// A NETLINK_SOCK_DIAG socket bound to the netns it was opened in.
pub struct SockDiag {
    // One request in flight at a time: replies are matched by sequence number.
    fd: Mutex<(OwnedFd, u32)>,
}

impl SockDiag {
    /// Opens the socket in the calling thread's current netns (call it inside `Netns::enter`).
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket creation; the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: valid fd and a timeval option value.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd: Mutex::new((fd, 0)),
        })
    }

    /// The cookie of the TCP socket whose own address is `local` and whose peer is `remote`;
    /// `None` when there is no such socket (it is already gone).
    pub fn cookie(&self, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
        let mut guard = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        guard.1 = guard.1.wrapping_add(1);
        let seq = guard.1;
        let fd = guard.0.as_raw_fd();
        let request = request(seq, local, remote);
        // SAFETY: a zeroed sockaddr_nl with the family set addresses the kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd, buffer and address for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                fd,
                request.as_ptr().cast(),
                request.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            match parse_reply(&buf[..n as usize], seq)? {
                Reply::Cookie(c) => return Ok(Some(c)),
                Reply::NotFound => return Ok(None),
                // A late reply to an earlier request that timed out: read on.
                Reply::Stale => continue,
            }
        }
    }
}

fn request(seq: u32, local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
    m.extend_from_slice(&((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    m.push(family as u8);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0); // no extensions
    m.push(0);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // any TCP state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    m.extend_from_slice(&addr_bytes(local));
    m.extend_from_slice(&addr_bytes(remote));
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    m
}

/// `idiag_src`/`idiag_dst`: an IPv4 address fills the first four bytes.
fn addr_bytes(addr: SocketAddr) -> [u8; 16] {
    match addr {
        SocketAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.ip().octets());
            out
        }
        SocketAddr::V6(a) => a.ip().octets(),
    }
}

#[derive(Debug, PartialEq)]
enum Reply {
    Cookie(u64),
    NotFound,
    Stale,
}

fn parse_reply(buf: &[u8], seq: u32) -> io::Result<Reply> {
    let short = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag reply");
    let u32_at = |at: usize| -> io::Result<u32> {
        buf.get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(short)
    };
    let kind = buf
        .get(4..6)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or_else(short)?;
    if u32_at(8)? != seq {
        return Ok(Reply::Stale);
    }
    match kind {
        NLMSG_ERROR => {
            let errno = -(u32_at(NLMSG_HDR_LEN)? as i32);
            if errno == libc::ENOENT {
                Ok(Reply::NotFound)
            } else {
                Err(io::Error::from_raw_os_error(errno))
            }
        }
        SOCK_DIAG_BY_FAMILY => {
            let at = NLMSG_HDR_LEN + MSG_COOKIE_OFFSET;
            let low = u32_at(at)?;
            let high = u32_at(at + 4)?;
            Ok(Reply::Cookie(u64::from(low) | (u64::from(high) << 32)))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag reply type {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let r = request(
            7,
            "[::1]:40000".parse().expect("addr"),
            "[::1]:15001".parse().expect("addr"),
        );
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().expect("4")), 72);
        assert_eq!(r[16], libc::AF_INET6 as u8);
        assert_eq!(
            &r[24..26],
            &40000u16.to_be_bytes(),
            "sport: the socket's own port"
        );
        assert_eq!(&r[26..28], &15001u16.to_be_bytes());
        assert_eq!(r[43], 1, "last byte of ::1 as idiag_src");
    }

    #[test]
    fn replies_are_matched_by_sequence() {
        let mut msg = vec![0u8; NLMSG_HDR_LEN + 72];
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg[8..12].copy_from_slice(&3u32.to_ne_bytes());
        let at = NLMSG_HDR_LEN + MSG_COOKIE_OFFSET;
        msg[at..at + 4].copy_from_slice(&0x0102_0304u32.to_ne_bytes());
        msg[at + 4..at + 8].copy_from_slice(&5u32.to_ne_bytes());
        assert_eq!(
            parse_reply(&msg, 3).expect("reply"),
            Reply::Cookie(0x5_0102_0304)
        );
        assert_eq!(parse_reply(&msg, 4).expect("reply"), Reply::Stale);
        let mut err = vec![0u8; NLMSG_HDR_LEN + 4];
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[NLMSG_HDR_LEN..].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_reply(&err, 0).expect("reply"), Reply::NotFound);
        assert!(parse_reply(&msg[..10], 3).is_err());
    }

    /// The real kernel: the cookie of a connected client socket, found from the server side.
    #[test]
    fn finds_a_connected_socket() {
        let diag = SockDiag::open().expect("sock_diag socket");
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind) else {
                panic!("cannot listen on {bind}: the test needs loopback IPv4 and IPv6");
            };
            let server = listener.local_addr().expect("addr");
            let client = std::net::TcpStream::connect(server).expect("connect");
            let (accepted, peer) = listener.accept().expect("accept");
            let via_server_view = diag
                .cookie(peer, accepted.local_addr().expect("addr"))
                .expect("query");
            assert_eq!(via_server_view, Some(socket_cookie(&client)), "{bind}");
            drop(client);
            let gone: SocketAddr = if server.is_ipv4() {
                "127.0.0.1:1".parse().expect("addr")
            } else {
                "[::1]:1".parse().expect("addr")
            };
            assert_eq!(diag.cookie(gone, server).expect("query"), None);
        }
    }

    fn socket_cookie(s: &impl AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid fd, out pointer and length for SO_COOKIE (a u64).
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }
}
