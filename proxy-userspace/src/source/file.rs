//! The `file` source: a manifests file, re-read within a second of any change.
//!
//! Polling (mtime, size, inode) every 200 ms catches in-place writes and editors that replace
//! the file by rename alike, with no inotify subtleties; the content is only re-parsed when it
//! changed.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{SnapshotReceiver, manifest};
use crate::{admin::stats::StatsHandle, model::ClusterSnapshot};

const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("cannot read manifests file {path}: {source}")]
pub struct FileSourceError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let metadata = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
        inode: metadata.ino(),
    })
}

/// Reads and parses the file, logging every skipped document.
fn load(
    path: &Path,
    stats: &StatsHandle,
) -> Result<(String, Arc<ClusterSnapshot>), FileSourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileSourceError {
        path: path.to_owned(),
        source,
    })?;
    let parsed = manifest::parse(&text);
    stats.update(|stats| stats.skipped_documents_total += parsed.skipped.len() as u64);
    for skipped in &parsed.skipped {
        warn!(file = %path.display(), "skipping {skipped}");
    }
    info!(
        file = %path.display(),
        services = parsed.snapshot.services.len(),
        endpoint_slices = parsed.snapshot.endpoint_slices.len(),
        skipped = parsed.skipped.len(),
        "read manifests"
    );
    Ok((text, Arc::new(parsed.snapshot)))
}

/// Reads the file once (failing if it cannot be read at all) and then follows its changes in a
/// background task. A file that becomes unreadable later keeps the last good snapshot.
pub fn start(path: PathBuf, stats: StatsHandle) -> Result<SnapshotReceiver, FileSourceError> {
    let mut last_stamp = stamp(&path).ok();
    let (mut last_text, snapshot) = load(&path, &stats)?;
    let (sender, receiver) = watch::channel(Some(snapshot));
    tokio::spawn(async move {
        let mut unreadable_reported = false;
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            if sender.is_closed() {
                return;
            }
            let current = stamp(&path).ok();
            if current == last_stamp {
                continue;
            }
            last_stamp = current;
            match std::fs::read_to_string(&path) {
                Ok(text) if text == last_text => {}
                Ok(_) => match load(&path, &stats) {
                    Ok((text, snapshot)) => {
                        unreadable_reported = false;
                        last_text = text;
                        sender.send_replace(Some(snapshot));
                    }
                    Err(error) => warn!("{error}; keeping the last good state"),
                },
                Err(source) if !unreadable_reported => {
                    unreadable_reported = true;
                    warn!(
                        "{}; keeping the last good state",
                        FileSourceError {
                            path: path.clone(),
                            source
                        }
                    );
                }
                Err(_) => {}
            }
        }
    });
    Ok(receiver)
}
