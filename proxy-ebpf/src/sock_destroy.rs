//! Socket iterator programs that destroy the sockets the agent names: connected UDP
//! sockets (and TCP sockets still in SYN-SENT) that the socket layer translated to a
//! backend which has since left its service.
//!
//! A connected UDP socket never passes a hook of ours again (`send()` without an
//! address runs no sock_addr program), so after its backend leaves it would keep
//! sending to it for ever: a DNS client pinned to a deleted DNS pod. The agent finds
//! such sockets in the reverse map, lists their cookies in [`SOCK_DESTROY_V1`], enters
//! each network namespace that holds one and reads these iterators there (a socket
//! iterator walks the namespace of the thread that opens it). `bpf_sock_destroy()`
//! aborts the socket: its application gets `ECONNABORTED` and connects again, through
//! the hooks, to a live backend. Established TCP connections are left alone, as
//! kube-proxy leaves their conntrack entries: the backend may still be draining them.
//!
//! `bpf_sock_destroy` is a kfunc. aya-ebpf 0.2 has no `iter` program macro and
//! bpf-linker 0.13 emits the call as a call to an undefined symbol; the agent turns it
//! into a kfunc call (the kernel's BTF id) before loading the object
//! (`proxy-userspace/src/datapath/sock_destroy.rs`).
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::map,
    maps::HashMap,
};
use proxy_common::{counter, sock};

use crate::stats;

/// Cookies of the sockets to destroy ([`proxy_common::sock::DESTROY_V4_NAME`]).
#[map]
pub static SOCK_DESTROY_V1: HashMap<u64, u8> =
    HashMap::with_max_entries(sock::DESTROY_V4_CAPACITY, 0);

unsafe extern "C" {
    /// The kernel's `int bpf_sock_destroy(struct sock_common *sk)` (Linux 6.5), callable
    /// from TCP and UDP socket iterators.
    fn bpf_sock_destroy(sk: *mut c_void) -> i32;
}

/// The context of `iter/udp` programs: `struct bpf_iter__udp`, every pointer 8 bytes.
#[repr(C)]
struct IterUdp {
    meta: *mut c_void,
    udp_sk: *mut c_void,
    uid: u32,
    bucket: i32,
}

/// The context of `iter/tcp` programs: `struct bpf_iter__tcp`.
#[repr(C)]
struct IterTcp {
    meta: *mut c_void,
    sk_common: *mut c_void,
    uid: u32,
}

/// `skc_state` in `struct sock_common`, after the address pair (8 bytes), the hash (4),
/// the port pair (4) and the family (2): unchanged since Linux 2.6.
const SKC_STATE_OFFSET: usize = 18;
/// `TCP_SYN_SENT` of the kernel's socket states.
const TCP_SYN_SENT: u8 = 2;

/// Destroys `sk` if the agent listed its cookie.
#[inline(always)]
fn destroy_if_listed(sk: *mut c_void) {
    // SAFETY: `sk` is the iterator's non-null socket; the helper only reads its cookie.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    // SAFETY: presence is all that is read.
    if unsafe { SOCK_DESTROY_V1.get(cookie) }.is_none() {
        return;
    }
    // SAFETY: the kfunc takes the iterator's socket, which the kernel holds locked for
    // the call.
    if unsafe { bpf_sock_destroy(sk) } == 0 {
        stats::count(counter::SOCK_DESTROYED);
    }
}

/// UDP sockets of the iterating thread's network namespace.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn sock_destroy_udp(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel hands an iter/udp program a `struct bpf_iter__udp`.
    let sk = unsafe { (*ctx.cast::<IterUdp>()).udp_sk };
    if !sk.is_null() {
        destroy_if_listed(sk);
    }
    0
}

/// TCP sockets of the iterating thread's network namespace: only those still
/// connecting are destroyed (an established connection keeps its backend).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn sock_destroy_tcp(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel hands an iter/tcp program a `struct bpf_iter__tcp`.
    let sk = unsafe { (*ctx.cast::<IterTcp>()).sk_common };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: reads one byte of the socket the iterator holds.
    let state: u8 =
        unsafe { bpf_probe_read_kernel(sk.cast::<u8>().add(SKC_STATE_OFFSET)) }.unwrap_or(0);
    if state == TCP_SYN_SENT {
        destroy_if_listed(sk);
    }
    0
}
