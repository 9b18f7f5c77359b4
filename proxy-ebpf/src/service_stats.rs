//! Per-service traffic counters ([`proxy_common::service_stats`]): a new flow and each
//! translated packet add to their service port's per-CPU entry, if the agent made one
//! (it makes none while the counters are off).
use proxy_common::CtEntryV4;

use crate::{maps::SVC_STATS_V1, parse::Packet};

/// Counts the first packet of a new flow to `service_id`: a connection and a packet.
#[inline(always)]
pub fn count_new_flow(service_id: u32, pkt: &Packet) {
    if crate::trace::active() {
        return;
    }
    if let Some(stats) = SVC_STATS_V1.get_ptr_mut(service_id) {
        // SAFETY: the per-CPU value belongs to this CPU while the program runs.
        unsafe {
            (*stats).connections += 1;
            (*stats).packets += 1;
            (*stats).bytes += u64::from(pkt.tot_len);
        }
    }
}

/// Counts a packet of a known flow translated with `entry`, either direction.
#[inline(always)]
pub fn count_packet(entry: &CtEntryV4, pkt: &Packet) {
    if crate::trace::active() {
        return;
    }
    if let Some(stats) = SVC_STATS_V1.get_ptr_mut(entry.service_id) {
        // SAFETY: as in `count_new_flow`.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(pkt.tot_len);
        }
    }
}

/// Counts a connection the socket-layer hooks translated (no packet of it passes TC).
#[inline(always)]
pub fn count_socket_connection(service_id: u32) {
    if let Some(stats) = SVC_STATS_V1.get_ptr_mut(service_id) {
        // SAFETY: as in `count_new_flow`.
        unsafe { (*stats).connections += 1 };
    }
}
