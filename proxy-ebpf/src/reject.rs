//! Rejecting flows to services without endpoints, as kube-proxy does: its REJECT rule
//! answers TCP and UDP alike with ICMP port unreachable (the client's connect() fails
//! with ECONNREFUSED at once instead of timing out).
//!
//! The original frame is turned into the ICMP reply in place: shrink or grow it to the
//! reply's length, write the whole reply from the stack, and send it back out of the
//! interface it came from.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::counter;

use crate::parse::{Ipv4Packet, ETH_HLEN};

const IP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// RFC 792: the error quotes the original IP header and the first 8 payload bytes.
const QUOTED_LEN: usize = IP_HLEN + 8;
const REPLY_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTED_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

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

/// Replaces the packet with an ICMP port unreachable to its sender and returns the
/// redirect verdict that sends it back.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<i32, u32> {
    if pkt.ip_hlen != IP_HLEN {
        // IP options are vanishingly rare towards a ClusterIP; not worth the code.
        return Err(counter::DROP_REJECT_FAILED);
    }
    let eth: [u8; ETH_HLEN] = ctx.load(0).map_err(|_| counter::DROP_REJECT_FAILED)?;
    let quoted: [u8; QUOTED_LEN] = ctx
        .load(ETH_HLEN)
        .map_err(|_| counter::DROP_REJECT_FAILED)?;

    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45; // version 4, 20-byte header
    ip[1] = 0xc0; // DSCP CS6, as the kernel marks its own ICMP errors
    ip[2..4].copy_from_slice(&((IP_HLEN + ICMP_HLEN + QUOTED_LEN) as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = proxy_common::proto::ICMP;
    ip[12..16].copy_from_slice(&quoted[16..20]); // from the service address
    ip[16..20].copy_from_slice(&quoted[12..16]); // to the client
    let ip_csum = checksum(&ip);
    ip[10..12].copy_from_slice(&ip_csum);

    let mut icmp = [0u8; ICMP_HLEN + QUOTED_LEN];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
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
        return Err(counter::DROP_REJECT_FAILED);
    }
    ctx.store(0, &frame_eth, 0)
        .map_err(|_| counter::DROP_REJECT_FAILED)?;
    ctx.store(ETH_HLEN, &ip, 0)
        .map_err(|_| counter::DROP_REJECT_FAILED)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0)
        .map_err(|_| counter::DROP_REJECT_FAILED)?;

    // SAFETY: reading a field of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper has no preconditions; flags 0 = egress of `ifindex`.
    let verdict = unsafe { bpf_redirect(ifindex, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(counter::DROP_REJECT_FAILED);
    }
    Ok(TC_ACT_REDIRECT as i32)
}
