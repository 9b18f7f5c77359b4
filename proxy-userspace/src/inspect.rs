//! Reading a running node's pinned maps: what `kpr inspect` and `kpr trace` print.
//!
//! Everything here reads only; it never writes a map, so it is safe next to a running
//! agent. Views are plain serializable structs, printed as tables or JSON by `main`.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use proxy_common::{
    counter, ct_flags, names, proto, scope, service_flags, sock, AffinityValueV4, Be16, Be32,
    Be32x4, CtEntryV4, CtEntryV6, CtKeyV4, CtKeyV6, ServiceValueV4, SockAffinityKeyV4, SockConfig,
    SockRevKeyV4, SockRevKeyV6, SockRevValueV4, SockRevValueV6, COUNTER_NAMES,
};
use serde::Serialize;

use crate::{
    datapath::conntrack::{CtLayout, V4, V6},
    family::Family,
    names as published,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the pinned map {path} (is the agent running with this --bpffs?)")]
    Open {
        path: String,
        source: aya::maps::MapError,
    },
    #[error("reading {name}")]
    Read {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// A conntrack entry of either family, as the views show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow {
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    nat_src: SocketAddr,
    nat_dst: SocketAddr,
    flags: u16,
    service_id: u32,
    backend_id: u32,
    last_seen_ns: u64,
}

/// What `kpr inspect` reads of one family's maps: their layouts, read into the
/// family-neutral views by one code path ([`Family`] has the rest).
trait Tables: Family {
    /// The family's conntrack and affinity layouts and names.
    type Ct: CtLayout;
    /// The socket-layer affinity map (keyed by network namespace, both families).
    const SOCK_AFFINITY: &'static str;
    /// What a frontend without endpoints answers.
    const REJECT: &'static str;
    fn backend_socket(backend: &Self::Backend) -> SocketAddr;
    fn flow(key: &CtKey<Self>, entry: &CtEntry<Self>) -> Flow;
    /// Client address and service id of an affinity record.
    fn affinity_client(key: &AffinityKey<Self>) -> (IpAddr, u32);
    fn pins(maps: &PinnedMaps) -> Option<&FamilyPins<Self>>;
}

type CtKey<F> = <<F as Tables>::Ct as CtLayout>::Key;
type CtEntry<F> = <<F as Tables>::Ct as CtLayout>::Entry;
type AffinityKey<F> = <<F as Tables>::Ct as CtLayout>::AffinityKey;

fn v4(addr: Be32, port: Be16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(addr.to_ipv4()), port.to_host())
}

fn v6(addr: Be32x4, port: Be16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(addr.to_ipv6()), port.to_host())
}

impl Tables for Ipv4Addr {
    type Ct = V4;
    const SOCK_AFFINITY: &'static str = sock::AFFINITY_V4_NAME;
    const REJECT: &'static str = "reject (ICMP port unreachable)";

    fn backend_socket(backend: &Self::Backend) -> SocketAddr {
        v4(backend.addr, backend.port)
    }

    fn flow(key: &CtKeyV4, entry: &CtEntryV4) -> Flow {
        Flow {
            proto: key.proto,
            src: v4(key.src_addr, key.src_port),
            dst: v4(key.dst_addr, key.dst_port),
            nat_src: v4(entry.nat_src_addr, entry.nat_src_port),
            nat_dst: v4(entry.nat_dst_addr, entry.nat_dst_port),
            flags: entry.flags,
            service_id: entry.service_id,
            backend_id: entry.backend_id,
            last_seen_ns: entry.last_seen_ns,
        }
    }

    fn affinity_client(key: &AffinityKey<Self>) -> (IpAddr, u32) {
        (IpAddr::V4(key.client_addr.to_ipv4()), key.service_id)
    }

    fn pins(maps: &PinnedMaps) -> Option<&FamilyPins<Self>> {
        Some(&maps.v4)
    }
}

impl Tables for Ipv6Addr {
    type Ct = V6;
    const SOCK_AFFINITY: &'static str = sock::AFFINITY_V6_NAME;
    const REJECT: &'static str = "reject (ICMPv6 port unreachable)";

    fn backend_socket(backend: &Self::Backend) -> SocketAddr {
        v6(backend.addr, backend.port)
    }

    fn flow(key: &CtKeyV6, entry: &CtEntryV6) -> Flow {
        Flow {
            proto: key.proto,
            src: v6(key.src_addr, key.src_port),
            dst: v6(key.dst_addr, key.dst_port),
            nat_src: v6(entry.nat_src_addr, entry.nat_src_port),
            nat_dst: v6(entry.nat_dst_addr, entry.nat_dst_port),
            flags: entry.flags,
            service_id: entry.service_id,
            backend_id: entry.backend_id,
            last_seen_ns: entry.last_seen_ns,
        }
    }

    fn affinity_client(key: &AffinityKey<Self>) -> (IpAddr, u32) {
        (IpAddr::V6(key.client_addr.to_ipv6()), key.service_id)
    }

    fn pins(maps: &PinnedMaps) -> Option<&FamilyPins<Self>> {
        maps.v6.as_ref()
    }
}

/// One family's pinned maps.
struct FamilyPins<F: Tables> {
    services: HashMap<MapData, F::ServiceKey, ServiceValueV4>,
    backends: HashMap<MapData, u32, F::Backend>,
    conntrack: HashMap<MapData, CtKey<F>, CtEntry<F>>,
    conntrack_new: HashMap<MapData, CtKey<F>, CtEntry<F>>,
    affinity: HashMap<MapData, AffinityKey<F>, AffinityValueV4>,
    sock_affinity: HashMap<MapData, SockAffinityKeyV4, AffinityValueV4>,
}

impl<F: Tables> FamilyPins<F> {
    fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            services: hash(pin_dir, F::SERVICES_MAP, false)?,
            backends: hash(pin_dir, F::BACKENDS_MAP, false)?,
            conntrack: hash(pin_dir, F::Ct::CONNTRACK, false)?,
            conntrack_new: hash(pin_dir, F::Ct::CONNTRACK_NEW, true)?,
            affinity: hash(pin_dir, F::Ct::AFFINITY, true)?,
            sock_affinity: hash(pin_dir, F::SOCK_AFFINITY, true)?,
        })
    }

    fn service_entries(&self) -> Result<BTreeMap<F::ServiceKey, ServiceValueV4>> {
        self.services
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Read {
                name: F::SERVICES_MAP,
                source,
            })
    }

    fn backend(&self, id: u32) -> Option<SocketAddr> {
        self.backends
            .get(&id, 0)
            .ok()
            .map(|backend| F::backend_socket(&backend))
    }
}

/// The pinned maps of a node.
pub struct PinnedMaps {
    v4: FamilyPins<Ipv4Addr>,
    /// Absent on a node whose agent predates the IPv6 maps.
    v6: Option<FamilyPins<Ipv6Addr>>,
    counters: PerCpuArray<MapData, u64>,
    sock_reverse: HashMap<MapData, SockRevKeyV4, SockRevValueV4>,
    /// Absent on a node whose agent predates the AF_INET6 hooks.
    sock_reverse_v6: Option<HashMap<MapData, SockRevKeyV6, SockRevValueV6>>,
    sock_config: Array<MapData, SockConfig>,
}

fn open(pin_dir: &Path, name: &'static str) -> Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).map_err(|source| Error::Open {
        path: path.display().to_string(),
        source,
    })
}

fn hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
    lru: bool,
) -> Result<HashMap<MapData, K, V>> {
    let data = open(pin_dir, name)?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    HashMap::try_from(map).map_err(|source| Error::Read { name, source })
}

impl PinnedMaps {
    /// Opens the maps pinned in `pin_dir`.
    ///
    /// # Errors
    /// When a map is not pinned there or has another layout.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            v4: FamilyPins::open(pin_dir)?,
            v6: pin_dir
                .join(names::SERVICES_V6)
                .exists()
                .then(|| FamilyPins::open(pin_dir))
                .transpose()?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, names::COUNTERS)?))
                .map_err(|source| Error::Read {
                    name: names::COUNTERS,
                    source,
                })?,
            sock_reverse: hash(pin_dir, sock::RNAT_V4_NAME, true)?,
            sock_reverse_v6: pin_dir
                .join(sock::RNAT_V6_NAME)
                .exists()
                .then(|| hash(pin_dir, sock::RNAT_V6_NAME, true))
                .transpose()?,
            sock_config: Array::try_from(Map::Array(open(pin_dir, sock::CONFIG_NAME)?)).map_err(
                |source| Error::Read {
                    name: sock::CONFIG_NAME,
                    source,
                },
            )?,
        })
    }
}

fn protocol_name(number: u8) -> String {
    match number {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

/// The names the agent published ([`crate::names`]), indexed for lookups; empty when
/// there is no names file (then ids stand in for names).
#[derive(Clone, Debug, Default)]
pub struct NameIndex {
    service_ports: BTreeMap<u32, published::ServicePortNames>,
    kinds: BTreeMap<(SocketAddr, String, u8), String>,
    endpoints: BTreeMap<(String, String, IpAddr), published::EndpointNames>,
}

impl NameIndex {
    #[must_use]
    pub fn new(names: Option<published::Names>) -> Self {
        let Some(names) = names else {
            return Self::default();
        };
        Self {
            service_ports: names
                .service_ports
                .into_iter()
                .map(|port| (port.service_id, port))
                .collect(),
            kinds: names
                .frontends
                .into_iter()
                .map(|f| ((f.address, f.protocol, f.scope), f.kind))
                .collect(),
            endpoints: names
                .endpoints
                .into_iter()
                .map(|e| {
                    (
                        (e.namespace.to_string(), e.service.to_string(), e.address),
                        e,
                    )
                })
                .collect(),
        }
    }

    /// Reads the names file of the agent on `pin_dir` (none yet: an empty index).
    ///
    /// # Errors
    /// When the file exists but cannot be read.
    pub fn read(pin_dir: &Path) -> std::result::Result<Self, published::Error> {
        published::read(&published::path_for(pin_dir)).map(Self::new)
    }

    /// `namespace/name:port` of a service port (`service id N` when unknown).
    #[must_use]
    pub fn service_port(&self, service_id: u32) -> String {
        match self.service_ports.get(&service_id) {
            Some(port) if port.port.is_empty() => format!("{}/{}", port.namespace, port.name),
            Some(port) => format!("{}/{}:{}", port.namespace, port.name, port.port),
            None => format!("service id {service_id} (no names file)"),
        }
    }
}

/// A backend as the operator knows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    /// Pod address and target port.
    pub address: String,
    /// The Pod (the endpoint's targetRef).
    pub pod: Option<String>,
    pub node: Option<String>,
    /// The endpoint's conditions; `None` when the agent published no names.
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl BackendView {
    /// `10.244.1.11:8080 (web-0 ready)`.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut words: Vec<&str> = Vec::new();
        if let Some(pod) = &self.pod {
            words.push(pod);
        }
        match (self.ready, self.serving, self.terminating) {
            (Some(true), _, _) => words.push("ready"),
            (Some(false), Some(true), Some(true)) => words.push("serving terminating"),
            (Some(false), _, Some(true)) => words.push("terminating"),
            (Some(false), _, _) => words.push("not ready"),
            (None, _, _) => {}
        }
        if words.is_empty() {
            self.address.clone()
        } else {
            format!("{} ({})", self.address, words.join(" "))
        }
    }
}

/// A frontend and its backends, named as Kubernetes names them.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The service port's name (empty for an unnamed single port).
    pub port: Option<String>,
    /// `namespace/name:port`, or `service id N (no names file)` when the agent
    /// published no names.
    pub service: String,
    /// `ClusterIP`, `NodePort`, `externalIP` or `LoadBalancer` (`unknown` without names).
    #[serde(rename = "type")]
    pub kind: String,
    pub frontend: String,
    pub protocol: String,
    /// `all` (every client), or `in-cluster` (the backend set pods get for an
    /// externalTrafficPolicy Local frontend).
    pub clients: &'static str,
    /// The traffic policies and filters in force, in words.
    pub policy: Vec<String>,
    /// What happens to a new connection when `backends` is empty.
    pub when_empty: &'static str,
    pub backends: Vec<BackendView>,
    #[serde(skip)]
    pub service_id: u32,
    #[serde(skip)]
    pub flags: u16,
    #[serde(skip)]
    pub scope: u8,
    #[serde(skip)]
    pub affinity_timeout_s: u32,
}

fn kind_rank(kind: &str) -> u8 {
    match kind {
        "ClusterIP" => 0,
        "NodePort" => 1,
        "externalIP" => 2,
        "LoadBalancer" => 3,
        _ => 4,
    }
}

/// The policies a frontend's flags (and its service's spec) put in force, in words.
fn policy_words(
    value: &ServiceValueV4,
    key_scope: u8,
    port: Option<&published::ServicePortNames>,
) -> Vec<String> {
    let mut words = Vec::new();
    let flags = value.flags;
    if flags & service_flags::AFFINITY != 0 {
        words.push(format!(
            "sessionAffinity ClientIP ({} s)",
            value.affinity_timeout_s
        ));
    }
    if key_scope == scope::INTERNAL {
        words.push("pods on this node get every endpoint".to_owned());
    } else if flags & service_flags::EXTERNAL_LOCAL != 0 {
        words.push("externalTrafficPolicy Local (client address kept)".to_owned());
    } else if flags & service_flags::EXTERNAL != 0 {
        words.push(
            "externalTrafficPolicy Cluster (masqueraded to endpoints on other nodes)".to_owned(),
        );
    } else if port.is_some_and(|port| port.internal_traffic_policy == "Local") {
        words.push("internalTrafficPolicy Local".to_owned());
    }
    if flags & service_flags::SOURCE_RANGES != 0 {
        words.push("loadBalancerSourceRanges".to_owned());
    }
    words
}

/// Which frontends [`services`] lists.
#[derive(Clone, Debug, Default)]
pub struct ServiceFilter {
    /// Only this service (`namespace/name`; a bare name means namespace `default`).
    pub service: Option<String>,
}

impl ServiceFilter {
    fn matches(&self, namespace: Option<&str>, name: Option<&str>) -> bool {
        let Some(wanted) = &self.service else {
            return true;
        };
        let (wanted_namespace, wanted_name) = wanted.split_once('/').unwrap_or(("default", wanted));
        namespace == Some(wanted_namespace) && name == Some(wanted_name)
    }
}

fn family_services<F: Tables>(
    maps: &PinnedMaps,
    index: &NameIndex,
    filter: &ServiceFilter,
    views: &mut Vec<ServiceView>,
) -> Result<()> {
    let Some(pins) = F::pins(maps) else {
        return Ok(());
    };
    let entries = pins.service_entries()?;
    for (key, value) in entries.iter().filter(|(key, _)| F::key_slot(key) == 0) {
        let port = index.service_ports.get(&value.service_id);
        let namespace = port.map(|port| port.namespace.clone());
        let name = port.map(|port| port.name.clone());
        if !filter.matches(namespace.as_deref(), name.as_deref()) {
            continue;
        }
        let frontend = F::key_frontend(key);
        let (address, l4_proto, key_scope) = (
            SocketAddr::new(frontend.addr.into(), frontend.port),
            frontend.proto,
            frontend.scope,
        );
        let protocol = protocol_name(l4_proto);
        let mut backends: Vec<BackendView> = (1..=value.count)
            .filter_map(|slot| entries.get(&F::key_with_slot(key, slot)))
            .filter_map(|slot_value| pins.backend(slot_value.backend_id))
            .map(|backend| {
                let endpoint = port.and_then(|port| {
                    index
                        .endpoints
                        .get(&(port.namespace.clone(), port.name.clone(), backend.ip()))
                });
                BackendView {
                    address: backend.to_string(),
                    pod: endpoint.and_then(|e| e.pod.as_deref().map(str::to_owned)),
                    node: endpoint.and_then(|e| e.node.as_deref().map(str::to_owned)),
                    ready: endpoint.map(|e| e.ready),
                    serving: endpoint.map(|e| e.serving),
                    terminating: endpoint.map(|e| e.terminating),
                }
            })
            .collect();
        backends.sort_by(|a, b| (&a.pod, &a.address).cmp(&(&b.pod, &b.address)));
        views.push(ServiceView {
            service: index.service_port(value.service_id),
            port: port.map(|port| port.port.clone()),
            namespace,
            name,
            kind: index
                .kinds
                .get(&(address, protocol.clone(), key_scope))
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned()),
            frontend: address.to_string(),
            protocol,
            clients: if key_scope == scope::INTERNAL {
                "in-cluster"
            } else {
                "all"
            },
            policy: policy_words(value, key_scope, port),
            when_empty: if value.flags & service_flags::DROP_WHEN_EMPTY != 0 {
                "drop (endpoints only on other nodes)"
            } else {
                F::REJECT
            },
            backends,
            service_id: value.service_id,
            flags: value.flags,
            scope: key_scope,
            affinity_timeout_s: value.affinity_timeout_s,
        });
    }
    Ok(())
}

/// Every frontend of both families (or those `filter` keeps), sorted by
/// namespace/name, port name, frontend type, address and scope.
///
/// # Errors
/// When a map cannot be read.
pub fn services(
    maps: &PinnedMaps,
    index: &NameIndex,
    filter: &ServiceFilter,
) -> Result<Vec<ServiceView>> {
    let mut views = Vec::new();
    family_services::<Ipv4Addr>(maps, index, filter, &mut views)?;
    family_services::<Ipv6Addr>(maps, index, filter, &mut views)?;
    views.sort_by(|a, b| {
        (
            &a.namespace,
            &a.name,
            &a.port,
            kind_rank(&a.kind),
            &a.frontend,
            &a.protocol,
            a.scope,
        )
            .cmp(&(
                &b.namespace,
                &b.name,
                &b.port,
                kind_rank(&b.kind),
                &b.frontend,
                &b.protocol,
                b.scope,
            ))
    });
    Ok(views)
}

/// One conntrack entry.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FlowView {
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// "original" or "reply".
    pub direction: &'static str,
    /// What the datapath rewrites, e.g. `dst -> 10.244.1.11:8080`.
    pub rewrite: String,
    /// "established" (seen both ways, never evicted) or "new" (evictable by floods).
    pub table: &'static str,
    /// The flow's state: `syn_sent`, `syn_received`, `established`,
    /// `fin_from_client`, `fin_from_server`, `closed`, `reset` (TCP), or
    /// `unreplied`, `replied`, `assured` (UDP).
    pub state: &'static str,
    /// The close timeout applies (both sides sent FIN, or one a RST).
    pub closing: bool,
    pub service_id: u32,
    pub backend_id: u32,
    pub idle_s: f64,
}

/// Which flows to show.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// Either end (before or after translation) has this address (of either family).
    pub addr: Option<IpAddr>,
    /// Either end has this port.
    pub port: Option<u16>,
    pub protocol: Option<u8>,
}

/// Conntrack entries of both families that match `filter`.
///
/// # Errors
/// When the map cannot be read.
pub fn conntrack(maps: &PinnedMaps, filter: &FlowFilter, now_ns: u64) -> Result<Vec<FlowView>> {
    let mut flows = Vec::new();
    family_conntrack::<Ipv4Addr>(maps, filter, now_ns, &mut flows);
    family_conntrack::<Ipv6Addr>(maps, filter, now_ns, &mut flows);
    flows.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
    Ok(flows)
}

fn family_conntrack<F: Tables>(
    maps: &PinnedMaps,
    filter: &FlowFilter,
    now_ns: u64,
    flows: &mut Vec<FlowView>,
) {
    let Some(pins) = F::pins(maps) else {
        return;
    };
    let tables = [
        ("established", &pins.conntrack),
        ("new", &pins.conntrack_new),
    ];
    for (table, entry) in tables
        .into_iter()
        .flat_map(|(table, map)| map.iter().map(move |entry| (table, entry)))
    {
        // Entries can vanish (evicted, moved, reaped) during the walk; skip those.
        let Ok((key, value)) = entry else { continue };
        if let Some(view) = flow_view(&F::flow(&key, &value), table, filter, now_ns) {
            flows.push(view);
        }
    }
}

/// The view of `flow`, if `filter` keeps it.
fn flow_view(
    flow: &Flow,
    table: &'static str,
    filter: &FlowFilter,
    now_ns: u64,
) -> Option<FlowView> {
    let ends = [flow.src, flow.dst, flow.nat_src, flow.nat_dst];
    if filter
        .addr
        .is_some_and(|addr| !ends.iter().any(|end| end.ip() == addr))
        || filter
            .port
            .is_some_and(|port| !ends.iter().any(|end| end.port() == port))
        || filter.protocol.is_some_and(|number| number != flow.proto)
    {
        return None;
    }
    let mut rewrite = Vec::new();
    if flow.flags & ct_flags::REWRITE_SRC != 0 {
        rewrite.push(format!("src -> {}", flow.nat_src));
    }
    if flow.flags & ct_flags::REWRITE_DST != 0 {
        rewrite.push(format!("dst -> {}", flow.nat_dst));
    }
    Some(FlowView {
        protocol: protocol_name(flow.proto),
        source: flow.src.to_string(),
        destination: flow.dst.to_string(),
        direction: if flow.flags & ct_flags::REPLY != 0 {
            "reply"
        } else {
            "original"
        },
        rewrite: rewrite.join(", "),
        table,
        state: flow_state(flow.proto, flow.flags),
        closing: ct_flags::is_closed(flow.flags),
        service_id: flow.service_id,
        backend_id: flow.backend_id,
        idle_s: now_ns.saturating_sub(flow.last_seen_ns) as f64 / 1e9,
    })
}

/// The name of a flow's state (see [`FlowView::state`]).
fn flow_state(l4_proto: u8, flags: u16) -> &'static str {
    let seen_reply = flags & ct_flags::SEEN_REPLY != 0;
    let assured = flags & ct_flags::ASSURED != 0;
    if l4_proto != proto::TCP {
        return match (seen_reply, assured) {
            (_, true) => "assured",
            (true, false) => "replied",
            (false, false) => "unreplied",
        };
    }
    let fin_client = flags & ct_flags::FIN_ORIGINAL != 0;
    let fin_server = flags & ct_flags::FIN_REPLY != 0;
    if flags & ct_flags::RST != 0 {
        "reset"
    } else if fin_client && fin_server {
        "closed"
    } else if fin_client {
        "fin_from_client"
    } else if fin_server {
        "fin_from_server"
    } else if assured {
        "established"
    } else if seen_reply {
        "syn_received"
    } else {
        "syn_sent"
    }
}

/// One session affinity record.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AffinityView {
    /// `tc` (keyed by client address) or `socket` (keyed by client network namespace).
    pub path: &'static str,
    /// The client address (TC path), or `node` / `netns:<cookie>` (socket path).
    pub client: String,
    pub service_id: u32,
    pub backend: Option<String>,
    pub idle_s: f64,
}

/// Every affinity record of both families.
///
/// # Errors
/// When the map cannot be read.
pub fn affinity(maps: &PinnedMaps, now_ns: u64) -> Result<Vec<AffinityView>> {
    let mut views = Vec::new();
    family_affinity::<Ipv4Addr>(maps, now_ns, &mut views);
    family_affinity::<Ipv6Addr>(maps, now_ns, &mut views);
    views.sort_by(|a, b| (a.path, &a.client, a.service_id).cmp(&(b.path, &b.client, b.service_id)));
    Ok(views)
}

fn family_affinity<F: Tables>(maps: &PinnedMaps, now_ns: u64, views: &mut Vec<AffinityView>) {
    let Some(pins) = F::pins(maps) else {
        return;
    };
    let backend = |id: u32| pins.backend(id).map(|socket| socket.to_string());
    let idle = |last_used_ns: u64| now_ns.saturating_sub(last_used_ns) as f64 / 1e9;
    views.extend(
        pins.affinity
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(key, value)| {
                let (client, service_id) = F::affinity_client(&key);
                AffinityView {
                    path: "tc",
                    client: client.to_string(),
                    service_id,
                    backend: backend(value.backend_id),
                    idle_s: idle(value.last_used_ns),
                }
            }),
    );
    let host = maps.host_netns_cookie();
    views.extend(
        pins.sock_affinity
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(key, value)| AffinityView {
                path: "socket",
                client: netns_name(key.netns_cookie, host),
                service_id: key.service_id,
                backend: backend(value.backend_id),
                idle_s: idle(value.last_used_ns),
            }),
    );
}

/// A socket-layer client's name: the node, or a pod's network namespace by cookie.
fn netns_name(cookie: u64, host: u64) -> String {
    if cookie == host {
        "node".to_owned()
    } else {
        format!("netns:{cookie}")
    }
}

impl PinnedMaps {
    fn host_netns_cookie(&self) -> u64 {
        self.sock_config
            .get(&0, 0)
            .map_or(0, |config| config.host_netns_cookie)
    }
}

/// A socket the socket-layer hooks translated (one reverse entry): the flow took the
/// socket path, so it has no conntrack entry.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SocketView {
    /// `host` (the node's own namespace) or `pod`.
    pub netns: &'static str,
    pub netns_cookie: u64,
    /// The socket's cookie (`SO_COOKIE`).
    pub cookie: u64,
    pub protocol: String,
    /// What the application addressed.
    pub frontend: String,
    /// Where its packets go.
    pub backend: String,
    pub service_id: u32,
    /// Translated at `connect()` (else per datagram by `sendmsg()`).
    pub connected: bool,
}

/// Every socket-layer translation the reverse maps remember (IPv4, including AF_INET6
/// sockets that reached IPv4 services through IPv4-mapped addresses, and IPv6).
///
/// # Errors
/// When a map cannot be read.
pub fn sockets(maps: &PinnedMaps) -> Result<Vec<SocketView>> {
    let host = maps.host_netns_cookie();
    let netns = |cookie: u64| if cookie == host { "host" } else { "pod" };
    let mut views = Vec::new();
    for entry in maps.sock_reverse.iter() {
        let (key, value) = match entry {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(source) => {
                return Err(Error::Read {
                    name: sock::RNAT_V4_NAME,
                    source,
                })
            }
        };
        views.push(SocketView {
            netns: netns(value.netns_cookie),
            netns_cookie: value.netns_cookie,
            cookie: key.cookie,
            protocol: protocol_name(key.proto),
            frontend: v4(value.frontend_addr, value.frontend_port).to_string(),
            backend: v4(key.backend_addr, key.backend_port).to_string(),
            service_id: value.service_id,
            connected: value.flags & sock::rev_flags::CONNECTED != 0,
        });
    }
    for entry in maps.sock_reverse_v6.iter().flat_map(HashMap::iter) {
        let (key, value) = match entry {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(source) => {
                return Err(Error::Read {
                    name: sock::RNAT_V6_NAME,
                    source,
                })
            }
        };
        views.push(SocketView {
            netns: netns(value.netns_cookie),
            netns_cookie: value.netns_cookie,
            cookie: key.cookie,
            protocol: protocol_name(key.proto),
            frontend: v6(value.frontend_addr, value.frontend_port).to_string(),
            backend: v6(key.backend_addr, key.backend_port).to_string(),
            service_id: value.service_id,
            connected: value.flags & sock::rev_flags::CONNECTED != 0,
        });
    }
    views.sort_by_key(|view| (view.netns_cookie, view.cookie));
    Ok(views)
}

/// The datapath's counters by name, summed over CPUs.
///
/// # Errors
/// When the map cannot be read.
pub fn counters(maps: &PinnedMaps) -> Result<BTreeMap<&'static str, u64>> {
    let mut totals = BTreeMap::new();
    for index in 0..counter::COUNT {
        let name = COUNTER_NAMES[index as usize];
        if name.is_empty() {
            continue;
        }
        let values = maps.counters.get(&index, 0).map_err(|source| Error::Read {
            name: names::COUNTERS,
            source,
        })?;
        totals.insert(name, values.iter().sum());
    }
    Ok(totals)
}

/// What the datapath did with a packet `kpr trace` ran through it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TraceView {
    pub client: String,
    pub destination: String,
    pub protocol: String,
    /// The program that ran: `pod-ingress` (a pod's packet) or `node-ingress` (from
    /// outside the node).
    pub program: &'static str,
    /// `namespace/name:port` of the service the packet is for, if any.
    pub service: Option<String>,
    /// Each stage's decision, in the datapath's order.
    pub stages: Vec<String>,
    /// `pass` (untouched), `translate` (to the stack), `translate and redirect`
    /// (straight to the next hop), `reject` (answered with ICMP), `drop: <reason>`.
    pub verdict: String,
    /// The backend chosen (or the flow's).
    pub backend: Option<String>,
    /// The packet as it leaves the program.
    pub packet_out: String,
}

impl NameIndex {
    fn kind(&self, address: SocketAddr, protocol: &str, scope: u8) -> Option<&str> {
        self.kinds
            .get(&(address, protocol.to_owned(), scope))
            .map(String::as_str)
    }

    fn pod(&self, service_id: u32, address: IpAddr) -> Option<&str> {
        let port = self.service_ports.get(&service_id)?;
        self.endpoints
            .get(&(port.namespace.clone(), port.name.clone(), address))?
            .pod
            .as_deref()
    }
}

/// A packet in words: `10.244.1.2:40000 -> 10.244.1.11:8080 TCP`,
/// `[fd00::2]:40000 -> [fd00::11]:8080 TCP`, or the ICMP message.
#[must_use]
pub fn describe_packet(frame: &[u8]) -> String {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return format!("{} bytes, not IP", frame.len());
    };
    let (src, dst, payload): (IpAddr, IpAddr, &etherparse::IpPayloadSlice<'_>) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
            ip.payload(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
            ip.payload(),
        ),
        _ => return format!("{} bytes, not IP", frame.len()),
    };
    let ends = |src_port: u16, dst_port: u16| {
        format!(
            "{} -> {}",
            SocketAddr::new(src, src_port),
            SocketAddr::new(dst, dst_port)
        )
    };
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            format!("{} TCP", ends(tcp.source_port(), tcp.destination_port()))
        }
        Some(TransportSlice::Udp(udp)) => {
            format!("{} UDP", ends(udp.source_port(), udp.destination_port()))
        }
        Some(TransportSlice::Icmpv4(icmp)) => format!(
            "{src} -> {dst} ICMP type {} code {}",
            icmp.type_u8(),
            icmp.code_u8()
        ),
        Some(TransportSlice::Icmpv6(icmp)) => format!(
            "{src} -> {dst} ICMPv6 type {} code {}",
            icmp.type_u8(),
            icmp.code_u8()
        ),
        // etherparse has no SCTP: its ports are the first 4 bytes, as UDP's.
        None if payload.ip_number == etherparse::IpNumber::SCTP => {
            match payload.payload.get(0..4) {
                Some(&[a, b, c, d]) => format!(
                    "{} SCTP",
                    ends(u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
                ),
                _ => format!("{src} -> {dst} SCTP, truncated"),
            }
        }
        _ => format!("{src} -> {dst} protocol {}", payload.ip_number.0),
    }
}

impl PinnedMaps {
    /// The backend `id` of the family of `destination`'s maps.
    fn backend_of(&self, destination: SocketAddr, id: u32) -> Option<SocketAddr> {
        match destination {
            SocketAddr::V4(_) => self.v4.backend(id),
            SocketAddr::V6(_) => self.v6.as_ref()?.backend(id),
        }
    }
}

/// Turns a run of the trace instance ([`crate::datapath::trace`]) into words, with
/// services named from `index`.
#[must_use]
pub fn trace_view(
    maps: &PinnedMaps,
    index: &NameIndex,
    packet: (SocketAddr, SocketAddr, u8),
    from_outside: bool,
    run: &crate::datapath::trace::TraceRun,
) -> TraceView {
    use proxy_common::trace::stage;
    let (client, destination, l4_proto) = packet;
    let record = run.record;
    let has = |bit: u32| record.stages & bit != 0;
    let protocol = protocol_name(l4_proto);
    let mut stages = Vec::new();
    let known = has(stage::CT_HIT) || has(stage::FRONTEND);
    let service = known.then(|| index.service_port(record.service_id));
    let backend = (has(stage::CT_HIT) || has(stage::BACKEND))
        .then(|| maps.backend_of(destination, record.backend_id))
        .flatten()
        .map(|backend| {
            let address = backend.to_string();
            match index.pod(record.service_id, backend.ip()) {
                Some(pod) => format!("{address} ({pod})"),
                None => address,
            }
        });
    if !has(stage::PARSED) {
        stages.push("parse: not a packet the datapath handles; passes untouched".to_owned());
    } else if has(stage::CT_HIT) {
        stages.push(format!(
            "conntrack: a flow of {} matches ({} direction); its rewrite applies",
            service.as_deref().unwrap_or("?"),
            if record.ct_flags & ct_flags::REPLY != 0 {
                "reply"
            } else {
                "original"
            }
        ));
    } else {
        stages.push("conntrack: no flow for this 5-tuple".to_owned());
    }
    if has(stage::UNDECLARED_REJECT) {
        stages.push("frontend: none for this port and protocol on a ClusterIP; refused".to_owned());
    } else if has(stage::PARSED) && !known {
        stages.push(
            "frontend: none for this address, port and protocol; passes untouched".to_owned(),
        );
    }
    if has(stage::FRONTEND) {
        let scope = if has(stage::INTERNAL_SCOPE) {
            scope::INTERNAL
        } else {
            scope::DEFAULT
        };
        stages.push(format!(
            "frontend: {} {} {destination}, {} backend(s)",
            service.as_deref().unwrap_or("?"),
            index
                .kind(destination, &protocol, scope)
                .unwrap_or("frontend"),
            record.frontend_count
        ));
        stages.push(if has(stage::INTERNAL_SCOPE) {
            "scope: in-cluster backend set (a pod of this node reaching an externalTrafficPolicy Local frontend)".to_owned()
        } else {
            "scope: the frontend's backend set".to_owned()
        });
    }
    if has(stage::NETFILTER) {
        stages.push(
            "takeover: netfilter's conntrack already translates this flow (kube-proxy's); left to it"
                .to_owned(),
        );
    }
    if has(stage::SOURCE_ALLOWED) {
        stages.push("source ranges: the client is inside loadBalancerSourceRanges".to_owned());
    }
    if has(stage::SOURCE_DENIED) {
        stages.push("source ranges: the client is outside loadBalancerSourceRanges".to_owned());
    }
    if has(stage::EMPTY_DROP) {
        stages.push("backends: none on this node (Local policy, endpoints elsewhere)".to_owned());
    }
    if has(stage::EMPTY_REJECT) {
        stages.push("backends: none (no endpoints)".to_owned());
    }
    if has(stage::BACKEND) {
        if record.frontend_flags & service_flags::AFFINITY != 0 {
            stages.push(if has(stage::AFFINITY_HIT) {
                "affinity: the client's record chose the backend".to_owned()
            } else {
                "affinity: no live record for this client; chosen at random (a real flow records it)".to_owned()
            });
        }
        stages.push(format!(
            "backend: {}",
            backend.as_deref().unwrap_or("(gone)")
        ));
        stages.push(if has(stage::MASQUERADE) {
            "masquerade: yes, the source becomes the node's address and an SNAT port".to_owned()
        } else {
            "masquerade: no, the client's address is kept".to_owned()
        });
    }
    let verdict = if has(stage::DROPPED) || run.verdict == 2 {
        let reason = COUNTER_NAMES
            .get(record.drop_reason as usize)
            .filter(|name| !name.is_empty())
            .map_or("unknown".to_owned(), |name| (*name).to_owned());
        format!("drop: {reason}")
    } else if has(stage::EMPTY_REJECT) || has(stage::UNDECLARED_REJECT) {
        "reject".to_owned()
    } else if run.verdict == 7 {
        "translate and redirect".to_owned()
    } else if has(stage::CT_HIT) || has(stage::BACKEND) {
        "translate".to_owned()
    } else {
        "pass".to_owned()
    };
    TraceView {
        client: client.to_string(),
        destination: destination.to_string(),
        protocol,
        program: if from_outside {
            "node-ingress"
        } else {
            "pod-ingress"
        },
        service,
        stages,
        verdict,
        backend,
        packet_out: if run.verdict == 2 {
            "(none: dropped)".to_owned()
        } else {
            describe_packet(&run.packet)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    /// An IPv6 flow's original entry, masqueraded and DNATed, read through the same
    /// view as IPv4's: `[addr]:port` ends, the filter by either family's address.
    #[test]
    fn an_ipv6_flow_reads_as_an_ipv4_one_does() {
        let client = socket("[fd00:244::2]:40000");
        let frontend = socket("[fd00:96::10]:80");
        let (SocketAddr::V6(c), SocketAddr::V6(f)) = (client, frontend) else {
            panic!("IPv6");
        };
        let key = CtKeyV6 {
            src_addr: Be32x4::from_ipv6(*c.ip()),
            dst_addr: Be32x4::from_ipv6(*f.ip()),
            src_port: Be16::from_host(c.port()),
            dst_port: Be16::from_host(f.port()),
            proto: proto::TCP,
            _pad: [0; 3],
        };
        let entry = CtEntryV6 {
            last_seen_ns: 1_000_000_000,
            nat_src_addr: Be32x4::from_ipv6("fd00::1".parse().expect("v6")),
            nat_src_port: Be16::from_host(61_000),
            nat_dst_addr: Be32x4::from_ipv6("fd00:244::5".parse().expect("v6")),
            nat_dst_port: Be16::from_host(8080),
            flags: ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST | ct_flags::SEEN_REPLY,
            service_id: 0x8000_0001,
            backend_id: 3,
            ..CtEntryV6::default()
        };
        let flow = Ipv6Addr::flow(&key, &entry);
        let all = FlowFilter::default();
        let view = flow_view(&flow, "new", &all, 3_000_000_000).expect("kept");
        assert_eq!(view.source, "[fd00:244::2]:40000");
        assert_eq!(view.destination, "[fd00:96::10]:80");
        assert_eq!(
            view.rewrite,
            "src -> [fd00::1]:61000, dst -> [fd00:244::5]:8080"
        );
        assert_eq!(
            (view.direction, view.state, view.service_id),
            ("original", "syn_received", 0x8000_0001)
        );
        assert!((view.idle_s - 2.0).abs() < 1e-9);
        let by = |addr: &str| FlowFilter {
            addr: Some(addr.parse().expect("address")),
            ..FlowFilter::default()
        };
        assert!(
            flow_view(&flow, "new", &by("fd00:244::5"), 0).is_some(),
            "the backend"
        );
        assert!(flow_view(&flow, "new", &by("fd00:244::9"), 0).is_none());
        assert!(flow_view(&flow, "new", &by("10.96.0.10"), 0).is_none());
        let port = FlowFilter {
            port: Some(8080),
            ..FlowFilter::default()
        };
        assert!(flow_view(&flow, "new", &port, 0).is_some());
    }

    #[test]
    fn an_ipv4_flow_still_reads_as_before() {
        let key = CtKeyV4 {
            src_addr: Be32::from_ipv4(Ipv4Addr::new(10, 244, 1, 2)),
            dst_addr: Be32::from_ipv4(Ipv4Addr::new(10, 96, 0, 10)),
            src_port: Be16::from_host(40_000),
            dst_port: Be16::from_host(80),
            proto: proto::UDP,
            _pad: [0; 3],
        };
        let entry = CtEntryV4 {
            nat_dst_addr: Be32::from_ipv4(Ipv4Addr::new(10, 244, 1, 11)),
            nat_dst_port: Be16::from_host(8080),
            flags: ct_flags::REWRITE_DST,
            ..CtEntryV4::default()
        };
        let view = flow_view(
            &Ipv4Addr::flow(&key, &entry),
            "established",
            &FlowFilter {
                addr: Some("10.244.1.11".parse().expect("address")),
                ..FlowFilter::default()
            },
            0,
        )
        .expect("kept");
        assert_eq!(
            (view.source.as_str(), view.destination.as_str()),
            ("10.244.1.2:40000", "10.96.0.10:80")
        );
        assert_eq!(view.rewrite, "dst -> 10.244.1.11:8080");
        assert_eq!(view.state, "unreplied");
    }

    #[test]
    fn ipv6_packets_are_described_with_bracketed_ends() {
        use crate::datapath::trace::first_packet;
        let client = socket("[fd00:244::2]:40000");
        let tcp = first_packet(client, socket("[fd00:96::10]:80"), proto::TCP).expect("frame");
        assert_eq!(
            describe_packet(&tcp),
            "[fd00:244::2]:40000 -> [fd00:96::10]:80 TCP"
        );
        let sctp = first_packet(client, socket("[fd00:96::10]:3868"), proto::SCTP).expect("frame");
        assert_eq!(
            describe_packet(&sctp),
            "[fd00:244::2]:40000 -> [fd00:96::10]:3868 SCTP"
        );
        let udp = first_packet(
            socket("10.244.1.2:40000"),
            socket("10.96.0.10:53"),
            proto::UDP,
        )
        .expect("frame");
        assert_eq!(
            describe_packet(&udp),
            "10.244.1.2:40000 -> 10.96.0.10:53 UDP"
        );
        assert_eq!(describe_packet(&[0; 10]), "10 bytes, not IP");
    }

    /// The names file's IPv6 frontends and endpoints are found by the socket address
    /// and address the maps give.
    #[test]
    fn the_index_names_ipv6_frontends_and_pods() {
        let names = published::Names {
            version: published::VERSION,
            service_ports: vec![published::ServicePortNames {
                service_id: 0x8000_0001,
                namespace: "demo".into(),
                name: "web".into(),
                port: "http".into(),
                protocol: "TCP".into(),
                service_type: "ClusterIP".into(),
                internal_traffic_policy: "Cluster".into(),
                external_traffic_policy: "Cluster".into(),
            }],
            frontends: vec![published::FrontendNames {
                address: socket("[fd00:96::10]:80"),
                protocol: "TCP".into(),
                scope: scope::DEFAULT,
                kind: "ClusterIP".into(),
                service_id: 0x8000_0001,
            }],
            endpoints: vec![published::EndpointNames {
                namespace: "demo".into(),
                service: "web".into(),
                address: "fd00:244::5".parse().expect("v6"),
                pod: Some("web-1".into()),
                node: None,
                ready: true,
                serving: true,
                terminating: false,
            }],
        };
        let index = NameIndex::new(Some(names));
        assert_eq!(index.service_port(0x8000_0001), "demo/web:http");
        assert_eq!(
            index.kind(socket("[fd00:96::10]:80"), "TCP", scope::DEFAULT),
            Some("ClusterIP")
        );
        assert_eq!(
            index.pod(0x8000_0001, "fd00:244::5".parse().expect("v6")),
            Some("web-1")
        );
    }
}
