//! Sending a translated IPv6 packet straight to its next hop, as [`crate::forward`]
//! does for IPv4: a FIB lookup (`bpf_fib_lookup`, `AF_INET6`) for its addresses once
//! translated, then a redirect with neighbour resolution. Used by the node-facing
//! ingress for flows it does not send through the stack (a remote backend, a
//! masqueraded flow, their replies), whose translated packets the kernel's input path
//! would drop (a reply translated back carries the node's own address as its source).
//!
//! Skipping the kernel's forwarding means doing its checks (`ip6_forward`): the hop
//! limit is decremented on every redirect, and a packet that would leave with 0 is
//! answered with time exceeded; a packet bigger than the route's MTU is answered with
//! packet too big (an IPv6 router never fragments, RFC 8200 section 5, so every packet
//! is checked, not only those with DF as for IPv4). The lookup happens before the
//! translation, so the errors quote the packet as its sender sent it. ICMPv6 errors are
//! never answered with another error (RFC 4443 section 2.4); a GSO packet (TCP
//! segmentation offload) is checked by the helper against the device by its segments,
//! and left to the kernel when they do not fit, which answers it as it would.
//!
//! The lookup is a function of its own, as every IPv6 stage
//! ([`crate::parse6::parse`]): its 64-byte parameters live in its frame.
use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{counter, ct_flags, proto, Be32x4, CtEntryV6};

use crate::{
    icmp6_reply::{self, Reason},
    nat6,
    parse::{Kind, ETH_HLEN},
    parse6::{Packet6, IPV6_DST_OFF, IPV6_HOP_LIMIT_OFF, IPV6_SRC_OFF},
    stats,
    verdict::{DropReason, Result, PASS, REDIRECT},
};

const AF_INET6: u8 = 10;

/// Where a translated packet goes.
#[derive(Clone, Copy)]
pub enum NextHop {
    /// Out of this interface, neighbour resolved by the redirect.
    Redirect { ifindex: u32 },
    /// To the stack: the route is local, missing, or forwarding is off; the kernel then
    /// decides as it would without us.
    Stack,
    /// The route's MTU is smaller than the packet.
    TooBig { mtu: u32 },
    /// The hop limit runs out on this hop.
    HopLimitExceeded,
}

/// The addresses the packet's IPv6 header will carry once translated with `entry`
/// (for an ICMPv6 error, by [`crate::icmp6_error`]'s rule: a router's address stays),
/// written into the lookup's parameters.
#[inline(always)]
fn routed_addrs(ctx: &TcContext, pkt: &Packet6, entry: &CtEntryV6, params: &mut bpf_fib_lookup) {
    let tuple = &pkt.tuple;
    let src = if entry.flags & ct_flags::REWRITE_SRC != 0 {
        &entry.nat_src_addr
    } else {
        &tuple.src_addr
    };
    let dst = if entry.flags & ct_flags::REWRITE_DST != 0 {
        &entry.nat_dst_addr
    } else {
        &tuple.dst_addr
    };
    params.__bindgen_anon_3.ipv6_src = src.0;
    params.__bindgen_anon_4.ipv6_dst = dst.0;
    if pkt.kind != Kind::IcmpError {
        return;
    }
    if let Ok(outer) = ctx.load::<Be32x4>(ETH_HLEN + IPV6_SRC_OFF) {
        if outer != tuple.src_addr {
            params.__bindgen_anon_3.ipv6_src = outer.0;
        }
    }
    if let Ok(outer) = ctx.load::<Be32x4>(ETH_HLEN + IPV6_DST_OFF) {
        if outer != tuple.dst_addr {
            params.__bindgen_anon_4.ipv6_dst = outer.0;
        }
    }
}

/// Looks up the next hop of the packet once translated with `entry`.
#[inline(never)]
pub fn lookup(skb: *mut __sk_buff, pkt: &Packet6, entry: &CtEntryV6) -> NextHop {
    let ctx = &TcContext::new(skb);
    // SAFETY: a plain C struct; all-zero is its "unset" state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    routed_addrs(ctx, pkt, entry, &mut params);
    if pkt.kind == Kind::IcmpError {
        params.l4_protocol = proto::ICMPV6;
    } else {
        params.l4_protocol = pkt.tuple.proto;
        let tuple = &pkt.tuple;
        let (sport, dport) = match (
            entry.flags & ct_flags::REWRITE_SRC != 0,
            entry.flags & ct_flags::REWRITE_DST != 0,
        ) {
            (false, false) => (tuple.src_port, tuple.dst_port),
            (true, false) => (entry.nat_src_port, tuple.dst_port),
            (false, true) => (tuple.src_port, entry.nat_dst_port),
            (true, true) => (entry.nat_src_port, entry.nat_dst_port),
        };
        params.sport = sport.0;
        params.dport = dport.0;
    }
    // SAFETY: reading fields of the program's own skb.
    let (len, gso_size, ifindex) = unsafe { ((*skb).len, (*skb).gso_size, (*skb).ifindex) };
    // With a length the helper checks it against the route's MTU. Not for an error
    // (never answered) nor a GSO packet (whose segments the helper checks against the
    // device when no length is given).
    let checked_len = if pkt.kind == Kind::IcmpError || gso_size != 0 {
        0
    } else {
        u16::try_from(len.saturating_sub(ETH_HLEN as u32)).unwrap_or(u16::MAX)
    };
    params.__bindgen_anon_1.tot_len = checked_len;
    params.ifindex = ifindex;
    // SAFETY: `params` lives on the stack for the call; the size is its own.
    let found = unsafe {
        fib_lookup(
            skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) && checked_len != 0 {
        // SAFETY: the helper wrote the MTU into the union on this result.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        return NextHop::TooBig {
            mtu: u32::from(mtu),
        };
    }
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
    {
        return NextHop::Stack;
    }
    if pkt.hop_limit <= 1 {
        return NextHop::HopLimitExceeded;
    }
    NextHop::Redirect {
        ifindex: params.ifindex,
    }
}

/// Sends the packet, already translated, to `hop` (a [`NextHop::Redirect`] or
/// [`NextHop::Stack`]; the others are answered by [`translate_and_send`] first).
#[inline(always)]
fn send(skb: *mut __sk_buff, pkt: &Packet6, hop: NextHop) -> Result<i32> {
    let NextHop::Redirect { ifindex } = hop else {
        return Ok(PASS);
    };
    // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
    let verdict = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        // The stack forwards it and decrements the hop limit itself.
        return Ok(PASS);
    }
    // The redirect happens once the program returns, with the packet as it is then.
    // No checksum covers the hop limit.
    TcContext::new(skb)
        .store(ETH_HLEN + IPV6_HOP_LIMIT_OFF, &(pkt.hop_limit - 1), 0)
        .map_err(|_| DropReason::REWRITE)?;
    stats::count(counter::REDIRECTED);
    Ok(REDIRECT)
}

/// Whose packet [`translate_and_send`] handles.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The first packet of a flow just created (counted as a new flow by its caller).
    New,
    /// A packet of a flow conntrack knows (counted as translated).
    Known,
}

/// Translates a packet with its flow's `entry` and sends it to its next hop, or
/// answers it with the error the kernel's forwarding would send.
#[inline(always)]
pub fn translate_and_send(
    skb: *mut __sk_buff,
    pkt: &Packet6,
    entry: &CtEntryV6,
    flow: Flow,
) -> Result<i32> {
    let hop = lookup(skb, pkt, entry);
    match hop {
        NextHop::TooBig { mtu } => return icmp6_reply::send(skb, pkt, Reason::PacketTooBig, mtu),
        NextHop::HopLimitExceeded if pkt.kind == Kind::IcmpError => {
            return Err(DropReason::TTL_EXCEEDED)
        }
        NextHop::HopLimitExceeded => {
            return icmp6_reply::send(skb, pkt, Reason::HopLimitExceeded, 0)
        }
        NextHop::Redirect { .. } | NextHop::Stack => {}
    }
    match flow {
        Flow::New => nat6::apply(skb, pkt, entry)?,
        Flow::Known => nat6::translate(skb, pkt, entry)?,
    }
    send(skb, pkt, hop)
}

/// Whether a packet of `entry`'s flow goes back where it came from once translated:
/// a pod reaching itself through a frontend (the hairpin), both ways.
#[inline(always)]
pub fn is_hairpin(pkt: &Packet6, entry: &CtEntryV6) -> bool {
    entry.flags & ct_flags::REWRITE_DST != 0 && entry.nat_dst_addr == pkt.tuple.src_addr
}

/// Whether a hairpin packet has a hop left ([`send_back`]); asked before it is
/// translated, so a packet dropped for it is left as it came.
///
/// # Errors
/// `TTL_EXCEEDED` when its hop limit runs out on this hop.
#[inline(always)]
pub fn hairpin_hop(pkt: &Packet6) -> Result<()> {
    if pkt.hop_limit <= 1 {
        return Err(DropReason::TTL_EXCEEDED);
    }
    Ok(())
}

/// Sends a hairpin packet ([`is_hairpin`]), already translated, back out of the
/// interface it came in on, to the pod that sent it, as a router would (the MAC
/// addresses swapped, the hop limit decremented). No route lookup is needed, and no
/// MTU can be smaller than the one the packet came through. A packet with hop limit 1
/// is dropped (counted as `drop_ttl_exceeded`) rather than answered with time
/// exceeded ([`hairpin_hop`], before the translation): the one difference from the
/// kernel's forwarding, for a pod that reaches itself with hop limit 1. Its callers
/// translate the packet first, at the call site they share with the flows through the
/// stack: the verifier walks the rewrite once per call site and state, the dearest
/// part of the pod-facing program.
#[inline(never)]
pub fn send_back(skb: *mut __sk_buff, pkt: &Packet6) -> Result<i32> {
    let ctx = TcContext::new(skb);
    // Destination and source MAC, as 16-bit words, swapped.
    let macs: [u16; 6] = ctx.load(0).map_err(|_| DropReason::REWRITE)?;
    let swapped = [macs[3], macs[4], macs[5], macs[0], macs[1], macs[2]];
    ctx.store(0, &swapped, 0).map_err(|_| DropReason::REWRITE)?;
    ctx.store(
        ETH_HLEN + IPV6_HOP_LIMIT_OFF,
        &pkt.hop_limit.saturating_sub(1),
        0,
    )
    .map_err(|_| DropReason::REWRITE)?;
    // SAFETY: reading a field of the program's own skb.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: the helper has no preconditions; flags 0 = egress of `ifindex`.
    if unsafe { bpf_redirect(ifindex, 0) } != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::REWRITE);
    }
    stats::count(counter::REDIRECTED);
    Ok(REDIRECT)
}

/// A packet of a flow conntrack knows, at the node-facing ingress (as
/// [`crate::forward::known_flow`]): a flow through the stack has its requests
/// translated here and its replies left to the egress hooks; every other flow is
/// translated and sent to its next hop both ways.
#[inline(always)]
pub fn known_flow(skb: *mut __sk_buff, pkt: &Packet6, entry: &CtEntryV6) -> Result<i32> {
    if entry.flags & ct_flags::VIA_STACK != 0 {
        if entry.flags & ct_flags::REPLY == 0 {
            nat6::translate(skb, pkt, entry)?;
        }
        return Ok(PASS);
    }
    translate_and_send(skb, pkt, entry, Flow::Known)
}
