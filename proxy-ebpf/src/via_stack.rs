//! Which pod-facing interfaces can carry replies that the egress program must translate
//! (`VIA_STACK_IF_V1`, see [`proxy_common::via_stack_slot`]).
//!
//! The replies of a pod's flow are translated by the egress program of the client pod's
//! interface when they go through the stack (a flow to a local backend, every IPv6 pod
//! flow, and any flow whose packets could not be redirected), and that interface is
//! the one whose ingress program created the flow. Every other packet leaving through a
//! pod-facing interface is a miss there, and a miss costs a lookup in each conntrack
//! table, both large and cold. Pods whose sockets are translated at
//! `connect()` never create such flows, so with this set their interfaces' egress
//! programs stop after one lookup in a small array.
use proxy_common::via_stack_slot;

use crate::maps::VIA_STACK_IF_V1;

/// Records that a client behind `ifindex` (the ingress interface of a pod's packet) has
/// a translated flow.
#[inline(always)]
pub fn note_client_interface(ifindex: u32) {
    if crate::trace::active() {
        return;
    }
    if let Some(slot) = VIA_STACK_IF_V1.get_ptr_mut(via_stack_slot(ifindex)) {
        // SAFETY: an array slot, valid for the map's life. Written only while 0, so a
        // set slot stays a read-shared cache line on every CPU.
        unsafe {
            if *slot == 0 {
                *slot = 1;
            }
        }
    }
}

/// Whether a packet leaving through pod-facing interface `ifindex` may be the reply of a
/// translated flow (or an error about one). `false` only when no flow was ever created
/// behind an interface of its slot.
#[inline(always)]
pub fn may_carry_replies(ifindex: u32) -> bool {
    VIA_STACK_IF_V1
        .get(via_stack_slot(ifindex))
        .is_none_or(|slot| *slot != 0)
}
