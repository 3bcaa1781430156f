//! Reading a mount table (`/proc/PID/mountinfo`, see proc(5)).
use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The filesystem's device (`major:minor`): the same superblock has the same device in
    /// every mount namespace, which is how one mount is recognised in another table.
    pub device: (u32, u32),
    /// The directory of the filesystem this mount shows, as the reading process sees it: for a
    /// cgroup2 mount, relative to the reader's cgroup namespace (`/..` when above its root).
    pub root: String,
    pub mount_point: PathBuf,
    /// The optional fields: `shared:N` (propagates to its peers), `master:N` (receives from
    /// peer group N), `propagate_from:N`, `unbindable`. None: a private mount.
    pub propagation: Vec<String>,
    pub fs_type: String,
}

impl MountEntry {
    /// Whether this mount exchanges mounts with another mount (namespace): a shared mount
    /// or a slave of one.
    pub fn propagates(&self) -> bool {
        self.propagation
            .iter()
            .any(|tag| tag.starts_with("shared:") || tag.starts_with("master:"))
    }
}

/// Every well-formed line of `text`; others are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut fields = left.split_whitespace();
    let _mount_id = fields.next()?;
    let _parent_id = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = PathBuf::from(unescape(fields.next()?));
    let _options = fields.next()?;
    Some(MountEntry {
        device: (major.parse().ok()?, minor.parse().ok()?),
        root,
        mount_point,
        propagation: fields.map(str::to_owned).collect(),
        fs_type: right.split_whitespace().next()?.to_owned(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
pub fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(index) = rest.find('\\') {
        out.push_str(&rest[..index]);
        let code = rest
            .get(index + 1..index + 4)
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let Some(byte) = code {
            out.push(char::from(byte));
            rest = &rest[index + 4..];
        } else {
            out.push('\\');
            rest = &rest[index + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_device_root_propagation_and_type() {
        let text = "\
35 33 0:30 /.. /sys/fs/cgroup/unified rw,nosuid shared:9 master:2 - cgroup2 cgroup2 rw
36 33 0:31 / /mnt/with\\040space rw - bpf none rw
garbage line
";
        let entries = parse(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].device, (0, 30));
        assert_eq!(entries[0].root, "/..");
        assert_eq!(entries[0].propagation, ["shared:9", "master:2"]);
        assert!(entries[0].propagates());
        assert_eq!(entries[1].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(entries[1].fs_type, "bpf");
        assert!(!entries[1].propagates());
    }
}
