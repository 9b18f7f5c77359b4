//! The node-facing TC ingress program: packets arriving from the underlay (other
//! nodes, clients outside the cluster). It serves NodePorts, externalIPs,
//! LoadBalancer IPs and ClusterIPs reached from outside ([`crate::new_flow`] with
//! [`Origin::Outside`]), and translates back the replies that come to this node:
//! those of masqueraded flows (addressed to the node's own address and SNAT port) and
//! those of flows from local pods to remote backends. ICMP errors about those flows
//! (from a backend, from a router on either side of the node) are translated the same
//! way.
//!
//! Translated packets go straight to their next hop ([`crate::forward::known_flow`]):
//! a reply translated back carries a frontend as its source, which may be this node's
//! own address, and the kernel's input path would drop it as a martian. The exception
//! is a flow to a local backend that is not masqueraded: it goes through the stack
//! both ways, its reply translated at this interface's egress.
//!
//! Replies come to addresses that are no frontend (a local client pod, the node's
//! masquerade address), so conntrack is asked first; the frontend address set
//! ([`crate::destination`]) then spares packets that are for no service the service
//! lookup, and tells an unallocated service address or an undeclared ClusterIP port.
use aya_ebpf::programs::TcContext;

use crate::{
    conntrack, destination, forward, fragments,
    new_flow::{self, Origin},
    verdict::{Result, PASS},
};

pub fn try_node_ingress(ctx: &TcContext) -> Result<i32> {
    let now = conntrack::now();
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };
    crate::trace::stage(proxy_common::trace::stage::PARSED);

    if let Some(entry) = conntrack::lookup(&pkt, now) {
        fragments::remember(&pkt, now);
        return forward::known_flow(ctx, &pkt, &entry);
    }
    let destination = destination::classify(pkt.tuple.dst_addr);
    new_flow::handle(ctx, &pkt, now, Origin::Outside, destination)
}
