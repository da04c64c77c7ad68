//! interceptor's kernel half: cgroup hooks that redirect a pod's TCP connects aimed at a
//! Service ClusterIP:port to the agent's pod-local listener, in a way the agent can tell where
//! they were going (IPv4: the redirect address names the Service; IPv6: by socket cookie).
//!
//! Every path ends in a deliberate verdict. For interception that verdict is always "let the
//! syscall proceed" (return 1): at worst unchanged, so kube-proxy routes it as before. Each
//! outcome is counted in `icp_stats`.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SOCKHASH, bpf_sock_addr},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
    EbpfContext, Global,
};
use aya_log_ebpf::debug;
use interceptor_common::{
    redirect_ip4, redirect_slot, v4_mapped, Addr16, ListenerKey, OrigDst, ServiceKey, ServiceValue,
    Stat, LISTENERS_MAX, LISTENER_V4, LISTENER_V6, REDIRECT_SLOTS, SERVICES_MAX, STAT_COUNT,
    SVC_INTERCEPT, V6_DST_MAX,
};

const IPPROTO_TCP: u32 = 6;
const LOOPBACK6: Addr16 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Port of the pod-local listener, set by the agent at load time (verifier sees a constant).
#[unsafe(no_mangle)]
static ICP_LISTEN_PORT: Global<u16> = Global::new(15001);

/// Service ClusterIP:port -> what to do with connects to it (and its redirect slot).
#[btf_map(name = "icp_services")]
static SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX as usize }> = HashMap::new();

/// Redirect slot -> the Service address it stands for. An IPv4 connect is redirected to
/// 127.100.x.y (the slot's address), which the agent and getpeername turn back into the
/// Service: nothing is stored per connection, so the connect path stays a lookup and a rewrite.
#[btf_map(name = "icp_redirects")]
static REDIRECTS: Array<OrigDst, { REDIRECT_SLOTS as usize }> = Array::new();

/// Socket cookie of a redirected IPv6 client socket -> the destination it dialled. IPv6 has
/// one loopback address, so the destination cannot travel in the address: the agent finds the
/// client socket's cookie with NETLINK_SOCK_DIAG after accept.
#[btf_map(name = "icp_v6_dst")]
static V6_DST: LruHashMap<u64, OrigDst, { V6_DST_MAX as usize }> = LruHashMap::new();

/// A BTF sockhash whose value is 8 bytes: the kernel answers a userspace read of such a map
/// with the socket's cookie (and refuses it for aya's 4-byte `SockHash`), so `bpftool map dump`
/// shows every entry. The fields only describe the map to the loader (libbpf's convention).
#[repr(C)]
struct ListenerMap {
    r#type: *const [i32; BPF_MAP_TYPE_SOCKHASH as usize],
    key: *const ListenerKey,
    value: *const u64,
    max_entries: *const [i32; LISTENERS_MAX as usize],
    map_flags: *const [i32; 0],
}

// SAFETY: never dereferenced; the loader replaces the static with a map reference.
unsafe impl Sync for ListenerMap {}

/// The agent's pod-local listening sockets, by (pod netns cookie, family). The kernel removes a
/// socket when it closes, so when the agent dies its entries go with its listeners.
#[btf_map(name = "icp_listeners")]
static LISTENERS: ListenerMap = ListenerMap {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// Per-CPU counters, one per `Stat`.
#[btf_map(name = "icp_stats")]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn addr6_of(words: [u32; 4]) -> Addr16 {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn words_of(addr: &Addr16) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

#[inline(always)]
fn is_v4_mapped(addr: &Addr16) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

#[inline(always)]
fn v4_of_mapped(addr: &Addr16) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// Whether the agent's pod-local listener exists in the current (pod) netns. No listener means
/// the agent is down or has not reached this pod yet: the caller fails open.
#[inline(always)]
fn listener_present(ctx: &SockAddrContext, v6: bool) -> bool {
    let key = ListenerKey {
        // SAFETY: ctx is the program's context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        family: if v6 { LISTENER_V6 } else { LISTENER_V4 },
        _pad: 0,
    };
    // The map's address is what the loader relocates into a map reference.
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    // SAFETY: key outlives the call; a sockhash lookup returns a socket or null.
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&key).cast()) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket from a sockhash lookup is released exactly once.
    unsafe { bpf_sk_release(sk) };
    true
}

/// Where a redirected connect goes instead.
enum Verdict {
    /// Leave the connect alone; the reason is counted.
    Pass(Stat),
    /// Rewrite to the IPv4 address of this redirect slot (also for v4-mapped IPv6 sockets).
    Slot(u32),
    /// Rewrite to [::1] (native IPv6; the destination was recorded by socket cookie).
    Loopback6,
}

/// The shared decision for connect4/connect6: `addr` is the dialled address in v4-mapped or
/// IPv6 form.
#[inline(always)]
fn decide(ctx: &SockAddrContext, sa: &bpf_sock_addr, addr: Addr16, port_be: u16) -> Verdict {
    if sa.protocol != IPPROTO_TCP {
        return Verdict::Pass(Stat::NotTcp);
    }
    // SAFETY: the value is copied out before any other map operation.
    let value = match unsafe { SERVICES.get(ServiceKey::new(addr, port_be)) } {
        None => return Verdict::Pass(Stat::NoService),
        Some(v) => *v,
    };
    if value.action != SVC_INTERCEPT {
        return Verdict::Pass(Stat::Excluded);
    }
    let v4 = is_v4_mapped(&addr);
    if !listener_present(ctx, !v4) {
        return Verdict::Pass(Stat::NoListener);
    }
    if v4 {
        if value.slot >= REDIRECT_SLOTS {
            return Verdict::Pass(Stat::RecordFailed);
        }
        return Verdict::Slot(value.slot);
    }
    let dst = OrigDst {
        addr,
        port_be,
        _pad: [0; 6],
    };
    // SAFETY: ctx is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match V6_DST.insert(cookie, dst, 0) {
        Ok(()) => Verdict::Loopback6,
        Err(_) => Verdict::Pass(Stat::RecordFailed),
    }
}

#[cgroup_sock_addr(connect4)]
pub fn icp_connect4(ctx: SockAddrContext) -> i32 {
    let stat = try_connect4(&ctx);
    count(stat);
    debug!(&ctx, "icp_connect4 verdict={}", stat as u32);
    1
}

fn try_connect4(ctx: &SockAddrContext) -> Stat {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // user_ip4/user_port hold network byte order in their first bytes in memory.
    let addr = v4_mapped(sa.user_ip4.to_ne_bytes());
    let port_be = sa.user_port as u16;
    match decide(ctx, sa, addr, port_be) {
        Verdict::Pass(stat) => stat,
        Verdict::Slot(slot) => {
            sa.user_ip4 = u32::from_ne_bytes(redirect_ip4(slot));
            sa.user_port = u32::from(ICP_LISTEN_PORT.load().to_be());
            Stat::Redirected
        }
        // An AF_INET socket only dials IPv4 addresses.
        Verdict::Loopback6 => Stat::RecordFailed,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn icp_connect6(ctx: SockAddrContext) -> i32 {
    let stat = try_connect6(&ctx);
    count(stat);
    debug!(&ctx, "icp_connect6 verdict={}", stat as u32);
    1
}

fn try_connect6(ctx: &SockAddrContext) -> Stat {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr = addr6_of(sa.user_ip6);
    let port_be = sa.user_port as u16;
    // A v4-mapped destination on an AF_INET6 socket travels as IPv4: it goes to the slot's
    // address in v4-mapped form, like an IPv4 connect.
    let target = match decide(ctx, sa, addr, port_be) {
        Verdict::Pass(stat) => return stat,
        Verdict::Slot(slot) => v4_mapped(redirect_ip4(slot)),
        Verdict::Loopback6 => LOOPBACK6,
    };
    let w = words_of(&target);
    // The verifier only allows 4-byte stores into user_ip6.
    sa.user_ip6[0] = w[0];
    sa.user_ip6[1] = w[1];
    sa.user_ip6[2] = w[2];
    sa.user_ip6[3] = w[3];
    sa.user_port = u32::from(ICP_LISTEN_PORT.load().to_be());
    Stat::Redirected
}

#[cgroup_sock_addr(getpeername4)]
pub fn icp_getpeer4(ctx: SockAddrContext) -> i32 {
    if let Some(stat) = try_getpeer4(&ctx) {
        count(stat);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn icp_getpeer6(ctx: SockAddrContext) -> i32 {
    if let Some(stat) = try_getpeer6(&ctx) {
        count(stat);
    }
    1
}

/// The Service behind a redirect address, if `ip` is one.
#[inline(always)]
fn slot_dst(ip: [u8; 4]) -> Option<OrigDst> {
    let slot = redirect_slot(ip)?;
    // SAFETY: copied out at once.
    REDIRECTS.get(slot).copied()
}

// A redirected socket's peer is the pod-local listener; answer with the address the app
// dialled instead, so its logs and checks see the ClusterIP:port. The v4 and v6 variants are
// separate functions: the verifier rejects a context store whose offset is computed, which is
// what the compiler makes of one function writing either field.

fn try_getpeer4(ctx: &SockAddrContext) -> Option<Stat> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_port as u16 != ICP_LISTEN_PORT.load().to_be() {
        return None;
    }
    let dst = slot_dst(sa.user_ip4.to_ne_bytes())?;
    if !is_v4_mapped(&dst.addr) {
        return None;
    }
    sa.user_ip4 = u32::from_ne_bytes(v4_of_mapped(&dst.addr));
    sa.user_port = u32::from(dst.port_be);
    Some(Stat::PeerRewritten)
}

fn try_getpeer6(ctx: &SockAddrContext) -> Option<Stat> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_port as u16 != ICP_LISTEN_PORT.load().to_be() {
        return None;
    }
    let peer = addr6_of(sa.user_ip6);
    let dst = if is_v4_mapped(&peer) {
        slot_dst(v4_of_mapped(&peer))?
    } else if peer == LOOPBACK6 {
        // SAFETY: ctx is the program's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: copied out at once.
        unsafe { V6_DST.get(cookie) }.copied()?
    } else {
        return None;
    };
    let w = words_of(&dst.addr);
    sa.user_ip6[0] = w[0];
    sa.user_ip6[1] = w[1];
    sa.user_ip6[2] = w[2];
    sa.user_ip6[3] = w[3];
    sa.user_port = u32::from(dst.port_be);
    Some(Stat::PeerRewritten)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
