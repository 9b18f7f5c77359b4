//! IPv6 on the pod-facing hooks: ClusterIP DNAT of TCP/UDP flows from pods, and its
//! reverse on the replies. The IPv4 programs dispatch here on the ethertype only when
//! their own parse found no IPv4 packet, so an IPv4 packet runs the code it ran before.
//!
//! ICMPv6 errors about a flow ([`crate::icmp6_error`]) and its datagrams' later
//! fragments ([`crate::fragments6`]) follow the flow's entry, in the same hooks.
//!
//! Every IPv6 flow goes through the stack in both directions
//! ([`proxy_common::ct_flags::VIA_STACK`]): its requests are DNATed at pod ingress and
//! routed by the kernel, its replies translated back at the egress of the client's
//! interface, after routing (this slice has no IPv6 FIB redirect, masquerade, hairpin,
//! affinity or node-facing path). Netfilter thus sees each flow both ways, with the
//! backend's address.
//!
//! The stages are BPF-to-BPF calls ([`crate::parse6::parse`] says why); this frame
//! holds the packet and its entry, which they fill.
use aya_ebpf::bindings::__sk_buff;
use proxy_common::{counter, ct_flags, CtEntryV6};

use crate::{
    conntrack6::{self, Translation},
    destination::Destination,
    fragments6,
    icmp6_reply::{self, Reason},
    nat6,
    parse::Kind,
    parse6::{self, Packet6},
    service6::{self, Chosen, Outcome},
    stats,
    verdict::{DropReason, Result, PASS},
};

/// `tc_pod_ingress` for an IPv6 frame: packets leaving pods. Returns the verdict, a
/// drop already counted.
#[inline(never)]
pub fn pod_ingress(skb: *mut __sk_buff, now: u64) -> i32 {
    // `kpr trace` does not follow IPv6 yet; its instance must write no map.
    if crate::trace::active() {
        return PASS;
    }
    crate::verdict_of(try_pod_ingress(skb, now))
}

/// The egress programs for an IPv6 frame, as [`pod_ingress`].
#[inline(never)]
pub fn reply_egress(skb: *mut __sk_buff, now: u64) -> i32 {
    if crate::trace::active() {
        return PASS;
    }
    crate::verdict_of(try_reply_egress(skb, now))
}

#[inline(always)]
fn try_pod_ingress(skb: *mut __sk_buff, now: u64) -> Result<i32> {
    let mut pkt = Packet6::default();
    if !parse6::parse(skb, &mut pkt) {
        return Ok(PASS);
    }
    // The lean path: a packet to no frontend address is a pod's own traffic, or the
    // reply of a local backend (or an error travelling as one), which is translated at
    // the client's egress. A later fragment has its addresses, so this comes before
    // the fragment map is asked for its ports.
    let destination = service6::classify(&pkt.tuple.dst_addr);
    let Destination::Frontend { cluster_ip } = destination else {
        return Ok(PASS);
    };
    if pkt.kind == Kind::LaterFragment && !fragments6::resolve(&mut pkt, now) {
        return Ok(PASS);
    }
    let mut entry = CtEntryV6::default();
    if conntrack6::lookup(&pkt, now, &mut entry) {
        fragments6::remember(&pkt, now);
        if entry.flags & ct_flags::REPLY == 0 {
            nat6::translate(skb, &pkt, &entry)?;
        }
        return Ok(PASS);
    }
    // An error or a later fragment of no flow we know is not ours.
    if pkt.kind != Kind::Transport {
        return Ok(PASS);
    }
    new_flow(skb, &pkt, now, cluster_ip, &mut entry)
}

/// Replies of flows through the stack get their frontend back as the source.
#[inline(always)]
fn try_reply_egress(skb: *mut __sk_buff, now: u64) -> Result<i32> {
    let mut pkt = Packet6::default();
    if !parse6::parse(skb, &mut pkt) {
        return Ok(PASS);
    }
    if pkt.kind == Kind::LaterFragment && !fragments6::resolve(&mut pkt, now) {
        return Ok(PASS);
    }
    let mut entry = CtEntryV6::default();
    if conntrack6::lookup(&pkt, now, &mut entry) {
        fragments6::remember(&pkt, now);
        if entry.flags & ct_flags::REPLY != 0 {
            nat6::translate(skb, &pkt, &entry)?;
        }
    }
    Ok(PASS)
}

/// The first packet of a flow to a frontend address: the frontend's backend, or the
/// reject (no endpoints, or a port the ClusterIP does not declare), as
/// [`crate::new_flow::handle`] decides for IPv4. `entry` is scratch space for the new
/// flow's entry.
#[inline(always)]
fn new_flow(
    skb: *mut __sk_buff,
    pkt: &Packet6,
    now: u64,
    cluster_ip: bool,
    entry: &mut CtEntryV6,
) -> Result<i32> {
    let mut chosen = Chosen::default();
    match service6::choose(&pkt.tuple, &mut chosen)? {
        Outcome::Backend => {}
        Outcome::NoFrontend if cluster_ip => {
            return icmp6_reply::send(skb, pkt, Reason::UndeclaredPort)
        }
        Outcome::NoFrontend => return Ok(PASS),
        Outcome::SourceRanges => return Err(DropReason::SOURCE_RANGE),
        Outcome::EmptyDrop => return Err(DropReason::NO_LOCAL_BACKEND),
        Outcome::Empty => return icmp6_reply::send(skb, pkt, Reason::NoBackend),
    }
    let translation = Translation {
        new_dst: (chosen.backend.addr, chosen.backend.port),
        backend_id: chosen.backend_id,
        service_id: chosen.service_id,
    };
    conntrack6::create(&pkt.tuple, &translation, now, entry)?;
    fragments6::remember(pkt, now);
    stats::count(counter::NEW_FLOW);
    nat6::apply(skb, pkt, entry)?;
    Ok(PASS)
}
