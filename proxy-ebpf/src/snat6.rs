//! Masquerading (SNAT) of IPv6 flows to the node's IPv6 address, with a source port
//! claimed as [`crate::snat`] claims it for IPv4: drawn at random from the configured
//! range ([`crate::snat::draw_port`], the IPv4 config's, the same ports above the
//! kernel's ephemeral ones) and claimed by inserting the reply entry `(backend, node
//! address, port)` with BPF_NOEXIST into the IPv6 new-flow table
//! ([`crate::conntrack6::create`], which draws the ports, for masquerade and for the
//! remap of a client's port alike). That insert is the claim: atomic between CPUs, and
//! a port is only taken over from an expired flow, so no separate claim map is needed.
use proxy_common::Be32x4;

use crate::{
    maps,
    verdict::{DropReason, Result},
};

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
