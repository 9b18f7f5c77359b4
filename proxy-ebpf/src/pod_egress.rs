//! The egress programs (pod-facing, and node-facing for replies of local backends to
//! outside clients): packets about to leave through the interface. Replies of
//! translated flows get their original addresses back (the client sees the service
//! address as its peer), and so do ICMP errors travelling like replies (from the
//! backend, or from a router between it and the client). Running after routing,
//! wherever the reply came from (a local pod, another node, this node's own ICMP), is
//! what lets one hook cover every backend location.
use aya_ebpf::programs::TcContext;
use proxy_common::ct_flags;

use crate::{
    conntrack, fragments, nat,
    verdict::{Result, PASS},
};

pub fn try_reply_egress(ctx: &TcContext) -> Result<i32> {
    let now = conntrack::now();
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
