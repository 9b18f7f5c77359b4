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
use proxy_common::{counter, ct_flags};

use crate::{
    conntrack,
    forward::{self, Flow},
    nat,
    new_flow::{self, Origin},
    parse::{self, Kind},
    stats,
    verdict::{Result, PASS},
};

/// Whether an entry rewrites both addresses: a masqueraded flow, in either direction.
#[inline(always)]
fn is_masqueraded(flags: u16) -> bool {
    flags & (ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST)
        == (ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST)
}

pub fn try_pod_ingress(ctx: &TcContext) -> Result<i32> {
    let Some(pkt) = parse::ipv4(ctx) else {
        return Ok(PASS);
    };
    if pkt.kind == Kind::LaterFragment {
        // Without ports there is no frontend to match; counted so that services
        // receiving fragmented datagrams show up in the metrics.
        stats::count(counter::FRAGMENT_PASSED);
        return Ok(PASS);
    }
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(entry) = conntrack::lookup(&pkt, now) {
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
