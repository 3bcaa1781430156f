//! The socket hooks' settings: which network namespace is the host's, so that externalIPs
//! equal to a node or API server address are not translated for host processes
//! (CVE-2020-8554). The agent runs in the host's network namespace (the DaemonSet's
//! `hostNetwork`), so the host is its own namespace.
use std::{
    io,
    os::fd::{AsRawFd, RawFd},
};

use aya::{Ebpf, maps::Array};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use proxy_common::{SockConfig, map_names};

use super::error::LoadError;

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14): the value
/// `bpf_get_netns_cookie` gives the hooks for sockets there.
pub fn own_netns_cookie() -> io::Result<u64> {
    let probe = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    netns_cookie(probe.as_raw_fd())
}

/// nix has no getter for this option, so it is asked for directly: the hooks compare sockets
/// with this very value.
#[expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in nix or rustix"
)]
fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("8 fits");
    // SAFETY: `fd` is an open socket owned by the caller for the whole call; `cookie` and
    // `len` are valid, writable and describe an 8-byte buffer, as SO_NETNS_COOKIE writes.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if result == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes the socket hooks' settings into the pinned map.
pub fn write(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let name = map_names::SOCK_CONFIG;
    let failed = |source| LoadError::Map {
        map: name,
        action: "writing the socket hooks' settings",
        source,
    };
    let host_netns_cookie = own_netns_cookie().map_err(LoadError::NetnsCookie)?;
    let map = ebpf
        .map_mut(name)
        .ok_or(LoadError::MissingMap { map: name })?;
    let mut config: Array<_, SockConfig> = Array::try_from(map).map_err(failed)?;
    config
        .set(0, SockConfig { host_netns_cookie }, 0)
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netns_cookie_is_stable_and_nonzero() {
        let cookie = own_netns_cookie().expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        assert_ne!(cookie, 0);
        assert_eq!(own_netns_cookie().unwrap(), cookie);
    }
}
