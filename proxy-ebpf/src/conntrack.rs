//! Connection tracking: every translated flow has one entry per direction, each holding
//! the rewrite for the packets it matches. Entries expire by idle time (checked here,
//! so a stale entry is never used) and are reaped by the agent and by LRU eviction.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{ct_flags, Be16, Be32, CtEntryV4, CtKeyV4};

use crate::{
    maps::{self, CT_V4_V1},
    parse::{reversed, tcp_flag, Kind, Packet},
    verdict::{DropReason, Result},
};

/// The tuple of the packet after `entry`'s rewrite.
#[inline(always)]
pub fn translated(tuple: &CtKeyV4, entry: &CtEntryV4) -> CtKeyV4 {
    let mut out = *tuple;
    if entry.flags & ct_flags::REWRITE_SRC != 0 {
        out.src_addr = entry.nat_src_addr;
        out.src_port = entry.nat_src_port;
    }
    if entry.flags & ct_flags::REWRITE_DST != 0 {
        out.dst_addr = entry.nat_dst_addr;
        out.dst_port = entry.nat_dst_port;
    }
    out
}

/// Finds the live entry of the packet's flow, refreshes its idle timer and returns a
/// copy. A TCP SYN that finds a closing flow starts a new one instead (port reuse).
/// An ICMP error only reads the entry of the flow it is about: it says nothing about
/// the flow's state and may be forged, so it neither refreshes nor closes anything.
#[inline(always)]
pub fn lookup(pkt: &Packet, now: u64) -> Option<CtEntryV4> {
    let ptr = CT_V4_V1.get_ptr_mut(&pkt.tuple)?;
    // SAFETY: the pointer is valid for this program run; copy the value out at once.
    let entry = unsafe { *ptr };
    if maps::config().ct_expired(&entry, pkt.tuple.proto, now) {
        return None;
    }
    if pkt.kind == Kind::IcmpError {
        return Some(entry);
    }
    let is_syn = pkt.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    if is_syn && entry.flags & ct_flags::CLOSING != 0 {
        return None;
    }
    let closing = pkt.tcp_flags & (tcp_flag::FIN | tcp_flag::RST) != 0;
    // SAFETY: as above; plain stores into the map value.
    unsafe {
        (*ptr).last_seen_ns = now;
        if closing {
            (*ptr).flags |= ct_flags::CLOSING;
        }
    }
    if closing && entry.flags & ct_flags::CLOSING == 0 {
        // The other direction closes with it, so both entries take the short timeout.
        let peer = reversed(&translated(&pkt.tuple, &entry));
        if let Some(peer) = CT_V4_V1.get_ptr_mut(&peer) {
            // SAFETY: as above.
            unsafe { (*peer).flags |= ct_flags::CLOSING };
        }
    }
    Some(entry)
}

/// What a new flow is translated to.
#[derive(Clone, Copy)]
pub struct Translation {
    pub new_src: (Be32, Be16),
    pub new_dst: (Be32, Be16),
    pub backend_id: u32,
    pub service_id: u32,
}

/// What [`create`] did.
#[derive(Clone, Copy)]
pub enum Created {
    /// Both entries are in place; this is the original direction's.
    Flow(CtEntryV4),
    /// The reply key a claim asked for is held by a live flow (see [`create`]).
    ReplyKeyTaken,
}

/// Records a new flow: the entry for its original direction (`original` becomes the
/// translated tuple) and the entry for replies (which undo it).
///
/// With `claim_reply`, the reply key must be free (or held by an expired flow): that is
/// how a masqueraded flow claims its source port ([`crate::snat`]); a live holder
/// gives [`Created::ReplyKeyTaken`] so the caller can draw another port.
#[inline(always)]
pub fn create(
    original: &CtKeyV4,
    nat: &Translation,
    now: u64,
    claim_reply: bool,
) -> Result<Created> {
    let mut after = *original;
    (after.src_addr, after.src_port) = nat.new_src;
    (after.dst_addr, after.dst_port) = nat.new_dst;

    let mut forward = CtEntryV4 {
        last_seen_ns: now,
        backend_id: nat.backend_id,
        service_id: nat.service_id,
        ..CtEntryV4::default()
    };
    let mut reply = forward;
    reply.flags = ct_flags::REPLY;
    if after.dst_addr != original.dst_addr || after.dst_port != original.dst_port {
        forward.flags |= ct_flags::REWRITE_DST;
        forward.nat_dst_addr = after.dst_addr;
        forward.nat_dst_port = after.dst_port;
        reply.flags |= ct_flags::REWRITE_SRC;
        reply.nat_src_addr = original.dst_addr;
        reply.nat_src_port = original.dst_port;
    }
    if after.src_addr != original.src_addr || after.src_port != original.src_port {
        forward.flags |= ct_flags::REWRITE_SRC;
        forward.nat_src_addr = after.src_addr;
        forward.nat_src_port = after.src_port;
        reply.flags |= ct_flags::REWRITE_DST;
        reply.nat_dst_addr = original.src_addr;
        reply.nat_dst_port = original.src_port;
    }
    let reply_key = reversed(&after);
    if claim_reply {
        if CT_V4_V1
            .insert(&reply_key, &reply, u64::from(BPF_NOEXIST))
            .is_err()
        {
            let holder_expired = CT_V4_V1.get_ptr(&reply_key).is_none_or(|holder| {
                // SAFETY: copied out at once.
                let holder = unsafe { *holder };
                maps::config().ct_expired(&holder, original.proto, now)
            });
            if !holder_expired {
                return Ok(Created::ReplyKeyTaken);
            }
            CT_V4_V1
                .insert(&reply_key, &reply, u64::from(BPF_ANY))
                .map_err(|_| DropReason::CT_INSERT)?;
        }
    } else {
        CT_V4_V1
            .insert(&reply_key, &reply, u64::from(BPF_ANY))
            .map_err(|_| DropReason::CT_INSERT)?;
    }
    if CT_V4_V1
        .insert(original, &forward, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CT_V4_V1.remove(&reply_key);
        return Err(DropReason::CT_INSERT);
    }
    Ok(Created::Flow(forward))
}
