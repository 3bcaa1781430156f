//! The plan's vocabulary: one change to the maps, in domain terms (addresses, ids, slots).
//! `maps::encode` turns each operation into the map entry it writes.
use std::{net::IpAddr, sync::Arc};

use crate::model::{BackendAddr, Cidr, FrontendKey};

/// The master entry (slot 0) of a frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Master {
    pub count: u16,
    pub rev_nat_id: u32,
    pub flags: u16,
    pub affinity_timeout_secs: u32,
    /// With flag `MAGLEV`: the number (1-based) of the frontend's Maglev table; else 0.
    pub maglev_table: u32,
}

/// Address of a reverse-NAT entry: the service address replies must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatTarget {
    pub ip: IpAddr,
    pub port: u16,
}

/// One change to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertBackend {
        id: u32,
        backend: BackendAddr,
    },
    UpsertRevNat {
        id: u32,
        target: RevNatTarget,
    },
    UpsertSlot {
        frontend: FrontendKey,
        slot: u16,
        backend_id: u32,
        rev_nat_id: u32,
    },
    UpsertMaster {
        frontend: FrontendKey,
        master: Master,
    },
    DeleteSlot {
        frontend: FrontendKey,
        slot: u16,
    },
    DeleteMaster {
        frontend: FrontendKey,
    },
    DeleteRevNat {
        id: u32,
        target: RevNatTarget,
    },
    DeleteBackend {
        id: u32,
        backend: BackendAddr,
    },
    /// Records which Service port a rev-NAT id stands for (for `inspect`).
    UpsertName {
        id: u32,
        name: String,
    },
    DeleteName {
        id: u32,
    },
    /// Admits sources in `range` to the frontends whose rev-NAT id is `rev_nat_id`.
    UpsertSourceRange {
        rev_nat_id: u32,
        range: Cidr,
    },
    DeleteSourceRange {
        rev_nat_id: u32,
        range: Cidr,
    },
    /// Fills Maglev table `table` (1-based): slot `i` sends flows to `backend_ids[i]`.
    UpsertMaglevTable {
        table: u32,
        backend_ids: Arc<[u32]>,
    },
    /// Frees Maglev table `table` (no master points at it any more).
    DeleteMaglevTable {
        table: u32,
    },
}

impl Op {
    /// Whether the operation removes an entry (a plan made only of these frees map space).
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            Self::DeleteSlot { .. }
                | Self::DeleteMaster { .. }
                | Self::DeleteRevNat { .. }
                | Self::DeleteBackend { .. }
                | Self::DeleteName { .. }
                | Self::DeleteSourceRange { .. }
                | Self::DeleteMaglevTable { .. }
        )
    }
}
