//! Reading the mount table of this process (`/proc/self/mountinfo`).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// One line of mountinfo: where something is mounted and its filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

pub fn current() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(parse(&text))
}

/// Parses mountinfo text (see proc(5)): field 5 is the mount point, and the filesystem type is
/// the first field after the ` - ` separator.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let fs_type = after.split(' ').next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// The mount point of the cgroup v2 hierarchy (it is not always /sys/fs/cgroup: hybrid hosts
/// mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    current()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .context("no cgroup2 filesystem is mounted")
}

/// Mountinfo escapes space, tab, newline and backslash as three-digit octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(value)) => {
                out.push(value);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_cgroup2_and_escaped_paths() {
        let text = "\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 24 0:50 / /tmp/a\\040b rw - bpf bpf rw
";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].fs_type, "cgroup2");
        assert_eq!(
            mounts[1].mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(mounts[2].mount_point, PathBuf::from("/tmp/a b"));
    }
}
