//! IPv4 fragments of translated flows. Only a datagram's first fragment carries the
//! ports that pick its conntrack entry; the later ones carry the same addresses,
//! protocol and identification (RFC 791). When a first fragment belongs to a flow we
//! translate, its ports are remembered under that datagram's key, and later fragments
//! take them from there, so every fragment is translated alike (Cilium's ipv4 frag map
//! works the same way; netfilter reassembles instead, which a TC program cannot).
//!
//! A later fragment that arrives before its first (reordered on the way), or whose
//! first went unseen, is not known to belong to any flow: it passes untouched, like any
//! traffic that is not ours, and the datagram is lost as it would be if that fragment
//! were. Linux sends a datagram's fragments in order, so on one path this is rare.
use proxy_common::{FragKeyV4, FragValueV4, FRAGMENT_TIMEOUT_NS};

use crate::{
    maps::FRAG_V4_V1,
    parse::{Kind, Packet},
};

#[inline(always)]
fn key(pkt: &Packet) -> FragKeyV4 {
    FragKeyV4 {
        src_addr: pkt.ip_src,
        dst_addr: pkt.ip_dst,
        id: proxy_common::Be16(pkt.ip_id),
        proto: pkt.tuple.proto,
        _pad: 0,
    }
}

/// Remembers the ports of a first fragment of a flow's datagram (call it once the
/// packet is known to belong to a flow). Other packets are ignored.
#[inline(always)]
pub fn remember(pkt: &Packet, now: u64) {
    if pkt.kind != Kind::Transport || !pkt.is_first_fragment() || crate::trace::active() {
        return;
    }
    let value = FragValueV4 {
        seen_ns: now,
        src_port: pkt.tuple.src_port,
        dst_port: pkt.tuple.dst_port,
        _pad: [0; 4],
    };
    // Losing the record loses this datagram's later fragments, which is what happens
    // to them without the map; never drop the first fragment for it.
    let _ = FRAG_V4_V1.insert(key(pkt), value, 0);
}

/// Gives a later fragment the ports of its datagram's first fragment. `false` when the
/// datagram is unknown (or its record expired): the fragment is not ours.
#[inline(always)]
pub fn resolve(pkt: &mut Packet, now: u64) -> bool {
    let Some(found) = FRAG_V4_V1.get_ptr(key(pkt)) else {
        return false;
    };
    // SAFETY: copied out at once.
    let found = unsafe { *found };
    if now.saturating_sub(found.seen_ns) > FRAGMENT_TIMEOUT_NS {
        return false;
    }
    pkt.tuple.src_port = found.src_port;
    pkt.tuple.dst_port = found.dst_port;
    true
}

/// Parses the packet and gives a later fragment its datagram's ports. `None`: not
/// ours, let it pass (a later fragment of an unknown datagram is counted).
#[inline(always)]
pub fn parse(ctx: &aya_ebpf::programs::TcContext, now: u64) -> Option<Packet> {
    let mut pkt = crate::parse::ipv4(ctx)?;
    if pkt.kind == Kind::LaterFragment && !resolve(&mut pkt, now) {
        crate::stats::count(proxy_common::counter::FRAGMENT_PASSED);
        return None;
    }
    Some(pkt)
}
