//! The pure model: Kubernetes objects in, desired frontends and backends out.
//!
//! No kernel, no network, no clock: [`desired`] is a function of a [`ClusterState`] and
//! [`ModelSettings`], so every rule kube-proxy applies can be table-tested here. Objects
//! that cannot be used produce a [`Diagnostic`] (logged and counted by the agent) and
//! never disturb the other services.
mod endpoints;
mod incremental;
pub(crate) mod sorted;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use endpoints::{categorize, Categorized, Endpoint, Policies};
pub use incremental::{IncrementalModel, ModelChanges};
use proxy_common::{proto, scope, service_flags};

pub use crate::state::{LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};
use crate::{
    family::{is_v4_mapped, Family},
    state::{
        AddressType, ClusterState, IpField, ObjectKey, Protocol, ServiceInfo, ServicePortInfo,
        ServiceSpecInfo, SliceInfo,
    },
};
/// Node label with the topology zone.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// sessionAffinityConfig.clientIP.timeoutSeconds default and maximum.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The most backends one frontend holds: its slots are counted by the 16-bit `count`
/// of its map entry.
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

/// The `limit` of `backends` a frontend of `name` serves when it has more: those whose
/// hash with the service port's name is lowest (rendezvous hashing). The choice is the
/// same on every pass, every node and after a restart, an endpoint joining or leaving
/// moves at most one other in or out, and different services choose differently.
/// Returned in the order given.
#[must_use]
pub fn choose_backends<F: Family>(
    name: &ServicePortName,
    backends: &[F::Socket],
    limit: usize,
) -> Vec<F::Socket> {
    if backends.len() <= limit {
        return backends.to_vec();
    }
    let seed = fnv1a(
        FNV_OFFSET,
        format!("{}/{}/{}", name.service, name.port, name.proto).as_bytes(),
    );
    let mut ranked: Vec<(u64, usize)> = backends
        .iter()
        .enumerate()
        .map(|(index, addr)| (fnv1a(seed, &F::socket_bytes(addr)), index))
        .collect();
    ranked.sort_unstable();
    let mut chosen: Vec<usize> = ranked.into_iter().take(limit).map(|(_, i)| i).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|index| backends[index]).collect()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// 64-bit FNV-1a: small, fixed and the same everywhere (std's hashers promise none of
/// that across releases).
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Settings of this node that shape the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelSettings {
    /// Services labelled with `service.kubernetes.io/service-proxy-name` are ours only
    /// when the label equals this name.
    pub proxy_name: Option<String>,
    /// Node addresses NodePorts listen on (kube-proxy's nodePortAddresses, resolved).
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// The IPv6 ones (the IPv6 frontends' NodePorts).
    pub node_port_addresses_v6: Vec<Ipv6Addr>,
}

/// A service port as kube-proxy names it: service, port name and protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ObjectKey,
    /// Shared with the service's port (interned): every frontend, change and syncer
    /// entry of the port holds a copy of its name.
    pub port: std::sync::Arc<str>,
    pub proto: u8,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.service,
            self.port,
            proto_name(self.proto)
        )
    }
}

/// Lower-case protocol name for logs and labels.
#[must_use]
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        _ => "other",
    }
}

/// Where a frontend listens (an address of family `F`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey<F: Family = Ipv4Addr> {
    pub addr: F,
    pub port: u16,
    pub proto: u8,
    /// [`proxy_common::scope`].
    pub scope: u8,
}

/// What kind of address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// The desired state of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec<F: Family = Ipv4Addr> {
    pub service_port: ServicePortName,
    pub kind: FrontendKind,
    /// Sorted, without duplicates.
    pub backends: Vec<F::Socket>,
    /// [`proxy_common::service_flags`].
    pub flags: u16,
    /// Session affinity timeout (with [`service_flags::AFFINITY`]), else 0.
    pub affinity_timeout_s: u32,
}

/// Why an object (or part of it) was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiagnosticReason {
    /// A field has a value the API would not accept (bad IP, port out of range, ...).
    Malformed,
    /// An address of a family the service does not serve (an IPv6 externalIP of a
    /// service without an IPv6 clusterIP), or an FQDN EndpointSlice.
    UnsupportedIpFamily,
    /// A protocol the datapath does not translate: none since SCTP is (TCP, UDP and
    /// SCTP are; anything else is `Malformed`); kept for its metric label.
    UnsupportedProtocol,
    /// An EndpointSlice names a Service that does not exist (or has no name label).
    OrphanEndpointSlice,
    /// Two services claim the same address, port and protocol; the first keeps it.
    FrontendConflict,
    /// A source file could not be read or parsed (manifest directory source).
    UnreadableSource,
    /// A service port has more usable endpoints than one frontend holds
    /// ([`MAX_BACKENDS_PER_FRONTEND`]): it serves that many of them.
    EndpointLimit,
}

impl DiagnosticReason {
    pub const ALL: [Self; 7] = [
        Self::Malformed,
        Self::UnsupportedIpFamily,
        Self::UnsupportedProtocol,
        Self::OrphanEndpointSlice,
        Self::FrontendConflict,
        Self::UnreadableSource,
        Self::EndpointLimit,
    ];

    /// Metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedIpFamily => "unsupported_ip_family",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::OrphanEndpointSlice => "orphan_endpoint_slice",
            Self::FrontendConflict => "frontend_conflict",
            Self::UnreadableSource => "unreadable_source",
            Self::EndpointLimit => "endpoint_limit",
        }
    }
}

/// One problem with one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// `Service ns/name`, `EndpointSlice ns/name` or a file path.
    pub object: String,
    pub reason: DiagnosticReason,
    pub message: String,
}

/// What one healthCheckNodePort answers: which service, and how many of its endpoints
/// on this node are ready (kube-proxy's `pkg/proxy/healthcheck/service_health.go`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: ObjectKey,
    /// Distinct IPs of ready endpoints on this node, over every port of the service.
    pub local_endpoints: usize,
}

/// What the datapath of one family should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyDesired<F: Family> {
    /// Each spec shared with the output of the service that holds it (the model keeps
    /// both).
    pub frontends: BTreeMap<FrontendKey<F>, std::sync::Arc<FrontendSpec<F>>>,
    /// Addresses of endpoints on this node (their backends need no SNAT from outside).
    pub local_endpoints: BTreeSet<F>,
    /// loadBalancerSourceRanges (CIDRs of this family) of service ports whose
    /// LoadBalancer frontends of this family carry [`service_flags::SOURCE_RANGES`].
    pub source_ranges: BTreeMap<ServicePortName, BTreeSet<(F, u8)>>,
}

impl<F: Family> Default for FamilyDesired<F> {
    fn default() -> Self {
        Self {
            frontends: BTreeMap::new(),
            local_endpoints: BTreeSet::new(),
            source_ranges: BTreeMap::new(),
        }
    }
}

/// Everything the datapath should hold, plus what was skipped and why: each family
/// computed on its own, as kube-proxy's per-family proxiers do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub v4: FamilyDesired<Ipv4Addr>,
    pub v6: FamilyDesired<Ipv6Addr>,
    /// healthCheckNodePort servers this node should run, by port.
    pub health_checks: BTreeMap<u16, ServiceHealth>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Desired {
    fn diagnose(&mut self, object: String, reason: DiagnosticReason, message: String) {
        self.diagnostics.push(Diagnostic {
            object,
            reason,
            message,
        });
    }
}

/// Computes the desired frontends of every service in `state`: the incremental model
/// ([`IncrementalModel`]) run once from empty, so that a pass from scratch and a
/// chain of incremental passes share every rule.
#[must_use]
pub fn desired(state: &ClusterState, settings: &ModelSettings) -> Desired {
    let mut model = IncrementalModel::default();
    model.update(state, settings);
    model.into_desired()
}

/// The service an EndpointSlice belongs to: its `kubernetes.io/service-name` label
/// (`None` without one).
fn slice_service_name(slice: &SliceInfo) -> Option<&str> {
    slice.service_name.as_deref()
}

/// The protocol number of a protocol field, or why there is none.
fn protocol_number(protocol: &Protocol) -> Result<u8, String> {
    match protocol {
        Protocol::Known(number) => Ok(*number),
        Protocol::Unknown(other) => Err(format!("unknown protocol {other:?}")),
    }
}

/// A port number in 1..=65535.
fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

/// A slice with its key.
type KeyedSlice<'a> = (&'a ObjectKey, &'a SliceInfo);

/// One service being turned into frontends.
struct ServiceContext<'a> {
    key: &'a ObjectKey,
    service: &'a ServiceInfo,
    slices: &'a [KeyedSlice<'a>],
    node_name: &'a str,
    zone: &'a str,
    settings: &'a ModelSettings,
}

/// A service's claim on a frontend, ordered by the API's rules: what the API
/// allocated (a ClusterIP, a NodePort) beats what a spec or a load balancer merely
/// names (externalIPs, LoadBalancer ingress IPs); between equal claims the older
/// Service wins (creationTimestamp; unknown counts as newest), then namespace/name.
/// The smaller claim wins.
///
/// Every frontend of default scope has one per claimant (the model keeps them per
/// frontend): packed into 48 bytes, the age as seconds and nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    /// 0 for allocated addresses, 1 for claimed ones.
    rank: u8,
    /// No creationTimestamp: newer than any.
    unknown_age: bool,
    /// The creationTimestamp's seconds and nanoseconds (0 when unknown).
    created_s: i64,
    created_ns: i32,
    service: ObjectKey,
}

const _: () = assert!(size_of::<Claim>() == 48);

impl Claim {
    /// The claim a service created at `created` (if known) makes on a frontend of
    /// `kind`.
    fn new(
        kind: FrontendKind,
        created: Option<k8s_openapi::jiff::Timestamp>,
        service: ObjectKey,
    ) -> Self {
        Self {
            rank: u8::from(matches!(
                kind,
                FrontendKind::ExternalIp | FrontendKind::LoadBalancer
            )),
            unknown_age: created.is_none(),
            created_s: created.map_or(0, |time| time.as_second()),
            created_ns: created.map_or(0, |time| time.subsec_nanosecond()),
            service,
        }
    }

    fn age(&self) -> (bool, i64, i32) {
        (self.unknown_age, self.created_s, self.created_ns)
    }

    /// Why this claim beats `other`.
    fn beats(&self, other: &Self) -> &'static str {
        if self.rank < other.rank {
            "an address the API allocated beats an externalIP or LoadBalancer claim"
        } else if self.age() < other.age() {
            "the older Service wins"
        } else {
            "equal claims of the same age: first by namespace/name"
        }
    }
}

/// Addresses of one family a service answers on, by kind.
struct Addresses<F: Family> {
    cluster_ips: Vec<F>,
    external_ips: Vec<F>,
    load_balancer_ips: Vec<F>,
    /// loadBalancerSourceRanges of this family (address masked, prefix length).
    source_ranges: BTreeSet<(F, u8)>,
}

impl<F: Family> Default for Addresses<F> {
    fn default() -> Self {
        Self {
            cluster_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: BTreeSet::new(),
        }
    }
}

impl<F: Family> Addresses<F> {
    fn sort(&mut self) {
        for list in [
            &mut self.cluster_ips,
            &mut self.external_ips,
            &mut self.load_balancer_ips,
        ] {
            list.sort_unstable();
            list.dedup();
        }
    }
}

/// The addresses of a service, split by family.
#[derive(Default)]
struct FamilyAddresses {
    v4: Addresses<Ipv4Addr>,
    v6: Addresses<Ipv6Addr>,
}

/// What each family's frontends of a service share: computed (and diagnosed) once.
#[derive(Clone, Copy)]
struct ServiceFacts {
    affinity_timeout: Option<u32>,
    internal_local: bool,
    external_local: bool,
}

/// One valid service port (checked, and diagnosed, once for both families).
struct PortFacts {
    name: std::sync::Arc<str>,
    proto: u8,
    port: u16,
    node_port: Option<u16>,
}

/// The IP family name of an address, as `spec.ipFamilies` writes it.
fn family_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::NAME,
        IpAddr::V6(_) => Ipv6Addr::NAME,
    }
}

impl ServiceContext<'_> {
    fn object(&self) -> String {
        format!("Service {}", self.key)
    }

    fn diagnose(&self, out: &mut Desired, reason: DiagnosticReason, message: String) {
        out.diagnose(self.object(), reason, message);
    }

    /// kube-proxy's filters: services for another proxy, headless services and
    /// ExternalName services are not ours.
    fn is_ours(&self) -> bool {
        if let Some(proxy) = self.service.proxy_name.as_deref() {
            if self.settings.proxy_name.as_deref() != Some(proxy) {
                return false;
            }
        }
        if self.service.headless {
            return false;
        }
        let Some(spec) = &self.service.spec else {
            return true;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return false;
        }
        !matches!(&spec.cluster_ip, Some(IpField::Malformed(text)) if &**text == "None")
    }

    /// The addresses of a list of IP fields that can be used, reporting the rest
    /// (malformed, IPv4-mapped IPv6).
    fn ip_list<'s>(
        &self,
        out: &mut Desired,
        what: &str,
        ips: impl Iterator<Item = &'s IpField>,
    ) -> Vec<IpAddr> {
        let mut usable = Vec::new();
        for ip in ips {
            match ip {
                IpField::Ip(addr) if is_v4_mapped(*addr) => self.diagnose(
                    out,
                    DiagnosticReason::Malformed,
                    format!("{what} {addr} is an IPv4-mapped IPv6 address"),
                ),
                IpField::Ip(addr) => usable.push(*addr),
                IpField::Malformed(ip) => self.diagnose(
                    out,
                    DiagnosticReason::Malformed,
                    format!("{what} {ip:?} is not an IP address"),
                ),
            }
        }
        usable
    }

    /// The clusterIPs by family. `clusterIPs` (dual stack) supersedes `clusterIP`;
    /// each entry must be of the family `ipFamilies` lists at its index, as the API
    /// keeps them: one that is not is reported and skipped, the others stay.
    fn cluster_ips(&self, out: &mut Desired, spec: &ServiceSpecInfo, to: &mut FamilyAddresses) {
        let listed = if spec.cluster_ips.is_empty() {
            spec.cluster_ip.as_slice()
        } else {
            &spec.cluster_ips
        };
        for (index, field) in listed.iter().enumerate() {
            let Some(&ip) = self
                .ip_list(out, "clusterIP", std::iter::once(field))
                .first()
            else {
                continue;
            };
            if let Some(family) = spec.ip_families.get(index) {
                if &**family != family_name(ip) {
                    self.diagnose(
                        out,
                        DiagnosticReason::Malformed,
                        format!("clusterIP {ip} is listed under ipFamilies[{index}] {family}"),
                    );
                    continue;
                }
            }
            match ip {
                IpAddr::V4(v4) => to.v4.cluster_ips.push(v4),
                IpAddr::V6(v6) => to.v6.cluster_ips.push(v6),
            }
        }
    }

    /// Splits named addresses (externalIPs, LoadBalancer IPs) by family. A family the
    /// service has no clusterIP of is not served (kube-proxy's proxier of that family
    /// skips the service); `report` says whether that is worth a diagnostic (an
    /// externalIP the user wrote) or not (an ingress IP a load balancer reported).
    fn split(
        &self,
        out: &mut Desired,
        what: &str,
        ips: Vec<IpAddr>,
        report: bool,
        to: &mut FamilyAddresses,
        pick: fn(&mut FamilyAddresses) -> (&mut Vec<Ipv4Addr>, &mut Vec<Ipv6Addr>),
    ) {
        let has_v4 = !to.v4.cluster_ips.is_empty();
        let has_v6 = !to.v6.cluster_ips.is_empty();
        let (v4, v6) = pick(to);
        for ip in ips {
            let served = match ip {
                IpAddr::V4(addr) if has_v4 => {
                    v4.push(addr);
                    true
                }
                IpAddr::V6(addr) if has_v6 => {
                    v6.push(addr);
                    true
                }
                _ => false,
            };
            if !served && report {
                let family = family_name(ip);
                self.diagnose(
                    out,
                    DiagnosticReason::UnsupportedIpFamily,
                    format!("{what} {ip} is {family}; the service has no {family} clusterIP"),
                );
            }
        }
    }

    fn addresses(&self, out: &mut Desired) -> FamilyAddresses {
        let mut addresses = FamilyAddresses::default();
        let Some(spec) = &self.service.spec else {
            return addresses;
        };
        self.cluster_ips(out, spec, &mut addresses);
        let external = self.ip_list(out, "externalIP", spec.external_ips().iter());
        self.split(out, "externalIP", external, true, &mut addresses, |to| {
            (&mut to.v4.external_ips, &mut to.v6.external_ips)
        });
        if spec.type_.as_deref() == Some("LoadBalancer") {
            // ipMode Proxy: the load balancer proxies, so traffic never arrives with
            // the LB IP as destination; kube-proxy skips those.
            let ips = self
                .service
                .load_balancer_ingress
                .iter()
                .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
                .map(|ingress| &ingress.ip);
            let ips = self.ip_list(out, "loadBalancer ingress IP", ips);
            self.split(
                out,
                "loadBalancer ingress IP",
                ips,
                false,
                &mut addresses,
                |to| (&mut to.v4.load_balancer_ips, &mut to.v6.load_balancer_ips),
            );
        }
        // Only ranges of a family restrict that family's traffic; with none valid,
        // kube-proxy (per IP family) installs no filter, and neither do we.
        for range in spec.load_balancer_source_ranges() {
            match parse_cidr(range) {
                Ok((addr, _)) if is_v4_mapped(addr) => self.diagnose(
                    out,
                    DiagnosticReason::Malformed,
                    format!("loadBalancerSourceRange {range:?} is an IPv4-mapped IPv6 range"),
                ),
                Ok((IpAddr::V4(addr), len)) => {
                    addresses.v4.source_ranges.insert((addr, len));
                }
                Ok((IpAddr::V6(addr), len)) => {
                    addresses.v6.source_ranges.insert((addr, len));
                }
                Err(message) => self.diagnose(
                    out,
                    DiagnosticReason::Malformed,
                    format!("loadBalancerSourceRange {message}"),
                ),
            }
        }
        addresses.v4.sort();
        addresses.v6.sort();
        addresses
    }

    fn affinity_timeout(&self, out: &mut Desired) -> Option<u32> {
        let spec = self.service.spec.as_ref()?;
        if !spec.client_ip_affinity {
            return None;
        }
        match spec.affinity_timeout_seconds() {
            None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
            Some(seconds) => match u32::try_from(seconds) {
                Ok(seconds) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&seconds) => Some(seconds),
                _ => {
                    self.diagnose(
                        out,
                        DiagnosticReason::Malformed,
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside \
                             1..={MAX_AFFINITY_TIMEOUT_S}; using {DEFAULT_AFFINITY_TIMEOUT_S}"
                        ),
                    );
                    Some(DEFAULT_AFFINITY_TIMEOUT_S)
                }
            },
        }
    }

    /// Reports the service's slices that no family uses: FQDN slices (kube-proxy
    /// ignores them) and unknown address types. Once per service, not per port.
    fn report_slices(&self, out: &mut Desired) {
        for &(slice_name, slice) in self.slices {
            match &slice.address_type {
                AddressType::IPv4 | AddressType::IPv6 => {}
                AddressType::Fqdn => out.diagnose(
                    format!("EndpointSlice {slice_name}"),
                    DiagnosticReason::UnsupportedIpFamily,
                    "addressType FQDN: kube-proxy serves IPv4 and IPv6 endpoints only".into(),
                ),
                AddressType::Unknown(other) => out.diagnose(
                    format!("EndpointSlice {slice_name}"),
                    DiagnosticReason::Malformed,
                    format!("unknown addressType {other:?}"),
                ),
            }
        }
    }

    /// The endpoints of one service port of family `F`, from every slice of the
    /// service with that family's addressType (kube-proxy's proxier of a family
    /// reads only its family's slices).
    fn endpoints<F: Family>(
        &self,
        out: &mut Desired,
        port_name: &str,
        proto: u8,
    ) -> Vec<Endpoint<F>> {
        let mut found: BTreeMap<F::Socket, Endpoint<F>> = BTreeMap::new();
        for &(slice_name, slice) in self.slices {
            if slice.address_type != F::ADDRESS_TYPE {
                continue;
            }
            let matching_port = slice.ports.iter().find(|port| {
                &*port.name == port_name && protocol_number(&port.protocol) == Ok(proto)
            });
            let Some(target_port) = matching_port.and_then(|port| port.port) else {
                continue;
            };
            let Some(target_port) = valid_port(target_port) else {
                out.diagnose(
                    format!("EndpointSlice {slice_name}"),
                    DiagnosticReason::Malformed,
                    format!("port {target_port} of {port_name:?} is outside 1..=65535"),
                );
                continue;
            };
            for endpoint in &slice.endpoints {
                // kube-proxy uses the first address of an endpoint only.
                let Some(ip) = endpoint.address().ip().and_then(F::of) else {
                    out.diagnose(
                        format!("EndpointSlice {slice_name}"),
                        DiagnosticReason::Malformed,
                        format!(
                            "endpoint address {:?} is not an {} address",
                            endpoint.address().to_string(),
                            F::NAME
                        ),
                    );
                    continue;
                };
                let hints = endpoint.hints();
                let addr = F::socket(ip, target_port);
                let candidate = Endpoint {
                    addr,
                    ready: endpoint.ready(),
                    serving: endpoint.serving(),
                    terminating: endpoint.terminating(),
                    is_local: !self.node_name.is_empty()
                        && endpoint.node_name().map(|name| &**name) == Some(self.node_name),
                    zone_hints: hints
                        .into_iter()
                        .flat_map(|h| h.for_zones.iter())
                        .map(|zone| zone.to_string())
                        .collect::<BTreeSet<_>>(),
                    node_hints: hints
                        .into_iter()
                        .flat_map(|h| h.for_nodes.iter())
                        .map(|node| node.to_string())
                        .collect::<BTreeSet<_>>(),
                };
                // The same address in two slices (a reused pod IP, an endpoint moving
                // between slices): like kube-proxy, a terminating copy never replaces
                // a live one.
                let keep_existing = found
                    .get(&addr)
                    .is_some_and(|existing| candidate.terminating && !existing.terminating);
                if !keep_existing {
                    found.insert(addr, candidate);
                }
            }
        }
        found.into_values().collect()
    }

    fn add_frontends(&self, out: &mut Desired) {
        if !self.is_ours() {
            return;
        }
        let Some(spec) = &self.service.spec else {
            self.diagnose(out, DiagnosticReason::Malformed, "no spec".into());
            return;
        };
        let addresses = self.addresses(out);
        if addresses.v4.cluster_ips.is_empty() && addresses.v6.cluster_ips.is_empty() {
            // No ClusterIP (not yet allocated, or none usable): nothing to translate.
            return;
        }
        self.report_slices(out);
        // One health check server per port (as kube-proxy's, which its proxiers
        // share): it counts the endpoints of the service's first family.
        if addresses.v4.cluster_ips.is_empty() {
            self.add_health_check::<Ipv6Addr>(out, spec);
        } else {
            self.add_health_check::<Ipv4Addr>(out, spec);
        }
        let facts = ServiceFacts {
            affinity_timeout: self.affinity_timeout(out),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy() == Some("Local"),
        };
        let is_node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        for port in &spec.ports {
            let Some(port) = self.port_facts(out, port, is_node_port_type) else {
                continue;
            };
            if !addresses.v4.cluster_ips.is_empty() {
                self.add_port_frontends(out, &port, &addresses.v4, facts);
            }
            if !addresses.v6.cluster_ips.is_empty() {
                self.add_port_frontends(out, &port, &addresses.v6, facts);
            }
        }
    }

    /// kube-proxy serves a health check for a service exactly when its `NeedsHealthCheck`
    /// holds (type LoadBalancer and externalTrafficPolicy Local) and it has ports; a
    /// NodePort service with Local policy gets none. Called only for services with a
    /// ClusterIP, as kube-proxy's proxiers see no others.
    fn add_health_check<F: Family>(&self, out: &mut Desired, spec: &ServiceSpecInfo) {
        let needs_health_check = spec.type_.as_deref() == Some("LoadBalancer")
            && spec.external_traffic_policy() == Some("Local")
            && !spec.ports.is_empty();
        if !needs_health_check {
            return;
        }
        let port = match spec.health_check_node_port() {
            // The API allocates one for every such service; without it, load balancers
            // cannot tell which nodes have endpoints (kube-proxy logs and goes on).
            None | Some(0) => {
                self.diagnose(
                    out,
                    DiagnosticReason::Malformed,
                    "externalTrafficPolicy Local without a healthCheckNodePort".into(),
                );
                return;
            }
            Some(number) => match valid_port(number) {
                Some(port) => port,
                None => {
                    self.diagnose(
                        out,
                        DiagnosticReason::Malformed,
                        format!("healthCheckNodePort {number} is outside 1..=65535"),
                    );
                    return;
                }
            },
        };
        // Two services with one port: decided across services by IncrementalModel
        // (the first in key order keeps it, as kube-proxy binds it first).
        let local_endpoints = self.local_ready_endpoints::<F>();
        out.health_checks.insert(
            port,
            ServiceHealth {
                service: self.key.clone(),
                local_endpoints,
            },
        );
    }

    /// kube-proxy's `EndpointsMap.LocalReadyEndpoints` (pkg/proxy/endpointschangetracker.go):
    /// this node's ready endpoints over every port of the service's slices, counted
    /// by IP, so a pod serving two ports counts once. Serving-but-terminating endpoints
    /// do not count even when the frontends fall back to them (KEP-1669): the check
    /// fails so load balancers drain the node while its connections finish.
    fn local_ready_endpoints<F: Family>(&self) -> usize {
        let ports: BTreeSet<(&str, u8)> = self
            .slices
            .iter()
            .flat_map(|(_, slice)| slice.ports.iter())
            .filter_map(|port| {
                let proto = protocol_number(&port.protocol).ok()?;
                Some((&*port.name, proto))
            })
            .collect();
        // Problems in these slices are reported by the frontends of the service's own
        // ports; reporting them again per slice port would only duplicate them.
        let mut unreported = Desired::default();
        let ips: BTreeSet<F> = ports
            .iter()
            .flat_map(|(name, proto)| self.endpoints::<F>(&mut unreported, name, *proto))
            .filter(|endpoint| endpoint.is_local && endpoint.ready)
            .map(|endpoint| F::socket_ip(&endpoint.addr))
            .collect();
        ips.len()
    }

    /// Checks one service port (reported once, whatever the families).
    fn port_facts(
        &self,
        out: &mut Desired,
        port: &ServicePortInfo,
        is_node_port_type: bool,
    ) -> Option<PortFacts> {
        let port_name = std::sync::Arc::clone(&port.name);
        let proto = match protocol_number(&port.protocol) {
            Ok(proto) => proto,
            Err(message) => {
                self.diagnose(
                    out,
                    DiagnosticReason::Malformed,
                    format!("port {port_name:?}: {message}"),
                );
                return None;
            }
        };
        let Some(service_port) = valid_port(port.port) else {
            self.diagnose(
                out,
                DiagnosticReason::Malformed,
                format!(
                    "port {port_name:?} number {} is outside 1..=65535",
                    port.port
                ),
            );
            return None;
        };
        let node_port = match port.node_port.filter(|_| is_node_port_type) {
            None => None,
            Some(number) => match valid_port(number) {
                Some(node_port) => Some(node_port),
                None => {
                    self.diagnose(
                        out,
                        DiagnosticReason::Malformed,
                        format!("nodePort {number} of port {port_name:?} is outside 1..=65535"),
                    );
                    None
                }
            },
        };
        Some(PortFacts {
            name: port_name,
            proto,
            port: service_port,
            node_port,
        })
    }

    /// The frontends of one service port in family `F`.
    fn add_port_frontends<F: Family>(
        &self,
        out: &mut Desired,
        port: &PortFacts,
        addresses: &Addresses<F>,
        facts: ServiceFacts,
    ) {
        let proto = port.proto;
        let service_port = port.port;
        let node_port = port.node_port;
        let node_port_addresses = F::node_port_addresses(self.settings);
        let has_external = node_port.is_some()
            || !addresses.external_ips.is_empty()
            || !addresses.load_balancer_ips.is_empty();
        let policies = Policies {
            internal_local: facts.internal_local,
            external_local: facts.external_local && has_external,
            has_external,
        };
        let endpoints = self.endpoints::<F>(out, &port.name, proto);
        F::part_mut(out).local_endpoints.extend(
            endpoints
                .iter()
                .filter(|endpoint| endpoint.is_local)
                .map(|endpoint| F::socket_ip(&endpoint.addr)),
        );
        let mut categorized = categorize(&endpoints, policies, self.node_name, self.zone);

        let name = ServicePortName {
            service: self.key.clone(),
            port: port.name.clone(),
            proto,
        };
        let usable = categorized.cluster.len().max(categorized.local.len());
        if usable > MAX_BACKENDS_PER_FRONTEND {
            self.diagnose(
                out,
                DiagnosticReason::EndpointLimit,
                format!(
                    "port {:?} has {usable} usable endpoints; a frontend holds at most \
                     {MAX_BACKENDS_PER_FRONTEND}, so it serves that many (a stable choice)",
                    name.port
                ),
            );
            categorized.cluster =
                choose_backends::<F>(&name, &categorized.cluster, MAX_BACKENDS_PER_FRONTEND);
            categorized.local =
                choose_backends::<F>(&name, &categorized.local, MAX_BACKENDS_PER_FRONTEND);
        }
        let mut base_flags = 0;
        if facts.affinity_timeout.is_some() {
            base_flags |= service_flags::AFFINITY;
        }
        let spec_for = |kind: FrontendKind, backends: &[F::Socket], mut flags: u16| {
            // With endpoints somewhere but none usable here (Local policies),
            // kube-proxy drops; with no endpoints at all, it rejects.
            if backends.is_empty() && categorized.has_any {
                flags |= service_flags::DROP_WHEN_EMPTY;
            }
            FrontendSpec::<F> {
                service_port: name.clone(),
                kind,
                backends: backends.to_vec(),
                flags: base_flags | flags,
                affinity_timeout_s: facts.affinity_timeout.unwrap_or(0),
            }
        };

        let internal_backends = if facts.internal_local {
            &categorized.local
        } else {
            &categorized.cluster
        };
        for &addr in &addresses.cluster_ips {
            let spec = spec_for(FrontendKind::ClusterIp, internal_backends, 0);
            self.insert(
                out,
                FrontendKey {
                    addr,
                    port: service_port,
                    proto,
                    scope: scope::DEFAULT,
                },
                spec,
            );
        }

        let (external_backends, mut external_flags) = if policies.external_local {
            (
                &categorized.local,
                service_flags::EXTERNAL | service_flags::EXTERNAL_LOCAL,
            )
        } else {
            (&categorized.cluster, service_flags::EXTERNAL)
        };
        if policies.external_local {
            // Pods on this node reaching an external address of a Local-policy service
            // go to any endpoint, as kube-proxy short-circuits them to the service chain.
            external_flags |= service_flags::HAS_INTERNAL_SCOPE;
        }
        let has_source_ranges = !addresses.source_ranges.is_empty();
        if has_source_ranges && !addresses.load_balancer_ips.is_empty() {
            F::part_mut(out)
                .source_ranges
                .insert(name.clone(), addresses.source_ranges.clone());
        }
        let external = addresses
            .external_ips
            .iter()
            .map(|&addr| (FrontendKind::ExternalIp, addr, service_port))
            .chain(
                addresses
                    .load_balancer_ips
                    .iter()
                    .map(|&addr| (FrontendKind::LoadBalancer, addr, service_port)),
            )
            .chain(node_port.into_iter().flat_map(|node_port| {
                node_port_addresses
                    .iter()
                    .map(move |&addr| (FrontendKind::NodePort, addr, node_port))
            }));
        for (kind, addr, port) in external {
            let mut flags = external_flags;
            if kind == FrontendKind::LoadBalancer && has_source_ranges {
                flags |= service_flags::SOURCE_RANGES;
            }
            let key = FrontendKey {
                addr,
                port,
                proto,
                scope: scope::DEFAULT,
            };
            let held = self.insert(out, key, spec_for(kind, external_backends, flags));
            if held && policies.external_local {
                // Cluster-internal clients get the ClusterIP's backend set.
                let internal = FrontendKey {
                    scope: scope::INTERNAL,
                    ..key
                };
                let internal_spec = spec_for(kind, internal_backends, service_flags::EXTERNAL);
                self.insert(out, internal, internal_spec);
            }
        }
    }

    /// Adds a frontend unless an earlier port of this service holds it (reported).
    /// Each one of default scope is this service's claim against other services'
    /// for it (see [`Claim`]; a cluster-internal twin follows the frontend it is the
    /// twin of). Returns whether this port holds the frontend within its service.
    fn insert<F: Family>(
        &self,
        out: &mut Desired,
        key: FrontendKey<F>,
        spec: FrontendSpec<F>,
    ) -> bool {
        if let Some(existing) = F::part(out).frontends.get(&key) {
            // Two ports of one service on one frontend: the first keeps it.
            if existing.service_port != spec.service_port {
                let message = conflict(
                    &key,
                    &existing.service_port,
                    "the same service's earlier port",
                );
                self.diagnose(out, DiagnosticReason::FrontendConflict, message);
            }
            return false;
        }
        F::part_mut(out)
            .frontends
            .insert(key, std::sync::Arc::new(spec));
        true
    }
}

/// The message of a frontend conflict: who holds `key`, and by which right.
fn conflict<F: Family>(key: &FrontendKey<F>, holder: &ServicePortName, why: &str) -> String {
    let addr: IpAddr = key.addr.into();
    let addr = match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!(
        "{addr}:{}/{} is held by {holder} ({why})",
        key.port,
        proto_name(key.proto),
    )
}

/// Parses one loadBalancerSourceRanges entry (`a.b.c.d/len`, spaces trimmed as
/// kube-proxy does); the address is masked to its prefix.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let text = text.trim();
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|len| *len <= max)
        .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?;
    // Masked, so two spellings of one range are one entry (IPv6 too: the trie keys
    // of one range must be equal to be written once).
    let addr = match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4.masked(len)),
        IpAddr::V6(v6) => IpAddr::V6(v6.masked(len)),
    };
    Ok((addr, len))
}
