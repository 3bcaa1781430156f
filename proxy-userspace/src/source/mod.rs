//! Sources of cluster objects. Each publishes complete snapshots on a watch channel; the sync
//! runner only ever sees the latest one. Only one source is active at a time.
pub mod file;
pub mod kube;
pub mod manifest;

use std::sync::Arc;

use crate::model::ClusterSnapshot;

/// The latest snapshot a source has published. `None` until its first complete read, so the
/// runner never prunes the dataplane from a partial view.
pub type SnapshotReceiver = tokio::sync::watch::Receiver<Option<Arc<ClusterSnapshot>>>;
