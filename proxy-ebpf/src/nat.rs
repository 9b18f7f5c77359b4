//! Address and port rewriting with incremental checksum updates (RFC 1624 through the
//! kernel's csum helpers, which also handle CHECKSUM_PARTIAL packets from veths).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{counter, ct_flags, proto, Be16, Be32, CtEntryV4};

use crate::parse::{
    Ipv4Packet, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end of the packet to `addr:port`. `pkt` holds the values before the
/// rewrite; unchanged fields are left alone.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    end: End,
    addr: Be32,
    port: Be16,
) -> Result<(), u32> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (
            pkt.tuple.src_addr,
            pkt.tuple.src_port,
            ETH_HLEN + IP_SRC_OFF,
            pkt.l4_off + L4_SRC_PORT_OFF,
        ),
        End::Destination => (
            pkt.tuple.dst_addr,
            pkt.tuple.dst_port,
            ETH_HLEN + IP_DST_OFF,
            pkt.l4_off + L4_DST_PORT_OFF,
        ),
    };
    // UDP checksum 0 means "none": MARK_MANGLED_0 keeps it 0 instead of inventing one.
    let l4_flags = if pkt.tuple.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let l4_csum_off = pkt.l4_csum_off();
    if old_addr != addr {
        // The L4 checksum covers the addresses through the pseudo-header.
        ctx.l4_csum_replace(
            l4_csum_off,
            u64::from(old_addr.0),
            u64::from(addr.0),
            l4_flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| counter::DROP_REWRITE)?;
        ctx.l3_csum_replace(
            ETH_HLEN + IP_CSUM_OFF,
            u64::from(old_addr.0),
            u64::from(addr.0),
            4,
        )
        .map_err(|_| counter::DROP_REWRITE)?;
        ctx.store(addr_off, &addr.0, 0)
            .map_err(|_| counter::DROP_REWRITE)?;
    }
    if old_port != port && !pkt.is_later_fragment {
        ctx.l4_csum_replace(
            l4_csum_off,
            u64::from(old_port.0),
            u64::from(port.0),
            l4_flags | 2,
        )
        .map_err(|_| counter::DROP_REWRITE)?;
        ctx.store(port_off, &port.0, 0)
            .map_err(|_| counter::DROP_REWRITE)?;
    }
    Ok(())
}

/// Applies a conntrack entry's rewrite to the packet.
#[inline(always)]
pub fn apply(ctx: &TcContext, pkt: &Ipv4Packet, entry: &CtEntryV4) -> Result<(), u32> {
    if entry.flags & ct_flags::REWRITE_DST != 0 {
        rewrite(
            ctx,
            pkt,
            End::Destination,
            entry.nat_dst_addr,
            entry.nat_dst_port,
        )?;
    }
    if entry.flags & ct_flags::REWRITE_SRC != 0 {
        rewrite(
            ctx,
            pkt,
            End::Source,
            entry.nat_src_addr,
            entry.nat_src_port,
        )?;
    }
    Ok(())
}
