//! Types and names shared by the kernel programs (`interceptor-ebpf`) and the agent.
//!
//! Everything here is part of the kernel/user ABI: a layout change must bump [`ABI_VERSION`],
//! which moves the pins to a new directory, so an old agent's maps are never misread.
#![no_std]

/// Version of the map layouts below; pins live under `<pin root>/v<ABI_VERSION>/`.
pub const ABI_VERSION: u32 = 3;

/// Kernel-visible names: what `bpftool prog list` / `bpftool map list` show.
/// The eBPF crate repeats them as literals (attribute arguments must be literals); the e2e
/// tests check every one of these exists in the loaded object.
pub mod names {
    pub const PROG_CONNECT4: &str = "icp_connect4";
    pub const PROG_CONNECT6: &str = "icp_connect6";
    pub const PROG_GETPEER4: &str = "icp_getpeer4";
    pub const PROG_GETPEER6: &str = "icp_getpeer6";

    pub const MAP_SERVICES: &str = "icp_services";
    pub const MAP_REDIRECTS: &str = "icp_redirects";
    pub const MAP_V6_DST: &str = "icp_v6_dst";
    pub const MAP_LISTENERS: &str = "icp_listeners";
    pub const MAP_STATS: &str = "icp_stats";

    pub const PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEER4, PROG_GETPEER6];
    /// Maps the agent pins so they outlive an agent restart.
    pub const MAPS: [&str; 5] = [
        MAP_SERVICES,
        MAP_REDIRECTS,
        MAP_V6_DST,
        MAP_LISTENERS,
        MAP_STATS,
    ];

    /// Load-time global: the pod-local listener port the hook redirects to.
    pub const GLOBAL_LISTEN_PORT: &str = "ICP_LISTEN_PORT";
}

/// Map sizes, shared so the agent can validate a reused pin against what it would create.
pub const SERVICES_MAX: u32 = 16_384;
/// Redirect slots: each intercepted Service port owns one loopback address, 127.100.0.0/16.
pub const REDIRECT_SLOTS: u32 = 65_536;
/// Redirected IPv6 client sockets remembered by socket cookie (least recently used evicted).
pub const V6_DST_MAX: u32 = 65_536;
/// Pod-local listening sockets: two per intercepted pod (IPv4 and IPv6).
pub const LISTENERS_MAX: u32 = 16_384;

/// The first two bytes of every redirect address: slot `s` is `127.100.(s >> 8).(s & 255)`.
/// A redirected IPv4 connection carries its Service in the address it reaches the pod-local
/// listener on, so nothing per connection is stored: the connect hook only rewrites the
/// address, and the agent reads the slot from the accepted socket's local address.
pub const REDIRECT_NET: [u8; 2] = [127, 100];

/// The loopback address of redirect slot `slot` (`slot < REDIRECT_SLOTS`).
#[inline(always)]
pub const fn redirect_ip4(slot: u32) -> [u8; 4] {
    [
        REDIRECT_NET[0],
        REDIRECT_NET[1],
        (slot >> 8) as u8,
        slot as u8,
    ]
}

/// The redirect slot a loopback address stands for, if it is one.
#[inline(always)]
pub const fn redirect_slot(ip: [u8; 4]) -> Option<u32> {
    if ip[0] == REDIRECT_NET[0] && ip[1] == REDIRECT_NET[1] {
        Some(((ip[2] as u32) << 8) | ip[3] as u32)
    } else {
        None
    }
}

/// An IPv6 address or an IPv4 address in its v4-mapped form (`::ffff:a.b.c.d`), network
/// byte order. One form for both families keeps every map single-keyed.
pub type Addr16 = [u8; 16];

/// Maps an IPv4 address (network byte order as the four bytes of `ip_be`) to its v4-mapped form.
#[inline(always)]
pub const fn v4_mapped(ip_be: [u8; 4]) -> Addr16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip_be[0], ip_be[1], ip_be[2], ip_be[3],
    ]
}

/// Key of `icp_services`: a Service ClusterIP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr16,
    pub port_be: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    pub const fn new(addr: Addr16, port_be: u16) -> Self {
        Self {
            addr,
            port_be,
            _pad: [0; 2],
        }
    }
}

/// Key of `icp_listeners`: a pod-local listening socket, by the netns it is in and its family.
/// The kernel drops a socket from the map when it closes, so an entry exists exactly while
/// the agent's listener does: what the connect hook checks before it redirects.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// `LISTENER_V4` or `LISTENER_V6`.
    pub family: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);

pub const LISTENER_V4: u32 = 4;
pub const LISTENER_V6: u32 = 6;

/// The service port is intercepted.
pub const SVC_INTERCEPT: u32 = 1;
/// The service port is known but excluded (server-first port, opt-out annotation): counted
/// as `Excluded`, connect left untouched.
pub const SVC_EXCLUDED: u32 = 2;

/// Value of `icp_services`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// One of `SVC_INTERCEPT`, `SVC_EXCLUDED`.
    pub action: u32,
    /// The redirect slot of an intercepted IPv4 Service port; `icp_redirects[slot]` holds the
    /// Service address.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);

/// The destination the application dialled, before the hook rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst {
    pub addr: Addr16,
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// Indexes into the per-CPU `icp_stats` array: one counter per outcome.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect rewritten to the pod-local listener.
    Redirected = 0,
    /// destination is not a known Service ClusterIP:port.
    NoService = 1,
    /// not a TCP socket (UDP, raw, MPTCP...).
    NotTcp = 2,
    /// the Service port is excluded from interception.
    Excluded = 3,
    /// no pod-local listener in the pod's netns (agent down): fail open.
    NoListener = 4,
    /// recording the original destination failed (IPv6), or the service entry is corrupt:
    /// proceed unchanged.
    RecordFailed = 5,
    /// getpeername answered with the original destination.
    PeerRewritten = 6,
}

pub const STAT_COUNT: u32 = 7;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Redirected,
        Stat::NoService,
        Stat::NotTcp,
        Stat::Excluded,
        Stat::NoListener,
        Stat::RecordFailed,
        Stat::PeerRewritten,
    ];

    /// Label used in metrics and `interceptor status`.
    pub const fn label(self) -> &'static str {
        match self {
            Stat::Redirected => "redirected",
            Stat::NoService => "no_service",
            Stat::NotTcp => "not_tcp",
            Stat::Excluded => "excluded",
            Stat::NoListener => "no_listener",
            Stat::RecordFailed => "record_failed",
            Stat::PeerRewritten => "peer_rewritten",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ListenerKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn kernel_names_are_valid() {
        let all: std::vec::Vec<&str> = names::PROGRAMS
            .iter()
            .chain(names::MAPS.iter())
            .copied()
            .collect();
        for name in &all {
            assert!(name.starts_with("icp_"), "{name} must start with icp_");
            assert!(
                name.len() <= 15,
                "{name} is longer than the kernel's 15 bytes"
            );
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name} must use [a-z0-9_]"
            );
        }
        let unique: std::collections::BTreeSet<&&str> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "kernel names must be unique");
    }

    #[test]
    fn stat_indexes_are_dense() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?} out of order");
        }
        let labels: std::collections::BTreeSet<&str> =
            Stat::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(labels.len(), STAT_COUNT as usize);
    }

    #[test]
    fn redirect_addresses_round_trip() {
        for slot in [0, 1, 255, 256, 4097, REDIRECT_SLOTS - 1] {
            assert_eq!(redirect_slot(redirect_ip4(slot)), Some(slot));
        }
        assert_eq!(redirect_ip4(0x0102), [127, 100, 1, 2]);
        assert_eq!(redirect_slot([127, 0, 0, 1]), None);
        assert_eq!(redirect_slot([10, 100, 0, 1]), None);
    }

    #[test]
    fn v4_mapped_form() {
        assert_eq!(v4_mapped([10, 96, 0, 1])[10..], [0xff, 0xff, 10, 96, 0, 1]);
    }
}
