//! BPF map layouts, names, capacities and flag values.
//!
//! The service table follows the layout the best-known datapaths converged on: one hash
//! map keyed by `(frontend address, port, protocol, scope, slot)`. Slot 0 is the
//! frontend itself (backend count, flags, service id); slots `1..=count` name the
//! backends. A packet picks a random slot in `1..=count`, so choosing a backend is two
//! O(1) lookups no matter how many services or backends exist.
//!
//! Update ordering (kept by the agent's syncer, relied upon here): backends and slots
//! are written before the frontend's count is raised, and the count is lowered before
//! slots or backends are deleted. A packet that reads count `n` therefore always finds
//! slots `1..=n` and the backends they name.
use crate::{Be16, Be32, Be32x4};

/// Map names. The kernel keeps 15 bytes of a map name, and the agent pins maps under
/// these names, so they double as the on-disk ABI: a layout change bumps the suffix.
pub mod names {
    pub const SERVICES_V4: &str = "SVC_V4_V1";
    pub const BACKENDS_V4: &str = "BACKEND_V4_V1";
    /// Established flows (seen both ways): a plain hash, never evicted by inserts.
    pub const CONNTRACK_V4: &str = "CT_V4_V2";
    /// Flows not yet seen both ways (half-open TCP, unanswered UDP): LRU.
    pub const CONNTRACK_NEW_V4: &str = "CT_NEW_V4_V2";
    /// When an insert into the established table last failed for lack of room.
    pub const CONNTRACK_FULL: &str = "CT_FULL_V1";
    pub const AFFINITY_V4: &str = "AFFINITY_V4_V2";
    pub const SOURCE_RANGES_V4: &str = "SRCRANGE_V4_V1";
    pub const FRAGMENTS_V4: &str = "FRAG_V4_V1";
    pub const COUNTERS: &str = "COUNTERS_V3";
    pub const CONFIG: &str = "CONFIG_V3";
    /// Every address some frontend uses, checked before conntrack and services.
    pub const FRONTEND_ADDRS_V4: &str = "FE_ADDR_V4_V1";
    /// The service CIDR (one entry), whose unallocated addresses are dropped.
    pub const SERVICE_CIDR_V4: &str = "SVC_CIDR_V4_V1";
    /// IPv6 frontends and backend slots ([`crate::ServiceKeyV6`]).
    pub const SERVICES_V6: &str = "SVC_V6_V1";
    pub const BACKENDS_V6: &str = "BACKEND_V6_V1";
    /// Established IPv6 flows (a plain hash, as [`CONNTRACK_V4`]).
    pub const CONNTRACK_V6: &str = "CT_V6_V1";
    /// IPv6 flows not yet seen both ways (LRU, as [`CONNTRACK_NEW_V4`]).
    pub const CONNTRACK_NEW_V6: &str = "CT_NEW_V6_V1";
    /// Every IPv6 address some frontend uses.
    pub const FRONTEND_ADDRS_V6: &str = "FE_ADDR_V6_V1";
    /// First fragments' ports of IPv6 datagrams ([`crate::FragKeyV6`]).
    pub const FRAGMENTS_V6: &str = "FRAG_V6_V1";
    /// The node's IPv6 settings (one entry, [`crate::NodeConfigV6`]).
    pub const CONFIG_V6: &str = "CONFIG_V6_V1";
    /// Session affinity of IPv6 clients ([`crate::AffinityKeyV6`]).
    pub const AFFINITY_V6: &str = "AFFINITY_V6_V1";
    /// loadBalancerSourceRanges of IPv6 ([`crate::SourceRangeV6`]).
    pub const SOURCE_RANGES_V6: &str = "SRCRANGE_V6_V1";
    /// Pod-facing interfaces whose pods have flows translated by TC, both families
    /// ([`crate::via_stack_slot`]).
    pub const VIA_STACK_IFACES: &str = "VIA_STACK_IF_V1";
}

/// Default capacities; the agent may raise them at load time.
pub mod capacity {
    /// Frontends plus backend slots (a service with 3 backends takes 4 entries).
    pub const SERVICES_V4: u32 = 262_144;
    pub const BACKENDS_V4: u32 = 131_072;
    /// Established flows, two entries each (original and reply direction).
    pub const CONNTRACK_V4: u32 = 524_288;
    /// Flows not yet established, two entries each. A quarter of the established
    /// table: a flow stays here for one round trip (TCP) or while it is unanswered.
    pub const CONNTRACK_NEW_V4: u32 = 131_072;

    /// The new-flow table that goes with an established table of `established`
    /// entries (`--conntrack-max`).
    #[must_use]
    pub const fn conntrack_new_for(established: u32) -> u32 {
        let quarter = established / 4;
        if quarter < 256 {
            256
        } else {
            quarter
        }
    }
    pub const AFFINITY_V4: u32 = 131_072;
    /// loadBalancerSourceRanges entries, all services together.
    pub const SOURCE_RANGES_V4: u32 = 16_384;
    /// Fragmented datagrams of translated flows in flight (LRU: the oldest make room).
    pub const FRAGMENTS_V4: u32 = 8_192;
    /// Distinct frontend addresses. Each takes at least one entry of the service map,
    /// so there can never be more of them than it holds.
    pub const FRONTEND_ADDRS_V4: u32 = SERVICES_V4;

    /// The IPv6 tables, a quarter of their IPv4 counterparts: every load preallocates
    /// a hash map's entries (an IPv6 conntrack entry and key take 104 bytes against
    /// 56), and most clusters are IPv4 or dual-stack with IPv4 first. The agent grows
    /// the service, backend and source-range maps past these for the cluster it finds
    /// at start, as it grows the IPv4 ones; conntrack and affinity keep these sizes.
    pub const SERVICES_V6: u32 = SERVICES_V4 / 4;
    pub const BACKENDS_V6: u32 = BACKENDS_V4 / 4;
    pub const CONNTRACK_V6: u32 = CONNTRACK_V4 / 4;
    pub const CONNTRACK_NEW_V6: u32 = conntrack_new_for(CONNTRACK_V6);
    pub const FRONTEND_ADDRS_V6: u32 = SERVICES_V6;
    pub const FRAGMENTS_V6: u32 = FRAGMENTS_V4 / 4;
    pub const AFFINITY_V6: u32 = AFFINITY_V4 / 4;
    pub const SOURCE_RANGES_V6: u32 = SOURCE_RANGES_V4 / 4;
    /// Slots of [`super::names::VIA_STACK_IFACES`]: interface indexes share a slot
    /// modulo this (a shared slot only costs the lookups it would save).
    pub const VIA_STACK_IFACES: u32 = 16_384;
}

/// The slot of [`names::VIA_STACK_IFACES`] that stands for interface `ifindex`.
///
/// The pod-facing egress program translates the replies of pods' flows that went
/// through the stack (to a local backend, or not redirected), on their way into the
/// client's pod: through the interface whose ingress program created the flow. A slot
/// is set (to 1) when that ingress program creates a flow and never cleared by the
/// datapath, so an egress packet whose interface's slot is 0 cannot be such a reply and
/// passes without the two conntrack lookups a miss costs. With socket-level translation on, pods'
/// flows never reach the TC programs, so most interfaces' slots stay 0.
#[must_use]
pub const fn via_stack_slot(ifindex: u32) -> u32 {
    ifindex % capacity::VIA_STACK_IFACES
}

/// How long a fragmented datagram's first fragment vouches for the later ones: the
/// kernel's reassembly timeout (`net.ipv4.ipfrag_time`, 30 s).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Scope of a frontend entry: which traffic it applies to.
pub mod scope {
    /// The backend set for every client (the only scope most services have).
    pub const DEFAULT: u8 = 0;
    /// The backend set for clients inside the cluster when it differs from the
    /// external one (externalTrafficPolicy Local reached from a local pod).
    pub const INTERNAL: u8 = 1;
}

/// What an address of the frontend address set is used as (value of
/// [`names::FRONTEND_ADDRS_V4`], bits ORed when one address serves several kinds).
pub mod frontend_addr {
    /// A ClusterIP: a packet to one of its ports that no frontend declares is
    /// rejected (kube-proxy's nftables mode rejects invalid ports of ClusterIPs).
    pub const CLUSTER_IP: u8 = 1 << 0;
    /// A node address (NodePort), externalIP or LoadBalancer IP: its other ports are
    /// the node's or someone else's, and pass untouched.
    pub const OTHER: u8 = 1 << 1;
}

/// Value of the frontend address set: its key is the address (`Be32`).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct FrontendAddrV4 {
    /// [`frontend_addr`] bits.
    pub kinds: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FrontendAddrV4>() == 4);

/// The service CIDR (kube-proxy's ServiceCIDR, from `--service-cidr`): a packet to an
/// address inside it that no frontend holds is dropped instead of routed out of the
/// node (kube-proxy's nftables mode drops traffic to unallocated ClusterIPs). Length
/// 0: unset, nothing is dropped.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ServiceCidrV4 {
    pub addr: Be32,
    pub len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceCidrV4>() == 8);

impl ServiceCidrV4 {
    /// Whether `addr` is inside the CIDR (false when it is unset).
    #[must_use]
    pub const fn contains(&self, addr: Be32) -> bool {
        if self.len == 0 || self.len > 32 {
            return false;
        }
        let mask = u32::MAX << (32 - self.len as u32);
        (u32::from_be(addr.0) & mask) == (u32::from_be(self.addr.0) & mask)
    }
}

/// Frontend flags (slot 0 `flags`).
pub mod service_flags {
    /// sessionAffinity ClientIP: a client keeps its backend for `affinity_timeout_s`.
    pub const AFFINITY: u16 = 1 << 0;
    /// With no backend, drop silently instead of rejecting (kube-proxy drops traffic
    /// for internalTrafficPolicy/externalTrafficPolicy Local services that have
    /// endpoints elsewhere but none on this node; it rejects only when a service has
    /// no endpoints at all).
    pub const DROP_WHEN_EMPTY: u16 = 1 << 1;
    /// A scope-INTERNAL entry exists for the same frontend.
    pub const HAS_INTERNAL_SCOPE: u16 = 1 << 2;
    /// The frontend is reached from outside the cluster (NodePort, externalIP,
    /// LoadBalancer): candidates for SNAT.
    pub const EXTERNAL: u16 = 1 << 3;
    /// externalTrafficPolicy Local: keep the client's source address.
    pub const EXTERNAL_LOCAL: u16 = 1 << 4;
    /// loadBalancerSourceRanges apply to this frontend.
    pub const SOURCE_RANGES: u16 = 1 << 5;
}

/// Backend flags.
pub mod backend_flags {
    /// The endpoint runs on this node: traffic from outside reaches it without SNAT,
    /// because its replies pass back through this node anyway.
    pub const LOCAL: u8 = 1 << 0;
}

/// Conntrack entry flags. The first three describe the entry's own direction; the
/// others are the flow's state, the same in both entries of a flow (the datapath
/// writes both whenever the state changes), modelled on the kernel's TCP tracker
/// (`nf_conntrack_proto_tcp.c`) and Cilium's `conntrack.h`:
///
/// | state | flags | timeout |
/// |---|---|---|
/// | SYN sent (only the client spoke) | none of the below | `tcp_syn_timeout_s` |
/// | SYN received (the server answered) | `SEEN_REPLY` | `tcp_syn_timeout_s` |
/// | established | `SEEN_REPLY`, `ASSURED` | `tcp_established_timeout_s` |
/// | half-closed (one FIN) | + `FIN_ORIGINAL` or `FIN_REPLY` | `tcp_established_timeout_s` |
/// | closed (both FINs, or a RST) | both FINs, or `RST` | `tcp_closing_timeout_s` |
///
/// UDP uses `SEEN_REPLY` and `ASSURED` alike, with `udp_timeout_s` throughout.
pub mod ct_flags {
    /// Rewrite the packet's source to `nat_src_addr:nat_src_port`.
    pub const REWRITE_SRC: u16 = 1 << 0;
    /// Rewrite the packet's destination to `nat_dst_addr:nat_dst_port`.
    pub const REWRITE_DST: u16 = 1 << 1;
    /// The entry matches the reply direction of a translated flow.
    pub const REPLY: u16 = 1 << 2;
    /// The flow goes through the kernel's stack in both directions (a local backend,
    /// not masqueraded): its requests are translated at ingress and routed by the
    /// kernel, its replies translated at egress after routing. Every other flow is
    /// redirected at TC in both directions. A flow must pass netfilter both ways or not
    /// at all: a forward-path `ct state invalid drop` drops half a handshake.
    pub const VIA_STACK: u16 = 1 << 3;
    /// A packet of the reply direction was seen.
    pub const SEEN_REPLY: u16 = 1 << 4;
    /// The flow was seen both ways (the client spoke again after the reply: TCP's
    /// handshake completed) and lives in the established table.
    pub const ASSURED: u16 = 1 << 5;
    /// The client (original direction) sent a FIN.
    pub const FIN_ORIGINAL: u16 = 1 << 6;
    /// The server (reply direction) sent a FIN.
    pub const FIN_REPLY: u16 = 1 << 7;
    /// Either side sent a RST.
    pub const RST: u16 = 1 << 8;

    /// Both sides closed, or the connection was reset: the close timeout applies and a
    /// new SYN on the same tuple starts a new flow.
    #[must_use]
    pub const fn is_closed(flags: u16) -> bool {
        flags & RST != 0 || flags & (FIN_ORIGINAL | FIN_REPLY) == (FIN_ORIGINAL | FIN_REPLY)
    }
}

/// Key of the service map: a frontend (slot 0) or one of its backend slots.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ServiceKeyV4 {
    /// Frontend address: ClusterIP, node address, externalIP or LoadBalancer IP.
    pub addr: Be32,
    /// Frontend port.
    pub port: Be16,
    /// 0 for the frontend entry, `1..=count` for backend slots.
    pub slot: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// [`scope`] of this entry.
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServiceKeyV4>() == 12);

/// Value of the service map. Slot 0 uses `count`, `flags`, `service_id` and
/// `affinity_timeout_s`; backend slots use `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ServiceValueV4 {
    /// Slot > 0: the backend this slot names.
    pub backend_id: u32,
    /// Slot 0: id of the service port, shared by all its frontends (ClusterIP,
    /// NodePorts, ...), keys session affinity as kube-proxy's per-service-port chains do.
    pub service_id: u32,
    /// Slot 0: session affinity timeout in seconds (with [`service_flags::AFFINITY`]).
    pub affinity_timeout_s: u32,
    /// Slot 0: number of backend slots.
    pub count: u16,
    /// Slot 0: [`service_flags`].
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceValueV4>() == 16);

/// A backend (endpoint address and target port), keyed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct BackendV4 {
    pub addr: Be32,
    pub port: Be16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<BackendV4>() == 8);

/// Conntrack key: the 5-tuple of a packet as it arrives at the program.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CtKeyV4 {
    pub src_addr: Be32,
    pub dst_addr: Be32,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKeyV4>() == 16);

/// Conntrack value: the translation to apply to packets matching the key.
///
/// Each translated flow has two entries, one per direction, each saying how to rewrite
/// the packets it matches. Storing the rewrite itself (rather than an index into a
/// reverse-NAT table) keeps a reply's translation a single lookup and lets NAT of both
/// addresses (NodePort with SNAT) use the same entry shape.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct CtEntryV4 {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the flow's
    /// last packet, in either direction, to within [`CT_REFRESH_NS`]: a packet
    /// refreshes its own entry when this is older than that and, at most once a second
    /// ([`CT_PEER_REFRESH_NS`]), its peer's, so both entries of a flow share one
    /// lifetime (a one-way UDP flow keeps its reply entry, which is also its SNAT port
    /// claim).
    pub last_seen_ns: u64,
    /// When a packet matching this entry last refreshed the peer entry.
    pub peer_refreshed_ns: u64,
    /// New source address (with [`ct_flags::REWRITE_SRC`]).
    pub nat_src_addr: Be32,
    /// New destination address (with [`ct_flags::REWRITE_DST`]).
    pub nat_dst_addr: Be32,
    /// The backend of the flow, so the agent can flush UDP flows of a removed backend.
    pub backend_id: u32,
    /// The service port of the flow.
    pub service_id: u32,
    pub nat_src_port: Be16,
    pub nat_dst_port: Be16,
    /// [`ct_flags`].
    pub flags: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtEntryV4>() == 40);

/// Key of the IPv6 service map: [`ServiceKeyV4`] with an IPv6 address. Its value is a
/// [`ServiceValueV6`] (the IPv4 value's shape: slots, counts and flags do not depend
/// on the family).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ServiceKeyV6 {
    /// Frontend address: ClusterIP, node address, externalIP or LoadBalancer IP.
    pub addr: Be32x4,
    /// Frontend port.
    pub port: Be16,
    /// 0 for the frontend entry, `1..=count` for backend slots.
    pub slot: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// [`scope`] of this entry.
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServiceKeyV6>() == 24);

/// Value of the IPv6 service map: the same fields as the IPv4 one.
pub type ServiceValueV6 = ServiceValueV4;

/// An IPv6 backend (endpoint address and target port), keyed by backend id (its own
/// id space, [`names::BACKENDS_V6`]).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct BackendV6 {
    pub addr: Be32x4,
    pub port: Be16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<BackendV6>() == 20);

/// IPv6 conntrack key: the 5-tuple of a packet as it arrives at the program (the
/// addresses of its IPv6 header, the ports of the TCP/UDP header after its extension
/// headers).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CtKeyV6 {
    pub src_addr: Be32x4,
    pub dst_addr: Be32x4,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKeyV6>() == 40);

/// IPv6 conntrack value: [`CtEntryV4`] with IPv6 addresses, the same flags and the
/// same two-entries-per-flow scheme.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct CtEntryV6 {
    /// As [`CtEntryV4::last_seen_ns`].
    pub last_seen_ns: u64,
    /// When a packet matching this entry last refreshed the peer entry.
    pub peer_refreshed_ns: u64,
    /// New source address (with [`ct_flags::REWRITE_SRC`]).
    pub nat_src_addr: Be32x4,
    /// New destination address (with [`ct_flags::REWRITE_DST`]).
    pub nat_dst_addr: Be32x4,
    /// The backend of the flow (an id of [`names::BACKENDS_V6`]).
    pub backend_id: u32,
    /// The service port of the flow.
    pub service_id: u32,
    pub nat_src_port: Be16,
    pub nat_dst_port: Be16,
    /// [`ct_flags`].
    pub flags: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtEntryV6>() == 64);

/// Value of the IPv6 frontend address set ([`names::FRONTEND_ADDRS_V6`]), whose key is
/// the address ([`Be32x4`]), as the IPv4 set's key is a [`Be32`]: the same
/// [`frontend_addr`] bits.
pub type FrontendAddrV6 = FrontendAddrV4;

/// How stale a peer entry's timestamp may get before a packet refreshes it: the two
/// entries of a flow expire within this of each other, at the cost of one extra
/// lookup per second of traffic instead of one per packet.
pub const CT_PEER_REFRESH_NS: u64 = 1_000_000_000;

/// How stale an entry's own timestamp may get before a packet matching it writes it:
/// idle timeouts (seconds to a day) end up to this much early, and a busy flow's
/// packets write their entry once in this long instead of on every packet.
pub const CT_REFRESH_NS: u64 = 100_000_000;

/// How long after an insert into the established table failed for lack of room new
/// flows are refused (`drop_ct_full`). Each failed insert renews it, so the refusal
/// lasts while the table stays full and ends within this once the reaper frees room.
pub const CT_FULL_HOLD_NS: u64 = 1_000_000_000;

/// Session affinity key: a client address and a service port.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct AffinityKeyV4 {
    pub client_addr: Be32,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKeyV4>() == 8);

/// Session affinity value: the backend a client sticks to.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct AffinityValueV4 {
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// The frontend slot that named the backend when it was chosen: a hit is honoured
    /// only while a slot of the service (this one first) still names it, so a backend
    /// that left the service is never followed, even when another service keeps it.
    pub slot: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<AffinityValueV4>() == 16);

/// A loadBalancerSourceRanges entry: the data of an LPM trie key whose prefix length
/// is `32 + CIDR length`, so the service id always matches whole and the client
/// address by prefix. Value: `1` (presence is what counts).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SourceRangeV4 {
    /// The service port's id, big-endian so the trie's bitwise prefix starts with it.
    pub service_id: Be32,
    pub addr: Be32,
}
const _: () = assert!(core::mem::size_of::<SourceRangeV4>() == 8);

/// Session affinity key of IPv6: [`AffinityKeyV4`] with the client's IPv6 address
/// (affinity is per client address, as kube-proxy's `ClientIP`).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct AffinityKeyV6 {
    pub client_addr: Be32x4,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKeyV6>() == 20);

/// Session affinity value of IPv6: the same record as [`AffinityValueV4`].
pub type AffinityValueV6 = AffinityValueV4;

/// A loadBalancerSourceRanges entry of IPv6: [`SourceRangeV4`] with an IPv6 address,
/// the data of an LPM trie key whose prefix length is `32 + CIDR length` (the service
/// id whole, the client address by prefix). Value: `1`.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SourceRangeV6 {
    /// The service port's id, big-endian so the trie's bitwise prefix starts with it.
    pub service_id: Be32,
    pub addr: Be32x4,
}
const _: () = assert!(core::mem::size_of::<SourceRangeV6>() == 20);

/// Fragment map key: one IPv4 datagram in fragments, as its fragments' headers name it
/// (RFC 791: source, destination, protocol and identification identify a datagram).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FragKeyV4 {
    pub src_addr: Be32,
    pub dst_addr: Be32,
    /// The IP identification, as in the header.
    pub id: Be16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKeyV4>() == 12);

/// Fragment map value: the ports the first fragment carried, which the later ones
/// lack, so they can follow the same conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct FragValueV4 {
    /// `bpf_ktime_get_ns()` when the first fragment passed.
    pub seen_ns: u64,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FragValueV4>() == 16);

/// Fragment map key of IPv6: one datagram in fragments, named by its source,
/// destination and the fragment header's identification (RFC 8200 section 4.5), with
/// the upper-layer protocol its fragments carry, as [`FragKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FragKeyV6 {
    pub src_addr: Be32x4,
    pub dst_addr: Be32x4,
    /// The fragment header's identification, as in the header.
    pub id: Be32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragKeyV6>() == 40);

/// Fragment map value of IPv6: the same ports as [`FragValueV4`].
pub type FragValueV6 = FragValueV4;

/// The node's IPv6 settings (single entry of [`names::CONFIG_V6`]), beside
/// [`DatapathConfig`], which keeps everything that does not depend on the family
/// (timeouts, the SNAT port range): the IPv6 masquerade address and cluster CIDR. A map
/// of its own rather than fields in `CONFIG_V3`, so the IPv4 config's layout and pins
/// stay as they are.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct NodeConfigV6 {
    /// The node's IPv6 address masqueraded flows take as their source; all-zero when
    /// it has none: flows that need SNAT are dropped (`drop_no_snat_addr`).
    pub snat_addr: Be32x4,
    /// The cluster's IPv6 pod CIDR (`--cluster-cidr`'s IPv6 half); length 0 when
    /// unset (every client is then outside it, as for IPv4).
    pub cluster_cidr_addr: Be32x4,
    pub cluster_cidr_len: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<NodeConfigV6>() == 40);

impl NodeConfigV6 {
    /// Whether the node has an IPv6 masquerade address.
    #[must_use]
    pub const fn has_snat_addr(&self) -> bool {
        let a = self.snat_addr.0;
        a[0] | a[1] | a[2] | a[3] != 0
    }

    /// Whether `addr` is inside the IPv6 cluster CIDR (false while it is unset), as
    /// [`DatapathConfig::in_cluster_cidr`].
    #[must_use]
    pub const fn in_cluster_cidr(&self, addr: &Be32x4) -> bool {
        let len = self.cluster_cidr_len as u32;
        if len == 0 || len > 128 {
            return false;
        }
        let mut word = 0;
        while word < 4 {
            let bits = len.saturating_sub(word as u32 * 32);
            if bits == 0 {
                break;
            }
            let mask = if bits >= 32 {
                u32::MAX
            } else {
                !(u32::MAX >> bits)
            };
            let differ = u32::from_be(addr.0[word]) ^ u32::from_be(self.cluster_cidr_addr.0[word]);
            if differ & mask != 0 {
                return false;
            }
            word += 1;
        }
        true
    }
}

/// Runtime settings of the datapath (single entry of the config array), written by
/// the agent at start. Timeouts follow kube-proxy's conntrack settings.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DatapathConfig {
    /// Idle timeout of an established TCP flow.
    pub tcp_established_timeout_s: u32,
    /// Idle timeout of a TCP flow after both FINs or a RST.
    pub tcp_closing_timeout_s: u32,
    /// Idle timeout of a TCP flow not yet established (SYN sent or received).
    pub tcp_syn_timeout_s: u32,
    /// Idle timeout of a UDP (or SCTP) flow.
    pub udp_timeout_s: u32,
    /// The node's own address, the source of masqueraded (SNAT) traffic. 0 (not
    /// set): flows that need SNAT are dropped and counted (`drop_no_snat_addr`).
    pub snat_addr: Be32,
    /// The cluster's pod CIDR (kube-proxy's clusterCIDR): ClusterIP traffic arriving
    /// from outside it is masqueraded when its backend is remote. Length 0: unset,
    /// every such flow is masqueraded.
    pub cluster_cidr_addr: Be32,
    pub cluster_cidr_len: u8,
    pub _pad: [u8; 3],
    /// Source ports for SNAT, inclusive, outside the kernel's ephemeral range so the
    /// node's own connections never collide with them.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 32);

impl DatapathConfig {
    /// Defaults: 24 h established TCP (kube-proxy's conntrack.tcpEstablishedTimeout),
    /// 10 s after close, 60 s for a handshake (the kernel's SYN_RECV timeout and
    /// Cilium's CT_SYN_TIMEOUT; the kernel gives SYN_SENT 120 s because its own
    /// client retries a SYN for about 127 s, but a retry after 60 s here only starts
    /// the flow again: nothing was established to lose), 120 s UDP (the kernel's
    /// udp_timeout_stream; our entries do not distinguish one-shot UDP).
    pub const DEFAULT: Self = Self {
        tcp_established_timeout_s: 86_400,
        tcp_closing_timeout_s: 10,
        tcp_syn_timeout_s: 60,
        udp_timeout_s: 120,
        snat_addr: Be32(0),
        cluster_cidr_addr: Be32(0),
        cluster_cidr_len: 0,
        _pad: [0; 3],
        snat_port_min: 61_000,
        snat_port_max: 65_535,
    };
}

impl DatapathConfig {
    /// Idle timeout of a conntrack entry in nanoseconds. Shared by the datapath (which
    /// ignores expired entries) and the agent (which reaps them).
    #[must_use]
    pub const fn ct_timeout_ns(&self, entry: &CtEntryV4, l4_proto: u8) -> u64 {
        self.state_timeout_ns(entry.flags, l4_proto)
    }

    /// Idle timeout of a flow whose entries carry [`ct_flags`] `flags`, either family.
    #[must_use]
    pub const fn state_timeout_ns(&self, flags: u16, l4_proto: u8) -> u64 {
        let seconds = if l4_proto != crate::proto::TCP {
            self.udp_timeout_s
        } else if ct_flags::is_closed(flags) {
            self.tcp_closing_timeout_s
        } else if flags & ct_flags::ASSURED == 0 {
            self.tcp_syn_timeout_s
        } else {
            self.tcp_established_timeout_s
        };
        seconds as u64 * 1_000_000_000
    }

    /// Whether `addr` is inside the cluster CIDR (false when it is unset).
    #[must_use]
    pub const fn in_cluster_cidr(&self, addr: Be32) -> bool {
        if self.cluster_cidr_len == 0 || self.cluster_cidr_len > 32 {
            return false;
        }
        let mask = u32::MAX << (32 - self.cluster_cidr_len as u32);
        (u32::from_be(addr.0) & mask) == (u32::from_be(self.cluster_cidr_addr.0) & mask)
    }

    /// Whether `entry`, last seen at `entry.last_seen_ns`, is expired at `now_ns`.
    #[must_use]
    pub const fn ct_expired(&self, entry: &CtEntryV4, l4_proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(entry.last_seen_ns) > self.ct_timeout_ns(entry, l4_proto)
    }

    /// [`Self::ct_expired`] for an IPv6 entry.
    #[must_use]
    pub const fn ct_expired_v6(&self, entry: &CtEntryV6, l4_proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(entry.last_seen_ns) > self.state_timeout_ns(entry.flags, l4_proto)
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Indices of the per-CPU counters map. Events first, then drop reasons; every index
/// has a name in [`COUNTER_NAMES`] (metric labels).
pub mod counter {
    /// A new flow to a frontend got a backend and a conntrack entry.
    pub const NEW_FLOW: u32 = 0;
    /// A packet of a known flow was translated in its original direction.
    pub const FORWARD_TRANSLATED: u32 = 1;
    /// A reply was translated back.
    pub const REPLY_TRANSLATED: u32 = 2;
    /// A new flow to a frontend without backends was answered with ICMP unreachable.
    pub const REJECTED_NO_BACKEND: u32 = 3;
    /// A session affinity entry chose the backend.
    pub const AFFINITY_HIT: u32 = 4;
    /// A non-first IPv4 fragment passed untranslated: no first fragment of a flow we
    /// translate was seen for its datagram (it is not ours, or it came first).
    pub const FRAGMENT_PASSED: u32 = 5;
    /// A client's connect() or sendto() to a frontend was rewritten to a backend by a
    /// cgroup sock_addr hook ([`crate::sock`]).
    pub const SOCK_TRANSLATED: u32 = 6;
    /// A client's connect() or sendto() to a frontend without backends was refused with ECONNREFUSED (or to a Local-policy frontend without local backends).
    pub const SOCK_REJECTED: u32 = 7;
    /// A new flow from outside was masqueraded to the node's address (SNAT).
    pub const SNAT_FLOW: u32 = 8;
    /// A translated packet was sent straight to its next hop (FIB lookup + redirect).
    pub const REDIRECTED: u32 = 9;
    /// A pod reached itself through a service and was masqueraded (hairpin).
    pub const HAIRPIN_FLOW: u32 = 10;
    /// An ICMP error about a translated flow (destination unreachable, fragmentation
    /// needed, time exceeded, parameter problem) was translated, outer and quoted
    /// headers.
    pub const ICMP_ERROR_TRANSLATED: u32 = 11;
    /// A non-first IPv4 fragment was translated with the ports its first fragment
    /// left in the fragment map.
    pub const FRAGMENT_TRANSLATED: u32 = 12;
    /// A packet too big for the next hop, with DF set, was answered with ICMP
    /// fragmentation needed (the redirect path skips the kernel's forwarding, which
    /// would send it).
    pub const FRAG_NEEDED_SENT: u32 = 13;
    /// A packet that would leave with TTL 0 was answered with ICMP time exceeded.
    pub const TIME_EXCEEDED_SENT: u32 = 14;
    /// A flow was seen both ways and moved to the established table, where floods of
    /// new flows cannot evict it.
    pub const CT_ASSURED: u32 = 15;
    /// Of [`SOCK_TRANSLATED`], the sockets of a pod (any network namespace but the
    /// node's): connections that took the socket path instead of TC.
    pub const SOCK_TRANSLATED_POD: u32 = 16;
    /// A connected socket whose backend left was destroyed by the socket iterator
    /// (`bpf_sock_destroy`), so its application connects again.
    pub const SOCK_DESTROYED: u32 = 17;
    /// A new flow to a port that a live ClusterIP does not declare was answered with
    /// ICMP port unreachable (kube-proxy's nftables mode rejects it the same way).
    pub const REJECTED_UNDECLARED_PORT: u32 = 18;
    /// A new flow that keeps its client's address had its source port remapped: a
    /// live flow already held its translated tuple (the client used the same port
    /// towards another frontend with the same backend), so a port of the masquerade
    /// range was claimed instead, as netfilter's NAT finds a unique tuple.
    pub const SOURCE_PORT_REMAPPED: u32 = 19;
    /// An IPv6 packet passed untouched because its extension headers did not end in a
    /// TCP/UDP header within the datapath's bounded walk (too many of them, or a
    /// routing header with segments left: its destination is not the final one).
    pub const IPV6_EXT_HEADERS_PASSED: u32 = 27;
    /// A new flow to a frontend that netfilter's conntrack already tracks (a flow
    /// kube-proxy's NAT set up before kpr took over) passed untouched, left to netfilter.
    pub const NF_TRACKED_PASSED: u32 = 31;

    /// First drop reason; everything from here on counts dropped packets.
    pub const FIRST_DROP: u32 = 32;
    /// Dropped: the frontend has no backends and asks for drop (Local policies).
    pub const DROP_NO_LOCAL_BACKEND: u32 = 32;
    /// Dropped: a backend slot or backend vanished under a concurrent update.
    pub const DROP_BACKEND_MISSING: u32 = 33;
    /// Dropped: the conntrack map refused the new entry.
    pub const DROP_CT_INSERT: u32 = 34;
    /// Dropped: rewriting the packet failed.
    pub const DROP_REWRITE: u32 = 35;
    /// Dropped: the ICMP reject could not be built.
    pub const DROP_REJECT_FAILED: u32 = 36;
    /// Dropped: the client is outside the service's loadBalancerSourceRanges.
    pub const DROP_SOURCE_RANGE: u32 = 37;
    /// Dropped: no free port for the flow, masqueraded or remapped (every try
    /// collided with a live flow to the same backend).
    pub const DROP_SNAT_PORTS: u32 = 38;
    /// Dropped: SNAT was needed but the agent has not set the node's address.
    pub const DROP_NO_SNAT_ADDR: u32 = 39;
    /// Refused: a client's connect() or sendto() was translated, but the
    /// reverse entry that lets getpeername()/recvfrom() show the frontend could not be
    /// stored. Refusing beats a UDP reply that the client would reject as coming from a
    /// stranger.
    pub const DROP_SOCK_RNAT_INSERT: u32 = 40;
    /// Dropped: a redirected packet's TTL ran out and no ICMP time exceeded could be
    /// sent (ICMP errors themselves are never answered with one).
    pub const DROP_TTL_EXCEEDED: u32 = 41;
    /// Dropped: a new flow while the established conntrack table is full (the kernel's
    /// "table full, dropping packet"); established flows keep working.
    pub const DROP_CT_FULL: u32 = 42;
    /// Dropped: addressed to the service CIDR, at an address no Service holds (with
    /// `--service-cidr`; kube-proxy's nftables mode drops it too).
    pub const DROP_UNALLOCATED_SERVICE_IP: u32 = 43;

    /// Size of the counters map.
    pub const COUNT: u32 = 64;
}

/// Metric label of each counter index (empty for unused indices).
pub const COUNTER_NAMES: [&str; counter::COUNT as usize] = [
    "new_flow",
    "forward_translated",
    "reply_translated",
    "rejected_no_backend",
    "affinity_hit",
    "fragment_passed",
    "sock_translated",
    "sock_rejected",
    "snat_flow",
    "redirected",
    "hairpin_flow",
    "icmp_error_translated",
    "fragment_translated",
    "frag_needed_sent",
    "time_exceeded_sent",
    "ct_assured",
    "sock_translated_pod",
    "sock_destroyed",
    "rejected_undeclared_port",
    "source_port_remapped",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "ipv6_ext_headers_passed",
    "",
    "",
    "",
    "nf_tracked_passed",
    "drop_no_local_backend",
    "drop_backend_missing",
    "drop_ct_insert",
    "drop_rewrite",
    "drop_reject_failed",
    "drop_source_range",
    "drop_snat_ports",
    "drop_no_snat_addr",
    "drop_sock_rnat_insert",
    "drop_ttl_exceeded",
    "drop_ct_full",
    "drop_unallocated_service_ip",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
];

#[cfg(feature = "user")]
mod pod_impls {
    //! Userspace only: aya's `Pod` marks the types safe to copy to and from the kernel.
    use super::*;

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: #[repr(C)], only integer fields, every padding byte is an
            // explicit field, so any bit pattern is valid and none is uninitialised.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        ServiceKeyV4,
        ServiceValueV4,
        BackendV4,
        SourceRangeV4,
        CtKeyV4,
        CtEntryV4,
        AffinityKeyV4,
        AffinityValueV4,
        FragKeyV4,
        FragValueV4,
        DatapathConfig,
        FrontendAddrV4,
        ServiceCidrV4,
        ServiceKeyV6,
        BackendV6,
        CtKeyV6,
        CtEntryV6,
        FragKeyV6,
        NodeConfigV6,
        AffinityKeyV6,
        SourceRangeV6,
        Be32x4,
    );
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// Every `pub const NAME: u32 = N;` of the `counter` module, read from this file's
    /// text: a counter added there without a metric label fails the test below, with no
    /// list of indices to keep in step by hand.
    fn counter_definitions() -> std::vec::Vec<(&'static str, u32)> {
        let source = include_str!("maps.rs");
        let start = source
            .find("pub mod counter {")
            .expect("the counter module");
        let body = &source[start..];
        let body = &body[..body.find("\n}\n").expect("the end of the counter module")];
        body.lines()
            .filter_map(|line| {
                let (name, value) = line
                    .trim()
                    .strip_prefix("pub const ")?
                    .split_once(": u32 = ")?;
                let value = value.strip_suffix(';')?.parse().expect("a literal index");
                Some((name, value))
            })
            // Not counters: the first drop index and the map's size.
            .filter(|(name, _)| !matches!(*name, "FIRST_DROP" | "COUNT"))
            .collect()
    }

    #[test]
    fn every_counter_has_its_own_metric_label() {
        let counters = counter_definitions();
        assert!(counters.len() > 20, "found only {counters:?}");
        let mut seen = std::collections::BTreeMap::new();
        for (name, index) in counters {
            assert!(
                index < counter::COUNT,
                "{name} = {index} is outside the map"
            );
            if let Some(other) = seen.insert(index, name) {
                panic!("{name} and {other} share index {index}");
            }
            let label = COUNTER_NAMES[index as usize];
            assert_eq!(
                label,
                name.to_ascii_lowercase(),
                "COUNTER_NAMES[{index}] is the label of counter::{name}"
            );
        }
        // ...and no label without a counter.
        for (index, label) in COUNTER_NAMES.iter().enumerate() {
            assert!(
                label.is_empty() || seen.contains_key(&(index as u32)),
                "{label} at {index} names no counter"
            );
        }
    }

    #[test]
    fn service_cidr_contains_its_addresses_only_when_set() {
        let cidr = ServiceCidrV4 {
            addr: Be32::from_ipv4(core::net::Ipv4Addr::new(10, 96, 0, 0)),
            len: 12,
            _pad: [0; 3],
        };
        let addr = |a, b, c, d| Be32::from_ipv4(core::net::Ipv4Addr::new(a, b, c, d));
        assert!(cidr.contains(addr(10, 96, 0, 1)));
        assert!(cidr.contains(addr(10, 111, 255, 255)));
        assert!(!cidr.contains(addr(10, 112, 0, 0)));
        assert!(!cidr.contains(addr(10, 95, 255, 255)));
        assert!(!ServiceCidrV4::default().contains(addr(10, 96, 0, 1)));
        let all = ServiceCidrV4 { len: 32, ..cidr };
        assert!(all.contains(addr(10, 96, 0, 0)));
        assert!(!all.contains(addr(10, 96, 0, 1)));
    }

    #[test]
    fn drop_counters_are_named_drop() {
        for (index, name) in COUNTER_NAMES.iter().enumerate() {
            let is_drop = index as u32 >= counter::FIRST_DROP;
            assert!(
                name.is_empty() || name.starts_with("drop_") == is_drop,
                "{name}"
            );
        }
    }

    #[test]
    fn tcp_timeouts_follow_the_flow_state() {
        let config = DatapathConfig::DEFAULT;
        let timeout = |flags| {
            let entry = CtEntryV4 {
                flags,
                ..CtEntryV4::default()
            };
            config.ct_timeout_ns(&entry, crate::proto::TCP) / 1_000_000_000
        };
        use ct_flags::*;
        assert_eq!(timeout(0), 60, "SYN sent");
        assert_eq!(timeout(SEEN_REPLY), 60, "SYN received");
        assert_eq!(timeout(SEEN_REPLY | ASSURED), 86_400, "established");
        assert_eq!(
            timeout(SEEN_REPLY | ASSURED | FIN_ORIGINAL),
            86_400,
            "half-closed"
        );
        assert_eq!(
            timeout(SEEN_REPLY | ASSURED | FIN_REPLY),
            86_400,
            "half-closed"
        );
        assert_eq!(
            timeout(SEEN_REPLY | ASSURED | FIN_ORIGINAL | FIN_REPLY),
            10,
            "both closed"
        );
        assert_eq!(timeout(SEEN_REPLY | ASSURED | RST), 10, "reset");
        assert_eq!(timeout(RST), 10, "reset before established");
        let udp = CtEntryV4::default();
        assert_eq!(
            config.ct_timeout_ns(&udp, crate::proto::UDP),
            120_000_000_000
        );
    }

    #[test]
    fn the_new_flow_table_is_a_quarter_of_the_established_one() {
        assert_eq!(
            capacity::conntrack_new_for(capacity::CONNTRACK_V4),
            capacity::CONNTRACK_NEW_V4
        );
        assert_eq!(capacity::conntrack_new_for(100), 256);
    }

    #[test]
    fn cluster_cidr_membership() {
        let config = |addr: [u8; 4], len: u8| DatapathConfig {
            cluster_cidr_addr: Be32(u32::from_ne_bytes(addr)),
            cluster_cidr_len: len,
            ..DatapathConfig::DEFAULT
        };
        let ip = |addr: [u8; 4]| Be32(u32::from_ne_bytes(addr));
        let cidr = config([10, 244, 0, 0], 16);
        assert!(cidr.in_cluster_cidr(ip([10, 244, 1, 2])));
        assert!(cidr.in_cluster_cidr(ip([10, 244, 255, 255])));
        assert!(!cidr.in_cluster_cidr(ip([10, 245, 0, 1])));
        assert!(!cidr.in_cluster_cidr(ip([192, 168, 1, 10])));
        assert!(config([10, 244, 1, 0], 32).in_cluster_cidr(ip([10, 244, 1, 0])));
        assert!(!config([10, 244, 1, 0], 32).in_cluster_cidr(ip([10, 244, 1, 1])));
        assert!(
            !config([0, 0, 0, 0], 0).in_cluster_cidr(ip([10, 244, 1, 2])),
            "unset"
        );
    }

    #[test]
    fn ipv6_cluster_cidr_matches_by_prefix() {
        let addr = |text: &str| Be32x4::from_ipv6(text.parse().expect("an IPv6 literal"));
        let config = |cidr: &str, len| NodeConfigV6 {
            cluster_cidr_addr: addr(cidr),
            cluster_cidr_len: len,
            ..NodeConfigV6::default()
        };
        let pods = config("fd00:10:244::", 56);
        assert!(pods.in_cluster_cidr(&addr("fd00:10:244::1")));
        assert!(pods.in_cluster_cidr(&addr("fd00:10:244:ff::1")));
        assert!(!pods.in_cluster_cidr(&addr("fd00:10:244:100::1")), "bit 56");
        assert!(!pods.in_cluster_cidr(&addr("fd00:10:245::1")));
        assert!(config("fd00::", 8).in_cluster_cidr(&addr("fdff::1")));
        assert!(!config("fd00::", 8).in_cluster_cidr(&addr("fe00::1")));
        let host = config("fd00:10:244::7", 128);
        assert!(host.in_cluster_cidr(&addr("fd00:10:244::7")));
        assert!(!host.in_cluster_cidr(&addr("fd00:10:244::6")));
        assert!(config("fd00:10:244::", 33).in_cluster_cidr(&addr("fd00:10:7fff::1")));
        assert!(!config("fd00:10:244::", 33).in_cluster_cidr(&addr("fd00:10:8000::1")));
        assert!(
            !NodeConfigV6::default().in_cluster_cidr(&addr("fd00::1")),
            "unset"
        );
        assert!(!NodeConfigV6::default().has_snat_addr());
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            names::SERVICES_V4,
            names::BACKENDS_V4,
            names::CONNTRACK_V4,
            names::CONNTRACK_NEW_V4,
            names::CONNTRACK_FULL,
            names::AFFINITY_V4,
            names::SOURCE_RANGES_V4,
            names::FRAGMENTS_V4,
            names::COUNTERS,
            names::CONFIG,
            names::FRONTEND_ADDRS_V4,
            names::SERVICE_CIDR_V4,
            names::SERVICES_V6,
            names::BACKENDS_V6,
            names::CONNTRACK_V6,
            names::CONNTRACK_NEW_V6,
            names::FRONTEND_ADDRS_V6,
            names::FRAGMENTS_V6,
            names::CONFIG_V6,
            names::AFFINITY_V6,
            names::SOURCE_RANGES_V6,
            names::VIA_STACK_IFACES,
        ] {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
