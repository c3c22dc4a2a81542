//! Finding a TCP socket by its 4-tuple with the kernel's sock_diag netlink
//! interface (what `ss` uses), for `whois`: the answer carries the socket's
//! cookie, the same number `bpf_get_socket_cookie` gave the connect program.

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

/// A socket the kernel knows by its 4-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundSocket {
    pub cookie: u64,
    pub uid: u32,
    pub inode: u32,
}

/// The TCP socket whose local address is `src` and remote `dst` (in this
/// network namespace), if any. An IPv4 pair is also looked for among IPv6
/// sockets as v4-mapped addresses (a dual-stack client).
pub fn find_tcp(src: SocketAddr, dst: SocketAddr) -> Result<Option<FoundSocket>, String> {
    if let Some(found) = lookup(src, dst)? {
        return Ok(Some(found));
    }
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => lookup(
            SocketAddr::new(IpAddr::V6(s.to_ipv6_mapped()), src.port()),
            SocketAddr::new(IpAddr::V6(d.to_ipv6_mapped()), dst.port()),
        ),
        _ => Ok(None),
    }
}

fn lookup(src: SocketAddr, dst: SocketAddr) -> Result<Option<FoundSocket>, String> {
    let family = if src.is_ipv4() { AF_INET } else { AF_INET6 };
    if src.is_ipv4() != dst.is_ipv4() {
        return Ok(None);
    }
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).map_err(|e| format!("sock_diag socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("sock_diag bind: {e}"))?;
    socket
        .connect(&NlAddr::new(0, 0))
        .map_err(|e| format!("sock_diag connect: {e}"))?;
    let mut header = NetlinkHeader::default();
    // Not a dump: the kernel looks the one socket up by its exact 4-tuple.
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: src.port(),
                destination_port: dst.port(),
                source_address: src.ip(),
                destination_address: dst.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match on the 4-tuple alone.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket
        .send(&buf, 0)
        .map_err(|e| format!("sock_diag send: {e}"))?;
    let mut reply = vec![0u8; 8192];
    let n = socket
        .recv(&mut &mut reply[..], 0)
        .map_err(|e| format!("sock_diag recv: {e}"))?;
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&reply[..n])
        .map_err(|e| format!("sock_diag reply: {e}"))?;
    match msg.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
            let c = r.header.socket_id.cookie;
            Ok(Some(FoundSocket {
                cookie: u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    | (u64::from(u32::from_ne_bytes([c[4], c[5], c[6], c[7]])) << 32),
                uid: r.header.uid,
                inode: r.header.inode,
            }))
        }
        // ENOENT (and anything else the kernel refuses): no such socket.
        _ => Ok(None),
    }
}
