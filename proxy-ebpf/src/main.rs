//! Kernel programs of the proxy.
//!
//! One module per datapath stage: [`parse`] reads headers, [`conntrack`] finds or
//! records flows, [`service`] finds frontends and picks backends, [`nat`] rewrites
//! addresses with their checksums, [`reject`] answers flows to empty services, and
//! [`sock`] translates at the socket layer for clients in the node's own namespace. Entry
//! points stay thin: they call a `try_*` function and return its verdict; errors carry
//! the drop reason that is counted in [`stats`].
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod parse;
mod pod_egress;
mod pod_ingress;
mod reject;
mod service;
mod sock;
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
    match pod_egress::try_pod_egress(&ctx) {
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
