//! Per-CPU counters: one increment, no atomics, no contention between CPUs.
use proxy_common::{counter, ct_flags, CtEntryV4};

use crate::{
    maps::COUNTERS_V3,
    parse::{Kind, Packet},
};

#[inline(always)]
pub fn count(index: u32) {
    if crate::trace::active() {
        return;
    }
    if let Some(slot) = COUNTERS_V3.get_ptr_mut(index) {
        // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Counts a packet of a known flow translated with `entry`.
#[inline(always)]
pub fn count_translated(pkt: &Packet, entry: &CtEntryV4) {
    count(match pkt.kind {
        Kind::IcmpError => counter::ICMP_ERROR_TRANSLATED,
        Kind::LaterFragment => counter::FRAGMENT_TRANSLATED,
        Kind::Transport if entry.flags & ct_flags::REPLY != 0 => counter::REPLY_TRANSLATED,
        Kind::Transport => counter::FORWARD_TRANSLATED,
    });
}
