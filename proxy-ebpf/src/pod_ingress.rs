//! The pod-facing TC ingress program: packets leaving pods. Flows to a service get a
//! backend and are DNATed ([`crate::new_flow`]); later packets of those flows follow
//! their conntrack entry. Replies are left to [`crate::pod_egress`] (or
//! [`crate::node_ingress`] for remote backends), which run after the kernel routed
//! them, so the reverse-path filter never sees a service address as a source. ICMP
//! errors about a flow follow the same rules as the flow's packets.
//!
//! Masqueraded flows are the exception: a hairpin flow (a pod reaching itself) and its
//! replies carry the node's own address, which the kernel would drop as a martian on
//! this interface, so both directions go straight to their next hop.
//!
//! The lean path: a packet whose destination is neither a frontend address
//! ([`crate::destination`]) nor the node's masquerade address passes after one small
//! lookup, without touching conntrack. Such a packet can only be a pod's ordinary
//! traffic or the reply of a local backend to a flow that was not masqueraded: that
//! reply is translated after routing by the egress program of the interface it leaves
//! through ([`crate::pod_egress`]), whose conntrack lookup also records that the flow
//! saw its reply; nothing here would change it.
use aya_ebpf::programs::TcContext;
use proxy_common::ct_flags;

use crate::{
    conntrack,
    destination::{self, Destination},
    forward::{self, Flow},
    fragments, maps, nat,
    new_flow::{self, Origin},
    verdict::{Result, PASS},
};

/// Whether an entry rewrites both addresses: a masqueraded flow, in either direction.
#[inline(always)]
fn is_masqueraded(flags: u16) -> bool {
    flags & (ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST)
        == (ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST)
}

pub fn try_pod_ingress(ctx: &TcContext) -> Result<i32> {
    let now = conntrack::now();
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };
    let destination = destination::classify(pkt.tuple.dst_addr);
    if destination == Destination::Elsewhere && pkt.tuple.dst_addr != maps::config().snat_addr {
        return Ok(PASS);
    }

    if let Some(entry) = conntrack::lookup(&pkt, now) {
        fragments::remember(&pkt, now);
        if is_masqueraded(entry.flags) {
            return forward::translate_and_send(ctx, &pkt, &entry, Flow::Known);
        }
        if entry.flags & ct_flags::REPLY == 0 {
            nat::translate(ctx, &pkt, &entry)?;
        }
        return Ok(PASS);
    }
    new_flow::handle(ctx, &pkt, now, Origin::Pod, destination)
}
