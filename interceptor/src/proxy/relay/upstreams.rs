//! The relay's pool of upstream connections: per worker thread, Service port and endpoint,
//! so a stream and the connection it rides are driven by the same thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::super::destination::Destination;
use super::super::endpoint_stats::EndpointStats;
use super::super::{lock, workers, Shared};
use super::{upstream_conn, Key, UpLink};

#[derive(Default)]
pub(crate) struct Upstreams {
    links: Mutex<HashMap<Key, Vec<Arc<UpLink>>>>,
}

impl Upstreams {
    /// The connection one more stream to `ep` goes on. Past `streams_per_connection` on every
    /// connection one more is opened, but the stream does not wait for it: it goes on the
    /// least-loaded connection that is up, and the new one takes streams once connected.
    pub(crate) fn pick(
        &self,
        shared: &Arc<Shared>,
        dest: &Arc<Destination>,
        ep: &Arc<EndpointStats>,
    ) -> Arc<UpLink> {
        let cfg = &shared.config;
        let key = Key {
            worker: workers::current_index(),
            dest: dest.addr(),
            endpoint: ep.addr(),
        };
        let mut map = lock(&self.links);
        let links = map.entry(key).or_default();
        links.retain(|l| l.is_accepting());
        let best_ready = links
            .iter()
            .filter(|l| l.is_ready())
            .min_by_key(|l| l.load())
            .cloned();
        if let Some(l) = &best_ready {
            if l.has_room(cfg.streams_per_connection) {
                return l.clone();
            }
        }
        let connecting = links.iter().find(|l| !l.is_ready()).cloned();
        let open = |links: &mut Vec<Arc<UpLink>>, growth: bool| {
            let link = Arc::new(UpLink::new());
            links.push(link.clone());
            upstream_conn::spawn(
                shared.clone(),
                dest.clone(),
                ep.clone(),
                link.clone(),
                key,
                growth,
            );
            link
        };
        let stall_free = best_ready.clone().filter(|l| l.below_peer_limit());
        if connecting.is_none() && links.len() < cfg.max_connections_per_endpoint.max(1) {
            // Growth while the endpoint answers on another connection: not charged if it
            // fails.
            let link = open(links, best_ready.is_some());
            return stall_free.unwrap_or(link);
        }
        match stall_free.or(connecting).or(best_ready) {
            Some(l) => l,
            // Every connection is either up or connecting, and with none there is room for
            // one: this is only reached if that ever stops holding.
            None => open(links, false),
        }
    }

    /// Whether one more connection to the endpoint of `key` may be opened.
    pub(crate) fn may_grow(&self, key: Key, max: usize) -> bool {
        lock(&self.links).get(&key).map_or(0, |l| l.len()) < max
    }

    /// The connection takes no more streams (closing, failed).
    pub(crate) fn remove(&self, key: Key, link: &Arc<UpLink>) {
        let mut map = lock(&self.links);
        if let Some(links) = map.get_mut(&key) {
            links.retain(|l| !Arc::ptr_eq(l, link));
            if links.is_empty() {
                map.remove(&key);
            }
        }
    }

    /// Connections to `endpoint` that take streams, over every worker and Service port.
    pub(crate) fn connections(&self, endpoint: SocketAddr) -> usize {
        lock(&self.links)
            .iter()
            .filter(|(k, _)| k.endpoint == endpoint)
            .map(|(_, v)| v.iter().filter(|l| l.is_accepting()).count())
            .sum()
    }
}
