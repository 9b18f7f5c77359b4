//! SCTP's checksum across a port rewrite, both families.
//!
//! SCTP is translated as UDP is (its common header starts with the two ports, RFC 9260
//! section 3.1), with one difference: its checksum is CRC32c over the whole SCTP
//! packet, not the internet checksum, and no BPF helper computes or updates it. It
//! covers no pseudo-header, so an address rewrite (DNAT or SNAT of the IP address)
//! leaves it as it is; only a port change needs [`ports_changed`], which applies the
//! change incrementally ([`proxy_common::crc32c::port_change`]: a fixed cost, the
//! payload never read).
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
//! The bytes of the ports and the checksum are stored with `BPF_F_RECOMPUTE_CSUM`: no
//! internet checksum compensates their change, so a CHECKSUM_COMPLETE packet's
//! `skb->csum` is adjusted by the helper instead of going stale.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use proxy_common::{crc32c, Be16};

use crate::verdict::{DropReason, Result};

/// Offset of the checksum in the SCTP common header (ports, verification tag,
/// checksum).
const SCTP_CSUM_OFF: usize = 8;

/// Flags for storing bytes no internet checksum covers (see the module comment).
pub const STORE_FLAGS: u64 = BPF_F_RECOMPUTE_CSUM as u64;

/// The two ports as the 4 bytes they are at the start of the header.
#[inline(always)]
fn ports(src: Be16, dst: Be16) -> u32 {
    u32::from(src.0) | (u32::from(dst.0) << 16)
}

/// Keeps the CRC32c of the SCTP packet at `l4_off` (`sctp_len` bytes) valid after its
/// ports changed from `old` to `new` (`(source, destination)`); the ports themselves
/// are the caller's to write.
#[inline(always)]
pub fn ports_changed(
    skb: *mut __sk_buff,
    l4_off: usize,
    sctp_len: u32,
    old: (Be16, Be16),
    new: (Be16, Be16),
) -> Result<()> {
    let (old, new) = (ports(old.0, old.1), ports(new.0, new.1));
    if old == new {
        // A ClusterIP whose port is its targetPort: nothing the CRC covers changed.
        return Ok(());
    }
    if update_crc(skb, l4_off, sctp_len, u64::from(old) | (u64::from(new) << 32)) {
        Ok(())
    } else {
        Err(DropReason::REWRITE)
    }
}

/// The update itself, a function of its own (a BPF-to-BPF call): its two 32-step
/// multiplications are verified once per state that reaches the call instead of once
/// per inlined copy. `ports`: the old 4 bytes in the low half, the new in the high
/// half; a scalar result and 4 arguments, because BPF passes at most 5 in registers
/// and a returned `Result` takes one (its return slot). `false`: a helper failed.
#[inline(never)]
fn update_crc(skb: *mut __sk_buff, l4_off: usize, sctp_len: u32, ports: u64) -> bool {
    let ctx = TcContext::new(skb);
    let csum_off = l4_off + SCTP_CSUM_OFF;
    let Ok(field) = ctx.load::<[u8; 4]>(csum_off) else {
        return false;
    };
    if field == [0; 4] {
        // To be computed by offload (see the module comment).
        return true;
    }
    let (old, new) = (ports as u32, (ports >> 32) as u32);
    let patch = crc32c::port_change(old.to_ne_bytes(), new.to_ne_bytes(), sctp_len);
    let updated = (u32::from_ne_bytes(field) ^ u32::from_ne_bytes(patch)).to_ne_bytes();
    ctx.store(csum_off, &updated, STORE_FLAGS).is_ok()
}
