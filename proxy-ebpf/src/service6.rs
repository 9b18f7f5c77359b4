//! IPv6 frontends: the frontend address set, frontend lookup and backend choice, with
//! the slot scheme of [`crate::service`] (slot 0 the frontend, a random slot in
//! `1..=count`, slot 1 the fallback while the agent shrinks a service), session
//! affinity per client address (`AFFINITY_V6_V1`, records honoured while their
//! backend is still in a slot of the service, as for IPv4) and loadBalancerSourceRanges
//! (`SRCRANGE_V6_V1`, an LPM trie keyed by service id and client address).
use aya_ebpf::{
    bindings::{__sk_buff, BPF_ANY},
    helpers::bpf_get_prandom_u32,
    maps::lpm_trie::Key,
};
use proxy_common::{
    counter, frontend_addr, scope, service_flags, trace::stage, AffinityKeyV6, AffinityValueV6,
    BackendV6, Be32, Be32x4, CtKeyV6, ServiceKeyV6, ServiceValueV6, SourceRangeV6,
};

use crate::{
    destination::Destination,
    maps::{AFFINITY_V6_V1, BACKEND_V6_V1, FE_ADDR_V6_V1, SRCRANGE_V6_V1, SVC_V6_V1},
    parse6::Packet6,
    service::AFFINITY_SEARCH_SLOTS,
    stats, takeover, trace,
    verdict::{DropReason, Result},
};

/// Classifies `addr`, a packet's destination, by the IPv6 frontend address set. There
/// is no IPv6 service CIDR yet, so an address no frontend uses is
/// [`Destination::Elsewhere`].
#[inline(always)]
pub fn classify(addr: &Be32x4) -> Destination {
    // SAFETY: copied out at once.
    match FE_ADDR_V6_V1.get_ptr(addr).map(|found| unsafe { *found }) {
        Some(found) => Destination::Frontend {
            cluster_ip: found.kinds & frontend_addr::CLUSTER_IP != 0,
        },
        None => Destination::Elsewhere,
    }
}

/// A frontend entry (slot 0) as found.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub key: ServiceKeyV6,
    pub value: ServiceValueV6,
}

#[inline(always)]
fn get(key: &ServiceKeyV6) -> Option<ServiceValueV6> {
    // SAFETY: copied out immediately; entries are replaced, never edited in place.
    SVC_V6_V1.get_ptr(key).map(|value| unsafe { *value })
}

/// The frontend the packet is addressed to, if any. Traffic from pods uses the
/// internal backend set where a service has one (`from_pod`), as for IPv4.
#[inline(always)]
pub(crate) fn lookup(tuple: &CtKeyV6, from_pod: bool) -> Option<Frontend> {
    let mut key = ServiceKeyV6 {
        addr: tuple.dst_addr,
        port: tuple.dst_port,
        slot: 0,
        proto: tuple.proto,
        scope: scope::DEFAULT,
        _pad: [0; 2],
    };
    let value = get(&key)?;
    if from_pod && value.flags & service_flags::HAS_INTERNAL_SCOPE != 0 {
        key.scope = scope::INTERNAL;
        if let Some(internal) = get(&key) {
            return Some(Frontend {
                key,
                value: internal,
            });
        }
    }
    Some(Frontend { key, value })
}

/// The backend id in `slot` of the frontend.
#[inline(always)]
fn slot(frontend: &Frontend, slot: u16) -> Option<u32> {
    let mut key = frontend.key;
    key.slot = slot;
    get(&key).map(|value| value.backend_id)
}

#[inline(always)]
fn backend(id: u32) -> Option<BackendV6> {
    // SAFETY: copied out immediately.
    BACKEND_V6_V1.get_ptr(id).map(|backend| unsafe { *backend })
}

/// A backend picked at random among the frontend's slots, written to `out`; returns
/// the slot that named it. The frontend must have `count > 0`.
#[inline(always)]
pub(crate) fn pick_random(frontend: &Frontend, out: &mut Chosen) -> Result<u16> {
    let count = u32::from(frontend.value.count);
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    // count > 0 and <= u16::MAX, so the slot fits in u16.
    let chosen_slot = (random % count + 1) as u16;
    let (slot_used, backend_id) = match slot(frontend, chosen_slot) {
        Some(id) => (chosen_slot, id),
        None => (1, slot(frontend, 1).ok_or(DropReason::BACKEND_MISSING)?),
    };
    out.backend = backend(backend_id).ok_or(DropReason::BACKEND_MISSING)?;
    out.backend_id = backend_id;
    Ok(slot_used)
}

/// The slot of the frontend that holds `backend_id`, `hint` first, as
/// [`crate::service`]'s (a backend that left the service is never followed); 0 when
/// none does. A function of its own returning a scalar: inlined, each of the search's
/// exits was a state of its own for the verifier, and it verified the rest of the new
/// flow once per exit.
#[inline(never)]
fn current_slot(frontend: &Frontend, backend_id: u32, hint: u16) -> u16 {
    let count = frontend.value.count;
    if hint >= 1 && hint <= count && slot(frontend, hint) == Some(backend_id) {
        return hint;
    }
    let mut candidate = 1;
    while candidate <= AFFINITY_SEARCH_SLOTS {
        if candidate > count {
            return 0;
        }
        if slot(frontend, candidate) == Some(backend_id) {
            return candidate;
        }
        candidate += 1;
    }
    0
}

/// The client's affinity record, when it still holds at `now` (within the service's
/// timeout, its backend still in a slot), written to `out`; returns the slot that
/// holds the backend now.
#[inline(always)]
fn remembered(frontend: &Frontend, key: &AffinityKeyV6, now: u64, out: &mut Chosen) -> Option<u16> {
    let record = AFFINITY_V6_V1.get_ptr(key)?;
    // SAFETY: copied out at once.
    honoured(frontend, unsafe { *record }, now, out)
}

/// `record`'s backend, when the record still holds at `now` (within the service's
/// timeout, its backend still in a slot), written to `out`; returns the slot that holds
/// the backend now. Shared with the socket layer's records ([`crate::sock6`]).
#[inline(always)]
pub(crate) fn honoured(
    frontend: &Frontend,
    record: AffinityValueV6,
    now: u64,
    out: &mut Chosen,
) -> Option<u16> {
    let timeout_ns = u64::from(frontend.value.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(record.last_used_ns) > timeout_ns {
        return None;
    }
    let slot_now = current_slot(frontend, record.backend_id, record.slot);
    if slot_now == 0 {
        return None;
    }
    out.backend = backend(record.backend_id)?;
    out.backend_id = record.backend_id;
    Some(slot_now)
}

/// Whether `client` is inside one of the frontend's source ranges.
#[inline(always)]
fn source_allowed(frontend: &Frontend, client: &Be32x4) -> bool {
    let key = Key::new(
        32 + 128,
        SourceRangeV6 {
            service_id: Be32::from_host(frontend.value.service_id),
            addr: *client,
        },
    );
    SRCRANGE_V6_V1.get(&key).is_some()
}

/// What a new flow to a frontend address gets ([`choose`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A backend, written to the caller's [`Chosen`].
    Backend,
    /// No frontend has the packet's port and protocol at this address.
    NoFrontend,
    /// The frontend has no endpoints: reject.
    Empty,
    /// The frontend has no endpoints and asks for a drop (Local traffic policies).
    EmptyDrop,
    /// The frontend has loadBalancerSourceRanges and the client is in none of them.
    SourceRanges,
    /// Netfilter's conntrack already translates the flow (kube-proxy's, at a
    /// takeover, [`crate::takeover`]): it passes untouched.
    Netfilter,
}

/// The backend a new flow goes to.
#[derive(Clone, Copy, Default)]
pub struct Chosen {
    pub backend: BackendV6,
    pub backend_id: u32,
    pub service_id: u32,
    /// The frontend's [`service_flags`].
    pub frontend_flags: u16,
}

/// Decides a new flow to the packet's destination (from a pod on this node:
/// `from_pod`): its frontend, and a backend written to `out`; a flow netfilter
/// translates is left to it. A function of its own (see [`crate::parse6::parse`]).
/// Each decision is noted for `kpr trace` ([`crate::trace`]), whose instance records
/// no affinity.
///
/// # Errors
/// `BACKEND_MISSING` when a slot or backend vanished under a concurrent update.
#[inline(never)]
pub fn choose(
    skb: *mut __sk_buff,
    pkt: &Packet6,
    from_pod: bool,
    out: &mut Chosen,
) -> Result<Outcome> {
    let tuple = &pkt.tuple;
    let Some(frontend) = lookup(tuple, from_pod) else {
        return Ok(Outcome::NoFrontend);
    };
    trace::note(|record| {
        record.stages |= stage::FRONTEND;
        if frontend.key.scope == scope::INTERNAL {
            record.stages |= stage::INTERNAL_SCOPE;
        }
        record.service_id = frontend.value.service_id;
        record.frontend_flags = frontend.value.flags;
        record.frontend_count = frontend.value.count;
    });
    if takeover::netfilter_translates6(skb, pkt) {
        trace::stage(stage::NETFILTER);
        return Ok(Outcome::Netfilter);
    }
    let flags = frontend.value.flags;
    if flags & service_flags::SOURCE_RANGES != 0 {
        if !source_allowed(&frontend, &tuple.src_addr) {
            trace::stage(stage::SOURCE_DENIED);
            return Ok(Outcome::SourceRanges);
        }
        trace::stage(stage::SOURCE_ALLOWED);
    }
    if frontend.value.count == 0 {
        if flags & service_flags::DROP_WHEN_EMPTY != 0 {
            trace::stage(stage::EMPTY_DROP);
            return Ok(Outcome::EmptyDrop);
        }
        trace::stage(stage::EMPTY_REJECT);
        return Ok(Outcome::Empty);
    }
    out.service_id = frontend.value.service_id;
    out.frontend_flags = flags;
    if flags & service_flags::AFFINITY == 0 {
        pick_random(&frontend, out)?;
        return Ok(Outcome::Backend);
    }
    // The slot stays in this frame, out of `Chosen`: the verifier then sees the same
    // caller state after this call whichever slot the search ended at, and verifies
    // the rest of the new flow once rather than once per slot.
    let key = AffinityKeyV6 {
        client_addr: tuple.src_addr,
        service_id: frontend.value.service_id,
    };
    let now = crate::conntrack::now();
    let slot_used = match remembered(&frontend, &key, now, out) {
        Some(slot_used) => {
            stats::count(counter::AFFINITY_HIT);
            trace::stage(stage::AFFINITY_HIT);
            slot_used
        }
        None => pick_random(&frontend, out)?,
    };
    if trace::active() {
        return Ok(Outcome::Backend);
    }
    let record = AffinityValueV6 {
        last_used_ns: now,
        backend_id: out.backend_id,
        slot: slot_used,
        _pad: [0; 2],
    };
    // Losing an affinity record only costs stickiness for one flow; never drop for it.
    let _ = AFFINITY_V6_V1.insert(key, record, u64::from(BPF_ANY));
    Ok(Outcome::Backend)
}
