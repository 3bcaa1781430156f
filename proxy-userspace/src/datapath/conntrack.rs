//! The TC path's connection tracking, from userspace: garbage collection of expired flows (the
//! datapath only refreshes lifetimes; an LRU alone would keep dead flows until pressure),
//! kube-proxy's UDP conntrack reconciler (UDP flows whose backend is not a serving endpoint of
//! their frontend go, for every frontend kind, as kube-proxy's conntrack cleanup does), and the live flows
//! for `inspect conntrack`.
use std::{collections::HashMap as StdHashMap, net::SocketAddr};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use proxy_common::{
    Addr4, Addr6, CtEntry, CtKey, DsrEntry, WireAddr, ct_flags, map_names, protocol,
};

use crate::bpf::pins::{OpenPinError, PinLayout};

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Flows still alive (forward entries).
    pub live_flows: usize,
    /// Entries removed (expired forward entries and the reply entries left without one).
    pub removed: usize,
    /// Entries left in each conntrack map (by name), live or not: the maps' fill, counted on
    /// the way.
    pub entries: [(&'static str, usize); 4],
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

    /// A Direct Server Return flow: sent to another node's endpoint with the client's address
    /// and the frontend option; its replies never pass this node (so its state is what the
    /// client's packets show).
    pub fn direct_server_return(&self) -> bool {
        self.flags & ct_flags::DSR != 0
    }
}

/// The serving endpoints of each UDP frontend, by its rev-NAT id; `None` when its Service
/// port has no serving endpoint at all (its flows are then left alone, as kube-proxy's
/// reconciler skips such Services: new packets are refused anyway, and the flows are removed
/// once endpoints return).
pub type UdpServing = StdHashMap<u32, Option<std::collections::HashSet<SocketAddr>>>;

/// What reconciling one family's UDP flows did (kube-proxy's
/// `kubeproxy_conntrack_reconciler_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyReconcile {
    /// Flows removed (each a forward entry and its reply entry).
    pub deleted: u64,
    pub elapsed: std::time::Duration,
}

/// What one reconcile did, per family (IPv4, IPv6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub families: [FamilyReconcile; 2],
}

/// The UDP forward entries whose flow must go: a frontend that has serving endpoints but not
/// this flow's backend, or a frontend that is gone. Traffic policy, topology and terminating
/// state are not looked at, so UDP flows keep working like TCP connections.
fn stale_udp<A: WireAddr>(
    entries: &StdHashMap<CtKey<A>, CtEntry<A>>,
    serving: &UdpServing,
) -> Vec<CtKey<A>> {
    entries
        .iter()
        .filter(|(key, entry)| key.protocol == protocol::UDP && entry.flags & ct_flags::REPLY == 0)
        .filter(|(_, entry)| match serving.get(&entry.rev_nat_id) {
            Some(Some(endpoints)) => !endpoints.contains(&entry.destination()),
            Some(None) => false,
            None => true,
        })
        .map(|(key, _)| *key)
        .collect()
}

fn reconcile_udp<A: WireAddr>(tables: &mut Tables<A>, serving: &UdpServing) -> FamilyReconcile {
    let started = std::time::Instant::now();
    let mut deleted = 0;
    for which in Which::BOTH {
        let snapshot = entries::<A>(tables.map(which));
        for key in stale_udp::<A>(&snapshot, serving) {
            if let Some(entry) = snapshot.get(&key) {
                tables.remove(&entry.partner_key(key.protocol));
            }
            if tables.map_mut(which).remove(&key).is_ok() {
                deleted += 1;
            }
        }
    }
    FamilyReconcile {
        deleted,
        elapsed: started.elapsed(),
    }
}

/// One of a family's two conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// Confirmed flows (`CT4_V1`/`CT6_V1`).
    Main,
    /// Flows not yet confirmed by both sides (`CT4_NEW_V1`/`CT6_NEW_V1`).
    Unreplied,
}

impl Which {
    const BOTH: [Self; 2] = [Self::Main, Self::Unreplied];
}

/// One family's conntrack maps. A flow's two entries live in the same map, except for the
/// moment the datapath moves a confirmed flow to the main map: a partner is looked up in both.
struct Tables<A: WireAddr> {
    main: HashMap<MapData, CtKey<A>, CtEntry<A>>,
    unreplied: HashMap<MapData, CtKey<A>, CtEntry<A>>,
}

impl<A: WireAddr> Tables<A> {
    fn open(
        pins: &PinLayout,
        main: &'static str,
        unreplied: &'static str,
    ) -> Result<Self, OpenPinError> {
        Ok(Self {
            main: open(pins, main)?,
            unreplied: open(pins, unreplied)?,
        })
    }

    fn map(&self, which: Which) -> &HashMap<MapData, CtKey<A>, CtEntry<A>> {
        match which {
            Which::Main => &self.main,
            Which::Unreplied => &self.unreplied,
        }
    }

    fn map_mut(&mut self, which: Which) -> &mut HashMap<MapData, CtKey<A>, CtEntry<A>> {
        match which {
            Which::Main => &mut self.main,
            Which::Unreplied => &mut self.unreplied,
        }
    }

    /// The entry under `key` as the datapath finds it: the main map's first.
    fn get(&self, key: &CtKey<A>) -> Option<CtEntry<A>> {
        self.main
            .get(key, 0)
            .ok()
            .or_else(|| self.unreplied.get(key, 0).ok())
    }

    /// Removes `key` from both maps (missing is fine).
    fn remove(&mut self, key: &CtKey<A>) {
        let _ = self.main.remove(key);
        let _ = self.unreplied.remove(key);
    }

    /// Every entry of both maps (the main map's where a key is in both).
    fn entries(&self) -> StdHashMap<CtKey<A>, CtEntry<A>> {
        let mut all = entries::<A>(&self.unreplied);
        all.extend(entries::<A>(&self.main));
        all
    }
}

/// Both families' conntrack maps, opened from their pins.
pub struct Conntrack {
    v4: Tables<Addr4>,
    v6: Tables<Addr6>,
}

fn open<K: Pod, V: Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, OpenPinError> {
    HashMap::try_from(aya::maps::Map::LruHashMap(pins.open_map(name)?))
        .map_err(|source| OpenPinError { map: name, source })
}

/// A Direct Server Return flow served on this node (an entry of `DSR_REV4_V1`/`DSR_REV6_V1`):
/// its pod's replies leave for the client with the frontend as their source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DsrReply {
    pub protocol: u8,
    pub client: SocketAddr,
    pub pod: SocketAddr,
    pub frontend: SocketAddr,
    pub expires_in_ns: u64,
}

/// The live Direct Server Return reply entries of both families (none when the maps are not
/// pinned, as under an agent without DSR support).
pub fn dsr_replies(pins: &PinLayout, now_ns: u64) -> Vec<DsrReply> {
    let mut replies = dsr_replies_of::<Addr4>(pins, map_names::DSR_REV4, now_ns);
    replies.extend(dsr_replies_of::<Addr6>(pins, map_names::DSR_REV6, now_ns));
    replies.sort();
    replies
}

/// The live entries of one family's DSR reply map (none when it is not pinned).
fn dsr_replies_of<A: WireAddr>(pins: &PinLayout, name: &'static str, now_ns: u64) -> Vec<DsrReply> {
    let Ok(map) = open::<CtKey<A>, DsrEntry<A>>(pins, name) else {
        return Vec::new();
    };
    map.iter()
        .flatten()
        .filter(|(_, entry)| entry.expires_ns > now_ns)
        .map(|(key, entry)| {
            let (pod, client) = key.ends();
            DsrReply {
                protocol: key.protocol,
                client,
                pod,
                frontend: entry.address.socket(entry.port_be),
                expires_in_ns: entry.expires_ns - now_ns,
            }
        })
        .collect()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

impl Conntrack {
    pub fn open_pinned(pins: &PinLayout) -> Result<Self, OpenPinError> {
        Ok(Self {
            v4: Tables::open(pins, map_names::CT4, map_names::CT4_UNREPLIED)?,
            v6: Tables::open(pins, map_names::CT6, map_names::CT6_UNREPLIED)?,
        })
    }

    /// Removes expired flows and reply entries whose forward entry is gone or has moved on.
    pub fn collect_garbage(&mut self, now_ns: u64) -> GcReport {
        let v4 = collect::<Addr4>(&mut self.v4, now_ns);
        let v6 = collect::<Addr6>(&mut self.v6, now_ns);
        GcReport {
            live_flows: v4.live_flows + v6.live_flows,
            removed: v4.removed + v6.removed,
            entries: [
                (map_names::CT4, v4.left[0]),
                (map_names::CT6, v6.left[0]),
                (map_names::CT4_UNREPLIED, v4.left[1]),
                (map_names::CT6_UNREPLIED, v6.left[1]),
            ],
        }
    }

    /// kube-proxy's conntrack reconciler on the TC path's own conntrack, level-triggered:
    /// removes every UDP flow whose backend is not a serving endpoint of its frontend (or
    /// whose frontend is gone).
    pub fn reconcile_udp(&mut self, serving: &UdpServing) -> ReconcileReport {
        ReconcileReport {
            families: [
                reconcile_udp::<Addr4>(&mut self.v4, serving),
                reconcile_udp::<Addr6>(&mut self.v6, serving),
            ],
        }
    }

    /// Every live flow of both families, ordered by protocol and client.
    pub fn flows(&self, now_ns: u64) -> Vec<TrackedFlow> {
        let mut flows = flows_of::<Addr4>(self.v4.entries().into_iter(), now_ns);
        flows.extend(flows_of::<Addr6>(self.v6.entries().into_iter(), now_ns));
        flows.sort();
        flows
    }

    /// Entries (forward and reply, live or not yet collected) of each conntrack map, by name.
    pub fn entry_counts(&self) -> [(&'static str, usize); 4] {
        [
            (map_names::CT4, keys_of::<Addr4>(&self.v4.main).len()),
            (map_names::CT6, keys_of::<Addr6>(&self.v6.main).len()),
            (
                map_names::CT4_UNREPLIED,
                keys_of::<Addr4>(&self.v4.unreplied).len(),
            ),
            (
                map_names::CT6_UNREPLIED,
                keys_of::<Addr6>(&self.v6.unreplied).len(),
            ),
        ]
    }

    /// Live flows per family (for `inspect` and metrics).
    pub fn count_live(&self, now_ns: u64) -> (usize, usize) {
        let live = |flags: u16, expires: u64| flags & ct_flags::REPLY == 0 && expires > now_ns;
        let v4 = self
            .v4
            .entries()
            .values()
            .filter(|entry| live(entry.flags, entry.expires_ns))
            .count();
        let v6 = self
            .v6
            .entries()
            .values()
            .filter(|entry| live(entry.flags, entry.expires_ns))
            .count();
        (v4, v6)
    }
}

/// The live forward entries among `entries`, as flows.
fn flows_of<A: WireAddr>(
    entries: impl Iterator<Item = (CtKey<A>, CtEntry<A>)>,
    now_ns: u64,
) -> Vec<TrackedFlow> {
    entries
        .filter(|(_, entry)| entry.flags & ct_flags::REPLY == 0 && entry.expires_ns > now_ns)
        .map(|(key, entry)| {
            let (client, frontend) = key.ends();
            TrackedFlow {
                protocol: key.protocol,
                client,
                frontend,
                translated_source: entry.source(),
                backend: entry.destination(),
                rev_nat_id: entry.rev_nat_id,
                flags: entry.flags,
                expires_in_ns: entry.expires_ns - now_ns,
            }
        })
        .collect()
}

/// How many times a walk over a map may start again from its first key before it gives up
/// for this round (see [`keys_of`]).
const WALK_RESTARTS: usize = 3;

/// The keys of a map the datapath writes while we read. The kernel walks a hash map from key
/// to key; when the key last read has been removed meanwhile (an LRU eviction, a flow the
/// datapath ended), it starts again from the first key. Keys seen again are skipped, and
/// after a few restarts the walk stops: what it missed waits for the next round.
fn keys_of<A: WireAddr>(map: &HashMap<MapData, CtKey<A>, CtEntry<A>>) -> Vec<CtKey<A>> {
    let mut seen = std::collections::HashSet::new();
    let mut keys = Vec::new();
    let mut restarts = 0;
    for key in map.keys() {
        let Ok(key) = key else {
            break;
        };
        if seen.insert(key) {
            keys.push(key);
        } else if keys.first() == Some(&key) {
            restarts += 1;
            if restarts > WALK_RESTARTS {
                break;
            }
        }
    }
    keys
}

/// The entries of a map, each read when its key comes (entries removed meanwhile are
/// skipped).
fn entries<A: WireAddr>(
    map: &HashMap<MapData, CtKey<A>, CtEntry<A>>,
) -> StdHashMap<CtKey<A>, CtEntry<A>> {
    keys_of::<A>(map)
        .into_iter()
        .filter_map(|key| map.get(&key, 0).ok().map(|entry| (key, entry)))
        .collect()
}

/// Whether `entry`, found under `key`, is garbage at `now_ns`: an expired forward entry, or a
/// reply entry whose forward entry is gone, expired or now rewrites to another tuple.
/// `lookup` reads the current entry of a key.
fn is_garbage<A: WireAddr>(
    key: &CtKey<A>,
    entry: &CtEntry<A>,
    now_ns: u64,
    lookup: impl Fn(&CtKey<A>) -> Option<CtEntry<A>>,
) -> bool {
    if entry.flags & ct_flags::REPLY == 0 {
        return entry.expires_ns <= now_ns;
    }
    let forward_key = entry.partner_key(key.protocol);
    let alive = lookup(&forward_key).is_some_and(|forward| {
        forward.flags & ct_flags::REPLY == 0
            && forward.expires_ns > now_ns
            && forward.partner_key(forward_key.protocol) == *key
    });
    !alive
}

/// Which entries of a conntrack snapshot are garbage at `now_ns`.
#[cfg(test)]
fn garbage<A: WireAddr>(entries: &StdHashMap<CtKey<A>, CtEntry<A>>, now_ns: u64) -> Vec<CtKey<A>> {
    entries
        .iter()
        .filter(|(key, entry)| is_garbage::<A>(key, entry, now_ns, |k| entries.get(k).copied()))
        .map(|(key, _)| *key)
        .collect()
}

/// Removes garbage entry by entry: each is judged on what it and its partner hold when its
/// turn comes, never on an earlier reading (the datapath refreshes and re-creates flows while
/// the collection runs), and a key that vanished meanwhile is skipped.
/// What collecting one family did.
#[derive(Default)]
struct FamilyGc {
    live_flows: usize,
    removed: usize,
    /// Entries left in the main and the unreplied map.
    left: [usize; 2],
}

fn collect<A: WireAddr>(tables: &mut Tables<A>, now_ns: u64) -> FamilyGc {
    let mut report = FamilyGc::default();
    for (slot, which) in Which::BOTH.into_iter().enumerate() {
        for key in keys_of::<A>(tables.map(which)) {
            let Ok(entry) = tables.map(which).get(&key, 0) else {
                continue;
            };
            if is_garbage::<A>(&key, &entry, now_ns, |k| tables.get(k)) {
                if tables.map_mut(which).remove(&key).is_ok() {
                    report.removed += 1;
                }
                continue;
            }
            report.left[slot] += 1;
            if entry.flags & ct_flags::REPLY == 0 {
                report.live_flows += 1;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use proxy_common::{Ct4Entry, Ct4Key};

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
        let reply_key = entry.partner_key(key.protocol);
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
        let mut doomed = garbage::<Addr4>(&entries, 100);
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
        assert_eq!(garbage::<Addr4>(&entries, 100), vec![reply_key]);
    }

    #[test]
    fn flows_are_the_live_forward_entries_with_their_translation_and_state() {
        let (live_key, mut live) = forward(1000, 8080, 500);
        live.flags = ct_flags::SNAT | ct_flags::SEEN_REPLY;
        let (dead_key, dead) = forward(1001, 8080, 50);
        let (reply_key, reply) = reply_of(&live_key, &live);
        let entries = [(live_key, live), (dead_key, dead), (reply_key, reply)];
        let flows = flows_of::<Addr4>(entries.into_iter(), 100);
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
    fn udp_flows_to_departed_endpoints_go_unless_the_frontend_has_none() {
        let udp = |client_port: u16, rev_nat_id: u32, backend_port: u16| {
            let (mut key, mut entry) = forward(client_port, backend_port, 500);
            key.protocol = protocol::UDP;
            entry.rev_nat_id = rev_nat_id;
            (key, entry)
        };
        let backend = |port: u16| udp(1, 1, port).1.destination();
        let (kept, kept_entry) = udp(1000, 1, 8080);
        let (departed, departed_entry) = udp(1001, 1, 9090);
        let (waiting, waiting_entry) = udp(1002, 2, 9090);
        let (gone, gone_entry) = udp(1003, 3, 8080);
        let (tcp, mut tcp_entry) = forward(1004, 9090, 500);
        tcp_entry.rev_nat_id = 1;
        let entries: StdHashMap<_, _> = [
            (kept, kept_entry),
            (departed, departed_entry),
            (waiting, waiting_entry),
            (gone, gone_entry),
            (tcp, tcp_entry),
        ]
        .into_iter()
        .collect();
        let serving: UdpServing = [
            (1, Some([backend(8080)].into_iter().collect())),
            // No serving endpoint: flows wait for endpoints to return.
            (2, None),
        ]
        .into_iter()
        .collect();
        let mut stale = stale_udp::<Addr4>(&entries, &serving);
        stale.sort();
        let mut expected = vec![departed, gone];
        expected.sort();
        assert_eq!(stale, expected, "TCP and serving backends stay");
    }

    #[test]
    fn an_orphan_reply_entry_is_garbage() {
        let (key, entry) = forward(1000, 8080, 500);
        let (reply_key, reply) = reply_of(&key, &entry);
        let entries: StdHashMap<_, _> = [(reply_key, reply)].into_iter().collect();
        assert_eq!(garbage::<Addr4>(&entries, 100), vec![reply_key]);
    }
}
