//! The pod-facing TC ingress program: packets leaving pods. Flows to a service get a
//! backend and are DNATed; later packets of those flows follow their conntrack entry.
//! Replies are left to [`crate::pod_egress`], which runs after the kernel routed them,
//! so the reverse-path filter never sees a service address as a source.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{counter, ct_flags, service_flags};

use crate::{
    conntrack::{self, Translation},
    nat::{self, End},
    parse, reject, service, stats,
};

pub const PASS: i32 = TC_ACT_OK as i32;

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
        if entry.flags & ct_flags::REPLY == 0 {
            nat::apply(ctx, &pkt, &entry)?;
            stats::count(counter::FORWARD_TRANSLATED);
        }
        return Ok(PASS);
    }

    let Some(frontend) = service::lookup(&pkt.tuple, true) else {
        return Ok(PASS);
    };
    if frontend.value.count == 0 {
        if frontend.value.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            return Err(counter::DROP_NO_LOCAL_BACKEND);
        }
        let verdict = reject::port_unreachable(ctx, &pkt)?;
        stats::count(counter::REJECTED_NO_BACKEND);
        return Ok(verdict);
    }

    let (backend_id, backend) = service::select_backend(&frontend, pkt.tuple.src_addr)?;
    let translation = Translation {
        new_src: (pkt.tuple.src_addr, pkt.tuple.src_port),
        new_dst: (backend.addr, backend.port),
        backend_id,
        service_id: frontend.value.service_id,
    };
    conntrack::create(&pkt.tuple, &translation, now)?;
    nat::rewrite(ctx, &pkt, End::Destination, backend.addr, backend.port)?;
    stats::count(counter::NEW_FLOW);
    Ok(PASS)
}
