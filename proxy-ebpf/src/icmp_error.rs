//! ICMP errors about translated flows (netfilter's "related" packets): destination
//! unreachable (port unreachable, fragmentation needed, ...), time exceeded and
//! parameter problem quoting a packet of a flow we translated. Untranslated, such an
//! error names a packet its receiver never sent (the quoted header carries the
//! backend, or the masquerade address), so the receiver ignores it: PMTU discovery
//! becomes a black hole and a UDP client times out instead of seeing ECONNREFUSED.
//!
//! The error's key ([`crate::parse::Packet::tuple`]) is the quoted tuple reversed,
//! which is the conntrack key of the flow direction the error travels in; the hooks
//! treat it like a packet of that entry (same hooks, same next hop) and this module
//! applies the entry's rewrite to it:
//! - outer destination (the quoted packet's sender) -> the entry's new destination;
//! - outer source -> the entry's new source only when the error comes from the flow's
//!   endpoint itself. An error from a router on the path keeps the router's address,
//!   so the receiver still learns which hop complained (netfilter rewrites it to the
//!   flow's address as well; the receiving socket matches on the quoted header either
//!   way);
//! - the quoted packet gets the inverse: its source becomes the new destination and its
//!   destination the new source, so it reads as the packet the receiver really sent.
//!
//! Checksums, as netfilter's `nf_nat_ipv4_manip_pkt` on an inner header: the quoted IP
//! header's; the quoted L4 checksum when the error quotes it (UDP's is in the first 8
//! bytes, so always, unless it is 0 = none; TCP's only when 18 bytes or more of the TCP
//! header are quoted, as Linux quotes up to 576 bytes; a quoted SCTP CRC32c never, see
//! `Quoted::new`); and the ICMP checksum, which
//! covers the whole ICMP message and no pseudo-header. A quoted address change leaves
//! the ICMP sum as it was (the quoted header's checksum changes by the opposite
//! amount), so only quoted ports and the quoted L4 checksum change it. Every update is
//! incremental (RFC 1624), so the quoted bytes beyond the headers are never read.
use aya_ebpf::{bindings::BPF_F_MARK_MANGLED_0, programs::TcContext};
use proxy_common::{ct_flags, proto, Be16, Be32, CtEntryV4};

use crate::{
    nat,
    parse::{
        Packet, ETH_HLEN, ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF,
        L4_SRC_PORT_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
    verdict::{DropReason, Result},
};

/// The addresses and ports a packet of `entry`'s direction has after its rewrite:
/// `(source, destination)`.
#[inline(always)]
fn new_ends(pkt: &Packet, entry: &CtEntryV4) -> ((Be32, Be16), (Be32, Be16)) {
    let tuple = &pkt.tuple;
    let src = if entry.flags & ct_flags::REWRITE_SRC != 0 {
        (entry.nat_src_addr, entry.nat_src_port)
    } else {
        (tuple.src_addr, tuple.src_port)
    };
    let dst = if entry.flags & ct_flags::REWRITE_DST != 0 {
        (entry.nat_dst_addr, entry.nat_dst_port)
    } else {
        (tuple.dst_addr, tuple.dst_port)
    };
    (src, dst)
}

/// The outer addresses of the error after [`translate`]: `(source, destination)`.
#[inline(always)]
pub fn outer_after(pkt: &Packet, entry: &CtEntryV4) -> (Be32, Be32) {
    let ((src, _), (dst, _)) = new_ends(pkt, entry);
    let outer_src = if pkt.ip_src == pkt.tuple.src_addr {
        src
    } else {
        pkt.ip_src
    };
    let outer_dst = if pkt.ip_dst == pkt.tuple.dst_addr {
        dst
    } else {
        pkt.ip_dst
    };
    (outer_src, outer_dst)
}

/// Rewrites the ICMP error `pkt` with `entry` (see the module documentation).
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &Packet, entry: &CtEntryV4) -> Result<()> {
    let ((src_addr, src_port), (dst_addr, dst_port)) = new_ends(pkt, entry);
    let tuple = &pkt.tuple;
    let quoted = Quoted::new(ctx, pkt);

    // The quoted packet's source is the error's destination end, and vice versa.
    quoted.replace_end(
        ctx,
        pkt.inner_ip_off + IP_SRC_OFF,
        pkt.inner_l4_off + L4_SRC_PORT_OFF,
        (tuple.dst_addr, tuple.dst_port),
        (dst_addr, dst_port),
    )?;
    quoted.replace_end(
        ctx,
        pkt.inner_ip_off + IP_DST_OFF,
        pkt.inner_l4_off + L4_DST_PORT_OFF,
        (tuple.src_addr, tuple.src_port),
        (src_addr, src_port),
    )?;
    quoted.finish(ctx)?;

    let (outer_src, outer_dst) = outer_after(pkt, entry);
    let outer_csum = ETH_HLEN + IP_CSUM_OFF;
    nat::replace_ip_addr(
        ctx,
        outer_csum,
        ETH_HLEN + IP_SRC_OFF,
        pkt.ip_src,
        outer_src,
    )?;
    nat::replace_ip_addr(
        ctx,
        outer_csum,
        ETH_HLEN + IP_DST_OFF,
        pkt.ip_dst,
        outer_dst,
    )
}

/// The quoted packet of an error and the checksums its rewrite touches.
struct Quoted {
    /// The ICMP checksum.
    icmp_csum_off: usize,
    /// The quoted IP header's checksum.
    ip_csum_off: usize,
    /// The quoted L4 checksum and its value before the rewrite, when the error quotes
    /// it and it is in use.
    l4_csum: Option<(usize, u16)>,
    /// `bpf_l4_csum_replace` flags for the quoted L4 checksum.
    l4_flags: u64,
}

impl Quoted {
    #[inline(always)]
    fn new(ctx: &TcContext, pkt: &Packet) -> Self {
        let is_udp = pkt.tuple.proto == proto::UDP;
        let l4_csum_off = pkt.inner_l4_off + if is_udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
        // The load fails when the error quotes fewer bytes than that (TCP with the
        // minimum 8): nothing to update then. A quoted SCTP packet's CRC32c covers the
        // whole packet, of which the error holds the start: no update can make it
        // right, and the receiver matches the error by ports and verification tag
        // (RFC 9260 appendix C), never by it. It is left as it came.
        let l4_csum = ctx
            .load::<u16>(l4_csum_off)
            .ok()
            .filter(|&csum| !(is_udp && csum == 0) && pkt.tuple.proto != proto::SCTP)
            .map(|csum| (l4_csum_off, csum));
        Self {
            icmp_csum_off: pkt.l4_off + ICMP_CSUM_OFF,
            ip_csum_off: pkt.inner_ip_off + IP_CSUM_OFF,
            l4_csum,
            // A UDP checksum must not become 0 ("none") through the update.
            l4_flags: if is_udp {
                u64::from(BPF_F_MARK_MANGLED_0)
            } else {
                0
            },
        }
    }

    /// Rewrites one end (address at `addr_off`, port at `port_off`) of the quoted
    /// packet from `old` to `new`.
    #[inline(always)]
    fn replace_end(
        &self,
        ctx: &TcContext,
        addr_off: usize,
        port_off: usize,
        old: (Be32, Be16),
        new: (Be32, Be16),
    ) -> Result<()> {
        let ((old_addr, old_port), (new_addr, new_port)) = (old, new);
        if old_addr != new_addr {
            if let Some((l4_csum_off, _)) = self.l4_csum {
                // The quoted L4 checksum covers its addresses through its
                // pseudo-header. No BPF_F_PSEUDO_HDR: that flag is about the outer
                // packet's checksum state, which this change does not touch.
                ctx.l4_csum_replace(
                    l4_csum_off,
                    u64::from(old_addr.0),
                    u64::from(new_addr.0),
                    self.l4_flags | 4,
                )
                .map_err(|_| DropReason::REWRITE)?;
            }
            nat::replace_ip_addr(ctx, self.ip_csum_off, addr_off, old_addr, new_addr)?;
        }
        if old_port != new_port {
            if let Some((l4_csum_off, _)) = self.l4_csum {
                ctx.l4_csum_replace(
                    l4_csum_off,
                    u64::from(old_port.0),
                    u64::from(new_port.0),
                    self.l4_flags | 2,
                )
                .map_err(|_| DropReason::REWRITE)?;
            }
            ctx.l4_csum_replace(
                self.icmp_csum_off,
                u64::from(old_port.0),
                u64::from(new_port.0),
                2,
            )
            .map_err(|_| DropReason::REWRITE)?;
            ctx.store(port_off, &new_port.0, 0)
                .map_err(|_| DropReason::REWRITE)?;
        }
        Ok(())
    }

    /// Carries the quoted L4 checksum's change into the ICMP checksum.
    #[inline(always)]
    fn finish(&self, ctx: &TcContext) -> Result<()> {
        let Some((l4_csum_off, old)) = self.l4_csum else {
            return Ok(());
        };
        let new: u16 = ctx.load(l4_csum_off).map_err(|_| DropReason::REWRITE)?;
        if new != old {
            ctx.l4_csum_replace(self.icmp_csum_off, u64::from(old), u64::from(new), 2)
                .map_err(|_| DropReason::REWRITE)?;
        }
        Ok(())
    }
}
