//! The egress programs (pod-facing, and node-facing): packets about to leave through
//! the interface. Replies the ingress programs translated are already redirected past
//! these hooks' lookups (their tuples no longer match an entry); what is left here is
//! what came through the stack without meeting an ingress hook of ours: replies of a
//! host-network backend on this node, and ICMP errors the node itself sends about a
//! flow (from its own forwarding or input path). They get their original addresses
//! back, so the client sees the service address as its peer.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::ct_flags;

use crate::{
    conntrack, fragments, nat,
    verdict::{Result, PASS},
};

pub fn try_reply_egress(ctx: &TcContext) -> Result<i32> {
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(pkt) = fragments::parse(ctx, now) else {
        return Ok(PASS);
    };
    if let Some(entry) = conntrack::lookup(&pkt, now) {
        fragments::remember(&pkt, now);
        if entry.flags & ct_flags::REPLY != 0 {
            nat::translate(ctx, &pkt, &entry)?;
        }
    }
    Ok(PASS)
}
