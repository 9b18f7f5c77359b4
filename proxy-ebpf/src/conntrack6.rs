//! Connection tracking for IPv6 flows: the scheme of [`crate::conntrack`] (one entry
//! per direction, a new-flow LRU table and an established plain hash, the same state
//! machine and timeouts, the same refresh rules) over the IPv6 tables `CT_V6_V1` and
//! `CT_NEW_V6_V1`. The state logic itself (which bits a packet adds, when a flow is
//! established) is the IPv4 module's, shared; only keys, entries and tables differ.
//! Entries are read and updated in place rather than copied: the IPv6 stages' stack is
//! tight (see [`crate::parse6::parse`]). In the trace instance ([`crate::trace`])
//! nothing is written: inserts answer as they would have, removes and in-place
//! updates are skipped, and a lookup's copy shows the entry as the packet leaves it.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{
    counter, ct_flags, proto, Be16, Be32x4, CtEntryV6, CtKeyV6, CT_PEER_REFRESH_NS, CT_REFRESH_NS,
};

use crate::{
    conntrack::{admits_new_flows, completes_handshake, is_syn, mark_full, transition, DIRECTION},
    maps::{self, CT_NEW_V6_V1, CT_V6_V1},
    parse::Kind,
    parse6::{reversed, Packet6},
    service6::Chosen,
    snat, stats, trace,
    verdict::{DropReason, Result},
};

/// The table an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Established,
    New,
}

impl Table {
    #[inline(always)]
    fn get(self, key: &CtKeyV6) -> Option<*mut CtEntryV6> {
        match self {
            Self::Established => CT_V6_V1.get_ptr_mut(key),
            Self::New => CT_NEW_V6_V1.get_ptr_mut(key),
        }
    }

    #[inline(always)]
    fn insert(self, key: &CtKeyV6, entry: &CtEntryV6, flags: u32) -> bool {
        if trace::active() {
            // Written nowhere; the answer the insert would give.
            return flags != BPF_NOEXIST || self.get(key).is_none();
        }
        match self {
            Self::Established => CT_V6_V1.insert(key, entry, u64::from(flags)).is_ok(),
            Self::New => CT_NEW_V6_V1.insert(key, entry, u64::from(flags)).is_ok(),
        }
    }

    #[inline(always)]
    fn remove(self, key: &CtKeyV6) {
        if trace::active() {
            return;
        }
        // Gone already is as good as removed.
        let _ = match self {
            Self::Established => CT_V6_V1.remove(key),
            Self::New => CT_NEW_V6_V1.remove(key),
        };
    }
}

/// The tuple of the packet after `entry`'s rewrite.
#[inline(always)]
pub fn translated(tuple: &CtKeyV6, entry: &CtEntryV6) -> CtKeyV6 {
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

/// The key of the other direction's entry of the same flow.
#[inline(always)]
fn peer_key(tuple: &CtKeyV6, entry: &CtEntryV6) -> CtKeyV6 {
    reversed(&translated(tuple, entry))
}

/// Finds the live entry of `key`: established table first; an expired established
/// entry is removed on sight (see [`crate::conntrack`]).
#[inline(always)]
fn find(key: &CtKeyV6, now: u64) -> Option<(Table, *mut CtEntryV6)> {
    let config = maps::config();
    if let Some(ptr) = Table::Established.get(key) {
        // SAFETY: valid for this program run; read in place (a copy would take stack
        // the IPv6 frames do not have, see `crate::parse6::parse`).
        if !config.ct_expired_v6(unsafe { &*ptr }, key.proto, now) {
            return Some((Table::Established, ptr));
        }
        Table::Established.remove(key);
    }
    let ptr = Table::New.get(key)?;
    // SAFETY: as above.
    if config.ct_expired_v6(unsafe { &*ptr }, key.proto, now) {
        return None;
    }
    Some((Table::New, ptr))
}

/// Moves a flow seen both ways from the new table to the established one, writing the
/// entry of `key` (at `ptr`) as it now is into `out`; `false` (the flow stays new) when
/// the established table is full or the peer is gone. Both entries are updated in
/// place and inserted from the map's own memory, with no copy on the stack.
#[inline(always)]
fn promote(
    key: &CtKeyV6,
    ptr: *mut CtEntryV6,
    peer: &CtKeyV6,
    state: u16,
    now: u64,
    out: &mut CtEntryV6,
) -> bool {
    let Some(peer_ptr) = Table::New.get(peer) else {
        return false;
    };
    let state = state | ct_flags::ASSURED;
    if trace::active() {
        // Written nowhere: the entry as the move would leave it.
        // SAFETY: valid for this program run; copied out.
        *out = unsafe { *ptr };
        out.flags = (out.flags & DIRECTION) | state;
        out.last_seen_ns = now;
        out.peer_refreshed_ns = now;
        return true;
    }
    // SAFETY: both pointers are valid for this program run; plain stores. A failed
    // move leaves them marked established in the new table, which only lengthens
    // their timeout there, as the IPv4 flow's would be after its next packet.
    let (own, other) = unsafe {
        (*ptr).flags = ((*ptr).flags & DIRECTION) | state;
        (*ptr).last_seen_ns = now;
        (*ptr).peer_refreshed_ns = now;
        (*peer_ptr).flags = ((*peer_ptr).flags & DIRECTION) | state;
        (*peer_ptr).last_seen_ns = now;
        (&*ptr, &*peer_ptr)
    };
    // Established first, new removed after, as in the IPv4 module.
    if !Table::Established.insert(peer, other, BPF_ANY) {
        mark_full(now);
        return false;
    }
    if !Table::Established.insert(key, own, BPF_ANY) {
        Table::Established.remove(peer);
        mark_full(now);
        return false;
    }
    *out = *own;
    Table::New.remove(key);
    Table::New.remove(peer);
    stats::count(counter::CT_ASSURED);
    true
}

/// Finds the live entry of the packet's flow, advances the flow's state, refreshes
/// the idle timers, and copies it into `out` ([`crate::conntrack::lookup`] for IPv6;
/// a SYN on a closed flow starts a new one). `false`: no live entry. A function of its
/// own, as [`crate::parse6::parse`] says why.
#[inline(never)]
pub fn lookup(pkt: &Packet6, now: u64, out: &mut CtEntryV6) -> bool {
    let Some((table, ptr)) = find(&pkt.tuple, now) else {
        return false;
    };
    trace::note(|record| {
        // SAFETY: the pointer is valid for this program run; read in place.
        let entry = unsafe { &*ptr };
        record.stages |= proxy_common::trace::stage::CT_HIT;
        record.service_id = entry.service_id;
        record.backend_id = entry.backend_id;
        record.ct_flags = entry.flags;
    });
    if pkt.kind == Kind::IcmpError {
        // An error only reads its flow's entry: it says nothing about the flow's state
        // and may be forged, so it neither refreshes nor closes anything.
        // SAFETY: the pointer is valid for this program run.
        *out = unsafe { *ptr };
        return true;
    }
    // SAFETY: the pointer is valid for this program run; fields are read in place.
    let (old_flags, peer_refreshed_ns, last_seen_ns) =
        unsafe { ((*ptr).flags, (*ptr).peer_refreshed_ns, (*ptr).last_seen_ns) };
    // SAFETY: as above.
    let peer = peer_key(&pkt.tuple, unsafe { &*ptr });
    let is_reply = old_flags & ct_flags::REPLY != 0;
    let l4_proto = pkt.tuple.proto;
    if !is_reply
        && l4_proto == proto::TCP
        && is_syn(pkt.tcp_flags)
        && ct_flags::is_closed(old_flags)
    {
        table.remove(&pkt.tuple);
        table.remove(&peer);
        return false;
    }
    let state = (old_flags | transition(l4_proto, pkt.tcp_flags, is_reply)) & !DIRECTION;
    let flags = (old_flags & DIRECTION) | state;
    if table == Table::New
        && !is_reply
        && state & ct_flags::SEEN_REPLY != 0
        && completes_handshake(l4_proto, pkt.tcp_flags)
        && promote(&pkt.tuple, ptr, &peer, state, now, out)
    {
        return true;
    }
    let refresh_peer = now.saturating_sub(peer_refreshed_ns) > CT_PEER_REFRESH_NS;
    if trace::active() {
        // Written nowhere: the entry with the state this packet gives it.
        // SAFETY: valid for this program run; copied out.
        *out = unsafe { *ptr };
        out.flags = flags;
        return true;
    }
    // SAFETY: plain stores into the map value of this program run.
    unsafe {
        if now.saturating_sub(last_seen_ns) > CT_REFRESH_NS {
            (*ptr).last_seen_ns = now;
        }
        // The established packet's path writes nothing more.
        if flags != old_flags || refresh_peer {
            (*ptr).flags = flags;
            if refresh_peer {
                (*ptr).peer_refreshed_ns = now;
            }
        }
        *out = *ptr;
    }
    out.flags = flags;
    if flags != old_flags || refresh_peer {
        if let Some(peer_ptr) = table.get(&peer) {
            // SAFETY: as above.
            unsafe {
                (*peer_ptr).last_seen_ns = now;
                (*peer_ptr).flags = ((*peer_ptr).flags & DIRECTION) | state;
            }
        }
    }
    true
}

/// What a new IPv6 flow is translated to: its new source, and the chosen backend as
/// its new destination. By reference: the frames of the IPv6 new-flow path have no
/// room for copies (see [`crate::parse6::parse`]).
#[derive(Clone, Copy)]
pub struct Translation<'a> {
    /// The client's own address and port (the port may still be remapped, see
    /// [`create`]), or with [`Self::masquerade`] the node's address.
    pub new_src: (&'a Be32x4, Be16),
    pub chosen: &'a Chosen,
    /// Both directions go through the stack ([`ct_flags::VIA_STACK`]).
    pub via_stack: bool,
    /// The source port is drawn from the masquerade range ([`crate::snat`]),
    /// `new_src`'s port is ignored.
    pub masquerade: bool,
}

/// Claims `key` for a new flow's reply entry, as [`crate::conntrack`]'s claim: free,
/// or held by an expired flow, in both tables; the atomic BPF_NOEXIST insert into the
/// new table decides between CPUs. A function of its own: its paths (insert or not,
/// expired or not, in two tables) end in one of two answers, so the verifier's states
/// at each retry of [`create`]'s loop are the same whichever path failed, and it
/// explores the retries once rather than once per combination of paths.
#[inline(never)]
fn claim(key: &CtKeyV6, reply: &CtEntryV6, now: u64) -> bool {
    let config = maps::config();
    let expired = |ptr: Option<*mut CtEntryV6>| {
        // SAFETY: read in place, valid for this program run.
        ptr.is_none_or(|holder| config.ct_expired_v6(unsafe { &*holder }, key.proto, now))
    };
    let claimed = Table::New.insert(key, reply, BPF_NOEXIST)
        || (expired(Table::New.get(key)) && Table::New.insert(key, reply, BPF_ANY));
    if !claimed {
        return false;
    }
    if !expired(Table::Established.get(key)) {
        Table::New.remove(key);
        return false;
    }
    true
}

/// A new flow's reply entry and key, until its port is claimed ([`snat::claim_drawn`]'s
/// loop context).
struct ReplyClaim6<'a> {
    key: CtKeyV6,
    entry: &'a mut CtEntryV6,
    now: u64,
    claimed: bool,
}

impl snat::ReplyClaim for ReplyClaim6<'_> {
    #[inline(always)]
    fn claim_port(&mut self, port: Be16) -> bool {
        self.key.dst_port = port;
        self.claimed = claim(&self.key, self.entry, self.now);
        self.claimed
    }

    #[inline(always)]
    fn claimed(&self) -> bool {
        self.claimed
    }
}

/// Gives up the reply key of a closed flow in the established table
/// ([`crate::conntrack`]'s `release_closed`: a client reusing a port in TIME_WAIT for
/// another frontend of the same backend keeps its port).
#[inline(always)]
fn release_closed(key: &CtKeyV6) {
    if let Some(holder) = Table::Established.get(key) {
        // SAFETY: read in place, valid for this program run.
        if ct_flags::is_closed(unsafe { (*holder).flags }) {
            Table::Established.remove(key);
        }
    }
}

/// Records a new flow in the new-flow table: the entry for its original direction and
/// the one for its replies, which undo it ([`crate::conntrack::create`] for IPv6, with
/// the same choice of source port: a masqueraded flow draws it from the masquerade
/// range, any other asks for the client's own and, when a live flow holds that reply
/// key, has it remapped to a drawn one, keeping the client's address). `out` receives
/// the original direction's entry. `Ok(false)`: every key tried is held by a live
/// flow. Only the claim is retried, in `bpf_loop` ([`crate::snat::claim_drawn`]): the
/// entries do not depend on the drawn port.
///
/// # Errors
/// `CT_FULL` while the established table is full; `CT_INSERT` when an insert fails.
#[inline(never)]
pub fn create(
    original: &CtKeyV6,
    nat: &Translation,
    now: u64,
    out: &mut CtEntryV6,
) -> Result<bool> {
    if !admits_new_flows(now) {
        return Err(DropReason::CT_FULL);
    }
    let (new_src, new_src_port) = nat.new_src;
    let backend = &nat.chosen.backend;
    let rewrite_dst = backend.addr != original.dst_addr || backend.port != original.dst_port;
    // The reply entry is built first, in `out`, and claimed from there; the original
    // direction's then takes its place. No entry is copied on the stack: the frames of
    // this call chain are near the 512-byte limit.
    *out = CtEntryV6 {
        last_seen_ns: now,
        peer_refreshed_ns: now,
        backend_id: nat.chosen.backend_id,
        service_id: nat.chosen.service_id,
        flags: ct_flags::REPLY
            | if nat.via_stack {
                ct_flags::VIA_STACK
            } else {
                0
            },
        ..CtEntryV6::default()
    };
    if rewrite_dst {
        out.flags |= ct_flags::REWRITE_SRC;
        out.nat_src_addr = original.dst_addr;
        out.nat_src_port = original.dst_port;
    }
    let mut reply = ReplyClaim6 {
        // The translated tuple, reversed.
        key: CtKeyV6 {
            src_addr: backend.addr,
            dst_addr: *new_src,
            src_port: backend.port,
            dst_port: new_src_port,
            proto: original.proto,
            _pad: [0; 3],
        },
        entry: out,
        now,
        claimed: false,
    };
    // The client's own port, unless masqueraded.
    if !nat.masquerade {
        release_closed(&reply.key);
        reply.claimed = claim(&reply.key, reply.entry, now);
    }
    let rewrite_src = !reply.claimed;
    if rewrite_src {
        // Masqueraded or remapped: the source is rewritten, to a drawn port, and the
        // replies get the client's back.
        reply.entry.flags |= ct_flags::REWRITE_DST;
        reply.entry.nat_dst_addr = original.src_addr;
        reply.entry.nat_dst_port = original.src_port;
        if !snat::claim_drawn(&mut reply) {
            return Ok(false);
        }
    }
    let reply_key = reply.key;
    let forward = reply.entry;
    forward.flags &= !(ct_flags::REPLY | ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST);
    forward.nat_src_addr = Be32x4::default();
    forward.nat_src_port = Be16::default();
    forward.nat_dst_addr = Be32x4::default();
    forward.nat_dst_port = Be16::default();
    if rewrite_dst {
        forward.flags |= ct_flags::REWRITE_DST;
        forward.nat_dst_addr = backend.addr;
        forward.nat_dst_port = backend.port;
    }
    if rewrite_src {
        forward.flags |= ct_flags::REWRITE_SRC;
        forward.nat_src_addr = *new_src;
        forward.nat_src_port = reply_key.dst_port;
    }
    if !Table::New.insert(original, forward, BPF_ANY) {
        Table::New.remove(&reply_key);
        return Err(DropReason::CT_INSERT);
    }
    Ok(true)
}
