//! Header parsing: Ethernet, IPv4, TCP/UDP. Produces offsets and the 5-tuple; never
//! keeps pointers, because every helper that writes the packet invalidates them.
use aya_ebpf::programs::TcContext;
use proxy_common::{proto, Be16, Be32, CtKeyV4};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// Offsets inside the TCP/UDP header.
pub const L4_SRC_PORT_OFF: usize = 0;
pub const L4_DST_PORT_OFF: usize = 2;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// What the datapath needs to know about an IPv4 TCP/UDP packet.
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    /// The packet's 5-tuple, directly usable as a conntrack key.
    pub tuple: CtKeyV4,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// IPv4 header length in bytes.
    pub ip_hlen: usize,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Non-first fragment: no L4 header, the ports in `tuple` are zero.
    pub is_later_fragment: bool,
}

impl Ipv4Packet {
    /// Offset of the L4 checksum.
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
struct Ports {
    src: u16,
    dst: u16,
}

/// Pointer to a `T` at `offset` if the packet's linear data holds it.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Parses an IPv4 TCP/UDP frame. `None` means "not ours": another protocol, or a
/// header that does not fit (the kernel will judge such packets itself).
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Option<Ipv4Packet> {
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
    let (version_ihl, protocol, frag_off, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let ip_hlen = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ip_hlen < 20 {
        return None;
    }
    if protocol != proto::TCP && protocol != proto::UDP {
        return None;
    }
    let mut tuple = CtKeyV4 {
        src_addr: Be32(saddr),
        dst_addr: Be32(daddr),
        src_port: Be16(0),
        dst_port: Be16(0),
        proto: protocol,
        _pad: [0; 3],
    };
    let l4_off = ETH_HLEN + ip_hlen;
    // Fragment offset bits: anything but the first fragment carries no L4 header.
    if frag_off & 0x1fff != 0 {
        return Some(Ipv4Packet {
            tuple,
            l4_off,
            ip_hlen,
            tcp_flags: 0,
            is_later_fragment: true,
        });
    }
    let ports = ptr_at::<Ports>(ctx, l4_off)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        tuple.src_port = Be16((*ports).src);
        tuple.dst_port = Be16((*ports).dst);
    }
    let tcp_flags = if protocol == proto::TCP {
        // SAFETY: ptr_at checks the bounds of the flags byte.
        unsafe { *ptr_at::<u8>(ctx, l4_off + TCP_FLAGS_OFF)? }
    } else {
        0
    };
    Some(Ipv4Packet {
        tuple,
        l4_off,
        ip_hlen,
        tcp_flags,
        is_later_fragment: false,
    })
}
