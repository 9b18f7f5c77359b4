//! Masquerading (SNAT) of IPv6 flows to the node's IPv6 address, with a source port
//! claimed as [`crate::snat`] claims it for IPv4: drawn at random from the configured
//! range (the IPv4 config's, the same ports above the kernel's ephemeral ones) and
//! claimed by inserting the reply entry `(backend, node address, port)` with
//! BPF_NOEXIST into the IPv6 new-flow table ([`crate::conntrack6::create`], which
//! draws the ports). That insert is the claim: atomic between CPUs, and a port is only
//! taken over from an expired flow, so no separate claim map is needed.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Be16, Be32x4};

use crate::{
    maps,
    verdict::{DropReason, Result},
};

/// Random draws before giving up, as for IPv4.
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

/// The node's IPv6 masquerade address.
///
/// # Errors
/// `NO_SNAT_ADDR` when the node has none.
#[inline(always)]
pub fn address() -> Result<&'static Be32x4> {
    match maps::config_v6() {
        Some(config) if config.has_snat_addr() => Ok(&config.snat_addr),
        _ => Err(DropReason::NO_SNAT_ADDR),
    }
}
