//! `kpr trace`: the decisions of one run of a TC program, recorded by a second
//! instance of the datapath object loaded with the global `TRACE` set. That instance
//! shares the running node's pinned maps, writes none of them (no conntrack,
//! affinity, SNAT claim, fragment, counter), and records what each stage decided in
//! its own unpinned [`NAME`] map. Same code as the real datapath, so the two cannot
//! disagree.

/// Map name (one per-CPU entry; private to the trace instance, never pinned).
pub const NAME: &str = "TRACE_V1";

/// Name of the global the loader sets to 1 in the trace instance.
pub const GLOBAL: &str = "TRACE";

/// [`TraceRecordV1::stages`] bits: which stages ran and what they found.
pub mod stage {
    /// The program ran and parsed a packet it handles.
    pub const PARSED: u32 = 1 << 0;
    /// A conntrack entry matched (the flow is known; its rewrite applies).
    pub const CT_HIT: u32 = 1 << 1;
    /// A frontend matched.
    pub const FRONTEND: u32 = 1 << 2;
    /// Netfilter's conntrack already translates this flow (kube-proxy's): passed.
    pub const NETFILTER: u32 = 1 << 3;
    /// loadBalancerSourceRanges apply and the client is inside them.
    pub const SOURCE_ALLOWED: u32 = 1 << 4;
    /// loadBalancerSourceRanges apply and the client is outside them: dropped.
    pub const SOURCE_DENIED: u32 = 1 << 5;
    /// No backend: dropped (Local policy, endpoints elsewhere).
    pub const EMPTY_DROP: u32 = 1 << 6;
    /// No backend: rejected with ICMP port unreachable.
    pub const EMPTY_REJECT: u32 = 1 << 7;
    /// The client's affinity record chose the backend.
    pub const AFFINITY_HIT: u32 = 1 << 8;
    /// A backend was chosen (`backend_*`).
    pub const BACKEND: u32 = 1 << 9;
    /// The flow is masqueraded to the node's address.
    pub const MASQUERADE: u32 = 1 << 10;
    /// The packet was dropped (`drop_reason`).
    pub const DROPPED: u32 = 1 << 11;
    /// The frontend entry used is the in-cluster (internal) scope.
    pub const INTERNAL_SCOPE: u32 = 1 << 12;
    /// A ClusterIP that declares no frontend for this port and protocol: rejected with
    /// ICMP port unreachable.
    pub const UNDECLARED_REJECT: u32 = 1 << 13;
}

/// What one run decided.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct TraceRecordV1 {
    /// [`stage`] bits.
    pub stages: u32,
    /// The frontend's service id (with `FRONTEND` or `CT_HIT`).
    pub service_id: u32,
    /// The backend id (with `BACKEND` or `CT_HIT`).
    pub backend_id: u32,
    /// The drop counter index (with `DROPPED`).
    pub drop_reason: u32,
    /// The conntrack entry's flags (with `CT_HIT`).
    pub ct_flags: u16,
    pub _pad: [u8; 2],
    /// The frontend's flags (with `FRONTEND`).
    pub frontend_flags: u16,
    /// The frontend's backend count (with `FRONTEND`).
    pub frontend_count: u16,
}
const _: () = assert!(core::mem::size_of::<TraceRecordV1>() == 24);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], integer fields, padding spelled out.
unsafe impl aya::Pod for TraceRecordV1 {}
