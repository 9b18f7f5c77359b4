//! Taking over from kube-proxy: flows that the kernel's netfilter conntrack already
//! translates (kube-proxy's NAT, set up before kpr started) are left to netfilter until
//! they end.
//!
//! Before a new flow to a frontend is translated, the TC programs may ask netfilter's
//! conntrack (`bpf_skb_ct_lookup`) whether it already tracks the packet's tuple with a
//! destination NAT; if it does, the packet passes untouched and netfilter keeps
//! translating it to the backend kube-proxy chose. The question costs a hash lookup in
//! the kernel's conntrack table, so it is asked only while the agent says there is
//! something to take over: while netfilter holds NAT entries whose original
//! destination is a frontend of ours.

/// Name of the one-entry array holding [`NfCheck`], written by the agent. The rules of
/// [`crate::names`] apply: at most 15 bytes, a version suffix that changes with the
/// layout.
pub const NF_CHECK_NAME: &str = "NF_CHECK_V1";

/// Whether new flows to frontends are checked against netfilter's conntrack, and where
/// the answer sits in the kernel's `struct nf_conn`.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct NfCheck {
    /// Nonzero: ask netfilter's conntrack before translating a new flow. Zero (also
    /// what an unwritten map holds): never ask.
    pub enabled: u32,
    /// Byte offset of `status` (an `unsigned long` of `IPS_*` bits) in the running
    /// kernel's `struct nf_conn`, read from its BTF by the agent: the layout depends on
    /// the kernel's build options, and our toolchain has no CO-RE relocations.
    pub status_offset: u32,
}
const _: () = assert!(core::mem::size_of::<NfCheck>() == 8);

/// The datapath reads `status` at `status_offset` masked with this: a bound the
/// verifier needs before a variable offset may be added to a kernel pointer, and far
/// above where `status` sits in any kernel (about 128 bytes in).
pub const STATUS_OFFSET_MASK: u32 = 0x3ff;

/// Bits of `nf_conn.status` (`enum ip_conntrack_status`, a stable UAPI).
pub mod ips {
    /// The flow has been seen in the reply direction.
    pub const SEEN_REPLY: u64 = 1 << 1;
    /// The flow's destination is translated (DNAT: kube-proxy's service rules).
    pub const DST_NAT: u64 = 1 << 5;
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], two integer fields, no padding.
unsafe impl aya::Pod for NfCheck {}
