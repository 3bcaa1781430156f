//! Whether the mounts the agent found reach beyond the agent: pins on a bpffs that outlives
//! it, and socket hooks on a cgroup that covers the host's cgroup tree. Private namespaces (a
//! container without the host's mounts, an `unshare`) otherwise give an agent that runs and
//! reports healthy while its pins die with it, or while its hooks see only its own cgroup.
use std::path::{Component, Path, PathBuf};

use super::mountinfo::{self, MountEntry};

/// `PROC_PID_INIT_INO` (include/linux/proc_ns.h): the initial PID namespace, whose PID 1 is
/// the host's init and whose mount table is the host's.
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";
/// `PROC_CGROUP_INIT_INO`: the initial cgroup namespace.
const INITIAL_CGROUP_NAMESPACE: &str = "cgroup:[4026531835]";
/// A cgroup v2 file every cgroup but the root of the whole hierarchy has (CFTYPE_NOT_ON_ROOT),
/// whatever cgroup namespace looks at it.
const NOT_ON_ROOT_FILE: &str = "cgroup.type";

/// What to mount so pins outlive the agent.
const BPFFS_FIX: &str = "give the agent the host's bpffs: on the host, `mount -t bpf bpf /sys/fs/bpf` if nothing is mounted there, then bind that directory into the agent's mount namespace (Kubernetes: a hostPath volume /sys/fs/bpf with mountPropagation: HostToContainer and hostPID: true, as deploy/30-daemonset.yaml does; docker: --pid=host -v /sys/fs/bpf:/sys/fs/bpf:rslave) and keep --bpffs below it";
/// What to mount so the hooks cover every cgroup of the host.
const CGROUP_FIX: &str = "mount the host's cgroup2 root and attach there: on the host, in its cgroup namespace, `nsenter --target 1 --mount --cgroup -- mount -t cgroup2 none /run/switchyard/cgroupv2`, bind /run/switchyard/cgroupv2 into the agent (Kubernetes: a hostPath volume with mountPropagation: HostToContainer, as deploy/30-daemonset.yaml's init container prepares it) and run with --cgroup-path /run/switchyard/cgroupv2";

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "the pins under {pins} would not outlive this agent: their bpffs (device {}:{}) is not mounted in the host's mount namespace (PID 1's), only in this agent's own, and goes away with it, detaching every program; {fix}",
        .device.0,
        .device.1,
        fix = BPFFS_FIX
    )]
    PrivateBpffs { pins: PathBuf, device: (u32, u32) },
    #[error(
        "cannot tell whether the pins under {pins} outlive this agent: it runs in a private PID namespace, so the host's mount table is hidden, and their bpffs at {mount_point} is a private mount that receives nothing from another mount namespace (it may have been mounted inside this agent's own); {fix}",
        fix = BPFFS_FIX
    )]
    UnverifiableBpffs { pins: PathBuf, mount_point: PathBuf },
    #[error(
        "the socket hooks would not cover the host's cgroup tree: {cgroup} lies inside this agent's private cgroup namespace ({namespace}), whose root is the agent's own cgroup, so only the agent's processes would be load-balanced; {fix}",
        fix = CGROUP_FIX
    )]
    PrivateCgroup { cgroup: PathBuf, namespace: String },
    #[error(
        "the socket hooks would not cover the host's cgroup tree: {cgroup}, the cgroup2 mount found, is not the root of the hierarchy (pass --cgroup-path to choose a subtree on purpose); {fix}",
        fix = CGROUP_FIX
    )]
    NotHierarchyRoot { cgroup: PathBuf },
    #[error("cannot check the mount of {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the pins outlive the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinScope {
    /// The bpffs is mounted in the host's mount namespace (at this mount point there).
    HostNamespace(PathBuf),
    /// Reached through another process's root (`ip netns exec`'s outer namespace).
    OuterNamespace,
    /// A mount propagated from (or to) another mount namespace.
    Propagated(PathBuf),
}

/// What the socket hooks cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupScope {
    /// The root of the whole cgroup v2 hierarchy: every process on the host.
    HostRoot,
    /// A subtree chosen with --cgroup-path.
    Subtree,
}

fn namespace(kind: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .ok()
        .map(|link| link.to_string_lossy().into_owned())
}

fn read_table(path: &Path) -> Result<Vec<MountEntry>, ScopeError> {
    std::fs::read_to_string(path)
        .map(|text| mountinfo::parse(&text))
        .map_err(|source| ScopeError::Unreadable {
            path: path.to_owned(),
            source,
        })
}

/// The host's mount table, when this process can see it (in the initial PID namespace, PID 1
/// is the host's init).
fn host_table() -> Option<Vec<MountEntry>> {
    (namespace("pid").as_deref() == Some(INITIAL_PID_NAMESPACE))
        .then(|| read_table(Path::new("/proc/1/mountinfo")).ok())
        .flatten()
}

fn device_of(path: &Path) -> Result<(u32, u32), ScopeError> {
    let existing = path
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(path);
    let stat = nix::sys::stat::stat(existing).map_err(|errno| ScopeError::Unreadable {
        path: existing.to_owned(),
        source: errno.into(),
    })?;
    let major = nix::sys::stat::major(stat.st_dev);
    let minor = nix::sys::stat::minor(stat.st_dev);
    Ok((
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    ))
}

/// `/proc/PID/root/REST` split into the mountinfo of PID and REST (absolute), for paths
/// resolved through another mount namespace.
fn through_process_root(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let rest = path.strip_prefix("/proc").ok()?;
    let mut components = rest.components();
    let pid = components.next()?.as_os_str().to_str()?;
    if !pid.bytes().all(|b| b.is_ascii_digit()) || components.next()?.as_os_str() != "root" {
        return None;
    }
    Some((
        Path::new("/proc").join(pid).join("mountinfo"),
        Path::new("/").join(components.as_path()),
    ))
}

/// Checks that the pins under `pins` (on a bpffs) outlive this process.
pub fn check_pins(pins: &Path) -> Result<PinScope, ScopeError> {
    let device = device_of(pins)?;
    if let Some(host) = host_table() {
        return host
            .iter()
            .find(|entry| entry.fs_type == "bpf" && entry.device == device)
            .map(|entry| PinScope::HostNamespace(entry.mount_point.clone()))
            .ok_or_else(|| ScopeError::PrivateBpffs {
                pins: pins.to_owned(),
                device,
            });
    }
    if through_process_root(pins).is_some() {
        return Ok(PinScope::OuterNamespace);
    }
    let own = read_table(Path::new("/proc/self/mountinfo"))?;
    let mount = innermost_mount(&own, pins, "bpf");
    match mount {
        Some(entry) if entry.device == device && entry.propagates() => {
            Ok(PinScope::Propagated(entry.mount_point.clone()))
        }
        _ => Err(ScopeError::UnverifiableBpffs {
            pins: pins.to_owned(),
            mount_point: mount.map_or_else(|| pins.to_owned(), |entry| entry.mount_point.clone()),
        }),
    }
}

/// The mount of `fs_type` with the longest mount point that holds `path`.
fn innermost_mount<'a>(
    table: &'a [MountEntry],
    path: &Path,
    fs_type: &str,
) -> Option<&'a MountEntry> {
    table
        .iter()
        .filter(|entry| entry.fs_type == fs_type && path.starts_with(&entry.mount_point))
        .max_by_key(|entry| entry.mount_point.components().count())
}

/// Whether `dir` is the root of the whole cgroup v2 hierarchy (not of a cgroup namespace).
pub fn is_hierarchy_root(dir: &Path) -> bool {
    !dir.join(NOT_ON_ROOT_FILE).exists()
}

/// `root` (a mountinfo root field, relative to this process's cgroup namespace) joined with
/// `below`, lexically normalised; `None` when it climbs above the namespace's root.
fn inside_namespace(root: &str, below: &Path) -> Option<PathBuf> {
    let joined = Path::new(root).join(below);
    let mut inside: Vec<&std::ffi::OsStr> = Vec::new();
    for component in joined.components() {
        match component {
            Component::Normal(name) => inside.push(name),
            Component::ParentDir => {
                inside.pop()?;
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(inside.iter().collect())
}

/// Checks that socket hooks on `cgroup` cover what they should: the host's whole tree, or,
/// when `chosen` (--cgroup-path), a subtree of the host's tree rather than of this agent's
/// private cgroup namespace.
pub fn check_cgroup(cgroup: &Path, chosen: bool) -> Result<CgroupScope, ScopeError> {
    if is_hierarchy_root(cgroup) {
        return Ok(CgroupScope::HostRoot);
    }
    let namespace = namespace("cgroup").unwrap_or_default();
    if namespace != INITIAL_CGROUP_NAMESPACE {
        let (table_path, in_table) = through_process_root(cgroup)
            .unwrap_or_else(|| (PathBuf::from("/proc/self/mountinfo"), cgroup.to_owned()));
        let table = read_table(&table_path)?;
        let confined = innermost_mount(&table, &in_table, "cgroup2").is_none_or(|mount| {
            let below = in_table
                .strip_prefix(&mount.mount_point)
                .unwrap_or(Path::new(""));
            inside_namespace(&mount.root, below).is_some()
        });
        if confined {
            return Err(ScopeError::PrivateCgroup {
                cgroup: cgroup.to_owned(),
                namespace,
            });
        }
    }
    if chosen {
        Ok(CgroupScope::Subtree)
    } else {
        Err(ScopeError::NotHierarchyRoot {
            cgroup: cgroup.to_owned(),
        })
    }
}

/// Whether this process runs in the initial cgroup namespace (a cgroup2 mounted here is then
/// the host's whole hierarchy).
pub fn in_initial_cgroup_namespace() -> bool {
    namespace("cgroup").as_deref() == Some(INITIAL_CGROUP_NAMESPACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_mount_rooted_above_the_namespace_is_outside_it() {
        assert_eq!(inside_namespace("/..", Path::new("")), None);
        assert_eq!(inside_namespace("/../..", Path::new("a")), None);
        assert_eq!(inside_namespace("/", Path::new("")), Some(PathBuf::new()));
        assert_eq!(
            inside_namespace("/", Path::new("pods/a")),
            Some(PathBuf::from("pods/a"))
        );
        assert_eq!(
            inside_namespace("/x/..", Path::new("b")),
            Some(PathBuf::from("b"))
        );
    }

    #[test]
    fn paths_through_another_process_root_read_its_mount_table() {
        assert_eq!(
            through_process_root(Path::new("/proc/42/root/sys/fs/bpf/switchyard")),
            Some((
                PathBuf::from("/proc/42/mountinfo"),
                PathBuf::from("/sys/fs/bpf/switchyard")
            ))
        );
        assert_eq!(through_process_root(Path::new("/proc/self/root/x")), None);
        assert_eq!(through_process_root(Path::new("/sys/fs/bpf")), None);
    }

    #[test]
    fn the_innermost_mount_of_a_type_holds_the_path() {
        let table = mountinfo::parse(
            "\
1 0 0:1 / / rw - ext4 /dev/sda rw
2 1 0:40 / /sys/fs/bpf rw shared:3 - bpf bpf rw
3 2 0:41 / /sys/fs/bpf/inner rw - bpf bpf rw
",
        );
        let found = innermost_mount(&table, Path::new("/sys/fs/bpf/inner/switchyard"), "bpf");
        assert_eq!(found.map(|entry| entry.device), Some((0, 41)));
        let found = innermost_mount(&table, Path::new("/sys/fs/bpf/switchyard"), "bpf");
        assert!(found.is_some_and(MountEntry::propagates));
        assert!(innermost_mount(&table, Path::new("/tmp"), "bpf").is_none());
    }

    #[test]
    fn the_hierarchy_root_is_told_from_its_children() {
        // On this machine's cgroup2 mount of the whole hierarchy, when it has one: the mount
        // point is the root, each child cgroup is not.
        let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let Some(mount) = mountinfo::parse(&text).into_iter().find(|entry| {
            entry.fs_type == "cgroup2" && entry.root == "/" && in_initial_cgroup_namespace()
        }) else {
            return;
        };
        assert!(is_hierarchy_root(&mount.mount_point));
        let children = std::fs::read_dir(&mount.mount_point)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().join("cgroup.procs").exists());
        for child in children {
            assert!(
                !is_hierarchy_root(&child.path()),
                "{}",
                child.path().display()
            );
        }
    }
}
