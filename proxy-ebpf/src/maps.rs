//! The maps, declared once. Layouts, names and capacities live in proxy-common; the
//! static's name is the map name the agent looks up and pins. Maps are declared
//! unpinned: the agent chooses the pin directory at load time (tests load without one).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use proxy_common::{
    capacity, counter,
    service_stats::{self, ServiceStatsV1},
    AffinityKeyV4, AffinityKeyV6, AffinityValueV4, AffinityValueV6, BackendV4, BackendV6, Be32,
    Be32x4, CtEntryV4, CtEntryV6, CtKeyV4, CtKeyV6, DatapathConfig, FragKeyV4, FragKeyV6,
    FragValueV4, FragValueV6, FrontendAddrV4, FrontendAddrV6, NodeConfigV6, ServiceCidrV4,
    ServiceKeyV4, ServiceKeyV6, ServiceValueV4, ServiceValueV6, SourceRangeV4, SourceRangeV6,
};

/// Frontends and backend slots ([`proxy_common::names::SERVICES_V4`]).
#[map]
pub static SVC_V4_V1: HashMap<ServiceKeyV4, ServiceValueV4> =
    HashMap::with_max_entries(capacity::SERVICES_V4, 0);

/// Every address a frontend uses, with what it is used as
/// ([`proxy_common::names::FRONTEND_ADDRS_V4`]): one small lookup tells a packet to a
/// service from everything else ([`crate::destination`]).
#[map]
pub static FE_ADDR_V4_V1: HashMap<Be32, FrontendAddrV4> =
    HashMap::with_max_entries(capacity::FRONTEND_ADDRS_V4, 0);

/// The service CIDR, one entry ([`proxy_common::names::SERVICE_CIDR_V4`]).
#[map]
pub static SVC_CIDR_V4_V1: Array<ServiceCidrV4> = Array::with_max_entries(1, 0);

/// Backends by id ([`proxy_common::names::BACKENDS_V4`]).
#[map]
pub static BACKEND_V4_V1: HashMap<u32, BackendV4> =
    HashMap::with_max_entries(capacity::BACKENDS_V4, 0);

/// Established flows, both directions ([`proxy_common::names::CONNTRACK_V4`]). A plain
/// hash: inserts fail when it is full instead of evicting an established flow (see
/// [`crate::conntrack`]).
#[map]
pub static CT_V4_V2: HashMap<CtKeyV4, CtEntryV4> =
    HashMap::with_max_entries(capacity::CONNTRACK_V4, 0);

/// Flows not yet seen both ways ([`proxy_common::names::CONNTRACK_NEW_V4`]). LRU: a
/// flood of new flows evicts the oldest new flows, never an established one.
#[map]
pub static CT_NEW_V4_V2: LruHashMap<CtKeyV4, CtEntryV4> =
    LruHashMap::with_max_entries(capacity::CONNTRACK_NEW_V4, 0);

/// When an insert into the established table last failed for lack of room
/// ([`proxy_common::names::CONNTRACK_FULL`]), `bpf_ktime_get_ns()`.
#[map]
pub static CT_FULL_V1: Array<u64> = Array::with_max_entries(1, 0);

/// Session affinity ([`proxy_common::names::AFFINITY_V4`]).
#[map]
pub static AFFINITY_V4_V2: LruHashMap<AffinityKeyV4, AffinityValueV4> =
    LruHashMap::with_max_entries(capacity::AFFINITY_V4, 0);

/// loadBalancerSourceRanges by service id ([`proxy_common::names::SOURCE_RANGES_V4`]).
#[map]
pub static SRCRANGE_V4_V1: LpmTrie<SourceRangeV4, u8> =
    LpmTrie::with_max_entries(capacity::SOURCE_RANGES_V4, 0);

/// First fragments' ports by datagram ([`proxy_common::names::FRAGMENTS_V4`]), for
/// the fragments that follow. LRU: a datagram whose later fragments never come just
/// ages out.
#[map]
pub static FRAG_V4_V1: LruHashMap<FragKeyV4, FragValueV4> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS_V4, 0);

/// IPv6 frontends and backend slots ([`proxy_common::names::SERVICES_V6`]).
#[map]
pub static SVC_V6_V1: HashMap<ServiceKeyV6, ServiceValueV6> =
    HashMap::with_max_entries(capacity::SERVICES_V6, 0);

/// Every IPv6 address a frontend uses ([`proxy_common::names::FRONTEND_ADDRS_V6`]).
#[map]
pub static FE_ADDR_V6_V1: HashMap<Be32x4, FrontendAddrV6> =
    HashMap::with_max_entries(capacity::FRONTEND_ADDRS_V6, 0);

/// IPv6 backends by id ([`proxy_common::names::BACKENDS_V6`]).
#[map]
pub static BACKEND_V6_V1: HashMap<u32, BackendV6> =
    HashMap::with_max_entries(capacity::BACKENDS_V6, 0);

/// Established IPv6 flows ([`proxy_common::names::CONNTRACK_V6`]), as `CT_V4_V2`.
#[map]
pub static CT_V6_V1: HashMap<CtKeyV6, CtEntryV6> =
    HashMap::with_max_entries(capacity::CONNTRACK_V6, 0);

/// IPv6 flows not yet seen both ways ([`proxy_common::names::CONNTRACK_NEW_V6`]), as
/// `CT_NEW_V4_V2`.
#[map]
pub static CT_NEW_V6_V1: LruHashMap<CtKeyV6, CtEntryV6> =
    LruHashMap::with_max_entries(capacity::CONNTRACK_NEW_V6, 0);

/// First fragments' ports of IPv6 datagrams ([`proxy_common::names::FRAGMENTS_V6`]),
/// as `FRAG_V4_V1`.
#[map]
pub static FRAG_V6_V1: LruHashMap<FragKeyV6, FragValueV6> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS_V6, 0);

/// Session affinity of IPv6 clients ([`proxy_common::names::AFFINITY_V6`]), as
/// `AFFINITY_V4_V2`.
#[map]
pub static AFFINITY_V6_V1: LruHashMap<AffinityKeyV6, AffinityValueV6> =
    LruHashMap::with_max_entries(capacity::AFFINITY_V6, 0);

/// IPv6 loadBalancerSourceRanges by service id
/// ([`proxy_common::names::SOURCE_RANGES_V6`]), as `SRCRANGE_V4_V1`.
#[map]
pub static SRCRANGE_V6_V1: LpmTrie<SourceRangeV6, u8> =
    LpmTrie::with_max_entries(capacity::SOURCE_RANGES_V6, 0);

/// The node's IPv6 settings ([`proxy_common::names::CONFIG_V6`]): one entry.
#[map]
pub static CONFIG_V6_V1: Array<NodeConfigV6> = Array::with_max_entries(1, 0);

/// Event and drop counters ([`proxy_common::counter`]).
#[map]
pub static COUNTERS_V3: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-service traffic counters by service id ([`proxy_common::service_stats`]).
#[map]
pub static SVC_STATS_V1: PerCpuHashMap<u32, ServiceStatsV1> =
    PerCpuHashMap::with_max_entries(service_stats::CAPACITY, service_stats::NO_PREALLOC);

/// Runtime settings, one entry ([`proxy_common::DatapathConfig`]).
#[map]
pub static CONFIG_V3: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// The datapath settings, or the defaults until the agent has written them.
#[inline(always)]
pub fn config() -> DatapathConfig {
    match CONFIG_V3.get(0) {
        Some(config) if config.udp_timeout_s != 0 => *config,
        _ => DatapathConfig::DEFAULT,
    }
}

/// The node's IPv6 settings (all-zero, "none", until the agent writes them), read in
/// place: the IPv6 frames have no room for a copy.
#[inline(always)]
pub fn config_v6() -> Option<&'static NodeConfigV6> {
    CONFIG_V6_V1.get(0)
}

/// Pod-facing interfaces whose clients have flows through the stack
/// ([`proxy_common::names::VIA_STACK_IFACES`], [`crate::via_stack`]).
#[map]
pub static VIA_STACK_IF_V1: Array<u32> = Array::with_max_entries(capacity::VIA_STACK_IFACES, 0);
