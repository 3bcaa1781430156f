//! One agent per pin root. Two agents on the same pins would retire each other's links and
//! write the same maps from private mirrors (handing out the same ids), so the agent holds an
//! exclusive `flock` on the pin root directory for as long as it runs; a second agent fails at
//! once, naming the holder, before it touches anything. The kernel drops the lock when the
//! holder exits, however it exits (SIGKILL included), so there is no stale lock to clean.
//! `inspect` and `dump` only read and take no lock; `cleanup` refuses while an agent runs.
use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another switchyard agent ({holder}) is running on the pins under {root}: only one agent may run per pin root (stop it first, or give this one another --bpffs)"
    )]
    Held { root: PathBuf, holder: String },
    #[error("cannot lock the pin root {root}: {source}")]
    Io {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The exclusive lock on a pin root, held until dropped.
#[derive(Debug)]
pub struct PinRootLock {
    _lock: Flock<File>,
}

impl PinRootLock {
    /// Takes the lock on `root` (created if missing), failing at once if another process holds
    /// it.
    pub fn acquire(root: &Path) -> Result<Self, LockError> {
        let io = |source: std::io::Error| LockError::Io {
            root: root.to_owned(),
            source,
        };
        std::fs::create_dir_all(root).map_err(io)?;
        let directory = File::open(root).map_err(io)?;
        match Flock::lock(directory, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Held {
                root: root.to_owned(),
                holder: describe_holder(holder(root)),
            }),
            Err((_, errno)) => Err(io(errno.into())),
        }
    }
}

/// Whether an agent holds the lock on `root` now (without taking it).
pub fn held_by(root: &Path) -> Option<Option<u32>> {
    let directory = File::open(root).ok()?;
    match Flock::lock(directory, FlockArg::LockSharedNonblock) {
        // Nobody holds it exclusively; the shared lock goes with the returned value.
        Ok(_) => None,
        Err(_) => Some(holder(root)),
    }
}

fn describe_holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => {
            let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|name| format!(" {}", name.trim()))
                .unwrap_or_default();
            format!("PID {pid}{command}")
        }
        None => "PID unknown (not visible from this PID namespace)".to_owned(),
    }
}

/// The PID holding a flock on `root`, from `/proc/locks` (in this PID namespace's numbers).
pub fn holder(root: &Path) -> Option<u32> {
    let metadata = std::fs::metadata(root).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, metadata.dev(), metadata.ino())
}

/// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 4242 00:2e:1093 0 EOF`.
fn holder_in(locks: &str, dev: u64, inode: u64) -> Option<u32> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with "->" and shifts the fields by one.
        if fields.get(1) != Some(&"FLOCK") || fields.get(3) != Some(&"WRITE") {
            return None;
        }
        let mut device = fields.get(5)?.split(':');
        let line_major = u64::from_str_radix(device.next()?, 16).ok()?;
        let line_minor = u64::from_str_radix(device.next()?, 16).ok()?;
        let line_inode: u64 = device.next()?.parse().ok()?;
        (line_major == major && line_minor == minor && line_inode == inode)
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let dev = nix::sys::stat::makedev(0, 0x2e);
        let locks = "1: POSIX  ADVISORY  WRITE 11 00:2e:1093 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2e:1093 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:2e:1093 0 EOF\n";
        assert_eq!(holder_in(locks, dev, 1093), Some(4242));
        assert_eq!(holder_in(locks, dev, 1094), None, "another inode");
        assert_eq!(
            holder_in(locks, nix::sys::stat::makedev(0, 0x2f), 1093),
            None,
            "another device"
        );
    }

    #[test]
    fn a_second_lock_on_the_same_root_fails_naming_this_process() {
        let root = std::env::temp_dir().join(format!("sy-lock-{}", std::process::id()));
        let first = PinRootLock::acquire(&root).expect("the first lock");
        assert_eq!(held_by(&root), Some(Some(std::process::id())));
        let error = PinRootLock::acquire(&root).expect_err("a second lock must fail");
        let text = error.to_string();
        assert!(
            text.contains(&format!("PID {}", std::process::id())),
            "the holder is named: {text}"
        );
        drop(first);
        assert_eq!(held_by(&root), None);
        let again = PinRootLock::acquire(&root).expect("free again once dropped");
        drop(again);
        std::fs::remove_dir(&root).expect("removing the test directory");
    }
}
