//! Conntrack upkeep from userspace: reaping expired entries of both tables (established
//! and new flows), and forgetting the flows and affinities of backends that left a
//! service.
//!
//! These walks visit every entry of tables that hold up to millions, one syscall per
//! entry: the agent runs them on a thread of their own ([`crate::upkeep`]), on handles
//! of that thread's own ([`Tables`]), and each walk stops early when asked to
//! (`keep_going`), so neither the event loop nor a shutdown waits for them.
use std::collections::BTreeSet;

use aya::maps::{HashMap, IterableMap as _, MapData};
use proxy_common::{
    names, proto, AffinityKeyV4, AffinityValueV4, CtEntryV4, CtKeyV4, DatapathConfig,
};

use super::{reopen, Error, Maps, Result};

type Table = HashMap<MapData, CtKeyV4, CtEntryV4>;
type AffinityTable = HashMap<MapData, AffinityKeyV4, AffinityValueV4>;

/// Handles of their own on the conntrack and affinity maps (the same kernel maps as
/// the agent's [`Maps`]), for walks on another thread.
pub struct Tables {
    pub conntrack: Table,
    pub conntrack_new: Table,
    pub affinity: AffinityTable,
}

impl Tables {
    /// Opens second handles on the maps of `maps`.
    ///
    /// # Errors
    /// When the kernel refuses a handle.
    pub fn open(maps: &Maps) -> Result<Self> {
        Ok(Self {
            conntrack: reopen(maps.conntrack.map(), names::CONNTRACK_V4)?,
            conntrack_new: reopen(maps.conntrack_new.map(), names::CONNTRACK_NEW_V4)?,
            affinity: reopen(maps.affinity.map(), names::AFFINITY_V4)?,
        })
    }
}

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
    /// Entries of the established table alive after the pass.
    pub live: usize,
    /// Entries of the new-flow table alive after the pass.
    pub live_new: usize,
    /// Entries removed, both tables.
    pub removed: usize,
}

fn ct_error(name: &'static str, source: aya::maps::MapError) -> Error {
    Error::Map { name, source }
}

/// Removes the entries of one table idle for longer than their timeout; returns
/// `(live, removed)`. Keys are collected first: deleting while walking with
/// get_next_key restarts the walk.
fn collect_table(
    table: &mut Table,
    name: &'static str,
    config: &DatapathConfig,
    now_ns: u64,
    keep_going: &dyn Fn() -> bool,
) -> Result<(usize, usize)> {
    let mut expired = Vec::new();
    let mut live = 0;
    for entry in table.iter() {
        if !keep_going() {
            return Ok((live, 0));
        }
        let (key, value) = match entry {
            Ok(entry) => entry,
            // An entry evicted or moved between get_next_key and lookup: skip it.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(error) => return Err(ct_error(name, error)),
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
            table
                .get(key, 0)
                .is_ok_and(|value| config.ct_expired(&value, key.proto, now_ns))
        })
        .collect();
    Ok((live, remove_all(table, &still_expired)))
}

/// Removes conntrack entries idle for longer than their timeout, in both tables.
///
/// # Errors
/// When a table cannot be read.
pub fn collect_expired(maps: &mut Maps, config: &DatapathConfig, now_ns: u64) -> Result<GcReport> {
    collect_expired_in(
        &mut maps.conntrack,
        &mut maps.conntrack_new,
        config,
        now_ns,
        &|| true,
    )
}

/// [`collect_expired`] on the tables of [`Tables`]; stops early (with what it counted
/// so far) once `keep_going` says no.
///
/// # Errors
/// When a table cannot be read.
pub fn collect_expired_in(
    conntrack: &mut Table,
    conntrack_new: &mut Table,
    config: &DatapathConfig,
    now_ns: u64,
    keep_going: &dyn Fn() -> bool,
) -> Result<GcReport> {
    let (live, removed) =
        collect_table(conntrack, names::CONNTRACK_V4, config, now_ns, keep_going)?;
    let (live_new, removed_new) = collect_table(
        conntrack_new,
        names::CONNTRACK_NEW_V4,
        config,
        now_ns,
        keep_going,
    )?;
    Ok(GcReport {
        live,
        live_new,
        removed: removed + removed_new,
    })
}

fn remove_all(table: &mut Table, keys: &[CtKeyV4]) -> usize {
    keys.iter().filter(|key| table.remove(key).is_ok()).count()
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
    forget_backends_in(
        [&mut maps.conntrack, &mut maps.conntrack_new],
        &mut maps.affinity,
        pairs,
        &|| true,
    )
}

/// [`forget_backends`] on the tables of [`Tables`]; stops early once `keep_going`
/// says no.
///
/// # Errors
/// When a map cannot be read.
pub fn forget_backends_in(
    conntrack_tables: [&mut Table; 2],
    affinity: &mut AffinityTable,
    pairs: &BTreeSet<(u32, u32)>,
    keep_going: &dyn Fn() -> bool,
) -> Result<(usize, usize)> {
    if pairs.is_empty() {
        return Ok((0, 0));
    }
    let mut flows_removed = 0;
    for (table, name) in conntrack_tables
        .into_iter()
        .zip([names::CONNTRACK_V4, names::CONNTRACK_NEW_V4])
    {
        let mut flows = Vec::new();
        for entry in table.iter() {
            if !keep_going() {
                return Ok((flows_removed, 0));
            }
            let (key, value) = match entry {
                Ok(entry) => entry,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(error) => return Err(ct_error(name, error)),
            };
            if key.proto == proto::UDP && pairs.contains(&(value.service_id, value.backend_id)) {
                flows.push(key);
            }
        }
        flows_removed += remove_all(table, &flows);
    }

    let mut affinities: Vec<AffinityKeyV4> = Vec::new();
    for entry in affinity.iter() {
        if !keep_going() {
            break;
        }
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
        .filter(|key| affinity.remove(key).is_ok())
        .count();
    Ok((flows_removed, affinity_removed))
}

/// How many entries the affinity table holds (a walk; stops early once `keep_going`
/// says no).
pub fn count_affinities(affinity: &AffinityTable, keep_going: &dyn Fn() -> bool) -> usize {
    affinity.keys().take_while(|_| keep_going()).count()
}
