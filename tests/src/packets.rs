//! Crafted frames for datapath tests, built with etherparse so checksums come from an
//! implementation independent of the one under test. etherparse has no SCTP: SCTP
//! packets are laid out here (RFC 9260 section 3) and their CRC32c computed by the
//! `crc` crate.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use etherparse::{
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
    icmpv6::{DestUnreachableCode, TimeExceededCode as TimeExceededCode6},
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpNumber,
    Ipv4Header, Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const ETH_HLEN: usize = 14;

/// TCP flags of a crafted segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    pub const SYN: Self = Self {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    pub const SYN_ACK: Self = Self {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
    };
    pub const ACK: Self = Self {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    pub const FIN_ACK: Self = Self {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
    };
}

/// The chunk a crafted SCTP packet carries (RFC 9260 section 3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SctpChunk {
    /// INIT: the association's first packet, verification tag 0.
    Init,
    /// INIT ACK with a state cookie.
    InitAck,
    /// DATA carrying the frame's payload.
    Data,
}

/// The checksum field of a crafted SCTP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SctpCrc {
    /// The packet's CRC32c.
    Valid,
    /// The CRC32c with every bit flipped: a corrupted packet.
    Corrupt,
    /// 0: the CRC is still to be computed by offload (CHECKSUM_PARTIAL), as Linux hands
    /// over the packets of its own SCTP sockets on a device with SCTP CRC offload.
    Offload,
    /// Exactly this field (read little-endian): a quoted packet whose CRC belongs to
    /// another packet (the one before translation).
    Field(u32),
}

/// The verification tag of every crafted SCTP packet but an INIT's.
pub const SCTP_VTAG: u32 = 0x5c7f_0a11;

/// CRC32c of `bytes` (RFC 9260 appendix A) by the `crc` crate, the datapath's
/// independent reference.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(bytes)
}

/// The checksum field of the SCTP packet in an IPv4 `frame` (Ethernet first, no IP
/// options), read as it is stored (little-endian).
#[must_use]
pub fn sctp_field(frame: &[u8]) -> u32 {
    let start = ETH_HLEN + 20 + 8;
    u32::from_le_bytes(frame[start..start + 4].try_into().expect("4 bytes"))
}

/// Whether the SCTP packet `sctp` (common header first) carries its right CRC32c.
#[must_use]
pub fn sctp_crc_is_valid(sctp: &[u8]) -> bool {
    let Some(field) = sctp.get(8..12) else {
        return false;
    };
    let field = u32::from_le_bytes(field.try_into().expect("4 bytes"));
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    field == crc32c(&zeroed)
}

/// An SCTP packet from `src_port` to `dst_port`: the common header and one chunk, its
/// checksum as `crc` says (the CRC covers the packet with the field zeroed, and sits in
/// it little-endian, as Linux writes it).
#[must_use]
pub fn sctp_packet(
    src_port: u16,
    dst_port: u16,
    chunk: SctpChunk,
    crc: SctpCrc,
    payload: &[u8],
) -> Vec<u8> {
    let vtag = if chunk == SctpChunk::Init {
        0
    } else {
        SCTP_VTAG
    };
    let mut out = Vec::new();
    out.extend_from_slice(&src_port.to_be_bytes());
    out.extend_from_slice(&dst_port.to_be_bytes());
    out.extend_from_slice(&vtag.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    let init = |chunk_type: u8, params: &[u8]| {
        // Type, flags, length; initiate tag, a_rwnd, streams out and in, initial TSN.
        let len = u16::try_from(20 + params.len()).expect("small chunk");
        let mut bytes = vec![chunk_type, 0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&0x0a0b_0c0d_u32.to_be_bytes());
        bytes.extend_from_slice(&106_496_u32.to_be_bytes());
        bytes.extend_from_slice(&[0, 10, 0, 10]);
        bytes.extend_from_slice(&0x0000_1000_u32.to_be_bytes());
        bytes.extend_from_slice(params);
        bytes
    };
    match chunk {
        SctpChunk::Init => out.extend(init(1, &[])),
        // A state cookie parameter (type 7) of 8 bytes.
        SctpChunk::InitAck => out.extend(init(2, &[0, 7, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8])),
        SctpChunk::Data => {
            // Type 0, flags B|E, length; TSN, stream 0, sequence 0, PPID 0; the user
            // data padded to 4 bytes (the length does not count the padding).
            let len = u16::try_from(16 + payload.len()).expect("small chunk");
            out.extend_from_slice(&[0, 3]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&0x0000_1000_u32.to_be_bytes());
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(payload);
            out.resize(out.len().next_multiple_of(4), 0);
        }
    }
    let field = match crc {
        SctpCrc::Valid => crc32c(&out),
        SctpCrc::Corrupt => !crc32c(&out),
        SctpCrc::Offload => 0,
        SctpCrc::Field(field) => field,
    };
    out[8..12].copy_from_slice(&field.to_le_bytes());
    out
}

/// An ICMP error message (RFC 792).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    PortUnreachable,
    FragNeeded { mtu: u16 },
    TimeExceeded,
}

impl IcmpError {
    fn icmp_type(self) -> Icmpv4Type {
        match self {
            Self::PortUnreachable => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
            }
            Self::FragNeeded { mtu } => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu,
                })
            }
            Self::TimeExceeded => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
        }
    }
}

/// The transport of a crafted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp(TcpFlags),
    /// UDP; `checksum: false` sends checksum 0 ("none", legal for IPv4).
    Udp {
        checksum: bool,
    },
    /// SCTP with one chunk; the frame's payload is a DATA chunk's user data.
    Sctp {
        chunk: SctpChunk,
        crc: SctpCrc,
    },
    /// An ICMP error quoting the first `quote` bytes of the IP packet in
    /// [`Frame::quoted`] (its header and at least 8 bytes after it).
    Icmp {
        error: IcmpError,
        quote: usize,
    },
}

/// Which part of a datagram a frame carries, when it is an IPv4 fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Offset in the datagram's IP payload, in 8-byte units.
    pub offset: u16,
    /// Bytes of IP payload this fragment carries (a multiple of 8 unless it is last).
    pub len: usize,
    /// More fragments follow.
    pub more: bool,
}

/// An Ethernet + IPv4 + TCP/UDP/ICMP-error frame, described by its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Source and destination; ICMP frames ignore the ports.
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub transport: Transport,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub ip_id: u16,
    /// DF: set on every unfragmented TCP/UDP frame, as Linux sends them.
    pub dont_fragment: bool,
    /// The part of the datagram this frame carries (`None`: all of it).
    pub fragment: Option<Fragment>,
    /// For [`Transport::Icmp`]: the packet the error is about.
    pub quoted: Option<Box<Frame>>,
}

impl Frame {
    /// A TCP segment from `src` to `dst`.
    #[must_use]
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: TcpFlags) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src,
            dst,
            transport: Transport::Tcp(flags),
            payload: Vec::new(),
            ..Self::blank()
        }
    }

    fn blank() -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            dst: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            transport: Transport::Udp { checksum: true },
            payload: Vec::new(),
            ttl: 64,
            ip_id: 0x1234,
            dont_fragment: true,
            fragment: None,
            quoted: None,
        }
    }

    /// The ICMP error `from` sends to the sender of `about`, quoting its first `quote`
    /// bytes (28: the IP header and 8 bytes, RFC 792's minimum; Linux quotes up to 576).
    #[must_use]
    pub fn icmp_error(from: Ipv4Addr, about: &Frame, error: IcmpError, quote: usize) -> Self {
        Self {
            src_mac: about.dst_mac,
            dst_mac: about.src_mac,
            src: SocketAddrV4::new(from, 0),
            dst: SocketAddrV4::new(*about.src.ip(), 0),
            transport: Transport::Icmp { error, quote },
            // Linux sends its own ICMP errors without DF.
            dont_fragment: false,
            quoted: Some(Box::new(about.clone())),
            ..Self::blank()
        }
    }

    /// The same error quoting another packet (the one the receiver really sent, after
    /// translation), from another address.
    #[must_use]
    pub fn with_quoted(mut self, from: Ipv4Addr, about: &Frame) -> Self {
        self.src = SocketAddrV4::new(from, 0);
        self.dst = SocketAddrV4::new(*about.src.ip(), 0);
        self.quoted = Some(Box::new(about.clone()));
        self
    }

    /// This datagram's part `fragment`.
    #[must_use]
    pub fn fragment(mut self, fragment: Fragment) -> Self {
        self.fragment = Some(fragment);
        self.dont_fragment = false;
        self
    }

    /// The same frame with another TTL.
    #[must_use]
    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// An SCTP packet from `src` to `dst` with a valid CRC32c.
    #[must_use]
    pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4, chunk: SctpChunk) -> Self {
        Self {
            src,
            dst,
            transport: Transport::Sctp {
                chunk,
                crc: SctpCrc::Valid,
            },
            ..Self::blank()
        }
    }

    /// A UDP datagram from `src` to `dst` with `payload`.
    #[must_use]
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src,
            dst,
            transport: Transport::Udp { checksum: true },
            payload: payload.to_vec(),
            ..Self::blank()
        }
    }

    /// The same frame with another source.
    #[must_use]
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.src = src;
        self
    }

    /// The same frame with another destination.
    #[must_use]
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
        self.dst = dst;
        self
    }

    /// The frame a peer would answer with (addresses and MACs swapped).
    #[must_use]
    pub fn reply(&self, transport: Transport) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            transport,
            ..Self::blank()
        }
    }

    fn ip_header(&self, protocol: IpNumber, payload_len: usize) -> Ipv4Header {
        let mut ip = Ipv4Header::new(
            u16::try_from(payload_len).expect("small test packet"),
            self.ttl,
            protocol,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .expect("valid IPv4 header");
        ip.identification = self.ip_id;
        ip.dont_fragment = self.dont_fragment;
        ip.header_checksum = ip.calc_header_checksum();
        ip
    }

    /// The IP header and payload of the whole datagram (every checksum computed).
    fn datagram(&self) -> (Ipv4Header, Vec<u8>) {
        let mut l4 = Vec::new();
        let ip = match self.transport {
            Transport::Tcp(flags) => {
                let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), 1000, 64_240);
                tcp.syn = flags.syn;
                tcp.ack = flags.ack;
                tcp.fin = flags.fin;
                tcp.rst = flags.rst;
                if flags.ack {
                    tcp.acknowledgment_number = 2000;
                }
                let ip = self.ip_header(IpNumber::TCP, tcp.header_len() + self.payload.len());
                tcp.checksum = tcp
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("small payload");
                tcp.write(&mut l4).expect("write to Vec");
                l4.extend_from_slice(&self.payload);
                ip
            }
            Transport::Udp { checksum } => {
                let mut udp = UdpHeader::without_ipv4_checksum(
                    self.src.port(),
                    self.dst.port(),
                    self.payload.len(),
                )
                .expect("small payload");
                let ip = self.ip_header(IpNumber::UDP, UdpHeader::LEN + self.payload.len());
                if checksum {
                    udp.checksum = udp
                        .calc_checksum_ipv4(&ip, &self.payload)
                        .expect("small payload");
                }
                udp.write(&mut l4).expect("write to Vec");
                l4.extend_from_slice(&self.payload);
                ip
            }
            Transport::Sctp { chunk, crc } => {
                l4 = sctp_packet(self.src.port(), self.dst.port(), chunk, crc, &self.payload);
                self.ip_header(IpNumber::SCTP, l4.len())
            }
            Transport::Icmp { error, quote } => {
                let quoted = self
                    .quoted
                    .as_ref()
                    .expect("an ICMP error frame names the packet it quotes")
                    .to_bytes();
                let quoted = &quoted[ETH_HLEN..(ETH_HLEN + quote).min(quoted.len())];
                let icmp = Icmpv4Header::with_checksum(error.icmp_type(), quoted);
                let ip = self.ip_header(IpNumber::ICMP, icmp.header_len() + quoted.len());
                icmp.write(&mut l4).expect("write to Vec");
                l4.extend_from_slice(quoted);
                ip
            }
        };
        (ip, l4)
    }

    /// The frame's bytes, every checksum computed. A fragment carries its part of the
    /// datagram's IP payload (whose L4 checksum covers the whole datagram).
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: EtherType::IPV4,
        }
        .write(&mut out)
        .expect("write to Vec");
        let (mut ip, payload) = self.datagram();
        let payload = match self.fragment {
            None => payload,
            Some(fragment) => {
                let start = usize::from(fragment.offset) * 8;
                let part = payload[start..start + fragment.len].to_vec();
                ip.fragment_offset = fragment.offset.try_into().expect("13-bit offset");
                ip.more_fragments = fragment.more;
                ip.set_payload_len(part.len()).expect("small fragment");
                ip.header_checksum = ip.calc_header_checksum();
                part
            }
        };
        ip.write(&mut out).expect("write to Vec");
        out.extend_from_slice(&payload);
        out
    }
}

/// The ICMP port unreachable a frontend without endpoints answers `original` with, as
/// kube-proxy's REJECT does (see [`icmp_reply`]).
#[must_use]
pub fn port_unreachable_reply(original: &Frame) -> Vec<u8> {
    icmp_reply(original, IcmpError::PortUnreachable)
}

/// The ICMP error the datapath answers `original` with: addressed back to the sender
/// from the address it sent to, quoting the original IP header and the first 8 bytes
/// after it (RFC 792), marked CS6 as the kernel marks its own errors.
#[must_use]
pub fn icmp_reply(original: &Frame, error: IcmpError) -> Vec<u8> {
    let bytes = original.to_bytes();
    let quoted = &bytes[ETH_HLEN..ETH_HLEN + 28];
    let icmp = Icmpv4Header::with_checksum(error.icmp_type(), quoted);
    let mut ip = Ipv4Header::new(
        u16::try_from(icmp.header_len() + quoted.len()).expect("small"),
        64,
        IpNumber::ICMP,
        original.dst.ip().octets(),
        original.src.ip().octets(),
    )
    .expect("valid IPv4 header");
    ip.dscp = etherparse::IpDscp::try_new(0x30).expect("CS6");
    ip.identification = 0;
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    Ethernet2Header {
        source: original.dst_mac,
        destination: original.src_mac,
        ether_type: EtherType::IPV4,
    }
    .write(&mut out)
    .expect("write to Vec");
    ip.write(&mut out).expect("write to Vec");
    icmp.write(&mut out).expect("write to Vec");
    out.extend_from_slice(quoted);
    out
}

/// `a.b.c.d:port` shorthand for tables.
#[must_use]
pub fn sock(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port)
}

/// An IPv6 extension header of a crafted frame (RFC 8200 section 4), each 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext6 {
    /// Hop-by-hop options: one PadN option.
    HopByHop,
    /// Destination options: one PadN option.
    DestOpts,
    /// Destination options of `units` 8-byte units (one PadN option filling them).
    LongDestOpts { units: u8 },
    /// A routing header of an unassigned type with `segments_left` (0: the destination
    /// is final and the header is ignored, RFC 8200 section 4.4).
    Routing { segments_left: u8 },
    /// A fragment header; the frame carries `len` bytes (all the rest: `None`) of the
    /// datagram's fragmentable part from byte `offset * 8`.
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
        len: Option<usize>,
    },
}

impl Ext6 {
    fn number(self) -> u8 {
        match self {
            Self::HopByHop => 0,
            Self::Routing { .. } => 43,
            Self::Fragment { .. } => 44,
            Self::DestOpts | Self::LongDestOpts { .. } => 60,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // Next header, length 0 (8 bytes), PadN of 4 zero bytes.
            Self::HopByHop | Self::DestOpts => vec![next, 0, 1, 4, 0, 0, 0, 0],
            // Next header, length in units after the first, PadN of the rest.
            Self::LongDestOpts { units } => {
                let len = usize::from(units) * 8;
                let mut bytes = vec![next, units - 1, 1, u8::try_from(len - 4).expect("< 256")];
                bytes.resize(len, 0);
                bytes
            }
            // Next header, length 0, type 253 (RFC 4727's experiment), segments left.
            Self::Routing { segments_left } => vec![next, 0, 253, segments_left, 0, 0, 0, 0],
            Self::Fragment {
                offset, more, id, ..
            } => {
                let [a, b] = ((offset << 3) | u16::from(more)).to_be_bytes();
                let [c, d, e, f] = id.to_be_bytes();
                vec![next, 0, a, b, c, d, e, f]
            }
        }
    }

    /// Its length in bytes.
    fn len(self) -> usize {
        match self {
            Self::LongDestOpts { units } => usize::from(units) * 8,
            _ => 8,
        }
    }
}

/// An ICMPv6 error message (RFC 4443 section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Icmp6Error {
    PortUnreachable,
    PacketTooBig { mtu: u32 },
    HopLimitExceeded,
}

impl Icmp6Error {
    fn icmp_type(self) -> Icmpv6Type {
        match self {
            Self::PortUnreachable => Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
            Self::PacketTooBig { mtu } => Icmpv6Type::PacketTooBig { mtu },
            Self::HopLimitExceeded => Icmpv6Type::TimeExceeded(TimeExceededCode6::HopLimitExceeded),
        }
    }
}

/// The upper layer of a crafted IPv6 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport6 {
    Tcp(TcpFlags),
    Udp,
    /// SCTP with one chunk (see [`Transport::Sctp`]).
    Sctp {
        chunk: SctpChunk,
        crc: SctpCrc,
    },
    /// An ICMPv6 error quoting the first `quote` bytes of the IPv6 packet in
    /// [`Frame6::quoted`] (from its IPv6 header on); the ports are ignored.
    Icmp {
        error: Icmp6Error,
        quote: usize,
    },
    /// A neighbour solicitation (RFC 4861 section 4.3) for the destination's
    /// address, with the sender's link-layer address option; the ports are ignored.
    NeighbourSolicitation,
}

/// An Ethernet + IPv6 (+ extension headers) + TCP/UDP/ICMPv6 frame, described by its
/// fields; every checksum is computed by etherparse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub transport: Transport6,
    pub payload: Vec<u8>,
    pub hop_limit: u8,
    /// Extension headers in order, before the upper layer.
    pub ext: Vec<Ext6>,
    /// For [`Transport6::Icmp`]: the packet the error is about.
    pub quoted: Option<Box<Frame6>>,
}

impl Frame6 {
    /// A TCP segment from `src` to `dst`.
    #[must_use]
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: TcpFlags) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src,
            dst,
            transport: Transport6::Tcp(flags),
            payload: Vec::new(),
            hop_limit: 64,
            ext: Vec::new(),
            quoted: None,
        }
    }

    /// The ICMPv6 error `from` sends to the sender of `about`, quoting its first
    /// `quote` bytes (Linux quotes as much as fits in 1280 bytes: all of a small
    /// packet).
    #[must_use]
    pub fn icmp_error(from: Ipv6Addr, about: &Frame6, error: Icmp6Error, quote: usize) -> Self {
        Self {
            src_mac: about.dst_mac,
            dst_mac: about.src_mac,
            src: SocketAddrV6::new(from, 0, 0, 0),
            dst: SocketAddrV6::new(*about.src.ip(), 0, 0, 0),
            transport: Transport6::Icmp { error, quote },
            payload: Vec::new(),
            hop_limit: 64,
            ext: Vec::new(),
            quoted: Some(Box::new(about.clone())),
        }
    }

    /// The same error quoting another packet (the one its receiver really sent, after
    /// translation), from another address.
    #[must_use]
    pub fn with_quoted(mut self, from: Ipv6Addr, about: &Frame6) -> Self {
        self.src = SocketAddrV6::new(from, 0, 0, 0);
        self.dst = SocketAddrV6::new(*about.src.ip(), 0, 0, 0);
        self.quoted = Some(Box::new(about.clone()));
        self
    }

    /// A UDP datagram from `src` to `dst` with `payload`.
    #[must_use]
    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        Self {
            transport: Transport6::Udp,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, TcpFlags::SYN)
        }
    }

    /// An SCTP packet from `src` to `dst` with a valid CRC32c.
    #[must_use]
    pub fn sctp(src: SocketAddrV6, dst: SocketAddrV6, chunk: SctpChunk) -> Self {
        Self {
            transport: Transport6::Sctp {
                chunk,
                crc: SctpCrc::Valid,
            },
            ..Self::tcp(src, dst, TcpFlags::SYN)
        }
    }

    /// The same frame with these extension headers.
    #[must_use]
    pub fn with_ext(mut self, ext: &[Ext6]) -> Self {
        self.ext = ext.to_vec();
        self
    }

    /// The same frame with another destination.
    #[must_use]
    pub fn with_dst(mut self, dst: SocketAddrV6) -> Self {
        self.dst = dst;
        self
    }

    /// The same frame with another source.
    #[must_use]
    pub fn with_src(mut self, src: SocketAddrV6) -> Self {
        self.src = src;
        self
    }

    /// The frame a peer would answer with (addresses and MACs swapped).
    #[must_use]
    pub fn reply(&self, transport: Transport6) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            transport,
            payload: Vec::new(),
            hop_limit: 64,
            ext: Vec::new(),
            quoted: None,
        }
    }

    /// The upper-layer message of the whole datagram, checksum computed.
    fn upper_layer(&self) -> (u8, Vec<u8>) {
        let (src, dst) = (self.src.ip().octets(), self.dst.ip().octets());
        let mut out = Vec::new();
        match self.transport {
            Transport6::Tcp(flags) => {
                let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), 1000, 64_240);
                tcp.syn = flags.syn;
                tcp.ack = flags.ack;
                tcp.fin = flags.fin;
                tcp.rst = flags.rst;
                if flags.ack {
                    tcp.acknowledgment_number = 2000;
                }
                tcp.checksum = tcp
                    .calc_checksum_ipv6_raw(src, dst, &self.payload)
                    .expect("small payload");
                tcp.write(&mut out).expect("write to Vec");
                out.extend_from_slice(&self.payload);
                (6, out)
            }
            Transport6::Udp => {
                let mut udp = UdpHeader {
                    source_port: self.src.port(),
                    destination_port: self.dst.port(),
                    length: u16::try_from(UdpHeader::LEN + self.payload.len()).expect("small"),
                    checksum: 0,
                };
                udp.checksum = udp
                    .calc_checksum_ipv6_raw(src, dst, &self.payload)
                    .expect("small payload");
                udp.write(&mut out).expect("write to Vec");
                out.extend_from_slice(&self.payload);
                (17, out)
            }
            Transport6::Sctp { chunk, crc } => (
                132,
                sctp_packet(self.src.port(), self.dst.port(), chunk, crc, &self.payload),
            ),
            Transport6::NeighbourSolicitation => {
                // Reserved, target address, source link-layer address option.
                let mut body = vec![0u8; 4];
                body.extend_from_slice(&dst);
                body.extend_from_slice(&[1, 1]);
                body.extend_from_slice(&self.src_mac);
                let icmp = Icmpv6Header::with_checksum(
                    Icmpv6Type::NeighborSolicitation,
                    src,
                    dst,
                    &body[4..],
                )
                .expect("small");
                icmp.write(&mut out).expect("write to Vec");
                out.extend_from_slice(&body[4..]);
                (58, out)
            }
            Transport6::Icmp { error, quote } => {
                let quoted = self
                    .quoted
                    .as_ref()
                    .expect("an ICMPv6 error frame names the packet it quotes")
                    .to_bytes();
                let quoted = &quoted[ETH_HLEN..(ETH_HLEN + quote).min(quoted.len())];
                let icmp = Icmpv6Header::with_checksum(error.icmp_type(), src, dst, quoted)
                    .expect("small");
                icmp.write(&mut out).expect("write to Vec");
                out.extend_from_slice(quoted);
                (58, out)
            }
        }
    }

    /// The frame's bytes. With a fragment header, the frame carries its part of the
    /// upper-layer message (whose checksum covers the whole datagram).
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let (upper, message) = self.upper_layer();
        let mut body = Vec::new();
        let mut message = message;
        for (index, ext) in self.ext.iter().enumerate() {
            let next = self.ext.get(index + 1).map_or(upper, |next| next.number());
            body.extend_from_slice(&ext.bytes(next));
            if let Ext6::Fragment { offset, len, .. } = *ext {
                let start = usize::from(offset) * 8;
                let end = len.map_or(message.len(), |len| start + len);
                message = message[start..end].to_vec();
            }
        }
        body.extend_from_slice(&message);
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: u16::try_from(body.len()).expect("small"),
            next_header: IpNumber(self.ext.first().map_or(upper, |ext| ext.number())),
            hop_limit: self.hop_limit,
            source: self.src.ip().octets(),
            destination: self.dst.ip().octets(),
        };
        let mut out = Vec::new();
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: EtherType::IPV6,
        }
        .write(&mut out)
        .expect("write to Vec");
        ip.write(&mut out).expect("write to Vec");
        out.extend_from_slice(&body);
        out
    }
}

/// The ICMPv6 port unreachable (RFC 4443 section 3.1) the datapath answers `original`
/// with: from the address it was sent to, back to its sender, quoting its IPv6 header,
/// extension headers and first 8 upper-layer bytes.
#[must_use]
pub fn port_unreachable_reply6(original: &Frame6) -> Vec<u8> {
    icmp6_reply(original, Icmp6Error::PortUnreachable)
}

/// The ICMPv6 `error` the datapath answers `original` with (the reject, or the packet
/// too big and time exceeded of its redirect path): as [`port_unreachable_reply6`].
#[must_use]
pub fn icmp6_reply(original: &Frame6, error: Icmp6Error) -> Vec<u8> {
    let bytes = original.to_bytes();
    let quote_len = 40 + original.ext.iter().map(|ext| ext.len()).sum::<usize>() + 8;
    let quoted = &bytes[ETH_HLEN..ETH_HLEN + quote_len];
    let (from, to) = (original.dst.ip().octets(), original.src.ip().octets());
    let icmp = Icmpv6Header::with_checksum(error.icmp_type(), from, to, quoted).expect("small");
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: u16::try_from(icmp.header_len() + quoted.len()).expect("small"),
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: from,
        destination: to,
    };
    let mut out = Vec::new();
    Ethernet2Header {
        source: original.dst_mac,
        destination: original.src_mac,
        ether_type: EtherType::IPV6,
    }
    .write(&mut out)
    .expect("write to Vec");
    ip.write(&mut out).expect("write to Vec");
    icmp.write(&mut out).expect("write to Vec");
    out.extend_from_slice(quoted);
    out
}

/// `[addr]:port` shorthand for tables.
#[must_use]
pub fn sock6(addr: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(
        addr.parse::<Ipv6Addr>().expect("an IPv6 literal"),
        port,
        0,
        0,
    )
}
