//! The TC path's connection tracking, from userspace: garbage collection of expired flows (the
//! datapath only refreshes lifetimes; an LRU alone would keep dead flows until pressure),
//! removal of UDP flows whose backend left their service (service-semantics §3.13), and the
//! live flows for `inspect conntrack`.
use std::{
    collections::HashMap as StdHashMap,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};
use proxy_common::{Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, ct_flags, map_names, protocol};

use crate::{bpf::pins::PinLayout, plan::mirror::UdpPair};

/// One family's conntrack layout.
trait CtFamily {
    type Key: Pod + Hash + Eq;
    type Entry: Pod;
    fn protocol(key: &Self::Key) -> u8;
    fn flags(entry: &Self::Entry) -> u16;
    fn expires_ns(entry: &Self::Entry) -> u64;
    fn rev_nat_id(entry: &Self::Entry) -> u32;
    /// The key of the packets that answer those rewritten by `entry` (its rewrite tuple,
    /// reversed): for a forward entry its reply entry, for a reply entry its forward entry.
    fn partner_key(key: &Self::Key, entry: &Self::Entry) -> Self::Key;
    /// Where a forward entry sends the flow.
    fn destination(entry: &Self::Entry) -> SocketAddr;
    /// The source a forward entry gives the flow (a node address when masqueraded).
    fn source(entry: &Self::Entry) -> SocketAddr;
    /// (source, destination) of the packets a key matches.
    fn ends(key: &Self::Key) -> (SocketAddr, SocketAddr);
}

fn v4_socket(word: u32, port_be: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes())),
        u16::from_be(port_be),
    )
}

fn v6_socket(words: [u32; 4], port_be: u16) -> SocketAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be(port_be))
}

struct V4;
struct V6;

impl CtFamily for V4 {
    type Key = Ct4Key;
    type Entry = Ct4Entry;
    fn protocol(key: &Ct4Key) -> u8 {
        key.protocol
    }
    fn flags(entry: &Ct4Entry) -> u16 {
        entry.flags
    }
    fn expires_ns(entry: &Ct4Entry) -> u64 {
        entry.expires_ns
    }
    fn rev_nat_id(entry: &Ct4Entry) -> u32 {
        entry.rev_nat_id
    }
    fn partner_key(key: &Ct4Key, entry: &Ct4Entry) -> Ct4Key {
        Ct4Key {
            saddr: entry.daddr,
            daddr: entry.saddr,
            sport_be: entry.dport_be,
            dport_be: entry.sport_be,
            protocol: key.protocol,
            pad: [0; 3],
        }
    }
    fn destination(entry: &Ct4Entry) -> SocketAddr {
        v4_socket(entry.daddr, entry.dport_be)
    }
    fn source(entry: &Ct4Entry) -> SocketAddr {
        v4_socket(entry.saddr, entry.sport_be)
    }
    fn ends(key: &Ct4Key) -> (SocketAddr, SocketAddr) {
        (
            v4_socket(key.saddr, key.sport_be),
            v4_socket(key.daddr, key.dport_be),
        )
    }
}

impl CtFamily for V6 {
    type Key = Ct6Key;
    type Entry = Ct6Entry;
    fn protocol(key: &Ct6Key) -> u8 {
        key.protocol
    }
    fn flags(entry: &Ct6Entry) -> u16 {
        entry.flags
    }
    fn expires_ns(entry: &Ct6Entry) -> u64 {
        entry.expires_ns
    }
    fn rev_nat_id(entry: &Ct6Entry) -> u32 {
        entry.rev_nat_id
    }
    fn partner_key(key: &Ct6Key, entry: &Ct6Entry) -> Ct6Key {
        Ct6Key {
            saddr: entry.daddr,
            daddr: entry.saddr,
            sport_be: entry.dport_be,
            dport_be: entry.sport_be,
            protocol: key.protocol,
            pad: [0; 3],
        }
    }
    fn destination(entry: &Ct6Entry) -> SocketAddr {
        v6_socket(entry.daddr, entry.dport_be)
    }
    fn source(entry: &Ct6Entry) -> SocketAddr {
        v6_socket(entry.saddr, entry.sport_be)
    }
    fn ends(key: &Ct6Key) -> (SocketAddr, SocketAddr) {
        (
            v6_socket(key.saddr, key.sport_be),
            v6_socket(key.daddr, key.dport_be),
        )
    }
}

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Flows still alive (forward entries).
    pub live_flows: usize,
    /// Entries removed (expired forward entries and the reply entries left without one).
    pub removed: usize,
    /// Entries left per family (IPv4, IPv6), live or not: the maps' fill, counted on the way.
    pub entries: (usize, usize),
}

/// One flow the TC path tracks (its forward entry), for `inspect conntrack`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrackedFlow {
    pub protocol: u8,
    /// The client, as the packets arrive.
    pub client: SocketAddr,
    /// The Service frontend the client addressed.
    pub frontend: SocketAddr,
    /// The source the backend sees: a node address and port when masqueraded, else the
    /// client.
    pub translated_source: SocketAddr,
    pub backend: SocketAddr,
    pub rev_nat_id: u32,
    pub flags: u16,
    /// Nanoseconds until the flow expires unless a packet refreshes it.
    pub expires_in_ns: u64,
}

impl TrackedFlow {
    /// The flow's state as conntrack(8) users know it.
    pub fn state(&self) -> &'static str {
        let flags = self.flags;
        let seen_reply = flags & ct_flags::SEEN_REPLY != 0;
        if self.protocol != protocol::TCP {
            return if seen_reply { "replied" } else { "unreplied" };
        }
        let fins = flags & (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY);
        if flags & ct_flags::RST != 0 || fins == ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY {
            "closed"
        } else if fins != 0 {
            "closing"
        } else if seen_reply {
            "established"
        } else {
            "syn-sent"
        }
    }

    pub fn masqueraded(&self) -> bool {
        self.flags & ct_flags::SNAT != 0
    }
}

/// Both families' conntrack maps, opened from their pins.
pub struct Conntrack {
    v4: HashMap<MapData, Ct4Key, Ct4Entry>,
    v6: HashMap<MapData, Ct6Key, Ct6Entry>,
}

fn open<K: Pod, V: Pod>(path: &Path) -> Result<HashMap<MapData, K, V>, MapError> {
    HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_pin(path)?))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

impl Conntrack {
    pub fn open_pinned(pins: &PinLayout) -> Result<Self, MapError> {
        Ok(Self {
            v4: open(&pins.map(map_names::CT4))?,
            v6: open(&pins.map(map_names::CT6))?,
        })
    }

    /// Removes expired flows and reply entries whose forward entry is gone or has moved on.
    pub fn collect_garbage(&mut self, now_ns: u64) -> GcReport {
        let v4 = collect::<V4>(&mut self.v4, now_ns);
        let v6 = collect::<V6>(&mut self.v6, now_ns);
        GcReport {
            live_flows: v4.live_flows + v6.live_flows,
            removed: v4.removed + v6.removed,
            entries: (v4.entries.0, v6.entries.0),
        }
    }

    /// Removes the UDP flows of these (frontend, backend) pairs; returns how many.
    pub fn forget_udp_flows(&mut self, stale: &dyn Fn(&UdpPair) -> bool) -> usize {
        forget_udp::<V4>(&mut self.v4, stale) + forget_udp::<V6>(&mut self.v6, stale)
    }

    /// Every live flow of both families, ordered by protocol and client.
    pub fn flows(&self, now_ns: u64) -> Vec<TrackedFlow> {
        let mut flows = live_flows::<V4>(&self.v4, now_ns);
        flows.extend(live_flows::<V6>(&self.v6, now_ns));
        flows.sort();
        flows
    }

    /// Entries (forward and reply, live or not yet collected) per family: the maps' fill.
    pub fn entry_counts(&self) -> (usize, usize) {
        (self.v4.keys().count(), self.v6.keys().count())
    }

    /// Live flows per family (for `inspect` and metrics).
    pub fn count_live(&self, now_ns: u64) -> (usize, usize) {
        let live = |flags: u16, expires: u64| flags & ct_flags::REPLY == 0 && expires > now_ns;
        let v4 = self
            .v4
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| live(entry.flags, entry.expires_ns))
            .count();
        let v6 = self
            .v6
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| live(entry.flags, entry.expires_ns))
            .count();
        (v4, v6)
    }
}

fn live_flows<F: CtFamily>(
    map: &HashMap<MapData, F::Key, F::Entry>,
    now_ns: u64,
) -> Vec<TrackedFlow> {
    flows_of::<F>(map.iter().filter_map(Result::ok), now_ns)
}

/// The live forward entries among `entries`, as flows.
fn flows_of<F: CtFamily>(
    entries: impl Iterator<Item = (F::Key, F::Entry)>,
    now_ns: u64,
) -> Vec<TrackedFlow> {
    entries
        .filter(|(_, entry)| {
            F::flags(entry) & ct_flags::REPLY == 0 && F::expires_ns(entry) > now_ns
        })
        .map(|(key, entry)| {
            let (client, frontend) = F::ends(&key);
            TrackedFlow {
                protocol: F::protocol(&key),
                client,
                frontend,
                translated_source: F::source(&entry),
                backend: F::destination(&entry),
                rev_nat_id: F::rev_nat_id(&entry),
                flags: F::flags(&entry),
                expires_in_ns: F::expires_ns(&entry) - now_ns,
            }
        })
        .collect()
}

fn entries<F: CtFamily>(map: &HashMap<MapData, F::Key, F::Entry>) -> StdHashMap<F::Key, F::Entry> {
    map.iter().filter_map(Result::ok).collect()
}

/// Which entries of a conntrack snapshot are garbage at `now_ns`.
fn garbage<F: CtFamily>(entries: &StdHashMap<F::Key, F::Entry>, now_ns: u64) -> Vec<F::Key> {
    let alive = |key: &F::Key| {
        entries.get(key).is_some_and(|entry| {
            F::flags(entry) & ct_flags::REPLY == 0 && F::expires_ns(entry) > now_ns
        })
    };
    entries
        .iter()
        .filter(|(key, entry)| {
            if F::flags(entry) & ct_flags::REPLY == 0 {
                return F::expires_ns(entry) <= now_ns;
            }
            let forward = F::partner_key(key, entry);
            let points_back = entries
                .get(&forward)
                .is_some_and(|forward_entry| F::partner_key(&forward, forward_entry) == **key);
            !(alive(&forward) && points_back)
        })
        .map(|(key, _)| *key)
        .collect()
}

fn collect<F: CtFamily>(map: &mut HashMap<MapData, F::Key, F::Entry>, now_ns: u64) -> GcReport {
    let snapshot = entries::<F>(map);
    let doomed = garbage::<F>(&snapshot, now_ns);
    let forward_total = snapshot
        .values()
        .filter(|entry| F::flags(entry) & ct_flags::REPLY == 0)
        .count();
    let doomed_forward = doomed
        .iter()
        .filter(|key| {
            snapshot
                .get(key)
                .is_some_and(|e| F::flags(e) & ct_flags::REPLY == 0)
        })
        .count();
    // A key that vanished meanwhile (LRU eviction, the datapath) is not an error.
    let removed = doomed.iter().filter(|key| map.remove(key).is_ok()).count();
    GcReport {
        live_flows: forward_total - doomed_forward,
        removed,
        entries: (snapshot.len().saturating_sub(removed), 0),
    }
}

fn forget_udp<F: CtFamily>(
    map: &mut HashMap<MapData, F::Key, F::Entry>,
    stale: &dyn Fn(&UdpPair) -> bool,
) -> usize {
    let snapshot = entries::<F>(map);
    let mut forgotten = 0;
    for (key, entry) in &snapshot {
        let udp_forward =
            F::protocol(key) == protocol::UDP && F::flags(entry) & ct_flags::REPLY == 0;
        if udp_forward && stale(&(F::rev_nat_id(entry), F::destination(entry))) {
            let _ = map.remove(&F::partner_key(key, entry));
            if map.remove(key).is_ok() {
                forgotten += 1;
            }
        }
    }
    forgotten
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(client_port: u16, backend_port: u16, expires_ns: u64) -> (Ct4Key, Ct4Entry) {
        let key = Ct4Key {
            saddr: 1,
            daddr: 2,
            sport_be: client_port,
            dport_be: 80,
            protocol: protocol::TCP,
            pad: [0; 3],
        };
        let entry = Ct4Entry {
            expires_ns,
            saddr: 3,
            daddr: 4,
            sport_be: client_port,
            dport_be: backend_port,
            ..Ct4Entry::default()
        };
        (key, entry)
    }

    fn reply_of(key: &Ct4Key, entry: &Ct4Entry) -> (Ct4Key, Ct4Entry) {
        let reply_key = V4::partner_key(key, entry);
        let reply = Ct4Entry {
            saddr: key.daddr,
            daddr: key.saddr,
            sport_be: key.dport_be,
            dport_be: key.sport_be,
            flags: ct_flags::REPLY,
            ..Ct4Entry::default()
        };
        (reply_key, reply)
    }

    #[test]
    fn expired_flows_and_their_replies_are_garbage_live_ones_stay() {
        let (live_key, live) = forward(1000, 8080, 500);
        let (dead_key, dead) = forward(1001, 8080, 50);
        let (live_reply_key, live_reply) = reply_of(&live_key, &live);
        let (dead_reply_key, dead_reply) = reply_of(&dead_key, &dead);
        let entries: StdHashMap<_, _> = [
            (live_key, live),
            (dead_key, dead),
            (live_reply_key, live_reply),
            (dead_reply_key, dead_reply),
        ]
        .into_iter()
        .collect();
        let mut doomed = garbage::<V4>(&entries, 100);
        doomed.sort();
        let mut expected = vec![dead_key, dead_reply_key];
        expected.sort();
        assert_eq!(doomed, expected);
    }

    #[test]
    fn a_reply_entry_whose_forward_entry_moved_on_is_garbage() {
        let (key, entry) = forward(1000, 8080, 500);
        let (reply_key, reply) = reply_of(&key, &entry);
        // The client's tuple now belongs to a new flow to another backend port.
        let moved = Ct4Entry {
            dport_be: 9090,
            ..entry
        };
        let entries: StdHashMap<_, _> = [(key, moved), (reply_key, reply)].into_iter().collect();
        assert_eq!(garbage::<V4>(&entries, 100), vec![reply_key]);
    }

    #[test]
    fn flows_are_the_live_forward_entries_with_their_translation_and_state() {
        let (live_key, mut live) = forward(1000, 8080, 500);
        live.flags = ct_flags::SNAT | ct_flags::SEEN_REPLY;
        let (dead_key, dead) = forward(1001, 8080, 50);
        let (reply_key, reply) = reply_of(&live_key, &live);
        let entries = [(live_key, live), (dead_key, dead), (reply_key, reply)];
        let flows = flows_of::<V4>(entries.into_iter(), 100);
        assert_eq!(flows.len(), 1, "{flows:?}");
        let flow = &flows[0];
        let word = |n: u32| IpAddr::V4(Ipv4Addr::from(n.to_ne_bytes()));
        assert_eq!(flow.client, SocketAddr::new(word(1), u16::from_be(1000)));
        assert_eq!(flow.frontend, SocketAddr::new(word(2), u16::from_be(80)));
        assert_eq!(
            flow.translated_source,
            SocketAddr::new(word(3), u16::from_be(1000))
        );
        assert_eq!(flow.backend, SocketAddr::new(word(4), u16::from_be(8080)));
        assert_eq!(flow.expires_in_ns, 400);
        assert!(flow.masqueraded());
        assert_eq!(flow.state(), "established");
    }

    #[test]
    fn flow_states_follow_the_tcp_flags_and_udp_replies() {
        let flow = |protocol, flags| TrackedFlow {
            protocol,
            client: "10.0.0.1:1000".parse().unwrap(),
            frontend: "10.0.0.2:80".parse().unwrap(),
            translated_source: "10.0.0.1:1000".parse().unwrap(),
            backend: "10.0.0.3:8080".parse().unwrap(),
            rev_nat_id: 1,
            flags,
            expires_in_ns: 1,
        };
        let tcp = |flags| flow(protocol::TCP, flags).state();
        assert_eq!(tcp(0), "syn-sent");
        assert_eq!(tcp(ct_flags::SEEN_REPLY), "established");
        assert_eq!(tcp(ct_flags::SEEN_REPLY | ct_flags::FIN_REPLY), "closing");
        assert_eq!(
            tcp(ct_flags::SEEN_REPLY | ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY),
            "closed"
        );
        assert_eq!(tcp(ct_flags::RST), "closed");
        assert_eq!(flow(protocol::UDP, 0).state(), "unreplied");
        assert_eq!(flow(protocol::UDP, ct_flags::SEEN_REPLY).state(), "replied");
        assert!(!flow(protocol::UDP, 0).masqueraded());
    }

    #[test]
    fn an_orphan_reply_entry_is_garbage() {
        let (key, entry) = forward(1000, 8080, 500);
        let (reply_key, reply) = reply_of(&key, &entry);
        let entries: StdHashMap<_, _> = [(reply_key, reply)].into_iter().collect();
        assert_eq!(garbage::<V4>(&entries, 100), vec![reply_key]);
    }
}
