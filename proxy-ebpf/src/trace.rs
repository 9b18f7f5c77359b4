//! The trace instance (`kpr trace`, [`proxy_common::trace`]): the loader sets
//! [`TRACE`] to 1 in a second instance of this object that shares the node's pinned
//! maps. There, every map write is skipped ([`active`] gates them where they happen)
//! and each stage notes its decision in [`TRACE_V1`]. The real datapath reads the
//! global once per gate and writes nothing here.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::trace::TraceRecordV1;

/// Set by the loader of the trace instance (`EbpfLoader::set_global`); 0 otherwise.
#[unsafe(no_mangle)]
static TRACE: u8 = 0;

/// The decisions of the current run (trace instance only).
#[map]
static TRACE_V1: PerCpuArray<TraceRecordV1> = PerCpuArray::with_max_entries(1, 0);

/// Whether this is the trace instance: map writes are skipped.
#[inline(always)]
pub fn active() -> bool {
    // SAFETY: a read of a global the loader may have rewritten; volatile so the
    // compiler does not fold the 0 it sees at build time.
    unsafe { core::ptr::read_volatile(&raw const TRACE) != 0 }
}

/// Lets `note` fill in the run's record (trace instance only).
#[inline(always)]
pub fn note(note: impl FnOnce(&mut TraceRecordV1)) {
    if !active() {
        return;
    }
    if let Some(record) = TRACE_V1.get_ptr_mut(0) {
        // SAFETY: the per-CPU value belongs to this CPU while the program runs.
        note(unsafe { &mut *record });
    }
}

/// Adds stage bits.
#[inline(always)]
pub fn stage(bits: u32) {
    note(|record| record.stages |= bits);
}
