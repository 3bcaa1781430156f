//! NETLINK_SOCK_DIAG for UDP sockets of the calling thread's network namespace: list the
//! connected ones and destroy one (SOCK_DESTROY, which needs CONFIG_INET_DIAG_DESTROY).
//! Messages are built and parsed as bytes (include/uapi/linux/inet_diag.h, netlink.h).
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        setsockopt, socket, sockopt,
    },
    time::TimeVal,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HEADER_LEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then five u32s.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// A connected UDP socket is in TCP_ESTABLISHED (1); the request's state mask is 1 << state.
const ESTABLISHED_ONLY: u32 = 1 << 1;
const ALL_STATES: u32 = u32::MAX;
const IPPROTO_UDP: u8 = 17;

/// A connected UDP socket as sock_diag identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocketId {
    pub family: u8,
    id: [u8; SOCKID_LEN],
}

impl UdpSocketId {
    /// Where the socket is connected to.
    pub fn destination(&self) -> SocketAddr {
        let port = u16::from_be_bytes([self.id[2], self.id[3]]);
        let address: [u8; 16] = self.id[20..36].try_into().expect("16 bytes");
        let ip = if i32::from(self.family) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(
                address[0], address[1], address[2], address[3],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(address))
        };
        SocketAddr::new(ip, port)
    }

    /// The socket cookie (what `bpf_get_socket_cookie` returns for it).
    pub fn cookie(&self) -> u64 {
        let low = u32::from_ne_bytes(self.id[40..44].try_into().expect("4 bytes"));
        let high = u32::from_ne_bytes(self.id[44..48].try_into().expect("4 bytes"));
        u64::from(low) | (u64::from(high) << 32)
    }
}

fn open() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // Never hang the agent on a kernel that does not answer.
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::from(libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        }),
    )?;
    Ok(fd)
}

/// `nlmsghdr` + `inet_diag_req_v2`.
fn request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut message = Vec::with_capacity(NLMSG_HEADER_LEN + 8 + SOCKID_LEN);
    let len = u32::try_from(NLMSG_HEADER_LEN + 8 + SOCKID_LEN).expect("small");
    message.extend_from_slice(&len.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    message.extend_from_slice(&[family, IPPROTO_UDP, 0, 0]);
    message.extend_from_slice(&states.to_ne_bytes());
    message.extend_from_slice(id);
    message
}

fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    sendto(
        fd.as_raw_fd(),
        message,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    Ok(())
}

/// One netlink message: (type, payload).
fn messages(buffer: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header = buffer.get(offset..offset + NLMSG_HEADER_LEN)?;
        let len = usize::try_from(u32::from_ne_bytes(header[0..4].try_into().ok()?)).ok()?;
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        let payload = buffer.get(offset + NLMSG_HEADER_LEN..offset + len.max(NLMSG_HEADER_LEN))?;
        offset += (len.max(NLMSG_HEADER_LEN) + 3) & !3;
        Some((kind, payload))
    })
}

/// The errno carried by an NLMSG_ERROR payload (0 is an acknowledgement).
fn error_code(payload: &[u8]) -> i32 {
    payload.get(0..4).map_or(0, |bytes| {
        -i32::from_ne_bytes(bytes.try_into().expect("4 bytes"))
    })
}

/// Connected UDP sockets of one address family (`libc::AF_INET` or `AF_INET6`).
pub fn connected_udp_sockets(family: u8) -> io::Result<Vec<UdpSocketId>> {
    let fd = open()?;
    send(
        &fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            ESTABLISHED_ONLY,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut sockets = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        for (kind, payload) in messages(&buffer[..received]) {
            match kind {
                NLMSG_DONE => return Ok(sockets),
                NLMSG_ERROR => return Err(io::Error::from_raw_os_error(error_code(payload))),
                _ if payload.len() >= DIAG_MSG_LEN => sockets.push(UdpSocketId {
                    family: payload[0],
                    id: payload[4..4 + SOCKID_LEN]
                        .try_into()
                        .expect("checked length"),
                }),
                _ => {}
            }
        }
    }
}

/// Destroys one socket: the application sees ECONNABORTED and the socket is disconnected.
/// A socket that is already gone counts as destroyed.
pub fn destroy(socket: &UdpSocketId) -> io::Result<()> {
    let fd = open()?;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            socket.family,
            ALL_STATES,
            &socket.id,
        ),
    )?;
    let mut buffer = vec![0u8; 4096];
    let received = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
    for (kind, payload) in messages(&buffer[..received]) {
        if kind == NLMSG_ERROR {
            return match error_code(payload) {
                0 | libc::ENOENT => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
    }
    Err(io::Error::other("no acknowledgement for SOCK_DESTROY"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_decode_destination_and_cookie() {
        let mut id = [0u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[20..24].copy_from_slice(&[10, 0, 0, 7]);
        id[40..44].copy_from_slice(&7u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1u32.to_ne_bytes());
        let socket = UdpSocketId {
            family: u8::try_from(libc::AF_INET).unwrap(),
            id,
        };
        assert_eq!(socket.destination(), "10.0.0.7:53".parse().unwrap());
        assert_eq!(socket.cookie(), (1 << 32) | 7);
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let message = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            ALL_STATES,
            &[0; SOCKID_LEN],
        );
        assert_eq!(message.len(), 72);
        assert_eq!(u32::from_ne_bytes(message[0..4].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_ne_bytes(message[4..6].try_into().unwrap()),
            SOCK_DESTROY
        );
        assert_eq!(&message[16..18], &[2, IPPROTO_UDP]);
    }

    #[test]
    fn messages_walk_aligned_headers() {
        let mut buffer = request(SOCK_DIAG_BY_FAMILY, 0, 2, 0, &[0; SOCKID_LEN]);
        buffer.extend_from_slice(&16u32.to_ne_bytes());
        buffer.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        buffer.extend_from_slice(&[0; 10]);
        let kinds: Vec<u16> = messages(&buffer).map(|(kind, _)| kind).collect();
        assert_eq!(kinds, [SOCK_DIAG_BY_FAMILY, NLMSG_DONE]);
    }
}
