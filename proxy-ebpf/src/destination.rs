//! What a packet's destination is, from one lookup in the frontend address set
//! (`FE_ADDR_V4_V1`, every address some frontend uses, filled by the agent's syncer
//! before the frontends that use an address and emptied after them) and the service
//! CIDR. Checked before conntrack and the service map, so that traffic which is not
//! for a service pays one small lookup, and so that addresses inside the service CIDR
//! get kube-proxy's nftables semantics: an unallocated one is dropped, an undeclared
//! port of a live ClusterIP is rejected ([`crate::new_flow`]).
use proxy_common::{frontend_addr, Be32};

use crate::maps::{FE_ADDR_V4_V1, SVC_CIDR_V4_V1};

/// Where a packet is going, as far as services are concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// An address some frontend uses; `cluster_ip`: it is a ClusterIP, so a port no
    /// frontend declares is refused.
    Frontend { cluster_ip: bool },
    /// Inside the service CIDR, but no frontend uses the address (a deleted Service's
    /// ClusterIP, or one never allocated).
    UnallocatedServiceIp,
    /// Anything else: a pod, a node, the outside world.
    Elsewhere,
}

/// Classifies `addr`, the destination of a packet (or of the flow an ICMP error is
/// about).
#[inline(always)]
pub fn classify(addr: Be32) -> Destination {
    // SAFETY: copied out at once.
    if let Some(found) = FE_ADDR_V4_V1.get_ptr(addr).map(|found| unsafe { *found }) {
        return Destination::Frontend {
            cluster_ip: found.kinds & frontend_addr::CLUSTER_IP != 0,
        };
    }
    match SVC_CIDR_V4_V1.get(0) {
        Some(cidr) if cidr.contains(addr) => Destination::UnallocatedServiceIp,
        _ => Destination::Elsewhere,
    }
}
