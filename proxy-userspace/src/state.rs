//! The objects the agent acts on, as every source (API server, manifest directory)
//! delivers them: compact copies of Services and EndpointSlices that hold exactly what
//! the model, the metrics and `kpr inspect`'s names read, nothing an API client needs.
//!
//! A whole `k8s_openapi` object is mostly fields the agent never reads (managed fields,
//! annotations, status conditions, target references, every `Option<String>` of
//! `ObjectMeta`); at 50 000 services of 10 endpoints the whole objects were most of the
//! agent's memory. [`ServiceInfo::from`] and [`SliceInfo::from`] are the one place the
//! Kubernetes objects are read for the model: sources convert as soon as an object
//! arrives and drop it.
//!
//! Strings that repeat across objects (node names, zones, port names, policy values)
//! are [`intern`]ed, so half a million endpoints on one node share one node name.
//! Addresses are parsed once; text that does not parse is kept as it was, so the model
//! reports it with the same words as before.
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    jiff::Timestamp,
};
use proxy_common::proto;

/// Label naming the proxy that should handle a service (kube-proxy skips services
/// labelled for another proxy).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking headless services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label tying an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The EndpointSlice annotation with the time of the change that caused its last
/// update: network programming latency is measured from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// `namespace/name` of a namespaced object. Shared strings: the model and the
/// syncer keep a key per service, slice, frontend and claim, and copying one must not
/// allocate (at 100 000 services those copies were tens of MiB).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    #[must_use]
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object from its metadata (namespace defaults to `default`, as
    /// kubectl does for manifests without one).
    #[must_use]
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            intern(meta.namespace.as_deref().unwrap_or("default")),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the agent knows about its own node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name, to recognise local endpoints (`nodeName`).
    pub name: Option<String>,
    /// The node's labels (topology zone for topology-aware routing).
    pub labels: BTreeMap<String, String>,
}

impl From<&Node> for NodeInfo {
    fn from(node: &Node) -> Self {
        Self {
            name: node.metadata.name.clone(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

/// Everything the model reads: Services and EndpointSlices by key, and this node.
///
/// The maps are ordered by key and their values shared: a snapshot shares every object
/// with the source's own store and with the snapshot before it, and an object that did
/// not change keeps its `Arc` (both sources reuse it), so a consumer can tell unchanged
/// entries by `Arc::ptr_eq`.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectKey, Arc<ServiceInfo>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<SliceInfo>>,
    pub node: NodeInfo,
    /// Which keys may differ from the source's earlier states, so a consumer that
    /// saw one of them compares those keys only, not every object.
    pub revision: Revision,
}

/// Where a [`ClusterState`] stands in its source's sequence of states, and what
/// changed over the last steps of it.
///
/// At 50 000 services, walking both maps to find the one slice that changed took the
/// model longer than all the rest of a pass; the source knows what it changed.
/// A consumer may skip states (a watch channel keeps the latest only): the steps of
/// several states are kept, and one that skipped more than they cover, or saw
/// another source's states, compares everything.
#[derive(Clone, Debug, Default)]
pub struct Revision {
    /// The source instance whose states these are; 0 for a state of no sequence
    /// (built by hand, or by a source that does not count): compare everything.
    pub lineage: u64,
    /// This state's place in its lineage: one more than the state before it.
    pub number: u64,
    /// The last steps up to this state, oldest first: each step's number and the keys
    /// that may differ between the state before it and it, `None` when the source
    /// cannot say (a relist).
    pub steps: std::collections::VecDeque<(u64, Option<Arc<ChangedKeys>>)>,
}

/// The keys of the objects that may have changed (added, replaced or removed) in one
/// step; every other object kept its `Arc`. Listing one that did not change is
/// harmless: consumers still compare.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedKeys {
    pub services: std::collections::BTreeSet<ObjectKey>,
    pub endpoint_slices: std::collections::BTreeSet<ObjectKey>,
}

impl ChangedKeys {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty()
    }
}

/// How many steps a [`Revision`] keeps: a consumer that falls further behind than
/// this compares everything, once.
const REVISION_STEPS: usize = 64;

/// The most keys a step names; a step that changed more says "anything may differ"
/// (`None`), and a consumer compares every object once (a walk of the maps by `Arc`
/// identity, a few milliseconds at 50 000 services). A source's first state names
/// every object, and its steps stay for [`REVISION_STEPS`] states: 5 MiB of keys at
/// 50 000 services, kept for nothing.
pub const MAX_CHANGED_KEYS: usize = 4096;

/// The next lineage: every source instance counts its own states.
static NEXT_LINEAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A source's count of its states: each [`Revisions::next`] is one step.
#[derive(Debug)]
pub struct Revisions {
    current: Revision,
}

impl Default for Revisions {
    fn default() -> Self {
        Self {
            current: Revision {
                lineage: NEXT_LINEAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                number: 0,
                steps: std::collections::VecDeque::new(),
            },
        }
    }
}

impl Revisions {
    /// The revision of the next state, which differs from the last one in `changed`
    /// (`None`: in anything).
    pub fn next(&mut self, changed: Option<ChangedKeys>) -> Revision {
        let current = &mut self.current;
        current.number += 1;
        // The first state follows none a consumer could have seen: its keys would
        // never be read.
        let changed = changed.filter(|changed| {
            current.number > 1
                && changed.services.len() + changed.endpoint_slices.len() <= MAX_CHANGED_KEYS
        });
        if current.steps.len() == REVISION_STEPS {
            current.steps.pop_front();
        }
        current
            .steps
            .push_back((current.number, changed.map(Arc::new)));
        current.clone()
    }
}

impl Revision {
    /// The keys that may differ between the state of revision `seen` (of this
    /// lineage) and this one; `None` when the steps do not say (another lineage, a
    /// step too old to be kept, a step of unknown changes).
    #[must_use]
    pub fn changed_since(&self, seen: &Revision) -> Option<ChangedKeys> {
        if self.lineage == 0 || seen.lineage != self.lineage || seen.number > self.number {
            return None;
        }
        let mut changed = ChangedKeys::default();
        let mut expected = seen.number + 1;
        for (number, step) in &self.steps {
            if *number < expected {
                continue;
            }
            if *number != expected {
                return None;
            }
            let step = step.as_ref()?;
            changed.services.extend(step.services.iter().cloned());
            changed
                .endpoint_slices
                .extend(step.endpoint_slices.iter().cloned());
            expected += 1;
        }
        (expected == self.number + 1).then_some(changed)
    }
}

/// One shared copy of each distinct value that many objects repeat (short strings:
/// node names, zones, port names, policy values; an endpoint's [`EndpointDetails`]). Entries
/// nobody else holds any more are dropped whenever the table has doubled since the
/// last sweep, so it stays bounded by what the objects in memory use.
struct Interner<T: ?Sized> {
    known: HashSet<Arc<T>>,
    /// Size after the last sweep.
    swept_at: usize,
}

impl<T: ?Sized + std::hash::Hash + Eq> Interner<T> {
    /// The shared copy of `value`, made by `make` when there is none yet.
    fn get<Q>(table: &Mutex<Option<Self>>, value: &Q, make: impl FnOnce(&Q) -> Arc<T>) -> Arc<T>
    where
        Arc<T>: std::borrow::Borrow<Q>,
        Q: ?Sized + std::hash::Hash + Eq,
    {
        let mut guard = table.lock().unwrap_or_else(PoisonError::into_inner);
        let interner = guard.get_or_insert_with(|| Self {
            known: HashSet::new(),
            swept_at: 0,
        });
        if let Some(known) = interner.known.get(value) {
            return Arc::clone(known);
        }
        if interner.known.len() >= 2 * interner.swept_at.max(1024) {
            interner.known.retain(|known| Arc::strong_count(known) > 1);
            interner.swept_at = interner.known.len();
        }
        let shared = make(value);
        interner.known.insert(Arc::clone(&shared));
        shared
    }
}

static STRINGS: Mutex<Option<Interner<str>>> = Mutex::new(None);
static DETAILS: Mutex<Option<Interner<EndpointDetails>>> = Mutex::new(None);

/// The shared copy of `text`.
#[must_use]
pub fn intern(text: &str) -> Arc<str> {
    Interner::get(&STRINGS, text, |text: &str| Arc::from(text))
}

/// The shared copy of `details`.
#[must_use]
pub fn intern_details(details: EndpointDetails) -> Arc<EndpointDetails> {
    Interner::get(&DETAILS, &details, |details| Arc::new(details.clone()))
}

fn intern_opt(text: Option<&String>) -> Option<Arc<str>> {
    text.map(|text| intern(text))
}

/// An IP address field: parsed, or the text as it was when it is no IP address (the
/// model reports it as malformed, quoting it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpField {
    Ip(IpAddr),
    Malformed(Box<str>),
}

impl IpField {
    #[must_use]
    pub fn parse(text: &str) -> Self {
        text.parse()
            .map_or_else(|_| Self::Malformed(text.into()), Self::Ip)
    }
}

/// An L4 protocol field: a known protocol ([`proxy_common::proto`]), or the text of
/// an unknown one. Unset means TCP, as the API defaults it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Known(u8),
    Unknown(Box<str>),
}

impl Protocol {
    #[must_use]
    pub fn parse(protocol: Option<&str>) -> Self {
        match protocol.unwrap_or("TCP") {
            "TCP" => Self::Known(proto::TCP),
            "UDP" => Self::Known(proto::UDP),
            "SCTP" => Self::Known(proto::SCTP),
            other => Self::Unknown(other.into()),
        }
    }
}

/// What the agent reads of a Service (its key is the map's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `metadata.creationTimestamp`: the older Service wins a frontend conflict.
    pub created: Option<Timestamp>,
    /// The `service.kubernetes.io/service-proxy-name` label: the service is ours only
    /// when it names us.
    pub proxy_name: Option<Box<str>>,
    /// The `service.kubernetes.io/headless` label is present: not ours.
    pub headless: bool,
    /// `spec`; `None` when the object has none (reported as malformed).
    pub spec: Option<ServiceSpecInfo>,
    /// `status.loadBalancer.ingress[]` entries with an IP (hostname-only entries name
    /// no address to translate).
    pub load_balancer_ingress: Box<[LoadBalancerIngressInfo]>,
}

/// What the agent reads of a ServiceSpec. Text fields the model compares with a few
/// values (type, policies) keep the text: names show it as the API gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpecInfo {
    /// `type` (`ClusterIP` when unset).
    pub type_: Option<Arc<str>>,
    /// `clusterIP` (`None` text marks a headless service).
    pub cluster_ip: Option<IpField>,
    /// `clusterIPs` (dual stack: supersedes `clusterIP` when not empty).
    pub cluster_ips: Box<[IpField]>,
    /// `ipFamilies` (`IPv4`, `IPv6`), in the order of `clusterIPs`.
    pub ip_families: Box<[Arc<str>]>,
    /// `ipFamilyPolicy` (`SingleStack`, `PreferDualStack`, `RequireDualStack`).
    pub ip_family_policy: Option<Arc<str>>,
    pub ports: Box<[ServicePortInfo]>,
    /// `sessionAffinity` is `ClientIP`.
    pub client_ip_affinity: bool,
    /// `internalTrafficPolicy` (`Cluster` when unset).
    pub internal_traffic_policy: Option<Arc<str>>,
    /// The fields a ClusterIP service leaves unset, boxed together (`None` when all
    /// are): 80 bytes of every service's 272 at 50 000 services, 4 MiB.
    pub rare: Option<Box<RareSpecFields>>,
}

/// The fields of a ServiceSpec most services leave unset (read through the
/// accessors of [`ServiceSpecInfo`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RareSpecFields {
    /// `externalIPs`.
    pub external_ips: Box<[IpField]>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, as given (checked by the model).
    pub affinity_timeout_seconds: Option<i32>,
    /// `externalTrafficPolicy` (`Cluster` when unset).
    pub external_traffic_policy: Option<Arc<str>>,
    /// `healthCheckNodePort`, as given (checked by the model).
    pub health_check_node_port: Option<i32>,
    /// `loadBalancerSourceRanges`, as written (the model parses and reports them).
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    /// `trafficDistribution` (`PreferClose`, ...).
    pub traffic_distribution: Option<Arc<str>>,
}

impl ServiceSpecInfo {
    /// `externalIPs`.
    #[must_use]
    pub fn external_ips(&self) -> &[IpField] {
        self.rare.as_ref().map_or(&[], |rare| &rare.external_ips)
    }

    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, as given.
    #[must_use]
    pub fn affinity_timeout_seconds(&self) -> Option<i32> {
        self.rare.as_ref()?.affinity_timeout_seconds
    }

    /// `externalTrafficPolicy` (`Cluster` when unset).
    #[must_use]
    pub fn external_traffic_policy(&self) -> Option<&str> {
        self.rare.as_ref()?.external_traffic_policy.as_deref()
    }

    /// `healthCheckNodePort`, as given.
    #[must_use]
    pub fn health_check_node_port(&self) -> Option<i32> {
        self.rare.as_ref()?.health_check_node_port
    }

    /// `loadBalancerSourceRanges`, as written.
    #[must_use]
    pub fn load_balancer_source_ranges(&self) -> &[Box<str>] {
        self.rare
            .as_ref()
            .map_or(&[], |rare| &rare.load_balancer_source_ranges)
    }

    /// `trafficDistribution`.
    #[must_use]
    pub fn traffic_distribution(&self) -> Option<&str> {
        self.rare.as_ref()?.traffic_distribution.as_deref()
    }
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// `name`, empty when unset (as kube-proxy names the port).
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// `port`, as given (the model checks the range).
    pub port: i32,
    /// `nodePort`, as given.
    pub node_port: Option<i32>,
}

/// One `status.loadBalancer.ingress[]` entry with an IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancerIngressInfo {
    pub ip: IpField,
    /// `ipMode` (`VIP`, `Proxy`: a proxying load balancer's IP is never a destination).
    pub ip_mode: Option<Arc<str>>,
}

impl From<&Service> for ServiceInfo {
    fn from(service: &Service) -> Self {
        let labels = service.metadata.labels.as_ref();
        let label = |name: &str| labels.and_then(|labels| labels.get(name));
        let load_balancer_ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ingress| {
                Some(LoadBalancerIngressInfo {
                    ip: IpField::parse(ingress.ip.as_deref()?),
                    ip_mode: intern_opt(ingress.ip_mode.as_ref()),
                })
            })
            .collect();
        Self {
            created: service
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0),
            proxy_name: label(LABEL_SERVICE_PROXY_NAME).map(|name| name.as_str().into()),
            headless: label(LABEL_HEADLESS).is_some(),
            spec: service.spec.as_ref().map(ServiceSpecInfo::from),
            load_balancer_ingress,
        }
    }
}

fn ip_fields(ips: Option<&Vec<String>>) -> Box<[IpField]> {
    ips.into_iter()
        .flatten()
        .map(|ip| IpField::parse(ip))
        .collect()
}

impl From<&ServiceSpec> for ServiceSpecInfo {
    fn from(spec: &ServiceSpec) -> Self {
        let rare = RareSpecFields {
            external_ips: ip_fields(spec.external_ips.as_ref()),
            affinity_timeout_seconds: spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds),
            external_traffic_policy: intern_opt(spec.external_traffic_policy.as_ref()),
            health_check_node_port: spec.health_check_node_port,
            load_balancer_source_ranges: spec
                .load_balancer_source_ranges
                .iter()
                .flatten()
                .map(|range| range.as_str().into())
                .collect(),
            traffic_distribution: intern_opt(spec.traffic_distribution.as_ref()),
        };
        Self {
            type_: intern_opt(spec.type_.as_ref()),
            cluster_ip: spec.cluster_ip.as_deref().map(IpField::parse),
            cluster_ips: ip_fields(spec.cluster_ips.as_ref()),
            ip_families: spec
                .ip_families
                .iter()
                .flatten()
                .map(|family| intern(family))
                .collect(),
            ip_family_policy: intern_opt(spec.ip_family_policy.as_ref()),
            ports: spec
                .ports
                .iter()
                .flatten()
                .map(ServicePortInfo::from)
                .collect(),
            client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
            internal_traffic_policy: intern_opt(spec.internal_traffic_policy.as_ref()),
            rare: (rare != RareSpecFields::default()).then(|| Box::new(rare)),
        }
    }
}

impl From<&ServicePort> for ServicePortInfo {
    fn from(port: &ServicePort) -> Self {
        Self {
            name: intern(port.name.as_deref().unwrap_or_default()),
            protocol: Protocol::parse(port.protocol.as_deref()),
            port: port.port,
            node_port: port.node_port,
        }
    }
}

/// An EndpointSlice's `addressType`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
    /// A value the API would not accept, as written.
    Unknown(Box<str>),
}

/// What the agent reads of an EndpointSlice (its key is the map's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// The `kubernetes.io/service-name` label: the Service the slice belongs to.
    pub service_name: Option<Box<str>>,
    pub address_type: AddressType,
    pub ports: Box<[SlicePortInfo]>,
    /// The endpoints that have an address (kube-proxy skips the others).
    pub endpoints: Box<[EndpointInfo]>,
    /// The [`TRIGGER_TIME_ANNOTATION`], as written.
    pub trigger_time: Option<Box<str>>,
}

/// One entry of an EndpointSlice's `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortInfo {
    /// `name`, empty when unset (matched with the service port's name).
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// `port`, as given (the model checks the range).
    pub port: Option<i32>,
}

/// The first of an endpoint's `addresses` (kube-proxy uses no other), as the model and
/// the names read it: an IP address, or the text as written when it is none
/// (malformed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointAddress<'a> {
    Ip(IpAddr),
    Text(&'a str),
}

impl EndpointAddress<'_> {
    /// The address, unless it is malformed.
    #[must_use]
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            Self::Ip(ip) => Some(ip),
            Self::Text(_) => None,
        }
    }
}

impl std::fmt::Display for EndpointAddress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Text(text) => f.write_str(text),
        }
    }
}

/// An address that is not IPv4, kept in the endpoint's [`EndpointDetails`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OtherAddress {
    V6(Ipv6Addr),
    /// Text that is no IP address, as written.
    Text(Box<str>),
}

/// [`EndpointInfo::bits`]: the conditions, and whether the address is the IPv4 one
/// held inline.
mod endpoint_bits {
    pub const READY: u8 = 1;
    pub const SERVING: u8 = 1 << 1;
    pub const TERMINATING: u8 = 1 << 2;
    /// `ipv4` is the address; else [`super::EndpointDetails::address`] holds it.
    pub const IPV4: u8 = 1 << 3;
}

/// One endpoint of a slice: 16 bytes. Half a million of them (50 000 services of 10
/// endpoints) were 24 MB at 48 bytes, plus a pod name of its own each (another 16 MB):
/// now the IPv4 address and the conditions are held inline, and everything else the
/// endpoint says (pod, node, zone, hints, an address that is not IPv4) is one
/// [`EndpointDetails`] shared by every endpoint that says the same (the endpoints of
/// one pod in the slices of several services, or of both families). Conditions hold
/// the API's defaults for unset values (ready and serving unless said otherwise, not
/// terminating), as kube-proxy reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `None` when the endpoint says nothing but an IPv4 address and its conditions.
    details: Option<Arc<EndpointDetails>>,
    ipv4: Ipv4Addr,
    /// [`endpoint_bits`].
    bits: u8,
}

impl EndpointInfo {
    /// An endpoint from what it says (the form [`EndpointInfo::of`] reads from the API
    /// object); `address` as written in the slice.
    #[must_use]
    pub fn new(address: &str, conditions: EndpointConditions, details: EndpointDetails) -> Self {
        let mut bits = 0;
        for (set, bit) in [
            (conditions.ready, endpoint_bits::READY),
            (conditions.serving, endpoint_bits::SERVING),
            (conditions.terminating, endpoint_bits::TERMINATING),
        ] {
            if set {
                bits |= bit;
            }
        }
        let mut details = details;
        let ipv4 = match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => {
                bits |= endpoint_bits::IPV4;
                v4
            }
            Ok(IpAddr::V6(v6)) => {
                details.address = Some(OtherAddress::V6(v6));
                Ipv4Addr::UNSPECIFIED
            }
            Err(_) => {
                details.address = Some(OtherAddress::Text(address.into()));
                Ipv4Addr::UNSPECIFIED
            }
        };
        Self {
            details: (details != EndpointDetails::default()).then(|| intern_details(details)),
            ipv4,
            bits,
        }
    }

    /// The endpoint's address.
    #[must_use]
    pub fn address(&self) -> EndpointAddress<'_> {
        if self.bits & endpoint_bits::IPV4 != 0 {
            return EndpointAddress::Ip(IpAddr::V4(self.ipv4));
        }
        match self.details.as_ref().and_then(|d| d.address.as_ref()) {
            Some(OtherAddress::V6(v6)) => EndpointAddress::Ip(IpAddr::V6(*v6)),
            Some(OtherAddress::Text(text)) => EndpointAddress::Text(text),
            // Not made by `new`, which always records the address somewhere.
            None => EndpointAddress::Text(""),
        }
    }

    /// `conditions.ready`.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.bits & endpoint_bits::READY != 0
    }

    /// `conditions.serving`.
    #[must_use]
    pub fn serving(&self) -> bool {
        self.bits & endpoint_bits::SERVING != 0
    }

    /// `conditions.terminating`.
    #[must_use]
    pub fn terminating(&self) -> bool {
        self.bits & endpoint_bits::TERMINATING != 0
    }

    /// What the endpoint says besides its IPv4 address and conditions (shared).
    #[must_use]
    pub fn details(&self) -> Option<&Arc<EndpointDetails>> {
        self.details.as_ref()
    }

    /// `targetRef.name` when the target is a Pod (for `kpr inspect`).
    #[must_use]
    pub fn pod(&self) -> Option<&Arc<str>> {
        self.details.as_ref()?.pod.as_ref()
    }

    /// `nodeName`.
    #[must_use]
    pub fn node_name(&self) -> Option<&Arc<str>> {
        self.details.as_ref()?.node_name.as_ref()
    }

    /// `zone`.
    #[must_use]
    pub fn zone(&self) -> Option<&Arc<str>> {
        self.details.as_ref()?.zone.as_ref()
    }

    /// `hints`, when there are any (most endpoints have none).
    #[must_use]
    pub fn hints(&self) -> Option<&EndpointHintsInfo> {
        self.details.as_ref()?.hints.as_ref()
    }
}

/// An endpoint's `conditions`, with the API's defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointConditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Default for EndpointConditions {
    /// Unset means ready and serving, not terminating (API docs; kube-proxy's
    /// endpointslicecache).
    fn default() -> Self {
        Self {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// Who an endpoint is and where it runs: its pod, node, zone and topology hints, and
/// its address when that is not IPv4. Interned ([`intern_details`]): the endpoints of
/// one pod share one copy, and so do the pod-less endpoints of one node (a few
/// distinct values per node, where a copy of the pod name per endpoint cost 32 bytes
/// each and the node, zone and hints pointers 40 more).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointDetails {
    /// `targetRef.name` when the target is a Pod.
    pub pod: Option<Arc<str>>,
    /// `nodeName`.
    pub node_name: Option<Arc<str>>,
    /// `zone`.
    pub zone: Option<Arc<str>>,
    /// `hints`, when there are any.
    pub hints: Option<EndpointHintsInfo>,
    /// The address of an endpoint whose address is not IPv4 (an IPv6 endpoint's
    /// details are its own, as its address is).
    pub address: Option<OtherAddress>,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointHintsInfo {
    /// `forZones[].name`.
    pub for_zones: Box<[Arc<str>]>,
    /// `forNodes[].name`.
    pub for_nodes: Box<[Arc<str>]>,
}

impl From<&EndpointSlice> for SliceInfo {
    fn from(slice: &EndpointSlice) -> Self {
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::IPv4,
            "IPv6" => AddressType::IPv6,
            "FQDN" => AddressType::Fqdn,
            other => AddressType::Unknown(other.into()),
        };
        Self {
            service_name: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_SERVICE_NAME))
                .map(|name| name.as_str().into()),
            address_type,
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(SlicePortInfo::from)
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .filter_map(EndpointInfo::of)
                .collect(),
            trigger_time: slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(TRIGGER_TIME_ANNOTATION))
                .map(|time| time.as_str().into()),
        }
    }
}

impl From<&EndpointPort> for SlicePortInfo {
    fn from(port: &EndpointPort) -> Self {
        Self {
            name: intern(port.name.as_deref().unwrap_or_default()),
            protocol: Protocol::parse(port.protocol.as_deref()),
            port: port.port,
        }
    }
}

impl EndpointInfo {
    /// The endpoint, unless it has no address.
    fn of(endpoint: &Endpoint) -> Option<Self> {
        let address = endpoint.addresses.first()?;
        let hints = endpoint.hints.as_ref().and_then(|hints| {
            let for_zones: Box<[Arc<str>]> = hints
                .for_zones
                .iter()
                .flatten()
                .map(|zone| intern(&zone.name))
                .collect();
            let for_nodes: Box<[Arc<str>]> = hints
                .for_nodes
                .iter()
                .flatten()
                .map(|node| intern(&node.name))
                .collect();
            (!for_zones.is_empty() || !for_nodes.is_empty()).then_some(EndpointHintsInfo {
                for_zones,
                for_nodes,
            })
        });
        let details = EndpointDetails {
            pod: endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
                .and_then(|target| target.name.as_deref())
                // Not interned on its own: the details are, and a pod's name is in
                // no others.
                .map(Arc::from),
            node_name: intern_opt(endpoint.node_name.as_ref()),
            zone: intern_opt(endpoint.zone.as_ref()),
            hints,
            address: None,
        };
        let conditions = endpoint.conditions.as_ref();
        let unset = EndpointConditions::default();
        let conditions = EndpointConditions {
            ready: conditions.and_then(|c| c.ready).unwrap_or(unset.ready),
            serving: conditions.and_then(|c| c.serving).unwrap_or(unset.serving),
            terminating: conditions
                .and_then(|c| c.terminating)
                .unwrap_or(unset.terminating),
        };
        Some(Self::new(address, conditions, details))
    }
}

// What one endpoint costs beyond the details it shares: half a million of them (50 000
// services of 10 endpoints) take this times 500 000 bytes, 8 MB at 16 (24 MB at 48,
// with an address enum and the node's details pointer, plus its own pod name).
const _: () = assert!(size_of::<EndpointInfo>() == 16);
#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(yaml: &str) -> Option<EndpointInfo> {
        let endpoint: Endpoint = serde_yaml::from_str(yaml).expect("an endpoint");
        EndpointInfo::of(&endpoint)
    }

    /// What an endpoint says comes back from its compact form, address by kind.
    #[test]
    fn endpoints_keep_what_they_said() {
        let cases = [
            (
                "{addresses: [10.0.0.1], nodeName: n1, zone: z1, \
                 hints: {forZones: [{name: z1}], forNodes: [{name: n1}]}, \
                 targetRef: {kind: Pod, name: web-1}, conditions: {ready: false}}",
                "10.0.0.1",
                Some("n1"),
                Some("z1"),
                Some((vec!["z1"], vec!["n1"])),
                Some("web-1"),
                (false, true, false),
            ),
            (
                "{addresses: ['fd00::1', '10.0.0.9'], nodeName: n2, \
                 targetRef: {kind: Node, name: n2}, conditions: {terminating: true}}",
                "fd00::1",
                Some("n2"),
                None,
                None,
                None,
                (true, true, true),
            ),
            (
                "{addresses: [not-an-ip], zone: z2, conditions: {serving: false}}",
                "not-an-ip",
                None,
                Some("z2"),
                None,
                None,
                (true, false, false),
            ),
            (
                "{addresses: [10.0.0.2], hints: {forZones: []}}",
                "10.0.0.2",
                None,
                None,
                None,
                None,
                (true, true, false),
            ),
        ];
        for (yaml, address, node, zone, hints, pod, conditions) in cases {
            let inline = address.parse::<Ipv4Addr>().is_ok();
            let bare = node.is_none() && zone.is_none() && hints.is_none() && pod.is_none();
            let info = endpoint(yaml).expect("has an address");
            assert_eq!(info.address().to_string(), address, "{yaml}");
            assert_eq!(
                info.address().ip(),
                address.parse::<IpAddr>().ok(),
                "{yaml}"
            );
            assert_eq!(info.node_name().map(|n| &**n), node, "{yaml}");
            assert_eq!(info.zone().map(|z| &**z), zone, "{yaml}");
            let got_hints = info.hints().map(|hints| {
                let names = |names: &[Arc<str>]| -> Vec<String> {
                    names.iter().map(ToString::to_string).collect()
                };
                (names(&hints.for_zones), names(&hints.for_nodes))
            });
            let want_hints = hints.map(|(zones, nodes): (Vec<&str>, Vec<&str>)| {
                let owned = |names: Vec<&str>| names.into_iter().map(String::from).collect();
                (owned(zones), owned(nodes))
            });
            assert_eq!(got_hints, want_hints, "{yaml}");
            assert_eq!(info.pod().map(|p| &**p), pod, "{yaml}");
            assert_eq!(
                (info.ready(), info.serving(), info.terminating()),
                conditions,
                "{yaml}"
            );
            // An IPv4 endpoint that says nothing else needs no details; any other
            // address is kept in them.
            assert_eq!(info.details().is_none(), bare && inline, "{yaml}");
        }
        assert_eq!(endpoint("{addresses: []}"), None, "no address, no endpoint");
    }

    /// Every combination of conditions and every kind of address survives the
    /// packing into one byte and the inline IPv4 address.
    #[test]
    fn conditions_and_addresses_pack() {
        let addresses = [
            "10.1.2.3",
            "0.0.0.0",
            "fd00::7",
            "::ffff:10.0.0.1",
            "bad addr",
        ];
        for address in addresses {
            for bits in 0..8u8 {
                let conditions = EndpointConditions {
                    ready: bits & 1 != 0,
                    serving: bits & 2 != 0,
                    terminating: bits & 4 != 0,
                };
                let info = EndpointInfo::new(address, conditions, EndpointDetails::default());
                assert_eq!(info.ready(), conditions.ready, "{address} {bits}");
                assert_eq!(info.serving(), conditions.serving, "{address} {bits}");
                assert_eq!(
                    info.terminating(),
                    conditions.terminating,
                    "{address} {bits}"
                );
                assert_eq!(info.address().to_string(), address, "{address}");
                assert_eq!(info.address().ip(), address.parse().ok(), "{address}");
            }
        }
        let v4 = EndpointInfo::new(
            "10.1.2.3",
            EndpointConditions::default(),
            Default::default(),
        );
        let v4_other = EndpointInfo::new(
            "10.1.2.4",
            EndpointConditions::default(),
            Default::default(),
        );
        assert_ne!(v4, v4_other, "the inline address takes part in equality");
    }

    /// Endpoints of one pod, node, zone and hints share their details; any
    /// difference makes another, and an IPv6 address details of its own.
    #[test]
    fn details_are_shared() {
        let on = |address: &str, pod: &str, node: &str, zone: &str| {
            endpoint(&format!(
                "{{addresses: ['{address}'], nodeName: {node}, zone: {zone}, \
                 targetRef: {{kind: Pod, name: {pod}}}}}"
            ))
            .and_then(|info| info.details().cloned())
            .expect("placed")
        };
        let first = on("10.0.0.1", "pod-a", "node-loc-a", "zone-loc-1");
        assert!(Arc::ptr_eq(
            &first,
            &on("10.9.0.1", "pod-a", "node-loc-a", "zone-loc-1")
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &on("10.0.0.1", "pod-b", "node-loc-a", "zone-loc-1")
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &on("10.0.0.1", "pod-a", "node-loc-a", "zone-loc-2")
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &on("10.0.0.1", "pod-a", "node-loc-b", "zone-loc-1")
        ));
        let v6 = on("fd00::1", "pod-a", "node-loc-a", "zone-loc-1");
        assert!(!Arc::ptr_eq(&first, &v6));
        assert_eq!(
            v6.address,
            Some(OtherAddress::V6("fd00::1".parse().expect("v6")))
        );
        let node = first.node_name.as_ref().expect("a node");
        assert!(Arc::ptr_eq(node, &intern("node-loc-a")), "its strings too");
    }

    fn keys(count: usize) -> ChangedKeys {
        ChangedKeys {
            services: (0..count)
                .map(|n| ObjectKey::new("ns", format!("s{n}")))
                .collect(),
            endpoint_slices: std::collections::BTreeSet::new(),
        }
    }

    /// A source's first state and a step of more than [`MAX_CHANGED_KEYS`] keep no
    /// keys: a consumer compares everything, as it would have to anyway (first) or
    /// at the cost of one walk (many); smaller steps still name their keys.
    #[test]
    fn large_steps_keep_no_keys() {
        let mut revisions = Revisions::default();
        let first = revisions.next(Some(keys(3)));
        assert!(first.steps.iter().all(|(_, step)| step.is_none()));
        let second = revisions.next(Some(keys(2)));
        assert_eq!(second.changed_since(&first), Some(keys(2)));
        let third = revisions.next(Some(keys(MAX_CHANGED_KEYS + 1)));
        assert_eq!(third.changed_since(&second), None);
        assert_eq!(third.changed_since(&first), None);
        let fourth = revisions.next(Some(keys(MAX_CHANGED_KEYS)));
        assert_eq!(fourth.changed_since(&third), Some(keys(MAX_CHANGED_KEYS)));
    }
}
