//! Address and port rewriting with incremental checksum updates (RFC 1624 through the
//! kernel's csum helpers, which also handle CHECKSUM_PARTIAL packets from veths). SCTP
//! has no internet checksum over its header: its addresses change only the IP header
//! checksum, its ports its CRC32c ([`crate::sctp`], deferred to the program's end).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{ct_flags, proto, Be16, Be32, CtEntryV4, CtKeyV4};

use crate::{
    conntrack, icmp_error,
    parse::{
        Kind, Packet, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF,
        L4_SRC_PORT_OFF,
    },
    sctp, service_stats, stats,
    verdict::{DropReason, Result},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Replaces the IPv4 address at `addr_off` (of the packet's header or of the header an
/// ICMP error quotes) and updates that header's checksum at `ip_csum_off`.
#[inline(always)]
pub fn replace_ip_addr(
    ctx: &TcContext,
    ip_csum_off: usize,
    addr_off: usize,
    old: Be32,
    new: Be32,
) -> Result<()> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(ip_csum_off, u64::from(old.0), u64::from(new.0), 4)
        .map_err(|_| DropReason::REWRITE)?;
    ctx.store(addr_off, &new.0, 0)
        .map_err(|_| DropReason::REWRITE)
}

/// Updates the checksums for rewriting one end of a TCP/UDP packet (or fragment) to
/// `addr:port`, without writing the fields themselves. `pkt` holds the values before
/// the rewrite; unchanged fields cost nothing.
///
/// A later fragment has no L4 header: only its IP header checksum changes. The
/// datagram's L4 checksum, in the first fragment, already covers the new addresses:
/// its update there accounted for the whole pseudo-header.
#[inline(always)]
fn update_checksums(ctx: &TcContext, pkt: &Packet, end: End, addr: Be32, port: Be16) -> Result<()> {
    let (old_addr, old_port) = match end {
        End::Source => (pkt.tuple.src_addr, pkt.tuple.src_port),
        End::Destination => (pkt.tuple.dst_addr, pkt.tuple.dst_port),
    };
    // SCTP's CRC32c covers no pseudo-header (an address change leaves it alone); its
    // ports' change is `crate::sctp`'s.
    let has_l4_header = pkt.kind == Kind::Transport && pkt.tuple.proto != proto::SCTP;
    // UDP checksum 0 means "none": MARK_MANGLED_0 keeps it 0 instead of inventing one.
    let l4_flags = if pkt.tuple.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let l4_csum_off = pkt.l4_csum_off();
    if old_addr != addr {
        if has_l4_header {
            // The L4 checksum covers the addresses through the pseudo-header. The
            // first helper that writes makes a cloned skb's header private; the others
            // then find it so.
            ctx.l4_csum_replace(
                l4_csum_off,
                u64::from(old_addr.0),
                u64::from(addr.0),
                l4_flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
            )
            .map_err(|_| DropReason::REWRITE)?;
        }
        ctx.l3_csum_replace(
            ETH_HLEN + IP_CSUM_OFF,
            u64::from(old_addr.0),
            u64::from(addr.0),
            4,
        )
        .map_err(|_| DropReason::REWRITE)?;
    }
    // Ports are not in the pseudo-header: a separate update, which the kernel skips
    // for CHECKSUM_PARTIAL packets (their checksum field holds the pseudo-header sum).
    if old_port != port && has_l4_header {
        ctx.l4_csum_replace(
            l4_csum_off,
            u64::from(old_port.0),
            u64::from(port.0),
            l4_flags | 2,
        )
        .map_err(|_| DropReason::REWRITE)?;
    }
    Ok(())
}

/// Rewrites one end of a TCP/UDP packet (or fragment) to `addr:port`, checksums and
/// fields. `pkt` holds the values before the rewrite; unchanged fields are left alone.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, end: End, addr: Be32, port: Be16) -> Result<()> {
    update_checksums(ctx, pkt, end, addr, port)?;
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
    if old_addr != addr {
        ctx.store(addr_off, &addr.0, 0)
            .map_err(|_| DropReason::REWRITE)?;
    }
    if old_port != port && pkt.kind == Kind::Transport {
        ctx.store(port_off, &port.0, 0)
            .map_err(|_| DropReason::REWRITE)?;
    }
    Ok(())
}

/// The addresses of an IPv4 header without options and the ports of the TCP/UDP header
/// right after it: 12 contiguous bytes, written by one `bpf_skb_store_bytes`.
#[repr(C)]
struct AddrsAndPorts {
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
}

/// Length of an IPv4 header without options.
const IP_HLEN_NO_OPTIONS: usize = 20;

/// Applies a conntrack entry's rewrite to the packet (a TCP/UDP packet or fragment, or
/// an ICMP error about the entry's flow).
#[inline(always)]
pub fn apply(ctx: &TcContext, pkt: &Packet, entry: &CtEntryV4) -> Result<()> {
    if pkt.kind == Kind::IcmpError {
        return icmp_error::translate(ctx, pkt, entry);
    }
    if pkt.tuple.proto == proto::SCTP {
        // Parsing leaves SCTP only unfragmented packets (`Kind::Transport`).
        let after = conntrack::translated(&pkt.tuple, entry);
        sctp::defer(
            ctx.skb.skb,
            pkt.l4_off,
            u32::from(pkt.tot_len).saturating_sub(pkt.ip_hlen as u32),
            (pkt.tuple.src_port, pkt.tuple.dst_port),
            (after.src_port, after.dst_port),
        );
    }
    if pkt.kind == Kind::Transport && pkt.ip_hlen == IP_HLEN_NO_OPTIONS {
        // The common packet: checksum updates, then every changed field in one store
        // (instead of one per address and port).
        if entry.flags & ct_flags::REWRITE_DST != 0 {
            update_checksums(
                ctx,
                pkt,
                End::Destination,
                entry.nat_dst_addr,
                entry.nat_dst_port,
            )?;
        }
        if entry.flags & ct_flags::REWRITE_SRC != 0 {
            update_checksums(
                ctx,
                pkt,
                End::Source,
                entry.nat_src_addr,
                entry.nat_src_port,
            )?;
        }
        let after = conntrack::translated(&pkt.tuple, entry);
        if after == pkt.tuple {
            return Ok(());
        }
        let fields = AddrsAndPorts {
            src_addr: after.src_addr.0,
            dst_addr: after.dst_addr.0,
            src_port: after.src_port.0,
            dst_port: after.dst_port.0,
        };
        return ctx
            .store(ETH_HLEN + IP_SRC_OFF, &fields, 0)
            .map_err(|_| DropReason::REWRITE);
    }
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

/// [`apply`], counted as a translated packet of a known flow.
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &Packet, entry: &CtEntryV4) -> Result<()> {
    apply(ctx, pkt, entry)?;
    stats::count_translated(pkt, entry);
    service_stats::count_packet(entry, pkt);
    Ok(())
}

/// What the packet's header will say after [`apply`], for the route lookup: the
/// translated tuple, or for an ICMP error its outer addresses (proto ICMP, no ports).
#[inline(always)]
pub fn routed_tuple(pkt: &Packet, entry: &CtEntryV4) -> CtKeyV4 {
    if pkt.kind == Kind::IcmpError {
        let (src_addr, dst_addr) = icmp_error::outer_after(pkt, entry);
        return CtKeyV4 {
            src_addr,
            dst_addr,
            proto: proto::ICMP,
            ..CtKeyV4::default()
        };
    }
    conntrack::translated(&pkt.tuple, entry)
}
