//! A two-node lab with an outside client, for the paths that cross nodes: NodePort,
//! externalIPs, LoadBalancer IPs, SNAT, traffic policies.
//!
//! ```text
//!   outside client ns          underlay ns (bridge br0, 192.168.50.1)
//!   192.168.50.100, .101  ──── br0 ──── eth0 192.168.50.11  node-a ns ── pods 10.244.1.0/24
//!                                └───── eth0 192.168.50.12  node-b ns ── pods 10.244.2.0/24
//! ```
//! Each node is a [`Lab`] (its own namespace, bpffs, agent, pods); pod CIDRs are routed
//! between nodes through the underlay like a routed CNI, and each node's default route
//! points at the underlay, so the agent finds `eth0` as its external interface by
//! itself. The outside client reaches LoadBalancer and external IPs (198.51.100.0/24)
//! through node-a, as a load balancer's router would.
//!
//! [`Cluster::enable_ipv6`] adds IPv6 to all of it (dual stack);
//! [`Cluster::new_ipv6_only`] builds the same shape with the IPv6 addresses only
//! (`fd00:192:168:50::/64` underlay, `fd00:10:244:{1,2}::/64` pods,
//! `2001:db8:100::/48` service IPs) and no IPv4 anywhere.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::{lab::Lab, netns::Netns};

pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const NODE_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 50, 11),
    Ipv4Addr::new(192, 168, 50, 12),
];
pub const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
pub const POD_CIDRS: [&str; 2] = ["10.244.1.0/24", "10.244.2.0/24"];
/// The outside client's addresses: the first is inside test source ranges, the second
/// outside them.
pub const CLIENT_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 50, 100),
    Ipv4Addr::new(192, 168, 50, 101),
];
/// Where the outside client sends LoadBalancer and external IPs.
pub const SERVICE_IPS_ROUTE: &str = "198.51.100.0/24";

/// The underlay's IPv6 addresses after [`Cluster::enable_ipv6`]: its gateway, the
/// nodes', the outside client's (the first inside test source ranges, the second
/// outside them), the nodes' IPv6 pod CIDRs, and the IPv6 LoadBalancer and external
/// IPs the client sends through node-a.
pub const UNDERLAY_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 1);
pub const NODE_IPS_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 0x12),
];
pub const CLIENT_IPS_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 0x100),
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 0x101),
];
pub const POD_CIDRS_V6: [&str; 2] = ["fd00:10:244:1::/64", "fd00:10:244:2::/64"];
pub const SERVICE_IPS_ROUTE_V6: &str = "2001:db8:100::/48";

/// Two nodes, an underlay and an outside client. Dropping it removes everything.
pub struct Cluster {
    /// The outside client's namespace.
    pub client: Netns,
    /// The bridge namespace, dropped before the nodes (its veth ends go with it).
    underlay: Netns,
    /// node-a, node-b.
    pub nodes: Vec<Lab>,
}

impl Cluster {
    /// Builds the nodes, the underlay and the client, with routes between them.
    ///
    /// # Errors
    /// When a namespace, link or route cannot be made.
    pub fn new() -> Result<Self> {
        let mut nodes = Vec::new();
        for name in NODE_NAMES {
            let mut lab = Lab::new()?;
            lab.node_name = name.to_owned();
            nodes.push(lab);
        }
        let prefix = nodes[0].prefix.clone();
        let underlay = Netns::create(&format!("{prefix}-ul"))?;
        let client = Netns::create(&format!("{prefix}-out"))?;
        wire_underlay(&underlay, &nodes, &client)?;
        underlay.ip(&[
            "addr",
            "add",
            &format!("{UNDERLAY_GATEWAY}/24"),
            "dev",
            "br0",
        ])?;
        for (netns, address) in nodes
            .iter()
            .map(|lab| &lab.node)
            .zip(NODE_IPS)
            .chain([(&client, CLIENT_IPS[0]), (&client, CLIENT_IPS[1])])
        {
            netns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        }
        client.ip(&[
            "route",
            "add",
            SERVICE_IPS_ROUTE,
            "via",
            &NODE_IPS[0].to_string(),
        ])?;
        for (index, lab) in nodes.iter().enumerate() {
            lab.node.ip(&[
                "route",
                "add",
                "default",
                "via",
                &UNDERLAY_GATEWAY.to_string(),
            ])?;
            let other = 1 - index;
            lab.node.ip(&[
                "route",
                "add",
                POD_CIDRS[other],
                "via",
                &NODE_IPS[other].to_string(),
            ])?;
        }
        Ok(Self {
            client,
            underlay,
            nodes,
        })
    }

    /// The same two nodes with IPv6 only: every node a [`Lab::new_ipv6_only`], the
    /// underlay, the client and the nodes' `eth0` with the IPv6 addresses of
    /// [`Cluster::enable_ipv6`] and no IPv4 address or route at all (the loopbacks
    /// aside: [`crate::lab::ipv4_state`] is empty everywhere), each node's only default
    /// route the IPv6 one via the underlay's gateway, from which the agent finds its
    /// external interface and node address by itself (no `--node-ip`). Pods go on with
    /// [`Lab::add_ipv6_pod`].
    ///
    /// # Errors
    /// When a namespace, sysctl, link, address or route cannot be made.
    pub fn new_ipv6_only() -> Result<Self> {
        let mut nodes = Vec::new();
        for name in NODE_NAMES {
            let mut lab = Lab::new_ipv6_only()?;
            lab.node_name = name.to_owned();
            nodes.push(lab);
        }
        let prefix = nodes[0].prefix.clone();
        let underlay = Netns::create(&format!("{prefix}-ul"))?;
        let client = Netns::create(&format!("{prefix}-out"))?;
        // Before the links are made, so their link-local addresses skip DAD too.
        for netns in [&underlay, &client] {
            netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        wire_underlay(&underlay, &nodes, &client)?;
        let cluster = Self {
            client,
            underlay,
            nodes,
        };
        cluster.add_ipv6_addresses_and_routes()?;
        Ok(cluster)
    }

    /// Makes the cluster dual stack, before its pods are added: IPv6 forwarding in
    /// each node ([`Lab::enable_ipv6`]), the IPv6 addresses above on the underlay
    /// (no duplicate address detection, so they are usable at once), each node's
    /// default IPv6 route via the underlay's gateway and a route to the other node's
    /// IPv6 pod CIDR via that node, and the client's route to the IPv6 service IPs via
    /// node-a, as the IPv4 ones.
    ///
    /// # Errors
    /// When a sysctl, address or route cannot be set.
    pub fn enable_ipv6(&mut self) -> Result<()> {
        for netns in [&self.underlay, &self.client] {
            netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        for lab in &mut self.nodes {
            lab.enable_ipv6()?;
        }
        self.add_ipv6_addresses_and_routes()
    }

    /// The IPv6 addresses and routes of [`Cluster::enable_ipv6`], on namespaces
    /// whose IPv6 is already on.
    fn add_ipv6_addresses_and_routes(&self) -> Result<()> {
        let with_len = |ip: Ipv6Addr| format!("{ip}/64");
        self.underlay.ip(&[
            "-6",
            "addr",
            "add",
            &with_len(UNDERLAY_GATEWAY_V6),
            "dev",
            "br0",
            "nodad",
        ])?;
        self.client.ip(&[
            "-6",
            "addr",
            "add",
            &with_len(CLIENT_IPS_V6[0]),
            "dev",
            "eth0",
            "nodad",
        ])?;
        // Deprecated (preferred lifetime 0): used only by a socket bound to it, so the
        // client's connections come from the first address, as IPv4's do.
        self.client.ip(&[
            "-6",
            "addr",
            "add",
            &with_len(CLIENT_IPS_V6[1]),
            "dev",
            "eth0",
            "nodad",
            "preferred_lft",
            "0",
        ])?;
        self.client.ip(&[
            "-6",
            "route",
            "add",
            SERVICE_IPS_ROUTE_V6,
            "via",
            &NODE_IPS_V6[0].to_string(),
        ])?;
        for (index, lab) in self.nodes.iter().enumerate() {
            lab.node.ip(&[
                "-6",
                "addr",
                "add",
                &with_len(NODE_IPS_V6[index]),
                "dev",
                "eth0",
                "nodad",
            ])?;
            lab.node.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &UNDERLAY_GATEWAY_V6.to_string(),
            ])?;
            let other = 1 - index;
            lab.node.ip(&[
                "-6",
                "route",
                "add",
                POD_CIDRS_V6[other],
                "via",
                &NODE_IPS_V6[other].to_string(),
            ])?;
        }
        Ok(())
    }

    /// Writes a manifest into every node's manifest directory.
    ///
    /// # Errors
    /// When a write fails.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        for lab in &self.nodes {
            lab.write_manifest(file, yaml)?;
        }
        Ok(())
    }

    /// Starts every node's agent and waits until each is healthy.
    ///
    /// # Errors
    /// When an agent does not start.
    pub fn start_agents(&mut self, extra_args: &[&str]) -> Result<()> {
        for lab in &mut self.nodes {
            lab.start_agent(extra_args)?;
        }
        Ok(())
    }

    /// Carries pod traffic between the two nodes over a link of its own with `mtu`
    /// (`tun0` in both node namespaces, 10.255.0.1/30 and .2/30), as an overlay or a
    /// narrower hop would, while node addresses and outside clients stay on the
    /// underlay (MTU 1500). Each node is then a router from 1500-byte pod links into a
    /// smaller hop: a DF packet that does not fit is answered with ICMP fragmentation
    /// needed, which is what path MTU discovery needs to see.
    ///
    /// # Errors
    /// When a link or route cannot be made.
    pub fn route_pods_over_link(&self, mtu: u16) -> Result<()> {
        let [a, b] = [&self.nodes[0].node, &self.nodes[1].node];
        a.add_veth("tun0", b, "tun0")?;
        let mtu = mtu.to_string();
        for (index, (netns, address)) in [(a, "10.255.0.1/30"), (b, "10.255.0.2/30")]
            .into_iter()
            .enumerate()
        {
            netns.ip(&["addr", "add", address, "dev", "tun0"])?;
            netns.ip(&["link", "set", "tun0", "mtu", &mtu, "up"])?;
            let (other_pods, other_end) = if index == 0 {
                (POD_CIDRS[1], "10.255.0.2")
            } else {
                (POD_CIDRS[0], "10.255.0.1")
            };
            netns.ip(&[
                "route", "replace", other_pods, "via", other_end, "dev", "tun0",
            ])?;
        }
        Ok(())
    }

    /// The underlay namespace (for captures while debugging).
    #[must_use]
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }
}

/// Makes the bridge `br0` in `underlay` and plugs every node and the client into it
/// with a veth whose far end is their `eth0`, all up and without addresses.
fn wire_underlay(underlay: &Netns, nodes: &[Lab], client: &Netns) -> Result<()> {
    underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
    underlay.ip(&["link", "set", "br0", "up"])?;
    for (index, netns) in nodes
        .iter()
        .map(|lab| &lab.node)
        .chain([client])
        .enumerate()
    {
        let port = format!("ul{index}");
        underlay.add_veth(&port, netns, "eth0")?;
        underlay.ip(&["link", "set", &port, "master", "br0", "up"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
    }
    Ok(())
}
