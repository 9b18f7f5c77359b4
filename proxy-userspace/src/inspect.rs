//! Reading a running node's pinned maps: what `kpr inspect` and `kpr trace` print.
//!
//! Everything here reads only; it never writes a map, so it is safe next to a running
//! agent. Views are plain serializable structs, printed as tables or JSON by `main`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use proxy_common::{
    counter, ct_flags, names, proto, scope, service_flags, sock, AffinityKeyV4, AffinityValueV4,
    BackendV4, Be16, Be32, CtEntryV4, CtKeyV4, ServiceKeyV4, ServiceValueV4, SockAffinityKeyV4,
    SockConfig, SockRevKeyV4, SockRevKeyV6, SockRevValueV4, SockRevValueV6, COUNTER_NAMES,
};
use serde::Serialize;

use crate::names as published;

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

/// The pinned maps of a node.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKeyV4, ServiceValueV4>,
    backends: HashMap<MapData, u32, BackendV4>,
    conntrack: HashMap<MapData, CtKeyV4, CtEntryV4>,
    conntrack_new: HashMap<MapData, CtKeyV4, CtEntryV4>,
    affinity: HashMap<MapData, AffinityKeyV4, AffinityValueV4>,
    counters: PerCpuArray<MapData, u64>,
    sock_reverse: HashMap<MapData, SockRevKeyV4, SockRevValueV4>,
    /// Absent on a node whose agent predates the AF_INET6 hooks.
    sock_reverse_v6: Option<HashMap<MapData, SockRevKeyV6, SockRevValueV6>>,
    sock_affinity: HashMap<MapData, SockAffinityKeyV4, AffinityValueV4>,
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
            services: hash(pin_dir, names::SERVICES_V4, false)?,
            backends: hash(pin_dir, names::BACKENDS_V4, false)?,
            conntrack: hash(pin_dir, names::CONNTRACK_V4, false)?,
            conntrack_new: hash(pin_dir, names::CONNTRACK_NEW_V4, true)?,
            affinity: hash(pin_dir, names::AFFINITY_V4, true)?,
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
            sock_affinity: hash(pin_dir, sock::AFFINITY_V4_NAME, true)?,
            sock_config: Array::try_from(Map::Array(open(pin_dir, sock::CONFIG_NAME)?)).map_err(
                |source| Error::Read {
                    name: sock::CONFIG_NAME,
                    source,
                },
            )?,
        })
    }

    fn service_entries(&self) -> Result<BTreeMap<ServiceKeyV4, ServiceValueV4>> {
        self.services
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Read {
                name: names::SERVICES_V4,
                source,
            })
    }

    fn backend(&self, id: u32) -> Option<BackendV4> {
        self.backends.get(&id, 0).ok()
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

fn endpoint_text(addr: Be32, port: Be16) -> String {
    SocketAddrV4::new(addr.to_ipv4(), port.to_host()).to_string()
}

/// The names the agent published ([`crate::names`]), indexed for lookups; empty when
/// there is no names file (then ids stand in for names).
#[derive(Clone, Debug, Default)]
pub struct NameIndex {
    service_ports: BTreeMap<u32, published::ServicePortNames>,
    kinds: BTreeMap<(SocketAddrV4, String, u8), String>,
    endpoints: BTreeMap<(String, String, Ipv4Addr), published::EndpointNames>,
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
    key: &ServiceKeyV4,
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
    if key.scope == scope::INTERNAL {
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

/// Every frontend (or those `filter` keeps), sorted by namespace/name, port name,
/// frontend type, address and scope.
///
/// # Errors
/// When a map cannot be read.
pub fn services(
    maps: &PinnedMaps,
    index: &NameIndex,
    filter: &ServiceFilter,
) -> Result<Vec<ServiceView>> {
    let entries = maps.service_entries()?;
    let mut views = Vec::new();
    for (key, value) in entries.iter().filter(|(key, _)| key.slot == 0) {
        let port = index.service_ports.get(&value.service_id);
        let namespace = port.map(|port| port.namespace.clone());
        let name = port.map(|port| port.name.clone());
        if !filter.matches(namespace.as_deref(), name.as_deref()) {
            continue;
        }
        let address = SocketAddrV4::new(key.addr.to_ipv4(), key.port.to_host());
        let protocol = protocol_name(key.proto);
        let mut backends: Vec<BackendView> = (1..=value.count)
            .filter_map(|slot| entries.get(&ServiceKeyV4 { slot, ..*key }))
            .filter_map(|slot_value| maps.backend(slot_value.backend_id))
            .map(|backend| {
                let endpoint = port.and_then(|port| {
                    index.endpoints.get(&(
                        port.namespace.clone(),
                        port.name.clone(),
                        backend.addr.to_ipv4(),
                    ))
                });
                BackendView {
                    address: endpoint_text(backend.addr, backend.port),
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
                .get(&(address, protocol.clone(), key.scope))
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned()),
            frontend: address.to_string(),
            protocol,
            clients: if key.scope == scope::INTERNAL {
                "in-cluster"
            } else {
                "all"
            },
            policy: policy_words(value, key, port),
            when_empty: if value.flags & service_flags::DROP_WHEN_EMPTY != 0 {
                "drop (endpoints only on other nodes)"
            } else {
                "reject (ICMP port unreachable)"
            },
            backends,
            service_id: value.service_id,
            flags: value.flags,
            scope: key.scope,
            affinity_timeout_s: value.affinity_timeout_s,
        });
    }
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
    /// Either end (before or after translation) has this address.
    pub addr: Option<Ipv4Addr>,
    /// Either end has this port.
    pub port: Option<u16>,
    pub protocol: Option<u8>,
}

/// Conntrack entries that match `filter`.
///
/// # Errors
/// When the map cannot be read.
pub fn conntrack(maps: &PinnedMaps, filter: &FlowFilter, now_ns: u64) -> Result<Vec<FlowView>> {
    let mut flows = Vec::new();
    let tables = [
        ("established", &maps.conntrack),
        ("new", &maps.conntrack_new),
    ];
    for (table, entry) in tables
        .into_iter()
        .flat_map(|(table, map)| map.iter().map(move |entry| (table, entry)))
    {
        // Entries can vanish (evicted, moved, reaped) during the walk; skip those.
        let Ok((key, value)) = entry else { continue };
        let addrs = [
            key.src_addr,
            key.dst_addr,
            value.nat_src_addr,
            value.nat_dst_addr,
        ];
        let ports = [
            key.src_port,
            key.dst_port,
            value.nat_src_port,
            value.nat_dst_port,
        ];
        if filter
            .addr
            .is_some_and(|addr| !addrs.contains(&Be32::from_ipv4(addr)))
            || filter
                .port
                .is_some_and(|port| !ports.contains(&Be16::from_host(port)))
            || filter.protocol.is_some_and(|number| number != key.proto)
        {
            continue;
        }
        let mut rewrite = Vec::new();
        if value.flags & ct_flags::REWRITE_SRC != 0 {
            rewrite.push(format!(
                "src -> {}",
                endpoint_text(value.nat_src_addr, value.nat_src_port)
            ));
        }
        if value.flags & ct_flags::REWRITE_DST != 0 {
            rewrite.push(format!(
                "dst -> {}",
                endpoint_text(value.nat_dst_addr, value.nat_dst_port)
            ));
        }
        flows.push(FlowView {
            protocol: protocol_name(key.proto),
            source: endpoint_text(key.src_addr, key.src_port),
            destination: endpoint_text(key.dst_addr, key.dst_port),
            direction: if value.flags & ct_flags::REPLY != 0 {
                "reply"
            } else {
                "original"
            },
            rewrite: rewrite.join(", "),
            table,
            state: flow_state(key.proto, value.flags),
            closing: ct_flags::is_closed(value.flags),
            service_id: value.service_id,
            backend_id: value.backend_id,
            idle_s: now_ns.saturating_sub(value.last_seen_ns) as f64 / 1e9,
        });
    }
    flows.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
    Ok(flows)
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

/// Every affinity record.
///
/// # Errors
/// When the map cannot be read.
pub fn affinity(maps: &PinnedMaps, now_ns: u64) -> Result<Vec<AffinityView>> {
    let mut views: Vec<AffinityView> = maps
        .affinity
        .iter()
        .filter_map(std::result::Result::ok)
        .map(|(key, value)| AffinityView {
            path: "tc",
            client: key.client_addr.to_ipv4().to_string(),
            service_id: key.service_id,
            backend: maps
                .backend(value.backend_id)
                .map(|b| endpoint_text(b.addr, b.port)),
            idle_s: now_ns.saturating_sub(value.last_used_ns) as f64 / 1e9,
        })
        .collect();
    let host = maps.host_netns_cookie();
    views.extend(
        maps.sock_affinity
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(key, value)| AffinityView {
                path: "socket",
                client: netns_name(key.netns_cookie, host),
                service_id: key.service_id,
                backend: maps
                    .backend(value.backend_id)
                    .map(|b| endpoint_text(b.addr, b.port)),
                idle_s: now_ns.saturating_sub(value.last_used_ns) as f64 / 1e9,
            }),
    );
    views.sort_by(|a, b| (a.path, &a.client, a.service_id).cmp(&(b.path, &b.client, b.service_id)));
    Ok(views)
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
            frontend: endpoint_text(value.frontend_addr, value.frontend_port),
            backend: endpoint_text(key.backend_addr, key.backend_port),
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
        let text = |addr: proxy_common::Be32x4, port: Be16| {
            SocketAddrV6::new(addr.to_ipv6(), port.to_host(), 0, 0).to_string()
        };
        views.push(SocketView {
            netns: netns(value.netns_cookie),
            netns_cookie: value.netns_cookie,
            cookie: key.cookie,
            protocol: protocol_name(key.proto),
            frontend: text(value.frontend_addr, value.frontend_port),
            backend: text(key.backend_addr, key.backend_port),
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
    fn kind(&self, address: SocketAddrV4, protocol: &str, scope: u8) -> Option<&str> {
        self.kinds
            .get(&(address, protocol.to_owned(), scope))
            .map(String::as_str)
    }

    fn pod(&self, service_id: u32, address: Ipv4Addr) -> Option<&str> {
        let port = self.service_ports.get(&service_id)?;
        self.endpoints
            .get(&(port.namespace.clone(), port.name.clone(), address))?
            .pod
            .as_deref()
    }
}

/// A packet in words: `10.244.1.2:40000 -> 10.244.1.11:8080 TCP`, or the ICMP message.
#[must_use]
pub fn describe_packet(frame: &[u8]) -> String {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return format!("{} bytes, not IPv4", frame.len());
    };
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        return format!("{} bytes, not IPv4", frame.len());
    };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => format!(
            "{src}:{} -> {dst}:{} TCP",
            tcp.source_port(),
            tcp.destination_port()
        ),
        Some(TransportSlice::Udp(udp)) => format!(
            "{src}:{} -> {dst}:{} UDP",
            udp.source_port(),
            udp.destination_port()
        ),
        Some(TransportSlice::Icmpv4(icmp)) => format!(
            "{src} -> {dst} ICMP type {} code {}",
            icmp.type_u8(),
            icmp.code_u8()
        ),
        _ => format!("{src} -> {dst} protocol {}", ip.header().protocol().0),
    }
}

/// Turns a run of the trace instance ([`crate::datapath::trace`]) into words, with
/// services named from `index`.
#[must_use]
pub fn trace_view(
    maps: &PinnedMaps,
    index: &NameIndex,
    packet: (SocketAddrV4, SocketAddrV4, u8),
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
        .then(|| maps.backend(record.backend_id))
        .flatten()
        .map(|backend| {
            let address = endpoint_text(backend.addr, backend.port);
            match index.pod(record.service_id, backend.addr.to_ipv4()) {
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
    if has(stage::PARSED) && !known {
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
    } else if has(stage::EMPTY_REJECT) {
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
