//! Typed access to the maps: service entries (written by the agent), original destinations
//! (read by the proxy after accept) and the per-CPU counters.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::Ebpf;
use interceptor_common::{
    names, v4_mapped, Addr16, OrigDst, ServiceKey, ServiceValue, SockKey, Stat, SVC_EXCLUDED,
    SVC_INTERCEPT,
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
    orig_dst: OrigDstTable,
    stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(BpfError::MissingMap { name });
        let services =
            HashMap::try_from(take(names::MAP_SERVICES)?).map_err(map_err(names::MAP_SERVICES))?;
        let orig_dst =
            HashMap::try_from(take(names::MAP_ORIG_DST)?).map_err(map_err(names::MAP_ORIG_DST))?;
        let stats =
            PerCpuArray::try_from(take(names::MAP_STATS)?).map_err(map_err(names::MAP_STATS))?;
        Ok(Self {
            services,
            orig_dst: OrigDstTable {
                map: Arc::new(orig_dst),
            },
            stats,
        })
    }

    pub(super) fn set_service(
        &mut self,
        addr: SocketAddr,
        action: ServiceAction,
    ) -> Result<(), BpfError> {
        let key = ServiceKey::new(addr16(addr.ip()), addr.port().to_be());
        let value = ServiceValue {
            action: action.to_raw(),
            _reserved: 0,
        };
        self.services
            .insert(key, value, 0)
            .map_err(map_err(names::MAP_SERVICES))
    }

    pub(super) fn remove_service(&mut self, addr: SocketAddr) -> Result<(), BpfError> {
        let key = ServiceKey::new(addr16(addr.ip()), addr.port().to_be());
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
    map: Arc<HashMap<MapData, SockKey, OrigDst>>,
}

impl OrigDstTable {
    /// The destination the client at `peer` dialled, in the pod netns identified by
    /// `netns_cookie`; `None` when the connection was not redirected by our hook.
    pub fn lookup(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
    ) -> Result<Option<SocketAddr>, BpfError> {
        let key = SockKey {
            netns_cookie,
            addr: addr16(peer.ip()),
            port_be: peer.port().to_be(),
            _pad: [0; 6],
        };
        match self.map.get(&key, 0) {
            Ok(dst) => Ok(Some(socket_addr(dst.addr, dst.port_be))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::MAP_ORIG_DST)(e)),
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

    #[test]
    fn v4_addresses_use_the_mapped_form() {
        let a = addr16("10.96.0.10".parse().expect("ip"));
        assert_eq!(a, v4_mapped([10, 96, 0, 10]));
    }
}
