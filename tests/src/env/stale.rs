//! Removal of resources left behind by test processes that died without unwinding.
//!
//! Only resources whose name carries the pid of a process that no longer exists are touched
//! (see [`crate::env::names`]), so concurrent test runs never interfere with each other.

use std::path::Path;
use std::sync::Once;

use nix::mount::{MntFlags, umount2};

use crate::env::names;

/// Sweeps once per process, before the first resource is created.
pub fn sweep_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sweep);
}

fn sweep() {
    let temp = std::env::temp_dir();
    // Unmount first so the directory sweep below never deletes pins through a live mount.
    if let Ok(mounts) = crate::env::mounts::current() {
        for mount in mounts {
            let ours = mount.mount_point.parent() == Some(temp.as_path())
                && is_stale_path(&mount.mount_point);
            if ours && mount.fs_type == "bpf" {
                let _ = umount2(&mount.mount_point, MntFlags::MNT_DETACH);
            }
        }
    }
    for dir in stale_entries(&temp) {
        if !crate::env::bpffs::holds_mount(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    if let Ok(root) = crate::env::mounts::cgroup2_root() {
        for cgroup in stale_entries(&root) {
            let _ = crate::env::cgroup::remove(&cgroup);
        }
    }
    for handle in stale_entries(Path::new(crate::env::netns::NETNS_DIR)) {
        if let Some(name) = handle.file_name() {
            let _ = crate::env::netns::delete_namespace(&name.to_string_lossy());
        }
    }
}

fn stale_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| is_stale_path(path))
        .collect()
}

fn is_stale_path(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| names::is_stale(&name.to_string_lossy()))
}
