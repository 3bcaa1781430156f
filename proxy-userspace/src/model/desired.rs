//! The desired state, kept per Service so that a change costs what it touches: each Service's
//! own output (from `service`), plus the rules across Services — which Service gets an
//! address two of them claim, which one gets a healthCheckNodePort two of them ask for — kept
//! as claim tables that name their winner at once. Replacing one Service's output reports the
//! frontend addresses whose winner or content may have changed; nothing else is looked at.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use proxy_common::guard_flags;
use smallvec::SmallVec;

use crate::hash::{FastMap, FastSet};

use super::{
    DesiredState, Frontend, FrontendKey, HealthCheck, Scope,
    problems::{ObjectKind, Problem, ServiceId},
    service::{Kind, ServiceOutput},
};

/// A candidate's place in the queue for an address: frontend kind first (a ClusterIP is never
/// displaced), then Service name order, then the candidate's order within its Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Claim {
    kind: Kind,
    service: ServiceId,
    index: usize,
}

/// Claimants of one address, best first. Almost every address has exactly one, so a sorted
/// vector with room for one inline (no allocation) rather than a tree (a node for eleven).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Queue(SmallVec<[Claim; 1]>);

impl Queue {
    fn insert(&mut self, claim: Claim) {
        if let Err(at) = self.0.binary_search(&claim) {
            self.0.insert(at, claim);
        }
    }

    fn remove(&mut self, claim: &Claim) {
        if let Ok(at) = self.0.binary_search(claim) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<&Claim> {
        self.0.first()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &Claim> {
        self.0.iter()
    }
}

/// Which node facts a change concerns (see `service::NodeDependence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeFact {
    Zone,
    NodePortAddresses,
    NodeAddresses,
}

/// What replacing Services' outputs changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Cluster-scope frontend keys whose winner or content may have changed (their Local
    /// twins with them).
    pub keys: BTreeSet<FrontendKey>,
    /// Services whose problems may have changed (a changed Service and everyone it competes
    /// with for an address or a health-check port).
    pub services: FastSet<ServiceId>,
    /// The set of health checks changed.
    pub health_checks: bool,
    /// ClusterIPs whose service-guard entry may have changed.
    pub guard_ips: BTreeSet<IpAddr>,
}

impl Changed {
    pub fn merge(&mut self, other: Self) {
        self.keys.extend(other.keys);
        self.services.extend(other.services);
        self.health_checks |= other.health_checks;
        self.guard_ips.extend(other.guard_ips);
    }
}

/// The desired state, incrementally maintained. Two are equal when every Service's output and
/// every claim queue are (everything else is derived from those).
#[derive(Debug, Default)]
pub struct Desired {
    outputs: FastMap<ServiceId, ServiceOutput>,
    claims: FastMap<FrontendKey, Queue>,
    health_claims: BTreeMap<u16, BTreeSet<ServiceId>>,
    zone_dependents: FastSet<ServiceId>,
    nodeport_dependents: FastSet<ServiceId>,
    address_dependents: FastSet<ServiceId>,
    no_local_endpoints: FastSet<ServiceId>,
    /// ClusterIP → (Services of ours holding it, Services of another proxy holding it).
    guard_ips: FastMap<IpAddr, (u32, u32)>,
}

impl PartialEq for Desired {
    fn eq(&self, other: &Self) -> bool {
        self.outputs == other.outputs
            && self.claims == other.claims
            && self.health_claims == other.health_claims
    }
}

impl Desired {
    /// Adds the output of a Service not seen before (a full build: nothing to report).
    pub fn insert(&mut self, id: &ServiceId, output: ServiceOutput) {
        debug_assert!(!self.outputs.contains_key(id), "{id} inserted twice");
        for (index, candidate) in output.candidates.iter().enumerate() {
            self.claims.entry(candidate.key).or_default().insert(Claim {
                kind: candidate.kind,
                service: id.clone(),
                index,
            });
        }
        if let Some((port, _)) = &output.health_check {
            self.health_claims
                .entry(*port)
                .or_default()
                .insert(id.clone());
        }
        self.count_guard_ips(&output, true, &mut Changed::default());
        self.index(id, &output);
        self.outputs.insert(id.clone(), output);
    }

    /// Counts a Service's ClusterIPs in (`up`) or out of the guard's references.
    fn count_guard_ips(&mut self, output: &ServiceOutput, up: bool, changed: &mut Changed) {
        let ours = output.cluster_ips.iter().map(|ip| (ip, true));
        let theirs = output.other_proxy_ips.iter().map(|ip| (ip, false));
        for (ip, mine) in ours.chain(theirs) {
            let refs = self.guard_ips.entry(*ip).or_default();
            let count = if mine { &mut refs.0 } else { &mut refs.1 };
            if up {
                *count += 1;
            } else {
                *count = count.saturating_sub(1);
            }
            if *refs == (0, 0) {
                self.guard_ips.remove(ip);
            }
            changed.guard_ips.insert(*ip);
        }
    }

    /// The service-guard flags a ClusterIP gets from the Services holding it: refused on
    /// other ports when one of ours holds it, left alone when only another proxy's do.
    pub fn guard_flags(&self, ip: IpAddr) -> Option<u32> {
        match self.guard_ips.get(&ip)? {
            (ours, _) if *ours > 0 => Some(guard_flags::CLUSTER_IP),
            (_, theirs) if *theirs > 0 => Some(guard_flags::OTHER_PROXY),
            _ => None,
        }
    }

    /// Every ClusterIP the guard knows of.
    pub fn guard_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.guard_ips.keys()
    }

    /// Files a Service under the node facts it depends on.
    fn index(&mut self, id: &ServiceId, output: &ServiceOutput) {
        let depends = output.depends;
        for (wanted, set) in [
            (depends.zone, &mut self.zone_dependents),
            (depends.nodeport_addresses, &mut self.nodeport_dependents),
            (depends.node_addresses, &mut self.address_dependents),
            (output.no_local_endpoints, &mut self.no_local_endpoints),
        ] {
            if wanted {
                set.insert(id.clone());
            }
        }
    }

    /// Replaces one Service's output (`None`: the Service is gone or not ours).
    pub fn set(&mut self, id: &ServiceId, output: Option<ServiceOutput>) -> Changed {
        let mut changed = Changed::default();
        changed.services.insert(id.clone());
        let old = self.outputs.remove(id);
        if old.as_ref() == output.as_ref() {
            if let Some(old) = old {
                self.outputs.insert(id.clone(), old);
            }
            return Changed::default();
        }
        if let Some(old) = &old {
            for (index, candidate) in old.candidates.iter().enumerate() {
                let claim = Claim {
                    kind: candidate.kind,
                    service: id.clone(),
                    index,
                };
                if let Some(queue) = self.claims.get_mut(&candidate.key) {
                    queue.remove(&claim);
                    changed
                        .services
                        .extend(queue.iter().map(|c| c.service.clone()));
                    if queue.is_empty() {
                        self.claims.remove(&candidate.key);
                    }
                }
                changed.keys.insert(candidate.key);
            }
            if let Some((port, _)) = &old.health_check {
                self.remove_health_claim(*port, id, &mut changed);
            }
            self.count_guard_ips(old, false, &mut changed);
        }
        for set in [
            &mut self.zone_dependents,
            &mut self.nodeport_dependents,
            &mut self.address_dependents,
            &mut self.no_local_endpoints,
        ] {
            set.remove(id);
        }
        if let Some(output) = output {
            for (index, candidate) in output.candidates.iter().enumerate() {
                let queue = self.claims.entry(candidate.key).or_default();
                queue.insert(Claim {
                    kind: candidate.kind,
                    service: id.clone(),
                    index,
                });
                changed
                    .services
                    .extend(queue.iter().map(|c| c.service.clone()));
                changed.keys.insert(candidate.key);
            }
            if let Some((port, _)) = &output.health_check {
                let queue = self.health_claims.entry(*port).or_default();
                queue.insert(id.clone());
                changed.services.extend(queue.iter().cloned());
                changed.health_checks = true;
            }
            self.count_guard_ips(&output, true, &mut changed);
            self.index(id, &output);
            self.outputs.insert(id.clone(), output);
        }
        changed
    }

    fn remove_health_claim(&mut self, port: u16, id: &ServiceId, changed: &mut Changed) {
        if let Some(queue) = self.health_claims.get_mut(&port) {
            queue.remove(id);
            changed.services.extend(queue.iter().cloned());
            if queue.is_empty() {
                self.health_claims.remove(&port);
            }
        }
        changed.health_checks = true;
    }

    /// The Services whose output depends on a node fact.
    pub fn dependents(&self, fact: NodeFact) -> impl Iterator<Item = &ServiceId> {
        match fact {
            NodeFact::Zone => self.zone_dependents.iter(),
            NodeFact::NodePortAddresses => self.nodeport_dependents.iter(),
            NodeFact::NodeAddresses => self.address_dependents.iter(),
        }
    }

    /// One Service's output, if it has one.
    pub fn output(&self, id: &ServiceId) -> Option<&ServiceOutput> {
        self.outputs.get(id)
    }

    /// Every Service with an output.
    pub fn services(&self) -> impl Iterator<Item = &ServiceId> {
        self.outputs.keys()
    }

    fn winner(&self, key: &FrontendKey) -> Option<(&Claim, &super::service::Candidate)> {
        let cluster_key = FrontendKey {
            scope: Scope::Cluster,
            ..*key
        };
        let claim = self.claims.get(&cluster_key)?.first()?;
        let candidate = self
            .outputs
            .get(&claim.service)?
            .candidates
            .get(claim.index)?;
        Some((claim, candidate))
    }

    /// The desired frontend for a key (either scope), if any.
    pub fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.winner(key)?.1.frontend(key.scope)
    }

    /// The Service whose frontend a key (either scope) belongs to.
    pub fn owner(&self, key: &FrontendKey) -> Option<&ServiceId> {
        self.winner(key).map(|(claim, _)| &claim.service)
    }

    /// How many Services have a ClusterIP that leaves no endpoint to this node.
    pub fn no_local_endpoints(&self) -> usize {
        self.no_local_endpoints.len()
    }

    /// The health-check listeners wanted, by port (the first Service by name gets a port two
    /// of them ask for).
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        self.health_claims
            .iter()
            .filter_map(|(port, queue)| {
                let first = queue.first()?;
                let (_, check) = self.outputs.get(first)?.health_check.as_ref()?;
                Some((*port, check.clone()))
            })
            .collect()
    }

    /// A Service's problems: its own, plus the addresses and ports it lost to another.
    pub fn problems_of(&self, id: &ServiceId) -> Vec<Problem> {
        let Some(output) = self.outputs.get(id) else {
            return Vec::new();
        };
        let mut problems: BTreeSet<Problem> = output.problems.iter().cloned().collect();
        for (index, candidate) in output.candidates.iter().enumerate() {
            // Most addresses have one claimant: no need to look the winner up.
            if self
                .claims
                .get(&candidate.key)
                .is_none_or(|queue| queue.len() < 2)
            {
                continue;
            }
            let claim = Claim {
                kind: candidate.kind,
                service: id.clone(),
                index,
            };
            if let Some((winner, won)) = self.winner(&candidate.key)
                && *winner != claim
            {
                problems.insert(Problem {
                    kind: ObjectKind::Service,
                    namespace: id.namespace.to_string(),
                    name: id.name.to_string(),
                    reason: format!(
                        "{} is already served by {}; {} ignored",
                        candidate.key,
                        won.cluster.service,
                        candidate.kind.part()
                    ),
                });
            }
        }
        if let Some((port, _)) = &output.health_check
            && let Some(first) = self.health_claims.get(port).and_then(BTreeSet::first)
            && first != id
        {
            problems.insert(Problem {
                kind: ObjectKind::Service,
                namespace: id.namespace.to_string(),
                name: id.name.to_string(),
                reason: format!(
                    "healthCheckNodePort {port} is already used by {first}; no health check served"
                ),
            });
        }
        problems.into_iter().collect()
    }

    /// Every problem, sorted.
    pub fn problems(&self) -> Vec<Problem> {
        let mut all: BTreeSet<Problem> = BTreeSet::new();
        for id in self.outputs.keys() {
            all.extend(self.problems_of(id));
        }
        all.into_iter().collect()
    }

    /// Every UDP frontend (cluster-scope key) with the serving endpoints of its Service port
    /// (for the conntrack reconciler).
    pub fn udp_serving(&self) -> Vec<(FrontendKey, &[super::BackendAddr])> {
        self.claims
            .keys()
            .filter(|key| key.protocol == super::Protocol::Udp)
            .filter_map(|key| Some((*key, self.winner(key)?.1.serving.as_slice())))
            .collect()
    }

    /// The cluster-scope keys some Service claims.
    pub fn keys(&self) -> impl Iterator<Item = &FrontendKey> {
        self.claims.keys()
    }

    /// The whole desired state (tests, full recomputation checks, golden files).
    pub fn state(&self) -> DesiredState {
        let mut frontends = BTreeMap::new();
        for key in self.claims.keys() {
            for scope in Scope::ALL {
                let key = FrontendKey { scope, ..*key };
                if let Some(frontend) = self.frontend(&key) {
                    frontends.insert(key, frontend.clone());
                }
            }
        }
        DesiredState {
            frontends,
            health_checks: self.health_checks(),
        }
    }
}
