//! The node-facing TC egress program: replies of local backends to clients outside
//! the node (flows from outside that were not masqueraded: local backends, and every
//! backend of an externalTrafficPolicy Local service) get their frontend address back
//! as they leave. Running after routing, like [`crate::pod_egress`].
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{counter, ct_flags};

use crate::{conntrack, nat, parse, pod_ingress::PASS, stats};

pub fn try_node_egress(ctx: &TcContext) -> Result<i32, u32> {
    let Some(pkt) = parse::ipv4(ctx) else {
        return Ok(PASS);
    };
    if pkt.is_later_fragment {
        return Ok(PASS);
    }
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = conntrack::lookup(&pkt, now) {
        if entry.flags & ct_flags::REPLY != 0 {
            nat::apply(ctx, &pkt, &entry)?;
            stats::count(counter::REPLY_TRANSLATED);
        }
    }
    Ok(PASS)
}
