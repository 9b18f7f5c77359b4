//! The node's side of the network, read from its namespace: which interfaces face the
//! outside (where the node hooks attach), their IPv4 addresses, which of those serve
//! NodePorts (kube-proxy's `nodePortAddresses`) and which one masqueraded traffic
//! leaves with.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    net::{Ipv4Addr, Ipv6Addr},
};

/// The node's external interfaces and addresses as found now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Names of the external interfaces.
    pub interfaces: BTreeSet<String>,
    /// Addresses NodePorts answer on.
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// The address masqueraded traffic gets (`None`: no address found).
    pub snat_addr: Option<Ipv4Addr>,
    /// The IPv6 addresses NodePorts answer on (global addresses of the external
    /// interfaces: never link-local ones, which name no node from elsewhere).
    pub node_port_addresses_v6: Vec<Ipv6Addr>,
    /// The IPv6 address masqueraded IPv6 traffic gets.
    pub snat_addr_v6: Option<Ipv6Addr>,
}

/// A `nodePortAddresses` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortFilter {
    /// An IPv4 CIDR: node addresses inside it.
    Cidr(Ipv4Addr, u8),
    /// An IPv6 CIDR.
    CidrV6(Ipv6Addr, u8),
    /// `primary`: the node's primary address (the masquerade address).
    Primary,
}

impl NodePortFilter {
    /// Parses kube-proxy's syntax (`10.0.0.0/8`, `primary`).
    ///
    /// # Errors
    /// When the entry is neither.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "primary" {
            return Ok(Self::Primary);
        }
        crate::config::parse_ip_cidr(text).map(|(addr, len)| match addr {
            std::net::IpAddr::V4(v4) => Self::Cidr(v4, len),
            std::net::IpAddr::V6(v6) => Self::CidrV6(v6, len),
        })
    }

    /// Whether the filter speaks of IPv4 (`primary` speaks of both families).
    fn is_v4(self) -> bool {
        matches!(self, Self::Cidr(..) | Self::Primary)
    }

    fn is_v6(self) -> bool {
        matches!(self, Self::CidrV6(..) | Self::Primary)
    }

    fn admits(self, addr: Ipv4Addr, primary: Option<Ipv4Addr>) -> bool {
        match self {
            Self::Primary => primary == Some(addr),
            Self::Cidr(net, len) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(addr) & mask == u32::from(net) & mask
            }
            Self::CidrV6(..) => false,
        }
    }

    fn admits_v6(self, addr: Ipv6Addr, primary: Option<Ipv6Addr>) -> bool {
        match self {
            Self::Primary => primary == Some(addr),
            Self::CidrV6(net, len) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(addr) & mask == u128::from(net) & mask
            }
            Self::Cidr(..) => false,
        }
    }
}

/// Decides the node's network from what the namespace holds: `addresses` are the
/// (interface, IPv4 address) pairs of the external interfaces, in interface order.
/// The masquerade address is `node_ip` if given, else the first external address;
/// NodePorts answer on every external address the filters admit (all when there are
/// no filters, kube-proxy's default).
#[must_use]
pub fn decide(
    addresses: &[(String, Ipv4Addr)],
    filters: &[NodePortFilter],
    node_ip: Option<Ipv4Addr>,
) -> NodeNetwork {
    let snat_addr = node_ip.or_else(|| addresses.first().map(|(_, addr)| *addr));
    // Per family, as kube-proxy's NodePortAddresses: filters of the other family do
    // not count, and a family no filter speaks of answers on all its addresses.
    let v4_filters: Vec<NodePortFilter> = filters.iter().copied().filter(|f| f.is_v4()).collect();
    let mut node_port_addresses: Vec<Ipv4Addr> = addresses
        .iter()
        .map(|(_, addr)| *addr)
        .filter(|addr| {
            v4_filters.is_empty() || v4_filters.iter().any(|f| f.admits(*addr, snat_addr))
        })
        .collect();
    node_port_addresses.sort_unstable();
    node_port_addresses.dedup();
    NodeNetwork {
        interfaces: addresses.iter().map(|(name, _)| name.clone()).collect(),
        node_port_addresses,
        snat_addr,
        node_port_addresses_v6: Vec::new(),
        snat_addr_v6: None,
    }
}

/// [`decide`]'s IPv6 half: the IPv6 NodePort addresses and masquerade address from
/// the (interface, global IPv6 address) pairs of the external interfaces.
pub fn decide_v6(
    node: &mut NodeNetwork,
    addresses: &[(String, Ipv6Addr)],
    filters: &[NodePortFilter],
    node_ip: Option<Ipv6Addr>,
) {
    let snat_addr = node_ip.or_else(|| addresses.first().map(|(_, addr)| *addr));
    let v6_filters: Vec<NodePortFilter> = filters.iter().copied().filter(|f| f.is_v6()).collect();
    let mut node_port_addresses: Vec<Ipv6Addr> = addresses
        .iter()
        .map(|(_, addr)| *addr)
        .filter(|addr| {
            v6_filters.is_empty() || v6_filters.iter().any(|f| f.admits_v6(*addr, snat_addr))
        })
        .collect();
    node_port_addresses.sort_unstable();
    node_port_addresses.dedup();
    node.interfaces
        .extend(addresses.iter().map(|(name, _)| name.clone()));
    node.node_port_addresses_v6 = node_port_addresses;
    node.snat_addr_v6 = snat_addr;
}

/// Interfaces that carry a default route of either family (`/proc/net/route`,
/// `/proc/net/ipv6_route`): the node's way out, and where traffic from outside arrives
/// on a typical node, dual-stack and IPv6-only nodes included.
///
/// # Errors
/// When the IPv4 routing table cannot be read. A kernel without IPv6 has no IPv6
/// table, which adds nothing.
pub fn default_route_interfaces() -> io::Result<BTreeSet<String>> {
    let mut names = parse_default_routes(&std::fs::read_to_string("/proc/net/route")?);
    match std::fs::read_to_string("/proc/net/ipv6_route") {
        Ok(table) => names.extend(parse_default_routes_v6(&table)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    Ok(names)
}

/// The interfaces of `/proc/net/ipv6_route`'s default routes (`::/0`), leaving out the
/// kernel's unreachable entries on `lo` (`RTF_REJECT`) and routes not up.
fn parse_default_routes_v6(table: &str) -> BTreeSet<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [destination, prefix_len, _, _, _, _, _, _, flags, name] = fields[..] else {
                return None;
            };
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let default = destination.bytes().all(|digit| digit == b'0') && prefix_len == "00";
            (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0).then(|| name.to_owned())
        })
        .collect()
}

fn parse_default_routes(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let destination = fields.next()?;
            (destination == "00000000").then(|| name.to_owned())
        })
        .collect()
}

/// The IPv4 addresses of the interfaces whose names `wanted` accepts, sorted by
/// interface name then address (so the first is stable across calls).
///
/// # Errors
/// When the kernel cannot list addresses.
pub fn ipv4_addresses(wanted: impl Fn(&str) -> bool) -> io::Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a linked list freed by freeifaddrs; every pointer read
    // is checked for null and only read while the list is alive.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&raw mut head) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut entry = head;
        while !entry.is_null() {
            let current = &*entry;
            entry = current.ifa_next;
            if current.ifa_addr.is_null() || current.ifa_name.is_null() {
                continue;
            }
            if i32::from((*current.ifa_addr).sa_family) != libc::AF_INET {
                continue;
            }
            let name = CStr::from_ptr(current.ifa_name)
                .to_string_lossy()
                .into_owned();
            if !wanted(&name) {
                continue;
            }
            let sockaddr = &*current.ifa_addr.cast::<libc::sockaddr_in>();
            let addr = Ipv4Addr::from(u32::from_be(sockaddr.sin_addr.s_addr));
            out.push((name, addr));
        }
        libc::freeifaddrs(head);
    }
    out.sort();
    Ok(out)
}

/// The global IPv6 addresses (not link-local, not loopback) of the interfaces whose
/// names `wanted` accepts, sorted by interface name then address.
///
/// # Errors
/// When the kernel cannot list addresses.
pub fn ipv6_addresses(wanted: impl Fn(&str) -> bool) -> io::Result<Vec<(String, Ipv6Addr)>> {
    let mut out = Vec::new();
    // SAFETY: as in ipv4_addresses: the list is read while alive, then freed once.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&raw mut head) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut entry = head;
        while !entry.is_null() {
            let current = &*entry;
            entry = current.ifa_next;
            if current.ifa_addr.is_null() || current.ifa_name.is_null() {
                continue;
            }
            if i32::from((*current.ifa_addr).sa_family) != libc::AF_INET6 {
                continue;
            }
            let name = CStr::from_ptr(current.ifa_name)
                .to_string_lossy()
                .into_owned();
            if !wanted(&name) {
                continue;
            }
            let sockaddr = &*current.ifa_addr.cast::<libc::sockaddr_in6>();
            let addr = Ipv6Addr::from(sockaddr.sin6_addr.s6_addr);
            if addr.is_loopback() || addr.is_unicast_link_local() || addr.is_unspecified() {
                continue;
            }
            out.push((name, addr));
        }
        libc::freeifaddrs(head);
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("test address")
    }

    #[test]
    fn default_routes_name_their_interfaces() {
        let table = "Iface\tDestination\tGateway\tFlags\n\
                     eth0\t00000000\t0101A8C0\t0003\n\
                     eth0\t0001A8C0\t00000000\t0001\n\
                     eth1\t0000000A\t00000000\t0001\n";
        assert_eq!(
            parse_default_routes(table),
            BTreeSet::from(["eth0".to_owned()])
        );
    }

    #[test]
    fn ipv6_default_routes_name_their_interfaces_but_not_the_unreachable_ones() {
        let zeros = "00000000000000000000000000000000";
        let table = format!(
            "fd000000000000000000000000000000 40 {zeros} 00 {zeros} 00000100 00000001 00000000 00000001     eth1\n\
             {zeros} 00 {zeros} 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n\
             {zeros} 00 {zeros} 00 {zeros} ffffffff 00000001 00000000 00200200       lo\n\
             00000000000000000000000000000001 80 {zeros} 00 {zeros} 00000000 00000002 00000000 80200001       lo\n"
        );
        assert_eq!(
            parse_default_routes_v6(&table),
            BTreeSet::from(["eth0".to_owned()])
        );
        assert!(parse_default_routes_v6("").is_empty());
        assert!(parse_default_routes_v6("garbage line\n").is_empty());
    }

    #[test]
    fn node_port_addresses_follow_kube_proxys_filters() {
        let addresses = vec![
            ("eth0".to_owned(), ip("192.168.1.10")),
            ("eth0".to_owned(), ip("10.0.0.5")),
            ("eth1".to_owned(), ip("172.16.0.2")),
        ];
        let all = decide(&addresses, &[], None);
        assert_eq!(all.snat_addr, Some(ip("192.168.1.10")));
        assert_eq!(
            all.node_port_addresses,
            [ip("10.0.0.5"), ip("172.16.0.2"), ip("192.168.1.10")]
        );
        let cidr = decide(
            &addresses,
            &[NodePortFilter::parse("192.168.0.0/16").expect("cidr")],
            None,
        );
        assert_eq!(cidr.node_port_addresses, [ip("192.168.1.10")]);
        let primary = decide(
            &addresses,
            &[NodePortFilter::Primary],
            Some(ip("172.16.0.2")),
        );
        assert_eq!(primary.node_port_addresses, [ip("172.16.0.2")]);
        assert_eq!(primary.snat_addr, Some(ip("172.16.0.2")));
        assert_eq!(decide(&[], &[], None).snat_addr, None);
        assert!(NodePortFilter::parse("not-a-cidr").is_err());
    }

    #[test]
    fn each_family_filters_its_own_addresses() {
        let v4 = vec![("eth0".to_owned(), ip("192.168.1.10"))];
        let v6: Vec<(String, Ipv6Addr)> = ["fd00:1::10", "2001:db8::10"]
            .iter()
            .map(|text| ("eth0".to_owned(), text.parse().expect("v6")))
            .collect();
        // An IPv6 filter only: IPv4 answers on every address, IPv6 on the matching one.
        let filters = [NodePortFilter::parse("fd00:1::/64").expect("cidr")];
        let mut node = decide(&v4, &filters, None);
        decide_v6(&mut node, &v6, &filters, None);
        assert_eq!(node.node_port_addresses, [ip("192.168.1.10")]);
        assert_eq!(
            node.node_port_addresses_v6,
            ["fd00:1::10".parse::<Ipv6Addr>().expect("v6")]
        );
        assert_eq!(node.snat_addr_v6, Some("fd00:1::10".parse().expect("v6")));
        // `primary` speaks of both families: the node IP of each.
        let mut node = decide(&v4, &[NodePortFilter::Primary], None);
        let chosen: Ipv6Addr = "2001:db8::10".parse().expect("v6");
        decide_v6(&mut node, &v6, &[NodePortFilter::Primary], Some(chosen));
        assert_eq!(node.node_port_addresses_v6, [chosen]);
        assert_eq!(node.snat_addr_v6, Some(chosen));
    }
}
