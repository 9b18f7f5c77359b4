//! The pod-facing TC ingress program: packets leaving pods. Flows to a service get a
//! backend and are DNATed ([`crate::new_flow`]); later packets of those flows follow
//! their conntrack entry, and so do the replies of local backends (to a local pod or
//! to a client outside the node). ICMP errors about a flow follow the same rules as the
//! flow's packets.
//!
//! Every translated packet goes straight to its next hop ([`crate::forward`]), in both
//! directions of a flow, as [`crate::node_ingress`] does. A flow must pass netfilter
//! both ways or not at all: a firewall with `ct state invalid drop` in its forward
//! path (kube-proxy's `KUBE-FORWARD`, most host firewalls) drops the rest of a
//! handshake it saw only half of. Masqueraded flows (hairpin) need it anyway: they
//! carry the node's own address, which the kernel would drop as a martian here.
//! Replies that reach no ingress hook of ours (from the node's own processes, for a
//! host-network backend) are translated at egress ([`crate::pod_egress`]); their
//! requests went to the stack too, since their route is local.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};

use crate::{
    conntrack,
    forward::{self, Flow},
    fragments,
    new_flow::{self, Origin},
    verdict::{Result, PASS},
};

pub fn try_pod_ingress(ctx: &TcContext) -> Result<i32> {
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };

    if let Some(entry) = conntrack::lookup(&pkt, now) {
        fragments::remember(&pkt, now);
        return forward::translate_and_send(ctx, &pkt, &entry, Flow::Known);
    }
    new_flow::handle(ctx, &pkt, now, Origin::Pod)
}
