//! Frontend lookup and backend selection (random slot, or the client's affinity).
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use proxy_common::{
    counter, scope, service_flags, AffinityKeyV4, AffinityValueV4, BackendV4, Be32, CtKeyV4,
    ServiceKeyV4, ServiceValueV4, SourceRangeV4,
};

use crate::{
    maps::{AFFINITY_V4_V2, BACKEND_V4_V1, SRCRANGE_V4_V1, SVC_V4_V1},
    stats,
    verdict::{DropReason, Result},
};

/// A frontend entry (slot 0) as found.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub key: ServiceKeyV4,
    pub value: ServiceValueV4,
}

#[inline(always)]
fn get(key: &ServiceKeyV4) -> Option<ServiceValueV4> {
    // SAFETY: copied out immediately; entries are replaced, never edited in place.
    SVC_V4_V1.get_ptr(key).map(|value| unsafe { *value })
}

/// The frontend the packet is addressed to, if any. Traffic from pods uses the
/// internal backend set where a service has one (`from_pod`).
#[inline(always)]
pub fn lookup(tuple: &CtKeyV4, from_pod: bool) -> Option<Frontend> {
    let mut key = ServiceKeyV4 {
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

/// Whether `client` is inside the frontend's loadBalancerSourceRanges. The trie key
/// matches the service id whole (32 bits) and then the address by prefix.
#[inline(always)]
pub fn source_allowed(frontend: &Frontend, client: Be32) -> bool {
    let key = Key::new(
        64,
        SourceRangeV4 {
            service_id: Be32::from_host(frontend.value.service_id),
            addr: client,
        },
    );
    SRCRANGE_V4_V1.get(&key).is_some()
}

#[inline(always)]
fn backend(id: u32) -> Option<BackendV4> {
    // SAFETY: copied out immediately.
    BACKEND_V4_V1.get_ptr(id).map(|backend| unsafe { *backend })
}

/// The backend id in `slot` of the frontend.
#[inline(always)]
fn slot(frontend: &Frontend, slot: u16) -> Option<u32> {
    let mut key = frontend.key;
    key.slot = slot;
    get(&key).map(|value| value.backend_id)
}

/// Slots an affinity hit searches when its backend moved to another slot (the syncer
/// rewrites slots in order when the backend set changes). Beyond them the client is
/// re-balanced, as if the backend had left: a bounded loop for the verifier and the
/// packet, and stickiness lost only for services that large after a change.
pub(crate) const AFFINITY_SEARCH_SLOTS: u16 = 32;

/// The slot of `frontend` that names `backend_id` now: `hint` first, then the first
/// [`AFFINITY_SEARCH_SLOTS`]. `None`: the backend left the service.
#[inline(always)]
fn current_slot(frontend: &Frontend, backend_id: u32, hint: u16) -> Option<u16> {
    let count = frontend.value.count;
    if hint >= 1 && hint <= count && slot(frontend, hint) == Some(backend_id) {
        return Some(hint);
    }
    let mut candidate = 1;
    while candidate <= AFFINITY_SEARCH_SLOTS {
        if candidate > count {
            return None;
        }
        if slot(frontend, candidate) == Some(backend_id) {
            return Some(candidate);
        }
        candidate += 1;
    }
    None
}

/// A backend chosen for a new flow, with the slot that named it (kept in affinity
/// records, so a later hit can check the backend is still the service's).
#[derive(Clone, Copy)]
pub struct Chosen {
    pub backend_id: u32,
    pub backend: BackendV4,
    pub slot: u16,
}

/// The affinity record of `chosen` made at `now`.
#[inline(always)]
pub fn affinity_record(chosen: &Chosen, now: u64) -> AffinityValueV4 {
    AffinityValueV4 {
        last_used_ns: now,
        backend_id: chosen.backend_id,
        slot: chosen.slot,
        _pad: [0; 2],
    }
}

/// The backend an affinity record names, if the record still holds at `now`: within
/// the service's timeout, and the backend still in one of its slots.
#[inline(always)]
pub fn remembered(frontend: &Frontend, record: &AffinityValueV4, now: u64) -> Option<Chosen> {
    let timeout_ns = u64::from(frontend.value.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(record.last_used_ns) > timeout_ns {
        return None;
    }
    let slot = current_slot(frontend, record.backend_id, record.slot)?;
    let backend = backend(record.backend_id)?;
    Some(Chosen {
        backend_id: record.backend_id,
        backend,
        slot,
    })
}

/// A backend picked at random among the frontend's slots. The frontend must have
/// `count > 0`.
#[inline(always)]
pub fn pick_random(frontend: &Frontend) -> Result<Chosen> {
    let count = u32::from(frontend.value.count);
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    // count > 0 and <= u16::MAX, so the slot fits in u16.
    let chosen_slot = (random % count + 1) as u16;
    // A slot can vanish while the agent shrinks the service (count lowered first, then
    // slots deleted); slot 1 is the last to go.
    let (slot, backend_id) = match slot(frontend, chosen_slot) {
        Some(id) => (chosen_slot, id),
        None => (1, slot(frontend, 1).ok_or(DropReason::BACKEND_MISSING)?),
    };
    let backend = backend(backend_id).ok_or(DropReason::BACKEND_MISSING)?;
    Ok(Chosen {
        backend_id,
        backend,
        slot,
    })
}

/// Picks the backend for a new flow from `client`: the client's affinity record while
/// it holds, else at random. The frontend must have `count > 0`.
#[inline(always)]
pub fn select_backend(frontend: &Frontend, client: proxy_common::Be32) -> Result<(u32, BackendV4)> {
    if frontend.value.flags & service_flags::AFFINITY == 0 {
        let chosen = pick_random(frontend)?;
        return Ok((chosen.backend_id, chosen.backend));
    }
    let key = AffinityKeyV4 {
        client_addr: client,
        service_id: frontend.value.service_id,
    };
    let now = crate::conntrack::now();
    // SAFETY: copied out immediately.
    let record = AFFINITY_V4_V2.get_ptr(key).map(|found| unsafe { *found });
    let chosen = match record.and_then(|record| remembered(frontend, &record, now)) {
        Some(chosen) => {
            stats::count(counter::AFFINITY_HIT);
            crate::trace::stage(proxy_common::trace::stage::AFFINITY_HIT);
            chosen
        }
        None => pick_random(frontend)?,
    };
    if crate::trace::active() {
        return Ok((chosen.backend_id, chosen.backend));
    }
    // Losing an affinity record only costs stickiness for one flow; never drop for it.
    let _ = AFFINITY_V4_V2.insert(key, affinity_record(&chosen, now), u64::from(BPF_ANY));
    Ok((chosen.backend_id, chosen.backend))
}
