//! Per-service traffic counters: new connections, packets and bytes of each service
//! port, counted per CPU by the datapath and summed by the agent
//! (`kpr_service_{connections,packets,bytes}_total`).
//!
//! A per-CPU hash keyed by service id, not an array: service ids grow with churn (the
//! syncer never reuses one soon), so no array bound fits them. The agent inserts an
//! entry for each service port it programs while the counters are on and deletes it
//! with the service; the datapath counts only into entries that exist, so an empty map
//! is "off" and costs one lookup that misses. Entries are allocated on insert
//! (`BPF_F_NO_PREALLOC`): memory follows live service ports times CPUs, never the
//! capacity times CPUs.

/// Map name.
pub const NAME: &str = "SVC_STATS_V1";

/// Most service ports counted at once.
pub const CAPACITY: u32 = 65_536;

/// `BPF_F_NO_PREALLOC` (uapi `linux/bpf.h`): hash entries allocated on insert.
pub const NO_PREALLOC: u32 = 1;

/// The counters of one service port on one CPU. Key: the service id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ServiceStatsV1 {
    /// New flows to the service port: connections (TCP) or flows (UDP) the TC path
    /// translated, and connect()/first sendmsg() the socket-layer hooks translated.
    pub connections: u64,
    /// Packets the TC path translated, both directions (the socket path translates no
    /// packet, so its flows add none).
    pub packets: u64,
    /// Their IP bytes (IP header included, link layer not), as the packets arrived.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStatsV1>() == 24);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], only u64 fields, no padding: any bit pattern is valid.
unsafe impl aya::Pod for ServiceStatsV1 {}
