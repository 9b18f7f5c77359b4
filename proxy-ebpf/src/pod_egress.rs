//! The egress programs (pod-facing, and node-facing for replies of local backends to
//! outside clients): packets about to leave through the interface. Replies of
//! translated flows get their original addresses back (the client sees the service
//! address as its peer). Running after routing, wherever the reply came from (a local
//! pod or another node), is what lets one hook cover every backend location.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{counter, ct_flags};

use crate::{conntrack, nat, parse, pod_ingress::PASS, stats};

pub fn try_reply_egress(ctx: &TcContext) -> Result<i32, u32> {
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
