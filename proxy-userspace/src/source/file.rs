//! The `file` source: a manifests file, re-read within a second of any change.
//!
//! Polling (mtime, size, inode) every 100 ms catches in-place writes and editors that replace
//! the file by rename alike, with no inotify subtleties. Only a complete file is applied: a new
//! content must read the same on two polls in a row (a writer still at work changes it in
//! between), and its last document must be a whole object (a file cut short ends in a broken
//! or partial one). Anything else keeps the last good state, with a warning naming the problem;
//! replacing the file atomically (write a new file, then rename it over the old one) never
//! shows a partial file at all. When the content changed, only the
//! documents whose text changed are parsed again, and only the objects that changed (by
//! identity and content) are sent on: one endpoint edited in a file of 10 000 Services costs
//! one parsed document and one delta.
use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    Delta, DeltaReceiver, DeltaSender, Relist,
    manifest::{self, ParsedManifests},
};
use crate::{
    admin::stats::StatsHandle,
    model::{
        ServiceId,
        cluster::Change,
        input::{NodeInput, ObjectKey, ServiceCidrInput, ServiceInput, SliceInput},
    },
};

const POLL_INTERVAL: Duration = Duration::from_millis(100);

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

/// The objects of one document, cut down to the model's input.
#[derive(Debug, Default)]
struct DocumentObjects {
    services: Vec<Arc<ServiceInput>>,
    slices: Vec<Arc<SliceInput>>,
    nodes: Vec<Arc<NodeInput>>,
    service_cidrs: Vec<Arc<ServiceCidrInput>>,
}

impl From<&ParsedManifests> for DocumentObjects {
    fn from(parsed: &ParsedManifests) -> Self {
        let snapshot = &parsed.snapshot;
        Self {
            services: snapshot
                .services
                .iter()
                .map(|object| Arc::new(ServiceInput::from(object.as_ref())))
                .collect(),
            slices: snapshot
                .endpoint_slices
                .iter()
                .map(|object| Arc::new(SliceInput::from(object.as_ref())))
                .collect(),
            nodes: snapshot
                .nodes
                .iter()
                .map(|object| Arc::new(NodeInput::from(object.as_ref())))
                .collect(),
            service_cidrs: snapshot
                .service_cidrs
                .iter()
                .map(|object| Arc::new(ServiceCidrInput::from(object.as_ref())))
                .collect(),
        }
    }
}

/// Every object of the file by identity (a later document wins over an earlier one).
#[derive(Debug, Default)]
struct FileObjects {
    services: HashMap<ServiceId, Arc<ServiceInput>>,
    slices: HashMap<ObjectKey, Arc<SliceInput>>,
    nodes: BTreeMap<String, Arc<NodeInput>>,
    service_cidrs: BTreeMap<String, Arc<ServiceCidrInput>>,
}

/// What the source remembers of the file between reads.
#[derive(Default)]
struct Documents {
    /// Parsed documents by their text.
    parsed: HashMap<String, Arc<DocumentObjects>>,
    objects: FileObjects,
}

/// The deltas that turn `old` into `new` for one kind of object.
fn diff<K: Clone + Eq + std::hash::Hash + Ord, V: PartialEq>(
    old: &HashMap<K, Arc<V>>,
    new: &HashMap<K, Arc<V>>,
    change: impl Fn(K, Option<Arc<V>>) -> Change,
    deltas: &mut Vec<Delta>,
) {
    let mut changes: Vec<(K, Option<Arc<V>>)> = new
        .iter()
        .filter(|(key, object)| {
            old.get(*key)
                .is_none_or(|was| !Arc::ptr_eq(was, object) && was != *object)
        })
        .map(|(key, object)| (key.clone(), Some(object.clone())))
        .chain(
            old.keys()
                .filter(|key| !new.contains_key(*key))
                .map(|key| (key.clone(), None)),
        )
        .collect();
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    deltas.extend(
        changes
            .into_iter()
            .map(|(key, object)| Delta::Change(change(key, object))),
    );
}

impl Documents {
    /// Reads a new version of the file: parses the documents not seen before (logging what
    /// they skip) and returns the objects that changed since the last read.
    fn update(&mut self, path: &Path, text: &str, stats: &StatsHandle) -> Vec<Delta> {
        let mut parsed = HashMap::new();
        let mut objects = FileObjects::default();
        let mut skipped = 0;
        for (index, document) in manifest::split_documents(text).into_iter().enumerate() {
            let known = self
                .parsed
                .get(&document)
                .or_else(|| parsed.get(&document))
                .cloned();
            let found = known.unwrap_or_else(|| {
                let result = manifest::parse_document(&document, index + 1);
                for skip in &result.skipped {
                    warn!(file = %path.display(), "skipping {skip}");
                }
                skipped += result.skipped.len();
                Arc::new(DocumentObjects::from(&result))
            });
            for service in &found.services {
                objects.services.insert(service.id.clone(), service.clone());
            }
            for slice in &found.slices {
                objects.slices.insert(slice.key.clone(), slice.clone());
            }
            for node in &found.nodes {
                objects.nodes.insert(node.name.clone(), node.clone());
            }
            for object in &found.service_cidrs {
                objects
                    .service_cidrs
                    .insert(object.name.clone(), object.clone());
            }
            parsed.insert(document, found);
        }
        stats.update(|stats| stats.skipped_documents_total += skipped as u64);
        let mut deltas = Vec::new();
        diff(
            &self.objects.services,
            &objects.services,
            Change::Service,
            &mut deltas,
        );
        diff(
            &self.objects.slices,
            &objects.slices,
            Change::Slice,
            &mut deltas,
        );
        if objects.nodes != self.objects.nodes {
            deltas.push(Delta::Relisted(Relist::Nodes(
                objects.nodes.values().cloned().collect(),
            )));
        }
        if objects.service_cidrs != self.objects.service_cidrs {
            deltas.push(Delta::Relisted(Relist::ServiceCidrs(
                objects.service_cidrs.values().cloned().collect(),
            )));
        }
        info!(
            file = %path.display(),
            services = objects.services.len(),
            endpoint_slices = objects.slices.len(),
            changed = deltas.len(),
            "read manifests"
        );
        self.parsed = parsed;
        self.objects = objects;
        deltas
    }

    /// The complete lists, for the first read.
    fn lists(&self) -> Vec<Delta> {
        vec![
            Delta::Relisted(Relist::Services(
                self.objects.services.values().cloned().collect(),
            )),
            Delta::Relisted(Relist::Slices(
                self.objects.slices.values().cloned().collect(),
            )),
            Delta::Relisted(Relist::Nodes(
                self.objects.nodes.values().cloned().collect(),
            )),
            Delta::Relisted(Relist::ServiceCidrs(
                self.objects.service_cidrs.values().cloned().collect(),
            )),
            Delta::Listed,
        ]
    }
}

fn read(path: &Path) -> Result<String, FileSourceError> {
    std::fs::read_to_string(path).map_err(|source| FileSourceError {
        path: path.to_owned(),
        source,
    })
}

fn send_all(sender: &DeltaSender, deltas: Vec<Delta>) -> bool {
    deltas.into_iter().all(|delta| sender.send(delta).is_ok())
}

/// Why `text` looks cut short, if it does: it does not end with a line break, or its last
/// document is not a whole object (invalid YAML, or a Service, EndpointSlice or Node missing
/// what a complete one has). Broken documents before the last cannot come from a partial
/// write; they are skipped as usual. (A file cut exactly at a line break inside a document
/// can still look whole: only an atomic replacement rules that out.)
fn incomplete(text: &str) -> Option<String> {
    // Writers end a file with a line break; a file cut at an arbitrary byte almost never is.
    if !text.is_empty() && !text.ends_with('\n') {
        return Some("it does not end with a line break, as a file cut short does".to_owned());
    }
    let documents = manifest::split_documents(text);
    let (index, last) = documents
        .iter()
        .enumerate()
        .rev()
        .find(|(_, document)| !document.trim().is_empty())?;
    let parsed = manifest::parse_document(last, index + 1);
    if let Some(skip) = parsed
        .skipped
        .iter()
        .find(|skip| !skip.reason.starts_with("unsupported object"))
    {
        return Some(format!("its last document looks cut short ({skip})"));
    }
    // Every real Service has a spec; one without is a document cut after its metadata.
    parsed
        .snapshot
        .services
        .iter()
        .find(|service| service.spec.is_none())
        .map(|service| {
            format!(
                "its last document (document {}), Service {}, has no spec",
                index + 1,
                service.metadata.name.as_deref().unwrap_or("<unnamed>")
            )
        })
}

/// What the follower knows between polls.
struct Follower {
    path: PathBuf,
    stats: StatsHandle,
    documents: Documents,
    /// The content applied last (`None` before the first complete read).
    applied: Option<String>,
    /// A new content seen once, applied if the next poll finds the file unchanged.
    pending: Option<String>,
    /// The last content refused, so it is warned about once.
    refused: Option<String>,
}

impl Follower {
    /// Applies `text` if it is complete: the first time as complete lists (after which the
    /// runner may write), later as the objects that changed. Returns the deltas to send.
    fn settle(&mut self, text: String) -> Vec<Delta> {
        if self.applied.as_ref() == Some(&text) {
            return Vec::new();
        }
        if let Some(problem) = incomplete(&text) {
            if self.refused.as_ref() != Some(&text) {
                warn!(
                    file = %self.path.display(),
                    "manifests file {} is incomplete: {problem}; keeping the last good state until it is complete (replace it atomically: write another file, then rename it over this one)",
                    self.path.display()
                );
                self.refused = Some(text);
            }
            return Vec::new();
        }
        self.refused = None;
        let first = self.applied.is_none();
        let deltas = self.documents.update(&self.path, &text, &self.stats);
        self.applied = Some(text);
        if first {
            self.documents.lists()
        } else {
            deltas
        }
    }
}

/// Reads the file once (failing if it cannot be read at all) and then follows its changes in a
/// background task. A file that becomes unreadable later keeps the last good state; so does an
/// incomplete one. Nothing is listed (so nothing is written) before a complete read.
pub fn start(path: PathBuf, stats: StatsHandle) -> Result<DeltaReceiver, FileSourceError> {
    let mut last_stamp = stamp(&path).ok();
    let first = read(&path)?;
    let mut follower = Follower {
        path: path.clone(),
        stats,
        documents: Documents::default(),
        applied: None,
        pending: None,
        refused: None,
    };
    let (sender, receiver) = mpsc::unbounded_channel();
    send_all(&sender, follower.settle(first));
    tokio::spawn(async move {
        let mut unreadable_reported = false;
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            if sender.is_closed() {
                return;
            }
            let current = stamp(&path).ok();
            if current != last_stamp {
                // Changed since the last poll: read it, apply it only once it holds still.
                last_stamp = current;
                match read(&path) {
                    Ok(text) => {
                        unreadable_reported = false;
                        follower.pending = Some(text);
                    }
                    Err(error) if !unreadable_reported => {
                        unreadable_reported = true;
                        follower.pending = None;
                        warn!("{error}; keeping the last good state");
                    }
                    Err(_) => follower.pending = None,
                }
                continue;
            }
            if let Some(text) = follower.pending.take()
                && !send_all(&sender, follower.settle(text))
            {
                return;
            }
        }
    });
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn changed_names(deltas: &[Delta]) -> Vec<String> {
        deltas
            .iter()
            .map(|delta| match delta {
                Delta::Change(Change::Service(id, object)) => {
                    format!("{id}{}", if object.is_some() { "" } else { " gone" })
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_file_cut_short_is_recognised_and_a_whole_one_is_not() {
        let whole = format!(
            "{}---\n{}",
            service("a", "10.96.0.1"),
            service("b", "10.96.0.2")
        );
        assert_eq!(incomplete(&whole), None);
        assert_eq!(
            incomplete(""),
            None,
            "an empty file is complete (no Services)"
        );
        assert_eq!(incomplete(&format!("{whole}---\n")), None);
        // Unsupported kinds at the end are whole objects too.
        assert_eq!(
            incomplete(&format!(
                "{whole}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n"
            )),
            None
        );
        let first_len = service("a", "10.96.0.1").len();
        assert!(
            incomplete(whole.trim_end()).is_some(),
            "no final line break"
        );
        for cut in [30, 45, 60, 90, first_len + 10, whole.len() - 8] {
            let partial = &whole[..cut];
            let problem = incomplete(partial);
            assert!(problem.is_some(), "cut at {cut}: {partial:?}");
        }
        // A broken document in the middle is not a partial write: it is skipped as usual.
        let middle = format!("kind: [unclosed\n---\n{}", service("a", "10.96.0.1"));
        assert_eq!(incomplete(&middle), None);
    }

    #[test]
    fn an_incomplete_file_keeps_the_last_good_state_and_nothing_is_listed_before_a_whole_one() {
        let mut follower = Follower {
            path: PathBuf::from("m.yaml"),
            stats: StatsHandle::default(),
            documents: Documents::default(),
            applied: None,
            pending: None,
            refused: None,
        };
        let whole = format!(
            "{}---\n{}",
            service("a", "10.96.0.1"),
            service("b", "10.96.0.2")
        );
        assert!(
            follower
                .settle(whole[..whole.len() - 10].to_owned())
                .is_empty(),
            "not listed"
        );
        let lists = follower.settle(whole.clone());
        assert!(
            matches!(lists.last(), Some(Delta::Listed)),
            "listed once whole"
        );
        let cut = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: c}}\nspec:\n  ports: [{{port: x",
            service("a", "10.96.0.1")
        );
        assert!(
            follower.settle(cut).is_empty(),
            "b is not pruned by a partial file"
        );
        assert_eq!(
            changed_names(&follower.settle(service("a", "10.96.0.1"))),
            ["default/b gone"],
            "a complete file still removes what it no longer holds"
        );
    }

    #[test]
    fn only_objects_whose_documents_changed_become_deltas() {
        let stats = StatsHandle::default();
        let path = Path::new("m.yaml");
        let mut documents = Documents::default();
        let first = format!(
            "{}---\n{}",
            service("a", "10.96.0.1"),
            service("b", "10.96.0.2")
        );
        assert_eq!(documents.update(path, &first, &stats).len(), 2);
        let lists = documents.lists();
        assert!(matches!(lists.last(), Some(Delta::Listed)));
        // b changes, c appears, a stays: a is neither parsed again nor sent.
        let second = format!(
            "{}---\n{}---\n{}",
            service("a", "10.96.0.1"),
            service("b", "10.96.0.3"),
            service("c", "10.96.0.4")
        );
        assert_eq!(
            changed_names(&documents.update(path, &second, &stats)),
            ["default/b", "default/c"]
        );
        let third = service("c", "10.96.0.4");
        assert_eq!(
            changed_names(&documents.update(path, &third, &stats)),
            ["default/a gone", "default/b gone"]
        );
        assert!(
            documents.update(path, &third, &stats).is_empty(),
            "reading the same text again changes nothing"
        );
    }
}
