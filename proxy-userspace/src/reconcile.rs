//! One sync of the control plane, proportional to the change: the Services a change touched go
//! through the model, their frontend addresses through the plan, and the plan of each Service
//! into the maps as one unit. A Service whose entries cannot be written (a full map, a Service
//! too large for its map) is undone, reported by name with the reason and retried later; it
//! never blocks another Service or a removal. The full recomputation (at start and at every
//! `--sync-period`) re-reads the maps, checks the incremental model against a model built from
//! scratch and repairs any drift.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use proxy_common::{guard_flags, maglev::MaglevConfig, map_names};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{affinity::stale_affinity, conntrack::UdpServing},
    hash::FastSet,
    maglev,
    maps::{
        MapWriter, WriteError, apply, apply_all_or_nothing,
        encode::{
            MapWrite, decode_status, encode, guard_from_image, guard_write, programmed_from_image,
            status_write,
        },
    },
    model::{
        Cidr, ClusterSnapshot, FrontendKey, HealthCheck, ModelConfig, Problem, Protocol, Scope,
        ServiceId,
        cluster::{Cluster, Touched},
        desired::{Changed, Desired, NodeFact},
        desired_of,
        service::service_output,
    },
    node::ModelConfigSource,
    plan::WithMaglev,
    plan::{
        identity,
        mirror::{Programmed, UdpPair},
        op::Op,
        plan_keys, sweep,
    },
    source::{Delta, lists_of},
};

/// Why a Service is not (completely) in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotProgrammed {
    /// A short, stable name of the reason (a metric label): `map_full`, `too_large`,
    /// `kernel`, ...
    pub reason: &'static str,
    pub message: String,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Map operations applied (undone ones not counted).
    pub operations: usize,
    /// Services that went through the model.
    pub recomputed: usize,
    /// Problems reported that were not reported before.
    pub new_problems: usize,
    /// (frontend, backend) pairs of UDP frontends that no longer exist: their connected
    /// sockets and tracked flows must go.
    pub removed_udp: BTreeSet<UdpPair>,
    /// The health-check listeners wanted, when they changed.
    pub health_checks: Option<BTreeMap<u16, HealthCheck>>,
    /// Services whose programming state changed: `Some` not programmed, `None` programmed
    /// again (or gone).
    pub status_changes: Vec<(ServiceId, Option<NotProgrammed>)>,
    /// The full recomputation disagreed with the incremental model (a bug; repaired).
    pub diverged: bool,
    /// Stale session-affinity entries removed (full syncs only).
    pub affinity_forgotten: usize,
    /// A UDP frontend changed (or this was a full sync): the TC path's UDP flows are to be
    /// reconciled against the serving endpoints.
    pub udp_touched: bool,
}

/// The control plane's state between syncs.
pub struct Reconciler {
    cluster: Cluster,
    desired: Desired,
    mirror: Programmed,
    writer: Box<dyn MapWriter>,
    /// The node facts of the last sync (`None` before the first).
    config: Option<ModelConfig>,
    /// Services touched since the last sync.
    dirty: FastSet<ServiceId>,
    /// Addresses whose plan failed: planned again at every sync until they are written.
    retry: BTreeSet<FrontendKey>,
    not_programmed: BTreeMap<ServiceId, NotProgrammed>,
    /// Problems last logged, per Service.
    reported: HashMap<ServiceId, Vec<Problem>>,
    /// Unlabelled slices already warned about.
    unlabelled: BTreeSet<String>,
    /// The service-CIDR guard as written (range → `guard_flags`).
    guard: BTreeMap<Cidr, u32>,
    /// The ServiceCIDR ranges the guard was last given.
    guard_cidrs: BTreeSet<Cidr>,
    /// A ServiceCIDR changed since the guard was last given its ranges.
    guard_cidrs_dirty: bool,
    /// Guard ranges whose write failed: written again at every sync until they are.
    guard_retry: BTreeSet<Cidr>,
    /// Unreadable ServiceCIDR ranges already warned about.
    guard_unreadable: BTreeSet<(String, String)>,
    /// The Maglev tables' size and seed.
    maglev: maglev::Settings,
    /// The Maglev settings the datapath has (`None`: never written).
    maglev_config: Option<MaglevConfig>,
}

/// The frontend addresses a plan covers, grouped by the Service they belong to now (`None`:
/// addresses nothing wants any more).
type Groups = BTreeMap<Option<ServiceId>, Vec<FrontendKey>>;

/// From this many addresses on, a sync first tries one plan over all of them.
const WHOLE_PLAN_MIN: usize = 256;
/// Addresses per plan of a many-address sync: the plan of 100 000 Services at once took more
/// memory than the whole desired state. (Small in unit tests, so their many-Service syncs
/// go through several chunks.)
const WHOLE_PLAN_CHUNK: usize = if cfg!(test) { 64 } else { 8_192 };

impl Reconciler {
    /// Adopts what the maps hold.
    pub fn new(writer: Box<dyn MapWriter>) -> Result<Self, WriteError> {
        let image = writer.read_image()?;
        let (mirror, unreadable) = programmed_from_image(&image);
        for entry in &unreadable.0 {
            warn!("leaving an entry this agent cannot interpret: {entry}");
        }
        Ok(Self {
            guard: guard_from_image(&image),
            guard_cidrs: BTreeSet::new(),
            guard_cidrs_dirty: true,
            guard_retry: BTreeSet::new(),
            guard_unreadable: BTreeSet::new(),
            maglev: maglev::Settings::default(),
            maglev_config: image.maglev_config,
            cluster: Cluster::default(),
            desired: Desired::default(),
            mirror,
            writer,
            config: None,
            dirty: FastSet::default(),
            retry: BTreeSet::new(),
            not_programmed: BTreeMap::new(),
            reported: HashMap::new(),
            unlabelled: BTreeSet::new(),
        })
    }

    /// Uses these Maglev settings. When the datapath indexes tables of another size, it is
    /// told to stop using them at once (new flows of Maglev Services are spread at random)
    /// until every Maglev master points at a table of the new size.
    #[must_use]
    pub fn with_maglev(mut self, settings: maglev::Settings) -> Self {
        self.maglev = settings;
        if let Some(pinned) = self.maglev_config
            && pinned.table_size != 0
            && pinned.table_size != settings.table_size
        {
            let paused = MaglevConfig {
                table_size: 0,
                seed: pinned.seed,
            };
            match self.writer.write(&MapWrite::MaglevConfig(paused)) {
                Ok(()) => self.maglev_config = Some(paused),
                Err(error) => warn!("cannot pause the Maglev tables of another size: {error}"),
            }
        }
        self
    }

    /// Gives the datapath the Maglev settings once every Maglev master points at a table
    /// built with them (so it never indexes a table with another table's size).
    fn publish_maglev_config(&mut self) {
        let wanted = MaglevConfig {
            table_size: self.maglev.table_size,
            seed: self.maglev.seed,
        };
        if self.maglev_config == Some(wanted)
            || (self.maglev_config.is_none() && self.mirror.maglev.tables.is_empty())
        {
            return;
        }
        let size = self.maglev.table_size as usize;
        let consistent = self.mirror.frontends.values().all(|frontend| {
            frontend.master.is_none_or(|master| {
                master.maglev_table == 0
                    || self
                        .mirror
                        .maglev
                        .tables
                        .get(&master.maglev_table)
                        .is_some_and(|table| table.len() == size)
            })
        });
        if !consistent {
            return;
        }
        match self.writer.write(&MapWrite::MaglevConfig(wanted)) {
            Ok(()) => {
                info!(
                    table_size = wanted.table_size,
                    "Maglev tables in use by the datapath"
                );
                self.maglev_config = Some(wanted);
            }
            Err(error) => warn!("cannot write the Maglev settings: {error}"),
        }
    }

    /// Records what a source reported; the Services it touched are synced next time.
    pub fn absorb(&mut self, delta: Delta) -> Touched {
        let touched = delta.apply_to(&mut self.cluster);
        self.dirty.extend(touched.services.iter().cloned());
        self.guard_cidrs_dirty |= touched.service_cidrs;
        touched
    }

    /// The cluster as the sources reported it.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The mirror of the maps.
    pub fn mirror(&self) -> &Programmed {
        &self.mirror
    }

    /// The frontends whose entries changed since the last call.
    pub fn take_touched_frontends(&mut self) -> std::collections::HashSet<FrontendKey> {
        self.mirror.take_touched()
    }

    /// The desired state.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Services that are not (completely) programmed, with the reason.
    pub fn not_programmed(&self) -> &BTreeMap<ServiceId, NotProgrammed> {
        &self.not_programmed
    }

    /// Whether a sync has work waiting (touched Services or addresses to retry).
    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty()
            || !self.retry.is_empty()
            || self.guard_cidrs_dirty
            || !self.guard_retry.is_empty()
    }

    /// Whether some addresses failed and wait for a retry.
    pub fn has_failures(&self) -> bool {
        !self.retry.is_empty() || !self.guard_retry.is_empty()
    }

    /// The serving endpoints of every programmed UDP frontend, by rev-NAT id (for the TC
    /// path's UDP conntrack reconciler).
    pub fn udp_serving(&self) -> UdpServing {
        let mut serving = UdpServing::default();
        for (key, endpoints) in self.desired.udp_serving() {
            if let Some(id) = self.mirror.rev_nat_of(&key) {
                let set = (!endpoints.is_empty()).then(|| {
                    endpoints
                        .iter()
                        .map(|backend| std::net::SocketAddr::new(backend.ip, backend.port))
                        .collect()
                });
                serving.insert(id, set);
            }
        }
        serving
    }

    /// The service-CIDR guard as written.
    pub fn guard(&self) -> &BTreeMap<Cidr, u32> {
        &self.guard
    }

    /// Makes the cluster exactly `snapshot`, as a source's complete lists would, and syncs
    /// incrementally (tests and golden files: the agent's own path).
    pub fn sync_snapshot(
        &mut self,
        snapshot: &ClusterSnapshot,
        config: &ModelConfig,
    ) -> SyncReport {
        for delta in lists_of(snapshot) {
            self.absorb(delta);
        }
        let mut source = config.clone();
        let node = config
            .node_name
            .as_deref()
            .and_then(|name| self.cluster.node(name))
            .cloned();
        let config = source.model_config(node.as_ref());
        self.sync(&config)
    }

    /// The incremental sync: the touched Services (and those a node-fact change concerns)
    /// through the model, their addresses through the plan.
    pub fn sync(&mut self, config: &ModelConfig) -> SyncReport {
        let mut report = SyncReport::default();
        self.note_node_facts(config);
        let dirty = std::mem::take(&mut self.dirty);
        report.recomputed = dirty.len();
        let mut changed = Changed::default();
        for id in &dirty {
            let output = self
                .cluster
                .service(id)
                .map(|service| service_output(service, &self.cluster.slices_of(id), config));
            changed.merge(self.desired.set(id, output));
        }
        report.new_problems = self.report_problems(&changed.services);
        self.warn_unlabelled_slices();
        if changed.health_checks {
            report.health_checks = Some(self.desired.health_checks());
        }
        let mut keys = changed.keys;
        report.udp_touched = keys.iter().any(|key| key.protocol == Protocol::Udp);
        keys.append(&mut self.retry);
        self.program(keys, &mut report);
        self.publish_maglev_config();
        self.program_guard(changed.guard_ips, false);
        for id in &dirty {
            if self.cluster.service(id).is_none()
                && let Some(_) = self.not_programmed.remove(id)
            {
                report.status_changes.push((id.clone(), None));
            }
        }
        self.record_statuses(&report.status_changes);
        report
    }

    /// Records status changes in the status map, where `inspect` reads them.
    fn record_statuses(&mut self, changes: &[(ServiceId, Option<NotProgrammed>)]) {
        for (id, status) in changes {
            let status = status
                .as_ref()
                .map(|status| (status.reason, status.message.as_str()));
            let write = status_write(&id.to_string(), status);
            if let Err(failure) = self.writer.write(&write) {
                warn!(service = %id, "cannot record the Service's status for inspect: {failure}");
            }
        }
    }

    /// Makes the status map say exactly which Services are not programmed (a previous agent
    /// may have left entries).
    fn reconcile_statuses(
        &mut self,
        statuses: &BTreeMap<proxy_common::ServiceName, proxy_common::ServiceStatus>,
    ) {
        let recorded: BTreeMap<String, (String, String)> = statuses
            .iter()
            .map(|(key, status)| {
                let (service, reason, message) = decode_status(key, status);
                (service, (reason, message))
            })
            .collect();
        let mut changes = Vec::new();
        for service in recorded.keys() {
            if !self
                .not_programmed
                .keys()
                .any(|id| id.to_string() == *service)
            {
                let write = status_write(service, None);
                if let Err(failure) = self.writer.write(&write) {
                    warn!(%service, "cannot clear the Service's recorded status: {failure}");
                }
            }
        }
        for (id, status) in &self.not_programmed {
            let wanted = (status.reason.to_owned(), status.message.clone());
            if recorded.get(&id.to_string()) != Some(&wanted) {
                changes.push((id.clone(), Some(status.clone())));
            }
        }
        self.record_statuses(&changes);
    }

    /// The full recomputation: re-reads the maps (drift repair), rebuilds the model from
    /// scratch and checks it against the incremental one, plans every address, and forgets
    /// stale affinity entries.
    pub fn resync(&mut self, config: &ModelConfig) -> Result<SyncReport, WriteError> {
        // Trust the maps, not the mirror. The old mirror goes first, so the two never coexist
        // (at 100 000 Services each is tens of megabytes).
        self.mirror = Programmed::default();
        let mut image = self.writer.read_image()?;
        let (mirror, unreadable) = programmed_from_image(&image);
        for entry in &unreadable.0 {
            warn!("leaving an entry this agent cannot interpret: {entry}");
        }
        self.mirror = mirror;
        self.maglev_config = image.maglev_config;
        let affinity = std::mem::take(&mut image.affinity);
        let statuses = std::mem::take(&mut image.service_status);
        let guard = guard_from_image(&image);
        drop(image);
        self.config = Some(config.clone());
        let mut all = std::mem::take(&mut self.dirty);
        let mut report = SyncReport {
            recomputed: self.cluster.len().0,
            udp_touched: true,
            ..SyncReport::default()
        };
        if self.desired.services().next().is_none() {
            // The first sync: nothing incremental to compare with.
            self.desired = desired_of(&self.cluster, config);
            all.extend(self.desired.services().cloned());
        } else {
            let diverged = self.recompute_all(config);
            report.diverged = !diverged.is_empty();
            all.extend(diverged);
        }
        report.new_problems = self.report_problems(&all);
        self.warn_unlabelled_slices();
        report.health_checks = Some(self.desired.health_checks());
        let keys: BTreeSet<FrontendKey> = self
            .mirror
            .frontends
            .keys()
            .chain(self.desired.keys())
            .map(identity)
            .chain(std::mem::take(&mut self.retry))
            .collect();
        self.program(keys, &mut report);
        self.publish_maglev_config();
        self.guard = guard;
        self.program_guard(BTreeSet::new(), true);
        for id in all {
            if self.cluster.service(&id).is_none() && self.not_programmed.remove(&id).is_some() {
                report.status_changes.push((id, None));
            }
        }
        report.affinity_forgotten = self.forget_stale_affinity(&affinity);
        self.reconcile_statuses(&statuses);
        Ok(report)
    }

    /// Runs every Service through the model again and checks the result against what the
    /// incremental model holds, one Service at a time (no second model in memory). Whatever
    /// disagrees is logged and replaced; returns those Services (a bug if any).
    fn recompute_all(&mut self, config: &ModelConfig) -> Vec<ServiceId> {
        let mut diverged = Vec::new();
        for id in self.cluster.service_ids() {
            let service = self.cluster.service(id).expect("listed ids exist");
            let output = service_output(service, &self.cluster.slices_of(id), config);
            if self.desired.output(id) != Some(&output) {
                diverged.push((id.clone(), Some(output)));
            }
        }
        let gone: Vec<ServiceId> = self
            .desired
            .services()
            .filter(|id| self.cluster.service(id).is_none())
            .cloned()
            .collect();
        diverged.extend(gone.into_iter().map(|id| (id, None)));
        if !diverged.is_empty() {
            error!(
                services = diverged.len(),
                first = %diverged[0].0,
                "the incremental model disagrees with the full recomputation; using the full one"
            );
        }
        diverged
            .into_iter()
            .map(|(id, output)| {
                self.desired.set(&id, output);
                id
            })
            .collect()
    }

    /// Makes the service-CIDR guard hold the ServiceCIDRs (drop) and the ClusterIPs in `ips`
    /// (refuse other ports, or leave another proxy's alone); `all`: every entry, as at a full
    /// recomputation. A write that fails is logged and retried at the next sync; the guard
    /// never blocks programming Services.
    fn program_guard(&mut self, ips: BTreeSet<IpAddr>, all: bool) {
        let mut keys: BTreeSet<Cidr> = ips.into_iter().map(Cidr::host).collect();
        if self.guard_cidrs_dirty || all {
            let (ranges, unreadable) = self.cluster.service_cidr_ranges();
            for (object, text) in unreadable {
                if self.guard_unreadable.insert((object.clone(), text.clone())) {
                    warn!(
                        "skipping part of ServiceCIDR {object}: {text:?} is not a CIDR; range ignored"
                    );
                }
            }
            keys.extend(self.guard_cidrs.iter().copied());
            keys.extend(ranges.iter().copied());
            self.guard_cidrs = ranges;
            self.guard_cidrs_dirty = false;
        }
        if all {
            keys.extend(self.guard.keys().copied());
            keys.extend(self.desired.guard_ips().map(|ip| Cidr::host(*ip)));
        }
        keys.append(&mut self.guard_retry);
        for key in keys {
            let from_services = self
                .desired
                .guard_flags(key.ip())
                .filter(|_| key == Cidr::host(key.ip()));
            let from_cidrs = self
                .guard_cidrs
                .contains(&key)
                .then_some(guard_flags::SERVICE_CIDR);
            let wanted = match (from_services, from_cidrs) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) | b.unwrap_or(0)),
            };
            if self.guard.get(&key).copied() == wanted {
                continue;
            }
            match self.writer.write(&guard_write(&key, wanted)) {
                Ok(()) => {
                    match wanted {
                        Some(flags) => self.guard.insert(key, flags),
                        None => self.guard.remove(&key),
                    };
                }
                Err(failure) => {
                    warn!(range = %key, "cannot write the service-CIDR guard (retried at the next sync): {failure}");
                    self.guard_retry.insert(key);
                }
            }
        }
    }

    /// Marks the Services whose output depends on node facts that changed.
    fn note_node_facts(&mut self, config: &ModelConfig) {
        let Some(old) = self.config.replace(config.clone()) else {
            return;
        };
        let mut facts = Vec::new();
        if old.zone != config.zone {
            facts.push(NodeFact::Zone);
        }
        if old.nodeport_addresses != config.nodeport_addresses {
            facts.push(NodeFact::NodePortAddresses);
        }
        if old.node_addresses != config.node_addresses {
            facts.push(NodeFact::NodeAddresses);
        }
        if old.node_name != config.node_name || old.service_proxy_name != config.service_proxy_name
        {
            // Fixed for the agent's lifetime; every Service depends on them.
            self.dirty.extend(self.cluster.service_ids().cloned());
        }
        for fact in facts {
            let dependents: Vec<ServiceId> = self.desired.dependents(fact).cloned().collect();
            self.dirty.extend(dependents);
        }
    }

    /// Logs the problems of `services` that were not reported before; returns how many.
    fn report_problems(&mut self, services: &FastSet<ServiceId>) -> usize {
        let mut new = 0;
        for id in services {
            let problems = self.desired.problems_of(id);
            let old = self.reported.remove(id).unwrap_or_default();
            for problem in problems.iter().filter(|problem| !old.contains(problem)) {
                warn!("skipping part of {problem}");
                new += 1;
            }
            if !problems.is_empty() {
                self.reported.insert(id.clone(), problems);
            }
        }
        new
    }

    fn warn_unlabelled_slices(&mut self) {
        for slice in self.cluster.unlabelled_slices() {
            if self.unlabelled.insert(slice.key.to_string()) {
                warn!(
                    "skipping part of EndpointSlice {}: missing label {}; slice ignored",
                    slice.key,
                    crate::model::SERVICE_NAME_LABEL
                );
            }
        }
    }

    /// Plans and writes the given addresses, one owning Service at a time, removals first.
    fn program(&mut self, keys: BTreeSet<FrontendKey>, report: &mut SyncReport) {
        if keys.len() >= WHOLE_PLAN_MIN && self.program_whole(&keys, report) {
            return;
        }
        let mut groups = Groups::new();
        for key in keys {
            let owner = self.desired.owner(&key).cloned();
            groups.entry(owner).or_default().push(identity(&key));
        }
        // Addresses no Service wants any more go first: they only give entries back, and the
        // room they free may be what a growing Service needs. (A Service that meets a full map
        // gets a second chance below, after every other Service, shrinking ones included.)
        let mut order: Vec<(Option<ServiceId>, Vec<FrontendKey>)> = groups.into_iter().collect();
        order.sort_by_key(|(owner, _)| owner.is_some());
        let mut failed_full = Vec::new();
        for (owner, keys) in order {
            if let Err(failure) = self.program_group(owner.as_ref(), &keys, report) {
                if failure.reason == "map_full" {
                    failed_full.push((owner, keys));
                } else {
                    self.retry.extend(keys);
                }
            }
        }
        // A second chance for Services that met a full map: later removals may have made room.
        for (owner, keys) in failed_full {
            if self.program_group(owner.as_ref(), &keys, report).is_err() {
                self.retry.extend(keys);
            }
        }
        self.remove_unused(report);
    }

    /// Many addresses at once (the first sync, a full recomputation, a large change): one plan
    /// per chunk of whole Services (addresses no Service wants first), which costs far less
    /// than a plan per Service and keeps the transient plan small whatever the cluster's size;
    /// make-before-break holds within every Service. Only when a write fails does it fall back
    /// to one Service at a time (which isolates the failing Service); what was applied until
    /// then is a consistent state to continue from. Returns whether every chunk was applied.
    fn program_whole(&mut self, keys: &BTreeSet<FrontendKey>, report: &mut SyncReport) -> bool {
        let udp_keys: Vec<FrontendKey> = keys
            .iter()
            .filter(|key| key.protocol == crate::model::Protocol::Udp)
            .flat_map(|key| Scope::ALL.map(|scope| FrontendKey { scope, ..*key }))
            .collect();
        let udp_before = self.mirror.udp_pairs(&udp_keys);
        for chunk in whole_service_chunks(keys, &self.desired) {
            let desired = WithMaglev {
                desired: &self.desired,
                settings: self.maglev,
            };
            let ops = plan_keys(&self.mirror, &chunk, &desired);
            if self.too_large(&ops).is_some() {
                return false;
            }
            match apply(self.writer.as_mut(), &mut self.mirror, &ops) {
                Ok(()) => report.operations += ops.len(),
                Err(failure) => {
                    report.operations += failure.applied;
                    debug!(
                        "writing every address at once stopped ({failure}); going one Service at a time"
                    );
                    return false;
                }
            }
        }
        let udp_after = self.mirror.udp_pairs(&udp_keys);
        report
            .removed_udp
            .extend(udp_before.difference(&udp_after).copied());
        let owners: FastSet<ServiceId> = keys
            .iter()
            .filter_map(|key| self.desired.owner(key).cloned())
            .collect();
        for owner in owners {
            if self.not_programmed.remove(&owner).is_some() {
                info!(service = %owner, "Service programmed");
                report.status_changes.push((owner, None));
            }
        }
        self.remove_unused(report);
        true
    }

    /// Removes what nothing uses any more (left by interrupted writes or a previous agent).
    fn remove_unused(&mut self, report: &mut SyncReport) {
        let orphans = sweep(&self.mirror);
        if !orphans.is_empty() {
            match apply_all_or_nothing(self.writer.as_mut(), &mut self.mirror, &orphans) {
                Ok(()) => report.operations += orphans.len(),
                Err(failure) => warn!("cannot remove entries nothing uses: {failure}"),
            }
        }
    }

    /// Plans and writes one Service's addresses (`owner` `None`: addresses no Service wants).
    fn program_group(
        &mut self,
        owner: Option<&ServiceId>,
        keys: &[FrontendKey],
        report: &mut SyncReport,
    ) -> Result<(), NotProgrammed> {
        let desired = WithMaglev {
            desired: &self.desired,
            settings: self.maglev,
        };
        let ops = plan_keys(&self.mirror, keys, &desired);
        let outcome = if ops.is_empty() {
            Ok(())
        } else if let Some(too_large) = self.too_large(&ops) {
            Err(too_large)
        } else {
            let both_scopes: Vec<FrontendKey> = keys
                .iter()
                .flat_map(|key| Scope::ALL.map(|scope| FrontendKey { scope, ..*key }))
                .collect();
            let udp_before = self.mirror.udp_pairs(&both_scopes);
            match apply_all_or_nothing(self.writer.as_mut(), &mut self.mirror, &ops) {
                Ok(()) => {
                    report.operations += ops.len();
                    let udp_after = self.mirror.udp_pairs(&both_scopes);
                    report
                        .removed_udp
                        .extend(udp_before.difference(&udp_after).copied());
                    Ok(())
                }
                Err(failure) => Err(NotProgrammed {
                    reason: failure.source.reason(),
                    message: failure.to_string(),
                }),
            }
        };
        let Some(owner) = owner else {
            if let Err(failure) = &outcome {
                error!(
                    "cannot remove frontends no Service wants: {}",
                    failure.message
                );
            }
            return outcome;
        };
        match &outcome {
            Ok(()) => {
                if self.not_programmed.remove(owner).is_some() {
                    info!(service = %owner, "Service programmed");
                    report.status_changes.push((owner.clone(), None));
                }
            }
            Err(failure) => {
                if self.not_programmed.get(owner) != Some(failure) {
                    warn!(
                        service = %owner,
                        reason = failure.reason,
                        "Service not programmed, other Services are not affected: {}",
                        failure.message
                    );
                    self.not_programmed.insert(owner.clone(), failure.clone());
                    report
                        .status_changes
                        .push((owner.clone(), Some(failure.clone())));
                }
            }
        }
        outcome
    }

    /// A plan that needs more new entries in some map than the map can hold at all: it can
    /// never be written, so it is not tried.
    fn too_large(&self, ops: &[Op]) -> Option<NotProgrammed> {
        let mut growth: BTreeMap<&'static str, i64> = BTreeMap::new();
        for op in ops {
            let write = encode(op);
            let change = if write.is_delete() {
                -1
            } else {
                i64::from(self.creates_entry(op))
            };
            *growth.entry(write.map_name()).or_default() += change;
        }
        growth.into_iter().find_map(|(map, added)| {
            let capacity = self.writer.capacity(map)?;
            (added > i64::from(capacity)).then(|| NotProgrammed {
                reason: "too_large",
                message: format!(
                    "it needs {added} more entries in map {map}, which holds {capacity} in all"
                ),
            })
        })
    }

    /// Whether an upsert adds an entry (rather than changing one).
    fn creates_entry(&self, op: &Op) -> bool {
        let mirror = &self.mirror;
        match op {
            Op::UpsertBackend { id, .. } => !mirror.backends.contains_key(id),
            Op::UpsertRevNat { id, .. } => !mirror.rev_nats.contains_key(id),
            Op::UpsertName { id, .. } => !mirror.names.contains_key(id),
            Op::UpsertSourceRange { rev_nat_id, range } => {
                !mirror.source_ranges.contains(&(*rev_nat_id, *range))
            }
            Op::UpsertSlot { frontend, slot, .. } => mirror
                .frontends
                .get(frontend)
                .is_none_or(|f| !f.slots.contains_key(slot)),
            Op::UpsertMaster { frontend, .. } => mirror
                .frontends
                .get(frontend)
                .is_none_or(|f| f.master.is_none()),
            _ => false,
        }
    }

    /// Deletes session-affinity entries whose backend left their service.
    fn forget_stale_affinity(
        &mut self,
        affinity: &BTreeMap<proxy_common::AffinityKey, proxy_common::AffinityValue>,
    ) -> usize {
        let mut forgotten = 0;
        for key in stale_affinity(&self.mirror, affinity) {
            match self.writer.write(&MapWrite::AffinityDelete(key)) {
                Ok(()) => forgotten += 1,
                Err(failure) => {
                    warn!(
                        map = map_names::AFFINITY,
                        "cannot forget a stale affinity entry: {failure}"
                    );
                    break;
                }
            }
        }
        forgotten
    }
}

/// Rebuilds the mirror from the maps (restore on start).
/// `keys` cut into chunks of about [`WHOLE_PLAN_CHUNK`] addresses, never splitting one
/// Service's addresses; addresses no Service wants come first.
fn whole_service_chunks(
    keys: &BTreeSet<FrontendKey>,
    desired: &Desired,
) -> Vec<BTreeSet<FrontendKey>> {
    let mut groups = Groups::new();
    for key in keys {
        groups
            .entry(desired.owner(key).cloned())
            .or_default()
            .push(identity(key));
    }
    // `None` (no owner) sorts first.
    let mut chunks: Vec<BTreeSet<FrontendKey>> = Vec::new();
    for group in groups.into_values() {
        match chunks.last_mut() {
            Some(chunk) if chunk.len() + group.len() <= WHOLE_PLAN_CHUNK => chunk.extend(group),
            _ => chunks.push(group.into_iter().collect()),
        }
    }
    chunks
}

pub fn restore(writer: &dyn MapWriter) -> Result<Programmed, WriteError> {
    let image = writer.read_image()?;
    let (programmed, unreadable) = programmed_from_image(&image);
    for entry in &unreadable.0 {
        warn!("leaving an entry this agent cannot interpret: {entry}");
    }
    Ok(programmed)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proxy_common::{AffinityKey, AffinityValue, WireAddr};

    use super::*;
    use crate::{
        maps::{FakeMaps, FaultyWriter, Shared, encode::MapImage},
        model::{
            cluster::Change,
            input::{ServiceInput, SliceInput},
        },
        render::dump,
        source::manifest,
    };

    fn snapshot(yaml: &str) -> ClusterSnapshot {
        let parsed = manifest::parse(yaml);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        parsed.snapshot
    }

    /// A Service `name` at 10.96.0.N (and fd00::N) with the given IPv4 endpoints.
    fn service_yaml(name: &str, index: u8, backends: &[&str]) -> String {
        service_at(
            name,
            &format!("10.96.0.{index}"),
            &format!("fd00::{index}"),
            backends,
        )
    }

    /// A dual-stack Service `name` with the given IPv4 endpoints.
    fn service_at(name: &str, ipv4: &str, ipv6: &str, backends: &[&str]) -> String {
        let endpoints: Vec<String> = backends
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ipv4}, clusterIPs: [{ipv4}, '{ipv6}'], ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    }

    fn service(backends: &[&str]) -> ClusterSnapshot {
        snapshot(&service_yaml("web", 10, backends))
    }

    fn agent(maps: &Shared<FakeMaps>) -> Reconciler {
        Reconciler::new(Box::new(maps.clone())).expect("fake maps read")
    }

    /// What the datapath relies on at every instant: a master's count never exceeds the slots
    /// present, and every slot points at an existing backend.
    fn assert_datapath_consistent(image: &MapImage, context: &str) {
        for (key, master) in image
            .services4
            .iter()
            .filter(|(key, _)| key.backend_slot == 0)
        {
            for slot in 1..=master.count {
                let slot_key = proxy_common::Service4Key {
                    backend_slot: slot,
                    ..*key
                };
                let entry = image
                    .services4
                    .get(&slot_key)
                    .unwrap_or_else(|| panic!("{context}: slot {slot} missing"));
                assert!(
                    image.backends4.contains_key(&entry.backend_id),
                    "{context}: backend {} missing",
                    entry.backend_id
                );
            }
        }
    }

    fn replay_checking(start: &MapImage, journal: &[MapWrite], context: &str) {
        let mut image = start.clone();
        for (index, write) in journal.iter().enumerate() {
            image.apply(write.clone());
            assert_datapath_consistent(&image, &format!("{context}, after write {index}"));
        }
    }

    fn dump_of(image: &MapImage) -> String {
        dump::render(&programmed_from_image(image).0)
    }

    #[test]
    fn every_intermediate_state_of_a_transition_is_consistent() {
        let steps = [
            service(&["10.0.0.1"]),
            service(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            service(&["10.0.0.3"]),
            service(&[]),
            ClusterSnapshot::default(),
        ];
        let maps = Shared::new(FakeMaps::default());
        let mut agent = agent(&maps);
        for (index, step) in steps.iter().enumerate() {
            let before = maps.lock().image.clone();
            maps.lock().journal.clear();
            agent.sync_snapshot(step, &ModelConfig::default());
            let journal = maps.lock().journal.clone();
            replay_checking(&before, &journal, &format!("step {index}"));
            assert_eq!(
                &programmed_from_image(&maps.lock().image).0,
                agent.mirror(),
                "mirror matches the maps after step {index}"
            );
        }
        assert_eq!(
            maps.lock().image,
            MapImage::default(),
            "deleting everything leaves empty maps"
        );
    }

    #[test]
    fn a_failed_write_at_any_point_undoes_the_service_and_the_retry_converges() {
        let from = service(&["10.0.0.1", "10.0.0.2"]);
        let to = service(&["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let clean = Shared::new(FakeMaps::default());
        let mut clean_agent = agent(&clean);
        clean_agent.sync_snapshot(&from, &ModelConfig::default());
        let start = clean.lock().clone();
        clean.lock().journal.clear();
        clean_agent.sync_snapshot(&to, &ModelConfig::default());
        let total_writes = clean.lock().journal.len();
        let wanted = dump_of(&clean.lock().image);
        for fail_at in 0..total_writes {
            let faulty = Shared::new(FaultyWriter::new(start.clone(), [fail_at]));
            let mut agent = Reconciler::new(Box::new(faulty.clone())).unwrap();
            agent.sync_snapshot(&from, &ModelConfig::default());
            agent.sync_snapshot(&to, &ModelConfig::default());
            let context = format!("failure at write {fail_at}");
            let journal = faulty.lock().inner.journal[start.journal.len()..].to_vec();
            replay_checking(&start.image, &journal, &context);
            let mut undone = faulty.lock().inner.image.clone();
            assert_eq!(undone.service_status.len(), 1, "{context}: status recorded");
            undone.service_status.clear();
            assert_eq!(undone, start.image, "{context}: undone");
            assert_eq!(
                &programmed_from_image(&faulty.lock().inner.image).0,
                agent.mirror(),
                "{context}: the mirror is exactly what was written"
            );
            let status = &agent.not_programmed()[&ServiceId::new("default", "web")];
            assert_eq!(status.reason, "injected", "{context}");
            assert!(status.message.contains("injected fault"), "{context}");
            let report = agent.sync(&ModelConfig::default());
            assert_eq!(
                report.status_changes,
                [(ServiceId::new("default", "web"), None)],
                "{context}"
            );
            assert_eq!(
                dump_of(&faulty.lock().inner.image),
                wanted,
                "{context}: retried"
            );
        }
    }

    /// A Service `name` with the Maglev annotation, an externalIP 198.51.100.`index` and
    /// the given IPv4 endpoints.
    fn maglev_service(name: &str, index: u8, backends: &[&str]) -> String {
        service_yaml(name, index, backends).replacen(
            &format!("metadata: {{name: {name}}}\nspec: {{"),
            &format!(
                "metadata: {{name: {name}, annotations: {{switchyard.dev/lb-algorithm: maglev}}}}\nspec: {{externalIPs: [198.51.100.{index}], "
            ),
            1,
        )
    }

    fn small_tables() -> maglev::Settings {
        maglev::Settings {
            table_size: 251,
            ..maglev::Settings::default()
        }
    }

    #[test]
    fn maglev_tables_are_adopted_at_restart_and_published_to_the_datapath_once() {
        let state = snapshot(&maglev_service("web", 10, &["10.0.0.1", "10.0.0.2"]));
        let maps = Shared::new(FakeMaps::default());
        let mut first = agent(&maps).with_maglev(small_tables());
        first.sync_snapshot(&state, &ModelConfig::default());
        {
            let image = &maps.lock().image;
            assert_eq!(image.maglev.len(), 1, "one table for the externalIP");
            assert_eq!(image.maglev.values().next().unwrap().len(), 251);
            let config = image.maglev_config.expect("settings published");
            assert_eq!(config.table_size, 251);
            assert_eq!(config.seed, small_tables().seed);
        }
        maps.lock().journal.clear();
        let mut restarted = agent(&maps).with_maglev(small_tables());
        for delta in lists_of(&state) {
            restarted.absorb(delta);
        }
        let report = restarted.resync(&ModelConfig::default()).expect("reads");
        assert_eq!(report.operations, 0, "{report:?}");
        assert!(maps.lock().journal.is_empty(), "{:?}", maps.lock().journal);
    }

    #[test]
    fn another_table_size_pauses_maglev_until_every_master_has_a_table_of_that_size() {
        let state = snapshot(&maglev_service("web", 10, &["10.0.0.1", "10.0.0.2"]));
        let maps = Shared::new(FakeMaps::default());
        agent(&maps)
            .with_maglev(small_tables())
            .sync_snapshot(&state, &ModelConfig::default());
        maps.lock().journal.clear();
        let bigger = maglev::Settings {
            table_size: 257,
            ..small_tables()
        };
        let mut restarted = agent(&maps).with_maglev(bigger);
        assert_eq!(
            maps.lock().journal.first(),
            Some(&MapWrite::MaglevConfig(MaglevConfig {
                table_size: 0,
                seed: bigger.seed
            })),
            "paused before anything else"
        );
        for delta in lists_of(&state) {
            restarted.absorb(delta);
        }
        restarted.resync(&ModelConfig::default()).expect("reads");
        let maps = maps.lock();
        let config_at = maps
            .journal
            .iter()
            .rposition(|write| matches!(write, MapWrite::MaglevConfig(c) if c.table_size == 257))
            .expect("the new size is published");
        let last_master = maps
            .journal
            .iter()
            .rposition(
                |write| matches!(write, MapWrite::Service4(key, Some(_)) if key.backend_slot == 0),
            )
            .expect("masters repointed");
        assert!(last_master < config_at, "{:?}", maps.journal);
        assert!(maps.image.maglev.values().all(|table| table.len() == 257));
    }

    #[test]
    fn a_full_maglev_map_refuses_only_the_service_that_needs_another_table() {
        let maps = Shared::new(FakeMaps::default().with_capacity(map_names::MAGLEV, 1));
        let mut agent = agent(&maps).with_maglev(small_tables());
        agent.sync_snapshot(
            &snapshot(&format!(
                "{}---\n{}---\n{}",
                maglev_service("a", 10, &["10.0.0.1"]),
                maglev_service("b", 11, &["10.0.0.2"]),
                service_yaml("plain", 12, &["10.0.0.3"])
            )),
            &ModelConfig::default(),
        );
        let refused: Vec<String> = agent
            .not_programmed()
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(refused, ["default/b"]);
        let status = &agent.not_programmed()[&ServiceId::new("default", "b")];
        assert_eq!(status.reason, "map_full");
        assert!(
            status.message.contains(map_names::MAGLEV),
            "{}",
            status.message
        );
        let programmed = dump::render(agent.mirror());
        assert!(programmed.contains("198.51.100.10"), "{programmed}");
        assert!(
            !programmed.contains("198.51.100.11"),
            "nothing half-applied: {programmed}"
        );
        assert!(programmed.contains("10.96.0.12"), "{programmed}");
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_without_writing_anything() {
        let state = service(&["10.0.0.1", "10.0.0.2"]);
        let maps = Shared::new(FakeMaps::default());
        agent(&maps).sync_snapshot(&state, &ModelConfig::default());
        maps.lock().journal.clear();
        let mut restarted = agent(&maps);
        for delta in lists_of(&state) {
            restarted.absorb(delta);
        }
        let report = restarted
            .resync(&ModelConfig::default())
            .expect("fake maps read");
        assert_eq!(report.operations, 0, "{report:?}");
        assert!(
            maps.lock().journal.is_empty(),
            "no write on adoption: {:?}",
            maps.lock().journal
        );
    }

    #[test]
    fn a_full_resync_repairs_drift_and_removes_what_a_dead_agent_left() {
        let maps = Shared::new(FakeMaps::default());
        let mut first = agent(&maps);
        first.sync_snapshot(
            &snapshot(&format!(
                "{}---\n{}",
                service_yaml("web", 10, &["10.0.0.1"]),
                service_yaml("old", 11, &["10.0.0.9"])
            )),
            &ModelConfig::default(),
        );
        // Someone deletes a backend entry; the Service "old" goes while no agent runs.
        let backend = *maps.lock().image.backends4.keys().next().unwrap();
        maps.lock().image.backends4.remove(&backend);
        let mut restarted = agent(&maps);
        for delta in lists_of(&service(&["10.0.0.1"])) {
            restarted.absorb(delta);
        }
        restarted.resync(&ModelConfig::default()).unwrap();
        let reference = Shared::new(FakeMaps::default());
        agent(&reference).sync_snapshot(&service(&["10.0.0.1"]), &ModelConfig::default());
        assert_eq!(
            dump_of(&maps.lock().image),
            dump_of(&reference.lock().image)
        );
    }

    #[test]
    fn the_full_resync_finds_and_repairs_an_incremental_model_that_went_wrong() {
        let maps = Shared::new(FakeMaps::default());
        let mut agent = agent(&maps);
        agent.sync_snapshot(&many(3, 2), &ModelConfig::default());
        let healthy = dump_of(&maps.lock().image);
        // A bug, simulated: the incremental model lost one Service.
        let lost = ServiceId::new("default", "svc-2");
        let changed = agent.desired.set(&lost, None);
        agent.program(changed.keys, &mut SyncReport::default());
        assert_ne!(dump_of(&maps.lock().image), healthy);
        let report = agent.resync(&ModelConfig::default()).unwrap();
        assert!(report.diverged, "{report:?}");
        assert_eq!(dump_of(&maps.lock().image), healthy, "repaired");
        let again = agent.resync(&ModelConfig::default()).unwrap();
        assert!(!again.diverged && again.operations == 0, "{again:?}");
    }

    #[test]
    fn stale_affinity_entries_are_forgotten_at_the_full_resync() {
        let maps = Shared::new(FakeMaps::default());
        let mut agent = agent(&maps);
        agent.sync_snapshot(&service(&["10.0.0.1", "10.0.0.2"]), &ModelConfig::default());
        let mirror = agent.mirror().clone();
        let key = FrontendKey {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
            scope: Scope::Cluster,
        };
        let rev_nat_id = mirror.rev_nat_of(&key).unwrap();
        for (client, ip) in [(1u64, "10.0.0.1"), (2, "10.0.0.2")] {
            let backend = crate::model::BackendAddr {
                ip: ip.parse().unwrap(),
                port: 8080,
                protocol: crate::model::Protocol::Tcp,
            };
            maps.lock().image.affinity.insert(
                AffinityKey {
                    client_cookie: client,
                    rev_nat_id,
                    pad: 0,
                },
                AffinityValue {
                    last_used_ns: 1,
                    backend_id: mirror.backend_id(&backend).unwrap(),
                    pad: 0,
                },
            );
        }
        agent.sync_snapshot(&service(&["10.0.0.1"]), &ModelConfig::default());
        let report = agent.resync(&ModelConfig::default()).unwrap();
        assert_eq!(report.affinity_forgotten, 1);
        let clients: Vec<u64> = maps
            .lock()
            .image
            .affinity
            .keys()
            .map(|key| key.client_cookie)
            .collect();
        assert_eq!(
            clients,
            [1],
            "the client stuck to the removed backend is forgotten"
        );
    }

    fn many(count: u8, backends: usize) -> ClusterSnapshot {
        let yaml: Vec<String> = (1..=count)
            .map(|index| {
                let ips: Vec<String> = (1..=backends)
                    .map(|b| format!("10.{index}.0.{b}"))
                    .collect();
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                service_yaml(&format!("svc-{index}"), index, &ips)
            })
            .collect();
        snapshot(&yaml.join("---\n"))
    }

    #[test]
    fn a_full_map_skips_only_the_services_that_do_not_fit_and_removals_still_apply() {
        // Room for 6 backends: three Services of two backends each fit, a fourth does not.
        let maps = Shared::new(FakeMaps::default().with_capacity(map_names::BACKENDS4, 6));
        let mut agent = agent(&maps);
        let report = agent.sync_snapshot(&many(4, 2), &ModelConfig::default());
        let skipped: Vec<String> = agent
            .not_programmed()
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(skipped, ["default/svc-4"], "{report:?}");
        let status = &agent.not_programmed()[&ServiceId::new("default", "svc-4")];
        assert_eq!(status.reason, "map_full");
        assert!(
            status.message.contains(map_names::BACKENDS4),
            "{}",
            status.message
        );
        assert_eq!(
            maps.lock().image.backends4.len(),
            6,
            "the others are all there"
        );
        assert!(agent.has_failures());
        // svc-1 goes away: its removal applies, and the retry then fits svc-4 in its room.
        let mut fewer = many(4, 2);
        fewer.services.remove(0);
        fewer.endpoint_slices.remove(0);
        let report = agent.sync_snapshot(&fewer, &ModelConfig::default());
        assert!(agent.not_programmed().is_empty(), "{report:?}");
        assert!(
            report
                .status_changes
                .contains(&(ServiceId::new("default", "svc-4"), None))
        );
        assert!(
            maps.lock().image.service_status.is_empty(),
            "the status is cleared"
        );
        let reference = Shared::new(FakeMaps::default());
        Reconciler::new(Box::new(reference.clone()))
            .unwrap()
            .sync_snapshot(&fewer, &ModelConfig::default());
        assert_eq!(
            dump_of(&maps.lock().image),
            dump_of(&reference.lock().image)
        );
    }

    /// `count` Services of `backends` IPv4 backends each.
    fn lots(count: usize, backends: usize) -> ClusterSnapshot {
        let yaml: Vec<String> = (0..count)
            .map(|index| {
                let (high, low) = (index / 256, index % 256);
                let ips: Vec<String> = (1..=backends)
                    .map(|b| format!("10.{}.{low}.{b}", 100 + high))
                    .collect();
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                let name = format!("svc-{index}");
                service_at(
                    &name,
                    &format!("10.97.{high}.{low}"),
                    &format!("fd97::{high}:{low}"),
                    &ips,
                )
            })
            .collect();
        snapshot(&yaml.join("---\n"))
    }

    #[test]
    fn chunks_of_a_whole_plan_never_split_a_service_and_put_removals_first() {
        let maps = Shared::new(FakeMaps::default());
        let mut agent = agent(&maps);
        agent.sync_snapshot(&lots(300, 2), &ModelConfig::default());
        let mut keys: BTreeSet<FrontendKey> = agent.desired().keys().map(identity).collect();
        let removed = FrontendKey {
            ip: "10.200.0.1".parse().unwrap(),
            ..*keys.first().unwrap()
        };
        keys.insert(removed);
        let chunks = whole_service_chunks(&keys, agent.desired());
        assert!(chunks.len() > 1, "{} chunks", chunks.len());
        assert!(
            chunks[0].contains(&removed),
            "addresses nobody wants go first"
        );
        let mut seen = BTreeSet::new();
        let mut owners_seen = BTreeSet::new();
        for chunk in &chunks {
            assert!(chunk.len() <= WHOLE_PLAN_CHUNK, "{}", chunk.len());
            let owners: BTreeSet<_> = chunk
                .iter()
                .filter_map(|k| agent.desired().owner(k))
                .collect();
            for owner in owners {
                assert!(
                    owners_seen.insert(owner.clone()),
                    "{owner} split over two chunks"
                );
            }
            seen.extend(chunk.iter().copied());
        }
        assert_eq!(seen, keys);
    }

    #[test]
    fn many_services_at_once_are_written_by_one_plan_equal_to_one_plan_per_service() {
        let all = lots(300, 2);
        let whole = Shared::new(FakeMaps::default());
        let mut agent = agent(&whole);
        let report = agent.sync_snapshot(&all, &ModelConfig::default());
        assert!(agent.not_programmed().is_empty(), "{report:?}");
        // The same Services arriving one at a time take the per-Service path.
        let one_by_one = Shared::new(FakeMaps::default());
        let mut reference = Reconciler::new(Box::new(one_by_one.clone())).unwrap();
        for (service, slice) in all.services.iter().zip(&all.endpoint_slices) {
            let service = Arc::new(ServiceInput::from(&**service));
            let slice = Arc::new(SliceInput::from(&**slice));
            reference.absorb(Delta::Change(Change::Service(
                service.id.clone(),
                Some(service),
            )));
            reference.absorb(Delta::Change(Change::Slice(slice.key.clone(), Some(slice))));
            reference.sync(&ModelConfig::default());
        }
        assert_eq!(
            dump_of(&whole.lock().image),
            dump_of(&one_by_one.lock().image)
        );
    }

    #[test]
    fn when_the_whole_plan_meets_a_full_map_each_service_is_tried_on_its_own() {
        // Room for 500 backends: 250 Services of two fit, 50 do not.
        let maps = Shared::new(FakeMaps::default().with_capacity(map_names::BACKENDS4, 500));
        let mut agent = agent(&maps);
        agent.sync_snapshot(&lots(300, 2), &ModelConfig::default());
        assert_eq!(agent.not_programmed().len(), 50);
        assert!(
            agent
                .not_programmed()
                .values()
                .all(|status| status.reason == "map_full")
        );
        assert_eq!(
            maps.lock().image.backends4.len(),
            500,
            "every slot of room is used"
        );
        let image = maps.lock().image.clone();
        assert_datapath_consistent(&image, "after the fallback");
        assert_eq!(&programmed_from_image(&image).0, agent.mirror());
        // Every programmed Service is complete: its master counts both backends.
        let masters = image
            .services4
            .iter()
            .filter(|(key, _)| key.backend_slot == 0)
            .count();
        assert_eq!(
            masters, 250,
            "programmed Services are whole, the others absent"
        );
    }

    #[test]
    fn a_service_larger_than_its_map_is_reported_and_never_written() {
        let maps = Shared::new(FakeMaps::default().with_capacity(map_names::SERVICES4, 8));
        let mut agent = agent(&maps);
        // svc-1: 1 master + 2 slots; svc-2: 1 master + 9 slots can never fit in 8 entries.
        let yaml = format!(
            "{}---\n{}",
            service_yaml("svc-1", 1, &["10.1.0.1", "10.1.0.2"]),
            service_yaml(
                "svc-2",
                2,
                &[
                    "10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.4", "10.2.0.5", "10.2.0.6",
                    "10.2.0.7", "10.2.0.8", "10.2.0.9"
                ]
            )
        );
        maps.lock().journal.clear();
        agent.sync_snapshot(&snapshot(&yaml), &ModelConfig::default());
        let status = &agent.not_programmed()[&ServiceId::new("default", "svc-2")];
        assert_eq!(status.reason, "too_large");
        assert!(
            status
                .message
                .contains("needs 10 more entries in map SVC4_V1"),
            "{}",
            status.message
        );
        assert!(
            maps.lock()
                .journal
                .iter()
                .all(|write| !format!("{write:?}").contains("address: 33685514")),
            "nothing of svc-2 (10.96.0.2) was written"
        );
        assert_eq!(maps.lock().image.services4.len(), 3, "svc-1 is programmed");
    }

    #[test]
    fn a_change_to_one_service_plans_only_that_service() {
        let maps = Shared::new(FakeMaps::default());
        let mut agent = agent(&maps);
        agent.sync_snapshot(&many(20, 3), &ModelConfig::default());
        maps.lock().journal.clear();
        let input = ServiceInput::from(&*many(1, 1).services[0]);
        let mut moved = input.clone();
        moved.id = ServiceId::new("default", "svc-7");
        moved.cluster_ips = vec!["10.96.0.77".into()];
        agent.absorb(Delta::Change(Change::Service(
            moved.id.clone(),
            Some(Arc::new(moved)),
        )));
        let report = agent.sync(&ModelConfig::default());
        assert_eq!(report.recomputed, 1);
        let touched: BTreeSet<String> = maps
            .lock()
            .journal
            .iter()
            .filter_map(|write| match write {
                MapWrite::Service4(key, _) => Some(key.address.to_ip().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            touched,
            BTreeSet::from(["10.96.0.7".to_owned(), "10.96.0.77".to_owned()]),
            "only svc-7's old and new frontends are written"
        );
    }

    #[test]
    fn a_node_fact_change_recomputes_only_the_services_that_depend_on_it() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: plain}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let maps = Shared::new(FakeMaps::default());
        let mut agent = agent(&maps);
        let node = |ip: &str| ModelConfig {
            node_addresses: vec![ip.parse().unwrap()],
            nodeport_addresses: vec![ip.parse().unwrap()],
            ..ModelConfig::default()
        };
        agent.sync_snapshot(&snapshot(yaml), &node("192.168.0.2"));
        let report = agent.sync(&node("192.168.0.3"));
        assert_eq!(
            report.recomputed, 1,
            "only the NodePort Service: {report:?}"
        );
        assert!(dump_of(&maps.lock().image).contains("192.168.0.3:30080"));
        assert!(!dump_of(&maps.lock().image).contains("192.168.0.2:30080"));
        assert_eq!(
            agent.sync(&node("192.168.0.3")).recomputed,
            0,
            "no change, no work"
        );
    }
}
