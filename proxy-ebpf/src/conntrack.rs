//! Connection tracking: every translated flow has one entry per direction, each holding
//! the rewrite for the packets it matches, and both holding the flow's state
//! ([`proxy_common::ct_flags`]: SYN sent, SYN received, established, half-closed,
//! closed, as the kernel's TCP tracker). Entries expire by idle time, with a timeout
//! that follows the state (checked here, so a stale entry is never used), and are
//! reaped by the agent.
//!
//! Two tables keep floods away from established flows, the way the kernel's
//! `early_drop` only ever evicts unassured entries:
//! - new flows start in the LRU table `CT_NEW_V4_V2`; a flood of half-open flows (a
//!   SYN flood from random sources) only pushes out other half-open flows;
//! - a flow seen both ways (the client spoke again after the reply: the TCP handshake
//!   completed) moves to the plain hash `CT_V4_V2`, where no insert evicts anything.
//!   When that table is full the move fails, the flow stays new, and new flows are
//!   refused for a moment ([`proxy_common::CT_FULL_HOLD_NS`], `drop_ct_full`), as the
//!   kernel drops new connections when its table is full; established ones keep
//!   working.
//!
//! Lookups try the established table first, so the common packet costs one lookup.
//! Timestamps come from the coarse clock ([`now`]) and an entry's own timestamp is only
//! written when it is older than [`CT_REFRESH_NS`]: an established packet reads its
//! entry and writes nothing, so the entry's cache line is not bounced between the CPUs
//! that carry the flow's two directions.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use proxy_common::{
    counter, ct_flags, proto, Be16, Be32, CtEntryV4, CtKeyV4, CT_FULL_HOLD_NS, CT_PEER_REFRESH_NS,
    CT_REFRESH_NS,
};

use crate::{
    maps::{self, CT_FULL_V1, CT_NEW_V4_V2, CT_V4_V2},
    parse::{reversed, tcp_flag, Kind, Packet},
    snat, stats, trace,
    verdict::{DropReason, Result},
};

/// Flags that describe an entry's own direction; the rest is the flow's state.
pub(crate) const DIRECTION: u16 = ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST | ct_flags::REPLY;

/// The table an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Established,
    New,
}

impl Table {
    #[inline(always)]
    fn get(self, key: &CtKeyV4) -> Option<*mut CtEntryV4> {
        match self {
            Self::Established => CT_V4_V2.get_ptr_mut(key),
            Self::New => CT_NEW_V4_V2.get_ptr_mut(key),
        }
    }

    #[inline(always)]
    fn insert(self, key: &CtKeyV4, entry: &CtEntryV4, flags: u32) -> bool {
        if trace::active() {
            // Written nowhere; the answer the insert would give.
            return flags != BPF_NOEXIST || self.get(key).is_none();
        }
        match self {
            Self::Established => CT_V4_V2.insert(key, entry, u64::from(flags)).is_ok(),
            Self::New => CT_NEW_V4_V2.insert(key, entry, u64::from(flags)).is_ok(),
        }
    }

    #[inline(always)]
    fn remove(self, key: &CtKeyV4) {
        if trace::active() {
            return;
        }
        // Gone already is as good as removed.
        let _ = match self {
            Self::Established => CT_V4_V2.remove(key),
            Self::New => CT_NEW_V4_V2.remove(key),
        };
    }
}

/// The datapath's clock: CLOCK_MONOTONIC at the resolution of the scheduler tick
/// (`bpf_ktime_get_coarse_ns`, a plain read where `bpf_ktime_get_ns` reads the clock
/// source), the same clock the agent reaps with. Timeouts are seconds; a few
/// milliseconds of resolution change nothing.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: reading the clock has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

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

/// The key of the other direction's entry of the same flow.
#[inline(always)]
fn peer_key(tuple: &CtKeyV4, entry: &CtEntryV4) -> CtKeyV4 {
    reversed(&translated(tuple, entry))
}

/// Finds the live entry of `key`: established table first. An expired entry of the
/// established table is removed on sight, or it would shadow the new flow that
/// replaces it until the reaper came by.
#[inline(always)]
fn find(key: &CtKeyV4, now: u64) -> Option<(Table, *mut CtEntryV4)> {
    let config = maps::config();
    if let Some(ptr) = Table::Established.get(key) {
        // SAFETY: valid for this program run; read at once.
        let entry = unsafe { *ptr };
        if !config.ct_expired(&entry, key.proto, now) {
            return Some((Table::Established, ptr));
        }
        Table::Established.remove(key);
    }
    let ptr = Table::New.get(key)?;
    // SAFETY: as above.
    let entry = unsafe { *ptr };
    if config.ct_expired(&entry, key.proto, now) {
        return None;
    }
    Some((Table::New, ptr))
}

/// A TCP SYN without ACK: a client opening a connection.
#[inline(always)]
pub(crate) fn is_syn(tcp_flags: u8) -> bool {
    tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
}

/// The state bits a packet (of protocol `l4_proto`, with `tcp_flags`) adds to its
/// flow; both families.
#[inline(always)]
pub(crate) fn transition(l4_proto: u8, tcp_flags: u8, is_reply: bool) -> u16 {
    let mut add = if is_reply { ct_flags::SEEN_REPLY } else { 0 };
    if l4_proto == proto::TCP {
        if tcp_flags & tcp_flag::RST != 0 {
            add |= ct_flags::RST;
        }
        if tcp_flags & tcp_flag::FIN != 0 {
            add |= if is_reply {
                ct_flags::FIN_REPLY
            } else {
                ct_flags::FIN_ORIGINAL
            };
        }
    }
    add
}

/// Whether a packet of the original direction, after the reply was seen, shows the
/// flow established: for TCP the client's ACK of the SYN-ACK (or any later segment),
/// for UDP any datagram. Both families.
#[inline(always)]
pub(crate) fn completes_handshake(l4_proto: u8, tcp_flags: u8) -> bool {
    l4_proto != proto::TCP
        || tcp_flags & (tcp_flag::ACK | tcp_flag::SYN | tcp_flag::RST) == tcp_flag::ACK
}

/// Records that the established table had no room, so new flows are refused for
/// [`CT_FULL_HOLD_NS`].
#[inline(always)]
pub(crate) fn mark_full(now: u64) {
    if trace::active() {
        return;
    }
    if let Some(slot) = CT_FULL_V1.get_ptr_mut(0) {
        // SAFETY: a plain store into the map value; racing CPUs all store "now".
        unsafe { *slot = now };
    }
}

/// Whether new flows are admitted (the established table had room lately).
#[inline(always)]
pub(crate) fn admits_new_flows(now: u64) -> bool {
    CT_FULL_V1
        .get(0)
        .is_none_or(|&full_at| now.saturating_sub(full_at) > CT_FULL_HOLD_NS)
}

/// Moves a flow seen both ways from the new table to the established one. `false`
/// (and the flow stays new) when the established table is full or the peer entry is
/// gone.
#[inline(always)]
fn promote(key: &CtKeyV4, entry: &CtEntryV4, peer: &CtKeyV4, state: u16, now: u64) -> bool {
    let Some(peer_ptr) = Table::New.get(peer) else {
        return false;
    };
    // SAFETY: valid for this program run; copied at once.
    let peer_entry = unsafe { *peer_ptr };
    let state = state | ct_flags::ASSURED;
    let own = CtEntryV4 {
        flags: (entry.flags & DIRECTION) | state,
        last_seen_ns: now,
        peer_refreshed_ns: now,
        ..*entry
    };
    let other = CtEntryV4 {
        flags: (peer_entry.flags & DIRECTION) | state,
        last_seen_ns: now,
        ..peer_entry
    };
    // Established first, new removed after: a packet racing on another CPU finds the
    // flow in one table or the other.
    if !Table::Established.insert(peer, &other, BPF_ANY) {
        mark_full(now);
        return false;
    }
    if !Table::Established.insert(key, &own, BPF_ANY) {
        Table::Established.remove(peer);
        mark_full(now);
        return false;
    }
    Table::New.remove(key);
    Table::New.remove(peer);
    stats::count(counter::CT_ASSURED);
    true
}

/// Finds the live entry of the packet's flow, advances the flow's state, refreshes
/// both entries' idle timers, and returns a copy.
///
/// A TCP SYN that finds a closed flow (both FINs, or a RST) starts a new one instead
/// (port reuse): the old entries are removed and `None` returned. An ICMP error only
/// reads the entry of the flow it is about: it says nothing about the flow's state and
/// may be forged, so it neither refreshes nor closes anything.
#[inline(always)]
pub fn lookup(pkt: &Packet, now: u64) -> Option<CtEntryV4> {
    let (table, ptr) = find(&pkt.tuple, now)?;
    // SAFETY: the pointer is valid for this program run; copy the value out at once.
    let entry = unsafe { *ptr };
    trace::note(|record| {
        record.stages |= proxy_common::trace::stage::CT_HIT;
        record.service_id = entry.service_id;
        record.backend_id = entry.backend_id;
        record.ct_flags = entry.flags;
    });
    if pkt.kind == Kind::IcmpError {
        return Some(entry);
    }
    let is_reply = entry.flags & ct_flags::REPLY != 0;
    if !is_reply
        && pkt.tuple.proto == proto::TCP
        && is_syn(pkt.tcp_flags)
        && ct_flags::is_closed(entry.flags)
    {
        table.remove(&pkt.tuple);
        table.remove(&peer_key(&pkt.tuple, &entry));
        return None;
    }
    let state = (entry.flags | transition(pkt.tuple.proto, pkt.tcp_flags, is_reply)) & !DIRECTION;
    let flags = (entry.flags & DIRECTION) | state;
    if table == Table::New
        && !is_reply
        && state & ct_flags::SEEN_REPLY != 0
        && completes_handshake(pkt.tuple.proto, pkt.tcp_flags)
        && promote(
            &pkt.tuple,
            &entry,
            &peer_key(&pkt.tuple, &entry),
            state,
            now,
        )
    {
        return Some(CtEntryV4 {
            flags: flags | ct_flags::ASSURED,
            ..entry
        });
    }
    let state_changed = flags != entry.flags;
    let refresh_peer = now.saturating_sub(entry.peer_refreshed_ns) > CT_PEER_REFRESH_NS;
    if trace::active() {
        return Some(CtEntryV4 { flags, ..entry });
    }
    if now.saturating_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        // SAFETY: plain stores into the map value of this program run.
        unsafe { (*ptr).last_seen_ns = now };
    }
    // The established packet's path ends here: one lookup, no store.
    if state_changed || refresh_peer {
        // SAFETY: as above.
        unsafe {
            (*ptr).flags = flags;
            if refresh_peer {
                (*ptr).peer_refreshed_ns = now;
            }
        }
        if let Some(peer_ptr) = table.get(&peer_key(&pkt.tuple, &entry)) {
            // SAFETY: as above.
            unsafe {
                (*peer_ptr).last_seen_ns = now;
                (*peer_ptr).flags = ((*peer_ptr).flags & DIRECTION) | state;
            }
        }
    }
    Some(CtEntryV4 { flags, ..entry })
}

/// What a new flow is translated to.
#[derive(Clone, Copy)]
pub struct Translation {
    /// The source the flow leaves with: the client's own (its port may still be
    /// remapped, see [`create`]), or with [`Self::masquerade`] the node's address.
    pub new_src: (Be32, Be16),
    pub new_dst: (Be32, Be16),
    pub backend_id: u32,
    pub service_id: u32,
    /// Both directions go through the stack ([`ct_flags::VIA_STACK`]).
    pub via_stack: bool,
    /// The source port is drawn from the masquerade range ([`crate::snat`]);
    /// `new_src`'s port is ignored.
    pub masquerade: bool,
}

/// Claims `key` for a new flow's reply entry: free, or held by an expired flow, in
/// both tables. The insert into the new table is atomic (BPF_NOEXIST), so two CPUs
/// never claim the same key (nor does a flow overwrite a live one's); the established
/// table is checked after it, so a flow moving there concurrently is seen either way.
/// A function of its own, as [`crate::conntrack6`]'s claim: every path ends in one of
/// two answers, so the verifier finds the same state at each retry of [`create`]'s
/// loop whichever path failed.
#[inline(never)]
fn claim(key: &CtKeyV4, reply: &CtEntryV4, now: u64) -> bool {
    let config = maps::config();
    let expired = |ptr: Option<*mut CtEntryV4>| {
        ptr.is_none_or(|holder| {
            // SAFETY: read in place, valid for this program run.
            config.ct_expired(unsafe { &*holder }, key.proto, now)
        })
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

/// A new flow's reply entry and key, until its port is claimed.
struct ReplyClaim4 {
    key: CtKeyV4,
    entry: CtEntryV4,
    now: u64,
    claimed: bool,
}

impl snat::ReplyClaim for ReplyClaim4 {
    #[inline(always)]
    fn claim_port(&mut self, port: Be16) -> bool {
        self.key.dst_port = port;
        self.claimed = claim(&self.key, &self.entry, self.now);
        self.claimed
    }

    #[inline(always)]
    fn claimed(&self) -> bool {
        self.claimed
    }
}

/// Gives up the reply key of a closed flow in the established table. A client reuses
/// a source port for another frontend while its first connection is in TIME_WAIT, and
/// both go to one backend: the two flows are the same tuple once translated. Lookups
/// try the established table first, so the old flow's reply entry left there would
/// take the new flow's replies; a flow that is over gives its key up, and the new one
/// keeps the client's port, as netfilter lets a new SYN reuse a TIME_WAIT tuple.
#[inline(always)]
fn release_closed(key: &CtKeyV4) {
    if let Some(holder) = Table::Established.get(key) {
        // SAFETY: read in place, valid for this program run.
        if ct_flags::is_closed(unsafe { (*holder).flags }) {
            Table::Established.remove(key);
        }
    }
}

/// Records a new flow in the new-flow table: the entry for its original direction
/// (written to `out`) and the entry for replies, which undo it.
///
/// The reply key `(backend, new source)` must be free, or held by an expired flow
/// ([`claim`]); a live holder is never overwritten, in either table. The source port
/// is chosen so that it is:
/// - a masqueraded flow ([`Translation::masquerade`]) draws its port from the
///   masquerade range ([`crate::snat::draw_port`]), at most
///   [`crate::snat::ATTEMPTS`] times;
/// - any other flow first asks for the client's own port; when a live flow holds that
///   key (the client uses one ephemeral port towards two frontends at once, and both
///   chose the same backend: Linux picks ports per destination), the source port is
///   remapped, drawn from the same range as masquerade ports while the client's
///   address is kept, as netfilter's NAT searches for a unique tuple. Its replies get
///   the client's port back.
///
/// One call site, the draws in `bpf_loop` ([`crate::snat::claim_drawn`]): the
/// verifier walks them once per state that reaches the call, and keeps those few.
/// Inlined: the IPv4 entry points' frames hold its values already, and a frame of its
/// own would take the call chain to [`claim`] past the 512-byte stack limit.
///
/// `Ok(false)`: every key tried is held by a live flow. A remapped flow is told from
/// the others by its entry: [`ct_flags::REWRITE_SRC`] without masquerade.
///
/// # Errors
/// `CT_FULL` while the established table is full; `CT_INSERT` when an insert fails.
#[inline(always)]
pub fn create(
    original: &CtKeyV4,
    nat: &Translation,
    now: u64,
    out: &mut CtEntryV4,
) -> Result<bool> {
    if !admits_new_flows(now) {
        return Err(DropReason::CT_FULL);
    }
    let (new_src_addr, new_src_port) = nat.new_src;
    let (new_dst_addr, new_dst_port) = nat.new_dst;
    let forward = out;
    *forward = CtEntryV4 {
        last_seen_ns: now,
        peer_refreshed_ns: now,
        backend_id: nat.backend_id,
        service_id: nat.service_id,
        flags: if nat.via_stack {
            ct_flags::VIA_STACK
        } else {
            0
        },
        ..CtEntryV4::default()
    };
    let mut reply = ReplyClaim4 {
        // The translated tuple, reversed.
        key: CtKeyV4 {
            src_addr: new_dst_addr,
            dst_addr: new_src_addr,
            src_port: new_dst_port,
            dst_port: new_src_port,
            proto: original.proto,
            _pad: [0; 3],
        },
        entry: *forward,
        now,
        claimed: false,
    };
    reply.entry.flags |= ct_flags::REPLY;
    if new_dst_addr != original.dst_addr || new_dst_port != original.dst_port {
        forward.flags |= ct_flags::REWRITE_DST;
        forward.nat_dst_addr = new_dst_addr;
        forward.nat_dst_port = new_dst_port;
        reply.entry.flags |= ct_flags::REWRITE_SRC;
        reply.entry.nat_src_addr = original.dst_addr;
        reply.entry.nat_src_port = original.dst_port;
    }
    // The client's own port, unless masqueraded.
    if !nat.masquerade {
        release_closed(&reply.key);
        reply.claimed = claim(&reply.key, &reply.entry, now);
    }
    if !reply.claimed {
        // Masqueraded or remapped: the source is rewritten, to a drawn port.
        forward.flags |= ct_flags::REWRITE_SRC;
        forward.nat_src_addr = new_src_addr;
        reply.entry.flags |= ct_flags::REWRITE_DST;
        reply.entry.nat_dst_addr = original.src_addr;
        reply.entry.nat_dst_port = original.src_port;
        if !snat::claim_drawn_unrolled(&mut reply) {
            return Ok(false);
        }
        forward.nat_src_port = reply.key.dst_port;
    }
    if !Table::New.insert(original, forward, BPF_ANY) {
        Table::New.remove(&reply.key);
        return Err(DropReason::CT_INSERT);
    }
    Ok(true)
}
