//! IPv6 header parsing: the fixed header, a bounded walk over extension headers, and
//! the TCP/UDP/SCTP ports after them. Produces offsets and the conntrack key, as
//! [`crate::parse`] does for IPv4; never keeps pointers.
//!
//! The walk follows hop-by-hop options, routing, destination options and fragment
//! headers (RFC 8200 section 4), at most [`MAX_EXT_HEADERS`] of them, so the verifier
//! sees a bounded loop and a packet a bounded cost. What it does not take is passed
//! untouched, as anything that is not ours:
//! - a chain longer than that, or of more than 120 bytes (counted,
//!   `ipv6_ext_headers_passed`);
//! - a routing header with segments left: the destination address is a waypoint, not
//!   the final destination the L4 checksum covers (also counted there);
//! - ICMPv6 other than an error quoting a TCP/UDP/SCTP packet (neighbour discovery,
//!   router advertisements, MLD, echo), ESP, AH and every other next header;
//! - SCTP with a fragment header (why: [`crate::parse`]).
//!
//! A non-first fragment has no ports to find its flow by: it is a
//! [`Kind::LaterFragment`], whose ports [`crate::fragments6`] supplies from its first.
//! An ICMPv6 error quoting a TCP/UDP packet is a [`Kind::IcmpError`] keyed by the
//! quoted tuple reversed ([`crate::icmp6_error`]).
//!
//! A datagram's first fragment carries the TCP/UDP header and is translated like an
//! unfragmented packet; the L4 checksum covers the whole datagram, and its
//! incremental update in the first fragment stays right for it.
use aya_ebpf::{bindings::__sk_buff, helpers::bpf_skb_load_bytes, programs::TcContext};
use proxy_common::{counter, proto, Be16, CtKeyV6};

use crate::parse::{ptr_at, Kind, ETH_HLEN, L4_SRC_PORT_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF};

pub const ETH_P_IPV6: u16 = 0x86dd;
/// Length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// Offsets inside the IPv6 header.
pub const IPV6_PAYLOAD_LEN_OFF: usize = 4;
pub const IPV6_HOP_LIMIT_OFF: usize = 7;
pub const IPV6_SRC_OFF: usize = 8;
pub const IPV6_DST_OFF: usize = 24;
/// Extension headers the walk follows (IANA next-header numbers).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Length of a fragment header (fixed, RFC 8200 section 4.5).
const FRAG_HLEN: usize = 8;
/// Fragment offset bits of the fragment header's third and fourth bytes (host order).
const FRAG_OFFSET_MASK: u16 = 0xfff8;
/// ICMPv6 error types (RFC 4443 section 3): 1 destination unreachable, 2 packet too
/// big, 3 time exceeded, 4 parameter problem; informational messages are 128 and up.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PARAM_PROB: u8 = 4;
/// The ICMPv6 header: type, code, checksum, 4 bytes that depend on the type; an
/// error's quoted packet follows it.
pub const ICMPV6_HLEN: usize = 8;
pub const ICMPV6_CSUM_OFF: usize = 2;
/// At most this many extension headers are walked; Linux sends none on a pod's TCP or
/// UDP traffic, hop-by-hop for jumbograms or MLD, a fragment header for large UDP.
pub const MAX_EXT_HEADERS: usize = 4;
/// At most this many bytes of extension headers (a mask: multiples of 8 up to 120);
/// a longer chain is passed untouched, counted as one too long.
const MAX_EXT_LEN: usize = 0x78;
/// The TCP data offset byte, followed by the flags byte.
const TCP_DOFF_OFF: usize = 12;

/// What the datapath needs to know about an IPv6 TCP/UDP packet (an unfragmented one,
/// a datagram's first or later fragment), or an ICMPv6 error quoting one.
#[derive(Clone, Copy)]
pub struct Packet6 {
    /// The conntrack key. For TCP/UDP, the packet's 5-tuple (a later fragment's ports
    /// are zero until [`crate::fragments6`] gives it its first's). For an ICMPv6
    /// error, the quoted packet's tuple reversed, as [`crate::parse::Packet::tuple`];
    /// the error's own addresses stay in its header ([`crate::icmp6_error`] reads them).
    pub tuple: CtKeyV6,
    /// Offset of the TCP/UDP (or ICMPv6) header from the start of the frame, after
    /// every extension header; for a later fragment, of its fragment's data.
    pub l4_off: usize,
    /// The fragment header's identification (network order) when there is one.
    pub frag_id: u32,
    /// Offset of the quoted packet's TCP/UDP header, for an ICMPv6 error (its IPv6
    /// header is at `l4_off + ICMPV6_HLEN`).
    pub inner_l4_off: u16,
    pub kind: Kind,
    /// Whether the packet has a fragment header (for a first fragment: more follow or
    /// may, so the datagram is remembered).
    pub fragmented: bool,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// The IPv6 header's hop limit.
    pub hop_limit: u8,
}

impl Default for Packet6 {
    fn default() -> Self {
        Self {
            tuple: CtKeyV6::default(),
            l4_off: 0,
            frag_id: 0,
            inner_l4_off: 0,
            kind: Kind::Transport,
            fragmented: false,
            tcp_flags: 0,
            hop_limit: 0,
        }
    }
}

impl Packet6 {
    /// Offset of the TCP/UDP checksum (SCTP has none of this kind: [`crate::sctp`]).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.tuple.proto == proto::TCP {
            self.l4_off + TCP_CSUM_OFF
        } else {
            self.l4_off + UDP_CSUM_OFF
        }
    }
}

/// The same flow seen from the other side.
#[inline(always)]
pub fn reversed(tuple: &CtKeyV6) -> CtKeyV6 {
    CtKeyV6 {
        src_addr: tuple.dst_addr,
        dst_addr: tuple.src_addr,
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        proto: tuple.proto,
        _pad: [0; 3],
    }
}

/// Whether the frame is IPv6 by its ethertype: the entry points' dispatch, which every
/// IPv4 packet pays too, so a direct read (the IPv4 parse reads the same bytes again)
/// compared with a constant in network order.
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return false;
    }
    // SAFETY: the Ethernet header is inside the linear data (checked above).
    let ether_type = unsafe { core::ptr::read_unaligned((start + 12) as *const u16) };
    ether_type == ETH_P_IPV6.to_be()
}

/// Parses an IPv6 TCP/UDP frame into `pkt` (a [`Packet6::default`]). `false` means
/// "not ours" (see the module comment): the kernel judges such packets itself.
///
/// Each IPv6 stage is a function of its own (a BPF-to-BPF call) that returns a scalar
/// and writes into its caller's memory: the verifier limits the stack of a whole call
/// chain to 512 bytes, and inlined into one frame the stages' 40-byte keys and 64-byte
/// entries do not fit beside each other, while siblings share the space. For the same
/// reason the addresses are read straight into `pkt`, never into a header copy.
#[inline(never)]
pub fn parse(skb: *mut __sk_buff, pkt: &mut Packet6) -> bool {
    ipv6(&TcContext::new(skb), pkt).is_some()
}

/// The `T` at `offset`: read in place where the linear data holds it (the common
/// packet), else copied out by `bpf_skb_load_bytes`, which reads wherever it sits.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    match ptr_at::<T>(ctx, offset) {
        // SAFETY: ptr_at checked the bounds; packet data has no alignment.
        Some(ptr) => Some(unsafe { core::ptr::read_unaligned(ptr) }),
        None => ctx.load(offset).ok(),
    }
}

/// [`read`] into `dst`, with no copy on this frame's stack on either path.
#[inline(always)]
fn read_into<T: Copy>(ctx: &TcContext, offset: usize, dst: &mut T) -> Option<()> {
    if let Some(ptr) = ptr_at::<T>(ctx, offset) {
        // SAFETY: ptr_at checked the bounds; packet data has no alignment.
        *dst = unsafe { core::ptr::read_unaligned(ptr) };
        return Some(());
    }
    // SAFETY: `dst` is valid for `size_of::<T>()` bytes, and any bytes are a valid
    // `T` here (the callers' types are plain integers).
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            (dst as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    (loaded == 0).then_some(())
}

/// The first 8 bytes of an IPv6 header: version (the top nibble of the first byte),
/// next header, hop limit.
#[inline(always)]
fn fixed_start(ctx: &TcContext, offset: usize) -> Option<(u8, u8)> {
    let [version_tc, _, _, _, _, _, next_header, hop_limit]: [u8; 8] = read(ctx, offset)?;
    (version_tc >> 4 == 6).then_some((next_header, hop_limit))
}

/// Where an extension-header walk ended: the next header that is not one the walk
/// follows (or, after a later fragment's header, the fragment's protocol) and its
/// offset, and the fragment header met on the way.
#[derive(Clone, Copy)]
struct Walked {
    next: u8,
    off: usize,
    fragment: Fragment,
    frag_id: u32,
}

/// The fragment header a walk met.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fragment {
    None,
    First,
    /// A non-first fragment: what follows its header is the datagram's data.
    Later,
}

/// Walks the extension headers from `next` at `off` (see the module comment).
/// `None`: a header that cannot be read, a routing header with segments left, or a
/// chain longer than [`MAX_EXT_HEADERS`] (both counted).
#[inline(always)]
fn walk(ctx: &TcContext, mut next: u8, start: usize) -> Option<Walked> {
    let mut off = start;
    let mut fragment = Fragment::None;
    let mut frag_id = 0;
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_DEST => {
                // Next header, then the length in 8-byte units not counting the first.
                let [following, len]: [u8; 2] = read(ctx, off)?;
                next = following;
                off += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_ROUTING => {
                // Next header, length, routing type, segments left.
                let [following, len, _, segments_left]: [u8; 4] = read(ctx, off)?;
                if segments_left != 0 {
                    crate::stats::count(counter::IPV6_EXT_HEADERS_PASSED);
                    return None;
                }
                next = following;
                off += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                // Next header, reserved, offset and flags, then the identification.
                let [following, _, high, low, id0, id1, id2, id3]: [u8; 8] = read(ctx, off)?;
                next = following;
                off += FRAG_HLEN;
                frag_id = u32::from_ne_bytes([id0, id1, id2, id3]);
                if u16::from_be_bytes([high, low]) & FRAG_OFFSET_MASK != 0 {
                    // The rest is the datagram's data, not headers.
                    fragment = Fragment::Later;
                    break;
                }
                fragment = Fragment::First;
            }
            _ => break,
        }
        walked += 1;
    }
    let ext_len = off - start;
    if ext_len > MAX_EXT_LEN
        || (fragment != Fragment::Later
            && matches!(
                next,
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST
            ))
    {
        crate::stats::count(counter::IPV6_EXT_HEADERS_PASSED);
        return None;
    }
    // The same value (extension headers come in 8-byte units, at most
    // `MAX_EXT_LEN`), in a form the verifier sees as one range whatever the chain: were
    // each chain's offset a range of its own, every later stage would be verified once
    // per chain, which took the node-facing program to the kernel's limit of a million
    // instructions verified.
    let off = start + (ext_len & MAX_EXT_LEN);
    Some(Walked {
        next,
        off,
        fragment,
        frag_id,
    })
}

#[inline(always)]
fn ipv6(ctx: &TcContext, pkt: &mut Packet6) -> Option<()> {
    let (next_header, hop_limit) = fixed_start(ctx, ETH_HLEN)?;
    read_into(ctx, ETH_HLEN + IPV6_SRC_OFF, &mut pkt.tuple.src_addr)?;
    read_into(ctx, ETH_HLEN + IPV6_DST_OFF, &mut pkt.tuple.dst_addr)?;
    let walked = walk(ctx, next_header, ETH_HLEN + IPV6_HLEN)?;
    pkt.tuple.proto = walked.next;
    pkt.l4_off = walked.off;
    pkt.frag_id = walked.frag_id;
    pkt.fragmented = walked.fragment != Fragment::None;
    pkt.hop_limit = hop_limit;
    match walked.next {
        proto::TCP | proto::UDP if walked.fragment == Fragment::Later => {
            pkt.kind = Kind::LaterFragment;
        }
        // Any fragment of SCTP: passed untouched, as in [`crate::parse`].
        proto::SCTP if walked.fragment != Fragment::None => return None,
        proto::TCP | proto::UDP | proto::SCTP => {
            let ports: [Be16; 2] = read(ctx, walked.off + L4_SRC_PORT_OFF)?;
            pkt.tuple.src_port = ports[0];
            pkt.tuple.dst_port = ports[1];
            if walked.next == proto::TCP {
                let [doff, flags]: [u8; 2] = read(ctx, walked.off + TCP_DOFF_OFF)?;
                if doff >> 4 < 5 {
                    return None;
                }
                pkt.tcp_flags = flags;
            }
        }
        proto::ICMPV6 if walked.fragment == Fragment::None => icmp_error(ctx, pkt)?,
        _ => return None,
    }
    Some(())
}

/// Recognises an ICMPv6 error (RFC 4443 section 3: destination unreachable, packet too
/// big, time exceeded, parameter problem) quoting the start of a TCP/UDP packet, and
/// makes its key the reversed quoted tuple (as [`crate::parse`] does for ICMP).
/// Informational messages (echo, neighbour discovery, router advertisements, MLD) are
/// not: `None`, and they pass untouched. The quoted packet's extension headers are
/// walked as the outer ones; a quoted later fragment has no ports to match a flow by.
#[inline(always)]
fn icmp_error(ctx: &TcContext, pkt: &mut Packet6) -> Option<()> {
    // Type and code: a one-byte read at a variable offset gets a bounds check the
    // verifier does not follow (`start + off >= end`), two bytes do not.
    let [icmp_type, _code]: [u8; 2] = read(ctx, pkt.l4_off)?;
    if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROB).contains(&icmp_type) {
        return None;
    }
    let inner_ip_off = pkt.l4_off + ICMPV6_HLEN;
    let (inner_next, _) = fixed_start(ctx, inner_ip_off)?;
    let walked = walk(ctx, inner_next, inner_ip_off + IPV6_HLEN)?;
    if walked.fragment == Fragment::Later
        || !matches!(walked.next, proto::TCP | proto::UDP | proto::SCTP)
    {
        return None;
    }
    let [quoted_src_port, quoted_dst_port]: [Be16; 2] = read(ctx, walked.off + L4_SRC_PORT_OFF)?;
    // The key is the quoted tuple reversed: its source is the key's destination. The
    // outer addresses this overwrites stay in the header, where the rewrite reads them.
    read_into(ctx, inner_ip_off + IPV6_SRC_OFF, &mut pkt.tuple.dst_addr)?;
    read_into(ctx, inner_ip_off + IPV6_DST_OFF, &mut pkt.tuple.src_addr)?;
    pkt.tuple.src_port = quoted_dst_port;
    pkt.tuple.dst_port = quoted_src_port;
    pkt.tuple.proto = walked.next;
    pkt.kind = Kind::IcmpError;
    // The walk is bounded well below 64 KiB.
    pkt.inner_l4_off = walked.off as u16;
    Some(())
}
