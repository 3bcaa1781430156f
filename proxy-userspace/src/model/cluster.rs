//! The cluster as the model reads it: Services, EndpointSlices and Nodes by identity, with the
//! slices indexed by the Service they serve. Every change says which Services it touched, so
//! the model recomputes those and nothing else; a change that leaves an object as it was
//! touches nothing.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use smallvec::SmallVec;

use crate::hash::{FastMap, FastSet};

use super::{
    Cidr,
    input::{NodeInput, ObjectKey, ServiceCidrInput, ServiceInput, SliceInput},
    parse_cidr_lenient,
    problems::ServiceId,
};

/// One object's change as a source reports it (`None`: the object is gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Service(ServiceId, Option<Arc<ServiceInput>>),
    Slice(ObjectKey, Option<Arc<SliceInput>>),
    Node(String, Option<Arc<NodeInput>>),
    ServiceCidr(String, Option<Arc<ServiceCidrInput>>),
}

/// What applying changes touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub services: FastSet<ServiceId>,
    /// Services and EndpointSlices that changed (kube-proxy's change counters).
    pub service_changes: u64,
    pub slice_changes: u64,
    /// A Node object changed (this node's facts may have).
    pub nodes: bool,
    /// A ServiceCIDR changed (the service-CIDR guard's ranges may have).
    pub service_cidrs: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.nodes && !self.service_cidrs
    }

    pub fn merge(&mut self, other: Self) {
        self.services.extend(other.services);
        self.service_changes += other.service_changes;
        self.slice_changes += other.slice_changes;
        self.nodes |= other.nodes;
        self.service_cidrs |= other.service_cidrs;
    }
}

/// The objects, by identity.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    services: FastMap<ServiceId, Arc<ServiceInput>>,
    slices: FastMap<ObjectKey, Arc<SliceInput>>,
    /// Slices by the Service their label names, in name order (a stable merge order; a sorted
    /// vector, since most Services have one or two, and the first one inline).
    slices_by_service: FastMap<ServiceId, SmallVec<[ObjectKey; 1]>>,
    nodes: BTreeMap<String, Arc<NodeInput>>,
    /// Slices without a `kubernetes.io/service-name` label (they serve nothing).
    unlabelled: BTreeSet<ObjectKey>,
    service_cidrs: BTreeMap<String, Arc<ServiceCidrInput>>,
}

impl Cluster {
    /// Applies one change; returns what it touched.
    pub fn apply(&mut self, change: Change) -> Touched {
        let mut touched = Touched::default();
        match change {
            Change::Service(id, object) => {
                let old = match &object {
                    Some(object) => self.services.insert(id.clone(), object.clone()),
                    None => self.services.remove(&id),
                };
                if old.as_deref() != object.as_deref() {
                    touched.services.insert(id);
                    touched.service_changes += 1;
                }
            }
            Change::Slice(key, object) => {
                let old = match &object {
                    Some(object) => self.slices.insert(key.clone(), object.clone()),
                    None => self.slices.remove(&key),
                };
                if old.as_deref() != object.as_deref() {
                    touched.slice_changes += 1;
                    if object.as_ref().is_some_and(|o| o.service_name.is_none()) {
                        self.unlabelled.insert(key.clone());
                    } else {
                        self.unlabelled.remove(&key);
                    }
                    for service in [
                        old.and_then(|o| o.service()),
                        object.and_then(|o| o.service()),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        touched.services.insert(service);
                    }
                    self.reindex(&key, &touched.services);
                }
            }
            Change::Node(name, object) => {
                let old = match &object {
                    Some(object) => self.nodes.insert(name, object.clone()),
                    None => self.nodes.remove(&name),
                };
                touched.nodes = old.as_deref() != object.as_deref();
            }
            Change::ServiceCidr(name, object) => {
                let old = match &object {
                    Some(object) => self.service_cidrs.insert(name, object.clone()),
                    None => self.service_cidrs.remove(&name),
                };
                touched.service_cidrs = old.as_deref() != object.as_deref();
            }
        }
        touched
    }

    /// Files `key` under the Service its current version names, and under no other of
    /// `services` (the ones its old and new versions name).
    fn reindex(&mut self, key: &ObjectKey, services: &FastSet<ServiceId>) {
        let current = self.slices.get(key).and_then(|slice| slice.service());
        for service in services {
            if current.as_ref() == Some(service) {
                let keys = self.slices_by_service.entry(service.clone()).or_default();
                if let Err(at) = keys.binary_search(key) {
                    keys.insert(at, key.clone());
                }
            } else if let Some(keys) = self.slices_by_service.get_mut(service) {
                if let Ok(at) = keys.binary_search(key) {
                    keys.remove(at);
                }
                if keys.is_empty() {
                    self.slices_by_service.remove(service);
                }
            }
        }
    }

    /// Replaces every object of one kind (a complete list from the source), as the changes
    /// that turn the old set into the new one.
    pub fn replace_services(&mut self, objects: Vec<Arc<ServiceInput>>) -> Touched {
        let mut wanted: FastMap<ServiceId, Arc<ServiceInput>> = objects
            .into_iter()
            .map(|object| (object.id.clone(), object))
            .collect();
        let gone: Vec<ServiceId> = self
            .services
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        let mut touched = Touched::default();
        for id in gone {
            touched.merge(self.apply(Change::Service(id, None)));
        }
        for (id, object) in wanted.drain() {
            touched.merge(self.apply(Change::Service(id, Some(object))));
        }
        touched
    }

    /// See [`Cluster::replace_services`].
    pub fn replace_slices(&mut self, objects: Vec<Arc<SliceInput>>) -> Touched {
        let mut wanted: FastMap<ObjectKey, Arc<SliceInput>> = objects
            .into_iter()
            .map(|object| (object.key.clone(), object))
            .collect();
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect();
        let mut touched = Touched::default();
        for key in gone {
            touched.merge(self.apply(Change::Slice(key, None)));
        }
        for (key, object) in wanted.drain() {
            touched.merge(self.apply(Change::Slice(key, Some(object))));
        }
        touched
    }

    /// See [`Cluster::replace_services`].
    pub fn replace_nodes(&mut self, objects: Vec<Arc<NodeInput>>) -> Touched {
        let wanted: BTreeMap<String, Arc<NodeInput>> = objects
            .into_iter()
            .map(|object| (object.name.clone(), object))
            .collect();
        let touched = Touched {
            nodes: wanted != self.nodes,
            ..Touched::default()
        };
        self.nodes = wanted;
        touched
    }

    /// See [`Cluster::replace_services`].
    pub fn replace_service_cidrs(&mut self, objects: Vec<Arc<ServiceCidrInput>>) -> Touched {
        let wanted: BTreeMap<String, Arc<ServiceCidrInput>> = objects
            .into_iter()
            .map(|object| (object.name.clone(), object))
            .collect();
        let touched = Touched {
            service_cidrs: wanted != self.service_cidrs,
            ..Touched::default()
        };
        self.service_cidrs = wanted;
        touched
    }

    /// Every range of every ServiceCIDR, with what could not be read (`(object, text)`).
    pub fn service_cidr_ranges(&self) -> (BTreeSet<Cidr>, Vec<(String, String)>) {
        let mut ranges = BTreeSet::new();
        let mut unreadable = Vec::new();
        for object in self.service_cidrs.values() {
            for text in &object.cidrs {
                match parse_cidr_lenient(text) {
                    Some(range) => {
                        ranges.insert(range);
                    }
                    None => unreadable.push((object.name.clone(), text.clone())),
                }
            }
        }
        (ranges, unreadable)
    }

    pub fn service(&self, id: &ServiceId) -> Option<&ServiceInput> {
        self.services.get(id).map(AsRef::as_ref)
    }

    /// The slices labelled for a Service, in name order.
    pub fn slices_of(&self, id: &ServiceId) -> Vec<&SliceInput> {
        self.slices_by_service
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.get(key).map(AsRef::as_ref))
            .collect()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInput> {
        self.nodes.get(name).map(AsRef::as_ref)
    }

    /// Every Service (in no particular order: the model's result does not depend on it).
    pub fn service_ids(&self) -> impl Iterator<Item = &ServiceId> {
        self.services.keys()
    }

    /// Slices without a `kubernetes.io/service-name` label (they serve nothing).
    pub fn unlabelled_slices(&self) -> impl Iterator<Item = &SliceInput> {
        self.unlabelled
            .iter()
            .filter_map(|key| self.slices.get(key).map(AsRef::as_ref))
    }

    pub fn len(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::input::EndpointInput;

    fn slice(name: &str, service: Option<&str>, address: &str) -> Arc<SliceInput> {
        Arc::new(SliceInput {
            key: ObjectKey {
                namespace: "shop".into(),
                name: name.into(),
            },
            service_name: service.map(str::to_owned),
            address_type: "IPv4".into(),
            ports: Vec::new(),
            endpoints: vec![EndpointInput {
                address: Some(address.into()),
                ready: None,
                serving: None,
                terminating: None,
                node_name: None,
                zone_hints: Vec::new(),
                node_hints: Vec::new(),
            }],
        })
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_slice_change_touches_the_services_of_its_old_and_new_labels() {
        let mut cluster = Cluster::default();
        let touched = cluster.apply(Change::Slice(
            key("s-1"),
            Some(slice("s-1", Some("web"), "10.0.0.1")),
        ));
        assert_eq!(
            touched.services,
            FastSet::from_iter([ServiceId::new("shop", "web")])
        );
        assert_eq!(cluster.slices_of(&ServiceId::new("shop", "web")).len(), 1);
        let relabelled = cluster.apply(Change::Slice(
            key("s-1"),
            Some(slice("s-1", Some("api"), "10.0.0.1")),
        ));
        assert_eq!(
            relabelled.services,
            FastSet::from_iter([ServiceId::new("shop", "api"), ServiceId::new("shop", "web")])
        );
        assert!(cluster.slices_of(&ServiceId::new("shop", "web")).is_empty());
        assert_eq!(cluster.slices_of(&ServiceId::new("shop", "api")).len(), 1);
        let same = cluster.apply(Change::Slice(
            key("s-1"),
            Some(slice("s-1", Some("api"), "10.0.0.1")),
        ));
        assert!(same.is_empty(), "an unchanged object touches nothing");
    }

    #[test]
    fn a_relist_removes_what_it_no_longer_holds() {
        let mut cluster = Cluster::default();
        cluster.replace_slices(vec![
            slice("s-1", Some("web"), "10.0.0.1"),
            slice("s-2", Some("api"), "10.0.0.2"),
        ]);
        let touched = cluster.replace_slices(vec![slice("s-1", Some("web"), "10.0.0.1")]);
        assert_eq!(
            touched.services,
            FastSet::from_iter([ServiceId::new("shop", "api")])
        );
        assert_eq!(touched.slice_changes, 1);
        assert!(cluster.slices_of(&ServiceId::new("shop", "api")).is_empty());
    }
}
