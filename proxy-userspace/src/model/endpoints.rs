//! Which endpoints of a service port a node uses: kube-proxy's `CategorizeEndpoints`
//! (pkg/proxy/topology.go), reproduced rule by rule.
use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::family::Family;

/// One endpoint of a service port, as read from an EndpointSlice of family `F`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint<F: Family = Ipv4Addr> {
    pub addr: F::Socket,
    /// `conditions.ready`; unset counts as ready.
    pub ready: bool,
    /// `conditions.serving`; unset counts as serving.
    pub serving: bool,
    /// `conditions.terminating`; unset counts as not terminating.
    pub terminating: bool,
    /// `nodeName` equals this node's name.
    pub is_local: bool,
    /// `hints.forZones[].name`.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: BTreeSet<String>,
}

/// Traffic policies of a service port, for the frontends this node programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policies {
    /// internalTrafficPolicy Local.
    pub internal_local: bool,
    /// externalTrafficPolicy Local, for a service that has external frontends.
    pub external_local: bool,
    /// The service has external frontends (NodePort, externalIPs, LoadBalancer IPs).
    pub has_external: bool,
}

impl Policies {
    fn uses_cluster_endpoints(self) -> bool {
        !self.internal_local || (self.has_external && !self.external_local)
    }

    fn uses_local_endpoints(self) -> bool {
        self.internal_local || (self.has_external && self.external_local)
    }
}

/// The endpoint sets of a service port on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categorized<F: Family = Ipv4Addr> {
    /// Endpoints for Cluster traffic policy (topology applied).
    pub cluster: Vec<F::Socket>,
    /// Endpoints for Local traffic policy.
    pub local: Vec<F::Socket>,
    /// Whether the service has usable endpoints anywhere (decides reject vs drop).
    pub has_any: bool,
}

impl<F: Family> Default for Categorized<F> {
    fn default() -> Self {
        Self {
            cluster: Vec::new(),
            local: Vec::new(),
            has_any: false,
        }
    }
}

/// Topology from hints: same node, then same zone, else none. A mode applies only
/// when every ready endpoint carries hints of that kind and one is hinted for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

fn topology_from_hints<F: Family>(
    endpoints: &[Endpoint<F>],
    node_name: &str,
    zone: &str,
) -> Topology {
    let ready: Vec<&Endpoint<F>> = endpoints.iter().filter(|ep| ep.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    let all_node_hints = ready.iter().all(|ep| !ep.node_hints.is_empty());
    if all_node_hints && ready.iter().any(|ep| ep.node_hints.contains(node_name)) {
        return Topology::SameNode;
    }
    let all_zone_hints = ready.iter().all(|ep| !ep.zone_hints.is_empty());
    if all_zone_hints && !zone.is_empty() && ready.iter().any(|ep| ep.zone_hints.contains(zone)) {
        return Topology::SameZone;
    }
    Topology::None
}

fn available_for_topology<F: Family>(
    ep: &Endpoint<F>,
    topology: Topology,
    node_name: &str,
    zone: &str,
) -> bool {
    match topology {
        Topology::None => true,
        Topology::SameNode => ep.node_hints.contains(node_name),
        Topology::SameZone => ep.zone_hints.contains(zone),
    }
}

fn addrs<'a, F: Family>(endpoints: impl Iterator<Item = &'a Endpoint<F>>) -> Vec<F::Socket> {
    endpoints.map(|ep| ep.addr).collect()
}

/// kube-proxy's endpoint categorisation: ready endpoints (topology-filtered) for
/// Cluster policy, local ones for Local policy, and each falls back to
/// serving-and-terminating endpoints when it has no ready one (KEP-1669).
#[must_use]
pub fn categorize<F: Family>(
    endpoints: &[Endpoint<F>],
    policies: Policies,
    node_name: &str,
    zone: &str,
) -> Categorized<F> {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    if policies.uses_cluster_endpoints() {
        let topology = topology_from_hints(endpoints, node_name, zone);
        out.cluster = addrs(
            endpoints
                .iter()
                .filter(|ep| ep.ready && available_for_topology(ep, topology, node_name, zone)),
        );
        if out.cluster.is_empty() {
            out.cluster = addrs(endpoints.iter().filter(|ep| ep.serving && ep.terminating));
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !policies.uses_local_endpoints() {
        return out;
    }
    let usable = |ep: &&Endpoint<F>| ep.ready || (ep.serving && ep.terminating);
    out.has_any |= endpoints.iter().any(|ep| usable(&ep));
    let local_ready = endpoints.iter().any(|ep| ep.is_local && ep.ready);
    out.local = if local_ready {
        addrs(endpoints.iter().filter(|ep| ep.is_local && ep.ready))
    } else {
        addrs(
            endpoints
                .iter()
                .filter(|ep| ep.is_local && ep.serving && ep.terminating),
        )
    };
    out
}
