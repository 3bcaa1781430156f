//! Finding the bpffs and cgroup2 mounts the agent needs, in any mount namespace.
//!
//! `ip netns exec` gives its command a private mount namespace with a fresh /sys, so neither
//! the host's bpffs nor its cgroup2 mount is visible there. Pins made on a bpffs mounted inside
//! such a namespace would die with it (and detach the programs), so the agent looks at the
//! outer view — through `/proc/PID/root` of the nearest ancestor process that lives in another
//! mount namespace (the one that ran `ip netns exec`; PID 1 itself is not always inspectable)
//! — and, when bpffs must be mounted, mounts it in that outer mount namespace.
use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};
use tracing::info;

use super::mount_scope;

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Where the agent mounts cgroup2 when none is mounted.
const PRIVATE_CGROUP2_MOUNT: &str = "/run/switchyard/cgroup2";
/// The conventional bpffs mount point.
const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "cgroup path {path} is not a cgroup v2 directory (looked in this mount namespace and, under `ip netns exec`, in the outer one)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("cannot mount {fstype} at {path}: {reason}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn fs_magic(path: &Path) -> Option<i64> {
    #[expect(
        clippy::useless_conversion,
        reason = "the statfs type is i64 on some targets and u32/i32 on others"
    )]
    statfs(path)
        .ok()
        .map(|fs| i64::from(fs.filesystem_type().0))
}

/// The nearest existing ancestor of `path` (or `path` itself).
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|ancestor| ancestor.exists())
}

fn on_bpffs(path: &Path) -> bool {
    existing_ancestor(path).and_then(fs_magic) == Some(BPF_FS_MAGIC)
}

fn is_cgroup2(path: &Path) -> bool {
    path.is_dir() && fs_magic(path) == Some(CGROUP2_SUPER_MAGIC)
}

fn mount_namespace(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

fn parent_pid(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let fields = &stat[stat.rfind(')')? + 1..];
    fields.split_whitespace().nth(1).map(str::to_owned)
}

/// The nearest ancestor process living in another mount namespace than ours, if any: its
/// namespace is the "outer" one whose mounts `ip netns exec` hid from us.
fn outer_namespace_pid() -> Option<String> {
    let own = mount_namespace("self")?;
    let mut pid = parent_pid("self")?;
    for _ in 0..64 {
        if pid == "0" {
            return None;
        }
        if mount_namespace(&pid).is_some_and(|ns| ns != own) {
            return Some(pid);
        }
        pid = parent_pid(&pid)?;
    }
    None
}

/// `path` as seen from the mount namespace of process `pid`.
fn outer_view(pid: &str, path: &Path) -> PathBuf {
    Path::new("/proc")
        .join(pid)
        .join("root")
        .join(path.strip_prefix("/").unwrap_or(path))
}

fn create_dir(path: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(path).map_err(|source| MountError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Where `requested` already lies on a bpffs (here or, under `ip netns exec`, in the outer
/// mount namespace), without mounting anything: for commands that only read or remove pins.
pub fn find_bpffs(requested: &Path) -> Option<PathBuf> {
    if on_bpffs(requested) {
        return Some(requested.to_owned());
    }
    let pid = outer_namespace_pid()?;
    on_bpffs(&outer_view(&pid, requested)).then(|| outer_view(&pid, requested))
}

/// Returns a directory on bpffs where pins outlive this process, mounting bpffs if needed.
pub fn resolve_bpffs(requested: &Path) -> Result<PathBuf, MountError> {
    if on_bpffs(requested) {
        return Ok(requested.to_owned());
    }
    let outer = outer_namespace_pid();
    if let Some(pid) = &outer
        && on_bpffs(&outer_view(pid, requested))
    {
        info!(path = %requested.display(), via = %outer_view(pid, requested).display(), "using the outer mount namespace's bpffs");
        return Ok(outer_view(pid, requested));
    }
    let mount_point = if requested.starts_with(DEFAULT_BPFFS_MOUNT) {
        Path::new(DEFAULT_BPFFS_MOUNT)
    } else {
        requested
    };
    if let Some(pid) = &outer {
        // Mount in the outer namespace: a bpffs mounted in ours would vanish with it.
        let status = Command::new("nsenter")
            .args([
                "--target",
                pid,
                "--mount",
                "--",
                "sh",
                "-c",
                "mkdir -p \"$1\" && mount -t bpf bpf \"$1\"",
                "sh",
            ])
            .arg(mount_point)
            .status()
            .map_err(|error| MountError::Mount {
                fstype: "bpf",
                path: mount_point.to_owned(),
                reason: format!("cannot run nsenter: {error}"),
            })?;
        if !status.success() || !on_bpffs(&outer_view(pid, requested)) {
            return Err(MountError::Mount {
                fstype: "bpf",
                path: mount_point.to_owned(),
                reason: format!(
                    "mounting in the outer mount namespace (of process {pid}) failed ({status})"
                ),
            });
        }
        info!(path = %mount_point.display(), "mounted bpffs in the outer mount namespace");
        return Ok(outer_view(pid, requested));
    }
    create_dir(mount_point)?;
    mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| MountError::Mount {
        fstype: "bpf",
        path: mount_point.to_owned(),
        reason: errno.desc().to_owned(),
    })?;
    info!(path = %mount_point.display(), "mounted bpffs");
    Ok(requested.to_owned())
}

/// Mount points of a filesystem type, from a mountinfo file.
fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    super::mountinfo::parse(mountinfo)
        .into_iter()
        .filter(|entry| entry.fs_type == fstype)
        .map(|entry| entry.mount_point)
        .collect()
}

/// Returns the cgroup v2 directory to attach the socket hooks to. Without a request, the root
/// of the cgroup2 hierarchy (mounting one at a private path when none is mounted).
pub fn resolve_cgroup(requested: Option<&Path>) -> Result<PathBuf, MountError> {
    if let Some(path) = requested {
        if is_cgroup2(path) {
            return Ok(path.to_owned());
        }
        if let Some(pid) = outer_namespace_pid()
            && is_cgroup2(&outer_view(&pid, path))
        {
            info!(path = %path.display(), via = %outer_view(&pid, path).display(), "using the cgroup of the outer mount namespace");
            return Ok(outer_view(&pid, path));
        }
        return Err(MountError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted: Vec<PathBuf> = mounts_of(&mountinfo, "cgroup2")
        .into_iter()
        .filter(|path| is_cgroup2(path))
        .collect();
    // The root of the whole hierarchy if one is mounted; else, in a private cgroup namespace,
    // what is mounted (which `mount_scope` then refuses: a cgroup2 mounted here would only be
    // the namespace's root too, so nothing is mounted).
    if let Some(root) = mounted
        .iter()
        .find(|path| mount_scope::is_hierarchy_root(path))
        .or_else(|| {
            mounted
                .first()
                .filter(|_| !mount_scope::in_initial_cgroup_namespace())
        })
    {
        return Ok(root.clone());
    }
    if !mount_scope::in_initial_cgroup_namespace() {
        return Err(MountError::Mount {
            fstype: "cgroup2",
            path: PathBuf::from(PRIVATE_CGROUP2_MOUNT),
            reason: "no cgroup2 is mounted, and one mounted in this private cgroup namespace would show only the agent's own cgroup: mount the host's cgroup2 and pass --cgroup-path (see README, \"Replacing kube-proxy\")".to_owned(),
        });
    }
    let private = Path::new(PRIVATE_CGROUP2_MOUNT);
    if !is_cgroup2(private) {
        create_dir(private)?;
        mount(
            Some("cgroup2"),
            private,
            Some("cgroup2"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|errno| MountError::Mount {
            fstype: "cgroup2",
            path: private.to_owned(),
            reason: errno.desc().to_owned(),
        })?;
        info!(path = %private.display(), "no cgroup2 mounted: mounted one");
    }
    Ok(private.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_mountinfo() {
        let mountinfo = "\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
35 33 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
36 33 0:31 / /mnt/with\\040space rw - cgroup2 none rw
";
        assert_eq!(
            mounts_of(mountinfo, "cgroup2"),
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }

    #[test]
    fn outer_view_goes_through_the_process_root() {
        assert_eq!(
            outer_view("42", Path::new("/sys/fs/bpf/x")),
            PathBuf::from("/proc/42/root/sys/fs/bpf/x")
        );
    }

    #[test]
    fn parent_of_this_process_is_found() {
        assert_eq!(
            parent_pid("self"),
            Some(std::os::unix::process::parent_id().to_string())
        );
    }
}
