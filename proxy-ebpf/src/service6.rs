//! IPv6 frontends: the frontend address set, frontend lookup and backend choice, with
//! the slot scheme of [`crate::service`] (slot 0 the frontend, a random slot in
//! `1..=count`, slot 1 the fallback while the agent shrinks a service). Session
//! affinity and source ranges have no IPv6 maps yet: a frontend that asks for
//! affinity gets a random backend per flow, one that asks for source ranges is refused
//! ([`crate::new_flow6`]), so no range is ever bypassed.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    frontend_addr, scope, service_flags, BackendV6, Be32x4, CtKeyV6, ServiceKeyV6, ServiceValueV6,
};

use crate::{
    destination::Destination,
    maps::{BACKEND_V6_V1, FE_ADDR_V6_V1, SVC_V6_V1},
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
fn lookup(tuple: &CtKeyV6, from_pod: bool) -> Option<Frontend> {
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

/// A backend picked at random among the frontend's slots, with its id. The frontend
/// must have `count > 0`.
#[inline(always)]
fn pick_random(frontend: &Frontend) -> Result<(u32, BackendV6)> {
    let count = u32::from(frontend.value.count);
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    // count > 0 and <= u16::MAX, so the slot fits in u16.
    let chosen_slot = (random % count + 1) as u16;
    let backend_id = match slot(frontend, chosen_slot) {
        Some(id) => id,
        None => slot(frontend, 1).ok_or(DropReason::BACKEND_MISSING)?,
    };
    // SAFETY: copied out immediately.
    let backend = BACKEND_V6_V1
        .get_ptr(backend_id)
        .map(|backend| unsafe { *backend })
        .ok_or(DropReason::BACKEND_MISSING)?;
    Ok((backend_id, backend))
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
    /// The frontend has loadBalancerSourceRanges, which have no IPv6 map yet: refused,
    /// so that no range is bypassed.
    SourceRanges,
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

/// Decides a new flow to `tuple`'s destination (from a pod on this node: `from_pod`):
/// its frontend, and a backend written to `out`. A function of its own (see
/// [`crate::parse6::parse`]).
///
/// # Errors
/// `BACKEND_MISSING` when a slot or backend vanished under a concurrent update.
#[inline(never)]
pub fn choose(tuple: &CtKeyV6, from_pod: bool, out: &mut Chosen) -> Result<Outcome> {
    let Some(frontend) = lookup(tuple, from_pod) else {
        return Ok(Outcome::NoFrontend);
    };
    let flags = frontend.value.flags;
    if flags & service_flags::SOURCE_RANGES != 0 {
        return Ok(Outcome::SourceRanges);
    }
    if frontend.value.count == 0 {
        if flags & service_flags::DROP_WHEN_EMPTY != 0 {
            return Ok(Outcome::EmptyDrop);
        }
        return Ok(Outcome::Empty);
    }
    let (backend_id, backend) = pick_random(&frontend)?;
    *out = Chosen {
        backend,
        backend_id,
        service_id: frontend.value.service_id,
        frontend_flags: flags,
    };
    Ok(Outcome::Backend)
}
