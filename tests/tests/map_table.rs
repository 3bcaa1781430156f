//! The eBPF object declares exactly the maps of `proxy_common::map_table`: the same names,
//! kinds, key and value sizes, default capacities and flags. The eBPF crate already checks each
//! static against its entry at compile time; this checks the other direction (no table entry
//! without a map, no map outside the table) on the object the agent embeds. No root needed.
use std::collections::BTreeMap;

use aya_obj::{EbpfSectionKind, Object};
use proxy_common::map_table::{self, MapKind};
use switchyard_tests::datapath::tc_fixture::object_path;

/// (kind, key size, value size, max entries, flags) of each map of the object, by name.
type Declared = BTreeMap<String, (Option<MapKind>, u32, u32, u32, u32)>;

fn declared_maps() -> Declared {
    let path = object_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "reading the eBPF object {} (run `cargo xtask build`): {error}",
            path.display()
        )
    });
    let object = Object::parse(&bytes).expect("the eBPF object parses");
    object
        .maps
        .iter()
        // Global data sections (.rodata, .bss) are maps too, but not declared ones.
        .filter(|(_, map)| {
            matches!(
                map.section_kind(),
                EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps
            )
        })
        .map(|(name, map)| {
            (
                name.clone(),
                (
                    MapKind::from_bpf_type(map.map_type()),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries(),
                    map.map_flags(),
                ),
            )
        })
        .collect()
}

#[test]
fn the_ebpf_object_declares_exactly_the_maps_of_the_table() {
    let declared = declared_maps();
    let table: Declared = map_table::ALL
        .iter()
        .map(|spec| {
            (
                spec.name.to_owned(),
                (
                    Some(spec.kind),
                    spec.key_size,
                    spec.value_size,
                    spec.default_capacity(),
                    spec.flags,
                ),
            )
        })
        .collect();
    assert_eq!(
        declared, table,
        "the eBPF object's maps (left) differ from proxy_common::map_table (right)"
    );
}

#[test]
fn the_agents_hash_maps_are_declared_without_preallocation() {
    let declared = declared_maps();
    for name in [
        "SVC4_V1",
        "SVC6_V1",
        "BACKEND4_V1",
        "BACKEND6_V1",
        "REV_NAT4_V1",
        "REV_NAT6_V1",
        "SVC_NAMES_V1",
    ] {
        let (kind, _, _, _, flags) = declared[name];
        assert_eq!(kind, Some(MapKind::Hash), "{name}");
        assert_eq!(
            flags,
            proxy_common::BPF_F_NO_PREALLOC,
            "{name} is preallocated"
        );
    }
}
