//! Sources of cluster objects: an API server (`kube`) or a manifests file (`file`). Each sends
//! deltas — the objects that changed, already cut down to what the model reads — on one
//! channel; only one source is active at a time.
pub mod file;
pub mod kube;
pub mod manifest;

use std::sync::Arc;

use crate::model::{
    ClusterSnapshot,
    cluster::{Change, Cluster, Touched},
    input::{NodeInput, ServiceCidrInput, ServiceInput, SliceInput},
};

/// A complete list of one kind of object (an API server relist, or the first list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relist {
    Services(Vec<Arc<ServiceInput>>),
    Slices(Vec<Arc<SliceInput>>),
    Nodes(Vec<Arc<NodeInput>>),
    ServiceCidrs(Vec<Arc<ServiceCidrInput>>),
}

/// What a source reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// One object changed or went away.
    Change(Change),
    /// These are all the objects of a kind now (the ones not listed are gone).
    Relisted(Relist),
    /// Every kind has been listed once: the view is complete, so it may prune the dataplane.
    Listed,
}

impl Delta {
    /// Applies the delta to `cluster`; returns what it touched.
    pub fn apply_to(self, cluster: &mut Cluster) -> Touched {
        match self {
            Self::Change(change) => cluster.apply(change),
            Self::Relisted(Relist::Services(objects)) => cluster.replace_services(objects),
            Self::Relisted(Relist::Slices(objects)) => cluster.replace_slices(objects),
            Self::Relisted(Relist::Nodes(objects)) => cluster.replace_nodes(objects),
            Self::Relisted(Relist::ServiceCidrs(objects)) => cluster.replace_service_cidrs(objects),
            Self::Listed => Touched::default(),
        }
    }
}

/// The sending side of a source.
pub type DeltaSender = tokio::sync::mpsc::UnboundedSender<Delta>;
/// The receiving side: the runner drains it.
pub type DeltaReceiver = tokio::sync::mpsc::UnboundedReceiver<Delta>;

/// The complete lists a source would send for `snapshot` (tests, golden files).
pub fn lists_of(snapshot: &ClusterSnapshot) -> Vec<Delta> {
    vec![
        Delta::Relisted(Relist::Services(
            snapshot
                .services
                .iter()
                .map(|object| Arc::new(ServiceInput::from(object.as_ref())))
                .collect(),
        )),
        Delta::Relisted(Relist::Slices(
            snapshot
                .endpoint_slices
                .iter()
                .map(|object| Arc::new(SliceInput::from(object.as_ref())))
                .collect(),
        )),
        Delta::Relisted(Relist::Nodes(
            snapshot
                .nodes
                .iter()
                .map(|object| Arc::new(NodeInput::from(object.as_ref())))
                .collect(),
        )),
        Delta::Relisted(Relist::ServiceCidrs(
            snapshot
                .service_cidrs
                .iter()
                .map(|object| Arc::new(ServiceCidrInput::from(object.as_ref())))
                .collect(),
        )),
        Delta::Listed,
    ]
}
