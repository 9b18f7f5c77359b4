//! Per-CPU counters: one increment, no atomics, no contention between CPUs.
use crate::maps::COUNTERS_V2;

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS_V2.get_ptr_mut(index) {
        // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
