//! The sync runner: source snapshots in, map writes out.
//!
//! Modelled on kube-proxy's bounded-frequency runner: changes only mark the state dirty; a sync
//! runs at most every `min_period` (bursts coalesce into one sync) and at least every
//! `max_period` (then the maps are re-read, repairing any drift); a failed sync is retried with
//! exponential backoff. Nothing is synced before the source's first complete snapshot.
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use crate::{
    model::{self, ClusterSnapshot, NodeFacts, Problem},
    plan::plan,
    source::SnapshotReceiver,
    state::Programmed,
    writer::{self, MapWriter, WriteError},
};

/// Timing of the runner.
#[derive(Clone, Copy, Debug)]
pub struct SyncConfig {
    pub min_period: Duration,
    pub max_period: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Rebuilds the mirror from the maps (restore on start, drift repair later).
pub fn restore(writer: &dyn MapWriter) -> Result<Programmed, WriteError> {
    let image = writer.read_image()?;
    let (programmed, unreadable) = Programmed::from_image(&image);
    for entry in &unreadable.0 {
        warn!("leaving an entry this agent cannot interpret: {entry}");
    }
    Ok(programmed)
}

/// One sync: model, plan and apply. Returns how many operations were applied.
pub fn sync_once(
    snapshot: &ClusterSnapshot,
    node: &NodeFacts,
    writer: &mut dyn MapWriter,
    mirror: &mut Programmed,
    last_problems: &mut Vec<Problem>,
) -> Result<usize, writer::ApplyError> {
    let output = model::build(snapshot, node);
    if output.problems != *last_problems {
        for problem in &output.problems {
            warn!("skipping part of {problem}");
        }
        *last_problems = output.problems;
    }
    let ops = plan(mirror, &output.desired);
    writer::apply(writer, mirror, &ops)?;
    Ok(ops.len())
}

/// Runs until `shutdown` completes or the source goes away.
pub async fn run(
    mut source: SnapshotReceiver,
    node: NodeFacts,
    mut writer: Box<dyn MapWriter>,
    config: SyncConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WriteError> {
    tokio::pin!(shutdown);
    let mut mirror = restore(writer.as_ref())?;
    info!(
        frontends = mirror.frontends.len(),
        backends = mirror.backends.len(),
        "adopted the pinned maps"
    );
    let snapshot: Arc<ClusterSnapshot> = tokio::select! {
        () = &mut shutdown => return Ok(()),
        first = source.wait_for(Option::is_some) => match first {
            Ok(snapshot) => snapshot.clone().expect("waited for Some"),
            Err(_) => return Ok(()),
        },
    };
    let mut snapshot = snapshot;
    let mut last_problems = Vec::new();
    let mut retry: Option<Duration> = None;
    let mut first_sync = true;
    loop {
        let started = Instant::now();
        match sync_once(
            &snapshot,
            &node,
            writer.as_mut(),
            &mut mirror,
            &mut last_problems,
        ) {
            Ok(applied) => {
                retry = None;
                if applied > 0 || first_sync {
                    info!(
                        operations = applied,
                        elapsed_ms = started.elapsed().as_millis(),
                        "dataplane synced"
                    );
                } else {
                    debug!("dataplane already in sync");
                }
                first_sync = false;
            }
            Err(failure) => {
                let delay = retry.map_or(FIRST_RETRY, |previous| (previous * 2).min(MAX_RETRY));
                error!(retry_in_ms = delay.as_millis(), "sync failed: {failure}");
                retry = Some(delay);
            }
        }
        let wait = retry.unwrap_or(config.max_period);
        let mut periodic = false;
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            changed = source.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = tokio::time::sleep(wait) => periodic = retry.is_none(),
        }
        if periodic {
            // Drift repair: trust the kernel, not the mirror.
            match restore(writer.as_ref()) {
                Ok(restored) => mirror = restored,
                Err(failure) => warn!("cannot re-read the maps for drift repair: {failure}"),
            }
        }
        // Coalesce bursts: at most one sync per min_period.
        if let Some(remaining) = config.min_period.checked_sub(started.elapsed()) {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(remaining) => {}
            }
        }
        if let Some(latest) = source.borrow_and_update().clone() {
            snapshot = latest;
        }
    }
}
