//! The wire encoding: plan operations into map entries in the kernel's layout, and map content
//! back into the operations that recreate it (restore). Encoding lives only here, so the real
//! writer, the fake writer and restore all agree on the layout.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use proxy_common::{
    Addr4, Addr6, AffinityKey, AffinityValue, Backend4, Backend6, RevNat4, RevNat6, Service4Key,
    Service6Key, ServiceGuard4, ServiceGuard6, ServiceName, ServiceStatus, ServiceValue,
    SourceRange4, SourceRange6, WireAddr, backend_state, maglev::MaglevConfig, map_names, protocol,
    scope, service_flags,
};

use crate::{
    model::{BackendAddr, Cidr, FrontendKey, Protocol, Scope},
    plan::{
        mirror::Programmed,
        op::{Master, Op, RevNatTarget},
    },
};

/// A key of an LPM trie in the kernel's layout (`struct bpf_lpm_trie_key`): the number of
/// leading bits of `data` that count, then the data. Kept apart from aya's `Key` so that it
/// can be ordered and compared in images and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmKey<D> {
    pub prefix_len: u32,
    pub data: D,
}

/// One map entry to write (`Some`) or delete (`None`), in the kernel's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a write is built and handed to the kernel at once; boxing would cost an allocation per entry"
)]
pub enum MapWrite {
    Service4(Service4Key, Option<ServiceValue>),
    Service6(Service6Key, Option<ServiceValue>),
    Backend4(u32, Option<Backend4>),
    Backend6(u32, Option<Backend6>),
    RevNat4(u32, Option<RevNat4>),
    RevNat6(u32, Option<RevNat6>),
    /// Session-affinity entries are written by the datapath; the agent only deletes them.
    AffinityDelete(AffinityKey),
    ServiceName(u32, Option<ServiceName>),
    /// Why a Service (key: `namespace/name`) is not programmed.
    Status(ServiceName, Option<ServiceStatus>),
    /// A source range; the value is always 1 (the datapath only asks whether a prefix
    /// matches).
    SourceRange4(LpmKey<SourceRange4>, Option<u32>),
    SourceRange6(LpmKey<SourceRange6>, Option<u32>),
    /// A service-guard prefix with its `guard_flags`.
    Guard4(LpmKey<ServiceGuard4>, Option<u32>),
    Guard6(LpmKey<ServiceGuard6>, Option<u32>),
    /// A whole Maglev table (1-based number): its slots' backend ids. Freeing one (`None`)
    /// writes nothing to the kernel: no master points at it any more.
    Maglev(u32, Option<Arc<[u32]>>),
    /// The Maglev tables' size and the flow hash's seed.
    MaglevConfig(MaglevConfig),
}

/// The content of the maps the agent owns (not the datapath's own LRUs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapImage {
    pub services4: BTreeMap<Service4Key, ServiceValue>,
    pub services6: BTreeMap<Service6Key, ServiceValue>,
    pub backends4: BTreeMap<u32, Backend4>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub rev_nat4: BTreeMap<u32, RevNat4>,
    pub rev_nat6: BTreeMap<u32, RevNat6>,
    /// The datapath's session-affinity entries (read to prune stale ones).
    pub affinity: BTreeMap<AffinityKey, AffinityValue>,
    pub service_names: BTreeMap<u32, ServiceName>,
    pub service_status: BTreeMap<ServiceName, ServiceStatus>,
    pub source_ranges4: BTreeMap<LpmKey<SourceRange4>, u32>,
    pub source_ranges6: BTreeMap<LpmKey<SourceRange6>, u32>,
    pub guard4: BTreeMap<LpmKey<ServiceGuard4>, u32>,
    pub guard6: BTreeMap<LpmKey<ServiceGuard6>, u32>,
    /// The Maglev tables masters point at (the kernel writer reads only those), by number.
    pub maglev: BTreeMap<u32, Arc<[u32]>>,
    /// The Maglev settings the datapath uses (`None`: maps without Maglev).
    pub maglev_config: Option<MaglevConfig>,
}

fn put<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

impl MapWrite {
    /// The map this write goes to.
    pub fn map_name(&self) -> &'static str {
        match self {
            Self::Service4(..) => map_names::SERVICES4,
            Self::Service6(..) => map_names::SERVICES6,
            Self::Backend4(..) => map_names::BACKENDS4,
            Self::Backend6(..) => map_names::BACKENDS6,
            Self::RevNat4(..) => map_names::REV_NAT4,
            Self::RevNat6(..) => map_names::REV_NAT6,
            Self::AffinityDelete(..) => map_names::AFFINITY,
            Self::ServiceName(..) => map_names::SERVICE_NAMES,
            Self::Status(..) => map_names::SERVICE_STATUS,
            Self::SourceRange4(..) => map_names::SOURCE_RANGES4,
            Self::SourceRange6(..) => map_names::SOURCE_RANGES6,
            Self::Guard4(..) => map_names::SERVICE_GUARD4,
            Self::Guard6(..) => map_names::SERVICE_GUARD6,
            Self::Maglev(..) => map_names::MAGLEV,
            Self::MaglevConfig(..) => map_names::MAGLEV_CONFIG,
        }
    }

    /// Whether the write removes an entry.
    pub fn is_delete(&self) -> bool {
        match self {
            Self::Service4(_, value) | Self::Service6(_, value) => value.is_none(),
            Self::Backend4(_, value) => value.is_none(),
            Self::Backend6(_, value) => value.is_none(),
            Self::RevNat4(_, value) => value.is_none(),
            Self::RevNat6(_, value) => value.is_none(),
            Self::AffinityDelete(_) => true,
            Self::ServiceName(_, value) => value.is_none(),
            Self::Status(_, value) => value.is_none(),
            Self::SourceRange4(_, value)
            | Self::SourceRange6(_, value)
            | Self::Guard4(_, value)
            | Self::Guard6(_, value) => value.is_none(),
            Self::Maglev(_, content) => content.is_none(),
            Self::MaglevConfig(_) => false,
        }
    }
}

impl MapImage {
    /// Whether the entry a write names is present (an update of it needs no new room).
    pub fn holds(&self, write: &MapWrite) -> bool {
        match write {
            MapWrite::Service4(key, _) => self.services4.contains_key(key),
            MapWrite::Service6(key, _) => self.services6.contains_key(key),
            MapWrite::Backend4(id, _) => self.backends4.contains_key(id),
            MapWrite::Backend6(id, _) => self.backends6.contains_key(id),
            MapWrite::RevNat4(id, _) => self.rev_nat4.contains_key(id),
            MapWrite::RevNat6(id, _) => self.rev_nat6.contains_key(id),
            MapWrite::AffinityDelete(key) => self.affinity.contains_key(key),
            MapWrite::ServiceName(id, _) => self.service_names.contains_key(id),
            MapWrite::Status(key, _) => self.service_status.contains_key(key),
            MapWrite::SourceRange4(key, _) => self.source_ranges4.contains_key(key),
            MapWrite::SourceRange6(key, _) => self.source_ranges6.contains_key(key),
            MapWrite::Guard4(key, _) => self.guard4.contains_key(key),
            MapWrite::Guard6(key, _) => self.guard6.contains_key(key),
            MapWrite::Maglev(table, _) => self.maglev.contains_key(table),
            MapWrite::MaglevConfig(_) => true,
        }
    }

    /// How many entries the map a write goes to holds.
    pub fn len_of(&self, write: &MapWrite) -> usize {
        match write {
            MapWrite::Service4(..) => self.services4.len(),
            MapWrite::Service6(..) => self.services6.len(),
            MapWrite::Backend4(..) => self.backends4.len(),
            MapWrite::Backend6(..) => self.backends6.len(),
            MapWrite::RevNat4(..) => self.rev_nat4.len(),
            MapWrite::RevNat6(..) => self.rev_nat6.len(),
            MapWrite::AffinityDelete(..) => self.affinity.len(),
            MapWrite::ServiceName(..) => self.service_names.len(),
            MapWrite::Status(..) => self.service_status.len(),
            MapWrite::SourceRange4(..) => self.source_ranges4.len(),
            MapWrite::SourceRange6(..) => self.source_ranges6.len(),
            MapWrite::Guard4(..) => self.guard4.len(),
            MapWrite::Guard6(..) => self.guard6.len(),
            MapWrite::Maglev(..) => self.maglev.len(),
            MapWrite::MaglevConfig(_) => 1,
        }
    }

    /// Applies one write the way the kernel would (deleting a missing key is a no-op).
    pub fn apply(&mut self, write: MapWrite) {
        match write {
            MapWrite::Service4(key, value) => put(&mut self.services4, key, value),
            MapWrite::Service6(key, value) => put(&mut self.services6, key, value),
            MapWrite::Backend4(id, value) => put(&mut self.backends4, id, value),
            MapWrite::Backend6(id, value) => put(&mut self.backends6, id, value),
            MapWrite::RevNat4(id, value) => put(&mut self.rev_nat4, id, value),
            MapWrite::RevNat6(id, value) => put(&mut self.rev_nat6, id, value),
            MapWrite::AffinityDelete(key) => put(&mut self.affinity, key, None),
            MapWrite::ServiceName(id, name) => put(&mut self.service_names, id, name),
            MapWrite::Status(key, status) => put(&mut self.service_status, key, status),
            MapWrite::SourceRange4(key, value) => put(&mut self.source_ranges4, key, value),
            MapWrite::SourceRange6(key, value) => put(&mut self.source_ranges6, key, value),
            MapWrite::Guard4(key, value) => put(&mut self.guard4, key, value),
            MapWrite::Guard6(key, value) => put(&mut self.guard6, key, value),
            MapWrite::Maglev(table, content) => put(&mut self.maglev, table, content),
            MapWrite::MaglevConfig(config) => self.maglev_config = Some(config),
        }
    }
}

// --- encoding -----------------------------------------------------------------------------

fn protocol_byte(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => protocol::TCP,
        Protocol::Udp => protocol::UDP,
    }
}

fn protocol_from_byte(byte: u8) -> Option<Protocol> {
    match byte {
        protocol::TCP => Some(Protocol::Tcp),
        protocol::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

fn scope_byte(value: Scope) -> u8 {
    match value {
        Scope::Cluster => scope::EXTERNAL,
        Scope::Local => scope::LOCAL,
    }
}

fn scope_from_byte(byte: u8) -> Option<Scope> {
    match byte {
        scope::EXTERNAL => Some(Scope::Cluster),
        scope::LOCAL => Some(Scope::Local),
        _ => None,
    }
}

/// The bits of a source-range key before the address: the rev-NAT id, matched exactly.
const RANGE_ID_BITS: u32 = 32;

fn source_range_write(rev_nat_id: u32, range: &Cidr, keep: bool) -> MapWrite {
    let value = keep.then_some(1);
    // The trie compares bytes from the first: the id goes big-endian so its bits come in
    // order, the address in network order like every address in the maps.
    let rev_nat_id_be = rev_nat_id.to_be();
    let prefix_len = RANGE_ID_BITS + u32::from(range.prefix());
    match range.ip() {
        IpAddr::V4(ip) => MapWrite::SourceRange4(
            LpmKey {
                prefix_len,
                data: SourceRange4 {
                    rev_nat_id_be,
                    address: Addr4::from_ip(ip),
                },
            },
            value,
        ),
        IpAddr::V6(ip) => MapWrite::SourceRange6(
            LpmKey {
                prefix_len,
                data: SourceRange6 {
                    rev_nat_id_be,
                    address: Addr6::from_ip(ip),
                },
            },
            value,
        ),
    }
}

/// The write that makes the service guard hold `flags` for `range` (`None`: no entry).
pub fn guard_write(range: &Cidr, flags: Option<u32>) -> MapWrite {
    let prefix_len = u32::from(range.prefix());
    match range.ip() {
        IpAddr::V4(ip) => MapWrite::Guard4(
            LpmKey {
                prefix_len,
                data: ServiceGuard4 {
                    address: Addr4::from_ip(ip),
                },
            },
            flags,
        ),
        IpAddr::V6(ip) => MapWrite::Guard6(
            LpmKey {
                prefix_len,
                data: ServiceGuard6 {
                    address: Addr6::from_ip(ip),
                },
            },
            flags,
        ),
    }
}

/// The service-guard entries of an image, by range; keys that are no range (a prefix longer
/// than the address) are left out.
pub fn guard_from_image(image: &MapImage) -> BTreeMap<Cidr, u32> {
    let v4 = image.guard4.iter().filter_map(|(key, flags)| {
        let prefix = u8::try_from(key.prefix_len).ok()?;
        Some((
            Cidr::new(IpAddr::V4(key.data.address.to_ip()), prefix)?,
            *flags,
        ))
    });
    let v6 = image.guard6.iter().filter_map(|(key, flags)| {
        let prefix = u8::try_from(key.prefix_len).ok()?;
        Some((
            Cidr::new(IpAddr::V6(key.data.address.to_ip()), prefix)?,
            *flags,
        ))
    });
    v4.chain(v6).collect()
}

/// The (rev-NAT id, range) a source-range key stands for; `None` for a key whose prefix does
/// not cover the id or is longer than the address.
fn source_range_from_key(prefix_len: u32, rev_nat_id_be: u32, ip: IpAddr) -> Option<(u32, Cidr)> {
    let prefix = u8::try_from(prefix_len.checked_sub(RANGE_ID_BITS)?).ok()?;
    let range = Cidr::new(ip, prefix)?;
    // A key with host bits set is not one this agent writes.
    (range.ip() == ip).then_some((u32::from_be(rev_nat_id_be), range))
}

/// A service-map key for one slot of a frontend.
enum ServiceKey {
    V4(Service4Key),
    V6(Service6Key),
}

fn service_key(frontend: &FrontendKey, slot: u16) -> ServiceKey {
    let port_be = frontend.port.to_be();
    let protocol = protocol_byte(frontend.protocol);
    let scope = scope_byte(frontend.scope);
    match frontend.ip {
        IpAddr::V4(ip) => ServiceKey::V4(Service4Key {
            address: Addr4::from_ip(ip),
            port_be,
            backend_slot: slot,
            protocol,
            scope,
            pad: [0; 2],
        }),
        IpAddr::V6(ip) => ServiceKey::V6(Service6Key {
            address: Addr6::from_ip(ip),
            port_be,
            backend_slot: slot,
            protocol,
            scope,
            pad: [0; 2],
        }),
    }
}

fn service_write(frontend: &FrontendKey, slot: u16, value: Option<ServiceValue>) -> MapWrite {
    match service_key(frontend, slot) {
        ServiceKey::V4(key) => MapWrite::Service4(key, value),
        ServiceKey::V6(key) => MapWrite::Service6(key, value),
    }
}

fn backend_write(id: u32, backend: &BackendAddr, keep: bool) -> MapWrite {
    let port_be = backend.port.to_be();
    let protocol = protocol_byte(backend.protocol);
    let state = backend_state::ACTIVE;
    match backend.ip {
        IpAddr::V4(ip) => MapWrite::Backend4(
            id,
            keep.then_some(Backend4 {
                address: Addr4::from_ip(ip),
                port_be,
                protocol,
                state,
            }),
        ),
        IpAddr::V6(ip) => MapWrite::Backend6(
            id,
            keep.then_some(Backend6 {
                address: Addr6::from_ip(ip),
                port_be,
                protocol,
                state,
            }),
        ),
    }
}

fn rev_nat_write(id: u32, target: &RevNatTarget, keep: bool) -> MapWrite {
    let port_be = target.port.to_be();
    match target.ip {
        IpAddr::V4(ip) => MapWrite::RevNat4(
            id,
            keep.then_some(RevNat4 {
                address: Addr4::from_ip(ip),
                port_be,
                pad: 0,
            }),
        ),
        IpAddr::V6(ip) => MapWrite::RevNat6(
            id,
            keep.then_some(RevNat6 {
                address: Addr6::from_ip(ip),
                port_be,
                pad: 0,
            }),
        ),
    }
}

/// `namespace/name:port`, truncated to fit and NUL-padded.
fn encode_name(name: &str) -> ServiceName {
    let mut encoded = ServiceName::default();
    let mut length = name.len().min(encoded.bytes.len() - 1);
    while !name.is_char_boundary(length) {
        length -= 1;
    }
    encoded.bytes[..length].copy_from_slice(&name.as_bytes()[..length]);
    encoded
}

/// `text` in `N` bytes, truncated at a character boundary and NUL-padded.
fn fixed_text<const N: usize>(text: &str) -> [u8; N] {
    let mut bytes = [0u8; N];
    let mut length = text.len().min(N - 1);
    while !text.is_char_boundary(length) {
        length -= 1;
    }
    bytes[..length].copy_from_slice(&text.as_bytes()[..length]);
    bytes
}

fn text_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The status entry of a Service (`namespace/name`): `Some((reason, message))` when it is not
/// programmed, `None` to clear it.
pub fn status_write(service: &str, status: Option<(&str, &str)>) -> MapWrite {
    let key = ServiceName {
        bytes: fixed_text(service),
    };
    MapWrite::Status(
        key,
        status.map(|(reason, message)| ServiceStatus {
            reason: fixed_text(reason),
            message: fixed_text(message),
        }),
    )
}

/// The (service, reason, message) a status entry records.
pub fn decode_status(key: &ServiceName, status: &ServiceStatus) -> (String, String, String) {
    (
        text_of(&key.bytes),
        text_of(&status.reason),
        text_of(&status.message),
    )
}

fn decode_name(name: &ServiceName) -> String {
    let end = name
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(name.bytes.len());
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

/// The map entry an operation writes.
pub fn encode(op: &Op) -> MapWrite {
    match op {
        Op::UpsertName { id, name } => MapWrite::ServiceName(*id, Some(encode_name(name))),
        Op::DeleteName { id } => MapWrite::ServiceName(*id, None),
        Op::UpsertBackend { id, backend } => backend_write(*id, backend, true),
        Op::DeleteBackend { id, backend } => backend_write(*id, backend, false),
        Op::UpsertRevNat { id, target } => rev_nat_write(*id, target, true),
        Op::DeleteRevNat { id, target } => rev_nat_write(*id, target, false),
        Op::UpsertSlot {
            frontend,
            slot,
            backend_id,
            rev_nat_id,
        } => service_write(
            frontend,
            *slot,
            Some(ServiceValue {
                backend_id: *backend_id,
                rev_nat_id: *rev_nat_id,
                ..Default::default()
            }),
        ),
        Op::UpsertMaster { frontend, master } => service_write(
            frontend,
            0,
            Some(ServiceValue {
                backend_id: master.maglev_table,
                count: master.count,
                flags: master.flags,
                rev_nat_id: master.rev_nat_id,
                affinity_timeout_secs: master.affinity_timeout_secs,
            }),
        ),
        Op::DeleteSlot { frontend, slot } => service_write(frontend, *slot, None),
        Op::DeleteMaster { frontend } => service_write(frontend, 0, None),
        Op::UpsertSourceRange { rev_nat_id, range } => source_range_write(*rev_nat_id, range, true),
        Op::DeleteSourceRange { rev_nat_id, range } => {
            source_range_write(*rev_nat_id, range, false)
        }
        Op::UpsertMaglevTable { table, backend_ids } => {
            MapWrite::Maglev(*table, Some(backend_ids.clone()))
        }
        Op::DeleteMaglevTable { table } => MapWrite::Maglev(*table, None),
    }
}

/// Entries found in the maps that this agent version cannot interpret (left untouched).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unreadable(pub Vec<String>);

/// Decodes the maps' content into the operations that recreate it, in an order the mirror
/// can replay (backends, reverse NAT, names, source ranges, then the services map), plus the
/// entries this agent cannot interpret (left untouched).
pub fn decode(image: &MapImage) -> (Vec<Op>, Unreadable) {
    let mut ops = Vec::new();
    let unreadable = decode_into(image, &mut ops);
    (ops, unreadable)
}

/// Decodes the maps' content straight into `sink` (no list of operations in between).
fn decode_into(image: &MapImage, sink: &mut impl Extend<Op>) -> Unreadable {
    let mut unreadable = Unreadable::default();
    decode_backends(image, sink, &mut unreadable);
    let v4 = image.rev_nat4.iter().map(|(id, rev)| {
        let ip = IpAddr::V4(rev.address.to_ip());
        (*id, ip, rev.port_be)
    });
    let v6 = image.rev_nat6.iter().map(|(id, rev)| {
        let ip = IpAddr::V6(rev.address.to_ip());
        (*id, ip, rev.port_be)
    });
    sink.extend(v4.chain(v6).map(|(id, ip, port_be)| Op::UpsertRevNat {
        id,
        target: RevNatTarget {
            ip,
            port: u16::from_be(port_be),
        },
    }));
    sink.extend(image.service_names.iter().map(|(id, name)| Op::UpsertName {
        id: *id,
        name: decode_name(name),
    }));
    decode_source_ranges(image, sink, &mut unreadable);
    sink.extend(
        image
            .maglev
            .iter()
            .map(|(table, content)| Op::UpsertMaglevTable {
                table: *table,
                backend_ids: content.clone(),
            }),
    );
    decode_services(image, sink, &mut unreadable);
    unreadable
}

/// Rebuilds the mirror from the maps' content (restore after a restart, drift repair).
pub fn programmed_from_image(image: &MapImage) -> (Programmed, Unreadable) {
    let mut programmed = Programmed::default();
    let unreadable = decode_into(image, &mut programmed);
    (programmed, unreadable)
}

fn decode_services(image: &MapImage, ops: &mut impl Extend<Op>, unreadable: &mut Unreadable) {
    let v4 = image.services4.iter().map(|(k, v)| {
        let ip = IpAddr::V4(k.address.to_ip());
        (ip, k.port_be, k.protocol, k.scope, k.backend_slot, v)
    });
    let v6 = image.services6.iter().map(|(k, v)| {
        let ip = IpAddr::V6(k.address.to_ip());
        (ip, k.port_be, k.protocol, k.scope, k.backend_slot, v)
    });
    for (ip, port_be, protocol, scope, slot, value) in v4.chain(v6) {
        let port = u16::from_be(port_be);
        let (Some(protocol), Some(scope)) = (protocol_from_byte(protocol), scope_from_byte(scope))
        else {
            unreadable.0.push(format!(
                "service entry {ip} port {port} protocol {protocol} scope {scope}"
            ));
            continue;
        };
        let frontend = FrontendKey {
            ip,
            port,
            protocol,
            scope,
        };
        ops.extend(Some(if slot == 0 {
            Op::UpsertMaster {
                frontend,
                master: Master {
                    count: value.count,
                    rev_nat_id: value.rev_nat_id,
                    flags: value.flags,
                    affinity_timeout_secs: value.affinity_timeout_secs,
                    maglev_table: if value.flags & service_flags::MAGLEV == 0 {
                        0
                    } else {
                        value.backend_id
                    },
                },
            }
        } else {
            Op::UpsertSlot {
                frontend,
                slot,
                backend_id: value.backend_id,
                rev_nat_id: value.rev_nat_id,
            }
        }));
    }
}

fn decode_source_ranges(image: &MapImage, ops: &mut impl Extend<Op>, unreadable: &mut Unreadable) {
    let v4 = image.source_ranges4.keys().map(|key| {
        let ip = IpAddr::V4(key.data.address.to_ip());
        (key.prefix_len, key.data.rev_nat_id_be, ip)
    });
    let v6 = image.source_ranges6.keys().map(|key| {
        let ip = IpAddr::V6(key.data.address.to_ip());
        (key.prefix_len, key.data.rev_nat_id_be, ip)
    });
    for (prefix_len, rev_nat_id_be, ip) in v4.chain(v6) {
        match source_range_from_key(prefix_len, rev_nat_id_be, ip) {
            Some((rev_nat_id, range)) => {
                ops.extend(Some(Op::UpsertSourceRange { rev_nat_id, range }));
            }
            None => unreadable.0.push(format!(
                "source range {ip} prefix length {prefix_len} of rev-NAT id {}",
                u32::from_be(rev_nat_id_be)
            )),
        }
    }
}

fn decode_backends(image: &MapImage, ops: &mut impl Extend<Op>, unreadable: &mut Unreadable) {
    let v4 = image
        .backends4
        .iter()
        .map(|(id, b)| (*id, IpAddr::V4(b.address.to_ip()), b.port_be, b.protocol));
    let v6 = image
        .backends6
        .iter()
        .map(|(id, b)| (*id, IpAddr::V6(b.address.to_ip()), b.port_be, b.protocol));
    for (id, ip, port_be, protocol) in v4.chain(v6) {
        match protocol_from_byte(protocol) {
            Some(protocol) => {
                let backend = BackendAddr {
                    ip,
                    port: u16::from_be(port_be),
                    protocol,
                };
                ops.extend(Some(Op::UpsertBackend { id, backend }));
            }
            None => unreadable
                .0
                .push(format!("backend #{id} {ip} protocol {protocol}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `op.encode()` reads better in these tests than `encode(&op)`.
    trait Encode {
        fn encode(&self) -> MapWrite;
    }

    impl Encode for Op {
        fn encode(&self) -> MapWrite {
            super::encode(self)
        }
    }

    fn frontend(ip: &str) -> FrontendKey {
        FrontendKey {
            ip: ip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Cluster,
        }
    }

    #[test]
    fn encoding_keeps_network_byte_order_in_memory() {
        let write = Op::UpsertMaster {
            frontend: frontend("10.96.0.1"),
            master: Master::default(),
        }
        .encode();
        let MapWrite::Service4(key, _) = write else {
            panic!("expected an IPv4 service write")
        };
        // Memory order is the wire order: 10, 96, 0, 1 and port 80 as 0x00 0x50.
        assert_eq!(key.address.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.port_be.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn image_round_trips_through_the_mirror() {
        let backend = BackendAddr {
            ip: "fd00::2".parse().unwrap(),
            port: 8080,
            protocol: Protocol::Udp,
        };
        let ops = [
            Op::UpsertBackend { id: 7, backend },
            Op::UpsertRevNat {
                id: 3,
                target: RevNatTarget {
                    ip: "fd00::96".parse().unwrap(),
                    port: 80,
                },
            },
            Op::UpsertSlot {
                frontend: frontend("fd00::96"),
                slot: 1,
                backend_id: 7,
                rev_nat_id: 3,
            },
            Op::UpsertMaster {
                frontend: frontend("fd00::96"),
                master: Master {
                    count: 1,
                    rev_nat_id: 3,
                    flags: 1,
                    affinity_timeout_secs: 0,
                    maglev_table: 0,
                },
            },
        ];
        let restored = restored_after(&ops);
        assert_eq!(restored.backend_id(&backend), Some(7));
    }

    #[test]
    fn the_local_scope_is_the_scope_local_byte_and_reads_back() {
        let local = FrontendKey {
            scope: Scope::Local,
            ..frontend("10.96.0.1")
        };
        let MapWrite::Service4(key, _) = Op::DeleteMaster { frontend: local }.encode() else {
            panic!("expected an IPv4 service write")
        };
        assert_eq!(key.scope, scope::LOCAL);
        let MapWrite::Service4(key, _) = Op::DeleteMaster {
            frontend: frontend("10.96.0.1"),
        }
        .encode() else {
            panic!("expected an IPv4 service write")
        };
        assert_eq!(key.scope, scope::EXTERNAL);
        assert_eq!(scope_from_byte(scope::LOCAL), Some(Scope::Local));
        assert_eq!(scope_from_byte(7), None);
    }

    #[test]
    fn a_source_range_key_matches_the_id_exactly_then_the_address_by_its_prefix() {
        let range = crate::model::parse_cidr_lenient("203.0.113.0/25").unwrap();
        let write = Op::UpsertSourceRange {
            rev_nat_id: 0x0102_0304,
            range,
        }
        .encode();
        let MapWrite::SourceRange4(key, value) = write else {
            panic!("expected an IPv4 source-range write")
        };
        assert_eq!(key.prefix_len, 32 + 25);
        // Memory order is what the trie compares: the id's bytes most significant first,
        // then the address in network order.
        assert_eq!(key.data.rev_nat_id_be.to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(key.data.address.to_ne_bytes(), [203, 0, 113, 0]);
        assert_eq!(value, Some(1));
        let range6 = crate::model::parse_cidr_lenient("2001:db8::/32").unwrap();
        let MapWrite::SourceRange6(key, None) = (Op::DeleteSourceRange {
            rev_nat_id: 9,
            range: range6,
        })
        .encode() else {
            panic!("expected an IPv6 source-range delete")
        };
        assert_eq!(key.prefix_len, 32 + 32);
        assert_eq!(key.data.address[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn source_ranges_and_local_scopes_round_trip_through_the_maps() {
        let local = FrontendKey {
            scope: Scope::Local,
            ..frontend("1.2.3.4")
        };
        let ops = [
            Op::UpsertSourceRange {
                rev_nat_id: 3,
                range: crate::model::parse_cidr_lenient("203.0.113.0/25").unwrap(),
            },
            Op::UpsertSourceRange {
                rev_nat_id: 3,
                range: Cidr::host("1.2.3.4".parse().unwrap()),
            },
            Op::UpsertSourceRange {
                rev_nat_id: 4,
                range: crate::model::parse_cidr_lenient("::/0").unwrap(),
            },
            Op::UpsertMaster {
                frontend: local,
                master: Master {
                    count: 0,
                    rev_nat_id: 3,
                    flags: proxy_common::service_flags::LOAD_BALANCER,
                    affinity_timeout_secs: 0,
                    maglev_table: 0,
                },
            },
        ];
        let restored = restored_after(&ops);
        assert_eq!(restored.source_ranges.len(), 3);
    }

    #[test]
    fn a_source_range_key_this_agent_would_not_write_is_left_alone() {
        let mut image = MapImage::default();
        let bogus = LpmKey {
            prefix_len: 16,
            data: SourceRange4::default(),
        };
        image.source_ranges4.insert(bogus, 1);
        let (restored, unreadable) = programmed_from_image(&image);
        assert!(restored.source_ranges.is_empty());
        assert_eq!(unreadable.0.len(), 1);
    }

    /// Writes `ops` into an image and reads it back: what the agent restores from the pins,
    /// checked to equal what the mirror recorded.
    fn restored_after(ops: &[Op]) -> Programmed {
        let mut image = MapImage::default();
        let mut mirror = Programmed::default();
        for op in ops {
            image.apply(encode(op));
            mirror.apply(op);
        }
        let (restored, unreadable) = programmed_from_image(&image);
        assert!(unreadable.0.is_empty(), "{unreadable:?}");
        assert_eq!(restored, mirror);
        restored
    }
}
