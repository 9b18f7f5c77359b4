//! The egress programs (pod-facing, and node-facing): packets about to leave through
//! the interface. Replies of flows that go through the stack (to a local backend, see
//! [`crate::pod_ingress`]) get their original addresses back here, after routing, and
//! so do replies of a host-network backend on this node and ICMP errors travelling like
//! replies (from the backend, or from this node itself): the client sees the service
//! address as its peer. Replies the ingress programs redirected no longer match an
//! entry here.
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
