//! interceptor's kernel half: cgroup hooks that redirect a pod's TCP connects aimed at a
//! Service ClusterIP:port to the agent's pod-local listener, and remember where they were going.
//!
//! Every path ends in a deliberate verdict. For interception that verdict is always "let the
//! syscall proceed" (return 1): at worst unchanged, so kube-proxy routes it as before. Each
//! outcome is counted in `icp_stats`.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::{bpf_get_netns_cookie, bpf_sk_lookup_tcp, bpf_sk_release, bpf_sk_storage_get},
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext, Global,
};
use aya_log_ebpf::debug;
use interceptor_common::{
    v4_mapped, Addr16, OrigDst, ServiceKey, ServiceValue, SockKey, Stat, ORIG_DST_MAX,
    SERVICES_MAX, STAT_COUNT, SVC_INTERCEPT,
};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the netns of the program's context (the pod's).
const CURRENT_NETNS: u64 = u64::MAX;
const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK6: Addr16 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Port of the pod-local listener, set by the agent at load time (verifier sees a constant).
#[unsafe(no_mangle)]
static ICP_LISTEN_PORT: Global<u16> = Global::new(15001);

/// Service ClusterIP:port -> what to do with connects to it.
#[btf_map(name = "icp_services")]
static SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX as usize }> = HashMap::new();

/// Per-socket storage of a redirected client socket: the destination it dialled. Read by
/// sock_ops (re-keying) and getpeername (so the app sees the ClusterIP). It lives and dies
/// with the socket: no eviction, no clean-up, no shared hash to insert into per connect.
#[btf_map(name = "icp_sock_dst")]
static SOCK_DST: SkStorage<OrigDst> = SkStorage::new();

/// (pod netns cookie, client addr, client port) -> the destination it dialled; what the
/// agent looks up after accept on the pod-local listener.
#[btf_map(name = "icp_orig_dst")]
static ORIG_DST: LruHashMap<SockKey, OrigDst, { ORIG_DST_MAX as usize }> = LruHashMap::new();

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

/// Whether the agent's pod-local listener exists in the current (pod) netns. No listener means
/// the agent is down or has not reached this pod yet: the caller fails open.
#[inline(always)]
fn listener_present(ctx: &SockAddrContext, v6: bool, port_be: u16) -> bool {
    // SAFETY: a zeroed tuple is a valid (empty) lookup key.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6 {
        // SAFETY: writing plain fields of a union member.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = words_of(&LOOPBACK6);
            t.daddr = words_of(&LOOPBACK6);
            t.dport = port_be;
        }
        core::mem::size_of::<[u32; 8]>() + 4
    } else {
        // SAFETY: as above.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes(LOOPBACK4);
            t.daddr = u32::from_ne_bytes(LOOPBACK4);
            t.dport = port_be;
        }
        12
    };
    // SAFETY: tuple outlives the call; size matches the member filled in.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size as u32, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: sk came from bpf_sk_lookup_tcp and is released exactly once.
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    true
}

/// The shared decision for connect4/connect6: `addr` is the dialled address in v4-mapped or
/// IPv6 form. On `Redirected` the caller rewrites the socket address.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    sa: &bpf_sock_addr,
    addr: Addr16,
    port_be: u16,
    v6_listener: bool,
) -> Stat {
    if sa.protocol != IPPROTO_TCP {
        return Stat::NotTcp;
    }
    // SAFETY: the value is copied out before any other map operation.
    let action = match unsafe { SERVICES.get(ServiceKey::new(addr, port_be)) } {
        None => return Stat::NoService,
        Some(v) => v.action,
    };
    if action != SVC_INTERCEPT {
        return Stat::Excluded;
    }
    if !listener_present(ctx, v6_listener, ICP_LISTEN_PORT.load().to_be()) {
        return Stat::NoListener;
    }
    let mut dst = OrigDst {
        addr,
        port_be,
        _pad: [0; 6],
    };
    // SAFETY: ctx is the program's context; the helper copies `dst` into new storage.
    let slot = unsafe { SOCK_DST.get_or_insert_ptr_mut(ctx, Some(&mut dst)) };
    if slot.is_null() {
        return Stat::RecordFailed;
    }
    // SAFETY: this socket's storage; an earlier connect of the same socket may have left a
    // value, so write ours.
    unsafe { *slot = dst };
    Stat::Redirected
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
    let stat = decide(ctx, sa, addr, port_be, false);
    if stat == Stat::Redirected {
        sa.user_ip4 = u32::from_ne_bytes(LOOPBACK4);
        sa.user_port = u32::from(ICP_LISTEN_PORT.load().to_be());
    }
    stat
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
    // A v4-mapped destination on an AF_INET6 socket travels as IPv4: redirect it to the v4
    // listener at ::ffff:127.0.0.1.
    let mapped = is_v4_mapped(&addr);
    let stat = decide(ctx, sa, addr, port_be, !mapped);
    if stat == Stat::Redirected {
        let target = if mapped {
            v4_mapped(LOOPBACK4)
        } else {
            LOOPBACK6
        };
        let w = words_of(&target);
        // The verifier only allows 4-byte stores into user_ip6.
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
        sa.user_port = u32::from(ICP_LISTEN_PORT.load().to_be());
    }
    stat
}

#[sock_ops]
pub fn icp_sockops(ctx: SockOpsContext) -> u32 {
    if let Some(stat) = try_sockops(&ctx) {
        count(stat);
        debug!(&ctx, "icp_sockops verdict={}", stat as u32);
    }
    1
}

/// Once the redirected connection is established its client port exists: re-key the
/// original destination by (netns cookie, client addr, client port), which is what the agent
/// can see from the accepted socket.
fn try_sockops(ctx: &SockOpsContext) -> Option<Stat> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return None;
    }
    // SAFETY: ops is the program's valid context.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // The map's address is what the loader relocates into a map reference.
    let map = core::ptr::from_ref(&SOCK_DST).cast_mut().cast::<c_void>();
    // SAFETY: sk is a non-null socket from the context; without the create flag no value is read.
    let slot =
        unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast::<OrigDst>();
    if slot.is_null() {
        return None;
    }
    // SAFETY: this socket's storage, copied out at once.
    let dst = unsafe { *slot };
    // SAFETY: ctx is the program's context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Volatile loads at fixed offsets: the verifier rejects a context load whose offset is
    // computed, which is what the compiler makes of "local_ip4 or local_ip6".
    let ops = ctx.ops;
    // SAFETY: ops is the program's valid context; each read is of one context field.
    let (family, local_ip4, local_ip6, local_port) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let addr = if family == AF_INET {
        v4_mapped(local_ip4.to_ne_bytes())
    } else {
        addr6_of(local_ip6)
    };
    // local_port is in host byte order (unlike remote_port).
    let port_be = (local_port as u16).to_be();
    let key = SockKey {
        netns_cookie,
        addr,
        port_be,
        _pad: [0; 6],
    };
    Some(match ORIG_DST.insert(key, dst, 0) {
        Ok(()) => Stat::Rekeyed,
        Err(_) => Stat::RekeyFailed,
    })
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

/// The original destination of a redirected socket whose peer is the pod-local listener.
#[inline(always)]
fn redirected_dst(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<OrigDst> {
    if sa.user_port as u16 != ICP_LISTEN_PORT.load().to_be() {
        return None;
    }
    // SAFETY: ctx is the program's context; without the create flag nothing is allocated.
    let slot = unsafe { SOCK_DST.get_ptr_mut(ctx) };
    if slot.is_null() {
        return None;
    }
    // SAFETY: this socket's storage, copied out at once.
    Some(unsafe { *slot })
}

// A redirected socket's peer is the pod-local listener; answer with the address the app
// dialled instead, so its logs and checks see the ClusterIP:port. The v4 and v6 variants are
// separate functions: the verifier rejects a context store whose offset is computed, which is
// what the compiler makes of one function writing either field.

fn try_getpeer4(ctx: &SockAddrContext) -> Option<Stat> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = redirected_dst(ctx, sa)?;
    if !is_v4_mapped(&dst.addr) {
        return None;
    }
    sa.user_ip4 = u32::from_ne_bytes([dst.addr[12], dst.addr[13], dst.addr[14], dst.addr[15]]);
    sa.user_port = u32::from(dst.port_be);
    Some(Stat::PeerRewritten)
}

fn try_getpeer6(ctx: &SockAddrContext) -> Option<Stat> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = redirected_dst(ctx, sa)?;
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
