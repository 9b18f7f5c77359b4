//! Kernel programs of the proxy.
//!
//! One module per datapath stage: [`parse`] reads headers, [`destination`] tells
//! frontend addresses (and the service CIDR) from the rest, [`conntrack`] finds or
//! records flows, [`service`] finds frontends and picks backends, [`new_flow`] decides
//! a new flow's translation, [`fragments`] lets later IP fragments follow their first,
//! [`snat`] masquerades with a port it claims, [`nat`] rewrites addresses with their
//! checksums, [`icmp_error`] translates ICMP errors about translated flows, [`forward`]
//! sends translated packets to their next hop, [`icmp_reply`] sends the ICMP errors the
//! datapath answers with itself (reject, fragmentation needed, time exceeded), [`sock`]
//! translates at the socket layer for clients on the node (pods and the node's own
//! processes), [`sock_destroy`] aborts connected sockets whose backend left. Entry
//! points stay thin: they call a `try_*` function and return its verdict; errors carry
//! the typed drop reason ([`verdict::DropReason`]) that is counted in [`stats`].
//!
//! Hooks: TC on pod-facing interfaces (`tc_pod_*`: pods as clients and as backends)
//! and on the node's external interfaces (`tc_node_*`: NodePort, externalIPs,
//! LoadBalancer IPs, replies of remote backends); cgroup v2 sock_addr hooks
//! (`sock_*4`, in [`sock`]: clients on the node, at `connect()`/`sendmsg()`); socket
//! iterators (`sock_destroy_*`, in [`sock_destroy`]: run by the agent when backends
//! leave).
// For the kernel (bpfel-unknown-none): no std, no `main`. On the host, where
// `cargo clippy --workspace` and `cargo build --workspace` check this crate with the
// ordinary toolchain, it is a std binary with an empty `main`; nothing runs it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Kernel code has no way to report a panic: the verifier rejects a program that could
// reach one, so a panic path is a load failure found late. These make it a build error
// (clippy, `cargo xtask clippy`), and keep every `unsafe` block's argument written down.
#![deny(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::todo,
    clippy::unimplemented,
    clippy::undocumented_unsafe_blocks,
    clippy::dbg_macro
)]

mod conntrack;
mod conntrack6;
mod destination;
mod forward;
mod forward6;
mod fragments;
mod fragments6;
mod icmp6_error;
mod icmp6_reply;
mod icmp_error;
mod icmp_reply;
mod maps;
mod nat;
mod nat6;
mod new_flow;
mod new_flow6;
mod node_ingress;
mod parse;
mod parse6;
mod pod_ingress;
mod reply_egress;
mod service;
mod service6;
mod service_stats;
mod snat;
mod snat6;
mod sock;
mod sock6;
mod sock_destroy;
mod stats;
mod takeover;
mod trace;
mod verdict;
mod via_stack;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// The verdict of a stage's result; a drop is counted under its reason.
#[inline(always)]
pub(crate) fn verdict_of(result: verdict::Result<i32>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count(reason.counter());
            trace::note(|record| {
                record.stages |= proxy_common::trace::stage::DROPPED;
                record.drop_reason = reason.counter();
            });
            verdict::SHOT
        }
    }
}

/// TC ingress of pod-facing interfaces: packets leaving pods towards services, and
/// replies of backends that must be translated back.
///
/// IPv6 frames take their own path ([`new_flow6`]), called from here rather than from
/// inside the IPv4 one: the verifier limits the stack of a call chain to 512 bytes, and
/// the IPv4 function's frame would leave the IPv6 stages too little of it.
#[classifier]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    if parse6::is_ipv6(&ctx) {
        return new_flow6::pod_ingress(ctx.skb.skb, conntrack::now());
    }
    verdict_of(pod_ingress::try_pod_ingress(&ctx))
}

/// TC egress of pod-facing interfaces: replies on their way into client pods, whose
/// translation is undone here.
/// IPv6 as in `tc_pod_ingress`. An interface whose pods never had a flow through the
/// stack carries no such reply ([`via_stack`]): its packets pass at once.
#[classifier]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context's skb is valid for the program's run.
    if !via_stack::may_carry_replies(unsafe { (*ctx.skb.skb).ifindex }) {
        return verdict::PASS;
    }
    if parse6::is_ipv6(&ctx) {
        return new_flow6::reply_egress(ctx.skb.skb, conntrack::now());
    }
    verdict_of(reply_egress::try_reply_egress(&ctx))
}

/// TC ingress of the node's external interfaces: traffic from other nodes and from
/// outside the cluster to NodePorts, externalIPs, LoadBalancer IPs and ClusterIPs, and
/// replies that must be translated back.
/// IPv6 as in `tc_pod_ingress`.
#[classifier]
pub fn tc_node_ingress(ctx: TcContext) -> i32 {
    if parse6::is_ipv6(&ctx) {
        return new_flow6::node_ingress(ctx.skb.skb, conntrack::now());
    }
    verdict_of(node_ingress::try_node_ingress(&ctx))
}

/// TC egress of the node's external interfaces: replies of local backends to clients
/// outside the node, translated back (the same work as `tc_pod_egress`, on another
/// interface).
/// IPv6 as in `tc_pod_egress`.
#[classifier]
pub fn tc_node_egress(ctx: TcContext) -> i32 {
    if parse6::is_ipv6(&ctx) {
        return new_flow6::reply_egress(ctx.skb.skb, conntrack::now());
    }
    verdict_of(reply_egress::try_reply_egress(&ctx))
}

/// Host builds only exist to be checked (see the top of this file).
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists for rustc.
    loop {}
}

/// Declares the license the kernel checks before allowing GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
