//! The stand-in for the eBPF object when the eBPF toolchain is missing. Included by
//! `build.rs` (which writes it) and by the agent (which refuses to load it), so both
//! sides agree on one definition.

/// The stub's whole content.
pub const MARKER: &[u8] = b"kpr eBPF stub: built without the eBPF toolchain\n";
