//! The node-facing TC ingress program: packets arriving from the underlay (other
//! nodes, clients outside the cluster). It serves NodePorts, externalIPs,
//! LoadBalancer IPs and ClusterIPs reached from outside ([`crate::new_flow`] with
//! [`Origin::Outside`]), and translates back the replies that come to this node:
//! those of masqueraded flows (addressed to the node's own address and SNAT port) and
//! those of flows from local pods to remote backends. ICMP errors about those flows
//! (from a backend, from a router on either side of the node) are translated the same
//! way.
//!
//! Every translated packet goes straight to its next hop ([`crate::forward`]): a reply
//! translated back carries a frontend as its source, which may be this node's own
//! address, and the kernel's input path would drop it as a martian.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};

use crate::{
    conntrack,
    forward::{self, Flow},
    fragments,
    new_flow::{self, Origin},
    verdict::{Result, PASS},
};

pub fn try_node_ingress(ctx: &TcContext) -> Result<i32> {
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };
    crate::trace::stage(proxy_common::trace::stage::PARSED);

    if let Some(entry) = conntrack::lookup(&pkt, now) {
        fragments::remember(&pkt, now);
        return forward::translate_and_send(ctx, &pkt, &entry, Flow::Known);
    }
    new_flow::handle(ctx, &pkt, now, Origin::Outside)
}
