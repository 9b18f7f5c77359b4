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
use aya_ebpf::helpers::bpf_get_prandom_u32;
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
