//! Source ports chosen here: masquerading (SNAT) to the node's address, and the remap
//! of a client's port whose translated tuple a live flow already holds.
//!
//! A masqueraded flow's replies are found by the reply key `(backend, node address,
//! port)`, so the port must be unique among live flows to the same backend; a remapped
//! flow's reply key is `(backend, client address, port)`. Either port is drawn at
//! random from the configured range and claimed by inserting the reply entry with
//! BPF_NOEXIST ([`crate::conntrack::create`], [`crate::conntrack6::create`], one claim
//! loop each for both kinds): the insert is atomic, so two CPUs can never claim the
//! same port, and a port is only ever taken over from an expired flow. The range sits
//! above the kernel's ephemeral ports, so the node's own connections (and a client's
//! own, for a remapped port) never collide with it. IPv6 flows draw from the same range
//! ([`crate::snat6`]).
use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use proxy_common::{Be16, Be32};

use crate::{
    maps,
    verdict::{DropReason, Result},
};

/// Random draws before giving up. With a range of ~4,500 ports, failing 8 draws needs
/// the range to be nearly full for that one backend.
pub const ATTEMPTS: u32 = 8;

/// A port drawn at random from the masquerade range (network order).
#[inline(always)]
pub fn draw_port() -> Be16 {
    let config = maps::config();
    let (low, high) = (config.snat_port_min, config.snat_port_max);
    let span = if high >= low {
        u32::from(high - low) + 1
    } else {
        1
    };
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    // `random % span < span <= 65536 - low`, so the sum fits in u16.
    Be16::from_host(low.wrapping_add((random % span) as u16))
}

/// A new flow's reply entry waiting for a port: what [`claim_drawn`] retries.
pub trait ReplyClaim {
    /// Tries the reply key with destination port `port`; `true` when it is claimed
    /// (the key then keeps `port`, and [`Self::claimed`] says so).
    fn claim_port(&mut self, port: Be16) -> bool;
    /// Whether a port was claimed.
    fn claimed(&self) -> bool;
}

/// Draws up to [`ATTEMPTS`] ports ([`draw_port`]) until `claim` takes one; `false`
/// when every draw was taken.
///
/// The draws run in `bpf_loop`: the verifier checks its callback until its states
/// repeat, a couple of passes, where an unrolled loop is walked once per draw for every
/// state that reaches it (that made the new-flow paths the dearest part of the TC
/// programs, and a remap beside the masquerade would have doubled it). The callback's
/// context is the claim itself, so the caller's frame holds nothing more than the key
/// and entry it needs anyway (the verifier's inlining of the loop adds three slots to
/// it: the IPv6 call chain to the claim is near the 512-byte stack limit).
#[inline(always)]
pub fn claim_drawn<C: ReplyClaim>(claim: &mut C) -> bool {
    /// One draw; 1 ends the loop.
    extern "C" fn draw<C: ReplyClaim>(_index: u64, ctx: *mut c_void) -> i64 {
        // SAFETY: `ctx` is the claim `claim_drawn` passed to bpf_loop, borrowed
        // mutably by it for the whole loop.
        let claim = unsafe { &mut *ctx.cast::<C>() };
        i64::from(claim.claim_port(draw_port()))
    }
    // SAFETY: the callback has bpf_loop's signature and touches only `claim`, which
    // outlives the call.
    // Its result, the iterations run, cannot tell a claim on the last draw from none.
    unsafe {
        bpf_loop(
            ATTEMPTS,
            draw::<C> as *mut c_void,
            core::ptr::from_mut(claim).cast(),
            0,
        );
    }
    claim.claimed()
}

/// [`claim_drawn`] as an unrolled loop, for a caller whose frame has no room for the
/// three stack slots the verifier's inlining of `bpf_loop` adds to it (the IPv4 entry
/// points: their stages are inlined into one frame near the 512-byte limit).
#[inline(always)]
pub fn claim_drawn_unrolled<C: ReplyClaim>(claim: &mut C) -> bool {
    for _ in 0..ATTEMPTS {
        if claim.claim_port(draw_port()) {
            return true;
        }
    }
    false
}

/// The node's IPv4 masquerade address.
///
/// # Errors
/// `NO_SNAT_ADDR` when the agent has not set it.
#[inline(always)]
pub fn address() -> Result<Be32> {
    let addr = maps::config().snat_addr;
    if addr.0 == 0 {
        return Err(DropReason::NO_SNAT_ADDR);
    }
    Ok(addr)
}
