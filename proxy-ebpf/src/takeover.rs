//! Taking over from kube-proxy: a new flow to a frontend whose packets netfilter's
//! conntrack already translates (kube-proxy's DNAT, from before kpr took over) is left
//! to netfilter, so the connection keeps the backend kube-proxy chose until it ends.
//!
//! Only packets that missed our own conntrack and hit a frontend get here
//! ([`crate::new_flow`], [`crate::service6::choose`] for IPv6), and only while the agent has switched the check on
//! ([`proxy_common::takeover::NfCheck`]): the agent does so while netfilter holds NAT
//! entries for our frontends, so a node that never ran kube-proxy pays nothing.
//!
//! The question is asked with the kernel's `bpf_skb_ct_lookup` kfunc, in the network
//! namespace of the packet's device. A flow is netfilter's when its entry has a
//! destination NAT (an entry without one is a flow netfilter merely watched: kube-proxy
//! did not translate it, so neither does netfilter now). A TCP SYN is a new connection
//! unless netfilter has not yet seen a reply to its flow (a SYN retransmitted while
//! kube-proxy's connection was being set up): a SYN that reuses the tuple of a finished
//! connection (`TIME_WAIT` in netfilter) would otherwise make netfilter start a new
//! entry, without NAT once kube-proxy's rules are gone, and the connection would fail.
//!
//! `bpf_skb_ct_lookup` and `bpf_ct_release` are kfuncs: bpf-linker emits their calls as
//! calls to undefined symbols, which the agent rewrites into kfunc calls before it
//! loads the object (`proxy-userspace/src/datapath/sock_destroy.rs`, `patch_kfunc_calls`;
//! on a kernel without them it turns them into "found nothing").
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff, helpers::bpf_probe_read_kernel, macros::map, maps::Array,
    programs::TcContext,
};
use proxy_common::{
    counter, proto,
    takeover::{ips, NfCheck, STATUS_OFFSET_MASK},
};

use crate::{
    parse::{tcp_flag, Packet},
    parse6::Packet6,
    stats,
};

/// Whether to ask netfilter ([`proxy_common::takeover::NF_CHECK_NAME`]).
#[map]
pub static NF_CHECK_V1: Array<NfCheck> = Array::with_max_entries(1, 0);

/// `struct bpf_sock_tuple`'s IPv4 arm, network order.
#[repr(C)]
struct SockTupleV4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// `struct bpf_sock_tuple`'s IPv6 arm, network order.
#[repr(C)]
struct SockTupleV6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// `struct bpf_ct_opts` as every kernel with the kfunc accepts it (12 bytes; kernels
/// that added zone options still take this size).
#[repr(C)]
struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: [u8; 2],
}

/// `BPF_F_CURRENT_NETNS`: the namespace of the packet's device.
const CURRENT_NETNS: i32 = -1;
/// The direction `bpf_skb_ct_lookup` reports when the tuple is the entry's original.
const IP_CT_DIR_ORIGINAL: u8 = 0;

unsafe extern "C" {
    /// The kernel's `struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *, struct
    /// bpf_sock_tuple *, u32, struct bpf_ct_opts *, u32)` (Linux 6.0): the entry holding
    /// the tuple (in either direction) with a reference taken, or null. The tuple's
    /// size says which arm of the union it is ([`SockTupleV4`], [`SockTupleV6`]).
    fn bpf_skb_ct_lookup(
        skb: *mut __sk_buff,
        tuple: *mut c_void,
        tuple_size: u32,
        opts: *mut CtOpts,
        opts_size: u32,
    ) -> *mut c_void;
    /// Drops the reference `bpf_skb_ct_lookup` took.
    fn bpf_ct_release(ct: *mut c_void);
}

/// The `status` bits of netfilter's entry for `tuple` (`tuple_size` bytes on the stack,
/// an arm of `bpf_sock_tuple`), if it has one with the tuple as its original direction.
#[inline(always)]
fn netfilter_status(
    skb: *mut __sk_buff,
    tuple: *mut c_void,
    tuple_size: u32,
    l4proto: u8,
    status_offset: u32,
) -> Option<u64> {
    let mut opts = CtOpts {
        netns_id: CURRENT_NETNS,
        error: 0,
        l4proto,
        dir: 0,
        reserved: [0; 2],
    };
    // SAFETY: the skb is the program's own; tuple and opts are stack memory of the
    // sizes passed.
    let ct = unsafe {
        bpf_skb_ct_lookup(
            skb,
            tuple,
            tuple_size,
            &raw mut opts,
            size_of::<CtOpts>() as u32,
        )
    };
    if ct.is_null() {
        return None;
    }
    let original = opts.dir == IP_CT_DIR_ORIGINAL;
    let offset = (status_offset & STATUS_OFFSET_MASK) as usize;
    // SAFETY: reads one word of the entry the lookup holds a reference on; a wrong
    // offset could only read another field of it.
    let status = unsafe { bpf_probe_read_kernel(ct.cast::<u8>().add(offset).cast::<u64>()) };
    // SAFETY: releases the reference taken above, once.
    unsafe { bpf_ct_release(ct) };
    // A frontend as the source of netfilter's reply direction is no flow to a frontend.
    status.ok().filter(|_| original)
}

/// The check's setting, when it is on.
#[inline(always)]
fn enabled_check() -> Option<&'static NfCheck> {
    NF_CHECK_V1.get(0).filter(|check| check.enabled != 0)
}

/// Whether netfilter's entry with `status` translates the flow of a packet of
/// protocol `l4_proto` with `tcp_flags` (counted when it does).
#[inline(always)]
fn theirs(status: u64, l4_proto: u8, tcp_flags: u8) -> bool {
    let syn =
        l4_proto == proto::TCP && tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    let theirs = status & ips::DST_NAT != 0 && !(syn && status & ips::SEEN_REPLY != 0);
    if theirs {
        stats::count(counter::NF_TRACKED_PASSED);
    }
    theirs
}

/// Whether the packet belongs to a flow netfilter translates, which must pass
/// untouched (counted). Called for packets of new flows to a frontend only.
#[inline(always)]
pub fn netfilter_translates(ctx: &TcContext, pkt: &Packet) -> bool {
    let Some(check) = enabled_check() else {
        return false;
    };
    let mut tuple = SockTupleV4 {
        saddr: pkt.tuple.src_addr.0,
        daddr: pkt.tuple.dst_addr.0,
        sport: pkt.tuple.src_port.0,
        dport: pkt.tuple.dst_port.0,
    };
    let Some(status) = netfilter_status(
        ctx.skb.skb,
        (&raw mut tuple).cast(),
        size_of::<SockTupleV4>() as u32,
        pkt.tuple.proto,
        check.status_offset,
    ) else {
        return false;
    };
    theirs(status, pkt.tuple.proto, pkt.tcp_flags)
}

/// [`netfilter_translates`] for an IPv6 packet, asked with the tuple's IPv6 arm. A
/// function of its own, as the IPv6 stages are ([`crate::parse6::parse`]): the tuple
/// lives in its frame, and its caller sees one scalar back.
#[inline(never)]
pub fn netfilter_translates6(skb: *mut __sk_buff, pkt: &Packet6) -> bool {
    let Some(check) = enabled_check() else {
        return false;
    };
    let mut tuple = SockTupleV6 {
        saddr: pkt.tuple.src_addr.0,
        daddr: pkt.tuple.dst_addr.0,
        sport: pkt.tuple.src_port.0,
        dport: pkt.tuple.dst_port.0,
    };
    let Some(status) = netfilter_status(
        skb,
        (&raw mut tuple).cast(),
        size_of::<SockTupleV6>() as u32,
        pkt.tuple.proto,
        check.status_offset,
    ) else {
        return false;
    };
    theirs(status, pkt.tuple.proto, pkt.tcp_flags)
}
