//! ICMP errors the datapath sends itself, in place of the packet that caused them:
//! - port unreachable for flows to services without endpoints, as kube-proxy's REJECT
//!   rule does (the client's connect() fails with ECONNREFUSED at once instead of
//!   timing out), and for flows to a port a live ClusterIP does not declare (kube-proxy
//!   nftables mode's `reject` of invalid ClusterIP ports, TCP included);
//! - fragmentation needed and time exceeded for packets the datapath redirects: the
//!   redirect skips the kernel's forwarding, which would have sent them (path MTU
//!   discovery and traceroute depend on them).
//!
//! The original frame is turned into the ICMP error in place: shrink or grow it to the
//! reply's length, write the whole reply from the stack, and send it back out of the
//! interface it came from. The error quotes the packet as it arrived (before any
//! translation), so its sender recognises it, and comes from the address the sender
//! sent to (the frontend, or this node's address for NodePorts and masqueraded flows).
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::counter;

use crate::{
    parse::{icmp_type, Packet, ETH_HLEN, ICMP_HLEN},
    stats,
    verdict::{DropReason, Result, REDIRECT},
};

const IP_HLEN: usize = 20;
/// RFC 792: the error quotes the original IP header and the first 8 payload bytes.
const QUOTED_LEN: usize = IP_HLEN + 8;
const REPLY_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTED_LEN;
/// Destination unreachable codes.
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Time exceeded code: TTL exceeded in transit.
const ICMP_EXC_TTL: u8 = 0;

/// The error to send.
#[derive(Clone, Copy)]
pub enum IcmpReply {
    /// Destination unreachable, port unreachable: a frontend without endpoints.
    PortUnreachable,
    /// The same error for a port no frontend of a live ClusterIP declares.
    PortUndeclared,
    /// Destination unreachable, fragmentation needed and DF set, with the next hop's
    /// MTU (RFC 1191).
    FragNeeded { mtu: u16 },
    /// Time exceeded in transit.
    TimeExceeded,
}

impl IcmpReply {
    /// Type, code, and the 4 type-specific header bytes.
    #[inline(always)]
    fn header(self) -> (u8, u8, [u8; 4]) {
        match self {
            Self::PortUnreachable | Self::PortUndeclared => {
                (icmp_type::DEST_UNREACH, ICMP_PORT_UNREACH, [0; 4])
            }
            Self::FragNeeded { mtu } => {
                let [high, low] = mtu.to_be_bytes();
                (icmp_type::DEST_UNREACH, ICMP_FRAG_NEEDED, [0, 0, high, low])
            }
            Self::TimeExceeded => (icmp_type::TIME_EXCEEDED, ICMP_EXC_TTL, [0; 4]),
        }
    }

    /// The event counted when it is sent.
    #[inline(always)]
    fn counter(self) -> u32 {
        match self {
            Self::PortUnreachable => counter::REJECTED_NO_BACKEND,
            Self::PortUndeclared => counter::REJECTED_UNDECLARED_PORT,
            Self::FragNeeded { .. } => counter::FRAG_NEEDED_SENT,
            Self::TimeExceeded => counter::TIME_EXCEEDED_SENT,
        }
    }
}

/// Internet checksum (RFC 1071) of `N` bytes, `N` even.
#[inline(always)]
fn checksum<const N: usize>(bytes: &[u8; N]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += (u32::from(bytes[i]) << 8) | u32::from(bytes[i + 1]);
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Replaces the packet with the ICMP error `reply` to its sender, counts it and returns
/// the redirect verdict that sends it back.
#[inline(always)]
pub fn send(ctx: &TcContext, pkt: &Packet, reply: IcmpReply) -> Result<i32> {
    if pkt.ip_hlen != IP_HLEN {
        // IP options are vanishingly rare towards a service; not worth the code.
        return Err(DropReason::REJECT_FAILED);
    }
    let eth: [u8; ETH_HLEN] = ctx.load(0).map_err(|_| DropReason::REJECT_FAILED)?;
    let quoted: [u8; QUOTED_LEN] = ctx.load(ETH_HLEN).map_err(|_| DropReason::REJECT_FAILED)?;

    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45; // version 4, 20-byte header
    ip[1] = 0xc0; // DSCP CS6, as the kernel marks its own ICMP errors
    ip[2..4].copy_from_slice(&((IP_HLEN + ICMP_HLEN + QUOTED_LEN) as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = proxy_common::proto::ICMP;
    ip[12..16].copy_from_slice(&quoted[16..20]); // from the address the sender sent to
    ip[16..20].copy_from_slice(&quoted[12..16]); // to the sender
    let ip_csum = checksum(&ip);
    ip[10..12].copy_from_slice(&ip_csum);

    let (kind, code, rest) = reply.header();
    let mut icmp = [0u8; ICMP_HLEN + QUOTED_LEN];
    icmp[0] = kind;
    icmp[1] = code;
    icmp[4..8].copy_from_slice(&rest);
    icmp[ICMP_HLEN..].copy_from_slice(&quoted);
    let icmp_csum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&icmp_csum);

    let mut frame_eth = [0u8; ETH_HLEN];
    frame_eth[0..6].copy_from_slice(&eth[6..12]);
    frame_eth[6..12].copy_from_slice(&eth[0..6]);
    frame_eth[12..14].copy_from_slice(&eth[12..14]);

    // SAFETY: the context pointer is the program's own skb.
    let resized = unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN as u32, 0) };
    if resized != 0 {
        return Err(DropReason::REJECT_FAILED);
    }
    ctx.store(0, &frame_eth, 0)
        .map_err(|_| DropReason::REJECT_FAILED)?;
    ctx.store(ETH_HLEN, &ip, 0)
        .map_err(|_| DropReason::REJECT_FAILED)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0)
        .map_err(|_| DropReason::REJECT_FAILED)?;

    // SAFETY: reading a field of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper has no preconditions; flags 0 = egress of `ifindex`.
    let verdict = unsafe { bpf_redirect(ifindex, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::REJECT_FAILED);
    }
    stats::count(reply.counter());
    Ok(REDIRECT)
}
