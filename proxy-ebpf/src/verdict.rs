//! What a TC program returns, in one place: the TC verdicts, and the typed reason a
//! packet is dropped for. Every stage returns [`Result`]; the entry points turn an
//! `Err` into a counted drop (see `main.rs`; the socket hooks in `sock.rs` refuse the
//! syscall instead). Nothing else uses counter numbers as control flow.
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use proxy_common::counter;

/// Let the packet continue through the stack (changed or not).
pub const PASS: i32 = TC_ACT_OK;
/// Drop the packet.
pub const SHOT: i32 = TC_ACT_SHOT;
/// The packet was redirected by a helper (`bpf_redirect`, `bpf_redirect_neigh`).
pub const REDIRECT: i32 = TC_ACT_REDIRECT;

/// Why a packet was dropped: one of the drop counters of [`proxy_common::counter`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DropReason(u32);

impl DropReason {
    pub const NO_LOCAL_BACKEND: Self = Self(counter::DROP_NO_LOCAL_BACKEND);
    pub const BACKEND_MISSING: Self = Self(counter::DROP_BACKEND_MISSING);
    pub const CT_INSERT: Self = Self(counter::DROP_CT_INSERT);
    pub const REWRITE: Self = Self(counter::DROP_REWRITE);
    pub const REJECT_FAILED: Self = Self(counter::DROP_REJECT_FAILED);
    pub const SOURCE_RANGE: Self = Self(counter::DROP_SOURCE_RANGE);
    pub const SNAT_PORTS: Self = Self(counter::DROP_SNAT_PORTS);
    pub const NO_SNAT_ADDR: Self = Self(counter::DROP_NO_SNAT_ADDR);
    pub const TTL_EXCEEDED: Self = Self(counter::DROP_TTL_EXCEEDED);
    pub const CT_FULL: Self = Self(counter::DROP_CT_FULL);
    /// A socket hook's reverse entry could not be stored (the syscall is refused).
    pub const SOCK_RNAT_INSERT: Self = Self(counter::DROP_SOCK_RNAT_INSERT);
    /// The destination is in the service CIDR but no Service holds it.
    pub const UNALLOCATED_SERVICE_IP: Self = Self(counter::DROP_UNALLOCATED_SERVICE_IP);

    /// The index of the counter this drop increments.
    #[inline(always)]
    pub const fn counter(self) -> u32 {
        self.0
    }
}

/// A stage's outcome: a value (often the verdict), or the reason to drop.
pub type Result<T = i32> = core::result::Result<T, DropReason>;
