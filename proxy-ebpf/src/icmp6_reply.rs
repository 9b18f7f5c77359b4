//! ICMPv6 errors the datapath sends itself: the reject, destination unreachable, port
//! unreachable (RFC 4443 section 3.1, code 4), for new IPv6 flows to a frontend
//! without endpoints and to a port a live ClusterIP does not declare, as kube-proxy's
//! reject rules answer them (the client's connect() fails at once with ECONNREFUSED);
//! and, for packets the datapath redirects past the kernel's forwarding, the errors
//! that forwarding would send: packet too big and time exceeded ([`crate::forward6`]).
//!
//! Built as [`crate::icmp_reply`] builds the IPv4 one: the frame becomes the error in
//! place (resized, headers written from the stack) and goes back out of the interface
//! it came from, from the address the client sent to. The error quotes the packet as it
//! arrived: its IPv6 header, its extension headers and the first 8 bytes of its
//! TCP/UDP header, which hold the ports the client's stack matches the error to its
//! socket by (RFC 4443 asks for as much as fits in the minimum MTU; this is what the
//! receiver needs, and a fixed bound for the verifier). The ICMPv6 checksum covers a
//! pseudo-header (RFC 4443 section 2.3, RFC 8200 section 8.1).
use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_REDIRECT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{counter, proto, Be32x4};

use crate::{
    parse::ETH_HLEN,
    parse6::{Packet6, ETH_P_IPV6, IPV6_DST_OFF, IPV6_HLEN, IPV6_SRC_OFF},
    stats,
    verdict::{DropReason, Result, REDIRECT},
};

const ICMPV6_HLEN: usize = 8;
/// Destination unreachable, port unreachable.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// Packet too big (code 0), with the next hop's MTU.
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// Time exceeded, hop limit exceeded in transit (code 0).
const ICMPV6_TIME_EXCEED: u8 = 3;
/// The TCP/UDP bytes quoted after the headers: the ports and, for UDP, length and
/// checksum.
const QUOTED_L4: usize = 8;
/// Extension header bytes the quote may hold; a packet with more is dropped instead
/// of answered (counted `drop_reject_failed`).
const MAX_QUOTED_EXT: usize = 64;
/// The quote's bound: the IPv6 header, extension headers, 8 TCP/UDP bytes.
const MAX_QUOTE: usize = IPV6_HLEN + MAX_QUOTED_EXT + QUOTED_L4;

/// Why the error is sent: which error, and what it is counted as.
#[derive(Clone, Copy)]
pub enum Reason {
    /// A frontend without endpoints: port unreachable.
    NoBackend,
    /// A port no frontend of a live ClusterIP declares: port unreachable.
    UndeclaredPort,
    /// The packet does not fit the route's MTU, which a redirected packet learns from
    /// its FIB lookup (IPv6 routers never fragment, RFC 8200 section 5): packet too
    /// big, with that MTU ([`crate::forward6`]).
    PacketTooBig,
    /// The hop limit runs out on this hop of a redirected packet: time exceeded.
    HopLimitExceeded,
}

impl Reason {
    /// Type, code, and the 4 type-specific bytes (network order), `mtu` for packet
    /// too big.
    #[inline(always)]
    fn header(self, mtu: u32) -> (u8, u8, u32) {
        match self {
            Self::NoBackend | Self::UndeclaredPort => (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0),
            Self::PacketTooBig => (ICMPV6_PKT_TOOBIG, 0, mtu.to_be()),
            Self::HopLimitExceeded => (ICMPV6_TIME_EXCEED, 0, 0),
        }
    }

    #[inline(always)]
    fn counter(self) -> u32 {
        match self {
            Self::NoBackend => counter::REJECTED_NO_BACKEND,
            Self::UndeclaredPort => counter::REJECTED_UNDECLARED_PORT,
            Self::PacketTooBig => counter::FRAG_NEEDED_SENT,
            Self::HopLimitExceeded => counter::TIME_EXCEEDED_SENT,
        }
    }
}

/// The reply's IPv6 and ICMPv6 headers, written at once.
#[repr(C)]
struct Headers {
    /// Version, traffic class, flow label (network order).
    vtc_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: Be32x4,
    daddr: Be32x4,
    icmp_type: u8,
    icmp_code: u8,
    icmp_checksum: u16,
    /// Unused in destination unreachable and time exceeded, the MTU in packet too big
    /// (RFC 4443 sections 3.1 to 3.3).
    icmp_data: u32,
}

/// The one's-complement sum (RFC 1071), not yet folded, of the 16-bit halves of
/// `words` as they sit in memory. Every sum here is taken in memory order, which on a
/// little-endian machine is each 16-bit word byte-swapped: RFC 1071's byte-order
/// independence makes the folded result, stored as it is, the right checksum bytes.
#[inline(always)]
fn sum_halves(words: &[u32]) -> u32 {
    let mut sum = 0;
    for word in words {
        sum += (word & 0xffff) + (word >> 16);
    }
    sum
}

/// Folds a sum into the checksum field's value (memory order, see [`sum_halves`]).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Bytes moved per step when the quote is shifted behind the new headers.
const CHUNK: usize = 8;

/// Copies the 8 bytes at `from` to `to` and returns their sum (memory order); a call
/// of its own so that the unrolled loop does not give each step its own stack slot.
#[inline(never)]
fn move_chunk(skb: *mut __sk_buff, from: usize, to: usize) -> Option<u32> {
    let ctx = TcContext::new(skb);
    let words: [u32; 2] = ctx.load(from).ok()?;
    ctx.store(to, &words, 0).ok()?;
    Some(sum_halves(&words))
}

/// A 16-bit value as it sits in memory in network order (memory-order sums).
#[inline(always)]
fn wire16(value: u16) -> u32 {
    u32::from(value.to_be())
}

/// Replaces the packet with the ICMPv6 error of `reason` to its sender (`mtu`: the
/// MTU a packet too big names, else ignored; an argument of its own rather than a
/// field of `Reason`: an enum's payload is undefined in the variants without one, and
/// the verifier refuses a call that passes an undefined register), counts it and
/// returns the redirect verdict that sends it back. A function of its own (see
/// [`crate::parse6::parse`]); the quote never sits on the stack: the frame is grown to
/// the reply's length and the quote moved back behind the new headers in place, 8
/// bytes at a time from its end (the headers and extension headers are multiples of 8
/// bytes, and so is the quote), summed for the checksum on the way.
#[inline(never)]
pub fn send(skb: *mut __sk_buff, pkt: &Packet6, reason: Reason, mtu: u32) -> Result<i32> {
    let ctx = &TcContext::new(skb);
    let quote_len = pkt.l4_off - ETH_HLEN + QUOTED_L4;
    if !(IPV6_HLEN + QUOTED_L4..=MAX_QUOTE).contains(&quote_len) || !quote_len.is_multiple_of(CHUNK)
    {
        return Err(DropReason::REJECT_FAILED);
    }
    // Destination and source MAC, as 16-bit words.
    let macs: [u16; 6] = ctx.load(0).map_err(|_| DropReason::REJECT_FAILED)?;
    let headers_len = core::mem::size_of::<Headers>();
    let icmp_len = ICMPV6_HLEN + quote_len;

    // The reply is longer than the quote's end in the original, so growing or cutting
    // keeps the quote whole.
    let reply_len = ETH_HLEN + headers_len + quote_len;
    // SAFETY: the context pointer is the program's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, reply_len as u32, 0) } != 0 {
        return Err(DropReason::REJECT_FAILED);
    }
    let mut sum: u32 = 0;
    let mut chunk = MAX_QUOTE / CHUNK;
    while chunk > 0 {
        chunk -= 1;
        let at = chunk * CHUNK;
        if at < quote_len {
            sum += move_chunk(skb, ETH_HLEN + at, ETH_HLEN + headers_len + at)
                .ok_or(DropReason::REJECT_FAILED)?;
        }
    }
    // The client's packet's addresses, now inside the quote (which starts with its
    // IPv6 header), are the reply's swapped.
    let quoted_ip = ETH_HLEN + headers_len;
    let client: Be32x4 = ctx
        .load(quoted_ip + IPV6_SRC_OFF)
        .map_err(|_| DropReason::REJECT_FAILED)?;
    let frontend: Be32x4 = ctx
        .load(quoted_ip + IPV6_DST_OFF)
        .map_err(|_| DropReason::REJECT_FAILED)?;
    let (icmp_type, icmp_code, icmp_data) = reason.header(mtu);
    let mut headers = Headers {
        vtc_flow: 0x6000_0000u32.to_be(), // version 6, traffic class and flow label 0
        payload_len: (icmp_len as u16).to_be(),
        next_header: proto::ICMPV6,
        hop_limit: 64,
        saddr: frontend,
        daddr: client,
        icmp_type,
        icmp_code,
        icmp_checksum: 0,
        icmp_data,
    };
    // The pseudo-header (both addresses, the upper-layer length, the next header),
    // then the message: its header (type and code, the type's 4 bytes) and the quote.
    sum += sum_halves(&frontend.0)
        + sum_halves(&client.0)
        + wire16(icmp_len as u16)
        + wire16(u16::from(proto::ICMPV6))
        + wire16(u16::from_be_bytes([icmp_type, icmp_code]))
        + sum_halves(&[icmp_data]);
    headers.icmp_checksum = fold(sum);

    let eth: [u16; 7] = [
        macs[3],
        macs[4],
        macs[5],
        macs[0],
        macs[1],
        macs[2],
        ETH_P_IPV6.to_be(),
    ];
    ctx.store(0, &eth, 0)
        .map_err(|_| DropReason::REJECT_FAILED)?;
    ctx.store(ETH_HLEN, &headers, 0)
        .map_err(|_| DropReason::REJECT_FAILED)?;

    // SAFETY: reading a field of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper has no preconditions; flags 0 = egress of `ifindex`.
    if unsafe { bpf_redirect(ifindex, 0) } != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::REJECT_FAILED);
    }
    stats::count(reason.counter());
    Ok(REDIRECT)
}
