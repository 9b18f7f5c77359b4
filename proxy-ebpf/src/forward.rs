//! Sending a translated packet straight to its next hop: a FIB lookup for its new
//! addresses, then a redirect with neighbour resolution.
//!
//! Needed wherever the translation makes the packet one the kernel's input path would
//! drop: a masqueraded packet carries the node's own address as its source (a "martian"
//! on ingress), and so does the reply of a NodePort flow once translated back. It also
//! skips the rest of the stack for traffic this node only forwards.
//!
//! Skipping the kernel's forwarding means doing its checks: the route's MTU (a packet
//! with DF set that does not fit is answered with ICMP fragmentation needed, or path
//! MTU discovery through a NodePort becomes a black hole) and the TTL (decremented on
//! every redirect; a packet that would leave with TTL 0 is answered with ICMP time
//! exceeded, as `ip_forward` does). The lookup happens before the translation, so those
//! errors quote the packet as its sender sent it.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{counter, ct_flags, proto, CtEntryV4, CtKeyV4};

use crate::{
    icmp_reply::{self, IcmpReply},
    nat,
    parse::{Kind, Packet, ETH_HLEN, IP_CSUM_OFF, IP_TTL_OFF},
    stats,
    verdict::{DropReason, Result, PASS, REDIRECT},
};

const AF_INET: u8 = 2;
const UDP_HLEN: u32 = 8;

/// Where a translated packet goes.
#[derive(Clone, Copy)]
pub enum NextHop {
    /// Out of this interface, neighbour resolved by the redirect.
    Redirect { ifindex: u32 },
    /// To the stack: the route is local, missing, or forwarding is off; the kernel then
    /// decides as it would without us.
    Stack,
    /// The route's MTU is smaller than the packet, which has DF set.
    FragNeeded { mtu: u16 },
    /// The TTL runs out on this hop.
    TtlExceeded,
}

/// The length the route's MTU is checked against: the packet's, or for a GSO packet
/// (TCP segmentation offload across a veth) the length of each segment it becomes; 0
/// (not checked) for an SCTP GSO packet.
#[inline(always)]
fn wire_len(ctx: &TcContext, pkt: &Packet) -> u16 {
    // SAFETY: reading a field of the program's own skb.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return pkt.tot_len;
    }
    if pkt.tuple.proto == proto::SCTP {
        // SCTP's GSO packets are lists of whole packets (gso_size GSO_BY_FRAGS), each
        // sized by SCTP to the path MTU it knows; the kernel checks them one by one.
        return 0;
    }
    let l4_hlen = if pkt.tuple.proto == proto::TCP {
        u32::from(pkt.tcp_hlen)
    } else {
        UDP_HLEN
    };
    let segment = pkt.ip_hlen as u32 + l4_hlen + gso_size;
    u16::try_from(segment).unwrap_or(u16::MAX)
}

/// Looks up the next hop of the packet, whose header will read `tuple` once
/// translated.
#[inline(always)]
pub fn lookup(ctx: &TcContext, pkt: &Packet, tuple: &CtKeyV4) -> NextHop {
    // SAFETY: a plain C struct; all-zero is its "unset" state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = tuple.proto;
    params.sport = tuple.src_port.0;
    params.dport = tuple.dst_port.0;
    params.__bindgen_anon_3.ipv4_src = tuple.src_addr.0;
    params.__bindgen_anon_4.ipv4_dst = tuple.dst_addr.0;
    // With a length, the helper checks it against the route's MTU (which may be lower
    // than the device's). Only DF packets are checked: the kernel would fragment the
    // others. ICMP errors are never answered with another error (RFC 1122).
    let checked_len = if pkt.dont_fragment() && pkt.kind != Kind::IcmpError {
        wire_len(ctx, pkt)
    } else {
        0
    };
    params.__bindgen_anon_1.tot_len = checked_len;
    // SAFETY: reading a field of the program's own skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: `params` lives on the stack for the call; the size is its own.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) && checked_len != 0 {
        // SAFETY: the helper wrote the MTU into the union on this result.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        return NextHop::FragNeeded { mtu };
    }
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
    {
        return NextHop::Stack;
    }
    if pkt.ttl <= 1 {
        return NextHop::TtlExceeded;
    }
    NextHop::Redirect {
        ifindex: params.ifindex,
    }
}

/// Decrements the TTL, as every router does (with the header checksum).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, pkt: &Packet) -> Result<()> {
    let ip_proto = if pkt.kind == Kind::IcmpError {
        proto::ICMP
    } else {
        pkt.tuple.proto
    };
    // TTL and protocol share a 16-bit word of the header checksum.
    let old = u16::from_ne_bytes([pkt.ttl, ip_proto]);
    let new = u16::from_ne_bytes([pkt.ttl - 1, ip_proto]);
    ctx.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, u64::from(old), u64::from(new), 2)
        .map_err(|_| DropReason::REWRITE)?;
    ctx.store(ETH_HLEN + IP_TTL_OFF, &(pkt.ttl - 1), 0)
        .map_err(|_| DropReason::REWRITE)
}

/// Sends the packet, already translated, to `hop` (a [`NextHop::Redirect`] or
/// [`NextHop::Stack`]; the others are answered by [`translate_and_send`] first).
#[inline(always)]
pub fn send(ctx: &TcContext, pkt: &Packet, hop: NextHop) -> Result<i32> {
    let NextHop::Redirect { ifindex } = hop else {
        return Ok(PASS);
    };
    // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
    let verdict = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        // The stack forwards it and decrements the TTL itself.
        return Ok(PASS);
    }
    // The redirect happens once the program returns, with the packet as it is then.
    decrement_ttl(ctx, pkt)?;
    stats::count(counter::REDIRECTED);
    Ok(REDIRECT)
}

/// Answers a packet its next hop cannot take with the ICMP error the kernel's
/// forwarding would send; `None` when the hop takes it.
#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet, hop: NextHop) -> Option<Result<i32>> {
    match hop {
        NextHop::FragNeeded { mtu } => {
            Some(icmp_reply::send(ctx, pkt, IcmpReply::FragNeeded { mtu }))
        }
        NextHop::TtlExceeded if pkt.kind == Kind::IcmpError => Some(Err(DropReason::TTL_EXCEEDED)),
        NextHop::TtlExceeded => Some(icmp_reply::send(ctx, pkt, IcmpReply::TimeExceeded)),
        NextHop::Redirect { .. } | NextHop::Stack => None,
    }
}

/// Whose packet [`translate_and_send`] handles, for the counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The first packet of a flow just created (counted as a new flow by its caller).
    New,
    /// A packet of a flow conntrack knows (counted as translated).
    Known,
}

/// Handles a packet of a flow conntrack knows, at an ingress hook: a flow through the
/// stack ([`ct_flags::VIA_STACK`]) has its requests translated here and routed by the
/// kernel, and its replies left to the egress hooks, which translate them after
/// routing; every other flow is translated and sent to its next hop, in both
/// directions, so that netfilter sees each flow both ways or not at all.
#[inline(always)]
pub fn known_flow(ctx: &TcContext, pkt: &Packet, entry: &CtEntryV4) -> Result<i32> {
    if entry.flags & ct_flags::VIA_STACK != 0 {
        if entry.flags & ct_flags::REPLY == 0 {
            nat::translate(ctx, pkt, entry)?;
        }
        return Ok(PASS);
    }
    translate_and_send(ctx, pkt, entry, Flow::Known)
}

/// Translates a packet with its flow's `entry` and sends it to its next hop.
#[inline(always)]
pub fn translate_and_send(
    ctx: &TcContext,
    pkt: &Packet,
    entry: &CtEntryV4,
    flow: Flow,
) -> Result<i32> {
    let hop = lookup(ctx, pkt, &nat::routed_tuple(pkt, entry));
    if let Some(answer) = refuse(ctx, pkt, hop) {
        return answer;
    }
    match flow {
        Flow::New => nat::apply(ctx, pkt, entry)?,
        Flow::Known => nat::translate(ctx, pkt, entry)?,
    }
    send(ctx, pkt, hop)
}
