//! Wakes the interface follower when the kernel announces a link, address or route change
//! (rtnetlink multicast groups), so pods' host veths and late interfaces are attached as
//! they appear instead of on a polling period. The messages are not decoded: any of them
//! (or a lost one, `ENOBUFS`) means "read the interfaces and routes again", which the
//! follower does from the kernel's own listings.
use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv,
        setsockopt, socket, sockopt,
    },
};
use tokio::sync::Notify;
use tracing::warn;

/// How long the follower waits after a wake-up for the rest of a burst (a new pod brings a
/// link, its state changes, addresses and a route within milliseconds).
pub const COALESCE: Duration = Duration::from_millis(50);

/// The rtnetlink multicast groups followed.
const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_ROUTE)
    .unsigned_abs();

/// A socket subscribed to the groups, not read yet.
pub struct LinkEvents {
    socket: OwnedFd,
}

/// Subscribes in the agent's network namespace.
pub fn subscribe() -> nix::Result<LinkEvents> {
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    // A large buffer makes overruns (a node starting hundreds of pods) rare; an overrun is
    // harmless anyway (see the module documentation).
    let _ = setsockopt(&socket, sockopt::RcvBuf, &(1 << 20));
    bind(socket.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))?;
    Ok(LinkEvents { socket })
}

impl LinkEvents {
    /// Reads the socket on its own thread (a blocking read: the agent's runtime is never
    /// held) and returns what it notifies on every message.
    pub fn spawn_reader(self) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let wake = notify.clone();
        let spawned = std::thread::Builder::new()
            .name("link-events".to_owned())
            .spawn(move || {
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    match recv(self.socket.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                        Ok(_) | Err(Errno::ENOBUFS) => wake.notify_one(),
                        Err(Errno::EINTR) => {}
                        Err(error) => {
                            warn!("rtnetlink events stopped ({error}): new interfaces are no longer attached until the agent restarts");
                            return;
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            warn!("cannot start the rtnetlink reader: {error}");
        }
        notify
    }
}
