//! Sending a translated packet straight to its next hop: a FIB lookup for its new
//! addresses, then a redirect with neighbour resolution.
//!
//! Needed wherever the translation makes the packet one the kernel's input path would
//! drop: a masqueraded packet carries the node's own address as its source (a "martian"
//! on ingress), and so does the reply of a NodePort flow once translated back. It also
//! skips the rest of the stack for traffic this node only forwards.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{counter, CtKeyV4};

use crate::{pod_ingress::PASS, stats};

const AF_INET: u8 = 2;

/// Redirects the packet, whose addresses and ports are now `tuple`, to the interface
/// the routing table picks. Falls back to the stack (PASS) when the route is local,
/// missing or forwarding is off: the kernel then decides as it would without us.
#[inline(always)]
pub fn to_next_hop(ctx: &TcContext, tuple: &CtKeyV4) -> i32 {
    // SAFETY: a plain C struct; all-zero is its "unset" state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = tuple.proto;
    params.sport = tuple.src_port.0;
    params.dport = tuple.dst_port.0;
    params.__bindgen_anon_3.ipv4_src = tuple.src_addr.0;
    params.__bindgen_anon_4.ipv4_dst = tuple.dst_addr.0;
    // SAFETY: reading a field of the program's own skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: `params` lives on the stack for the call; the size is its own.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
    {
        return PASS;
    }
    // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
    let verdict = unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return PASS;
    }
    stats::count(counter::REDIRECTED);
    TC_ACT_REDIRECT as i32
}
