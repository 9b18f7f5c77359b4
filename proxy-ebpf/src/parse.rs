//! Header parsing: Ethernet, IPv4, TCP/UDP/SCTP, and ICMP errors that quote a
//! TCP/UDP/SCTP packet. Produces offsets and the conntrack key; never keeps pointers,
//! because every helper that writes the packet invalidates them.
//!
//! SCTP's ports sit where UDP's do (RFC 9260 section 3.1), and the rest of the datapath
//! treats it as UDP except for its checksum ([`crate::sctp`]). SCTP over IP fragments
//! is passed untouched: its CRC32c covers the whole SCTP packet, so a port change
//! cannot be applied to a first fragment without the datagram's length, which only
//! the last fragment tells. SCTP sizes its packets to the path MTU itself (RFC 9260
//! section 6.9), so it fragments at the IP layer only where PMTU discovery fails.
use aya_ebpf::programs::TcContext;
use proxy_common::{proto, Be16, Be32, CtKeyV4};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header.
pub const IP_TTL_OFF: usize = 8;
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// IPv4 flags and fragment offset (host order of the 16-bit field).
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
/// Offsets inside the TCP/UDP header.
pub const L4_SRC_PORT_OFF: usize = 0;
pub const L4_DST_PORT_OFF: usize = 2;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
const TCP_DOFF_OFF: usize = 12;
const TCP_FLAGS_OFF: usize = 13;
/// The ICMP header: type, code, checksum, 4 bytes that depend on the type; an error's
/// quoted packet follows it.
pub const ICMP_HLEN: usize = 8;
pub const ICMP_CSUM_OFF: usize = 2;

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// ICMP error types that refer to a packet of a flow (RFC 792): the only ICMP messages
/// related to a translated flow. Echo and the rest are left alone.
pub mod icmp_type {
    pub const DEST_UNREACH: u8 = 3;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// What kind of packet it is, which decides what may be rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP/UDP/SCTP packet with its L4 header: unfragmented, or (TCP/UDP) a
    /// datagram's first fragment.
    Transport,
    /// A non-first fragment: no L4 header. Its tuple's ports are zero until the
    /// fragment map supplies the first fragment's ([`crate::fragments`]).
    LaterFragment,
    /// An ICMP error quoting a TCP/UDP packet ([`crate::icmp_error`]).
    IcmpError,
}

/// What the datapath needs to know about an IPv4 packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// The conntrack key. For TCP/UDP, the packet's 5-tuple. For an ICMP error, the
    /// quoted packet's tuple reversed: the quoted packet went the opposite way to the
    /// error, so this is the key of the flow entry for the error's own direction.
    pub tuple: CtKeyV4,
    pub kind: Kind,
    /// The IP header's own addresses (for an ICMP error they may differ from the
    /// tuple's: a router on the path sends errors from its own address).
    pub ip_src: Be32,
    pub ip_dst: Be32,
    /// IPv4 header length in bytes.
    pub ip_hlen: usize,
    /// Offset of the L4 (TCP, UDP or ICMP) header from the start of the frame.
    pub l4_off: usize,
    /// IPv4 total length.
    pub tot_len: u16,
    /// IPv4 identification, as in the header (network order).
    pub ip_id: u16,
    /// Flags and fragment offset, host order.
    pub frag_field: u16,
    pub ttl: u8,
    /// TCP flags (0 for UDP and ICMP).
    pub tcp_flags: u8,
    /// TCP header length in bytes (0 for UDP and ICMP).
    pub tcp_hlen: u8,
    /// For an ICMP error: offset of the quoted IPv4 header and of its L4 header.
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
}

impl Packet {
    /// Offset of the TCP/UDP checksum (SCTP has none of this kind: [`crate::sctp`]).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.tuple.proto == proto::TCP {
            self.l4_off + TCP_CSUM_OFF
        } else {
            self.l4_off + UDP_CSUM_OFF
        }
    }

    /// Don't Fragment is set: a router must answer "fragmentation needed" instead of
    /// fragmenting.
    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        self.frag_field & IP_DF != 0
    }

    /// The first fragment of a fragmented datagram (it carries the ports the later
    /// ones lack).
    #[inline(always)]
    pub fn is_first_fragment(&self) -> bool {
        self.frag_field & (IP_MF | IP_OFFSET_MASK) == IP_MF
    }
}

/// The same flow seen from the other side.
#[inline(always)]
pub fn reversed(tuple: &CtKeyV4) -> CtKeyV4 {
    CtKeyV4 {
        src_addr: tuple.dst_addr,
        dst_addr: tuple.src_addr,
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        proto: tuple.proto,
        _pad: [0; 3],
    }
}

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    src: u16,
    dst: u16,
}

/// Pointer to a `T` at `offset` if the packet's linear data holds it.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Parses an IPv4 TCP/UDP/SCTP frame, or an ICMP error quoting one. `None` means "not
/// ours": another protocol, or a header that does not fit (the kernel will judge such
/// packets itself).
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Option<Packet> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip = match ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) {
        Some(ip) => ip,
        None => {
            // Headers may sit in a non-linear part (GRO); pull them once.
            ctx.pull_data((ETH_HLEN + 60 + 20) as u32).ok()?;
            ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?
        }
    };
    // SAFETY: ptr_at checked the bounds.
    let header = unsafe { *ip };
    let ip_hlen = usize::from(header.version_ihl & 0x0f) * 4;
    if header.version_ihl >> 4 != 4 || ip_hlen < 20 {
        return None;
    }
    let frag_field = u16::from_be(header.frag_off);
    let mut pkt = Packet {
        tuple: CtKeyV4 {
            src_addr: Be32(header.saddr),
            dst_addr: Be32(header.daddr),
            src_port: Be16(0),
            dst_port: Be16(0),
            proto: header.protocol,
            _pad: [0; 3],
        },
        kind: Kind::Transport,
        ip_src: Be32(header.saddr),
        ip_dst: Be32(header.daddr),
        ip_hlen,
        l4_off: ETH_HLEN + ip_hlen,
        tot_len: u16::from_be(header.tot_len),
        ip_id: header.id,
        frag_field,
        ttl: header.ttl,
        tcp_flags: 0,
        tcp_hlen: 0,
        inner_ip_off: 0,
        inner_l4_off: 0,
    };
    let later_fragment = frag_field & IP_OFFSET_MASK != 0;
    match header.protocol {
        proto::TCP | proto::UDP if later_fragment => {
            pkt.kind = Kind::LaterFragment;
            Some(pkt)
        }
        // Any fragment of SCTP (see the module comment).
        proto::SCTP if later_fragment || frag_field & IP_MF != 0 => None,
        proto::TCP | proto::UDP | proto::SCTP => {
            transport(ctx, &mut pkt)?;
            Some(pkt)
        }
        proto::ICMP if !later_fragment => {
            icmp_error(ctx, &mut pkt)?;
            Some(pkt)
        }
        _ => None,
    }
}

/// Reads the ports (and TCP flags) of a packet that has its L4 header.
#[inline(always)]
fn transport(ctx: &TcContext, pkt: &mut Packet) -> Option<()> {
    let ports = ptr_at::<Ports>(ctx, pkt.l4_off)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        pkt.tuple.src_port = Be16((*ports).src);
        pkt.tuple.dst_port = Be16((*ports).dst);
    }
    if pkt.tuple.proto == proto::TCP {
        // SAFETY: ptr_at checks the bounds of each byte.
        unsafe {
            pkt.tcp_flags = *ptr_at::<u8>(ctx, pkt.l4_off + TCP_FLAGS_OFF)?;
            pkt.tcp_hlen = (*ptr_at::<u8>(ctx, pkt.l4_off + TCP_DOFF_OFF)? >> 4) * 4;
        }
    }
    Some(())
}

/// Recognises an ICMP error that quotes the start of a TCP/UDP/SCTP packet (RFC 792: the IP
/// header and at least 8 bytes of its payload, which hold the ports) and makes its key
/// the reversed quoted tuple. The quoted bytes are read with `bpf_skb_load_bytes`,
/// which works wherever they sit in the buffer.
#[inline(always)]
fn icmp_error(ctx: &TcContext, pkt: &mut Packet) -> Option<()> {
    let icmp_type: u8 = ctx.load(pkt.l4_off).ok()?;
    if !matches!(
        icmp_type,
        icmp_type::DEST_UNREACH | icmp_type::TIME_EXCEEDED | icmp_type::PARAMETER_PROBLEM
    ) {
        return None;
    }
    let inner_ip_off = pkt.l4_off + ICMP_HLEN;
    let inner: Ipv4Hdr = ctx.load(inner_ip_off).ok()?;
    let inner_hlen = usize::from(inner.version_ihl & 0x0f) * 4;
    if inner.version_ihl >> 4 != 4 || inner_hlen < 20 {
        return None;
    }
    if !matches!(inner.protocol, proto::TCP | proto::UDP | proto::SCTP) {
        return None;
    }
    // A quoted later fragment has no ports to match a flow by.
    if u16::from_be(inner.frag_off) & IP_OFFSET_MASK != 0 {
        return None;
    }
    let inner_l4_off = inner_ip_off + inner_hlen;
    let ports: Ports = ctx.load(inner_l4_off).ok()?;
    pkt.tuple = reversed(&CtKeyV4 {
        src_addr: Be32(inner.saddr),
        dst_addr: Be32(inner.daddr),
        src_port: Be16(ports.src),
        dst_port: Be16(ports.dst),
        proto: inner.protocol,
        _pad: [0; 3],
    });
    pkt.kind = Kind::IcmpError;
    pkt.inner_ip_off = inner_ip_off;
    pkt.inner_l4_off = inner_l4_off;
    Some(())
}
