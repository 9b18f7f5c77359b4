//! The pod-facing TC ingress program: packets leaving pods. Flows to a service get a
//! backend and are DNATed ([`crate::new_flow`]); later packets of those flows follow
//! their conntrack entry. Replies are left to [`crate::pod_egress`] (or
//! [`crate::node_ingress`] for remote backends), which run after the kernel routed
//! them, so the reverse-path filter never sees a service address as a source.
//!
//! Masqueraded flows are the exception: a hairpin flow (a pod reaching itself) and its
//! replies carry the node's own address, which the kernel would drop as a martian on
//! this interface, so both directions go straight to their next hop.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{counter, ct_flags};

use crate::{
    conntrack, forward, nat,
    new_flow::{self, Origin},
    parse, stats,
};

pub const PASS: i32 = TC_ACT_OK as i32;

/// Whether an entry rewrites both addresses: a masqueraded flow, in either direction.
#[inline(always)]
pub fn is_masqueraded(flags: u16) -> bool {
    flags & (ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST)
        == (ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST)
}

pub fn try_pod_ingress(ctx: &TcContext) -> Result<i32, u32> {
    let Some(pkt) = parse::ipv4(ctx) else {
        return Ok(PASS);
    };
    if pkt.is_later_fragment {
        // Without ports there is no frontend to match; counted so that services
        // receiving fragmented datagrams show up in the metrics.
        stats::count(counter::FRAGMENT_PASSED);
        return Ok(PASS);
    }
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(entry) = conntrack::lookup(&pkt, now) {
        let is_reply = entry.flags & ct_flags::REPLY != 0;
        if is_masqueraded(entry.flags) {
            nat::apply(ctx, &pkt, &entry)?;
            stats::count(if is_reply {
                counter::REPLY_TRANSLATED
            } else {
                counter::FORWARD_TRANSLATED
            });
            return Ok(forward::to_next_hop(
                ctx,
                &conntrack::translated(&pkt.tuple, &entry),
            ));
        }
        if !is_reply {
            nat::apply(ctx, &pkt, &entry)?;
            stats::count(counter::FORWARD_TRANSLATED);
        }
        return Ok(PASS);
    }
    new_flow::handle(ctx, &pkt, now, Origin::Pod)
}
