//! Kernel programs of the proxy.
//!
//! One module per datapath stage: [`parse`] reads headers, [`conntrack`] finds or
//! records flows, [`service`] finds frontends and picks backends, [`new_flow`] decides
//! a new flow's translation, [`snat`] masquerades with a port it claims, [`nat`]
//! rewrites addresses with their checksums, [`forward`] sends translated packets to
//! their next hop, [`reject`] answers flows to empty services, [`sock`] translates at the socket layer
//! for clients on the node (pods and the node's own processes), [`sock_destroy`] aborts
//! connected sockets whose backend left. Entry points stay thin:
//! they call a `try_*` function and return its verdict; errors carry the drop reason
//! that is counted in [`stats`].
//!
//! Hooks: TC on pod-facing interfaces (`tc_pod_*`: pods as clients and as backends)
//! and on the node's external interfaces (`tc_node_*`: NodePort, externalIPs,
//! LoadBalancer IPs, replies of remote backends); cgroup v2 sock_addr hooks
//! (`sock_*4`, in [`sock`]: clients on the node, at `connect()`/`sendmsg()`); socket
//! iterators (`sock_destroy_*`, in [`sock_destroy`]: run by the agent when backends
//! leave).
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod maps;
mod nat;
mod new_flow;
mod node_ingress;
mod parse;
mod pod_egress;
mod pod_ingress;
mod reject;
mod service;
mod snat;
mod sock;
mod sock_destroy;
mod stats;

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};

/// TC ingress of pod-facing interfaces: packets leaving pods towards services, and
/// replies of backends that must be translated back.
#[classifier]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    match pod_ingress::try_pod_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

/// TC egress of pod-facing interfaces: replies on their way into client pods, whose
/// translation is undone here.
#[classifier]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    match pod_egress::try_reply_egress(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

/// TC ingress of the node's external interfaces: traffic from other nodes and from
/// outside the cluster to NodePorts, externalIPs, LoadBalancer IPs and ClusterIPs, and
/// replies that must be translated back.
#[classifier]
pub fn tc_node_ingress(ctx: TcContext) -> i32 {
    match node_ingress::try_node_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

/// TC egress of the node's external interfaces: replies of local backends to clients
/// outside the node, translated back (the same work as `tc_pod_egress`, on another
/// interface).
#[classifier]
pub fn tc_node_egress(ctx: TcContext) -> i32 {
    match pod_egress::try_reply_egress(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists for rustc.
    loop {}
}

/// Declares the license the kernel checks before allowing GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
