//! The two IP families, as one trait the model and the syncer are generic over.
//!
//! kube-proxy runs one proxier per family on a dual-stack node, and each sees only
//! its family's addresses and EndpointSlices. kpr does the same with one piece of
//! code: [`crate::model`] computes a [`crate::model::FamilyDesired`] per family and
//! [`crate::sync::Syncer`] is instantiated once per family, each with its own maps
//! (`SVC_V4_V1`/`SVC_V6_V1`, ...), its own backend ids and its own range of service
//! ids ([`Family::SERVICE_IDS`]). Generic rather than keys widened to `IpAddr`: an
//! IPv4 key stays as small as it was (the model's memory at 50 000 services is mostly
//! keys and backends), and a key of one family can never reach the other's map.
use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use proxy_common::{
    BackendV4, BackendV6, Be16, Be32, Be32x4, ServiceKeyV4, ServiceKeyV6, SourceRangeV4,
    SourceRangeV6,
};

use crate::{
    datapath::{FamilyMaps, Maps},
    model::{Desired, FamilyDesired, FrontendKey, ModelChanges, ModelSettings, ServicePortName},
    state::AddressType,
};

/// An IP family: its address type ([`Ipv4Addr`] or [`Ipv6Addr`] implement it) and its
/// map layouts.
pub trait Family:
    Copy + Ord + Hash + Debug + Display + Send + Sync + Into<IpAddr> + 'static
{
    /// An endpoint: address and port.
    type Socket: Copy + Ord + Hash + Debug + Display + Send + Sync + 'static;
    /// Key of the service map.
    type ServiceKey: Copy + Ord + Hash + Debug + Send + Sync + aya::Pod;
    /// Value of the backend map.
    type Backend: Copy + Ord + Hash + Debug + Send + Sync + aya::Pod;
    /// Data of a source-range trie key.
    type RangeData: Copy + Debug + Send + Sync + aya::Pod;
    /// Key of the frontend address set (the address as the datapath reads it).
    type AddrKey: Copy + Debug + Send + Sync + aya::Pod;

    /// `IPv4` or `IPv6`, as `spec.ipFamilies` names it.
    const NAME: &'static str;
    /// Address length in bits (the longest prefix).
    const BITS: u8;
    /// The EndpointSlice `addressType` of this family.
    const ADDRESS_TYPE: AddressType;
    /// The service ids this family's syncer hands out, `start..end`: disjoint, so the
    /// per-service counters (one map for both families) never add one family's
    /// service port to another's (the agent sums a dual-stack port's two ids).
    const SERVICE_IDS: (u32, u32);
    /// Map names, for errors and metrics.
    const SERVICES_MAP: &'static str;
    const BACKENDS_MAP: &'static str;
    const SOURCE_RANGES_MAP: &'static str;
    const FRONTEND_ADDRS_MAP: &'static str;

    /// The address, when `ip` is of this family. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) is of neither: see [`is_v4_mapped`].
    fn of(ip: IpAddr) -> Option<Self>;
    /// The unspecified address (`0.0.0.0`, `::`), the smallest of the family.
    fn unspecified() -> Self;
    fn socket(ip: Self, port: u16) -> Self::Socket;
    fn socket_ip(socket: &Self::Socket) -> Self;
    fn socket_port(socket: &Self::Socket) -> u16;
    /// The address with every bit past `len` cleared.
    fn masked(self, len: u8) -> Self;
    /// The bytes of an endpoint, address then port in network order (stable hashing).
    fn socket_bytes(socket: &Self::Socket) -> Vec<u8>;

    fn service_key(frontend: &FrontendKey<Self>, slot: u16) -> Self::ServiceKey;
    fn key_slot(key: &Self::ServiceKey) -> u16;
    fn key_with_slot(key: &Self::ServiceKey, slot: u16) -> Self::ServiceKey;
    fn key_addr(key: &Self::ServiceKey) -> Self;
    /// The frontend of a key (the inverse of [`Self::service_key`], slot aside).
    fn key_frontend(key: &Self::ServiceKey) -> FrontendKey<Self>;
    fn backend(socket: &Self::Socket, proto: u8, flags: u8) -> Self::Backend;
    fn range_data(service_id: u32, addr: Self) -> Self::RangeData;
    fn from_range_data(data: &Self::RangeData) -> (u32, Self);
    fn addr_key(addr: Self) -> Self::AddrKey;
    fn from_addr_key(key: Self::AddrKey) -> Self;

    /// This family's half of a desired state.
    fn part(desired: &Desired) -> &FamilyDesired<Self>;
    fn part_mut(desired: &mut Desired) -> &mut FamilyDesired<Self>;
    /// This family's frontends in a [`ModelChanges`].
    fn changed_frontends(
        changes: &ModelChanges,
    ) -> &std::collections::BTreeMap<FrontendKey<Self>, Option<ServicePortName>>;
    fn changed_frontends_mut(
        changes: &mut ModelChanges,
    ) -> &mut std::collections::BTreeMap<FrontendKey<Self>, Option<ServicePortName>>;
    /// This family's service ports whose source ranges changed.
    fn changed_ranges(changes: &ModelChanges) -> &std::collections::BTreeSet<ServicePortName>;
    fn changed_ranges_mut(
        changes: &mut ModelChanges,
    ) -> &mut std::collections::BTreeSet<ServicePortName>;
    /// The node addresses of this family NodePorts answer on.
    fn node_port_addresses(settings: &ModelSettings) -> &[Self];

    /// This family's maps among the agent's handles.
    fn maps(maps: &Maps) -> &FamilyMaps<Self>;
    fn maps_mut(maps: &mut Maps) -> &mut FamilyMaps<Self>;
}

/// Whether `ip` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`): never a valid
/// clusterIP, endpoint or range (the API rejects them); a datapath of either family
/// would read it as the other's address.
#[must_use]
pub fn is_v4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

impl Family for Ipv4Addr {
    type Socket = SocketAddrV4;
    type ServiceKey = ServiceKeyV4;
    type Backend = BackendV4;
    type RangeData = SourceRangeV4;
    type AddrKey = u32;

    const NAME: &'static str = "IPv4";
    const BITS: u8 = 32;
    const ADDRESS_TYPE: AddressType = AddressType::IPv4;
    const SERVICE_IDS: (u32, u32) = (1, 0x8000_0000);
    const SERVICES_MAP: &'static str = proxy_common::names::SERVICES_V4;
    const BACKENDS_MAP: &'static str = proxy_common::names::BACKENDS_V4;
    const SOURCE_RANGES_MAP: &'static str = proxy_common::names::SOURCE_RANGES_V4;
    const FRONTEND_ADDRS_MAP: &'static str = proxy_common::names::FRONTEND_ADDRS_V4;

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }

    fn unspecified() -> Self {
        Ipv4Addr::UNSPECIFIED
    }

    fn socket(ip: Self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip, port)
    }

    fn socket_ip(socket: &SocketAddrV4) -> Self {
        *socket.ip()
    }

    fn socket_port(socket: &SocketAddrV4) -> u16 {
        socket.port()
    }

    fn masked(self, len: u8) -> Self {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self) & mask)
    }

    fn socket_bytes(socket: &SocketAddrV4) -> Vec<u8> {
        let mut bytes = socket.ip().octets().to_vec();
        bytes.extend_from_slice(&socket.port().to_be_bytes());
        bytes
    }

    fn service_key(frontend: &FrontendKey<Self>, slot: u16) -> ServiceKeyV4 {
        ServiceKeyV4 {
            addr: Be32::from_ipv4(frontend.addr),
            port: Be16::from_host(frontend.port),
            slot,
            proto: frontend.proto,
            scope: frontend.scope,
            _pad: [0; 2],
        }
    }

    fn key_slot(key: &ServiceKeyV4) -> u16 {
        key.slot
    }

    fn key_with_slot(key: &ServiceKeyV4, slot: u16) -> ServiceKeyV4 {
        ServiceKeyV4 { slot, ..*key }
    }

    fn key_addr(key: &ServiceKeyV4) -> Self {
        key.addr.to_ipv4()
    }

    fn key_frontend(key: &ServiceKeyV4) -> FrontendKey<Self> {
        FrontendKey {
            addr: key.addr.to_ipv4(),
            port: key.port.to_host(),
            proto: key.proto,
            scope: key.scope,
        }
    }

    fn backend(socket: &SocketAddrV4, proto: u8, flags: u8) -> BackendV4 {
        BackendV4 {
            addr: Be32::from_ipv4(*socket.ip()),
            port: Be16::from_host(socket.port()),
            proto,
            flags,
        }
    }

    fn range_data(service_id: u32, addr: Self) -> SourceRangeV4 {
        SourceRangeV4 {
            service_id: Be32::from_host(service_id),
            addr: Be32::from_ipv4(addr),
        }
    }

    fn from_range_data(data: &SourceRangeV4) -> (u32, Self) {
        (data.service_id.to_host(), data.addr.to_ipv4())
    }

    fn addr_key(addr: Self) -> u32 {
        Be32::from_ipv4(addr).0
    }

    fn from_addr_key(key: u32) -> Self {
        Be32(key).to_ipv4()
    }

    fn part(desired: &Desired) -> &FamilyDesired<Self> {
        &desired.v4
    }

    fn part_mut(desired: &mut Desired) -> &mut FamilyDesired<Self> {
        &mut desired.v4
    }

    fn changed_frontends(
        changes: &ModelChanges,
    ) -> &std::collections::BTreeMap<FrontendKey<Self>, Option<ServicePortName>> {
        &changes.frontends
    }

    fn changed_frontends_mut(
        changes: &mut ModelChanges,
    ) -> &mut std::collections::BTreeMap<FrontendKey<Self>, Option<ServicePortName>> {
        &mut changes.frontends
    }

    fn changed_ranges(changes: &ModelChanges) -> &std::collections::BTreeSet<ServicePortName> {
        &changes.source_ranges
    }

    fn changed_ranges_mut(
        changes: &mut ModelChanges,
    ) -> &mut std::collections::BTreeSet<ServicePortName> {
        &mut changes.source_ranges
    }

    fn node_port_addresses(settings: &ModelSettings) -> &[Self] {
        &settings.node_port_addresses
    }

    fn maps(maps: &Maps) -> &FamilyMaps<Self> {
        &maps.v4
    }

    fn maps_mut(maps: &mut Maps) -> &mut FamilyMaps<Self> {
        &mut maps.v4
    }
}

impl Family for Ipv6Addr {
    type Socket = SocketAddrV6;
    type ServiceKey = ServiceKeyV6;
    type Backend = BackendV6;
    type RangeData = SourceRangeV6;
    type AddrKey = Be32x4;

    const NAME: &'static str = "IPv6";
    const BITS: u8 = 128;
    const ADDRESS_TYPE: AddressType = AddressType::IPv6;
    const SERVICE_IDS: (u32, u32) = (0x8000_0000, u32::MAX);
    const SERVICES_MAP: &'static str = proxy_common::names::SERVICES_V6;
    const BACKENDS_MAP: &'static str = proxy_common::names::BACKENDS_V6;
    const SOURCE_RANGES_MAP: &'static str = proxy_common::names::SOURCE_RANGES_V6;
    const FRONTEND_ADDRS_MAP: &'static str = proxy_common::names::FRONTEND_ADDRS_V6;

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Some(v6),
            _ => None,
        }
    }

    fn unspecified() -> Self {
        Ipv6Addr::UNSPECIFIED
    }

    fn socket(ip: Self, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(ip, port, 0, 0)
    }

    fn socket_ip(socket: &SocketAddrV6) -> Self {
        *socket.ip()
    }

    fn socket_port(socket: &SocketAddrV6) -> u16 {
        socket.port()
    }

    fn masked(self, len: u8) -> Self {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(len.min(128)))
            .unwrap_or(0);
        Ipv6Addr::from(u128::from(self) & mask)
    }

    fn socket_bytes(socket: &SocketAddrV6) -> Vec<u8> {
        let mut bytes = socket.ip().octets().to_vec();
        bytes.extend_from_slice(&socket.port().to_be_bytes());
        bytes
    }

    fn service_key(frontend: &FrontendKey<Self>, slot: u16) -> ServiceKeyV6 {
        ServiceKeyV6 {
            addr: Be32x4::from_ipv6(frontend.addr),
            port: Be16::from_host(frontend.port),
            slot,
            proto: frontend.proto,
            scope: frontend.scope,
            _pad: [0; 2],
        }
    }

    fn key_slot(key: &ServiceKeyV6) -> u16 {
        key.slot
    }

    fn key_with_slot(key: &ServiceKeyV6, slot: u16) -> ServiceKeyV6 {
        ServiceKeyV6 { slot, ..*key }
    }

    fn key_addr(key: &ServiceKeyV6) -> Self {
        key.addr.to_ipv6()
    }

    fn key_frontend(key: &ServiceKeyV6) -> FrontendKey<Self> {
        FrontendKey {
            addr: key.addr.to_ipv6(),
            port: key.port.to_host(),
            proto: key.proto,
            scope: key.scope,
        }
    }

    fn backend(socket: &SocketAddrV6, proto: u8, flags: u8) -> BackendV6 {
        BackendV6 {
            addr: Be32x4::from_ipv6(*socket.ip()),
            port: Be16::from_host(socket.port()),
            proto,
            flags,
        }
    }

    fn range_data(service_id: u32, addr: Self) -> SourceRangeV6 {
        SourceRangeV6 {
            service_id: Be32::from_host(service_id),
            addr: Be32x4::from_ipv6(addr),
        }
    }

    fn from_range_data(data: &SourceRangeV6) -> (u32, Self) {
        (data.service_id.to_host(), data.addr.to_ipv6())
    }

    fn addr_key(addr: Self) -> Be32x4 {
        Be32x4::from_ipv6(addr)
    }

    fn from_addr_key(key: Be32x4) -> Self {
        key.to_ipv6()
    }

    fn part(desired: &Desired) -> &FamilyDesired<Self> {
        &desired.v6
    }

    fn part_mut(desired: &mut Desired) -> &mut FamilyDesired<Self> {
        &mut desired.v6
    }

    fn changed_frontends(
        changes: &ModelChanges,
    ) -> &std::collections::BTreeMap<FrontendKey<Self>, Option<ServicePortName>> {
        &changes.frontends_v6
    }

    fn changed_frontends_mut(
        changes: &mut ModelChanges,
    ) -> &mut std::collections::BTreeMap<FrontendKey<Self>, Option<ServicePortName>> {
        &mut changes.frontends_v6
    }

    fn changed_ranges(changes: &ModelChanges) -> &std::collections::BTreeSet<ServicePortName> {
        &changes.source_ranges_v6
    }

    fn changed_ranges_mut(
        changes: &mut ModelChanges,
    ) -> &mut std::collections::BTreeSet<ServicePortName> {
        &mut changes.source_ranges_v6
    }

    fn node_port_addresses(settings: &ModelSettings) -> &[Self] {
        &settings.node_port_addresses_v6
    }

    fn maps(maps: &Maps) -> &FamilyMaps<Self> {
        &maps.v6
    }

    fn maps_mut(maps: &mut Maps) -> &mut FamilyMaps<Self> {
        &mut maps.v6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_clear_the_host_bits() {
        let v4: Ipv4Addr = "10.1.2.3".parse().expect("v4");
        assert_eq!(v4.masked(16), Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(v4.masked(0), Ipv4Addr::UNSPECIFIED);
        let v6: Ipv6Addr = "fd00:1:2:3::7".parse().expect("v6");
        assert_eq!(v6.masked(48), "fd00:1:2::".parse::<Ipv6Addr>().expect("v6"));
        assert_eq!(v6.masked(128), v6);
    }

    #[test]
    fn mapped_addresses_belong_to_no_family() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("mapped");
        assert!(is_v4_mapped(mapped));
        assert_eq!(Ipv4Addr::of(mapped), None);
        assert_eq!(Ipv6Addr::of(mapped), None);
        assert!(Ipv6Addr::of("fd00::1".parse().expect("v6")).is_some());
    }

    #[test]
    fn a_key_gives_back_its_frontend() {
        let v4 = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: 6,
            scope: 1,
        };
        assert_eq!(Ipv4Addr::key_frontend(&Ipv4Addr::service_key(&v4, 3)), v4);
        let v6 = FrontendKey {
            addr: "fd00:96::10".parse::<Ipv6Addr>().expect("v6"),
            port: 53,
            proto: 17,
            scope: 0,
        };
        assert_eq!(Ipv6Addr::key_frontend(&Ipv6Addr::service_key(&v6, 0)), v6);
    }

    #[test]
    fn service_id_ranges_are_disjoint() {
        assert!(Ipv4Addr::SERVICE_IDS.1 <= Ipv6Addr::SERVICE_IDS.0);
        assert!(Ipv4Addr::SERVICE_IDS.0 > 0);
    }
}
