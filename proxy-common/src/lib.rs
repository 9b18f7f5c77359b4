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
pub use sock::{SockAffinityKeyV4, SockConfig, SockRevKeyV4, SockRevValueV4};

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

/// IP protocol numbers the datapath translates.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
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
    fn be16_is_network_order() {
        assert_eq!(Be16::from_host(80).0.to_ne_bytes(), [0, 80]);
        assert_eq!(Be16::from_host(8080).to_host(), 8080);
    }
}
