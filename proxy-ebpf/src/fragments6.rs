//! IPv6 fragments of translated flows, as [`crate::fragments`] does for IPv4: a first
//! fragment of a flow's datagram leaves its ports in `FRAG_V6_V1` under the
//! datagram's key (addresses, the fragment header's identification, protocol), and the
//! later fragments, which carry no ports, take them from there and follow the same
//! conntrack entry. A later fragment of an unknown datagram (its first unseen, late,
//! or its record expired) is not ours: it passes, counted `fragment_passed`.
//!
//! Both are functions of their own, as every IPv6 stage ([`crate::parse6::parse`]):
//! the 40-byte key lives in their frame.
use proxy_common::{counter, Be32, FragKeyV6, FragValueV6, FRAGMENT_TIMEOUT_NS};

use crate::{maps::FRAG_V6_V1, parse::Kind, parse6::Packet6, stats};

#[inline(always)]
fn key(pkt: &Packet6) -> FragKeyV6 {
    FragKeyV6 {
        src_addr: pkt.tuple.src_addr,
        dst_addr: pkt.tuple.dst_addr,
        id: Be32(pkt.frag_id),
        proto: pkt.tuple.proto,
        _pad: [0; 3],
    }
}

/// Remembers the ports of a first fragment of a flow's datagram (call it once the
/// packet is known to belong to a flow); other packets are ignored, and the trace
/// instance ([`crate::trace`]) remembers nothing.
#[inline(never)]
pub fn remember(pkt: &Packet6, now: u64) {
    if pkt.kind != Kind::Transport || !pkt.fragmented || crate::trace::active() {
        return;
    }
    let value = FragValueV6 {
        seen_ns: now,
        src_port: pkt.tuple.src_port,
        dst_port: pkt.tuple.dst_port,
        _pad: [0; 4],
    };
    // Losing the record loses the datagram's later fragments, as without the map;
    // never drop the first fragment for it.
    let _ = FRAG_V6_V1.insert(key(pkt), value, 0);
}

/// Gives a later fragment its datagram's ports. `false` (counted): the datagram is
/// unknown, the fragment is not ours.
#[inline(never)]
pub fn resolve(pkt: &mut Packet6, now: u64) -> bool {
    let found = FRAG_V6_V1
        .get_ptr(key(pkt))
        // SAFETY: copied out at once.
        .map(|found| unsafe { *found })
        .filter(|found| now.saturating_sub(found.seen_ns) <= FRAGMENT_TIMEOUT_NS);
    let Some(found) = found else {
        stats::count(counter::FRAGMENT_PASSED);
        return false;
    };
    pkt.tuple.src_port = found.src_port;
    pkt.tuple.dst_port = found.dst_port;
    true
}
