//! Types shared by the kernel programs (`proxy-ebpf`) and the agent (`proxy-userspace`).
//!
//! Every BPF map key and value is defined here, once. Rules that keep the two sides in
//! agreement:
//! - `#[repr(C)]`, fields ordered large to small, padding spelled out as `_pad` fields
//!   (the kernel hashes keys byte by byte, so stray padding bytes would split one logical
//!   key into many);
//! - no `bool`, `Option` or Rust enums inside map types: integers plus the constants below;
//! - fields in network byte order use the [`Be16`] / [`Be32`] newtypes;
//! - a compile-time size assertion next to each type, so a layout change is a build error
//!   on both sides instead of silent garbage;
//! - a layout change renames the map with a version suffix, so an upgrade never reads an
//!   old layout as new.
#![no_std]

pub mod maps;
pub mod service_stats;
pub mod sock;
pub mod takeover;
pub mod trace;

pub use maps::*;
pub use sock::{
    SockAffinityKeyV4, SockConfig, SockRevKeyV4, SockRevKeyV6, SockRevValueV4, SockRevValueV6,
};

/// A `u16` in network byte order, as it sits in a packet header.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Be16(pub u16);

/// A `u32` in network byte order, as it sits in a packet header (IPv4 addresses).
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Be32(pub u32);

impl Be16 {
    /// Wraps a host-order value.
    #[must_use]
    pub const fn from_host(value: u16) -> Self {
        Self(value.to_be())
    }

    /// The host-order value.
    #[must_use]
    pub const fn to_host(self) -> u16 {
        u16::from_be(self.0)
    }
}

impl Be32 {
    /// Wraps a host-order value.
    #[must_use]
    pub const fn from_host(value: u32) -> Self {
        Self(value.to_be())
    }

    /// The host-order value.
    #[must_use]
    pub const fn to_host(self) -> u32 {
        u32::from_be(self.0)
    }

    /// An IPv4 address as it appears on the wire.
    #[must_use]
    pub const fn from_ipv4(addr: core::net::Ipv4Addr) -> Self {
        Self(u32::from_ne_bytes(addr.octets()))
    }

    /// The IPv4 address this wire value holds.
    #[must_use]
    pub const fn to_ipv4(self) -> core::net::Ipv4Addr {
        let [a, b, c, d] = self.0.to_ne_bytes();
        core::net::Ipv4Addr::new(a, b, c, d)
    }
}

/// An IPv6 address as it sits in a packet header: four 32-bit words, each in network
/// byte order, so the bytes in memory are the address's 16 bytes in order. Words
/// rather than `[u8; 16]`: 4-byte alignment lets the kernel programs copy and compare
/// it with four word loads instead of sixteen byte loads.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Be32x4(pub [u32; 4]);

impl Be32x4 {
    /// An IPv6 address as it appears on the wire.
    #[must_use]
    pub const fn from_ipv6(addr: core::net::Ipv6Addr) -> Self {
        let o = addr.octets();
        Self([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    /// The IPv6 address this wire value holds.
    #[must_use]
    pub fn to_ipv6(self) -> core::net::Ipv6Addr {
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(self.0) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        core::net::Ipv6Addr::from(bytes)
    }
}

/// IP protocol numbers the datapath translates.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// ICMPv6 (RFC 4443): the reject the datapath sends for IPv6 flows; NDP and
    /// router messages travel in it too and are never touched.
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::*;

    #[test]
    fn be32_round_trips_ipv4_in_wire_order() {
        let addr = Ipv4Addr::new(10, 96, 0, 1);
        let wire = Be32::from_ipv4(addr);
        assert_eq!(wire.0.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(wire.to_ipv4(), addr);
        assert_eq!(wire.to_host(), 0x0a60_0001);
    }

    #[test]
    fn be32x4_round_trips_ipv6_in_wire_order() {
        let addr: core::net::Ipv6Addr = "fd00:10:96::a".parse().expect("literal");
        let wire = Be32x4::from_ipv6(addr);
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_mut(4).zip(wire.0) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        assert_eq!(bytes, addr.octets());
        assert_eq!(wire.to_ipv6(), addr);
    }

    #[test]
    fn be16_is_network_order() {
        assert_eq!(Be16::from_host(80).0.to_ne_bytes(), [0, 80]);
        assert_eq!(Be16::from_host(8080).to_host(), 8080);
    }
}
