//! ICMPv6 errors about translated IPv6 flows (RFC 4443 section 3: destination
//! unreachable, packet too big, time exceeded, parameter problem), translated as
//! [`crate::icmp_error`] translates ICMP ones, for the same reasons: untranslated, a
//! packet too big quoting the backend's address is ignored by the client (a PMTU
//! black hole), and a port unreachable does not reach the UDP socket it is about.
//!
//! The error's key is the quoted tuple reversed ([`crate::parse6`]), the conntrack key
//! of the direction the error travels in; the entry's rewrite is applied to it:
//! - outer destination -> the entry's new destination, outer source -> its new source
//!   only when the error comes from the flow's endpoint (a router's error keeps its
//!   address, so the receiver still learns which hop complained);
//! - the quoted packet gets the inverse: its source becomes the new destination and
//!   its destination the new source.
//!
//! Checksums. IPv6 has no header checksum, so everything lands in two: the quoted
//! TCP/UDP checksum, when the error quotes it (IPv6 errors quote as much as fits in
//! 1280 bytes, so it is there unless a short quote stops before it), whose
//! pseudo-header holds the quoted addresses; and the ICMPv6 checksum, which covers a
//! pseudo-header of the outer addresses and the whole message, quoted packet included.
//! So an outer address change is a pseudo-header update of the ICMPv6 checksum (as
//! [`crate::nat6`] does for TCP/UDP), and a quoted address or port change updates the
//! quoted L4 checksum and the ICMPv6 checksum (the changed bytes and, at the end, the
//! quoted checksum's own change). Every update is incremental (RFC 1624): the quoted
//! bytes beyond the headers are never read. None of these updates is a pseudo-header
//! one for the packet's `skb->csum`: every byte changed inside the message is
//! compensated in the ICMPv6 checksum, so the sum of the packet is unchanged.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0},
    programs::TcContext,
};
use proxy_common::{ct_flags, proto, Be16, Be32x4, CtEntryV6};

use crate::{
    nat6,
    parse::{ETH_HLEN, L4_DST_PORT_OFF, L4_SRC_PORT_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF},
    parse6::{Packet6, ICMPV6_CSUM_OFF, ICMPV6_HLEN, IPV6_DST_OFF, IPV6_SRC_OFF},
    verdict::{DropReason, Result},
};

/// Rewrites the ICMPv6 error `pkt` with `entry` (see the module documentation). A
/// function of its own, as every IPv6 stage ([`crate::parse6::parse`]).
#[inline(never)]
pub fn translate(skb: *mut __sk_buff, pkt: &Packet6, entry: &CtEntryV6) -> Result<()> {
    let ctx = &TcContext::new(skb);
    let tuple = &pkt.tuple;
    // The ends a packet of the entry's direction has after its rewrite, by reference:
    // copies would take stack this chain does not have.
    let (src_addr, src_port) = if entry.flags & ct_flags::REWRITE_SRC != 0 {
        (&entry.nat_src_addr, entry.nat_src_port)
    } else {
        (&tuple.src_addr, tuple.src_port)
    };
    let (dst_addr, dst_port) = if entry.flags & ct_flags::REWRITE_DST != 0 {
        (&entry.nat_dst_addr, entry.nat_dst_port)
    } else {
        (&tuple.dst_addr, tuple.dst_port)
    };
    let quoted = Quoted::new(ctx, pkt);
    let inner_ip = pkt.l4_off + ICMPV6_HLEN;
    let inner_l4 = usize::from(pkt.inner_l4_off);
    // The quoted packet's source is the error's destination end, and vice versa.
    quoted.replace_end(
        ctx,
        inner_ip + IPV6_SRC_OFF,
        inner_l4 + L4_SRC_PORT_OFF,
        (&tuple.dst_addr, tuple.dst_port),
        (dst_addr, dst_port),
    )?;
    quoted.replace_end(
        ctx,
        inner_ip + IPV6_DST_OFF,
        inner_l4 + L4_DST_PORT_OFF,
        (&tuple.src_addr, tuple.src_port),
        (src_addr, src_port),
    )?;
    quoted.finish(ctx)?;

    let outer_src: Be32x4 = ctx
        .load(ETH_HLEN + IPV6_SRC_OFF)
        .map_err(|_| DropReason::REWRITE)?;
    if outer_src == tuple.src_addr && outer_src != *src_addr {
        nat6::replace_addr(
            ctx,
            quoted.icmp_csum_off,
            ETH_HLEN + IPV6_SRC_OFF,
            &outer_src,
            src_addr,
            0,
        )?;
    }
    let outer_dst: Be32x4 = ctx
        .load(ETH_HLEN + IPV6_DST_OFF)
        .map_err(|_| DropReason::REWRITE)?;
    if outer_dst == tuple.dst_addr && outer_dst != *dst_addr {
        nat6::replace_addr(
            ctx,
            quoted.icmp_csum_off,
            ETH_HLEN + IPV6_DST_OFF,
            &outer_dst,
            dst_addr,
            0,
        )?;
    }
    Ok(())
}

/// The quoted packet of an error and the checksums its rewrite touches.
struct Quoted {
    /// The ICMPv6 checksum.
    icmp_csum_off: usize,
    /// The quoted L4 checksum and its value before the rewrite, when the error quotes
    /// it and it is in use.
    l4_csum: Option<(usize, u16)>,
    /// `bpf_l4_csum_replace` flags for the quoted L4 checksum.
    l4_flags: u64,
}

impl Quoted {
    #[inline(always)]
    fn new(ctx: &TcContext, pkt: &Packet6) -> Self {
        let is_udp = pkt.tuple.proto == proto::UDP;
        let l4_csum_off =
            usize::from(pkt.inner_l4_off) + if is_udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
        // The load fails when the quote stops before the checksum: nothing to update.
        // A UDP checksum of 0 is invalid in IPv6 and stays as it is.
        // A quoted SCTP CRC32c is left as it came (why: `crate::icmp_error`).
        let l4_csum = ctx
            .load::<u16>(l4_csum_off)
            .ok()
            .filter(|&csum| !(is_udp && csum == 0) && pkt.tuple.proto != proto::SCTP)
            .map(|csum| (l4_csum_off, csum));
        Self {
            icmp_csum_off: pkt.l4_off + ICMPV6_CSUM_OFF,
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
        old: (&Be32x4, Be16),
        new: (&Be32x4, Be16),
    ) -> Result<()> {
        let ((old_addr, old_port), (new_addr, new_port)) = (old, new);
        if old_addr != new_addr {
            let diff = nat6::address_diff(old_addr, new_addr)?;
            if let Some((l4_csum_off, _)) = self.l4_csum {
                // The quoted checksum's pseudo-header holds the quoted addresses.
                // Size 0: `diff` is a checksum difference.
                ctx.l4_csum_replace(l4_csum_off, 0, diff, self.l4_flags)
                    .map_err(|_| DropReason::REWRITE)?;
            }
            // The quoted address is message bytes the ICMPv6 checksum covers.
            ctx.l4_csum_replace(self.icmp_csum_off, 0, diff, 0)
                .map_err(|_| DropReason::REWRITE)?;
            ctx.store(addr_off, new_addr, 0)
                .map_err(|_| DropReason::REWRITE)?;
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

    /// Carries the quoted L4 checksum's change into the ICMPv6 checksum.
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
