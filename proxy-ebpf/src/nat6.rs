//! IPv6 address and port rewriting with the L4 checksum update. IPv6 has no header
//! checksum: the addresses count only in the TCP/UDP checksum, through its
//! pseudo-header (RFC 8200 section 8.1), so a rewrite is one checksum update for the
//! 16-byte address (its difference from `bpf_csum_diff`) and one for the port.
//!
//! SCTP's CRC32c covers no pseudo-header: its address rewrite touches no checksum at
//! all, its port rewrite only the CRC ([`crate::sctp`], deferred to the program's end).
//!
//! UDP over IPv6 must carry a checksum: one that computes to 0 is sent as 0xffff
//! (`BPF_F_MARK_MANGLED_0` does that), and a datagram that arrives with 0 is invalid
//! (the receiver drops it; the helper leaves it 0 and so do we).
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use proxy_common::{counter, ct_flags, proto, Be16, Be32x4, CtEntryV6};

use crate::{
    conntrack6, icmp6_error,
    parse::{Kind, ETH_HLEN, L4_DST_PORT_OFF, L4_SRC_PORT_OFF},
    parse6::{Packet6, IPV6_DST_OFF, IPV6_HLEN, IPV6_PAYLOAD_LEN_OFF, IPV6_SRC_OFF},
    sctp, stats,
    verdict::{DropReason, Result},
};

/// `bpf_l4_csum_replace`'s flag for a pseudo-header change of an IPv6 packet (Linux
/// 6.16 and the stable kernels it went to): on a CHECKSUM_COMPLETE packet it leaves
/// `skb->csum` alone, which without it is adjusted as if an IPv4 header checksum had
/// compensated the change, and ends up wrong. Older kernels refuse the flag
/// (`-EINVAL`, before touching anything), and the update is retried without it.
const BPF_F_IPV6: u64 = 1 << 7;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
enum End {
    Source,
    Destination,
}

/// The checksum difference of replacing `old` by `new` (16 bytes each).
#[inline(always)]
pub fn address_diff(old: &Be32x4, new: &Be32x4) -> Result<u64> {
    let mut from = old.0;
    let mut to = new.0;
    // SAFETY: both buffers live on the stack for the call; the sizes are theirs.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
    // A checksum value is 32 bits; a negative return is an error.
    u32::try_from(diff)
        .map(u64::from)
        .map_err(|_| DropReason::REWRITE)
}

/// Replaces the IPv6 header's address at `addr_off` (`old`) with `new`, and updates
/// the upper-layer checksum at `csum_off`, which covers it through its pseudo-header.
/// `l4_flags`: `BPF_F_MARK_MANGLED_0` for UDP.
#[inline(always)]
pub fn replace_addr(
    ctx: &TcContext,
    csum_off: usize,
    addr_off: usize,
    old: &Be32x4,
    new: &Be32x4,
    l4_flags: u64,
) -> Result<()> {
    let diff = address_diff(old, new)?;
    // Size 0: `to` is a checksum difference, not a field value.
    let flags = l4_flags | u64::from(BPF_F_PSEUDO_HDR);
    if ctx
        .l4_csum_replace(csum_off, 0, diff, flags | BPF_F_IPV6)
        .is_err()
    {
        ctx.l4_csum_replace(csum_off, 0, diff, flags)
            .map_err(|_| DropReason::REWRITE)?;
    }
    ctx.store(addr_off, new, 0).map_err(|_| DropReason::REWRITE)
}

/// Rewrites one end of the packet to `addr:port`, checksum and fields; unchanged
/// fields cost nothing. A later fragment has neither ports nor the checksum (its
/// first fragment's update covers the datagram): only its address changes.
#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet6, end: End, addr: &Be32x4, port: Be16) -> Result<()> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (
            &pkt.tuple.src_addr,
            pkt.tuple.src_port,
            ETH_HLEN + IPV6_SRC_OFF,
            pkt.l4_off + L4_SRC_PORT_OFF,
        ),
        End::Destination => (
            &pkt.tuple.dst_addr,
            pkt.tuple.dst_port,
            ETH_HLEN + IPV6_DST_OFF,
            pkt.l4_off + L4_DST_PORT_OFF,
        ),
    };
    let has_l4_header = pkt.kind == Kind::Transport;
    // SCTP's CRC32c has no pseudo-header, and its ports' change is `crate::sctp`'s.
    let has_l4_csum = has_l4_header && pkt.tuple.proto != proto::SCTP;
    let l4_flags = if pkt.tuple.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off();
    if old_addr != addr {
        if has_l4_csum {
            replace_addr(ctx, csum_off, addr_off, old_addr, addr, l4_flags)?;
        } else {
            // No checksum in this packet covers the address (a later fragment, SCTP):
            // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE packet's `skb->csum` right.
            ctx.store(addr_off, addr, u64::from(BPF_F_RECOMPUTE_CSUM))
                .map_err(|_| DropReason::REWRITE)?;
        }
    }
    if old_port != port && has_l4_header {
        if has_l4_csum {
            // Ports are not in the pseudo-header (the kernel skips this update for
            // CHECKSUM_PARTIAL packets, whose field holds the pseudo-header sum).
            ctx.l4_csum_replace(
                csum_off,
                u64::from(old_port.0),
                u64::from(port.0),
                l4_flags | 2,
            )
            .map_err(|_| DropReason::REWRITE)?;
        }
        ctx.store(port_off, &port.0, 0)
            .map_err(|_| DropReason::REWRITE)?;
    }
    Ok(())
}

/// Applies a conntrack entry's rewrite to the packet (a function of its own, see
/// [`crate::parse6::parse`]).
#[inline(never)]
pub fn apply(skb: *mut __sk_buff, pkt: &Packet6, entry: &CtEntryV6) -> Result<()> {
    let ctx = &TcContext::new(skb);
    if pkt.tuple.proto == proto::SCTP && pkt.kind == Kind::Transport {
        // The SCTP packet runs from its header to the end of the IPv6 payload, whose
        // length counts the extension headers before it.
        let payload_len: Be16 = ctx
            .load(ETH_HLEN + IPV6_PAYLOAD_LEN_OFF)
            .map_err(|_| DropReason::REWRITE)?;
        let ext_len = pkt.l4_off.saturating_sub(ETH_HLEN + IPV6_HLEN);
        let after = conntrack6::translated(&pkt.tuple, entry);
        sctp::defer(
            skb,
            pkt.l4_off,
            u32::from(payload_len.to_host()).saturating_sub(ext_len as u32),
            (pkt.tuple.src_port, pkt.tuple.dst_port),
            (after.src_port, after.dst_port),
        );
    }
    if entry.flags & ct_flags::REWRITE_DST != 0 {
        rewrite(
            ctx,
            pkt,
            End::Destination,
            &entry.nat_dst_addr,
            entry.nat_dst_port,
        )?;
    }
    if entry.flags & ct_flags::REWRITE_SRC != 0 {
        rewrite(
            ctx,
            pkt,
            End::Source,
            &entry.nat_src_addr,
            entry.nat_src_port,
        )?;
    }
    Ok(())
}

/// [`apply`] (or, to an ICMPv6 error, [`icmp6_error::translate`]), counted as a
/// translated packet of a known flow.
#[inline(always)]
pub fn translate(skb: *mut __sk_buff, pkt: &Packet6, entry: &CtEntryV6) -> Result<()> {
    // Called from here rather than from `apply`: one call deep less, which the
    // 512-byte limit on the chain's stack needs.
    if pkt.kind == Kind::IcmpError {
        icmp6_error::translate(skb, pkt, entry)?;
    } else {
        apply(skb, pkt, entry)?;
    }
    stats::count(match pkt.kind {
        Kind::IcmpError => counter::ICMP_ERROR_TRANSLATED,
        Kind::LaterFragment => counter::FRAGMENT_TRANSLATED,
        Kind::Transport if entry.flags & ct_flags::REPLY != 0 => counter::REPLY_TRANSLATED,
        Kind::Transport => counter::FORWARD_TRANSLATED,
    });
    Ok(())
}
