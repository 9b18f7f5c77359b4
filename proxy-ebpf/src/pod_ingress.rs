//! The pod-facing TC ingress program: packets leaving pods. Flows to a service get a
//! backend and are DNATed ([`crate::new_flow`]); later packets of those flows follow
//! their conntrack entry. ICMP errors about a flow follow the same rules as the flow's
//! packets.
//!
//! Which way a translated packet goes ([`crate::forward::known_flow`]): a flow to a
//! remote backend, and a masqueraded one (a pod reaching itself, whose packets carry
//! the node's own address, a martian on this interface), is redirected to its next hop
//! in both directions; a flow to a local backend goes through the stack in both
//! directions, its replies translated after routing by the egress program of the
//! client's interface ([`crate::reply_egress`]). Either way netfilter sees a flow both
//! ways or not at all, which a forward-path `ct state invalid drop` (kube-proxy's
//! `KUBE-FORWARD`, most host firewalls) requires.
//!
//! The lean path: a packet whose destination is neither a frontend address
//! ([`crate::destination`]) nor the node's masquerade address passes after one small
//! lookup, without touching conntrack. Such a packet can only be a pod's ordinary
//! traffic or the reply of a local backend to a flow that is not masqueraded, which
//! goes through the stack anyway and is translated at egress, whose conntrack lookup
//! also records that the flow saw its reply.
use aya_ebpf::programs::TcContext;

use crate::{
    conntrack,
    destination::{self, Destination},
    forward, fragments, maps,
    new_flow::{self, Origin},
    verdict::{Result, PASS},
};

pub fn try_pod_ingress(ctx: &TcContext) -> Result<i32> {
    let now = conntrack::now();
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };
    crate::trace::stage(proxy_common::trace::stage::PARSED);
    let destination = destination::classify(pkt.tuple.dst_addr);
    if destination == Destination::Elsewhere && pkt.tuple.dst_addr != maps::config().snat_addr {
        return Ok(PASS);
    }

    if let Some(entry) = conntrack::lookup(&pkt, now) {
        fragments::remember(&pkt, now);
        return forward::known_flow(ctx, &pkt, &entry);
    }
    new_flow::handle(ctx, &pkt, now, Origin::Pod, destination)
}
