//! Crafted frames for datapath tests, built with etherparse so checksums come from an
//! implementation independent of the one under test.
use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    icmpv4::DestUnreachableHeader, EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber,
    Ipv4Header, TcpHeader, UdpHeader,
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

/// The transport of a crafted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp(TcpFlags),
    /// UDP; `checksum: false` sends checksum 0 ("none", legal for IPv4).
    Udp {
        checksum: bool,
    },
}

/// An Ethernet + IPv4 + TCP/UDP frame, described by its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub transport: Transport,
    pub payload: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units (non-zero: a later fragment).
    pub fragment_offset: u16,
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
            fragment_offset: 0,
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
            fragment_offset: 0,
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
            payload: Vec::new(),
            fragment_offset: 0,
        }
    }

    fn ip_header(&self, l4_len: usize) -> Ipv4Header {
        let protocol = match self.transport {
            Transport::Tcp(_) => IpNumber::TCP,
            Transport::Udp { .. } => IpNumber::UDP,
        };
        let mut ip = Ipv4Header::new(
            u16::try_from(l4_len).expect("small test packet"),
            64,
            protocol,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .expect("valid IPv4 header");
        ip.identification = 0x1234;
        ip.dont_fragment = self.fragment_offset == 0;
        ip.fragment_offset = self
            .fragment_offset
            .try_into()
            .expect("13-bit fragment offset");
        ip.header_checksum = ip.calc_header_checksum();
        ip
    }

    /// The frame's bytes, every checksum computed.
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
        match self.transport {
            Transport::Tcp(flags) => {
                let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), 1000, 64_240);
                tcp.syn = flags.syn;
                tcp.ack = flags.ack;
                tcp.fin = flags.fin;
                tcp.rst = flags.rst;
                if flags.ack {
                    tcp.acknowledgment_number = 2000;
                }
                let ip = self.ip_header(tcp.header_len() + self.payload.len());
                tcp.checksum = tcp
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("small payload");
                ip.write(&mut out).expect("write to Vec");
                if self.fragment_offset == 0 {
                    tcp.write(&mut out).expect("write to Vec");
                }
            }
            Transport::Udp { checksum } => {
                let mut udp = UdpHeader::without_ipv4_checksum(
                    self.src.port(),
                    self.dst.port(),
                    self.payload.len(),
                )
                .expect("small payload");
                let ip = self.ip_header(UdpHeader::LEN + self.payload.len());
                if checksum {
                    udp.checksum = udp
                        .calc_checksum_ipv4(&ip, &self.payload)
                        .expect("small payload");
                }
                ip.write(&mut out).expect("write to Vec");
                if self.fragment_offset == 0 {
                    udp.write(&mut out).expect("write to Vec");
                }
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// The ICMP port unreachable a frontend without endpoints answers `original` with:
/// addressed back to the sender from the service address, quoting the original IP
/// header and the first 8 bytes after it (RFC 792), as kube-proxy's REJECT does.
#[must_use]
pub fn port_unreachable_reply(original: &Frame) -> Vec<u8> {
    let bytes = original.to_bytes();
    let quoted = &bytes[ETH_HLEN..ETH_HLEN + 28];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        quoted,
    );
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
