//! Netfilter's conntrack table over netlink (`NETLINK_NETFILTER`, ctnetlink): the
//! IPv4 and IPv6 flows whose destination netfilter translates (status `IPS_DST_NAT`),
//! as their original 5-tuples; one dump per family (`nfgenmsg.nfgen_family`). The kernel filters the dump by status (`CTA_STATUS` with
//! `CTA_STATUS_MASK`, Linux 5.19), so a node with a large conntrack table and no NAT
//! sends back nothing; the status is checked here too, for kernels that ignore the
//! filter.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use proxy_common::takeover::ips;

/// A flow netfilter translates, as its first packet arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatFlow {
    pub proto: u8,
    pub src: SocketAddr,
    /// The destination the client used: a ClusterIP, a node address and NodePort, ...
    pub dst: SocketAddr,
}

const NETLINK_NETFILTER: i32 = 12;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// `enum ctattr_type`, `ctattr_tuple`, `ctattr_ip`, `ctattr_l4proto`.
mod attr {
    pub const TUPLE_ORIG: u16 = 1;
    pub const STATUS: u16 = 3;
    pub const STATUS_MASK: u16 = 26;
    pub const TUPLE_IP: u16 = 1;
    pub const TUPLE_PROTO: u16 = 2;
    pub const IP_V4_SRC: u16 = 1;
    pub const IP_V4_DST: u16 = 2;
    pub const IP_V6_SRC: u16 = 3;
    pub const IP_V6_DST: u16 = 4;
    pub const PROTO_NUM: u16 = 1;
    pub const PROTO_SRC_PORT: u16 = 2;
    pub const PROTO_DST_PORT: u16 = 3;
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// The families dumped, as `nfgen_family` names them.
const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// The dump request: every entry of `family` whose status has `IPS_DST_NAT`.
fn dump_request(seq: u32, family: u8) -> Vec<u8> {
    let status = u32::try_from(ips::DST_NAT).unwrap_or(0).to_be_bytes();
    let attrs: [(u16, [u8; 4]); 2] = [(attr::STATUS, status), (attr::STATUS_MASK, status)];
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len() * 8;
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
    message.extend_from_slice(&CT_GET.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, res_id 0.
    message.extend_from_slice(&[family, 0, 0, 0]);
    for (kind, value) in attrs {
        message.extend_from_slice(&8u16.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&value);
    }
    message
}

/// Netlink attributes of `bytes`, as (type without flags, payload).
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(bytes.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(bytes.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        let payload = bytes.get(4..len)?;
        bytes = bytes.get(align4(len)..).unwrap_or_default();
        Some((kind, payload))
    })
}

fn find(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(bytes).find_map(|(found, payload)| (found == kind).then_some(payload))
}

fn be32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?))
}

fn v6(bytes: &[u8]) -> Option<Ipv6Addr> {
    let octets: [u8; 16] = bytes.get(0..16)?.try_into().ok()?;
    Some(Ipv6Addr::from(octets))
}

fn be16(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(0..2)?.try_into().ok()?))
}

/// The flow of one conntrack message's attributes, if it is a DNAT flow with ports.
fn nat_flow(attrs: &[u8]) -> Option<NatFlow> {
    let status = find(attrs, attr::STATUS).and_then(be32)?;
    if u64::from(status) & ips::DST_NAT == 0 {
        return None;
    }
    let tuple = find(attrs, attr::TUPLE_ORIG)?;
    let ip = find(tuple, attr::TUPLE_IP)?;
    let l4 = find(tuple, attr::TUPLE_PROTO)?;
    let (src, dst) = match (find(ip, attr::IP_V4_SRC), find(ip, attr::IP_V4_DST)) {
        (Some(src), Some(dst)) => (
            IpAddr::V4(Ipv4Addr::from(be32(src)?)),
            IpAddr::V4(Ipv4Addr::from(be32(dst)?)),
        ),
        _ => (
            IpAddr::V6(v6(find(ip, attr::IP_V6_SRC)?)?),
            IpAddr::V6(v6(find(ip, attr::IP_V6_DST)?)?),
        ),
    };
    let proto = *find(l4, attr::PROTO_NUM)?.first()?;
    let src_port = find(l4, attr::PROTO_SRC_PORT).and_then(be16)?;
    let dst_port = find(l4, attr::PROTO_DST_PORT).and_then(be16)?;
    Some(NatFlow {
        proto,
        src: SocketAddr::new(src, src_port),
        dst: SocketAddr::new(dst, dst_port),
    })
}

/// What one datagram of the dump held.
enum Part {
    More,
    Done,
}

/// Parses the messages of one datagram into `flows`.
fn parse_datagram(mut bytes: &[u8], seq: u32, flows: &mut Vec<NatFlow>) -> io::Result<Part> {
    while bytes.len() >= NLMSG_HDRLEN {
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|word| word.try_into().ok())
                .map(u32::from_ne_bytes)
        };
        let len = usize::try_from(word(0).unwrap_or(0)).unwrap_or(0);
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        if len < NLMSG_HDRLEN || len > bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        if word(8) != Some(seq) {
            // A late answer to an earlier request on this socket: not ours.
            bytes = bytes.get(align4(len)..).unwrap_or_default();
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(Part::Done),
            NLMSG_ERROR => {
                let code = bytes
                    .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                    .and_then(|code| code.try_into().ok())
                    .map_or(0, i32::from_ne_bytes);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            _ => {
                if let Some(flow) = bytes
                    .get(NLMSG_HDRLEN + NFGENMSG_LEN..len)
                    .and_then(nat_flow)
                {
                    flows.push(flow);
                }
            }
        }
        bytes = bytes.get(align4(len)..).unwrap_or_default();
    }
    Ok(Part::More)
}

/// Every IPv4 and IPv6 flow of the calling thread's network namespace whose
/// destination netfilter translates.
///
/// # Errors
/// When the netlink socket fails or the kernel refuses a dump (a kernel without
/// `CONFIG_NF_CT_NETLINK`).
pub fn nat_flows() -> io::Result<Vec<NatFlow>> {
    // SAFETY: plain socket call; the fd is owned by OwnedFd from here on.
    let socket = unsafe {
        let raw = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        );
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(raw)
    };
    let mut flows = Vec::new();
    // Dump datagrams are at most a page or two; 64 KiB holds any of them whole.
    let mut buffer = vec![0u8; 65_536];
    // One dump at a time: netlink runs one per socket; each has its own sequence
    // number, so a late answer to the first is never read as the second's.
    for (seq, family) in (1..).zip(FAMILIES) {
        dump(&socket, seq, family, &mut buffer, &mut flows)?;
    }
    Ok(flows)
}

/// One family's dump into `flows`.
fn dump(
    socket: &OwnedFd,
    seq: u32,
    family: u8,
    buffer: &mut [u8],
    flows: &mut Vec<NatFlow>,
) -> io::Result<()> {
    let request = dump_request(seq, family);
    // SAFETY: sending a buffer of the given length to the kernel (the default
    // destination of an unconnected netlink socket is the kernel).
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    loop {
        // SAFETY: reading into a buffer of the given length.
        let read = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        let Ok(read) = usize::try_from(read) else {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        };
        if read == 0 {
            return Ok(());
        }
        if let Part::Done = parse_datagram(&buffer[..read], seq, flows)? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = 4 + payload.len();
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(len).expect("len").to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align4(len), 0);
        out
    }

    /// A conntrack message as the kernel sends it (nested attributes flagged).
    fn message(seq: u32, status: u32, src: [u8; 4], dst: [u8; 4], ports: (u16, u16)) -> Vec<u8> {
        let ip = [nla(attr::IP_V4_SRC, &src), nla(attr::IP_V4_DST, &dst)].concat();
        message_of(seq, status, libc::AF_INET as u8, &ip, ports)
    }

    fn message_v6(seq: u32, status: u32, src: &str, dst: &str, ports: (u16, u16)) -> Vec<u8> {
        let octets = |text: &str| text.parse::<Ipv6Addr>().expect("v6").octets();
        let ip = [
            nla(attr::IP_V6_SRC, &octets(src)),
            nla(attr::IP_V6_DST, &octets(dst)),
        ]
        .concat();
        message_of(seq, status, libc::AF_INET6 as u8, &ip, ports)
    }

    fn message_of(seq: u32, status: u32, family: u8, ip: &[u8], ports: (u16, u16)) -> Vec<u8> {
        const NESTED: u16 = 0x8000;
        let l4 = [
            nla(attr::PROTO_NUM, &[6]),
            nla(attr::PROTO_SRC_PORT, &ports.0.to_be_bytes()),
            nla(attr::PROTO_DST_PORT, &ports.1.to_be_bytes()),
        ]
        .concat();
        let tuple = [
            nla(attr::TUPLE_IP | NESTED, ip),
            nla(attr::TUPLE_PROTO | NESTED, &l4),
        ]
        .concat();
        let body = [
            vec![family, 0, 0, 0],
            nla(attr::TUPLE_ORIG | NESTED, &tuple),
            nla(attr::STATUS, &status.to_be_bytes()),
        ]
        .concat();
        let len = NLMSG_HDRLEN + body.len();
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(len).expect("len").to_ne_bytes());
        out.extend_from_slice(&CT_GET.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&20u32.to_ne_bytes());
        out.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&[0; 8]);
        out
    }

    #[test]
    fn reads_dnat_flows_and_skips_the_rest() {
        let dnat = message(1, 0x2a, [10, 244, 1, 2], [10, 96, 0, 10], (40_000, 80));
        let plain = message(1, 0x0a, [10, 244, 1, 3], [10, 96, 0, 10], (40_001, 80));
        let other_seq = message(7, 0x2a, [10, 244, 1, 4], [10, 96, 0, 10], (40_002, 80));
        let datagram = [dnat, plain, other_seq].concat();
        let mut flows = Vec::new();
        assert!(matches!(
            parse_datagram(&datagram, 1, &mut flows),
            Ok(Part::More)
        ));
        assert_eq!(
            flows,
            vec![NatFlow {
                proto: 6,
                src: "10.244.1.2:40000".parse().expect("addr"),
                dst: "10.96.0.10:80".parse().expect("addr"),
            }]
        );
        assert!(matches!(
            parse_datagram(&done(1), 1, &mut flows),
            Ok(Part::Done)
        ));
    }

    #[test]
    fn reads_ipv6_dnat_flows() {
        let dnat = message_v6(2, 0x2a, "fd00:10:244:1::2", "fd00:96::10", (40_000, 80));
        let plain = message_v6(2, 0x0a, "fd00:10:244:1::3", "fd00:96::10", (40_001, 80));
        let mut flows = Vec::new();
        assert!(matches!(
            parse_datagram(&[dnat, plain].concat(), 2, &mut flows),
            Ok(Part::More)
        ));
        assert_eq!(
            flows,
            vec![NatFlow {
                proto: 6,
                src: "[fd00:10:244:1::2]:40000".parse().expect("addr"),
                dst: "[fd00:96::10]:80".parse().expect("addr"),
            }]
        );
    }

    #[test]
    fn a_truncated_message_is_an_error() {
        let mut message = message(1, 0x2a, [10, 0, 0, 1], [10, 0, 0, 2], (1, 2));
        message.truncate(30);
        assert!(parse_datagram(&message, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn the_request_asks_for_dnat_entries_only() {
        let request = dump_request(9, libc::AF_INET as u8);
        assert_eq!(request.len(), 36);
        assert_eq!(&request[16..20], &[libc::AF_INET as u8, 0, 0, 0]);
        let request6 = dump_request(10, libc::AF_INET6 as u8);
        assert_eq!(&request6[16..20], &[libc::AF_INET6 as u8, 0, 0, 0]);
        assert_eq!(request6[20..], request[20..], "the same status filter");
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&request[20..])
            .map(|(kind, payload)| (kind, payload.to_vec()))
            .collect();
        assert_eq!(
            attrs,
            vec![
                (attr::STATUS, vec![0, 0, 0, 0x20]),
                (attr::STATUS_MASK, vec![0, 0, 0, 0x20])
            ]
        );
    }
}
