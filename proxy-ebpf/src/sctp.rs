//! SCTP's checksum across a port rewrite, both families.
//!
//! SCTP is translated as UDP is (its common header starts with the two ports, RFC 9260
//! section 3.1), with one difference: its checksum is CRC32c over the whole SCTP
//! packet, not the internet checksum, and no BPF helper computes or updates it. It
//! covers no pseudo-header, so an address rewrite (DNAT or SNAT of the IP address)
//! leaves it as it is; only a port change needs an update, applied incrementally
//! ([`proxy_common::crc32c::port_change`]: a fixed cost, the payload never read).
//!
//! The update is deferred to the end of the program: [`defer`] (called by the NAT
//! stages, `crate::nat` and `crate::nat6`) notes the change in the skb's control
//! buffer, and the entry points end with [`finish`], which applies it. At the entry
//! point's end the verifier has few distinct states left (the verdict, the context), so
//! the update's two 32-step multiplications are verified a few times per program;
//! applied where the ports are rewritten, they were verified once for every state that
//! reaches a rewrite (node-ingress: about 190 000 instructions more). A redirect
//! helper only records its target, the skb leaves after the program returns, so the
//! fix-up after it is still in time.
//!
//! A checksum field of 0 is left as it is: that is how Linux hands over an SCTP packet
//! whose CRC the device (or the kernel, on the way out of a device without SCTP CRC
//! offload: `skb_crc32c_csum_help`) is still to compute (CHECKSUM_PARTIAL with
//! `csum_not_inet`; `sctp_packet_transmit` zeroes the field). That computation covers
//! the field itself, so it must stay 0. TC programs cannot read `skb->ip_summed`, so the
//! field is what tells; a real CRC of 0 (one packet in 2^32) is then left stale, and
//! its receiver drops it as it drops any corrupted packet (SCTP retransmits). A packet
//! that arrives with a wrong CRC is not validated here: it leaves as wrong as it came
//! (the xor keeps the error), and its receiver drops it.
//!
//! No internet checksum compensates a change of the ports or the CRC field, so for a
//! CHECKSUM_COMPLETE packet [`finish`] adds their difference to `skb->csum`
//! (`bpf_csum_update`, which does nothing to other packets).
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use proxy_common::{crc32c, Be16};

use crate::{
    stats,
    verdict::{DropReason, SHOT},
};

/// Offset of the checksum in the SCTP common header (ports, verification tag,
/// checksum).
const SCTP_CSUM_OFF: usize = 8;

/// The control-buffer words of a deferred update: the SCTP header's offset in the low
/// half and the SCTP packet's length in the high half (0: nothing pending), the old
/// ports, the new ports (each as the 4 bytes they are in the header).
const CB_WHERE: usize = 0;
const CB_OLD: usize = 1;
const CB_NEW: usize = 2;

/// The two ports as the 4 bytes they are at the start of the header.
#[inline(always)]
fn ports(src: Be16, dst: Be16) -> u32 {
    u32::from(src.0) | (u32::from(dst.0) << 16)
}

/// Starts a program run with nothing pending (the control buffer is not cleared for
/// us between hooks).
#[inline(always)]
pub fn begin(ctx: &TcContext) {
    // SAFETY: a store into the program's own context; TC programs may write `cb`.
    unsafe { (*ctx.skb.skb).cb[CB_WHERE] = 0 };
}

/// Notes that the ports of the SCTP packet at `l4_off` (`sctp_len` bytes) change from
/// `old` to `new` (`(source, destination)`), for [`finish`]; the ports themselves are
/// the caller's to write.
#[inline(always)]
pub fn defer(
    skb: *mut __sk_buff,
    l4_off: usize,
    sctp_len: u32,
    old: (Be16, Be16),
    new: (Be16, Be16),
) {
    let (old, new) = (ports(old.0, old.1), ports(new.0, new.1));
    if old == new {
        // A ClusterIP whose port is its targetPort: nothing the CRC covers changes.
        return;
    }
    // SAFETY: stores into the program's own context; TC programs may write `cb`.
    unsafe {
        (*skb).cb[CB_WHERE] = (l4_off as u32 & 0xffff) | (sctp_len << 16);
        (*skb).cb[CB_OLD] = old;
        (*skb).cb[CB_NEW] = new;
    }
}

/// Applies a deferred update (see the module comment) and returns the verdict; a
/// failed update drops the packet, counted as a failed rewrite.
#[inline(always)]
pub fn finish(ctx: &TcContext, verdict: i32) -> i32 {
    // SAFETY: a read of the program's own context.
    let pending = unsafe { (*ctx.skb.skb).cb[CB_WHERE] };
    if pending == 0 || verdict == SHOT {
        return verdict;
    }
    if update_crc(ctx.skb.skb) {
        verdict
    } else {
        stats::count(DropReason::REWRITE.counter());
        SHOT
    }
}

/// The update itself, a function of its own (a BPF-to-BPF call). `false`: a helper
/// failed.
#[inline(never)]
fn update_crc(skb: *mut __sk_buff) -> bool {
    let ctx = TcContext::new(skb);
    // SAFETY: reads of the program's own context.
    let (pending, old, new) =
        unsafe { ((*skb).cb[CB_WHERE], (*skb).cb[CB_OLD], (*skb).cb[CB_NEW]) };
    let csum_off = (pending & 0xffff) as usize + SCTP_CSUM_OFF;
    let sctp_len = pending >> 16;
    let Ok(field) = ctx.load::<u32>(csum_off) else {
        return false;
    };
    let updated = if field == 0 {
        // To be computed by offload (see the module comment).
        0
    } else {
        let patch = crc32c::port_change(old.to_ne_bytes(), new.to_ne_bytes(), sctp_len);
        field ^ u32::from_ne_bytes(patch)
    };
    // The bytes that changed without an internet checksum compensating: the ports
    // (already written) and the checksum field.
    let mut from = [old, field];
    let mut to = [new, updated];
    // SAFETY: both buffers live on the stack for the call; the sizes are theirs.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 8, to.as_mut_ptr(), 8, 0) };
    let Ok(diff) = u32::try_from(diff) else {
        return false;
    };
    // SAFETY: the program's own skb. An error only says that the packet is not
    // CHECKSUM_COMPLETE, whose `skb->csum` is then nobody's to keep.
    let _ = unsafe { bpf_csum_update(skb, diff) };
    if updated == field {
        return true;
    }
    ctx.store(csum_off, &updated, 0).is_ok()
}
