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
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::ct_flags;

use crate::{
    conntrack,
    forward::{self, Flow},
    fragments, nat,
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
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };
    crate::trace::stage(proxy_common::trace::stage::PARSED);

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
    new_flow::handle(ctx, &pkt, now, Origin::Pod)
}
