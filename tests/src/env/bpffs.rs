//! A private bpffs instance per test, so each agent's pins are isolated and vanish with it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::env::tempdir::TempDir;

/// A fresh bpffs mounted on a new temp directory in the root mount namespace. `ip netns exec`
/// only remounts /sys, so children started that way still see it. Dropping it unmounts it (lazily,
/// in case something still has it open) and removes the directory.
#[derive(Debug)]
pub struct PrivateBpffs {
    // Declared so that the mount is gone before the directory is removed (see Drop).
    dir: TempDir,
}

impl PrivateBpffs {
    pub fn new() -> Result<Self> {
        let dir = TempDir::new()?;
        mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs on {}", dir.path().display()))?;
        Ok(Self { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The directory handed to the agent as `--bpffs`.
    pub fn agent_dir(&self) -> PathBuf {
        self.path().join("switchyard")
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Err(e) = umount2(self.dir.path(), MntFlags::MNT_DETACH) {
            eprintln!(
                "warning: unmounting bpffs {}: {e}",
                self.dir.path().display()
            );
        }
    }
}

/// Every regular entry (pinned map, program or link) below `dir`, recursively.
pub fn pinned_objects(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = match std::fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", current.display())),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Whether anything is mounted on `dir` or below it.
pub fn holds_mount(dir: &Path) -> bool {
    crate::env::mounts::current().map_or(true, |mounts| {
        mounts.iter().any(|m| m.mount_point.starts_with(dir))
    })
}
