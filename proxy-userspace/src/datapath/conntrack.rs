//! Conntrack upkeep from userspace: reaping expired entries, and forgetting the flows
//! and affinities of backends that left a service.
use std::collections::BTreeSet;

use proxy_common::{names, proto, AffinityKeyV4, CtKeyV4, DatapathConfig};

use super::{Error, Maps, Result};

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Result of one reaping pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries alive after the pass.
    pub live: usize,
    /// Entries removed.
    pub removed: usize,
}

fn ct_error(source: aya::maps::MapError) -> Error {
    Error::Map {
        name: names::CONNTRACK_V4,
        source,
    }
}

/// Removes conntrack entries idle for longer than their timeout. Keys are collected
/// first: deleting while walking with get_next_key restarts the walk.
///
/// # Errors
/// When the map cannot be read.
pub fn collect_expired(maps: &mut Maps, config: &DatapathConfig, now_ns: u64) -> Result<GcReport> {
    let mut expired = Vec::new();
    let mut live = 0;
    for entry in maps.conntrack.iter() {
        let (key, value) = match entry {
            Ok(entry) => entry,
            // An entry evicted between get_next_key and lookup: skip it.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(error) => return Err(ct_error(error)),
        };
        if config.ct_expired(&value, key.proto, now_ns) {
            expired.push(key);
        } else {
            live += 1;
        }
    }
    // The datapath may have reused a key since the walk (an expired flow's 5-tuple
    // seen again starts a new flow under the same key): only delete what is still
    // expired now, or a fresh connection would lose its entry.
    let still_expired: Vec<CtKeyV4> = expired
        .into_iter()
        .filter(|key| {
            maps.conntrack
                .get(key, 0)
                .is_ok_and(|value| config.ct_expired(&value, key.proto, now_ns))
        })
        .collect();
    let removed = remove_all(maps, &still_expired);
    Ok(GcReport { live, removed })
}

fn remove_all(maps: &mut Maps, keys: &[CtKeyV4]) -> usize {
    keys.iter()
        .filter(|key| maps.conntrack.remove(key).is_ok())
        .count()
}

/// Forgets what tied clients to `(service id, backend id)` pairs that are gone: UDP
/// conntrack entries (so a client's next datagram picks a live backend instead of
/// blackholing, which matters for DNS) and session affinity entries. TCP entries stay
/// until the connection closes, as kube-proxy leaves established connections alone.
///
/// Returns the number of conntrack and affinity entries removed.
///
/// # Errors
/// When a map cannot be read.
pub fn forget_backends(maps: &mut Maps, pairs: &BTreeSet<(u32, u32)>) -> Result<(usize, usize)> {
    if pairs.is_empty() {
        return Ok((0, 0));
    }
    let mut flows = Vec::new();
    for entry in maps.conntrack.iter() {
        let (key, value) = match entry {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(error) => return Err(ct_error(error)),
        };
        if key.proto == proto::UDP && pairs.contains(&(value.service_id, value.backend_id)) {
            flows.push(key);
        }
    }
    let flows_removed = remove_all(maps, &flows);

    let mut affinities: Vec<AffinityKeyV4> = Vec::new();
    for entry in maps.affinity.iter() {
        let (key, value) = match entry {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(source) => {
                return Err(Error::Map {
                    name: names::AFFINITY_V4,
                    source,
                })
            }
        };
        if pairs.contains(&(key.service_id, value.backend_id)) {
            affinities.push(key);
        }
    }
    let affinity_removed = affinities
        .iter()
        .filter(|key| maps.affinity.remove(key).is_ok())
        .count();
    Ok((flows_removed, affinity_removed))
}
