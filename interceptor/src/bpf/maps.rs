//! Typed access to the maps: service entries and their redirect slots (written by the agent),
//! original destinations (read by the proxy after accept) and the per-CPU counters.

use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::Ebpf;
use interceptor_common::{
    names, v4_mapped, Addr16, ListenerKey, OrigDst, ServiceKey, ServiceValue, Stat, LISTENER_V4,
    LISTENER_V6, REDIRECT_SLOTS, SVC_EXCLUDED, SVC_INTERCEPT,
};

use super::pins::PinLayout;
use super::BpfError;

/// What the connect hook does with a Service ClusterIP:port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceAction {
    Intercept,
    /// Known, but left to kube-proxy (server-first port, opt-out annotation).
    Exclude,
}

impl ServiceAction {
    fn to_raw(self) -> u32 {
        match self {
            ServiceAction::Intercept => SVC_INTERCEPT,
            ServiceAction::Exclude => SVC_EXCLUDED,
        }
    }
    fn from_raw(raw: u32) -> Self {
        if raw == SVC_INTERCEPT {
            ServiceAction::Intercept
        } else {
            ServiceAction::Exclude
        }
    }
}

/// The one place socket addresses become map bytes and back (network byte order, v4-mapped).
fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn socket_addr(addr: Addr16, port_be: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, u16::from_be(port_be))
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

pub(super) struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    redirects: Array<MapData, OrigDst>,
    slots: SlotAllocator,
    orig_dst: OrigDstTable,
    listeners: HashMap<MapData, ListenerKey, u64>,
    stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(BpfError::MissingMap { name });
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(take(names::MAP_SERVICES)?).map_err(map_err(names::MAP_SERVICES))?;
        let redirects_map = take(names::MAP_REDIRECTS)?;
        // The accept loops read the redirect slots while the agent writes them: a second handle
        // on the same kernel map, so neither waits on the other.
        let reader =
            match &redirects_map {
                Map::Array(data) => data.fd().as_fd().try_clone_to_owned().map_err(|source| {
                    BpfError::MapHandle {
                        name: names::MAP_REDIRECTS,
                        source,
                    }
                })?,
                _ => {
                    return Err(BpfError::MissingMap {
                        name: names::MAP_REDIRECTS,
                    })
                }
            };
        let redirects = Array::try_from(redirects_map).map_err(map_err(names::MAP_REDIRECTS))?;
        let redirects_reader = Array::try_from(Map::Array(
            MapData::from_fd(reader).map_err(map_err(names::MAP_REDIRECTS))?,
        ))
        .map_err(map_err(names::MAP_REDIRECTS))?;
        let v6_dst =
            HashMap::try_from(take(names::MAP_V6_DST)?).map_err(map_err(names::MAP_V6_DST))?;
        let listeners = match take(names::MAP_LISTENERS)? {
            Map::SockHash(data) => listeners_view(data)?,
            _ => {
                return Err(BpfError::MissingMap {
                    name: names::MAP_LISTENERS,
                })
            }
        };
        let stats =
            PerCpuArray::try_from(take(names::MAP_STATS)?).map_err(map_err(names::MAP_STATS))?;
        // A previous agent's pinned entries keep their slots: connections it redirected may
        // still be waiting to be accepted under those addresses.
        let mut slots = SlotAllocator::default();
        for entry in services.iter() {
            let (key, value) = entry.map_err(map_err(names::MAP_SERVICES))?;
            if value.action == SVC_INTERCEPT && value.slot < REDIRECT_SLOTS {
                slots.adopt(key, value.slot);
            }
        }
        Ok(Self {
            services,
            redirects,
            slots,
            orig_dst: OrigDstTable {
                redirects: Arc::new(redirects_reader),
                v6_dst: Arc::new(v6_dst),
            },
            listeners,
            stats,
        })
    }

    pub(super) fn register_listener(
        &mut self,
        netns_cookie: u64,
        v6: bool,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BpfError> {
        let key = ListenerKey {
            netns_cookie,
            family: if v6 { LISTENER_V6 } else { LISTENER_V4 },
            _pad: 0,
        };
        // A socket map takes the socket's fd as the value (8 bytes here, see `listeners_view`).
        self.listeners
            .insert(key, socket.as_raw_fd() as u64, 0)
            .map_err(map_err(names::MAP_LISTENERS))
    }

    pub(super) fn set_service(
        &mut self,
        addr: SocketAddr,
        action: ServiceAction,
    ) -> Result<(), BpfError> {
        let key = ServiceKey::new(addr16(addr.ip()), addr.port().to_be());
        let slot = match action {
            ServiceAction::Intercept => {
                let slot = self.slots.assign(key).ok_or(BpfError::SlotsExhausted)?;
                // The slot names the Service before any connect can be sent to it.
                let dst = OrigDst {
                    addr: key.addr,
                    port_be: key.port_be,
                    _pad: [0; 6],
                };
                self.redirects
                    .set(slot, dst, 0)
                    .map_err(map_err(names::MAP_REDIRECTS))?;
                slot
            }
            ServiceAction::Exclude => {
                self.slots.release(&key);
                REDIRECT_SLOTS
            }
        };
        let value = ServiceValue {
            action: action.to_raw(),
            slot,
        };
        self.services
            .insert(key, value, 0)
            .map_err(map_err(names::MAP_SERVICES))
    }

    pub(super) fn remove_service(&mut self, addr: SocketAddr) -> Result<(), BpfError> {
        let key = ServiceKey::new(addr16(addr.ip()), addr.port().to_be());
        // The slot's `icp_redirects` entry stays: a connection redirected just before still
        // resolves when accepted. The slot is reused only after the others have been handed out.
        self.slots.release(&key);
        match self.services.remove(&key) {
            Ok(()) => Ok(()),
            // Already gone: removal is idempotent.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_SERVICES)(e)),
        }
    }

    pub(super) fn services(&self) -> Result<Vec<(SocketAddr, ServiceAction)>, BpfError> {
        list_services(&self.services)
    }

    pub(super) fn orig_dst_table(&self) -> OrigDstTable {
        self.orig_dst.clone()
    }

    pub(super) fn stats(&self) -> Result<Vec<(Stat, u64)>, BpfError> {
        sum_stats(&self.stats)
    }
}

/// `icp_listeners` as a plain hash of 8-byte values. aya's `SockHash` insists on 4-byte values
/// (the fd), but with 4 bytes the kernel refuses userspace reads; with 8 it takes the fd as a
/// u64 on update and returns the socket cookie on lookup. Updates, lookups and key walks are
/// the same syscalls as for a hash, so aya's `HashMap` does them.
fn listeners_view(data: MapData) -> Result<HashMap<MapData, ListenerKey, u64>, BpfError> {
    HashMap::try_from(Map::HashMap(data)).map_err(map_err(names::MAP_LISTENERS))
}

/// Hands out redirect slots round robin, so a released slot (and its loopback address) is
/// reused as late as possible: a connection redirected to it just before the release must not
/// resolve to the next Service that gets it.
#[derive(Default)]
struct SlotAllocator {
    by_service: StdHashMap<ServiceKey, u32>,
    in_use: BTreeSet<u32>,
    next: u32,
}

impl SlotAllocator {
    fn adopt(&mut self, key: ServiceKey, slot: u32) {
        if self.in_use.insert(slot) {
            self.by_service.insert(key, slot);
            self.next = (slot + 1) % REDIRECT_SLOTS;
        }
    }

    /// The Service's slot, assigning a free one on first use; `None` when all are taken.
    fn assign(&mut self, key: ServiceKey) -> Option<u32> {
        if let Some(slot) = self.by_service.get(&key) {
            return Some(*slot);
        }
        for i in 0..REDIRECT_SLOTS {
            let slot = (self.next + i) % REDIRECT_SLOTS;
            if !self.in_use.contains(&slot) {
                self.in_use.insert(slot);
                self.by_service.insert(key, slot);
                self.next = (slot + 1) % REDIRECT_SLOTS;
                return Some(slot);
            }
        }
        None
    }

    fn release(&mut self, key: &ServiceKey) {
        if let Some(slot) = self.by_service.remove(key) {
            self.in_use.remove(&slot);
        }
    }
}

fn list_services(
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
) -> Result<Vec<(SocketAddr, ServiceAction)>, BpfError> {
    let mut out = Vec::new();
    for entry in services.iter() {
        let (key, value) = entry.map_err(map_err(names::MAP_SERVICES))?;
        out.push((
            socket_addr(key.addr, key.port_be),
            ServiceAction::from_raw(value.action),
        ));
    }
    out.sort_by_key(|(a, _)| *a);
    Ok(out)
}

/// The service entries in the pinned map, without a running agent.
pub(super) fn read_pinned_services(
    layout: &PinLayout,
) -> Result<Vec<(SocketAddr, ServiceAction)>, BpfError> {
    let path = layout.map(names::MAP_SERVICES);
    let data = MapData::from_pin(&path).map_err(map_err(names::MAP_SERVICES))?;
    let services = HashMap::try_from(Map::HashMap(data)).map_err(map_err(names::MAP_SERVICES))?;
    list_services(&services)
}

/// The pod-local listeners registered in the pinned map, as (netns cookie, is IPv6), without a
/// running agent. Empty while the agent is down: the kernel drops a socket when it closes.
pub(super) fn read_pinned_listeners(layout: &PinLayout) -> Result<Vec<(u64, bool)>, BpfError> {
    let path = layout.map(names::MAP_LISTENERS);
    let data = MapData::from_pin(&path).map_err(map_err(names::MAP_LISTENERS))?;
    listeners_view(data)?
        .keys()
        .map(|key| {
            let key = key.map_err(map_err(names::MAP_LISTENERS))?;
            Ok((key.netns_cookie, key.family == LISTENER_V6))
        })
        .collect()
}

fn sum_stats(stats: &PerCpuArray<MapData, u64>) -> Result<Vec<(Stat, u64)>, BpfError> {
    Stat::ALL
        .iter()
        .map(|stat| {
            let per_cpu = stats
                .get(&(*stat as u32), 0)
                .map_err(map_err(names::MAP_STATS))?;
            Ok((*stat, per_cpu.iter().sum()))
        })
        .collect()
}

pub(super) fn read_pinned_stats(layout: &PinLayout) -> Result<Vec<(Stat, u64)>, BpfError> {
    let path = layout.map(names::MAP_STATS);
    let data = MapData::from_pin(&path).map_err(map_err(names::MAP_STATS))?;
    let stats = PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(names::MAP_STATS))?;
    sum_stats(&stats)
}

/// Lookup of a redirected connection's original destination, shared by all accept loops.
#[derive(Clone)]
pub struct OrigDstTable {
    redirects: Arc<Array<MapData, OrigDst>>,
    v6_dst: Arc<HashMap<MapData, u64, OrigDst>>,
}

impl OrigDstTable {
    /// The Service an IPv4 redirect slot stands for; `None` for a slot never assigned.
    pub fn by_slot(&self, slot: u32) -> Result<Option<SocketAddr>, BpfError> {
        if slot >= REDIRECT_SLOTS {
            return Ok(None);
        }
        let dst = self
            .redirects
            .get(&slot, 0)
            .map_err(map_err(names::MAP_REDIRECTS))?;
        Ok((dst.port_be != 0).then(|| socket_addr(dst.addr, dst.port_be)))
    }

    /// The destination a redirected IPv6 client socket (by socket cookie) dialled; `None` when
    /// the hook did not redirect it.
    pub fn by_cookie(&self, cookie: u64) -> Result<Option<SocketAddr>, BpfError> {
        match self.v6_dst.get(&cookie, 0) {
            Ok(dst) => Ok(Some(socket_addr(dst.addr, dst.port_be))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::MAP_V6_DST)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_bytes() {
        for text in [
            "10.96.0.10:80",
            "[fd00:96::10]:8080",
            "[::1]:15001",
            "127.0.0.1:1",
        ] {
            let addr: SocketAddr = text.parse().expect("valid address");
            assert_eq!(
                socket_addr(addr16(addr.ip()), addr.port().to_be()),
                addr,
                "{text}"
            );
        }
    }

    fn key(port: u16) -> ServiceKey {
        ServiceKey::new(v4_mapped([10, 96, 0, 1]), port.to_be())
    }

    #[test]
    fn slots_are_stable_per_service_and_reused_last() {
        let mut slots = SlotAllocator::default();
        let a = slots.assign(key(1)).expect("slot");
        let b = slots.assign(key(2)).expect("slot");
        assert_ne!(a, b);
        assert_eq!(slots.assign(key(1)), Some(a), "same service, same slot");
        slots.release(&key(1));
        let c = slots.assign(key(3)).expect("slot");
        assert_ne!(c, a, "a released slot is not handed out again at once");
    }

    #[test]
    fn adopted_slots_are_kept_and_skipped() {
        let mut slots = SlotAllocator::default();
        slots.adopt(key(1), 7);
        assert_eq!(slots.assign(key(1)), Some(7));
        assert_eq!(slots.assign(key(2)), Some(8));
    }

    #[test]
    fn slots_run_out_cleanly() {
        let mut slots = SlotAllocator::default();
        for n in 0..REDIRECT_SLOTS {
            let k = ServiceKey::new(v4_mapped((n + 1).to_be_bytes()), 80u16.to_be());
            assert!(slots.assign(k).is_some());
        }
        assert_eq!(slots.assign(key(9)), None);
    }

    #[test]
    fn v4_addresses_use_the_mapped_form() {
        let a = addr16("10.96.0.10".parse().expect("ip"));
        assert_eq!(a, v4_mapped([10, 96, 0, 10]));
    }
}
